"""Triton backend entry point: routes each op to the kernel file that computes it.

Kernel modules are imported on first use so that importing the package never compiles or even
imports triton on machines that will not use it.
"""

from __future__ import annotations

import importlib


def _kernel(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def forward_kernel(a):
    """The kernel module that computes this forward call.

    Few query rows per KV head (decode) go to the memory-bound split-KV kernel; the dense
    fp16/bf16/fp8 prefill on Hopper to the warp-specialized Gluon kernel where it is the faster
    one (0.98-1.09x cuDNN at N >= 4k against 0.75-0.92x for the portable kernel, BENCHMARKS.md);
    everything else to the portable tiled kernel.
    """
    decode = _kernel("decode")
    if decode.supports(a) is None:
        return decode
    hopper = _kernel("fwd_hopper")
    if hopper.supports(a):
        return hopper
    return _kernel("fwd")


def forward(a):
    return forward_kernel(a).forward(a)


def backward(dout, q, k, v, out, lse, a, deterministic):
    return _kernel("bwd").backward(dout, q, k, v, out, lse, a, deterministic)


def append_kv(*args):
    return _kernel("append_kv").append_kv(*args)


def combine(out_partial, lse_partial, out_dtype):
    return _kernel("combine").combine(out_partial, lse_partial, out_dtype)


def scheduler_metadata(*args):
    return _kernel("scheduler").scheduler_metadata(*args)

"""Triton backend entry point: routes each op to the kernel file that computes it.

Kernel modules are imported on first use so that importing the package never compiles or even
imports triton on machines that will not use it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Optional

import torch

from . import arch


def on_device(t: torch.Tensor):
    """A context making t's CUDA device current when it is not: Triton launches on the current
    device's stream, so tensors on another GPU (transformers' device_map="auto" puts layers on
    several) would otherwise be read from the wrong device. The official wrapper guards alike."""
    if t.is_cuda:
        index = t.device.index
        if index is not None and index != torch.cuda.current_device():
            return torch.cuda.device(index)
    return contextlib.nullcontext()


def unsupported_reason(a, backward: bool = False) -> Optional[str]:
    """What the GPU itself rules out (dispatch asks before routing a call here): below sm_80, and
    fp8 below sm_89; the call then goes to the next backend with this reason."""
    q = a.q
    if q.is_cuda:
        return arch.gpu_refusal(q.device, a.is_fp8)
    return None


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    # Cached: importlib's lookup costs about a microsecond, and a decode step asks several times.
    return importlib.import_module(f"{__package__}.{name}")


def forward_kernel(a):
    """The kernel module that computes this forward call.

    Few query rows per KV head (decode) go to the memory-bound split-KV kernel; the prefill on
    Hopper (fp16/bf16 dense or varlen, fp8 e4m3 dense, and chunked prefill over a paged cache
    with pages of 16+ tokens) to the warp-specialized Gluon kernel where it is the faster one
    (dense: 0.98-1.09x cuDNN at N >= 4k against 0.75-0.92x for the portable kernel,
    BENCHMARKS.md); everything else to the portable tiled kernel.
    """
    decode = _kernel("decode")
    if decode.supports(a) is None:
        return decode
    hopper = _kernel("fwd_hopper")
    if hopper.supports(a):
        return hopper
    return _kernel("fwd")


def forward_route(a) -> tuple[str, str]:
    """(the kernel module forward_kernel picks, why): for `python -m flash_attn_3 info`."""
    module = forward_kernel(a).__name__.rsplit(".", 1)[-1]
    if module == "decode":
        return module, "few query rows per KV head: the split-KV decode kernel"
    if module == "fwd_hopper":
        if a.page_table is not None:
            return module, ("the warp-specialized Gluon kernel (sm_90), paged K/V by one TMA "
                            "copy per page")
        return module, "the warp-specialized Gluon kernel (sm_90)"
    return module, "the portable kernel; Gluon refused: " + _gluon_refusal(a, "fwd_hopper")


def backward_route(a, deterministic: bool = False) -> tuple[str, str]:
    """(the kernel module backward_kernel picks, why)."""
    module = backward_kernel(a, deterministic).__name__.rsplit(".", 1)[-1]
    if module == "bwd_hopper":
        return module, "the warp-specialized Gluon kernel (sm_90)"
    return module, "the portable kernels; Gluon refused: " + _gluon_refusal(a, "bwd_hopper")


def _gluon_refusal(a, name: str) -> str:
    from .gluon_compat import refusal

    reason = refusal(a.q.device) or _kernel(name).named_refusal(a)
    if reason:
        return reason
    if name == "fwd_hopper" and _kernel(name).in_scope(a):
        return "the portable kernel measured faster for this shape"
    return "a feature or layout outside the Gluon kernel's scope"


def forward(a):
    with on_device(a.q):
        return forward_kernel(a).forward(a)


def backward_kernel(a, deterministic: bool):
    """The kernel module that computes this backward call: the warp-specialized Gluon kernel for
    the dense fp16/bf16 case on Hopper (deterministic or not), else the portable kernels."""
    hopper = _kernel("bwd_hopper")
    if hopper.supports(a, deterministic):
        return hopper
    return _kernel("bwd")


def backward(dout, q, k, v, out, lse, a, deterministic, grads=None):
    with on_device(q):
        return backward_kernel(a, deterministic).backward(dout, q, k, v, out, lse, a, deterministic,
                                                          grads=grads)


def append_kv(*args):
    with on_device(args[0]):  # the cache
        return _kernel("append_kv").append_kv(*args)


def combine(out_partial, lse_partial, out_dtype):
    with on_device(out_partial):
        return _kernel("combine").combine(out_partial, lse_partial, out_dtype)


def scheduler_metadata(*args):
    return _kernel("scheduler").scheduler_metadata(*args)


def kvcache_plan(*args):
    """A replayable plan of an eager flash_attn_with_kvcache step (step.py), or None."""
    with on_device(args[0][0]):  # q
        return _kernel("step").plan(*args)

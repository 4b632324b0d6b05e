"""Sweep the Triton backward's block configs on the GPU, next to cuDNN, or compile them offline.

    python -m benchmarks.tune_bwd [--budget SECONDS] [--only-d 128]      (GPU: times, $OUT/tune_bwd.json)
    python -m benchmarks.tune_bwd --aot [--only-d 128]                   (any machine: sm_90 ptxas)

GPU part, per case (bf16, B·N = 32k tokens, H·D = 2048, the perf_guide anchors): cuDNN's backward,
our backward as routed (autotuned, default and deterministic), then whole backwards with one
kernel's config pinned to each candidate (the other kernel at its first candidate): "atomic dkdv"
(default mode), "det dkdv" and "det dq" (deterministic mode). TFLOP/s count 2.5x the forward's
4·B·H·N²·D, halved when causal.
The best configs feed _DKDV_CONFIGS / _DQ_CONFIGS and ATOMIC_DQ_BY_DEFAULT in
flash_attn_3/backends/triton/bwd.py.

--aot: compiles every candidate for sm_90 with the JIT's divisibility hints and prints shared
memory, registers and spill bytes from the triton wheel's ptxas (no GPU needed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--aot" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # the compiler path, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

from flash_attn_3.backends.triton import bwd  # noqa: E402

# Configs beyond bwd.py's lists worth timing: (BLOCK_M, BLOCK_N, num_warps, num_stages)
_EXTRA = {
    64: {"dkdv": [(64, 64, 4, 3), (32, 128, 4, 3)],
         "dq": [(128, 32, 4, 3), (64, 128, 4, 2)]},
    128: {"dkdv": [(64, 128, 8, 3), (32, 64, 4, 3)],
          "dq": [(64, 32, 4, 3), (128, 128, 8, 1)]},
    256: {"dkdv": [(64, 64, 8, 2), (64, 64, 4, 2)],
          "dq": [(128, 64, 8, 1), (64, 64, 4, 2)]},
}
# (head_dim, head_dim_v) -> kernel -> candidates; the first is bwd.py's untuned default
CANDIDATES = {
    (d, d): {name: table[d] + _EXTRA[d][name]
             for name, table in (("dkdv", bwd._DKDV_CONFIGS), ("dq", bwd._DQ_CONFIGS))}
    for d in (128, 64, 256)
}


# ---------------------------------------------------------------------------------------------
# GPU timing


def _args(q, k, v, causal):
    from flash_attn_3.backends.params import AttnArgs

    return AttnArgs.plain(q, k, v, window_right=0 if causal else -1)


def _cudnn_backward(q, k, v, dout, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    grad = dout.transpose(1, 2)
    return lambda: torch.autograd.grad(out, (qt, kt, vt), grad, retain_graph=True)


class Log:
    def __init__(self, path: Path, budget: float):
        self.path, self.rows, self.deadline = path, [], time.time() + budget

    def over(self) -> bool:
        return time.time() > self.deadline

    def time(self, case: dict, impl: str, fn, tflop: float | None):
        from triton.testing import do_bench

        try:
            fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            row = dict(case, impl=impl, ms=round(ms, 4))
            if tflop is not None:
                row["tflops"] = round(tflop / ms * 1e3, 1)
        except Exception as e:  # a config that fails to compile leaves a row saying why
            row = dict(case, impl=impl, error=f"{type(e).__name__}: {str(e)[:200]}")
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.path.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "rows": self.rows}, indent=1))


def sweep_gpu(log: Log, head_dims):
    # the 4k anchors first: a run cut by its budget still has them
    for n, (d, dv), causal in itertools.product((4096, 16384, 1024), head_dims, (False, True)):
        h, b = 2048 // d, 32768 // n
        q, k, v, dout = (torch.randn(b, n, h, x, device="cuda", dtype=torch.bfloat16)
                         for x in (d, d, dv, dv))
        a = _args(q, k, v, causal)
        # out and lse from our forward; the backward's cost does not depend on their values
        from flash_attn_3.backends.triton import forward

        out, lse = forward(a)
        case = dict(D=d, N=n, B=b, H=h, causal=causal)
        tflop = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1) / 1e12
        log.time(case, "cudnn", _cudnn_backward(q, k, v, dout, causal), tflop)
        log.time(case, "ours", lambda: bwd.backward(dout, q, k, v, out, lse, a, False), tflop)
        log.time(case, "ours_det", lambda: bwd.backward(dout, q, k, v, out, lse, a, True), tflop)
        default = {name: CANDIDATES[(d, dv)][name][0] for name in ("dkdv", "dq")}
        runs = [(f"atomic dkdv={c}", False, dict(default, dkdv=c)) for c in CANDIDATES[(d, dv)]["dkdv"]]
        runs += [(f"det dkdv={c}", True, dict(default, dkdv=c)) for c in CANDIDATES[(d, dv)]["dkdv"]]
        runs += [(f"det dq={c}", True, dict(default, dq=c)) for c in CANDIDATES[(d, dv)]["dq"]]
        for impl, deterministic, configs in runs:
            if log.over():
                return
            log.time(case, impl, lambda: bwd.backward(dout, q, k, v, out, lse, a, deterministic,
                                                      configs=configs), tflop)


# ---------------------------------------------------------------------------------------------
# offline sm_90 compile

_POINTERS = dict(LSE2="*fp32", DELTA="*fp32", DQ_ACC="*fp32", cu_seqlens_q="*i32",
                 cu_seqlens_k="*i32", seqused_q="*i32", seqused_k="*i32")


def compile_sm90(kernel, constants: dict, cfg):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in _POINTERS or name in ("Q", "K", "V", "DO", "DQ", "DK", "DV"):
            signature[name] = _POINTERS.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("softmax_scale", "softcap"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    block_m, block_n, warps, stages = cfg
    constants = dict(constants, BLOCK_M=block_m, BLOCK_N=block_n)
    return triton.compile(ASTSource(fn, signature, constants, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def ptxas_report(compiled) -> dict:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        ptxas = subprocess.run([knobs.nvidia.ptxas.path, "-arch=sm_90a", "-v", str(ptx), "-o",
                                str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    registers = re.search(r"Used (\d+) registers", ptxas.stderr)
    return dict(shared_kb=round(compiled.metadata.shared / 1024, 1),
                registers=int(registers.group(1)) if registers else None,
                spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill", ptxas.stderr)),
                wgmma=compiled.asm["ptx"].count("wgmma.mma_async"),
                mma_sync=compiled.asm["ptx"].count("mma.sync"))


def sweep_aot(head_dims):
    for d, dv in head_dims:
        dims = dict(HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=triton.next_power_of_2(d),
                    BLOCK_DV=triton.next_power_of_2(dv), SOFTCAP=False, IS_VARLEN_Q=False,
                    IS_VARLEN_K=False, HAS_SEQUSED_Q=False, HAS_SEQUSED_K=False)
        for kernel_name, atomic in (("dkdv", False), ("dkdv", True), ("dq", None)):
            kernel = bwd._KERNELS[kernel_name]
            constants = dims if atomic is None else dict(dims, ATOMIC_DQ=atomic)
            for cfg in CANDIDATES[(d, dv)][kernel_name]:
                row = dict(D=d, Dv=dv, kernel=kernel_name, atomic_dq=atomic, config=cfg)
                try:
                    row.update(ptxas_report(compile_sm90(kernel, constants, cfg)))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--aot", action="store_true", help="compile for sm_90 offline, no GPU")
    p.add_argument("--only-d", type=int, action="append", help="head dims to sweep (default all)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds before stopping (GPU)")
    args = p.parse_args()
    head_dims = [hd for hd in CANDIDATES if not args.only_d or hd[0] in args.only_d]
    if args.aot:
        sweep_aot(head_dims)
        return
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    sweep_gpu(Log(out / "tune_bwd.json", args.budget), head_dims)


if __name__ == "__main__":
    main()

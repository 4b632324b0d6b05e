"""Sweep the Triton forward kernel's block configs, next to cuDNN in the same process.

For each case it times every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages), the config the
autotuner picks ("auto") and cuDNN through SDPA, and writes $OUT/tune_fwd.json after every
measurement (a run stopped by its cap keeps what it has). The best configs feed _TUNE_CONFIGS and
_fixed_config in flash_attn_3/backends/triton/fwd.py.

    python -m benchmarks.tune_fwd [--part prefill|decode|all] [--budget SECONDS]

Prefill: B·N = 32k tokens, H·D = 2048 (the perf_guide anchors), TFLOP/s = 4·B·H·N²·D (halved
when causal). Decode: one query token, GQA 32/8, D = 128, paged (page 16) or contiguous KV;
TB/s of K+V bytes read.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import torch

from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import fwd

# Candidates that compile for sm_90 without spills and within shared memory (scripts/aot_fwd.py).
PREFILL_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 64, 4, 4),
         (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 4)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
}
DECODE_BLOCKS = [(16, 32, 4, 3), (16, 64, 4, 3), (16, 128, 4, 3), (16, 64, 4, 4), (16, 64, 2, 3),
                 (16, 128, 8, 3), (16, 256, 8, 2)]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


class Log:
    def __init__(self, path: Path, budget: float):
        self.path, self.rows, self.deadline = path, [], time.time() + budget

    def over(self) -> bool:
        return time.time() > self.deadline

    def add(self, **row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.path.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "rows": self.rows}, indent=1))

    def time(self, case: dict, impl: str, fn, unit_per_ms: float, metric: str):
        try:
            ms = bench_ms(fn)
            self.add(**case, impl=impl, ms=ms, **{metric: unit_per_ms / ms})
        except Exception as e:  # a config that fails to compile leaves a row saying why
            self.add(**case, impl=impl, error=f"{type(e).__name__}: {str(e)[:200]}")


def cudnn_call(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            enable_gqa=q.shape[2] != k.shape[2])


def prefill(log: Log):
    for dtype, d, n, causal in itertools.product(("bf16", "fp8"), (64, 128, 256),
                                                 (1024, 4096, 16384), (False, True)):
        if dtype == "fp8" and (d != 128 or n == 1024):
            continue
        h, b = 2048 // d, 32768 // n
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        extra = {}
        if dtype == "fp8":
            q, k, v = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
            extra = {name: torch.ones(b, h, device="cuda") for name in
                     ("q_descale", "k_descale", "v_descale")}
        a = AttnArgs.plain(q, k, v, window_right=0 if causal else -1, **extra)
        case = dict(part="prefill", dtype=dtype, D=d, N=n, B=b, H=h, causal=causal)
        tflop = 4 * b * h * n * n * d / (2 if causal else 1) / 1e12 * 1e3
        if dtype == "bf16":
            log.time(case, "cudnn", lambda: cudnn_call(q, k, v, causal), tflop, "tflops")
        log.time(case, "auto", lambda: fwd.forward(a), tflop, "tflops")
        for cfg in PREFILL_CONFIGS[d]:
            if log.over():
                return
            log.time(case, str(cfg), lambda: fwd.forward(a, config=cfg), tflop, "tflops")


def decode(log: Log):
    heads_q, heads_kv, d, page = 32, 8, 128, 16
    for (b, length), paged in itertools.product(((1, 65536), (16, 8192), (64, 4096),
                                                 (128, 2048)), (False, True)):
        q = torch.randn(b, 1, heads_q, d, device="cuda", dtype=torch.bfloat16)
        if paged:
            pages = b * length // page
            k, v = (torch.randn(pages, page, heads_kv, d, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(b, -1)
            a = AttnArgs.plain(q, k, v, page_table=table, max_seqlen_k=length,
                               seqused_k=torch.full((b,), length, device="cuda", dtype=torch.int32),
                               num_splits=0)
        else:
            k, v = (torch.randn(b, length, heads_kv, d, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            a = AttnArgs.plain(q, k, v, num_splits=0)
        tbytes = 2 * b * length * heads_kv * d * 2 / 1e12 * 1e3
        case = dict(part="decode", B=b, L=length, paged=paged)
        if not paged:
            log.time(dict(case, splits=0), "cudnn", lambda: cudnn_call(q, k, v, False), tbytes,
                     "tbps")
        for cfg in [None] + DECODE_BLOCKS:
            log.time(dict(case, splits=0), str(cfg or "heuristic"),
                     lambda: fwd.forward(a, config=cfg), tbytes, "tbps")
        for splits in (1, 4, 16, 64):
            if log.over():
                return
            args = dataclasses.replace(a, num_splits=splits)
            log.time(dict(case, splits=splits), "heuristic", lambda: fwd.forward(args), tbytes,
                     "tbps")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--part", choices=("prefill", "decode", "all"), default="all")
    p.add_argument("--budget", type=float, default=480.0, help="seconds before stopping")
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "tune_fwd.json", args.budget)
    if args.part in ("prefill", "all"):
        prefill(log)
    if args.part in ("decode", "all"):
        decode(log)


if __name__ == "__main__":
    main()

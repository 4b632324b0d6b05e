"""Where the fp8 Gluon forward's time goes, at bench_fwd's D = 128 dense shapes (GPU, ~15 s).

    python scripts/time_fp8_parts.py [--configs]

Per (N, causal), one process, same inputs: the whole fp8 forward and the bf16 one through
flash_attn_func; V's keys-inner copy alone (fwd_hopper._values_keys_inner, part of every fp8
call); torch's strided copy of the same transpose (what fwd.py's fp8 path does, and what the
Gluon path did before the tl kernel); and the fp8 forward less the copy. TFLOP/s count
4·B·H·N²·D, halved when causal; fp8/bf16 is the issue-3 ratio (target >= 1.4). --configs
adds one line per fwd_hopper.FP8_CANDIDATES[128] config (the kernel alone, V's copy included),
after checking its output against the default config's on the same inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_attn_interface as fa3  # noqa: E402
from flash_attn_3.backends.triton import fwd_hopper  # noqa: E402

D, WIDTH, TOKENS = 128, 2048, 32 * 1024


def bench(fn) -> float:
    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


def main() -> None:
    for n in (4096, 16384):
        h, b = WIDTH // D, TOKENS // n
        q, k, v = (torch.randn(b, n, h, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
        copy = bench(lambda: fwd_hopper._values_keys_inner(v8))
        torch_copy = bench(lambda: v8.permute(0, 2, 3, 1).contiguous())
        for causal in (False, True):
            flops = 4 * b * h * n * n * D / (2 if causal else 1)
            fp8 = bench(lambda: fa3.flash_attn_func(q8, k8, v8, causal=causal))
            bf16 = bench(lambda: fa3.flash_attn_func(q, k, v, causal=causal))
            print(json.dumps(dict(
                N=n, causal=causal, fp8_tflops=round(flops / fp8 / 1e9), bf16_tflops=round(
                    flops / bf16 / 1e9), fp8_over_bf16=round(bf16 / fp8, 3),
                fp8_less_copy_tflops=round(flops / (fp8 - copy) / 1e9), fp8_ms=round(fp8, 4),
                v_copy_us=round(copy * 1e3, 1), torch_strided_copy_us=round(torch_copy * 1e3, 1),
                v_copy_tbps=round(2 * v8.numel() / copy / 1e9, 2),
                routed=fwd_hopper.supports(fa3_args(q8, k8, v8, causal)))), flush=True)
            if "--configs" in sys.argv:
                time_configs(fa3_args(q8, k8, v8, causal), flops)


def time_configs(a, flops: float) -> None:
    expected, _ = fwd_hopper.forward(a)
    for config in [None] + fwd_hopper.FP8_CANDIDATES[D]:
        row = dict(N=a.q.shape[1], causal=a.window_right == 0, config=config or "default")
        try:
            out, _ = fwd_hopper.forward(a, config)
            err = (out.float() - expected.float()).abs().max().item()
            if not err < 0.05:  # fp8 rounding differs by config only in the last bits
                raise AssertionError(f"max |out - default| = {err}")
            row["tflops"] = round(flops / bench(lambda: fwd_hopper.forward(a, config)) / 1e9)
        except Exception as e:  # a config that fails is a row, not the end of the sweep
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)


def fa3_args(q, k, v, causal):
    from flash_attn_3 import interface
    return interface._forward_args(q, k, v, softmax_scale=None, causal=causal,
                                   window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                                   deterministic=False, sm_margin=0)


if __name__ == "__main__":
    main()

"""Where the deterministic Hopper backward's time goes (GPU, ~1-2 min).

    python scripts/time_det_parts.py [--head-dim 128] [--n 4096]

A deterministic call runs bwd_hopper's dK/dV kernel without dQ, then bwd.py's atomic-free dQ
pass (which recomputes P and dP per query block: 3 of the 7 matmuls). Per causal or not, one
process, same inputs: the default backward (dQ by TMA reduce-add in the kernel), the
deterministic one, the dQ pass alone at its autotuned config and at each config of DQ_CONFIGS
below (bwd._DQ_CONFIGS' list first), each row one JSON line. TFLOP/s: the backward's 2.5x the
forward's 4·B·H·N²·D, the dQ pass's 1.5x; halved when causal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flash_attn_3.backends.params import AttnArgs  # noqa: E402
from flash_attn_3.backends.triton import bwd, bwd_hopper, fwd_hopper  # noqa: E402

WIDTH, TOKENS = 2048, 32 * 1024
# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried besides bwd._DQ_CONFIGS' own
EXTRA_DQ_CONFIGS = {
    64: [(128, 32, 4, 3), (64, 128, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3)],
    128: [(64, 32, 4, 3), (128, 128, 8, 1), (128, 64, 4, 2), (64, 64, 4, 2), (128, 32, 4, 3),
          (64, 128, 8, 2), (128, 64, 8, 4)],
}


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")  # ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, action="append")
    p.add_argument("--n", type=int, default=4096)
    args = p.parse_args()
    n = args.n
    for d in args.head_dim or [128]:
        h, b = WIDTH // d, TOKENS // n
        for causal in (False, True):
            q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
                             for _ in range(4))
            a = AttnArgs.plain(q, k, v, window_right=0 if causal else -1)
            out, lse = fwd_hopper.forward(a)
            fwd_tflop = 4 * b * h * n * n * d / (2 if causal else 1) / 1e12
            case = dict(D=d, N=n, causal=causal)

            def row(part, ms, tflop):
                print(json.dumps(dict(case, part=part, ms=round(ms, 4),
                                      tflops=round(tflop / ms * 1e3))), flush=True)

            for name, det in (("default", False), ("deterministic", True)):
                ms = bench(lambda: bwd_hopper.backward(dout, q, k, v, out, lse, a, det))
                row(name, ms, 2.5 * fwd_tflop)
            lse2, delta = bwd.prep(out, dout, lse, a, pad=bwd_hopper.STATS_PAD)
            ms = bench(lambda: bwd.dq_only(dout, q, k, v, lse2, delta, a))
            row("dq autotuned", ms, 1.5 * fwd_tflop)
            for cfg in bwd._DQ_CONFIGS[d] + EXTRA_DQ_CONFIGS.get(d, []):
                call = bwd._Call(q, k, v, a, {"dq": cfg})
                try:
                    ms = bench(lambda: call.dq(dout, q, k, v, lse2, delta))
                except Exception as e:  # a config that does not fit says so and the sweep goes on
                    print(json.dumps(dict(case, part=f"dq {cfg}", error=str(e)[:160])), flush=True)
                    continue
                row(f"dq {cfg}", ms, 1.5 * fwd_tflop)


if __name__ == "__main__":
    main()

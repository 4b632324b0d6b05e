"""What a sliding window's time is made of, on the GPU (~40 s): GPT-OSS's layer shape at windows
from 127 to 4095 keys and plain causal, forward (and with --backward, forward+backward).

    python scripts/time_window_sweep.py [--backward] [--head-dim 64] [--json]

Issue 16 asks a windowed layer to take at most 1.05x causal's time scaled by the fraction of the
score matrix its mask keeps. GPT-OSS's window of 128 keys reads 0.20 of that (BENCHMARKS.md):
a 128-row query tile visits two or three key blocks, all edge blocks, against the fixed cost of a
tile (Q's load, the epilogue, the pipeline's fill and drain). This sweep measures that claim: it
times each window, counts the (query tile, key block) pairs the kernel visits (its BLOCK_N from
fwd_hopper's default config, 128-row tiles), and fits time = tiles * per_tile + blocks *
per_block by least squares. A per-tile term near the w = 127 time is the limit; a small one
would point at the blocks themselves (the edge masks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash_attn_interface as fa  # noqa: E402
from flash_attn_3.backends.params import AttnArgs  # noqa: E402
from flash_attn_3.backends.triton import fwd_hopper, routes  # noqa: E402
from flash_attn_3.bench import median_ms  # noqa: E402

WINDOWS = (127, 255, 511, 1023, 2047, 4095, -1)  # -1: plain causal
BLOCK_M = 2 * fwd_hopper.ROWS_PER_WARPGROUP


def visits(seqlen: int, left: int, block_n: int) -> tuple[int, int]:
    """(query tiles, (tile, key block) pairs) of one (batch, head) under a causal window of
    `left` keys (-1: unbounded)."""
    tiles = blocks = 0
    for m0 in range(0, seqlen, BLOCK_M):
        last_row = min(m0 + BLOCK_M, seqlen) - 1
        first_key = 0 if left < 0 else max(0, m0 - left)
        blocks += last_row // block_n - first_key // block_n + 1
        tiles += 1
    return tiles, blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backward", action="store_true", help="time forward+backward too")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    d, n = args.head_dim, args.seqlen
    heads, heads_k, batch = 2048 // d, 4, 32768 // n
    torch.manual_seed(0)
    q = torch.randn(batch, n, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, n, heads_k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in "kv")
    dout = torch.randn_like(q)
    block_n = fwd_hopper.default_config(fwd_hopper.tile_width(d), True)[0]
    rows = []
    for left in WINDOWS:
        window = (left, 0)
        a = AttnArgs.plain(q.detach(), k.detach(), v.detach(), window_left=left, window_right=0)
        route = routes.forward_route(a)[0]

        def forward(window=window):
            return fa.flash_attn_func(q, k, v, window_size=window)

        def forward_backward(window=window):
            torch.autograd.grad(fa.flash_attn_func(q, k, v, window_size=window), (q, k, v), dout)

        tiles, blocks = visits(n, left, block_n)
        row = dict(left=left, route=route, tiles=tiles * batch * heads, blocks=blocks * batch * heads,
                   fwd_ms=median_ms(forward))
        if args.backward:
            row["fwd_bwd_ms"] = median_ms(forward_backward)
        rows.append(row)
    fits = {}
    for key in ("fwd_ms", "fwd_bwd_ms") if args.backward else ("fwd_ms", ):
        design = torch.tensor([[r["tiles"], r["blocks"]] for r in rows], dtype=torch.float64)
        times = torch.tensor([[r[key]] for r in rows], dtype=torch.float64)
        per_tile, per_block = torch.linalg.lstsq(design, times).solution.flatten().tolist()
        w127 = rows[0]
        fits[key] = dict(per_tile_us=per_tile * 1e3, per_block_us=per_block * 1e3,
                         tile_share_at_127=per_tile * w127["tiles"] / w127[key])
    gpu = torch.cuda.get_device_name()
    if args.json:
        print(json.dumps(dict(gpu=gpu, torch=torch.__version__, head_dim=d, seqlen=n, block_n=block_n,
                              rows=rows, fits=fits)))
        return
    print(f"{gpu}, torch {torch.__version__}, D = {d}, N = {n}, B = {batch}, H = {heads}/{heads_k}, "
          f"BLOCK_N = {block_n}")
    for r in rows:
        times = f"fwd {r['fwd_ms']:.3f} ms" + (f", fwd+bwd {r['fwd_bwd_ms']:.3f} ms" if args.backward else "")
        print(f"window {r['left']:>5} ({r['route']}): {r['tiles']} tiles, {r['blocks']} blocks; {times}")
    for key, fit in fits.items():
        print(f"{key}: {fit['per_tile_us']:.3f} us a tile + {fit['per_block_us']:.3f} us a block; the tile "
              f"term is {fit['tile_share_at_127']:.0%} of the 127-key window's time")


if __name__ == "__main__":
    main()

"""Sweep the split-KV decode kernel's configs and split counts, next to cuDNN in the same process.

For each case (one query token, GQA 32/8, D 128, bf16; K+V > 64 MB so L2 holds none of it) it
times the default config, every (BLOCK_N, num_warps, num_stages) candidate and, at batch 1,
forced split counts; cuDNN through SDPA for contiguous caches. TB/s of K+V bytes read. Writes
$OUT/tune_decode.json after every measurement (a run stopped by its cap keeps what it has); the
best configs feed decode.py (_CONTIGUOUS_STAGES, _CONTIGUOUS_STAGES_RESIDENT, _PAGED_STAGES) and
scheduler.decode_block_n / DECODE_PROGRAMS_PER_SM / DECODE_MIN_EFFICIENCY.

    python -m benchmarks.tune_decode [--budget SECONDS] [--out DIR] [--case B,CTX,PAGE ...]
        [--heads HQ,HK] [--head-dim D] [--splits S,S] [--configs N/W/ST,N/W/ST]
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

from benchmarks.bench_decode import graph_ms
from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import decode

CASES = [  # (batch, context, page size; 0 = contiguous)
    (1, 131072, 0), (1, 131072, 16), (1, 131072, 64),
    (16, 8192, 0), (16, 8192, 16),
    (64, 4096, 0), (64, 4096, 16),
    (128, 2048, 0), (128, 2048, 64),
]
CONFIGS = [(n, w, s) for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4, 5))]
FORCED_SPLITS = (8, 16, 32, 48, 64, 96, 128)
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128


def make_args(batch: int, ctx: int, page: int, heads=(HEADS_Q, HEADS_KV), head_dim: int = HEAD_DIM,
              sequential_pages: bool = False) -> AttnArgs:
    heads_q, heads_kv = heads
    q = torch.randn(batch, 1, heads_q, head_dim, device="cuda", dtype=torch.bfloat16)
    page_table = None
    if page:
        order = torch.arange if sequential_pages else torch.randperm
        page_table = order(batch * ctx // page, device="cuda").to(torch.int32).view(batch, -1)
        shape = (batch * ctx // page, page, heads_kv, head_dim)
    else:
        shape = (batch, ctx, heads_kv, head_dim)
    k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return AttnArgs.plain(q, k, v, seqused_k=torch.full((batch,), ctx, device="cuda", dtype=torch.int32),
                          max_seqlen_k=ctx, page_table=page_table, window_right=0, num_splits=0)


def tbps(fn, nbytes: int) -> float:
    """GPU time of one call (bench_decode.graph_ms): direct calls of a ~50 us kernel timed the
    host whenever it lagged behind do_bench's L2 flush."""
    return nbytes / graph_ms(fn, steps=1) / 1e9


def cudnn(a: AttnArgs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    q, k, v = (t.transpose(1, 2) for t in (a.q, a.k, a.v))

    def run():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=400.0, help="stop starting cases after this many seconds")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    p.add_argument("--case", action="append", default=[], metavar="B,CTX,PAGE",
                   help="time these cases instead of CASES (repeatable)")
    p.add_argument("--heads", default=f"{HEADS_Q},{HEADS_KV}", metavar="HQ,HK")
    p.add_argument("--head-dim", type=int, default=HEAD_DIM)
    p.add_argument("--sequential-pages", action="store_true",
                   help="page table in cache order instead of a random permutation (isolates the "
                        "cost of scattered pages from the cost of the gather)")
    p.add_argument("--splits", default="", metavar="S,S,...",
                   help="forced split counts at batch 1 (default: FORCED_SPLITS)")
    p.add_argument("--configs", default="", metavar="N/W/ST,...",
                   help="(BLOCK_N, num_warps, num_stages) candidates (default: CONFIGS); with --splits, "
                        "every forced split count is also timed with every candidate")
    args = p.parse_args()
    forced = tuple(int(x) for x in args.splits.split(",") if x) or FORCED_SPLITS
    configs = [tuple(int(x) for x in c.split("/")) for c in args.configs.split(",") if c] or CONFIGS
    cases = [tuple(int(x) for x in c.split(",")) for c in args.case] or CASES
    args.out.mkdir(parents=True, exist_ok=True)
    started, rows = time.monotonic(), []

    def record(case, what, value):
        rows.append(dict(case=case, what=what, tbps=value))
        (args.out / "tune_decode.json").write_text(json.dumps(rows, indent=1))
        print(f"{case} {what}: {value if isinstance(value, str) else f'{value:.3f} TB/s'}", flush=True)

    for batch, ctx, page in cases:
        if time.monotonic() - started > args.budget:
            break
        a = make_args(batch, ctx, page, tuple(int(x) for x in args.heads.split(",")), args.head_dim,
                      args.sequential_pages)
        nbytes = 2 * a.k.numel() * a.k.element_size()
        case = f"B={batch} ctx={ctx} page={page} heads={args.heads} D={args.head_dim}"
        # cheapest first (no compile each): a budget cut drops config rows, not the peer
        trials = [("default", lambda a=a: decode.forward(a))]
        if not page:
            trials.append(("cudnn", cudnn(a)))
        if batch == 1:
            trials += [(f"splits={s}", lambda a=dataclasses.replace(a, num_splits=s): decode.forward(a))
                       for s in forced]
        trials += [(f"config={c}", lambda a=a, c=c: decode.forward(a, c)) for c in configs]
        if batch == 1 and args.splits and args.configs:
            trials += [(f"splits={s} config={c}",
                        lambda a=dataclasses.replace(a, num_splits=s), c=c: decode.forward(a, c))
                       for s in forced for c in configs]
        for what, fn in trials:
            if time.monotonic() - started > args.budget:
                break
            try:
                record(case, what, tbps(fn, nbytes))
            except Exception as e:  # a config that does not compile (shared memory) is a data point
                record(case, what, f"error: {type(e).__name__}: {str(e)[:120]}")
        del a
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

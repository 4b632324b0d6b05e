"""Decode (one query token) over a KV cache: bandwidth of the cache read, and per-step latency.

Section bandwidth: TB/s of K+V bytes read (2·B·ctx·Hk·D·2 for bf16) against the device-to-device
copy ceiling of the same run; GQA 32/8 and 8/1, D 128 and 64, batch 1..128, context 1k..128k,
contiguous cache (page=0) or paged (page 16, 64; pages scattered by a random page table). Peers
(contiguous only: SDPA has no page table): cuDNN and FA2 through SDPA with enable_gqa.
Bandwidth is GPU time: one call captured in a CUDA graph, replayed after an L2 flush, for every
implementation alike (host overhead is the latency section's subject).
Section latency: batch 1, context 1k, µs per step, eager (host overhead included: a wall clock
over back-to-back calls) and CUDA-graph replay of 32 captured steps (as a 32-layer decode step).
Besides `ours` (the public API, routed by the dispatcher), `decode_kernel` and `fwd_kernel` call
the two Triton kernels that can serve decode on the same AttnArgs, to route by measurement.
Caches under 50 MB are rotated (one set per step), so L2 holds none of them.

The kvcache engineer extends this file: add cases to `bandwidth_cases` / `latency_cases` or a new
Section (e.g. appending new tokens, split-KV counts) and keep the case keys of existing rows.

    python -m benchmarks.bench_decode [--quick] [--out DIR] [--only page=0 --only Hk=8]
"""

from __future__ import annotations

import functools
import itertools
import time
from typing import Callable, Iterator, Optional

import torch

from benchmarks.harness import Runner, Section, parse_args, rotating, sdpa, sdpa_context

HEADS = ((32, 8), (8, 1))  # (Hq, Hk)
HEAD_DIMS = (128, 64)
BATCHES = (1, 4, 16, 64, 128)
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 65536, 131072)
PAGE_SIZES = (0, 16, 64)  # 0: contiguous cache (B, ctx, Hk, D)
MAX_KV_BYTES = 16 * 2**30  # leaves room on an 80 GB card for the peers' copies
GRAPH_STEPS = 32
CASE_KEYS = ("Hq", "Hk", "D", "B", "ctx", "page", "mode")
# the peers' published anchors, and batch 1 at 128k: issue 4 names it for paged split-KV
QUICK_SHAPES = ((1, 65536), (1, 131072), (16, 8192), (64, 4096), (128, 2048))


def kv_bytes(case: dict) -> int:
    return 2 * case["B"] * case["ctx"] * case["Hk"] * case["D"] * 2


def bandwidth_cases(quick: bool) -> Iterator[dict]:
    for (hq, hk), d, b, ctx, page in itertools.product(HEADS, HEAD_DIMS, BATCHES, CONTEXTS,
                                                       PAGE_SIZES):
        case = dict(Hq=hq, Hk=hk, D=d, B=b, ctx=ctx, page=page, mode="kernel")
        if kv_bytes(case) <= MAX_KV_BYTES and (not quick or in_quick(case)):
            yield case


def in_quick(case: dict) -> bool:
    """GQA 32/8 D=128 at the anchor shapes in every layout; 8/1 and D=64 contiguous at two."""
    shape = (case["B"], case["ctx"])
    if (case["Hq"], case["Hk"], case["D"]) == (32, 8, 128):
        return shape in QUICK_SHAPES
    return case["page"] == 0 and shape in ((1, 131072), (64, 4096)) and (
        case["D"] == 128 or case["Hk"] == 8)


def latency_cases() -> Iterator[dict]:
    for page, mode in itertools.product((0, 16), ("eager", f"graph{GRAPH_STEPS}")):
        yield dict(Hq=32, Hk=8, D=128, B=1, ctx=1024, page=page, mode=mode)


def make_inputs(case: dict) -> dict:
    b, ctx, hk, d, page = case["B"], case["ctx"], case["Hk"], case["D"], case["page"]
    q = torch.randn(b, 1, case["Hq"], d, device="cuda", dtype=torch.bfloat16)
    t = dict(q=q, cache_seqlens=torch.full((b,), ctx, device="cuda", dtype=torch.int32),
             page_table=None)
    if page:
        num_pages = b * ctx // page
        t["page_table"] = (torch.randperm(num_pages, device="cuda").to(torch.int32)
                           .view(b, ctx // page))
        shape = (num_pages, page, hk, d)
    else:
        shape = (b, ctx, hk, d)
    t["k"], t["v"] = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return t


def ours(case: dict) -> Callable:
    import flash_attn_interface as fa3

    t = make_inputs(case)
    return lambda: fa3.flash_attn_with_kvcache(t["q"], t["k"], t["v"],
                                               cache_seqlens=t["cache_seqlens"],
                                               page_table=t["page_table"], causal=True)


def kernel(module: str) -> Callable[[dict], Callable]:
    """Our Triton kernel `module` (decode: the split-KV decode kernel, fwd: the tiled forward)
    called on its AttnArgs directly: the kernel's bandwidth without the interface's host work,
    so the two can be compared and routed by measurement."""
    import importlib

    from flash_attn_3.backends.params import AttnArgs

    def make(case: dict) -> Callable:
        t = make_inputs(case)
        q, k, page_table = t["q"], t["k"], t["page_table"]
        capacity = k.shape[1] * (page_table.shape[1] if page_table is not None else 1)
        a = AttnArgs.plain(q, k, t["v"], seqused_k=t["cache_seqlens"], max_seqlen_k=capacity,
                           page_table=page_table, window_right=0, num_splits=0)
        forward = importlib.import_module(f"flash_attn_3.backends.triton.{module}").forward
        return lambda: forward(a)

    return make


def peer_sdpa(case: dict) -> Callable:
    t = make_inputs(case)
    return sdpa(t["q"], t["k"], t["v"], causal=False)


def eager_ms(fn: Callable, calls: int = 100, repeats: int = 21, warmup: int = 50) -> float:
    """Wall time per call of back-to-back calls: what a host-bound decode loop sees. The best of
    the repeats: host noise only ever adds time (H100 run of 17:30 UTC, 2026-11-25: one row's
    every column, peers included, came out ~1.5x slower than in the runs before and after; at 19:06
    / 19:12 UTC ours and cuDNN swapped places, 30 / 37 and 38 / 25 us, with 7 repeats)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return min(times)


def graph_ms(fn: Callable, steps: int = GRAPH_STEPS, warmup: int = 3) -> float:
    """Per-step time of replaying one CUDA graph holding `steps` calls: GPU time without the
    host's. With steps=1 it is the bandwidth section's timer (L2 flushed before every replay):
    timed as direct calls, a kernel of ~50 us (MQA at batch 1) measured the Python that
    launches it whenever the host was slower than do_bench's L2 flush (H100, 19:02 UTC: one
    config timed 0.70 and 1.55 TB/s in one run)."""
    from flash_attn_3.bench import median_ms

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, autotunes) must happen outside capture
        for _ in range(max(steps, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    return median_ms(graph.replay) / steps


def measure_case(run: Runner, section: str, case: dict, timer=None) -> None:
    impls = {"ours": ours, "decode_kernel": kernel("decode"), "fwd_kernel": kernel("fwd")}
    if case["page"] == 0:
        impls.update(cudnn=peer_sdpa, fa2=peer_sdpa)
    set_bytes = kv_bytes(case)
    for impl, make in impls.items():
        # Only the SDPA peers run under a backend pin; sdpa_context knows no other name.
        context = functools.partial(sdpa_context, impl) if impl in ("cudnn", "fa2") else None
        build = functools.partial(rotating, functools.partial(make, case), set_bytes)
        run.measure(section, case, impl, build,
                    nbytes=set_bytes if section == "bandwidth" else None, context=context,
                    timer=timer)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    sections = {
        "bandwidth": Section("Decode TB/s of K+V read (q length 1, bf16)", "tbps",
                             ratios=[("ours", "cudnn"), ("ours", "ceiling:copy_tbps"),
                                     ("decode_kernel", "ceiling:copy_tbps"),
                                     ("fwd_kernel", "ceiling:copy_tbps")],
                             plot_x="ctx", plot_panel="page", plot_series=["B"],
                             plot_where={"Hq": 32, "Hk": 8, "D": 128}),
        "latency": Section("Decode step latency µs, B=1 ctx=1k GQA 32/8 D=128 "
                           "(ratio: cuDNN time / ours)", "us",
                           ratios=[("ours", "cudnn"), ("decode_kernel", "cudnn")]),
    }
    with Runner("bench_decode", args, sections, CASE_KEYS) as run:
        for case in bandwidth_cases(args.quick):
            if run.keep(case):
                measure_case(run, "bandwidth", case, functools.partial(graph_ms, steps=1))
        for case in latency_cases():
            if run.keep(case):
                timer = eager_ms if case["mode"] == "eager" else graph_ms
                measure_case(run, "latency", case, timer)


if __name__ == "__main__":
    main()

"""Where the host time of one eager decode call goes (B=1, GQA 32/8, D=128, bf16, causal).

Eager decode at small batch is bound by host work, not by the GPU. One run prints:
1. per-call latency (wall clock over back-to-back calls, median of 5 runs of 300): ours attend
   only and append+attend (the planned fast path: one launch, the decode kernel writes the new
   token; the same plan as two launches, append_kv + decode; the slow path with plans off),
   cuDNN SDPA (attention only) on the same cache, at context 1k and 64k (cache capacity =
   context, as in bench_decode), plus the 1k-context / 4k-capacity call (64 blocks: split);
   then the GPU time of one append+attend step (with and without rotary) in a CUDA graph, one
   launch against two;
2. stage breakdown: each layer of one attend-only ctx-1k call timed alone over 2000 calls, no
   profiler: the slow path's layers (normalization, checks, AttnArgs, dispatch, decode host
   prep, launch key, C launch, allocation) and the fast path's (plan key, replay);
3. launch anatomy: the decode kernel (and the combine) through Triton's own launch path against
   the cached direct launch (backends/triton/launch.py), and the torch ops a step makes;
4. a cProfile of attend-only and append+attend calls (top functions by own time).

    python scripts/profile_decode_step.py [--no-profile] [--stages-only]

On a machine without CUDA, `--stages-only` runs the breakdown on CPU tensors with every kernel
launch stubbed (TRITON_INTERPRET=1): the host layers only, for comparing branches.
"""

import contextlib
import cProfile
import functools
import importlib
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FLASH_ATTN_3_BACKEND", "triton")

import flash_attn_interface as fa  # noqa: E402
from benchmarks.harness import sdpa, sdpa_context  # noqa: E402

DEV, DT = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
HQ, HK, D = 32, 8, 128


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, calls: int = 300, repeats: int = 5) -> float:
    for _ in range(20):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


@contextlib.contextmanager
def _swapped(owner, name: str, value):
    """owner.name = value inside the block; the kvcache plans made with either value are dropped."""
    from flash_attn_3 import interface

    before = getattr(owner, name)
    setattr(owner, name, value)
    interface._KVCACHE_PLANS.clear()
    try:
        yield
    finally:
        setattr(owner, name, before)
        interface._KVCACHE_PLANS.clear()


def _plans_off():
    """A context in which flash_attn_with_kvcache takes the slow path (no plan is made)."""
    from flash_attn_3 import ops

    return _swapped(ops, "kvcache_plan", lambda *args: None)


def _two_launch_appends():
    """A context in which planned appends keep append_kv's launch (step.FUSE_APPEND off)."""
    return _swapped(importlib.import_module("flash_attn_3.backends.triton.step"), "FUSE_APPEND", False)


def problem(ctx: int, capacity: int, rotary: bool = False):
    q = torch.randn(1, 1, HQ, D, device=DEV, dtype=DT)
    k_cache = torch.randn(1, capacity, HK, D, device=DEV, dtype=DT)
    v_cache = torch.randn_like(k_cache)
    k_new, v_new = (torch.randn(1, 1, HK, D, device=DEV, dtype=DT) for _ in range(2))
    # Every timed call appends at the same position, so the cache never overflows.
    lens_attend = torch.full((1,), ctx, dtype=torch.int32, device=DEV)
    lens_append = torch.full((1,), ctx - 1, dtype=torch.int32, device=DEV)
    attend = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens_attend, causal=True)  # noqa: E731
    angle = torch.rand(capacity, D // 2, device=DEV) * 6.28
    cos, sin = (torch.cos(angle).to(DT), torch.sin(angle).to(DT)) if rotary else (None, None)
    append = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos,  # noqa: E731
                                                rotary_sin=sin, cache_seqlens=lens_append, causal=True)
    if capacity == ctx:
        cudnn = sdpa(q, k_cache, v_cache, causal=False)
    else:
        cudnn = sdpa(q, k_cache[:, :ctx].contiguous(), v_cache[:, :ctx].contiguous(), causal=False)
    return attend, append, cudnn


def latency_table() -> None:
    from flash_attn_3.backends.triton import scheduler

    print("## per-call latency, eager (us; slow = plans off)")
    print("| ctx | capacity | splits | ours attend | ours append+attend | same, 2 launches | slow attend "
          "| slow append+attend | cudnn | attend/cudnn |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for ctx, capacity in ((1024, 1024), (1024, 4096), (65536, 65536)):
        attend, append, cudnn = problem(ctx, capacity)
        splits = scheduler.decode_num_splits(1, HQ, HK, 1, capacity, D, D, torch.device(DEV))
        ours_attend, ours_append = per_call_us(attend), per_call_us(append)
        with _two_launch_appends():
            two_append = per_call_us(append)
        with _plans_off():
            slow_attend, slow_append = per_call_us(attend), per_call_us(append)
        with sdpa_context("cudnn"):
            peer = per_call_us(cudnn)
        print(f"| {ctx} | {capacity} | {splits} | {ours_attend:.1f} | {ours_append:.1f} | {two_append:.1f} | "
              f"{slow_attend:.1f} | {slow_append:.1f} | {peer:.1f} | {ours_attend / peer:.2f} |")


def graph_us_per_call(calls, replays: int = 20) -> float:
    """GPU time per call of one CUDA graph holding every call of `calls` (in order). The first two
    run eagerly before the capture: compiles, plans and the ticket ring happen outside it."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays / len(calls) * 1e6


def append_step_gpu_time(steps: int = 32) -> None:
    """GPU time of one planned append+attend step at B=1 ctx 1k, per call of a CUDA graph of
    `steps` calls on distinct caches (16 MB of K+V: not from L2): one launch (the decode kernel
    writes the token) against two (append_kv, then decode)."""
    print(f"## GPU time, B=1 ctx 1k append+attend step (CUDA graph of {steps} calls, us per call)")
    print("| rotary | capacity | one launch | two launches |")
    print("| --- | --- | --- | --- |")
    for rotary in (False, True):
        for capacity in (1024, 4096):
            calls = [problem(1024, capacity, rotary)[1] for _ in range(steps)]
            row = []
            for fused in (True, False):
                with contextlib.ExitStack() as stack:
                    if not fused:
                        stack.enter_context(_two_launch_appends())
                    row.append(f"{graph_us_per_call(calls):.2f}")
            print(f"| {rotary} | {capacity} | {row[0]} | {row[1]} |")


def stage_breakdown(calls: int = 2000) -> None:
    """Each layer of an attend-only ctx-1k call (B=1, capacity 1k: one unsplit launch) alone."""
    from flash_attn_3 import checks, dispatch, interface
    from flash_attn_3.backends.triton import decode, launch, routes

    q = torch.randn(1, 1, HQ, D, device=DEV, dtype=DT)
    k_cache = torch.randn(1, 1024, HK, D, device=DEV, dtype=DT)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((1,), 1024, dtype=torch.int32, device=DEV)
    stubbed = DEV != "cuda"
    saved = launch.Launcher.__call__, launch.Bound.go
    if stubbed:  # host layers only: no kernel runs
        launch.Launcher.__call__ = lambda self, *args: None
        launch.Bound.go = lambda self, roles, ptrs: None

    def us(fn) -> float:
        for _ in range(50):
            fn()
        _sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        return (time.perf_counter() - start) / calls * 1e6

    inputs = (q, k_cache, v_cache, None, None, None, None, lens, None, None, None, None, None, None)
    scalars = (None, True, (-1, -1), 0, 0.0, True, 0, None, 0, False, 1, 0)
    attention = dict(
        qv=None, cu_seqlens_q=None, max_seqlen_q=None, page_table=None, kv_batch_idx=None, leftpad_k=None,
        q_descale=None, k_descale=None, v_descale=None, sinks=None, softmax_scale=None, causal=True,
        window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=0, pack_gqa=None, deterministic=False,
        sm_margin=0, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None, scheduler_metadata=None,
        k_name="k_cache", v_name="v_cache", public_names=interface._KVCACHE_NAMES, validated=True)
    a = interface._forward_args(q, k_cache, v_cache, seqused_k=lens, **attention)
    out, lse = decode.outputs(a)
    first = decode.launches(a, out, lse)[0]
    call = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)  # noqa: E731
    call()
    plan = interface._KVCACHE_PLANS[interface._plan_key(inputs, scalars)]
    rows = [
        ("slow: interface normalization (_unit_strides of 14 args)", lambda: interface._unit_strides(*inputs)),
        ("slow: checks (append + attention inputs)", lambda: (
            checks.check_append_inputs(q, k_cache, v_cache, None, None, rotary_cos=None, rotary_sin=None,
                                       cache_seqlens=lens, cu_seqlens_q=None, cu_seqlens_k_new=None,
                                       rotary_seqlens=None, page_table=None, batch_size=1),
            checks.check_attention_inputs(
                q, k_cache, v_cache, qv=None, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
                seqused_k=lens, max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None,
                leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, sinks=None, cp_world_size=1,
                cp_rank=0, cp_tot_seqused_k=None, scheduler_metadata=None, attention_chunk=0, softcap=0.0,
                num_splits=0, sm_margin=0, k_name="k_cache", v_name="v_cache",
                public_names=interface._KVCACHE_NAMES))),
        ("slow: forward argument normalization (_forward_args, builds AttnArgs)",
         lambda: interface._forward_args(q, k_cache, v_cache, seqused_k=lens, **attention)),
        ("slow: dispatch (backend_for)", lambda: dispatch.backend_for("forward", a)),
        ("slow: routes (decode.supports)", lambda: routes.forward_kernel(a)),
        ("slow: decode.outputs (2 torch.empty)", lambda: decode.outputs(a)),
        ("slow: decode.launches (host prep)", lambda: decode.launches(a, out, lse)),
        ("slow: key_and_values", lambda: launch.key_and_values(first.args)),
        ("slow: cached launch (key + lookup + C launch)", first),
        ("slow: whole call, plans off", None),
        ("fast: plan key", lambda: interface._plan_key(inputs, scalars)),
        ("fast: plan replay (allocations, pointers, C launch)", lambda: plan(inputs)),
        ("fast: whole call", call),
        ("torch.empty (1,1,32,128) bf16", lambda: torch.empty((1, 1, HQ, D), dtype=DT, device=DEV)),
        ("data_ptr()", q.data_ptr),
    ]
    if not stubbed:
        bound = plan.bounds[0]
        # the plan's roles: the inputs, its allocations, then the ticket ring when it splits
        roles = list(inputs) + [torch.empty_strided(size, stride, dtype=dtype, device=device)
                                for size, stride, dtype, device in plan.allocs]
        ptrs = [0 if t is None else t.data_ptr() for t in roles]
        if plan.tickets:
            ring, tiles = plan.tickets
            ptrs.append(ring.pointer(tiles))
        stream = torch.cuda.current_stream().cuda_stream
        rows.append(("C launch alone (bound, pointers ready)", lambda: bound._go(stream, ptrs)))
    print(f"## stage breakdown, attend-only ctx 1k, us per call over {calls} calls"
          + (" (CPU, launches stubbed)" if stubbed else ""))
    print("| stage | us |")
    print("| --- | --- |")
    try:
        for name, fn in rows:
            if fn is None:
                with _plans_off():
                    value = us(call)
            else:
                value = us(fn)
            print(f"| {name} | {value:.2f} |")
    finally:
        launch.Launcher.__call__, launch.Bound.go = saved


def launch_anatomy() -> None:
    """The same decode.forward call with the cached launch and with Triton's path for every launch."""
    from flash_attn_3.backends.params import AttnArgs

    decode = importlib.import_module("flash_attn_3.backends.triton.decode")
    combine = importlib.import_module("flash_attn_3.backends.triton.combine")
    launch = importlib.import_module("flash_attn_3.backends.triton.launch")
    q = torch.randn(1, 1, HQ, D, device=DEV, dtype=DT)
    k = torch.randn(1, 4096, HK, D, device=DEV, dtype=DT)
    lens = torch.full((1,), 1024, dtype=torch.int32, device=DEV)
    print("## launch anatomy (us per call, back-to-back, GPU work is a few us)")
    for splits in (1, 16):
        a = AttnArgs.plain(q, k, k, seqused_k=lens, window_right=0, num_splits=splits)
        fast = per_call_us(lambda: decode.forward(a))
        saved = decode._launch, combine._launch
        decode._launch, combine._launch = launch.Launcher(decode._decode_kernel), launch.Launcher(combine._combine_kernel)
        decode._launch.jit = combine._launch.jit = False  # Triton's launch path on every call
        try:
            slow = per_call_us(lambda: decode.forward(a))
        finally:
            decode._launch, combine._launch = saved
        launches = "decode" if splits == 1 else "decode, merge in place"
        print(f"decode.forward, {splits} split(s) ({launches}): cached launch {fast:.1f}, Triton's path {slow:.1f}")
    print(f"torch.empty (1,1,32,128) bf16: {per_call_us(lambda: torch.empty((1, 1, HQ, D), dtype=DT, device=DEV)):.1f}")
    print(f"lens + 1 (the append path's seqused_k): {per_call_us(lambda: lens + 1):.1f}")


def small_cache_gpu_time(steps: int = 32) -> None:
    """GPU time of the decode launches alone at B=1 ctx 1k (capacity 1k, 16 KV blocks), per call
    of a CUDA graph of `steps` calls: unsplit in two configs against split launches that merge
    in place (one launch) and with combine.py's separate merge (two), so the in-place merge's
    cost or gain reads directly (docs/perf-notes.md, KV section)."""
    import dataclasses

    from flash_attn_3.backends.params import AttnArgs

    decode = importlib.import_module("flash_attn_3.backends.triton.decode")
    q = torch.randn(1, 1, HQ, D, device=DEV, dtype=DT)
    caches = [(torch.randn(1, 1024, HK, D, device=DEV, dtype=DT), torch.randn(1, 1024, HK, D, device=DEV, dtype=DT))
              for _ in range(steps)]  # 16 MB of K+V: the replay does not run from L2
    lens = torch.full((1,), 1024, dtype=torch.int32, device=DEV)
    base = AttnArgs.plain(q, caches[0][0], caches[0][1], seqused_k=lens, window_right=0, num_splits=0)
    print(f"## GPU time, B=1 ctx 1k decode launches only (CUDA graph of {steps} calls, us per call)")
    print("| splits | config (BLOCK_N, warps, stages) | merge | us |")
    print("| --- | --- | --- | --- |")
    ring = decode.ticket_ring
    for splits, config, in_place in ((1, None, True), (1, (128, 4, 3), True), (2, None, True), (4, None, True),
                                     (4, None, False), (8, None, True), (8, None, False), (16, None, True)):
        calls = [dataclasses.replace(base, k=k, v=v, num_splits=splits) for k, v in caches]
        decode.ticket_ring = ring if in_place else (lambda device: None)
        try:
            us = graph_us_per_call([functools.partial(decode.forward, a, config) for a in calls])
            value = f"{us:.2f}"
        except Exception as error:  # a config past the shared memory limit: report, keep going
            value = f"failed: {type(error).__name__}"
        finally:
            decode.ticket_ring = ring
        merge = "-" if splits == 1 else ("in place" if in_place else "combine launch")
        print(f"| {splits} | {config or 'default'} | {merge} | {value} |")


def profile(fn, name: str, calls: int = 300) -> None:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
    print(f"## cProfile, {name}, {calls} calls (times inflated by the profiler)")
    print(text.getvalue())


def main() -> None:
    stage_breakdown()
    if "--stages-only" in sys.argv:
        return
    latency_table()
    append_step_gpu_time()
    small_cache_gpu_time()
    launch_anatomy()
    if "--no-profile" not in sys.argv:
        attend, append, _ = problem(1024, 1024)
        attend(), append()
        profile(attend, "attend only, ctx 1k")
        profile(append, "append+attend, ctx 1k")


if __name__ == "__main__":
    main()

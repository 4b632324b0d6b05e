"""Where the host time of one eager decode call goes (B=1, GQA 32/8, D=128, bf16, causal).

Eager decode at small batch is bound by host work, not by the GPU. One run prints:
1. per-call latency (wall clock over back-to-back calls, median of 5 runs of 300): ours attend
   only and append+attend, cuDNN SDPA (attention only) on the same cache, at context 1k and 64k
   (cache capacity = context, as in bench_decode), plus the 1k-context / 4k-capacity call the
   earlier runs of this script timed (that cache has 64 blocks: still split);
2. launch anatomy: the decode kernel (and the combine) through Triton's own launch path against
   the cached direct launch (backends/triton/launch.py), and the torch ops a step makes;
3. a cProfile of attend-only and append+attend calls (top functions by own time).

    python scripts/profile_decode_step.py [--no-profile]
"""

import cProfile
import importlib
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import flash_attn_interface as fa  # noqa: E402
from benchmarks.harness import sdpa, sdpa_context  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
HQ, HK, D = 32, 8, 128


def per_call_us(fn, calls: int = 300, repeats: int = 5) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def problem(ctx: int, capacity: int):
    q = torch.randn(1, 1, HQ, D, device=DEV, dtype=DT)
    k_cache = torch.randn(1, capacity, HK, D, device=DEV, dtype=DT)
    v_cache = torch.randn_like(k_cache)
    k_new, v_new = (torch.randn(1, 1, HK, D, device=DEV, dtype=DT) for _ in range(2))
    # Every timed call appends at the same position, so the cache never overflows.
    lens_attend = torch.full((1,), ctx, dtype=torch.int32, device=DEV)
    lens_append = torch.full((1,), ctx - 1, dtype=torch.int32, device=DEV)
    attend = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens_attend, causal=True)  # noqa: E731
    append = lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,  # noqa: E731
                                                cache_seqlens=lens_append, causal=True)
    if capacity == ctx:
        cudnn = sdpa(q, k_cache, v_cache, causal=False)
    else:
        cudnn = sdpa(q, k_cache[:, :ctx].contiguous(), v_cache[:, :ctx].contiguous(), causal=False)
    return attend, append, cudnn


def latency_table() -> None:
    from flash_attn_3.backends.triton import scheduler

    print("## per-call latency, eager (us)")
    print("| ctx | capacity | splits | ours attend | ours append+attend | cudnn | attend/cudnn |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for ctx, capacity in ((1024, 1024), (1024, 4096), (65536, 65536)):
        attend, append, cudnn = problem(ctx, capacity)
        splits = scheduler.decode_num_splits(1, HQ, HK, 1, capacity, D, D, torch.device(DEV))
        ours_attend, ours_append = per_call_us(attend), per_call_us(append)
        with sdpa_context("cudnn"):
            peer = per_call_us(cudnn)
        print(f"| {ctx} | {capacity} | {splits} | {ours_attend:.1f} | {ours_append:.1f} | {peer:.1f} | "
              f"{ours_attend / peer:.2f} |")


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
        a = AttnArgs(q=q, k=k, v=k, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
                     seqused_k=lens, max_seqlen_q=1, max_seqlen_k=4096, page_table=None, kv_batch_idx=None,
                     leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, sinks=None,
                     softmax_scale=D ** -0.5, window_left=-1, window_right=0, attention_chunk=0, softcap=0.0,
                     num_splits=splits, pack_gqa=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None,
                     scheduler_metadata=None)
        fast = per_call_us(lambda: decode.forward(a))
        saved = decode._launch, combine._launch
        decode._launch, combine._launch = launch.Launcher(decode._decode_kernel), launch.Launcher(combine._combine_kernel)
        decode._launch.jit = combine._launch.jit = False  # Triton's launch path on every call
        try:
            slow = per_call_us(lambda: decode.forward(a))
        finally:
            decode._launch, combine._launch = saved
        launches = "decode" if splits == 1 else "decode + combine"
        print(f"decode.forward, {splits} split(s) ({launches}): cached launch {fast:.1f}, Triton's path {slow:.1f}")
    print(f"torch.empty (1,1,32,128) bf16: {per_call_us(lambda: torch.empty((1, 1, HQ, D), dtype=DT, device=DEV)):.1f}")
    print(f"lens + 1 (the append path's seqused_k): {per_call_us(lambda: lens + 1):.1f}")


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
    latency_table()
    launch_anatomy()
    if "--no-profile" not in sys.argv:
        attend, append, _ = problem(1024, 1024)
        attend(), append()
        profile(attend, "attend only, ctx 1k")
        profile(append, "append+attend, ctx 1k")


if __name__ == "__main__":
    main()

"""Context parallelism over several GPUs: scaling of ring, all-gather and Ulysses attention, how much
of the ring's communication hides under attention, and decode over a sharded KV cache.

Run under torchrun, one process per GPU (NCCL); the world size is the run's:

    torchrun --nproc-per-node 8 -m benchmarks.bench_cp [--quick] [--out DIR] [--only impl=ring,local]

Section scaling: per-rank TFLOP/s of one sequence of W·N tokens (N per rank, zigzag layout, causal,
Hq 32 / Hk 8, D 128, bf16), forward and forward+backward, for each strategy, and of one GPU
attending N tokens alone ("local", the same shapes on every rank at once). The ratio columns
strategy/local are the scaling efficiency: W GPUs at W·N against one GPU at N (target for ring
forward+backward at N = 128k on 8 GPUs: >= 0.90). FLOPs of the whole sequence are split evenly
over the ranks (attention_flops convention: 4·N²·D per head, halved when causal, 3.5x with backward).
Section ring_parts: the ring's time next to its compute alone (the same kernel calls, no
transfers) and its transfers alone (no kernel calls); the hidden share of communication,
1 - (ring - compute) / transfers, is tabled after the run (target >= 0.95 at N >= 32k).
Section decode: µs per decode step (one new token, appended) against a cache of ctx tokens: one
GPU holding it all (when it fits in MAX_KV_BYTES), and W GPUs each holding the interleaved 1/W
(cp_flash_attn_with_kvcache); the ratio is the step speedup.

Every timing is collective: fixed warm-up and repetition counts agreed by the ranks, a barrier
before, CUDA events around, and the slowest rank's time. --dry-run lists the cases for W = 1, 2,
4 and 8 with FAKE timings, no GPU and no torchrun needed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from benchmarks.harness import Runner, Section, _parse_filters, _text, attention_flops, parse_args

STRATEGIES = ("ring", "allgather", "ulysses")
PASSES = ("fwd", "fwd_bwd")
TOKENS_PER_RANK = (32768, 65536, 131072, 262144)
MAX_TOKENS = 1 << 20  # W·N up to 1M
HEADS, HEADS_KV, HEAD_DIM = 32, 8, 128
DECODE_BATCHES = (1, 16)
DECODE_CONTEXTS = (32768, 131072, 524288, 1048576)
MAX_KV_BYTES = 16 * 2**30  # per GPU: a larger one-GPU cache is not measured, its sharded form is
CASE_KEYS = ("W", "N", "S", "pass", "B", "ctx")
FAKE_WORLD_SIZES = (1, 2, 4, 8)


def scaling_cases(world_sizes, quick: bool) -> Iterator[dict]:
    for w, n, pass_ in itertools.product(world_sizes, TOKENS_PER_RANK, PASSES):
        if w * n <= MAX_TOKENS and (not quick or n in (32768, 131072)):
            yield dict(W=w, N=n, S=w * n, **{"pass": pass_})


def kv_bytes(case: dict) -> int:
    return 2 * case["B"] * case["ctx"] * HEADS_KV * HEAD_DIM * 2


def decode_cases(world_sizes, quick: bool) -> Iterator[dict]:
    for w, b, ctx in itertools.product(world_sizes, DECODE_BATCHES, DECODE_CONTEXTS):
        case = dict(W=w, B=b, ctx=ctx)
        if kv_bytes(case) <= w * MAX_KV_BYTES and (not quick or ctx in (131072, 1048576)):
            yield case


# ---------------------------------------------------------------------------------------------
# Lockstep: every rank builds and times the same calls in the same order


def _agree(ok: bool) -> bool:
    """True on every rank when every rank says ok."""
    flag = torch.tensor([int(ok)], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def collective_ms(fn: Callable[[], object]) -> float:
    """ms per call: the slowest rank's, over a repetition count every rank agrees on."""
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = torch.tensor([start.elapsed_time(end)], device="cuda")
    dist.all_reduce(once, op=dist.ReduceOp.MAX)
    reps = max(3, min(50, int(1000 / max(once.item(), 1e-3))))  # about a second, agreed
    dist.barrier()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    ms = torch.tensor([start.elapsed_time(end) / reps], device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


class Lockstep:
    """Runner on rank 0; the other ranks run the same builds and timings and record nothing. A
    build that fails on any rank fails on all (one flag all-reduced), so none waits alone."""

    def __init__(self, run: Optional[Runner], args, rank: int):
        self.run, self.rank, self.fake = run, rank, args.dry_run
        self.filters = _parse_filters(args.only, set(CASE_KEYS) | {"impl"})

    def keep(self, case: dict) -> bool:
        return all(_text(case[k]) in values for k, values in self.filters.items() if k in case)

    def measure(self, section: str, case: dict, impl: str, build: Callable[[], Callable], *, flops=None) -> None:
        if impl not in self.filters.get("impl", {impl}):
            return
        if self.fake:
            self.run.measure(section, case, impl, build, flops=flops)
            return
        go = torch.tensor([int(self.run is None or not self.run.check_budget())], device="cuda")
        dist.broadcast(go, 0)
        if not go.item():
            return

        def agreed_build():
            fn, error = None, None
            try:
                fn = build()
            except Exception as e:  # recorded by rank 0's Runner, after every rank agreed to skip
                error = e
            if not _agree(error is None):
                raise error or RuntimeError("the build failed on another rank")
            return fn

        if self.run is not None:
            self.run.measure(section, case, impl, agreed_build, flops=flops, timer=collective_ms)
        else:
            try:
                collective_ms(agreed_build())
            except Exception:
                pass
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The calls


def _inputs(n: int, requires_grad: bool):
    shapes = ((1, n, HEADS, HEAD_DIM), (1, n, HEADS_KV, HEAD_DIM), (1, n, HEADS_KV, HEAD_DIM))
    return [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad) for s in shapes]


def _with_backward(forward: Callable[[], torch.Tensor], leaves, pass_: str):
    if pass_ == "fwd":
        return forward
    dout = torch.randn_like(leaves[0])
    return lambda: torch.autograd.grad(forward(), leaves, dout)


def strategy_call(strategy: str, case: dict):
    from flash_attn_3.distributed import context_parallel_attention

    leaves = _inputs(case["N"], case["pass"] == "fwd_bwd")
    with torch.no_grad():  # arguments checked across ranks once here; the timed calls skip it
        context_parallel_attention(*leaves, strategy=strategy, causal=True)
    return _with_backward(lambda: context_parallel_attention(*leaves, strategy=strategy, causal=True,
                                                             validate_ranks=False), leaves, case["pass"])


def local_call(case: dict):
    from flash_attn_3 import flash_attn_func

    leaves = _inputs(case["N"], case["pass"] == "fwd_bwd")
    return _with_backward(lambda: flash_attn_func(*leaves, causal=True), leaves, case["pass"])


class _NoTransfer:
    """A ring schedule whose exchanges move nothing: every block attended is the rank's own (the
    same shapes, the same kernel calls), so the ring runs its compute alone."""

    def __init__(self, schedule):
        self.__dict__.update(schedule.__dict__)

    def exchange(self, group, step, fwd, bwd, grads_out=(), grads_step=None, grad_numel=0):
        received = [torch.zeros(grad_numel, dtype=torch.float32, device=fwd.device)
                    for _ in self.receives.get(grads_step, ())]
        return _Done(), fwd, bwd, received


class _Done:
    def wait(self) -> None:
        pass


def ring_part_call(part: str, case: dict):
    """The ring's forward (and backward) as is, compute only, or transfers only."""
    from flash_attn_3.distributed import _blocks, ring

    world, rank = dist.get_world_size(), dist.get_rank()
    plan = ring._dense_plan(case["N"], world, rank, "zigzag", *_blocks.band_limits(True, (-1, -1)))
    if part == "compute":
        plan = ring.RingPlan(_NoTransfer(plan.schedule), plan.launches)
    elif part == "transfers":
        plan = ring.RingPlan(plan.schedule, {source: [] for source in plan.launches})
    q, k, v = _inputs(case["N"], False)
    opts = ring._options(q, None, 0.0, False)
    if case["pass"] == "fwd":
        return lambda: ring.ring_forward(q, k, v, plan, opts, None)
    out, lse = ring.ring_forward(q, k, v, plan, opts, None)
    dout = torch.randn_like(out)

    def forward_backward():
        ring.ring_forward(q, k, v, plan, opts, None)
        ring.ring_backward(dout, q, k, v, out, lse, plan, opts, None)

    return forward_backward


def decode_call(impl: str, case: dict):
    from flash_attn_3 import flash_attn_with_kvcache
    from flash_attn_3.distributed import cp_flash_attn_with_kvcache

    world, b, ctx = case["W"], case["B"], case["ctx"]
    shard = ctx if impl == "one_gpu" else -(-ctx // world)
    k_cache, v_cache = (torch.randn(b, shard + 64, HEADS_KV, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
    q = torch.randn(b, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(b, 1, HEADS_KV, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((b,), ctx - 1, dtype=torch.int32, device="cuda")
    if impl == "one_gpu":
        return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, causal=True)
    return lambda: cp_flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, causal=True,
                                              validate_ranks=False)


# ---------------------------------------------------------------------------------------------
# The run


class CPRunner(Runner):
    """The harness's Runner plus the hidden-communication table, derived from ring_parts rows.
    The time budget is checked once per measurement (check_budget) and the answer broadcast, so
    rank 0 never skips a measurement the other ranks enter."""

    def check_budget(self) -> bool:
        return Runner.stopped(self)

    def stopped(self) -> bool:
        return self.stop_reason is not None

    def document(self) -> dict:
        doc = super().document()
        doc["hidden"] = hidden_shares(doc["results"])
        return doc


def hidden_shares(results: list) -> list:
    """1 - (ring - compute) / transfers per ring_parts case that has all three times."""
    times: dict = {}
    for row in results:
        if row["section"] == "ring_parts" and row["ms"]:
            times.setdefault(tuple(sorted(row["case"].items())), {})[row["impl"]] = row["ms"]
    shares = []
    for case, t in times.items():
        if {"ring", "compute", "transfers"} <= t.keys():
            exposed = max(t["ring"] - t["compute"], 0.0)
            shares.append(dict(case=dict(case), hidden=max(0.0, 1 - exposed / t["transfers"]) if t["transfers"] else 1.0))
    return shares


def hidden_markdown(shares: list) -> str:
    if not shares:
        return "**Communication hidden under compute (ring)**: no rows"
    lines = ["**Communication hidden under compute (ring): 1 - (ring - compute) / transfers**", "",
             "| W | N | pass | hidden |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['case']['W']} | {s['case']['N']} | {s['case']['pass']} | {s['hidden']:.2f} |" for s in shares]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    world_sizes = FAKE_WORLD_SIZES
    rank = 0
    if not args.dry_run:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        rank = dist.get_rank()
        world_sizes = (dist.get_world_size(),)
        # Unforced, a call the triton backend refuses would run on the reference backend and its
        # time would stand in the table as ours.
        os.environ.setdefault("FLASH_ATTN_3_BACKEND", "triton")
    sections = {
        "scaling": Section("Per-rank TFLOP/s, one causal sequence of W·N tokens (Hq 32, Hk 8, D 128, bf16, "
                           "zigzag); strategy/local = scaling efficiency", "tflops",
                           ratios=[(s, "local") for s in STRATEGIES], plot_x="N", plot_panel="pass",
                           plot_series=["W"]),
        "ring_parts": Section("Ring forward (+ backward) µs: whole, compute only (no transfers), transfers only "
                             "(no kernel calls)", "us"),
        "decode": Section("Decode step µs, one new token, Hq 32, Hk 8, D 128: one GPU vs the cache sharded "
                          "over W; one_gpu/cp = speedup", "us", ratios=[("cp", "one_gpu")]),
    }
    run = CPRunner("bench_cp", args, sections, CASE_KEYS) if rank == 0 else None
    step = Lockstep(run, args, rank)
    with run if run is not None else contextlib.nullcontext():
        for case in scaling_cases(world_sizes, args.quick):
            if not step.keep(case):
                continue
            flops = attention_flops([case["S"]], HEADS, HEAD_DIM, True, mode=case["pass"]) / case["W"]
            local_flops = attention_flops([case["N"]], HEADS, HEAD_DIM, True, mode=case["pass"])
            step.measure("scaling", case, "local", functools.partial(local_call, case), flops=local_flops)
            for strategy in STRATEGIES:
                step.measure("scaling", case, strategy, functools.partial(strategy_call, strategy, case), flops=flops)
            if case["W"] > 1:
                for part in ("ring", "compute", "transfers"):
                    step.measure("ring_parts", case, part, functools.partial(ring_part_call, part, case))
        for case in decode_cases(world_sizes, args.quick):
            if step.keep(case):
                for impl in ("one_gpu", "cp") if kv_bytes(case) <= MAX_KV_BYTES else ("cp",):
                    step.measure("decode", case, impl, functools.partial(decode_call, impl, case))
    if run is not None:
        with (args.out / "bench_cp.md").open("a") as md:
            md.write("\n" + hidden_markdown(run.document()["hidden"]) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

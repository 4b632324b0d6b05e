"""What every rank of a spawned process group runs for tests/test_distributed.py.

Each check builds the whole batch from a seed shared by the ranks (fresh every run), gives every
rank its shard, runs the distributed entry, gathers outputs and gradients, and rank 0 judges them
against the float64 single-process reference (tests/reference_math.py) with the spec's tolerances.
Results go to one JSON file per rank after every check, so a hang still leaves what finished.

Kept apart from conftest.py: a spawned child imports this module, and it must import quickly.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import reference_math as rm
from inputs import paged_copy
from tolerance import assert_grad_matches, assert_lse_matches, assert_matches_reference


class Ctx:
    def __init__(self, rank: int, world: int, seed: int, device: str):
        self.rank, self.world, self.seed, self.device = rank, world, seed, device
        self.group = None  # the default group
        self.big = device == "cuda"
        self.draws = 0

    def generator(self) -> torch.Generator:
        """The same stream on every rank, a new one per draw."""
        self.draws += 1
        return torch.Generator().manual_seed(self.seed * 1000 + self.draws)


def _randn(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def _shapes(ctx, heads=(4, 2), d=16, dv=None):
    """(batch, chunk, heads, heads_kv, d, dv): a global length of 2 * world * chunk. On a GPU one
    moderate shape for every case (head_dim 128 allows no other head_dim_v below 96)."""
    if ctx.big:
        return 2, 256 // ctx.world, 8, 2, 128, 128
    return 2, 3, heads[0], heads[1], d, dv or d


# ---------------------------------------------------------------------------------------------
# References


def _reference(fn, inputs, g, **kw):
    """(out, lse) float64, out in low precision, and the float64 and low-precision gradients."""
    ref, ref_lse = fn(*inputs, **kw)
    lowp, _ = fn(*inputs, lowp=True, **kw)
    grads = []
    for lowp_flag in (False, True):
        leaves = [t.detach().to(t.dtype if lowp_flag else torch.float64).requires_grad_() for t in inputs]
        out, _ = fn(*leaves, lowp=lowp_flag, **kw)
        grads.append(torch.autograd.grad(out, leaves, g.to(out.dtype)))
    return ref, ref_lse, lowp, grads[0], grads[1]


def _judge(label, got, want, softcap):
    """got: out, lse, dq, dk, dv (whole batch); want: _reference's tuple."""
    out, lse, dq, dk, dv = got
    ref, ref_lse, lowp, grads, grads_lowp = want
    capped = softcap > 0
    assert_matches_reference(f"{label}: out", out, ref, lowp, softcap=capped)
    assert_lse_matches(f"{label}: lse", lse, ref_lse)
    for name, grad, exact, base in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, grads_lowp):
        assert_grad_matches(f"{label}: {name}", grad, exact, base, softcap=capped)


# ---------------------------------------------------------------------------------------------
# Prefill / training: dense and packed, each strategy


def _dense_once(ctx, fn, case, **extra):
    """Run fn on this rank's shards of a fresh batch; on rank 0 return (global inputs, gathered
    results), else None."""
    from flash_attn_3.distributed import gather_sequence, shard_sequence

    batch, chunk, heads, heads_kv, d, dv = _shapes(ctx, case.get("heads", (4, 2)), case.get("d", 16), case.get("dv"))
    seqlen = 2 * ctx.world * chunk
    gen = ctx.generator()
    dtype, layout, softcap = case.get("dtype", torch.bfloat16), case.get("layout", "zigzag"), case.get("softcap", 0.0)
    q = _randn(gen, batch, seqlen, heads, d, dtype=dtype, device=ctx.device, scale=softcap / 4 if softcap else 1.0)
    k = _randn(gen, batch, seqlen, heads_kv, d, dtype=dtype, device=ctx.device)
    v = _randn(gen, batch, seqlen, heads_kv, dv, dtype=dtype, device=ctx.device)
    g = _randn(gen, batch, seqlen, heads, dv, dtype=dtype, device=ctx.device)
    window = case.get("window", (-1, -1))
    if window == "draw":  # a fresh window, at most one chunk wide on the left
        window = (int(torch.randint(0, chunk, (1,), generator=gen)), int(torch.randint(0, 3, (1,), generator=gen)))
    kw = dict(causal=case.get("causal", False), window_size=window, softcap=softcap)
    leaves = [shard_sequence(x, ctx.world, ctx.rank, layout=layout).requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves, case.get("group", ctx.group), layout=layout, return_softmax_lse=True, **kw, **extra)
    out.backward(shard_sequence(g, ctx.world, ctx.rank, layout=layout))
    gathered = [gather_sequence(x, ctx.group, layout=layout) for x in (out, *(t.grad for t in leaves))]
    lse_all = gather_sequence(lse, ctx.group, layout=layout, dim=2)
    if ctx.rank:
        return None
    out_all, dq, dk, dv = gathered
    return (q, k, v, g, kw), (out_all, lse_all, dq, dk, dv)


def _check_dense(ctx, fn, cases):
    for i, case in enumerate(cases):
        result = _dense_once(ctx, fn, case)
        if result is None:
            continue
        (q, k, v, g, kw), got = result
        want = _reference(rm.attention_dense, (q, k, v), g, **kw)
        _judge(f"{fn.__name__} case {i} {case} {kw}", got, want, kw["softcap"])


def _varlen_once(ctx, fn, case):
    from flash_attn_3.distributed import gather_sequence, local_cu_seqlens, shard_varlen

    _, chunk, heads, heads_kv, d, dv = _shapes(ctx, case.get("heads", (4, 2)), case.get("d", 16), case.get("dv"))
    layout, softcap = case.get("layout", "zigzag"), case.get("softcap", 0.0)
    multiple = 2 * ctx.world if layout == "zigzag" else ctx.world
    gen = ctx.generator()
    # lengths: multiples of the split, one sequence empty, fresh every run
    lengths = [multiple * int(m) for m in torch.randint(1, 2 * chunk + 1, (3,), generator=gen)] + [0]
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(ctx.device)
    total = sum(lengths)
    dtype = case.get("dtype", torch.bfloat16)
    q = _randn(gen, total, heads, d, dtype=dtype, device=ctx.device, scale=softcap / 4 if softcap else 1.0)
    k = _randn(gen, total, heads_kv, d, dtype=dtype, device=ctx.device)
    v = _randn(gen, total, heads_kv, dv, dtype=dtype, device=ctx.device)
    g = _randn(gen, total, heads, dv, dtype=dtype, device=ctx.device)
    window = case.get("window", (-1, -1))
    if window == "draw":
        window = (int(torch.randint(0, 2 * chunk, (1,), generator=gen)), int(torch.randint(0, 3, (1,), generator=gen)))
    kw = dict(causal=case.get("causal", False), window_size=window, softcap=softcap)
    leaves = [shard_varlen(x, cu, ctx.world, ctx.rank, layout=layout).requires_grad_() for x in (q, k, v)]
    assert torch.equal(local_cu_seqlens(cu, ctx.world) * ctx.world, cu)
    out, lse = fn(*leaves, cu, max(lengths), ctx.group, layout=layout, return_softmax_lse=True, **kw)
    out.backward(shard_varlen(g, cu, ctx.world, ctx.rank, layout=layout))
    gathered = [gather_sequence(x, ctx.group, layout=layout, cu_seqlens=cu) for x in (out, *(t.grad for t in leaves))]
    lse_all = gather_sequence(lse.t().contiguous(), ctx.group, layout=layout, cu_seqlens=cu).t()
    if ctx.rank:
        return None
    out_all, dq, dk, dv = gathered
    return (q, k, v, g, cu, kw), (out_all, lse_all, dq, dk, dv)


def _check_varlen(ctx, fn, cases):
    for i, case in enumerate(cases):
        result = _varlen_once(ctx, fn, case)
        if result is None:
            continue
        (q, k, v, g, cu, kw), got = result

        def reference(a, b, c, lowp=False, **kw2):
            return rm.attention_varlen(a, b, c, cu, cu, lowp=lowp, **kw2)

        _judge(f"{fn.__name__} case {i} {case} {kw}", got, _reference(reference, (q, k, v), g, **kw), kw["softcap"])


# One case per mask / score feature: causal, a sliding window (drawn, at most a chunk wide, so
# the ring skips blocks), window + softcap, GQA / MQA / MHA, head_dim_v != head_dim, both layouts
# and both half-precision dtypes.
DENSE_CASES = [
    dict(causal=True),
    dict(causal=True, window="draw", layout="contiguous", heads=(4, 1), dtype=torch.float16),
    dict(window=(3, 2), softcap=5.0, heads=(2, 2)),
    dict(causal=False, dv=32, layout="contiguous"),
    # keys only after the query: blocks travel one way, the other way than causal's
    dict(window=(0, 4), layout="contiguous", heads=(4, 1)),
]
VARLEN_CASES = [
    dict(causal=True),
    dict(causal=True, window="draw", softcap=5.0, layout="contiguous", dtype=torch.float16),
]


def check_ring(ctx):
    from flash_attn_3.distributed import ring_flash_attn_func, ring_flash_attn_varlen_func

    _check_dense(ctx, ring_flash_attn_func, DENSE_CASES)
    _check_varlen(ctx, ring_flash_attn_varlen_func, VARLEN_CASES)


def check_allgather(ctx):
    from flash_attn_3.distributed import allgather_flash_attn_func, allgather_flash_attn_varlen_func

    _check_dense(ctx, allgather_flash_attn_func, DENSE_CASES[:3])
    _check_varlen(ctx, allgather_flash_attn_varlen_func, VARLEN_CASES)


def check_ulysses(ctx):
    from flash_attn_3.distributed import ulysses_flash_attn_func, ulysses_flash_attn_varlen_func

    heads = (12, 2)  # divisible by 1, 2, 3 and 4; 2 KV heads are repeated to whole shares
    _check_dense(ctx, ulysses_flash_attn_func, [dict(c, heads=heads) for c in DENSE_CASES[:3]])
    _check_varlen(ctx, ulysses_flash_attn_varlen_func, [dict(c, heads=heads) for c in VARLEN_CASES])


def check_auto_strategy(ctx):
    from flash_attn_3.distributed import choose_strategy, context_parallel_attention

    def auto(q, k, v, group, **kw):
        return context_parallel_attention(q, k, v, group, strategy="auto", **kw)

    def auto_varlen(q, k, v, cu, max_seqlen, group, **kw):
        return context_parallel_attention(q, k, v, group, strategy="auto", cu_seqlens=cu, max_seqlen=max_seqlen, **kw)

    auto.__name__, auto_varlen.__name__ = "auto", "auto_varlen"
    _check_dense(ctx, auto, [dict(causal=True, heads=(4, 4))])
    _check_varlen(ctx, auto_varlen, [dict(causal=True)])
    choice = choose_strategy(world_size=ctx.world, seqlen_local=6, num_heads=4, num_heads_kv=2, head_dim=16,
                             causal=True)
    assert choice.strategy in ("ring", "allgather", "ulysses") and choice.reason


def check_device_mesh(ctx):
    from torch.distributed.device_mesh import init_device_mesh

    from flash_attn_3.distributed import ring_flash_attn_func

    mesh = init_device_mesh(ctx.device, (ctx.world,), mesh_dim_names=("cp",))
    _check_dense(ctx, ring_flash_attn_func, [dict(causal=True, group=mesh)])


def check_deterministic(ctx):
    from flash_attn_3.distributed import (allgather_flash_attn_func, ring_flash_attn_func,
                                          ring_flash_attn_varlen_func, shard_sequence, ulysses_flash_attn_func)

    batch, chunk, heads, heads_kv, d, dv = _shapes(ctx, (4, 2))
    gen = ctx.generator()
    seqlen = 2 * ctx.world * chunk
    q, k, v, g = (_randn(gen, batch, seqlen, h, d, dtype=torch.bfloat16, device=ctx.device)
                  for h in (heads, heads_kv, heads_kv, heads))
    shards = [shard_sequence(x, ctx.world, ctx.rank) for x in (q, k, v, g)]
    cu = torch.tensor([0, seqlen, 2 * seqlen], dtype=torch.int32, device=ctx.device)
    packed = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v, g)]
    from flash_attn_3.distributed import shard_varlen

    packed = [shard_varlen(x, cu, ctx.world, ctx.rank) for x in packed]
    runs = [(ring_flash_attn_func, shards, ()), (allgather_flash_attn_func, shards, ()),
            (ring_flash_attn_varlen_func, packed, (cu, seqlen))]
    if heads % ctx.world == 0:
        runs.append((ulysses_flash_attn_func, shards, ()))
    for fn, (ql, kl, vl, gl), extra in runs:
        results = []
        for _ in range(2):
            leaves = [t.detach().clone().requires_grad_() for t in (ql, kl, vl)]
            out = fn(*leaves, *extra, ctx.group, causal=True, window_size=(chunk + 1, -1), softcap=3.0,
                     deterministic=True)
            out.backward(gl)
            results.append([out.detach()] + [t.grad for t in leaves])
        for name, first, second in zip(("out", "dq", "dk", "dv"), *results):
            assert torch.equal(first, second), f"{fn.__name__}: {name} differs between two deterministic runs"


def check_compile(ctx):
    """torch.compile over a model step that calls ring attention: a graph break around it."""
    from flash_attn_3.distributed import ring_flash_attn_func, shard_sequence

    batch, chunk, heads, heads_kv, d, _ = _shapes(ctx)
    gen = ctx.generator()
    q, k, v = (_randn(gen, batch, 2 * ctx.world * chunk, h, d, dtype=torch.bfloat16, device=ctx.device)
               for h in (heads, heads_kv, heads_kv))
    q, k, v = (shard_sequence(x, ctx.world, ctx.rank) for x in (q, k, v))

    def step(q, k, v):
        return (ring_flash_attn_func(q * 1, k, v, ctx.group, causal=True) * 2).float().sum()

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for name, eager, compiled in zip(("loss", "dq", "dk", "dv"), *results):
        assert torch.equal(eager, compiled), f"compiled {name} differs from eager"


def check_transformers(ctx):
    """The recipe of docs/distributed.md, run as written, on a tiny random Llama: the logits of the
    sharded model match the whole-sequence model (fp32 reference, bf16 eager as the low-precision
    one), and the backward runs."""
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    from flash_attn_3.distributed import gather_sequence, position_ids, shard_sequence

    text = (Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
    recipe = text[text.index("# --- transformers recipe"):text.index("# --- end of recipe")]
    exec(compile(recipe, "docs/distributed.md", "exec"), {})
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(ctx.seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fa3_cp", dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager", dtype=torch.float32)
    reference.load_state_dict(model.state_dict())
    seqlen = 8 * ctx.world
    ids = torch.randint(0, 64, (2, seqlen), generator=ctx.generator())
    positions = position_ids(seqlen, ctx.world, ctx.rank).expand(2, -1)
    logits = model(input_ids=shard_sequence(ids, ctx.world, ctx.rank), position_ids=positions).logits
    logits.float().square().mean().backward()
    whole = gather_sequence(logits.detach(), ctx.group)
    if ctx.rank == 0:
        with torch.no_grad():
            ref = reference(input_ids=ids).logits
            lowp = reference.to(torch.bfloat16)(input_ids=ids).logits
        assert_matches_reference("transformers logits", whole, ref, lowp)


# ---------------------------------------------------------------------------------------------
# Decode over an interleaved cache


def check_decode(ctx):
    for paged in (False, True):
        _decode_steps(ctx, paged)


def _decode_steps(ctx, paged: bool):
    from flash_attn_3 import flash_attn_with_kvcache
    from flash_attn_3.distributed import cp_flash_attn_with_kvcache, local_cache_seqlens, shard_kv_cache

    w, r, device = ctx.world, ctx.rank, ctx.device
    batch, heads, heads_kv, d = (3, 8, 2, 128) if ctx.big else (3, 4, 2, 16)
    capacity = 512 if ctx.big else 24
    gen = ctx.generator()
    k_full = _randn(gen, batch, capacity, heads_kv, d, dtype=torch.bfloat16, device=device)
    v_full = _randn(gen, batch, capacity, heads_kv, d, dtype=torch.bfloat16, device=device)
    # One row shorter than the world size: some ranks hold none of its tokens at first.
    seqlens = torch.tensor([1, 7, capacity // 2], dtype=torch.int32, device=device)
    local_capacity = -(-capacity // w)
    k_local, v_local = (shard_kv_cache(x, w, r) for x in (k_full, v_full))
    page_table = None
    if paged:
        (k_local, v_local), page_table = paged_copy(k_local, v_local, page_size=3)
    steps = [dict(new=1, causal=True), dict(new=3, causal=True, window_size=(5, 0)), dict(new=1, causal=False, softcap=4.0),
             dict(new=0, causal=True), dict(new=2, causal=True)]
    for i, step in enumerate(steps):
        step = dict(step)
        new = step.pop("new")
        q = _randn(gen, batch, max(new, 1), heads, d, dtype=torch.bfloat16, device=device)
        k_new = v_new = None
        if new:
            k_new = _randn(gen, batch, new, heads_kv, d, dtype=torch.bfloat16, device=device)
            v_new = _randn(gen, batch, new, heads_kv, d, dtype=torch.bfloat16, device=device)
        out, lse = cp_flash_attn_with_kvcache(q, k_local, v_local, k_new, v_new, cache_seqlens=seqlens, group=ctx.group,
                                              page_table=page_table, return_softmax_lse=True, **step)
        ref, ref_lse, k_after, v_after = rm.attention_kvcache(q, k_full, v_full, k_new, v_new, cache_seqlens=seqlens, **step)
        lowp, *_ = rm.attention_kvcache(q, k_full, v_full, k_new, v_new, cache_seqlens=seqlens, lowp=True, **step)
        single, single_lse, *_ = flash_attn_with_kvcache(q, k_full.clone(), v_full.clone(), k_new, v_new,
                                                          cache_seqlens=seqlens, return_softmax_lse=True, **step)
        label = f"decode step {i} paged={paged} {step}"
        # Each rank's partial out leaves flash_attn_with_kvcache rounded to bf16 before the fp32
        # merge, a rounding the single-pass reference does not have (half an ulp per partial):
        # one ulp of the largest output on top (a run at W=2 missed by 0.002 at |out| 2.5).
        ulp = torch.finfo(out.dtype).eps * ref.abs().max().item()
        assert_matches_reference(f"{label}: out", out, ref, lowp, softcap="softcap" in step, slack=ulp)
        assert_lse_matches(f"{label}: lse", lse, ref_lse)
        assert_matches_reference(f"{label}: single-rank out", single, ref, lowp, softcap="softcap" in step)
        k_full, v_full = k_after, v_after
        seqlens = seqlens + new
    # The shard holds exactly the interleaved tokens of the whole cache after the appends.
    local_lens = local_cache_seqlens(seqlens, w, r).tolist()
    for b in range(batch):
        n = local_lens[b]
        if paged:
            got_k = rm.gather_pages(k_local, page_table[b], n)
            got_v = rm.gather_pages(v_local, page_table[b], n)
        else:
            got_k, got_v = k_local[b, :n], v_local[b, :n]
        assert n <= local_capacity
        assert torch.equal(got_k, k_full[b, r::w][:n]) and torch.equal(got_v, v_full[b, r::w][:n]), \
            f"row {b}: the shard does not hold tokens {r}, {r} + {w}, ... after the appends (paged={paged})"


# ---------------------------------------------------------------------------------------------
# Bad input: every rank raises, none waits


def _expect_error(ctx, label, call, pattern):
    try:
        call()
    except (ValueError, TypeError) as exc:
        assert re.search(pattern, str(exc)), f"{label}: message {str(exc)!r} does not match {pattern!r}"
    else:
        raise AssertionError(f"{label}: no error on rank {ctx.rank}")
    if dist.is_initialized():
        dist.barrier()  # every rank got here: none is left inside a collective


def check_bad_input(ctx):
    from flash_attn_3.distributed import (context_parallel_attention, cp_flash_attn_with_kvcache,
                                          ring_flash_attn_func, ring_flash_attn_varlen_func, ulysses_flash_attn_func)

    w, r, device = ctx.world, ctx.rank, ctx.device

    def qkv(seqlen, heads=4, heads_kv=2, dtype=torch.bfloat16, total=None):
        shape = (total,) if total is not None else (2, seqlen)
        return [torch.randn(*shape, h, 16, device=device).to(dtype) for h in (heads, heads_kv, heads_kv)]

    if w > 1:
        # Mismatched shards: rank 1 holds more tokens than the others.
        _expect_error(ctx, "mismatched shards", lambda: ring_flash_attn_func(*qkv(4 if r != 1 else 6), causal=True),
                      r"q\.shape\[1\] differs across ranks")
        # A bad argument on one rank only: the others raise too, naming it.
        _expect_error(ctx, "fp32 on rank 0", lambda: ring_flash_attn_func(*qkv(4, dtype=torch.float32 if r == 0 else torch.bfloat16)),
                      r"rank 0: TypeError: q must be float16 or bfloat16")
        _expect_error(ctx, "cache lengths differ", lambda: cp_flash_attn_with_kvcache(
            torch.randn(1, 1, 4, 16, device=device).bfloat16(), *[torch.randn(1, 8, 2, 16, device=device).bfloat16()] * 2,
            cache_seqlens=torch.tensor([3 + r], dtype=torch.int32, device=device)), r"cache_seqlens differs across ranks")
        _expect_error(ctx, "ulysses heads", lambda: ulysses_flash_attn_func(*qkv(4, heads=w + 1, heads_kv=1)),
                      rf"num_heads .* = {w + 1} must be divisible by the world size {w}")
    # The world size does not divide the layout: an odd shard cannot be two zigzag chunks.
    _expect_error(ctx, "odd zigzag shard", lambda: ring_flash_attn_func(*qkv(3), causal=True), r"must be even")
    # A sequence length that does not split into 2 * world_size chunks.
    cu = torch.tensor([0, 2 * w, 4 * w + 2 * w + 1], dtype=torch.int32, device=device)
    _expect_error(ctx, "varlen split", lambda: ring_flash_attn_varlen_func(*qkv(0, total=3), cu),
                  rf"sequence 1 has length {4 * w + 1}, not a multiple of {2 * w}")
    _expect_error(ctx, "layout name", lambda: ring_flash_attn_func(*qkv(4), layout="striped"), r"layout must be one of")
    _expect_error(ctx, "strategy name", lambda: context_parallel_attention(*qkv(4), strategy="tree"), r"strategy must be one of")
    # After the errors the group still works.
    out = ring_flash_attn_func(*qkv(4), causal=True)
    assert out.shape == (2, 4, 4, 16)


CHECKS = {
    "ring": check_ring,
    "allgather": check_allgather,
    "ulysses": check_ulysses,
    "auto": check_auto_strategy,
    "device_mesh": check_device_mesh,
    "deterministic": check_deterministic,
    "compile": check_compile,
    "transformers": check_transformers,
    "decode": check_decode,
    "bad_input": check_bad_input,
}


def run_rank(rank: int, world: int, init_method: str, out_dir: str, names: list, seed: int, device: str) -> None:
    """The body of one spawned rank: run the named checks, record each outcome."""
    backend = "nccl" if device == "cuda" else "gloo"
    # On the CPU the reference backend computes; on a GPU, our kernels (a refusal is an error).
    os.environ["FLASH_ATTN_3_BACKEND"] = "triton" if device == "cuda" else "reference"
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:  # up to 4 ranks share the CPU cores: one thread each, no oversubscription
        torch.set_num_threads(1)
    # A collective waits this long for a slower rank (one compiling, on a loaded 2-core machine)
    # before it errs; the parent's group timeout (longer) still catches a true hang.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=240))
    ctx = Ctx(rank, world, seed, device)
    results, path = {}, Path(out_dir) / f"rank{rank}.json"
    for name in names:
        try:
            CHECKS[name](ctx)
            results[name] = None
        except Exception:  # recorded for the parent, which fails the test with it
            results[name] = traceback.format_exc()
        path.write_text(json.dumps(results))
    dist.destroy_process_group()


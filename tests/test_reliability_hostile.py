"""Hostile values (issue 17, part 3): NaN / Inf where a caller's buffers can hold them, logits far
past the usual scale, rows without keys, fp8 at its saturation point.

The contract (docs/compatibility.md, "Hostile values"):
- NaN / Inf in one sequence of a varlen batch, in one page of a paged cache, or in memory that
  belongs to no sequence (rows past seqused or cu_seqlens[-1], cache slots past cache_seqlens or
  before cache_leftpad, page tails, spare pages) never reaches another sequence's output, LSE or
  gradients. The poisoned sequence's own rows may come out NaN (officially too).
- Scores of 1e4 (with or without softcap) give the softmax of the exact scores, to fp32 rounding.
- Rows with no allowed key: out exactly 0, LSE +inf, gradient 0.
- fp8: inputs at +-448 do not overflow; a rotated fp8 value past 448 saturates to +-448 (the
  official rotary's cvt.rn.satfinite), it never becomes NaN.

Each test poisons fresh random inputs, runs the backend and compares every clean row with the
float64 reference (tests/reference_math.py) by the spec sec 8 rule.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference_math as rm
from conftest import per_backend, refusal_skip
from inputs import FP8, cu_seqlens, descales, paged_copy, randn
from tolerance import assert_grad_matches, assert_lse_matches, assert_matches_reference

F64 = torch.float64
FP8_MAX = 448.0


def _grads(out, leaves, g):
    try:
        return torch.autograd.grad(out, leaves, g)
    except NotImplementedError as exc:
        refusal_skip(exc)


def _reference_grads(fn, inputs, g, *, lowp):
    leaves = [t.detach().to(t.dtype if lowp else F64).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, g.to(out.dtype), allow_unused=True)


def _spans(cu: torch.Tensor, used, total: int, exclude=()) -> torch.Tensor:
    """(total,) bool: rows inside a sequence's used part, except the sequences in `exclude`."""
    rows = torch.zeros(total, dtype=torch.bool)
    for b in range(cu.shape[0] - 1):
        if b in exclude:
            continue
        start = int(cu[b])
        length = int(cu[b + 1]) - start if used is None else int(used[b])
        rows[start:start + length] = True
    return rows


# ---------------------------------------------------------------------------------------------
# NaN / Inf confined to one varlen sequence, and to no sequence at all


def _varlen(lens_q, lens_k, *, d=32, heads=(4, 2), seqused=False, victim=None, value=math.nan,
            dtype=torch.bfloat16):
    return dict(lens_q=lens_q, lens_k=lens_k, d=d, heads=heads, seqused=seqused, victim=victim,
                value=value, dtype=dtype)


VARLEN_POISON = [
    _varlen([37, 5, 64, 20], [50, 9, 70, 1], victim=1),
    _varlen([37, 5, 64, 20], [50, 9, 70, 1], victim=2, value=math.inf, seqused=True),
    _varlen([37, 5, 64, 20], [50, 9, 70, 1], seqused=True),
    _varlen([1, 129, 127, 3], [127, 1, 129, 65], victim=0, heads=(6, 1), d=64),
]
VARLEN_POISON_TINY = [
    _varlen([5, 9, 3], [7, 12, 4], victim=1, d=16, seqused=True),
    _varlen([5, 9, 3], [7, 12, 4], d=16, seqused=True, value=-math.inf),
]
VARLEN_POISON_GPU = [
    _varlen([1, 4097, 127, 129], [129, 4097, 1, 127], victim=v, d=d, heads=h, seqused=s)
    for v, d, h, s in [(1, 128, (8, 2), False), (2, 64, (8, 8), True), (None, 128, (8, 1), True),
                       (0, 256, (4, 2), False)]
]


def _poisoned_varlen(case, device):
    """Packed q/k/v (with 3 spare rows past cu_seqlens[-1]) whose rows outside every used span,
    and every row of the victim sequence, hold case['value']."""
    heads, heads_kv = case["heads"]
    lens_q, lens_k = case["lens_q"], case["lens_k"]
    spare = 3
    q = randn(sum(lens_q) + spare, heads, case["d"], dtype=case["dtype"], device=device)
    k = randn(sum(lens_k) + spare, heads_kv, case["d"], dtype=case["dtype"], device=device)
    v = randn(sum(lens_k) + spare, heads_kv, case["d"], dtype=case["dtype"], device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    seqused_q = seqused_k = None
    if case["seqused"]:
        seqused_q = torch.tensor([int(torch.randint(0, n + 1, ())) for n in lens_q], dtype=torch.int32,
                                 device=device)
        seqused_k = torch.tensor([int(torch.randint(0, n + 1, ())) for n in lens_k], dtype=torch.int32,
                                 device=device)
    victims = () if case["victim"] is None else (case["victim"],)
    clean_q = _spans(cu_q.cpu(), None if seqused_q is None else seqused_q.cpu(), q.shape[0], victims)
    clean_k = _spans(cu_k.cpu(), None if seqused_k is None else seqused_k.cpu(), k.shape[0], victims)
    q[~clean_q.to(device)] = case["value"]
    k[~clean_k.to(device)] = case["value"]
    v[~clean_k.to(device)] = case["value"]
    return q, k, v, cu_q, cu_k, seqused_q, seqused_k, clean_q, clean_k


@pytest.mark.parametrize("backend,case", per_backend(VARLEN_POISON, VARLEN_POISON_TINY, VARLEN_POISON_GPU))
@pytest.mark.parametrize("causal", [False, True])
def test_poison_stays_in_its_varlen_sequence(fa, case, causal, device):
    q, k, v, cu_q, cu_k, seqused_q, seqused_k, clean_q, clean_k = _poisoned_varlen(case, device)
    max_q, max_k = max(case["lens_q"]), max(case["lens_k"])
    lens = dict(seqused_q=seqused_q, seqused_k=seqused_k)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fa.flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, causal=causal,
                                         return_attn_probs=True, **lens)
    ref, ref_lse = rm.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, **lens)
    lowp, _ = rm.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, lowp=True, **lens)
    assert_matches_reference("out of the clean sequences", out, ref, lowp, rows=clean_q)
    assert_lse_matches("lse of the clean sequences", lse, ref_lse, rows=clean_q)

    # Poison must not flow back either: rows of the other sequences get finite, right gradients.
    g = torch.randn_like(out)
    grads = _grads(out, leaves, g)

    def fn(lowp):
        return lambda a, b, c: rm.attention_varlen(a, b, c, cu_q, cu_k, causal=causal, lowp=lowp, **lens)[0]

    want = _reference_grads(fn(False), (q, k, v), g, lowp=False)
    base = _reference_grads(fn(True), (q, k, v), g, lowp=True)
    for name, got, w, b, rows in zip("qkv", grads, want, base, (clean_q, clean_k, clean_k)):
        rows = rows.to(got.device)
        if w is None:
            w = b = torch.zeros_like(got, dtype=F64)
        assert_grad_matches(f"d{name} of the clean sequences", got[rows], w[rows], b[rows])


# ---------------------------------------------------------------------------------------------
# NaN / Inf in a KV cache: past cache_seqlens, before cache_leftpad, in spare pages, in one page


def _cache(page_size, seqlen_q, *, leftpad=False, num_splits=1, batch=3, capacity=40, d=32,
           heads=(4, 2), new=1, dtype=torch.bfloat16):
    return dict(page_size=page_size, seqlen_q=seqlen_q, leftpad=leftpad, num_splits=num_splits,
                batch=batch, capacity=capacity, d=d, heads=heads, new=new, dtype=dtype)


CACHE_POISON = [
    _cache(None, 1), _cache(None, 4, leftpad=True, num_splits=3), _cache(1, 1, num_splits=0),
    _cache(3, 2, leftpad=True), _cache(16, 1, num_splits=3, new=0), _cache(16, 5, capacity=70),
]
CACHE_POISON_TINY = [_cache(None, 1, capacity=20, d=16, batch=2), _cache(3, 2, leftpad=True, capacity=20, d=16,
                                                                         batch=2, num_splits=2)]
CACHE_POISON_GPU = [
    _cache(ps, sq, leftpad=lp, num_splits=ns, batch=5, capacity=4224, d=128, heads=(16, 2), new=n)
    for ps, sq, lp, ns, n in [(None, 1, False, 0, 1), (256, 1, True, 0, 1), (16, 1, False, 7, 0),
                              (1, 4, True, 0, 4), (None, 129, False, 1, 129), (64, 127, True, 0, 0)]
]


def _poisoned_cache(case, device):
    """Arguments of one flash_attn_with_kvcache call, and the victim row: every cache slot that
    belongs to no sequence (past its cache_seqlens + new tokens, before its leftpad, spare pages,
    page tails) holds NaN / +-Inf, and so does the page (or, contiguous, the slot) holding the
    victim row's first key."""
    batch, capacity, d, dtype = case["batch"], case["capacity"], case["d"], case["dtype"]
    heads, heads_kv = case["heads"]
    k_rows = randn(batch, capacity, heads_kv, d, dtype=dtype, device=device)
    v_rows = randn(batch, capacity, heads_kv, d, dtype=dtype, device=device)
    new = case["new"]
    lens = torch.randint(max(1 - new, 0), capacity - new + 1, (batch,), dtype=torch.int32)
    leftpad = None
    if case["leftpad"]:
        leftpad = torch.stack([torch.randint(0, int(n) + 1, ()) if n > 0 else torch.tensor(0) for n in lens])
        leftpad = leftpad.to(torch.int32)
    # Clean slots: [leftpad, cache_seqlens + new) of each row (the append fills its part).
    pos = torch.arange(capacity)
    start = torch.zeros(batch, dtype=torch.int32) if leftpad is None else leftpad
    clean = (pos[None, :] >= start[:, None]) & (pos[None, :] < (lens + new)[:, None])
    bad = torch.tensor([math.nan, math.inf, -math.inf])
    junk = bad[torch.randint(0, 3, (batch, capacity))].to(dtype)[..., None, None]
    k_rows = torch.where(clean[..., None, None].to(device), k_rows, junk.to(device))
    v_rows = torch.where(clean[..., None, None].to(device), v_rows, junk.to(device))
    victim = int(torch.randint(0, batch, ()))
    first = int(start[victim])
    page_table = None
    if case["page_size"] is None:
        k_cache, v_cache = k_rows, v_rows
        if first < capacity:
            k_cache[victim, first] = math.nan
            v_cache[victim, first] = math.inf
    else:
        (k_cache, v_cache), page_table = paged_copy(k_rows, v_rows, page_size=case["page_size"])
        used = torch.zeros(k_cache.shape[0], dtype=torch.bool)
        used[page_table.flatten().long().cpu()] = True
        k_cache[~used.to(device)] = math.nan  # spare pages
        v_cache[~used.to(device)] = -math.inf
        page = page_table[victim, min(first, capacity - 1) // case["page_size"]]
        k_cache[page] = math.nan
        v_cache[page] = math.nan
    q = randn(batch, case["seqlen_q"], heads, d, dtype=dtype, device=device)
    k = v = None
    if new:
        k = randn(batch, new, heads_kv, d, dtype=dtype, device=device)
        v = randn(batch, new, heads_kv, d, dtype=dtype, device=device)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lens.to(device),
                cache_leftpad=None if leftpad is None else leftpad.to(device), page_table=page_table,
                causal=True)
    return args, victim


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t: equality that also holds NaN to NaN."""
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("backend,case", per_backend(CACHE_POISON, CACHE_POISON_TINY, CACHE_POISON_GPU))
def test_poison_in_a_kv_cache_stays_out_of_other_rows(fa, case, device):
    args, victim = _poisoned_cache(case, device)
    ref, ref_lse, k_want, v_want = rm.attention_kvcache(**args)
    lowp, _, _, _ = rm.attention_kvcache(**args, lowp=True)
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    out, lse, *_ = fa.flash_attn_with_kvcache(**dict(args, k_cache=k_cache, v_cache=v_cache),
                                              num_splits=case["num_splits"], return_softmax_lse=True)
    others = torch.arange(case["batch"]) != victim
    assert_matches_reference("out of the other rows", out, ref, lowp, rows=others)
    assert_lse_matches("lse of the other rows", lse, ref_lse, rows=others, dim=0)
    # The append writes its slots and nothing else: every poisoned slot keeps its bits.
    assert torch.equal(_bits(k_cache), _bits(k_want)), "k_cache differs from the expected append"
    assert torch.equal(_bits(v_cache), _bits(v_want)), "v_cache differs from the expected append"


# ---------------------------------------------------------------------------------------------
# Scores of 1e4, with and without softcap


def _fp32_scores(q, k, *, softmax_scale, softcap, causal):
    """(B, H, Sq, Sk) fp32 scores from the exact products, and the tanh of the softcap (or None)."""
    kf = k.float().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * softmax_scale
    tanh = None
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores = tanh * softcap
    if causal:
        allowed = rm.allowed_keys(q.shape[1], k.shape[1], causal=True, device=q.device)
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores, tanh


def _fp32_twin(q, k, v, *, softmax_scale, softcap=0.0, causal=False):
    """The honest low-precision twin of a kernel for one (B, S, H, D) call: scores from the exact
    products accumulated in fp32, softmax in fp32, P rounded to the input dtype for P @ V, as the
    kernels do. (reference_math's lowp twin takes the scores in the input dtype: at 1e4 a bf16
    score is off by up to 32, which would make the spec rule accept anything.)"""
    scores, _ = _fp32_scores(q, k, softmax_scale=softmax_scale, softcap=softcap, causal=causal)
    vf = v.float().repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    p = torch.softmax(scores, dim=-1).to(q.dtype).float()
    return torch.einsum("bhqk,bkhd->bqhd", p, vf)


def _fp32_backward_twin(q, k, v, out, g, *, softmax_scale, softcap=0.0, causal=False):
    """dq, dk, dv as a FlashAttention backward computes them in fp32: P recomputed as
    exp(S - LSE) from the fp32 LSE (at scores of 1e4 its rounding, 2^-10, moves every P by ~1e-3:
    an error the exact-softmax autograd does not make), delta = rowsum(dO * O) with O in the
    input dtype."""
    group = q.shape[2] // k.shape[2]
    scores, tanh = _fp32_scores(q, k, softmax_scale=softmax_scale, softcap=softcap, causal=causal)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.exp(scores - lse)
    kf, vf = (t.float().repeat_interleave(group, dim=2) for t in (k, v))
    gf = g.float()
    dp = torch.einsum("bqhd,bkhd->bhqk", gf, vf)
    delta = (gf * out.float()).sum(-1).transpose(1, 2)[..., None]
    ds = p * (dp - delta)
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * softmax_scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * softmax_scale
    dv = torch.einsum("bhqk,bqhd->bkhd", p, gf)

    def per_kv_head(x):
        return x.unflatten(2, (k.shape[2], group)).sum(3)

    return dq, per_kv_head(dk), per_kv_head(dv)


HUGE = [dict(entry=e, softcap=s, dtype=dt, causal=c)
        for e, s, dt, c in [("func", 0.0, torch.bfloat16, True), ("func", 30.0, torch.bfloat16, False),
                            ("func", 0.0, torch.float16, False), ("func", 50.0, torch.float16, True),
                            ("kvcache", 0.0, torch.bfloat16, True), ("kvcache", 30.0, torch.float16, True)]]
HUGE_SHAPES = dict(seqlen_q=45, seqlen_k=77, d=64, batch=2)
HUGE_TINY = [dict(entry="func", softcap=30.0, dtype=torch.bfloat16, causal=True, seqlen_q=9, seqlen_k=20, d=32,
                  batch=1),
             dict(entry="kvcache", softcap=0.0, dtype=torch.bfloat16, causal=False, seqlen_q=1, seqlen_k=20, d=32,
                  batch=2)]
HUGE_GPU = [dict(entry=e, softcap=s, dtype=torch.bfloat16, causal=True, seqlen_q=sq, seqlen_k=4097, d=128, batch=2)
            for e, s, sq in [("func", 0.0, 4097), ("func", 30.0, 1000), ("kvcache", 0.0, 1), ("kvcache", 30.0, 1)]]


@pytest.mark.parametrize("backend,case", per_backend([dict(c, **HUGE_SHAPES) for c in HUGE], HUGE_TINY, HUGE_GPU))
def test_scores_of_1e4(fa, case, device):
    """q and k of std 100: scores of std 1e4, rows whose softmax is nearly one key (or, with
    softcap, tanh saturated at +-softcap on most keys, so many keys tie)."""
    batch, seqlen_q, seqlen_k, d, dtype = case["batch"], case["seqlen_q"], case["seqlen_k"], case["d"], case["dtype"]
    q = randn(batch, seqlen_q, 4, d, dtype=dtype, device=device, scale=100.0)
    k = randn(batch, seqlen_k, 2, d, dtype=dtype, device=device, scale=100.0)
    v = randn(batch, seqlen_k, 2, d, dtype=dtype, device=device)
    kw = dict(causal=case["causal"], softcap=case["softcap"])
    scale = 1.0 / math.sqrt(d)
    if case["entry"] == "func":
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = fa.flash_attn_func(*leaves, return_attn_probs=True, **kw)
    else:
        out, lse, *_ = fa.flash_attn_with_kvcache(q, k.clone(), v.clone(), return_softmax_lse=True, **kw)
    ref, ref_lse = rm.attention_dense(q, k, v, **kw)
    twin = _fp32_twin(q, k, v, softmax_scale=scale, **kw)
    # Rows this peaked are one value of v: rounding it to the output dtype can land one ulp off
    # where the fp32 twin lands half an ulp off (H100, 2026-12-07: 0.0156 at 3.31 against a
    # bound of 2 x 0.0078), so one ulp of the largest output is allowed on top.
    ulp = torch.finfo(out.dtype).eps * ref.abs().max().item()
    # The mean too: the kernels (as FA3's) take exp2(s * c - m) in one FMA, whose rounding
    # residual at |s * c| ~ 2e3 puts the top key's fp32 p (in the row sum) 4e-5 off 1 while its
    # fp16 / bf16 copy (in P @ V) rounds to exactly 1, so ~5 % of outputs land one ulp off (H100
    # 2026-12-07: Gluon fp16 mean err 7e-5; portable bf16 causal 3.6e-6 against 3.4e-6), which
    # the fp32 twin, exact there, does not model. Half an ulp of the mean output covers it; the
    # max bound and the NaN check still catch a wrong key or an overflow.
    mean_ulp = 0.5 * torch.finfo(out.dtype).eps * ref.abs().mean().item()
    assert_matches_reference("out", out, ref, twin, softcap=case["softcap"] > 0, slack=ulp,
                             mean_slack=mean_ulp)
    assert_lse_matches("lse", lse, ref_lse)
    if case["entry"] != "func":
        return
    g = torch.randn_like(out)
    grads = _grads(out, leaves, g)
    want = _reference_grads(lambda a, b, c: rm.attention_dense(a, b, c, **kw)[0], (q, k, v), g, lowp=False)
    base = _fp32_backward_twin(q, k, v, out.detach(), g, softmax_scale=scale, **kw)
    for name, got, w, b in zip("qkv", grads, want, base):
        # As for the output, one ulp of the largest gradient on top: P recomputed from an fp32
        # LSE of magnitude ~2e3 (ulp 2.4e-4) sits a rounding step off the twin's on the top keys
        # (H100 2026-12-07 13:08 UTC: fp16 dv max err 0.0083 against a bound of 2 x 0.00195 +
        # 0.0040 = 0.0079, 5 % over). A wrong key or an overflow is off by O(1) and still fails.
        ulp_grad = torch.finfo(got.dtype).eps * w.abs().max().item()
        assert_grad_matches(f"d{name}", got, w, b, softcap=case["softcap"] > 0, extra=ulp_grad)


# ---------------------------------------------------------------------------------------------
# Rows without any key


def _empty_rows_check(out, lse, ref_lse, *, lse_dim_rows):
    """out rows whose reference LSE is +inf must be exactly 0, and their LSE +inf."""
    empty = torch.isinf(ref_lse).to(lse.device)
    assert empty.any(), "the case must contain rows without keys"
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] > 0).all(), "empty rows must have LSE +inf"
    rows = lse_dim_rows(empty)
    assert (out[rows.expand_as(out)] == 0).all(), "rows without keys must be exactly 0"


EMPTY = [dict(entry=e, num_splits=n) for e, n in [("varlen", 1), ("varlen", 3), ("func", 3), ("kvcache", 1),
                                                  ("kvcache", 3), ("paged", 0)]]
EMPTY_TINY = [dict(entry=e, num_splits=n) for e, n in [("varlen", 1), ("kvcache", 2), ("paged", 1)]]
EMPTY_GPU = [dict(entry=e, num_splits=n, big=True) for e, n in [("varlen", 1), ("func", 0), ("paged", 0)]]


@pytest.mark.parametrize("backend,case", per_backend(EMPTY, EMPTY_TINY, EMPTY_GPU))
def test_rows_without_keys(fa, case, device):
    """Empty key sequences, causal rows above the diagonal (seqlen_q > seqlen_k) and an empty
    cache row, through the unsplit and split paths: out 0, LSE +inf, and (varlen) dq 0 there."""
    scale = 8 if case.get("big") else 1
    entry = case["entry"]
    dtype = torch.bfloat16
    if entry == "varlen":
        lens_q, lens_k = [7 * scale, 3 * scale, 5 * scale], [0, 9 * scale, 2 * scale]
        q = randn(sum(lens_q), 4, 32, dtype=dtype, device=device)
        k = randn(sum(lens_k), 2, 32, dtype=dtype, device=device)
        v = randn(sum(lens_k), 2, 32, dtype=dtype, device=device)
        cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = fa.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                             num_splits=case["num_splits"], return_attn_probs=True)
        ref, ref_lse = rm.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
        lowp, _ = rm.attention_varlen(q, k, v, cu_q, cu_k, causal=True, lowp=True)
        _empty_rows_check(out, lse, ref_lse, lse_dim_rows=lambda e: e.any(0)[:, None, None])
        assert_matches_reference("out", out, ref, lowp)
        dq, dk, dv = _grads(out, leaves, torch.randn_like(out))
        empty_q = torch.isinf(ref_lse).any(0).to(device)
        assert (dq[empty_q] == 0).all(), "dq of rows without keys must be 0"
        assert all(torch.isfinite(t).all() for t in (dq, dk, dv)), "gradients must be finite"
        return
    if entry == "func":
        q = randn(2, 40 * scale, 4, 32, dtype=dtype, device=device)
        k = randn(2, 9 * scale, 2, 32, dtype=dtype, device=device)
        v = randn(2, 9 * scale, 2, 32, dtype=dtype, device=device)
        out, lse = fa.flash_attn_func(q, k, v, causal=True, num_splits=case["num_splits"], return_attn_probs=True)
        ref, ref_lse = rm.attention_dense(q, k, v, causal=True)
        lowp, _ = rm.attention_dense(q, k, v, causal=True, lowp=True)
        _empty_rows_check(out, lse, ref_lse, lse_dim_rows=lambda e: e.transpose(1, 2)[..., None])
        assert_matches_reference("out", out, ref, lowp)
        return
    # flash_attn_with_kvcache: row 0 has an empty cache, row 1 fewer keys than queries (causal).
    seqlen_q, capacity = 4 * scale, 24 * scale
    k_rows = randn(3, capacity, 2, 32, dtype=dtype, device=device)
    v_rows = randn(3, capacity, 2, 32, dtype=dtype, device=device)
    page_table = None
    if entry == "paged":
        (k_rows, v_rows), page_table = paged_copy(k_rows, v_rows, page_size=3)
    lens = torch.tensor([0, 2 * scale, capacity], dtype=torch.int32, device=device)
    q = randn(3, seqlen_q, 4, 32, dtype=dtype, device=device)
    args = dict(q=q, k_cache=k_rows, v_cache=v_rows, cache_seqlens=lens, page_table=page_table, causal=True)
    out, lse, *_ = fa.flash_attn_with_kvcache(**args, num_splits=case["num_splits"], return_softmax_lse=True)
    ref, ref_lse, _, _ = rm.attention_kvcache(**args)
    lowp, _, _, _ = rm.attention_kvcache(**args, lowp=True)
    _empty_rows_check(out, lse, ref_lse, lse_dim_rows=lambda e: e.transpose(1, 2)[..., None])
    assert_matches_reference("out", out, ref, lowp)


# ---------------------------------------------------------------------------------------------
# fp8 at its saturation point


def _extreme_fp8(*shape, device):
    """fp8 e4m3 values of magnitude 256..448 (the top binade) with random signs."""
    magnitude = 256 + torch.rand(*shape, device=device) * (FP8_MAX - 256)
    sign = torch.randint(0, 2, shape, device=device) * 2 - 1
    return (magnitude * sign).to(torch.bfloat16).to(FP8)


FP8_SAT = [dict(entry=e, causal=c) for e, c in [("func", False), ("func", True), ("paged", True),
                                                ("append_rotary", True), ("append_rotary", False)]]
FP8_SAT_SHAPES = dict(seqlen_q=33, seqlen_k=70, d=64)
FP8_SAT_TINY = [dict(entry=e, causal=True, seqlen_q=s, seqlen_k=20, d=32)
                for e, s in [("func", 9), ("append_rotary", 1)]]
FP8_SAT_GPU = [dict(entry=e, causal=True, seqlen_q=sq, seqlen_k=4097, d=128)
               for e, sq in [("func", 4097), ("paged", 1), ("append_rotary", 1), ("append_rotary", 129)]]


@pytest.mark.parametrize("backend,case", per_backend([dict(c, **FP8_SAT_SHAPES) for c in FP8_SAT], FP8_SAT_TINY,
                                                    FP8_SAT_GPU))
def test_fp8_at_saturation(fa, case, device):
    """q, k, v all at |x| 256..448 with descales up to 2: q.k reaches 448^2 * d * 4 (6e7 at
    d = 64, far past fp16's 65504; softmax_scale brings the scores back to O(1)). With rotary,
    the rotated new keys and q reach sqrt(2) * 448: officially (cvt.rn.satfinite) and here they
    saturate to +-448 in the cache, never NaN."""
    batch, seqlen_q, seqlen_k, d = 2, case["seqlen_q"], case["seqlen_k"], case["d"]
    heads, heads_kv = 4, 2
    q = _extreme_fp8(batch, seqlen_q, heads, d, device=device)
    q_descale, k_descale, v_descale = descales(batch, heads_kv, device)
    scale = 4.0 / (FP8_MAX ** 2 * math.sqrt(d))
    kw = dict(causal=case["causal"], softmax_scale=scale, q_descale=q_descale, k_descale=k_descale,
              v_descale=v_descale)
    if case["entry"] == "func":
        k = _extreme_fp8(batch, seqlen_k, heads_kv, d, device=device)
        v = _extreme_fp8(batch, seqlen_k, heads_kv, d, device=device)
        out, lse = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        ref, ref_lse = rm.attention_dense(q, k, v, **kw)
        lowp, _ = rm.attention_dense(q, k, v, lowp=True, **kw)
        assert_matches_reference("out", out, ref, lowp, fp8=True)
        assert_lse_matches("lse", lse, ref_lse)
        return
    k_rows = _extreme_fp8(batch, seqlen_k + seqlen_q, heads_kv, d, device=device)
    v_rows = _extreme_fp8(batch, seqlen_k + seqlen_q, heads_kv, d, device=device)
    lens = torch.tensor([seqlen_k, seqlen_k // 2], dtype=torch.int32, device=device)
    if case["entry"] == "paged":
        (k_cache, v_cache), page_table = paged_copy(k_rows, v_rows, page_size=16)
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lens, page_table=page_table, **kw)
        out, lse, *_ = fa.flash_attn_with_kvcache(**dict(args, k_cache=k_cache.clone(), v_cache=v_cache.clone()),
                                                  return_softmax_lse=True)
        ref, ref_lse, _, _ = rm.attention_kvcache(**args)
        lowp, _, _, _ = rm.attention_kvcache(**args, lowp=True)
        assert_matches_reference("out", out, ref, lowp, fp8=True)
        assert_lse_matches("lse", lse, ref_lse)
        return
    # Rotary pairs at angles near 45 degrees: |x1 c - x2 s| and |x1 s + x2 c| reach sqrt(2) * 448.
    k_new = _extreme_fp8(batch, seqlen_q, heads_kv, d, device=device)
    v_new = _extreme_fp8(batch, seqlen_q, heads_kv, d, device=device)
    angle = math.pi / 4 + 0.2 * torch.rand(seqlen_k + seqlen_q, d // 2, device=device) - 0.1
    cos, sin = torch.cos(angle).to(torch.bfloat16), torch.sin(angle).to(torch.bfloat16)
    k_cache, v_cache = k_rows.clone(), v_rows.clone()
    try:
        out, lse, *_ = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                                  cache_seqlens=lens, rotary_interleaved=True,
                                                  return_softmax_lse=True, **kw)
    except (ValueError, TypeError) as refusal:
        pytest.skip(f"fp8 with rotary refused: {refusal}")

    def saturated_rotation(x, per_token):
        """Rotated in fp32 (spec sec 5), then saturated to +-448 and rounded to fp8."""
        steps = torch.arange(x.shape[1], device=device) if per_token else torch.zeros(x.shape[1], device=device)
        return torch.stack([rm.apply_rotary(x[b].float(), cos, sin, int(lens[b]) + steps.long(), True)
                            for b in range(batch)]).clamp(-FP8_MAX, FP8_MAX).to(FP8)

    k_sat = saturated_rotation(k_new, True)
    q_sat = saturated_rotation(q, case["causal"])
    ref, ref_lse, k_want, v_want = rm.attention_kvcache(q_sat, k_rows, v_rows, k_sat, v_new, cache_seqlens=lens,
                                                        **kw)
    lowp, _, _, _ = rm.attention_kvcache(q_sat, k_rows, v_rows, k_sat, v_new, cache_seqlens=lens, lowp=True, **kw)
    assert not torch.isnan(k_cache.float()).any(), "a saturating rotation must never give NaN"
    assert torch.equal(_bits(v_cache), _bits(v_want)), "v_cache differs from the expected append"
    # One fp8 step (2^-3 relative) of slack: an FMA in the kernel may round the fp32 product
    # differently, and 3 mantissa bits turn that into a whole step at a tie.
    diff = (k_cache.float() - k_want.float()).abs()
    assert (diff <= k_want.float().abs() / 8 + 2.0 ** -9).all(), (
        f"k_cache differs from the saturated rotation by up to {diff.max().item():.3g}")
    assert_matches_reference("out", out, ref, lowp, fp8=True)
    assert_lse_matches("lse", lse, ref_lse)

"""The public calls over random combinations of their features (hypothesis), on every backend.

The parametrized cases of test_kvcache.py and test_flash_attn.py pick combinations by hand; here
hypothesis draws them. flash_attn_with_kvcache: cache layout (contiguous, pages of 1 / 3 / 16),
masks (causal, window, chunk), rotary (none, part or all of d, interleaved or not,
rotary_seqlens), cache_batch_idx, cache_leftpad, varlen q with packed new tokens, cache_seqlens as
an int, head shapes, dv != d, qv, sinks, softcap, fp16 / bf16 / fp8 and the split count.
flash_attn_varlen_func (forward, and backward without sinks): lengths with empty sequences on
either side, seqused_q / seqused_k, head shapes, dv != d, masks, softcap, sinks. flash_attn_func:
the same on dense batches, with num_splits and pack_gqa.
Each call must either match the float64 reference by the spec's rule (and, for kvcache, leave the
caches as test_kvcache's rules say) or refuse with a ValueError / TypeError / NotImplementedError
that says what it refuses, leaving both caches as they were.

Under CI=true the examples are derandomized (the same ones every run, so a red CI is never luck);
elsewhere each run draws new ones. A failure prints the drawn case and seed, which replay it
through _kv_inputs / _varlen_inputs after torch.manual_seed(seed).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_math as rm
from conftest import BACKENDS, DEVICE, interpreted
from inputs import FP8
from test_flash_attn import _case, _chunk, _qkv, _used, _varlen_case, _varlen_inputs, _window
from test_kvcache import _check_call, _kv_case, _kv_inputs
from tolerance import assert_grad_matches, assert_lse_matches, assert_matches_reference

import flash_attn_interface

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


@st.composite
def kv_cases(draw, tiny: bool):
    """A _kv_case with every feature drawn; tiny keeps the interpreter's work small."""
    d = draw(st.sampled_from([16, 32] if tiny else [16, 32, 64]))
    seqlen_q = draw(st.integers(1, 4 if tiny else 9))
    # qv (absorbed MLA) needs head_dim_v >= 256
    qv = draw(st.sampled_from([False, False, True]))
    case = _kv_case(
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, FP8])),
        seqlen_q=seqlen_q,
        # room for the new tokens and, with rotary, a table row for every q position
        capacity=draw(st.integers(2 * seqlen_q + 2, 20 if tiny else 48)),
        d=d,
        dv=256 if qv else draw(st.sampled_from([None, 16, 32])),
        qv=qv,
        heads=draw(st.sampled_from(["mha", "gqa", "mqa"])),
        batch=draw(st.integers(1, 2 if tiny else 3)),
        page_size=draw(st.sampled_from([None, 1, 3, 16])),
        new_kv=draw(st.booleans()),
        new_eq_q=draw(st.booleans()),
        rotary=draw(st.sampled_from([0.0, 0.5, 1.0])),
        interleaved=draw(st.booleans()),
        rotary_seqlens=draw(st.booleans()),
        leftpad=draw(st.booleans()),
        batch_idx=draw(st.booleans()),
        varlen_q=draw(st.booleans()),
        causal=draw(st.booleans()),
        local=draw(st.booleans()),
        chunk=draw(st.booleans()),
        int_seqlens=draw(st.booleans()),
        sinks=draw(st.booleans()),
        softcap=draw(st.sampled_from([0.0, 0.0, 8.0])),
    )
    return case, draw(st.sampled_from([0, 1, 2])), draw(st.integers(0, 2**31 - 1))


def _one_kvcache_call(backend: str, case: dict, num_splits: int, seed: int, monkeypatch) -> None:
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", backend)
    torch.manual_seed(seed)
    args = _kv_inputs(case, DEVICE)
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    try:
        flash_attn_interface.flash_attn_with_kvcache(**dict(args, k_cache=k_cache, v_cache=v_cache),
                                                     num_splits=num_splits)
    except (ValueError, TypeError, NotImplementedError) as refusal:
        # A refusal names what it refuses, and comes before anything is written.
        assert len(str(refusal)) > 20, f"unclear refusal: {refusal!r}"
        assert torch.equal(k_cache, args["k_cache"]), f"k_cache written before: {refusal}"
        assert torch.equal(v_cache, args["v_cache"]), f"v_cache written before: {refusal}"
        return
    # Accepted: the answer and the caches must be right (a second call, on fresh copies).
    _check_call(flash_attn_interface, args, fp8=case["dtype"] == FP8, softcap=case["softcap"] > 0,
                num_splits=num_splits)


def _run_examples(backend: str, cases, one_call, monkeypatch) -> None:
    """one_call(backend, *drawn, monkeypatch) for each drawn example; the interpreter gets fewer,
    smaller ones."""
    tiny = interpreted(backend)

    # Health checks judge generation speed and fixture use, not the code under test: interpreted
    # kernels are slow by design, and monkeypatch only sets the backend's variable.
    @settings(max_examples=15 if tiny else 40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(drawn=cases(tiny))
    def check(drawn):
        one_call(backend, *drawn, monkeypatch)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_random_feature_combinations(backend, monkeypatch):
    _run_examples(backend, kv_cases, _one_kvcache_call, monkeypatch)


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func: the same property for the prefill forward


def _attention_fields(draw, tiny: bool):
    """(longest q, longest k, the prefill case fields both layouts share): dtype, head dims,
    head shape, masks, softcap."""
    d = draw(st.sampled_from([8, 16, 32] if tiny else [8, 16, 32, 64]))
    fields = dict(
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        d=d,
        dv=draw(st.sampled_from([None, None, 2 * d])),
        heads=draw(st.sampled_from(["mha", "gqa", "mqa"])),
        causal=draw(st.booleans()),
        local=draw(st.booleans()),
        chunk=draw(st.booleans()),
        softcap=draw(st.sampled_from([0.0, 0.0, 8.0])),
    )
    return draw(st.integers(1, 12 if tiny else 40)), draw(st.integers(1, 16 if tiny else 60)), fields


@st.composite
def varlen_cases(draw, tiny: bool):
    max_q, max_k, fields = _attention_fields(draw, tiny)
    case = _varlen_case(
        max_q=max_q,
        max_k=max_k,
        batch=draw(st.integers(1, 3)),
        **fields,
        unused=draw(st.booleans()),
        zero_q=draw(st.booleans()),
        zero_k=draw(st.booleans()),
    )
    return case, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _varlen_call(case: dict, sinks: bool, seed: int):
    """(q, k, v, cu_q, cu_k, max_q, max_k, seqused, masks) of one drawn example: inputs fresh from
    the seed, then the window and chunk drawn for max_k, then the sinks."""
    torch.manual_seed(seed)
    q, k, v, cu_q, cu_k, seqused_q, seqused_k, max_q, max_k = _varlen_inputs(case, DEVICE)
    kw = dict(causal=case["causal"], window_size=_window(case, max_k),
              attention_chunk=_chunk(case, max_k), softcap=case["softcap"])
    if sinks:
        kw["sinks"] = torch.randn(q.shape[1], device=DEVICE) * 2
    return q, k, v, cu_q, cu_k, max_q, max_k, dict(seqused_q=seqused_q, seqused_k=seqused_k), kw


def _one_varlen_call(backend: str, case: dict, sinks: bool, seed: int, monkeypatch) -> None:
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", backend)
    q, k, v, cu_q, cu_k, max_q, max_k, lens, kw = _varlen_call(case, sinks, seed)
    try:
        out, lse = flash_attn_interface.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **lens, **kw)
    except (ValueError, TypeError, NotImplementedError) as refusal:
        assert len(str(refusal)) > 20, f"unclear refusal: {refusal!r}"
        return
    ref, ref_lse = rm.attention_varlen(q, k, v, cu_q, cu_k, **lens, **kw)
    lowp, _ = rm.attention_varlen(q, k, v, cu_q, cu_k, lowp=True, **lens, **kw)
    used = _used(cu_q, lens["seqused_q"], q.shape[0])
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_matches_reference("out", out, ref, lowp, rows=used, softcap=case["softcap"] > 0)
    assert_lse_matches("lse", lse, ref_lse, rows=used)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_random_feature_combinations(backend, monkeypatch):
    _run_examples(backend, varlen_cases, _one_varlen_call, monkeypatch)


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func backward: dq, dk, dv of random combinations


def _one_varlen_backward(backend: str, case: dict, _sinks: bool, seed: int, monkeypatch) -> None:
    """Without sinks. With a sink, a single key keeps P < 1, and delta = rowsum(dO * O), taken
    from O rounded to the input dtype as in FA3, then cancels against dP: dk off by ~0.04 at
    |dk| 0.14, bf16, |v| 4.5, on both backends alike (1 of 800 draws), an error the
    input-precision reference does not make. test_flash_attn covers sinks in the backward at
    real sizes."""
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", backend)
    q, k, v, cu_q, cu_k, max_q, max_k, lens, kw = _varlen_call(case, False, seed)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    try:
        out = flash_attn_interface.flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k,
                                                          **lens, **kw)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, g)
    except (ValueError, TypeError, NotImplementedError) as refusal:
        # attention_chunk has no official backward: it must say so, never give a gradient
        assert len(str(refusal)) > 20, f"unclear refusal: {refusal!r}"
        return

    def reference(lowp):
        leaves_ref = [t.detach().to(t.dtype if lowp else torch.float64).requires_grad_()
                      for t in (q, k, v)]
        out_ref, _ = rm.attention_varlen(*leaves_ref, cu_q, cu_k, lowp=lowp, **lens, **kw)
        grads_ref = torch.autograd.grad(out_ref, leaves_ref, g.to(out_ref.dtype), allow_unused=True)
        return out_ref.detach(), grads_ref

    exact_out, exact = reference(False)
    # delta = rowsum(dO * O) from O rounded to the input dtype, as FA3 computes it (and both our
    # backends): dS = P (dP - delta) carries that rounding into dq = scale * sum_j dS_j k_j, at
    # most |delta error| * max|k| * scale since P sums to 1. The low-precision twin takes delta
    # from autograd, so the bound adds it (bf16, d = 8, two query rows: 0.0088 against 0.0083).
    rounded = exact_out.to(q.dtype).to(torch.float64)
    delta_err = (g.to(torch.float64) * (rounded - exact_out)).sum(-1).abs()
    dq_extra = (delta_err.max().item() * k.abs().max().item() * q.shape[-1] ** -0.5
                if delta_err.numel() and k.numel() else 0.0)
    for name, got, want, base in zip("qkv", grads, exact, reference(True)[1]):
        if want is None:  # no row reaches this input (every sequence empty): its gradient is 0
            want = base = torch.zeros_like(got, dtype=torch.float64)
        assert_grad_matches(f"d{name}", got, want, base, softcap=case["softcap"] > 0,
                            extra=dq_extra if name == "q" else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_backward_random_feature_combinations(backend, monkeypatch):
    _run_examples(backend, varlen_cases, _one_varlen_backward, monkeypatch)


# ---------------------------------------------------------------------------------------------
# flash_attn_func: dense batches, with the speed-only knobs (num_splits, pack_gqa) drawn too


@st.composite
def dense_cases(draw, tiny: bool):
    seqlen_q, seqlen_k, fields = _attention_fields(draw, tiny)
    case = _case(seqlens=(seqlen_q, seqlen_k), batch=draw(st.integers(1, 2)), **fields)
    knobs = dict(num_splits=draw(st.sampled_from([0, 1, 3])),
                 pack_gqa=draw(st.sampled_from([None, False, True])))
    return case, knobs, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _one_dense_call(backend: str, case: dict, knobs: dict, sinks: bool, seed: int,
                    monkeypatch) -> None:
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", backend)
    torch.manual_seed(seed)
    q, k, v = _qkv(case, DEVICE)
    kw = dict(causal=case["causal"], window_size=_window(case, k.shape[1]),
              attention_chunk=_chunk(case, k.shape[1]), softcap=case["softcap"])
    if sinks:
        kw["sinks"] = torch.randn(q.shape[2], device=DEVICE) * 2
    try:
        out, lse = flash_attn_interface.flash_attn_func(q, k, v, return_attn_probs=True, **knobs,
                                                        **kw)
    except (ValueError, TypeError, NotImplementedError) as refusal:
        assert len(str(refusal)) > 20, f"unclear refusal: {refusal!r}"
        return
    ref, ref_lse = rm.attention_dense(q, k, v, **kw)
    lowp, _ = rm.attention_dense(q, k, v, lowp=True, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_matches_reference("out", out, ref, lowp, softcap=case["softcap"] > 0)
    assert_lse_matches("lse", lse, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_random_feature_combinations(backend, monkeypatch):
    _run_examples(backend, dense_cases, _one_dense_call, monkeypatch)

"""The planned fast path of flash_attn_with_kvcache (backends/triton/step.py) against the slow path.

A repeat call with the layout of an earlier validated one replays a plan: no validation, no
dispatch, launches with fixed arguments. Its contract: outputs and caches bit for bit those of
the slow path (plans off) for every feature the plan covers; a call with any other layout is
validated again before anything is written; a pointer with another 16-byte residue (Triton
compiled for the planned alignment) falls back to the slow path; aliasing roles get no plan; a
plan keeps no tensor alive.
"""

import gc
import importlib
import os
import weakref

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flash_attn_interface as fa  # noqa: E402
from flash_attn_3 import checks, interface, ops  # noqa: E402

step_mod = importlib.import_module("flash_attn_3.backends.triton.step")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    interface._KVCACHE_PLANS.clear()
    yield
    interface._KVCACHE_PLANS.clear()


def _problem(batch=2, hq=4, hk=2, d=32, capacity=96, page=0, append=False, rotary=False, batch_idx=False,
             leftpad=False, sinks=False, lse=False, aliased_kv=False, seqlen_new=1, interleaved=False,
             rot_seqlens=False, **scalars):
    """Tensors and keywords of one flash_attn_with_kvcache call; caches under 'k_cache', 'v_cache'."""
    dt = torch.bfloat16
    rows = batch + 1 if batch_idx else batch
    if page:
        pages_per_row = -(-capacity // page)
        num_pages = rows * pages_per_row + 3
        cache_shape = (num_pages, page, hk, d)
        page_table = torch.randperm(num_pages, device=DEVICE)[:rows * pages_per_row].view(rows, -1).to(torch.int32)
    else:
        cache_shape, page_table = (rows, capacity, hk, d), None
    if aliased_kv:  # vLLM's layout: K and V caches are views of one tensor
        kv = torch.randn(2, *cache_shape, device=DEVICE, dtype=dt)
        k_cache, v_cache = kv[0], kv[1]
    else:
        k_cache = torch.randn(cache_shape, device=DEVICE, dtype=dt)
        v_cache = torch.randn(cache_shape, device=DEVICE, dtype=dt)
    lo = capacity // 3
    kw = dict(
        q=torch.randn(batch, 1, hq, d, device=DEVICE, dtype=dt), k_cache=k_cache, v_cache=v_cache,
        cache_seqlens=torch.randint(lo, capacity - 2, (batch,), dtype=torch.int32, device=DEVICE),
        page_table=page_table, return_softmax_lse=lse, **scalars,
    )
    if append:
        kw["k"] = torch.randn(batch, seqlen_new, hk, d, device=DEVICE, dtype=dt)
        kw["v"] = torch.randn(batch, seqlen_new, hk, d, device=DEVICE, dtype=dt)
    if rotary:
        angle = torch.rand(capacity, d // 4, device=DEVICE) * 6.28
        kw.update(rotary_cos=torch.cos(angle).to(dt), rotary_sin=torch.sin(angle).to(dt),
                  rotary_interleaved=interleaved)
        if rot_seqlens:
            kw["rotary_seqlens"] = torch.randint(0, capacity - 1, (batch,), dtype=torch.int32, device=DEVICE)
    if batch_idx:
        kw["cache_batch_idx"] = torch.randperm(rows, device=DEVICE)[:batch].to(torch.int32)
    if leftpad:
        kw["cache_leftpad"] = torch.randint(0, lo, (batch,), dtype=torch.int32, device=DEVICE)
    if sinks:
        kw["sinks"] = torch.randn(hq, device=DEVICE)
    return kw


def _fresh(kw):
    """The call's keywords with caches cloned (appends write into them) and q at a new address."""
    out = dict(kw)
    for name in ("k_cache", "v_cache", "q", "cache_seqlens"):
        out[name] = kw[name].clone()
    return out


def _slow(kw, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(ops, "kvcache_plan", lambda *args: None)
        interface._KVCACHE_PLANS.clear()
        call = _fresh(kw)
        result = fa.flash_attn_with_kvcache(**call)
        interface._KVCACHE_PLANS.clear()
    return result, call


def _same(result, call, expected, expected_call):
    got = result if isinstance(result, tuple) else (result,)
    want = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w)
    for name in ("k_cache", "v_cache", "cache_seqlens"):
        assert torch.equal(call[name], expected_call[name]), name


def _plan_of(kw):
    plans = [p for p in interface._KVCACHE_PLANS.values() if p is not None]
    return plans[0] if plans else None


CASES = {
    "attend": dict(),
    "attend-split-lse": dict(num_splits=3, lse=True),
    "append": dict(append=True, causal=True),
    "append-paged-rotary-split": dict(append=True, page=8, rotary=True, causal=True, num_splits=2, lse=True),
    "append-batchidx-leftpad-window-softcap-sinks": dict(
        append=True, batch_idx=True, leftpad=True, window_size=(20, 0), softcap=5.0, sinks=True),
    "aliased-kv-views": dict(aliased_kv=True, append=True, causal=True),
    "append-interleaved-rotary-seqlens-noncausal": dict(
        append=True, rotary=True, interleaved=True, rot_seqlens=True, num_splits=2, leftpad=True),
    "append-two-tokens-rotary": dict(append=True, seqlen_new=2, rotary=True, causal=True, page=4),
}


def _replays_slow_path_bit_for_bit(kw, monkeypatch):
    expected, expected_call = _slow(kw, monkeypatch)
    first = _fresh(kw)
    _same(fa.flash_attn_with_kvcache(**first), first, expected, expected_call)
    assert _plan_of(kw) is not None
    # The replay skips validation: a check that runs now fails the test.
    with monkeypatch.context() as m:
        m.setattr(checks, "check_attention_inputs", lambda *a, **k: pytest.fail("replay validated"))
        for _ in range(2):
            again = _fresh(kw)
            _same(fa.flash_attn_with_kvcache(**again), again, expected, expected_call)


def _fuse(monkeypatch, on: bool):
    monkeypatch.setattr(step_mod, "FUSE_APPEND", on)
    interface._KVCACHE_PLANS.clear()


@pytest.mark.parametrize("fuse", [False, True], ids=["two-launch-append", "fused-append"])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_replays_the_slow_path_bit_for_bit(case, fuse, monkeypatch):
    _fuse(monkeypatch, fuse)
    _replays_slow_path_bit_for_bit(_problem(**CASES[case]), monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capacity,page,append", [(1024, 0, False), (1024, 0, True), (4096, 0, True),
                                                  (4096, 16, True), (65536, 0, False)])
@pytest.mark.parametrize("fuse", [False, True], ids=["two-launch-append", "fused-append"])
def test_plan_replays_the_slow_path_bit_for_bit_gpu(capacity, page, append, fuse, monkeypatch):
    _fuse(monkeypatch, fuse)
    kw = _problem(batch=1, hq=32, hk=8, d=128, capacity=capacity, page=page, append=append, causal=True)
    _replays_slow_path_bit_for_bit(kw, monkeypatch)


@pytest.mark.parametrize("case,launches", [("append", 1), ("append-paged-rotary-split", 1),
                                           ("append-two-tokens-rotary", 2)])
def test_a_one_token_append_is_one_launch(case, launches, monkeypatch):
    """A one-token step plans one launch (the decode kernel writes the token: decode.Append);
    longer appends keep append_kv's launch before it. With fusion off the same step plans two
    launches and gives the same bits (the slow path never fuses)."""
    _fuse(monkeypatch, True)
    kw = _problem(**CASES[case])
    fa.flash_attn_with_kvcache(**_fresh(kw))
    assert len(_plan_of(kw).bounds) == launches
    monkeypatch.setattr(step_mod, "FUSE_APPEND", False)
    interface._KVCACHE_PLANS.clear()
    _replays_slow_path_bit_for_bit(kw, monkeypatch)
    assert len(_plan_of(kw).bounds) == 2


def test_other_layouts_are_validated_before_anything_is_written(monkeypatch):
    kw = _problem(append=True, causal=True)
    fa.flash_attn_with_kvcache(**_fresh(kw))
    assert _plan_of(kw) is not None
    bad = _fresh(kw)
    bad["cache_seqlens"] = bad["cache_seqlens"].long()
    before = bad["k_cache"].clone()
    with pytest.raises(TypeError, match="cache_seqlens"):
        fa.flash_attn_with_kvcache(**bad)
    assert torch.equal(bad["k_cache"], before)
    bad = _fresh(kw)
    bad["k"] = bad["k"][:, :, :1]
    with pytest.raises(ValueError):
        fa.flash_attn_with_kvcache(**bad)
    assert torch.equal(bad["k_cache"], before)


def test_another_alignment_takes_the_slow_path(monkeypatch):
    kw = _problem(append=True, causal=True)
    fa.flash_attn_with_kvcache(**_fresh(kw))
    assert _plan_of(kw) is not None
    base = torch.empty(kw["q"].numel() + 8, device=DEVICE, dtype=kw["q"].dtype)
    shifted = dict(kw, q=base[1:1 + kw["q"].numel()].view(kw["q"].shape))  # 2 bytes past a 16-byte line
    shifted["q"].copy_(kw["q"])
    expected, expected_call = _slow(shifted, monkeypatch)
    fa.flash_attn_with_kvcache(**_fresh(kw))  # the aligned layout's plan is back in place
    validations = []
    original = checks.check_attention_inputs
    monkeypatch.setattr(checks, "check_attention_inputs", lambda *a, **k: validations.append(1) or original(*a, **k))
    call = _fresh(shifted)
    call["q"] = shifted["q"]
    _same(fa.flash_attn_with_kvcache(**call), call, expected, expected_call)
    assert validations == [1]  # the plan declined; the slow path ran


def test_aliasing_roles_get_no_plan_and_the_right_result(monkeypatch):
    kw = _problem(append=False, causal=True)
    kw["v_cache"] = kw["k_cache"]
    expected, expected_call = _slow(kw, monkeypatch)
    call = dict(kw)
    _same(fa.flash_attn_with_kvcache(**call), call, expected, expected_call)
    assert list(interface._KVCACHE_PLANS.values()) == [None]


def test_a_plan_keeps_no_tensor_alive():
    kw = _fresh(_problem(append=True, rotary=True, causal=True, num_splits=2))
    fa.flash_attn_with_kvcache(**kw)
    assert _plan_of(kw) is not None
    refs = [weakref.ref(t) for t in kw.values() if isinstance(t, torch.Tensor)]
    del kw
    gc.collect()
    assert all(ref() is None for ref in refs)

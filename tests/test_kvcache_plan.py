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


# Adversarial calls from the review of the fast path (docs/perf-notes.md, review section).


def test_a_bad_softmax_scale_raises_before_the_append_writes():
    """softmax_scale was converted to a float only by the attention half, which ran after
    append_kv had written the cache: the call raised with the new token already stored. (Such a
    scale gets no plan key: this is the slow path's order.)"""
    for scale in ([0.1], "not a number", torch.tensor([0.1, 0.2])):
        kw = _fresh(_problem(append=True, causal=True))
        before = kw["k_cache"].clone(), kw["v_cache"].clone()
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            fa.flash_attn_with_kvcache(**dict(kw, softmax_scale=scale))
        assert torch.equal(kw["k_cache"], before[0]) and torch.equal(kw["v_cache"], before[1]), scale


def test_q_none_is_refused_as_on_the_slow_path():
    kw = _problem()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fa.flash_attn_with_kvcache(**dict(kw, q=None))


@pytest.mark.parametrize("change", ["noncontiguous-q", "expanded-seqlens", "list-window", "int-flags"])
def test_normalized_inputs_replay_the_slow_path(change, monkeypatch):
    """Inputs the interface rewrites before the kernels see them: a q whose last dimension is
    strided (copied), cache_seqlens broadcast from one value (copied), window_size as a list,
    flags given as ints. Every call, planned or not, matches the slow path bit for bit."""
    kw = _problem(append=True, rotary=True, causal=change != "list-window", num_splits=2)
    if change == "noncontiguous-q":
        wide = torch.randn(*kw["q"].shape[:-1], 2 * kw["q"].shape[-1], device=DEVICE, dtype=kw["q"].dtype)
        kw["q"] = wide[..., ::2]
    elif change == "expanded-seqlens":
        kw["cache_seqlens"] = kw["cache_seqlens"][:1].expand(kw["q"].shape[0])
    elif change == "list-window":
        kw["window_size"] = [20, 0]
    else:
        kw.update(causal=1, return_softmax_lse=1)
    expected, expected_call = _slow(kw, monkeypatch)
    for _ in range(3):
        call = _fresh(kw)
        if change == "noncontiguous-q":
            call["q"] = kw["q"]  # _fresh's clone would make it contiguous
        elif change == "expanded-seqlens":
            call["cache_seqlens"] = kw["cache_seqlens"].clone()[:1].expand(kw["q"].shape[0])
        _same(fa.flash_attn_with_kvcache(**call), call, expected, expected_call)
    if change == "list-window":
        assert _plan_of(kw) is not None  # a list is the same window as a tuple: it gets a plan


def test_cache_lengths_changed_in_place_between_replays(monkeypatch):
    """A serving loop bumps cache_seqlens in place: each replay reads the lengths of its own
    call on the device, never those of the call that made the plan."""
    kw = _fresh(_problem(append=True, causal=True, num_splits=2))
    ref = _fresh(kw)
    monkeypatch.setattr(ops, "kvcache_plan", lambda *args: None)
    expected = [fa.flash_attn_with_kvcache(**ref)]
    ref["cache_seqlens"] += 1
    expected.append(fa.flash_attn_with_kvcache(**ref))
    monkeypatch.undo()
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    interface._KVCACHE_PLANS.clear()  # the slow calls above stored "no plan" for this key
    got = [fa.flash_attn_with_kvcache(**kw)]
    kw["cache_seqlens"] += 1
    got.append(fa.flash_attn_with_kvcache(**kw))
    assert _plan_of(kw) is not None
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert torch.equal(kw["k_cache"], ref["k_cache"]) and torch.equal(kw["v_cache"], ref["v_cache"])


def test_a_changed_scheduler_metadata_dtype_is_validated(monkeypatch):
    kw = _problem(append=True, causal=True)
    kw["scheduler_metadata"] = torch.zeros(kw["q"].shape[0] + 1, dtype=torch.int32, device=DEVICE)
    fa.flash_attn_with_kvcache(**_fresh(kw))
    assert _plan_of(kw) is not None
    bad = _fresh(kw)
    bad["scheduler_metadata"] = kw["scheduler_metadata"].long()
    before = bad["k_cache"].clone()
    with pytest.raises(TypeError, match="scheduler_metadata"):
        fa.flash_attn_with_kvcache(**bad)
    assert torch.equal(bad["k_cache"], before)


def test_a_backend_flip_is_not_served_by_the_old_plan(monkeypatch):
    """FLASH_ATTN_3_BACKEND=reference after a triton plan: the reference backend runs (its
    result differs from triton's in the last bits; equality with it proves which one ran)."""
    kw = _problem(append=True, causal=True)
    fa.flash_attn_with_kvcache(**_fresh(kw))
    assert _plan_of(kw) is not None
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "reference")
    interface._KVCACHE_PLANS.clear()
    reference_call = _fresh(kw)
    reference = fa.flash_attn_with_kvcache(**reference_call)  # no triton plan exists yet
    fa.flash_attn_with_kvcache(**_fresh(kw))
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    fa.flash_attn_with_kvcache(**_fresh(kw))  # a triton plan again, beside the reference key
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "reference")
    call = _fresh(kw)
    _same(fa.flash_attn_with_kvcache(**call), call, reference, reference_call)


def test_grad_modes(monkeypatch):
    """requires_grad inputs never replay a plan (it bypasses autograd); no_grad and
    inference_mode calls replay the slow path's bits."""
    kw = _problem(append=True, causal=True)
    expected, expected_call = _slow(kw, monkeypatch)
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            for _ in range(2):
                call = _fresh(kw)
                _same(fa.flash_attn_with_kvcache(**call), call, expected, expected_call)
    grad_call = _fresh(kw)
    grad_call["q"].requires_grad_(True)
    with torch.no_grad():
        _same(fa.flash_attn_with_kvcache(**grad_call), grad_call, expected, expected_call)
    assert [p for p in interface._KVCACHE_PLANS.values() if p is None]  # the requires_grad key has none


def test_dispatch_modes_see_the_custom_ops(monkeypatch):
    """Under a dispatch mode (here torch's FLOP counter) neither the plan nor the direct eager
    call may bypass the custom ops: the mode must see the attention."""
    from torch.utils.flop_counter import FlopCounterMode

    kw = _problem(**CASES[list(CASES)[0]])
    fa.flash_attn_with_kvcache(**_fresh(kw))  # a plan exists now
    seen = []
    real = ops._attention_fwd

    def spy(*args):
        seen.append(True)
        return real(*args)

    monkeypatch.setattr(ops, "_attention_fwd", spy)
    with FlopCounterMode(display=False):
        fa.flash_attn_with_kvcache(**_fresh(kw))
    assert seen, "the call bypassed the custom op under a dispatch mode"

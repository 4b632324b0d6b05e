"""Degenerate sizes through the public API on the triton backend: batch 0, no queries, no keys,
zero-length page tables, no new tokens, no splits. Every output keeps its documented shape; rows
that exist but see no key get out 0 and lse +inf. Both forward kernels (decode.py, fwd.py) run
each forward case.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import DEVICE, HAS_TRITON
from inputs import cu_seqlens, randn

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

H, D = 2, 32
DT = torch.bfloat16


@pytest.fixture(params=["decode", "fwd"])
def fa(request, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    routes = importlib.import_module("flash_attn_3.backends.triton.routes")
    kernel = importlib.import_module(f"flash_attn_3.backends.triton.{request.param}")
    monkeypatch.setattr(routes, "forward_kernel", lambda a: kernel)
    import flash_attn_interface

    return flash_attn_interface


def _r(*shape):
    return randn(*shape, dtype=DT, device=DEVICE)


def _lens(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _assert_no_keys(out, lse, out_shape, lse_shape):
    assert out.shape == out_shape and lse.shape == lse_shape
    assert (out == 0).all() and (lse == float("inf")).all()


@pytest.mark.parametrize("b, sq, sk", [(0, 4, 4), (2, 0, 4)])
def test_func_nothing_to_compute(fa, b, sq, sk):
    out, lse = fa.flash_attn_func(_r(b, sq, H, D), _r(b, sk, H, D), _r(b, sk, H, D),
                                  return_attn_probs=True)
    assert out.shape == (b, sq, H, D) and lse.shape == (b, H, sq)


@pytest.mark.parametrize("causal, splits", [(False, 1), (True, 1), (False, 4)])
def test_func_no_keys(fa, causal, splits):
    out, lse = fa.flash_attn_func(_r(2, 3, H, D), _r(2, 0, H, D), _r(2, 0, H, D), causal=causal,
                                  num_splits=splits, return_attn_probs=True)
    _assert_no_keys(out, lse, (2, 3, H, D), (2, H, 3))


def test_varlen_empty_sides(fa):
    cu_empty, cu_some = _lens(0, 0, 0), cu_seqlens([2, 3], DEVICE)
    out, lse = fa.flash_attn_varlen_func(_r(0, H, D), _r(5, H, D), _r(5, H, D), cu_empty,
                                         cu_some, 0, 3, return_attn_probs=True)
    assert out.shape == (0, H, D) and lse.shape == (H, 0)
    out, lse = fa.flash_attn_varlen_func(_r(5, H, D), _r(0, H, D), _r(0, H, D), cu_some,
                                         cu_empty, 3, 0, causal=True, return_attn_probs=True)
    _assert_no_keys(out, lse, (5, H, D), (H, 5))
    zero = _lens(0)
    out, lse = fa.flash_attn_varlen_func(_r(0, H, D), _r(0, H, D), _r(0, H, D), zero, zero, 0, 0,
                                         return_attn_probs=True)
    assert out.shape == (0, H, D) and lse.shape == (H, 0)


def test_kvcache_empty(fa):
    out, lse, *_ = fa.flash_attn_with_kvcache(_r(0, 1, H, D), _r(0, 8, H, D), _r(0, 8, H, D),
                                              cache_seqlens=_lens(), return_softmax_lse=True)
    assert out.shape == (0, 1, H, D) and lse.shape == (0, H, 1)
    # Empty caches: zero lengths, zero capacity, and page tables with no pages (or no columns).
    for k_cache, extra in [(_r(2, 8, H, D), {}), (_r(2, 0, H, D), {}),
                           (_r(0, 4, H, D), dict(page_table=torch.zeros(2, 0, dtype=torch.int32,
                                                                        device=DEVICE))),
                           (_r(3, 4, H, D), dict(page_table=torch.zeros(2, 0, dtype=torch.int32,
                                                                        device=DEVICE)))]:
        out, lse, *_ = fa.flash_attn_with_kvcache(_r(2, 1, H, D), k_cache, k_cache.clone(),
                                                  cache_seqlens=_lens(0, 0), causal=True,
                                                  return_softmax_lse=True, **extra)
        _assert_no_keys(out, lse, (2, 1, H, D), (2, H, 1))


def test_kvcache_append_nothing(fa):
    """Zero new tokens leave the cache as it was; a batch of 0 with rotary launches nothing."""
    k_cache, v_cache = _r(2, 8, H, D), _r(2, 8, H, D)
    before = k_cache.clone(), v_cache.clone()
    fa.flash_attn_with_kvcache(_r(2, 1, H, D), k_cache, v_cache, k=_r(2, 0, H, D),
                               v=_r(2, 0, H, D), cache_seqlens=_lens(3, 4))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    cos = sin = _r(8, D // 2)
    out = fa.flash_attn_with_kvcache(_r(0, 1, H, D), _r(0, 8, H, D), _r(0, 8, H, D),
                                     k=_r(0, 1, H, D), v=_r(0, 1, H, D), rotary_cos=cos,
                                     rotary_sin=sin, cache_seqlens=_lens())
    assert out.shape == (0, 1, H, D)


def test_combine_no_splits(fa):
    out, lse = fa.flash_attn_combine(torch.randn(0, 2, 3, H, D, device=DEVICE),
                                     torch.randn(0, 2, 3, H, device=DEVICE))
    assert out.shape == (2, 3, H, D) and (out == 0).all()
    assert lse.shape == (2, 3, H) and (lse == float("-inf")).all()


@pytest.mark.parametrize("b, sq, sk", [(0, 4, 4), (2, 0, 4), (2, 3, 0)])
def test_backward_empty(fa, b, sq, sk):
    q, k, v = (_r(b, n, H, D).requires_grad_() for n in (sq, sk, sk))
    out = fa.flash_attn_func(q, k, v, causal=True)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()

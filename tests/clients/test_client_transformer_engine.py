"""What Transformer Engine needs from an installed FA3, checked without building TE.

TE (transformer_engine/pytorch/attention/dot_product_attention/backends.py) reads
``importlib.metadata.version("flash-attn-3")`` when it is imported; if that distribution exists it
imports, at once and without catching ImportError, ``flash_attn_func``, ``flash_attn_varlen_func``,
``flash_attn_with_kvcache``, ``_flash_attn_forward`` and ``_flash_attn_backward`` from
``flash_attn_3.flash_attn_interface``, and treats 3.0.0b < version < 3.0.0 as the old beta API.
Its backend choice then keeps FA3 only on compute capability 9.0, fp16/bf16/fp8, head dims as in
spec section 3, no dropout. The calls below have the shapes TE's FlashAttention module makes.
docs/clients.md has the full list.
"""

from __future__ import annotations

import importlib
from importlib import metadata

import pytest
import torch

import reference_math as ref
from tolerance import assert_matches_reference

packaging_version = pytest.importorskip("packaging.version")


def test_metadata_version_is_a_release_te_reads_as_fa3():
    version = packaging_version.Version(metadata.version("flash-attn-3"))
    assert version >= packaging_version.Version("3.0.0")
    # TE switches to the beta argument list for 3.0.0b < version < 3.0.0.
    assert not packaging_version.Version("3.0.0b") < version < packaging_version.Version("3.0.0")


def test_public_entries_te_imports():
    module = importlib.import_module("flash_attn_3.flash_attn_interface")
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        assert callable(getattr(module, name)), name


def test_private_entries_te_imports_at_import_time():
    module = importlib.import_module("flash_attn_3.flash_attn_interface")
    missing = [n for n in ("_flash_attn_forward", "_flash_attn_backward") if not callable(getattr(module, n, None))]
    assert not missing, missing


def _bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


def _first(output):
    # TE keeps output[0] when it gets a tuple.
    return output[0] if isinstance(output, (list, tuple)) else output


@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (4, 0)])
def test_bshd_call_as_te_makes_it(window):
    import flash_attn_interface as fa

    q, k, v = _bf16(2, 12, 4, 32), _bf16(2, 12, 2, 32), _bf16(2, 12, 2, 32)
    causal = window == (-1, 0)
    out = _first(fa.flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal, window_size=window,
                                    num_splits=1, deterministic=False))
    kw = dict(softmax_scale=0.2, causal=causal, window_size=window)
    assert_matches_reference("bshd", out, ref.attention_dense(q, k, v, **kw)[0],
                             ref.attention_dense(q, k, v, lowp=True, **kw)[0])


def test_thd_call_as_te_makes_it():
    import flash_attn_interface as fa

    lengths = [5, 11, 3]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    q, k, v = _bf16(sum(lengths), 4, 32), _bf16(sum(lengths), 2, 32), _bf16(sum(lengths), 2, 32)
    out = _first(fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), softmax_scale=0.2,
                                           causal=True, window_size=(-1, 0), num_splits=1, deterministic=False))
    kw = dict(softmax_scale=0.2, causal=True)
    assert_matches_reference("thd", out, ref.attention_varlen(q, k, v, cu, cu, **kw)[0],
                             ref.attention_varlen(q, k, v, cu, cu, lowp=True, **kw)[0])


@pytest.mark.parametrize("paged", [False, True])
def test_kv_cache_call_as_te_makes_it(paged):
    """TE's inference path: q packed (thd) with cu_seqlens_q, the cache lengths as cache_seqlens
    and, when paged, its page table; no new k / v (TE writes its cache itself)."""
    import flash_attn_interface as fa

    lengths_q, cache_seqlens = [1, 3], torch.tensor([9, 14], dtype=torch.int32)
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = _bf16(sum(lengths_q), 4, 32)
    if paged:
        k_cache, v_cache = _bf16(10, 4, 2, 32), _bf16(10, 4, 2, 32)
        page_table = torch.randperm(10)[:8].reshape(2, 4).to(torch.int32)
    else:
        k_cache, v_cache = _bf16(2, 16, 2, 32), _bf16(2, 16, 2, 32)
        page_table = None
    extra = {"page_table": page_table} if paged else {}
    out = _first(fa.flash_attn_with_kvcache(q, k_cache, v_cache, softmax_scale=0.2, causal=True,
                                            window_size=(-1, 0), num_splits=0, cu_seqlens_q=cu_q,
                                            max_seqlen_q=max(lengths_q), cache_seqlens=cache_seqlens, **extra))
    kw = dict(cache_seqlens=cache_seqlens, page_table=page_table, cu_seqlens_q=cu_q, causal=True, softmax_scale=0.2)
    assert_matches_reference("kvcache", out, ref.attention_kvcache(q, k_cache, v_cache, **kw)[0],
                             ref.attention_kvcache(q, k_cache, v_cache, lowp=True, **kw)[0])

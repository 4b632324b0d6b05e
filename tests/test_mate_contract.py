"""MATE adapter contract: our calls reach mate.mha_interface under MATE's names (spec section 9).

A stand-in ``mate`` package replaces the real one in sys.modules. Its entries carry the signatures
of MATE's own (a keyword MATE does not have fails to bind), record every call, and compute what
MATE documents with the float64 reference of tests/reference_math.py, so a mapping that changes
the meaning (a lost window, a dropped sink) fails as surely as a misspelt keyword.
The adapter is called directly with CPU tensors: its device check lives in dispatch.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types

import pytest
import torch

import reference_math as ref
from tolerance import assert_lse_matches, assert_matches_reference
from flash_attn_3.backends import mate
from flash_attn_3.backends.params import AttnArgs

DTYPES = [torch.float16, torch.bfloat16]


# ---- the stand-in MATE (signatures from MooreThreads/mate, mate/mha_interface.py) ----

def _varlen_entry(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                  max_seqlen_k=None, seqused_q=None, seqused_k=None, softmax_scale=None,
                  causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                  window_size=(-1, -1), learnable_sink=None, attention_chunk=0, softcap=0.0,
                  scheduler_metadata=None, num_splits=0, pack_gqa=None, deterministic=False,
                  sm_margin=0, return_attn_probs=False, return_softmax_lse=False, backend="auto",
                  cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None, page_table=None, out=None):
    if q.dim() == 4 and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("MATE's varlen backward reads cu_seqlens_q (it pads the LSE by it)")
    kw = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size,
              attention_chunk=attention_chunk, softcap=softcap, sinks=learnable_sink,
              cp_world_size=cp_world_size, cp_rank=cp_rank)
    descales = dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    if page_table is not None:
        o, lse, _, _ = ref.attention_kvcache(q, k, v, qv=qv, cache_seqlens=seqused_k,
                                             page_table=page_table, cu_seqlens_q=cu_seqlens_q,
                                             **descales, **kw)
    elif q.dim() == 4:
        o, lse = ref.attention_dense(q, k, v, seqlens_q=seqused_q, seqlens_k=seqused_k, qv=qv,
                                     cp_tot_seqused_k=cp_tot_seqused_k, **descales, **kw)
    else:
        o, lse = ref.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q=seqused_q,
                                      seqused_k=seqused_k, qv=qv,
                                      cp_tot_seqused_k=cp_tot_seqused_k, **descales, **kw)
    o, lse = o.to(q.dtype), lse.float()
    return (o, lse) if (return_attn_probs or return_softmax_lse) else o


def _kvcache_entry(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                   cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                   cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None,
                   rotary_seqlens=None, q_descale=None, k_descale=None, v_descale=None,
                   softmax_scale=None, causal=False, window_size=(-1, -1), learnable_sink=None,
                   attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                   scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                   return_softmax_lse=False, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):
    o, lse, new_k_cache, new_v_cache = ref.attention_kvcache(
        q, k_cache, v_cache, k, v, qv=qv, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
        page_table=page_table, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k_new=cu_seqlens_k_new,
        rotary_seqlens=rotary_seqlens, rotary_interleaved=rotary_interleaved, q_descale=q_descale,
        k_descale=k_descale, v_descale=v_descale, causal=causal, window_size=window_size,
        attention_chunk=attention_chunk, softmax_scale=softmax_scale, softcap=softcap,
        sinks=learnable_sink,
    )
    k_cache.copy_(new_k_cache)
    v_cache.copy_(new_v_cache)
    o, lse = o.to(q.dtype), lse.float()
    return (o, lse) if return_softmax_lse else o


METADATA = torch.tensor([7, 1, 2, 3], dtype=torch.int32)


def _scheduler_entry(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                     seqused_q=None, seqused_k=None, qkv_dtype=torch.bfloat16, headdim_v=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, cu_seqlens_k_new=None,
                     cache_leftpad=None, page_size=None, max_seqlen_k_new=0, causal=False,
                     window_size=(-1, -1), attention_chunk=0, has_softcap=False, num_splits=0,
                     pack_gqa=None, has_qv=False, mp_margin=0):
    return METADATA.clone()


def _combine_entry(out_partial, lse_partial, out=None, out_dtype=None):
    o, lse = ref.combine(out_partial, lse_partial)
    return o.to(out_dtype or torch.float32), lse.float()


class FakeMate:
    """Installs the stand-in under sys.modules['mate'] and ['mate.mha_interface']."""

    ENTRIES = {
        "flash_attn_varlen_func": _varlen_entry,
        "flash_attn_with_kvcache": _kvcache_entry,
        "get_scheduler_metadata": _scheduler_entry,
        "flash_attn_combine": _combine_entry,
    }

    def __init__(self, monkeypatch, without=()):
        self.calls: list[tuple[str, dict]] = []
        package = types.ModuleType("mate")
        package.__spec__ = importlib.machinery.ModuleSpec("mate", None, is_package=True)
        package.__path__ = []
        mha = types.ModuleType("mate.mha_interface")
        mha.__spec__ = importlib.machinery.ModuleSpec("mate.mha_interface", None)
        for name, entry in self.ENTRIES.items():
            if name not in without:
                setattr(mha, name, self._recorded(name, entry))
        package.mha_interface = mha
        monkeypatch.setitem(sys.modules, "mate", package)
        monkeypatch.setitem(sys.modules, "mate.mha_interface", mha)

    def _recorded(self, name, entry):
        signature = inspect.signature(entry)

        def call(*args, **kwargs):
            self.calls.append((name, dict(signature.bind(*args, **kwargs).arguments)))
            return entry(*args, **kwargs)

        return call

    def only_call(self):
        assert len(self.calls) == 1, [name for name, _ in self.calls]
        return self.calls[0]


@pytest.fixture
def fake_mate(monkeypatch):
    return FakeMate(monkeypatch)


# ---- helpers ----

def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype)


def cu_seqlens(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0).to(torch.int32)


MASKS = {"full": (-1, -1), "causal": (-1, 0), "local": (3, 1), "local_causal": (2, 0)}


# ---- forward ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("with_sinks", [False, True])
def test_dense_forward_is_mates_varlen_entry_with_4d_tensors(fake_mate, dtype, mask, with_sinks):
    left, right = MASKS[mask]
    q, k, v = rand(2, 9, 4, 32, dtype=dtype), rand(2, 11, 2, 32, dtype=dtype), rand(2, 11, 2, 32, dtype=dtype)
    sinks = torch.randn(4) if with_sinks else None
    a = AttnArgs.plain(q, k, v, window_left=left, window_right=right, sinks=sinks, softcap=5.0)

    out, lse = mate.forward(a)

    name, call = fake_mate.only_call()
    assert name == "flash_attn_varlen_func"
    assert call["q"] is q and call["k"] is k and call["v"] is v
    for absent in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "seqused_q", "seqused_k"):
        assert call[absent] is None, absent
    assert call["return_softmax_lse"] is True
    assert call["learnable_sink"] is sinks
    assert call["softcap"] == 5.0 and call["softmax_scale"] == a.softmax_scale
    if mask == "causal":
        assert call["causal"] is True and tuple(call["window_size"]) == (-1, -1)
    else:
        assert call["causal"] is False and tuple(call["window_size"]) == (left, right)

    kw = dict(window_size=(left, right), softcap=5.0, sinks=sinks)
    ref_out, ref_lse = ref.attention_dense(q, k, v, **kw)
    lowp_out, _ = ref.attention_dense(q, k, v, lowp=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 4, 9)
    assert_matches_reference("out", out, ref_out, lowp_out)
    assert_lse_matches("lse", lse, ref_lse)


def test_forward_passes_tuning_fp8_and_context_parallel_arguments_by_name(fake_mate):
    q, k, v = rand(1, 4, 2, 16), rand(1, 8, 2, 16), rand(1, 8, 2, 16)
    metadata, tot = torch.arange(3, dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    a = AttnArgs.plain(q, k, v, num_splits=3, pack_gqa=True, scheduler_metadata=metadata,
                  cp_world_size=2, cp_rank=1, cp_tot_seqused_k=tot, attention_chunk=0)
    mate.forward(a)
    _, call = fake_mate.only_call()
    assert call["num_splits"] == 3 and call["pack_gqa"] is True
    assert call["scheduler_metadata"] is metadata
    assert call["cp_world_size"] == 2 and call["cp_rank"] == 1 and call["cp_tot_seqused_k"] is tot


@pytest.mark.parametrize("paged", [False, True])
def test_varlen_forward_keeps_cu_seqlens_and_sends_page_table_only_when_paged(fake_mate, paged):
    lengths_q, lengths_k = [3, 5], [6, 9]
    q = rand(sum(lengths_q), 4, 16)
    cu_q = cu_seqlens(lengths_q)
    seqused_k = torch.tensor(lengths_k, dtype=torch.int32)
    if paged:
        page_size, pages_per_row = 4, 3
        k, v = rand(8, page_size, 2, 16), rand(8, page_size, 2, 16)
        page_table = torch.randperm(8)[: 2 * pages_per_row].reshape(2, pages_per_row).to(torch.int32)
        a = AttnArgs.plain(q, k, v, cu_seqlens_q=cu_q, seqused_k=seqused_k, page_table=page_table,
                      max_seqlen_q=5, max_seqlen_k=page_size * pages_per_row, window_left=-1, window_right=0)
    else:
        k, v = rand(sum(lengths_k), 2, 16), rand(sum(lengths_k), 2, 16)
        cu_k = cu_seqlens(lengths_k)
        a = AttnArgs.plain(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=9,
                      window_left=-1, window_right=0)

    out, lse = mate.forward(a)

    name, call = fake_mate.only_call()
    assert name == "flash_attn_varlen_func"
    assert call["cu_seqlens_q"] is cu_q and call["max_seqlen_q"] == 5
    assert call["max_seqlen_k"] == a.max_seqlen_k
    if paged:
        assert call["page_table"] is page_table and call["seqused_k"] is seqused_k
        ref_out, _, _, _ = ref.attention_kvcache(q, k, v, cache_seqlens=seqused_k, page_table=page_table,
                                                 cu_seqlens_q=cu_q, causal=True)
        lowp_out, _, _, _ = ref.attention_kvcache(q, k, v, cache_seqlens=seqused_k, page_table=page_table,
                                                  cu_seqlens_q=cu_q, causal=True, lowp=True)
    else:
        # Releases before the paged varlen entry have no page_table keyword at all.
        assert "page_table" not in call
        assert call["cu_seqlens_k"] is a.cu_seqlens_k
        ref_out, _ = ref.attention_varlen(q, k, v, cu_q, a.cu_seqlens_k, causal=True)
        lowp_out, _ = ref.attention_varlen(q, k, v, cu_q, a.cu_seqlens_k, causal=True, lowp=True)
    assert lse.shape == (4, q.shape[0])
    assert_matches_reference("out", out, ref_out, lowp_out)


def test_cache_batch_idx_and_leftpad_go_to_mates_kvcache_entry(fake_mate):
    k_cache, v_cache = rand(4, 12, 2, 16), rand(4, 12, 2, 16)
    q = rand(2, 3, 4, 16)
    batch_idx = torch.tensor([3, 1], dtype=torch.int32)
    leftpad = torch.tensor([2, 0], dtype=torch.int32)
    cache_seqlens = torch.tensor([9, 12], dtype=torch.int32)
    sinks = torch.randn(4)
    a = AttnArgs.plain(q, k_cache, v_cache, seqused_k=cache_seqlens, kv_batch_idx=batch_idx, leftpad_k=leftpad,
                  sinks=sinks, window_left=-1, window_right=0)

    out, lse = mate.forward(a)

    name, call = fake_mate.only_call()
    assert name == "flash_attn_with_kvcache"
    assert call["k_cache"] is k_cache and call["v_cache"] is v_cache
    assert call["cache_seqlens"] is cache_seqlens and call["cache_batch_idx"] is batch_idx
    assert call["cache_leftpad"] is leftpad and call["learnable_sink"] is sinks
    assert call.get("k") is None and call.get("v") is None
    assert call["causal"] is True and call["return_softmax_lse"] is True
    kw = dict(cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx, cache_leftpad=leftpad, causal=True,
              sinks=sinks)
    ref_out, ref_lse, _, _ = ref.attention_kvcache(q, k_cache, v_cache, **kw)
    lowp_out, _, _, _ = ref.attention_kvcache(q, k_cache, v_cache, lowp=True, **kw)
    assert_matches_reference("out", out, ref_out, lowp_out)
    assert_lse_matches("lse", lse, ref_lse)


def test_cache_batch_idx_without_lengths_attends_to_the_whole_cache_row(fake_mate):
    k_cache, v_cache = rand(3, 10, 1, 16), rand(3, 10, 1, 16)
    q = rand(2, 1, 2, 16)
    batch_idx = torch.tensor([2, 0], dtype=torch.int32)
    out, _ = mate.forward(AttnArgs.plain(q, k_cache, v_cache, kv_batch_idx=batch_idx))
    _, call = fake_mate.only_call()
    assert call["cache_seqlens"].tolist() == [10, 10]
    ref_out, _, _, _ = ref.attention_kvcache(q, k_cache, v_cache, cache_batch_idx=batch_idx)
    lowp_out, _, _, _ = ref.attention_kvcache(q, k_cache, v_cache, cache_batch_idx=batch_idx, lowp=True)
    assert_matches_reference("out", out, ref_out, lowp_out)


# ---- backward ----

def _reference_grads(q, k, v, dout, lowp, varlen_lengths=None, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if varlen_lengths is None:
        o, _ = ref.attention_dense(*leaves, lowp=lowp, **kw)
    else:
        cu_q, cu_k = varlen_lengths
        o, _ = ref.attention_varlen(*leaves, cu_q, cu_k, lowp=lowp, **kw)
    return torch.autograd.grad(o, leaves, dout.to(o.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["full", "causal", "local"])
@pytest.mark.parametrize("varlen", [False, True])
def test_backward_runs_mates_varlen_autograd(fake_mate, dtype, mask, varlen):
    left, right = MASKS[mask]
    if varlen:
        cu_q, cu_k = cu_seqlens([5, 2]), cu_seqlens([4, 7])
        q, k, v = rand(7, 4, 16, dtype=dtype), rand(11, 2, 16, dtype=dtype), rand(11, 2, 16, dtype=dtype)
        a = AttnArgs.plain(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=7,
                      window_left=left, window_right=right, softcap=3.0)
    else:
        cu_q = cu_k = None
        q, k, v = rand(2, 6, 4, 16, dtype=dtype), rand(2, 8, 2, 16, dtype=dtype), rand(2, 8, 2, 16, dtype=dtype)
        a = AttnArgs.plain(q, k, v, window_left=left, window_right=right, softcap=3.0)
    dout = rand(*q.shape, dtype=dtype)

    dq, dk, dv = mate.backward(dout, q, k, v, None, None, a, deterministic=True)

    name, call = fake_mate.only_call()
    assert name == "flash_attn_varlen_func" and call["q"].dim() == 3
    assert call["deterministic"] is True and call["softcap"] == 3.0
    if varlen:
        assert call["cu_seqlens_q"] is cu_q and call["cu_seqlens_k"] is cu_k
    else:
        assert call["cu_seqlens_q"].tolist() == [0, 6, 12] and call["cu_seqlens_k"].tolist() == [0, 8, 16]
        assert (call["max_seqlen_q"], call["max_seqlen_k"]) == (6, 8)
    kw = dict(window_size=(left, right), softcap=3.0, varlen_lengths=(cu_q, cu_k) if varlen else None)
    ref_grads = _reference_grads(q, k, v, dout, lowp=False, **kw)
    lowp_grads = _reference_grads(q, k, v, dout, lowp=True, **kw)
    for got, want, lowp, like in zip((dq, dk, dv), ref_grads, lowp_grads, (q, k, v)):
        assert got.shape == like.shape and got.dtype == like.dtype
        assert_matches_reference("grad", got, want, lowp)


@pytest.mark.parametrize("case", ["seqused", "sinks", "dv_ne_d", "context_parallel", "paged"])
def test_backward_refuses_what_mates_backward_drops(fake_mate, case):
    q, k, v = rand(1, 4, 2, 16), rand(1, 4, 2, 16), rand(1, 4, 2, 16)
    overrides = {
        "seqused": dict(seqused_k=torch.tensor([3], dtype=torch.int32)),
        "sinks": dict(sinks=torch.zeros(2)),
        "dv_ne_d": {},
        "context_parallel": dict(cp_world_size=2, cp_tot_seqused_k=torch.tensor([8], dtype=torch.int32)),
        "paged": dict(page_table=torch.zeros(1, 1, dtype=torch.int32)),
    }[case]
    if case == "dv_ne_d":
        v = rand(1, 4, 2, 32)
    a = AttnArgs.plain(q, k, v, **overrides)
    assert mate.unsupported_reason(a) is None
    assert mate.unsupported_reason(a, backward=True)
    with pytest.raises(NotImplementedError, match="mate backend backward"):
        mate.backward(rand(*q.shape[:-1], v.shape[-1]), q, k, v, None, None, a, deterministic=False)
    assert fake_mate.calls == []


def test_fp8_and_head_dims_past_512_are_refused():
    q = rand(1, 2, 1, 16).to(torch.float8_e4m3fn)
    assert "fp16/bf16" in mate.unsupported_reason(AttnArgs.plain(q, q, q))
    wide = rand(1, 2, 1, 520)
    assert "512" in mate.unsupported_reason(AttnArgs.plain(wide, wide, wide))


# ---- append, combine, scheduler metadata ----

@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("varlen_q", [False, True])
def test_append_kv_writes_through_mates_kvcache_entry_and_rotates_q(fake_mate, interleaved, per_token, varlen_q):
    batch, heads_kv, head_dim, rotary_dim = 2, 2, 32, 16
    k_cache, v_cache = rand(3, 16, heads_kv, head_dim), rand(3, 16, heads_kv, head_dim)
    k_new, v_new = rand(batch, 3, heads_kv, head_dim), rand(batch, 3, heads_kv, head_dim)
    cache_seqlens = torch.tensor([4, 9], dtype=torch.int32)
    batch_idx = torch.tensor([2, 0], dtype=torch.int32)
    cos_sin_angle = torch.rand(24, rotary_dim // 2) * 6.28
    cos, sin = cos_sin_angle.cos().to(torch.bfloat16), cos_sin_angle.sin().to(torch.bfloat16)
    if varlen_q:
        lengths_q = [2, 3]
        q, cu_q = rand(sum(lengths_q), 4, head_dim), cu_seqlens(lengths_q)
    else:
        q, cu_q = rand(batch, 2, 4, head_dim), None
    want = ref.attention_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                 cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx, cu_seqlens_q=cu_q,
                                 rotary_interleaved=interleaved, causal=per_token)
    _, _, want_k_cache, want_v_cache = want
    rows_q = (cu_q[1:] - cu_q[:-1]).tolist() if varlen_q else [q.shape[1]] * batch
    positions = torch.cat([
        torch.arange(n) + int(start) if per_token else torch.full((n,), int(start))
        for n, start in zip(rows_q, cache_seqlens)
    ])
    want_q = ref.apply_rotary(q.reshape(-1, *q.shape[-2:]), cos, sin, positions, interleaved).reshape(q.shape)

    q_rotated = mate.append_kv(k_cache, v_cache, k_new, v_new, q, cos, sin, cache_seqlens, batch_idx, None,
                               None, cu_q, None, None, interleaved, per_token, 3 if varlen_q else None)

    name, call = fake_mate.only_call()
    assert name == "flash_attn_with_kvcache"
    assert call["k"] is k_new and call["v"] is v_new
    assert call["rotary_cos"] is cos and call["rotary_sin"] is sin
    assert call["cache_seqlens"] is cache_seqlens and call["cache_batch_idx"] is batch_idx
    assert call["rotary_interleaved"] is interleaved
    torch.testing.assert_close(v_cache, want_v_cache, atol=0, rtol=0)
    torch.testing.assert_close(k_cache, want_k_cache, atol=1e-3, rtol=0)
    torch.testing.assert_close(q_rotated.float(), want_q.float(), atol=1e-2, rtol=1e-2)


def test_append_kv_without_rotary_returns_q_itself(fake_mate):
    k_cache, v_cache = rand(1, 8, 1, 16), rand(1, 8, 1, 16)
    q = rand(1, 1, 1, 16)
    seqlens = torch.tensor([2], dtype=torch.int32)
    assert mate.append_kv(k_cache, v_cache, rand(1, 1, 1, 16), rand(1, 1, 1, 16), q, None, None, seqlens,
                          None, None, None, None, None, None, True, False, None) is q


@pytest.mark.parametrize("mate_has_combine", [True, False])
def test_combine_uses_mates_entry_when_it_has_one(monkeypatch, mate_has_combine):
    fake = FakeMate(monkeypatch, without=() if mate_has_combine else ("flash_attn_combine",))
    out_partial, lse_partial = torch.randn(3, 2, 5, 4, 16), torch.randn(3, 2, 5, 4)
    out, lse = mate.combine(out_partial, lse_partial, torch.bfloat16)
    assert [name for name, _ in fake.calls] == (["flash_attn_combine"] if mate_has_combine else [])
    if mate_has_combine:
        assert fake.calls[0][1]["out_dtype"] is torch.bfloat16
    want_out, want_lse = ref.combine(out_partial, lse_partial)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 4, 16)
    torch.testing.assert_close(out.double(), want_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [(-1, 0), (5, 0)])
def test_scheduler_metadata_maps_cache_seqlens_to_seqused_k_and_sm_margin_to_mp_margin(fake_mate, window):
    cache_seqlens = torch.tensor([5, 7], dtype=torch.int32)
    cu_q = cu_seqlens([1, 1])
    metadata = mate.scheduler_metadata(2, 1, 64, 8, 2, 128, 128, cache_seqlens, cu_q, None, None, 16, 1,
                                       window == (-1, 0), window[0], window[1], 0, True, 0, None, 12)
    name, call = fake_mate.only_call()
    assert name == "get_scheduler_metadata"
    assert call["seqused_k"] is cache_seqlens and call["seqused_q"] is None and call["cu_seqlens_k"] is None
    assert call["mp_margin"] == 12 and "sm_margin" not in call
    assert call["cu_seqlens_q"] is cu_q and call["page_size"] == 16 and call["has_softcap"] is True
    assert (call["causal"], tuple(call["window_size"])) == ((True, (-1, -1)) if window == (-1, 0) else (False, window))
    assert torch.equal(metadata, METADATA)


# ---- the public functions, routed to the adapter by dispatch ----

@pytest.fixture
def public_on_mate(fake_mate, monkeypatch):
    """flash_attn_interface with FLASH_ATTN_3_BACKEND=mate and dispatch's device gate opened for
    CPU tensors: the op layer's calls reach the adapter as they would on a MUSA device."""
    from flash_attn_3 import dispatch

    real_reason = dispatch.device_reason
    monkeypatch.setattr(dispatch, "device_reason",
                        lambda backend, device: None if backend == "mate" else real_reason(backend, device))
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "mate")
    import flash_attn_interface

    return flash_attn_interface


def test_public_func_sinks_and_lse_request_reach_mate(public_on_mate, fake_mate):
    q, k, v = rand(2, 5, 4, 16), rand(2, 7, 2, 16), rand(2, 7, 2, 16)
    sinks = torch.randn(4)
    out, lse = public_on_mate.flash_attn_func(q, k, v, causal=True, s_aux=sinks, return_attn_probs=True)
    name, call = fake_mate.only_call()
    assert name == "flash_attn_varlen_func" and call["q"].dim() == 4 and call["cu_seqlens_q"] is None
    assert call["return_softmax_lse"] is True and call["causal"] is True
    torch.testing.assert_close(call["learnable_sink"], sinks)
    assert out.shape == (2, 5, 4, 16) and lse.shape == (2, 4, 5)


def test_public_varlen_block_table_reaches_mate_as_page_table(public_on_mate, fake_mate):
    q = rand(6, 4, 16)
    cu_q = cu_seqlens([2, 4])
    k_pages, v_pages = rand(6, 4, 2, 16), rand(6, 4, 2, 16)
    block_table = torch.tensor([[0, 3], [5, 1]], dtype=torch.int32)
    seqused_k = torch.tensor([5, 8], dtype=torch.int32)
    public_on_mate.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, None, 4, 8, seqused_k=seqused_k,
                                          block_table=block_table, return_softmax_lse=True)
    name, call = fake_mate.only_call()
    assert name == "flash_attn_varlen_func"
    torch.testing.assert_close(call["page_table"], block_table)
    torch.testing.assert_close(call["seqused_k"], seqused_k)


def test_public_scheduler_metadata_reaches_mate_with_mp_margin(public_on_mate, fake_mate):
    cache_seqlens = torch.tensor([3, 9], dtype=torch.int32)
    metadata = public_on_mate.get_scheduler_metadata(2, 1, 16, 8, 2, 64, cache_seqlens, causal=True,
                                                     sm_margin=4, page_size=None)
    name, call = fake_mate.only_call()
    assert name == "get_scheduler_metadata"
    torch.testing.assert_close(call["seqused_k"], cache_seqlens)
    assert call["mp_margin"] == 4 and call["num_heads_q"] == 8 and call["headdim"] == 64
    assert torch.equal(metadata, METADATA)


def test_public_kvcache_appends_then_attends_through_mates_kvcache_entry(public_on_mate, fake_mate):
    k_cache, v_cache = rand(3, 12, 2, 16), rand(3, 12, 2, 16)
    q, k_new, v_new = rand(2, 2, 4, 16), rand(2, 2, 2, 16), rand(2, 2, 2, 16)
    cache_seqlens = torch.tensor([4, 7], dtype=torch.int32)
    batch_idx = torch.tensor([2, 0], dtype=torch.int32)
    kw = dict(cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx, causal=True)
    want_out, want_lse, want_k, want_v = ref.attention_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    lowp_out = ref.attention_kvcache(q, k_cache, v_cache, k_new, v_new, lowp=True, **kw)[0]

    out, lse, *_ = public_on_mate.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                                          return_softmax_lse=True, **kw)

    (append_name, append_call), (attend_name, attend_call) = fake_mate.calls
    assert append_name == attend_name == "flash_attn_with_kvcache"
    assert append_call["k"] is not None and attend_call.get("k") is None
    torch.testing.assert_close(attend_call["cache_seqlens"], cache_seqlens + 2)
    torch.testing.assert_close(attend_call["cache_batch_idx"], batch_idx)
    torch.testing.assert_close(k_cache, want_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, want_v, atol=0, rtol=0)
    assert_matches_reference("out", out, want_out, lowp_out)
    assert_lse_matches("lse", lse, want_lse)

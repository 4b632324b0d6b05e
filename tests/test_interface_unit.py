"""The public surface: names, order, defaults, returns, error messages, cache safety, packaging."""

import copy
import importlib
import importlib.util
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

import flash_attn_3
import flash_attn_interface as fa
from flash_attn_3 import dispatch

_ = None  # marks a required parameter below

# The official hopper/flash_attn_interface.py parameter lists, in order, with defaults.
OFFICIAL = {
    "flash_attn_func": [
        ("q", _), ("k", _), ("v", _), ("softmax_scale", None), ("causal", False), ("qv", None),
        ("q_descale", None), ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)),
        ("attention_chunk", 0), ("softcap", 0.0), ("num_splits", 1), ("pack_gqa", None),
        ("deterministic", False), ("sm_margin", 0), ("return_attn_probs", False),
    ],
    "flash_attn_qkvpacked_func": [
        ("qkv", _), ("softmax_scale", None), ("causal", False), ("q_descale", None),
        ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)), ("attention_chunk", 0),
        ("softcap", 0.0), ("deterministic", False), ("num_heads_q", None), ("sm_margin", 0),
        ("return_attn_probs", False),
    ],
    "flash_attn_varlen_func": [
        ("q", _), ("k", _), ("v", _), ("cu_seqlens_q", _), ("cu_seqlens_k", _), ("max_seqlen_q", _),
        ("max_seqlen_k", _), ("seqused_q", None), ("seqused_k", None), ("softmax_scale", None),
        ("causal", False), ("qv", None), ("q_descale", None), ("k_descale", None), ("v_descale", None),
        ("window_size", (-1, -1)), ("attention_chunk", 0), ("softcap", 0.0), ("num_splits", 1),
        ("pack_gqa", None), ("deterministic", False), ("sm_margin", 0), ("return_attn_probs", False),
    ],
    "flash_attn_combine": [("out_partial", _), ("lse_partial", _), ("out", None), ("out_dtype", None)],
    "flash_attn_with_kvcache": [
        ("q", _), ("k_cache", _), ("v_cache", _), ("k", None), ("v", None), ("qv", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
        ("cache_leftpad", None), ("page_table", None), ("cu_seqlens_q", None),
        ("cu_seqlens_k_new", None), ("max_seqlen_q", None), ("rotary_seqlens", None),
        ("q_descale", None), ("k_descale", None), ("v_descale", None), ("softmax_scale", None),
        ("causal", False), ("window_size", (-1, -1)), ("attention_chunk", 0), ("softcap", 0.0),
        ("rotary_interleaved", True), ("scheduler_metadata", None), ("num_splits", 0),
        ("pack_gqa", None), ("sm_margin", 0), ("return_softmax_lse", False),
    ],
    "get_scheduler_metadata": [
        ("batch_size", _), ("max_seqlen_q", _), ("max_seqlen_k", _), ("num_heads_q", _),
        ("num_heads_kv", _), ("headdim", _), ("cache_seqlens", _), ("qkv_dtype", torch.bfloat16),
        ("headdim_v", None), ("cu_seqlens_q", None), ("cu_seqlens_k_new", None),
        ("cache_leftpad", None), ("page_size", None), ("max_seqlen_k_new", 0), ("causal", False),
        ("window_size", (-1, -1)), ("attention_chunk", 0), ("has_softcap", False), ("num_splits", 0),
        ("pack_gqa", None), ("sm_margin", 0),
    ],
}

EXTENSIONS = {
    "flash_attn_func": ["return_softmax_lse", "sinks", "s_aux", "cp_world_size", "cp_rank", "cp_tot_seqused_k"],
    "flash_attn_varlen_func": ["return_softmax_lse", "sinks", "s_aux", "cp_world_size", "cp_rank",
                               "cp_tot_seqused_k", "page_table", "block_table", "out"],
    "flash_attn_with_kvcache": ["sinks", "s_aux", "cp_world_size", "cp_rank", "cp_tot_seqused_k"],
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_signature(name):
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    official = OFFICIAL[name]
    got = [(p.name, _ if p.default is inspect.Parameter.empty else p.default) for p in params[: len(official)]]
    assert got == official
    assert [p.name for p in params[len(official):]] == EXTENSIONS.get(name, [])
    for p in params:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def test_package_surface():
    assert re.fullmatch(r"3\.\d+\.\d+", flash_attn_3.__version__)
    from flash_attn_3 import flash_attn_interface as inner

    for name in OFFICIAL:
        assert getattr(fa, name) is getattr(inner, name) is getattr(flash_attn_3, name)
    assert importlib.util.find_spec("flash_attn") is None, "a top-level flash_attn package must not exist"


def test_custom_ops_registered():
    official = ("fwd", "bwd", "fwd_combine", "get_scheduler_metadata", "_flash_attn_forward", "_flash_attn_backward")
    ours = ("_attention_fwd", "_attention_bwd", "_append_kv", "_flash_attn_combine", "_get_scheduler_metadata")
    for op in official + ours:
        assert hasattr(torch.ops.flash_attn_3, op)


def _rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, dtype=dtype)


def test_return_conventions():
    q, k, v = _rand(2, 5, 4, 16), _rand(2, 6, 2, 16), _rand(2, 6, 2, 16)
    out = fa.flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 4, 16)
    for kw in ({"return_attn_probs": True}, {"return_softmax_lse": True}):
        out, lse = fa.flash_attn_func(q, k, v, **kw)
        assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out, lse = fa.flash_attn_varlen_func(_rand(7, 4, 16), _rand(7, 2, 16), _rand(7, 2, 16), cu, cu, 4, 4,
                                         return_attn_probs=True)
    assert out.shape == (7, 4, 16) and lse.shape == (4, 7)
    out, lse, *rest = fa.flash_attn_with_kvcache(_rand(2, 1, 4, 16), _rand(2, 8, 2, 16), _rand(2, 8, 2, 16),
                                                 cache_seqlens=5, return_softmax_lse=True)
    assert out.shape == (2, 1, 4, 16) and lse.shape == (2, 4, 1)
    qkv = _rand(2, 5, 6, 16)
    out, lse = fa.flash_attn_qkvpacked_func(qkv, num_heads_q=4, return_attn_probs=True)
    assert out.shape == (2, 5, 4, 16) and lse.shape == (2, 4, 5)
    out, lse = fa.flash_attn_combine(torch.randn(3, 2, 4, 2, 8), torch.randn(3, 2, 4, 2))
    assert out.dtype == torch.float32 and out.shape == (2, 4, 2, 8) and lse.shape == (2, 4, 2)
    out, _lse = fa.flash_attn_combine(torch.randn(3, 2, 4, 2, 8), torch.randn(3, 2, 4, 2), out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16


def test_default_scale_and_positional_order():
    q, k, v = _rand(1, 4, 2, 16), _rand(1, 4, 2, 16), _rand(1, 4, 2, 16)
    by_keyword = fa.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True)
    by_position = fa.flash_attn_func(q, k, v, 0.3, True)
    assert torch.equal(by_keyword, by_position)
    assert torch.equal(fa.flash_attn_func(q, k, v), fa.flash_attn_func(q, k, v, 16 ** -0.5))


def test_out_buffer_and_block_table_alias():
    q, k, v = _rand(6, 2, 16), _rand(6, 2, 16), _rand(6, 2, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out = torch.full((6, 2, 16), float("nan"), dtype=torch.float16)
    result = fa.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, out=out)
    assert result is out and not torch.isnan(out).any()
    pages = _rand(4, 3, 2, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    used = torch.tensor([5, 4], dtype=torch.int32)
    a = fa.flash_attn_varlen_func(q, pages, pages, cu, None, 4, 6, seqused_k=used, page_table=table)
    b = fa.flash_attn_varlen_func(q, pages, pages, cu, None, 4, 6, seqused_k=used, block_table=table)
    assert torch.equal(a, b)


def _kv_call(**over):
    args = dict(
        q=_rand(2, 1, 4, 16), k_cache=_rand(2, 8, 2, 16), v_cache=_rand(2, 8, 2, 16),
        k=_rand(2, 1, 2, 16), v=_rand(2, 1, 2, 16), cache_seqlens=torch.tensor([2, 3], dtype=torch.int32),
    )
    args.update(over)
    return args


BAD_KVCACHE = [
    ({"cache_seqlens": torch.tensor([2, 3], dtype=torch.int64)}, TypeError, r"cache_seqlens must be an int32"),
    ({"k": None}, ValueError, r"k and v must be given together"),
    ({"k": _rand(2, 1, 2, 16, dtype=torch.bfloat16)}, TypeError, r"k must have the dtype of the cache"),
    ({"k": _rand(2, 9, 2, 16), "v": _rand(2, 9, 2, 16)}, ValueError, r"more than the cache capacity 8"),
    ({"rotary_cos": torch.randn(8, 16), "rotary_sin": torch.randn(8, 16)}, ValueError, r"rotary_dim"),
    ({"rotary_cos": torch.randn(8, 4), "rotary_sin": torch.randn(8, 4)}, ValueError, r"multiple of 16"),
    ({"cache_batch_idx": torch.tensor([0, 1], dtype=torch.int64)}, TypeError, r"cache_batch_idx must be an int32"),
    ({"cache_leftpad": torch.tensor([0], dtype=torch.int32)}, ValueError, r"cache_leftpad must have shape"),
    ({"scheduler_metadata": torch.zeros(7, dtype=torch.int32)}, ValueError, r"scheduler_metadata must have shape"),
    ({"window_size": (-2, 0)}, ValueError, r"window_size entries must be >= -1"),
    ({"softcap": -1.0}, ValueError, r"softcap must be >= 0"),
    ({"q": _rand(2, 1, 3, 16)}, ValueError, r"divisible by the number of key/value heads"),
    ({"q": _rand(2, 1, 4, 16)[..., ::2].contiguous().expand(2, 1, 4, 8)}, ValueError, r"head dim"),
    # The official wrapper asserts this too: copying the cache would drop the in-place append.
    ({"k_cache": _rand(2, 8, 2, 32)[..., ::2]}, ValueError, r"k_cache must have a contiguous last dimension.*got strides"),
]


@pytest.mark.parametrize("over,exc,message", BAD_KVCACHE)
def test_kvcache_errors_leave_cache_untouched(over, exc, message):
    args = _kv_call(**over)
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(exc, match=message):
        fa.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], k_before) and torch.equal(args["v_cache"], v_before)


def test_rotary_without_new_kv_is_refused():
    with pytest.raises(ValueError, match="need k and v"):
        fa.flash_attn_with_kvcache(_rand(2, 1, 4, 16), _rand(2, 8, 2, 16), _rand(2, 8, 2, 16),
                                   rotary_cos=torch.randn(8, 8), rotary_sin=torch.randn(8, 8), cache_seqlens=2)


def _strided_last(*shape):
    return _rand(*shape[:-1], shape[-1] * 2)[..., ::2]


BAD_FUNC = [
    ({"q": torch.randn(1, 4, 2, 16)}, TypeError, r"q must have dtype"),
    ({"k": _rand(1, 4, 2, 16, dtype=torch.bfloat16)}, TypeError, r"q, k and v must share one dtype.*k is torch.bfloat16"),
    ({"q": _rand(1, 4, 2, 12), "k": _rand(1, 4, 2, 12), "v": _rand(1, 4, 2, 12)}, ValueError, r"multiple of 8; got 12"),
    ({"q": _rand(1, 4, 2, 264), "k": _rand(1, 4, 2, 264), "v": _rand(1, 4, 2, 264)}, ValueError, r"<= 256; got 264"),
    ({"q": _rand(1, 4, 2, 96), "k": _rand(1, 4, 2, 96), "v": _rand(1, 4, 2, 128)}, ValueError, r"head dim of v may differ"),
    ({"k": _rand(2, 4, 2, 16), "v": _rand(2, 4, 2, 16)}, ValueError, r"k must have batch size 1"),
    ({"qv": _rand(1, 4, 2, 16)}, ValueError, r"qv requires head dim"),
    ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \(num_heads_q,\)"),
    ({"sinks": torch.zeros(2), "s_aux": torch.zeros(2)}, ValueError, r"not both"),
    ({"cp_world_size": 2}, ValueError, r"cp_tot_seqused_k .* is required"),
    ({"window_size": 3}, TypeError, r"window_size must be a pair"),
]


@pytest.mark.parametrize("over,exc,message", BAD_FUNC)
def test_func_errors_name_the_argument(over, exc, message):
    args = dict(q=_rand(1, 4, 2, 16), k=_rand(1, 4, 2, 16), v=_rand(1, 4, 2, 16))
    args.update(over)
    with pytest.raises(exc, match=message):
        fa.flash_attn_func(**args)


BAD_VARLEN = [
    ({"cu_seqlens_q": torch.tensor([0, 3, 7])}, TypeError, r"cu_seqlens_q must be an int32"),
    ({"cu_seqlens_k": torch.tensor([0, 7], dtype=torch.int32)}, ValueError, r"cu_seqlens_k must have shape"),
    ({"max_seqlen_q": None}, ValueError, r"max_seqlen_q .* is required"),
    ({"seqused_k": torch.tensor([1, 2, 3], dtype=torch.int32)}, ValueError, r"seqused_k must have shape"),
    ({"page_table": torch.zeros(2, 2, dtype=torch.int32)}, ValueError, r"seqused_k .* is required with page_table"),
    ({"page_table": torch.zeros(2, 2, dtype=torch.int32), "seqused_k": torch.ones(2, dtype=torch.int32)},
     ValueError, r"cu_seqlens_k cannot be combined with page_table"),
    ({"out": torch.empty(7, 4, 16, dtype=torch.bfloat16)}, TypeError, r"out must have dtype torch.float16"),
    ({"out": torch.empty(7, 4, 8, dtype=torch.float16)}, ValueError, r"out must have shape"),
]


@pytest.mark.parametrize("over,exc,message", BAD_VARLEN)
def test_varlen_errors(over, exc, message):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    args = dict(q=_rand(7, 4, 16), k=_rand(7, 2, 16), v=_rand(7, 2, 16), cu_seqlens_q=cu, cu_seqlens_k=cu,
                max_seqlen_q=4, max_seqlen_k=4)
    args.update(over)
    with pytest.raises(exc, match=message):
        fa.flash_attn_varlen_func(**args)


def test_backward_refusals_are_clear():
    q, k, v = (_rand(1, 4, 2, 16).requires_grad_() for _ in range(3))
    out = fa.flash_attn_func(q, k, v, attention_chunk=2)
    with pytest.raises(NotImplementedError, match="attention_chunk"):
        out.sum().backward()
    sinks = torch.zeros(2, requires_grad=True)
    out = fa.flash_attn_func(q, k, v, sinks=sinks)
    with pytest.raises(NotImplementedError, match="sinks"):
        out.sum().backward()


def test_forced_backend_refusal_names_backend_and_reason(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "mate")
    with pytest.raises(NotImplementedError, match=r"mate backend refuses this call: .*musa"):
        fa.flash_attn_func(_rand(1, 4, 2, 16), _rand(1, 4, 2, 16), _rand(1, 4, 2, 16))
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="FLASH_ATTN_3_BACKEND must be one of"):
        fa.flash_attn_func(_rand(1, 4, 2, 16), _rand(1, 4, 2, 16), _rand(1, 4, 2, 16))


def test_compatibility_doc_matches_dispatcher():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text()
    block = doc.split("<!-- BEGIN GENERATED MATRIX -->\n", 1)[1].split("<!-- END GENERATED MATRIX -->", 1)[0]
    assert block == dispatch.compatibility_markdown(), (
        "docs/compatibility.md is stale: regenerate it with `python -m flash_attn_3 info --markdown`"
    )


def test_every_backend_declares_every_feature():
    for backend, table in dispatch.CAPABILITIES.items():
        assert set(table) == set(dispatch.FEATURES), backend
        assert importlib.util.find_spec(dispatch._MODULES[backend]) is not None


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as t in a view whose last dimension has stride 2 (or 0 for one element)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_strided_inputs_read_like_contiguous_ones(fa, device):
    """The official wrapper copies inputs lacking a unit last stride (maybe_contiguous); kernels that
    index cu_seqlens / cache_seqlens / page_table columns with stride 1 must never see such views."""
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 7], dtype=torch.int32, device=device)
    used = torch.tensor([3, 2], dtype=torch.int32, device=device)
    q, k, v = (_rand(n, 2, 16).to(device) for n in (5, 7, 7))
    plain = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 4, seqused_k=used, causal=True)
    strided_index = fa.flash_attn_varlen_func(q, k, v, _strided(cu_q), _strided(cu_k), 3, 4,
                                              seqused_k=_strided(used), causal=True)
    assert torch.equal(plain, strided_index)
    strided_qkv = fa.flash_attn_varlen_func(_strided(q), _strided(k), _strided(v), cu_q, cu_k, 3, 4,
                                            seqused_k=used, causal=True)
    assert torch.equal(plain, strided_qkv)

    pages_k, pages_v = _rand(6, 3, 2, 16).to(device), _rand(6, 3, 2, 16).to(device)
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32, device=device)
    seqlens = torch.tensor([2, 4], dtype=torch.int32, device=device)
    batch_idx = torch.tensor([1, 0], dtype=torch.int32, device=device)
    cos, sin = torch.rand(9, 8, device=device), torch.rand(9, 8, device=device)
    q1, k_new, v_new = _rand(2, 2, 4, 16).to(device), _rand(2, 2, 2, 16).to(device), _rand(2, 2, 2, 16).to(device)
    caches = [(pages_k.clone(), pages_v.clone()) for _ in range(2)]
    outs = []
    for (kc, vc), view in zip(caches, (lambda t: t, _strided)):
        outs.append(fa.flash_attn_with_kvcache(
            view(q1), kc, vc, view(k_new), view(v_new), rotary_cos=view(cos), rotary_sin=view(sin),
            cache_seqlens=view(seqlens), cache_batch_idx=view(batch_idx), page_table=view(table), causal=True,
        ))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert not torch.equal(caches[0][1], pages_v), "the append must have written the cache"


def test_descales_of_half_inputs_are_ignored(fa, device):
    """The official forward reads q/k/v_descale only for fp8 inputs."""
    q, k, v = (_rand(2, 4, 2, 16).to(device) for _ in range(3))
    scales = [torch.rand(2, 2, device=device) + 0.5 for _ in range(3)]
    assert torch.equal(fa.flash_attn_func(q, k, v, None, False, None, *scales), fa.flash_attn_func(q, k, v))


def test_packed_new_tokens_may_total_more_than_one_cache_row(fa, device):
    """With cu_seqlens_k_new, k.shape[0] counts every sequence's new tokens: 3 x 6 = 18 > capacity 8."""
    k_cache, v_cache = _rand(3, 8, 2, 16).to(device), _rand(3, 8, 2, 16).to(device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    cu_new = torch.tensor([0, 6, 12, 18], dtype=torch.int32, device=device)
    k_new, v_new = _rand(18, 2, 16).to(device), _rand(18, 2, 16).to(device)
    out = fa.flash_attn_with_kvcache(_rand(3, 1, 4, 16).to(device), k_cache, v_cache, k_new, v_new,
                                     cache_seqlens=seqlens, cu_seqlens_k_new=cu_new)
    assert out.shape == (3, 1, 4, 16) and torch.isfinite(out).all()
    for b in range(3):
        start = int(seqlens[b])
        expect_k, expect_v = k_before[b].clone(), v_before[b].clone()
        expect_k[start:start + 6], expect_v[start:start + 6] = k_new[6 * b: 6 * b + 6], v_new[6 * b: 6 * b + 6]
        assert torch.equal(k_cache[b], expect_k) and torch.equal(v_cache[b], expect_v)


def test_lowlevel_kv_batch_idx_with_packed_kv_is_refused():
    from flash_attn_interface import _flash_attn_forward

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_batch_idx cannot be combined with cu_seqlens_k"):
        _flash_attn_forward(_rand(7, 2, 16), _rand(7, 2, 16), _rand(7, 2, 16), cu_seqlens_q=cu, cu_seqlens_k=cu,
                            max_seqlen_q=4, max_seqlen_k=4, kv_batch_idx=torch.tensor([1, 0], dtype=torch.int32))


@pytest.mark.parametrize("named", [False, True], ids=["positional", "named"])
def test_lowlevel_backward_matches_autograd(fa, device, named):
    """Named dq / dk / dv too: torch before 2.13 bumped a mutated argument's version by its
    position in the call as given, an IndexError for a named or defaulted one (torch 2.11)."""
    from flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    q, k, v = (_rand(2, 5, 2, 16).to(device).requires_grad_() for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    expect = torch.autograd.grad(out, (q, k, v), dout)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse, *_ = _flash_attn_forward(q, k, v, causal=True)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    if named:
        softmax_d = _flash_attn_backward(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=grads[0],
                                         dk=grads[1], dv=grads[2], is_causal=True)
    else:
        softmax_d = _flash_attn_backward(dout, q, k, v, out, lse, None, None, None, None, None, None, *grads,
                                         is_causal=True)
    assert softmax_d.shape == lse.shape
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def _lowlevel_bwd_args(**over):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = _rand(7, 2, 16), _rand(7, 2, 16), _rand(7, 2, 16)
    args = dict(dout=_rand(7, 2, 16), q=q, k=k, v=v, out=_rand(7, 2, 16), softmax_lse=torch.randn(2, 7),
                cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4)
    args.update(over)
    return args


BAD_LOWLEVEL_BWD = [
    # Without max_seqlen_q a packed q used to pass its head count (q.shape[1]) as the length.
    ({"max_seqlen_q": None}, ValueError, r"max_seqlen_q .* is required with cu_seqlens_q"),
    ({"dout": _rand(7, 2, 8)}, ValueError, r"dout must have shape out.shape = \(7, 2, 16\); got \(7, 2, 8\)"),
    ({"dout": _rand(7, 2, 16, dtype=torch.bfloat16)}, TypeError, r"dout must have the dtype of q"),
    ({"softmax_lse": torch.randn(2, 2, 7)}, ValueError, r"softmax_lse must have shape \(num_heads, total_q\)"),
    ({"dk": torch.empty(7, 2, 8, dtype=torch.float16)}, ValueError, r"dk must have shape k.shape"),
    ({"dq": torch.empty(7, 2, 16, dtype=torch.bfloat16)}, TypeError, r"dq must have the dtype of q"),
    ({"out": _rand(6, 2, 16)}, ValueError, r"out must have shape"),
]


@pytest.fixture
def torch_211_version_bump():
    """The op's mutated-argument version bump as torch before 2.13 registers it: by index into
    the arguments the dispatcher passes on, which lack the trailing ones left at their default
    (torch 2.11 on the device: IndexError for every call with dv left None)."""
    op = torch.ops.flash_attn_3._flash_attn_backward.default
    mutated = [i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]

    def bump(keyset, *args, **kwargs):
        for i in mutated:
            torch._library.custom_ops.increment_version(args[i])  # skips None, as 2.11's
        return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)

    if "flash_attn_3/_flash_attn_backward/ADInplaceOrView" in getattr(torch.library, "_impls", ()):
        # torch before 2.13 (the device's 2.11) registered this very bump from python itself,
        # and refuses a second registration: the test then runs under the real one.
        yield
        return
    lib = torch.library.Library("flash_attn_3", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("_flash_attn_backward", bump, "ADInplaceOrView", with_keyset=True)
    yield
    lib._destroy()  # the op's own kernel is back


def test_lowlevel_backward_under_the_old_version_bump(torch_211_version_bump):
    from flash_attn_interface import _flash_attn_backward

    for over, exc, message in BAD_LOWLEVEL_BWD:
        with pytest.raises(exc, match=message):
            _flash_attn_backward(**_lowlevel_bwd_args(**over))
    q, k, v, dout = (_rand(2, 5, 2, 16) for _ in range(4))
    from flash_attn_interface import _flash_attn_forward
    out, lse, *_ = _flash_attn_forward(q, k, v, causal=True)
    dq, dk = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    _flash_attn_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, is_causal=True)  # dv left None
    # against float64 autograd of causal softmax attention
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / 16 ** 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v64)
    want_dq, want_dk = torch.autograd.grad(ref, (q64, k64), dout.double())
    torch.testing.assert_close(dq.double(), want_dq, atol=2e-3, rtol=0)
    torch.testing.assert_close(dk.double(), want_dk, atol=2e-3, rtol=0)


def test_lowlevel_backward_is_still_the_custom_op():
    from flash_attn_interface import _flash_attn_backward

    assert isinstance(_flash_attn_backward, torch._library.custom_ops.CustomOpDef)
    assert _flash_attn_backward._opoverload is torch.ops.flash_attn_3._flash_attn_backward.default
    copy.copy(_flash_attn_backward)


@pytest.mark.parametrize("over,exc,message", BAD_LOWLEVEL_BWD)
def test_lowlevel_backward_errors(over, exc, message):
    from flash_attn_interface import _flash_attn_backward

    with pytest.raises(exc, match=message):
        _flash_attn_backward(**_lowlevel_bwd_args(**over))


def test_kvcache_ignores_descriptions_of_absent_inputs(fa, device):
    """Officially rotary_seqlens is read only with rotary_cos/sin, cu_seqlens_k_new only with new k/v."""
    q, k_cache, v_cache = _rand(2, 1, 4, 16).to(device), _rand(2, 8, 2, 16).to(device), _rand(2, 8, 2, 16).to(device)
    seqlens = torch.tensor([3, 5], dtype=torch.int32, device=device)
    plain = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
    described = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, rotary_seqlens=seqlens,
                                           cu_seqlens_k_new=torch.tensor([0, 1, 2], dtype=torch.int32, device=device))
    assert torch.equal(plain, described)
    k_new, v_new = _rand(2, 1, 2, 16).to(device), _rand(2, 1, 2, 16).to(device)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    outs = [fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens, **extra)
            for (kc, vc), extra in zip(caches, ({}, {"rotary_seqlens": seqlens}))]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])

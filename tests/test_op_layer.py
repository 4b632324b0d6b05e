"""The official op layer: `torch.ops.flash_attn_3.fwd / bwd / fwd_combine / get_scheduler_metadata`
(the official build's schemas) and the official Python custom ops `_flash_attn_forward` /
`_flash_attn_backward`, called the way PyTorch's FA3 switch (`torch/nn/attention/_fa3.py`) and
op-level clients call them: positionally, with the official argument lists.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._C import parse_schema

import flash_attn_3._C  # noqa: F401  (registers the ops, as clients do)

import reference_math as rm
from conftest import per_backend
from inputs import cu_seqlens, pack, paged_copy, poisoned_like, randn, rotary_tables
from tolerance import assert_grad_matches, assert_lse_matches, assert_matches_reference

OPS = torch.ops.flash_attn_3

# The official strings (hopper/flash_api.cpp's TORCH_LIBRARY block; the official Python
# interface's custom ops, whose schemas torch infers from their signatures).
OFFICIAL_SCHEMAS = {
    "fwd": (
        "flash_attn_3::fwd(Tensor q, Tensor k, Tensor v, Tensor(k_new!)? k_new=None, "
        "Tensor(v_new!)? v_new=None, Tensor? q_v=None, Tensor(out!)? out=None, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, "
        "Tensor? seqused_q=None, Tensor? seqused_k=None, int? max_seqlen_q=None, int? max_seqlen_k=None, "
        "Tensor? page_table=None, Tensor? kv_batch_idx=None, Tensor? leftpad_k=None, Tensor? rotary_cos=None, "
        "Tensor? rotary_sin=None, Tensor? seqlens_rotary=None, Tensor? q_descale=None, Tensor? k_descale=None, "
        "Tensor? v_descale=None, float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, "
        "int window_size_right=-1, int attention_chunk=0, float softcap=0., bool is_rotary_interleaved=False, "
        "Tensor? scheduler_metadata=None, int num_splits=0, bool? pack_gqa=None, int sm_margin=0) "
        "-> (Tensor(out!), Tensor, Tensor, Tensor)"),
    "bwd": (
        "flash_attn_3::bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
        "Tensor(dq!)? dq=None, Tensor(dk!)? dk=None, Tensor(dv!)? dv=None, Tensor? cu_seqlens_q=None, "
        "Tensor? cu_seqlens_k=None, Tensor? seqused_q=None, Tensor? seqused_k=None, int? max_seqlen_q=None, "
        "int? max_seqlen_k=None, float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, "
        "int window_size_right=-1, float softcap=0., bool deterministic=False, int sm_margin=0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"),
    "fwd_combine": (
        "flash_attn_3::fwd_combine(Tensor out_partial, Tensor lse_partial, Tensor(out!)? out=None, "
        "ScalarType? out_dtype=None) -> (Tensor(out!), Tensor)"),
    "get_scheduler_metadata": (
        "flash_attn_3::get_scheduler_metadata(int batch_size, int max_seqlen_q, int max_seqlen_k, "
        "int num_heads, int num_heads_k, int headdim, int headdim_v, ScalarType qkv_dtype, Tensor seqused_k, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, "
        "Tensor? seqused_q=None, Tensor? leftpad_k=None, int? page_size=None, int max_seqlen_k_new=0, "
        "bool is_causal=False, int window_size_left=-1, int window_size_right=-1, "
        "int attention_chunk=0, bool has_softcap=False, int num_splits=0, bool? pack_gqa=None, "
        "int sm_margin=0) -> Tensor"),
    "_flash_attn_forward": (
        "flash_attn_3::_flash_attn_forward(Tensor q, Tensor k, Tensor v, Tensor? k_new=None, "
        "Tensor? v_new=None, Tensor? qv=None, Tensor? out_=None, Tensor? cu_seqlens_q=None, "
        "Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, Tensor? seqused_q=None, "
        "Tensor? seqused_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, "
        "Tensor? page_table=None, Tensor? kv_batch_idx=None, Tensor? leftpad_k=None, "
        "Tensor? rotary_cos=None, Tensor? rotary_sin=None, Tensor? seqlens_rotary=None, "
        "Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, "
        "float? softmax_scale=None, bool causal=False, SymInt window_size_left=-1, "
        "SymInt window_size_right=-1, SymInt attention_chunk=0, float softcap=0., "
        "bool rotary_interleaved=True, Tensor? scheduler_metadata=None, SymInt num_splits=1, "
        "bool? pack_gqa=None, SymInt sm_margin=0) -> (Tensor, Tensor, Tensor, Tensor)"),
    "_flash_attn_backward": (
        "flash_attn_3::_flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor softmax_lse, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? sequed_q=None, "
        "Tensor? sequed_k=None, SymInt? max_seqlen_q=None, SymInt? max_seqlen_k=None, "
        "Tensor(a12!)? dq=None, Tensor(a13!)? dk=None, Tensor(a14!)? dv=None, float? softmax_scale=None, "
        "bool is_causal=False, SymInt window_size_left=-1, SymInt window_size_right=-1, float softcap=0., "
        "bool deterministic=False, SymInt sm_margin=0) -> Tensor"),
}


@pytest.mark.parametrize("name", list(OFFICIAL_SCHEMAS))
def test_schema_is_backward_compatible_with_the_official_one(name):
    ours = getattr(OPS, name).default._schema
    assert ours.is_backward_compatible_with(parse_schema(OFFICIAL_SCHEMAS[name])), str(ours)


def test_importing_the_op_module_is_cheap():
    code = ("import sys, flash_attn_3._C, torch; "
            "assert hasattr(torch.ops.flash_attn_3, 'fwd') and hasattr(torch.ops.flash_attn_3, 'bwd'); "
            "assert 'triton' not in sys.modules, 'importing flash_attn_3._C imported triton'")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_build_config_names_the_official_flags():
    import flash_attn_config

    from flash_attn_3 import dispatch
    from flash_attn_3.flash_attn_config import CONFIG

    flags = flash_attn_config.CONFIG["build_flags"]
    assert CONFIG is flash_attn_config.CONFIG
    for feature in ("BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16",
                    "FP8", "VARLEN", "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x"):
        assert isinstance(flags[f"FLASHATTENTION_DISABLE_{feature}"], bool)
    # Truthful: a feature the triton backend refuses would be a disabled flag.
    assert flags["FLASHATTENTION_DISABLE_BACKWARD"] == (dispatch.CAPABILITIES["triton"]["backward"] is not None)
    assert flags["FLASHATTENTION_DISABLE_PAGEDKV"] == (dispatch.CAPABILITIES["triton"]["paged_kv"] is not None)


# ---------------------------------------------------------------------------------------------
# The calls PyTorch's FA3 switch makes (torch/nn/attention/_fa3.py), positionally.


def _fwd_args(q, k, v, *, out=None, cu_q=None, cu_k=None, seqused_k=None, max_q=None, max_k=None,
              scale=None, causal=False, left=-1, right=-1, num_splits=0, **extra):
    """fwd's 34 arguments in the official order, as _fa3_run_forward passes them."""
    args = [q, k, v, extra.get("k_new"), extra.get("v_new"), None, out, cu_q, cu_k, extra.get("cu_new"),
            None, seqused_k, max_q, max_k, extra.get("page_table"), extra.get("kv_batch_idx"),
            extra.get("leftpad_k"), extra.get("rotary_cos"), extra.get("rotary_sin"), extra.get("seqlens_rotary"),
            None, None, None, scale, causal, left, right, 0, 0.0, extra.get("interleaved", True),
            extra.get("scheduler_metadata"), num_splits, None, 0]
    assert len(args) == 34
    return args


def _sdpa_like(batch, seqlen, heads, d, dtype, device):
    """A (B, S, H, D) view of a (B, H, S, D) tensor: what SDPA hands the switch."""
    return randn(batch, heads, seqlen, d, dtype=dtype, device=device).transpose(1, 2)


FWD_CASES = [dict(causal=c, heads=h, dtype=dt) for c, h, dt in
             [(False, (4, 4), torch.float16), (True, (4, 2), torch.bfloat16), (True, (4, 1), torch.float16)]]
TINY = [dict(causal=True, heads=(2, 1), dtype=torch.bfloat16)]


@pytest.mark.parametrize("backend,case", per_backend(FWD_CASES, TINY))
def test_fwd_and_bwd_as_the_sdpa_switch_calls_them(fa, case, device):
    batch, seqlen_q, seqlen_k, d = 2, 37, 45, 32
    (hq, hk), dtype, causal = case["heads"], case["dtype"], case["causal"]
    q = _sdpa_like(batch, seqlen_q, hq, d, dtype, device)
    k, v = (_sdpa_like(batch, seqlen_k, hk, d, dtype, device) for _ in range(2))
    out_bhsd = poisoned_like((batch, hq, seqlen_q, d), dtype, device)
    out = out_bhsd.transpose(1, 2)
    result, lse, out_accum, lse_accum = OPS.fwd(*_fwd_args(q, k, v, out=out, max_q=seqlen_q, max_k=seqlen_k,
                                                           causal=causal))
    assert result.data_ptr() == out.data_ptr() and result.stride() == out.stride()
    assert out_accum.numel() == 0 and lse_accum.numel() == 0
    ref, ref_lse = rm.attention_dense(q, k, v, causal=causal)
    ref_lowp, _ = rm.attention_dense(q, k, v, causal=causal, lowp=True)
    assert_matches_reference("out", out_bhsd.transpose(1, 2), ref, ref_lowp)
    assert_lse_matches("lse", lse, ref_lse)

    dout = _sdpa_like(batch, seqlen_q, hq, d, dtype, device)
    # As the switch allocates them: empty_like keeps the (B, H, S, D) strides; poisoned.
    grads = [torch.empty_like(t).fill_(float("nan")) for t in (q, k, v)]
    returned = OPS.bwd(dout, q, k, v, out, lse, *grads, None, None, None, None, seqlen_q, seqlen_k, None,
                       causal, -1, -1, 0.0, False, 0)
    assert len(returned) == 5
    softmax_d = returned[0]
    torch.testing.assert_close(softmax_d, (dout.float() * out.float()).sum(-1).transpose(1, 2), atol=3e-2, rtol=1e-2)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lowp_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(rm.attention_dense(*leaves, causal=causal)[0], leaves, dout.double())
    base = torch.autograd.grad(rm.attention_dense(*lowp_leaves, causal=causal, lowp=True)[0], lowp_leaves, dout)
    for name, got, w, b in zip("qkv", grads, want, base):
        assert_grad_matches(f"d{name}", got, w, b)


@pytest.mark.parametrize("backend,case", per_backend([dict(causal=True), dict(causal=False)], [dict(causal=True)]))
def test_fwd_varlen_as_varlen_attn_calls_it(fa, case, device):
    lengths_q, lengths_k, hq, hk, d = [5, 0, 19], [7, 3, 19], 4, 2, 32
    dtype = torch.bfloat16
    q = randn(sum(lengths_q), hq, d, dtype=dtype, device=device)
    k, v = (randn(sum(lengths_k), hk, d, dtype=dtype, device=device) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)
    out, lse, *_ = OPS.fwd(*_fwd_args(q, k, v, cu_q=cu_q, cu_k=cu_k, max_q=max(lengths_q), max_k=max(lengths_k),
                                      scale=0.3, causal=case["causal"]))
    kw = dict(causal=case["causal"], softmax_scale=0.3)
    ref, ref_lse = rm.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    ref_lowp, _ = rm.attention_varlen(q, k, v, cu_q, cu_k, lowp=True, **kw)
    assert_matches_reference("out", out, ref, ref_lowp)
    assert_lse_matches("lse", lse, ref_lse)


@pytest.mark.parametrize("backend,case", per_backend([dict(paged=False), dict(paged=True)], [dict(paged=True)]))
def test_fwd_kvcache_form_appends_with_rotary(fa, case, device):
    """fwd with k_new / v_new: k, v are the cache, seqused_k its lengths; the new tokens are
    rotated and written in place; kv_batch_idx picks cache rows (page-table rows when paged)."""
    batch, capacity, hq, hk, d, new = 2, 32, 4, 2, 32, 3
    dtype = torch.float16
    q = randn(batch, new, hq, d, dtype=dtype, device=device)
    k_new, v_new = (randn(batch, new, hk, d, dtype=dtype, device=device) for _ in range(2))
    rows = [randn(batch + 1, capacity, hk, d, dtype=dtype, device=device) for _ in range(2)]
    cache_seqlens = torch.tensor([4, 20], dtype=torch.int32, device=device)
    kv_batch_idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
    cos, sin = rotary_tables(capacity, 16, dtype, device)
    extra = dict(k_new=k_new, v_new=v_new, kv_batch_idx=kv_batch_idx, rotary_cos=cos, rotary_sin=sin)
    if case["paged"]:
        (k_cache, v_cache), page_table = paged_copy(*rows, page_size=8)
        extra["page_table"] = page_table
    else:
        k_cache, v_cache = rows
    want_out, want_lse, want_k, want_v = rm.attention_kvcache(
        q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens,
        cache_batch_idx=kv_batch_idx, page_table=extra.get("page_table"), causal=True)
    lowp, *_ = rm.attention_kvcache(
        q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens,
        cache_batch_idx=kv_batch_idx, page_table=extra.get("page_table"), causal=True, lowp=True)
    out, lse, *_ = OPS.fwd(*_fwd_args(q, k_cache, v_cache, seqused_k=cache_seqlens, causal=True, **extra))
    assert_matches_reference("out", out, want_out, lowp)
    assert_lse_matches("lse", lse, want_lse)
    torch.testing.assert_close(k_cache, want_k.to(dtype), atol=1e-3, rtol=1e-3)
    assert torch.equal(v_cache, want_v)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fwd_combine_and_scheduler_metadata(fa, device):
    splits, batch, seqlen, heads, d = 3, 2, 5, 2, 16
    out_partial = torch.randn(splits, batch, seqlen, heads, d, device=device)
    lse_partial = torch.randn(splits, batch, seqlen, heads, device=device)
    lse_partial[0, 0, 0] = float("-inf")  # an empty split
    out = poisoned_like((batch, seqlen, heads, d), torch.bfloat16, device)
    result, lse = OPS.fwd_combine(out_partial, lse_partial, out, torch.bfloat16)
    assert result.data_ptr() == out.data_ptr()
    want, want_lse = rm.combine(out_partial, lse_partial)
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    fresh, _ = OPS.fwd_combine(out_partial, lse_partial)
    assert fresh.dtype == torch.float32

    cache_seqlens = torch.tensor([9, 30], dtype=torch.int32, device=device)
    metadata = OPS.get_scheduler_metadata(batch, 1, 32, 4, 2, 32, 32, torch.float16, cache_seqlens, None, None,
                                          None, None, None, None, 0, True, -1, -1, 0, False, 0, None, 0)
    assert metadata.dtype == torch.int32 and metadata.device == cache_seqlens.device
    q = randn(batch, 1, 4, 32, dtype=torch.float16, device=device)
    k_cache, v_cache = (randn(batch, 32, 2, 32, dtype=torch.float16, device=device) for _ in range(2))
    plain, *_ = OPS.fwd(*_fwd_args(q, k_cache, v_cache, seqused_k=cache_seqlens, causal=True))
    scheduled, *_ = OPS.fwd(*_fwd_args(q, k_cache, v_cache, seqused_k=cache_seqlens, causal=True,
                                       scheduler_metadata=metadata))
    torch.testing.assert_close(plain, scheduled, atol=0, rtol=0)


def test_the_ops_refuse_as_the_public_functions_do():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match=r"q must have dtype"):
        OPS.fwd(q, q, q)
    k_cache = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    before = k_cache.clone()
    k_new = torch.randn(1, 2, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"k and v must be given together"):
        OPS.fwd(torch.randn(1, 2, 2, 16, dtype=torch.float16), k_cache, k_cache.clone(), k_new, None,
                seqused_k=torch.tensor([2], dtype=torch.int32))
    assert torch.equal(k_cache, before), "a refused call wrote into the cache"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rotary_table_shorter_than_a_contiguous_cache_is_accepted(fa, device):
    """Officially only a paged cache needs cos/sin rows for its whole capacity (spec section 7).
    Within the table the keys rotate as usual; past it they stay unrotated (no kernel reads
    past the table)."""
    q = randn(2, 1, 2, 32, dtype=torch.float16, device=device)
    k_cache, v_cache = (randn(2, 64, 1, 32, dtype=torch.float16, device=device) for _ in range(2))
    k_new, v_new = (randn(2, 1, 1, 32, dtype=torch.float16, device=device) for _ in range(2))
    cos, sin = rotary_tables(16, 16, torch.float16, device)
    lens = torch.tensor([10, 40], dtype=torch.int32, device=device)  # row 1 appends past the table
    want, _, want_k, _ = rm.attention_kvcache(q[:1], k_cache[:1], v_cache[:1], k_new[:1], v_new[:1],
                                              rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens[:1], causal=True)
    out, *_ = OPS.fwd(*_fwd_args(q, k_cache, v_cache, seqused_k=lens, causal=True, k_new=k_new, v_new=v_new,
                                 rotary_cos=cos, rotary_sin=sin))
    torch.testing.assert_close(out[:1].double(), want, atol=2e-3, rtol=0)
    torch.testing.assert_close(k_cache[:1].double(), want_k.double(), atol=1e-3, rtol=1e-3)
    assert torch.equal(k_cache[1, 40], k_new[1, 0]), "a key past the table must stay unrotated"
    (pk, pv), table = paged_copy(k_cache, v_cache, page_size=16)
    with pytest.raises(ValueError, match=r"rotary_cos/rotary_sin must cover every position of a paged cache"):
        OPS.fwd(*_fwd_args(q, pk, pv, seqused_k=lens, causal=True, k_new=k_new, v_new=v_new, rotary_cos=cos,
                           rotary_sin=sin, page_table=table))


def test_official_python_custom_ops():
    import flash_attn_interface as fa

    q, k, v = (randn(2, 9, 2, 16, dtype=torch.bfloat16, device="cpu").requires_grad_() for _ in range(3))
    out, lse, *_ = fa._flash_attn_forward(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(fa.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, atol=0, rtol=0)
    buffer = poisoned_like(out.shape, out.dtype, "cpu")
    again, *_ = fa._flash_attn_forward(q.detach(), k.detach(), v.detach(), out_=buffer, causal=True)
    torch.testing.assert_close(buffer, out.detach(), atol=0, rtol=0)
    torch.testing.assert_close(again, out.detach(), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# torch.library contracts


def _opcheck_cases():
    q, k, v = (randn(2, 6, 2, 16, dtype=torch.float16, device="cpu") for _ in range(3))
    out, lse, *_ = OPS.fwd(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    parts = torch.randn(3, 2, 4, 2, 16), torch.randn(3, 2, 4, 2)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    # fwd and fwd_combine return `out` aliased beside fresh tensors: PyTorch's functionalization
    # refuses that for any custom op ("Unsupported schema"), the official build's included, so
    # their opcheck leaves out test_aot_dispatch_dynamic (docs/compatibility.md).
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    return [
        (OPS.fwd.default, (q, k, v), dict(is_causal=True), no_aot),
        (OPS.fwd.default, (q, k, v), dict(out=torch.empty_like(q)), no_aot),
        (OPS.bwd.default, (dout, q, k, v, out, lse, *grads), dict(is_causal=True), None),
        (OPS.fwd_combine.default, parts, {}, no_aot),
        (OPS.fwd_combine.default, parts, dict(out=torch.empty(2, 4, 2, 16)), no_aot),
        (OPS.get_scheduler_metadata.default, (2, 1, 6, 2, 2, 16, 16, torch.float16, lens), {}, None),
        (OPS._flash_attn_forward.default, (q.clone().requires_grad_(), k, v), dict(causal=True), None),
        (OPS._flash_attn_backward.default, (dout, q, k, v, out, lse),
         dict(dq=grads[0], dk=grads[1], dv=grads[2], is_causal=True), None),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args, kwargs, test_utils = _opcheck_cases()[case]
    if test_utils is None:
        torch.library.opcheck(op, args, kwargs)
    else:
        torch.library.opcheck(op, args, kwargs, test_utils=test_utils)


def test_export_keeps_the_official_op():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.flash_attn_3.fwd(q, k, v, is_causal=True)[0]

    q = randn(1, 8, 2, 16, dtype=torch.float16, device="cpu")
    program = torch.export.export(Layer(), (q, q.clone(), q.clone()))
    assert "flash_attn_3.fwd" in program.graph_module.code
    torch.testing.assert_close(program.module()(q, q, q), Layer()(q, q, q), atol=0, rtol=0)


def test_compiled_official_python_forward():
    import flash_attn_interface as fa

    q, k, v = (randn(1, 8, 2, 16, dtype=torch.float16, device="cpu") for _ in range(3))
    compiled = torch.compile(lambda q, k, v: fa._flash_attn_forward(q, k, v, causal=True)[0], fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fa.flash_attn_func(q, k, v, causal=True), atol=0, rtol=0)


def test_info_names_the_ways_in(capsys):
    """`python -m flash_attn_3 info` lists the official ops and says whether PyTorch's switch
    can use this device, and why not."""
    from flash_attn_3 import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch.ops.flash_attn_3.{fwd, bwd, fwd_combine, get_scheduler_metadata" in out
    assert "PyTorch's FA3 switch: " in out
    if not torch.cuda.is_available():
        assert "needs a CUDA sm_90 GPU" in out

"""The ops the official FlashAttention-3 build registers, under their official names and schemas.

- `flash_attn_3::fwd`, `bwd`, `fwd_combine`, `get_scheduler_metadata`: the schemas of the official
  `TORCH_LIBRARY(flash_attn_3, m)` block (hopper/flash_api.cpp). PyTorch's own FA3 switch
  (`torch.nn.attention.activate_flash_attention_impl("FA3")`) and op-level clients call these.
- `flash_attn_3::_flash_attn_forward` / `_flash_attn_backward`: the custom ops the official Python
  interface registers; `flash_attn_interface._flash_attn_forward` is that op, as officially.

Each reaches the kernels through lowlevel.py / interface.py, the path our public functions take,
so validation, backend choice and refusal reasons are the same. Registered for every device
(CompositeExplicitAutograd): the dispatcher in dispatch.py picks Triton, reference or MATE.

What PyTorch cannot do with the official schemas, and so neither can we: `fwd` and `fwd_combine`
return `out` aliased next to fresh tensors, which functionalization refuses for custom ops, so
torch.compile / export's run_decompositions cannot trace a direct call of them (eager, CUDA
graphs and torch.export's training IR can). The official `fwd` schema marks k_new / v_new as
mutated; what an append changes is the cache, k and v.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import interface, lowlevel, ops
from .metadata import metadata_shape

FWD_SCHEMA = (
    "fwd(Tensor q, Tensor k, Tensor v, Tensor(k_new!)? k_new=None, Tensor(v_new!)? v_new=None, "
    "Tensor? q_v=None, Tensor(out!)? out=None, Tensor? cu_seqlens_q=None, "
    "Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, Tensor? seqused_q=None, "
    "Tensor? seqused_k=None, int? max_seqlen_q=None, int? max_seqlen_k=None, "
    "Tensor? page_table=None, Tensor? kv_batch_idx=None, Tensor? leftpad_k=None, "
    "Tensor? rotary_cos=None, Tensor? rotary_sin=None, Tensor? seqlens_rotary=None, "
    "Tensor? q_descale=None, Tensor? k_descale=None, Tensor? v_descale=None, "
    "float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, "
    "int window_size_right=-1, int attention_chunk=0, float softcap=0.0, "
    "bool is_rotary_interleaved=False, Tensor? scheduler_metadata=None, int num_splits=0, "
    "bool? pack_gqa=None, int sm_margin=0) -> (Tensor(out!), Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
    "Tensor(dq!)? dq=None, Tensor(dk!)? dk=None, Tensor(dv!)? dv=None, "
    "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? seqused_q=None, "
    "Tensor? seqused_k=None, int? max_seqlen_q=None, int? max_seqlen_k=None, "
    "float? softmax_scale=None, bool is_causal=False, int window_size_left=-1, "
    "int window_size_right=-1, float softcap=0.0, bool deterministic=False, int sm_margin=0) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
FWD_COMBINE_SCHEMA = (
    "fwd_combine(Tensor out_partial, Tensor lse_partial, Tensor(out!)? out=None, "
    "ScalarType? out_dtype=None) -> (Tensor(out!), Tensor)"
)
GET_SCHEDULER_METADATA_SCHEMA = (
    "get_scheduler_metadata(int batch_size, int max_seqlen_q, int max_seqlen_k, int num_heads, "
    "int num_heads_k, int headdim, int headdim_v, ScalarType qkv_dtype, Tensor seqused_k, "
    "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? cu_seqlens_k_new=None, "
    "Tensor? seqused_q=None, Tensor? leftpad_k=None, int? page_size=None, int max_seqlen_k_new=0, "
    "bool is_causal=False, int window_size_left=-1, int window_size_right=-1, "
    "int attention_chunk=0, bool has_softcap=False, int num_splits=0, bool? pack_gqa=None, "
    "int sm_margin=0) -> Tensor"
)

# Kept alive for as long as the module: the registrations go with the Library object.
_LIBRARY = torch.library.Library("flash_attn_3", "FRAGMENT")


def _register(schema: str, impl, fake) -> None:
    """Define `schema` and register impl (all devices) and fake. The dispatcher hands a Python
    kernel its arguments positionally and drops trailing ones left at their default, so both
    get the full official argument list, defaults filled in from the schema."""
    name = schema[: schema.index("(")]
    _LIBRARY.define(schema)
    defaults = [arg.default_value for arg in getattr(torch.ops.flash_attn_3, name).default._schema.arguments]

    def full(args):
        return (*args, *defaults[len(args):])

    def kernel(*args):
        # A kernel below autograd: outputs carry no graph, like the official CUDA kernels'.
        with torch.no_grad():
            return impl(*full(args))

    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"flash_attn_3::{name}", lambda *args: fake(*full(args)), lib=_LIBRARY)


def _empties(like: Tensor, count: int) -> list:
    """Distinct empty fp32 tensors, where the official op returns what we do not keep (outputs
    may not alias each other)."""
    return [lowlevel.empty_like(like) for _ in range(count)]


def _fwd_fake(q, k, v, k_new, v_new, q_v, out, cu_seqlens_q, *rest):
    out_shape, out_dtype, lse_shape = ops.forward_shapes(q, v, cu_seqlens_q is not None)
    result = out if out is not None else q.new_empty(out_shape, dtype=out_dtype)
    return result, q.new_empty(lse_shape, dtype=torch.float32), *_empties(q, 2)


def _bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_q,
         seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, window_size_left,
         window_size_right, softcap, deterministic, sm_margin):
    lowlevel.backward(
        dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
        max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, is_causal, window_size_left,
        window_size_right, softcap, deterministic, sm_margin)
    # (softmax_d, softmax_lse_log2, dq_accum, dk_accum, dv_accum): we keep no log2 LSE or
    # accumulators.
    return lowlevel.softmax_d(dout, out, cu_seqlens_q is not None), *_empties(q, 4)


def _softmax_d_shape(dout, cu_seqlens_q):
    return (dout.shape[1], dout.shape[0]) if cu_seqlens_q is not None else (dout.shape[0], dout.shape[2], dout.shape[1])


def _bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, *rest):
    return q.new_empty(_softmax_d_shape(dout, cu_seqlens_q), dtype=torch.float32), *_empties(q, 4)


def _fwd_combine_fake(out_partial, lse_partial, out, out_dtype):
    result = out if out is not None else out_partial.new_empty(
        out_partial.shape[1:], dtype=out_dtype if out_dtype is not None else out_partial.dtype)
    return result, lse_partial.new_empty(lse_partial.shape[1:])


def _fwd_combine(out_partial, lse_partial, out, out_dtype):
    # The official default output dtype is out_partial's (fp32).
    return interface.flash_attn_combine(out_partial, lse_partial, out, out_dtype)


def _get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_heads_k,
                            headdim, headdim_v, qkv_dtype, seqused_k, cu_seqlens_q, cu_seqlens_k,
                            cu_seqlens_k_new, seqused_q, leftpad_k, page_size, max_seqlen_k_new,
                            is_causal, window_size_left, window_size_right, attention_chunk,
                            has_softcap, num_splits, pack_gqa, sm_margin):
    # cu_seqlens_k and seqused_q describe layouts our kvcache entry does not take; the schedule
    # depends only on the cache lengths, so they change nothing here.
    return interface.get_scheduler_metadata(
        batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_heads_k, headdim, seqused_k,
        qkv_dtype, headdim_v, cu_seqlens_q, cu_seqlens_k_new, leftpad_k, page_size,
        max_seqlen_k_new, is_causal, (window_size_left, window_size_right), attention_chunk,
        has_softcap, num_splits, pack_gqa, sm_margin)


def _get_scheduler_metadata_fake(batch_size, *rest):
    seqused_k = rest[7]
    return seqused_k.new_empty(metadata_shape(batch_size), dtype=torch.int32)


_register(FWD_SCHEMA, lowlevel.forward, _fwd_fake)
_register(BWD_SCHEMA, _bwd, _bwd_fake)
_register(FWD_COMBINE_SCHEMA, _fwd_combine, _fwd_combine_fake)
_register(GET_SCHEDULER_METADATA_SCHEMA, _get_scheduler_metadata, _get_scheduler_metadata_fake)


# The official Python interface's custom ops: schemas inferred from these signatures, as
# officially (same names, order, types and defaults).
@torch.library.custom_op("flash_attn_3::_flash_attn_forward", mutates_args=())
def _flash_attn_forward(
    q: Tensor, k: Tensor, v: Tensor, k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None, qv: Optional[Tensor] = None, out_: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    cu_seqlens_k_new: Optional[Tensor] = None, seqused_q: Optional[Tensor] = None,
    seqused_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None, page_table: Optional[Tensor] = None,
    kv_batch_idx: Optional[Tensor] = None, leftpad_k: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
    seqlens_rotary: Optional[Tensor] = None, q_descale: Optional[Tensor] = None,
    k_descale: Optional[Tensor] = None, v_descale: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size_left: int = -1,
    window_size_right: int = -1, attention_chunk: int = 0, softcap: float = 0.0,
    rotary_interleaved: bool = True, scheduler_metadata: Optional[Tensor] = None,
    num_splits: int = 1, pack_gqa: Optional[bool] = None, sm_margin: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    result = lowlevel.forward(
        q, k, v, k_new, v_new, qv, out_, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
        seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos,
        rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale, softmax_scale, causal,
        window_size_left, window_size_right, attention_chunk, softcap, rotary_interleaved,
        scheduler_metadata, num_splits, pack_gqa, sm_margin)
    # out_ holds the result now; a custom op may not return its own input, so the returned out
    # is a copy (the official op, returning out_ itself, fails that torch check).
    return (result[0].clone() if out_ is not None else result[0], *result[1:])


@_flash_attn_forward.register_fake
def _(q, k, v, k_new=None, v_new=None, qv=None, out_=None, cu_seqlens_q=None, *rest, **kwargs):
    if out_ is not None:
        raise TypeError("tracing (torch.compile / torch.export) with a pre-allocated out_ is not supported, "
                        "as officially: pass out_=None")
    return _fwd_fake(q, k, v, k_new, v_new, qv, None, cu_seqlens_q)


_FORWARD_NAMES = [arg.name for arg in _flash_attn_forward._opoverload._schema.arguments]
# Arguments whose gradient the official backward does not compute.
_FORWARD_NO_BACKWARD = ("k_new", "qv", "page_table", "kv_batch_idx", "leftpad_k", "rotary_cos")


def _forward_setup_context(ctx, inputs, output):
    named = dict(zip(_FORWARD_NAMES, inputs))
    out, lse, *_ = output
    ctx.save_for_backward(named["q"], named["k"], named["v"], out, lse,
                          *(named[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")))
    ctx.scalars = tuple(named[n] for n in ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal",
                                           "window_size_left", "window_size_right", "softcap", "sm_margin"))
    ctx.refused = [n for n in _FORWARD_NO_BACKWARD if named[n] is not None]
    if named["attention_chunk"]:
        ctx.refused.append("attention_chunk")


def _forward_backward(ctx, dout, *_):
    if ctx.refused:
        raise NotImplementedError("flash_attn_3 backward does not support " + ", ".join(ctx.refused)
                                  + " (the official FlashAttention-3 backward does not either)")
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, softmax_scale, causal, left, right, softcap, sm_margin = ctx.scalars
    dq, dk, dv = lowlevel.backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
        max_seqlen_k, None, None, None, softmax_scale, causal, left, right, softcap, False, sm_margin)
    return (dq, dk, dv) + (None,) * (len(_FORWARD_NAMES) - 3)


_flash_attn_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


@torch.library.custom_op("flash_attn_3::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
def _flash_attn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    sequed_q: Optional[Tensor] = None, sequed_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
    dq: Optional[Tensor] = None, dk: Optional[Tensor] = None, dv: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None, is_causal: bool = False, window_size_left: int = -1,
    window_size_right: int = -1, softcap: float = 0.0, deterministic: bool = False,
    sm_margin: int = 0,
) -> Tensor:
    lowlevel.backward(
        dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
        max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, is_causal, window_size_left,
        window_size_right, softcap, deterministic, sm_margin)
    return lowlevel.softmax_d(dout, out, cu_seqlens_q is not None)


_NAMES = [a.name for a in _flash_attn_backward._opoverload._schema.arguments]
_V_AT, _DV_AT = _NAMES.index("v"), _NAMES.index("dv")


class _BackwardOpDef(type(_flash_attn_backward)):
    """The op, with dv given a buffer when the caller leaves it None (the official kernel then
    allocates one it never returns, so nothing changes for the caller). Before 2.13 torch bumps
    the version counters of an op's mutated arguments by index into the arguments the dispatcher
    passes on, from which it strips the trailing ones left at their default: with dv and
    everything after it at their defaults, dv's index is past the end, an IndexError before the
    op runs (torch 2.11 on the device, 2026-12-07). A non-default dv keeps every mutated index in
    range."""

    def __call__(self, *args, **kwargs):
        positional = len(args) > _DV_AT
        v = args[_V_AT] if len(args) > _V_AT else kwargs.get("v")
        if (args[_DV_AT] if positional else kwargs.get("dv")) is None and isinstance(v, Tensor):
            if positional:
                args = (*args[:_DV_AT], torch.empty_like(v), *args[_DV_AT + 1:])
            else:
                kwargs["dv"] = torch.empty_like(v)
        return super().__call__(*args, **kwargs)


# A subclass, so the object is still the CustomOpDef that opcheck / register_fake take.
_flash_attn_backward.__class__ = _BackwardOpDef


@_flash_attn_backward.register_fake
def _(dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, *rest, **kwargs):
    return q.new_empty(_softmax_d_shape(dout, cu_seqlens_q), dtype=torch.float32)

"""The op layer: torch.library custom ops in the `flash_attn_3` namespace.

Every public function funnels into these: one functional forward op (with fake implementation and
autograd), one backward op, one in-place KV append op, one combine op and one scheduler-metadata op.
The KV append lives in its own op because an op that mutates its inputs cannot carry an autograd
formula, and keeping the forward functional lets torch.compile trace training without graph breaks.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .backends.params import AttnArgs
from .metadata import metadata_shape

_LIB = "flash_attn_3"


def _args(
    q, k, v, qv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
    page_table, kv_batch_idx, leftpad_k, q_descale, k_descale, v_descale, sinks, softmax_scale,
    window_size_left, window_size_right, attention_chunk, softcap, num_splits, pack_gqa,
    cp_world_size, cp_rank, cp_tot_seqused_k, scheduler_metadata,
) -> AttnArgs:
    return AttnArgs(
        q=q, k=k, v=v, qv=qv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, page_table=page_table, kv_batch_idx=kv_batch_idx,
        leftpad_k=leftpad_k, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        sinks=sinks, softmax_scale=softmax_scale, window_left=window_size_left,
        window_right=window_size_right, attention_chunk=attention_chunk, softcap=softcap,
        num_splits=num_splits, pack_gqa=pack_gqa, cp_world_size=cp_world_size, cp_rank=cp_rank,
        cp_tot_seqused_k=cp_tot_seqused_k, scheduler_metadata=scheduler_metadata,
    )


def _forward_impl(
    q: Tensor, k: Tensor, v: Tensor, qv: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, page_table: Optional[Tensor],
    kv_batch_idx: Optional[Tensor], leftpad_k: Optional[Tensor], q_descale: Optional[Tensor],
    k_descale: Optional[Tensor], v_descale: Optional[Tensor], sinks: Optional[Tensor],
    softmax_scale: float, window_size_left: int, window_size_right: int, attention_chunk: int,
    softcap: float, num_splits: int, pack_gqa: Optional[bool], cp_world_size: int, cp_rank: int,
    cp_tot_seqused_k: Optional[Tensor], scheduler_metadata: Optional[Tensor], deterministic: bool,
    sm_margin: int,
) -> tuple[Tensor, Tensor]:
    a = _args(
        q, k, v, qv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
        page_table, kv_batch_idx, leftpad_k, q_descale, k_descale, v_descale, sinks, softmax_scale,
        window_size_left, window_size_right, attention_chunk, softcap, num_splits, pack_gqa,
        cp_world_size, cp_rank, cp_tot_seqused_k, scheduler_metadata,
    )
    return dispatch.backend_for("forward", a).forward(a)


_flash_attn_forward = torch.library.custom_op(f"{_LIB}::_flash_attn_forward", mutates_args=())(_forward_impl)


def _forward_shapes(q: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor]):
    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return out_shape, out_dtype, lse_shape


@_flash_attn_forward.register_fake
def _(q, k, v, qv, cu_seqlens_q, *rest):
    out_shape, out_dtype, lse_shape = _forward_shapes(q, v, cu_seqlens_q)
    return q.new_empty(out_shape, dtype=out_dtype), q.new_empty(lse_shape, dtype=torch.float32)


# Position of each forward-op input, for setup_context / backward.
_FWD_INPUTS = [
    "q", "k", "v", "qv", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "max_seqlen_q",
    "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k", "q_descale", "k_descale",
    "v_descale", "sinks", "softmax_scale", "window_size_left", "window_size_right",
    "attention_chunk", "softcap", "num_splits", "pack_gqa", "cp_world_size", "cp_rank",
    "cp_tot_seqused_k", "scheduler_metadata", "deterministic", "sm_margin",
]

# Features the official backward refuses; each (input name, test, user-facing name).
_NO_BACKWARD = [
    ("attention_chunk", lambda x: x > 0, "attention_chunk"),
    ("qv", lambda x: x is not None, "qv"),
    ("page_table", lambda x: x is not None, "paged K/V (page_table)"),
    ("kv_batch_idx", lambda x: x is not None, "cache_batch_idx"),
    ("leftpad_k", lambda x: x is not None, "cache_leftpad"),
    ("cp_world_size", lambda x: x > 1, "context parallelism (cp_world_size > 1)"),
]


def _setup_context(ctx, inputs, output):
    named = dict(zip(_FWD_INPUTS, inputs))
    out, lse = output
    ctx.save_for_backward(
        named["q"], named["k"], named["v"], out, lse, named["cu_seqlens_q"], named["cu_seqlens_k"],
        named["seqused_q"], named["seqused_k"], named["sinks"],
    )
    ctx.scalars = {
        key: named[key]
        for key in ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "window_size_left",
                    "window_size_right", "softcap", "deterministic", "sm_margin")
    }
    ctx.refused = [label for key, test, label in _NO_BACKWARD if test(named[key])]
    if named["q"].dtype == torch.float8_e4m3fn:
        ctx.refused.append("fp8 inputs")
    ctx.sinks_need_grad = named["sinks"] is not None and named["sinks"].requires_grad


def _backward(ctx, dout, dlse):
    if ctx.refused:
        raise NotImplementedError(
            "flash_attn_3 backward does not support " + ", ".join(ctx.refused)
            + " (the official FlashAttention-3 backward does not either)"
        )
    if ctx.sinks_need_grad:
        raise NotImplementedError("flash_attn_3 backward computes no gradient for sinks / s_aux")
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, sinks = ctx.saved_tensors
    s = ctx.scalars
    dq, dk, dv = _flash_attn_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
        s["max_seqlen_q"], s["max_seqlen_k"], sinks, s["softmax_scale"], s["window_size_left"],
        s["window_size_right"], s["softcap"], s["deterministic"], s["sm_margin"],
    )
    return (dq, dk, dv) + (None,) * (len(_FWD_INPUTS) - 3)


@torch.library.custom_op(f"{_LIB}::_flash_attn_backward", mutates_args=())
def _flash_attn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], seqused_q: Optional[Tensor],
    seqused_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, sinks: Optional[Tensor],
    softmax_scale: float, window_size_left: int, window_size_right: int, softcap: float,
    deterministic: bool, sm_margin: int,
) -> tuple[Tensor, Tensor, Tensor]:
    a = _args(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
        None, None, None, None, None, None, sinks, softmax_scale, window_size_left,
        window_size_right, 0, softcap, 1, None, 1, 0, None, None,
    )
    backend = dispatch.backend_for("backward", a, deterministic=deterministic)
    return backend.backward(dout.contiguous(), q, k, v, out, softmax_lse, a, deterministic)


@_flash_attn_backward.register_fake
def _(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_flash_attn_forward.register_autograd(_backward, setup_context=_setup_context)


def _append_kv_impl(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor,
    rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], cache_seqlens: Tensor,
    cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
    page_table: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k_new: Optional[Tensor], rotary_seqlens: Optional[Tensor], rotary_interleaved: bool,
    rotate_q_per_token: bool, max_seqlen_q: Optional[int],
) -> Tensor:
    """Writes the (rotated) new keys and values into the cache; returns q rotated, or an empty
    tensor when there is no rotary (an op output may not alias its input)."""
    backend = dispatch.backend_for_append(q, page_table is not None, rotary_cos is not None)
    q_rotated = backend.append_kv(
        k_cache, v_cache, k_new, v_new, q, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
        cache_leftpad, page_table, cu_seqlens_q, cu_seqlens_k_new, rotary_seqlens,
        rotary_interleaved, rotate_q_per_token, max_seqlen_q,
    )
    return q_rotated if rotary_cos is not None else q.new_empty((0,))


_append_kv = torch.library.custom_op(f"{_LIB}::_append_kv", mutates_args=("k_cache", "v_cache"))(_append_kv_impl)


@_append_kv.register_fake
def _(q, k_cache, v_cache, k_new, v_new, rotary_cos, *rest):
    return torch.empty_like(q) if rotary_cos is not None else q.new_empty((0,))


@torch.library.custom_op(f"{_LIB}::_flash_attn_combine", mutates_args=())
def _flash_attn_combine(out_partial: Tensor, lse_partial: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return dispatch.backend_for_device("combine", out_partial.device).combine(out_partial, lse_partial, out_dtype)


@_flash_attn_combine.register_fake
def _(out_partial, lse_partial, out_dtype):
    return out_partial.new_empty(out_partial.shape[1:], dtype=out_dtype), lse_partial.new_empty(lse_partial.shape[1:])


@torch.library.custom_op(f"{_LIB}::_get_scheduler_metadata", mutates_args=())
def _get_scheduler_metadata(
    batch_size: int, max_seqlen_q: int, max_seqlen_k: int, num_heads_q: int, num_heads_kv: int,
    headdim: int, headdim_v: int, cache_seqlens: Tensor, cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k_new: Optional[Tensor], cache_leftpad: Optional[Tensor], page_size: Optional[int],
    max_seqlen_k_new: int, window_size_left: int, window_size_right: int, attention_chunk: int,
    has_softcap: bool, num_splits: int, pack_gqa: Optional[bool], sm_margin: int,
) -> Tensor:
    backend = dispatch.backend_for_device("scheduler_metadata", cache_seqlens.device)
    causal = window_size_left < 0 and window_size_right == 0
    return backend.scheduler_metadata(
        batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim, headdim_v,
        cache_seqlens, cu_seqlens_q, cu_seqlens_k_new, cache_leftpad, page_size, max_seqlen_k_new,
        causal, window_size_left, window_size_right, attention_chunk, has_softcap, num_splits,
        pack_gqa, sm_margin,
    )


@_get_scheduler_metadata.register_fake
def _(batch_size, *rest):
    cache_seqlens = rest[6]
    return cache_seqlens.new_empty(metadata_shape(batch_size), dtype=torch.int32)


def plain_context() -> bool:
    """False under torch.compile, torch.jit.trace, make_fx and dispatch modes (FlopCounterMode,
    ...): they see only the custom ops, so a direct kernel call would leave their program or
    count without the attention."""
    return not (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
                or torch._C._len_torch_dispatch_stack())


def _eager(tensors) -> bool:
    """True when no autograd graph, compiler or tensor subclass needs the custom-op machinery.

    The torch.library wrappers cost tens of microseconds per call, which is most of a decode step
    at small batch; plain eager inference calls the implementation directly instead.
    """
    if not plain_context():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


def flash_attn_forward(*args) -> tuple[Tensor, Tensor]:
    if _eager(args[:4]):
        return _forward_impl(*args)
    return _flash_attn_forward(*args)


def append_kv(*args) -> Tensor:
    if _eager(args[:5]):
        return _append_kv_impl(*args)
    return _append_kv(*args)


def plan_env(is_cuda: bool):
    """What dispatch reads from the environment on every call, for the kvcache plan key."""
    if is_cuda:
        return os.environ.get(dispatch.ENV_VAR)
    return os.environ.get(dispatch.ENV_VAR), os.environ.get("TRITON_INTERPRET")


def kvcache_plan(inputs, append_args, forward_args, seqused_add: int, need_lse: bool):
    """A backend's replayable plan of an eager flash_attn_with_kvcache call, or None.

    inputs: the call's tensors as the caller passed them (the plan reads their pointers on each
    replay); append_args: append_kv's arguments or None; forward_args: flash_attn_forward's, with
    seqused_k the cache lengths, to which the plan adds seqused_add on the device. Only plain
    tensors without autograd get a plan (the replay bypasses the custom ops), and only when one
    backend runs both parts.
    """
    if any(t is not None and t.requires_grad for t in inputs):
        return None
    module = backend_args = None
    if append_args is not None:  # append_kv's order here; the backend's puts q after the cache
        q, k_cache, v_cache, k_new, v_new, *rest = append_args
        module = dispatch.backend_for_append(q, rest[5] is not None, rest[0] is not None)
        backend_args = (k_cache, v_cache, k_new, v_new, q, *rest)
    a = _args(*forward_args[:28])
    forward_module = dispatch.backend_for("forward", a, forward_args[28])
    if module not in (None, forward_module):
        return None
    make = getattr(forward_module, "kvcache_plan", None)
    return make(inputs, backend_args, a, seqused_add, need_lse) if make else None


def flash_attn_combine(out_partial: Tensor, lse_partial: Tensor, out_dtype: torch.dtype):
    if out_partial.dim() == 4:  # varlen partials (num_splits, total_q, H, D): one batch row
        out, lse = _flash_attn_combine(out_partial.unsqueeze(1), lse_partial.unsqueeze(1), out_dtype)
        return out.squeeze(0), lse.squeeze(0)
    return _flash_attn_combine(out_partial, lse_partial, out_dtype)


def get_scheduler_metadata(*args) -> Tensor:
    return _get_scheduler_metadata(*args)

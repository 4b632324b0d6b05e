"""The op layer: torch.library custom ops in the `flash_attn_3` namespace.

Our public functions funnel into these: one functional attention op (fake implementation and
autograd), its backward, an in-place KV append op, a combine op and a scheduler-metadata op. The
KV append lives in its own op because an op that mutates its inputs cannot carry an autograd
formula, and keeping the attention functional lets torch.compile trace training without graph
breaks. The attention ops take the fields of `AttnArgs` flattened in declaration order: their
schemas are generated from the dataclass, so the argument record is built once (interface.py)
and flattened only here, at the torch.library boundary. The official op names and schemas
(`fwd`, `bwd`, ...) are in official_ops.py and reach the same functions.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .backends.params import AttnArgs
from .metadata import metadata_shape

_LIB = "flash_attn_3"

# AttnArgs fields in op-schema order; `out` is a buffer to write into, which a functional op
# cannot take (the eager path passes it to the backend, the traced path copies into it).
_FLAT = tuple(f.name for f in dataclasses.fields(AttnArgs) if f.name != "out")
_SCHEMA_TYPE = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", int: "int", float: "float",
                bool: "bool", Optional[bool]: "bool?"}
_HINTS = typing.get_type_hints(AttnArgs)
_FLAT_SCHEMA = ", ".join(f"{_SCHEMA_TYPE[_HINTS[name]]} {name}" for name in _FLAT)


def _flatten(a: AttnArgs) -> tuple:
    return tuple(getattr(a, name) for name in _FLAT)


def _unflatten(args) -> AttnArgs:
    return AttnArgs(**dict(zip(_FLAT, args)))


def _attention_fwd_impl(*args) -> tuple[Tensor, Tensor]:
    a = _unflatten(args)
    return dispatch.backend_for("forward", a).forward(a)


_attention_fwd = torch.library.custom_op(
    f"{_LIB}::_attention_fwd", _attention_fwd_impl, mutates_args=(),
    schema=f"({_FLAT_SCHEMA}) -> (Tensor, Tensor)")


def forward_shapes(q: Tensor, v: Tensor, varlen_q: bool):
    """(out shape, out dtype, lse shape) of a forward call (spec section 3)."""
    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    lse_shape = (q.shape[1], q.shape[0]) if varlen_q else (q.shape[0], q.shape[2], q.shape[1])
    return out_shape, out_dtype, lse_shape


@_attention_fwd.register_fake
def _(*args):
    a = _unflatten(args)
    out_shape, out_dtype, lse_shape = forward_shapes(a.q, a.v, a.is_varlen_q)
    return a.q.new_empty(out_shape, dtype=out_dtype), a.q.new_empty(lse_shape, dtype=torch.float32)


# Features the official backward refuses: (test on AttnArgs, user-facing name).
_NO_BACKWARD = [
    (lambda a: a.attention_chunk > 0, "attention_chunk"),
    (lambda a: a.qv is not None, "qv"),
    (lambda a: a.page_table is not None, "paged K/V (page_table)"),
    (lambda a: a.kv_batch_idx is not None, "cache_batch_idx"),
    (lambda a: a.leftpad_k is not None, "cache_leftpad"),
    (lambda a: a.cp_world_size > 1, "context parallelism (cp_world_size > 1)"),
    (lambda a: a.is_fp8, "fp8 inputs"),
]


def _setup_context(ctx, inputs, output):
    a = _unflatten(inputs)
    ctx.tensor_names = [name for name in _FLAT if isinstance(getattr(a, name), Tensor)]
    ctx.save_for_backward(*output, *(getattr(a, name) for name in ctx.tensor_names))
    ctx.others = {name: getattr(a, name) for name in _FLAT if name not in ctx.tensor_names}
    ctx.refused = [label for test, label in _NO_BACKWARD if test(a)]
    ctx.sinks_need_grad = a.sinks is not None and a.sinks.requires_grad


def _backward(ctx, dout, dlse):
    if ctx.refused:
        raise NotImplementedError(
            "flash_attn_3 backward does not support " + ", ".join(ctx.refused)
            + " (the official FlashAttention-3 backward does not either)"
        )
    if ctx.sinks_need_grad:
        raise NotImplementedError("flash_attn_3 backward computes no gradient for sinks / s_aux")
    out, lse, *tensors = ctx.saved_tensors
    a = AttnArgs(**ctx.others, **dict(zip(ctx.tensor_names, tensors)))
    dq, dk, dv = _attention_bwd(dout, out, lse, *_flatten(a))
    return (dq, dk, dv) + (None,) * (len(_FLAT) - 3)


def _attention_bwd_impl(dout: Tensor, out: Tensor, softmax_lse: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    a = _unflatten(args)
    backend = dispatch.backend_for("backward", a, deterministic=a.deterministic)
    # Autograd's and compiled graphs' dout, made contiguous as it always was here (the bitwise
    # compiled == eager check depends on both taking one layout); the eager path below passes
    # the caller's strides through.
    return backend.backward(dout.contiguous(), a.q, a.k, a.v, out, softmax_lse, a, a.deterministic)


_attention_bwd = torch.library.custom_op(
    f"{_LIB}::_attention_bwd", _attention_bwd_impl, mutates_args=(),
    schema=f"(Tensor dout, Tensor out, Tensor softmax_lse, {_FLAT_SCHEMA}) -> (Tensor, Tensor, Tensor)")


@_attention_bwd.register_fake
def _(dout, out, softmax_lse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


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


def forward(a: AttnArgs) -> tuple[Tensor, Tensor]:
    """(out, lse) of the attention `a` describes; written into a.out when it is set."""
    if _eager((a.q, a.k, a.v, a.qv, a.sinks)):
        out, lse = dispatch.backend_for("forward", a).forward(a)
    else:
        out, lse = _attention_fwd(*_flatten(a))
    if a.out is not None and out is not a.out:
        a.out.copy_(out)
        out = a.out
    return out, lse


def backward(dout: Tensor, out: Tensor, softmax_lse: Tensor, a: AttnArgs,
             grads: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the forward call `a`, from its output and LSE (a.deterministic applies),
    written into grads' (dq, dk, dv) buffers where given (None entries are allocated)."""
    if _eager((dout, a.q, a.k, a.v, out)):
        backend = dispatch.backend_for("backward", a, deterministic=a.deterministic)
        result = backend.backward(dout, a.q, a.k, a.v, out, softmax_lse, a, a.deterministic,
                                  grads=grads)
    else:
        result = _attention_bwd(dout, out, softmax_lse, *_flatten(a))
    if grads is None:
        return result
    # A backend that could not write into a buffer returned its own tensor: copy.
    return tuple(got if target is None or got is target else target.copy_(got)
                 for target, got in zip(grads, result))


def append_kv(*args) -> Tensor:
    if _eager(args[:5]):
        return _append_kv_impl(*args)
    return _append_kv(*args)


def plan_env(is_cuda: bool):
    """What dispatch reads from the environment on every call, for the kvcache plan key."""
    if is_cuda:
        return os.environ.get(dispatch.ENV_VAR)
    return os.environ.get(dispatch.ENV_VAR), os.environ.get("TRITON_INTERPRET")


def kvcache_plan(inputs, append_args, a: AttnArgs, seqused_add: int, need_lse: bool):
    """A backend's replayable plan of an eager flash_attn_with_kvcache call, or None.

    inputs: the call's tensors as the caller passed them (the plan reads their pointers on each
    replay); append_args: append_kv's arguments or None; a: the attention, with seqused_k the
    cache lengths, to which the plan adds seqused_add on the device. Only plain
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
    forward_module = dispatch.backend_for("forward", a)
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

"""The official package's low-level entry points `_flash_attn_forward` / `_flash_attn_backward`.

Some clients (Transformer Engine) import these from `flash_attn_3.flash_attn_interface` and call
them with the official positional order; they map onto the same validation and op layer as the
public functions.
"""

from __future__ import annotations

import torch

from . import checks, interface, ops


def _flash_attn_forward(
    q, k, v, k_new=None, v_new=None, qv=None, out=None, cu_seqlens_q=None, cu_seqlens_k=None,
    cu_seqlens_k_new=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
    page_table=None, kv_batch_idx=None, leftpad_k=None, rotary_cos=None, rotary_sin=None,
    seqlens_rotary=None, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
    causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0, softcap=0.0,
    rotary_interleaved=True, scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0,
):
    """Official order; returns (out, softmax_lse, out_accum, softmax_lse_accum), the last two empty."""
    window_size = (window_size_left, window_size_right)
    if k_new is not None or rotary_cos is not None:
        if out is not None or cu_seqlens_k is not None or seqused_q is not None:
            raise ValueError("out, cu_seqlens_k and seqused_q cannot be combined with appending k_new/v_new")
        result = interface.flash_attn_with_kvcache(
            q, k, v, k_new, v_new, qv, rotary_cos, rotary_sin, seqused_k, kv_batch_idx, leftpad_k,
            page_table, cu_seqlens_q, cu_seqlens_k_new, max_seqlen_q, seqlens_rotary, q_descale,
            k_descale, v_descale, softmax_scale, causal, window_size, attention_chunk, softcap,
            rotary_interleaved, scheduler_metadata, num_splits, pack_gqa, sm_margin,
            return_softmax_lse=True,
        )
        return tuple(result)
    result, lse = interface._attention(
        q, k, v, qv=qv, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, page_table=page_table, kv_batch_idx=kv_batch_idx,
        leftpad_k=leftpad_k, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        sinks=None, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        attention_chunk=attention_chunk, softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
        deterministic=False, sm_margin=sm_margin, cp_world_size=1, cp_rank=0,
        cp_tot_seqused_k=None, scheduler_metadata=scheduler_metadata,
    )
    empty = result.new_empty((0,), dtype=torch.float32)
    return result, lse, empty, empty


def _flash_attn_backward(
    dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,
    sequed_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None,
    softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
    deterministic=False, sm_margin=0,
):
    """Official order; writes dq, dk, dv (allocated when None) and returns softmax_d =
    rowsum(dout * out), fp32, in the layout of softmax_lse."""
    left, right = checks.check_window((window_size_left, window_size_right))
    dout, q, k, v, out = (interface._unit_stride(t) for t in (dout, q, k, v, out))
    cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k = (
        interface._unit_stride(t) for t in (cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k)
    )
    if cu_seqlens_q is None and max_seqlen_q is None:
        max_seqlen_q = q.shape[1]
    if cu_seqlens_k is None and max_seqlen_k is None:
        max_seqlen_k = k.shape[1]
    max_seqlen_q, max_seqlen_k = checks.as_int("max_seqlen_q", max_seqlen_q), checks.as_int("max_seqlen_k", max_seqlen_k)
    checks.check_backward_inputs(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=sequed_q, seqused_k=sequed_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        softcap=softcap, sm_margin=sm_margin,
    )
    if is_causal:
        right = 0
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    grads = ops._flash_attn_backward(
        dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
        max_seqlen_q, max_seqlen_k, None, float(softmax_scale), left, right, float(softcap),
        bool(deterministic), int(sm_margin),
    )
    for target, grad in zip((dq, dk, dv), grads):
        if target is not None:
            target.copy_(grad)
    softmax_d = (dout.float() * out.float()).sum(-1)
    return softmax_d.permute(1, 0) if cu_seqlens_q is not None else softmax_d.transpose(1, 2)

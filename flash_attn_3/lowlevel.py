"""The official low-level entry points, in the official argument order.

`forward` is the official `_flash_attn_forward` / `torch.ops.flash_attn_3.fwd` call and `backward`
the official `_flash_attn_backward` call. Every official op name (official_ops.py) and Transformer
Engine's direct calls reach the kernels through these two, which map the official arguments onto
the public functions' normalization, validation and op layer: there is one path, not two.
"""

from __future__ import annotations

import torch

from . import checks, interface, ops


def empty_like(like: torch.Tensor) -> torch.Tensor:
    """Where the official code returns split accumulators or log2 LSEs we do not keep."""
    return torch.empty((0,), dtype=torch.float32, device=like.device)


def forward(
    q, k, v, k_new=None, v_new=None, qv=None, out=None, cu_seqlens_q=None, cu_seqlens_k=None,
    cu_seqlens_k_new=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
    page_table=None, kv_batch_idx=None, leftpad_k=None, rotary_cos=None, rotary_sin=None,
    seqlens_rotary=None, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None,
    causal=False, window_size_left=-1, window_size_right=-1, attention_chunk=0, softcap=0.0,
    rotary_interleaved=True, scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0,
):
    """(out, softmax_lse, out_accum, softmax_lse_accum); the accumulators are empty (splits are
    merged inside). With k_new/v_new (or rotary tables) k and v are the cache, seqused_k its
    lengths, and the new tokens are appended in place first, as flash_attn_with_kvcache does.
    out, when given, is written and returned."""
    window_size = (window_size_left, window_size_right)
    if k_new is not None or v_new is not None or rotary_cos is not None or rotary_sin is not None:
        for name, value in (("cu_seqlens_k", cu_seqlens_k), ("seqused_q", seqused_q)):
            if value is not None:
                raise ValueError(f"{name} cannot be combined with appending k_new/v_new into a KV cache; got a tensor")
        result, lse, *_ = interface.flash_attn_with_kvcache(
            q, k, v, k_new, v_new, qv, rotary_cos, rotary_sin, seqused_k, kv_batch_idx, leftpad_k,
            page_table, cu_seqlens_q, cu_seqlens_k_new, max_seqlen_q, seqlens_rotary, q_descale,
            k_descale, v_descale, softmax_scale, causal, window_size, attention_chunk, softcap,
            rotary_interleaved, scheduler_metadata, num_splits, pack_gqa, sm_margin,
            return_softmax_lse=True,
        )
        if out is not None:
            checks.check_tensor("out", out, device=q.device)
            checks.check_shape("out", out, tuple(result.shape), "q.shape[:-1] + (head_dim_v,)")
            out.copy_(result)
            result = out
    else:
        result, lse = interface._attention(
            q, k, v, qv=qv, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, page_table=page_table, kv_batch_idx=kv_batch_idx,
            leftpad_k=leftpad_k, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
            softmax_scale=softmax_scale, causal=causal, window_size=window_size,
            attention_chunk=attention_chunk, softcap=softcap, num_splits=num_splits,
            pack_gqa=pack_gqa, deterministic=False, sm_margin=sm_margin,
            scheduler_metadata=scheduler_metadata,
        )
    return result, lse, empty_like(result), empty_like(result)


def backward(
    dout, q, k, v, out, softmax_lse, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
    seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None,
    softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
    deterministic=False, sm_margin=0,
):
    """(dq, dk, dv), written into the given ones (the official ops drop those not given)."""
    window_size = checks.check_window((window_size_left, window_size_right))
    dout, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k = interface._unit_strides(
        dout, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k)
    max_seqlen_q = checks.as_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = checks.as_int("max_seqlen_k", max_seqlen_k)
    checks.check_backward_inputs(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q, seqused_k=seqused_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softcap=softcap, sm_margin=sm_margin,
    )
    a = interface._forward_args(
        q, k, v, softmax_scale=softmax_scale, causal=is_causal, window_size=window_size,
        attention_chunk=0, softcap=softcap, deterministic=deterministic, sm_margin=sm_margin,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
        seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, validated=True,
    )
    return ops.backward(dout, out, softmax_lse, a, (dq, dk, dv))


def softmax_d(dout, out, varlen_q: bool):
    """What the official backward returns: rowsum(dout * out), fp32, in the layout of softmax_lse
    (the official one is padded to its block rows; ours is not). Products in the input dtype,
    summed in fp32: one pass instead of two fp32 copies of dout and out, since only a caller of
    the official ops reads it."""
    rows = torch.sum(dout * out, dim=-1, dtype=torch.float32)
    return (rows.t() if varlen_q else rows.transpose(1, 2)).contiguous()

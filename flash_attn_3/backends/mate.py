"""MUSA adapter: runs our calls on Moore Threads GPUs through MATE's FA3-like entries.

Dispatch sends it only tensors on a ``musa`` device, and only when ``mate`` imports.
``mate.mha_interface`` is imported on first use, so importing this module needs neither
torch_musa nor mate. Arguments map onto MATE the way MATE's own FA3 wrapper maps
them (spec section 9): sinks -> ``learnable_sink``, LSE requests -> ``return_softmax_lse``,
``get_scheduler_metadata``'s cache_seqlens -> ``seqused_k`` and sm_margin -> ``mp_margin``.
The adapter itself never checks devices: dispatch does, and the contract tests call it on CPU.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .params import AttnArgs


def _mha():
    return importlib.import_module("mate.mha_interface")


def unsupported_reason(a: AttnArgs, backward: bool = False) -> Optional[str]:
    """Why MATE cannot run this call (None when it can), from MATE's documented coverage and source."""
    if a.is_fp8:
        return "MATE's FA3 entries run fp16/bf16 only"
    if max(a.head_dim, a.head_dim_v) > 512:
        return "MATE supports head dims up to 512"
    if not backward:
        return None
    # MATE's backward is the autograd of its varlen entry, whose saved context holds only
    # cu_seqlens, scale, causal, window and softcap; it also crops dq to dv's head dim.
    if a.seqused_q is not None or a.seqused_k is not None:
        return "MATE's backward takes no seqused_q / seqused_k"
    if a.page_table is not None or a.kv_batch_idx is not None or a.leftpad_k is not None:
        return "MATE's backward takes no paged or indexed KV"
    if a.sinks is not None:
        return "MATE's backward ignores learnable sinks"
    if a.cp_world_size > 1:
        return "MATE's backward has no context parallelism"
    if a.head_dim != a.head_dim_v:
        return "MATE's backward needs head_dim == head_dim_v"
    return None


def _causal_and_window(left: int, right: int) -> tuple[bool, tuple[int, int]]:
    # Plain causal goes as causal=True with an unbounded window: the form MATE's own wrapper
    # sends for flash_attn_func(causal=True), and the only one its assembly fast path accepts.
    if left < 0 and right == 0:
        return True, (-1, -1)
    return False, (left, right)


def _attention_kwargs(a: AttnArgs) -> dict:
    causal, window = _causal_and_window(a.window_left, a.window_right)
    return dict(
        qv=a.qv, q_descale=a.q_descale, k_descale=a.k_descale, v_descale=a.v_descale,
        softmax_scale=a.softmax_scale, causal=causal, window_size=window,
        learnable_sink=a.sinks, attention_chunk=a.attention_chunk, softcap=a.softcap,
        scheduler_metadata=a.scheduler_metadata, num_splits=a.num_splits, pack_gqa=a.pack_gqa,
        return_softmax_lse=True, cp_world_size=a.cp_world_size, cp_rank=a.cp_rank,
        cp_tot_seqused_k=a.cp_tot_seqused_k,
    )


def _full_cache_lengths(a: AttnArgs) -> torch.Tensor:
    rows = a.page_table.shape[1] * a.k.shape[1] if a.page_table is not None else a.k.shape[1]
    return torch.full((a.batch_size,), rows, dtype=torch.int32, device=a.q.device)


def forward(a: AttnArgs) -> tuple[torch.Tensor, torch.Tensor]:
    mha = _mha()
    if a.kv_batch_idx is not None or a.leftpad_k is not None:
        # Only MATE's kvcache entry takes cache_batch_idx and cache_leftpad.
        result = mha.flash_attn_with_kvcache(
            a.q, a.k, a.v,
            cache_seqlens=a.seqused_k if a.seqused_k is not None else _full_cache_lengths(a),
            cache_batch_idx=a.kv_batch_idx, cache_leftpad=a.leftpad_k, page_table=a.page_table,
            cu_seqlens_q=a.cu_seqlens_q,
            max_seqlen_q=a.max_seqlen_q if a.is_varlen_q else None,
            **_attention_kwargs(a),
        )
    else:
        varlen = a.is_varlen_q or a.cu_seqlens_k is not None
        # page_table only when paged: MATE releases before the paged varlen entry lack the keyword.
        paged = {} if a.page_table is None else {"page_table": a.page_table}
        result = mha.flash_attn_varlen_func(
            a.q, a.k, a.v,
            cu_seqlens_q=a.cu_seqlens_q, cu_seqlens_k=a.cu_seqlens_k,
            max_seqlen_q=a.max_seqlen_q if varlen else None,
            max_seqlen_k=a.max_seqlen_k if varlen else None,
            seqused_q=a.seqused_q, seqused_k=a.seqused_k,
            **paged, **_attention_kwargs(a),
        )
    return result[0], result[1]


def _uniform_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def backward(dout, q, k, v, out, lse, a: AttnArgs, deterministic: bool, grads=None):
    """Gradients through MATE's varlen entry; out and lse are recomputed by it. grads (buffers
    to write into) is left to the op layer, which copies.

    MATE exposes its backward only as the autograd of flash_attn_varlen_func, and that backward
    reads cu_seqlens, so dense batches go through as uniform varlen.
    """
    reason = unsupported_reason(a, backward=True)
    if reason is not None:
        raise NotImplementedError(f"mate backend backward: {reason}")
    if a.is_varlen_q:
        cu_q, cu_k = a.cu_seqlens_q, a.cu_seqlens_k
        max_q, max_k = a.max_seqlen_q, a.max_seqlen_k
        q3, k3, v3, dout3 = q, k, v, dout
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        cu_q = _uniform_cu_seqlens(batch, seqlen_q, q.device)
        cu_k = _uniform_cu_seqlens(batch, seqlen_k, q.device)
        max_q, max_k = seqlen_q, seqlen_k
        q3, k3, v3, dout3 = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v, dout))
    causal, window = _causal_and_window(a.window_left, a.window_right)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q3, k3, v3)]
        recomputed = _mha().flash_attn_varlen_func(
            *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
            softmax_scale=a.softmax_scale, causal=causal, window_size=window, softcap=a.softcap,
            deterministic=deterministic,
        )
        grads = torch.autograd.grad(recomputed, leaves, dout3)
    return tuple(g.reshape(t.shape) for g, t in zip(grads, (q, k, v)))


def append_kv(k_cache, v_cache, k_new, v_new, q, rotary_cos, rotary_sin, cache_seqlens,
              cache_batch_idx, cache_leftpad, page_table, cu_seqlens_q, cu_seqlens_k_new,
              rotary_seqlens, rotary_interleaved: bool, rotate_q_per_token: bool, max_seqlen_q):
    """Writes the (rotated) new keys and values into the cache through MATE's kvcache entry.

    MATE appends only inside an attention call and does not hand back the rotated q, so its
    attention output is dropped (one extra attention pass) and q is rotated here.
    """
    _mha().flash_attn_with_kvcache(
        q, k_cache, v_cache, k=k_new, v=v_new, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
        page_table=page_table, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k_new=cu_seqlens_k_new,
        max_seqlen_q=max_seqlen_q, rotary_seqlens=rotary_seqlens,
        rotary_interleaved=rotary_interleaved,
    )
    if rotary_cos is None:
        return q
    starts = rotary_seqlens if rotary_seqlens is not None else cache_seqlens
    return _rotate_q(q, rotary_cos, rotary_sin, starts, cu_seqlens_q, rotary_interleaved,
                     rotate_q_per_token)


def _rotate_q(q, cos, sin, starts, cu_seqlens_q, interleaved: bool, per_token: bool):
    """q rotated at position starts[b] (+ its token index when per_token), per spec section 5."""
    if cu_seqlens_q is None:
        batch, seqlen = q.shape[0], q.shape[1]
        row_batch = torch.arange(batch, device=q.device).repeat_interleave(seqlen)
        row_index = torch.arange(seqlen, device=q.device).repeat(batch)
    else:
        batch = cu_seqlens_q.shape[0] - 1
        lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        row_batch = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths)
        row_index = torch.arange(q.shape[0], device=q.device) - cu_seqlens_q[:-1].long()[row_batch]
    starts = torch.as_tensor(starts, device=q.device).long().expand(batch)
    position = starts[row_batch] + (row_index if per_token else 0)
    rows = q.reshape(-1, *q.shape[-2:]).float()
    half = cos.shape[-1]
    cos_p, sin_p = cos[position].float()[:, None, :], sin[position].float()[:, None, :]
    rotated = rows.clone()
    if interleaved:
        x, y = rows[..., 0:2 * half:2], rows[..., 1:2 * half:2]
        rotated[..., 0:2 * half:2] = x * cos_p - y * sin_p
        rotated[..., 1:2 * half:2] = x * sin_p + y * cos_p
    else:
        x, y = rows[..., :half], rows[..., half:2 * half]
        rotated[..., :half] = x * cos_p - y * sin_p
        rotated[..., half:2 * half] = x * sin_p + y * cos_p
    return rotated.to(q.dtype).reshape(q.shape)


def combine(out_partial, lse_partial, out_dtype):
    mha = _mha()
    if hasattr(mha, "flash_attn_combine"):
        return mha.flash_attn_combine(out_partial, lse_partial, out_dtype=out_dtype)
    # Older MATE releases have no combine; the merge is plain tensor math that runs on any device.
    from . import reference
    return reference.combine(out_partial, lse_partial, out_dtype)


def scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                       headdim_v, cache_seqlens, cu_seqlens_q, cu_seqlens_k_new, cache_leftpad,
                       page_size, max_seqlen_k_new, causal, window_size_left, window_size_right,
                       attention_chunk, has_softcap, num_splits, pack_gqa, sm_margin):
    """MATE's own metadata tensor (its layout, not ours): only MATE's attention entries read it.

    causal and window go in the form ``forward`` sends them, so the plan matches the launch.
    """
    causal, window = _causal_and_window(window_size_left, window_size_right)
    return _mha().get_scheduler_metadata(
        batch_size=batch_size, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        num_heads_q=num_heads_q, num_heads_kv=num_heads_kv, headdim=headdim, seqused_q=None,
        seqused_k=cache_seqlens, headdim_v=headdim_v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=None,
        cu_seqlens_k_new=cu_seqlens_k_new, cache_leftpad=cache_leftpad, page_size=page_size,
        max_seqlen_k_new=max_seqlen_k_new, causal=causal, window_size=window,
        attention_chunk=attention_chunk, has_softcap=has_softcap, num_splits=num_splits,
        pack_gqa=pack_gqa, mp_margin=sm_margin,
    )

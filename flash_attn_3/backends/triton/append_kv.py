"""Append new keys/values to a KV cache in place, with rotary on the new keys and on q.

One launch does both jobs: the first programs write (rotated) new K rows and V rows into the
cache, the remaining ones rotate q into a new tensor. A "row" is one (token, head) vector. Token
-> batch mapping for packed inputs (cu_seqlens_*) is a binary search over the cu_seqlens entries,
so the grid depends on tensor shapes only: no host sync, safe inside CUDA graphs.

Semantics (spec sec 5): new token t of batch b lands at cache position cache_seqlens[b] + t
(row cache_batch_idx[b], or logical page pos // page_size of that page-table row) and is rotated
at r_b + t with r_b = rotary_seqlens[b] if given else cache_seqlens[b]. q token i is rotated at
r_b + i when rotate_q_per_token (causal or local), else at r_b. cache_leftpad does not move the
write position (cache_seqlens counts the pad), so it is accepted and unused here.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import Launcher


@triton.jit
def _batch_of(token, cu_seqlens, fixed_len, batch, PACKED: tl.constexpr, LOG_BATCH: tl.constexpr):
    """(batch index, index within the batch's sequence, token belongs to a batch) per token."""
    if PACKED:
        # Largest b < batch with cu_seqlens[b] <= token; LOG_BATCH halving steps cover batch.
        b = tl.zeros_like(token)
        for i in tl.static_range(LOG_BATCH):
            cand = b + (1 << (LOG_BATCH - 1 - i))
            start = tl.load(cu_seqlens + cand, mask=cand < batch, other=2147483647)
            b = tl.where(start <= token, cand, b)
        start = tl.load(cu_seqlens + b)
        return b, token - start, token < tl.load(cu_seqlens + batch)
    else:
        return token // fixed_len, token % fixed_len, token < batch * fixed_len


@triton.jit
def _rotate(src_ptrs, x, cols, rot_pos, cos, sin, stride_cos, stride_sin, rotary_dim, seqlen_ro, row_ok,
            INTERLEAVED: tl.constexpr):
    """x (R, D) rotated at positions rot_pos (R,); columns past rotary_dim pass through."""
    half = rotary_dim // 2
    in_rot = cols < rotary_dim
    if INTERLEAVED:
        partner = cols ^ 1
        sign = tl.where(cols % 2 == 0, -1.0, 1.0)
        freq = cols // 2
    else:
        first = cols < half
        partner = tl.where(first, cols + half, cols - half)
        sign = tl.where(first, -1.0, 1.0)
        freq = tl.where(first, cols, cols - half)
    cs_ok = (row_ok & (rot_pos < seqlen_ro))[:, None] & in_rot[None, :]
    rot_pos = rot_pos.to(tl.int64)[:, None]
    c = tl.load(cos + rot_pos * stride_cos + freq[None, :], mask=cs_ok, other=1.0).to(tl.float32)
    s = tl.load(sin + rot_pos * stride_sin + freq[None, :], mask=cs_ok, other=0.0).to(tl.float32)
    xp = tl.load(src_ptrs + (partner - cols)[None, :], mask=row_ok[:, None] & in_rot[None, :], other=0.0)
    return x.to(tl.float32) * c + sign[None, :] * xp.to(tl.float32) * s


@triton.jit
def _append_rows(
    pid, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens, cache_batch_idx, page_table,
    cu_seqlens_k_new, rotary_seqlens,
    num_rows, batch, seqlen_new, num_heads_kv, head_dim, head_dim_v, rotary_dim, seqlen_ro,
    page_size, capacity,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
    stride_pt, stride_cos, stride_sin,
    HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, PACKED: tl.constexpr, PAGED: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr, HAS_ROTARY_SEQLENS: tl.constexpr, LOG_BATCH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    token = rows // num_heads_kv
    head = (rows % num_heads_kv).to(tl.int64)
    b, t, in_batch = _batch_of(token, cu_seqlens_k_new, seqlen_new, batch, PACKED, LOG_BATCH)
    row_ok = (rows < num_rows) & in_batch
    b = tl.where(row_ok, b, 0)
    pos = tl.load(cache_seqlens + b, mask=row_ok, other=0) + t
    # Positions past the cache would write out of bounds; the host cannot check them without a sync.
    row_ok = row_ok & (pos < capacity)

    cache_row = b
    if HAS_BATCH_IDX:
        cache_row = tl.load(cache_batch_idx + b, mask=row_ok, other=0)
    if PAGED:
        page = tl.load(page_table + cache_row.to(tl.int64) * stride_pt + pos // page_size, mask=row_ok, other=0)
        slot_b = page.to(tl.int64)
        slot_s = (pos % page_size).to(tl.int64)
    else:
        slot_b = cache_row.to(tl.int64)
        slot_s = pos.to(tl.int64)
    if PACKED:
        src_k = token.to(tl.int64) * stride_kns
        src_v = token.to(tl.int64) * stride_vns
    else:
        src_k = b.to(tl.int64) * stride_knb + t.to(tl.int64) * stride_kns
        src_v = b.to(tl.int64) * stride_vnb + t.to(tl.int64) * stride_vns

    cols = tl.arange(0, BLOCK_D)
    k_mask = row_ok[:, None] & (cols < head_dim)[None, :]
    k_src_ptrs = k_new + (src_k + head * stride_knh)[:, None] + cols[None, :]
    k = tl.load(k_src_ptrs, mask=k_mask, other=0.0)
    if HAS_ROTARY:
        if HAS_ROTARY_SEQLENS:
            rot_pos = tl.load(rotary_seqlens + b, mask=row_ok, other=0) + t
        else:
            rot_pos = pos
        k = _rotate(k_src_ptrs, k, cols, rot_pos, cos, sin, stride_cos, stride_sin, rotary_dim, seqlen_ro,
                    row_ok, INTERLEAVED)
    k_dst = k_cache + (slot_b * stride_kcb + slot_s * stride_kcs + head * stride_kch)[:, None] + cols[None, :]
    tl.store(k_dst, k.to(k_cache.dtype.element_ty), mask=k_mask)

    cols_v = tl.arange(0, BLOCK_DV)
    v_mask = row_ok[:, None] & (cols_v < head_dim_v)[None, :]
    v = tl.load(v_new + (src_v + head * stride_vnh)[:, None] + cols_v[None, :], mask=v_mask)
    v_dst = v_cache + (slot_b * stride_vcb + slot_s * stride_vcs + head * stride_vch)[:, None] + cols_v[None, :]
    tl.store(v_dst, v, mask=v_mask)


@triton.jit
def _rotate_q_rows(
    pid, q, q_out, cos, sin, cache_seqlens, rotary_seqlens, cu_seqlens_q,
    num_rows, batch, seqlen_q, num_heads_q, head_dim, rotary_dim, seqlen_ro,
    stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_cos, stride_sin,
    INTERLEAVED: tl.constexpr, Q_PER_TOKEN: tl.constexpr, VARLEN_Q: tl.constexpr,
    HAS_ROTARY_SEQLENS: tl.constexpr, LOG_BATCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    token = rows // num_heads_q
    head = (rows % num_heads_q).to(tl.int64)
    b, i, in_batch = _batch_of(token, cu_seqlens_q, seqlen_q, batch, VARLEN_Q, LOG_BATCH)
    row_ok = rows < num_rows
    # Varlen tokens past cu_seqlens_q[-1] belong to no sequence: copied, not rotated.
    rot_ok = row_ok & in_batch
    b = tl.where(rot_ok, b, 0)
    if HAS_ROTARY_SEQLENS:
        rot_pos = tl.load(rotary_seqlens + b, mask=rot_ok, other=0)
    else:
        rot_pos = tl.load(cache_seqlens + b, mask=rot_ok, other=0)
    if Q_PER_TOKEN:
        rot_pos += i
    if VARLEN_Q:
        src = token.to(tl.int64) * stride_qs
        dst = token.to(tl.int64) * stride_os
    else:
        src = (token // seqlen_q).to(tl.int64) * stride_qb + (token % seqlen_q).to(tl.int64) * stride_qs
        dst = (token // seqlen_q).to(tl.int64) * stride_ob + (token % seqlen_q).to(tl.int64) * stride_os
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < head_dim)[None, :]
    src_ptrs = q + (src + head * stride_qh)[:, None] + cols[None, :]
    x = tl.load(src_ptrs, mask=mask, other=0.0)
    y = _rotate(src_ptrs, x, cols, rot_pos, cos, sin, stride_cos, stride_sin, rotary_dim, seqlen_ro, rot_ok,
                INTERLEAVED)
    tl.store(q_out + (dst + head * stride_oh)[:, None] + cols[None, :], y.to(q_out.dtype.element_ty), mask=mask)


@triton.jit
def _append_kv_kernel(
    k_cache, v_cache, k_new, v_new, q, q_out, cos, sin, cache_seqlens, cache_batch_idx, page_table,
    cu_seqlens_k_new, cu_seqlens_q, rotary_seqlens,
    num_kv_programs, num_kv_rows, num_q_rows, batch, seqlen_new, seqlen_q, num_heads_kv, num_heads_q,
    head_dim, head_dim_v, rotary_dim, seqlen_ro, page_size, capacity,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
    stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_pt, stride_cos, stride_sin,
    HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, Q_PER_TOKEN: tl.constexpr, PACKED_K: tl.constexpr,
    VARLEN_Q: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_ROTARY_SEQLENS: tl.constexpr,
    LOG_BATCH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < num_kv_programs:
        _append_rows(
            pid, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens, cache_batch_idx, page_table,
            cu_seqlens_k_new, rotary_seqlens,
            num_kv_rows, batch, seqlen_new, num_heads_kv, head_dim, head_dim_v, rotary_dim, seqlen_ro,
            page_size, capacity,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
            stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
            stride_pt, stride_cos, stride_sin,
            HAS_ROTARY, INTERLEAVED, PACKED_K, PAGED, HAS_BATCH_IDX, HAS_ROTARY_SEQLENS, LOG_BATCH,
            BLOCK_R, BLOCK_D, BLOCK_DV,
        )
    else:
        if HAS_ROTARY:
            _rotate_q_rows(
                pid - num_kv_programs, q, q_out, cos, sin, cache_seqlens, rotary_seqlens, cu_seqlens_q,
                num_q_rows, batch, seqlen_q, num_heads_q, head_dim, rotary_dim, seqlen_ro,
                stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_cos, stride_sin,
                INTERLEAVED, Q_PER_TOKEN, VARLEN_Q, HAS_ROTARY_SEQLENS, LOG_BATCH, BLOCK_R, BLOCK_D,
            )


# Constexprs: HAS_ROTARY, INTERLEAVED, Q_PER_TOKEN, PACKED_K, VARLEN_Q, PAGED, HAS_BATCH_IDX,
# HAS_ROTARY_SEQLENS, LOG_BATCH, BLOCK_R, BLOCK_D, BLOCK_DV.
_launch = Launcher(_append_kv_kernel)


def _dense4(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, S, H, D) tensor or of a packed (T, H, D) one."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(0), t.stride(1)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: Optional[torch.Tensor],
    v_new: Optional[torch.Tensor],
    q: torch.Tensor,
    rotary_cos: Optional[torch.Tensor],
    rotary_sin: Optional[torch.Tensor],
    cache_seqlens,
    cache_batch_idx: Optional[torch.Tensor],
    cache_leftpad: Optional[torch.Tensor],
    page_table: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k_new: Optional[torch.Tensor],
    rotary_seqlens: Optional[torch.Tensor],
    rotary_interleaved: bool,
    rotate_q_per_token: bool,
    max_seqlen_q: Optional[int],
) -> torch.Tensor:
    """Write k_new / v_new ((B, Sn, Hk, D|Dv), or packed (total_new, Hk, D|Dv) with
    cu_seqlens_k_new) into k_cache / v_cache ((B_c, S_c, Hk, D|Dv), or paged (num_pages,
    page_size, Hk, D|Dv) with page_table (B_c, max_pages)) at cache_seqlens[b] + t, rotating the
    keys when rotary_cos / rotary_sin ((S_ro, rotary_dim / 2)) are given.

    Returns q rotated (a new tensor; (B, Sq, Hq, D) or (total_q, Hq, D) with cu_seqlens_q), or q
    itself without rotary. cache_seqlens (int or int32 (B,)) is not modified.
    """
    del cache_leftpad  # the write position already counts the pad (see module docstring)
    if k_new is None:
        return q
    packed = cu_seqlens_k_new is not None
    batch = cu_seqlens_k_new.shape[0] - 1 if packed else k_new.shape[0]
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    has_rotary = rotary_cos is not None
    paged = page_table is not None
    varlen_q = cu_seqlens_q is not None
    num_heads_kv, head_dim, head_dim_v = k_cache.shape[-2], k_cache.shape[-1], v_cache.shape[-1]
    num_heads_q = q.shape[-2]
    seqlen_new = 1 if packed else k_new.shape[1]
    num_kv_rows = (k_new.shape[0] if packed else batch * seqlen_new) * num_heads_kv
    seqlen_q = 1 if varlen_q else q.shape[1]
    num_q_rows = (q.shape[0] if varlen_q else q.shape[0] * seqlen_q) * num_heads_q if has_rotary else 0
    page_size = k_cache.shape[1]
    capacity = page_table.shape[1] * page_size if paged else k_cache.shape[1]

    q_out = torch.empty_like(q) if has_rotary else q
    # Plain int arithmetic: triton.cdiv / next_power_of_2 cost microseconds each on the host
    # (constexpr-function wrappers), and this runs once per decode step.
    block_d = 1 << (head_dim - 1).bit_length()
    block_dv = 1 << (head_dim_v - 1).bit_length()
    # ~4K elements per program: enough bytes in flight per program, few programs for decode appends.
    block_r = max(1, min(64, 4096 // max(block_d, block_dv)))
    num_kv_programs = -(-num_kv_rows // block_r)
    num_programs = num_kv_programs - (-num_q_rows // block_r)
    if num_programs == 0:
        return q_out

    dummy = cache_seqlens
    kcb, kcs, kch = k_cache.stride()[:3]
    vcb, vcs, vch = v_cache.stride()[:3]
    _launch((num_programs,), (
        k_cache, v_cache, k_new, v_new, q, q_out,
        rotary_cos if has_rotary else dummy, rotary_sin if has_rotary else dummy,
        cache_seqlens,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        page_table if paged else dummy,
        cu_seqlens_k_new if packed else dummy,
        cu_seqlens_q if varlen_q else dummy,
        rotary_seqlens if rotary_seqlens is not None else dummy,
        num_kv_programs, num_kv_rows, num_q_rows, batch, seqlen_new, seqlen_q, num_heads_kv, num_heads_q,
        head_dim, head_dim_v, 2 * rotary_cos.shape[1] if has_rotary else 0,
        rotary_cos.shape[0] if has_rotary else 0, page_size, capacity,
        kcb, kcs, kch, vcb, vcs, vch,
        *_dense4(k_new), *_dense4(v_new), *_dense4(q), *_dense4(q_out),
        page_table.stride(0) if paged else 0,
        rotary_cos.stride(0) if has_rotary else 0, rotary_sin.stride(0) if has_rotary else 0,
    ), (
        has_rotary, rotary_interleaved, rotate_q_per_token, packed, varlen_q, paged,
        cache_batch_idx is not None, rotary_seqlens is not None,
        batch.bit_length() if packed or varlen_q else 1, block_r, block_d, block_dv,
    ), 4, 3)
    return q_out

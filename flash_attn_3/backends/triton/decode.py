"""Split-KV decode attention: few query rows against a long (paged or contiguous) KV cache.

Memory-bound by design: the query heads that share a KV head are packed into the M dimension
(pack GQA), so each K/V row is read from HBM once per KV head, and when batch * KV heads cannot
fill the GPU the KV sequence is split across programs whose fp32 partials merge by log-sum-exp.
Paged caches are read through the page table row by row, so any page size works.

Split launches merge in the same launch (a launch costs the eager host ~18 us, a graph a gap):
each split program writes its partial, then takes a ticket from its tile's int32 counter; the
program that takes the last ticket merges all the tile's partials into out / lse and puts the
counter back to 0. Counters come from a per-device ring (`TicketRing`) zeroed once outside any
graph capture; where none exists yet (the first call is being captured) the launch falls back
to combine.py's separate merge.

A decode step that appends one token per row can be one launch too (`Append`, used by the
planned fast path, step.py): program (m_block 0, split 0) of each (batch, KV head) writes the
new key (rotated) and value into the cache, every program rotates its q rows, and the one
program whose split holds the new key takes it from k_new / v_new rather than from the cache.
No program reads a cache row another program writes (cache_batch_idx rows that repeat are the
caller's race, as in the official kernel), so the launch needs no ordering between programs,
and the results are append_kv + decode's bit for bit.

Grid: (batch * num_heads_kv * m_blocks, num_splits). A program owns BLOCK_M packed rows
(row m = query token m // G, query head hk * G + m % G) and one split's slice of the KV blocks
those rows may see. Split s of a tile covers blocks [lo + s * per, lo + (s + 1) * per) with
per = cdiv(blocks the tile sees, num_splits): lengths are read on the device, the grid depends
on Python ints only (CUDA-graph safe, no host sync).
"""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..params import AttnArgs
from . import arch
from .append_kv import _rotate
from .combine import combine_launch, unsplit_strides
from .launch import Launch, Launcher
from .scheduler import decode_block_m, decode_block_n, decode_num_splits, num_sms

# Beyond this many packed query rows per KV head the tiled forward kernel is the better tool.
MAX_PACKED_ROWS = 64
LOG2E = 1.4426950408889634
# Software-pipeline depth. Read from the sm_90 TTGIR (compiled offline): contiguous K/V get two
# async-copy buffers in flight at 3 stages; the paged gather spends one stage on the page-table
# load, so it needs 5 for the same two buffers (about 72 KB of shared memory either way, three
# programs per SM). A contiguous launch with at least two programs per SM hides latency by
# residency instead: at 2 stages one buffer is in flight per program, but 39 KB of shared memory
# and 96 registers let five programs share an SM (sm_90 ptxas). Measured on H100 (GQA 32/8,
# D 128, 2 vs 3 stages): batch 64 ctx 4k (512 programs) 2.94 vs 2.72 TB/s, batch 16 ctx 8k
# (256) 2.74 vs 2.74, batch 1 ctx 128k (240) 2.64 vs 2.62; the 3-stage one-program-per-SM
# launch (batch 1, 16 splits) 2.79. Below two per SM a lone 2-stage program would have a single
# buffer in flight, so those launches keep 3.
_CONTIGUOUS_STAGES = 3
_CONTIGUOUS_STAGES_RESIDENT = 2
# Residency is the resident launch's latency hiding, so its blocks stay small: D 64 would take
# 128 keys a block (32 KB, decode_block_n). H100, GQA 32/8 D 64 B=64 ctx 4k: (64, 4, 2) 2.74
# against (128, 4, 2) 2.68 TB/s (cuDNN 2.76).
_RESIDENT_BLOCK_N = 64
_PAGED_STAGES = 5
# Paged launches take 8 warps: the gather is issued row by row, and twice the warps keep twice the
# rows in flight. H100, GQA 32/8 D 128 page 16 (benchmarks/tune_decode.py): B=1 ctx 64k (one
# program per SM) 2.36 against 2.30 TB/s at (64, 8, 5) / (64, 4, 5); B=64 ctx 4k (512 programs)
# 2.87 against 2.57.
_PAGED_WARPS = 8
# Contiguous caches too, where a few tiles are split many ways (MQA at batch 1: one tile, ~122
# splits of ~1k keys): H100, Hq/Hk 8/1 D 128 ctx 128k, graph-timed (perf-notes decode Round 6),
# 1.51 against 1.46 TB/s at 4 warps (cuDNN 1.51). GQA 32/8 at batch 1 (8 tiles, 16 splits):
# (64, 8, 3) 2.50 against (64, 4, 3) 2.48, within noise, so it keeps 4.
_CONTIGUOUS_WARPS_FEW_TILES = 8
_FEW_TILES = 4


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _floor_chunk_start(d, chunk):
    rem = d % chunk
    return d - tl.where(rem < 0, rem + chunk, rem)


@triton.jit
def _new_token(KNew, VNew, Cos, Sin, batch, head_kv, rot0, cols, cols_v,
               stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cos, stride_sin, rotary_dim, seqlen_ro,
               k_dtype: tl.constexpr, v_dtype: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The (1, D) key, rotated at rot0, and the (1, Dv) value of a fused append, in the cache's
    dtypes: the values append_kv stores."""
    kn_ptrs = (KNew + batch.to(tl.int64) * stride_knb + head_kv.to(tl.int64) * stride_knh + cols)[None, :]
    k_new = tl.load(kn_ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    if HAS_ROTARY:
        one = tl.arange(0, 1)
        k_new = _rotate(kn_ptrs, k_new, cols, rot0 + one, Cos, Sin, stride_cos, stride_sin, rotary_dim, seqlen_ro,
                        one == 0, INTERLEAVED)
    v_new = tl.load((VNew + batch.to(tl.int64) * stride_vnb + head_kv.to(tl.int64) * stride_vnh + cols_v)[None, :],
                    mask=(cols_v < HEAD_DIM_V)[None, :], other=0.0)
    return k_new.to(k_dtype), v_new.to(v_dtype)


@triton.jit
def _attend_block(blk, q, m_i, l_i, acc, k_head, v_head, kv_row, k_tok0, leftpad, seqlen_k, diag, cols, cols_v,
                  qk_scale, softcap_in, softcap_out, window_left, window_right, chunk, PageTable, stride_pt,
                  stride_kb, stride_ks, stride_vb, stride_vs, new_key, k_new, v_new,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN_K: tl.constexpr,
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, FRESH: tl.constexpr):
    """One KV block of the online softmax. FRESH: key new_key of the block is k_new / v_new (a
    fused append's token) instead of its cache row, which this launch may be writing."""
    keys = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < seqlen_k
    load_ok = key_ok
    if FRESH:
        fresh = keys == new_key
        load_ok = key_ok & ~fresh
    pos = leftpad + keys
    if PAGED:
        page = tl.load(PageTable + kv_row.to(tl.int64) * stride_pt + pos // PAGE_SIZE, mask=load_ok, other=0)
        k_off = page.to(tl.int64) * stride_kb + (pos % PAGE_SIZE).to(tl.int64) * stride_ks
        v_off = page.to(tl.int64) * stride_vb + (pos % PAGE_SIZE).to(tl.int64) * stride_vs
    elif VARLEN_K:
        k_off = (k_tok0 + pos).to(tl.int64) * stride_ks
        v_off = (k_tok0 + pos).to(tl.int64) * stride_vs
    else:
        k_off = kv_row.to(tl.int64) * stride_kb + pos.to(tl.int64) * stride_ks
        v_off = kv_row.to(tl.int64) * stride_vb + pos.to(tl.int64) * stride_vs
    k = tl.load(k_head + k_off[:, None] + cols[None, :], mask=load_ok[:, None] & (cols < HEAD_DIM)[None, :],
                other=0.0)
    if FRESH:
        k = tl.where(fresh[:, None], k_new, k)
    qk = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        s = _tanh(qk * softcap_in) * softcap_out
    else:
        s = qk * qk_scale
    allowed = key_ok[None, :]
    if HAS_WINDOW:
        allowed = allowed & ((window_left < 0) | (keys[None, :] >= diag[:, None] - window_left))
        allowed = allowed & ((window_right < 0) | (keys[None, :] <= diag[:, None] + window_right))
    if HAS_CHUNK:
        start = _floor_chunk_start(diag, chunk)
        allowed = allowed & (keys[None, :] >= start[:, None]) & (keys[None, :] < start[:, None] + chunk)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing allowed yet keep m = -inf; pivot on 0 so exp2 sees -inf, not NaN.
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - pivot[:, None])
    alpha = tl.exp2(m_i - pivot)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + v_off[:, None] + cols_v[None, :],
                mask=load_ok[:, None] & (cols_v < HEAD_DIM_V)[None, :], other=0.0)
    if FRESH:
        v = tl.where(fresh[:, None], v_new, v)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# Lengths, windows and counts change between calls: triton would otherwise compile a variant per
# `== 1` / `% 16` pattern of them, with no faster code.
@triton.jit(do_not_specialize=[
    "window_left", "window_right", "chunk", "seqused_add", "seqlen_q_static", "seqlen_k_static",
    "num_m_blocks", "num_splits", "num_tiles", "seqlen_ro"])
def _decode_kernel(
    Q, K, V, Out, Lse, Final, FinalLse, Tickets, Sinks,
    CuSeqlensQ, CuSeqlensK, SequsedK, LeftpadK, KvBatchIdx, PageTable,
    KNew, VNew, Cos, Sin, RotarySeqlens,
    qk_scale, softcap_in, softcap_out, window_left, window_right, chunk, seqused_add,
    num_heads_kv, seqlen_q_static, seqlen_k_static, num_m_blocks, num_splits, num_tiles, rotary_dim, seqlen_ro,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_o_split, stride_ob, stride_os, stride_oh,
    stride_l_split, stride_lb, stride_ls, stride_lh,
    stride_fb, stride_fs, stride_fh,
    stride_flb, stride_fls, stride_flh,
    stride_pt, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cos, stride_sin,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_KV_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    SPLIT: tl.constexpr, FUSED_COMBINE: tl.constexpr, MERGE_S: tl.constexpr, MERGE_M: tl.constexpr,
    MERGE_GROUP: tl.constexpr,
    APPEND: tl.constexpr, HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, Q_PER_TOKEN: tl.constexpr,
    HAS_ROTARY_SEQLENS: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    m_block = tile % num_m_blocks
    head_kv = (tile // num_m_blocks) % num_heads_kv
    batch = tile // (num_m_blocks * num_heads_kv)

    if VARLEN_Q:
        tok0 = tl.load(CuSeqlensQ + batch)
        seqlen_q = tl.load(CuSeqlensQ + batch + 1) - tok0
    else:
        tok0 = 0
        seqlen_q = seqlen_q_static
    if m_block * BLOCK_M >= seqlen_q * GROUP:
        return
    if VARLEN_K:
        k_tok0 = tl.load(CuSeqlensK + batch)
        end_k = tl.load(CuSeqlensK + batch + 1) - k_tok0
    else:
        k_tok0 = 0
        end_k = seqlen_k_static
    if HAS_SEQUSED_K:
        # Never past the row (or the page table's reach): lengths are values no check can read.
        # seqused_add: tokens an append launch just wrote, so the step needs no `lens + n` op.
        end_k = tl.minimum(tl.load(SequsedK + batch) + seqused_add, end_k)
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.load(LeftpadK + batch)
    seqlen_k = end_k - leftpad
    kv_row = batch
    if HAS_KV_BATCH_IDX:
        kv_row = tl.load(KvBatchIdx + batch)
    k_head = K + head_kv.to(tl.int64) * stride_kh
    v_head = V + head_kv.to(tl.int64) * stride_vh
    cols = tl.arange(0, BLOCK_D)
    cols_v = tl.arange(0, BLOCK_DV)

    if APPEND:
        # The step's one new token (SequsedK holds the cache lengths, seqused_add is 1) lands at
        # cache row new_pos: key new_pos - leftpad, the sequence's last. The program that sees
        # that key takes it from k_new / v_new (rotated here, rounded as append_kv rounds it)
        # instead of from the cache, and program (m_block 0, split 0) of the tile writes it: no
        # program reads a row that another program of the launch writes.
        new_pos = tl.load(SequsedK + batch)
        # Past the capacity append_kv writes nothing and the attention reads only the cache.
        new_ok = new_pos < seqlen_k_static
        new_key = tl.where(new_ok, new_pos - leftpad, -1)
        rot0 = new_pos
        if HAS_ROTARY_SEQLENS:
            rot0 = tl.load(RotarySeqlens + batch)
        if (m_block == 0) & (split == 0):
            k_new, v_new = _new_token(KNew, VNew, Cos, Sin, batch, head_kv, rot0, cols, cols_v,
                                      stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cos, stride_sin,
                                      rotary_dim, seqlen_ro, K.dtype.element_ty, V.dtype.element_ty,
                                      HEAD_DIM, HEAD_DIM_V, HAS_ROTARY, INTERLEAVED)
            if PAGED:
                page = tl.load(PageTable + kv_row.to(tl.int64) * stride_pt + new_pos // PAGE_SIZE, mask=new_ok,
                               other=0).to(tl.int64)
                slot = (new_pos % PAGE_SIZE).to(tl.int64)
                k_dst = page * stride_kb + slot * stride_ks
                v_dst = page * stride_vb + slot * stride_vs
            else:
                k_dst = kv_row.to(tl.int64) * stride_kb + new_pos.to(tl.int64) * stride_ks
                v_dst = kv_row.to(tl.int64) * stride_vb + new_pos.to(tl.int64) * stride_vs
            tl.store(k_head + k_dst + cols[None, :], k_new, mask=new_ok & (cols < HEAD_DIM)[None, :])
            tl.store(v_head + v_dst + cols_v[None, :], v_new, mask=new_ok & (cols_v < HEAD_DIM_V)[None, :])

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_idx = rows // GROUP
    head_q = head_kv * GROUP + rows % GROUP
    row_ok = q_idx < seqlen_q
    diag = q_idx + seqlen_k - seqlen_q  # bottom-right aligned diagonal per row

    # KV range the tile's rows may see, then this split's share of its blocks.
    first_q = m_block * BLOCK_M // GROUP
    last_q = tl.minimum(((m_block + 1) * BLOCK_M - 1) // GROUP, seqlen_q - 1)
    lo = 0
    hi = seqlen_k
    if HAS_WINDOW:  # -1 means unbounded on that side
        lo = tl.where(window_left >= 0, tl.maximum(lo, first_q + seqlen_k - seqlen_q - window_left), lo)
        hi = tl.where(window_right >= 0, tl.minimum(hi, last_q + seqlen_k - seqlen_q + window_right + 1), hi)
    if HAS_CHUNK:
        lo = tl.maximum(lo, _floor_chunk_start(first_q + seqlen_k - seqlen_q, chunk))
        hi = tl.minimum(hi, _floor_chunk_start(last_q + seqlen_k - seqlen_q, chunk) + chunk)
    blk_lo = lo // BLOCK_N
    n_blocks = tl.maximum(tl.cdiv(hi, BLOCK_N) - blk_lo, 0)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_start = blk_lo + split * per_split
    blk_end = tl.minimum(blk_start + per_split, blk_lo + n_blocks)

    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + (tok0 + q_idx).to(tl.int64)[:, None] * stride_qs
              + head_q[:, None] * stride_qh + cols[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    if HAS_ROTARY:
        if Q_PER_TOKEN:
            rot_q = rot0 + q_idx
        else:
            rot_q = rot0 + q_idx * 0
        q = _rotate(q_ptrs, q, cols, rot_q, Cos, Sin, stride_cos, stride_sin, rotary_dim, seqlen_ro, row_ok,
                    INTERLEAVED).to(Q.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    loop_end = blk_end
    if APPEND:
        # The new key's block is the last of the sequence, so the last of any range holding it:
        # it leaves the pipelined loop for one pass with the new row put in (in the loop the
        # select would cost every block a shared-memory round trip and ~70 registers, sm_90 ptxas).
        owns_new = (new_key >= blk_start * BLOCK_N) & (new_key < blk_end * BLOCK_N)
        loop_end = tl.where(owns_new, blk_end - 1, blk_end)
    for blk in range(blk_start, loop_end):
        m_i, l_i, acc = _attend_block(
            blk, q, m_i, l_i, acc, k_head, v_head, kv_row, k_tok0, leftpad, seqlen_k, diag, cols, cols_v,
            qk_scale, softcap_in, softcap_out, window_left, window_right, chunk, PageTable, stride_pt,
            stride_kb, stride_ks, stride_vb, stride_vs, -1, q, q,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, VARLEN_K, PAGED, PAGE_SIZE, HAS_WINDOW, HAS_CHUNK, HAS_SOFTCAP, False)
    if APPEND:
        if owns_new:
            k_new, v_new = _new_token(KNew, VNew, Cos, Sin, batch, head_kv, rot0, cols, cols_v,
                                      stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cos, stride_sin,
                                      rotary_dim, seqlen_ro, K.dtype.element_ty, V.dtype.element_ty,
                                      HEAD_DIM, HEAD_DIM_V, HAS_ROTARY, INTERLEAVED)
            m_i, l_i, acc = _attend_block(
                blk_end - 1, q, m_i, l_i, acc, k_head, v_head, kv_row, k_tok0, leftpad, seqlen_k, diag, cols,
                cols_v, qk_scale, softcap_in, softcap_out, window_left, window_right, chunk, PageTable, stride_pt,
                stride_kb, stride_ks, stride_vb, stride_vs, new_key, k_new, v_new,
                HEAD_DIM, HEAD_DIM_V, BLOCK_N, VARLEN_K, PAGED, PAGE_SIZE, HAS_WINDOW, HAS_CHUNK, HAS_SOFTCAP, True)

    empty = l_i == 0.0
    if HAS_SINKS:
        if not SPLIT:
            # The sink logit joins the denominator (no value) of rows that saw a key; split
            # partials leave it to the combine so it is counted once.
            sink = tl.load(Sinks + head_q, mask=row_ok & ~empty, other=float("-inf")).to(tl.float32)
            sink = sink * 1.4426950408889634
            m_fin = tl.maximum(m_i, sink)
            pivot = tl.where(m_fin == float("-inf"), 0.0, m_fin)
            alpha = tl.exp2(m_i - pivot)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha + tl.exp2(sink - pivot)
            m_i = m_fin
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    if SPLIT:
        lse = tl.where(empty, float("-inf"), lse)
    else:
        lse = tl.where(empty, float("inf"), lse)

    tok = (tok0 + q_idx).to(tl.int64)
    o_ptrs = (Out + split.to(tl.int64) * stride_o_split + batch.to(tl.int64) * stride_ob + tok[:, None] * stride_os
              + head_q[:, None] * stride_oh + cols_v[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (cols_v < HEAD_DIM_V)[None, :])
    l_ptrs = Lse + split.to(tl.int64) * stride_l_split + batch.to(tl.int64) * stride_lb + tok * stride_ls + head_q * stride_lh
    tl.store(l_ptrs, lse, mask=row_ok)

    if FUSED_COMBINE:
        # Every thread's partial stores precede the CTA barrier, the barrier precedes thread 0's
        # release (the ticket): the last program's acquire then sees all of the tile's partials.
        tl.debug_barrier()
        tile_rows = tl.minimum(seqlen_q * GROUP - m_block * BLOCK_M, BLOCK_M)
        if MERGE_GROUP > 0:
            # Two levels: the last program of each group of MERGE_GROUP splits merges the group
            # into its first split's slot (lse -inf where empty, no sinks), then the last group
            # merges the groups. Its serial tail is one group and the group results, not every
            # split (MQA at batch 1: ~115 splits of one tile), and the group merges overlap
            # with splits still streaming K/V.
            group = split // MERGE_GROUP
            g0 = group * MERGE_GROUP
            members = tl.minimum(num_splits - g0, MERGE_GROUP)
            n_groups = tl.cdiv(num_splits, MERGE_GROUP)
            group_slot = Tickets + num_tiles + tile * n_groups + group
            ticket = tl.atomic_add(group_slot, 1, sem="acq_rel", scope="gpu")
            if ticket == members - 1:
                o_g = Out + g0.to(tl.int64) * stride_o_split
                l_g = Lse + g0.to(tl.int64) * stride_l_split
                _merge_splits(o_g, l_g, o_g, l_g, Sinks, batch, tok0, m_block * BLOCK_M, tile_rows, head_kv, cols_v,
                              members,
                              stride_o_split, stride_ob, stride_os, stride_oh,
                              stride_l_split, stride_lb, stride_ls, stride_lh,
                              stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh,
                              GROUP, HEAD_DIM_V, MERGE_M, BLOCK_DV, False, MERGE_S, False)
                tl.store(group_slot, 0)
                tl.debug_barrier()
                ticket = tl.atomic_add(Tickets + tile, 1, sem="acq_rel", scope="gpu")
                if ticket == n_groups - 1:
                    # int64: a group's stride passes 2**31 elements long before a split's does.
                    _merge_splits(Out, Lse, Final, FinalLse, Sinks, batch, tok0, m_block * BLOCK_M, tile_rows,
                                  head_kv, cols_v, n_groups,
                                  tl.cast(stride_o_split, tl.int64) * MERGE_GROUP, stride_ob, stride_os, stride_oh,
                                  tl.cast(stride_l_split, tl.int64) * MERGE_GROUP, stride_lb, stride_ls, stride_lh,
                                  stride_fb, stride_fs, stride_fh, stride_flb, stride_fls, stride_flh,
                                  GROUP, HEAD_DIM_V, MERGE_M, BLOCK_DV, HAS_SINKS, MERGE_S, True)
                    tl.store(Tickets + tile, 0)
        else:
            ticket = tl.atomic_add(Tickets + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:
                _merge_splits(Out, Lse, Final, FinalLse, Sinks, batch, tok0, m_block * BLOCK_M, tile_rows, head_kv,
                              cols_v, num_splits,
                              stride_o_split, stride_ob, stride_os, stride_oh,
                              stride_l_split, stride_lb, stride_ls, stride_lh,
                              stride_fb, stride_fs, stride_fh, stride_flb, stride_fls, stride_flh,
                              GROUP, HEAD_DIM_V, MERGE_M, BLOCK_DV, HAS_SINKS, MERGE_S, True)
                # Back to 0 for the next launch on this slot (kernel boundaries order it).
                tl.store(Tickets + tile, 0)


@triton.jit
def _merge_splits(Out, Lse, Final, FinalLse, Sinks, batch, tok0, row0, n_rows, head_kv, cols_v, num_splits,
                  stride_o_split, stride_ob, stride_os, stride_oh,
                  stride_l_split, stride_lb, stride_ls, stride_lh,
                  stride_fb, stride_fs, stride_fh, stride_flb, stride_fls, stride_flh,
                  GROUP: tl.constexpr, HEAD_DIM_V: tl.constexpr, MERGE_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_SINKS: tl.constexpr, MERGE_S: tl.constexpr, FINAL: tl.constexpr):
    """combine.py's math for the n_rows packed rows of a tile from row0, loaded MERGE_M rows wide:
    a decode tile of GQA 32/8 has BLOCK_M = 16 (the dot's minimum) but 4 rows, so a load sized
    by BLOCK_M would spend three quarters of its registers on masked rows. n_rows <= MERGE_M:
    the host takes MERGE_M = BLOCK_M or a power of two covering every tile's rows."""
    r = tl.arange(0, MERGE_M)
    rows = row0 + r
    head_q = head_kv * GROUP + rows % GROUP
    tok = (tok0 + rows // GROUP).to(tl.int64)
    _merge_rows(Out, Lse, Final, FinalLse, Sinks, batch, tok, head_q, r < n_rows, cols_v, num_splits,
                stride_o_split, stride_ob, stride_os, stride_oh,
                stride_l_split, stride_lb, stride_ls, stride_lh,
                stride_fb, stride_fs, stride_fh, stride_flb, stride_fls, stride_flh,
                HEAD_DIM_V, MERGE_M, BLOCK_DV, HAS_SINKS, MERGE_S, FINAL)


@triton.jit
def _merge_rows(Out, Lse, Final, FinalLse, Sinks, batch, tok, head_q, row_ok, cols_v, num_splits,
                stride_o_split, stride_ob, stride_os, stride_oh,
                stride_l_split, stride_lb, stride_ls, stride_lh,
                stride_fb, stride_fs, stride_fh, stride_flb, stride_fls, stride_flh,
                HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                HAS_SINKS: tl.constexpr, MERGE_S: tl.constexpr, FINAL: tl.constexpr):
    """combine.py's math for BLOCK_M rows, in one pass: MERGE_S splits' lse and partial outputs
    per load (independent loads: one memory round trip per MERGE_S splits), rescaled online.
    Every split of a fused launch wrote its partial (an empty one: out 0, lse -inf), so all are
    read. .cg loads: the partials were written by other SMs in this launch (L2, not this L1).
    FINAL: write out / lse as the call returns them (sinks, +inf where empty); otherwise a
    partial again (-inf where empty), which may overwrite the first split read."""
    splits = tl.arange(0, MERGE_S)
    col_ok = cols_v < HEAD_DIM_V
    batch = batch.to(tl.int64)
    lse_in = (Lse + batch * stride_lb + tok[:, None] * stride_ls + head_q[:, None] * stride_lh
              + splits.to(tl.int64)[None, :] * stride_l_split)
    out_in = (Out + batch * stride_ob + tok[:, None, None] * stride_os + head_q[:, None, None] * stride_oh
              + splits.to(tl.int64)[None, :, None] * stride_o_split + cols_v[None, None, :])
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, MERGE_S):
        ok = row_ok[:, None] & ((s0 + splits) < num_splits)[None, :]
        base = tl.cast(s0, tl.int64)
        lse_s = tl.load(lse_in + base * stride_l_split, mask=ok, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(out_in + base * stride_o_split, mask=ok[:, :, None] & col_ok[None, None, :], other=0.0,
                       cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse_s, 1))
        # Rows with no key yet keep m = -inf: pivot on 0 so every term is exp(-inf) = 0, not NaN.
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - pivot)
        weight = tl.exp(lse_s - pivot[:, None])
        total = total * scale + tl.sum(weight, 1)
        acc = acc * scale[:, None] + tl.sum(weight[:, :, None] * part, 1)
        m = m_new
    empty = total == 0.0
    if HAS_SINKS and FINAL:
        # The sink logit joins the denominator only of rows that saw a key (spec: empty rows stay empty).
        sink = tl.load(Sinks + head_q, mask=row_ok & ~empty, other=float("-inf")).to(tl.float32)
        m_fin = tl.maximum(m, sink)
        pivot = tl.where(m_fin == float("-inf"), 0.0, m_fin)
        scale = tl.exp(m - pivot)
        total = total * scale + tl.exp(sink - pivot)
        acc = acc * scale[:, None]
        m = m_fin
    pivot = tl.where(m == float("-inf"), 0.0, m)
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("inf") if FINAL else float("-inf"), tl.log(tl.where(empty, 1.0, total)) + pivot)
    if not FINAL:
        # The stores below overwrite the first split read, and a thread's stored values need not
        # depend on every other thread's load of it (lse_s is loaded once per thread of a row's
        # columns): every thread's loads must precede any store. Today's sm_90 code has layout
        # conversions through shared memory in between; this barrier makes it a guarantee.
        tl.debug_barrier()
    f_ptrs = Final + batch * stride_fb + tok[:, None] * stride_fs + head_q[:, None] * stride_fh + cols_v[None, :]
    tl.store(f_ptrs, out.to(Final.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    tl.store(FinalLse + batch * stride_flb + tok * stride_fls + head_q * stride_flh, lse, mask=row_ok)


# Constexpr order: GROUP, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, VARLEN_Q,
# VARLEN_K, HAS_SEQUSED_K, HAS_LEFTPAD, HAS_KV_BATCH_IDX, PAGED, PAGE_SIZE, HAS_WINDOW, HAS_CHUNK,
# HAS_SOFTCAP, HAS_SINKS, SPLIT, FUSED_COMBINE, MERGE_S, MERGE_M, MERGE_GROUP, APPEND, HAS_ROTARY, INTERLEAVED,
# Q_PER_TOKEN, HAS_ROTARY_SEQLENS.
_launch = Launcher(_decode_kernel)

# Counter slots of a device's ring: 256 KB. A split launch has at most a few hundred tiles (the
# heuristic splits only grids that cannot fill the GPU), so the ring wraps after hundreds of calls.
TICKET_SLOTS = 1 << 16


class TicketRing:
    """int32 ticket counters of fused split launches on one device, all 0 between launches.

    Each launch takes the next slots it counts on (`fused_tiles`: one per tile, plus one per
    merge group where a tile splits more than MERGE_GROUP ways; a 16-byte multiple, so the
    pointer keeps Triton's alignment class) and leaves them 0. Launches on one stream may share slots (stream order);
    two launches in flight at once on different streams share slots only if the ring wrapped
    between them (hundreds of calls), which would corrupt both: a caller that keeps decode
    launches of one device on two concurrent streams for that long needs its own ordering.
    A CUDA graph keeps the slots it was captured with; its replays follow the same rule.
    """

    def __init__(self, device: torch.device):
        self.slots = torch.zeros(TICKET_SLOTS, dtype=torch.int32, device=device)
        if device.type == "cuda":
            # Zeroed on the current stream: make it visible to launches on any other stream.
            torch.cuda.synchronize(device)
        self.base = self.slots.data_ptr()
        self.cursor = 0
        # Threads that launch at once (a serving engine's, or any under free-threaded Python)
        # must not both read the cursor before either moves it: they would share slots.
        self._lock = threading.Lock()

    def take(self, counters: int) -> int:
        """Element offset of `counters` free slots."""
        count = -(-counters // 4) * 4
        with self._lock:
            if self.cursor + count > TICKET_SLOTS:
                self.cursor = 0
            offset = self.cursor
            self.cursor += count
        return offset

    def pointer(self, counters: int) -> int:
        return self.base + 4 * self.take(counters)


_RINGS: dict = {}
_RINGS_LOCK = threading.Lock()


def ticket_ring(device: torch.device) -> Optional[TicketRing]:
    """The device's ring, made on first use; None while a graph capture is under way and there is
    none yet (its zeroing would only be recorded, not run, and an allocation would land in the
    graph's private pool)."""
    ring = _RINGS.get(device)
    if ring is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        with _RINGS_LOCK:  # one ring per device even when threads meet here first
            ring = _RINGS.get(device)
            if ring is None:
                ring = _RINGS[device] = TicketRing(device)
    return ring


# Splits per group of a two-level in-launch merge; launches of at most this many splits merge in
# one level. A group of 16 is one load of a decode tile's rows (_merge_splits_per_load): MQA at
# batch 1 (~122 splits, 8 groups) has a serial tail of two loads where one level took 29.
MERGE_GROUP = 16


def _merge_group(num_splits: int) -> int:
    return MERGE_GROUP if num_splits > MERGE_GROUP else 0


def _ticket_counters(tiles: int, num_splits: int) -> int:
    """Counters a fused launch uses: one per tile, plus one per group of a two-level merge."""
    group = _merge_group(num_splits)
    return tiles * (1 + (-(-num_splits // group) if group else 0))


def _merge_rows_per_load(block_m: int, rows_per_tile: int) -> int:
    """Rows one merge load covers: the tile's rows that exist (GQA 32/8 decode: 4 of 16)."""
    return min(block_m, triton.next_power_of_2(rows_per_tile))


def _merge_splits_per_load(merge_m: int, block_dv: int, num_splits: int, num_warps: int) -> int:
    """Splits one merge load covers: a (row, split, column) tile of 64 fp32 registers a thread,
    a power of two, no more than covers the splits. The loads are dependent round trips to L2
    made by one program: GQA 32/8 takes its 16 splits in one (four before rows were sized by
    the tile's real rows), MQA's 8-warp launch a group of 16 in one."""
    per_load = 1
    while per_load * 2 * merge_m * block_dv <= 2048 * num_warps and per_load < num_splits:
        per_load *= 2
    return per_load


def supports(a: AttnArgs) -> Optional[str]:
    """None when the decode kernel computes this call, else the reason it does not."""
    if a.qv is not None:
        return "qv (absorbed MLA) is not implemented in the decode kernel"
    if a.is_fp8:
        return "fp8 is not implemented in the decode kernel"
    if a.cp_world_size > 1:
        return "context parallel is not implemented in the decode kernel"
    if a.seqused_q is not None:
        return "seqused_q is not implemented in the decode kernel"
    max_seqlen_q = a.max_seqlen_q if a.is_varlen_q else a.q.shape[1]
    rows = max_seqlen_q * (a.num_heads_q // a.num_heads_kv)
    if rows > MAX_PACKED_ROWS:
        return f"{rows} packed query rows per KV head (> {MAX_PACKED_ROWS}): the tiled forward is faster"
    return None


class Append(NamedTuple):
    """One new token per batch row that the decode launch writes into the cache itself (with
    rotary on it and on q, spec sec 5) instead of a separate append_kv launch before it: each
    eager launch costs the host ~18 us on the H100 host. append_kv's arguments of the same name."""
    k_new: torch.Tensor  # (B, 1, Hk, D)
    v_new: torch.Tensor  # (B, 1, Hk, Dv)
    rotary_cos: Optional[torch.Tensor]
    rotary_sin: Optional[torch.Tensor]
    rotary_seqlens: Optional[torch.Tensor]
    rotary_interleaved: bool
    rotate_q_per_token: bool


def fusable_append(a: AttnArgs, k_new: Optional[torch.Tensor], cu_seqlens_k_new: Optional[torch.Tensor]) -> bool:
    """Whether the decode launch of `a` (seqused_k: the cache lengths before the append, q not
    yet rotated) should write these new keys itself: one dense new token per row, dense q with
    at least one token (a launch with nothing to attend is skipped, the append must still
    happen), and at most one program per SM. The new key's block runs outside the pipelined loop
    with its tiles in registers: 182 -> 200 registers at B=1 (4 splits), 112 -> 192 for the
    2-stage launch of B=64 ctx 4k (sm_90 ptxas, scripts/aot_decode.py), which would halve the
    programs an SM holds where residency hides the latency (Run 3: 2.94 vs 2.72 TB/s)."""
    if not (k_new is not None and cu_seqlens_k_new is None and k_new.dim() == 4 and k_new.shape[1] == 1
            and not a.is_varlen_q and a.cu_seqlens_k is None and a.seqused_k is not None
            and a.batch_size > 0 and a.q.shape[1] > 0 and supports(a) is None):
        return False
    plan = _call_plan(a, None)
    return a.batch_size * a.num_heads_kv * plan.num_m_blocks * plan.num_splits <= num_sms(a.q.device)


class _Plan(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int
    num_m_blocks: int
    block_d: int
    block_dv: int


@functools.lru_cache(maxsize=1024)
def _plan(batch: int, num_heads_q: int, num_heads_kv: int, max_seqlen_q: int, max_seqlen_k: int,
          head_dim: int, head_dim_v: int, paged: bool, device: torch.device, num_splits: int,
          config: Optional[tuple[int, int, int]], arch_name: str = arch.DEFAULT) -> _Plan:
    """Launch shape from Python ints only; cached because a decode loop repeats the same call
    and every microsecond of host work is a microsecond of step latency."""
    rows = max_seqlen_q * (num_heads_q // num_heads_kv)
    block_m = decode_block_m(rows)
    num_m_blocks = -(-rows // block_m)
    splits = decode_num_splits(batch, num_heads_q, num_heads_kv, max_seqlen_q, max_seqlen_k,
                               head_dim, head_dim_v, device, num_splits)
    # tl.dot takes K >= 16 on the GPU (head dims 8 failed to compile there; the interpreter
    # takes any): narrower heads run in 16 columns, the rest masked.
    dims = (max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(head_dim_v)))
    if config is not None:
        return _Plan(block_m, *config, splits, num_m_blocks, *dims)
    programs = batch * num_heads_kv * num_m_blocks * splits
    warps = 4
    block_n = decode_block_n(head_dim, head_dim_v)
    if paged:
        stages = _PAGED_STAGES
        warps = _PAGED_WARPS
    elif programs >= 2 * num_sms(device):
        stages = _CONTIGUOUS_STAGES_RESIDENT
        block_n = min(block_n, _RESIDENT_BLOCK_N)
    else:
        stages = _CONTIGUOUS_STAGES
        if batch * num_heads_kv * num_m_blocks <= _FEW_TILES and programs <= num_sms(device):
            warps = _CONTIGUOUS_WARPS_FEW_TILES
    if arch_name in arch.WIDE_TILE_ARCHS and block_m * max(dims) >= arch.WIDE_TILE:
        # 8 warps for the tile's accumulator and q in registers (arch.WIDE_TILE); on the 99 KB
        # GPUs also 2 stages (sm_86, D = 256: 100 KB at 3).
        warps = 8
        if arch.ARCHS[arch_name].shared_bytes < 128 * 1024:
            stages = min(stages, 2)
    return _Plan(block_m, block_n, warps, stages, splits, num_m_blocks, *dims)


def outputs(a: AttnArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (out, lse) for a call, in the layouts of backends/params.py."""
    q = a.q
    out = torch.empty((*q.shape[:-1], a.head_dim_v), dtype=a.out_dtype, device=q.device)
    if a.is_varlen_q:
        lse_shape = (a.num_heads_q, q.shape[0])
    else:
        lse_shape = (a.batch_size, a.num_heads_q, q.shape[1])
    return out, torch.empty(lse_shape, dtype=torch.float32, device=q.device)


def partials_numel(a: AttnArgs, config: Optional[tuple[int, int, int]] = None) -> int:
    """fp32 elements of the split partials (out, then lse) of a call; 0 when it runs unsplit."""
    splits = _call_plan(a, config).num_splits
    if splits == 1:
        return 0
    tokens = _num_tokens(a)
    return splits * tokens * a.num_heads_q * (a.head_dim_v + 1)


def fused_tiles(a: AttnArgs, config: Optional[tuple[int, int, int]] = None) -> int:
    """Ticket counters a call's launch needs to merge its splits in place; 0 when it runs unsplit
    or needs more counters than a ring holds (then the merge is a second launch)."""
    plan = _call_plan(a, config)
    counters = _ticket_counters(a.batch_size * a.num_heads_kv * plan.num_m_blocks, plan.num_splits)
    return counters if plan.num_splits > 1 and counters <= TICKET_SLOTS else 0


def _num_tokens(a: AttnArgs) -> int:
    return a.q.shape[0] if a.is_varlen_q else a.batch_size * a.q.shape[1]


def _call_plan(a: AttnArgs, config) -> _Plan:
    max_seqlen_q = a.max_seqlen_q if a.is_varlen_q else a.q.shape[1]
    return _plan(a.batch_size, a.num_heads_q, a.num_heads_kv, max_seqlen_q, a.max_seqlen_k, a.head_dim,
                 a.head_dim_v, a.page_table is not None, a.q.device, a.num_splits, config,
                 arch.device_arch(a.q.device))


def launches(a: AttnArgs, out: torch.Tensor, lse: torch.Tensor, partials: Optional[torch.Tensor] = None,
             seqused_add: int = 0, config: Optional[tuple[int, int, int]] = None,
             tickets: Optional[torch.Tensor] = None, append: Optional[Append] = None) -> list[Launch]:
    """The launches that fill `out` / `lse` (from `outputs`). partials: a flat fp32 buffer of at
    least partials_numel(a) elements for split launches (allocated here when None). seqused_add:
    added to every seqused_k entry on the device (an append launch's new tokens). tickets: zeroed
    int32 counters (`fused_tiles` of them), for a split launch that merges in place (default:
    slots of the device's ring; without a ring the merge is a second launch). append: the step's
    new token, written by the decode launch (`fusable_append` must hold; seqused_add 1)."""
    if append is not None and seqused_add != 1:
        raise ValueError(f"a fused append adds one token to the cache lengths; got seqused_add={seqused_add}")
    q, k, v = a.q, a.k, a.v
    device = q.device
    batch, num_heads_q, num_heads_kv = a.batch_size, a.num_heads_q, a.num_heads_kv
    group = num_heads_q // num_heads_kv
    head_dim, head_dim_v = a.head_dim, a.head_dim_v
    varlen_q = a.is_varlen_q
    seqlen_q = 0 if varlen_q else q.shape[1]
    num_tokens = _num_tokens(a)
    if num_tokens == 0 or batch == 0:
        return []

    paged = a.page_table is not None
    block_m, block_n, num_warps, num_stages, num_splits, num_m_blocks, block_d, block_dv = _call_plan(a, config)

    # Per-token views (batch stride, token stride) of q, out and lse; varlen tokens are global.
    if varlen_q:
        q_strides = (0, q.stride(0), q.stride(1))
    else:
        q_strides = (q.stride(0), q.stride(1), q.stride(2))
    if num_splits == 1:
        dst_out, dst_lse = out, lse
        o_strides, l_strides = unsplit_strides(out, lse, varlen_q)
    else:
        out_numel = num_splits * num_tokens * num_heads_q * head_dim_v
        if partials is None:
            partials = torch.empty(out_numel + num_splits * num_tokens * num_heads_q, dtype=torch.float32,
                                   device=device)
        dst_out = partials[:out_numel].view(num_splits, num_tokens, num_heads_q, head_dim_v)
        dst_lse = partials[out_numel:out_numel + num_splits * num_tokens * num_heads_q].view(
            num_splits, num_tokens, num_heads_q)
        per_batch = 0 if varlen_q else seqlen_q
        o_strides = (dst_out.stride(0), per_batch * dst_out.stride(1), dst_out.stride(1), dst_out.stride(2))
        l_strides = (dst_lse.stride(0), per_batch * dst_lse.stride(1), dst_lse.stride(1), dst_lse.stride(2))

    varlen_k = a.cu_seqlens_k is not None
    if paged or not varlen_k:
        k_strides, v_strides = k.stride()[:3], v.stride()[:3]
    else:
        k_strides, v_strides = (0, *k.stride()[:2]), (0, *v.stride()[:2])
    has_window = a.window_left >= 0 or a.window_right >= 0
    softcap = a.softcap
    dummy = lse
    tiles = batch * num_heads_kv * num_m_blocks
    grid = (tiles, num_splits)
    fused = False
    counters = _ticket_counters(tiles, num_splits)
    if num_splits > 1 and counters <= TICKET_SLOTS:
        if tickets is None:
            ring = ticket_ring(device)
            if ring is not None:
                offset = ring.take(counters)
                tickets = ring.slots[offset:offset + counters]
        fused = tickets is not None
    f_strides = unsplit_strides(out, lse, varlen_q)
    max_seqlen_q = a.max_seqlen_q if varlen_q else seqlen_q
    merge_m = _merge_rows_per_load(block_m, max_seqlen_q * group) if fused else block_m
    rotary = append is not None and append.rotary_cos is not None
    if append is not None:
        k_new, v_new = append.k_new, append.v_new
        new_strides = (k_new.stride(0), k_new.stride(2), v_new.stride(0), v_new.stride(2))
    else:
        k_new = v_new = dummy
        new_strides = (0, 0, 0, 0)
    result = [Launch(_launch, grid, (
        q, k, v, dst_out, dst_lse, out, lse, tickets if fused else dummy,
        a.sinks if a.sinks is not None else dummy,
        a.cu_seqlens_q if varlen_q else dummy, a.cu_seqlens_k if varlen_k else dummy,
        a.seqused_k if a.seqused_k is not None else dummy, a.leftpad_k if a.leftpad_k is not None else dummy,
        a.kv_batch_idx if a.kv_batch_idx is not None else dummy, a.page_table if paged else dummy,
        k_new, v_new, append.rotary_cos if rotary else dummy, append.rotary_sin if rotary else dummy,
        append.rotary_seqlens if rotary and append.rotary_seqlens is not None else dummy,
        a.softmax_scale * LOG2E, a.softmax_scale / softcap if softcap > 0 else 0.0, softcap * LOG2E,
        a.window_left, a.window_right, a.attention_chunk, seqused_add,
        num_heads_kv, seqlen_q, a.page_table.shape[1] * k.shape[1] if paged else (0 if varlen_k else k.shape[1]),
        num_m_blocks, num_splits, tiles,
        2 * append.rotary_cos.shape[1] if rotary else 0, append.rotary_cos.shape[0] if rotary else 0,
        *q_strides, *k_strides, *v_strides, *o_strides, *l_strides, *f_strides[0][1:], *f_strides[1][1:],
        a.page_table.stride(0) if paged else 0, *new_strides,
        append.rotary_cos.stride(0) if rotary else 0, append.rotary_sin.stride(0) if rotary else 0,
    ), (
        group, head_dim, head_dim_v, block_m, block_n, block_d, block_dv,
        varlen_q, varlen_k and not paged, a.seqused_k is not None,
        a.leftpad_k is not None, a.kv_batch_idx is not None,
        paged, k.shape[1] if paged else 1, has_window,
        a.attention_chunk > 0, softcap > 0, a.sinks is not None,
        num_splits > 1, fused, _merge_splits_per_load(merge_m, block_dv, num_splits, num_warps) if fused else 1,
        merge_m, _merge_group(num_splits) if fused else 0,
        append is not None, rotary, rotary and append.rotary_interleaved,
        rotary and append.rotate_q_per_token, rotary and append.rotary_seqlens is not None,
    ), num_warps, num_stages)]
    if num_splits > 1 and not fused:
        rows = (1, num_tokens) if varlen_q else (batch, seqlen_q)
        out_view = out.unsqueeze(0) if varlen_q else out
        lse_view = lse.t().unsqueeze(0) if varlen_q else lse.transpose(1, 2)
        result.append(Launch(*combine_launch(
            dst_out.view(num_splits, *rows, num_heads_q, head_dim_v), dst_lse.view(num_splits, *rows, num_heads_q),
            out_view, lse_view, empty_lse=float("inf"), sinks=a.sinks)))
    return result


def forward(a: AttnArgs, config: Optional[tuple[int, int, int]] = None):
    """(out, lse) for a call `supports` accepts; conventions in backends/params.py.

    config = (BLOCK_N, num_warps, num_stages) overrides the defaults (benchmarks/tune_decode.py).
    """
    out, lse = outputs(a)
    for launch in launches(a, out, lse, config=config):
        launch()
    return out, lse

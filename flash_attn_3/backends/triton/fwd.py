"""Triton attention forward: one kernel for every AttnArgs feature (spec section 4).

Grid: (query-row blocks, heads, batch * splits), launched in batch slices where batch * splits
passes the 65535 limit of grid axis 2. A program owns BLOCK_M query rows of one head, or
with pack-GQA, BLOCK_M (query, head) rows of one KV head's query group so K/V are read once per
group. Its key range comes from the masks (masks.key_block_range): blocks every row fully sees run
without a mask, only the edge blocks (window edges, causal diagonal, sequence end) pay for one.
With num_splits > 1 each split writes fp32 partials over a slice of those blocks and the partials
are merged by log-sum-exp (combine).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..params import AttnArgs
from . import arch, masks
from .combine import combine_into, unsplit_strides
from .launch import Autotuned
from .scheduler import choose_num_splits

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_2d(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # Unmasked loads where the shape allows it keep the fast path free of predicates.
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _block(first, t, skip_from, skip_count, MASKED: tl.constexpr):
    """Key block of loop step t: the masked loop jumps over the unmasked middle."""
    blk = first + t
    if MASKED:
        blk = tl.where(blk >= skip_from, blk + skip_count, blk)
    return blk


@triton.jit
def _page_ids(PageRow, leftpad, blk, seqlen_k, page_size, valid, BLOCK_N: tl.constexpr):
    """Physical page of each key row of block blk (0 past the sequence or when not valid)."""
    cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(PageRow + (leftpad + cols) // page_size, mask=(cols < seqlen_k) & valid,
                   other=0)


@triton.jit
def _kv_loop(acc, m_i, l_i, q, qv, first, count, skip_from, skip_count,
             K_row, V_row, PageRow, leftpad, page_size, stride_kb, stride_kn, stride_vb,
             stride_vn, stride_vd, rows, seqlen_k, total_k, diag, window_left, window_right, chunk,
             cp_world_size, cp_rank, qk_scale, cap_scale, offs_d, offs_dv,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr, PAGED: tl.constexpr, HAS_QV: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             HAS_CHUNK: tl.constexpr, IS_CP: tl.constexpr, P_SHIFT: tl.constexpr,
             PV_BF16: tl.constexpr):
    """Online softmax over `count` key blocks from block `first`, jumping `skip_count` blocks at
    `skip_from` when MASKED (one masked loop covers both edges around the unmasked middle).
    Scores live in the log2 domain: m and the exponent are log2(e) * score; without softcap the
    raw q.k is kept and the scale rides in the exp2's FMA. p = 2**(s2 - m + P_SHIFT)."""
    PAD_D: tl.constexpr = HEAD_DIM != offs_d.shape[0]
    PAD_DV: tl.constexpr = HEAD_DIM_V != offs_dv.shape[0]
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    offs_n = tl.arange(0, BLOCK_N)
    if PAGED:
        # Page ids are read one block ahead: K/V addresses then come from a loop-carried value,
        # not from a load of the same iteration, which lets the pipeliner keep num_stages - 1
        # K/V copies in flight (with the page load in the same iteration it kept none).
        next_page = _page_ids(PageRow, leftpad, _block(first, 0, skip_from, skip_count, MASKED),
                              seqlen_k, page_size, count > 0, BLOCK_N)
    for t in tl.range(0, count):
        blk = _block(first, t, skip_from, skip_count, MASKED)
        cols = blk * BLOCK_N + offs_n
        in_seq = cols < seqlen_k
        if PAGED:
            # Gather rows through the page table: works for any page size, 1 and 3 included.
            page = next_page.to(tl.int64)
            next_page = _page_ids(PageRow, leftpad,
                                  _block(first, t + 1, skip_from, skip_count, MASKED), seqlen_k,
                                  page_size, t + 1 < count, BLOCK_N)
            in_page = (leftpad + cols) % page_size
            k_off = page * stride_kb + in_page * stride_kn
            v_off = page * stride_vb + in_page * stride_vn
            k_ptrs = K_row + k_off[:, None] + offs_d[None, :]
            v_ptrs = V_row + v_off[:, None] + offs_dv[None, :] * stride_vd
        else:
            start = (blk * BLOCK_N).to(tl.int64)
            k_ptrs = K_row + start * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
            v_ptrs = (V_row + start * stride_vn + offs_n[:, None] * stride_vn
                      + offs_dv[None, :] * stride_vd)
        k = _load_2d(k_ptrs, in_seq, d_ok, MASKED, PAD_D)
        v = _load_2d(v_ptrs, in_seq, dv_ok, MASKED, PAD_DV)
        if PV_BF16:
            v = v.to(tl.bfloat16)
        s = tl.dot(q, tl.trans(k))
        if HAS_QV:
            s = tl.dot(qv, tl.trans(v), s)
        if HAS_SOFTCAP:
            s = masks.tanh(s * qk_scale) * cap_scale
        if MASKED:
            ok = masks.allowed(rows, cols, seqlen_k, total_k, diag, window_left, window_right,
                               chunk, cp_world_size, cp_rank, HAS_LEFT, HAS_RIGHT, HAS_CHUNK,
                               IS_CP)
            s = tl.where(ok, s, float("-inf"))
        if HAS_SOFTCAP:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:
            # A row with nothing allowed so far keeps m = -inf; subtract 0 instead of -inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        if P_SHIFT != 0:
            m_use = m_use - P_SHIFT
        if HAS_SOFTCAP:
            p = tl.exp2(s - m_use[:, None])
        else:
            p = tl.exp2(s * qk_scale - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


# Lengths, window sizes and counts change between calls; letting triton specialize them (== 1,
# divisible by 16) would compile a new variant for each pattern without any faster code.
@triton.jit(do_not_specialize=[
    "seqlen_q_static", "seqlen_k_static", "group_size", "page_size", "window_left",
    "window_right", "chunk", "cp_world_size", "cp_rank", "num_splits", "batch_base", "q_bucket",
    "k_bucket"])
def _attn_fwd(
    Q, K, V, QV, Out, Lse,
    CuSeqlensQ, CuSeqlensK, SequsedQ, SequsedK, PageTable, KvBatchIdx, LeftpadK, CpTotSequsedK,
    QDescale, KDescale, VDescale, Sinks,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
    stride_vh, stride_vd, stride_qvb, stride_qvm, stride_qvh, stride_os, stride_ob, stride_om,
    stride_oh,
    stride_ls, stride_lb, stride_lm, stride_lh, stride_pt, stride_qd_b, stride_qd_h,
    stride_kd_b, stride_kd_h, stride_vd_b, stride_vd_h,
    seqlen_q_static, seqlen_k_static, group_size, page_size, softmax_scale, softcap,
    window_left, window_right, chunk, cp_world_size, cp_rank, num_splits, batch_base,
    q_bucket, k_bucket,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr, HAS_SEQUSED_Q: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr, PAGED: tl.constexpr, HAS_KV_BATCH_IDX: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, IS_CP: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_QV: tl.constexpr, IS_FP8: tl.constexpr,
    PACK_GQA: tl.constexpr, SPLIT: tl.constexpr, PV_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    if ALIGNED:
        # Head dims are multiples of 8 but triton only proves divisibility by 16 itself: without
        # this a head stride of 72 or 200 elements drops loads to 2-byte scalars, which also keeps
        # them out of the cp.async pipeline. `// 8 * 8` is exact here (the host checked) and, unlike
        # tl.multiple_of, is not lost on kernel arguments.
        stride_qb = stride_qb // 8 * 8
        stride_qm = stride_qm // 8 * 8
        stride_qh = stride_qh // 8 * 8
        stride_kb = stride_kb // 8 * 8
        stride_kn = stride_kn // 8 * 8
        stride_kh = stride_kh // 8 * 8
        stride_vb = stride_vb // 8 * 8
        stride_vn = stride_vn // 8 * 8
        stride_vh = stride_vh // 8 * 8
        stride_ob = stride_ob // 8 * 8
        stride_om = stride_om // 8 * 8
        stride_oh = stride_oh // 8 * 8
    # Highest row blocks first: under causal masks they carry the most keys.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = batch_base + tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    zero = batch * 0

    q_start = zero
    q_rows = zero + seqlen_q_static
    if IS_VARLEN_Q:
        q_start = tl.load(CuSeqlensQ + batch)
        q_rows = tl.load(CuSeqlensQ + batch + 1) - q_start
    seqlen_q = q_rows
    if HAS_SEQUSED_Q:
        seqlen_q = tl.load(SequsedQ + batch)
    if PACK_GQA:
        packed_rows = q_rows * group_size
    else:
        packed_rows = q_rows
    if pid_m * BLOCK_M >= packed_rows:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        rows = offs_m // group_size
        heads_q = head * group_size + offs_m % group_size
        head_kv = head
        i_lo = (pid_m * BLOCK_M) // group_size
        i_hi = (pid_m * BLOCK_M + BLOCK_M - 1) // group_size
    else:
        rows = offs_m
        heads_q = head
        head_kv = head // group_size
        i_lo = pid_m * BLOCK_M
        i_hi = pid_m * BLOCK_M + BLOCK_M - 1
    i_hi = tl.minimum(i_hi, seqlen_q - 1)
    q_row = q_start + rows

    kv_batch = batch
    if HAS_KV_BATCH_IDX:
        kv_batch = tl.load(KvBatchIdx + batch)
    k_start = zero
    seq_end = zero + seqlen_k_static
    if IS_VARLEN_K:
        k_start = tl.load(CuSeqlensK + batch)
        seq_end = tl.load(CuSeqlensK + batch + 1) - k_start
    if HAS_SEQUSED_K:
        # Never past the row: lengths are values the checks cannot read, and a cache length
        # beyond the capacity must not turn into an out-of-bounds read.
        seq_end = tl.minimum(tl.load(SequsedK + batch), seq_end)
    leftpad = zero
    if HAS_LEFTPAD:
        leftpad = tl.load(LeftpadK + batch)
    seqlen_k = seq_end - leftpad
    total_k = seqlen_k
    if IS_CP:
        total_k = tl.load(CpTotSequsedK + batch)
    diag = total_k - seqlen_q

    if PAGED:
        K_row = K + head_kv * stride_kh
        V_row = V + head_kv * stride_vh
        PageRow = PageTable + kv_batch.to(tl.int64) * stride_pt
    else:
        k_first = (k_start + leftpad).to(tl.int64)
        K_row = K + kv_batch.to(tl.int64) * stride_kb + k_first * stride_kn + head_kv * stride_kh
        V_row = V + kv_batch.to(tl.int64) * stride_vb + k_first * stride_vn + head_kv * stride_vh
        PageRow = PageTable

    scale = softmax_scale
    if IS_FP8:
        # Descales are per (batch, KV head); q's is indexed by the KV head of its query head.
        scale *= tl.load(QDescale + batch * stride_qd_b + head_kv * stride_qd_h)
        scale *= tl.load(KDescale + batch * stride_kd_b + head_kv * stride_kd_h)
    if HAS_SOFTCAP:
        qk_scale = scale / softcap
        cap_scale = softcap * 1.4426950408889634
    else:
        qk_scale = scale * 1.4426950408889634
        cap_scale = 1.0

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < seqlen_q
    q_off = q_row.to(tl.int64) * stride_qm + heads_q * stride_qh
    q = _load_2d(Q + batch.to(tl.int64) * stride_qb + q_off[:, None] + offs_d[None, :],
                 row_ok, offs_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    qv = q
    if HAS_QV:
        qv_off = q_row.to(tl.int64) * stride_qvm + heads_q * stride_qvh
        qv = _load_2d(QV + batch.to(tl.int64) * stride_qvb + qv_off[:, None] + offs_dv[None, :],
                      row_ok, offs_dv < HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)

    blk_lo, full_lo, full_hi, blk_hi = masks.key_block_range(
        i_lo, i_hi, seqlen_k, total_k, diag, window_left, window_right, chunk, cp_world_size,
        cp_rank, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_CHUNK, IS_CP)
    # No valid row in this block (rows past seqused_q): nothing to visit.
    blk_hi = tl.where(i_hi < i_lo, blk_lo, blk_hi)
    full_lo = tl.minimum(full_lo, blk_hi)
    full_hi = tl.minimum(full_hi, blk_hi)
    if SPLIT:
        per_split = (blk_hi - blk_lo + num_splits - 1) // num_splits
        s_lo = blk_lo + split * per_split
        s_hi = tl.maximum(tl.minimum(s_lo + per_split, blk_hi), s_lo)
        blk_lo = s_lo
        full_lo = tl.minimum(tl.maximum(full_lo, s_lo), s_hi)
        full_hi = tl.minimum(tl.maximum(full_hi, s_lo), s_hi)
        blk_hi = s_hi

    # fp8 P is stored as e4m3: shifting p from [0, 1] to [0, 256] keeps small probabilities out
    # of the subnormal range (FA3 does the same); l carries the same factor, lse removes it.
    P_SHIFT: tl.constexpr = 8.0 if IS_FP8 else 0.0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, m_i, l_i = _kv_loop(
        acc, m_i, l_i, q, qv, full_lo, full_hi - full_lo, 0, 0,
        K_row, V_row, PageRow, leftpad, page_size, stride_kb, stride_kn, stride_vb, stride_vn,
        stride_vd, rows, seqlen_k, total_k, diag, window_left, window_right, chunk,
        cp_world_size, cp_rank,
        qk_scale, cap_scale, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_N, False, PAGED,
        HAS_QV, HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT, HAS_CHUNK, IS_CP, P_SHIFT, PV_BF16)
    acc, m_i, l_i = _kv_loop(
        acc, m_i, l_i, q, qv, blk_lo, (full_lo - blk_lo) + (blk_hi - full_hi), full_lo,
        full_hi - full_lo,
        K_row, V_row, PageRow, leftpad, page_size, stride_kb, stride_kn, stride_vb, stride_vn,
        stride_vd, rows, seqlen_k, total_k, diag, window_left, window_right, chunk,
        cp_world_size, cp_rank,
        qk_scale, cap_scale, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, BLOCK_N, True, PAGED,
        HAS_QV, HAS_SOFTCAP, HAS_LEFT, HAS_RIGHT, HAS_CHUNK, IS_CP, P_SHIFT, PV_BF16)

    # Rows without an allowed key: out 0 and lse +inf (official non-split convention), sink or
    # not; split partials use -inf so they drop out of the merge.
    has_keys = (l_i > 0.0) & row_ok
    if HAS_SINKS and not SPLIT:
        # The sink is one more logit in the denominator with no value. Split partials leave it
        # to the merge, which adds it once.
        sink = tl.load(Sinks + heads_q) * 1.4426950408889634
        m_tot = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_tot)
        l_i = l_i * alpha + tl.exp2(sink - m_tot + P_SHIFT)
        acc = acc * alpha[:, None]
        m_i = m_tot
    lse = (m_i - P_SHIFT + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453
    if SPLIT:
        lse = tl.where(has_keys, lse, float("-inf"))
    else:
        lse = tl.where(has_keys, lse, float("inf"))
    out = acc * tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)[:, None]
    if IS_FP8:
        out = out * tl.load(VDescale + batch * stride_vd_b + head_kv * stride_vd_h)

    store_ok = rows < q_rows
    o_off = q_row.to(tl.int64) * stride_om + heads_q * stride_oh
    o_ptrs = (Out + split.to(tl.int64) * stride_os + batch.to(tl.int64) * stride_ob
              + o_off[:, None] + offs_dv[None, :])
    if BLOCK_DV != HEAD_DIM_V:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty),
                 mask=store_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=store_ok[:, None])
    # heads * stride_lh: the varlen LSE is (Hq, total_q), past 2**31 elements for long batches.
    l_off = q_row.to(tl.int64) * stride_lm + heads_q.to(tl.int64) * stride_lh
    tl.store(Lse + split.to(tl.int64) * stride_ls + batch.to(tl.int64) * stride_lb + l_off, lse,
             mask=store_ok)


# Autotuned prefill configs per head-dim class: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# BLOCK_M 128 with 8 warps gives two warpgroups for D >= 128 (perf_guide.md); the lists stay short
# because every entry is one more compile on first use. Each entry compiles for sm_90 without
# register spills and within shared memory (scripts/aot_fwd.py, causal and not).
_TUNE_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
    512: [(64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2)],
}
# Ampere, Ada and consumer Blackwell (tl.dot is mma.sync there: operands and accumulator in
# registers, K/V staged by cp.async; 99 KB of shared memory a program, 163 KB on sm_80). Chosen
# from sm_86 ptxas figures of the causal bf16 call (docs/perf-notes.md, "Portable kernels on other
# GPUs", 2026-12-07): every entry within 99 KB and spill-free (one: 4 bytes), BLOCK_M 128 only
# with 8 warps or a narrow BLOCK_N at D >= 128 (at 4 warps the 128-row accumulator and Q fragment
# take all 255 registers: (128, 64, 4, 3) spilled 1140 bytes at D = 128). Not yet timed on those
# GPUs: the autotuner picks among them on the first prefill call of a shape class.
_TUNE_CONFIGS_MMA_V2 = {
    64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    128: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
    256: [(64, 32, 8, 2), (64, 64, 8, 1), (32, 32, 4, 2)],
    512: [(64, 32, 8, 2), (32, 32, 4, 2)],
}
# A100's 163 KB take one more candidate where a spill-free tile needs more than 99 KB.
_TUNE_CONFIGS_SM80 = {**_TUNE_CONFIGS_MMA_V2,
                      256: _TUNE_CONFIGS_MMA_V2[256] + [(64, 64, 8, 2)]}
# Datacenter Blackwell has Hopper's 227 KB and a tensor-core MMA of its own (tcgen05, accumulator
# in tensor memory): the H100 lists, which compile for sm_100 within budget.
_TUNE_CONFIGS_BY_ARCH = {
    "sm_80": _TUNE_CONFIGS_SM80,
    "sm_86": _TUNE_CONFIGS_MMA_V2,
    "sm_89": _TUNE_CONFIGS_MMA_V2,
    "sm_90": _TUNE_CONFIGS,
    "sm_100": _TUNE_CONFIGS,
    "sm_120": _TUNE_CONFIGS_MMA_V2,
}
# CUDA caps grid axes 1 and 2 at 65535 programs; axis 2 (batch * splits) launches in slices.
_MAX_GRID_Z = 65535
_TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "q_bucket", "k_bucket", "HAS_LEFT", "HAS_RIGHT",
             "HAS_CHUNK", "PACK_GQA", "IS_VARLEN_Q", "PAGED", "HAS_QV"]
_tuned_kernels = {}


def _interpreting() -> bool:
    """TRITON_INTERPRET=1 (CPU tests). Triton 3.6's interpreter multiplies bf16 bit patterns as
    integers and rounds fp32 -> bf16 / fp8 wrongly; tests/conftest.py corrects both, so the tests
    run the GPU's arithmetic. Outside the tests bf16 and fp8 results are wrong there."""
    return not isinstance(_attn_fwd, triton.runtime.JITFunction)


def tune_configs(arch_name: str) -> dict:
    """head-dim class -> the (BLOCK_M, BLOCK_N, num_warps, num_stages) prefill autotunes over."""
    return _TUNE_CONFIGS_BY_ARCH[arch_name]


def _tuned_kernel(arch_name: str, head_class: int):
    kernel = _tuned_kernels.get((arch_name, head_class))
    if kernel is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in tune_configs(arch_name)[head_class]]
        kernel = _tuned_kernels.setdefault((arch_name, head_class), Autotuned(_attn_fwd, configs, _TUNE_KEY))
    return kernel


def _fixed_config(rows: int, block_d: int, block_dv: int, arch_name: str = arch.DEFAULT):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for few query rows (decode), split-KV and the
    interpreter; longer queries autotune over tune_configs(arch_name)."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if _interpreting():
        return min(block_m, 32), 16, 4, 1
    block_n = 128 if max(block_d, block_dv) <= 64 else (64 if max(block_d, block_dv) <= 128 else 32)
    warps = 4
    if arch_name in arch.WIDE_TILE_ARCHS and block_m * max(block_d, block_dv) >= arch.WIDE_TILE:
        warps = 8
    return block_m, block_n, warps, 3 if max(block_d, block_dv) <= 128 else 2


def _pack_gqa(a: AttnArgs, group: int, max_seqlen_q: int) -> bool:
    if group == 1:
        return False
    if a.pack_gqa is not None:
        return a.pack_gqa
    if a.is_varlen_q:
        return True
    # Pack when it wastes fewer padded rows of a 128-row block (FA3's own criterion).
    block = 128
    unpacked = max_seqlen_q / (triton.cdiv(max_seqlen_q, block) * block)
    packed = max_seqlen_q * group / (triton.cdiv(max_seqlen_q * group, block) * block)
    return unpacked < 0.9 * packed


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(a: AttnArgs, num_heads_grid: int, rows: int, block_m: int, block_n: int) -> int:
    """Split count of the grid, from Python ints only (no host sync: CUDA-graph safe)."""
    splits = a.num_splits
    if splits == 0:
        splits = choose_num_splits(a.batch_size, num_heads_grid, rows, a.max_seqlen_k,
                                   _num_sms(a.q.device), block_m=block_m, block_n=block_n)
    # More splits than key blocks only adds empty partials.
    return max(1, min(splits, triton.cdiv(max(a.max_seqlen_k, 1), block_n), 256))


_ONES: dict = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _ones(device: torch.device) -> torch.Tensor:
    """Stand-in for an absent fp8 descale, read with zero strides (fwd.py and fwd_hopper.py).
    One made during a CUDA graph capture is not kept: its fill is only recorded there (it runs
    at each replay, before the kernel that reads it) and its memory is the graph's, so later
    eager calls would read whatever that memory holds."""
    ones = _ONES.get(device)
    if ones is None:
        ones = torch.ones((1, 1), dtype=torch.float32, device=device)
        if not _capturing(device):
            _ONES[device] = ones
    return ones


def descale_operands(a: AttnArgs) -> tuple[list, list]:
    """The fp8 call's (q, k, v descale tensors, their six (batch, head) strides). An absent one
    is the shared 1.0, read at strides 0: its own strides (1, 1) sent the read of batch b, KV
    head h to element b + h of a one-element tensor (compute-sanitizer memcheck, H100
    2026-12-07: a paged fp8 call without descales read 4 bytes past it)."""
    tensors, strides = [], []
    for t in (a.q_descale, a.k_descale, a.v_descale):
        tensors.append(_ones(a.q.device) if t is None else t)
        strides += [0, 0] if t is None else [t.stride(0), t.stride(1)]
    return tensors, strides


def _kv_strides(t: torch.Tensor, packed: bool):
    """(batch or page, row, head) strides of K or V; packed varlen has no batch stride."""
    return (0, t.stride(0), t.stride(1)) if packed else (t.stride(0), t.stride(1), t.stride(2))


def forward(a: AttnArgs, config: Optional[tuple[int, int, int, int]] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec section 4 for every AttnArgs field. `config` = (BLOCK_M, BLOCK_N, num_warps,
    num_stages) replaces the heuristic / autotuned choice (benchmarks/tune_fwd.py sweeps it)."""
    q, k, v = a.q, a.k, a.v
    varlen_q = a.is_varlen_q
    batch, num_heads_q = a.batch_size, a.num_heads_q
    group = num_heads_q // a.num_heads_kv
    head_dim, head_dim_v = a.head_dim, a.head_dim_v
    paged = a.page_table is not None
    varlen_k = a.cu_seqlens_k is not None and not paged

    # Every store takes out's strides: a caller's buffer (a.out) is written in place.
    out = a.out if a.out is not None else torch.empty((*q.shape[:-1], head_dim_v),
                                                      dtype=a.out_dtype, device=q.device)
    if varlen_q:
        lse = torch.empty((num_heads_q, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((q.shape[0], num_heads_q, q.shape[1]), dtype=torch.float32,
                          device=q.device)
    if out.numel() == 0 or batch == 0:
        return out, lse

    max_seqlen_q = a.max_seqlen_q if varlen_q else q.shape[1]
    if paged:
        seqlen_k_static = a.page_table.shape[1] * k.shape[1]
    else:
        seqlen_k_static = 0 if varlen_k else k.shape[1]
    # tl.dot needs K >= 16, and >= 32 for fp8 operands.
    min_block = 32 if a.is_fp8 else 16
    block_d = max(min_block, triton.next_power_of_2(head_dim))
    block_dv = max(min_block, triton.next_power_of_2(head_dim_v))
    pack = _pack_gqa(a, group, max_seqlen_q)
    rows = max_seqlen_q * (group if pack else 1)

    num_heads_grid = a.num_heads_kv if pack else num_heads_q
    arch_name = arch.device_arch(q.device)
    block_m, block_n, warps, stages = config or _fixed_config(rows, block_d, block_dv, arch_name)
    num_splits = _num_splits(a, num_heads_grid, rows, block_m, block_n)
    split = num_splits > 1
    prefill = rows > 64 and not split
    if prefill and config is None and not _interpreting():
        kernel = _tuned_kernel(arch_name, min(c for c in _TUNE_CONFIGS if c >= max(block_d, block_dv)))
        launch = {}
    else:
        kernel = _attn_fwd
        launch = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    fp8 = a.is_fp8
    if fp8 and prefill and not paged:
        # Hopper's fp8 wgmma reads its B operand only K-major: P @ V wants V with the keys
        # contiguous. One copy of V is cheap next to a compute-bound prefill.
        v = v.movedim(-3, -1).contiguous().movedim(-1, -3)
    # Where V keeps its layout (decode, paged), P @ V runs in bf16: memory-bound anyway.
    pv_bf16 = a.is_fp8 and v.stride(-1) == 1

    if split:
        # Varlen partials use one batch row of total_q positions, the layout combine expects.
        part_rows = (1, q.shape[0]) if varlen_q else (batch, q.shape[1])
        out_dst = torch.empty((num_splits, *part_rows, num_heads_q, head_dim_v),
                              dtype=torch.float32, device=q.device)
        lse_dst = torch.empty((num_splits, *part_rows, num_heads_q), dtype=torch.float32,
                              device=q.device)
        o_strides = (out_dst.stride(0), 0 if varlen_q else out_dst.stride(1), out_dst.stride(2),
                     out_dst.stride(3))
        l_strides = (lse_dst.stride(0), 0 if varlen_q else lse_dst.stride(1), lse_dst.stride(2),
                     lse_dst.stride(3))
    else:
        out_dst, lse_dst = out, lse
        o_strides, l_strides = unsplit_strides(out, lse, varlen_q)

    q_strides = (0, q.stride(0), q.stride(1)) if varlen_q else q.stride()[:3]
    qv = a.qv
    qv_strides = (0, 0, 0) if qv is None else (
        (0, qv.stride(0), qv.stride(1)) if varlen_q else qv.stride()[:3])
    if fp8:
        descale_args, descale_strides = descale_operands(a)
    else:
        descale_args, descale_strides = [None] * 3, [0] * 6
    sinks = None if a.sinks is None else a.sinks.float().contiguous()

    k_strides, v_strides = _kv_strides(k, varlen_k), _kv_strides(v, varlen_k)
    aligned = (all(x % 8 == 0 for x in (*q_strides, *k_strides, *v_strides, *o_strides[1:]))
               and all(t.data_ptr() % 16 == 0 for t in (q, k, v, out_dst)))
    batches_per_launch = max(1, _MAX_GRID_Z // num_splits)
    for batch_base in range(0, batch, batches_per_launch):
        launch_batches = min(batches_per_launch, batch - batch_base)
        grid = lambda meta, n=launch_batches: (triton.cdiv(rows, meta["BLOCK_M"]), num_heads_grid,
                                               n * num_splits)
        kernel[grid](
            q, k, v, qv, out_dst, lse_dst,
            a.cu_seqlens_q, a.cu_seqlens_k if varlen_k else None, a.seqused_q, a.seqused_k,
            a.page_table, a.kv_batch_idx, a.leftpad_k,
            a.cp_tot_seqused_k if a.cp_world_size > 1 else None,
            *descale_args, sinks,
            *q_strides, *k_strides, *v_strides, v.stride(-1),
            *qv_strides,
            *o_strides, *l_strides, 0 if a.page_table is None else a.page_table.stride(0),
            *descale_strides,
            0 if varlen_q else q.shape[1], seqlen_k_static, group, k.shape[1] if paged else 1,
            a.softmax_scale, a.softcap, a.window_left, a.window_right, a.attention_chunk,
            a.cp_world_size, a.cp_rank, num_splits, batch_base,
            triton.next_power_of_2(max_seqlen_q), triton.next_power_of_2(max(a.max_seqlen_k, 1)),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv,
            IS_VARLEN_Q=varlen_q, IS_VARLEN_K=varlen_k, HAS_SEQUSED_Q=a.seqused_q is not None,
            HAS_SEQUSED_K=a.seqused_k is not None, PAGED=paged,
            HAS_KV_BATCH_IDX=a.kv_batch_idx is not None, HAS_LEFTPAD=a.leftpad_k is not None,
            IS_CP=a.cp_world_size > 1, HAS_LEFT=a.window_left >= 0, HAS_RIGHT=a.window_right >= 0,
            HAS_CHUNK=a.attention_chunk > 0, HAS_SOFTCAP=a.softcap > 0, HAS_SINKS=sinks is not None,
            HAS_QV=qv is not None, IS_FP8=fp8, PACK_GQA=pack, SPLIT=split, PV_BF16=pv_bf16,
            ALIGNED=aligned,
            **launch,
        )
    if split:
        out_view = out.unsqueeze(0) if varlen_q else out
        lse_view = lse.t().unsqueeze(0) if varlen_q else lse.transpose(1, 2)
        combine_into(out_dst, lse_dst, out_view, lse_view, empty_lse=math.inf, sinks=sinks)
    return out, lse

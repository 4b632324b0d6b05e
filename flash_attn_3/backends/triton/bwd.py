"""Triton backward of attention: dq, dk, dv from dout, q, k, v, out and the forward's LSE.

Three launches, the FA2/FA3 scheme:
1. prep: delta_i = rowsum(dO_i * O_i) and lse_i * log2(e), fp32, laid out like the LSE.
2. dK/dV: one program per (KV block, KV head, batch). It walks every query head of its GQA group
   and every query block that can see its keys, so dk/dv come out summed over the group without
   an expanded K/V and without atomics. In the default mode it also adds dS·K into an fp32 dq
   buffer with atomics, whose order (and so rounding) varies from run to run.
3. dQ (deterministic mode): one program per (query block, query head, batch) walks the KV blocks,
   recomputing P and dP; nothing is accumulated across programs, so results are bitwise stable.

Scores are kept in log2 units (scale * log2(e) folded into one multiply, exp2). Query/key block
pairs are split into fully visible ones, run without any mask, and edge ones (causal diagonal,
window edges, sequence ends), masked; pairs that cannot see each other are never visited.
A fully masked row has LSE = +inf, so exp2(s - lse) = 0 and it contributes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..params import AttnArgs
from . import arch
from .launch import Autotuned
from .masks import tanh

_LOG2E = tl.constexpr(1.4426950408889634)


def _refuse_unsupported(a: AttnArgs) -> None:
    refused = [
        (a.attention_chunk > 0, "attention_chunk"),
        (a.qv is not None, "qv"),
        (a.is_fp8, "fp8 inputs"),
        (a.page_table is not None, "paged KV (page_table)"),
        (a.kv_batch_idx is not None, "kv_batch_idx"),
        (a.leftpad_k is not None, "cache_leftpad"),
        (a.cp_world_size > 1, "context parallel (cp_world_size > 1)"),
    ]
    for refused_here, feature in refused:
        if refused_here:
            raise NotImplementedError(f"flash_attn_3 triton backward does not support {feature}")
    if a.q.dtype not in (torch.float16, torch.bfloat16):
        raise NotImplementedError(f"flash_attn_3 triton backward supports fp16/bf16, got {a.q.dtype}")


# ----------------------------------------------------------------------------------------------
# jitted helpers
#
# Addresses: a tile's first row goes into a 64-bit scalar base (row * stride passes 2**31 for long
# packed batches), the offsets inside the tile stay 32-bit.


@triton.jit
def _seq_info(cu_seqlens, seqused, b, max_len, IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(first row of batch b in its buffer, rows stored for b, rows attended for b)."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + b)
        stored = tl.load(cu_seqlens + b + 1) - start
    else:
        start = 0
        stored = max_len
    used = stored
    if HAS_SEQUSED:
        used = tl.load(seqused + b)
    return start, stored, used


@triton.jit
def _tile_ptrs(base, row0, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    return base + row0.to(tl.int64) * stride_row + rows[:, None] * stride_row + cols[None, :]


@triton.jit
def _tile_mask(row0, n_rows, N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_COLS: tl.constexpr):
    """Rows row0.. below n_rows, columns below the real head dim."""
    rows = tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    return (rows[:, None] < n_rows - row0) & (cols[None, :] < N_COLS)


@triton.jit
def _load_tile(base, row0, stride_row, n_rows, N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_COLS: tl.constexpr):
    """(BLOCK_ROWS, BLOCK_COLS) tile from row row0, zero past n_rows and past the real head dim."""
    ptrs = _tile_ptrs(base, row0, stride_row, BLOCK_ROWS, BLOCK_COLS)
    if BLOCK_COLS != N_COLS:
        return tl.load(ptrs, mask=_tile_mask(row0, n_rows, N_COLS, BLOCK_ROWS, BLOCK_COLS), other=0.0)
    rows = tl.arange(0, BLOCK_ROWS)
    return tl.load(ptrs, mask=rows[:, None] < n_rows - row0, other=0.0)


@triton.jit
def _load_row_stats(lse2_base, delta_base, rows, n_rows):
    lse2 = tl.load(lse2_base + rows, mask=rows < n_rows, other=0.0)
    delta = tl.load(delta_base + rows, mask=rows < n_rows, other=0.0)
    return lse2, delta


@triton.jit
def _visible(rows_q, cols_k, seqlen_q, seqlen_k, diag_lo, diag_hi):
    """Allowed (i, j): in bounds and i + diag_lo <= j <= i + diag_hi (window, causal folded in).

    The bounds are folded into one key range per row first, so the tile itself sees only two
    compares: a loop-invariant (key < seqlen_k) tile would be hoisted and pin registers.
    """
    lo = tl.where(rows_q < seqlen_q, rows_q + diag_lo, 1073741824)
    hi = tl.minimum(rows_q + diag_hi, seqlen_k - 1)
    return (cols_k >= lo) & (cols_k <= hi)


@triton.jit
def _ceil_to(x, m):
    return (x + m - 1) // m * m


# Lengths, windows and counts change between calls: letting triton specialize them (== 1,
# divisible by 16) would compile a new variant per pattern with no faster code (fwd.py likewise).
_VARYING_INTS = ["max_seqlen_q", "max_seqlen_k", "batch_base", "window_left", "window_right",
                 "group", "tune_seqlen"]


# ----------------------------------------------------------------------------------------------
# 1. prep: delta and lse in log2 units


# The LSE and lse2/delta strides follow the query length (rows of (B, H, S)): specialized, a
# length that is a multiple of 16 compiled a second variant (compile_cost.py, N = 5120 after
# 1000 and 3000). Unspecialized, their loads and stores lose the 16-byte vectors: 4 bytes a
# query row against O's and dO's 2 x 2 x D, whose strides (multiples of H * D) stay specialized.
@triton.jit(do_not_specialize=["max_seqlen_q", "batch_base", "stride_lb", "stride_lh",
                               "stride_xb", "stride_xh"])
def _bwd_prep_kernel(
    O, DO, LSE, LSE2, DELTA, cu_seqlens_q, seqused_q, max_seqlen_q, batch_base,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, stride_ls, stride_xb, stride_xh,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, HAS_SEQUSED_Q: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = batch_base + tl.program_id(2)
    q_start, stored_q, seqlen_q = _seq_info(cu_seqlens_q, seqused_q, b, max_seqlen_q,
                                            IS_VARLEN_Q, HAS_SEQUSED_Q)
    m0 = pid_m * BLOCK_M
    if m0 >= stored_q:
        return
    b64 = b.to(tl.int64)
    row0 = q_start.to(tl.int64) + m0
    o = _load_tile(O + b64 * stride_ob + h * stride_oh, row0, stride_os, q_start + seqlen_q,
                   HEAD_DIM_V, BLOCK_M, BLOCK_DV)
    do = _load_tile(DO + b64 * stride_dob + h * stride_doh, row0, stride_dos, q_start + seqlen_q,
                    HEAD_DIM_V, BLOCK_M, BLOCK_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    rows = tl.arange(0, BLOCK_M)
    lse = tl.load(LSE + b64 * stride_lb + h * stride_lh + (row0 + rows) * stride_ls,
                  mask=rows < seqlen_q - m0, other=0.0)
    x_off = b64 * stride_xb + h * stride_xh + row0 + rows
    tl.store(DELTA + x_off, delta, mask=rows < stored_q - m0)
    tl.store(LSE2 + x_off, lse * _LOG2E, mask=rows < stored_q - m0)


# ----------------------------------------------------------------------------------------------
# 2. dK/dV (+ atomic dQ)


@triton.jit(do_not_specialize=_VARYING_INTS)
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ_ACC, DK, DV,
    cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, batch_base,
    softmax_scale, softcap, window_left, window_right, group,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_xb, stride_xh, stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    tune_seqlen, tune_local,  # autotune keys only: bucketed length, causal/local or not
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr,
    HAS_SEQUSED_Q: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = batch_base + tl.program_id(2)
    q_start, stored_q, seqlen_q = _seq_info(cu_seqlens_q, seqused_q, b, max_seqlen_q,
                                            IS_VARLEN_Q, HAS_SEQUSED_Q)
    k_start, stored_k, seqlen_k = _seq_info(cu_seqlens_k, seqused_k, b, max_seqlen_k,
                                            IS_VARLEN_K, HAS_SEQUSED_K)
    n0 = pid_n * BLOCK_N
    if n0 >= stored_k:
        return
    b64 = b.to(tl.int64)
    cols_k = n0 + tl.arange(0, BLOCK_N)

    # key j is visible from query i iff i + diag_lo <= j <= i + diag_hi
    offset = seqlen_k - seqlen_q
    diag_lo = offset - window_left
    diag_hi = offset + window_right
    # query rows that see any key of this block, aligned down to BLOCK_M
    m_start = tl.maximum(n0 - diag_hi, 0) // BLOCK_M * BLOCK_M
    m_end = tl.minimum(seqlen_q, n0 + BLOCK_N - diag_lo)
    if n0 >= seqlen_k:
        m_end = m_start
    m_end = tl.maximum(m_end, m_start)
    # query blocks where the whole tile is visible: no mask needed
    full_lo = tl.minimum(_ceil_to(tl.maximum(n0 + BLOCK_N - 1 - diag_hi, m_start), BLOCK_M), m_end)
    full_hi = tl.maximum(tl.minimum(seqlen_q, n0 + 1 - diag_lo), 0) // BLOCK_M * BLOCK_M
    if n0 + BLOCK_N > seqlen_k:
        full_hi = full_lo
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), m_end)

    k = _load_tile(K + b64 * stride_kb + hk * stride_kh, k_start + n0, stride_ks,
                   k_start + seqlen_k, HEAD_DIM, BLOCK_N, BLOCK_D)
    v = _load_tile(V + b64 * stride_vb + hk * stride_vh, k_start + n0, stride_vs,
                   k_start + seqlen_k, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    scale_log2 = softmax_scale * _LOG2E
    scale_over_cap = softmax_scale / softcap
    cap_log2 = softcap * _LOG2E
    for g in range(0, group):
        hq = hk * group + g
        q_base = Q + b64 * stride_qb + hq * stride_qh
        do_base = DO + b64 * stride_dob + hq * stride_doh
        x_base = b64 * stride_xb + hq.to(tl.int64) * stride_xh + q_start
        dq_base = DQ_ACC + b64 * stride_dqb + hq * stride_dqh
        for m0 in range(m_start, m_end, BLOCK_M):
            q = _load_tile(q_base, q_start + m0, stride_qs, q_start + seqlen_q, HEAD_DIM, BLOCK_M,
                           BLOCK_D)
            do = _load_tile(do_base, q_start + m0, stride_dos, q_start + seqlen_q, HEAD_DIM_V,
                            BLOCK_M, BLOCK_DV)
            rows_q = m0 + tl.arange(0, BLOCK_M)
            lse2, delta = _load_row_stats(LSE2 + x_base, DELTA + x_base, rows_q, seqlen_q)
            # transposed scores: keys on rows, so dk/dv accumulate without a transpose
            qk = tl.dot(k, tl.trans(q))
            if SOFTCAP:
                t = tanh(qk * scale_over_cap)
                p = tl.exp2(t * cap_log2 - lse2[None, :])
            else:
                p = tl.exp2(qk * scale_log2 - lse2[None, :])
            # One loop with a uniform branch, not separate loops for edge and inner blocks:
            # sm_90 ptxas spilled several hundred bytes more with three loops.
            if (m0 < full_lo) | (m0 >= full_hi):
                p = tl.where(_visible(rows_q[None, :], cols_k[:, None], seqlen_q, seqlen_k,
                                      diag_lo, diag_hi), p, 0.0)
            dv += tl.dot(p.to(do.dtype), do)
            dp = tl.dot(v, tl.trans(do))
            ds = p * (dp - delta[None, :])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            ds = ds.to(q.dtype)
            dk += tl.dot(ds, q)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds), k) * softmax_scale
                tl.atomic_add(_tile_ptrs(dq_base, q_start + m0, stride_dqs, BLOCK_M, BLOCK_D), dq,
                              mask=_tile_mask(m0, seqlen_q, HEAD_DIM, BLOCK_M, BLOCK_D),
                              sem="relaxed")

    dk = dk * softmax_scale
    tl.store(_tile_ptrs(DK + b64 * stride_dkb + hk * stride_dkh, k_start + n0, stride_dks, BLOCK_N,
                        BLOCK_D),
             dk.to(DK.dtype.element_ty), mask=_tile_mask(n0, stored_k, HEAD_DIM, BLOCK_N, BLOCK_D))
    tl.store(_tile_ptrs(DV + b64 * stride_dvb + hk * stride_dvh, k_start + n0, stride_dvs, BLOCK_N,
                        BLOCK_DV),
             dv.to(DV.dtype.element_ty), mask=_tile_mask(n0, stored_k, HEAD_DIM_V, BLOCK_N, BLOCK_DV))


# ----------------------------------------------------------------------------------------------
# 3. dQ without atomics


@triton.jit(do_not_specialize=_VARYING_INTS)
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ,
    cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, batch_base,
    softmax_scale, softcap, window_left, window_right, group,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_xb, stride_xh, stride_dqb, stride_dqs, stride_dqh,
    tune_seqlen, tune_local,  # autotune keys only: bucketed length, causal/local or not
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    IS_VARLEN_Q: tl.constexpr, IS_VARLEN_K: tl.constexpr,
    HAS_SEQUSED_Q: tl.constexpr, HAS_SEQUSED_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # last query blocks first: under causal masks they have the most keys to walk
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    hq = tl.program_id(1)
    b = batch_base + tl.program_id(2)
    hk = hq // group
    q_start, stored_q, seqlen_q = _seq_info(cu_seqlens_q, seqused_q, b, max_seqlen_q,
                                            IS_VARLEN_Q, HAS_SEQUSED_Q)
    k_start, stored_k, seqlen_k = _seq_info(cu_seqlens_k, seqused_k, b, max_seqlen_k,
                                            IS_VARLEN_K, HAS_SEQUSED_K)
    m0 = pid_m * BLOCK_M
    if m0 >= stored_q:
        return
    b64 = b.to(tl.int64)
    rows_q = m0 + tl.arange(0, BLOCK_M)

    offset = seqlen_k - seqlen_q
    diag_lo = offset - window_left
    diag_hi = offset + window_right
    # key columns seen by any row of this block, aligned down to BLOCK_N
    n_start = tl.maximum(m0 + diag_lo, 0) // BLOCK_N * BLOCK_N
    n_end = tl.minimum(seqlen_k, m0 + BLOCK_M + diag_hi)
    if m0 >= seqlen_q:
        n_end = n_start
    n_end = tl.maximum(n_end, n_start)
    full_lo = tl.minimum(_ceil_to(tl.maximum(m0 + BLOCK_M - 1 + diag_lo, n_start), BLOCK_N), n_end)
    full_hi = tl.maximum(tl.minimum(seqlen_k, m0 + diag_hi + 1), 0) // BLOCK_N * BLOCK_N
    if m0 + BLOCK_M > seqlen_q:
        full_hi = full_lo
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), n_end)

    q = _load_tile(Q + b64 * stride_qb + hq * stride_qh, q_start + m0, stride_qs,
                   q_start + seqlen_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    do = _load_tile(DO + b64 * stride_dob + hq * stride_doh, q_start + m0, stride_dos,
                    q_start + seqlen_q, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
    x_base = b64 * stride_xb + hq.to(tl.int64) * stride_xh + q_start
    lse2, delta = _load_row_stats(LSE2 + x_base, DELTA + x_base, rows_q, seqlen_q)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    scale_log2 = softmax_scale * _LOG2E
    scale_over_cap = softmax_scale / softcap
    cap_log2 = softcap * _LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        k = _load_tile(k_base, k_start + n0, stride_ks, k_start + seqlen_k, HEAD_DIM, BLOCK_N,
                       BLOCK_D)
        v = _load_tile(v_base, k_start + n0, stride_vs, k_start + seqlen_k, HEAD_DIM_V, BLOCK_N,
                       BLOCK_DV)
        qk = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            t = tanh(qk * scale_over_cap)
            p = tl.exp2(t * cap_log2 - lse2[:, None])
        else:
            p = tl.exp2(qk * scale_log2 - lse2[:, None])
        if (n0 < full_lo) | (n0 >= full_hi):
            cols_k = n0 + tl.arange(0, BLOCK_N)
            p = tl.where(_visible(rows_q[:, None], cols_k[None, :], seqlen_q, seqlen_k, diag_lo,
                                  diag_hi), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * softmax_scale
    tl.store(_tile_ptrs(DQ + b64 * stride_dqb + hq * stride_dqh, q_start + m0, stride_dqs, BLOCK_M,
                        BLOCK_D),
             dq.to(DQ.dtype.element_ty), mask=_tile_mask(m0, stored_q, HEAD_DIM, BLOCK_M, BLOCK_D))


# ----------------------------------------------------------------------------------------------
# launch configuration

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head-dim class, max(BLOCK_D, BLOCK_DV).
# dK/dV holds a BLOCK_N key tile and walks queries by BLOCK_M; dQ holds a BLOCK_M query tile and
# walks keys by BLOCK_N. The first entry is the untuned default; big calls autotune over the list.
# Picked from sm_90 ptxas figures (benchmarks/tune_bwd.py --aot, docs/perf-notes.md) and the
# FlexAttention sm_90 defaults (dK/dV 64x128, dQ 128x64, 8 warps): few spill bytes, and dK/dV
# BLOCK_M = 64 first, since the atomic dQ product (M = BLOCK_M) falls back to mma.sync below 64.
_DKDV_CONFIGS = {
    64: [(64, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3)],
    128: [(64, 128, 8, 2), (64, 64, 8, 2), (32, 128, 8, 3), (16, 128, 8, 3), (64, 128, 8, 1)],
    256: [(64, 64, 8, 1), (32, 64, 8, 2), (32, 32, 4, 2)],
    512: [(32, 64, 8, 1), (16, 64, 8, 2)],
}
_DQ_CONFIGS = {
    64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    128: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    512: [(64, 32, 8, 1), (64, 16, 4, 2)],
}
# Ampere, Ada and consumer Blackwell (mma.sync: dK and dV of the key tile, or dQ of the query
# tile, live in registers next to both operands): from sm_86 ptxas figures of the causal bf16 call
# (docs/perf-notes.md, "Portable kernels on other GPUs"), each spill-free or nearly (at most 16
# bytes) and within 99 KB. The H100's first dK/dV entries spill 600+ bytes there (64 query rows
# against 64-128 keys at 4-8 warps). Not yet timed on those GPUs.
_DKDV_CONFIGS_MMA_V2 = {
    64: [(32, 128, 8, 2), (16, 64, 4, 3), (32, 64, 4, 2)],
    128: [(32, 64, 8, 2), (64, 64, 8, 1), (16, 64, 4, 2)],
    256: [(16, 64, 8, 1), (32, 32, 4, 1), (16, 32, 4, 2)],
    512: [(16, 32, 8, 1), (16, 32, 4, 1)],
}
_DQ_CONFIGS_MMA_V2 = {
    64: [(64, 64, 4, 3), (128, 32, 8, 2), (64, 64, 4, 2)],
    128: [(64, 64, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)],
    256: [(32, 32, 4, 2), (64, 16, 4, 2)],
    512: [(32, 32, 4, 1), (32, 16, 4, 2), (64, 16, 4, 1)],
}
_MMA_V2 = {"dkdv": _DKDV_CONFIGS_MMA_V2, "dq": _DQ_CONFIGS_MMA_V2}
# A100's 163 KB: one more spill-free candidate each where it needs more than 99 KB.
_SM80 = {"dkdv": {**_DKDV_CONFIGS_MMA_V2, 512: _DKDV_CONFIGS_MMA_V2[512] + [(32, 32, 8, 1)]},
         "dq": {**_DQ_CONFIGS_MMA_V2, 256: _DQ_CONFIGS_MMA_V2[256] + [(64, 32, 8, 2)]}}
# Datacenter Blackwell (tcgen05, Hopper's shared memory): the H100's dQ list compiles for sm_100
# within budget; its dK/dV lists spill 230-810 bytes there, so dK/dV takes entries that compiled
# spill-free for sm_100 (64 query rows at 1 stage, or 32 against 64 keys at 3).
_DKDV_CONFIGS_SM100 = {
    64: [(32, 64, 8, 3), (16, 128, 8, 3), (16, 64, 4, 3)],
    128: [(64, 128, 8, 1), (64, 64, 8, 1), (64, 32, 8, 2)],
    256: [(16, 64, 8, 1), (32, 64, 8, 1), (64, 64, 8, 1)],
    512: [(16, 32, 8, 1), (32, 32, 8, 1)],
}
_CONFIGS_BY_ARCH = {
    "sm_80": _SM80,
    "sm_86": _MMA_V2,
    "sm_89": _MMA_V2,
    "sm_90": {"dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS},
    "sm_100": {"dkdv": _DKDV_CONFIGS_SM100, "dq": _DQ_CONFIGS},
    "sm_120": _MMA_V2,
}
# Unequal blocks in the interpreter exercise the edge-block rules from both sides.
_INTERPRETER_CONFIGS = {"dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
# Autotune only calls with at least this many (batch, head, query, key) score elements: below it
# one tuning pass (every config compiled and timed) costs more than it can save.
_TUNE_MIN_SCORES = 2**28
_TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "tune_seqlen", "tune_local", "group", "SOFTCAP",
             "IS_VARLEN_Q", "ATOMIC_DQ"]  # launch.Autotuned keeps the names each kernel has

# dQ by fp32 atomics inside the dK/dV pass (5 matmuls per tile pair) or a second pass that
# recomputes P and dP (7 matmuls, no atomics). Measured on the H100 (BENCHMARKS.md, 2026-11-25):
# the second pass is faster at every size timed (D=64 4k 316 vs 303 TFLOP/s, D=128 1k 304 vs
# 262): the atomics' fp32 traffic and the zeroed accumulator cost more than the extra matmuls.
# So the default is the atomic-free path, which is also deterministic.
ATOMIC_DQ_BY_DEFAULT = False

_MAX_GRID_Z = 65535
_KERNELS = {"dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
_TABLES = {"dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}
_tuned = {}


def _interpreting() -> bool:
    """TRITON_INTERPRET=1 (CPU tests; tests/conftest.py makes its bf16 arithmetic match the GPU)."""
    return not isinstance(_bwd_dq_kernel, triton.runtime.JITFunction)


def _width_class(block_d: int, block_dv: int) -> int:
    return next(w for w in (64, 128, 256, 512) if max(block_d, block_dv) <= w)


def config_tables(arch_name: str) -> dict:
    """{"dkdv": {width class: configs}, "dq": ...}: (BLOCK_M, BLOCK_N, num_warps, num_stages),
    the first the untuned default."""
    return _CONFIGS_BY_ARCH[arch_name]


def _launcher(name: str, width: int, tune: bool, config=None, arch_name: str = arch.DEFAULT):
    """(kernel, launch kwargs): a pinned config, or the autotuner over the class's list."""
    if config is None and _interpreting():
        config = _INTERPRETER_CONFIGS[name]
    table = config_tables(arch_name)[name][width]
    if config is None and not tune:
        config = table[0]
    if config is not None:
        block_m, block_n, warps, stages = config
        return _KERNELS[name], dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                    num_stages=stages)
    kernel = _tuned.get((arch_name, name, width))
    if kernel is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                   for m, n, w, st in table]
        # tuning runs the atomic dK/dV several times: DQ_ACC must start at zero again after it
        reset = ["DQ_ACC"] if name == "dkdv" else None
        kernel = _tuned.setdefault((arch_name, name, width), Autotuned(_KERNELS[name], configs, _TUNE_KEY,
                                                                       reset_to_zero=reset))
    return kernel, {}


def _rows_strides(x: torch.Tensor):
    """(batch, row, head) strides of a (B, S, H, D) or packed (T, H, D) tensor."""
    if x.dim() == 4:
        return x.stride(0), x.stride(1), x.stride(2)
    return 0, x.stride(0), x.stride(1)


def _lse_strides(x: torch.Tensor):
    """(batch, head, row) strides of a (B, H, S) or packed (H, T) LSE."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1), x.stride(2)
    return 0, x.stride(0), x.stride(1)


class _Call:
    """What every launch of one backward call shares: lengths, flags, strides, tuning keys."""

    def __init__(self, q, k, v, a: AttnArgs, configs=None):
        self.a = a
        self.varlen_q = a.cu_seqlens_q is not None
        self.varlen_k = a.cu_seqlens_k is not None
        self.batch = a.batch_size
        self.heads_q, self.heads_kv = q.shape[-2], k.shape[-2]
        head_dim, head_dim_v = q.shape[-1], v.shape[-1]
        self.max_q = a.max_seqlen_q if self.varlen_q else q.shape[1]
        self.max_k = a.max_seqlen_k if self.varlen_k else k.shape[1]
        self.empty = (self.batch == 0 or self.max_q == 0 or self.max_k == 0 or q.numel() == 0
                      or k.numel() == 0)
        self.block_d = max(16, triton.next_power_of_2(head_dim))
        self.block_dv = max(16, triton.next_power_of_2(head_dim_v))
        self.width = _width_class(self.block_d, self.block_dv)
        self.tune = self.batch * self.heads_q * self.max_q * self.max_k >= _TUNE_MIN_SCORES
        self.configs = configs or {}
        unbounded = self.max_q + self.max_k  # a window side of -1: wider than any sequence
        window_left = a.window_left if a.window_left >= 0 else unbounded
        window_right = a.window_right if a.window_right >= 0 else unbounded
        self.has_softcap = a.softcap > 0.0
        softcap = a.softcap if self.has_softcap else 1.0
        self.seq = (a.cu_seqlens_q, a.cu_seqlens_k, a.seqused_q, a.seqused_k, self.max_q,
                    self.max_k)
        self.flags = dict(IS_VARLEN_Q=self.varlen_q, IS_VARLEN_K=self.varlen_k,
                          HAS_SEQUSED_Q=a.seqused_q is not None,
                          HAS_SEQUSED_K=a.seqused_k is not None)
        self.dims = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=self.block_d,
                         BLOCK_DV=self.block_dv)
        # Batch rides on grid axis 2, which CUDA caps at 65535 programs: larger batches go in
        # slices.
        self.slices = [(b0, min(_MAX_GRID_Z, self.batch - b0))
                       for b0 in range(0, self.batch, _MAX_GRID_Z)]
        self.scalars = (a.softmax_scale, softcap, window_left, window_right,
                        self.heads_q // self.heads_kv)
        self.tune_key = (triton.next_power_of_2(max(self.max_q, self.max_k)), int(a.is_local))
        self.arch = arch.device_arch(q.device)

    def prep(self, out, dout, lse, pad: int = 1):
        """(lse * log2(e), delta = rowsum(dout * out)): fp32, shaped like lse, unit stride along
        the queries; each (batch, head) row starts a multiple of `pad` elements after the
        previous one (the gap is not written)."""
        rows = -(-lse.shape[-1] // pad) * pad
        lse2, delta = (torch.empty(*lse.shape[:-1], rows, dtype=torch.float32,
                                   device=lse.device)[..., :lse.shape[-1]] for _ in range(2))
        # ~8k elements per (rows, Dv) tile: the whole tile sits in registers for the row sums
        prep_block = 16 if _interpreting() else max(16, 8192 // self.block_dv)
        for b0, nb in self.slices:
            _bwd_prep_kernel[(triton.cdiv(self.max_q, prep_block), self.heads_q, nb)](
                out, dout, lse, lse2, delta, self.a.cu_seqlens_q, self.a.seqused_q, self.max_q,
                b0, *_rows_strides(out), *_rows_strides(dout), *_lse_strides(lse),
                *_lse_strides(lse2)[:2], HEAD_DIM_V=self.dims["HEAD_DIM_V"],
                BLOCK_DV=self.block_dv, BLOCK_M=prep_block, IS_VARLEN_Q=self.varlen_q,
                HAS_SEQUSED_Q=self.a.seqused_q is not None,
            )
        return lse2, delta

    def common(self, q, k, v, dout, lse2):
        return (*self.scalars, *_rows_strides(q), *_rows_strides(k), *_rows_strides(v),
                *_rows_strides(dout), *_lse_strides(lse2)[:2])

    def dq(self, dout, q, k, v, lse2, delta, dq=None):
        """dq by the atomic-free kernel (recomputes P and dP per query block), into dq when
        given (its row strides are the kernel's)."""
        if dq is None:
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        kernel, launch = _launcher("dq", self.width, self.tune, self.configs.get("dq"), self.arch)
        for b0, nb in self.slices:
            kernel[lambda meta, nb=nb: (triton.cdiv(self.max_q, meta["BLOCK_M"]), self.heads_q,
                                        nb)](
                q, k, v, dout, lse2, delta, dq, *self.seq, b0, *self.common(q, k, v, dout, lse2),
                *_rows_strides(dq), *self.tune_key, **self.dims, SOFTCAP=self.has_softcap,
                **self.flags, **launch,
            )
        return dq


def prep(out, dout, lse, a: AttnArgs, pad: int = 1):
    """(lse * log2(e), delta) for a backward kernel elsewhere (bwd_hopper.py): fp32, shaped like
    lse, each (batch, head) row padded to a multiple of `pad` elements."""
    return _Call(a.q, a.k, a.v, a).prep(out, dout, lse, pad)


def dq_only(dout, q, k, v, lse2, delta, a: AttnArgs, dq=None):
    """dq alone (atomic-free kernel), from prep()'s lse2 and delta; into dq when given."""
    return _Call(q, k, v, a).dq(dout, q, k, v, lse2, delta, dq)


def backward(dout, q, k, v, out, lse, a: AttnArgs, deterministic: bool, configs=None, grads=None):
    """dq, dk, dv (shaped like q, k, v; GQA summed over each KV head's query group).

    lse is the forward's fp32 LSE, (B, Hq, Sq) dense or (Hq, total_q) varlen, +inf on rows that
    see no key. deterministic: no float atomics, so gradients are bitwise equal across runs.
    configs: {"dkdv": (BLOCK_M, BLOCK_N, num_warps, num_stages), "dq": ...} pins launch configs
    instead of the default / autotuned ones (benchmarks/tune_bwd.py sweeps them). grads: (dq,
    dk, dv) buffers to write into (any row strides), None entries allocated here.
    """
    _refuse_unsupported(a)
    call = _Call(q, k, v, a, configs)
    dq, dk, dv = grads or (None, None, None)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if call.empty:
        return (torch.zeros_like(q) if dq is None else dq.zero_()), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:  # e.g. the stride-0 gradient of out.sum()
        dout = dout.contiguous()
    lse2, delta = call.prep(out, dout, lse)

    atomic_dq = ATOMIC_DQ_BY_DEFAULT and not deterministic
    # without atomics the dK/dV kernel never touches DQ_ACC; dk stands in (fully overwritten)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic_dq else dk
    kernel, launch = _launcher("dkdv", call.width, call.tune, call.configs.get("dkdv"), call.arch)
    for b0, nb in call.slices:
        kernel[lambda meta, nb=nb: (triton.cdiv(call.max_k, meta["BLOCK_N"]), call.heads_kv, nb)](
            q, k, v, dout, lse2, delta, dq_acc, dk, dv, *call.seq, b0,
            *call.common(q, k, v, dout, lse2), *_rows_strides(dq_acc), *_rows_strides(dk),
            *_rows_strides(dv), *call.tune_key, **call.dims, SOFTCAP=call.has_softcap,
            ATOMIC_DQ=atomic_dq, **call.flags, **launch,
        )
    if atomic_dq:
        return (dq_acc.to(q.dtype) if dq is None else dq.copy_(dq_acc)), dk, dv
    return call.dq(dout, q, k, v, lse2, delta, dq), dk, dv

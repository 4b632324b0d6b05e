"""Hopper (sm_90) backward in Gluon: the hot dense case, warp-specialized like FlashAttention-3.

Written for triton 3.6.0's `triton.experimental.gluon` (experimental: `supports()` takes only the
triton versions gluon_compat.py lists as verified, and the portable bwd.py kernels run under any
other).

One program per (block of BLOCK_N = 128 keys, KV head, batch). Its K and V tiles stay in shared
memory while it walks every query block that sees them, for each query head of the KV head's GQA
group (so dk/dv come out summed over the group, with no atomics on them). The CTA is split into
- two consumer warpgroups, each owning 64 of the keys. Scores are computed transposed (keys on
  rows, the wgmma M): S^T = K Q^T and dP^T = V dO^T by wgmma from shared memory; P^T and dS^T
  then feed dV += P^T dO and dK += dS^T Q straight from registers (the accumulator fragment is
  the A-operand fragment), so dK/dV accumulate in fp32 registers with no transpose.
- one producer warp streaming Q and dO tiles by TMA through a STAGES-deep ring.
dQ = dS K needs all 128 keys: both warpgroups put their dS^T half in shared memory, meet on an
mbarrier, and each computes dQ for half of the head dim, which a TMA reduce-add (cp.reduce.async.
bulk.tensor) adds into an fp32 buffer (FA3's scheme; the order of the adds varies, so this path is
not deterministic). `DQ_IN_KERNEL = False` instead leaves dQ to bwd.py's atomic-free dQ kernel.
Head dim 256 does not fit that split (dK and dV of 64 keys are 256 fp32 registers a thread):
`_bwd_kernel_split` takes 64 keys a program and splits its warpgroups by role (S^T, P^T, dV on
one; dP^T, dS^T, dK on the other; P^T and dS^T cross through shared memory; dQ by head-dim
halves as above), one Q/dO stage (230 KB of shared memory).

delta = rowsum(dO * O) and lse * log2(e) come from bwd.py's prep kernel; scores stay in log2 units
(P = exp2(S * scale * log2 e - lse2)). Query rows past seqlen_q read lse2 = +inf (P = 0) and TMA
zero-fills their Q/dO; keys past seqlen_k are zero-filled and masked in the one key block that
has them; the causal diagonal (bottom-right) is masked only on the query blocks that cross it.

Model layers are variants of the same kernels, their arguments None when off, so the plain
kernels compile as if they did not exist (same SASS, tests/bwd_hopper_plain_sass.json):
- a sliding window (either side, causal being left -1, right 0): a key block walks only the query
  blocks whose rows see some key of it, [n0 - offset - right, n0 + BLOCK_N - 1 - offset + left],
  so the work follows the window; the blocks every row of which sees every key skip the mask.
- softcap: S^T goes through tanh (one MUFU op) before the exp2, and dS^T takes 1 - tanh^2.
- sinks: the sink logit is in the forward's LSE, so P and dS need nothing more (its own gradient
  is not computed; the op layer refuses a sinks tensor that requires one).
- packed (total, H, D) q/k/v with cu_seqlens, seqused_q/k: the descriptors see (1, total, H, D)
  and each program reads its sequence's first row and lengths on the device; the grid covers
  max_seqlen_k, and key blocks past a shorter sequence store nothing. Tiles may reach into the
  next sequence: its query rows are masked (P, dS exact zeros, dQ adds zeros there), its keys
  zeroed in shared memory. The row statistics are gathered into a dense (B, H, max_seqlen_q)
  copy so that their TMA boxes start on 16 bytes.
- head dims between 64, 128 and 256 take the next one's tiles (TMA reads zeros past D, dK/dV
  stores and dQ reduces skip those columns).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from ..params import AttnArgs
from . import gluon_compat, gluon_layout

try:
    import triton
    from triton._C.libtriton import ir as _ir
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin as _builtin
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .fwd_hopper import _clear_tail, _issue_sliced, _softcapped
    from .gluon_compat import BWD_MASK_BY_LANE, CAUSAL_MASK_BY_LANE, thread_barrier, tma

    # Defined wherever the API imports; supports() decides which versions run them.
    _GLUON_OK = gluon_compat.IMPORT_ERROR is None
except ImportError:  # no triton, or a triton without Gluon's Hopper ops
    _GLUON_OK = False

LOG2E = 1.4426950408889634
KEYS_PER_WARPGROUP = 64  # the M of one wgmma; two consumer warpgroups make BLOCK_N = 128
BLOCK_N = 2 * KEYS_PER_WARPGROUP


class Config(NamedTuple):
    """One compiled variant. Tuples (BLOCK_M, STAGES[, DQ_IN_KERNEL[, STATS_SMEM[, PREFETCH_S[,
    EARLY_DV[, PIN_DP]]]]]) are accepted wherever a Config is."""
    block_m: int
    stages: int
    # dQ by TMA reduce-add here; off: bwd.py's atomic-free dQ kernel (the deterministic path)
    dq_in_kernel: bool = True
    # lse2 and delta ride the Q/dO ring by TMA (the producer loads them with their tiles) instead
    # of per-iteration global loads into the consumers' registers
    stats_smem: bool = False
    # the next query block's S^T = K Q^T is issued before this block's dV/dK/dQ retire, so it
    # runs under the dQ epilogue and the loop overhead (needs stats_smem: the next softmax
    # then starts at once and would wait on a global load)
    prefetch_s: bool = False
    # dV += P^T dO is issued before dP^T's wait (which then keeps it in flight), so dS^T, its
    # bf16 pack and the dQ side's dS^T store run under dV instead of between two wgmmas
    early_dv: bool = False
    # an mbarrier wait (the current stage's, already passed) right after dP^T's issue ends the
    # basic block there: ptxas otherwise sinks the dP^T HGMMAs below the softmax at D = 128, so
    # no exp2 runs under them (docs/perf-notes.md, "The dP issue ptxas sinks")
    pin_dp: bool = False

    def label(self) -> str:
        """The fields as a bench column names them: the first five always, the later ones only
        up to the last that is on (so the names of the configs before them stay)."""
        fields = [int(x) for x in self]
        while len(fields) > 5 and not fields[-1]:
            fields.pop()
        return ",".join(map(str, fields))


# head dim -> Config. Registers of one consumer thread at BLOCK_M = 64, D = 128: dK and dV
# accumulators 64 + 64, S^T and dP^T 32 + 32, dQ (half the head dim) 32, the row statistics
# 2 x 16 (none held with stats_smem). Shared memory (D = 128): K, V 64 KB, Q and dO 32 KB per
# stage, dS^T two 16 KB buffers, the dQ staging 32 KB.
# Chosen on the H100 at N = 4k (docs/perf-notes.md, lead item 14): the statistics by TMA won at
# every head dim, and D = 256 gains from leaving dQ to bwd.py (a second stage fits). D = 128
# pins dP^T's issue (pin_dp): +4.7 / +1.7 % (causal) at N = 4k on the H100, +3.8 / +3.3 % on the
# H200 (2026-11-26).
CONFIGS = {64: Config(64, 3, True, True), 128: Config(64, 2, True, True, pin_dp=True),
           256: Config(64, 2, False, True)}
# Head dims computed by _bwd_kernel_split (64 keys a program, warpgroups split by role); its
# Config's stats_smem must be on (the statistics always come by TMA) and prefetch_s off.
SPLIT_HEAD_DIMS = (256, )
# What benchmarks/tune_bwd_hopper.py times besides the defaults and the deterministic variant
# (the default with dq_in_kernel off), and the GPU tests check: round 2's levers one at a time,
# lse2/delta by TMA (stats_smem) and the next block's S^T issued early (prefetch_s). D = 64 at
# BLOCK_M = 128 spilled ~570 bytes with the statistics in registers but does twice the work per
# meeting. D = 256: the deterministic path's shape (dQ left to bwd.py) with the second stage that
# frees. The defaults with early_dv (D = 64: the dS^T work that ran between two wgmmas goes
# under dV) and pin_dp (D = 128: the softmax goes under dP^T), alone and together. Timed on the
# H200 (2026-11-26, N = 4k): early_dv within noise at D = 64, pin_dp +3-4 % at D = 128.
CANDIDATES = {
    64: [Config(64, 3), Config(64, 3, True, True, True), Config(128, 2, True, True),
         Config(64, 2, True, True), Config(64, 4, True, True),
         Config(64, 3, True, True, early_dv=True),
         Config(64, 3, True, True, early_dv=True, pin_dp=True)],
    128: [Config(64, 2), Config(64, 2, True, True, True), Config(64, 2, True, True),
          Config(64, 2, True, True, early_dv=True, pin_dp=True)],
    256: [Config(64, 1, True, True)],
}
# Deterministic calls leave dQ to bwd.py: without the dQ staging buffer the dK/dV kernel has
# shared memory for more stages (D = 64: 83 KB at 3 stages, 101 KB at 4, 118 KB at 5; one CTA an
# SM either way, its 12 warps at 168 registers fill the register file). The default is CONFIGS'
# with dQ off, and early_dv at D = 128; DETERMINISTIC_CANDIDATES are timed against it
# (benchmarks/tune_bwd_hopper.py).
# D = 128 adds early_dv to the pinned dP^T: +1.3 / +2.8 % (causal) at N = 4k on the H200 and
# +3.0 / +1.7 % on the H100 (2026-11-26) over the same config without either, while pin_dp alone
# was +2.3 / -1.0 % on the H100.
DETERMINISTIC_CONFIGS = {d: c._replace(dq_in_kernel=False) for d, c in CONFIGS.items()}
DETERMINISTIC_CONFIGS[128] = DETERMINISTIC_CONFIGS[128]._replace(early_dv=True)
DETERMINISTIC_CANDIDATES = {
    64: [Config(64, 4, False, True), Config(64, 5, False, True), Config(64, 4, False, True, True),
         Config(64, 3, False, True, early_dv=True)],
    128: [Config(64, 3, False, True), Config(64, 2, False, True, True), Config(64, 2, False, True),
          Config(64, 2, False, True, pin_dp=True),
          Config(64, 3, False, True, early_dv=True, pin_dp=True)],
}
# Sliding windows and packed / seqused sequences at D = 128: the dQ-in-kernel default is at the
# edge of its registers (52 bytes of spills), and their few extra per-thread scalars tip it into
# spilling 216-330 bytes with 7-23 local accesses per loop (sm_90 ptxas, 2026-12-07); with dQ
# left to bwd.py (whose dQ pass takes the same masks) they spill at most what the plain
# deterministic kernel does (0-164 bytes against its 160, at most 6 local accesses per loop).
# Not yet timed against each other on the GPU. softcap and padded head dims alone stay on
# CONFIGS (76 / 68-80 bytes).
LAYER_CONFIGS = {128: DETERMINISTIC_CONFIGS[128]}
# fp32 columns per dQ reduce-add: 128 bytes, the widest TMA box a 128-byte swizzle allows.
DQ_REDUCE_COLS = 32
# prep()'s lse2 / delta rows (one per batch and query head) start on 16 bytes: a TMA copy must
# start on a 16-byte aligned global address (coordinates applied; anything else is an illegal
# instruction on the H100) and the descriptor's row stride must be a multiple of 16 bytes.
STATS_PAD = 4
_MAXNREG = 168
# Arguments whose values follow the call (lengths, block counts, window sides): not specialized.
UNSPECIALIZED = ("seqlen_q", "seqlen_k", "num_n_blocks", "window_left", "window_right")
_CONSUMER_REGS = 240
_PRODUCER_REGS = 24


if _GLUON_OK:
    _KEYS = gl.constexpr(KEYS_PER_WARPGROUP)
    _BLOCK_N = gl.constexpr(BLOCK_N)
    _LOG2E = gl.constexpr(LOG2E)

    @_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """global[tile at coord] += src by TMA (cp.reduce.async.bulk.tensor ... .add), completion
        tracked like a TMA store (tma.store_wait). triton 3.6 has the op but no Gluon wrapper."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                  tensor_desc.handle, coord, src.handle)

    @gluon.jit
    def _program(shape, seqs, window, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr,
                 BLOCK_N: gl.constexpr):
        """-> (b, hk, (q_batch, q_start, used_q), (k_batch, k_start, k_rows, k_stored), first
        key, first query row, query blocks to visit, first query row whose block needs no mask,
        first query row whose block needs it again). (x_batch, x_start) is the descriptor
        coordinate of the sequence's first token: (b, 0) dense, (0, cu_seqlens[b]) packed;
        used_q / k_rows the rows attended (seqused), k_stored the keys stored for the sequence.
        window: (window_left, window_right), None where unbounded. Key blocks of one head are
        adjacent program ids, so the programs running together share that head's Q/dO in L2;
        block 0 (the most queries when causal) goes first."""
        seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group = shape
        cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k = seqs
        window_left, window_right = window
        pid = gl.program_id(0)
        n0 = (pid % num_n_blocks) * BLOCK_N
        bh = pid // num_n_blocks
        # The batch index is computed where it is first needed (dense: the return; computed
        # first, the plain kernels' SASS changed order).
        q_start, used_q = 0, seqlen_q
        if cu_seqlens_q is not None:
            q_start = gl.load(cu_seqlens_q + bh // num_heads_kv)
            used_q = gl.load(cu_seqlens_q + bh // num_heads_kv + 1) - q_start
        k_start, k_stored = 0, seqlen_k
        if cu_seqlens_k is not None:
            k_start = gl.load(cu_seqlens_k + bh // num_heads_kv)
            k_stored = gl.load(cu_seqlens_k + bh // num_heads_kv + 1) - k_start
        # seqused never reaches past the sequence: a length the checks cannot read must not turn
        # into reads of the next sequence (or past the tensor).
        if seqused_q is not None:
            used_q = gl.minimum(gl.load(seqused_q + bh // num_heads_kv), used_q)
        k_rows = k_stored
        if seqused_k is not None:
            k_rows = gl.minimum(gl.load(seqused_k + bh // num_heads_kv), k_stored)
        offset = k_rows - used_q
        m_start = 0
        m_full = 0
        m_end = used_q
        # Blocks from m_full_hi on need the mask again (read only with an upper bound, see
        # _edge_mask).
        m_full_hi = used_q
        if window_left is not None or window_right is not None:
            # Query i sees key j iff i + offset - left <= j <= i + offset + right: the block's
            # keys are seen from rows [n0 - offset - right, n0 + BLOCK_N - 1 - offset + left],
            # each key by every row from n0 + BLOCK_N - 1 - offset - right (the right side) up
            # to n0 - offset + left (the left side).
            if window_right is not None:
                m_start = gl.maximum(n0 - offset - window_right, 0) // BLOCK_M * BLOCK_M
                m_full = n0 + BLOCK_N - 1 - offset - window_right
            if window_left is not None:
                m_end = gl.minimum(n0 + BLOCK_N - offset + window_left, used_q)
                m_full_hi = n0 - offset + window_left - BLOCK_M + 2
        elif CAUSAL:
            # Query i sees key j iff j <= i + offset (bottom-right diagonal).
            m_start = gl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M
            # Every key of the block is visible from query rows >= n0 + BLOCK_N - 1 - offset.
            m_full = n0 + BLOCK_N - 1 - offset
        if n0 + BLOCK_N > k_rows:
            m_full = used_q  # the key tail: every block takes the mask
        if seqs[0] is not None or seqs[2] is not None:
            # A query block crossing the sequence's end masks its rows past it (packed, they
            # are the next sequence's).
            m_full_hi = gl.minimum(m_full_hi, used_q - BLOCK_M + 1)
        num_m = gl.maximum(gl.cdiv(m_end - m_start, BLOCK_M), 0)
        if seqs[1] is not None or seqs[3] is not None:
            num_m = gl.where(n0 < k_rows, num_m, 0)  # a block past the keys stores zeros
        b = bh // num_heads_kv
        q_batch = b  # the descriptor's batch coordinate: packed tensors have one batch
        if cu_seqlens_q is not None:
            q_batch = 0
        k_batch = b
        if cu_seqlens_k is not None:
            k_batch = 0
        return (b, bh % num_heads_kv, (q_batch, q_start, used_q),
                (k_batch, k_start, k_rows, k_stored), n0, m_start, num_m, m_full, m_full_hi)

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, lse2_desc, delta_desc, q_smem, do_smem, k_smem,
                  v_smem, lse2_smem, delta_smem, bars, shape, seqs, window, CAUSAL: gl.constexpr,
                  STAGES: gl.constexpr, STATS_SMEM: gl.constexpr):
        kv_ready, q_ready, q_empty, ds_ready = bars
        seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group = shape
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
        b, hk, qs, ks, n0, m_start, num_m, m_full, m_full_hi = _program(
            shape, seqs, window, BLOCK_M, CAUSAL, k_desc.block_type.shape[1])
        q_batch, q_start, used_q = qs
        k_batch, k_start, k_rows, k_stored = ks
        mbarrier.expect(kv_ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_batch, k_start + n0, hk, 0], kv_ready, k_smem)
        tma.async_copy_global_to_shared(v_desc, [k_batch, k_start + n0, hk, 0], kv_ready, v_smem)
        nbytes: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes + (
            2 * lse2_desc.block_type.nbytes if STATS_SMEM else 0)
        for it in range(0, group * num_m):
            g = it // num_m
            m0 = m_start + (it - g * num_m) * BLOCK_M
            hq = hk * group + g
            stage = it % STAGES
            # Fresh barriers pass a wait on parity 1, so the first lap of the ring does not wait.
            mbarrier.wait(q_empty.index(stage), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(q_ready.index(stage), nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_batch, q_start + m0, hq, 0],
                                            q_ready.index(stage), q_smem.index(stage))
            tma.async_copy_global_to_shared(do_desc, [q_batch, q_start + m0, hq, 0],
                                            q_ready.index(stage), do_smem.index(stage))
            if STATS_SMEM:
                # One row of the (B * Hq, Sq) statistics from query m0 on: 16-byte aligned since
                # rows are padded to 16 bytes and m0 is a multiple of BLOCK_M; the box is
                # zero-filled past seqlen_q (the consumers select those rows away). Packed
                # sequences get the same dense layout (_dense_stats).
                bh = b * num_heads_kv * group + hq
                tma.async_copy_global_to_shared(lse2_desc, [bh, m0], q_ready.index(stage),
                                                lse2_smem.index(stage))
                tma.async_copy_global_to_shared(delta_desc, [bh, m0], q_ready.index(stage),
                                                delta_smem.index(stage))

    @gluon.jit
    def _key_bounds(keys, qs, ks, seqs, window, CAUSAL: gl.constexpr):
        """(first, last query row) that sees each key (the last read only where _edge_mask has an
        upper bound) (spec sec 4, bottom-right
        diagonal); keys past the sequence's get no row. The element mask is then two compares
        per score against these per-key bounds."""
        q_batch, q_start, used_q = qs
        k_batch, k_start, k_rows, k_stored = ks
        window_left, window_right = window
        offset = k_rows - used_q
        last_query = keys  # read only with an upper bound (see _edge_mask)
        if window_left is not None or window_right is not None:
            first_query = gl.zeros_like(keys)
            if window_right is not None:
                first_query = keys - offset - window_right
            if window_left is not None:
                last_query = keys - offset + window_left
        elif CAUSAL:
            first_query = keys - offset
        else:
            first_query = gl.zeros_like(keys)
        first_query = gl.where(keys < k_rows, first_query, 2147483647)
        if seqs[0] is not None or seqs[2] is not None:
            if window_left is None:
                last_query = gl.zeros_like(keys) + (used_q - 1)
            else:
                last_query = gl.minimum(last_query, used_q - 1)
        return first_query, last_query

    @gluon.jit
    def _edge_mask(p, queries, m0, bounds, seqs, window, BY_LANE: gl.constexpr):
        """P with the scores no query sees zeroed (bounds: _key_bounds'). A key's rows have an
        upper bound with a left window side, or rows past a packed or seqused_q sequence; query
        blocks past the first masked ones then take the mask again."""
        first_query, last_query = bounds
        upper: gl.constexpr = window[0] is not None or seqs[0] is not None or seqs[2] is not None
        if BY_LANE:
            # fwd_hopper._masked's form (queries >= fq iff ar - lane >= fq - m0 - lane): one
            # compare of a per-register constant against a per-key limit, so no column offsets
            # stay live across the KV loop. Under triton 3.9 (CUDA 13 ptxas) the 16 offsets
            # stayed in registers beside the wgmma descriptors it hoists out of the loop, and
            # both spilled inside it (D = 128: 336 B, 10 / 24 local ops); this mask and
            # _in_queries together: 0 B, none; under 3.6 it cuts D = 128's spills (gluon_compat).
            col, lane = _cols_by_lane(queries)
            col = gl.expand_dims(col, 0)
            lane = gl.expand_dims(lane, 0)
            ok = col >= gl.expand_dims(first_query - m0, 1) - lane
            if upper:
                ok = ok & (col <= gl.expand_dims(last_query - m0, 1) - lane)
        else:
            ok = gl.expand_dims(queries, 0) >= gl.expand_dims(first_query, 1)
            if upper:
                ok = ok & (gl.expand_dims(queries, 0) <= gl.expand_dims(last_query, 1))
        return gl.where(ok, p, 0.0)

    @gluon.jit
    def _cols_by_lane(queries):
        """(ar - lane, lane), ar = arange over queries' layout: in the wgmma accumulator layout
        a thread's columns are (lane % 4) * 2 plus constants, so ar & 6 is one value per thread
        and ar - (ar & 6) a constant per register. Exact for any layout (col + lane = ar)."""
        ar = gl.arange(0, queries.shape[0], layout=queries.type.layout)
        lane = ar & 6
        return ar - lane, lane

    @gluon.jit
    def _in_queries(queries, m0, used_q, BY_LANE: gl.constexpr):
        """queries < used_q, in _cols_by_lane's form where BWD_MASK_BY_LANE: the compare of
        the columns would keep them live across the loop as the mask's did (see _edge_mask; the
        mask alone left D = 128 at 200 B, 10 / 7 local ops under triton 3.9)."""
        if BY_LANE:
            col, lane = _cols_by_lane(queries)
            return col < (used_q - m0) - lane
        else:
            return queries < used_q

    @gluon.jit
    def _tail_barrier(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
        """The tail clears' barriers: [0] _clear_key_tail's, where keys can end inside a block;
        [1] (cleared) and [2] (acknowledged) _clear_query_tail's, where queries can. Allocated
        last and always (a tuple cannot hold None here), each initialized only where its clear
        exists; the dense kernels never touch them."""
        bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        if cu_seqlens_k is not None or seqused_k is not None:
            mbarrier.init(bars.index(0), count=1)
        if cu_seqlens_q is not None or seqused_q is not None:
            mbarrier.init(bars.index(1), count=1)
            mbarrier.init(bars.index(2), count=1)
        return bars

    @gluon.jit
    def _clear_query_tail(q_smem, do_smem, stage, m0, used_q, g, seqs, tail_bars,
                          WG: gl.constexpr):
        """Packed (or with seqused_q), the query block crossing the sequence's end holds the next
        sequence's rows or unused memory: zeroed in shared memory before a wgmma reads them. Their
        P and dS are exact zeros, but dV += P^T dO and dK += dS^T Q multiply those rows by them,
        and 0 * NaN is NaN: a NaN there would reach this sequence's dK / dV. Warpgroup 0 clears
        and signals [1]; warpgroup 1 waits on it and acknowledges on [2], so warpgroup 0's next
        clear cannot overtake that wait (the forward's _clear_tail protocol). One such block per
        query head of the group (the blocks visited do not depend on the head), so the g-th
        clear is the barriers' g-th phase."""
        if seqs[0] is not None or seqs[2] is not None:
            BLOCK_M: gl.constexpr = q_smem.type.shape[2]
            HEAD_DIM: gl.constexpr = q_smem.type.shape[4]
            HEAD_DIM_V: gl.constexpr = do_smem.type.shape[4]
            if m0 + BLOCK_M > used_q:
                if WG == 0:
                    # a fresh barrier passes a wait on parity 1
                    mbarrier.wait(tail_bars.index(2), (g & 1) ^ 1)
                    _clear_tail(q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM]), used_q - m0)
                    _clear_tail(do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM_V]), used_q - m0)
                    thread_barrier()  # all four warps' stores, then signal
                    mbarrier.arrive(tail_bars.index(1))
                else:
                    mbarrier.wait(tail_bars.index(1), g & 1)
                    mbarrier.arrive(tail_bars.index(2))

    @gluon.jit
    def _clear_key_tail(k_smem, v_smem, n0, k_rows, seqs, tail_bar, WG: gl.constexpr):
        """Packed (or with seqused_k), the key block crossing the sequence's end holds the next
        sequence's keys or unused memory (a KV cache's tail): zeroed in shared memory before any
        wgmma reads K or V, since 0 * NaN is NaN and dQ = dS K, dP^T = V dO^T would carry it
        into real rows. Once per program (query rows: _clear_query_tail).
        Warpgroup 0 clears and arrives on tail_bar; warpgroup 1 waits for it before its first
        wgmma. When both cleared the tile, each one's read-modify-write of the valid rows raced
        with the other's stores and wgmma reads (compute-sanitizer racecheck, H100 2026-12-07
        13:08 UTC: 35 reports in the varlen backward; the forward's _clear_tail had the same)."""
        if seqs[1] is not None or seqs[3] is not None:
            KEYS: gl.constexpr = k_smem.type.shape[1]
            HEAD_DIM: gl.constexpr = k_smem.type.shape[3]
            HEAD_DIM_V: gl.constexpr = v_smem.type.shape[3]
            if n0 + KEYS > k_rows:
                if WG == 0:
                    _clear_tail(k_smem.reshape([KEYS, HEAD_DIM]), k_rows - n0)
                    _clear_tail(v_smem.reshape([KEYS, HEAD_DIM_V]), k_rows - n0)
                    thread_barrier()  # all four warps' stores, then signal
                    mbarrier.arrive(tail_bar.index(0))
                else:
                    mbarrier.wait(tail_bar.index(0), 0)

    @gluon.jit
    def _kv_keep(rows, cols, k_stored, head_dim, HEAD_DIM: gl.constexpr):
        if head_dim is None:
            return (rows < k_stored) & (cols < HEAD_DIM)  # the column term only broadcasts
        else:
            # A head dim under the tile's width: its padding columns stay unwritten.
            return (rows < k_stored) & (cols < head_dim)

    @gluon.jit
    def _reduce_dq(dq_desc, coord, src, head_dim):
        """One dQ chunk's TMA reduce-add; a chunk wholly in a padded head dim's padding is not
        issued (TMA would drop all of it)."""
        if head_dim is None:
            _tma_reduce_add(dq_desc, coord, src)
        else:
            if coord[3] < head_dim:
                _tma_reduce_add(dq_desc, coord, src)

    @gluon.jit
    def _issue_s(k_w, q_smem, stage, acc, QK_USED: gl.constexpr):
        """S^T = K Q^T for this warpgroup's keys and the Q tile in ring slot `stage`; over the
        head dim's own columns where QK_USED > 0 (fwd_hopper.qk_used: two power-of-two slices,
        no k-step on a padded head dim's zeros)."""
        BLOCK_M: gl.constexpr = q_smem.type.shape[2]
        HEAD_DIM: gl.constexpr = q_smem.type.shape[4]
        q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        if QK_USED == 0:
            tok = warpgroup_mma(k_w, q.permute((1, 0)), acc, use_acc=False, is_async=True)
        else:
            tok = _issue_sliced(k_w, q, acc, QK_USED)
        return tok

    @gluon.jit
    def _consumer(q_smem, do_smem, k_smem, v_smem, lse2_smem, delta_smem, ds_smem, dq_smem, bars,
                  dq_desc, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, dk_strides, dv_strides,
                  softmax_scale, shape, seqs, window, softcap, head_dim, CAUSAL: gl.constexpr,
                  STAGES: gl.constexpr,
                  DQ_IN_KERNEL: gl.constexpr, STATS_SMEM: gl.constexpr,
                  PREFETCH_S: gl.constexpr, EARLY_DV: gl.constexpr, PIN_DP: gl.constexpr,
                  QK_USED: gl.constexpr, WG: gl.constexpr):
        kv_ready, q_ready, q_empty, ds_ready, tail_bar = bars
        HEAD_DIM: gl.constexpr = q_smem.type.shape[4]
        # The by-lane masks (gluon_compat.BWD_MASK_BY_LANE) but where triton 3.6 compiles them
        # worse: its deterministic (dQ by bwd.py) D = 128 kernel without causal mask or window
        # (local ops in the KV loops 4 / 5 -> 15 / 23; causal 5 / 5 -> 0 / 0), which keeps the
        # forward's choice (the column compare under 3.6). Both masks take one form: mixing
        # them compiled worse than either (D = 128 causal: 10 / 10 local ops).
        PLAIN_FULL_DET: gl.constexpr = (not DQ_IN_KERNEL and not CAUSAL and window[0] is None
                                        and window[1] is None and HEAD_DIM == 128)
        BY_LANE: gl.constexpr = CAUSAL_MASK_BY_LANE if PLAIN_FULL_DET else BWD_MASK_BY_LANE
        seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group = shape
        BLOCK_M: gl.constexpr = q_smem.type.shape[2]
        HALF_DIM: gl.constexpr = HEAD_DIM // 2
        DQ_COLS: gl.constexpr = dq_desc.block_type.shape[3]
        KEYS: gl.constexpr = _KEYS
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF_DIM, 16])
        # P^T and dS^T feed the dV/dK wgmmas from registers: S^T's accumulator fragment is that
        # operand's fragment, so the conversion moves no data.
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout,
                                                      k_width=2)
        key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        query_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        qk_scale = softmax_scale * _LOG2E
        if softcap is not None:
            # score = c * tanh(scale * s / c), in the log2 domain: tanh's argument takes the
            # scale over c, the exponent's scale is c * log2(e) (the argument softcap).
            cap_in = qk_scale / softcap
            qk_scale = softcap

        b, hk, qs, ks, n0, m_start, num_m, m_full, m_full_hi = _program(
            shape, seqs, window, BLOCK_M, CAUSAL, _BLOCK_N)
        q_batch, q_start, used_q = qs
        k_batch, k_start, k_rows, k_stored = ks
        dq_start = q_start
        if seqs[0] is not None:
            dq_start = q_start + b * BLOCK_M  # dq_accumulator's slack rows (see there)
        total = group * num_m
        k_all = k_smem.reshape([_BLOCK_N, HEAD_DIM])
        k_w = k_all.slice(WG * KEYS, KEYS, dim=0)
        v_w = v_smem.reshape([_BLOCK_N, HEAD_DIM]).slice(WG * KEYS, KEYS, dim=0)
        keys = n0 + WG * KEYS + gl.arange(0, KEYS, layout=key_layout)
        # Visible iff first_query <= query (<= last_query), one bound per key: the column
        # compare is then one per element.
        bounds = _key_bounds(keys, qs, ks, seqs, window, CAUSAL)
        dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
        dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
        mbarrier.wait(kv_ready, 0)
        _clear_key_tail(k_smem, v_smem, n0, k_rows, seqs, tail_bar, WG)
        if PREFETCH_S:
            # Every program has at least one query block (see _program).
            mbarrier.wait(q_ready.index(0), 0)
            s_tok = _issue_s(k_w, q_smem, 0, gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                             QK_USED)

        for it in range(0, total):
            g = it // num_m
            m0 = m_start + (it - g * num_m) * BLOCK_M
            hq = hk * group + g
            stage = it % STAGES
            queries = m0 + gl.arange(0, BLOCK_M, layout=query_layout)
            in_q = _in_queries(queries, m0, used_q, BY_LANE)
            if not STATS_SMEM:
                row = (b * num_heads_kv * group + hq).to(gl.int64) * seqlen_q
                # Rows past seqlen_q: lse2 = +inf makes their P (and so dS) zero.
                lse2 = gl.load(lse2_ptr + row + queries, mask=in_q, other=float("inf"))
                delta = gl.load(delta_ptr + row + queries, mask=in_q, other=0.0)
            q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            do = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            if PREFETCH_S:
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            else:
                mbarrier.wait(q_ready.index(stage), (it // STAGES) & 1)
                _clear_query_tail(q_smem, do_smem, stage, m0, used_q, g, seqs, tail_bar, WG)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(
                    _issue_s(k_w, q_smem, stage,
                             gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout), QK_USED), ))
            # dP^T is issued only now, so its accumulator and S^T are not both live next to
            # dK and dV (with both in flight ptxas spilled ~600 bytes); P is computed under it.
            if QK_USED == 0:
                dp_tok = warpgroup_mma(v_w, do.permute((1, 0)),
                                       gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                                       use_acc=False, is_async=True)
            else:  # V's head dim is Q's here: the same slices
                dp_tok = _issue_sliced(v_w, do, gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                                       QK_USED)
            if PIN_DP:
                # Passed already (this warpgroup has not released the stage): the wait's retry
                # loop is a branch, so ptxas keeps the HGMMAs above it, under the softmax.
                mbarrier.wait(q_ready.index(stage), (it // STAGES) & 1)
            if STATS_SMEM:
                # Rows past seqlen_q: lse2 = +inf makes their P (and so dS) zero.
                lse2 = gl.where(in_q, lse2_smem.index(stage).reshape([BLOCK_M]).load(
                    query_layout), float("inf"))
            if softcap is not None:
                s = _softcapped(s, cap_in)
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
            if softcap is not None:
                # dS's factor 1 - tanh^2, held in fp16 until dS: half the registers of the fp32
                # tanh, and fp16's rounding (2^-11) is that of tanh.approx itself.
                dtanh = (1.0 - s * s).to(gl.float16)
            # The tests are inline: a helper's debug labels split ptxas' basic blocks (see
            # fwd_hopper._consumer).
            if window[0] is not None or seqs[0] is not None or seqs[2] is not None:
                edge = (m0 < m_full) | (m0 >= m_full_hi)
            else:
                edge = m0 < m_full
            if edge:
                p = _edge_mask(p, queries, m0, bounds, seqs, window, BY_LANE)
            if EARLY_DV:
                p_op = gl.convert_layout(p.to(dtype), op_layout, assert_trivial=True)
                dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
                dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok, ))
            else:
                dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
            if STATS_SMEM:
                delta = gl.where(in_q, delta_smem.index(stage).reshape([BLOCK_M]).load(
                    query_layout), 0.0)
            ds = p * (dp - gl.expand_dims(delta, 0))
            if softcap is not None:
                ds = ds * dtanh.to(gl.float32)
            if not EARLY_DV:
                p_op = gl.convert_layout(p.to(dtype), op_layout, assert_trivial=True)
            ds_op = gl.convert_layout(ds.to(dtype), op_layout, assert_trivial=True)
            if not EARLY_DV:
                dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
            dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
            if PREFETCH_S:
                # The last block issues a spare S^T on its own (resident) tile: the token's
                # type must not depend on the branch, and no slot past the ring's end exists.
                more = it + 1 < total
                if more:
                    mbarrier.wait(q_ready.index((it + 1) % STAGES), ((it + 1) // STAGES) & 1)
                nxt = gl.where(more, (it + 1) % STAGES, stage)
            if DQ_IN_KERNEL:
                # dQ[:, half WG] = dS K[:, half WG] over both warpgroups' keys: publish this
                # half of dS^T, wait for the other's. Two buffers: a warpgroup rewrites one only
                # after the other has passed the next meeting, i.e. finished its dQ wgmma on it.
                buf = it % 2
                ds_smem.index(buf).slice(WG * KEYS, KEYS, dim=0).store(ds.to(dtype))
                fence_async_shared()
                mbarrier.arrive(ds_ready.index(buf))
                mbarrier.wait(ds_ready.index(buf), (it // 2) & 1)
                dq_tok = warpgroup_mma(
                    ds_smem.index(buf).permute((1, 0)),
                    k_all.slice(WG * HALF_DIM, HALF_DIM, dim=1),
                    gl.zeros([BLOCK_M, HALF_DIM], gl.float32, dq_layout), use_acc=False,
                    is_async=True)
                if PREFETCH_S:
                    # The dead S^T registers serve as the accumulator (use_acc=False).
                    s_tok = _issue_s(k_w, q_smem, nxt, s, QK_USED)
                    dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(
                        num_outstanding=1, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
                else:
                    dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(
                        num_outstanding=0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
                # On the last block the spare S^T still reads this slot, but nothing refills it.
                mbarrier.arrive(q_empty.index(stage))
                # The previous reduce has read the staging buffer by now (a whole iteration ago).
                tma.store_wait(pendings=0)
                dq_smem.reshape([BLOCK_M, HALF_DIM]).store(dq * softmax_scale)
                fence_async_shared()
                # One reduce per 128-byte column chunk: the TMA box of a 128-byte swizzle is at
                # most that wide, and the tile's chunks lie one after the other in shared memory.
                for c in gl.static_range(HALF_DIM // DQ_COLS):
                    _reduce_dq(dq_desc, [q_batch, dq_start + m0, hq, WG * HALF_DIM + c * DQ_COLS],
                               dq_smem.slice(c * DQ_COLS, DQ_COLS, dim=3), head_dim)
            else:
                if PREFETCH_S:
                    s_tok = _issue_s(k_w, q_smem, nxt, s, QK_USED)
                    dv, dk, p_op, ds_op = warpgroup_mma_wait(
                        num_outstanding=1, deps=(dv_tok, dk_tok, p_op, ds_op))
                else:
                    dv, dk, p_op, ds_op = warpgroup_mma_wait(
                        num_outstanding=0, deps=(dv_tok, dk_tok, p_op, ds_op))
                mbarrier.arrive(q_empty.index(stage))
        if PREFETCH_S:
            warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
        if DQ_IN_KERNEL:
            tma.store_wait(pendings=0)

        # dK, dV of this warpgroup's keys, clipped at the sequence's stored keys (zeros past
        # seqused_k) and at the head dim.
        rows = gl.expand_dims(n0 + WG * KEYS + gl.arange(0, KEYS, layout=gl.SliceLayout(
            1, kv_layout)), 1)
        cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout)), 0)
        keep = _kv_keep(rows, cols, k_stored, head_dim, HEAD_DIM)
        dk_at = (dk_ptr + k_batch.to(gl.int64) * dk_strides[0] + hk * dk_strides[2]
                 + (k_start + rows).to(gl.int64) * dk_strides[1] + cols)
        dv_at = (dv_ptr + k_batch.to(gl.int64) * dv_strides[0] + hk * dv_strides[2]
                 + (k_start + rows).to(gl.int64) * dv_strides[1] + cols)
        gl.store(dk_at, (dk * softmax_scale).to(dtype), mask=keep)
        gl.store(dv_at, dv.to(dtype), mask=keep)

    # Lengths, block counts and windows change between calls: triton would otherwise compile a
    # variant per `% 16` pattern of them, with no faster code. The layer variants' arguments
    # (cu_seqlens, seqused, window sides, softcap, a padded head dim) are None when off, so the
    # plain kernels compile as if they did not exist (tests/bwd_hopper_plain_sass.json).
    @gluon.jit(do_not_specialize=UNSPECIALIZED)
    def _bwd_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, lse2_desc, delta_desc, lse2_ptr,
                    delta_ptr, dk_ptr, dv_ptr, stride_dkb, stride_dks, stride_dkh, stride_dvb,
                    stride_dvs, stride_dvh, softmax_scale, seqlen_q, seqlen_k, num_heads_kv,
                    num_n_blocks, group, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                    window_left, window_right, softcap, head_dim, CAUSAL: gl.constexpr,
                    STAGES: gl.constexpr, DQ_IN_KERNEL: gl.constexpr, STATS_SMEM: gl.constexpr,
                    PREFETCH_S: gl.constexpr, EARLY_DV: gl.constexpr, PIN_DP: gl.constexpr,
                    QK_USED: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape,
                                           q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape,
                                            do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
        if STATS_SMEM:
            lse2_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M],
                                                  lse2_desc.layout)
            delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M],
                                                   delta_desc.layout)
        else:  # not touched: stand-ins for the arguments
            lse2_smem = k_smem
            delta_smem = k_smem
        if DQ_IN_KERNEL:
            ds_smem = gl.allocate_shared_memory(
                dtype, [2, _BLOCK_N, BLOCK_M],
                gl.NVMMASharedLayout.get_default_for([_BLOCK_N, BLOCK_M], dtype))
            # Each warpgroup stages its half of the head dim, in the reduce's 128-byte chunks.
            dq_smem0 = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, 1, HEAD_DIM // 2],
                                                 dq_desc.layout)
            dq_smem1 = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, 1, HEAD_DIM // 2],
                                                 dq_desc.layout)
        else:  # not touched: stand-ins for the arguments
            ds_smem = k_smem
            dq_smem0 = k_smem
            dq_smem1 = k_smem
        kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_ready, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            # Both consumer warpgroups must release a stage before it is refilled.
            mbarrier.init(q_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
        tail_bar = _tail_barrier(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k)
        bars = (kv_ready, q_ready, q_empty, ds_ready)
        shape = (seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group)

        # The argument tuples stay inline: a tuple bound to a name turns its constexprs into
        # tensors.
        gl.warp_specialize([
            (_consumer, (q_smem, do_smem, k_smem, v_smem, lse2_smem, delta_smem, ds_smem,
                         dq_smem0, (kv_ready, q_ready, q_empty, ds_ready, tail_bar), dq_desc,
                         lse2_ptr, delta_ptr, dk_ptr, dv_ptr,
                         (stride_dkb, stride_dks, stride_dkh),
                         (stride_dvb, stride_dvs, stride_dvh), softmax_scale, shape,
                         (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                         (window_left, window_right), softcap, head_dim, CAUSAL, STAGES,
                         DQ_IN_KERNEL, STATS_SMEM, PREFETCH_S, EARLY_DV, PIN_DP, QK_USED, 0)),
            (_consumer, (q_smem, do_smem, k_smem, v_smem, lse2_smem, delta_smem, ds_smem,
                         dq_smem1, (kv_ready, q_ready, q_empty, ds_ready, tail_bar), dq_desc,
                         lse2_ptr, delta_ptr, dk_ptr, dv_ptr,
                         (stride_dkb, stride_dks, stride_dkh),
                         (stride_dvb, stride_dvs, stride_dvh), softmax_scale, shape,
                         (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                         (window_left, window_right), softcap, head_dim, CAUSAL, STAGES,
                         DQ_IN_KERNEL, STATS_SMEM, PREFETCH_S, EARLY_DV, PIN_DP, QK_USED, 1)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, lse2_desc, delta_desc, q_smem, do_smem,
                         k_smem, v_smem, lse2_smem, delta_smem, bars, shape,
                         (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                         (window_left, window_right), CAUSAL, STAGES, STATS_SMEM)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


    # ----------------------------------------------------------------------------------------
    # Head dim 256: the kernel above would hold 2 x 128 fp32 accumulator registers (dK and dV of
    # 64 keys at D = 256) per thread. Here a program takes 64 keys and its two consumer
    # warpgroups split the work by role instead of by keys: the S side computes S^T, P^T and
    # dV; the dP side computes dP^T, dS^T and dK; each then computes dQ for half the head dim.
    # Per query block each side does 2.5 units of wgmma work (a unit = 64 x 64 x 256).

    @gluon.jit
    def _consumer_split(q_smem, do_smem, k_smem, v_smem, lse2_smem, delta_smem, p_smem, ds_smem,
                        dq_smem, bars, dq_desc, dk_ptr, dv_ptr, dk_strides, dv_strides,
                        softmax_scale, shape, seqs, window, softcap, head_dim,
                        CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                        DQ_IN_KERNEL: gl.constexpr, QK_USED: gl.constexpr,
                        S_SIDE: gl.constexpr):
        kv_ready, q_ready, q_empty, p_ready, ds_ready, tail_bar = bars
        BY_LANE: gl.constexpr = BWD_MASK_BY_LANE
        seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group = shape
        BLOCK_M: gl.constexpr = q_smem.type.shape[2]
        HEAD_DIM: gl.constexpr = q_smem.type.shape[4]
        # V and dO may be narrower than Q and K (DeepSeek's 192 / 128 on 256 / 128 tiles): the S
        # side's dV accumulator takes V's width, the dP side's dK K's.
        HEAD_DIM_V: gl.constexpr = do_smem.type.shape[4]
        ACC_DIM: gl.constexpr = HEAD_DIM_V if S_SIDE else HEAD_DIM
        HALF_DIM: gl.constexpr = HEAD_DIM // 2
        KEYS: gl.constexpr = k_smem.type.shape[1]
        DQ_COLS: gl.constexpr = dq_desc.block_type.shape[3]
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ACC_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout,
                                                      k_width=2)
        key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        query_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        qk_scale = softmax_scale * _LOG2E
        if softcap is not None:
            cap_in = qk_scale / softcap  # as in _consumer
            qk_scale = softcap
        WG: gl.constexpr = 0 if S_SIDE else 1

        b, hk, qs, ks, n0, m_start, num_m, m_full, m_full_hi = _program(
            shape, seqs, window, BLOCK_M, CAUSAL, KEYS)
        q_batch, q_start, used_q = qs
        k_batch, k_start, k_rows, k_stored = ks
        dq_start = q_start
        if seqs[0] is not None:
            dq_start = q_start + b * BLOCK_M  # dq_accumulator's slack rows (see there)
        k_all = k_smem.reshape([KEYS, HEAD_DIM])
        v_all = v_smem.reshape([KEYS, HEAD_DIM_V])
        keys = n0 + gl.arange(0, KEYS, layout=key_layout)
        bounds = _key_bounds(keys, qs, ks, seqs, window, CAUSAL)
        acc = gl.zeros([KEYS, ACC_DIM], gl.float32, kv_layout)  # dV (S side) or dK
        mbarrier.wait(kv_ready, 0)
        _clear_key_tail(k_smem, v_smem, n0, k_rows, seqs, tail_bar, WG)

        for it in range(0, group * num_m):
            g = it // num_m
            m0 = m_start + (it - g * num_m) * BLOCK_M
            hq = hk * group + g
            stage = it % STAGES
            buf = it % 2
            queries = m0 + gl.arange(0, BLOCK_M, layout=query_layout)
            in_q = _in_queries(queries, m0, used_q, BY_LANE)
            q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            do = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM_V])
            mbarrier.wait(q_ready.index(stage), (it // STAGES) & 1)
            _clear_query_tail(q_smem, do_smem, stage, m0, used_q, g, seqs, tail_bar, WG)
            if S_SIDE:
                if QK_USED == 0:
                    s_tok = warpgroup_mma(
                        k_all, q.permute((1, 0)), gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                        use_acc=False, is_async=True)
                else:
                    s_tok = _issue_sliced(k_all, q, gl.zeros([KEYS, BLOCK_M], gl.float32,
                                                             s_layout), QK_USED)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
                # Rows past seqlen_q: lse2 = +inf makes their P (and so dS) zero.
                lse2 = gl.where(in_q, lse2_smem.index(stage).reshape([BLOCK_M]).load(
                    query_layout), float("inf"))
                if softcap is not None:
                    s = _softcapped(s, cap_in)
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
                if window[0] is not None or seqs[0] is not None or seqs[2] is not None:
                    edge = (m0 < m_full) | (m0 >= m_full_hi)
                else:
                    edge = m0 < m_full
                if edge:
                    p = _edge_mask(p, queries, m0, bounds, seqs, window, BY_LANE)
                p16 = p.to(dtype)
                # Two P^T buffers: the dP side has read this one (into registers) before it
                # publishes the dS^T this side waits on next iteration (without dQ here: before
                # it releases the ring slot this side waits on two iterations on, STAGES <= 2).
                if softcap is not None:
                    # The dP side needs P^T only for dS^T: it gets P^T (1 - tanh^2), so the
                    # tanh stays on this side.
                    p_smem.index(buf).store((p * (1.0 - s * s)).to(dtype))
                else:
                    p_smem.index(buf).store(p16)
                fence_async_shared()
                mbarrier.arrive(p_ready.index(buf))
                p_op = gl.convert_layout(p16, op_layout, assert_trivial=True)
                own_tok = warpgroup_mma(p_op, do, acc, is_async=True)
            else:
                if QK_USED == 0 or HEAD_DIM_V != HEAD_DIM:  # a narrower V has no padding
                    dp_tok = warpgroup_mma(
                        v_all, do.permute((1, 0)), gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout),
                        use_acc=False, is_async=True)
                else:
                    dp_tok = _issue_sliced(v_all, do, gl.zeros([KEYS, BLOCK_M], gl.float32,
                                                               s_layout), QK_USED)
                dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
                delta = gl.where(in_q, delta_smem.index(stage).reshape([BLOCK_M]).load(
                    query_layout), 0.0)
                mbarrier.wait(p_ready.index(buf), (it // 2) & 1)
                p = p_smem.index(buf).load(s_layout).to(gl.float32)
                ds16 = (p * (dp - gl.expand_dims(delta, 0))).to(dtype)
                p_op = gl.convert_layout(ds16, op_layout, assert_trivial=True)
                own_tok = warpgroup_mma(p_op, q, acc, is_async=True)
                if DQ_IN_KERNEL:
                    # Two dS^T buffers: this side rewrites one two iterations on, after the S
                    # side has published the P^T of the iteration between, i.e. after its dQ
                    # wgmma on this one retired.
                    ds_smem.index(buf).store(ds16)
                    fence_async_shared()
                    mbarrier.arrive(ds_ready.index(buf))
            if DQ_IN_KERNEL:
                mbarrier.wait(ds_ready.index(buf), (it // 2) & 1)
                dq_tok = warpgroup_mma(
                    ds_smem.index(buf).permute((1, 0)), k_all.slice(WG * HALF_DIM, HALF_DIM, dim=1),
                    gl.zeros([BLOCK_M, HALF_DIM], gl.float32, dq_layout), use_acc=False,
                    is_async=True)
                # Q and dO are read by now (dV / dK retired): the producer may refill the slot
                # while dQ runs.
                acc, p_op = warpgroup_mma_wait(num_outstanding=1, deps=(own_tok, p_op))
                mbarrier.arrive(q_empty.index(stage))
                dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
                tma.store_wait(pendings=0)
                dq_smem.reshape([BLOCK_M, HALF_DIM]).store(dq * softmax_scale)
                fence_async_shared()
                for c in gl.static_range(HALF_DIM // DQ_COLS):
                    _reduce_dq(dq_desc, [q_batch, dq_start + m0, hq, WG * HALF_DIM + c * DQ_COLS],
                               dq_smem.slice(c * DQ_COLS, DQ_COLS, dim=3), head_dim)
            else:
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(own_tok, p_op))
                mbarrier.arrive(q_empty.index(stage))
        if DQ_IN_KERNEL:
            tma.store_wait(pendings=0)

        rows = gl.expand_dims(n0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, kv_layout)), 1)
        cols = gl.expand_dims(gl.arange(0, ACC_DIM, layout=gl.SliceLayout(0, kv_layout)), 0)
        if ACC_DIM == HEAD_DIM:
            keep = _kv_keep(rows, cols, k_stored, head_dim, HEAD_DIM)
        else:
            # a narrower V is as wide as its tiles (dv_refusal): no padding columns to skip
            keep = _kv_keep(rows, cols, k_stored, None, ACC_DIM)
        if S_SIDE:
            dv_at = (dv_ptr + k_batch.to(gl.int64) * dv_strides[0] + hk * dv_strides[2]
                     + (k_start + rows).to(gl.int64) * dv_strides[1] + cols)
            gl.store(dv_at, acc.to(dtype), mask=keep)
        else:
            dk_at = (dk_ptr + k_batch.to(gl.int64) * dk_strides[0] + hk * dk_strides[2]
                     + (k_start + rows).to(gl.int64) * dk_strides[1] + cols)
            gl.store(dk_at, (acc * softmax_scale).to(dtype), mask=keep)

    @gluon.jit(do_not_specialize=UNSPECIALIZED)
    def _bwd_kernel_split(q_desc, do_desc, k_desc, v_desc, dq_desc, lse2_desc, delta_desc,
                          dk_ptr, dv_ptr, stride_dkb, stride_dks, stride_dkh, stride_dvb,
                          stride_dvs, stride_dvh, softmax_scale, seqlen_q, seqlen_k,
                          num_heads_kv, num_n_blocks, group, cu_seqlens_q, cu_seqlens_k,
                          seqused_q, seqused_k, window_left, window_right, softcap, head_dim,
                          CAUSAL: gl.constexpr,
                          STAGES: gl.constexpr, DQ_IN_KERNEL: gl.constexpr,
                          QK_USED: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                          PRODUCER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        KEYS: gl.constexpr = k_desc.block_type.shape[1]
        q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape,
                                           q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape,
                                            do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
        lse2_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], lse2_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M],
                                               delta_desc.layout)
        p_smem = gl.allocate_shared_memory(
            dtype, [2, KEYS, BLOCK_M], gl.NVMMASharedLayout.get_default_for([KEYS, BLOCK_M],
                                                                             dtype))
        if DQ_IN_KERNEL:
            ds_smem = gl.allocate_shared_memory(
                dtype, [2, KEYS, BLOCK_M],
                gl.NVMMASharedLayout.get_default_for([KEYS, BLOCK_M], dtype))
            dq_smem0 = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, 1, HEAD_DIM // 2],
                                                 dq_desc.layout)
            dq_smem1 = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, 1, HEAD_DIM // 2],
                                                 dq_desc.layout)
        else:  # not touched: stand-ins for the arguments
            ds_smem = p_smem
            dq_smem0 = k_smem
            dq_smem1 = k_smem
        kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_ready, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(p_ready.index(i), count=1)
            mbarrier.init(ds_ready.index(i), count=1)
        tail_bar = _tail_barrier(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k)
        shape = (seqlen_q, seqlen_k, num_heads_kv, num_n_blocks, group)

        gl.warp_specialize([
            (_consumer_split, (q_smem, do_smem, k_smem, v_smem, lse2_smem, delta_smem, p_smem,
                               ds_smem, dq_smem0,
                               (kv_ready, q_ready, q_empty, p_ready, ds_ready, tail_bar),
                               dq_desc, dk_ptr, dv_ptr, (stride_dkb, stride_dks, stride_dkh),
                               (stride_dvb, stride_dvs, stride_dvh), softmax_scale, shape,
                               (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                               (window_left, window_right), softcap, head_dim, CAUSAL, STAGES,
                               DQ_IN_KERNEL, QK_USED, True)),
            (_consumer_split, (q_smem, do_smem, k_smem, v_smem, lse2_smem, delta_smem, p_smem,
                               ds_smem, dq_smem1,
                               (kv_ready, q_ready, q_empty, p_ready, ds_ready, tail_bar),
                               dq_desc, dk_ptr, dv_ptr, (stride_dkb, stride_dks, stride_dkh),
                               (stride_dvb, stride_dvs, stride_dvh), softmax_scale, shape,
                               (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                               (window_left, window_right), softcap, head_dim, CAUSAL, STAGES,
                               DQ_IN_KERNEL, QK_USED, False)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, lse2_desc, delta_desc, q_smem, do_smem,
                         k_smem, v_smem, lse2_smem, delta_smem,
                         (kv_ready, q_ready, q_empty, ds_ready), shape,
                         (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                         (window_left, window_right), CAUSAL, STAGES, True)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def dq_accumulator(q: torch.Tensor, cu_seqlens_q, block_m: int) -> torch.Tensor:
    """dQ's fp32 accumulator for the TMA reduce-adds. Packed, a key block's query blocks run
    whole, and the last one of a sequence reaches up to block_m - 1 rows past its end: its
    reduce-add would land in the next sequence's rows, and where this sequence's keys hold a
    NaN (its own poison, which it may keep) dS K is NaN in every row of the block, the rows past
    the end included (0 * NaN). So each sequence b starts block_m * b rows further on, with
    block_m rows of slack after it that nothing reads (H100, 2026-12-07 23:50 UTC: the
    poisoned-neighbour test's NaN in a clean sequence's dq, D = 64 causal)."""
    if cu_seqlens_q is None:
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    slack = (cu_seqlens_q.shape[0] - 1) * block_m
    return torch.zeros((q.shape[0] + slack, *q.shape[1:]), dtype=torch.float32, device=q.device)


def dq_rows(dq_acc: torch.Tensor, cu_seqlens_q, block_m: int, total: int) -> torch.Tensor:
    """dq_accumulator's rows back at the packed positions: row r of sequence b sits block_m * b
    rows further on; rows past cu_seqlens_q[-1] (a packed buffer's spare tail) at block_m * batch
    further on, where nothing was added."""
    if cu_seqlens_q is None:
        return dq_acc
    rows = torch.arange(total, device=dq_acc.device, dtype=cu_seqlens_q.dtype)
    seq = torch.searchsorted(cu_seqlens_q[1:], rows, right=True)
    return dq_acc.index_select(0, rows + seq * block_m)


def _descriptor(x: torch.Tensor, rows: int, cols: int = None, swizzle: int = None):
    """Rank-4 TMA descriptor over (B, S, H, D), or a packed (total, H, D) seen as
    (1, total, H, D), reading one (rows x cols) tile of one head: columns past D read zeros
    (a padded head dim) and are not written."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    block = [1, rows, 1, cols or x.shape[-1]]
    dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
             torch.float32: gl.float32}[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    if swizzle is not None:
        layout = gl.NVMMASharedLayout(swizzle, x.element_size() * 8, rank=4)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block, layout)


def _key_descriptor(x: torch.Tensor, width: int):
    """K's (and V's) tile: each warpgroup's dQ wgmma reads half of K's columns, so the swizzle
    pattern is at most that half wide (64 bytes at D = 64) and the half starts on a pattern."""
    return _descriptor(x, BLOCK_N, width, swizzle=min(128, width // 2 * x.element_size()))


def _stats_descriptor(x: torch.Tensor, rows: int):
    """TMA descriptor over a (B, H, S) fp32 statistic from prep(pad=STATS_PAD) as (B * H, S)
    with the padded row stride; a box is `rows` queries of one row."""
    batch, heads, seqlen = x.shape
    assert x.stride() == (heads * x.stride(1), x.stride(1), 1), x.stride()
    layout = gl.NVMMASharedLayout(0, 32, rank=2)
    return TensorDescriptor(x, [batch * heads, seqlen], [x.stride(1), 1], [1, rows], layout)


def _dense_stats(x: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int):
    """A packed (Hq, total_q) statistic as (B, Hq, max_seqlen_q), rows padded to STATS_PAD: the
    kernel's TMA boxes then start at (b * Hq + h, m0), m0 a multiple of BLOCK_M, on 16 bytes
    whatever cu_seqlens holds. Rows past a sequence repeat other rows; the kernel selects them
    away. Gathered on the device (no host sync)."""
    batch = cu_seqlens_q.shape[0] - 1
    rows = -(-max_seqlen_q // STATS_PAD) * STATS_PAD
    at = cu_seqlens_q[:batch, None].long() + torch.arange(rows, device=x.device)
    dense = x[:, at.clamp_(max=x.shape[-1] - 1)].transpose(0, 1).contiguous()
    return dense[..., :max_seqlen_q]


def _rows_strides(x: torch.Tensor):
    """(batch, row, head) strides of a (B, S, H, D) or packed (total, H, D) tensor."""
    return tuple(x.stride()[:3]) if x.dim() == 4 else (0, x.stride(0), x.stride(1))


def _tma_ok(x: torch.Tensor) -> bool:
    # TMA needs a 16-byte aligned base, 16-byte aligned nonzero strides and a unit inner stride.
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(s > 0 and s * x.element_size() % 16 == 0 for s in x.stride()[:-1]))


def tile_width(head_dim: int):
    """The instantiated head dim (CONFIGS) the tiles of a head dim take: the next one up, the
    padding read as zeros (96 -> 128, 192 -> 256); None past 256."""
    return next((width for width in sorted(CONFIGS) if width >= head_dim), None)


VARLEN_ENV = "FLASH_ATTN_3_GLUON_VARLEN_BWD"
LAYERS_ENV = "FLASH_ATTN_3_GLUON_BWD_LAYERS"
# The model-layer variants (windows other than causal, softcap, sinks, head dims padded to a tile
# width) passed their first GPU run (H100, 2026-12-07 13:06 UTC, commit 15ca948: the 131 tests of
# tests/test_bwd_hopper_layers.py) and are taken by default. Keys cut by seqused_k reach
# _clear_key_tail, which racecheck flagged in that call's reliability run (both consumer
# warpgroups cleared the same tile); with warpgroup 0 alone clearing it and an mbarrier before the
# other's reads, the 131 tests passed and racecheck found nothing in our code (H100, 2026-12-07
# 15:06 UTC, commit 9f1c3f8, RELIABILITY.md run 4): taken by default since.


def layer_refusal(a: AttnArgs) -> Optional[str]:
    """Why a model-layer variant is not taken, or None: only when switched off
    (FLASH_ATTN_3_GLUON_BWD_LAYERS=0 sends seqused_k calls to bwd.py)."""
    if a.seqused_k is None or os.environ.get(LAYERS_ENV, "").strip() != "0":
        return None
    return f"seqused_k in the Gluon backward: switched off by {LAYERS_ENV}=0"


def query_tail_refusal(a: AttnArgs) -> Optional[str]:
    """Why packed or seqused_q calls stay on bwd.py, or None. A key block's program reads whole
    query blocks, and the last one of a sequence reaches past its end: into the next sequence,
    rows past seqused_q, or a packed buffer's unused tail. Their P and dS are exact zeros, but
    the dV += P^T dO and dK += dS^T Q wgmmas still multiply them by those rows' q and dout, and
    0 * NaN is NaN. _clear_query_tail zeroes those rows in shared memory first (with the by-lane
    masks it compiles without local ops in the D = 128 loops: 48 B of spills against 24; the
    first clear, before them and without the warpgroup barriers, cost 160-300 B). It has not yet
    run on a GPU, so these calls take the portable backward, which masks its loads, until it
    has (tests/test_bwd_hopper_layers.py, the poisoned-neighbour test included);
    FLASH_ATTN_3_GLUON_VARLEN_BWD=1 takes them here."""
    if a.cu_seqlens_q is None and a.seqused_q is None:
        return None
    if os.environ.get(VARLEN_ENV, "").strip() == "1":
        return None
    return ("packed or seqused_q query rows: the Gluon backward's clear of the rows past each "
            f"sequence has not yet run on a GPU ({VARLEN_ENV}=1 takes them)")


DV_ENV = gluon_layout.DV_ENV


def dv_refusal(a: AttnArgs) -> Optional[str]:
    """Why this kernel does not take a call whose V's head dim differs from Q's and K's
    (DeepSeek V2 / V3's 192 / 128), or None. Only the split kernel has the variant: Q and K on
    its 256-wide tiles, V and dO on 64- or 128-wide ones, the S side's dV accumulator at V's
    width (dV's 64 keys x 128 take half the registers of D = 256's). V's head dim must be a
    tile width itself (no padding columns on the V side).
    FLASH_ATTN_3_GLUON_DV=0 sends these calls to bwd.py (gluon_layout.narrow_v_hold)."""
    head_dim, head_dim_v = a.q.shape[-1], a.v.shape[-1]
    if head_dim_v == head_dim:
        return None
    held = gluon_layout.narrow_v_hold(a, "Gluon backward")
    if held:
        return held
    if tile_width(head_dim) not in SPLIT_HEAD_DIMS or head_dim_v not in CONFIGS \
            or head_dim_v >= head_dim:
        return (f"v's head dim {head_dim_v} against q's {head_dim}: the Gluon backward takes a "
                f"V of 64 or 128 under Q / K tiles of {', '.join(map(str, SPLIT_HEAD_DIMS))}")
    return None


def named_refusal(a: AttnArgs) -> Optional[str]:
    """The reason this kernel gives by name for holding a call it could compute off, or None
    (routes explains a refusal with it)."""
    return query_tail_refusal(a) or layer_refusal(a) or dv_refusal(a)


def supports(a: AttnArgs, deterministic: bool = False) -> bool:
    """True when this kernel computes the call: sm_90, a triton version gluon_compat takes,
    fp16/bf16 q/k/v, each dense (B, S, H, D) or packed (total, H, D) with its cu_seqlens,
    seqused_q/k or not, head dims up to 256 (v's the same as q's and k's, or narrower where
    dv_refusal allows; between 64, 128 and 256 the next one's tiles), GQA, any window (causal included), softcap, sinks (their logit
    is in the LSE; no gradient for them, which the op layer refuses). Not attention_chunk (the
    official backward has none), paged or indexed K/V, qv, fp8, context parallelism.
    Deterministic calls take it too: they keep its dK/dV and leave dQ to bwd.py's atomic-free
    kernel (H100, 15:03 UTC: 0.91x of the default's speed, against 0.75x for bwd.py's
    deterministic path). FLASH_ATTN_3_GLUON=0 turns it off, =1 forces it on, as for the
    forward."""
    q, k, v = a.q, a.k, a.v
    if not (_GLUON_OK and gluon_compat.refusal(q.device) is None):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if named_refusal(a) is not None:
        return False
    extras = (a.qv, a.page_table, a.kv_batch_idx, a.leftpad_k, a.q_descale, a.k_descale,
              a.v_descale)
    if any(x is not None for x in extras):
        return False
    if a.sinks is not None and a.sinks.shape != (q.shape[-2], ):
        return False
    if a.attention_chunk != 0 or a.cp_world_size != 1 or not a.softmax_scale > 0 or a.softcap < 0:
        return False
    if not gluon_layout.takes_layout(a):
        return False
    head_dim = q.shape[-1]
    if tile_width(head_dim) is None or k.shape[-1] != head_dim:
        return False
    if q.numel() == 0 or k.numel() == 0 or q.shape[-2] % k.shape[-2] != 0:
        return False
    return all(_tma_ok(x) for x in (q, k, v))


def backward(dout, q, k, v, out, lse, a: AttnArgs, deterministic: bool = False, config=None,
             grads=None):
    """dq, dk, dv (shaped like q, k, v; GQA summed over each KV head's query group) for a call
    `supports()` accepts; config (a Config or a tuple of its leading fields) overrides
    CONFIGS. grads: (dq, dk, dv) buffers to write into (any strides, unit last stride), None
    entries allocated here. Packed, the rows outside every sequence get dq 0 and keep what
    dk / dv held."""
    from . import bwd
    from .fwd_hopper import mask_bounds, qk_used

    heads_q, head_dim = q.shape[-2:]
    heads_kv = k.shape[-2]
    width = tile_width(head_dim)
    width_v = tile_width(v.shape[-1])  # Q's unless V is narrower (dv_refusal)
    batch = a.batch_size
    packed_q = a.cu_seqlens_q is not None
    seqlen_q = a.max_seqlen_q if packed_q else q.shape[1]
    seqlen_k = a.max_seqlen_k if a.cu_seqlens_k is not None else k.shape[1]
    window_left, window_right, _ = mask_bounds(a)
    # The plain causal mask has code of its own; any other window takes the general bounds.
    causal = window_right == 0 and window_left is None
    if causal:
        window_right = None
    layer = (window_left is not None or window_right is not None or a.cu_seqlens_q is not None
             or a.cu_seqlens_k is not None or a.seqused_q is not None or a.seqused_k is not None)
    if config is not None:
        cfg = Config(*config)
    elif deterministic:
        cfg = DETERMINISTIC_CONFIGS[width]
    else:
        cfg = (LAYER_CONFIGS if layer else {}).get(width, CONFIGS[width])
    dq_in_kernel = cfg.dq_in_kernel and not deterministic
    if cfg.prefetch_s and not cfg.stats_smem:
        raise ValueError(f"{cfg}: prefetch_s needs stats_smem")
    # A window or a key block past seqused_k can leave a program no query block, and
    # prefetch_s issues the first S^T before the loop; packed rows need the statistics'
    # dense copy, which only the TMA path reads.
    if layer and (cfg.prefetch_s or not cfg.stats_smem):
        raise ValueError(f"{cfg}: windows and varlen need stats_smem and no prefetch_s")
    if dout.stride(-1) != 1 or not _tma_ok(dout):
        dout = dout.contiguous()
    # Padded rows only where TMA reads them: the kernel's global loads (stats_smem off) take
    # the row stride to be seqlen_q, an extra argument that cost the D = 128 default 24 bytes
    # more spills.
    lse2, delta = bwd.prep(out, dout, lse, a, pad=STATS_PAD if cfg.stats_smem else 1)
    stats_lse2, stats_delta = lse2, delta
    if packed_q:
        stats_lse2, stats_delta = (_dense_stats(x, a.cu_seqlens_q, seqlen_q)
                                   for x in (lse2, delta))
    dq, dk, dv = grads or (None, None, None)
    # The kernels take dK / dV row strides: a caller's buffer (SDPA's, through the official
    # bwd op) is written in place.
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if dq_in_kernel:
        dq_acc = dq_accumulator(q, a.cu_seqlens_q, cfg.block_m)
        dq_desc = _descriptor(dq_acc, cfg.block_m, DQ_REDUCE_COLS)
    else:
        dq_acc = None
        dq_desc = _descriptor(q, cfg.block_m, width)  # not read: stands in for the argument
    # The softcap's kernel argument is c * log2(e) (the scores stay in the log2 domain).
    softcap = a.softcap * LOG2E if a.softcap > 0 else None
    layer_args = (a.cu_seqlens_q, a.cu_seqlens_k, a.seqused_q, a.seqused_k, window_left,
                  window_right, softcap, head_dim if head_dim != width else None)
    # S^T and dP^T over a padded head dim's own columns (fwd_hopper.qk_used), but in
    # the 128-key kernel with dQ in it: at D = 96 its chained wgmmas took the registers the dQ
    # side needs (spills 24 -> 120-160 B, local ops in the loop 6 -> 11-12; sm_90 ptxas,
    # 2026-12-07), where without dQ they cut them (56 -> 0 B).
    sliced = qk_used(head_dim, width) if width in SPLIT_HEAD_DIMS or not dq_in_kernel else 0
    if width in SPLIT_HEAD_DIMS:
        if (not cfg.stats_smem or cfg.prefetch_s or cfg.early_dv or cfg.pin_dp
                or (cfg.stages > 2 and not dq_in_kernel)):
            raise ValueError(f"{cfg}: the split kernel takes the statistics by TMA, no prefetch, "
                             "early dV or pinned dP, and without dQ at most 2 stages")
        keys = KEYS_PER_WARPGROUP
        num_n_blocks = triton.cdiv(seqlen_k, keys)
        _bwd_kernel_split[(num_n_blocks * heads_kv * batch, )](
            _descriptor(q, cfg.block_m, width), _descriptor(dout, cfg.block_m, width_v),
            _descriptor(k, keys, width), _descriptor(v, keys, width_v), dq_desc,
            _stats_descriptor(stats_lse2, cfg.block_m),
            _stats_descriptor(stats_delta, cfg.block_m), dk, dv, *_rows_strides(dk),
            *_rows_strides(dv), a.softmax_scale, seqlen_q, seqlen_k, heads_kv, num_n_blocks,
            heads_q // heads_kv, *layer_args, causal, cfg.stages, bool(dq_in_kernel),
            sliced, _CONSUMER_REGS, _PRODUCER_REGS, num_warps=4, maxnreg=_MAXNREG)
    else:
        num_n_blocks = triton.cdiv(seqlen_k, BLOCK_N)
        if cfg.stats_smem:
            stats = (_stats_descriptor(stats_lse2, cfg.block_m),
                     _stats_descriptor(stats_delta, cfg.block_m))
        else:
            # Not read, but a descriptor needs 16-byte strides, which unpadded rows lack
            # (seqlen_q = 1001): an aligned stand-in of the same block type.
            stand_in = torch.empty(1, 1, cfg.block_m, dtype=torch.float32, device=q.device)
            stats = (_stats_descriptor(stand_in, cfg.block_m), ) * 2
        _bwd_kernel[(num_n_blocks * heads_kv * batch, )](
            _descriptor(q, cfg.block_m, width), _descriptor(dout, cfg.block_m, width),
            _key_descriptor(k, width), _key_descriptor(v, width), dq_desc, *stats, lse2,
            delta, dk, dv, *_rows_strides(dk), *_rows_strides(dv), a.softmax_scale, seqlen_q,
            seqlen_k, heads_kv, num_n_blocks, heads_q // heads_kv, *layer_args, causal,
            cfg.stages, bool(dq_in_kernel), bool(cfg.stats_smem), bool(cfg.prefetch_s),
            bool(cfg.early_dv), bool(cfg.pin_dp), sliced, _CONSUMER_REGS, _PRODUCER_REGS,
            num_warps=4, maxnreg=_MAXNREG)
    if dq_in_kernel:
        dq_acc = dq_rows(dq_acc, a.cu_seqlens_q, cfg.block_m, q.shape[0])
        return (dq_acc.to(q.dtype) if dq is None else dq.copy_(dq_acc)), dk, dv
    return bwd.dq_only(dout, q, k, v, lse2, delta, a, dq), dk, dv

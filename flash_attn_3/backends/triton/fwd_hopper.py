"""Hopper (sm_90) forward in Gluon: the hot dense case, warp-specialized like FlashAttention-3.

Written for triton 3.6.0's `triton.experimental.gluon` (experimental: the API moves between
releases, so `supports()` takes only the triton versions gluon_compat.py lists as verified and the
portable `fwd.py` kernel runs under any other).

A tile is BLOCK_M = 128 query rows of one (batch, head); a program walks work units (one program
per SM when persistent, else one per unit; a causal unit pairs a long and a short query block so
all units cost the same) with its CTA split into partitions:
- two consumer warpgroups (the default partition and one 4-warp worker), 64 query rows each. Each
  runs its own online softmax with FA3's intra-warpgroup overlap: S_j = Q K_j^T is issued, then
  O += P_{j-1} V_{j-1} behind it, and the softmax of S_j is written to run while that PV wgmma
  executes (in the SASS it does only with a config's LATE_PV_WAIT: see CANDIDATES).
  With ping-pong the two take turns issuing wgmmas, so one's softmax hides the other's GEMMs.
  They share every K/V tile, so K/V are read once per 128 rows.
- one producer warp issuing TMA loads of Q and of the K/V tiles into a STAGES-deep ring; ready
  barriers complete on the TMA byte count, empty barriers take one arrive from each consumer.
Scores stay in the log2 domain (softmax scale and log2(e) folded into one multiply, exp2), m and l
in fp32. Blocks fully below the causal diagonal and inside seqlen_k skip the mask; the edge blocks
(diagonal, sequence end) take it. Tensors are addressed through rank-4 descriptors over
(B, S, H, D): dense, a tile never crosses a batch boundary, TMA zero-fills keys past seqlen_k and
the O store clips at seqlen_q by itself.

Model layers (sliding window, attention_chunk, softcap, sinks) are variants of the same kernel:
their arguments are None when off, so the plain kernels compile as if they did not exist (same
SASS, tests/fwd_hopper_plain_sass.json). A tile visits only the key blocks some row of it may
see and masks only those not every row sees whole; softcap's tanh runs on the scores before
the mask; the sink logit joins m and l in the epilogue. Head dims between the instantiated
ones (64, 128, 256) take the next one's tiles: TMA reads the columns past the head dim as zeros
and writes none of them back.

Varlen: packed (total, H, D) tensors get the same descriptors over (1, total, H, D), and each tile
reads its sequence's first row and length from cu_seqlens (and seqused) on the device; the grid
covers max_seqlen_q and tiles past a shorter sequence exit at once. A tile may then reach past its
sequence into the next one (or a KV cache's unused tail): those keys are masked and their V rows
cleared in shared memory, and a query tile that crosses its sequence's end stores O from
registers, row-masked, instead of by TMA. None index tensors are constexprs, so the dense kernel
is compiled without any of it.

Paged K/V (PAGE_SIZE, flash_attn_with_kvcache's chunked prefill): the K and V descriptors cover
the page pool (num_pages, page_size, Hk, D), and the producer fills a ring slot with one TMA copy
per page the key block spans (or one slice of a larger page), each into its rows of the slot,
on the slot's one barrier; the page ids come from page_table[b] (clamped to the sequence's last
page). The consumers see a cache with seqused_k whose rows happen to live in pages.

fp8 e4m3 (IS_FP8, dense only): q and k as given, V as a copy with the keys contiguous,
(B, Hk, D, Sk), because fp8 wgmma reads both shared-memory operands only K-major and the K of
P @ V is the key axis. The descales fold into the score scale per (batch, KV head) (q's and k's)
and into the epilogue (v's); P is shifted to [0, 256] before its e4m3 cast, and the output is bf16.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ..params import AttnArgs
from . import fwd, gluon_compat, gluon_layout

try:
    import triton
    import triton.language as tl
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_compat import CAUSAL_MASK_BY_LANE, thread_barrier, tma

    # The kernels are defined wherever the API imports; which versions run them is supports()'s
    # call (gluon_compat.refusal).
    _GLUON_OK = gluon_compat.IMPORT_ERROR is None
    _GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
                  torch.float8_e4m3fn: gl.float8e4nv}
except ImportError:  # no triton, or a triton without Gluon's Hopper ops
    _GLUON_OK = False

LOG2E = 1.4426950408889634
ROWS_PER_WARPGROUP = 64  # the M of one wgmma; two consumer warpgroups make BLOCK_M = 128

# head dim -> (BLOCK_N, STAGES, PINGPONG, PERSISTENT). Shared memory: Q 128*D*2 bytes (and as
# much for O where it fits, see separate_o) plus STAGES * 2 * BLOCK_N*D*2 for K and V, under the
# 227 KB an H100 CTA may use. Ping-pong follows FA3, which orders the warpgroups' GEMMs for head
# dims up to 128. Persistent: one program per SM walks the tiles, so a tile's K/V loads overlap
# the previous tile's epilogue.
CONFIGS = {64: (128, 3, True, True), 128: (128, 2, True, True), 256: (64, 2, False, True)}
# Causal overrides. D = 64 without ping-pong: 394 against 381 TFLOP/s at N = 4k on the H100
# (non-causal: 465 against 463, a tie).
CAUSAL_CONFIGS = {64: (128, 3, False, True)}
# fp8: half the bytes per K/V tile, but O (bf16) always needs its own buffers; at D = 256
# BLOCK_N 128 does not fit with them (224 KB), 64 with 3 stages does (197 KB). Not yet tuned.
FP8_CONFIGS = {64: (128, 4, True, True), 128: (128, 3, True, True), 256: (64, 3, False, True)}
# A config may add a fifth field, LATE_PV_WAIT (off where absent): the next V tile's mbarrier
# wait ends the softmax's basic block, so that ptxas places the PV wgmma wait after the softmax
# instead of before it (docs/perf-notes.md, "The PV wait ptxas hoists"). Not yet timed: each
# default tiling has it among the candidates.
# What scripts/time_fp8_parts.py --configs times against FP8_CONFIGS[128] (and the GPU tests
# check). sm_90 ptxas: BLOCK_N 128 spills 80-96 bytes outside the KV loop, 64 none; 256 spills
# 800 bytes into the loop, so it is not a candidate.
FP8_CANDIDATES = {128: [(128, 2, True, True), (128, 4, True, True), (128, 3, False, True),
                        (64, 4, True, True), (64, 6, True, True), (128, 3, True, True, True)]}
# The alternatives benchmarks/tune_fwd_hopper.py times against the defaults (and the tests check).
CANDIDATES = {
    64: [(128, 3, True, False), (128, 3, False, True), (128, 3, True, True), (128, 2, True, True),
         (64, 4, True, True), (128, 3, True, True, True), (128, 3, False, True, True)],
    128: [(128, 2, True, False), (128, 2, False, True), (128, 3, True, True), (64, 3, True, True),
          (128, 2, True, True, True)],
    256: [(64, 2, False, False), (64, 2, True, True), (32, 4, False, True),
          (64, 2, False, True, True)],
}
# 4 + 4 consumer warps and the producer warp (rounded up to a warpgroup): 384 threads. maxnreg
# 168 keeps 384 * 168 under the 64K register file; the producer gives back all but 24 registers
# and each consumer warpgroup gets 240 (S, P and O of 64 rows live in registers at once).
_MAXNREG = 168
_CONSUMER_REGS = 240
_PRODUCER_REGS = 24
_SMEM_BUDGET = 220 * 1024  # of the 227 KB, leaving room for barriers
# _fwd_kernel's arguments whose values follow sequence lengths or batch size (the descales'
# strides: a transposed (Hk, B) view's follow the batch; the page table's row stride follows the
# cache capacity). Triton would specialize them (multiple
# of 16, or 1 as a constant) and compile a kernel per class: seqlen 5120 and 1000 compiled twice
# on the H100 (scripts/compile_cost.py). Head counts and group size follow the model and stay
# specialized. The strides are arguments of their own because Triton specializes the members of
# a tuple argument whatever do_not_specialize says.
UNSPECIALIZED = ("num_units", "num_m_blocks", "seqlen_q", "seqlen_k", "pair", "q_descale_sb",
                 "q_descale_sh", "k_descale_sb", "k_descale_sh", "v_descale_sb", "v_descale_sh",
                 "window_left", "window_right", "chunk", "page_table_stride")


def separate_o(head_dim: int, block_n: int, stages: int, fp8: bool = False,
               head_dim_v: Optional[int] = None) -> bool:
    """Whether O gets its own staging buffers (else it goes out through Q's): where they fit in
    shared memory next to Q and the K/V ring (D = 64 and 128 at the default configs, not 256).
    fp8 needs them (bf16 O is twice the size of e4m3 Q): its configs must fit, and so must a V
    narrower than Q and K (head_dim_v: DeepSeek's 192 / 128), whose O cannot use Q's buffers."""
    in_bytes = 1 if fp8 else 2
    dv = head_dim if head_dim_v is None else head_dim_v
    rows = 2 * ROWS_PER_WARPGROUP  # two warpgroups' rows
    need = rows * (head_dim * in_bytes + dv * 2) + stages * block_n * (head_dim + dv) * in_bytes
    return need <= _SMEM_BUDGET


if _GLUON_OK:
    LN2 = gl.constexpr(0.6931471805599453)
    LOG2E_GL = gl.constexpr(LOG2E)
    P_SHIFT = gl.constexpr(8.0)  # log2 of fp8 P's scale

    @gluon.jit
    def _unit(u, num_m_blocks, pair, PAIRED: gl.constexpr):
        """Work unit u -> (b*Hq + h, heavy query block, light query block, tiles in the unit).

        Persistent programs take units round-robin, so units must cost the same or the programs
        whose stride lands on the long causal rows finish last (measured: B=2, 8 heads, 128 query
        blocks ran at 0.71x cuDNN). With pair = 1 a causal unit pairs query block M-1-j with
        block j of one head: j + 1 and M - j key blocks always add up to M + 1. The heavy one
        goes first; the light one then rereads keys the heavy one just pulled into L2. Units of
        one head are adjacent, so the programs running together share its K/V in L2, and equal
        units keep them in step. pair = 0 (fewer tiles than programs, or one program per unit
        where the hardware balances): one tile, longest first. Without causality every tile
        costs the same and a unit is one tile (PAIRED off). A sliding window's or a causal
        chunk's tiles cost what causal ones do up to the window, or repeat causal's pattern per
        chunk, so they pair too (the pair's sum is then equal for chunks that are a multiple of
        the query block, and spread less than the tiles' own costs for windows)."""
        if PAIRED:
            # pair is 0 or 1 and not a constant (UNSPECIALIZED): a shift, not a division.
            units_per_head = (num_m_blocks + pair) >> pair
            j = u % units_per_head
            heavy = num_m_blocks - 1 - j
            light = heavy - pair * (heavy - j)
            num = 1 + (heavy > light).to(gl.int32)
        else:
            units_per_head = num_m_blocks
            light = u % units_per_head
            heavy = light
            num = 1
        return u // units_per_head, heavy, light, num

    @gluon.jit
    def _chunk_start(d, chunk):
        # Floor semantics for rows above the diagonal's start (d < 0), whatever sign '%' keeps.
        return d - ((d % chunk) + chunk) % chunk

    @gluon.jit
    def _local_blocks(m0, used_q, k_rows, window, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr):
        """Key blocks of query rows m0 .. min(m0 + BLOCK_M, used_q) - 1 under a window and / or
        an attention chunk (spec sec 4): (first block, blocks to visit, and, counted from the
        first, the first and end of the blocks that every row sees whole inside the keys).
        Blocks wholly outside every row's range are never visited, so the work follows the
        window."""
        window_left, window_right, chunk = window
        diag = k_rows - used_q
        d_lo = m0 + diag
        d_hi = gl.minimum(m0 + BLOCK_M, used_q) - 1 + diag
        # Both ends of a row's allowed range grow with its diagonal, so the first and last rows
        # bound the union [lo, hi) and the intersection [lo_all, hi_all) of the rows' ranges.
        lo = 0
        lo_all = 0
        hi = k_rows
        hi_all = k_rows
        if window_left is not None:
            lo = gl.maximum(d_lo - window_left, 0)
            lo_all = gl.maximum(d_hi - window_left, 0)
        if window_right is not None:
            hi = gl.minimum(d_hi + window_right + 1, k_rows)
            hi_all = gl.minimum(d_lo + window_right + 1, k_rows)
        if chunk is not None:
            start_lo = _chunk_start(d_lo, chunk)
            start_hi = _chunk_start(d_hi, chunk)
            lo = gl.maximum(lo, start_lo)
            lo_all = gl.maximum(lo_all, start_hi)
            hi = gl.minimum(hi, start_hi + chunk)
            hi_all = gl.minimum(hi_all, start_lo + chunk)
        first = lo // BLOCK_N
        num_blocks = gl.where(hi > lo, gl.cdiv(hi, BLOCK_N) - first, 0)
        # An empty intersection leaves full_hi <= full_lo: every block is then an edge block.
        full_lo = gl.cdiv(lo_all, BLOCK_N) - first
        full_hi = gl.maximum(hi_all, 0) // BLOCK_N - first
        return first, num_blocks, full_lo, full_hi

    @gluon.jit
    def _tile(bh, m_block, shape, seqs, window, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              CAUSAL: gl.constexpr):
        """Query block m_block of head bh -> (b, h, q_batch, q_start, k_batch, k_start, first query
        row of the tile, query rows written, query rows used, keys, first key block, key blocks
        to visit, and the blocks needing no mask: from full_lo to full_hi, counted from the
        first). (x_batch, x_start) is the descriptor coordinate of
        the sequence's first token: (b, 0) dense, (0, cu_seqlens[b]) packed. window:
        (window_left, window_right, chunk), each None where unbounded; all None with CAUSAL for
        the plain causal mask."""
        num_units, num_m_blocks, num_heads_q, seqlen_q, seqlen_k, group_size, pair = shape
        cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k = seqs
        b = bh // num_heads_q
        # Dense, the batch coordinate picks the sequence; packed, the first row does.
        q_batch, q_start, q_rows = b, 0, seqlen_q
        if cu_seqlens_q is not None:
            q_start = gl.load(cu_seqlens_q + b)
            q_batch, q_rows = 0, gl.load(cu_seqlens_q + b + 1) - q_start
        k_batch, k_start, k_rows = b, 0, seqlen_k
        if cu_seqlens_k is not None:
            k_start = gl.load(cu_seqlens_k + b)
            k_batch, k_rows = 0, gl.load(cu_seqlens_k + b + 1) - k_start
        # seqused never reaches past the sequence: a length the checks cannot read must not turn
        # into reads of the next sequence (or past the tensor).
        used_q = q_rows
        if seqused_q is not None:
            used_q = gl.minimum(gl.load(seqused_q + b), q_rows)
        if seqused_k is not None:
            k_rows = gl.minimum(gl.load(seqused_k + b), k_rows)
        m0 = m_block * BLOCK_M
        first = 0
        full_lo = 0
        if window[0] is not None or window[1] is not None or window[2] is not None:
            first, num_blocks, full_lo, full_hi = _local_blocks(m0, used_q, k_rows, window,
                                                                BLOCK_M, BLOCK_N)
        else:
            if CAUSAL:
                # Bottom-right diagonal: row i sees keys j <= i + seqlen_k - seqlen_q.
                m_end = gl.minimum(m0 + BLOCK_M, used_q)
                n_end = gl.maximum(gl.minimum(k_rows, m_end + k_rows - used_q), 0)
                # Blocks whose last key is on or below the diagonal of the tile's first row.
                full_hi = gl.maximum(m0 + k_rows - used_q + 1, 0) // BLOCK_N
                full_hi = gl.minimum(full_hi, k_rows // BLOCK_N)
            else:
                n_end = k_rows
                full_hi = k_rows // BLOCK_N
            num_blocks = gl.cdiv(n_end, BLOCK_N)
        if seqused_q is not None:
            # Rows past seqused_q but inside the sequence are written (out 0, lse +inf) without
            # visiting any key.
            num_blocks = gl.where(m0 < used_q, num_blocks, 0)
        return (b, bh % num_heads_q, q_batch, q_start, k_batch, k_start, m0, q_rows, used_q,
                k_rows, first, num_blocks, full_lo, full_hi)

    @gluon.jit
    def _kv_pages(page_row, last_page, j, BLOCK_N: gl.constexpr, ROWS: gl.constexpr,
                  PAGE_SIZE: gl.constexpr):
        """Physical page of each of key block j's BLOCK_N // ROWS copies (ROWS keys each, never
        across a page). Keys past the sequence read its last page instead of whatever the table
        holds past its end: the mask drops their scores and _clear_tail their V rows. All loads
        go out before the first copy needs one: in a loop of load-then-copy each copy waited for
        its own page-table read."""
        pages = ()
        for c in gl.static_range(BLOCK_N // ROWS):
            logical = (j * BLOCK_N + c * ROWS) // PAGE_SIZE
            pages = pages + (gl.load(page_row + gl.minimum(logical, last_page)), )
        return pages

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, k_batch, k_start, hk, j, kv, page_row,
                 last_page, STAGES: gl.constexpr, IS_FP8: gl.constexpr, PAGE_SIZE: gl.constexpr):
        """Block j of a tile's keys and values into ring slot kv % STAGES. Paged, the block is
        filled by one TMA copy per page it spans (or one per block within a larger page),
        each into its rows of the slot, all on the slot's one barrier."""
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, tail_bars = bars
        BLOCK_N: gl.constexpr = k_smem.type.shape[2]
        stage = kv % STAGES
        # Fresh barriers pass a wait on parity 1, so the first lap of the ring does not wait.
        phase = ((kv // STAGES) & 1) ^ 1
        if PAGE_SIZE is None:
            mbarrier.wait(k_empty.index(stage), phase)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_batch, k_start + j * BLOCK_N, hk, 0],
                                            k_ready.index(stage), k_smem.index(stage))
            mbarrier.wait(v_empty.index(stage), phase)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            if IS_FP8:  # V copied to (B, Hk, D, Sk); dense only, so k_start is 0
                tma.async_copy_global_to_shared(v_desc, [k_batch, hk, 0, j * BLOCK_N],
                                                v_ready.index(stage), v_smem.index(stage))
            else:
                tma.async_copy_global_to_shared(v_desc, [k_batch, k_start + j * BLOCK_N, hk, 0],
                                                v_ready.index(stage), v_smem.index(stage))
        else:
            ROWS: gl.constexpr = k_desc.block_type.shape[1]
            COPIES: gl.constexpr = BLOCK_N // ROWS
            pages = _kv_pages(page_row, last_page, j, BLOCK_N, ROWS, PAGE_SIZE)
            mbarrier.wait(k_empty.index(stage), phase)
            mbarrier.expect(k_ready.index(stage), COPIES * k_desc.block_type.nbytes)
            for c in gl.static_range(COPIES):
                tma.async_copy_global_to_shared(
                    k_desc, [pages[c], (j * BLOCK_N + c * ROWS) % PAGE_SIZE, hk, 0],
                    k_ready.index(stage), k_smem.index(stage).slice(c * ROWS, ROWS, dim=1))
            mbarrier.wait(v_empty.index(stage), phase)
            mbarrier.expect(v_ready.index(stage), COPIES * v_desc.block_type.nbytes)
            for c in gl.static_range(COPIES):
                tma.async_copy_global_to_shared(
                    v_desc, [pages[c], (j * BLOCK_N + c * ROWS) % PAGE_SIZE, hk, 0],
                    v_ready.index(stage), v_smem.index(stage).slice(c * ROWS, ROWS, dim=1))

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, shape, seqs, window,
                  page_table, page_table_stride, CAUSAL: gl.constexpr, PAIRED: gl.constexpr,
                  STAGES: gl.constexpr, IS_FP8: gl.constexpr, PAGE_SIZE: gl.constexpr):
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, tail_bars = bars
        num_units, num_m_blocks, num_heads_q, seqlen_q, seqlen_k, group_size, pair = shape
        BLOCK_MW: gl.constexpr = q_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = k_smem.type.shape[2]
        kv = 0  # K/V blocks loaded so far: the ring position runs on across tiles
        done = 0
        for u in range(gl.program_id(0), num_units, gl.num_programs(0)):
            bh, heavy, light, num = _unit(u, num_m_blocks, pair, PAIRED)
            for i in range(0, num):
                (b, h, q_batch, q_start, k_batch, k_start, m0, q_rows, _, k_rows, first,
                 num_blocks, _, _) = _tile(bh, heavy - i * (heavy - light), shape, seqs, window,
                                           2 * BLOCK_MW, BLOCK_N, CAUSAL)
                # Packed, the grid covers max_seqlen_q: blocks past a shorter sequence are skipped
                # here and by the consumers alike.
                if seqs[0] is None or m0 < q_rows:
                    hk = h // group_size
                    page_row = page_table
                    last_page = 0
                    if PAGE_SIZE is not None:
                        page_row = page_table + b * page_table_stride
                        last_page = (k_rows - 1) // PAGE_SIZE
                    # The first K/V block goes out before Q, whose buffers wait for the previous
                    # tile: so the next tile's loads overlap that tile's end.
                    if num_blocks > 0:
                        _load_kv(k_desc, v_desc, k_smem, v_smem, bars, k_batch, k_start, hk,
                                 first, kv, page_row, last_page, STAGES, IS_FP8, PAGE_SIZE)
                    for w in gl.static_range(2):
                        # A consumer frees its Q buffer after its last QK wgmma, or, where O is
                        # staged in that buffer, once the O store has read it.
                        mbarrier.wait(q_empty.index(w), (done & 1) ^ 1)
                        mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
                        tma.async_copy_global_to_shared(
                            q_desc, [q_batch, q_start + m0 + w * BLOCK_MW, h, 0],
                            q_ready.index(w), q_smem.index(w))
                    for j in range(1, num_blocks):
                        _load_kv(k_desc, v_desc, k_smem, v_smem, bars, k_batch, k_start, hk,
                                 first + j, kv + j, page_row, last_page, STAGES, IS_FP8,
                                 PAGE_SIZE)
                    kv += num_blocks
                    done += 1

    @gluon.jit
    def _row_bounds(diag, k_rows, window):
        """First and last key each query row may see under a window and / or a chunk (spec sec
        4; diag = row + seqlen_k - seqlen_q), the keys' end included: the mask's two compares."""
        window_left, window_right, chunk = window
        lo = gl.zeros_like(diag)
        hi = gl.zeros_like(diag) + (k_rows - 1)
        if window_left is not None:
            lo = diag - window_left
        if window_right is not None:
            hi = gl.minimum(hi, diag + window_right)
        if chunk is not None:
            start = _chunk_start(diag, chunk)
            lo = gl.maximum(lo, start)
            hi = gl.minimum(hi, start + chunk - 1)
        return lo, hi

    @gluon.jit
    def _masked(s, j, diag, seqlen_k, bounds, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                col_layout: gl.constexpr):
        cols = gl.expand_dims(j * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_layout), 0)
        if bounds is not None:
            lo, hi = bounds
            ok = (cols >= gl.expand_dims(lo, 1)) & (cols <= gl.expand_dims(hi, 1))
        elif CAUSAL:
            if CAUSAL_MASK_BY_LANE:
                # FA3's form: one compare of a constant per element against a per-row limit.
                # In S's wgmma layout a thread's columns are (lane % 4) * 2 plus constants, so
                # ar - lane is a constant per register and lim - lane one value per row; the
                # two bounds fold into lim (cols <= diag and cols < seqlen_k). Exact for any
                # layout (ar - lane + lane = ar). Under triton 3.9 (CUDA 13.4 ptxas) the form
                # below kept the columns in registers across the KV loop and spilled inside
                # it (D = 128: 140 B, a local op per loop); this one: no spills, loops 776 ->
                # 610 instructions. A constexpr from gluon_compat: 3.6's SASS is as measured.
                ar = gl.arange(0, BLOCK_N, layout=col_layout)
                lane = ar & 6
                lim = gl.minimum(diag, seqlen_k - 1) - j * BLOCK_N
                ok = gl.expand_dims(ar - lane, 0) <= (gl.expand_dims(lim, 1)
                                                     - gl.expand_dims(lane, 0))
            else:
                ok = (cols < seqlen_k) & (cols <= gl.expand_dims(diag, 1))
        else:
            ok = cols < seqlen_k
        return gl.where(ok, s, float("-inf"))

    @gluon.jit
    def _clear_tail(v_tile, first_row):
        """Zero rows first_row.. of a V tile in shared memory. Their P is 0, but rows past a
        sequence's keys are whatever memory holds there (a KV cache's unused tail, the next
        sequence) and 0 * NaN is NaN in the PV wgmma; TMA zero-fills only past the tensor.
        Warpgroup 0 clears the tile that both consumer warpgroups read, and warpgroup 1 waits
        for it (the tail barriers): when both cleared it, each one's read-modify-write of the
        valid rows raced with the other's stores (compute-sanitizer racecheck, 2026-12-07:
        benign, the bits were the same, but a race all the same)."""
        BLOCK_N: gl.constexpr = v_tile.shape[0]
        HEAD_DIM: gl.constexpr = v_tile.shape[1]
        CHUNK: gl.constexpr = 16
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        for c in gl.static_range(BLOCK_N // CHUNK):
            if (c + 1) * CHUNK > first_row:
                chunk = v_tile.slice(c * CHUNK, CHUNK)
                rows = c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
                x = chunk.load(layout)
                chunk.store(gl.where(gl.expand_dims(rows < first_row, 1), x, gl.zeros_like(x)))
        fence_async_shared()

    @gluon.jit
    def _issue_sliced(a, b, acc, USED: gl.constexpr):
        """a b^T (async) over the first USED of their columns, the head dim under its tile width
        (fwd_hopper.qk_used), as two wgmmas of power-of-two widths: half the tile, then USED -
        half (128 + 64 of 256, 64 + 32 of 128), so no k-step runs on the padding's zeros. Called
        only where USED > 0: the plain kernels issue their one wgmma inline (a helper there
        changed their SASS)."""
        HALF: gl.constexpr = a.type.shape[1] // 2
        tok = warpgroup_mma(a.slice(0, HALF, dim=1), b.slice(0, HALF, dim=1).permute((1, 0)),
                            acc, use_acc=False, is_async=True)
        return warpgroup_mma(a.slice(HALF, USED - HALF, dim=1),
                             b.slice(HALF, USED - HALF, dim=1).permute((1, 0)), tok,
                             is_async=True)

    @gluon.jit
    def _softcapped(s, cap_in):
        """tanh(s * cap_in), the softcap's tanh: the tile's score scale then carries c * log2(e).
        One MUFU.TANH (tanh.approx.f32, relative error ~2^-11), as FA3 does: the portable
        1 - 2 / (exp2(2x) + 1) takes two MUFU ops, and MUFU already carries the softmax's exp2."""
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [s * cap_in],
                                         dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _online_softmax(s, m_i, l_i, qk_scale, IS_FP8: gl.constexpr):
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        # A row that has seen no allowed key keeps m = -inf; subtracting 0 instead keeps its
        # probabilities at exp2(-inf) = 0 rather than NaN.
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_sub)
        m_p = m_sub
        if IS_FP8:
            # p in [0, 256] instead of [0, 1]: small probabilities stay out of e4m3's subnormals
            # (FA3 does the same); l carries the factor, the epilogue's division and lse drop it.
            m_p = m_sub - P_SHIFT
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_p, 1))
        l_new = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _take_turn(turn, issue, WG: gl.constexpr, PINGPONG: gl.constexpr):
        # Ping-pong: the warpgroups take turns issuing their wgmmas, so one's softmax runs while
        # the other's GEMMs occupy the tensor cores. Warpgroup 0 goes first (a fresh barrier
        # passes a wait on parity 1). Both count the same issues, so the turns alternate.
        if PINGPONG:
            mbarrier.wait(turn.index(WG), (issue & 1) ^ (1 - WG))

    @gluon.jit
    def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))

    @gluon.jit
    def _p_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, IS_FP8: gl.constexpr):
        """P in dtype as the register A operand of the PV wgmma."""
        if IS_FP8:
            # In each group of 32 keys a thread's S registers hold keys 2t, 2t+1 (+8, +16, +24)
            # and an e4m3 A register must hold 4t..4t+3 (+16). Operand column bits (a3, a2, a1)
            # taking key bits (c2, c1, c3) makes P's registers the A fragment as they are (no
            # lane exchange; convert_layout proves it); V's copy has its keys in the same order
            # (_values_keys_inner). The asm packs 4 registers into one (2 cvt per register; the
            # generic fp32 -> fp8 cast went through single bytes).
            rows: gl.constexpr = p.shape[0]
            cols: gl.constexpr = p.shape[1]
            x = p.reshape([rows, cols // 32, 2, 2, 2, 2, 2]).permute((0, 1, 2, 4, 5, 3, 6))
            x = gl.convert_layout(x.reshape([rows, cols]), p_layout, assert_trivial=True)
            return gl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi;\n"
                "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
                "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
                "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=gl.float8e4nv, is_pure=True,
                pack=4)
        else:
            return gl.convert_layout(p.to(dtype), p_layout, assert_trivial=True)

    @gluon.jit
    def _p_carried(p, dtype: gl.constexpr, p_layout: gl.constexpr, IS_FP8: gl.constexpr):
        """P as the KV loop carries it to the next PV wgmma: fp16/bf16 already the operand; fp8
        still fp32, cast by _p_issued next to the wgmma. An e4m3 tensor carried across the loop's
        back edge is 64 single bytes a thread (16-bit registers) that the wgmma repacks 4 to a
        register: 128 PRMT and 64 LOP3 per warp and key block (sm_90 SASS), ~30 % of the loop.
        Cast where the wgmma reads it, the packed registers go straight in. Same registers: 64
        fp32 values against 64 bytes in 16-bit registers."""
        if IS_FP8:
            return p
        else:
            return _p_operand(p, dtype, p_layout, IS_FP8)

    @gluon.jit
    def _p_issued(p, dtype: gl.constexpr, p_layout: gl.constexpr, IS_FP8: gl.constexpr):
        """The PV wgmma's A operand from what _p_carried kept."""
        if IS_FP8:
            return _p_operand(p, dtype, p_layout, IS_FP8)
        else:
            return p

    @gluon.jit
    def _wait_pv(o_tok, p, IS_FP8: gl.constexpr):
        """Retire the PV wgmma: (O, P). The wgmma reads P from registers, so P stays live until
        here. triton 3.6 cannot lower an 8-bit dep (fatal "Unexpected bitwidth"): fp8 leaves P
        out and relies on ptxas, which must not reuse registers an in-flight wgmma reads (it
        serializes the wgmmas, with a warning, when it cannot; the sm_90 compile shows none)."""
        if IS_FP8:
            return warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, )), p
        else:
            return warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p))

    @gluon.jit
    def _v_operand(v_smem, stage, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                   IS_FP8: gl.constexpr):
        """V tile of a ring slot as the (BLOCK_N, HEAD_DIM) B operand of the PV wgmma."""
        if IS_FP8:
            # Stored (HEAD_DIM, BLOCK_N), keys contiguous: the K-major B operand fp8 needs.
            return v_smem.index(stage).reshape([HEAD_DIM, BLOCK_N]).permute((1, 0))
        else:
            return v_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])

    @gluon.jit
    def _tile_scales(qk_scale, descales, b, hk, IS_FP8: gl.constexpr):
        """(score scale in the log2 domain, output scale) of a tile: fp8 folds q's and k's descale
        into the first and v's into the second, each per (batch, KV head)."""
        if IS_FP8:
            pointers, strides = descales
            q_descale, k_descale, v_descale = pointers
            q_sb, q_sh, k_sb, k_sh, v_sb, v_sh = strides
            q_descale = gl.load(q_descale + b * q_sb + hk * q_sh)
            k_descale = gl.load(k_descale + b * k_sb + hk * k_sh)
            return qk_scale * q_descale * k_descale, gl.load(v_descale + b * v_sb + hk * v_sh)
        else:
            return qk_scale, 1.0

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, o_bufs, bars, o_desc, o_ptr, lse_ptr, qk_scale, shape,
                  seqs, descales, window, softcap, sinks, head_dim, CAUSAL: gl.constexpr,
                  PAIRED: gl.constexpr, STAGES: gl.constexpr,
                  PINGPONG: gl.constexpr, SEPARATE_O: gl.constexpr, IS_FP8: gl.constexpr,
                  LATE_PV_WAIT: gl.constexpr, QK_USED: gl.constexpr, WG: gl.constexpr):
        q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, tail_bars = bars
        num_units, num_m_blocks, num_heads_q, seqlen_q, seqlen_k, group_size, pair = shape
        BLOCK_MW: gl.constexpr = o_desc.block_type.shape[1]
        HEAD_DIM: gl.constexpr = o_desc.block_type.shape[3]  # V's and O's
        HEAD_DIM_QK: gl.constexpr = q_smem.type.shape[4]  # wider than V's where dv < d
        BLOCK_N: gl.constexpr = k_smem.type.shape[2]
        dtype: gl.constexpr = o_desc.dtype
        p_dtype: gl.constexpr = k_smem.dtype
        MMA_K: gl.constexpr = 32 if IS_FP8 else 16  # a wgmma reads 32 bytes of each row
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, MMA_K])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, MMA_K])
        # P feeds the PV wgmma from registers: S's accumulator fragment is already that operand's
        # fragment, so these conversions (and the row-vector ones) move no data.
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=4 if IS_FP8 else 2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        q = q_smem.index(WG).reshape([BLOCK_MW, HEAD_DIM_QK])
        o_smem = o_bufs.index(WG)

        kv = 0  # K/V blocks consumed so far: the ring position runs on across tiles
        tails = 0  # V tails cleared so far (varlen / seqused_k): the tail barriers' phase
        issue = 0  # wgmma issue turns taken so far
        done = 0
        for u in range(gl.program_id(0), num_units, gl.num_programs(0)):
            bh, heavy, light, num = _unit(u, num_m_blocks, pair, PAIRED)
            for i in range(0, num):
                (b, h, q_batch, q_start, k_batch, k_start, m0, q_rows, used_q, k_rows, first,
                 num_blocks, full_lo, full_hi) = _tile(bh, heavy - i * (heavy - light), shape,
                                                       seqs, window, 2 * BLOCK_MW, BLOCK_N,
                                                       CAUSAL)
                if seqs[0] is None or m0 < q_rows:
                    row0 = m0 + WG * BLOCK_MW
                    rows = row0 + gl.arange(0, BLOCK_MW, layout=row_layout)
                    diag = rows + (k_rows - used_q)
                    bounds = None
                    if window[0] is not None or window[1] is not None or window[2] is not None:
                        bounds = _row_bounds(diag, k_rows, window)
                    m_i = gl.full([BLOCK_MW], float("-inf"), gl.float32, row_layout)
                    l_i = gl.zeros([BLOCK_MW], gl.float32, row_layout)
                    acc = gl.zeros([BLOCK_MW, HEAD_DIM], gl.float32, o_layout)
                    tile_scale, v_scale = _tile_scales(qk_scale, descales, b, h // group_size,
                                                       IS_FP8)
                    if softcap is not None:
                        # s -> c * tanh(scale * s / c), in the log2 domain: tanh's argument takes
                        # the scale over c, the softmax's scale is c * log2(e).
                        cap_in = tile_scale / softcap
                        tile_scale = softcap
                    mbarrier.wait(q_ready.index(WG), done & 1)

                    if num_blocks > 0:
                        stage = kv % STAGES
                        mbarrier.wait(k_ready.index(stage), (kv // STAGES) & 1)
                        _take_turn(turn, issue, WG, PINGPONG)
                        k_first = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM_QK])
                        if QK_USED == 0:
                            s_tok = warpgroup_mma(
                                q, k_first.permute((1, 0)),
                                gl.zeros([BLOCK_MW, BLOCK_N], gl.float32, s_layout),
                                use_acc=False, is_async=True)
                        else:
                            s_tok = _issue_sliced(
                                q, k_first, gl.zeros([BLOCK_MW, BLOCK_N], gl.float32, s_layout),
                                QK_USED)
                        _pass_turn(turn, WG, PINGPONG)
                        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
                        mbarrier.arrive(k_empty.index(stage))
                        if softcap is not None:
                            s = _softcapped(s, cap_in)
                        # The tile's key blocks from full_lo to full_hi need no mask (the
                        # tests are inline: a helper's debug labels split ptxas' basic blocks
                        # and changed the plain kernels' SASS).
                        if bounds is None:
                            edge = full_hi == 0
                        else:
                            edge = (full_lo > 0) | (full_hi <= 0)
                        if edge:
                            s = _masked(s, first, diag, k_rows, bounds, BLOCK_N, CAUSAL,
                                        col_layout)
                        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, tile_scale, IS_FP8)
                        p = _p_carried(p, p_dtype, p_layout, IS_FP8)
                        if LATE_PV_WAIT:
                            mbarrier.wait(v_ready.index(kv % STAGES), (kv // STAGES) & 1)

                        for j in range(1, num_blocks):
                            stage = (kv + j) % STAGES
                            prev = (kv + j - 1) % STAGES
                            # Before the QK wgmma, whose accumulator must not share the registers
                            # with fp8's fp32 P (ptxas spilled when the cast sat between the two).
                            p_op = _p_issued(p, p_dtype, p_layout, IS_FP8)
                            mbarrier.wait(k_ready.index(stage), ((kv + j) // STAGES) & 1)
                            if not LATE_PV_WAIT:
                                mbarrier.wait(v_ready.index(prev), ((kv + j - 1) // STAGES) & 1)
                            _take_turn(turn, issue + j, WG, PINGPONG)
                            # The dead S registers serve as the accumulator: use_acc=False
                            # ignores them.
                            k_next = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM_QK])
                            if QK_USED == 0:
                                s_tok = warpgroup_mma(q, k_next.permute((1, 0)), s,
                                                      use_acc=False, is_async=True)
                            else:
                                s_tok = _issue_sliced(q, k_next, s, QK_USED)
                            o_tok = warpgroup_mma(
                                p_op, _v_operand(v_smem, prev, BLOCK_N, HEAD_DIM, IS_FP8), acc,
                                is_async=True)
                            _pass_turn(turn, WG, PINGPONG)
                            # Softmax of block j overlaps the PV wgmma of block j - 1.
                            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
                            mbarrier.arrive(k_empty.index(stage))
                            if softcap is not None:
                                s = _softcapped(s, cap_in)
                            if bounds is None:
                                edge = j >= full_hi
                            else:
                                edge = (j < full_lo) | (j >= full_hi)
                            if edge:
                                s = _masked(s, first + j, diag, k_rows, bounds, BLOCK_N, CAUSAL,
                                            col_layout)
                            p_next, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, tile_scale,
                                                                      IS_FP8)
                            p_next = _p_carried(p_next, p_dtype, p_layout, IS_FP8)
                            if LATE_PV_WAIT:
                                # ptxas schedules the PV wait (WARPGROUP.DEPBAR) at the top of
                                # its basic block, which without this was the whole softmax:
                                # the wait ran before the row max. The next V's mbarrier wait
                                # ends the block here (its retry branch), so the softmax runs
                                # under the PV wgmma. One more warpgroup bar.sync (Triton's,
                                # before an mbarrier wait) per block.
                                mbarrier.wait(v_ready.index(stage), ((kv + j) // STAGES) & 1)
                            # The running PV reads the previous P from registers: keep it alive
                            # until the wgmma retires.
                            acc, p = _wait_pv(o_tok, p, IS_FP8)
                            mbarrier.arrive(v_empty.index(prev))
                            acc = acc * gl.expand_dims(
                                gl.convert_layout(alpha, o_row_layout, assert_trivial=True), 1)
                            p = p_next

                        if SEPARATE_O:
                            # Every QK wgmma has retired: the next tile's Q lands while the last
                            # PV and the epilogue run, instead of after them (a bubble per tile
                            # that short causal rows, a few key blocks long, feel most).
                            mbarrier.arrive(q_empty.index(WG))
                        last = kv + num_blocks - 1
                        if not LATE_PV_WAIT:  # else waited after the last softmax
                            mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
                        # Only the last key block can reach past the keys (dense without
                        # seqused_k, only past the tensor, which TMA zero-filled).
                        if seqs[1] is not None or seqs[3] is not None:
                            if (first + num_blocks) * BLOCK_N > k_rows:
                                if WG == 0:
                                    # a fresh barrier passes a wait on parity 1
                                    mbarrier.wait(tail_bars.index(1), (tails & 1) ^ 1)
                                    _clear_tail(v_smem.index(last % STAGES).reshape(
                                        [BLOCK_N, HEAD_DIM]),
                                        k_rows - (first + num_blocks - 1) * BLOCK_N)
                                    thread_barrier()  # all four warps' stores, then signal
                                    mbarrier.arrive(tail_bars.index(0))
                                else:
                                    mbarrier.wait(tail_bars.index(0), tails & 1)
                                    mbarrier.arrive(tail_bars.index(1))
                                tails += 1
                        _take_turn(turn, issue + num_blocks, WG, PINGPONG)
                        o_tok = warpgroup_mma(
                            _p_issued(p, p_dtype, p_layout, IS_FP8),
                            _v_operand(v_smem, last % STAGES, BLOCK_N, HEAD_DIM, IS_FP8), acc,
                            is_async=True)
                        _pass_turn(turn, WG, PINGPONG)
                        acc, p = _wait_pv(o_tok, p, IS_FP8)
                        mbarrier.arrive(v_empty.index(last % STAGES))
                        issue += num_blocks + 1
                    else:
                        if SEPARATE_O:
                            mbarrier.arrive(q_empty.index(WG))
                    kv += num_blocks

                    # Rows with no allowed key (l = 0): out 0, lse +inf (spec); so are the rows
                    # past seqused_q.
                    empty = l_i == 0.0
                    if seqs[2] is not None:
                        empty = empty | (rows >= used_q)
                    if sinks is not None:
                        # The head's sink logit joins the denominator, with no value (spec sec
                        # 4); a row with no allowed key stays empty all the same.
                        sink = gl.load(sinks + h) * LOG2E_GL
                        m_sink = gl.maximum(m_i, sink)
                        m_sink = gl.where(m_sink == float("-inf"), 0.0, m_sink)
                        alpha = gl.exp2(m_i - m_sink)
                        sink_p = sink - m_sink
                        if IS_FP8:
                            sink_p = sink_p + P_SHIFT  # l carries fp8 P's scale
                        l_i = l_i * alpha + gl.exp2(sink_p)
                        m_i = gl.maximum(m_i, sink)
                    l_safe = gl.where(empty, 1.0, l_i)
                    o_scale = v_scale / l_safe
                    if sinks is not None:
                        o_scale = o_scale * alpha
                    inv_l = gl.convert_layout(o_scale, o_row_layout, assert_trivial=True)
                    out = acc * gl.expand_dims(inv_l, 1)
                    if seqs[2] is not None:
                        # Those rows ran over whatever q holds there: select, not scale (NaN * 0).
                        empty_o = gl.convert_layout(empty, o_row_layout, assert_trivial=True)
                        out = gl.where(gl.expand_dims(empty_o, 1), 0.0, out)
                    out = out.to(dtype)
                    m_lse = m_i
                    if IS_FP8:
                        m_lse = m_i - P_SHIFT
                    lse = gl.where(empty, float("inf"), (m_lse + gl.log2(l_safe)) * LN2)
                    # seqlen_q is the LSE's row stride: (B, Hq, Sq) dense, (Hq, total_q) packed.
                    gl.store(lse_ptr + (q_batch * num_heads_q + h).to(gl.int64) * seqlen_q
                             + q_start + rows, lse, mask=rows < q_rows)

                    # O leaves by TMA, which clips the rows past the tensor's end: dense, that
                    # is the sequence's. Packed, a tile that crosses the sequence's end would
                    # write into the next one's rows, so it stores from registers, row-masked.
                    if seqs[0] is None or row0 + BLOCK_MW <= q_rows:
                        # Without a buffer of its own O goes through Q's (free once the last QK
                        # wgmma retired), which the producer refills once the store has read it.
                        if SEPARATE_O:
                            tma.store_wait(pendings=0)  # the previous tile's O has left the buffer
                        o_smem.reshape([BLOCK_MW, HEAD_DIM]).store(out)
                        fence_async_shared()
                        tma.async_copy_shared_to_global(o_desc, [q_batch, q_start + row0, h, 0],
                                                        o_smem)
                        if not SEPARATE_O:
                            tma.store_wait(pendings=0)
                            mbarrier.arrive(q_empty.index(WG))
                    else:
                        o_rows = q_start + row0 + gl.arange(0, BLOCK_MW, layout=o_row_layout)
                        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
                        # out is (total_q, Hq, D), contiguous.
                        ok = gl.expand_dims(o_rows < q_start + q_rows, 1)
                        if head_dim is None:
                            row_offs = (o_rows.to(gl.int64) * num_heads_q + h) * HEAD_DIM
                        else:
                            # A head dim under the tile's width: its padding stays unwritten.
                            row_offs = (o_rows.to(gl.int64) * num_heads_q + h) * head_dim
                            ok = ok & gl.expand_dims(cols < head_dim, 0)
                        offs = gl.expand_dims(row_offs, 1) + gl.expand_dims(cols, 0)
                        gl.store(o_ptr + offs, out, mask=ok)
                        if not SEPARATE_O:
                            mbarrier.arrive(q_empty.index(WG))
                    done += 1
        tma.store_wait(pendings=0)

    @gluon.jit(do_not_specialize=UNSPECIALIZED)
    def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, o_ptr, lse_ptr, cu_seqlens_q, cu_seqlens_k,
                    seqused_q, seqused_k, qk_scale, num_units, num_m_blocks, num_heads_q, seqlen_q,
                    seqlen_k, group_size, pair, descales, q_descale_sb, q_descale_sh,
                    k_descale_sb, k_descale_sh, v_descale_sb, v_descale_sh, window_left,
                    window_right, chunk, softcap, sinks, head_dim, page_table, page_table_stride,
                    CAUSAL: gl.constexpr, PAIRED: gl.constexpr, STAGES: gl.constexpr,
                    PINGPONG: gl.constexpr, SEPARATE_O: gl.constexpr, IS_FP8: gl.constexpr,
                    LATE_PV_WAIT: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr,
                    QK_USED: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        if SEPARATE_O:
            o_bufs = gl.allocate_shared_memory(o_desc.dtype, [2] + o_desc.block_type.shape,
                                               o_desc.layout)
        else:
            o_bufs = q_smem
        if PAGE_SIZE is None:
            k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape,
                                               k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape,
                                               v_desc.layout)
        else:
            # Paged descriptors copy a page (or BLOCK_N rows of a larger one) at a time: the
            # ring's tiles are BLOCK_N rows all the same, in the layout of a BLOCK_N-row box
            # (forward() gives the descriptors that layout).
            k_smem = gl.allocate_shared_memory(
                dtype, [STAGES, 1, BLOCK_N, 1, k_desc.block_type.shape[3]], k_desc.layout)
            v_smem = gl.allocate_shared_memory(
                dtype, [STAGES, 1, BLOCK_N, 1, v_desc.block_type.shape[3]], v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(2):
            mbarrier.init(q_ready.index(w), count=1)
            mbarrier.init(q_empty.index(w), count=1)
            mbarrier.init(turn.index(w), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            # Both consumer warpgroups must release a stage before it is refilled.
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        # Where the last key block can reach past a sequence's keys (_clear_tail): warpgroup 0
        # clears V's tail and signals the first barrier, warpgroup 1 waits on it and acknowledges
        # on the second, so the next clear cannot overtake its wait. Allocated last and always
        # (a tuple cannot hold None here); the dense kernels never touch them.
        tail_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        if cu_seqlens_k is not None or seqused_k is not None:
            mbarrier.init(tail_bars.index(0), count=1)
            mbarrier.init(tail_bars.index(1), count=1)
        bars = (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, tail_bars)
        shape = (num_units, num_m_blocks, num_heads_q, seqlen_q, seqlen_k, group_size, pair)

        # The argument tuples stay inline: a tuple bound to a name turns its constexprs into
        # tensors.
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, o_bufs, bars, o_desc, o_ptr, lse_ptr, qk_scale,
                         shape, (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                         (descales, (q_descale_sb, q_descale_sh, k_descale_sb, k_descale_sh,
                                     v_descale_sb, v_descale_sh)),
                         (window_left, window_right, chunk), softcap, sinks, head_dim, CAUSAL,
                         PAIRED, STAGES, PINGPONG, SEPARATE_O, IS_FP8, LATE_PV_WAIT, QK_USED, 0)),
            (_consumer, (q_smem, k_smem, v_smem, o_bufs, bars, o_desc, o_ptr, lse_ptr, qk_scale,
                         shape, (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                         (descales, (q_descale_sb, q_descale_sh, k_descale_sb, k_descale_sh,
                                     v_descale_sb, v_descale_sh)),
                         (window_left, window_right, chunk), softcap, sinks, head_dim, CAUSAL,
                         PAIRED, STAGES, PINGPONG, SEPARATE_O, IS_FP8, LATE_PV_WAIT, QK_USED, 1)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, shape,
                         (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k),
                         (window_left, window_right, chunk), page_table, page_table_stride,
                         CAUSAL, PAIRED, STAGES, IS_FP8, PAGE_SIZE)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _descriptor(x: torch.Tensor, rows: int, width: int):
    """Rank-4 TMA descriptor over (B, S, H, D), or over a packed (total, H, D) seen as
    (1, total, H, D), reading one (rows x width) tile of one head: a width past D reads zeros
    (TMA fills what lies outside the tensor's last dim) and writes nothing there."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    return _descriptor_of_block(x, [1, rows, 1, width])


def _descriptor_of_block(x: torch.Tensor, block: list):
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[x.dtype])
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block, layout)


def _paged_descriptor(cache: torch.Tensor, block_n: int, width: int):
    """TMA descriptor over a paged cache (num_pages, page_size, Hk, D), coordinates (page, row in
    the page, head, 0): one copy reads min(page_size, block_n) rows of one page, so a key block
    takes block_n / page_size copies of small pages, or a slice of a large one. Its layout is a
    block_n-row box's: the copies land in rows of the kernel's block_n-row ring tiles, which the
    wgmmas read in that layout (the same swizzle for any row count of 8 or more)."""
    rows = min(cache.shape[1], block_n)
    layout = gl.NVMMASharedLayout.get_default_for([1, block_n, 1, width], _GL_DTYPES[cache.dtype])
    return TensorDescriptor(cache, list(cache.shape), list(cache.stride()), [1, rows, 1, width],
                            layout)


# The copy is a byte transpose: torch's strided copy reads one byte per 2 KB row stride and took
# an estimated ~0.5 ms per call at 64 MB of V (fitted from the 15:53 run's fp8 timings at 4k and
# 16k, B*N fixed), a quarter of the 4k forward. Tiles of keys x head dims move whole rows instead.
_VT_BLOCK_K = 128
_VT_BLOCK_D = 64
# Same bits, integer type: the interpreter (CPU tests) has no fp8, and the move needs none.
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _values_keys_inner(v: torch.Tensor) -> torch.Tensor:
    """V (B, Sk, Hk, D) copied to (B, Hk, D, Sk rounded up to 32) with the keys contiguous (the
    fp8 PV wgmma reads V only K-major), keys reordered within each group of 32 the way
    `_p_operand` reorders P's columns, and the padding keys zero (P is 0 there, so V must be
    finite)."""
    batch, seqlen_k, heads_k, head_dim = v.shape
    padded = -(-seqlen_k // 32) * 32
    v_t = torch.empty((batch, heads_k, head_dim, padded), dtype=v.dtype, device=v.device)
    # (batch, KV head) on axis 0, whose limit is 2^31 - 1 (axes 1 and 2 stop at 65535)
    grid = (batch * heads_k, triton.cdiv(padded, _VT_BLOCK_K), triton.cdiv(head_dim, _VT_BLOCK_D))
    as_int = _AS_INT[v.element_size()]
    _values_keys_inner_kernel[grid](
        v.view(as_int), v_t.view(as_int), seqlen_k, padded, heads_k, head_dim, *v.stride(),
        BLOCK_K=_VT_BLOCK_K, BLOCK_D=_VT_BLOCK_D, num_warps=4)
    return v_t


if _GLUON_OK:
    @triton.jit(do_not_specialize=("seqlen_k", ))
    def _values_keys_inner_kernel(v, v_t, seqlen_k, padded, heads_k, head_dim, stride_b, stride_s,
                                  stride_h, stride_d, BLOCK_K: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
        """One (BLOCK_K keys, BLOCK_D dims) tile of one (batch, KV head): rows of V in, rows of
        V^T out. Output column a holds key sigma(a): within a group of 32, key bits
        (c4, c3, c2, c1, c0) = (a4, a1, a3, a2, a0)."""
        bh = tl.program_id(0)
        b = bh // heads_k
        h = bh % heads_k
        a = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        key = ((a & -32) | (a & 17) | ((a >> 2) & 1) << 1 | ((a >> 3) & 1) << 2
               | ((a >> 1) & 1) << 3)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        src = (v + b.to(tl.int64) * stride_b + h * stride_h
               + key[:, None].to(tl.int64) * stride_s + d[None, :] * stride_d)
        x = tl.load(src, mask=(key[:, None] < seqlen_k) & (d[None, :] < head_dim), other=0)
        dst = v_t + (bh.to(tl.int64) * head_dim + d[:, None]) * padded + a[None, :]
        tl.store(dst, tl.trans(x), mask=(d[:, None] < head_dim) & (a[None, :] < padded))




def _descale_args(a: AttnArgs) -> tuple:
    """((q, k, v descale pointers), their six (batch, head) strides); an absent descale is 1."""
    tensors, strides = fwd.descale_operands(a)
    return tuple(tensors), strides


def _tma_ok(x: torch.Tensor) -> bool:
    # TMA needs a 16-byte aligned base, 16-byte aligned nonzero strides and a unit inner stride.
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(s > 0 and s * x.element_size() % 16 == 0 for s in x.stride()[:-1]))


def _out_ok(a: AttnArgs) -> bool:
    # Full tiles leave through TMA (any 16-byte aligned strides: SDPA's (B, H, S, D) buffer seen
    # as (B, S, H, D) too); the packed layout's partial tiles store through a pointer that
    # assumes a contiguous out.
    out = a.out
    return out is not None and _tma_ok(out) and (
        (a.cu_seqlens_q is None and a.seqused_q is None) or out.is_contiguous())


def supports(a: AttnArgs) -> bool:
    """True when this kernel should compute the call: in scope (`in_scope`) and not one of the
    cases where the portable fwd.py kernel measured faster."""
    return in_scope(a) and not _portable_faster(a)


def _portable_faster(a: AttnArgs) -> bool:
    if a.page_table is not None:
        # fwd.py gathers paged keys row by row: the short causal case it won was dense.
        return False
    # H100, bf16, B·N = 32k, H·D = 2048 (docs/perf-notes.md, run 2): causal D = 64 at N = 1k ran
    # 237 TFLOP/s here against 286 for fwd.py (per-tile prologue/epilogue over 4.5 key blocks on
    # average); at N = 4k the two tied (381 vs 382), at 16k this kernel led (418 vs 410).
    seqlen_k = _seqlen_k(a)
    return a.window_right == 0 and a.q.shape[-1] == 64 and seqlen_k <= 1024


def in_scope(a: AttnArgs) -> bool:
    """True when the Gluon kernel can compute this call: sm_90, a triton version gluon_compat
    takes, fp16/bf16 q/k/v,
    each dense (B, S, H, D) or packed (total, H, D) with its cu_seqlens, seqused_q/k or not, or
    fp8 e4m3 (with or without descales) dense q/k/v only; head dims up to 256 (fp8: 64, 128,
    256; v's the same as q's and k's, or narrower where dv_refusal allows), GQA; any window,
    attention_chunk, softcap and sinks; nothing
    else (no indexed K/V, leftpad, qv, context parallelism or split). Paged K/V (fp16/bf16):
    pages of a power of two >= 16 tokens (paged_refusal).
    FLASH_ATTN_3_GLUON=0 turns it off (the portable kernel then runs), for A/B runs; =1 forces it
    on under a triton version not yet verified (gluon_compat.refusal says why not otherwise)."""
    q, k, v = a.q, a.k, a.v
    if not (_GLUON_OK and gluon_compat.refusal(q.device) is None):
        return False
    if q.dtype not in _GL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    extras = (a.qv, a.kv_batch_idx, a.leftpad_k)
    if any(x is not None for x in extras):
        return False
    if a.page_table is not None and paged_refusal(a) is not None:
        return False
    if a.sinks is not None and a.sinks.shape != (q.shape[-2], ):
        return False
    if a.is_fp8:
        # FLASH_ATTN_3_GLUON_FP8=0 sends fp8 to fwd.py (A/B runs): 1.2-1.4x slower on the H100
        # (docs/perf-notes.md, lead item 14).
        if os.environ.get("FLASH_ATTN_3_GLUON_FP8", "1") == "0":
            return False
        # V's keys-inner copy (_values_keys_inner) assumes dense (B, S, H, D) with every key used.
        if any(x is not None for x in (a.cu_seqlens_q, a.cu_seqlens_k, a.seqused_q,
                                       a.seqused_k)):
            return False
    elif any(x is not None for x in (a.q_descale, a.k_descale, a.v_descale)):
        return False
    if a.cp_world_size != 1 or a.num_splits > 1 or not a.softmax_scale > 0 or a.softcap < 0:
        return False
    if not gluon_layout.takes_layout(a, paged=a.page_table is not None):
        return False
    head_dim = q.shape[-1]
    if tile_width(head_dim) is None or k.shape[-1] != head_dim:
        return False
    if v.shape[-1] != head_dim and dv_refusal(a) is not None:
        return False
    # fp8's V copy (_values_keys_inner) and its descriptor take the instantiated widths only.
    if a.is_fp8 and head_dim not in CONFIGS:
        return False
    if q.numel() == 0 or k.numel() == 0 or q.shape[-2] % k.shape[-2] != 0:
        return False
    # fp8 V is read through its copy, which any layout can feed.
    return all(_tma_ok(x) for x in ((q, k) if a.is_fp8 else (q, k, v)))


DV_ENV = gluon_layout.DV_ENV
QK_SLICES_ENV = "FLASH_ATTN_3_GLUON_QK_SLICES"


def qk_used(head_dim: int, width: int, fp8: bool = False) -> int:
    """The QK wgmma's columns (_issue_sliced's USED): 0 for the whole tile, else head_dim where
    its excess over half the tile width is a power of two of at least 16 (one wgmma k-step): 96
    and 80 of 128, 192 and 160 of 256, 48 of 64. Taken by default since its GPU tests passed
    (H100, 2026-12-07 23:50 UTC); FLASH_ATTN_3_GLUON_QK_SLICES=0 reads the whole tile, the
    padding's zeros included."""
    extra = head_dim - width // 2
    if fp8 or head_dim == width or extra < 16 or extra & (extra - 1):
        return 0
    return 0 if os.environ.get(QK_SLICES_ENV, "").strip() == "0" else head_dim


def dv_refusal(a: AttnArgs):
    """Why this kernel does not take a call whose V's head dim differs from Q's and K's
    (DeepSeek V2 / V3's 192 / 128), or None. The kernel reads V and writes O at V's tile width
    (HEAD_DIM) and Q and K at theirs (HEAD_DIM_QK), no wider; where V's tiles are narrower, O
    needs buffers of its own (it cannot leave through Q's). FLASH_ATTN_3_GLUON_DV=0 sends these
    calls to the portable kernel (gluon_layout.narrow_v_hold)."""
    head_dim, head_dim_v = a.q.shape[-1], a.v.shape[-1]
    if head_dim_v == head_dim:
        return None
    held = gluon_layout.narrow_v_hold(a, "Gluon forward")
    if held:
        return held
    width, width_v = tile_width(head_dim), tile_width(head_dim_v)
    if a.is_fp8 or width_v is None or width_v > width:
        return (f"v's head dim {head_dim_v} against q's {head_dim}: only fp16/bf16 with V's tiles "
                "no wider than Q's (a narrower V)")
    block_n, stages, *_ = default_config(width, False)
    if not separate_o(width, block_n, stages, False, width_v):
        return f"head dims {head_dim} / {head_dim_v}: no shared memory for O's own buffers"
    return None


def named_refusal(a: AttnArgs):
    """The reason this kernel gives by name for not taking the call, or None: a paged layout it
    does not take, or a V narrower than Q / K while that is switched off (routes explains a refusal
    with it)."""
    return (paged_refusal(a) if a.page_table is not None else None) or dv_refusal(a)


def paged_refusal(a: AttnArgs):
    """Why this kernel does not take a paged call (page_table set), or None. A key block of
    BLOCK_N rows (64 or 128) must be whole pages or lie inside one, and a TMA copy's rows must
    fill whole 8-row swizzle atoms: pages of 16, 32, 64, ... tokens. Smaller or odd pages (1,
    3, 48, ...) and cache_leftpad / cache_batch_idx go to the portable kernels."""
    page_size = a.k.shape[1]
    if page_size < 16 or page_size & (page_size - 1):
        return f"page size {page_size}: the Gluon kernel takes pages of 16, 32, 64, ... tokens"
    if a.is_fp8:
        return "fp8 with paged K/V: the Gluon kernel's fp8 V copy is dense only"
    if a.leftpad_k is not None or a.kv_batch_idx is not None:
        return "cache_leftpad / cache_batch_idx with paged K/V"
    table = a.page_table
    if table.dim() != 2 or table.shape[0] != a.batch_size or table.stride(1) != 1:
        return "a page table that is not (batch_size, max_pages) with unit column stride"
    return None


def _seqlen_k(a: AttnArgs) -> int:
    """The longest key sequence the call may have: a paged cache's capacity, the varlen max, or
    the dense length."""
    if a.page_table is not None:
        return a.page_table.shape[1] * a.k.shape[1]
    return a.max_seqlen_k if a.cu_seqlens_k is not None else a.k.shape[1]


def mask_bounds(a: AttnArgs) -> tuple:
    """(window_left, window_right, attention_chunk) as the kernel takes them: None where
    unbounded. A window side reaching past every row's keys is unbounded (the official
    mha_fwd does the same with max_seqlen_k / max_seqlen_q), so that e.g. a 4096 window over
    4k tokens runs the plain causal kernel."""
    seqlen_q = a.max_seqlen_q if a.cu_seqlens_q is not None else a.q.shape[1]
    seqlen_k = _seqlen_k(a)
    left = a.window_left if 0 <= a.window_left < seqlen_k - 1 else None
    right = a.window_right if 0 <= a.window_right < seqlen_q - 1 else None
    return left, right, a.attention_chunk if a.attention_chunk > 0 else None


def tile_width(head_dim: int):
    """The instantiated head dim (CONFIGS) the tiles of a head dim take: the next one up, the
    padding read as zeros (96 -> 128, 192 -> 256); None past 256."""
    return next((width for width in sorted(CONFIGS) if width >= head_dim), None)


def default_config(head_dim: int, causal: bool, fp8: bool = False) -> tuple:
    if fp8:
        return FP8_CONFIGS[head_dim]
    return CAUSAL_CONFIGS.get(head_dim, CONFIGS[head_dim]) if causal else CONFIGS[head_dim]


def config_fields(config) -> tuple:
    """(BLOCK_N, STAGES, PINGPONG, PERSISTENT[, LATE_PV_WAIT]) -> all five; LATE_PV_WAIT is off
    where absent (every default config)."""
    block_n, stages, pingpong, persistent, *late = config
    return block_n, stages, pingpong, persistent, bool(late and late[0])


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def forward(a: AttnArgs, config=None):
    """(out like q in q's dtype (bf16 for fp8), lse fp32 (B, Hq, Sq) dense or (Hq, total_q)
    packed); config
    overrides default_config (the tuning bench uses it). Packed rows outside every sequence
    (past cu_seqlens_q[-1]) stay unwritten, as officially."""
    q, k, v = a.q, a.k, a.v
    heads_q, head_dim = q.shape[-2:]
    head_dim_v = v.shape[-1]
    width, width_v = tile_width(head_dim), tile_width(head_dim_v)
    heads_k = k.shape[-2]
    batch = a.batch_size
    window_left, window_right, chunk = mask_bounds(a)
    # The plain causal mask has code of its own (and causal work units: see _unit); any other
    # window or chunk takes the general bounds.
    causal = window_right == 0 and window_left is None and chunk is None
    if causal:
        window_right = None
    fp8 = a.is_fp8
    block_n, stages, pingpong, persistent, late_pv_wait = config_fields(
        config or default_config(width, causal or window_right is not None, fp8))
    out = a.out if _out_ok(a) else torch.empty((*q.shape[:-1], head_dim_v), dtype=a.out_dtype,
                                               device=q.device)
    if a.cu_seqlens_q is not None:
        # The grid covers the longest sequence; seqlen_q carries the LSE's row stride.
        max_seqlen_q, seqlen_q = a.max_seqlen_q, q.shape[0]
        lse = torch.empty((heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    else:
        max_seqlen_q = seqlen_q = q.shape[1]
        lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    if max_seqlen_q <= 0 or batch == 0:
        return out, lse
    # Packed keys take their lengths from cu_seqlens; a paged cache's capacity bounds seqused_k.
    seqlen_k = 0 if a.cu_seqlens_k is not None else _seqlen_k(a)
    num_m_blocks = triton.cdiv(max_seqlen_q, 2 * ROWS_PER_WARPGROUP)
    num_tiles = num_m_blocks * heads_q * batch
    # Causal pairs (see _unit) only where a persistent program walks more than one tile: with
    # fewer tiles than SMs they would halve the programs, and one program per unit leaves the
    # balancing to the hardware's block scheduler. Windows and chunks pair like causal.
    paired = causal or window_left is not None or window_right is not None or chunk is not None
    pair = int(paired and persistent and num_tiles > _num_sms(q.device.index))
    num_units = (num_m_blocks + pair) // (1 + pair) * heads_q * batch
    programs = min(num_units, _num_sms(q.device.index)) if persistent else num_units
    page_size = page_table_stride = None
    if a.page_table is not None:
        page_size, page_table_stride = k.shape[1], a.page_table.stride(0)
        if page_size % block_n and block_n % page_size:
            raise ValueError(f"config {config}: key blocks of {block_n} rows neither hold whole "
                             f"pages of {page_size} nor fit in one")
        k_desc = _paged_descriptor(k, block_n, width)
        v_desc = _paged_descriptor(v, block_n, width_v)
    else:
        k_desc = _descriptor(k, block_n, width)
        v_desc = None if fp8 else _descriptor(v, block_n, width_v)  # fp8 reads V's copy (below)
    own_o = separate_o(width, block_n, stages, fp8, width_v)
    if width_v != width and not own_o:
        raise ValueError(f"config {config} leaves no room for O's buffers (v's head dim "
                         f"{head_dim_v} against q's {head_dim})")
    descales, descale_strides = None, [None] * 6
    if fp8:
        v_desc = _descriptor_of_block(_values_keys_inner(v), [1, 1, head_dim, block_n])
        descales, descale_strides = _descale_args(a)
        if not separate_o(width, block_n, stages, fp8):
            raise ValueError(f"fp8 config {config} leaves no room for the bf16 O buffers")
    # The softcap's kernel argument is c * log2(e) (the scores stay in the log2 domain).
    softcap = a.softcap * LOG2E if a.softcap > 0 else None
    sinks = None if a.sinks is None else a.sinks.float().contiguous()
    _fwd_kernel[(programs, )](
        _descriptor(q, ROWS_PER_WARPGROUP, width), k_desc, v_desc,
        _descriptor(out, ROWS_PER_WARPGROUP, width_v), out, lse, a.cu_seqlens_q, a.cu_seqlens_k,
        a.seqused_q, a.seqused_k, a.softmax_scale * LOG2E, num_units, num_m_blocks, heads_q,
        seqlen_q, seqlen_k, heads_q // heads_k, pair, descales, *descale_strides, window_left,
        window_right, chunk, softcap, sinks, head_dim_v if head_dim_v != width_v else None,
        a.page_table, page_table_stride, causal, paired, stages, bool(pingpong),
        own_o, fp8, late_pv_wait, page_size, block_n, qk_used(head_dim, width, fp8),
        _CONSUMER_REGS, _PRODUCER_REGS, num_warps=4, maxnreg=_MAXNREG)
    return out, lse

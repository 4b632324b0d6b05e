"""Jitted helpers for the attention masks and the score cap, shared by the Triton kernels.

Positions follow spec section 4: query row i has the bottom-right aligned diagonal
d_i = i + total_k - seqlen_q; local key j is global key j * cp_world_size + cp_rank
(cp_world_size is 1 without context parallelism, then total_k = seqlen_k). Windows and chunks
compare global positions, and global keys at or past total_k are never allowed. Boolean constexpr
flags drop the code of features that are off.
"""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # No tanh in portable tl (libdevice is CUDA-only and absent in the interpreter); this form
    # saturates cleanly to +-1 when exp2 overflows or underflows.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def chunk_start(d, chunk):
    # Floor semantics for negative d (rows above the diagonal start), whatever sign '%' keeps.
    return d - ((d % chunk) + chunk) % chunk


@triton.jit
def local_key_bound(g, cp_world_size, cp_rank, IS_CP: tl.constexpr):
    """First local key j >= 0 whose global position j * W + rank is >= g."""
    if IS_CP:
        return tl.maximum(g - cp_rank + cp_world_size - 1, 0) // cp_world_size
    else:
        return tl.maximum(g, 0)


@triton.jit
def key_block_range(i_lo, i_hi, seqlen_k, total_k, diag, window_left, window_right, chunk,
                    cp_world_size, cp_rank, BLOCK_N: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
                    IS_CP: tl.constexpr):
    """Key blocks seen by query rows i_lo..i_hi (valid rows only, i_lo <= i_hi).

    Returns (blk_lo, full_lo, full_hi, blk_hi): blocks [blk_lo, blk_hi) hold every allowed key of
    some row; blocks [full_lo, full_hi) are allowed for every row and inside seqlen_k, so they need
    no mask. blk_lo <= full_lo <= full_hi <= blk_hi; an empty range has blk_lo == blk_hi.
    """
    d_lo = i_lo + diag
    d_hi = i_hi + diag
    # Union of the rows' allowed global ranges [g_lo, g_hi) and their intersection [gi_lo, gi_hi):
    # both ends of a row's range grow with its diagonal, so the first and last rows bound them.
    # 2**30 stands for "unbounded": no sequence is that long, and it leaves room for + W - 1.
    g_lo = d_lo * 0
    gi_lo = d_lo * 0
    g_hi = d_lo * 0 + 1073741824
    gi_hi = d_lo * 0 + 1073741824
    if HAS_LEFT:
        g_lo = d_lo - window_left
        gi_lo = d_hi - window_left
    if HAS_RIGHT:
        g_hi = d_hi + window_right + 1
        gi_hi = d_lo + window_right + 1
    if HAS_CHUNK:
        g_lo = tl.maximum(g_lo, chunk_start(d_lo, chunk))
        gi_lo = tl.maximum(gi_lo, chunk_start(d_hi, chunk))
        g_hi = tl.minimum(g_hi, chunk_start(d_hi, chunk) + chunk)
        gi_hi = tl.minimum(gi_hi, chunk_start(d_lo, chunk) + chunk)
    if IS_CP:
        g_hi = tl.minimum(g_hi, total_k)
        gi_hi = tl.minimum(gi_hi, total_k)
    n_lo = local_key_bound(g_lo, cp_world_size, cp_rank, IS_CP)
    n_hi = tl.minimum(local_key_bound(g_hi, cp_world_size, cp_rank, IS_CP), seqlen_k)
    ni_lo = local_key_bound(gi_lo, cp_world_size, cp_rank, IS_CP)
    ni_hi = tl.minimum(local_key_bound(gi_hi, cp_world_size, cp_rank, IS_CP), seqlen_k)
    blk_lo = n_lo // BLOCK_N
    blk_hi = tl.maximum((n_hi + BLOCK_N - 1) // BLOCK_N, blk_lo)
    full_lo = tl.minimum(tl.maximum((ni_lo + BLOCK_N - 1) // BLOCK_N, blk_lo), blk_hi)
    full_hi = tl.minimum(ni_hi // BLOCK_N, blk_hi)
    no_full = full_hi <= full_lo
    full_lo = tl.where(no_full, blk_hi, full_lo)
    full_hi = tl.where(no_full, blk_hi, full_hi)
    return blk_lo, full_lo, full_hi, blk_hi


@triton.jit
def allowed(rows, cols, seqlen_k, total_k, diag, window_left, window_right, chunk, cp_world_size,
            cp_rank, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
            IS_CP: tl.constexpr):
    """(M, N) mask of allowed (query row, local key) pairs; rows (M,) and cols (N,) int32."""
    ok = (cols < seqlen_k)[None, :]
    if IS_CP:
        ok = ok & (cols * cp_world_size + cp_rank < total_k)[None, :]
    if HAS_LEFT or HAS_RIGHT or HAS_CHUNK:
        d = (rows + diag)[:, None]
        if IS_CP:
            g = (cols * cp_world_size + cp_rank)[None, :]
        else:
            g = cols[None, :]
        if HAS_LEFT:
            ok = ok & (g >= d - window_left)
        if HAS_RIGHT:
            ok = ok & (g <= d + window_right)
        if HAS_CHUNK:
            start = chunk_start(d, chunk)
            ok = ok & (g >= start) & (g < start + chunk)
    return ok

"""Merge split-KV partial results: lse = logsumexp over splits, out = sum_s exp(lse_s - lse) out_s.

One program owns BLOCK_D columns of the head dim for BLOCK_M (batch, position, head) rows and
reads each split once, BLOCK_S splits at a time, with a running max (what was summed is rescaled
when the max grows). Partial outputs of splits whose LSE is -inf are never read, so an empty split
may leave its partial output unwritten.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import Launcher


# Row counts and split counts change between calls: not specialized, so no recompile per pattern.
# Nor are the strides, for the layout reason in the kernel.
@triton.jit(do_not_specialize=[
    "num_rows", "num_splits", "seqlen",
    "stride_ops", "stride_opb", "stride_opl", "stride_oph", "stride_lps", "stride_lpb", "stride_lpl",
    "stride_lph", "stride_ob", "stride_ol", "stride_oh", "stride_lb", "stride_ll", "stride_lh",
    "stride_sink",
])
def _combine_kernel(
    out_partial, lse_partial, out, lse, sinks,
    num_rows, num_splits, seqlen, num_heads, head_dim,
    stride_ops, stride_opb, stride_opl, stride_oph,
    stride_lps, stride_lpb, stride_lpl, stride_lph,
    stride_ob, stride_ol, stride_oh,
    stride_lb, stride_ll, stride_lh, stride_sink,
    EMPTY_LSE: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Every value is a (BLOCK_D, BLOCK_M) tile in one register layout, a row's LSE and running
    # sums repeated down its columns, so no value ever moves between threads: a reduction or a
    # layout conversion would go through shared memory, where the threads holding copies of one
    # value all write it to the same address (compute-sanitizer's racecheck reports each such
    # pair of writes). Triton gives each load and store a layout from its pointer: dims in order
    # of contiguity, ties to dim 0, one element per thread unless the alignment is known. Columns
    # as dim 0 put the partials (contiguous along it) and the LSE tiles (constant along it) in
    # the same order, and unspecialized strides leave every pointer's alignment unknown, so every
    # load and store takes the same layout.
    shape: tl.constexpr = (BLOCK_D, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    row_ok = rows < num_rows
    col_ok = cols < head_dim
    # int64 offsets: partials of long varlen batches exceed 2**31 elements.
    head = (rows % num_heads).to(tl.int64)
    pos = ((rows // num_heads) % seqlen).to(tl.int64)
    batch = (rows // num_heads // seqlen).to(tl.int64)
    lse_in = tl.broadcast_to(lse_partial + batch * stride_lpb + pos * stride_lpl + head * stride_lph, shape)
    out_in = out_partial + batch * stride_opb + pos * stride_opl + head * stride_oph + cols

    lse_max = tl.full(shape, float("-inf"), tl.float32)
    total = tl.zeros(shape, tl.float32)
    acc = tl.zeros(shape, tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        # Unrolled: the BLOCK_S splits' loads do not depend on each other, so they are in flight
        # together.
        for i in tl.static_range(BLOCK_S):
            split = s0 + i
            # The split bound folds into the row bound (triton 3.9's interpreter refuses a
            # `block & scalar` mask); the 32-bit split index is widened before it meets a stride.
            ok = rows < tl.where(split < num_splits, num_rows, 0)
            lse_s = tl.load(lse_in + tl.cast(split, tl.int64) * stride_lps, mask=ok, other=float("-inf"))
            # Empty splits (lse -inf) may have left their partial unwritten: never read it.
            part = tl.load(out_in + tl.cast(split, tl.int64) * stride_ops,
                           mask=ok & (lse_s != float("-inf")) & col_ok, other=0.0)
            # One exp a split, not two (each thread repeats a row's math for its column): of the
            # running max and this split's LSE, the larger weighs 1 and the other exp(its lead).
            # A row with no key yet measures against 0, since exp(-inf - -inf) would be NaN.
            grows = lse_s > lse_max
            lead = tl.where(grows, lse_max - lse_s,
                            lse_s - tl.where(lse_max == float("-inf"), 0.0, lse_max))
            rel = tl.exp(lead)
            total = tl.where(grows, total * rel + 1.0, total + rel)
            acc = tl.where(grows, acc * rel + part, acc + rel * part)
            lse_max = tl.maximum(lse_max, lse_s)
    empty = lse_max == float("-inf")
    if HAS_SINKS:
        # The sink logit joins the denominator only of rows that saw a key (spec: empty rows stay empty).
        sink = tl.load(tl.broadcast_to(sinks + head * stride_sink, shape), mask=row_ok & ~empty,
                       other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lse_max, sink)
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
        scale = tl.exp(lse_max - pivot)
        total = total * scale + tl.exp(sink - pivot)
        acc = acc * scale
        lse_max = new_max
    # An all-empty row has total 0 and acc 0: out 0 and lse EMPTY_LSE, never 0 / 0 or log(0).
    pivot = tl.where(empty, 0.0, lse_max)
    inv_total = tl.where(empty, 0.0, 1.0 / total)

    out_ptrs = out + batch * stride_ob + pos * stride_ol + head * stride_oh + cols
    tl.store(out_ptrs, (acc * inv_total).to(out.dtype.element_ty), mask=row_ok & col_ok)
    if tl.program_id(1) == 0:
        # Column 0's copy of each row's LSE is the one stored.
        final_lse = tl.where(empty, EMPTY_LSE, tl.log(total) + pivot)
        lse_ptrs = tl.broadcast_to(lse + batch * stride_lb + pos * stride_ll + head * stride_lh, shape)
        tl.store(lse_ptrs, final_lse, mask=row_ok & (cols == 0))


_launch = Launcher(_combine_kernel)  # constexprs: EMPTY_LSE, HAS_SINKS, BLOCK_S, BLOCK_M, BLOCK_D


def combine_launch(
    out_partial: torch.Tensor,
    lse_partial: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    empty_lse: float = float("-inf"),
    sinks: Optional[torch.Tensor] = None,
):
    """(launcher, grid, runtime args, constexprs, num_warps, num_stages) of the combine_into
    launch, or None when there is nothing to combine."""
    num_splits, batch, seqlen, num_heads, head_dim = out_partial.shape
    num_rows = batch * seqlen * num_heads
    if num_rows == 0 or head_dim == 0:
        return None
    # One element a thread (128-element tiles at 4 warps): each thread steps through every split
    # for its elements, so fewer elements a thread means shorter chains and more warps to hide
    # the memory latency. On an H100, 512-element tiles took 26 us at 64 splits of 32 rows and
    # 114 us at 133 splits of 1032 rows (8 and 260 programs), 2-2.7x the shared-memory kernel
    # this replaced; 128-element tiles (4x the programs) are not timed yet.
    # Plain int arithmetic: triton's cdiv / next_power_of_2 cost over a microsecond each on the
    # host, and this runs once per split decode step.
    block_s = min(8, 1 << (num_splits - 1).bit_length())
    block_d = min(32, 1 << (head_dim - 1).bit_length())
    block_m = 128 // block_d
    grid = (-(-num_rows // block_m), -(-head_dim // block_d))
    return _launch, grid, (
        out_partial, lse_partial, out, lse, sinks if sinks is not None else lse_partial,
        num_rows, num_splits, seqlen, num_heads, head_dim,
        *out_partial.stride()[:4], *lse_partial.stride(), *out.stride()[:3], *lse.stride(),
        0 if sinks is None else sinks.stride(0),
    ), (empty_lse, sinks is not None, block_s, block_m, block_d), 4, 3


def combine_into(
    out_partial: torch.Tensor,
    lse_partial: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    empty_lse: float = float("-inf"),
    sinks: Optional[torch.Tensor] = None,
) -> None:
    """Combine (S, B, L, H, D) fp32 partials into `out` (B, L, H, D) and `lse` (B, L, H) fp32 views.

    Any strides are accepted except a non-unit last-dim stride. Rows where every split is empty
    get out = 0 and lse = `empty_lse` (-inf for flash_attn_combine, +inf for the attention
    forward's no-key convention). `sinks` (H,) fp32 adds one sink logit per head to every row
    that saw at least one key.
    """
    launch = combine_launch(out_partial, lse_partial, out, lse, empty_lse, sinks)
    if launch is not None:
        launcher, *rest = launch
        launcher(*rest)


def combine(out_partial: torch.Tensor, lse_partial: torch.Tensor, out_dtype: torch.dtype):
    """flash_attn_combine: (S, B, L, H, D) fp32 + (S, B, L, H) fp32 -> out (B, L, H, D), lse (B, L, H).

    Splits with lse = -inf contribute nothing; a row whose splits are all -inf gets out = 0 and
    lse = -inf.
    """
    _, batch, seqlen, num_heads, head_dim = out_partial.shape
    out = torch.empty((batch, seqlen, num_heads, head_dim), dtype=out_dtype, device=out_partial.device)
    lse = torch.empty((batch, seqlen, num_heads), dtype=torch.float32, device=out_partial.device)
    combine_into(out_partial, lse_partial, out, lse)
    return out, lse


def unsplit_strides(out, lse, varlen_q: bool):
    """(split, batch, token, head) strides of the final out / lse, for kernels that write them
    directly (one split): varlen q folds batch into the token axis; lse is (B, H, S) or (H, T)."""
    if varlen_q:
        return (0, 0, out.stride(0), out.stride(1)), (0, 0, lse.stride(1), lse.stride(0))
    return (0, out.stride(0), out.stride(1), out.stride(2)), (0, lse.stride(0), lse.stride(2), lse.stride(1))

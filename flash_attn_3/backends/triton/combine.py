"""Merge split-KV partial results: lse = logsumexp over splits, out = sum_s exp(lse_s - lse) out_s.

One program owns BLOCK_M (batch, position, head) rows and one BLOCK_D slice of the head dim. It
reads the split LSEs three times (max, sum, weights; they are tiny) and each partial output once;
partial outputs of splits whose LSE is -inf are never read, so an empty split may leave its
partial output unwritten.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import Launcher


@triton.jit
def _combine_kernel(
    out_partial, lse_partial, out, lse, sinks,
    num_rows, num_splits, seqlen, num_heads, head_dim,
    stride_ops, stride_opb, stride_opl, stride_oph,
    stride_lps, stride_lpb, stride_lpl, stride_lph,
    stride_ob, stride_ol, stride_oh,
    stride_lb, stride_ll, stride_lh,
    EMPTY_LSE: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    splits = tl.arange(0, BLOCK_S)
    row_ok = rows < num_rows
    # int64 offsets: partials of long varlen batches exceed 2**31 elements.
    head = (rows % num_heads).to(tl.int64)
    pos = ((rows // num_heads) % seqlen).to(tl.int64)
    batch = (rows // num_heads // seqlen).to(tl.int64)
    # (BLOCK_S, BLOCK_M) LSE tiles: BLOCK_S splits per load, so a decode row's few dozen splits
    # cost a few memory round trips instead of one per split.
    lse_in = (lse_partial + (batch * stride_lpb + pos * stride_lpl + head * stride_lph)[None, :]
              + splits.to(tl.int64)[:, None] * stride_lps)

    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # The loop's split base is 32-bit: s0 * stride passes 2**31 on its own, so it is widened.
    for s0 in range(0, num_splits, BLOCK_S):
        ok = ((s0 + splits) < num_splits)[:, None] & row_ok[None, :]
        tile = tl.load(lse_in + tl.cast(s0, tl.int64) * stride_lps, mask=ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(tile, 0))
    empty = lse_max == float("-inf")
    if HAS_SINKS:
        # The sink logit joins the denominator only of rows that saw a key (spec: empty rows stay empty).
        sink = tl.load(sinks + head, mask=row_ok & ~empty, other=float("-inf")).to(tl.float32)
        lse_max = tl.maximum(lse_max, sink)
    # An all-empty row would give exp(-inf - -inf) = NaN; any finite pivot works since every term is 0.
    pivot = tl.where(empty, 0.0, lse_max)
    total = tl.zeros([BLOCK_M], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = ((s0 + splits) < num_splits)[:, None] & row_ok[None, :]
        tile = tl.load(lse_in + tl.cast(s0, tl.int64) * stride_lps, mask=ok, other=float("-inf"))
        total += tl.sum(tl.exp(tile - pivot[None, :]), 0)
    if HAS_SINKS:
        total += tl.exp(sink - pivot)
    inv_total = tl.where(empty, 0.0, 1.0 / total)

    col_ok = cols < head_dim
    out_in = (out_partial + (batch * stride_opb + pos * stride_opl + head * stride_oph)[None, :, None]
              + splits.to(tl.int64)[:, None, None] * stride_ops + cols[None, None, :])
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = ((s0 + splits) < num_splits)[:, None] & row_ok[None, :]
        lse_s = tl.load(lse_in + tl.cast(s0, tl.int64) * stride_lps, mask=ok, other=float("-inf"))
        weight = tl.exp(lse_s - pivot[None, :]) * inv_total[None, :]
        # Empty splits (lse -inf) may have left their partial unwritten: never read it.
        part_ok = (ok & (lse_s != float("-inf")))[:, :, None] & col_ok[None, None, :]
        part = tl.load(out_in + tl.cast(s0, tl.int64) * stride_ops, mask=part_ok, other=0.0)
        acc += tl.sum(weight[:, :, None] * part, 0)

    out_ptrs = out + (batch * stride_ob + pos * stride_ol + head * stride_oh)[:, None] + cols[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if tl.program_id(1) == 0:
        final_lse = tl.where(empty, EMPTY_LSE, tl.log(total) + pivot)
        tl.store(lse + batch * stride_lb + pos * stride_ll + head * stride_lh, final_lse, mask=row_ok)


_launch = Launcher(_combine_kernel)  # constexprs: EMPTY_LSE, HAS_SINKS, BLOCK_S, BLOCK_M, BLOCK_D


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
    num_splits, batch, seqlen, num_heads, head_dim = out_partial.shape
    num_rows = batch * seqlen * num_heads
    if num_rows == 0 or head_dim == 0:
        return
    # An 8K-element (split, row, column) tile per load: 64 fp32 registers a thread at 4 warps.
    # Plain int arithmetic: triton's cdiv / next_power_of_2 cost over a microsecond each on the
    # host, and this runs once per split decode step.
    block_s = min(16, 1 << (num_splits - 1).bit_length())
    block_d = min(32, 1 << (head_dim - 1).bit_length())
    block_m = 8192 // (block_s * block_d)
    grid = (-(-num_rows // block_m), -(-head_dim // block_d))
    _launch(grid, (
        out_partial, lse_partial, out, lse, sinks if sinks is not None else lse_partial,
        num_rows, num_splits, seqlen, num_heads, head_dim,
        *out_partial.stride()[:4], *lse_partial.stride(), *out.stride()[:3], *lse.stride(),
    ), (empty_lse, sinks is not None, block_s, block_m, block_d), 4, 3)


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

"""Attention between one rank's queries and one block of keys, expressed as calls of the public
kernels (bottom-right aligned masks, spec section 4).

A block pair rarely fits the kernels' mask alignment as it stands: the queries and keys sit at
different global offsets. In global positions every mask here is a band, lo <= j - i <= hi
(causal: hi = 0; window (left, right): lo = -left, hi = right; None = unbounded). band_block trims
the block to the rows and keys that the band touches; on that rectangle the band is always a
bottom-right aligned window with non-negative sides (proof in band_block), or no mask at all.
Blocks that the band misses are skipped, which is what makes a short sliding window cost only a
neighbour exchange.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .. import interface
from .. import lowlevel
from .layout import shard_pieces

INF = math.inf


class Call(NamedTuple):
    """Rows [q_start, q_start + q_len) of a query shard against keys [k_start, k_start + k_len)
    of a key shard (both local to one sequence), under the bottom-right window (left, right)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    left: int
    right: int


@dataclass(frozen=True)
class Options:
    softmax_scale: float
    softcap: float
    deterministic: bool


def band_limits(causal: bool, window_size: Sequence[int]) -> tuple[Optional[int], Optional[int]]:
    """(lo, hi) of the band lo <= j - i <= hi in global positions; None is unbounded."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return (None if left < 0 else -left), (None if right < 0 else right)


def band_block(q0: int, m: int, k0: int, n: int, lo: Optional[int], hi: Optional[int]):
    """Rows [q0, q0 + m) against keys [k0, k0 + n) of one sequence under lo <= j - i <= hi.

    Returns None when no (row, key) pair is allowed, else (row offset, rows, key offset, keys,
    left, right): the smallest rectangle holding every allowed pair, and the bottom-right window
    that reproduces the band on it ((-1, -1) when the whole rectangle is allowed).

    Why the window is never negative: with (i1, j1) the last row and key of the rectangle, the
    kernels' diagonal is j - i = j1 - i1, so left = (j1 - i1) - lo and right = hi - (j1 - i1).
    i1 = min(last row, last key - lo) and j1 = min(last key, last row + hi), and each of the cases
    puts j1 - i1 between lo and hi (the fourth case, both minima taking their second term, would
    need hi < lo).
    """
    i_lo = q0 if hi is None else max(q0, k0 - hi)
    i_hi = q0 + m - 1 if lo is None else min(q0 + m - 1, k0 + n - 1 - lo)
    if m <= 0 or n <= 0 or i_lo > i_hi:
        return None
    j_lo = k0 if lo is None else max(k0, i_lo + lo)
    j_hi = k0 + n - 1 if hi is None else min(k0 + n - 1, i_hi + hi)
    if j_lo > j_hi:
        return None
    diagonal = j_hi - i_hi
    left = -1 if lo is None or j_lo - i_hi >= lo else diagonal - lo
    right = -1 if hi is None or j_hi - i_lo <= hi else hi - diagonal
    return i_lo - q0, i_hi - i_lo + 1, j_lo - k0, j_hi - j_lo + 1, left, right


def block_calls(q_pieces, k_pieces, lo, hi, same_shard: bool) -> tuple[Call, ...]:
    """The calls between a query shard and a key shard of one sequence, given as pieces
    (local_start, global_start, length)."""
    if same_shard and lo is None and hi in (None, 0):
        # A shard against itself: global order is local order, and a causal or full mask depends
        # on order alone, so one call covers both zigzag chunks.
        n = sum(p[2] for p in q_pieces)
        return (Call(0, n, 0, n, -1, -1 if hi is None else 0),) if n else ()
    calls = []
    for q_local, q_global, q_len in q_pieces:
        for k_local, k_global, k_len in k_pieces:
            found = band_block(q_global, q_len, k_global, k_len, lo, hi)
            if found is not None:
                dq, rows, dk, keys, left, right = found
                calls.append(Call(q_local + dq, rows, k_local + dk, keys, left, right))
    return tuple(_merge_full(calls))


def _merge_full(calls: list[Call]) -> list[Call]:
    """Unmasked calls sharing their rows and with adjacent keys (or the reverse) become one."""
    merged = True
    while merged:
        merged = False
        for a in range(len(calls)):
            for b in range(len(calls)):
                x, y = calls[a], calls[b]
                if a == b or (x.left, x.right, y.left, y.right) != (-1, -1, -1, -1):
                    continue
                if (x.q_start, x.q_len) == (y.q_start, y.q_len) and x.k_start + x.k_len == y.k_start:
                    joined = Call(x.q_start, x.q_len, x.k_start, x.k_len + y.k_len, -1, -1)
                elif (x.k_start, x.k_len) == (y.k_start, y.k_len) and x.q_start + x.q_len == y.q_start:
                    joined = Call(x.q_start, x.q_len + y.q_len, x.k_start, x.k_len, -1, -1)
                else:
                    continue
                calls = [c for i, c in enumerate(calls) if i not in (a, b)] + [joined]
                merged = True
                break
            if merged:
                break
    return sorted(calls)


@functools.lru_cache(maxsize=4096)
def shard_calls(seqlen: int, world_size: int, q_rank: int, k_rank: int, layout: str, lo, hi) -> tuple[Call, ...]:
    """Calls between rank q_rank's queries and rank k_rank's keys of one sequence."""
    return block_calls(shard_pieces(seqlen, world_size, q_rank, layout),
                       shard_pieces(seqlen, world_size, k_rank, layout), lo, hi, q_rank == k_rank)


@functools.lru_cache(maxsize=4096)
def gathered_calls(seqlen: int, world_size: int, rank: int, layout: str, lo, hi) -> tuple[Call, ...]:
    """Calls between rank's queries and the whole sequence's keys in global order."""
    return block_calls(shard_pieces(seqlen, world_size, rank, layout), [(0, 0, seqlen)], lo, hi, False)


# ---------------------------------------------------------------------------------------------
# Row selections and launches


class Rows:
    """Token rows of a tensor, along dim (the sequence dim of a dense batch, 0 when packed): a
    contiguous range when it can be (a view, no copy), else an index."""

    def __init__(self, sel: Union[slice, torch.Tensor], dim: int):
        self.sel, self.dim = sel, dim

    def take(self, x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
        dim = self.dim if dim is None else dim
        if isinstance(self.sel, slice):
            return x.narrow(dim, self.sel.start, self.sel.stop - self.sel.start)
        return x.index_select(dim, self.sel)

    def put(self, x: torch.Tensor, value: torch.Tensor) -> None:
        if isinstance(self.sel, slice):
            x.narrow(self.dim, self.sel.start, self.sel.stop - self.sel.start).copy_(value)
        else:
            x.index_copy_(self.dim, self.sel, value.to(x.dtype))

    def add(self, x: torch.Tensor, value: torch.Tensor) -> None:
        # No index_add_: its CUDA kernel adds with atomics; the rows here are distinct, and a
        # gather-add-scatter keeps the result bitwise the same run after run.
        if isinstance(self.sel, slice):
            x.narrow(self.dim, self.sel.start, self.sel.stop - self.sel.start).add_(value)
        else:
            x.index_copy_(self.dim, self.sel, x.index_select(self.dim, self.sel) + value)

    def covers(self, length: int) -> bool:
        return isinstance(self.sel, slice) and self.sel.start == 0 and self.sel.stop == length


def _rows(ranges: Sequence[tuple[int, int]], dim: int, device) -> Rows:
    """Rows of the concatenated ranges (start, length), in order."""
    ranges = [(s, n) for s, n in ranges if n > 0]
    if all(ranges[i][0] == ranges[i - 1][0] + ranges[i - 1][1] for i in range(1, len(ranges))):
        start = ranges[0][0] if ranges else 0
        return Rows(slice(start, start + sum(n for _, n in ranges)), dim)
    starts = torch.tensor([s for s, _ in ranges], dtype=torch.long)
    lengths = torch.tensor([n for _, n in ranges], dtype=torch.long)
    firsts = torch.cumsum(lengths, 0) - lengths
    index = torch.arange(int(lengths.sum())) + torch.repeat_interleave(starts - firsts, lengths)
    return Rows(index.to(device), dim)


class Launch:
    """One kernel call: query rows against key rows with one window, for a dense batch (the same
    rows of every batch row) or for packed sequences (cu_seqlens over the gathered rows)."""

    def __init__(self, q: Rows, k: Rows, window: tuple[int, int], varlen=None):
        self.q, self.k, self.window = q, k, window
        # (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) when packed
        self.varlen = varlen

    def attend(self, q, k, v, opts: Options):
        """out (rows' shape, q dtype) and lse as (..., rows, num_heads) fp32, -inf on empty rows
        (the combine convention; the kernels' own is +inf)."""
        qs, ks, vs = self.q.take(q), self.k.take(k), self.k.take(v)
        kw = dict(softmax_scale=opts.softmax_scale, causal=False, window_size=self.window,
                  softcap=opts.softcap, return_softmax_lse=True)
        if self.varlen is not None:
            out, lse = interface.flash_attn_varlen_func(qs, ks, vs, *self.varlen, **kw)
            lse = lse.t()
        else:
            out, lse = interface.flash_attn_func(qs, ks, vs, **kw)
            lse = lse.transpose(1, 2)
        return out, torch.where(lse == INF, -INF, lse)

    def backward(self, dout, q, k, v, out, lse, opts: Options, dq_acc, dk_acc, dv_acc) -> None:
        """Adds this call's share of dq, dk, dv (given the merged out and lse of the queries,
        which is what makes the block gradients exact) to the fp32 accumulators."""
        qs, ks, vs = self.q.take(q), self.k.take(k), self.k.take(v)
        cu_q, cu_k, max_q, max_k = self.varlen if self.varlen is not None else (None, None, None, None)
        dq, dk, dv = lowlevel.backward(
            self.q.take(dout), qs, ks, vs, self.q.take(out), self.q.take(lse, self.q.dim + 1).contiguous(),
            cu_q, cu_k, None, None, max_q, max_k, None, None, None, opts.softmax_scale, False,
            self.window[0], self.window[1], opts.softcap, opts.deterministic,
        )
        self.q.add(dq_acc, dq)
        self.k.add(dk_acc, dk)
        self.k.add(dv_acc, dv)


def merge(acc_out: torch.Tensor, acc_lse: torch.Tensor, rows: Rows, out: torch.Tensor, lse: torch.Tensor,
          fresh: bool) -> None:
    """Fold a partial result into the fp32 accumulators by LSE (flash_attn_combine)."""
    if fresh:
        rows.put(acc_out, out.float())
        rows.put(acc_lse, lse)
        return
    merged_out, merged_lse = interface.flash_attn_combine(
        torch.stack([rows.take(acc_out), out.float()]), torch.stack([rows.take(acc_lse), lse]))
    rows.put(acc_out, merged_out)
    rows.put(acc_lse, merged_lse)


def dense_launches(calls: Sequence[Call]) -> list[Launch]:
    return [Launch(Rows(slice(c.q_start, c.q_start + c.q_len), 1), Rows(slice(c.k_start, c.k_start + c.k_len), 1),
                   (c.left, c.right)) for c in calls]


def varlen_launches(per_sequence: Sequence[Sequence[Call]], q_offsets: Sequence[int], k_offsets: Sequence[int],
                    device) -> list[Launch]:
    """Launches covering every sequence's calls: calls with one window share a launch, at most one
    call per sequence each (so a launch never holds a query row twice)."""
    groups: dict[tuple, list[tuple[int, Call]]] = {}
    for b, calls in enumerate(per_sequence):
        seen: Counter = Counter()
        for c in calls:
            key = (c.left, c.right)
            groups.setdefault((key, seen[key]), []).append((b, c))
            seen[key] += 1
    launches = []
    for (window, _), members in groups.items():
        q_ranges = [(q_offsets[b] + c.q_start, c.q_len) for b, c in members]
        k_ranges = [(k_offsets[b] + c.k_start, c.k_len) for b, c in members]
        cu_q = torch.tensor([0] + [n for _, n in q_ranges], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + [n for _, n in k_ranges], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        varlen = (cu_q.to(device), cu_k.to(device), max(n for _, n in q_ranges), max(n for _, n in k_ranges))
        launches.append(Launch(_rows(q_ranges, 0, device), _rows(k_ranges, 0, device), window, varlen))
    return launches


@functools.lru_cache(maxsize=16)
def cached(builder, *key):
    """Plans depend only on lengths, ranks and masks: build each once per distinct call. A model's
    layers share one; packed plans hold index tensors on the device, so only a few are kept."""
    return builder(*key)


class Attention(torch.autograd.Function):
    """(out, lse) of one context-parallel strategy, differentiable: `forward(q, k, v, plan, opts,
    group)` and `backward(dout, q, k, v, out, lse, plan, opts, group)` are the strategy's own."""

    @staticmethod
    def forward(ctx, q, k, v, plan, opts, group, forward, backward):
        out, lse = forward(q, k, v, plan, opts, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.opts, ctx.group, ctx.strategy_backward = plan, opts, group, backward
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        grads = ctx.strategy_backward(dout, *ctx.saved_tensors, ctx.plan, ctx.opts, ctx.group)
        return (*grads, None, None, None, None, None)


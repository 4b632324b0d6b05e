"""Ring attention: each rank keeps its queries, and key/value blocks travel between the ranks.

Every block a rank needs is fetched along the shorter way round the ring: blocks travel in both
directions at once, one hop per step, while the block in hand is attended (batch_isend_irecv
overlapped with the kernels). Blocks that the mask misses for every rank at that distance are never
sent, so a sliding window shorter than a shard costs one neighbour exchange. Partial outputs merge
by LSE (flash_attn_combine) in fp32.

The backward sends the key/value blocks round again; the dK/dV share computed for another rank's
block goes straight back to that rank, which adds the shares in a fixed order (deterministic when
asked: the block backward is, and so is every sum).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._blocks import Attention, Options, band_limits, cached, dense_launches, merge, shard_calls, varlen_launches
from ._checks import validate
from ._compile import eager_under_compile
from ._comm import Exchange, resolve_group

__all__ = ["ring_flash_attn_func", "ring_flash_attn_varlen_func"]


class Schedule:
    """When each block moves and who attends it, for one rank: at step t the forward-travelling
    buffer holds rank (r - t)'s keys, the backward-travelling one rank (r + t)'s."""

    def __init__(self, world_size: int, rank: int, needs):
        self.world_size, self.rank = world_size, rank
        self.fwd_steps = self.bwd_steps = 0
        self.computes: dict[int, list[tuple[str, int]]] = {}  # step -> (direction, source) this rank attends
        self.receives: dict[int, list[tuple[str, int]]] = {}  # step -> (direction, rank attending our block)
        for r in range(world_size):
            for s in range(world_size):
                if r == s or not needs(r, s):
                    continue
                d = (r - s) % world_size
                direction, step = ("f", d) if d <= world_size - d else ("b", world_size - d)
                if direction == "f":
                    self.fwd_steps = max(self.fwd_steps, step)
                else:
                    self.bwd_steps = max(self.bwd_steps, step)
                if r == rank:
                    self.computes.setdefault(step, []).append((direction, s))
                if s == rank:
                    self.receives.setdefault(step, []).append((direction, r))
        # One canonical order ('f' before 'b') on every rank keeps messages to one peer matched.
        for table in (self.computes, self.receives):
            for step in table:
                table[step].sort(key=lambda x: x[0] == "b")
        self.steps = max(self.fwd_steps, self.bwd_steps)
        self.sources = [rank] + [s for t in sorted(self.computes) for _, s in self.computes[t]]

    def exchange(self, group, step: Optional[int], fwd, bwd, grads_out=(), grads_step: Optional[int] = None,
                 grad_numel: int = 0):
        """Start moving the key/value buffers into place for `step` (None: no move) and the dK/dV
        shares of `grads_step`. Returns (exchange, new fwd buffer, new bwd buffer, [received shares])."""
        w, r = self.world_size, self.rank
        sends, recvs = [], []
        new_fwd = new_bwd = None
        if step is not None and step <= self.fwd_steps:
            new_fwd = torch.empty_like(fwd)
            sends.append((fwd, (r + 1) % w))
            recvs.append((new_fwd, (r - 1) % w))
        if step is not None and step <= self.bwd_steps:
            new_bwd = torch.empty_like(bwd)
            sends.append((bwd, (r - 1) % w))
            recvs.append((new_bwd, (r + 1) % w))
        sends += [(share, src) for (_, src), share in zip(self.computes.get(grads_step, ()), grads_out)]
        received = []
        device = (fwd if fwd is not None else bwd).device  # one may be done travelling already
        for _, peer in self.receives.get(grads_step, ()):
            buffer = torch.empty(grad_numel, dtype=torch.float32, device=device)
            received.append(buffer)
            recvs.append((buffer, peer))
        return Exchange(group, sends, recvs), new_fwd, new_bwd, received


class RingPlan:
    def __init__(self, schedule: Schedule, launches: dict):
        self.schedule, self.launches = schedule, launches


def _dense_plan(seqlen_local: int, world_size: int, rank: int, layout: str, lo, hi) -> RingPlan:
    seqlen = seqlen_local * world_size

    def calls(r, s):
        return shard_calls(seqlen, world_size, r, s, layout, lo, hi)

    schedule = Schedule(world_size, rank, lambda r, s: bool(calls(r, s)))
    return RingPlan(schedule, {s: dense_launches(calls(rank, s)) for s in schedule.sources})


def _varlen_plan(cu: tuple, world_size: int, rank: int, layout: str, lo, hi, device) -> RingPlan:
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    shortest = min((n for n in lengths if n > 0), default=0)

    # A pair of ranks has work for some sequence iff it has for the shortest one: shorter chunks put
    # more of them under a window of fixed width (and causal / full masks do not depend on length).
    def needs(r, s):
        return shortest > 0 and bool(shard_calls(shortest, world_size, r, s, layout, lo, hi))

    schedule = Schedule(world_size, rank, needs)
    offsets = [a // world_size for a in cu[:-1]]
    launches = {
        s: varlen_launches([shard_calls(n, world_size, rank, s, layout, lo, hi) for n in lengths],
                           offsets, offsets, device)
        for s in schedule.sources
    }
    return RingPlan(schedule, launches)


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V in one flat buffer: one message per hop instead of two."""
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buffer: torch.Tensor, k_shape, v_shape):
    n = k_shape.numel()
    return buffer[:n].view(k_shape), buffer[n:].view(v_shape)


def ring_forward(q, k, v, plan: RingPlan, opts: Options, group):
    schedule = plan.schedule
    acc_out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
    acc_lse = torch.full(q.shape[:-1], -torch.inf, dtype=torch.float32, device=q.device)
    token_dim = q.dim() - 3
    first = [True]

    def attend(source: int, kv: torch.Tensor) -> None:
        kb, vb = _unpack(kv, k.shape, v.shape)
        for launch in plan.launches[source]:
            out, lse = launch.attend(q, kb, vb, opts)
            merge(acc_out, acc_lse, launch.q, out, lse, fresh=first[0] and launch.q.covers(q.shape[token_dim]))
            first[0] = False

    own = _pack(k, v)
    pending = schedule.exchange(group, 1, own, own)
    attend(schedule.rank, own)
    for step in range(1, schedule.steps + 1):
        exchange, fwd, bwd, _ = pending
        exchange.wait()
        pending = schedule.exchange(group, step + 1 if step < schedule.steps else None, fwd, bwd)
        for direction, source in schedule.computes.get(step, ()):
            attend(source, fwd if direction == "f" else bwd)
    out = acc_out.to(q.dtype)
    lse = torch.where(acc_lse == -torch.inf, torch.inf, acc_lse).movedim(-1, token_dim).contiguous()
    return out, lse


def ring_backward(dout, q, k, v, out, lse, plan: RingPlan, opts: Options, group):
    schedule = plan.schedule
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    dout = dout.contiguous()
    grad_numel = k.numel() + v.numel()

    def shares(source: int, kv: torch.Tensor) -> torch.Tensor:
        kb, vb = _unpack(kv, k.shape, v.shape)
        dk_block = torch.zeros_like(dk)
        dv_block = torch.zeros_like(dv)
        for launch in plan.launches[source]:
            launch.backward(dout, q, kb, vb, out, lse, opts, dq, dk_block, dv_block)
        return _pack(dk_block, dv_block)

    def add(received) -> None:
        for share in received:
            dk_share, dv_share = _unpack(share, k.shape, v.shape)
            dk.add_(dk_share)
            dv.add_(dv_share)

    own = _pack(k, v)
    pending = schedule.exchange(group, 1, own, own)
    add([shares(schedule.rank, own)])
    outgoing = []
    for step in range(1, schedule.steps + 1):
        exchange, fwd, bwd, received = pending
        exchange.wait()
        add(received)
        # The shares of the previous step leave with this step's key/value move.
        pending = schedule.exchange(group, step + 1 if step < schedule.steps else None, fwd, bwd,
                                    outgoing, step - 1, grad_numel)
        outgoing = [shares(source, fwd if direction == "f" else bwd)
                    for direction, source in schedule.computes.get(step, ())]
    exchange, _, _, received = pending
    exchange.wait()
    add(received)
    if schedule.steps:
        exchange, _, _, received = schedule.exchange(group, None, own, own, outgoing, schedule.steps, grad_numel)
        exchange.wait()
        add(received)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _options(q, softmax_scale, softcap, deterministic) -> Options:
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return Options(scale, float(softcap), bool(deterministic))


@eager_under_compile
def ring_flash_attn_func(q, k, v, group=None, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                         softcap=0.0, layout="zigzag", deterministic=False, return_softmax_lse=False,
                         validate_ranks=True):
    """Ring attention over a sequence sharded along the ranks of ``group``.

    q: (batch_size, seqlen_local, num_heads, head_dim); k: (batch_size, seqlen_local, num_heads_kv,
    head_dim); v: (batch_size, seqlen_local, num_heads_kv, head_dim_v): this rank's share of the
    same tokens (self-attention), in ``layout`` ("zigzag" or "contiguous", see layout.py), fp16 or
    bf16. group: a ProcessGroup, a 1-D DeviceMesh or None (the default group). The mask is the one
    of flash_attn_func over the whole sequence of length seqlen_local * world_size: causal,
    window_size (left, right) in global positions, softcap. deterministic makes the backward bitwise
    reproducible. validate_ranks: check across ranks (one small all_gather) that the shards belong
    together before any transfer; turn off only for shapes already known to be good.
    Returns out (batch_size, seqlen_local, num_heads, head_dim_v), and softmax_lse (batch_size,
    num_heads, seqlen_local) fp32 too with return_softmax_lse. Differentiable in q, k, v; every rank
    must run the backward.
    """
    group, world_size, rank = resolve_group(group)
    validate("ring_flash_attn_func", group, world_size, q, k, v, layout=layout, causal=causal,
             window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
             deterministic=deterministic, strategy="ring", enabled=validate_ranks)
    lo, hi = band_limits(causal, window_size)
    plan = cached(_dense_plan, q.shape[1], world_size, rank, layout, lo, hi)
    out, lse = Attention.apply(q, k, v, plan, _options(q, softmax_scale, softcap, deterministic), group,
                               ring_forward, ring_backward)
    return (out, lse) if return_softmax_lse else out


@eager_under_compile
def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen=None, group=None, *, softmax_scale=None,
                                causal=False, window_size=(-1, -1), softcap=0.0, layout="zigzag",
                                deterministic=False, return_softmax_lse=False, validate_ranks=True):
    """Ring attention over packed sequences, each sharded along the ranks of ``group``.

    cu_seqlens: int32 (batch_size + 1,), the GLOBAL offsets, the same on every rank; every length
    a multiple of 2 * world_size (zigzag) or world_size (contiguous). q: (total // world_size,
    num_heads, head_dim), k / v: (total // world_size, num_heads_kv, head_dim / head_dim_v): this
    rank's share of every sequence, packed in sequence order (layout.shard_varlen). max_seqlen is
    accepted for symmetry with flash_attn_varlen_func and not needed. Other arguments as
    ring_flash_attn_func. Returns out (total // world_size, num_heads, head_dim_v) [, softmax_lse
    (num_heads, total // world_size) fp32].
    """
    group, world_size, rank = resolve_group(group)
    cu = validate("ring_flash_attn_varlen_func", group, world_size, q, k, v, layout=layout, causal=causal,
                  window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                  deterministic=deterministic, strategy="ring", cu_seqlens=cu_seqlens, varlen=True,
                  enabled=validate_ranks)
    lo, hi = band_limits(causal, window_size)
    plan = cached(_varlen_plan, tuple(cu), world_size, rank, layout, lo, hi, q.device)
    out, lse = Attention.apply(q, k, v, plan, _options(q, softmax_scale, softcap, deterministic), group,
                               ring_forward, ring_backward)
    return (out, lse) if return_softmax_lse else out

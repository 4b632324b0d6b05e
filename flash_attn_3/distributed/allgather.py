"""All-gather attention (the "llama3" scheme): gather the keys and values of the whole sequence
once, then attend locally.

One all_gather moves (world_size - 1) shards of K/V to every rank, with nothing to overlap it with,
and the gathered K/V costs memory for the whole sequence; in exchange there is a single kernel call
per chunk of queries. It wins for short sequences and few KV heads (GQA), where ring steps are too
short to hide their transfers. The backward gathers K/V again (memory over a second all_gather)
and returns each rank's dK/dV with one reduce_scatter in fp32.
"""

from __future__ import annotations

import torch

from ._blocks import Attention, Options, band_limits, cached, dense_launches, gathered_calls, varlen_launches
from ._checks import validate
from ._compile import eager_under_compile
from ._comm import all_gather, reduce_scatter, resolve_group
from .layout import position_ids, varlen_shard_index
from .ring import _options, _pack, _unpack

__all__ = ["allgather_flash_attn_func", "allgather_flash_attn_varlen_func"]


class GatherPlan:
    """The calls of this rank's queries against the whole sequence, and where each row of the
    rank-major gathered buffer goes in global order (None: it is already in order)."""

    def __init__(self, launches, order, world_size: int, token_dim: int):
        self.launches, self.world_size, self.token_dim = launches, world_size, token_dim
        self.order = order  # global row of each rank-major row
        self.to_global = None if order is None else torch.argsort(order)


def _dense_plan(seqlen_local: int, world_size: int, rank: int, layout: str, lo, hi, device) -> GatherPlan:
    seqlen = seqlen_local * world_size
    launches = dense_launches(gathered_calls(seqlen, world_size, rank, layout, lo, hi))
    order = None
    if layout != "contiguous":
        order = torch.cat([position_ids(seqlen, world_size, r, layout=layout, device=device) for r in range(world_size)])
    return GatherPlan(launches, order, world_size, 1)


def _varlen_plan(cu: tuple, world_size: int, rank: int, layout: str, lo, hi, device) -> GatherPlan:
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    calls = [gathered_calls(n, world_size, rank, layout, lo, hi) for n in lengths]
    launches = varlen_launches(calls, [a // world_size for a in cu[:-1]], list(cu[:-1]), device)
    order = torch.cat([varlen_shard_index(cu, world_size, r, layout=layout, device=device) for r in range(world_size)])
    return GatherPlan(launches, order, world_size, 0)


def _to_global(shards: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """(world_size, *local shape) -> the whole sequence in global order."""
    if plan.token_dim == 1:  # (W, B, N, ...) -> (B, W * N, ...)
        rank_major = shards.transpose(0, 1).reshape(shards.shape[1], -1, *shards.shape[3:])
    else:
        rank_major = shards.reshape(-1, *shards.shape[2:])
    return rank_major if plan.to_global is None else rank_major.index_select(plan.token_dim, plan.to_global)


def _to_shards(full: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """Inverse of _to_global."""
    w = plan.world_size
    rank_major = full if plan.order is None else full.index_select(plan.token_dim, plan.order)
    if plan.token_dim == 1:
        return rank_major.reshape(full.shape[0], w, -1, *full.shape[2:]).transpose(0, 1)
    return rank_major.reshape(w, -1, *full.shape[1:])


def _gather_kv(k, v, plan: GatherPlan, group):
    shards = all_gather(_pack(k, v), group, plan.world_size)
    n = k.numel()
    k_all = shards[:, :n].reshape(plan.world_size, *k.shape)
    v_all = shards[:, n:].reshape(plan.world_size, *v.shape)
    return _to_global(k_all, plan), _to_global(v_all, plan)


def allgather_forward(q, k, v, plan: GatherPlan, opts: Options, group):
    k_full, v_full = _gather_kv(k, v, plan, group)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:-1], torch.inf, dtype=torch.float32, device=q.device)
    for launch in plan.launches:  # each query row is in exactly one launch: no merging
        o, l = launch.attend(q, k_full, v_full, opts)
        launch.q.put(out, o)
        launch.q.put(lse, torch.where(l == -torch.inf, torch.inf, l))
    return out, lse.movedim(-1, q.dim() - 3).contiguous()


def allgather_backward(dout, q, k, v, out, lse, plan: GatherPlan, opts: Options, group):
    k_full, v_full = _gather_kv(k, v, plan, group)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_full = torch.zeros(k_full.shape, dtype=torch.float32, device=q.device)
    dv_full = torch.zeros(v_full.shape, dtype=torch.float32, device=q.device)
    dout = dout.contiguous()
    for launch in plan.launches:
        launch.backward(dout, q, k_full, v_full, out, lse, opts, dq, dk_full, dv_full)
    w = plan.world_size
    packed = torch.cat([_to_shards(dk_full, plan).reshape(w, -1), _to_shards(dv_full, plan).reshape(w, -1)], 1)
    dk, dv = _unpack(reduce_scatter(packed, group, w), k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@eager_under_compile
def allgather_flash_attn_func(q, k, v, group=None, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, layout="zigzag", deterministic=False, return_softmax_lse=False,
                              validate_ranks=True):
    """All-gather attention over a sequence sharded along the ranks of ``group``: the same
    arguments, shapes and returns as ring_flash_attn_func."""
    group, world_size, rank = resolve_group(group)
    validate("allgather_flash_attn_func", group, world_size, q, k, v, layout=layout, causal=causal,
             window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
             deterministic=deterministic, strategy="allgather", enabled=validate_ranks)
    lo, hi = band_limits(causal, window_size)
    plan = cached(_dense_plan, q.shape[1], world_size, rank, layout, lo, hi, q.device)
    out, lse = Attention.apply(q, k, v, plan, _options(q, softmax_scale, softcap, deterministic), group,
                               allgather_forward, allgather_backward)
    return (out, lse) if return_softmax_lse else out


@eager_under_compile
def allgather_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen=None, group=None, *, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, layout="zigzag",
                                     deterministic=False, return_softmax_lse=False, validate_ranks=True):
    """All-gather attention over packed sequences: the same arguments, shapes and returns as
    ring_flash_attn_varlen_func."""
    group, world_size, rank = resolve_group(group)
    cu = validate("allgather_flash_attn_varlen_func", group, world_size, q, k, v, layout=layout, causal=causal,
                  window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                  deterministic=deterministic, strategy="allgather", cu_seqlens=cu_seqlens, varlen=True,
                  enabled=validate_ranks)
    lo, hi = band_limits(causal, window_size)
    plan = cached(_varlen_plan, tuple(cu), world_size, rank, layout, lo, hi, q.device)
    out, lse = Attention.apply(q, k, v, plan, _options(q, softmax_scale, softcap, deterministic), group,
                               allgather_forward, allgather_backward)
    return (out, lse) if return_softmax_lse else out

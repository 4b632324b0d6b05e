"""Ulysses attention (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards, attention
over the whole sequence for num_heads / world_size heads, and all-to-all back.

Each rank sends and receives its q, k, v and out once, a volume that does not grow with the world
size, but the transfers cannot overlap the attention. It needs num_heads divisible by the world
size; KV heads are repeated just enough that every rank receives whole KV heads of its query heads
(e.g. 2 KV heads over 4 ranks are sent twice each). Built from differentiable pieces: the backward
is the same all-to-alls in reverse around the kernels' own backward.
"""

from __future__ import annotations

import math

import torch

from .. import interface
from ._blocks import cached
from ._checks import validate
from ._compile import eager_under_compile
from ._comm import AllToAll, all_to_all, resolve_group
from .layout import position_ids, varlen_shard_index

__all__ = ["ulysses_flash_attn_func", "ulysses_flash_attn_varlen_func"]


def _orders(order):
    """(global row of each rank-major row, rank-major row of each global row), or (None, None)."""
    return (None, None) if order is None else (order, torch.argsort(order))


def _dense_order(seqlen_local: int, world_size: int, layout: str, device):
    if layout == "contiguous" or world_size == 1:
        return _orders(None)
    seqlen = seqlen_local * world_size
    return _orders(torch.cat([position_ids(seqlen, world_size, r, layout=layout, device=device)
                              for r in range(world_size)]))


def _varlen_order(cu: tuple, world_size: int, layout: str, device):
    if world_size == 1:
        return _orders(None)
    return _orders(torch.cat([varlen_shard_index(cu, world_size, r, layout=layout, device=device)
                              for r in range(world_size)]))


def _kv_repeats(num_heads_kv: int, world_size: int) -> int:
    """How many times each KV head is sent so that num_heads_kv * repeats divides into world_size
    equal parts aligned with the query heads (num_heads is a multiple of both, so of their lcm)."""
    return world_size // math.gcd(num_heads_kv, world_size)


def _ulysses(q, k, v, group, world_size, order, run, token_dim, head_dim, return_softmax_lse):
    rank_major, to_global = order
    repeats = _kv_repeats(k.shape[-2], world_size)
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=-2), v.repeat_interleave(repeats, dim=-2)

    def to_heads(x):
        x = AllToAll.apply(x, group, world_size, head_dim, token_dim)
        return x if to_global is None else x.index_select(token_dim, to_global)

    out, lse = run(to_heads(q), to_heads(k), to_heads(v))
    if rank_major is not None:
        out = out.index_select(token_dim, rank_major)
    out = AllToAll.apply(out, group, world_size, token_dim, head_dim)
    if not return_softmax_lse:
        return out
    # lse: (B, heads, tokens) or (heads, tokens): tokens one dim after the heads.
    lse_tokens = lse.dim() - 1
    if rank_major is not None:
        lse = lse.index_select(lse_tokens, rank_major)
    return out, all_to_all(lse.contiguous(), group, world_size, lse_tokens, lse_tokens - 1)


@eager_under_compile
def ulysses_flash_attn_func(q, k, v, group=None, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, layout="zigzag", deterministic=False, return_softmax_lse=False,
                            validate_ranks=True):
    """Ulysses attention over a sequence sharded along the ranks of ``group``: the same arguments,
    shapes and returns as ring_flash_attn_func; num_heads must be divisible by the world size."""
    group, world_size, _ = resolve_group(group)
    validate("ulysses_flash_attn_func", group, world_size, q, k, v, layout=layout, causal=causal,
             window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
             deterministic=deterministic, strategy="ulysses", heads_multiple=world_size, enabled=validate_ranks)
    order = cached(_dense_order, q.shape[1], world_size, layout, q.device)

    def run(qh, kh, vh):
        return interface.flash_attn_func(qh, kh, vh, softmax_scale=softmax_scale, causal=causal,
                                         window_size=tuple(window_size), softcap=softcap,
                                         deterministic=deterministic, return_softmax_lse=True)

    return _ulysses(q, k, v, group, world_size, order, run, 1, 2, return_softmax_lse)


@eager_under_compile
def ulysses_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen=None, group=None, *, softmax_scale=None,
                                   causal=False, window_size=(-1, -1), softcap=0.0, layout="zigzag",
                                   deterministic=False, return_softmax_lse=False, validate_ranks=True):
    """Ulysses attention over packed sequences: the same arguments, shapes and returns as
    ring_flash_attn_varlen_func; num_heads must be divisible by the world size."""
    group, world_size, _ = resolve_group(group)
    cu = validate("ulysses_flash_attn_varlen_func", group, world_size, q, k, v, layout=layout, causal=causal,
                  window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                  deterministic=deterministic, strategy="ulysses", cu_seqlens=cu_seqlens, varlen=True,
                  heads_multiple=world_size, enabled=validate_ranks)
    order = cached(_varlen_order, tuple(cu), world_size, layout, q.device)
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)

    def run(qh, kh, vh):
        return interface.flash_attn_varlen_func(qh, kh, vh, cu_seqlens, cu_seqlens, longest, longest,
                                                softmax_scale=softmax_scale, causal=causal,
                                                window_size=tuple(window_size), softcap=softcap,
                                                deterministic=deterministic, return_softmax_lse=True)

    return _ulysses(q, k, v, group, world_size, order, run, 0, 1, return_softmax_lse)

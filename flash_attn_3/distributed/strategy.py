"""One entry for every strategy, and the automatic choice between them.

The thresholds below come from how each strategy moves data, not yet from measurements:
benchmarks/bench_cp.py measures them on several GPUs, and docs/distributed.md will carry the
figures once that run exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ._blocks import band_limits, cached
from ._comm import resolve_group
from .allgather import allgather_flash_attn_func, allgather_flash_attn_varlen_func
from .ring import _dense_plan, ring_flash_attn_func, ring_flash_attn_varlen_func
from .ulysses import _kv_repeats, ulysses_flash_attn_func, ulysses_flash_attn_varlen_func

__all__ = ["StrategyChoice", "choose_strategy", "context_parallel_attention"]

STRATEGIES = ("ring", "allgather", "ulysses")

# Below this many query tokens per rank, one ring step's attention is too short to hide the
# transfer of the next block (attention per step grows as N², the block as N), and the strategies
# that move data once win. An estimate for H100s over NVLink, to be replaced by bench_cp.py figures.
RING_MIN_TOKENS_PER_RANK = 8192

_LOG = logging.getLogger("flash_attn_3.distributed")
_logged: set = set()


@dataclass(frozen=True)
class StrategyChoice:
    strategy: str
    reason: str


def choose_strategy(*, world_size: int, seqlen_local: int, num_heads: int, num_heads_kv: int, head_dim: int,
                    head_dim_v: Optional[int] = None, causal: bool = False, window_size=(-1, -1),
                    layout: str = "zigzag") -> StrategyChoice:
    """The strategy "auto" picks, and why.

    seqlen_local: query tokens per rank of one sequence (for packed batches, the token-weighted
    mean of the local sequence lengths). In order: one rank needs no communication; a mask that
    leaves most ring steps empty (a short sliding window) makes ring exchange only with neighbours;
    long shards let ring hide its transfers under attention; short shards go to whichever of
    all-gather and Ulysses moves fewer bytes (Ulysses only when num_heads divides by the world size).
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    if world_size == 1:
        return StrategyChoice("ring", "world size 1: no communication, every strategy is one local attention call")
    lo, hi = band_limits(causal, window_size)
    full_steps = world_size // 2
    if layout in ("zigzag", "contiguous") and seqlen_local % (2 if layout == "zigzag" else 1) == 0:
        steps = cached(_dense_plan, seqlen_local, world_size, 0, layout, lo, hi).schedule.steps
        if steps < full_steps:
            return StrategyChoice("ring", f"the mask (causal={causal}, window_size={tuple(window_size)}) leaves ring "
                                          f"{steps} exchange step(s) of {full_steps}: only nearby shards move, "
                                          "where all-gather and Ulysses would move the whole sequence")
    if seqlen_local >= RING_MIN_TOKENS_PER_RANK:
        return StrategyChoice("ring", f"{seqlen_local} tokens per rank >= {RING_MIN_TOKENS_PER_RANK}: each ring "
                                      "step's attention hides the next block's transfer, and memory stays per shard")
    # Elements received per rank: all-gather brings (W - 1) shards of K and V; Ulysses brings
    # (W - 1) / W of q, k, v (KV heads repeated to whole shares) and of out.
    gather = (world_size - 1) * seqlen_local * num_heads_kv * (head_dim + head_dim_v)
    kv_heads = num_heads_kv * _kv_repeats(num_heads_kv, world_size)
    a2a = (world_size - 1) / world_size * seqlen_local * (
        num_heads * (head_dim + head_dim_v) + kv_heads * (head_dim + head_dim_v))
    short = f"{seqlen_local} tokens per rank < {RING_MIN_TOKENS_PER_RANK} (ring transfers would not hide)"
    if num_heads % world_size == 0 and a2a < gather:
        return StrategyChoice("ulysses", f"{short}; Ulysses receives {a2a:.3g} elements per rank, all-gather {gather:.3g}")
    why = (f"Ulysses would receive {a2a:.3g}" if num_heads % world_size == 0
           else f"num_heads {num_heads} does not divide by world size {world_size} for Ulysses")
    return StrategyChoice("allgather", f"{short}; all-gather receives {gather:.3g} elements per rank, {why}")


_FUNCS = {
    "ring": (ring_flash_attn_func, ring_flash_attn_varlen_func),
    "allgather": (allgather_flash_attn_func, allgather_flash_attn_varlen_func),
    "ulysses": (ulysses_flash_attn_func, ulysses_flash_attn_varlen_func),
}


def context_parallel_attention(q, k, v, group=None, *, strategy: str = "auto", cu_seqlens=None, max_seqlen=None,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               layout="zigzag", deterministic=False, return_softmax_lse=False,
                               validate_ranks=True):
    """Attention over a sequence sharded along the ranks of ``group``, by ``strategy``: "ring",
    "allgather", "ulysses" or "auto" (choose_strategy; the choice and its reason are logged once
    at INFO level on the "flash_attn_3.distributed" logger).

    Dense: q (batch_size, seqlen_local, num_heads, head_dim), k / v (batch_size, seqlen_local,
    num_heads_kv, head_dim / head_dim_v). Packed: with cu_seqlens (global int32 (batch_size + 1,)),
    q (total // world_size, num_heads, head_dim) and k / v alike. Other arguments and the returns
    as ring_flash_attn_func / ring_flash_attn_varlen_func.
    """
    if strategy == "auto":
        _, world_size, _ = resolve_group(group)
        choice = choose_strategy(world_size=world_size, seqlen_local=_local_length(q, cu_seqlens, world_size),
                                 num_heads=q.shape[-2], num_heads_kv=k.shape[-2], head_dim=q.shape[-1],
                                 head_dim_v=v.shape[-1], causal=causal, window_size=window_size, layout=layout)
        if choice not in _logged:
            _logged.add(choice)
            _LOG.info("context_parallel_attention: strategy=%s (%s)", choice.strategy, choice.reason)
        strategy = choice.strategy
    if strategy not in _FUNCS:
        raise ValueError(f"strategy must be one of {STRATEGIES + ('auto',)}; got {strategy!r}")
    dense, varlen = _FUNCS[strategy]
    kw = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap, layout=layout,
              deterministic=deterministic, return_softmax_lse=return_softmax_lse, validate_ranks=validate_ranks)
    if cu_seqlens is not None:
        return varlen(q, k, v, cu_seqlens, max_seqlen, group, **kw)
    return dense(q, k, v, group, **kw)


def _local_length(q, cu_seqlens, world_size: int) -> int:
    if cu_seqlens is None:
        return int(q.shape[1]) if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    cu = cu_seqlens.tolist()
    lengths = [(b - a) // world_size for a, b in zip(cu, cu[1:])]
    total = sum(lengths)
    return sum(n * n for n in lengths) // total if total else 0

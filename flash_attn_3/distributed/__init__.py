"""Context parallelism on torch.distributed: attention over sequences sharded across ranks.

Prefill and training (each rank holds a share of every sequence, see layout.py):
- ring_flash_attn_func / ring_flash_attn_varlen_func: K/V blocks travel around the ring, overlapped
  with attention; long sequences, masks that skip blocks (sliding windows).
- allgather_flash_attn_func / allgather_flash_attn_varlen_func: gather K/V once, attend locally;
  short sequences, few KV heads.
- ulysses_flash_attn_func / ulysses_flash_attn_varlen_func: all-to-all from sequence shards to
  head shards and back; num_heads divisible by the world size.
- context_parallel_attention(strategy="ring" | "allgather" | "ulysses" | "auto") and
  choose_strategy, which says why it picks what it picks.

Decode: cp_flash_attn_with_kvcache over a KV cache interleaved across ranks (shard_kv_cache,
local_cache_seqlens).

Layouts: shard_sequence / unshard_sequence, shard_varlen / unshard_varlen, local_cu_seqlens,
position_ids / varlen_position_ids (rotary positions of a shard), gather_sequence.

Every entry takes group= (a ProcessGroup, a 1-D DeviceMesh such as mesh["cp"], or None for the
default group) and runs on NCCL (GPUs) or gloo (CPUs). docs/distributed.md has the recipes.
Importing flash_attn_3 does not import this package.
"""

from .allgather import allgather_flash_attn_func, allgather_flash_attn_varlen_func
from .decode import cp_flash_attn_with_kvcache, local_cache_seqlens, shard_kv_cache
from .layout import (
    LAYOUTS,
    gather_sequence,
    local_cu_seqlens,
    position_ids,
    shard_sequence,
    shard_varlen,
    unshard_sequence,
    unshard_varlen,
    varlen_position_ids,
)
from .ring import ring_flash_attn_func, ring_flash_attn_varlen_func
from .strategy import StrategyChoice, choose_strategy, context_parallel_attention
from .ulysses import ulysses_flash_attn_func, ulysses_flash_attn_varlen_func

__all__ = [
    "LAYOUTS",
    "StrategyChoice",
    "allgather_flash_attn_func",
    "allgather_flash_attn_varlen_func",
    "choose_strategy",
    "context_parallel_attention",
    "cp_flash_attn_with_kvcache",
    "gather_sequence",
    "local_cache_seqlens",
    "local_cu_seqlens",
    "position_ids",
    "ring_flash_attn_func",
    "ring_flash_attn_varlen_func",
    "shard_kv_cache",
    "shard_sequence",
    "shard_varlen",
    "ulysses_flash_attn_func",
    "ulysses_flash_attn_varlen_func",
    "unshard_sequence",
    "unshard_varlen",
    "varlen_position_ids",
]

"""How many KV splits a launch uses, and the tensor `get_scheduler_metadata` returns.

Pure Python and PyTorch (no triton import), so the reference backend can build the same metadata
on CPU. Everything the host decides reads Python ints only: no device value is ever copied back,
so the forward stays capturable in CUDA graphs.

Metadata layout (flash_attn_3/metadata.py): int32 (batch_size + 1,) on cache_seqlens' device,
[0] = num_splits, [1 + b] = splits batch row b fills (its KV blocks spread evenly over [0]
splits; 0 for a row without keys). Kernels recompute these counts from the lengths they already
read, so a call with the tensor and one without give identical results.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ...metadata import metadata_shape

# H100 SXM; used when no CUDA device is visible (CPU interpreter runs) so the heuristic is the same.
DEFAULT_NUM_SMS = 132
MAX_SPLITS = 128
# Programs one SM holds to the end of a tiled-forward pass (about 96 KB of shared memory each).
PROGRAMS_PER_SM = 2
# Split-KV decode fills the GPU with one program per SM: one decode program with its two K/V
# buffers in flight already draws an SM's share of HBM bandwidth, and every extra split costs a
# pipeline fill and a partial write. Measured on H100 (batch 1, 128k keys, GQA 32/8, D 128):
# 16 splits (128 programs) 2.79 TB/s, 32: 2.67, 30 (the two-per-SM choice): 2.62, 64: 2.46,
# 128: 2.38, 8: 2.06; cuDNN 2.79.
DECODE_PROGRAMS_PER_SM = 1
# With one program per SM an idle SM is a direct loss, so decode asks for the fuller wave.
DECODE_MIN_EFFICIENCY = 0.95
# A split shorter than this many KV blocks costs more in partial writes than it gains.
MIN_BLOCKS_PER_SPLIT = 4


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device, sm_margin: int = 0) -> int:
    """Streaming multiprocessors available to one launch (sm_margin of them left to others)."""
    if device.type == "cuda":
        count = _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        count = DEFAULT_NUM_SMS
    return max(1, count - max(0, sm_margin))


def decode_block_n(head_dim: int, head_dim_v: int) -> int:
    """KV rows per decode iteration: about 32 KB of K+V (bf16) per pipeline stage."""
    block_n = 128
    while block_n > 16 and block_n * (head_dim + head_dim_v) * 2 > 32 * 1024:
        block_n //= 2
    return block_n


def decode_block_m(rows_per_tile: int) -> int:
    """Query rows (tokens x packed heads) per decode program: tl.dot needs at least 16."""
    block_m = 16
    while block_m < min(rows_per_tile, 64):
        block_m *= 2
    return block_m


def choose_num_splits(
    batch: int,
    num_heads_kv: int,
    seqlen_q_packed: int,
    max_seqlen_k: int,
    num_sms: int,
    block_m: int = 64,
    block_n: int = 64,
    programs_per_sm: int = PROGRAMS_PER_SM,
    max_splits: int = MAX_SPLITS,
    min_efficiency: float = 0.9,
) -> int:
    """Split count for a launch of batch * num_heads_kv * cdiv(seqlen_q_packed, block_m) tiles.

    num_heads_kv: heads whose K/V one tile reads (the query heads when GQA is not packed);
    seqlen_q_packed: query rows per tile source (seqlen_q * heads per KV head when packed).
    A memory-bound pass is fastest when every SM holds `programs_per_sm` programs to the end:
    the time of s splits is ceil(tiles * s / slots) waves of 1/s of the work, so we take the
    smallest s whose wave efficiency is at least `min_efficiency` of the best, never splitting a
    sequence into pieces shorter than MIN_BLOCKS_PER_SPLIT blocks.
    """
    tiles = batch * num_heads_kv * max(1, -(-seqlen_q_packed // block_m))
    n_blocks = -(-max_seqlen_k // block_n)
    limit = min(max_splits, n_blocks // MIN_BLOCKS_PER_SPLIT)
    if tiles == 0 or limit <= 1:
        return 1
    slots = num_sms * programs_per_sm

    def efficiency(splits: int) -> float:
        waves = tiles * splits / slots
        return waves / -(-waves // 1)

    best = max(efficiency(s) for s in range(1, limit + 1))
    return next(s for s in range(1, limit + 1) if efficiency(s) >= min_efficiency * best)


def decode_num_splits(batch: int, num_heads_q: int, num_heads_kv: int, max_seqlen_q: int,
                      max_seqlen_k: int, head_dim: int, head_dim_v: int, device: torch.device,
                      num_splits: int = 0, sm_margin: int = 0) -> int:
    """The split count the decode kernel launches with: num_splits if > 0, else the heuristic."""
    if num_splits > 0:
        return min(num_splits, MAX_SPLITS)
    # Small caches split too: the merge runs in the same launch (decode.py), and at B=1 ctx 1k
    # (16 blocks) 4 splits took 11.0 us of GPU time per graph-replayed step against 16.9 unsplit
    # (H100, with a separate combine launch then; docs/perf-notes.md).
    block_n = decode_block_n(head_dim, head_dim_v)
    rows = max_seqlen_q * (num_heads_q // num_heads_kv)
    return choose_num_splits(
        batch, num_heads_kv, rows, max_seqlen_k, num_sms(device, sm_margin),
        block_m=decode_block_m(rows), block_n=block_n,
        programs_per_sm=DECODE_PROGRAMS_PER_SM, min_efficiency=DECODE_MIN_EFFICIENCY,
    )


def split_counts(seqlen_k: torch.Tensor, block_n: int, num_splits: int) -> torch.Tensor:
    """Splits each row fills when its cdiv(seqlen_k, block_n) blocks are spread over num_splits."""
    n_blocks = (seqlen_k.clamp(min=0) + block_n - 1) // block_n
    per_split = (n_blocks + num_splits - 1) // num_splits
    return torch.where(n_blocks > 0, (n_blocks + per_split.clamp(min=1) - 1) // per_split.clamp(min=1), 0)


def scheduler_metadata(
    batch_size: int, max_seqlen_q: int, max_seqlen_k: int, num_heads_q: int, num_heads_kv: int,
    headdim: int, headdim_v: int, cache_seqlens: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k_new: Optional[torch.Tensor], cache_leftpad: Optional[torch.Tensor],
    page_size: Optional[int], max_seqlen_k_new: int, causal: bool, window_left: int, window_right: int,
    attention_chunk: int, has_softcap: bool, num_splits: int, pack_gqa: Optional[bool], sm_margin: int,
) -> torch.Tensor:
    """What get_scheduler_metadata returns (layout in the module docstring). Device ops only."""
    del cu_seqlens_q, page_size, causal, window_left, window_right, attention_chunk, has_softcap, pack_gqa
    device = cache_seqlens.device
    splits = decode_num_splits(batch_size, num_heads_q, num_heads_kv, max(1, max_seqlen_q),
                               max_seqlen_k + max_seqlen_k_new, headdim, headdim_v or headdim, device,
                               num_splits, sm_margin)
    seqlen_k = cache_seqlens.to(torch.int32)
    if cu_seqlens_k_new is not None:
        seqlen_k = seqlen_k + (cu_seqlens_k_new[1:] - cu_seqlens_k_new[:-1])
    else:
        seqlen_k = seqlen_k + max_seqlen_k_new
    if cache_leftpad is not None:
        seqlen_k = seqlen_k - cache_leftpad
    meta = torch.empty(metadata_shape(batch_size), dtype=torch.int32, device=device)
    meta[0] = splits
    meta[1:] = split_counts(seqlen_k, decode_block_n(headdim, headdim_v or headdim), splits)
    return meta

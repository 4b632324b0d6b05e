"""Which tokens each rank holds, and moving batches into and out of that layout.

Two layouts split every sequence of global length L over W ranks:

- ``"zigzag"``: the sequence is cut into 2W equal chunks; rank r holds chunk r followed by chunk
  2W-1-r. Under a causal mask every rank then does the same amount of work (an early chunk is
  paired with a late one), which is why ring attention uses it. L must be a multiple of 2W.
- ``"contiguous"``: rank r holds tokens [r·L/W, (r+1)·L/W). Simple, but causal work grows with the
  rank. L must be a multiple of W.

Dense batches (batch_size, seqlen, ...) are split along the sequence dimension; packed varlen
batches (total, ...) with global ``cu_seqlens`` are split sequence by sequence, each rank holding
its share of every sequence, packed in sequence order (its cu_seqlens are the global ones / W).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ._comm import resolve_group

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def split_multiple(world_size: int, layout: str) -> int:
    """Every global sequence length must be a multiple of this."""
    return 2 * world_size if layout == "zigzag" else world_size


def shard_pieces(seqlen: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int, int]]:
    """(local_start, global_start, length) of each contiguous run of the rank's tokens of one
    sequence of global length seqlen, in local order."""
    if layout == "zigzag":
        chunk = seqlen // (2 * world_size)
        return [(0, rank * chunk, chunk), (chunk, (2 * world_size - 1 - rank) * chunk, chunk)]
    share = seqlen // world_size
    return [(0, rank * share, share)]


def _check_split(seqlen: int, world_size: int, layout: str, what: str) -> None:
    check_layout(layout)
    multiple = split_multiple(world_size, layout)
    if seqlen % multiple:
        raise ValueError(
            f"{what} is {seqlen}, not a multiple of {multiple} (layout={layout!r} with world size "
            f"{world_size} needs {'2 * world_size chunks' if layout == 'zigzag' else 'world_size shares'})"
        )


def _cu_list(cu_seqlens) -> list[int]:
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        return [int(x) for x in cu_seqlens.tolist()]
    return [int(x) for x in cu_seqlens]


def position_ids(seqlen: int, world_size: int, rank: int, *, layout: str = "zigzag",
                 device=None) -> torch.Tensor:
    """Global positions (int64, (seqlen // world_size,)) of the tokens rank holds of a sequence of
    global length seqlen: the position ids rotary embeddings need for a sharded batch."""
    _check_split(seqlen, world_size, layout, "seqlen")
    return torch.cat([torch.arange(g, g + n, device=device)
                      for _, g, n in shard_pieces(seqlen, world_size, rank, layout)])


def varlen_position_ids(cu_seqlens, world_size: int, rank: int, *, layout: str = "zigzag") -> torch.Tensor:
    """Positions within its own sequence (int64, (total // world_size,)) of each packed token the
    rank holds, for global cu_seqlens (batch_size + 1,)."""
    cu = _cu_list(cu_seqlens)
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    parts = [position_ids(cu[b + 1] - cu[b], world_size, rank, layout=layout, device=device)
             for b in range(len(cu) - 1)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def varlen_shard_index(cu_seqlens, world_size: int, rank: int, *, layout: str = "zigzag",
                       device=None) -> torch.Tensor:
    """Rows of the global packed batch (int64, (total // world_size,)) that the rank holds, in
    its local order."""
    cu = _cu_list(cu_seqlens)
    parts = []
    for b in range(len(cu) - 1):
        length = cu[b + 1] - cu[b]
        _check_split(length, world_size, layout, f"cu_seqlens: sequence {b}'s length")
        parts += [torch.arange(cu[b] + g, cu[b] + g + n, device=device)
                  for _, g, n in shard_pieces(length, world_size, rank, layout)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def local_cu_seqlens(cu_seqlens: torch.Tensor, world_size: int) -> torch.Tensor:
    """The cu_seqlens of each rank's packed share: the global ones divided by world_size."""
    if bool((cu_seqlens % world_size != 0).any()):
        raise ValueError(f"cu_seqlens entries must be multiples of the world size {world_size}; got {cu_seqlens.tolist()}")
    return torch.div(cu_seqlens, world_size, rounding_mode="floor").to(cu_seqlens.dtype)


def shard_sequence(x: torch.Tensor, world_size: int, rank: int, *, layout: str = "zigzag",
                   dim: int = 1) -> torch.Tensor:
    """The rank's share of a dense batch: x (..., seqlen, ...) with the sequence along dim ->
    (..., seqlen // world_size, ...), a new contiguous tensor."""
    index = position_ids(x.shape[dim], world_size, rank, layout=layout, device=x.device)
    return x.index_select(dim, index)


def unshard_sequence(shards: Sequence[torch.Tensor], *, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence: the shards of every rank, in rank order -> the whole batch."""
    world_size = len(shards)
    seqlen = shards[0].shape[dim] * world_size
    index = torch.cat([position_ids(seqlen, world_size, r, layout=layout, device=shards[0].device)
                       for r in range(world_size)])
    return torch.cat(list(shards), dim).index_select(dim, torch.argsort(index))


def shard_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, world_size: int, rank: int, *,
                 layout: str = "zigzag") -> torch.Tensor:
    """The rank's share of a packed batch: x (total, ...) with global cu_seqlens ->
    (total // world_size, ...), every sequence's share in sequence order."""
    return x.index_select(0, varlen_shard_index(cu_seqlens, world_size, rank, layout=layout, device=x.device))


def unshard_varlen(shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, *,
                   layout: str = "zigzag") -> torch.Tensor:
    """Inverse of shard_varlen: every rank's packed share, in rank order -> (total, ...)."""
    world_size = len(shards)
    index = torch.cat([varlen_shard_index(cu_seqlens, world_size, r, layout=layout, device=shards[0].device)
                       for r in range(world_size)])
    return torch.cat(list(shards), 0).index_select(0, torch.argsort(index))


def gather_sequence(x: torch.Tensor, group=None, *, layout: str = "zigzag", dim: int = 1,
                    cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Collective: every rank's share of a batch -> the whole batch, on every rank (e.g. logits
    or outputs to check). Dense along dim, or packed (dim 0) with global cu_seqlens."""
    group, world_size, _ = resolve_group(group)
    if world_size == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(shards, x.contiguous(), group=group)
    if cu_seqlens is not None:
        return unshard_varlen(shards, cu_seqlens, layout=layout)
    return unshard_sequence(shards, layout=layout, dim=dim)

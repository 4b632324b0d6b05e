"""The torch.distributed calls every strategy shares: process groups, cross-rank agreement on the
arguments before the first real collective, ring exchanges, all-gather, reduce-scatter and a
differentiable all-to-all."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor forms; older releases (we support >= 2.4) have only the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def resolve_group(group):
    """(process group, world size, rank) for a ProcessGroup, a 1-D DeviceMesh or None (the default
    group; world size 1 when torch.distributed is not initialized)."""
    mesh_type = _device_mesh_type()
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(f"group: pass a 1-D DeviceMesh (e.g. mesh['cp']); got a {group.ndim}-D mesh")
        group = group.get_group()
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("group was given but torch.distributed is not initialized")
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def _device_mesh_type():
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        return None
    return DeviceMesh


def global_rank(group, group_rank: int) -> int:
    """P2P peers are named by their rank in the default group."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def collective_device(group, like: Optional[torch.Tensor]) -> torch.device:
    """Where a small control tensor must live for this group's backend."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        if isinstance(like, torch.Tensor) and like.is_cuda:
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return like.device if isinstance(like, torch.Tensor) else torch.device("cpu")


def shape_facts(name: str, t, ndim: int) -> list[tuple[str, int]]:
    """Named facts about a tensor argument that every rank must share; -1 where t is not a tensor
    of that rank (a local check reports that)."""
    ok = isinstance(t, torch.Tensor) and t.dim() == ndim
    facts = [(f"{name}.shape[{i}]", int(t.shape[i]) if ok else -1) for i in range(ndim)]
    return facts + [(f"{name}.dtype", _DTYPE_CODES.get(t.dtype, 0) if isinstance(t, torch.Tensor) else -1)]


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float8_e4m3fn: 4}


def agree(fn: str, group, world_size: int, like, error: Optional[BaseException],
          facts: Sequence[tuple[str, int]]) -> None:
    """Raise the same error on every rank when any rank's local checks failed or the ranks
    disagree on a fact (shapes, lengths, arguments); return on all ranks otherwise.

    One all_gather of a few integers (and a host read of them) runs before the first real
    collective, so no rank can enter a ring exchange that another rank never reaches. Every rank
    must pass facts with the same names in the same order."""
    if world_size == 1:
        if error is not None:
            raise error
        return
    device = collective_device(group, like)
    row = torch.tensor([int(error is not None)] + [int(v) for _, v in facts], dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).cpu().tolist()
    failed = [r for r, values in enumerate(table) if values[0]]
    if failed:
        messages: list = [None] * world_size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise ValueError(f"{fn}: invalid arguments on {len(failed)} of {world_size} ranks ({detail})") from error
    for i, (name, _) in enumerate(facts, start=1):
        values = [values_r[i] for values_r in table]
        if len(set(values)) > 1:
            seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(
                f"{fn}: {name} differs across ranks ({seen}); every rank must pass shards of one "
                f"batch and the same arguments"
            )


class Exchange:
    """Sends and receives started together (batch_isend_irecv); wait() before reading what came."""

    def __init__(self, group, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]):
        ops = [dist.P2POp(dist.isend, t, global_rank(group, peer), group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, global_rank(group, peer), group) for t, peer in recvs]
        self._works = dist.batch_isend_irecv(ops) if ops else []
        # The tensors stay referenced until the transfer is done.
        self._tensors = [t for t, _ in sends] + [t for t, _ in recvs]

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._tensors = [], []


def all_gather(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """(world_size, *x.shape): every rank's x, in rank order."""
    if world_size == 1:
        return x.unsqueeze(0)
    # Concatenated along dim 0, the one output form every backend's tensor all-gather accepts.
    out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
    _all_gather_tensor(out, x.contiguous(), group=group)
    return out.view(world_size, *x.shape)


def reduce_scatter(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """x (world_size, *shape) on every rank -> the sum over ranks of x[rank] (shape)."""
    if world_size == 1:
        return x[0]
    out = x.new_empty(x.shape[1:])
    _reduce_scatter_tensor(out, x.reshape(-1, *x.shape[2:]).contiguous(), group=group)
    return out


def all_to_all(x: torch.Tensor, group, world_size: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into world_size chunks along scatter_dim, send chunk i to rank i, and concatenate
    what every rank sent along gather_dim (in rank order)."""
    if world_size == 1:
        return x
    send = torch.stack(x.chunk(world_size, scatter_dim))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), gather_dim)


class AllToAll(torch.autograd.Function):
    """all_to_all with its gradient: the inverse all_to_all."""

    @staticmethod
    def forward(ctx, x, group, world_size, scatter_dim, gather_dim):
        ctx.args = group, world_size, scatter_dim, gather_dim
        return all_to_all(x, group, world_size, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, world_size, scatter_dim, gather_dim = ctx.args
        return all_to_all(grad.contiguous(), group, world_size, gather_dim, scatter_dim), None, None, None, None

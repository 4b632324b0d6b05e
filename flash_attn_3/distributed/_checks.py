"""Argument checks of the context-parallel entries, run before any communication.

Each rank checks what it holds; then (validate=True, the default) the ranks exchange an error flag
and a few facts (shapes, dtypes, mask, lengths) in one small all_gather, so an error on one rank,
or shards that do not belong together, raise on every rank instead of leaving the others waiting
in a collective.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch

from .. import checks
from ._comm import agree, shape_facts
from .layout import LAYOUTS, check_layout, split_multiple

DTYPES = (torch.float16, torch.bfloat16)
STRATEGIES = ("ring", "allgather", "ulysses")


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def check_qkv(q, k, v, *, varlen: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    ndim = 3 if varlen else 4
    layout = "(total, num_heads, head_dim)" if varlen else "(batch_size, seqlen, num_heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}; got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    tokens = 1 if varlen else 2
    if q.shape[:tokens] != k.shape[:tokens] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            "q, k and v must be shards of the same tokens (self-attention): their leading "
            f"{'dimension' if varlen else 'two dimensions'} must agree, and k and v all but the last; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    checks.check_heads(q.shape[-2], k.shape[-2])
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim; got {q.shape[-1]} and {k.shape[-1]}")
    checks.check_head_dims(q.shape[-1], v.shape[-1], False, False)


def check_mask(causal, window_size, softcap) -> None:
    checks.check_window(window_size)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    if float(softcap) < 0:
        raise ValueError(f"softcap must be >= 0; got {softcap}")


def check_cu_seqlens(cu_seqlens, q: torch.Tensor, world_size: int, layout: str) -> list[int]:
    """The global cu_seqlens, read on the host, against the rank's packed share q."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor (batch_size + 1,) of global offsets; got {got}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}; got {cu_seqlens.device}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease; got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    multiple = split_multiple(world_size, layout)
    for b in range(len(cu) - 1):
        if (cu[b + 1] - cu[b]) % multiple:
            raise ValueError(
                f"cu_seqlens: sequence {b} has length {cu[b + 1] - cu[b]}, not a multiple of {multiple} "
                f"(layout={layout!r} splits each sequence into {multiple} equal chunks for world size {world_size})"
            )
    if cu[-1] != q.shape[0] * world_size:
        raise ValueError(
            f"q holds {q.shape[0]} tokens, but cu_seqlens describes {cu[-1]} global tokens, whose share "
            f"on each of the {world_size} ranks is {cu[-1] / world_size:g}"
        )
    return cu


def validate(fn: str, group, world_size: int, q, k, v, *, layout: str, causal, window_size, softcap,
             softmax_scale, deterministic, strategy: str, cu_seqlens=None, varlen: bool = False,
             heads_multiple: Optional[int] = None, enabled: bool = True) -> Optional[list[int]]:
    """Every check of a prefill / training entry; returns the host copy of cu_seqlens (varlen)."""
    error, cu = None, None
    try:
        check_layout(layout)
        check_qkv(q, k, v, varlen=varlen)
        check_mask(causal, window_size, softcap)
        if varlen:
            cu = check_cu_seqlens(cu_seqlens, q, world_size, layout)
        elif q.shape[1] * world_size % split_multiple(world_size, layout):
            raise ValueError(
                f"the local shard length q.shape[1] = {q.shape[1]} must be even for layout='zigzag' "
                f"(each rank holds two equal chunks of the sequence)"
            )
        if heads_multiple is not None:
            for name, heads in (("num_heads (q.shape[-2])", q.shape[-2]),):
                if heads % heads_multiple:
                    raise ValueError(
                        f"{name} = {heads} must be divisible by the world size {heads_multiple} for "
                        f"strategy='ulysses' (each rank attends over a share of the heads)"
                    )
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    if not enabled:
        if error is not None:
            raise error
        return cu
    ndim = 3 if varlen else 4
    facts = shape_facts("q", q, ndim) + shape_facts("k", k, ndim) + shape_facts("v", v, ndim)
    facts += [
        ("q.device type", {"cpu": 1, "cuda": 2}.get(q.device.type, 3) if isinstance(q, torch.Tensor) else -1),
        ("layout", LAYOUTS.index(layout) if layout in LAYOUTS else -1),
        ("strategy", STRATEGIES.index(strategy)),
        ("causal", int(bool(causal))),
        ("window_size[0]", _int_or(window_size, 0)),
        ("window_size[1]", _int_or(window_size, 1)),
        ("softcap", _float_bits(softcap)),
        ("softmax_scale", -1 if softmax_scale is None else _float_bits(softmax_scale)),
        ("deterministic", int(bool(deterministic))),
    ]
    if varlen:
        facts.append(("cu_seqlens", -1 if cu is None else hash(tuple(cu))))
    agree(fn, group, world_size, q, error, facts)
    return cu


def _int_or(window_size, i: int) -> int:
    try:
        return int(window_size[i])
    except (TypeError, ValueError, IndexError):
        return -2


def _float_bits(x) -> int:
    try:
        return _bits(x)
    except (TypeError, ValueError, struct.error):
        return -1

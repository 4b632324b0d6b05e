"""Random inputs for the tests: fresh every run, never zeros, in the layouts of spec sec 3."""

from __future__ import annotations

import math
from typing import Sequence

import torch

FP8 = torch.float8_e4m3fn
NAN_POISON = float("nan")


def randn(*shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Normal values already representable in dtype (fp8 goes through bf16 like the official tests)."""
    base = torch.bfloat16 if dtype == FP8 else dtype
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(base).to(dtype)


def descales(batch: int, num_heads_kv: int, device):
    """q/k/v descales for fp8, (B, Hk) fp32 in (0, 2) as the official tests draw them."""
    return [torch.rand(batch, num_heads_kv, device=device, dtype=torch.float32) * 2 + 0.05 for _ in range(3)]


def cu_seqlens(lengths: Sequence[int], device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def pack(dense: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """(B, S, ...) -> (sum(lengths), ...): the first lengths[b] tokens of each row."""
    return torch.cat([dense[b, :n] for b, n in enumerate(lengths)], dim=0)


def paged_copy(*rows: torch.Tensor, page_size: int, extra_pages: int = 3):
    """Spread dense cache rows (B, S, H, D) over shuffled pages, one shared page table for all.

    Returns ([paged (num_pages, page_size, H, D) per input], page_table (B, ceil(S / page_size))
    int32). Spare pages and page tails hold random values, so a wrong index reads garbage, not zeros.
    """
    batch, seqlen = rows[0].shape[:2]
    pages_per_row = math.ceil(seqlen / page_size)
    num_pages = batch * pages_per_row + extra_pages
    device = rows[0].device
    order = torch.randperm(num_pages, device=device)[: batch * pages_per_row]
    page_table = order.reshape(batch, pages_per_row).to(torch.int32)
    pageds = []
    for r in rows:
        paged = randn(num_pages, page_size, *r.shape[2:], dtype=r.dtype, device=device)
        for b in range(batch):
            for p in range(pages_per_row):
                chunk = r[b, p * page_size:(p + 1) * page_size]
                paged[page_table[b, p], : chunk.shape[0]] = chunk
        pageds.append(paged)
    return pageds, page_table


def rotary_tables(seqlen: int, rotary_dim: int, dtype, device):
    """cos/sin (seqlen, rotary_dim / 2) of random angles, rounded to the input dtype."""
    angle = torch.rand(seqlen, rotary_dim // 2, device=device) * 2 * math.pi
    base = torch.bfloat16 if dtype == FP8 else dtype
    return torch.cos(angle).to(base), torch.sin(angle).to(base)


def poisoned_like(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, NAN_POISON, dtype=dtype, device=device)


def cp_total(local_len: int, world_size: int, rank: int) -> int:
    """A global key count whose share for this rank is exactly local_len keys."""
    low = rank + (local_len - 1) * world_size + 1 if local_len > 0 else 0
    high = rank + local_len * world_size
    return int(torch.randint(max(low, 0), high + 1, (1,)).item())


def poison_new_buffers(monkeypatch) -> None:
    """Every float buffer a kernel wrapper allocates with torch.empty starts as NaN, so a value
    it forgets to write shows up instead of passing as leftover memory."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(NAN_POISON) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)

"""The tensor layouts both Gluon kernels (fwd_hopper.py, bwd_hopper.py) read through their TMA
descriptors and index loads: what their supports() share."""

from __future__ import annotations

import os
from typing import Optional

from ..params import AttnArgs

# One switch for both kernels' narrow-V variants (a V whose head dim is under Q's and K's).
DV_ENV = "FLASH_ATTN_3_GLUON_DV"


def narrow_v_hold(a: AttnArgs, kernel: str) -> Optional[str]:
    """Why a call whose V is narrower than Q and K is held off `kernel`, or None (each kernel
    then judges the head dims): only when switched off, FLASH_ATTN_3_GLUON_DV=0. Taken by
    default since its first GPU run (H100, 2026-12-07 23:40-23:50 UTC: its forward and backward
    tests passed, and memcheck, racecheck and synccheck found nothing of ours in its calls)."""
    if os.environ.get(DV_ENV, "").strip() != "0":
        return None
    return (f"v's head dim {a.v.shape[-1]} differs from q's {a.q.shape[-1]}: the {kernel}'s "
            f"variant for that is switched off by {DV_ENV}=0")


def takes_layout(a: AttnArgs, paged: bool = False) -> bool:
    """q, k and v each dense (B, S, H, D) or packed (total, H, D) with its cu_seqlens (k and v
    alike but for their head dims, which each kernel judges; with `paged`, k / v are the page
    pool and need not have B rows), and contiguous index tensors: the kernels read cu_seqlens
    and seqused at b and b + 1."""
    q, k, v = a.q, a.k, a.v
    if q.dim() != (3 if a.cu_seqlens_q is not None else 4) or k.shape[:-1] != v.shape[:-1]:
        return False
    if k.dim() != (3 if a.cu_seqlens_k is not None else 4):
        return False
    if k.dim() == 4 and k.shape[0] != a.batch_size and not paged:
        return False
    if a.cu_seqlens_k is not None and a.cu_seqlens_k.shape[0] != a.batch_size + 1:
        return False
    return all(t is None or t.is_contiguous()
               for t in (a.cu_seqlens_q, a.cu_seqlens_k, a.seqused_q, a.seqused_k))

"""The normalized argument set every backend receives.

The op layer validates and normalizes the public arguments once and hands backends this record,
so no backend re-derives defaults or re-reads the public conventions.

Conventions (all backends):
- q: (B, Sq, Hq, D), or (total_q, Hq, D) when ``cu_seqlens_q`` is set.
- k / v: (B_k, Sk, Hk, D|Dv) dense (B_k may exceed B when ``kv_batch_idx`` picks rows);
  (total_k, Hk, D|Dv) when ``cu_seqlens_k`` is set; (num_pages, page_size, Hk, D|Dv) when
  ``page_table`` is set (then ``cu_seqlens_k`` is None and ``seqused_k`` gives the lengths).
- Per batch b, the key sequence is: rows ``leftpad_k[b]`` .. ``end_k[b] - 1`` of the (logical)
  K/V row of b, where ``end_k[b]`` = seqused_k[b] if given, else the varlen length, else Sk
  (or page_table.shape[1] * page_size when paged). Key j of the sequence sits at row
  ``leftpad_k[b] + j``; the sequence length is ``end_k[b] - leftpad_k[b]``.
- Query length per batch: seqused_q[b] if given, else the varlen length, else Sq.
- Masks use the bottom-right aligned diagonal d_i = i + seqlen_k - seqlen_q. ``window_left`` /
  ``window_right`` are -1 for unbounded; causal has already been folded into window_right = 0.
- Context parallel (cp_world_size > 1): local key j is global key j * W + cp_rank, the global
  length is cp_tot_seqused_k[b], and d_i = i + tot_k - seqlen_q compares with global positions.
- Returns: out (q's leading shape, Hq, Dv) in ``out_dtype``; lse fp32 (B, Hq, Sq) dense or
  (Hq, total_q) varlen. Rows with no allowed key: out = 0, lse = +inf.
- ``out``, when set, is a buffer of that shape and dtype (any strides, unit last stride) that a
  backend may write the result into and return, saving a copy; a backend that cannot returns a
  tensor of its own and the op layer copies. Never set inside a traced or autograd-recorded call.
- ``deterministic`` and ``sm_margin`` are what the call asked for; the forward reads neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttnArgs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qv: Optional[torch.Tensor]
    cu_seqlens_q: Optional[torch.Tensor]
    cu_seqlens_k: Optional[torch.Tensor]
    seqused_q: Optional[torch.Tensor]
    seqused_k: Optional[torch.Tensor]
    max_seqlen_q: int
    max_seqlen_k: int
    page_table: Optional[torch.Tensor]
    kv_batch_idx: Optional[torch.Tensor]
    leftpad_k: Optional[torch.Tensor]
    q_descale: Optional[torch.Tensor]
    k_descale: Optional[torch.Tensor]
    v_descale: Optional[torch.Tensor]
    sinks: Optional[torch.Tensor]
    softmax_scale: float
    window_left: int
    window_right: int
    attention_chunk: int
    softcap: float
    num_splits: int
    pack_gqa: Optional[bool]
    cp_world_size: int
    cp_rank: int
    cp_tot_seqused_k: Optional[torch.Tensor]
    scheduler_metadata: Optional[torch.Tensor]
    deterministic: bool = False
    sm_margin: int = 0
    out: Optional[torch.Tensor] = None

    @classmethod
    def plain(cls, q, k, v, **fields) -> "AttnArgs":
        """Dense q/k/v with every other field at its no-feature value (full attention, scale
        1/sqrt(head_dim), one split), `fields` overriding: for tests, benchmarks and scripts,
        which otherwise spell out all the fields. Packed q/k need their max_seqlen in fields."""
        base = dict(
            qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
            max_seqlen_q=q.shape[1] if q.dim() == 4 else 0,
            max_seqlen_k=k.shape[1] if k.dim() == 4 else 0, page_table=None, kv_batch_idx=None,
            leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, sinks=None,
            softmax_scale=q.shape[-1] ** -0.5, window_left=-1, window_right=-1,
            attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, cp_world_size=1,
            cp_rank=0, cp_tot_seqused_k=None, scheduler_metadata=None)
        base.update(fields)
        return cls(q=q, k=k, v=v, **base)

    @property
    def is_varlen_q(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch_size(self) -> int:
        if self.cu_seqlens_q is not None:
            return self.cu_seqlens_q.shape[0] - 1
        return self.q.shape[0]

    @property
    def num_heads_q(self) -> int:
        return self.q.shape[-2]

    @property
    def num_heads_kv(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[-1]

    @property
    def page_size(self) -> Optional[int]:
        return None if self.page_table is None else self.k.shape[1]

    @property
    def is_fp8(self) -> bool:
        return self.q.dtype == torch.float8_e4m3fn

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.is_fp8 else self.q.dtype

    @property
    def is_local(self) -> bool:
        """Causal, sliding window or chunked: queries see different key ranges."""
        return self.window_left >= 0 or self.window_right >= 0 or self.attention_chunk > 0

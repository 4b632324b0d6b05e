"""Straightforward attention written from the spec (fa3_spec.md sections 4, 5, 8), for the tests.

It materializes the whole score matrix, one sequence at a time, and shares no code with the package:
a bug in the package's conventions cannot leak into the expectation.

Every attention entry takes ``lowp``: False gives the float64 reference; True gives the second
reference the tolerance rule needs: the same math in the input precision with reordered operations
(the scale moves from q onto k, the softmax runs in the input dtype, fp8 rounds P to fp8 before PV),
so ``|ref_lowp - ref|`` measures what honest rounding costs.

Conventions shared by the helpers: one sequence is q (Sq, Hq, D), k (Sk, Hk, D), v (Sk, Hk, Dv);
query head h reads KV head h // (Hq // Hk); out (Sq, Hq, Dv); lse (Hq, Sq), natural log.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

F64 = torch.float64
FP8 = torch.float8_e4m3fn


def _compute_dtype(dtype: torch.dtype, lowp: bool) -> torch.dtype:
    if not lowp:
        return F64
    # fp8 has no arithmetic: the official low-precision reference runs fp8 values in bf16.
    return torch.bfloat16 if dtype == FP8 else dtype


def allowed_keys(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    attention_chunk: int = 0,
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqlen_k: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """(Sq, Sk) bool: which key j query i may attend to (spec sec 4, bottom-right aligned)."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    rows = torch.arange(seqlen_q, device=device).unsqueeze(1)
    cols = torch.arange(seqlen_k, device=device).unsqueeze(0)
    if cp_world_size > 1:
        key_pos = cols * cp_world_size + cp_rank
        total_k = int(cp_tot_seqlen_k)
    else:
        key_pos = cols
        total_k = seqlen_k
    diag = rows + total_k - seqlen_q
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= key_pos >= diag - left
    if right >= 0:
        allowed &= key_pos <= diag + right
    if attention_chunk > 0:
        start = diag - torch.remainder(diag, attention_chunk)
        allowed &= (key_pos >= start) & (key_pos < start + attention_chunk)
    if cp_world_size > 1:
        allowed &= key_pos < total_k
    return allowed


def _per_query_head(x: torch.Tensor, num_heads_q: int) -> torch.Tensor:
    """(S, Hk, *) -> (S, Hq, *): each KV head serves its consecutive group of query heads."""
    return x.repeat_interleave(num_heads_q // x.shape[1], dim=1)


def _descaled(x, descale, cdt):
    """x (S, H, D) times its per-head descale (H,), in fp32 like the official low-precision path."""
    if descale is None:
        return x.to(cdt)
    d = descale.reshape(1, -1, 1)
    if cdt == F64:
        return x.to(F64) * d.to(F64)
    return (x.float() * d.float()).to(cdt)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    qv: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    cp_world_size: int = 1,
    cp_rank: int = 0,
    cp_tot_seqlen_k: Optional[int] = None,
    lowp: bool = False,
):
    """One sequence. Descales are this batch row's (Hk,) slice; sinks (Hq,).

    Returns out (Sq, Hq, Dv) and lse (Hq, Sq): float64, or the compute dtype when lowp.
    A row without any allowed key gives out 0 and lse +inf.
    """
    seqlen_q, num_heads_q, head_dim = q.shape
    seqlen_k = k.shape[0]
    head_dim_v = v.shape[-1]
    cdt = _compute_dtype(q.dtype, lowp)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim + (head_dim_v if qv is not None else 0))

    # q's descale is indexed by the KV head of each query head.
    q_descale = None if q_descale is None else q_descale.repeat_interleave(num_heads_q // k.shape[1])
    qc = _descaled(q, q_descale, cdt)
    kc = _per_query_head(_descaled(k, k_descale, cdt), num_heads_q)
    vc = _per_query_head(_descaled(v, v_descale, cdt), num_heads_q)
    if lowp:
        scores = torch.einsum("qhd,khd->hqk", qc, kc * softmax_scale)
    else:
        scores = torch.einsum("qhd,khd->hqk", qc * softmax_scale, kc)
    if qv is not None:
        scores = scores + torch.einsum("qhd,khd->hqk", qv.to(cdt) * softmax_scale, vc)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap

    allowed = allowed_keys(
        seqlen_q, seqlen_k, causal=causal, window_size=window_size, attention_chunk=attention_chunk,
        cp_world_size=cp_world_size, cp_rank=cp_rank, cp_tot_seqlen_k=cp_tot_seqlen_k, device=q.device,
    ).unsqueeze(0)
    row_empty = ~allowed.any(-1)  # (1, Sq)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        # The sink is one more logit per head: in the denominator, with no value row.
        sink_col = sinks.to(cdt).reshape(-1, 1, 1).expand(num_heads_q, seqlen_q, 1)
        scores = torch.cat([scores, sink_col], dim=-1)

    if lowp:
        probs = torch.softmax(scores, dim=-1)
        lse = torch.logsumexp(scores.float(), dim=-1)
    else:
        # Detached max keeps the float64 autograd graph free of inf - inf on empty rows.
        if scores.shape[-1] == 0:  # no keys at all (an empty sequence) and no sink
            row_max = scores.new_zeros(num_heads_q, seqlen_q, 1)
        else:
            row_max = scores.amax(-1, keepdim=True).detach()
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        expd = torch.exp(scores - row_max)
        denom = expd.sum(-1, keepdim=True)
        probs = expd / torch.where(denom > 0, denom, torch.ones_like(denom))
        lse = (torch.log(denom) + row_max).squeeze(-1)
    if sinks is not None:
        probs = probs[..., :seqlen_k]
    probs = probs.masked_fill(row_empty.unsqueeze(-1), 0.0)
    lse = lse.masked_fill(row_empty, float("inf"))
    if q.dtype == FP8 and lowp:
        probs = probs.to(FP8).to(cdt)
    out = torch.einsum("hqk,khd->qhd", probs, vc)
    return out, lse


def _row(t: Optional[torch.Tensor], b: int):
    return None if t is None else t[b]


def attention_dense(
    q, k, v, *, seqlens_q=None, seqlens_k=None, qv=None, q_descale=None, k_descale=None,
    v_descale=None, cp_tot_seqused_k=None, lowp=False, **kw,
):
    """Batched (B, S, H, D) inputs; seqlens_q / seqlens_k (ints per row) cut each row short.

    Returns out (B, Sq, Hq, Dv) with zeros past a row's length, lse (B, Hq, Sq) with +inf there.
    """
    batch, seqlen_q, num_heads_q, _ = q.shape
    outs, lses = [], []
    for b in range(batch):
        len_q = seqlen_q if seqlens_q is None else int(seqlens_q[b])
        len_k = k.shape[1] if seqlens_k is None else int(seqlens_k[b])
        o, lse = attention(
            q[b, :len_q], k[b, :len_k], v[b, :len_k], qv=None if qv is None else qv[b, :len_q],
            q_descale=_row(q_descale, b), k_descale=_row(k_descale, b), v_descale=_row(v_descale, b),
            cp_tot_seqlen_k=None if cp_tot_seqused_k is None else int(cp_tot_seqused_k[b]),
            lowp=lowp, **kw,
        )
        pad = seqlen_q - len_q
        outs.append(torch.cat([o, o.new_zeros(pad, *o.shape[1:])], 0))
        lses.append(torch.cat([lse, lse.new_full((num_heads_q, pad), float("inf"))], 1))
    return torch.stack(outs), torch.stack(lses)


def gather_pages(paged: torch.Tensor, page_row: torch.Tensor, length: int) -> torch.Tensor:
    """Logical tokens 0..length-1 of one page-table row: (num_pages, page_size, H, D) -> (length, H, D)."""
    page_size = paged.shape[1]
    pos = torch.arange(length, device=paged.device)
    pages = page_row.long()[pos // page_size]
    return paged[pages, pos % page_size]


def sequence_bounds(cu_seqlens: torch.Tensor, seqused: Optional[torch.Tensor], b: int):
    start = int(cu_seqlens[b])
    length = int(cu_seqlens[b + 1]) - start
    if seqused is not None:
        length = int(seqused[b])
    return start, length


def used_rows(cu_seqlens_q, seqused_q, total_q) -> torch.Tensor:
    """(total_q,) bool: the packed query rows that belong to a sequence (seqused cuts the rest)."""
    used = torch.zeros(total_q, dtype=torch.bool)
    for b in range(cu_seqlens_q.shape[0] - 1):
        start, length = sequence_bounds(cu_seqlens_q, seqused_q, b)
        used[start:start + length] = True
    return used


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, seqused_q=None, seqused_k=None, page_table=None,
    qv=None, q_descale=None, k_descale=None, v_descale=None, cp_tot_seqused_k=None, lowp=False, **kw,
):
    """Packed q (total_q, Hq, D). Keys packed like q (cu_seqlens_k), or paged (page_table with
    seqused_k). Returns out (total_q, Hq, Dv) (0 on unused rows), lse (Hq, total_q) (+inf there).
    """
    total_q, num_heads_q, _ = q.shape
    head_dim_v = v.shape[-1]
    cdt = _compute_dtype(q.dtype, lowp)
    out = torch.zeros(total_q, num_heads_q, head_dim_v, dtype=cdt, device=q.device)
    lse = torch.full((num_heads_q, total_q), float("inf"), dtype=F64 if not lowp else torch.float32,
                     device=q.device)
    for b in range(cu_seqlens_q.shape[0] - 1):
        q_start, len_q = sequence_bounds(cu_seqlens_q, seqused_q, b)
        if page_table is not None:
            len_k = int(seqused_k[b])
            kb = gather_pages(k, page_table[b], len_k)
            vb = gather_pages(v, page_table[b], len_k)
        else:
            k_start, len_k = sequence_bounds(cu_seqlens_k, seqused_k, b)
            kb, vb = k[k_start:k_start + len_k], v[k_start:k_start + len_k]
        rows = slice(q_start, q_start + len_q)
        o, l = attention(
            q[rows], kb, vb, qv=None if qv is None else qv[rows],
            q_descale=_row(q_descale, b), k_descale=_row(k_descale, b), v_descale=_row(v_descale, b),
            cp_tot_seqlen_k=None if cp_tot_seqused_k is None else int(cp_tot_seqused_k[b]),
            lowp=lowp, **kw,
        )
        out[rows] = o
        lse[:, rows] = l.to(lse.dtype)
    return out, lse


def apply_rotary(x, cos, sin, positions, interleaved: bool):
    """Rotate the first rotary_dim = 2 * cos.shape[1] features of token t at positions[t].

    x (S, H, D); cos/sin (S_ro, rotary_dim / 2). Computed in fp32 and rounded to x.dtype, the way
    a kernel does, so the cache check can hold rotated keys to 1e-3.
    """
    rotary_dim = 2 * cos.shape[1]
    positions = positions.to(cos.device, torch.long)
    c = cos[positions].float().unsqueeze(1)
    s = sin[positions].float().unsqueeze(1)
    xr = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., : rotary_dim // 2], xr[..., rotary_dim // 2:]
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    rotated = torch.stack([o1, o2], -1).flatten(-2) if interleaved else torch.cat([o1, o2], -1)
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dim:]], dim=-1)


class _CacheView:
    """Reads and writes logical positions of one cache row, contiguous or paged."""

    def __init__(self, cache, row, page_table):
        self.cache, self.row, self.page_table = cache, row, page_table

    def _index(self, positions):
        if self.page_table is None:
            return (self.row, positions)
        page_size = self.cache.shape[1]
        return (self.page_table[self.row].long()[positions // page_size], positions % page_size)

    def read(self, start, stop):
        return self.cache[self._index(torch.arange(start, stop, device=self.cache.device))]

    def write(self, start, values):
        positions = torch.arange(start, start + values.shape[0], device=self.cache.device)
        self.cache[self._index(positions)] = values


def attention_kvcache(
    q, k_cache, v_cache, k=None, v=None, *, qv=None, rotary_cos=None, rotary_sin=None,
    cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None, cu_seqlens_q=None,
    cu_seqlens_k_new=None, rotary_seqlens=None, rotary_interleaved=True, q_descale=None,
    k_descale=None, v_descale=None, causal=False, window_size=(-1, -1), attention_chunk=0,
    lowp=False, **kw,
):
    """flash_attn_with_kvcache per spec sec 5, on copies of the caches.

    Returns out (q's leading shape, Hq, Dv), lse ((B, Hq, Sq) or (Hq, total_q) for varlen q), and
    the caches as they must look after the call.
    """
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    varlen_q = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen_q else q.shape[0]
    if cache_seqlens is None:
        cache_seqlens = k_cache.shape[1] if page_table is None else page_table.shape[1] * k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32)
    rotate_q_per_token = causal or window_size[0] >= 0 or window_size[1] >= 0 or attention_chunk > 0
    num_heads_q = q.shape[-2]
    cdt = _compute_dtype(q.dtype, lowp)
    out = torch.zeros(*q.shape[:-1], v_cache.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full(
        (num_heads_q, q.shape[0]) if varlen_q else (batch, num_heads_q, q.shape[1]),
        float("inf"), dtype=torch.float32 if lowp else F64, device=q.device,
    )
    for b in range(batch):
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        kview = _CacheView(k_cache, row, page_table)
        vview = _CacheView(v_cache, row, page_table)
        if varlen_q:
            q_rows = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            qb = q[q_rows]
        else:
            qb = q[b]
        seqlen_cached = int(cache_seqlens[b])
        if k is not None:
            if cu_seqlens_k_new is not None:
                new_rows = slice(int(cu_seqlens_k_new[b]), int(cu_seqlens_k_new[b + 1]))
                k_new, v_new = k[new_rows], v[new_rows]
            else:
                k_new, v_new = k[b], v[b]
        else:
            k_new = v_new = None
        num_new = 0 if k_new is None else k_new.shape[0]
        if rotary_cos is not None:
            r = seqlen_cached if rotary_seqlens is None else int(rotary_seqlens[b])
            new_pos = torch.arange(r, r + num_new)
            k_new = apply_rotary(k_new, rotary_cos, rotary_sin, new_pos, rotary_interleaved)
            q_pos = torch.arange(r, r + qb.shape[0]) if rotate_q_per_token else torch.full((qb.shape[0],), r)
            qb = apply_rotary(qb, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        if num_new:
            kview.write(seqlen_cached, k_new)
            vview.write(seqlen_cached, v_new)
        leftpad = 0 if cache_leftpad is None else int(cache_leftpad[b])
        kb = kview.read(leftpad, seqlen_cached + num_new)
        vb = vview.read(leftpad, seqlen_cached + num_new)
        o, l = attention(
            qb, kb, vb, qv=None if qv is None else (qv[q_rows] if varlen_q else qv[b]),
            q_descale=_row(q_descale, b), k_descale=_row(k_descale, b), v_descale=_row(v_descale, b),
            causal=causal, window_size=window_size, attention_chunk=attention_chunk, lowp=lowp, **kw,
        )
        if varlen_q:
            out[q_rows] = o
            lse[:, q_rows] = l.to(lse.dtype)
        else:
            out[b] = o
            lse[b] = l.to(lse.dtype)
    return out, lse, k_cache, v_cache


def combine(out_partial: torch.Tensor, lse_partial: torch.Tensor):
    """Merge split partials: out_partial (S, B, L, H, D), lse_partial (S, B, L, H), in float64.

    Splits whose lse is -inf hold nothing; a position empty in every split gives out 0, lse -inf.
    """
    lse_partial = lse_partial.to(F64)
    lse = torch.logsumexp(lse_partial, dim=0)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lse_partial - finite_lse)
    weights = torch.where(torch.isfinite(lse_partial), weights, torch.zeros_like(weights))
    out = (weights.unsqueeze(-1) * out_partial.to(F64)).sum(0)
    return out, lse

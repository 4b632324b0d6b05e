"""Reference backend: plain PyTorch, every feature, any device.

It defines the semantics the kernels must match (see params.py). Work is done per batch row and in
chunks of query rows, so memory stays bounded (a 32k-token sequence never builds a 32k x 32k score
matrix). It reads index tensors on the host: correct everywhere, fast nowhere, never graph-capturable.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .params import AttnArgs
# The schedule is plain torch arithmetic on lengths; sharing it keeps both backends' tensors equal.
from .triton.scheduler import scheduler_metadata  # noqa: F401

# Scores per chunk stay under this many fp32 elements (~128 MB).
_CHUNK_ELEMENTS = 1 << 25


def _host(t: Optional[torch.Tensor]) -> Optional[list[int]]:
    return None if t is None else t.tolist()


class _Layout:
    """Host-side view of where each batch row's queries and keys live."""

    def __init__(self, a: AttnArgs):
        self.a = a
        self.cu_q = _host(a.cu_seqlens_q)
        self.cu_k = _host(a.cu_seqlens_k)
        self.used_q = _host(a.seqused_q)
        self.used_k = _host(a.seqused_k)
        self.leftpad = _host(a.leftpad_k)
        self.kv_rows = _host(a.kv_batch_idx)
        self.cp_tot = _host(a.cp_tot_seqused_k)

    def q_rows(self, b: int) -> tuple[int, int]:
        """(first row, length) of batch b's queries in q (flattened over batch when dense)."""
        if self.cu_q is not None:
            start, length = self.cu_q[b], self.cu_q[b + 1] - self.cu_q[b]
        else:
            start, length = b * self.a.q.shape[1], self.a.q.shape[1]
        if self.used_q is not None:
            length = min(length, self.used_q[b]) if self.cu_q is None else self.used_q[b]
        return start, max(length, 0)

    def kv(self, b: int, t: torch.Tensor) -> torch.Tensor:
        """Batch b's key sequence of `t` (k or v): logical rows leftpad .. end."""
        a = self.a
        row = self.kv_rows[b] if self.kv_rows is not None else b
        if a.page_table is not None:
            page_size = t.shape[1]
            end = self.used_k[b]
            pages = a.page_table[row, : max(0, -(-end // page_size))].long()
            logical = t[pages].reshape(-1, *t.shape[2:])
        elif self.cu_k is not None:
            logical = t[self.cu_k[b]: self.cu_k[b + 1]]
            end = self.used_k[b] if self.used_k is not None else logical.shape[0]
        else:
            logical = t[row]
            end = self.used_k[b] if self.used_k is not None else logical.shape[0]
        start = self.leftpad[b] if self.leftpad is not None else 0
        return logical[start: max(start, end)]


def _upcast(x: torch.Tensor, descale: Optional[torch.Tensor], b: int, group: int) -> torch.Tensor:
    """(S, H, D) -> fp32, times the per-KV-head descale of batch b when given."""
    x = x.float()
    if descale is not None:
        scale = descale[b].float()
        if x.shape[1] != scale.shape[0]:
            scale = scale.repeat_interleave(group)
        x = x * scale[None, :, None]
    return x


def _allowed(a: AttnArgs, rows: torch.Tensor, seqlen_q: int, seqlen_k: int, tot_k: int) -> torch.Tensor:
    """(len(rows), seqlen_k) bool mask of spec section 4."""
    cols = torch.arange(seqlen_k, device=rows.device)
    key_pos = cols * a.cp_world_size + a.cp_rank if a.cp_world_size > 1 else cols
    diag = (rows + tot_k - seqlen_q)[:, None]
    key_pos = key_pos[None, :]
    ok = torch.ones(rows.shape[0], seqlen_k, dtype=torch.bool, device=rows.device)
    if a.window_left >= 0:
        ok &= key_pos >= diag - a.window_left
    if a.window_right >= 0:
        ok &= key_pos <= diag + a.window_right
    if a.attention_chunk > 0:
        start = diag - torch.remainder(diag, a.attention_chunk)
        ok &= (key_pos >= start) & (key_pos < start + a.attention_chunk)
    return ok


def _scores(a, q, k, qv, v, mask):
    """Grouped scores (Hk, G, M, N) in fp32 with softcap and mask applied (-inf where masked)."""
    hk = k.shape[1]
    m, hq, _ = q.shape
    g = hq // hk
    qg = q.reshape(m, hk, g, -1).permute(1, 2, 0, 3)
    s = torch.matmul(qg, k.permute(1, 2, 0).unsqueeze(1))
    if qv is not None:
        s = s + torch.matmul(qv.reshape(m, hk, g, -1).permute(1, 2, 0, 3), v.permute(1, 2, 0).unsqueeze(1))
    s = s * a.softmax_scale
    if a.softcap > 0:
        s = a.softcap * torch.tanh(s / a.softcap)
    return s.masked_fill(~mask, float("-inf"))


class _Batch:
    """One batch row's operands, upcast, plus the geometry of its mask."""

    def __init__(self, a: AttnArgs, layout: _Layout, b: int):
        self.group = a.num_heads_q // a.num_heads_kv
        q_flat = a.q.reshape(-1, *a.q.shape[-2:])
        self.q_start, self.seqlen_q = layout.q_rows(b)
        self.q = _upcast(q_flat[self.q_start: self.q_start + self.seqlen_q], a.q_descale, b, self.group)
        self.k = _upcast(layout.kv(b, a.k), a.k_descale, b, self.group)
        self.v = _upcast(layout.kv(b, a.v), a.v_descale, b, self.group)
        self.qv = None
        if a.qv is not None:
            self.qv = a.qv.reshape(-1, *a.qv.shape[-2:])[self.q_start: self.q_start + self.seqlen_q].float()
        self.seqlen_k = self.k.shape[0]
        self.tot_k = layout.cp_tot[b] if a.cp_world_size > 1 else self.seqlen_k
        self.chunk = max(1, _CHUNK_ELEMENTS // max(1, a.num_heads_q * max(self.seqlen_k, 1)))

    def chunks(self):
        for start in range(0, self.seqlen_q, self.chunk):
            yield start, min(self.seqlen_q, start + self.chunk)


def _lse_view(a: AttnArgs, lse: torch.Tensor, b: int, q_start: int, rows: slice) -> torch.Tensor:
    """(Hq, rows) view of batch b's LSE in the official layout."""
    if a.is_varlen_q:
        return lse[:, q_start + rows.start: q_start + rows.stop]
    return lse[b, :, rows]


def forward(a: AttnArgs) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _Layout(a)
    hq, dv = a.num_heads_q, a.head_dim_v
    out = torch.zeros(*a.q.shape[:-1], dv, dtype=a.out_dtype, device=a.q.device)
    out_flat = out.view(-1, hq, dv)
    if a.is_varlen_q:
        lse = torch.full((hq, a.q.shape[0]), math.inf, dtype=torch.float32, device=a.q.device)
    else:
        lse = torch.full((a.q.shape[0], hq, a.q.shape[1]), math.inf, dtype=torch.float32, device=a.q.device)
    sinks = None if a.sinks is None else a.sinks.float().view(a.num_heads_kv, -1, 1, 1)
    for b in range(a.batch_size):
        x = _Batch(a, layout, b)
        if x.seqlen_k == 0:  # no keys: out stays 0, lse +inf
            continue
        for start, stop in x.chunks():
            rows = torch.arange(start, stop, device=a.q.device)
            mask = _allowed(a, rows, x.seqlen_q, x.seqlen_k, x.tot_k)
            s = _scores(a, x.q[start:stop], x.k, None if x.qv is None else x.qv[start:stop], x.v, mask)
            row_max = s.amax(dim=-1, keepdim=True)
            if sinks is not None:
                row_max = torch.maximum(row_max, sinks)
            row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
            p = torch.exp(s - row_max)
            denom = p.sum(dim=-1, keepdim=True)
            if sinks is not None:
                denom = denom + torch.exp(sinks - row_max)
            o = torch.matmul(p, x.v.permute(1, 0, 2).unsqueeze(1)) / denom
            row_lse = (row_max + torch.log(denom)).squeeze(-1)
            has_key = mask.any(dim=-1)
            o = torch.where(has_key[None, None, :, None], o, torch.zeros_like(o))
            row_lse = torch.where(has_key[None, None, :], row_lse, torch.full_like(row_lse, math.inf))
            # (Hk, G, M, Dv) -> (M, Hq, Dv); query head h = hk * G + g.
            o = o.permute(2, 0, 1, 3).reshape(stop - start, hq, dv)
            out_flat[x.q_start + start: x.q_start + stop] = o.to(out.dtype)
            _lse_view(a, lse, b, x.q_start, slice(start, stop)).copy_(row_lse.reshape(hq, -1))
    return out, lse


def backward(dout, q, k, v, out, lse, a: AttnArgs, deterministic: bool, grads=None):
    """grads (buffers to write into) is accepted and left to the op layer, which copies."""
    layout = _Layout(a)
    hq, hk = a.num_heads_q, a.num_heads_kv
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    dq_flat, dout_flat, out_flat = (t.reshape(-1, *t.shape[-2:]) for t in (dq, dout, out))
    for b in range(a.batch_size):
        x = _Batch(a, layout, b)
        if x.seqlen_k == 0:
            continue
        dk_b, dv_b = layout.kv(b, dk), layout.kv(b, dv)
        for start, stop in x.chunks():
            rows = torch.arange(start, stop, device=q.device)
            m = stop - start
            q_rows = slice(x.q_start + start, x.q_start + stop)
            mask = _allowed(a, rows, x.seqlen_q, x.seqlen_k, x.tot_k)
            s = _scores(a, x.q[start:stop], x.k, None, x.v, mask)
            row_lse = _lse_view(a, lse, b, x.q_start, slice(start, stop)).reshape(hk, -1, m, 1)
            p = torch.exp(s - row_lse)
            p = torch.where(torch.isinf(row_lse), torch.zeros_like(p), p)
            do = dout_flat[q_rows].float().reshape(m, hk, -1, dout.shape[-1]).permute(1, 2, 0, 3)
            o = out_flat[q_rows].float().reshape(m, hk, -1, out.shape[-1]).permute(1, 2, 0, 3)
            delta = (do * o).sum(dim=-1, keepdim=True)
            dv_b += torch.matmul(p.transpose(-1, -2), do).sum(dim=1).permute(1, 0, 2)
            dp = torch.matmul(do, x.v.permute(1, 2, 0).unsqueeze(1))
            ds = p * (dp - delta)
            if a.softcap > 0:
                ds = ds * (1 - (torch.where(mask, s, torch.zeros_like(s)) / a.softcap) ** 2)
            ds = ds * a.softmax_scale
            dq_flat[q_rows] += torch.matmul(ds, x.k.permute(1, 0, 2).unsqueeze(1)).permute(2, 0, 1, 3).reshape(m, hq, -1)
            qg = x.q[start:stop].reshape(m, hk, -1, q.shape[-1]).permute(1, 2, 0, 3)
            dk_b += torch.matmul(ds.transpose(-1, -2), qg).sum(dim=1).permute(1, 0, 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (S, H, D) at per-token positions (S,); dims past rotary_dim untouched."""
    half = cos.shape[1]
    rd = 2 * half
    # Positions past the table (a contiguous cache may take a shorter one) stay unrotated, as
    # in the kernels, which never read past it.
    inside = (positions < cos.shape[0])[:, None, None]
    rows = positions.clamp(max=cos.shape[0] - 1)
    c = torch.where(inside, cos[rows].float()[:, None, :], 1.0)
    s = torch.where(inside, sin[rows].float()[:, None, :], 0.0)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0:rd:2], xf[..., 1:rd:2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., :half], xf[..., half:rd]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    result = torch.cat((rotated, xf[..., rd:]), dim=-1)
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # A rotation can leave fp8's range (sqrt(2) * 448): saturate as the official kernels do
        # (cvt satfinite). CUDA's cast would give NaN there; the CPU's happens to saturate.
        limit = torch.finfo(x.dtype).max
        result = result.clamp(-limit, limit)
    return result.to(x.dtype)


def append_kv(k_cache, v_cache, k_new, v_new, q, rotary_cos, rotary_sin, cache_seqlens,
              cache_batch_idx, cache_leftpad, page_table, cu_seqlens_q, cu_seqlens_k_new,
              rotary_seqlens, rotary_interleaved, rotate_q_per_token, max_seqlen_q):
    batch = cache_seqlens.shape[0]
    seqlens = cache_seqlens.tolist()
    rows = _host(cache_batch_idx) or list(range(batch))
    cu_new = _host(cu_seqlens_k_new)
    cu_q = _host(cu_seqlens_q)
    offsets = _host(rotary_seqlens) or seqlens
    q_out = q.clone() if rotary_cos is not None else q
    for b in range(batch):
        if cu_new is not None:
            kb, vb = k_new[cu_new[b]: cu_new[b + 1]], v_new[cu_new[b]: cu_new[b + 1]]
        else:
            kb, vb = k_new[b], v_new[b]
        n = kb.shape[0]
        positions = torch.arange(seqlens[b], seqlens[b] + n, device=k_cache.device)
        # Tokens that would land past the cache are dropped, as the triton kernel does: the
        # lengths are values no check reads, and the write must stay inside the cache.
        capacity = page_table.shape[1] * k_cache.shape[1] if page_table is not None else k_cache.shape[1]
        keep = positions < capacity
        positions, kb, vb = positions[keep], kb[keep], vb[keep]
        if rotary_cos is not None:
            kb = _rotate(kb, rotary_cos, rotary_sin, positions - seqlens[b] + offsets[b], rotary_interleaved)
        if page_table is not None:
            page_size = k_cache.shape[1]
            phys = page_table[rows[b]].long()[positions // page_size]
            k_cache[phys, positions % page_size] = kb.to(k_cache.dtype)
            v_cache[phys, positions % page_size] = vb.to(v_cache.dtype)
        else:
            k_cache[rows[b], positions] = kb.to(k_cache.dtype)
            v_cache[rows[b], positions] = vb.to(v_cache.dtype)
        if rotary_cos is not None:
            qb = q_out[cu_q[b]: cu_q[b + 1]] if cu_q is not None else q_out[b]
            steps = torch.arange(qb.shape[0], device=q.device) if rotate_q_per_token else torch.zeros(qb.shape[0], dtype=torch.long, device=q.device)
            qb.copy_(_rotate(qb, rotary_cos, rotary_sin, steps + offsets[b], rotary_interleaved))
    return q_out


def combine(out_partial: torch.Tensor, lse_partial: torch.Tensor, out_dtype: torch.dtype):
    lse = torch.logsumexp(lse_partial, dim=0)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    weights = torch.where(finite.unsqueeze(0), torch.exp(lse_partial - safe.unsqueeze(0)), torch.zeros_like(lse_partial))
    out = (weights.unsqueeze(-1) * out_partial).sum(dim=0)
    return out.to(out_dtype), lse

"""Decode context parallelism: a KV cache sharded across ranks by token interleaving.

Rank r holds the cache tokens t with t % W == r, at local position t // W: the layout that the
kernels' cp_world_size / cp_rank / cp_tot_seqused_k arguments describe (as in MATE and vLLM's
decode context parallelism). Every rank gets the same queries and new tokens; it appends the new
tokens it owns, attends over its shard (the kernel maps local key j to global position j·W + r for
the causal and window limits), and the ranks merge their (out, lse) pairs with flash_attn_combine
after one all_gather. A new token lands on the rank that owns its position, so the shards stay
balanced within one token.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import interface
from ._checks import DTYPES, check_mask
from ._compile import eager_under_compile
from ._comm import agree, all_gather, resolve_group, shape_facts

__all__ = ["cp_flash_attn_with_kvcache", "local_cache_seqlens", "shard_kv_cache"]


def local_cache_seqlens(cache_seqlens: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """How many of the first cache_seqlens[b] tokens rank holds: int32 (batch_size,)."""
    counts = torch.div(cache_seqlens.long() + (world_size - 1 - rank), world_size, rounding_mode="floor")
    return counts.clamp_min(0).to(torch.int32)


def shard_kv_cache(cache: torch.Tensor, world_size: int, rank: int, capacity: Optional[int] = None) -> torch.Tensor:
    """The rank's interleaved shard of a whole cache (batch, seqlen_cache, num_heads_kv, head_dim):
    tokens rank, rank + W, ... -> (batch, capacity, ...) with capacity (default ceil(seqlen_cache /
    W)) rows, the tail past the shard zero."""
    shard = cache[:, rank::world_size]
    capacity = -(-cache.shape[1] // world_size) if capacity is None else capacity
    out = cache.new_zeros(cache.shape[0], capacity, *cache.shape[2:])
    out[:, : shard.shape[1]] = shard[:, :capacity]
    return out


def _owned_new_tokens(seqlens: list[int], seqlen_new: int, world_size: int, rank: int):
    """Rows of the packed new tokens (batch * seqlen_new) that rank owns, and their per-row counts:
    new token t of row b sits at global position seqlens[b] + t."""
    rows, counts = [], []
    for b, cached_len in enumerate(seqlens):
        first = (rank - cached_len) % world_size
        mine = list(range(first, seqlen_new, world_size))
        rows += [b * seqlen_new + t for t in mine]
        counts.append(len(mine))
    return rows, counts


def _check(q, k_cache, v_cache, k, v, seqlens) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (batch_size, seqlen_q, num_heads, head_dim); got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16 or bfloat16; got {q.dtype}")
    if (k is None) != (v is None):
        raise ValueError("k and v (the new tokens) must be given together")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != q.shape[0]:
                raise ValueError(f"{name} must be (batch_size={q.shape[0]}, seqlen_new, num_heads_kv, head_dim); got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must hold the same number of new tokens; got {k.shape[1]} and {v.shape[1]}")
    if len(seqlens) != q.shape[0]:
        raise ValueError(f"cache_seqlens must have batch_size = {q.shape[0]} entries; got {len(seqlens)}")
    if any(n < 0 for n in seqlens):
        raise ValueError(f"cache_seqlens must be >= 0; got {seqlens}")


@eager_under_compile
def cp_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens: Union[int, torch.Tensor],
                               group=None, page_table=None, cache_batch_idx=None, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, num_splits=0, return_softmax_lse=False,
                               validate_ranks=True):
    """One decode (or chunked-prefill) step against a KV cache interleaved over the ranks of group.

    q: (batch_size, seqlen_q, num_heads, head_dim), the same on every rank. k_cache / v_cache: this
    rank's shard (batch_size_cache, capacity, num_heads_kv, head_dim / head_dim_v), or paged
    (num_pages, page_size, ...) with page_table int32 (batch_size, max_pages) of this rank's pages.
    k / v: new tokens (batch_size, seqlen_new, num_heads_kv, ...), the same on every rank; each rank
    writes the ones it owns into its shard in place. cache_seqlens: int or int32 (batch_size,), the
    GLOBAL number of tokens already cached per row, the same on every rank. Rotary embeddings are
    not applied here: rotate q and k at their global positions (cache_seqlens + t) first.
    causal / window_size / softcap as in flash_attn_with_kvcache, in global positions.
    Returns out (batch_size, seqlen_q, num_heads, head_dim_v), the same on every rank, and
    softmax_lse (batch_size, num_heads, seqlen_q) fp32 too with return_softmax_lse.
    """
    group, world_size, rank = resolve_group(group)
    batch_size = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    error = None
    seqlens: list[int] = []
    try:
        if isinstance(cache_seqlens, int):
            seqlens = [cache_seqlens] * batch_size
        elif isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dim() == 1 and cache_seqlens.dtype == torch.int32:
            seqlens = [int(n) for n in cache_seqlens.tolist()]  # one host read: which rank owns each new token
        else:
            raise TypeError("cache_seqlens must be an int or an int32 tensor (batch_size,) of global lengths")
        _check(q, k_cache, v_cache, k, v, seqlens)
        check_mask(causal, window_size, softcap)
    except (TypeError, ValueError) as exc:
        error = exc
    if validate_ranks:
        facts = shape_facts("q", q, 4) + shape_facts("k", k, 4) + shape_facts("v", v, 4)
        facts += [("cache_seqlens", hash(tuple(seqlens))), ("causal", int(bool(causal))),
                  ("window_size", hash(tuple(int(w) for w in window_size)) if error is None else -1),
                  ("softcap", hash(float(softcap)) if error is None else -1)]
        agree("cp_flash_attn_with_kvcache", group, world_size, q, error, facts)
    elif error is not None:
        raise error

    device = q.device
    seqlen_new = 0 if k is None else k.shape[1]
    total = torch.tensor([n + seqlen_new for n in seqlens], dtype=torch.int32, device=device)
    local = local_cache_seqlens(torch.tensor(seqlens, dtype=torch.int32, device=device), world_size, rank)
    k_new = v_new = cu_new = None
    if seqlen_new:
        rows, counts = _owned_new_tokens(seqlens, seqlen_new, world_size, rank)
        if rows:
            index = torch.tensor(rows, dtype=torch.long, device=device)
            k_new = k.reshape(-1, *k.shape[2:]).index_select(0, index)
            v_new = v.reshape(-1, *v.shape[2:]).index_select(0, index)
            cu_new = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    cp = dict(cp_world_size=world_size, cp_rank=rank, cp_tot_seqused_k=total) if world_size > 1 else {}
    out, lse, *_ = interface.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=local, cache_batch_idx=cache_batch_idx,
        page_table=page_table, cu_seqlens_k_new=cu_new, softmax_scale=softmax_scale, causal=causal,
        window_size=tuple(window_size), softcap=softcap, num_splits=num_splits, return_softmax_lse=True, **cp)
    if world_size > 1:
        outs = all_gather(out, group, world_size)  # (W, B, Sq, H, Dv)
        lses = all_gather(lse, group, world_size).transpose(2, 3)  # (W, B, Sq, H)
        # A rank without keys for a row reports +inf (no keys); for the merge it must weigh nothing.
        lses = torch.where(lses == torch.inf, -torch.inf, lses).contiguous()
        out, merged = interface.flash_attn_combine(outs.float(), lses, out_dtype=q.dtype)
        lse = torch.where(merged == -torch.inf, torch.inf, merged).transpose(1, 2).contiguous()
    return (out, lse) if return_softmax_lse else out

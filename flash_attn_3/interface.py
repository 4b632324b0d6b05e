"""The public FlashAttention-3 functions: official names, argument order, defaults and returns.

Each function normalizes its arguments, validates them (checks.py) and calls the op layer (ops.py).
Extension keywords of the MATE wrapper and vLLM's fork follow the official parameters.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import checks, ops
from .backends.params import AttnArgs


def _default_scale(q: torch.Tensor, qv: Optional[torch.Tensor], softmax_scale: Optional[float]) -> float:
    if softmax_scale is not None:
        return float(softmax_scale)
    return (q.shape[-1] + (qv.shape[-1] if qv is not None else 0)) ** -0.5


def _pick_sinks(sinks, s_aux):
    """sinks or its alias s_aux, as fp32 (clients such as transformers send the query dtype)."""
    if sinks is not None and s_aux is not None:
        raise ValueError("pass sinks or its alias s_aux, not both")
    sinks = sinks if sinks is not None else s_aux
    if isinstance(sinks, torch.Tensor) and sinks.dtype in (torch.float16, torch.bfloat16):
        sinks = sinks.float()
    return _unit_stride(sinks)


def _unit_stride(t):
    """t with a unit-stride last dimension, copied only when it lacks one.

    The kernels index q/k/v rows, index tensors (cu_seqlens, seqused, cache_seqlens, page_table
    columns, ...) and rotary tables with stride 1 along the last dimension; a strided or expanded
    view (e.g. cache_seqlens = torch.tensor([n]).expand(B)) would make them read the wrong entries
    or past the end. The official wrapper copies such inputs too (maybe_contiguous), so they are
    accepted, not refused. Never applied to a KV cache: appending into a copy would lose the write.
    """
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _unit_strides(*tensors):
    """_unit_stride of each; the Nones, most of a call's optional tensors, cost no call."""
    return [t if t is None else _unit_stride(t) for t in tensors]


def _attention(q, k, v, **kwargs):
    """Normalize, validate and run the forward op; returns (out, lse), out written into the
    `out` argument when one is given."""
    return ops.forward(_forward_args(q, k, v, **kwargs))


def _forward_args(
    q, k, v, *, softmax_scale, causal, window_size, attention_chunk, softcap, deterministic,
    sm_margin, qv=None, out=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
    seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None,
    leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, sinks=None, num_splits=1,
    pack_gqa=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None, scheduler_metadata=None,
    k_name="k", v_name="v", public_names=None, validated=False,
) -> AttnArgs:
    """The call's AttnArgs, normalized and validated. validated: the caller has already made the
    tensors unit-stride and validated them (flash_attn_with_kvcache)."""
    if not validated:
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, kv_batch_idx, leftpad_k, \
            cp_tot_seqused_k, scheduler_metadata = _unit_strides(
                q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, kv_batch_idx, leftpad_k,
                cp_tot_seqused_k, scheduler_metadata)
    if isinstance(q, torch.Tensor) and q.dtype != torch.float8_e4m3fn:
        # The official forward reads descales only for fp8 inputs and ignores them otherwise.
        q_descale = k_descale = v_descale = None
    left, right = checks.check_window(window_size)
    max_seqlen_q = checks.as_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = checks.as_int("max_seqlen_k", max_seqlen_k)
    if not validated:
        checks.check_attention_inputs(
            q, k, v, qv=qv, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, page_table=page_table, kv_batch_idx=kv_batch_idx,
            leftpad_k=leftpad_k, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
            sinks=sinks, cp_world_size=cp_world_size, cp_rank=cp_rank,
            cp_tot_seqused_k=cp_tot_seqused_k, scheduler_metadata=scheduler_metadata,
            attention_chunk=attention_chunk, softcap=softcap, num_splits=num_splits,
            sm_margin=sm_margin, k_name=k_name, v_name=v_name, public_names=public_names,
        )
    if max_seqlen_q is None:
        max_seqlen_q = q.shape[1]
    if max_seqlen_k is None:
        max_seqlen_k = k.shape[1] * page_table.shape[1] if page_table is not None else k.shape[1]
    if causal:
        right = 0
    return AttnArgs(
        q=q, k=k, v=v, qv=qv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), page_table=page_table, kv_batch_idx=kv_batch_idx,
        leftpad_k=leftpad_k, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        sinks=sinks, softmax_scale=_default_scale(q, qv, softmax_scale), window_left=left,
        window_right=right, attention_chunk=int(attention_chunk), softcap=float(softcap),
        num_splits=int(num_splits), pack_gqa=pack_gqa, cp_world_size=int(cp_world_size),
        cp_rank=int(cp_rank), cp_tot_seqused_k=cp_tot_seqused_k,
        scheduler_metadata=scheduler_metadata, deterministic=bool(deterministic),
        sm_margin=int(sm_margin), out=out,
    )


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
    return_softmax_lse=False,
    sinks=None,
    s_aux=None,
    cp_world_size=1,
    cp_rank=0,
    cp_tot_seqused_k=None,
):
    """Attention over fixed-length batches.

    q: (batch_size, seqlen_q, num_heads, head_dim); k: (batch_size, seqlen_k, num_heads_kv, head_dim);
    v: (batch_size, seqlen_k, num_heads_kv, head_dim_v); num_heads divisible by num_heads_kv (GQA/MQA).
    softmax_scale defaults to 1/sqrt(head_dim) (1/sqrt(head_dim + head_dim_v) with qv). causal aligns
    the diagonal bottom-right; window_size (left, right), -1 = unbounded; attention_chunk > 0 limits
    keys to the query's chunk; softcap > 0 applies c*tanh(s/c). qv: (batch_size, seqlen_q, num_heads,
    head_dim_v) adds qv.v to the scores (absorbed MLA). q/k/v_descale: (batch_size, num_heads_kv)
    fp32, fp8 inputs only. num_splits, pack_gqa, sm_margin tune speed only. deterministic makes the
    backward bitwise reproducible. Extensions: sinks / s_aux (num_heads,) fp32 sink logits;
    cp_world_size, cp_rank, cp_tot_seqused_k for context parallelism.
    Returns out (batch_size, seqlen_q, num_heads, head_dim_v), and softmax_lse (batch_size, num_heads,
    seqlen_q) fp32 too when return_attn_probs or return_softmax_lse.
    """
    out, lse = _attention(
        q, k, v, qv=qv, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        sinks=_pick_sinks(sinks, s_aux), softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, attention_chunk=attention_chunk, softcap=softcap,
        num_splits=num_splits, pack_gqa=pack_gqa, deterministic=deterministic, sm_margin=sm_margin,
        cp_world_size=cp_world_size, cp_rank=cp_rank, cp_tot_seqused_k=cp_tot_seqused_k,
    )
    return (out, lse) if (return_attn_probs or return_softmax_lse) else out


def flash_attn_qkvpacked_func(
    qkv,
    softmax_scale=None,
    causal=False,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    deterministic=False,
    num_heads_q=None,
    sm_margin=0,
    return_attn_probs=False,
):
    """Attention with q, k, v stacked in one tensor.

    qkv: (batch_size, seqlen, 3, num_heads, head_dim), or (batch_size, seqlen, num_heads_q +
    2 * num_heads_kv, head_dim) with num_heads_q given (GQA). Other arguments as flash_attn_func.
    Returns out (batch_size, seqlen, num_heads_q, head_dim) [, softmax_lse (batch_size, num_heads_q,
    seqlen)]. Gradients flow back into qkv.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor; got {type(qkv).__name__}")
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"5-D qkv must be (batch_size, seqlen, 3, num_heads, head_dim); got {tuple(qkv.shape)}")
        q, k, v = qkv.unbind(dim=2)
    elif qkv.dim() == 4:
        if num_heads_q is None:
            raise ValueError("4-D qkv (batch_size, seqlen, num_heads_q + 2 * num_heads_kv, head_dim) needs num_heads_q")
        num_heads_kv, rest = divmod(qkv.shape[2] - num_heads_q, 2)
        if rest or num_heads_kv <= 0:
            raise ValueError(
                f"qkv has {qkv.shape[2]} heads, which is not num_heads_q ({num_heads_q}) + 2 * num_heads_kv"
            )
        q, k, v = qkv.split([num_heads_q, num_heads_kv, num_heads_kv], dim=2)
    else:
        raise ValueError(f"qkv must be 5-D or 4-D; got shape {tuple(qkv.shape)}")
    out, lse = _attention(
        q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        attention_chunk=attention_chunk, softcap=softcap, deterministic=deterministic,
        sm_margin=sm_margin,
    )
    return (out, lse) if return_attn_probs else out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
    return_softmax_lse=False,
    sinks=None,
    s_aux=None,
    cp_world_size=1,
    cp_rank=0,
    cp_tot_seqused_k=None,
    page_table=None,
    block_table=None,
    out=None,
):
    """Attention over packed variable-length sequences.

    q: (total_q, num_heads, head_dim); k: (total_k, num_heads_kv, head_dim); v: (total_k,
    num_heads_kv, head_dim_v); cu_seqlens_q / cu_seqlens_k: int32 (batch_size + 1,) offsets;
    max_seqlen_q / max_seqlen_k: Python ints. seqused_q / seqused_k: int32 (batch_size,) tokens used
    per sequence. Extensions: page_table (alias block_table) int32 (batch_size, max_pages) with k/v as
    (num_pages, page_size, num_heads_kv, head_dim) and cu_seqlens_k None (lengths from seqused_k);
    out: a (total_q, num_heads, head_dim_v) buffer to write into. Other arguments as flash_attn_func.
    Returns out [, softmax_lse (num_heads, total_q) fp32].
    """
    if page_table is not None and block_table is not None:
        raise ValueError("pass page_table or its alias block_table, not both")
    page_table = page_table if page_table is not None else block_table
    if page_table is not None and seqused_k is None:
        raise ValueError("seqused_k (int32 (batch_size,)) is required with page_table/block_table")
    if cu_seqlens_q is None:
        raise ValueError("cu_seqlens_q is required by flash_attn_varlen_func")
    if cu_seqlens_k is None and page_table is None:
        raise ValueError("cu_seqlens_k is required by flash_attn_varlen_func (unless K/V are paged)")
    result, lse = _attention(
        q, k, v, qv=qv, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, page_table=page_table, q_descale=q_descale,
        k_descale=k_descale, v_descale=v_descale, sinks=_pick_sinks(sinks, s_aux),
        softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        attention_chunk=attention_chunk, softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
        deterministic=deterministic, sm_margin=sm_margin, cp_world_size=cp_world_size,
        cp_rank=cp_rank, cp_tot_seqused_k=cp_tot_seqused_k,
    )
    return (result, lse) if (return_attn_probs or return_softmax_lse) else result


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merge split-KV partial results.

    out_partial: (num_splits, batch_size, seqlen, num_heads, head_dim) fp32; lse_partial:
    (num_splits, batch_size, seqlen, num_heads) fp32. lse = logsumexp over splits, out = sum over
    splits of exp(lse_s - lse) * out_s. Returns (out (batch_size, seqlen, num_heads, head_dim) in
    out_dtype (default fp32, or out's dtype when out is given), lse (batch_size, seqlen, num_heads)).
    """
    checks.check_combine_inputs(out_partial, lse_partial, out, out_dtype)
    if out_dtype is None:
        out_dtype = out.dtype if out is not None else torch.float32
    result, lse = ops.flash_attn_combine(out_partial, lse_partial, out_dtype)
    if out is not None:
        out.copy_(result)
        result = out
    return result, lse


_KVCACHE_NAMES = {"kv_batch_idx": "cache_batch_idx", "leftpad_k": "cache_leftpad", "seqused_k": "cache_seqlens"}


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    qv=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    rotary_seqlens: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    rotary_interleaved=True,
    scheduler_metadata=None,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
    return_softmax_lse=False,
    sinks=None,
    s_aux=None,
    cp_world_size=1,
    cp_rank=0,
    cp_tot_seqused_k=None,
):
    """Attention against a KV cache, optionally appending new keys/values in place first.

    q: (batch_size, seqlen_q, num_heads, head_dim), or (total_q, num_heads, head_dim) with
    cu_seqlens_q and max_seqlen_q. k_cache / v_cache: (batch_size_cache, seqlen_cache, num_heads_kv,
    head_dim / head_dim_v), or (num_pages, page_size, num_heads_kv, ...) with page_table int32
    (batch_size, max_pages) (any page size). k / v: new tokens (batch_size, seqlen_new, num_heads_kv,
    ...) or (total_new, num_heads_kv, ...) with cu_seqlens_k_new; they are written in place at
    positions cache_seqlens[b] ..; attention then covers cache_seqlens[b] + new tokens.
    rotary_cos / rotary_sin: (seqlen_ro, rotary_dim / 2) rotate the new keys at rotary_seqlens[b]
    (default cache_seqlens[b]) + t and q (per token when causal or local, else all at that
    position); rotary_interleaved pairs (0,1),(2,3).. else (i, i + rotary_dim/2). cache_seqlens: int or
    int32 (batch_size,); cache_batch_idx: int32 (batch_size,) cache row (or page-table row) per batch
    row; cache_leftpad: int32 (batch_size,) first valid cache position. scheduler_metadata,
    num_splits (0 = heuristic), pack_gqa, sm_margin tune speed only.
    Returns out (q's shape with head_dim_v), or (out, softmax_lse, out_accum, softmax_lse_accum)
    with return_softmax_lse (the accumulators are empty: splits are merged internally).
    """
    inputs = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              page_table, rotary_seqlens, sinks, scheduler_metadata)
    if type(window_size) is list:  # the same window as the tuple, and hashable for the plan key
        window_size = tuple(window_size)
    key = None
    if (qv is None and cu_seqlens_q is None and cu_seqlens_k_new is None and max_seqlen_q is None
            and q_descale is None and k_descale is None and v_descale is None and s_aux is None
            and cp_tot_seqused_k is None and type(cache_seqlens) is torch.Tensor
            and ops.plain_context()):
        key = _plan_key(inputs, (
            softmax_scale, causal, window_size, attention_chunk, softcap, rotary_interleaved, num_splits,
            pack_gqa, sm_margin, return_softmax_lse, cp_world_size, cp_rank))
        plan = _KVCACHE_PLANS.get(key) if key is not None else None
        if plan is not None:
            result = plan(inputs)
            if result is not None:
                return _kvcache_result(*result, return_softmax_lse)

    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor; got {type(q).__name__}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        checks.check_tensor(name, t, device=q.device)
        checks.check_last_dim_contiguous(name, t)
    q, k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, page_table, cu_seqlens_q, cu_seqlens_k_new, \
        rotary_seqlens, cache_seqlens, scheduler_metadata, cp_tot_seqused_k = _unit_strides(
            q, k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, page_table, cu_seqlens_q,
            cu_seqlens_k_new, rotary_seqlens, cache_seqlens, scheduler_metadata, cp_tot_seqused_k)
    # The official forward reads these only with what they describe, and ignores them otherwise.
    if rotary_cos is None and rotary_sin is None:
        rotary_seqlens = None
    if k is None and v is None:
        cu_seqlens_k_new = None
    max_seqlen_q = checks.as_int("max_seqlen_q", max_seqlen_q)
    if cu_seqlens_q is not None and max_seqlen_q is None:
        raise ValueError("max_seqlen_q (a Python int) is required with cu_seqlens_q")
    batch_size = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    if isinstance(cache_seqlens, bool) or not (cache_seqlens is None or isinstance(cache_seqlens, (int, torch.Tensor))):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor; got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch_size,), cache_seqlens, dtype=torch.int32, device=q.device)
    checks.check_index("cache_seqlens", cache_seqlens, device=q.device, shape=(batch_size,), meaning="(batch_size,)")
    sinks = _pick_sinks(sinks, s_aux)
    checks.check_append_inputs(
        q, k_cache, v_cache, k, v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k_new=cu_seqlens_k_new,
        rotary_seqlens=rotary_seqlens, page_table=page_table, batch_size=batch_size,
    )
    # Validated here once, for both paths: before the append writes into the cache.
    checks.check_attention_inputs(
        q, k_cache, v_cache, qv=qv, out=None, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=None,
        seqused_q=None, seqused_k=cache_seqlens, max_seqlen_q=max_seqlen_q, max_seqlen_k=None,
        page_table=page_table, kv_batch_idx=cache_batch_idx, leftpad_k=cache_leftpad,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, sinks=sinks,
        cp_world_size=cp_world_size, cp_rank=cp_rank, cp_tot_seqused_k=cp_tot_seqused_k,
        scheduler_metadata=scheduler_metadata, attention_chunk=attention_chunk, softcap=softcap,
        num_splits=num_splits, sm_margin=sm_margin, k_name="k_cache", v_name="v_cache",
        public_names=_KVCACHE_NAMES,
    )
    # The attention half converts it after append_kv has written: a bad one must fail first.
    softmax_scale = _default_scale(q, qv, softmax_scale)
    append_args = None
    if k is not None:
        left, right = checks.check_window(window_size)
        rotate_q_per_token = bool(causal) or left >= 0 or right >= 0 or attention_chunk > 0
        append_args = (
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
            cache_leftpad, page_table, cu_seqlens_q, cu_seqlens_k_new, rotary_seqlens,
            bool(rotary_interleaved), rotate_q_per_token, max_seqlen_q,
        )
    attention = dict(
        qv=qv, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, page_table=page_table,
        kv_batch_idx=cache_batch_idx, leftpad_k=cache_leftpad, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, sinks=sinks, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        attention_chunk=attention_chunk, softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
        deterministic=False, sm_margin=sm_margin, cp_world_size=cp_world_size, cp_rank=cp_rank,
        cp_tot_seqused_k=cp_tot_seqused_k, scheduler_metadata=scheduler_metadata,
        k_name="k_cache", v_name="v_cache", public_names=_KVCACHE_NAMES, validated=True,
    )
    if key is not None and key not in _KVCACHE_PLANS:
        # Validated above: this layout may now skip validation, dispatch and launch setup.
        if len(_KVCACHE_PLANS) >= _MAX_PLANS:
            _KVCACHE_PLANS.clear()
        _KVCACHE_PLANS[key] = plan = ops.kvcache_plan(
            inputs, append_args, _forward_args(q, k_cache, v_cache, seqused_k=cache_seqlens, **attention),
            k.shape[1] if k is not None else 0, bool(return_softmax_lse))
        if plan is not None:
            result = plan(inputs)
            if result is not None:
                return _kvcache_result(*result, return_softmax_lse)

    seqused_k = cache_seqlens
    if append_args is not None:
        q_rotated = ops.append_kv(*append_args)
        if rotary_cos is not None:
            q = q_rotated
        if cu_seqlens_k_new is not None:
            seqused_k = cache_seqlens + (cu_seqlens_k_new[1:] - cu_seqlens_k_new[:-1])
        else:
            seqused_k = cache_seqlens + k.shape[1]
    out, lse = _attention(q, k_cache, v_cache, seqused_k=seqused_k, **attention)
    return _kvcache_result(out, lse, return_softmax_lse)


def _kvcache_result(out, lse, return_softmax_lse):
    if not return_softmax_lse:
        return out
    empty = out.new_empty((0,), dtype=torch.float32)
    return out, lse, empty, empty


# Plans of repeat flash_attn_with_kvcache calls (ops.kvcache_plan; None: the call has none), keyed
# by _plan_key. A decode loop repeats one key per batch shape, so the bound only stops growth.
_KVCACHE_PLANS: dict = {}
_MAX_PLANS = 256
_PLAIN = frozenset((int, float, bool, type(None), tuple))


class _NoKey(Exception):
    pass


def _tensor_key(t):
    if t is None:
        return None
    if type(t) is not torch.Tensor:
        raise _NoKey
    return t.shape, t.stride(), t.dtype, t.device, t.requires_grad


def _plan_key(inputs, scalars):
    """Everything validation, normalization and dispatch read from a flash_attn_with_kvcache call:
    each tensor's shape, strides, dtype, device and requires_grad, the Python scalars by value,
    and the environment dispatch reads; None for a call that cannot have a plan. Equal keys mean
    equal validation outcomes, so a plan replays only calls that passed it."""
    if not _PLAIN.issuperset(map(type, scalars)):
        return None
    window_size = scalars[2]
    if type(window_size) is tuple and not _PLAIN.issuperset(map(type, window_size)):
        return None
    if inputs[0] is None:  # no q: the slow path says so
        return None
    try:
        tensors = tuple(map(_tensor_key, inputs))
    except _NoKey:
        return None
    return tensors, scalars, ops.plan_env(inputs[0].is_cuda)


def get_scheduler_metadata(
    batch_size,
    max_seqlen_q,
    max_seqlen_k,
    num_heads_q,
    num_heads_kv,
    headdim,
    cache_seqlens: torch.Tensor,
    qkv_dtype=torch.bfloat16,
    headdim_v=None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_size: Optional[int] = None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    has_softcap=False,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
):
    """Precompute the split schedule of a flash_attn_with_kvcache call with these arguments.

    cache_seqlens: int32 (batch_size,). Returns an int32 tensor on cache_seqlens' device, shape
    (batch_size + 1,) (layout in flash_attn_3/metadata.py), to pass as scheduler_metadata.
    """
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 tensor; got {type(cache_seqlens).__name__}")
    device = cache_seqlens.device
    cache_seqlens, cu_seqlens_q, cu_seqlens_k_new, cache_leftpad = (
        _unit_stride(t) for t in (cache_seqlens, cu_seqlens_q, cu_seqlens_k_new, cache_leftpad)
    )
    checks.check_index("cache_seqlens", cache_seqlens, device=device, shape=(batch_size,), meaning="(batch_size,)")
    checks.check_index("cu_seqlens_q", cu_seqlens_q, device=device, shape=(batch_size + 1,), meaning="(batch_size + 1,)")
    checks.check_index("cu_seqlens_k_new", cu_seqlens_k_new, device=device, shape=(batch_size + 1,), meaning="(batch_size + 1,)")
    checks.check_index("cache_leftpad", cache_leftpad, device=device, shape=(batch_size,), meaning="(batch_size,)")
    checks.check_heads(num_heads_q, num_heads_kv)
    headdim_v = headdim if headdim_v is None else headdim_v
    checks.check_dtype("qkv_dtype", torch.empty(0, dtype=qkv_dtype), checks.INPUT_DTYPES)
    left, right = checks.check_window(window_size)
    if causal:
        right = 0
    checks.check_scalars(attention_chunk, 0.0, num_splits, sm_margin)
    return ops.get_scheduler_metadata(
        int(batch_size), int(max_seqlen_q), int(max_seqlen_k), int(num_heads_q), int(num_heads_kv),
        int(headdim), int(headdim_v), cache_seqlens, cu_seqlens_q, cu_seqlens_k_new, cache_leftpad,
        page_size, int(max_seqlen_k_new), left, right, int(attention_chunk), bool(has_softcap),
        int(num_splits), pack_gqa, int(sm_margin),
    )

"""Input validation shared by every public entry: one place for the messages.

Everything here reads shapes, dtypes, strides and devices only, never tensor values: a check that
read values would synchronize with the device, break CUDA-graph capture and torch.compile tracing.
All checks run before any buffer is written, so a refused call leaves the KV cache as it was.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

from .metadata import metadata_shape

MAX_HEAD_DIM = 256
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
INDEX_DTYPE = torch.int32


def _describe(t: torch.Tensor) -> str:
    return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def as_int(name: str, value) -> Optional[int]:
    """A Python int from an int or a one-element integer tensor (transformers passes tensors)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or a one-element integer tensor; got {_describe(value)}")
        return int(value.item())
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be a Python int; got {value!r}")
    return operator.index(value)


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype}")


def check_tensor(name: str, t, *, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}); got {t.device}")
    return t


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension (stride 1); got strides {tuple(t.stride())}"
        )


def check_shape(name: str, t: torch.Tensor, expected: Sequence[Optional[int]], meaning: str) -> None:
    """expected: sizes, None for 'any'. meaning: the symbolic shape for the message."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {meaning} = {want}; got {tuple(t.shape)}")


def check_index(name: str, t: Optional[torch.Tensor], *, device, shape, meaning: str) -> None:
    if t is None:
        return
    check_tensor(name, t, device=device)
    if t.dtype != INDEX_DTYPE:
        raise TypeError(f"{name} must be an int32 tensor; got {t.dtype}")
    check_shape(name, t, shape, meaning)


def check_head_dims(head_dim: int, head_dim_v: int, has_qv: bool, is_fp8: bool) -> None:
    for name, d in (("head dim of q/k", head_dim), ("head dim of v", head_dim_v)):
        if d % 8 != 0 or d <= 0:
            raise ValueError(f"{name} must be a positive multiple of 8; got {d}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim of q/k must be <= {MAX_HEAD_DIM}; got {head_dim}")
    if head_dim_v != head_dim:
        allowed = (128 < head_dim <= 192 and 96 < head_dim_v <= 128) or (
            head_dim <= 64 and head_dim_v <= 512
        )
        if not allowed:
            raise ValueError(
                "head dim of v may differ from that of q/k only for (128 < d <= 192, 96 < dv <= 128) "
                f"or (d <= 64, dv <= 512); got d={head_dim}, dv={head_dim_v}"
            )
    elif head_dim_v > MAX_HEAD_DIM:
        raise ValueError(f"head dim of v must be <= {MAX_HEAD_DIM}; got {head_dim_v}")
    if has_qv:
        if not (head_dim <= 64 and head_dim_v >= 256):
            raise ValueError(
                f"qv requires head dim of q/k <= 64 and head dim of v >= 256; got d={head_dim}, dv={head_dim_v}"
            )
        if is_fp8:
            raise TypeError("qv is supported for float16/bfloat16 inputs only; got float8_e4m3fn")


def check_heads(num_heads_q: int, num_heads_kv: int) -> None:
    if num_heads_kv <= 0 or num_heads_q % num_heads_kv != 0:
        raise ValueError(
            f"number of query heads ({num_heads_q}) must be divisible by the number of key/value "
            f"heads ({num_heads_kv})"
        )


def check_window(window_size) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints (left, right); got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded); got ({left}, {right})")
    return left, right


def check_scalars(attention_chunk: int, softcap: float, num_splits: int, sm_margin: int) -> None:
    if attention_chunk < 0:
        raise ValueError(f"attention_chunk must be >= 0 (0 = off); got {attention_chunk}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off); got {softcap}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 = heuristic); got {num_splits}")
    if sm_margin < 0:
        raise ValueError(f"sm_margin must be >= 0; got {sm_margin}")


def check_descales(q_descale, k_descale, v_descale, *, is_fp8: bool, batch_size: int, num_heads_kv: int, device) -> None:
    if not is_fp8:
        return  # the official forward ignores descales of fp16/bf16 inputs; the interface drops them
    for name, t in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if t is None:
            continue
        check_tensor(name, t, device=device)
        check_dtype(name, t, (torch.float32,))
        check_shape(name, t, (batch_size, num_heads_kv), "(batch_size, num_heads_kv)")


def check_sinks(sinks, *, num_heads_q: int, device) -> None:
    if sinks is None:
        return
    check_tensor("sinks", sinks, device=device)
    check_dtype("sinks", sinks, (torch.float32, torch.float16, torch.bfloat16))
    check_shape("sinks", sinks, (num_heads_q,), "(num_heads_q,)")


def check_context_parallel(cp_world_size: int, cp_rank: int, cp_tot_seqused_k, *, batch_size: int, device) -> None:
    if cp_world_size < 1:
        raise ValueError(f"cp_world_size must be >= 1; got {cp_world_size}")
    if not 0 <= cp_rank < cp_world_size:
        raise ValueError(f"cp_rank must be in [0, cp_world_size={cp_world_size}); got {cp_rank}")
    if cp_world_size > 1 and cp_tot_seqused_k is None:
        raise ValueError("cp_tot_seqused_k (int32 (batch_size,)) is required when cp_world_size > 1")
    check_index("cp_tot_seqused_k", cp_tot_seqused_k, device=device, shape=(batch_size,), meaning="(batch_size,)")


def check_scheduler_metadata(scheduler_metadata, *, batch_size: int, device) -> None:
    # On MUSA the tensor comes from MATE's own get_scheduler_metadata, whose layout is MATE's.
    if scheduler_metadata is None or device.type == "musa":
        return
    check_index(
        "scheduler_metadata", scheduler_metadata, device=device, shape=metadata_shape(batch_size),
        meaning="(batch_size + 1,) as returned by get_scheduler_metadata for this batch",
    )


def check_qkv(q, k, v, *, varlen_q: bool) -> None:
    """dtype, device, rank and head-count agreement of q, k, v."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor; got {type(q).__name__}")
    device = q.device
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, device=device)
    check_dtype("q", q, INPUT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype; q is {q.dtype}, {name} is {t.dtype}")
    q_rank = 3 if varlen_q else 4
    if q.dim() != q_rank:
        layout = "(total_q, num_heads, head_dim)" if varlen_q else "(batch_size, seqlen_q, num_heads, head_dim)"
        raise ValueError(f"q must be {q_rank}-D {layout}; got shape {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must agree in every dimension but the last; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_heads(q.shape[-2], k.shape[-2])
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim; got {q.shape[-1]} and {k.shape[-1]}")


def check_attention_inputs(
    q, k, v, *, qv, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
    max_seqlen_k, page_table, kv_batch_idx, leftpad_k, q_descale, k_descale, v_descale, sinks,
    cp_world_size, cp_rank, cp_tot_seqused_k, scheduler_metadata, attention_chunk, softcap,
    num_splits, sm_margin, k_name: str = "k", v_name: str = "v", public_names=None,
) -> None:
    """Everything the attention itself reads; shared by func, varlen and kvcache entries.

    public_names maps internal argument names to the caller's (kvcache: leftpad_k -> cache_leftpad).
    """
    public = {"k": k_name, "v": v_name, **(public_names or {})}
    varlen_q = cu_seqlens_q is not None
    check_qkv(q, k, v, varlen_q=varlen_q)
    device = q.device
    is_fp8 = q.dtype == torch.float8_e4m3fn
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    check_head_dims(head_dim, head_dim_v, qv is not None, is_fp8)
    num_heads_q, num_heads_kv = q.shape[-2], k.shape[-2]

    if varlen_q:
        check_index("cu_seqlens_q", cu_seqlens_q, device=device, shape=(None,), meaning="(batch_size + 1,)")
        if cu_seqlens_q.shape[0] < 1:
            raise ValueError("cu_seqlens_q must have at least one entry (batch_size + 1)")
        batch_size = cu_seqlens_q.shape[0] - 1
        if max_seqlen_q is None:
            raise ValueError("max_seqlen_q (a Python int) is required with cu_seqlens_q")
    else:
        batch_size = q.shape[0]
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
            raise TypeError(f"{name} must be a non-negative Python int; got {val!r}")

    if page_table is not None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k cannot be combined with page_table: paged K/V take their lengths from seqused_k")
        if k.dim() != 4:
            raise ValueError(f"{k_name} must be 4-D (num_pages, page_size, num_heads_kv, head_dim) with page_table; got {tuple(k.shape)}")
        rows = None if kv_batch_idx is not None else batch_size
        check_index("page_table", page_table, device=device, shape=(rows, None), meaning="(batch_size, max_num_pages_per_seq)")
    elif cu_seqlens_k is not None:
        if kv_batch_idx is not None:
            raise ValueError(f"{public.get('kv_batch_idx', 'kv_batch_idx')} cannot be combined with cu_seqlens_k: packed K/V have no batch rows to select")
        if k.dim() != 3:
            raise ValueError(f"{k_name} must be 3-D (total_k, num_heads_kv, head_dim) with cu_seqlens_k; got {tuple(k.shape)}")
        check_index("cu_seqlens_k", cu_seqlens_k, device=device, shape=(batch_size + 1,), meaning="(batch_size + 1,)")
        if max_seqlen_k is None:
            raise ValueError("max_seqlen_k (a Python int) is required with cu_seqlens_k")
    else:
        if k.dim() != 4:
            raise ValueError(f"{k_name} must be 4-D (batch_size, seqlen_k, num_heads_kv, head_dim); got {tuple(k.shape)}")
        if kv_batch_idx is None and k.shape[0] != batch_size:
            raise ValueError(f"{k_name} must have batch size {batch_size} (that of q); got {k.shape[0]}")

    for name, t in (("seqused_q", seqused_q), ("seqused_k", seqused_k), ("leftpad_k", leftpad_k), ("kv_batch_idx", kv_batch_idx)):
        check_index(public.get(name, name), t, device=device, shape=(batch_size,), meaning="(batch_size,)")
    if qv is not None:
        check_tensor("qv", qv, device=device)
        if qv.dtype != q.dtype:
            raise TypeError(f"qv must have the dtype of q ({q.dtype}); got {qv.dtype}")
        check_last_dim_contiguous("qv", qv)
        check_shape("qv", qv, tuple(q.shape[:-1]) + (head_dim_v,), "q.shape[:-1] + (head_dim_v,)")
    if out is not None:
        check_tensor("out", out, device=device)
        out_dtype = torch.bfloat16 if is_fp8 else q.dtype
        if out.dtype != out_dtype:
            raise TypeError(f"out must have dtype {out_dtype}; got {out.dtype}")
        check_last_dim_contiguous("out", out)
        check_shape("out", out, tuple(q.shape[:-1]) + (head_dim_v,), "q.shape[:-1] + (head_dim_v,)")
    check_descales(q_descale, k_descale, v_descale, is_fp8=is_fp8, batch_size=batch_size, num_heads_kv=num_heads_kv, device=device)
    check_sinks(sinks, num_heads_q=num_heads_q, device=device)
    check_context_parallel(cp_world_size, cp_rank, cp_tot_seqused_k, batch_size=batch_size, device=device)
    check_scheduler_metadata(scheduler_metadata, batch_size=batch_size, device=device)
    check_scalars(attention_chunk, softcap, num_splits, sm_margin)


def check_append_inputs(
    q, k_cache, v_cache, k, v, *, rotary_cos, rotary_sin, cache_seqlens, cu_seqlens_q,
    cu_seqlens_k_new, rotary_seqlens, page_table, batch_size: int,
) -> None:
    """The new-token and rotary arguments of flash_attn_with_kvcache."""
    device = q.device
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append); got only "
                         + ("k" if v is None else "v"))
    has_rotary = rotary_cos is not None or rotary_sin is not None
    if has_rotary and (rotary_cos is None or rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k is None:
        if has_rotary:
            raise ValueError("rotary_cos/rotary_sin apply to new keys: they need k and v to append")
        return
    for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
        check_tensor(name, t, device=device)
        if t.dtype != cache.dtype:
            raise TypeError(f"{name} must have the dtype of the cache ({cache.dtype}); got {t.dtype}")
        check_last_dim_contiguous(name, t)
    num_heads_kv, head_dim, head_dim_v = k_cache.shape[-2], k_cache.shape[-1], v_cache.shape[-1]
    if cu_seqlens_k_new is not None:
        check_index("cu_seqlens_k_new", cu_seqlens_k_new, device=device, shape=(batch_size + 1,), meaning="(batch_size + 1,)")
        check_shape("k", k, (None, num_heads_kv, head_dim), "(total_k_new, num_heads_kv, head_dim)")
        check_shape("v", v, (k.shape[0], num_heads_kv, head_dim_v), "(total_k_new, num_heads_kv, head_dim_v)")
    else:
        check_shape("k", k, (batch_size, None, num_heads_kv, head_dim), "(batch_size, seqlen_new, num_heads_kv, head_dim)")
        check_shape("v", v, (batch_size, k.shape[1], num_heads_kv, head_dim_v), "(batch_size, seqlen_new, num_heads_kv, head_dim_v)")
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required when appending k/v: it says where the new tokens go")
    capacity = page_table.shape[1] * k_cache.shape[1] if page_table is not None else k_cache.shape[1]
    # Packed new tokens (cu_seqlens_k_new) share one buffer: k.shape[0] is their total over the batch,
    # and each sequence's share lives in cu_seqlens_k_new's values, which checks may not read.
    if cu_seqlens_k_new is None and k.shape[1] > capacity:
        raise ValueError(f"new k/v hold {k.shape[1]} tokens per sequence, more than the cache capacity {capacity}")
    if has_rotary:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, t, device=device)
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D (seqlen_ro, rotary_dim / 2); got {tuple(t.shape)}")
            if not t.is_floating_point() or t.dtype == torch.float8_e4m3fn:
                raise TypeError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}")
            check_last_dim_contiguous(name, t)
        if rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos and rotary_sin must have one shape; got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        rotary_dim = 2 * rotary_cos.shape[1]
        if rotary_dim % 16 != 0 or rotary_dim > head_dim or rotary_dim == 0:
            raise ValueError(f"rotary_dim (2 * rotary_cos.shape[1]) must be a positive multiple of 16 and <= head dim {head_dim}; got {rotary_dim}")
        # The official check, paged caches only: a contiguous cache may take a shorter table
        # (positions past it are left unrotated; no kernel reads past the table).
        if page_table is not None and rotary_cos.shape[0] < capacity:
            raise ValueError(
                f"rotary_cos/rotary_sin must cover every position of a paged cache: need at least {capacity} "
                f"rows (max_num_pages_per_seq * page_size); got {rotary_cos.shape[0]}"
            )
        check_index("rotary_seqlens", rotary_seqlens, device=device, shape=(batch_size,), meaning="(batch_size,)")


def check_combine_inputs(out_partial, lse_partial, out, out_dtype) -> None:
    for name, t in (("out_partial", out_partial), ("lse_partial", lse_partial)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        check_dtype(name, t, (torch.float32,))
    device = out_partial.device
    check_tensor("lse_partial", lse_partial, device=device)
    if out_partial.dim() not in (4, 5):
        raise ValueError(
            "out_partial must be (num_splits, batch_size, seqlen, num_heads, head_dim) or "
            f"(num_splits, total_q, num_heads, head_dim); got {tuple(out_partial.shape)}"
        )
    check_last_dim_contiguous("out_partial", out_partial)
    check_shape("lse_partial", lse_partial, tuple(out_partial.shape[:-1]), "out_partial.shape[:-1]")
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")
    if out is not None:
        check_tensor("out", out, device=device)
        check_shape("out", out, tuple(out_partial.shape[1:]), "out_partial.shape[1:]")
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype} but out_dtype is {out_dtype}")


def check_backward_inputs(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, *, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
    max_seqlen_q, max_seqlen_k, softcap, sm_margin,
) -> None:
    """The low-level backward entry (official `_flash_attn_backward`): what the official mha_bwd checks,
    plus softmax_lse's shape, which the kernels index and the official code leaves unchecked."""
    check_attention_inputs(
        q, k, v, qv=None, out=out, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        page_table=None, kv_batch_idx=None, leftpad_k=None, q_descale=None, k_descale=None,
        v_descale=None, sinks=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None,
        scheduler_metadata=None, attention_chunk=0, softcap=softcap, num_splits=1, sm_margin=sm_margin,
    )
    check_dtype("q", q, (torch.float16, torch.bfloat16))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out (the forward output) must be a torch.Tensor; got {type(out).__name__}")
    check_tensor("dout", dout, device=q.device)
    if dout.dtype != q.dtype:
        raise TypeError(f"dout must have the dtype of q ({q.dtype}); got {dout.dtype}")
    check_shape("dout", dout, tuple(out.shape), "out.shape")
    check_tensor("softmax_lse", softmax_lse, device=q.device)
    check_dtype("softmax_lse", softmax_lse, (torch.float32,))
    if cu_seqlens_q is not None:
        check_shape("softmax_lse", softmax_lse, (q.shape[1], q.shape[0]), "(num_heads, total_q)")
    else:
        check_shape("softmax_lse", softmax_lse, (q.shape[0], q.shape[2], q.shape[1]), "(batch_size, num_heads, seqlen_q)")
    for name, grad, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if grad is None:
            continue
        check_tensor(name, grad, device=q.device)
        if grad.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}); got {grad.dtype}")
        check_shape(name, grad, tuple(like.shape), f"{name[1]}.shape")

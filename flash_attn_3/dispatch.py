"""Backend choice. Each backend declares what it supports; every refusal carries a reason.

`FLASH_ATTN_3_BACKEND=reference|triton|mate` forces one backend (its refusals become errors).
Otherwise the device's preferred backends are tried in order; a fallback past the first choice warns
once per (backend, feature), naming both and the reason. The same table writes
docs/compatibility.md (`python -m flash_attn_3 info --markdown`), and a test keeps them equal.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Optional

import torch

from .backends.params import AttnArgs

ENV_VAR = "FLASH_ATTN_3_BACKEND"

# Feature name -> what it means, in the order of the compatibility table.
FEATURES = {
    "dense": "fixed-length batches (flash_attn_func, qkvpacked)",
    "varlen": "packed variable-length sequences (cu_seqlens)",
    "seqused": "seqused_q / seqused_k",
    "gqa": "GQA / MQA (fewer KV heads than query heads)",
    "causal": "causal mask (bottom-right aligned)",
    "local": "sliding window (window_size)",
    "attention_chunk": "attention_chunk",
    "softcap": "softcap",
    "sinks": "sinks / s_aux (learnable sink logits)",
    "qv": "qv (absorbed MLA scores)",
    "dv_ne_d": "head_dim_v != head_dim",
    "fp8": "fp8 e4m3 inputs with descale",
    "paged_kv": "paged K/V (page_table / block_table)",
    "kv_batch_idx": "cache_batch_idx",
    "leftpad": "cache_leftpad",
    "context_parallel": "cp_world_size / cp_rank / cp_tot_seqused_k",
    "split_kv": "split-KV (num_splits != 1)",
    "scheduler_metadata": "scheduler_metadata / get_scheduler_metadata",
    "append_kv": "in-place append of new k/v into the cache",
    "rotary": "rotary embedding of new k and q",
    "combine": "flash_attn_combine",
    "backward": "backward (dq, dk, dv)",
    "deterministic": "deterministic backward",
}

_TRITON_NO_MUSA = "runs on CUDA GPUs (or the CPU under TRITON_INTERPRET=1)"

# backend -> feature -> None (supported) or the reason it is refused.
CAPABILITIES: dict[str, dict[str, Optional[str]]] = {
    "reference": {name: None for name in FEATURES},
    "triton": {name: None for name in FEATURES},
    "mate": {name: None for name in FEATURES} | {
        "fp8": "MATE's FA3 operators document fp16/bf16 only",
        "backward": None,
        "deterministic": "MATE documents no deterministic backward mode",
        "context_parallel": None,
    },
}

# backend -> the module that implements it, imported lazily.
_MODULES = {
    "reference": "flash_attn_3.backends.reference",
    "triton": "flash_attn_3.backends.triton.routes",
    "mate": "flash_attn_3.backends.mate",
}

_warned: set[tuple[str, str]] = set()


def device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device` at all, or None."""
    return _device_reason(backend, device.type, os.environ.get("TRITON_INTERPRET") == "1")


@functools.lru_cache(maxsize=None)
def _device_reason(backend: str, device_type: str, interpreting: bool) -> Optional[str]:
    device = device_type
    if backend == "reference":
        return None
    if backend == "triton":
        if device == "cuda":
            return None if _importable("triton") else "triton is not installed"
        if device == "cpu" and interpreting and _importable("triton"):
            return None
        return f"the triton backend {_TRITON_NO_MUSA}; tensors are on {device}"
    if backend == "mate":
        if device != "musa":
            return f"the mate backend runs on Moore Threads GPUs (device 'musa'); tensors are on {device}"
        return None if _importable("mate") else "the mate package is not importable"
    return f"unknown backend {backend!r}"


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def preferred_backends(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["triton", "reference"]
    if device.type == "musa":
        return ["mate", "reference"]
    return ["reference"]


def forward_features(a: AttnArgs) -> list[str]:
    flags = {
        "varlen": a.cu_seqlens_q is not None or a.cu_seqlens_k is not None,
        "seqused": a.seqused_q is not None or a.seqused_k is not None,
        "gqa": a.num_heads_q != a.num_heads_kv,
        "causal": a.window_right == 0 and a.window_left < 0,
        "local": a.window_left >= 0 or a.window_right > 0,
        "attention_chunk": a.attention_chunk > 0,
        "softcap": a.softcap > 0,
        "sinks": a.sinks is not None,
        "qv": a.qv is not None,
        "dv_ne_d": a.head_dim != a.head_dim_v,
        "fp8": a.is_fp8,
        "paged_kv": a.page_table is not None,
        "kv_batch_idx": a.kv_batch_idx is not None,
        "leftpad": a.leftpad_k is not None,
        "context_parallel": a.cp_world_size > 1,
        "split_kv": a.num_splits != 1,
        "scheduler_metadata": a.scheduler_metadata is not None,
    }
    return ["dense"] + [name for name, on in flags.items() if on]


def refusal(backend: str, features, device: torch.device) -> Optional[str]:
    """None if `backend` runs every feature on `device`, else the first reason it refuses.

    features: a list of names, or a function returning it, called only when the backend's table
    refuses anything (the triton and reference tables refuse nothing: a decode step skips it).
    """
    reason = device_reason(backend, device)
    if reason:
        return reason
    table = CAPABILITIES[backend]
    if callable(features):
        if not any(table.values()):
            return None
        features = features()
    for feature in features:
        if table.get(feature):
            return f"{FEATURES[feature]}: {table[feature]}"
    return None


@functools.lru_cache(maxsize=None)
def _module(backend: str):
    # Cached: every op call asks (twice), and importlib's lookup costs about a microsecond.
    return importlib.import_module(_MODULES[backend])


def _call_refusal(backend: str, a: Optional[AttnArgs], backward: bool) -> Optional[str]:
    """Refusals that depend on a combination of features: a backend module may declare them in
    `unsupported_reason(a, backward)` (asked only once the device and the table allow the call)."""
    if a is None:
        return None
    check = getattr(_module(backend), "unsupported_reason", None)
    return check(a, backward) if check else None


def _choose(features: list[str], device: torch.device, a: Optional[AttnArgs] = None, backward: bool = False):
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in CAPABILITIES:
            raise ValueError(f"{ENV_VAR} must be one of {', '.join(CAPABILITIES)}; got {forced!r}")
        reason = refusal(forced, features, device) or _call_refusal(forced, a, backward)
        if reason:
            raise NotImplementedError(f"{ENV_VAR}={forced}: the {forced} backend refuses this call: {reason}")
        return _module(forced)
    candidates = preferred_backends(device)
    reasons = {}
    for backend in candidates:
        reason = refusal(backend, features, device) or _call_refusal(backend, a, backward)
        if reason is None:
            if reasons:
                first, why = next(iter(reasons.items()))
                if (first, why) not in _warned:
                    _warned.add((first, why))
                    warnings.warn(
                        f"flash_attn_3: falling back from the {first} backend to {backend}: {why}",
                        stacklevel=4,
                    )
            return _module(backend)
        reasons[backend] = reason
    detail = "; ".join(f"{b}: {r}" for b, r in reasons.items())
    raise NotImplementedError(f"flash_attn_3: no backend can run this call ({detail})")


def backend_for(op: str, a: AttnArgs, deterministic: bool = False):
    def features():
        names = forward_features(a)
        if op == "backward":
            names += ["backward"] + (["deterministic"] if deterministic else [])
        return names

    return _choose(features, a.q.device, a, op == "backward")


def backend_for_append(q: torch.Tensor, paged: bool, rotary: bool):
    features = ["append_kv"] + (["paged_kv"] if paged else []) + (["rotary"] if rotary else [])
    return _choose(features, q.device)


def backend_for_device(op: str, device: torch.device):
    return _choose([op], device)


def explain(features: list[str], device: torch.device) -> dict[str, Optional[str]]:
    """For each backend, None if it would run these features on `device`, else why not."""
    return {backend: refusal(backend, features, device) for backend in CAPABILITIES}


def compatibility_markdown() -> str:
    """The feature matrix of docs/compatibility.md, generated from CAPABILITIES."""
    backends = list(CAPABILITIES)
    lines = [
        "| feature | " + " | ".join(backends) + " |",
        "| --- | " + " | ".join("---" for _ in backends) + " |",
    ]
    notes = []
    for name, meaning in FEATURES.items():
        cells = []
        for backend in backends:
            reason = CAPABILITIES[backend][name]
            if reason is None:
                cells.append("yes")
            else:
                notes.append(f"- **{backend}, {meaning}**: {reason}")
                cells.append(f"no [{len(notes)}]")
        lines.append(f"| {meaning} | " + " | ".join(cells) + " |")
    devices = [
        "",
        "Devices: reference runs wherever PyTorch runs (CPU, CUDA, MUSA); triton "
        + _TRITON_NO_MUSA + "; mate runs on Moore Threads GPUs with the `mate` package.",
    ]
    return "\n".join(lines + [""] + [f"Refusals:"] + (notes or ["- none"]) + devices) + "\n"

"""`python -m flash_attn_3 bench`: a short look at our speed next to cuDNN on this machine.

The package never imports the repository's benchmarks/ folder (it is not installed); the full grids
live there and take their timing and FLOP conventions from this module, so both report alike.
On a machine without CUDA the same cases run at toy sizes against PyTorch's math SDPA: that shows
the install works, and its numbers say nothing about speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WARMUP_MS = 25
REP_MS = 200
_PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def attention_flops(seqlens: Sequence[int], num_heads: int, head_dim: int, causal: bool,
                    head_dim_v: Optional[int] = None, mode: str = "fwd") -> float:
    """FLOPs of attention over self-attention sequences of the given lengths.

    Two matmuls per head: 2·N²·(D + Dv), which is 4·N²·D when Dv = D; halved when causal; backward
    counts 2.5× the forward and forward+backward 3.5× (the convention of the FlashAttention papers,
    so our figures line up with published ones).
    """
    dv = head_dim if head_dim_v is None else head_dim_v
    flops = sum(2.0 * n * n * (head_dim + dv) for n in seqlens) * num_heads
    if causal:
        flops /= 2
    return flops * _PASS_FLOPS[mode]


def median_ms(fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]] = None,
              warmup: int = WARMUP_MS, rep: int = REP_MS) -> float:
    """Median time of one call in ms: Triton's do_bench on CUDA (L2 flushed before each call)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                        return_mode="median")
    fn()
    times = []
    deadline = time.perf_counter() + rep / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sdpa_peer_backend() -> SDPBackend:
    return SDPBackend.CUDNN_ATTENTION if torch.cuda.is_available() else SDPBackend.MATH


def _sizes(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(batch=4, seqlen=4096, heads=16, head_dim=128, decode_batch=16,
                    decode_ctx=8192)
    return dict(batch=1, seqlen=128, heads=2, head_dim=64, decode_batch=2, decode_ctx=256)


def _forward_case(s: dict, device, causal: bool, backward: bool):
    from .interface import flash_attn_func

    shape = (s["batch"], s["seqlen"], s["heads"], s["head_dim"])
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16,
                           requires_grad=backward) for _ in range(3))
    flops = attention_flops([s["seqlen"]] * s["batch"], s["heads"], s["head_dim"], causal,
                            mode="bwd" if backward else "fwd")

    def ours():
        return flash_attn_func(q, k, v, causal=causal)

    def peer():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=causal)

    if not backward:
        return flops, ours, peer, None
    dout = torch.randn_like(q)
    out_ours = ours()
    # SDPA picks its backward kernel when the forward runs, so the forward runs under the peer's
    # backend choice too
    with sdpa_kernel([sdpa_peer_backend()]):
        out_peer = peer().transpose(1, 2)
    return (flops, lambda: out_ours.backward(dout, retain_graph=True),
            lambda: out_peer.backward(dout, retain_graph=True), (q, k, v))


def _decode_case(s: dict, device):
    from .interface import flash_attn_with_kvcache

    batch, ctx, heads_q, heads_kv, dim = s["decode_batch"], s["decode_ctx"], 32, 8, 128
    q = torch.randn(batch, 1, heads_q, dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, ctx, heads_kv, dim, device=device, dtype=torch.bfloat16)
            for _ in range(2))
    cache_seqlens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    kv_bytes = k.nbytes + v.nbytes

    def ours():
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=cache_seqlens, causal=True)

    def peer():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), enable_gqa=True)

    return kv_bytes, ours, peer


def _measure(fn, context, grad_to_none=None) -> tuple[Optional[float], Optional[str]]:
    try:
        with context:
            return median_ms(fn, grad_to_none=grad_to_none), None
    except Exception as e:  # a failing variant must not end the run: the table shows why
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:120]


def run(device: Optional[torch.device] = None, progress: bool = True) -> list[dict]:
    """Time the short case list; one row per case with ours, the peer and their ratio."""
    from tqdm import tqdm

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = _sizes(device)
    dims = f"B={s['batch']} N={s['seqlen']} H={s['heads']} D={s['head_dim']}"
    decode_dims = f"B={s['decode_batch']} ctx={s['decode_ctx']} GQA 32/8 D=128"
    cases = [(f"fwd {dims}", "TFLOP/s", lambda: _forward_case(s, device, False, False)),
             (f"fwd causal {dims}", "TFLOP/s", lambda: _forward_case(s, device, True, False)),
             (f"bwd {dims}", "TFLOP/s", lambda: _forward_case(s, device, False, True)),
             (f"decode {decode_dims}", "TB/s", lambda: _decode_case(s, device) + (None,))]
    rows = []
    for name, unit, build in tqdm(cases, desc="flash_attn_3 bench", disable=not progress):
        row = dict(case=name, unit=unit, ours=None, peer=None, error=None)
        try:
            work, ours, peer, grads = build()
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:120]
            rows.append(row)
            continue
        ms_ours, row["error"] = _measure(ours, contextlib.nullcontext(), grads)
        ms_peer, peer_error = _measure(peer, sdpa_kernel([sdpa_peer_backend()]), grads)
        row["error"] = row["error"] or peer_error
        # work / ms / 1e9 is TFLOP/s for flops and TB/s for bytes
        row["ours"] = None if ms_ours is None else work / ms_ours / 1e9
        row["peer"] = None if ms_peer is None else work / ms_peer / 1e9
        rows.append(row)
        del ours, peer, grads
    return rows


def format_rows(rows: list[dict], peer_name: str) -> str:
    def num(x):
        return "-" if x is None else f"{x:.3g}" if x < 10 else f"{x:.0f}"

    lines = [f"{'case':48} {'unit':8} {'ours':>8} {peer_name:>8} {'ratio':>6}"]
    for r in rows:
        ratio = (f"{r['ours'] / r['peer']:.2f}" if r["ours"] and r["peer"] else "-")
        lines.append(f"{r['case']:48} {r['unit']:8} {num(r['ours']):>8} {num(r['peer']):>8} "
                     f"{ratio:>6}")
        if r["error"]:
            lines.append(f"    error: {r['error']}")
    return "\n".join(lines)


def run_quick(args) -> int:
    """The `bench` command: print the table; with args.out, also write it there as JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # a refused call would otherwise fall back to the reference backend and be timed as ours
        os.environ.setdefault("FLASH_ATTN_3_BACKEND", "triton")
    rows = run(device)
    peer = "cuDNN" if device.type == "cuda" else "SDPA-math"
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (toy sizes)"
    backend = os.environ.get("FLASH_ATTN_3_BACKEND", "default choice")
    print(f"{where}, torch {torch.__version__}, backend {backend}, bf16, median time; "
          f"ratio = ours / {peer}")
    print(format_rows(rows, peer))
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            json.dump(dict(device=where, torch=torch.__version__, peer=peer, rows=rows), f,
                      indent=1)
    return 0 if all(r["ours"] is not None for r in rows) else 1

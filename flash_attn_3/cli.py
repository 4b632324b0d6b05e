"""`python -m flash_attn_3 check | info | bench`: what this machine runs, and whether it is right."""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import torch


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _naive(q, k, v, causal=False, scale=None):
    """float64 attention on (B, S, H, D) tensors, bottom-right causal; GQA by head repetition."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = scale or q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        allowed = torch.arange(sk, device=q.device)[None] <= torch.arange(sq, device=q.device)[:, None] + sk - sq
        s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), torch.logsumexp(s, -1)


def _close(out, ref, tol=2e-2) -> bool:
    return bool(torch.isfinite(out).all()) and float((out.double() - ref).abs().max()) <= tol


def _self_tests(device):
    """(name, callable returning True when the result matches float64 math)."""
    import flash_attn_interface as fa

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def func():
        q, k, v = rand(2, 33, 4, 64), rand(2, 47, 2, 64), rand(2, 47, 2, 64)
        out, lse = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        ref, ref_lse = _naive(q, k, v, causal=True)
        return _close(out, ref) and _close(lse, ref_lse.to(lse.device), 1e-2)

    def qkvpacked():
        qkv = rand(2, 29, 3, 2, 32)
        out = fa.flash_attn_qkvpacked_func(qkv, causal=True)
        return _close(out, _naive(*qkv.unbind(2), causal=True)[0])

    def varlen():
        lens = [5, 0, 17]
        q, k, v = rand(22, 2, 32), rand(22, 2, 32), rand(22, 2, 32)
        cu = torch.tensor([0, 5, 5, 22], dtype=torch.int32, device=device)
        out = fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        ok = True
        for start, n in zip([0, 5, 5], lens):
            if n:
                sl = slice(start, start + n)
                ok &= _close(out[sl], _naive(q[None, sl], k[None, sl], v[None, sl], causal=True)[0][0])
        return ok

    def kvcache():
        k_cache, v_cache = rand(2, 64, 2, 64), rand(2, 64, 2, 64)
        q, k_new, v_new = rand(2, 1, 4, 64), rand(2, 1, 2, 64), rand(2, 1, 2, 64)
        lens = torch.tensor([10, 40], dtype=torch.int32, device=device)
        before = k_cache.clone()
        out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True)
        ok = True
        for b, n in enumerate([10, 40]):
            ok &= bool(torch.equal(k_cache[b, n], k_new[b, 0])) and bool(torch.equal(k_cache[b, :n], before[b, :n]))
            ref = _naive(q[b: b + 1], k_cache[b: b + 1, : n + 1], v_cache[b: b + 1, : n + 1], causal=True)[0]
            ok &= _close(out[b: b + 1], ref)
        return ok

    def combine():
        out_p = torch.randn(3, 2, 4, 2, 16, device=device)
        lse_p = torch.randn(3, 2, 4, 2, device=device)
        out, lse = fa.flash_attn_combine(out_p, lse_p)
        ref_lse = torch.logsumexp(lse_p.double(), 0)
        ref = (torch.exp(lse_p.double() - ref_lse)[..., None] * out_p.double()).sum(0)
        return _close(out, ref, 1e-4) and _close(lse, ref_lse, 1e-4)

    def scheduler():
        lens = torch.tensor([10, 40], dtype=torch.int32, device=device)
        meta = fa.get_scheduler_metadata(2, 1, 64, 4, 2, 64, lens, qkv_dtype=dtype, causal=True)
        return meta.dtype == torch.int32 and meta.device.type == device.type

    return [("flash_attn_func", func), ("flash_attn_qkvpacked_func", qkvpacked),
            ("flash_attn_varlen_func", varlen), ("flash_attn_with_kvcache", kvcache),
            ("flash_attn_combine", combine), ("get_scheduler_metadata", scheduler)]


def _versions() -> dict[str, str]:
    import flash_attn_3

    info = {"flash_attn_3": flash_attn_3.__version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # triton is optional at run time on CPU
        info["triton"] = f"not importable ({type(exc).__name__})"
    return info


def cmd_check(args) -> int:
    from tqdm import tqdm

    from . import dispatch

    device = _device()
    for key, value in _versions().items():
        print(f"{key:>14}: {value}")
    print(f"{'device':>14}: {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"{'backend':>14}: {os.environ.get(dispatch.ENV_VAR) or dispatch.preferred_backends(device)[0]}")
    failures = []
    for name, test in tqdm(_self_tests(device), desc="self-test", unit="fn"):
        try:
            if not test():
                failures.append(f"{name}: result differs from float64 math")
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    for line in failures:
        print("FAIL", line)
    print("all public functions match float64 math" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


def cmd_info(args) -> int:
    from . import dispatch

    if args.markdown:
        print(dispatch.compatibility_markdown(), end="")
        return 0
    device = _device()
    for key, value in _versions().items():
        print(f"{key:>14}: {value}")
    print(f"{'device':>14}: {device}")
    print(f"{'preferred':>14}: {', '.join(dispatch.preferred_backends(device))}")
    print()
    print(f"What runs on {device} (per feature, per backend):")
    for name, meaning in dispatch.FEATURES.items():
        verdicts = dispatch.explain([name], device)
        cells = ", ".join(f"{b}: {'yes' if r is None else 'no'}" for b, r in verdicts.items())
        print(f"  {meaning:<52} {cells}")
    unavailable = {b: dispatch.device_reason(b, device) for b in dispatch.CAPABILITIES}
    for backend, reason in unavailable.items():
        if reason:
            print(f"{backend}: {reason}")
    _print_entry_points(device)
    _print_triton_routes(device)
    return 0


def _print_entry_points(device: torch.device) -> None:
    """The ways in besides flash_attn_interface: the official op names, and whether PyTorch's
    FA3 switch can send SDPA here (torch's wrapper takes sm_90 only)."""
    from . import official_ops  # noqa: F401  (registers them, as flash_attn_3._C does)

    ops = ", ".join(n for n in ("fwd", "bwd", "fwd_combine", "get_scheduler_metadata", "_flash_attn_forward",
                                "_flash_attn_backward") if hasattr(torch.ops.flash_attn_3, n))
    print()
    print(f"Official ops (import flash_attn_3._C): torch.ops.flash_attn_3.{{{ops}}}")
    attention = getattr(torch.nn, "attention", None)
    if not hasattr(attention, "activate_flash_attention_impl"):
        switch = f"not in torch {torch.__version__} (it needs torch >= 2.11)"
    elif device.type != "cuda":
        switch = "needs a CUDA sm_90 GPU (torch's wrapper refuses other devices)"
    elif torch.cuda.get_device_capability(device) != (9, 0):
        major, minor = torch.cuda.get_device_capability(device)
        switch = (f"torch's wrapper refuses sm_{major}{minor} (it takes sm_90 only): call "
                  "flash_attn_interface directly on this GPU")
    else:
        switch = 'available: torch.nn.attention.activate_flash_attention_impl("FA3") sends SDPA here'
    print(f"PyTorch's FA3 switch: {switch}")


def _print_triton_routes(device: torch.device) -> None:
    """Which triton kernels typical calls take on this device, and why (the Gluon kernels'
    refusal included: a triton version not verified, another GPU, FLASH_ATTN_3_GLUON)."""
    try:
        from .backends.triton import arch, gluon_compat
    except Exception as exc:  # no triton: nothing to say beyond the backend line above
        print(f"\nTriton kernels: not available ({type(exc).__name__}: {exc})")
        return
    print()
    print("Triton kernels:")
    print(f"  Gluon (sm_90) under this triton: {gluon_compat.describe()}")
    _print_gluon_switches()
    if device.type != "cuda":
        gluon = gluon_compat.version_status() == gluon_compat.RUN
        others = ", ".join(name for name in arch.ARCHS if name != "sm_90")
        print(f"  on {device}: none (the triton kernels run on CUDA GPUs). With this triton an "
              "sm_90 GPU takes " + ("the Gluon kernels for prefill and backward and the portable "
                                    "ones for the rest" if gluon else "the portable kernels (the "
                                    "Gluon kernels are refused, see above)")
              + f"; {others} take the portable kernels with launch configs of their own")
        return
    from .backends.params import AttnArgs
    from .backends.triton import routes

    name = arch.device_arch(device)
    print(f"  this GPU: {torch.cuda.get_device_name(device)}, portable configs for {name} "
          f"({arch.ARCHS[name].gpus})")
    q, k, v = (torch.empty(2, 4096, 16, 128, device=device, dtype=torch.bfloat16) for _ in "qkv")
    prefill = AttnArgs.plain(q, k, v, window_right=0)
    cache = torch.empty(8, 4096, 8, 128, device=device, dtype=torch.bfloat16)
    step = AttnArgs.plain(torch.empty(8, 1, 32, 128, device=device, dtype=torch.bfloat16), cache,
                          cache, seqused_k=torch.full((8,), 4000, dtype=torch.int32, device=device),
                          window_right=0)
    pages = torch.empty(256, 16, 8, 128, device=device, dtype=torch.bfloat16)
    chunk = AttnArgs.plain(
        torch.empty(1, 2048, 32, 128, device=device, dtype=torch.bfloat16), pages, pages,
        page_table=torch.arange(256, dtype=torch.int32, device=device).view(1, 256),
        seqused_k=torch.full((1,), 4096, dtype=torch.int32, device=device), max_seqlen_k=4096,
        window_right=0)
    calls = [("forward, bf16 (2, 4096, 16, 128) causal", routes.forward_route(prefill)),
             ("backward, same call", routes.backward_route(prefill)),
             ("kvcache step, 1 token, 32/8 heads, 4k cache", routes.forward_route(step)),
             ("kvcache chunked prefill, 2k tokens, page 16", routes.forward_route(chunk))]
    for what, (module, why) in calls:
        print(f"  {what:<44} -> {module}.py: {why}")


def _print_gluon_switches() -> None:
    """The Gluon variants' switches: those taken by default (=0 sends their calls to the portable
    kernels) and those built but not yet run clean on a GPU (off unless =1)."""
    import os

    try:
        from .backends.triton import bwd_hopper, fwd_hopper
    except Exception:  # the kernel modules need triton's Gluon API
        return
    on = [("FLASH_ATTN_3_GLUON_FP8", "the fp8 forward"),
          (fwd_hopper.DV_ENV, "a V narrower than Q and K, forward and backward"),
          (fwd_hopper.QK_SLICES_ENV, "Q.K^T over a padded head dim's own columns"),
          (bwd_hopper.LAYERS_ENV, "seqused_k in the backward")]
    print("  Gluon variants taken by default (=0 switches one off):")
    for name, what in on:
        state = "off" if os.environ.get(name, "").strip() == "0" else "on"
        print(f"    {name}={state}: {what}")
    variants = [(bwd_hopper.VARLEN_ENV, "the packed / seqused_q backward")]
    print("  opt-in Gluon variants, not yet run clean on a GPU (=1 takes them):")
    for name, what in variants:
        state = "on" if os.environ.get(name, "").strip() == "1" else "off"
        print(f"    {name}={state}: {what}")


def cmd_bench(args) -> int:
    from .bench import run_quick

    return run_quick(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_attn_3", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="environment, backend, and a self-test of every public function")
    info = sub.add_parser("info", help="versions, device, backend and the feature matrix")
    info.add_argument("--markdown", action="store_true", help="print the feature matrix of docs/compatibility.md")
    bench = sub.add_parser("bench", help="a short forward/decode benchmark against torch SDPA (GPU)")
    bench.add_argument("--out", default=None, help="write JSON results here")
    args = parser.parse_args(argv)
    return {"check": cmd_check, "info": cmd_info, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

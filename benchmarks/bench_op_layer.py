"""PyTorch's FA3 switch on our kernels: the same SDPA call through `torch.ops.flash_attn_3.fwd / bwd`
(after `activate_flash_attention_impl("FA3")`) against `flash_attn_func` called directly on the
same tensors, with cuDNN as the peer, forward and forward+backward.

Inputs are SDPA's (B, H, N, D) tensors; `flash_attn_func` gets their (B, N, H, D) views, so both
paths read the same memory: the ratio switch / direct is what the op layer (torch's wrapper, the
dispatcher, our argument mapping) costs. B·N = 32k tokens, H·D = 2048, bf16.

    python -m benchmarks.bench_op_layer [--quick] [--out DIR]
"""

from __future__ import annotations

import functools
import itertools
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks.harness import MODEL_WIDTH, TOKENS, Runner, Section, attention_flops, parse_args, sdpa_context

CASE_KEYS = ("pass", "D", "N", "causal")
IMPLS = ("switch", "direct", "cudnn")


def cases(quick: bool):
    dims, lengths = ((128,), (1024, 4096)) if quick else ((64, 128), (1024, 4096, 16384))
    for pass_, d, n, causal in itertools.product(("fwd", "fwd_bwd"), dims, lengths, (False, True)):
        yield {"pass": pass_, "D": d, "N": n, "causal": causal}


def make_inputs(case: dict) -> dict:
    batch, heads = TOKENS // case["N"], MODEL_WIDTH // case["D"]
    grad = case["pass"] == "fwd_bwd"
    q, k, v = (torch.randn(batch, heads, case["N"], case["D"], dtype=torch.bfloat16, device="cuda",
                           requires_grad=grad) for _ in range(3))
    return {"q": q, "k": k, "v": v, "dout": torch.randn_like(q)}


def call(case: dict, t: dict, impl: str):
    import flash_attn_interface as fa

    if impl == "direct":
        views = [x.transpose(1, 2) for x in (t["q"], t["k"], t["v"])]
        forward = lambda: fa.flash_attn_func(*views, causal=case["causal"]).transpose(1, 2)  # noqa: E731
    else:
        forward = lambda: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=case["causal"])  # noqa: E731
    if case["pass"] == "fwd":
        return forward
    leaves = (t["q"], t["k"], t["v"])
    return lambda: torch.autograd.grad(forward(), leaves, t["dout"])


@functools.cache
def _switch_on():
    import flash_attn_interface  # noqa: F401
    from torch.nn.attention import activate_flash_attention_impl

    activate_flash_attention_impl("FA3")


def context(impl: str):
    from torch.nn.attention import SDPBackend, restore_flash_attention_impl, sdpa_kernel

    if impl == "switch":
        _switch_on()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    restore_flash_attention_impl(_raise_warn=False)
    _switch_on.cache_clear()
    return sdpa_context("cudnn") if impl == "cudnn" else torch.enable_grad()


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    sections = {"op_layer": Section(
        "SDPA through PyTorch's FA3 switch vs flash_attn_func on the same tensors (B·N = 32k, H·D = 2048, bf16)",
        "tflops", ratios=[("switch", "direct"), ("switch", "cudnn")])}
    with Runner("bench_op_layer", args, sections, CASE_KEYS) as run:
        for case in (c for c in cases(args.quick) if run.keep(c)):
            inputs = functools.cache(lambda case=case: make_inputs(case))
            flops = attention_flops([case["N"]] * (TOKENS // case["N"]), MODEL_WIDTH // case["D"], case["D"],
                                    case["causal"], mode=case["pass"])
            for impl in IMPLS:
                run.measure("op_layer", case, impl, lambda impl=impl: call(case, inputs(), impl), flops=flops,
                            context=lambda impl=impl: context(impl))


if __name__ == "__main__":
    main()

"""Gluon Hopper backward against cuDNN's (SDPA) and the portable Triton backward, in one process.

Grid (perf_guide.md anchors): D = 64/128/256 with H·D = 2048, N = 4k/16k with B·N = 32k tokens,
causal or not, bf16, layout (B, N, H, D). TFLOP/s = 2.5 × the forward's 4·B·H·N²·D, halved when
causal. Columns: `gluon` (bwd_hopper.CONFIGS: dQ by TMA reduce-add in the kernel; D = 256 by
the split-role kernel), `gluon <BLOCK_M,STAGES,DQ_IN_KERNEL,STATS_SMEM,PREFETCH_S[,EARLY_DV
[,PIN_DP]]>` (bwd_hopper.CANDIDATES, N = 4k only; Config.label: the last two only when on), `gluon_det` (deterministic: the Gluon dK/dV kernel plus
bwd.py's atomic-free dQ kernel; `gluon_det <config>`: bwd_hopper.DETERMINISTIC_CANDIDATES, N = 4k), `tl` (bwd.py at its untuned default configs, as it runs below
the autotune threshold; deterministic) and `cudnn` (autograd through SDPA). Every gluon variant's
dq/dk/dv are compared with cuDNN's on the same inputs before it is timed: a mismatch is an error
row, so a fast wrong kernel never shows up as a figure.

    python -m benchmarks.tune_bwd_hopper [--quick] [--out DIR (default $OUT or out/)]
                                         [--only D=128 --only causal=1 --only impl=gluon,cudnn]
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from benchmarks.harness import (MODEL_WIDTH, TOKENS, Runner, Section, attention_flops,
                                parse_args, sdpa, sdpa_context)
from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import bwd, bwd_hopper, fwd_hopper

HEAD_DIMS = (64, 128, 256)
SEQLENS = (4096, 16384)
QUICK_SEQLENS = (4096, )
CASE_KEYS = ("D", "H", "N", "B", "causal")


def attn_args(q, k, v, causal: bool) -> AttnArgs:
    return AttnArgs.plain(q, k, v, window_right=0 if causal else -1)


def make_inputs(case: dict) -> dict:
    shape = (case["B"], case["N"], case["H"], case["D"])
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    a = attn_args(q, k, v, case["causal"])
    out, lse = fwd_hopper.forward(a)
    return dict(q=q, k=k, v=v, dout=dout, out=out, lse=lse, a=a)


def _cudnn_grads(t: dict):
    """cuDNN's dq, dk, dv on these inputs, computed once per case."""
    if "cudnn_grads" not in t:
        leaves = [t[n].detach().requires_grad_() for n in "qkv"]
        with sdpa_context("cudnn"):
            out = sdpa(*leaves, t["a"].window_right == 0)()
            t["cudnn_grads"] = torch.autograd.grad(out, leaves, t["dout"].transpose(1, 2))
    return t["cudnn_grads"]


def _check(case: dict, t: dict, got) -> None:
    expected = _cudnn_grads(t)
    for name, x, ref in zip(("dq", "dk", "dv"), got, expected):
        # two correct bf16 backward kernels differ by a few units in the last place of the
        # largest entries; a wrong one by the size of the gradient itself
        err = (x.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
        if not err < 3e-2:
            raise RuntimeError(f"{name} differs from cuDNN's (max error {err:.3g} of the max)")


def gluon_call(case: dict, t: dict, config: Optional[tuple], deterministic: bool = False):
    if not bwd_hopper.supports(t["a"]):
        raise RuntimeError("bwd_hopper.supports() refused the case")
    args = (t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["a"], deterministic)
    _check(case, t, bwd_hopper.backward(*args, config=config))
    return lambda: bwd_hopper.backward(*args, config=config)


def tl_call(case: dict, t: dict):
    width = bwd._width_class(case["D"], case["D"])
    configs = {name: table[width][0] for name, table in bwd._TABLES.items()}
    args = (t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["a"], True)
    return lambda: bwd.backward(*args, configs=configs)


def cudnn_call(case: dict, t: dict):
    leaves = [t[n].detach().requires_grad_() for n in "qkv"]
    out = sdpa(*leaves, case["causal"])()
    return lambda: torch.autograd.grad(out, leaves, t["dout"].transpose(1, 2),
                                       retain_graph=True)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    if os.environ.get("OUT") and "--out" not in (sys.argv[1:] if argv is None else argv):
        args.out = Path(os.environ["OUT"])
    sections = {"bwd": Section(
        "Gluon Hopper backward TFLOP/s (B·N = 32k, H·D = 2048, bf16)", "tflops",
        ratios=[("gluon", "cudnn"), ("gluon_det", "cudnn"), ("tl", "cudnn"), ("gluon", "tl")],
        plot_x="N", plot_panel="D", plot_series=["causal"])}
    seqlens = QUICK_SEQLENS if args.quick else SEQLENS
    with Runner("tune_bwd_hopper", args, sections, CASE_KEYS) as run:
        cases = [dict(D=d, H=MODEL_WIDTH // d, N=n, B=TOKENS // n, causal=causal)
                 for d, n, causal in itertools.product(HEAD_DIMS, seqlens, (False, True))]
        for case in (c for c in cases if run.keep(c)):
            inputs = functools.cache(lambda case=case: make_inputs(case))
            flops = attention_flops([case["N"]] * case["B"], case["H"], case["D"],
                                    case["causal"], mode="bwd")
            run.measure("bwd", case, "cudnn", lambda: cudnn_call(case, inputs()), flops=flops,
                        context=functools.partial(sdpa_context, "cudnn"))
            if case["D"] in bwd_hopper.CONFIGS:
                run.measure("bwd", case, "gluon", lambda: gluon_call(case, inputs(), None),
                            flops=flops)
                run.measure("bwd", case, "gluon_det",
                            lambda: gluon_call(case, inputs(), None, deterministic=True),
                            flops=flops)
                if case["N"] == 4096:
                    for config in bwd_hopper.CANDIDATES.get(case["D"], []):
                        name = "gluon " + bwd_hopper.Config(*config).label()
                        run.measure("bwd", case, name,
                                    lambda c=config: gluon_call(case, inputs(), c), flops=flops)
                    for config in bwd_hopper.DETERMINISTIC_CANDIDATES.get(case["D"], []):
                        name = "gluon_det " + bwd_hopper.Config(*config).label()
                        run.measure("bwd", case, name, lambda c=config: gluon_call(
                            case, inputs(), c, deterministic=True), flops=flops)
            run.measure("bwd", case, "tl", lambda: tl_call(case, inputs()), flops=flops)


if __name__ == "__main__":
    main()

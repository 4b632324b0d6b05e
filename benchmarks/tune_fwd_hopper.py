"""Gluon Hopper forward against cuDNN (SDPA) and the portable Triton kernel, in one process.

Grid (perf_guide.md anchors): D = 64/128/256 with H·D = 2048, N = 1k..16k with B·N = 32k tokens,
causal or not, bf16, layout (B, N, H, D). TFLOP/s = 4·B·H·N²·D, halved when causal. Columns:
`gluon` (fwd_hopper.default_config), `gluon <BLOCK_N,STAGES,PINGPONG,PERSISTENT[,LATE_PV_WAIT]>`
(fwd_hopper.CANDIDATES, at N = 4k only with --quick), `tl` (fwd.py, the portable kernel) and
`cudnn`. Before it is timed, every gluon variant's output is compared with cuDNN's on the same
inputs: a mismatch is an error row, so a fast wrong kernel never shows up as a figure.

    python -m benchmarks.tune_fwd_hopper [--quick] [--out DIR (default $OUT or out/)]
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
from flash_attn_3.backends.triton import fwd_hopper

HEAD_DIMS = (64, 128, 256)
SEQLENS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096, 16384)
CASE_KEYS = ("D", "H", "N", "B", "causal")


def attn_args(q, k, v, causal: bool) -> AttnArgs:
    return AttnArgs.plain(q, k, v, window_right=0 if causal else -1)


def make_inputs(case: dict) -> dict:
    shape = (case["B"], case["N"], case["H"], case["D"])
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_context("cudnn"):
        expected = sdpa(q, k, v, case["causal"])().transpose(1, 2)
    return dict(q=q, k=k, v=v, expected=expected)


def gluon_call(case: dict, t: dict, config: Optional[tuple]):
    a = attn_args(t["q"], t["k"], t["v"], case["causal"])
    # in_scope, not supports: the cases routed to fwd.py for speed stay measured here
    if not fwd_hopper.in_scope(a):
        raise RuntimeError("fwd_hopper.in_scope() refused the case")
    out, _ = fwd_hopper.forward(a, config)
    # two correct bf16 kernels differ by a unit or two in the last place (2^-8 relative)
    expected = t["expected"].float()
    excess = ((out.float() - expected).abs() - 2e-2 * expected.abs()).max().item()
    if not excess < 2e-2:
        raise RuntimeError(f"output differs from cuDNN's (excess over tolerance {excess:.3g})")
    return lambda: fwd_hopper.forward(a, config)


def tl_call(case: dict, t: dict):
    from flash_attn_3.backends.triton import fwd

    a = attn_args(t["q"], t["k"], t["v"], case["causal"])
    return lambda: fwd.forward(a)


def cudnn_call(case: dict, t: dict):
    return sdpa(t["q"], t["k"], t["v"], case["causal"])


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    if os.environ.get("OUT") and "--out" not in (sys.argv[1:] if argv is None else argv):
        args.out = Path(os.environ["OUT"])
    sections = {"fwd": Section(
        "Gluon Hopper forward TFLOP/s (B·N = 32k, H·D = 2048, bf16)", "tflops",
        ratios=[("gluon", "cudnn"), ("gluon", "tl")], plot_x="N", plot_panel="D",
        plot_series=["causal"])}
    seqlens = QUICK_SEQLENS if args.quick else SEQLENS
    with Runner("tune_fwd_hopper", args, sections, CASE_KEYS) as run:
        cases = [dict(D=d, H=MODEL_WIDTH // d, N=n, B=TOKENS // n, causal=causal)
                 for d, n, causal in itertools.product(HEAD_DIMS, seqlens, (False, True))]
        cases = [c for c in cases if run.keep(c)]
        # the portable kernel autotunes per shape (slow): last, so a time cap cuts it first
        for portable in (False, True):
            for case in cases:
                inputs = functools.cache(lambda case=case: make_inputs(case))
                flops = attention_flops([case["N"]] * case["B"], case["H"], case["D"],
                                        case["causal"])
                if portable:
                    run.measure("fwd", case, "tl", lambda: tl_call(case, inputs()), flops=flops)
                    continue
                run.measure("fwd", case, "cudnn", lambda: cudnn_call(case, inputs()),
                            flops=flops, context=functools.partial(sdpa_context, "cudnn"))
                run.measure("fwd", case, "gluon", lambda: gluon_call(case, inputs(), None),
                            flops=flops)
                if args.quick and case["N"] != 4096:
                    continue
                for config in fwd_hopper.CANDIDATES[case["D"]]:
                    name = "gluon " + ",".join(str(int(x)) for x in config)
                    run.measure("fwd", case, name,
                                lambda c=config: gluon_call(case, inputs(), c), flops=flops)

if __name__ == "__main__":
    main()

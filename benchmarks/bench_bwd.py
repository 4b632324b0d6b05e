"""Backward and forward+backward throughput: ours (default and deterministic) against cuDNN, FA2
and FlexAttention, on the forward grid less fp8 (no fp8 backward exists).

pass=bwd times the gradient of an output computed once; pass=fwd_bwd times forward and gradient
together. TFLOP/s count 2.5× (bwd) or 3.5× (fwd_bwd) the forward's 4·B·H·N²·D, halved when causal.
torch.autograd.grad returns fresh gradients each call, so nothing accumulates between timings.

    python -m benchmarks.bench_bwd [--quick] [--out DIR] [--only pass=bwd --only D=128]
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Iterator, Optional

import torch

from benchmarks import bench_fwd
from benchmarks.harness import Runner, Section, attention_flops, parse_args, sdpa_context

PASSES = ("bwd", "fwd_bwd")
CASE_KEYS = bench_fwd.CASE_KEYS + ("pass",)
IMPLS = ("ours", "ours_det", "cudnn", "fa2")


def cases(quick: bool) -> Iterator[dict]:
    for fwd_case, pass_ in itertools.product(bench_fwd.cases(quick=False), PASSES):
        case = dict(fwd_case, **{"pass": pass_})
        if case["dtype"] == "bf16" and (not quick or in_quick(case)):
            yield case


def in_quick(case: dict) -> bool:
    """Backward at every head dim, 1k and 4k dense, and ragged varlen at D=128, 4k;
    forward+backward at the 4k dense anchors only."""
    if case["layout"] == "dense":
        return case["N"] == 4096 or (case["N"] == 1024 and case["pass"] == "bwd")
    return (case["layout"] == "varlen_ragged" and case["D"] == 128 and case["N"] == 4096
            and case["pass"] == "bwd")


def gradient_call(forward: Callable[[], torch.Tensor], t: dict, pass_: str):
    leaves = (t["q"], t["k"], t["v"])
    if pass_ == "fwd_bwd":
        return lambda: torch.autograd.grad(forward(), leaves, t["dout"])
    out = forward()
    return lambda: torch.autograd.grad(out, leaves, t["dout"], retain_graph=True)


def make_inputs(case: dict) -> dict:
    t = bench_fwd.make_inputs(case, requires_grad=True)
    t["dout"] = torch.randn_like(t["q"], requires_grad=False)
    return t


def measure_case(run: Runner, case: dict, impls: tuple[str, ...]) -> None:
    inputs = functools.cache(lambda: make_inputs(case))
    flops = attention_flops(bench_fwd.seqlens(case), case["H"], case["D"], case["causal"],
                            mode=case["pass"])
    forwards = {
        "ours": lambda: bench_fwd.ours(case, inputs(), deterministic=False),
        "ours_det": lambda: bench_fwd.ours(case, inputs(), deterministic=True),
        "cudnn": lambda: bench_fwd.peer_sdpa(case, inputs()),
        "fa2": lambda: bench_fwd.peer_sdpa(case, inputs()),
        "flex": lambda: bench_fwd.peer_flex(case, inputs()),
    }
    for impl in impls:
        forward = forwards[impl]
        # SDPA fixes its backward kernel during the forward: build under the backend's context.
        # measure() runs the lambdas before the loop moves on, so the late binding is safe.
        context = functools.partial(sdpa_context, impl) if impl in ("cudnn", "fa2") else None
        run.measure("bwd", case, impl, lambda: gradient_call(forward(), inputs(), case["pass"]),
                    flops=flops, context=context)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    sections = {"bwd": Section(
        "Backward and forward+backward TFLOP/s (B·N = 32k, H·D = 2048, bf16)", "tflops",
        ratios=[("ours", "cudnn"), ("ours_det", "cudnn")], plot_x="N", plot_panel="D",
        plot_series=["causal"], plot_where={"layout": "dense", "pass": "bwd"})}
    with Runner("bench_bwd", args, sections, CASE_KEYS) as run:
        todo = [c for c in cases(args.quick) if run.keep(c)]
        for case in todo:
            measure_case(run, case, IMPLS)
        for case in todo:
            if bench_fwd.wants_flex(case, args.quick):
                measure_case(run, case, ("flex",))


if __name__ == "__main__":
    main()

"""Backward and forward+backward throughput: ours (default and deterministic) against cuDNN, FA2
and FlexAttention, on the forward grid less fp8 (no fp8 backward exists).

pass=bwd times the gradient of an output computed once; pass=fwd_bwd times forward and gradient
together. TFLOP/s count 2.5× (bwd) or 3.5× (fwd_bwd) the forward's 4·B·H·N²·D, halved when causal.
torch.autograd.grad returns fresh gradients each call, so nothing accumulates between timings.

Model layers (layout=layer, issue 16): the layers of bench_fwd that have a backward (attention_chunk
has none, officially or here), each dense and, for Mistral's window, as packed sequences of equal
and ragged lengths; and a head dim padded to the next tile (192, causal). Compared with our plain
causal call of the same shape (ours_causal; TFLOP/s count the score entries each mask keeps, so
ours / ours_causal >= 0.95 means within 1.05x of causal's time scaled by the kept fraction),
cuDNN's plain causal call (the nearest case SDPA expresses: it has no window or softcap) and
FlexAttention with the same mask and softcap. GPT-OSS's sinks get no gradient (the backward
computes none); Flex runs that layer without them (they change no work). DeepSeek's 192 / 128 head
dims (dv != d) run on the Gluon split kernel's narrow-V variant; their TFLOP/s count 2.5x
(3.5x) the forward's 2·(d + dv) per kept entry, the official benchmark's convention (exact
only for d = dv: the backward's own count, 2·(3d + 2dv), is 4 % more here). `ours` is what a call gets by
default; `ours_gluon` the same call with the Gluon backward's opt-in packed / seqused_q variant
switched on (FLASH_ATTN_3_GLUON_VARLEN_BWD: bwd_hopper.query_tail_refusal says why it is
opt-in), so one run times both; for a head dim under its tile width, `ours_padded` is the
call with the S^T / dP^T slices switched off (FLASH_ATTN_3_GLUON_QK_SLICES=0).

    python -m benchmarks.bench_bwd [--quick] [--out DIR] [--only pass=bwd --only D=128]
    python -m benchmarks.bench_bwd --quick --only layout=layer     # the model layers only
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from typing import Callable, Iterator, Optional
from unittest import mock

import torch

from benchmarks import bench_fwd
from benchmarks.harness import (MODEL_WIDTH, TOKENS, Runner, Section, attention_flops,
                                flex_masked, parse_args, sdpa, sdpa_context)
from flash_attn_3.backends.triton import fwd_hopper

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


# name -> bench_fwd.LAYERS's fields, plus the packing of the sequences ("equal" or "ragged", as
# bench_fwd's varlen layouts); the chunked layer has no backward.
LAYERS = {name: spec for name, spec in bench_fwd.LAYERS.items() if not spec.get("chunk")}
LAYERS.update({
    "mistral_window4096_varlen_equal": dict(bench_fwd.LAYERS["mistral_window4096"],
                                            packing="equal"),
    "mistral_window4096_varlen_ragged": dict(bench_fwd.LAYERS["mistral_window4096"],
                                             packing="ragged"),
    "causal_d192": dict(D=192, Hk=2, window=(-1, 0)),  # 10 query heads (H·D = 2048)
})
LAYER_FACTOR = {"bwd": 2.5, "fwd_bwd": 3.5}  # of the forward's FLOPs, as attention_flops counts


def layer_cases(quick: bool) -> Iterator[dict]:
    for name, n, pass_ in itertools.product(LAYERS, bench_fwd.LAYER_SEQLENS, PASSES):
        d = LAYERS[name]["D"]
        case = dict(D=d, H=MODEL_WIDTH // d, N=n, B=TOKENS // n, causal=True,
                    layout="layer", dtype="bf16", layer=name, **{"pass": pass_})
        if not quick or in_quick_layers(case):
            yield case


def in_quick_layers(case: dict) -> bool:
    """The backward pass of every layer at 8k, Mistral's window at 32k too."""
    return case["pass"] == "bwd" and (case["N"] == 8192 or case["layer"] == "mistral_window4096")


def layer_lengths(case: dict) -> list[int]:
    """The sequences of a layer case: B of N tokens, or bench_fwd's ragged lengths (same total)."""
    layout = {"ragged": "varlen_ragged"}.get(LAYERS[case["layer"]].get("packing"), "dense")
    return bench_fwd.seqlens(dict(case, layout=layout))


def layer_kept(case: dict, plain_causal: bool = False) -> int:
    """Score entries the layer's mask (or plain causal's) keeps per head, over its sequences."""
    spec = dict(window=(-1, 0)) if plain_causal else LAYERS[case["layer"]]
    return sum(_kept(n, spec) for n in layer_lengths(case))


def _kept(n: int, spec: dict) -> int:
    i = torch.arange(n, dtype=torch.int64)
    left, right = spec["window"]
    lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + right).clamp(max=n - 1) if right >= 0 else torch.full_like(i, n - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def layer_flops(case: dict, plain_causal: bool = False) -> float:
    widths = bench_fwd.layer_widths(case, LAYERS[case["layer"]])
    return (2.0 * case["H"] * widths * layer_kept(case, plain_causal)
            * LAYER_FACTOR[case["pass"]])


def make_layer_inputs(case: dict) -> dict:
    spec = LAYERS[case["layer"]]
    lens = layer_lengths(case)
    packed = "packing" in spec
    rows = (sum(lens), ) if packed else (case["B"], case["N"])
    q = torch.randn(*rows, case["H"], case["D"], device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k, v = (torch.randn(*rows, spec["Hk"], width, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for width in (case["D"], spec.get("Dv", case["D"])))
    dout = torch.randn(*v.shape[:-2], case["H"], v.shape[-1], device="cuda", dtype=v.dtype)
    t = dict(q=q, k=k, v=v, dout=dout, lens=lens, max_seqlen=max(lens),
             sinks=torch.randn(case["H"], device="cuda") if spec.get("sinks") else None)
    if packed:
        t["cu_seqlens"] = torch.tensor([0] + list(itertools.accumulate(lens)), device="cuda",
                                       dtype=torch.int32)
    return t


def ours_layer(case: dict, t: dict, plain_causal: bool = False):
    import flash_attn_interface as fa3

    spec = LAYERS[case["layer"]]
    kw = dict(causal=True) if plain_causal else dict(
        window_size=spec["window"], softcap=spec.get("softcap", 0.0), sinks=t["sinks"])
    if "packing" in spec:
        cu, m = t["cu_seqlens"], t["max_seqlen"]
        return lambda: fa3.flash_attn_varlen_func(t["q"], t["k"], t["v"], cu, cu, m, m, **kw)
    return lambda: fa3.flash_attn_func(t["q"], t["k"], t["v"], **kw)


def cudnn_causal_layer(case: dict, t: dict):
    """cuDNN's plain causal call over the layer's dense shape (packed: the same tokens as one
    dense batch of equal lengths, as bench_fwd does for varlen_equal)."""
    q, k, v = t["q"], t["k"], t["v"]
    if "packing" in LAYERS[case["layer"]]:
        q, k, v = (x.view(case["B"], -1, *x.shape[1:]) for x in (q, k, v))
    call = sdpa(q, k, v, True)
    if "packing" in LAYERS[case["layer"]]:
        return lambda: call().transpose(1, 2).reshape(t["q"].shape)
    return lambda: call().transpose(1, 2)


def flex_layer(case: dict, t: dict):
    """Flex with the layer's mask and softcap (no sinks: see the module docstring); packed
    sequences through document ids."""
    spec = LAYERS[case["layer"]]
    (left, _), cap = spec["window"], spec.get("softcap", 0.0)
    packed = "packing" in spec
    if packed:
        doc = torch.repeat_interleave(torch.arange(len(t["lens"]), device="cuda"),
                                      torch.tensor(t["lens"], device="cuda"))

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx  # every layer here is causal
        if left >= 0:
            keep = keep & (q_idx - kv_idx <= left)
        if packed:
            keep = keep & (doc[q_idx] == doc[kv_idx])
        return keep

    def softcapped(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    q, k, v = ((x.unsqueeze(0) for x in (t["q"], t["k"], t["v"])) if packed
               else (t["q"], t["k"], t["v"]))
    call = flex_masked(q, k, v, mask_mod, softcapped if cap else None)
    if packed:
        return lambda: call()[0].transpose(0, 1)
    return lambda: call().transpose(1, 2)


@contextlib.contextmanager
def gluon_variants_on():
    """The Gluon backward's opt-in variants taken while timing (read at each call)."""
    names = ("FLASH_ATTN_3_GLUON_VARLEN_BWD", )
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def slices_off():
    """S^T / dP^T over a padded head dim's whole tile, its zeros included (the A/B of
    fwd_hopper.qk_used's default)."""
    return mock.patch.dict(os.environ, {fwd_hopper.QK_SLICES_ENV: "0"})


def measure_layer(run: Runner, case: dict, impls: tuple[str, ...]) -> None:
    inputs = functools.cache(lambda: make_layer_inputs(case))
    builds = {"ours": lambda: ours_layer(case, inputs()),
              "ours_gluon": lambda: ours_layer(case, inputs()),
              "ours_padded": lambda: ours_layer(case, inputs()),
              "ours_causal": lambda: ours_layer(case, inputs(), plain_causal=True),
              "cudnn_causal": lambda: cudnn_causal_layer(case, inputs()),
              "flex": lambda: flex_layer(case, inputs())}
    padded = fwd_hopper.tile_width(case["D"]) != case["D"]
    for impl in impls:
        if impl == "ours_padded" and not padded:
            continue
        plain = impl in ("ours_causal", "cudnn_causal")
        context = (functools.partial(sdpa_context, "cudnn") if impl == "cudnn_causal"
                   else gluon_variants_on if impl == "ours_gluon"
                   else slices_off if impl == "ours_padded" else None)
        run.measure("layers", case, impl,
                    lambda: gradient_call(builds[impl](), inputs(), case["pass"]),
                    flops=layer_flops(case, plain), context=context)


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
        plot_series=["causal"], plot_where={"layout": "dense", "pass": "bwd"}),
        "layers": Section(
            "Model layers, backward and forward+backward TFLOP/s of the score entries each mask "
            "keeps (B·N = 32k, H·D = 2048; ours/ours_causal >= 0.95: within 1.05x of causal's "
            "time scaled by the kept fraction)", "tflops",
            ratios=[("ours", "ours_causal"), ("ours_gluon", "ours_causal"), ("ours", "ours_padded"),
                    ("ours", "cudnn_causal"), ("ours", "flex"), ("ours_gluon", "flex")])}
    with Runner("bench_bwd", args, sections, CASE_KEYS) as run:
        todo = [c for c in cases(args.quick) if run.keep(c)]
        layers = [c for c in layer_cases(args.quick) if run.keep(c)]
        for case in todo:
            measure_case(run, case, IMPLS)
        for case in layers:
            measure_layer(run, case, ("ours", "ours_gluon", "ours_padded", "ours_causal", "cudnn_causal"))
        # Flex last (its compiles are the slowest part; a time cap cuts them first), the
        # layers' before the grid's
        for case in layers:
            measure_layer(run, case, ("flex",))
        for case in todo:
            if bench_fwd.wants_flex(case, args.quick):
                measure_case(run, case, ("flex",))


if __name__ == "__main__":
    main()

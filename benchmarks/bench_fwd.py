"""Forward attention throughput: ours against cuDNN, FA2 (both through SDPA) and FlexAttention.

Grid: head dims 64/128/256 with H·D = 2048; N 1k..16k with B·N = 32k tokens; causal or not;
dense, varlen with equal lengths, varlen with ragged lengths (same token count); bf16 and fp8.
TFLOP/s = 4·B·H·N²·D (summed per sequence for varlen), halved when causal. fp8 rows compare our
fp8 kernel with the peers in bf16 (SDPA has no fp8 path). Every input set is at least 64 MB
(32k tokens × 2048 wide), larger than L2, so no rotation is needed here.

    python -m benchmarks.bench_fwd [--quick] [--out DIR] [--only D=128 --only layout=dense]
"""

from __future__ import annotations

import functools
import itertools
from typing import Iterator, Optional

import torch

from benchmarks.harness import (MODEL_WIDTH, TOKENS, Runner, Section, attention_flops, flex,
                                parse_args, sdpa, sdpa_context)

HEAD_DIMS = (64, 128, 256)
SEQLENS = (1024, 2048, 4096, 8192, 16384)
LAYOUTS = ("dense", "varlen_equal", "varlen_ragged")
DTYPES = ("bf16", "fp8")
CASE_KEYS = ("D", "H", "N", "B", "causal", "layout", "dtype")
PEERS = ("cudnn", "fa2")


def cases(quick: bool) -> Iterator[dict]:
    for dtype, layout, d, n, causal in itertools.product(DTYPES, LAYOUTS, HEAD_DIMS, SEQLENS,
                                                         (False, True)):
        case = dict(D=d, H=MODEL_WIDTH // d, N=n, B=TOKENS // n, causal=causal, layout=layout,
                    dtype=dtype)
        if not quick or in_quick(case):
            yield case


def in_quick(case: dict) -> bool:
    """Every head dim at three lengths dense bf16; varlen and fp8 at D=128 only."""
    if case["layout"] == "dense" and case["dtype"] == "bf16":
        return case["N"] in (1024, 4096, 16384)
    return case["D"] == 128 and case["N"] in (4096, 16384) and (
        case["dtype"] == "bf16" or case["layout"] == "dense")


def wants_flex(case: dict, quick: bool) -> bool:
    # Flex compiles per shape (tens of seconds each): the quick run keeps the 4k anchors
    return case["dtype"] == "bf16" and (not quick or (case["layout"] == "dense"
                                                      and case["N"] == 4096))


def seqlens(case: dict) -> list[int]:
    """Per-sequence lengths; ragged ones come in pairs N ± d (d < 3N/4) so the total stays
    B·N. Seeded by N: every run times the same lengths, so runs compare."""
    n, b = case["N"], case["B"]
    if case["layout"] != "varlen_ragged":
        return [n] * b
    g = torch.Generator().manual_seed(n)
    deltas = torch.randint(0, 3 * n // 4, (b // 2,), generator=g).tolist()
    lens = [n + s * d for d in deltas for s in (1, -1)] + [n] * (b % 2)
    return [lens[i] for i in torch.randperm(len(lens), generator=g).tolist()]


def make_inputs(case: dict, requires_grad: bool = False) -> dict:
    lens = seqlens(case)
    varlen = case["layout"] != "dense"
    shape = ((sum(lens), case["H"], case["D"]) if varlen
             else (case["B"], case["N"], case["H"], case["D"]))
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16,
                           requires_grad=requires_grad) for _ in range(3))
    t = dict(q=q, k=k, v=v, lens=lens, max_seqlen=max(lens))
    if varlen:
        t["cu_seqlens"] = torch.tensor([0] + list(itertools.accumulate(lens)), device="cuda",
                                       dtype=torch.int32)
    if case["dtype"] == "fp8":
        t.update({f"{x}8": t[x].to(torch.float8_e4m3fn) for x in "qkv"})
    return t


# Each returns a call whose output has our layout ((B, N, H, D) or (total, H, D)), as views, so
# the backward bench can feed every implementation the same dout.


def ours(case: dict, t: dict, **kwargs):
    import flash_attn_interface as fa3

    q, k, v = ((t["q8"], t["k8"], t["v8"]) if case["dtype"] == "fp8" else (t["q"], t["k"], t["v"]))
    causal = case["causal"]
    if case["layout"] == "dense":
        return lambda: fa3.flash_attn_func(q, k, v, causal=causal, **kwargs)
    cu, m = t["cu_seqlens"], t["max_seqlen"]
    return lambda: fa3.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=causal, **kwargs)


def peer_sdpa(case: dict, t: dict):
    if case["layout"] == "dense":
        call = sdpa(t["q"], t["k"], t["v"], case["causal"])
        return lambda: call().transpose(1, 2)
    if case["layout"] == "varlen_equal":
        # Equal lengths are a dense batch for the peer: SDPA's cuDNN backend on nested tensors
        # measured 6-57 TFLOP/s (2026-11-25), which would flatter our varlen ratio.
        batch = len(t["lens"])
        q, k, v = (t[x].view(batch, -1, *t[x].shape[1:]) for x in "qkv")
        call = sdpa(q, k, v, case["causal"])
        return lambda: call().transpose(1, 2)
    # nested jagged tensors are SDPA's varlen; min/max given so no device sync happens per call
    offsets = t["cu_seqlens"].long()
    lens = t["lens"]
    q, k, v = (torch.nested.nested_tensor_from_jagged(t[x], offsets, min_seqlen=min(lens),
                                                      max_seqlen=max(lens)) for x in "qkv")
    call = sdpa(q, k, v, case["causal"])
    return lambda: call().transpose(1, 2).values()


def peer_flex(case: dict, t: dict):
    if case["layout"] == "dense":
        call = flex(t["q"], t["k"], t["v"], case["causal"])
        return lambda: call().transpose(1, 2)
    lens = torch.tensor(t["lens"], device="cuda")
    doc_ids = torch.repeat_interleave(torch.arange(len(t["lens"]), device="cuda"), lens)
    q, k, v = (t[x].unsqueeze(0) for x in "qkv")
    call = flex(q, k, v, case["causal"], doc_ids=doc_ids)
    return lambda: call()[0].transpose(0, 1)


def measure_case(run: Runner, case: dict, impls: tuple[str, ...]) -> None:
    inputs = functools.cache(lambda: make_inputs(case))
    flops = attention_flops(seqlens(case), case["H"], case["D"], case["causal"])
    for impl in impls:
        if impl == "ours":
            run.measure("fwd", case, impl, lambda: ours(case, inputs()), flops=flops)
        elif impl in PEERS:
            run.measure("fwd", case, impl, lambda: peer_sdpa(case, inputs()), flops=flops,
                        context=functools.partial(sdpa_context, impl))
        else:
            run.measure("fwd", case, impl, lambda: peer_flex(case, inputs()), flops=flops)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    sections = {"fwd": Section(
        "Forward TFLOP/s (B·N = 32k, H·D = 2048; fp8 rows: peers in bf16)", "tflops",
        ratios=[("ours", "cudnn")], plot_x="N", plot_panel="D", plot_series=["causal"],
        plot_where={"layout": "dense", "dtype": "bf16"})}
    with Runner("bench_fwd", args, sections, CASE_KEYS) as run:
        todo = [c for c in cases(args.quick) if run.keep(c)]
        for case in todo:
            peers = PEERS if case["dtype"] == "bf16" else ("cudnn",)
            measure_case(run, case, ("ours",) + peers)
        # Flex last: its compiles are the slowest part, and a time cap should cut them first
        for case in todo:
            if wants_flex(case, args.quick):
                measure_case(run, case, ("flex",))


if __name__ == "__main__":
    main()

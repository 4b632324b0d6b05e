"""Forward attention throughput: ours against cuDNN, FA2 (both through SDPA) and FlexAttention.

Grid: head dims 64/128/256 with H·D = 2048; N 1k..16k with B·N = 32k tokens; causal or not;
dense, varlen with equal lengths, varlen with ragged lengths (same token count); bf16 and fp8.
TFLOP/s = 4·B·H·N²·D (summed per sequence for varlen), halved when causal. fp8 rows compare our
fp8 kernel with the peers in bf16 (SDPA has no fp8 path). Every input set is at least 64 MB
(32k tokens × 2048 wide), larger than L2, so no rotation is needed here.

Model layers (layout=layer, issue 16): the masks and scores real models add to causal attention
(Mistral's 4096 sliding window, Gemma 2's softcap 50, GPT-OSS's 128 window with sinks, Llama 4's
8192 chunks) at their head dims and GQA groups, 8k and 32k tokens, against our
plain causal call of the same shape and FlexAttention with the same mask (SDPA expresses none of
them). TFLOP/s there count the score entries each mask keeps (4·B·H·D per entry), so
ours / ours_causal is (causal time × kept fraction) / layer time: >= 0.95 meets the issue's
target of a time within 1.05x of causal's scaled by the kept fraction. Layers whose head dim
sits under its tile width (Phi-3's 96, DeepSeek's 192) also time `ours_padded`, the same call
with the Q·K^T slices switched off (FLASH_ATTN_3_GLUON_QK_SLICES=0): ours / ours_padded is what
the slices gain.

Paged chunked prefill (layout=paged, issue 16): flash_attn_with_kvcache's prefill step of a
serving engine, varlen chunks of 2k query tokens, each the last 2k of a 32k cache held in shuffled
pages of 16 (64, 256) tokens, causal, Llama-3-8B's heads (32 over 8, D = 128), 4 sequences;
against our own varlen forward over the same keys in one contiguous buffer (target
ours/ours_dense >= 0.9: what the page table costs) and FlexAttention over the contiguous cache.

    python -m benchmarks.bench_fwd [--quick] [--out DIR] [--only D=128 --only layout=dense]
    python -m benchmarks.bench_fwd --quick --only layout=layer     # the model layers only
    python -m benchmarks.bench_fwd --only layout=paged             # paged chunked prefill only
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Iterator, Optional
from unittest import mock

import torch

from benchmarks.harness import (MODEL_WIDTH, TOKENS, Runner, Section, attention_flops, flex,
                                flex_masked, parse_args, sdpa, sdpa_context)
from flash_attn_3.backends.triton import fwd_hopper

HEAD_DIMS = (64, 128, 256)
SEQLENS = (1024, 2048, 4096, 8192, 16384)
LAYOUTS = ("dense", "varlen_equal", "varlen_ragged")
DTYPES = ("bf16", "fp8")
CASE_KEYS = ("D", "H", "N", "B", "causal", "layout", "dtype", "layer", "page")
PEERS = ("cudnn", "fa2")
# name -> head dim, KV heads (of H = 2048 / D query heads: the model's group size, Llama 4's 5
# rounded to 4), window (left, right), chunk, softcap, sinks
LAYERS = {
    "mistral_window4096": dict(D=128, Hk=4, window=(4095, 0)),
    "gemma2_softcap50": dict(D=256, Hk=4, window=(-1, 0), softcap=50.0),
    "gptoss_window128_sinks": dict(D=64, Hk=4, window=(127, 0), sinks=True),
    "llama4_chunk8192": dict(D=128, Hk=4, window=(-1, 0), chunk=8192),
    # Phi-3's head dim (multi-head): the D = 128 tiles with zero padding; issue 16 reads its
    # TFLOP/s against the D = 128 causal rows (ours_causal of the Mistral and Llama 4 layers).
    "phi3_d96": dict(D=96, Hk=21, window=(-1, 0)),
    # Grok-1's attention: softcap 30 at head dim 128 (its 6-head groups rounded to 4)
    "grok_softcap30": dict(D=128, Hk=4, window=(-1, 0), softcap=30.0),
    # DeepSeek V2 / V3 prefill and training (MHA): q and k 192 wide (128 + 64 rotary), v 128
    "deepseek_d192_v128": dict(D=192, Dv=128, Hk=10, window=(-1, 0)),
}
LAYER_SEQLENS = (8192, 32768)
# Paged chunked prefill: query chunk, cache length (chunk included), sequences, heads, KV heads
PAGED = dict(chunk=2048, N=32768, B=4, H=32, Hk=8, D=128)
PAGE_SIZES = (16, 64, 256)


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


def layer_cases(quick: bool) -> Iterator[dict]:
    for name, n in itertools.product(LAYERS, LAYER_SEQLENS):
        d = LAYERS[name]["D"]
        case = dict(D=d, H=MODEL_WIDTH // d, N=n, B=TOKENS // n, causal=True, layout="layer",
                    dtype="bf16", layer=name)
        if not quick or in_quick_layers(case):
            yield case


def in_quick_layers(case: dict) -> bool:
    """The sliding window at both lengths, the chunk at 32k (at 8k one chunk is all of causal),
    softcap, sinks and head dim 96 at 8k."""
    name = case["layer"]
    return name.startswith("mistral") or (case["N"] == 32768) == name.startswith("llama4")


def kept_entries(case: dict, layer: Optional[str] = None) -> int:
    """Score entries the case's mask keeps per (batch, head): of `layer`'s, or of plain causal
    when layer is None (seqlen_q = seqlen_k = N, so row i's diagonal is key i)."""
    spec = LAYERS[layer] if layer else dict(window=(-1, 0))
    i = torch.arange(case["N"], dtype=torch.int64)
    left, right = spec["window"]
    lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + right).clamp(max=case["N"] - 1) if right >= 0 else torch.full_like(i, case["N"] - 1)
    chunk = spec.get("chunk", 0)
    if chunk:
        start = i - i % chunk
        lo, hi = torch.maximum(lo, start), torch.minimum(hi, start + chunk - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def layer_widths(case: dict, spec: dict) -> int:
    """D + Dv: a kept score entry costs 2·(D + Dv) FLOPs, Q·K^T and P·V (4·D when v is as wide
    as q)."""
    return case["D"] + spec.get("Dv", case["D"])


def layer_flops(case: dict, layer: Optional[str]) -> float:
    widths = layer_widths(case, LAYERS[case["layer"]])
    return 2.0 * case["B"] * case["H"] * widths * kept_entries(case, layer)


def paged_cases(quick: bool) -> Iterator[dict]:
    for page in PAGE_SIZES[:1] if quick else PAGE_SIZES:
        yield dict(D=PAGED["D"], H=PAGED["H"], N=PAGED["N"], B=PAGED["B"], causal=True,
                   layout="paged", dtype="bf16", page=page)


def paged_flops(case: dict) -> float:
    """4·D per kept score entry: a chunk of c queries over n keys, bottom-right causal, keeps
    c·(n - c) + c·(c + 1) / 2 per (sequence, head)."""
    c, n = PAGED["chunk"], case["N"]
    return 4.0 * case["B"] * case["H"] * case["D"] * (c * (n - c) + c * (c + 1) / 2)


def make_paged_inputs(case: dict) -> dict:
    """Packed query chunks; the cache once as shuffled pages and once contiguous (the same keys),
    its lengths, and each sequence's cu_seqlens for the contiguous twin."""
    c, n, b, page = PAGED["chunk"], case["N"], case["B"], case["page"]
    hk, d = PAGED["Hk"], case["D"]
    q = torch.randn(b * c, case["H"], d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b * n, hk, d, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    pages_per_seq = n // page
    table = torch.randperm(b * pages_per_seq, device="cuda").view(b, pages_per_seq)
    k_pages, v_pages = (torch.empty(b * pages_per_seq, page, hk, d, device="cuda",
                                    dtype=torch.bfloat16) for _ in "kv")
    k_pages[table.flatten()] = k.view(-1, page, hk, d)
    v_pages[table.flatten()] = v.view(-1, page, hk, d)
    arange = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    return dict(q=q, k=k, v=v, k_pages=k_pages, v_pages=v_pages, table=table.to(torch.int32),
                cu_q=arange * c, cu_k=arange * n,
                cache_seqlens=torch.full((b, ), n, device="cuda", dtype=torch.int32))


def ours_paged(case: dict, t: dict, dense: bool = False):
    import flash_attn_interface as fa3

    c, n = PAGED["chunk"], case["N"]
    if dense:
        return lambda: fa3.flash_attn_varlen_func(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"],
                                                  c, n, causal=True)
    return lambda: fa3.flash_attn_with_kvcache(
        t["q"], t["k_pages"], t["v_pages"], cache_seqlens=t["cache_seqlens"],
        page_table=t["table"], cu_seqlens_q=t["cu_q"], max_seqlen_q=c, causal=True)


def peer_flex_paged(case: dict, t: dict):
    """Flex over the contiguous cache ((B, chunk) queries, (B, N) keys), bottom-right causal."""
    c, n, b = PAGED["chunk"], case["N"], case["B"]
    q = t["q"].view(b, c, *t["q"].shape[1:])
    k, v = (t[x].view(b, n, *t[x].shape[1:]) for x in "kv")

    def mask_mod(batch, h, q_idx, kv_idx):
        return q_idx + (n - c) >= kv_idx

    call = flex_masked(q, k, v, mask_mod)
    return lambda: call().transpose(1, 2).flatten(0, 1)


def measure_paged(run: Runner, case: dict, impls: tuple[str, ...]) -> None:
    inputs = functools.cache(lambda: make_paged_inputs(case))
    flops = paged_flops(case)
    builds = dict(ours=lambda: ours_paged(case, inputs()),
                  ours_dense=lambda: ours_paged(case, inputs(), dense=True),
                  flex=lambda: peer_flex_paged(case, inputs()))
    for impl in impls:
        run.measure("paged", case, impl, builds[impl], flops=flops)


def make_layer_inputs(case: dict) -> dict:
    spec = LAYERS[case["layer"]]
    shape = (case["B"], case["N"])
    q = torch.randn(*shape, case["H"], case["D"], device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(*shape, spec["Hk"], width, device="cuda", dtype=torch.bfloat16)
            for width in (case["D"], spec.get("Dv", case["D"])))
    sinks = torch.randn(case["H"], device="cuda") if spec.get("sinks") else None
    return dict(q=q, k=k, v=v, sinks=sinks)


def ours_layer(case: dict, t: dict, plain_causal: bool = False):
    import flash_attn_interface as fa3

    if plain_causal:
        return lambda: fa3.flash_attn_func(t["q"], t["k"], t["v"], causal=True)
    spec = LAYERS[case["layer"]]
    kw = dict(window_size=spec["window"], attention_chunk=spec.get("chunk", 0),
              softcap=spec.get("softcap", 0.0), sinks=t["sinks"])
    return lambda: fa3.flash_attn_func(t["q"], t["k"], t["v"], **kw)


def peer_flex_layer(case: dict, t: dict):
    """Flex with the layer's mask and softcap; the sinks as the exact rescale of its output by
    the LSE it returns: sum_j e^s_j / (sum_j e^s_j + e^sink) = sigmoid(lse - sink)."""
    spec = LAYERS[case["layer"]]
    (left, _), chunk, cap = spec["window"], spec.get("chunk", 0), spec.get("softcap", 0.0)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx  # every layer here is causal
        if left >= 0:
            keep = keep & (q_idx - kv_idx <= left)
        if chunk:
            keep = keep & (q_idx // chunk == kv_idx // chunk)
        return keep

    def softcapped(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    sinks = t["sinks"]
    call = flex_masked(t["q"], t["k"], t["v"], mask_mod, softcapped if cap else None,
                       return_lse=sinks is not None)
    if sinks is None:
        return lambda: call().transpose(1, 2)

    def with_sinks():
        out, lse = call()
        return (out * torch.sigmoid(lse - sinks[:, None]).unsqueeze(-1)).transpose(1, 2)
    return with_sinks


def measure_layer(run: Runner, case: dict, impls: tuple[str, ...]) -> None:
    inputs = functools.cache(lambda: make_layer_inputs(case))
    flops = layer_flops(case, case["layer"])
    for impl in impls:
        if impl == "ours":
            run.measure("layers", case, impl, lambda: ours_layer(case, inputs()), flops=flops)
        elif impl == "ours_padded":
            # A head dim under its tile width with the Q.K^T slices switched off (the whole
            # tile, its zeros included): the A/B of fwd_hopper.qk_used's default
            if fwd_hopper.tile_width(case["D"]) != case["D"]:
                run.measure("layers", case, impl, lambda: ours_layer(case, inputs()), flops=flops,
                            context=lambda: mock.patch.dict(os.environ,
                                                            {fwd_hopper.QK_SLICES_ENV: "0"}))
        elif impl == "ours_causal":
            run.measure("layers", case, impl, lambda: ours_layer(case, inputs(), True),
                        flops=layer_flops(case, None))
        else:
            run.measure("layers", case, impl, lambda: peer_flex_layer(case, inputs()),
                        flops=flops)


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
        plot_where={"layout": "dense", "dtype": "bf16"}),
        "layers": Section(
            "Model layers, forward TFLOP/s of the score entries each mask keeps (B·N = 32k, "
            "H·D = 2048; ours/ours_causal >= 0.95: within 1.05x of causal's time scaled by the "
            "kept fraction; target ours/flex >= 1.3)", "tflops",
            ratios=[("ours", "ours_causal"), ("ours", "ours_padded"), ("ours", "flex")]),
        "paged": Section(
            "Paged chunked prefill, forward TFLOP/s of the kept score entries (2k-token chunks "
            "over 32k caches, 4 sequences, 32/8 heads, D = 128, causal; target "
            "ours/ours_dense >= 0.9)", "tflops",
            ratios=[("ours", "ours_dense"), ("ours", "flex")])}
    with Runner("bench_fwd", args, sections, CASE_KEYS) as run:
        todo = [c for c in cases(args.quick) if run.keep(c)]
        layers = [c for c in layer_cases(args.quick) if run.keep(c)]
        paged = [c for c in paged_cases(args.quick) if run.keep(c)]
        for case in todo:
            peers = PEERS if case["dtype"] == "bf16" else ("cudnn",)
            measure_case(run, case, ("ours",) + peers)
        for case in layers:
            measure_layer(run, case, ("ours", "ours_padded", "ours_causal"))
        for case in paged:
            measure_paged(run, case, ("ours", "ours_dense"))
        # Flex last: its compiles are the slowest part, and a time cap should cut them first
        # (the layers' first: the grid's have earlier runs to stand on)
        for case in layers:
            measure_layer(run, case, ("flex",))
        for case in paged:
            measure_paged(run, case, ("flex",))
        for case in todo:
            if wants_flex(case, args.quick):
                measure_case(run, case, ("flex",))


if __name__ == "__main__":
    main()

"""Edge cases of the Triton forward kernel (flash_attn_3/backends/triton/fwd.py).

Through the public API with FLASH_ATTN_3_BACKEND=triton (every forward routed to fwd.py), against the float64 reference of
tests/reference_math.py. On the CPU the kernel runs in the interpreter (BLOCK_M 16/32, BLOCK_N 16),
so the tiny lengths below straddle its block edges; the gpu-marked cases use real shapes and the
autotuned configs. Fresh random inputs every run.
"""

from __future__ import annotations

import pytest
import torch

import reference_math as rm
from conftest import DEVICE, HAS_TRITON
from inputs import FP8, cp_total, cu_seqlens, descales, paged_copy, poisoned_like, randn
from tolerance import assert_lse_matches, assert_matches_reference

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    """The triton backend, with every forward routed to fwd.py (decode shapes would otherwise go
    to decode.py, which tests/test_kvcache_triton.py covers)."""
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    import flash_attn_3.backends.triton.routes as backend
    from flash_attn_3.backends.triton import fwd

    monkeypatch.setattr(backend, "forward_kernel", lambda a: fwd)


def _fa():
    import flash_attn_interface

    return flash_attn_interface


def _case(**kw):
    base = dict(seqlens=(19, 23), heads=(4, 2), d=32, dv=None, dtype=torch.float16, causal=False,
                window=(-1, -1), chunk=0, softcap=0.0, sinks=False, qv=False, fp8=False,
                splits=1, pack=None, cp=(1, 0), batch=2, used=False, page=None, batch_idx=False,
                leftpad=False)
    base.update(kw)
    return base


def _id(case):
    default = _case()
    return "-".join(f"{k}={str(v).replace('torch.', '').replace(' ', '')}"
                    for k, v in case.items() if v != default[k]) or "default"


def _params(cases, gpu_cases):
    return ([pytest.param(c, id=_id(c)) for c in cases]
            + [pytest.param(c, id="gpu-" + _id(c), marks=pytest.mark.gpu) for c in gpu_cases])


def _check(name, out, lse, ref, ref_lowp, ref_lse, case, rows=None):
    fp8 = case["fp8"]
    assert_matches_reference(name, out, ref, ref_lowp, fp8=fp8, softcap=case["softcap"] > 0,
                             rows=rows)
    assert_lse_matches(name + " lse", lse, ref_lse)


DENSE = [
    # Block edges of the interpreter's blocks (16 keys, 16/32 rows), seqlen_q > seqlen_k (causal
    # rows above the diagonal have no key: out 0, lse +inf) and a single token.
    *[_case(seqlens=s, causal=c) for s in [(1, 1), (16, 16), (17, 33), (33, 17), (5, 40)]
      for c in (False, True)],
    # Head dims padded to the next power of two inside the kernel, and dv != d.
    *[_case(d=d, seqlens=(9, 20)) for d in (8, 24, 40, 72, 136, 200, 256)],
    _case(d=136, dv=104, causal=True), _case(d=64, dv=512, seqlens=(7, 20)),
    # Windows, chunks, with and without pack-GQA (several query heads in one program's rows).
    *[_case(heads=(6, 2), seqlens=(s, 37), pack=p, window=w, chunk=ch)
      for s in (3, 20) for p in (False, True)
      for w, ch in [((5, 0), 0), ((-1, 3), 0), ((-1, 0), 6)]],
    _case(window=(0, 0), seqlens=(40, 5)),
    _case(heads=(4, 1), pack=True, causal=True, seqlens=(35, 35)),
    # Split-KV: every split writes a partial, merged by combine.
    *[_case(splits=n, seqlens=(3, 70), causal=c, pack=p) for n in (2, 5)
      for c, p in [(False, False), (True, True)]],
    _case(splits=3, seqlens=(20, 70), window=(20, 5), sinks=True),
    _case(splits=64, seqlens=(2, 40), dtype=torch.bfloat16),
    # Score modifiers.
    _case(softcap=2.5, causal=True), _case(sinks=True, causal=True, seqlens=(30, 20)),
    _case(sinks=True, pack=True, heads=(6, 2)),
    _case(qv=True, d=64, dv=256, seqlens=(7, 20), causal=True),
    _case(fp8=True, causal=True), _case(fp8=True, splits=3, seqlens=(3, 50), pack=True),
    _case(fp8=True, seqlens=(70, 40), heads=(2, 2), window=(9, 9)),
    _case(dtype=torch.bfloat16, causal=True, softcap=3.0),
    # Context parallel: local key j is global key j * W + rank.
    _case(cp=(2, 1), causal=True, seqlens=(9, 20)),
    _case(cp=(3, 0), window=(7, 0), seqlens=(9, 20)),
    _case(cp=(2, 0), chunk=10, seqlens=(9, 20), splits=2),
]

# Each distinct flag set autotunes (3 compiles): the list keeps one case per feature.
DENSE_GPU = [
    _case(seqlens=(1000, 1000), d=64, dtype=torch.bfloat16, causal=True, heads=(8, 2)),
    _case(seqlens=(1000, 1000), d=128, dtype=torch.bfloat16, heads=(8, 2)),
    _case(seqlens=(1000, 1000), d=128, dtype=torch.bfloat16, causal=True, heads=(8, 8)),
    _case(seqlens=(1000, 1000), d=256, dtype=torch.bfloat16, heads=(4, 2)),
    _case(seqlens=(513, 2050), d=96, heads=(8, 8), causal=True, dtype=torch.bfloat16),
    _case(seqlens=(1, 4000), d=128, heads=(32, 8), splits=8, batch=3, dtype=torch.bfloat16),
    _case(seqlens=(4, 3000), d=128, heads=(32, 4), splits=0, batch=2, causal=True),
    _case(seqlens=(700, 900), d=128, heads=(8, 2), window=(100, 30), softcap=5.0),
    _case(seqlens=(700, 900), d=64, heads=(8, 8), chunk=128, causal=True),
    _case(seqlens=(600, 600), d=128, heads=(8, 2), fp8=True, causal=True),
    _case(seqlens=(3, 2000), d=128, heads=(16, 2), fp8=True, splits=4),
    _case(seqlens=(300, 500), d=64, dv=512, heads=(8, 1), qv=True, causal=True),
    _case(seqlens=(500, 700), d=192, dv=128, heads=(8, 4), sinks=True, causal=True),
    _case(seqlens=(400, 500), d=128, heads=(8, 2), cp=(4, 3), causal=True),
]


@pytest.mark.parametrize("case", _params(DENSE, DENSE_GPU))
def test_dense(case):
    fa = _fa()
    seqlen_q, seqlen_k = case["seqlens"]
    heads_q, heads_kv = case["heads"]
    batch, d = case["batch"], case["d"]
    dv = case["dv"] or d
    dtype = FP8 if case["fp8"] else case["dtype"]
    q_scale = case["softcap"] / 4 if case["softcap"] else 1.0
    q = randn(batch, seqlen_q, heads_q, d, dtype=dtype, device=DEVICE, scale=q_scale)
    k = randn(batch, seqlen_k, heads_kv, d, dtype=dtype, device=DEVICE)
    v = randn(batch, seqlen_k, heads_kv, dv, dtype=dtype, device=DEVICE)
    kw = dict(causal=case["causal"], window_size=case["window"], attention_chunk=case["chunk"],
              softcap=case["softcap"])
    extra = {}
    if case["qv"]:
        extra["qv"] = randn(batch, seqlen_q, heads_q, dv, dtype=dtype, device=DEVICE)
    if case["fp8"]:
        names = ("q_descale", "k_descale", "v_descale")
        extra.update(zip(names, descales(batch, heads_kv, DEVICE)))
    if case["sinks"]:
        kw["sinks"] = torch.randn(heads_q, device=DEVICE, dtype=torch.float32) * 2
    world, rank = case["cp"]
    if world > 1:
        kw.update(cp_world_size=world, cp_rank=rank)
        extra["cp_tot_seqused_k"] = torch.tensor(
            [cp_total(seqlen_k, world, rank) for _ in range(batch)], dtype=torch.int32,
            device=DEVICE)
    out, lse = fa.flash_attn_func(q, k, v, num_splits=case["splits"], pack_gqa=case["pack"],
                                  return_attn_probs=True, **kw, **extra)
    ref, ref_lse = rm.attention_dense(q, k, v, **kw, **extra)
    ref_lowp, _ = rm.attention_dense(q, k, v, lowp=True, **kw, **extra)
    assert out.dtype == (torch.bfloat16 if case["fp8"] else dtype)
    _check("out", out, lse, ref, ref_lowp, ref_lse, case)


VARLEN = [
    # Empty sequences (0 queries, or 0 keys: every row empty) next to short and block-sized ones.
    _case(seqlens=([0, 5, 17, 16, 1], [3, 0, 33, 16, 20]), causal=True),
    _case(seqlens=([0, 5, 17, 16, 1], [3, 0, 33, 16, 20]), pack=True, heads=(6, 2)),
    _case(seqlens=([4, 20, 9], [30, 6, 9]), window=(4, 2), splits=3),
    _case(seqlens=([4, 20, 9], [30, 6, 9]), causal=True, used=True),
    _case(seqlens=([4, 20, 9], [30, 6, 9]), used=True, pack=True, splits=2, heads=(6, 3)),
    _case(seqlens=([12, 3], [40, 17]), cp=(2, 1), causal=True),
]

VARLEN_GPU = [
    _case(seqlens=([0, 1000, 17, 513, 1], [300, 0, 1200, 513, 2000]), causal=True, d=128,
          dtype=torch.bfloat16, heads=(8, 2)),
    _case(seqlens=([1, 1, 1, 1], [3000, 20, 0, 1000]), d=128, heads=(32, 8), splits=4),
    _case(seqlens=([300, 600], [900, 600]), d=64, used=True, window=(64, 0)),
]


def _lengths_tensor(lengths):
    return torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("case", _params(VARLEN, VARLEN_GPU))
def test_varlen(case):
    fa = _fa()
    lens_q, lens_k = case["seqlens"]
    heads_q, heads_kv = case["heads"]
    d = case["d"]
    dtype = case["dtype"]
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = randn(total_q, heads_q, d, dtype=dtype, device=DEVICE)
    k = randn(total_k, heads_kv, d, dtype=dtype, device=DEVICE)
    v = randn(total_k, heads_kv, d, dtype=dtype, device=DEVICE)
    cu_q, cu_k = cu_seqlens(lens_q, DEVICE), cu_seqlens(lens_k, DEVICE)
    extra = {}
    if case["used"]:
        extra["seqused_q"] = _lengths_tensor([torch.randint(0, n + 1, ()).item() for n in lens_q])
        extra["seqused_k"] = _lengths_tensor([torch.randint(0, n + 1, ()).item() for n in lens_k])
    kw = dict(causal=case["causal"], window_size=case["window"])
    world, rank = case["cp"]
    if world > 1:
        kw.update(cp_world_size=world, cp_rank=rank)
        extra["cp_tot_seqused_k"] = _lengths_tensor([cp_total(n, world, rank) for n in lens_k])
    out = poisoned_like((total_q, heads_q, d), dtype, DEVICE)
    _, lse = fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), num_splits=case["splits"],
        pack_gqa=case["pack"], return_attn_probs=True, out=out, **kw, **extra)
    ref, ref_lse = rm.attention_varlen(q, k, v, cu_q, cu_k, **kw, **extra)
    ref_lowp, _ = rm.attention_varlen(q, k, v, cu_q, cu_k, lowp=True, **kw, **extra)
    _check("out", out, lse, ref, ref_lowp, ref_lse, case)


PAGED = [
    *[_case(page=p, splits=n, causal=c) for p, n, c in
      [(1, 1, True), (3, 1, False), (3, 4, True), (16, 2, False), (5, 1, False)]],
    _case(page=3, splits=3, seqlens=(1, 40), dtype=torch.bfloat16, causal=True),
    _case(page=3, pack=True, heads=(6, 2), window=(6, 0)),
    _case(page=1, batch_idx=True, leftpad=True, causal=True),
    _case(page=None, batch_idx=True, leftpad=True, splits=3, pack=True, heads=(4, 1)),
    _case(page=None, leftpad=True, window=(3, 1), sinks=True),
]

PAGED_GPU = [
    _case(page=16, seqlens=(1, 4000), d=128, heads=(32, 8), splits=0, batch=4,
          dtype=torch.bfloat16),
    _case(page=1, seqlens=(4, 1500), d=128, heads=(16, 2), causal=True, splits=3, batch=3),
    _case(page=256, seqlens=(128, 3000), d=64, heads=(8, 8), causal=True, batch=2),
    _case(page=None, seqlens=(1, 5000), d=128, heads=(32, 8), batch_idx=True, leftpad=True,
          splits=0, batch=4),
]


@pytest.mark.parametrize("case", _params(PAGED, PAGED_GPU))
def test_kvcache(case):
    """flash_attn_with_kvcache without new tokens: contiguous or paged cache (pages of 1 and 3
    tokens included), cache_batch_idx (a page-table row when paged), cache_leftpad."""
    fa = _fa()
    seqlen_q, capacity = case["seqlens"][0], case["seqlens"][1] + 10
    batch, d = case["batch"], case["d"]
    heads_q, heads_kv = case["heads"]
    dtype = case["dtype"]
    rows = batch + 2 if case["batch_idx"] else batch
    q = randn(batch, seqlen_q, heads_q, d, dtype=dtype, device=DEVICE)
    k_rows = randn(rows, capacity, heads_kv, d, dtype=dtype, device=DEVICE)
    v_rows = randn(rows, capacity, heads_kv, d, dtype=dtype, device=DEVICE)
    seqlens = torch.randint(1, capacity + 1, (batch,), dtype=torch.int32, device=DEVICE)
    extra = {}
    if case["batch_idx"]:
        extra["cache_batch_idx"] = torch.randperm(rows, device=DEVICE)[:batch].to(torch.int32)
    if case["leftpad"]:
        extra["cache_leftpad"] = (torch.rand(batch, device=DEVICE) * seqlens).to(torch.int32)
    page = case["page"]
    if page:
        (k_cache, v_cache), extra["page_table"] = paged_copy(k_rows, v_rows, page_size=page)
    else:
        k_cache, v_cache = k_rows, v_rows
    kw = dict(causal=case["causal"], window_size=case["window"])
    if case["sinks"]:
        kw["sinks"] = torch.randn(heads_q, device=DEVICE, dtype=torch.float32)
    out, lse, *_ = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=case["splits"],
        pack_gqa=case["pack"], return_softmax_lse=True, **kw, **extra)
    ref, ref_lse, _, _ = rm.attention_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, **kw,
                                              **extra)
    ref_lowp, _, _, _ = rm.attention_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                             lowp=True, **kw, **extra)
    _check("out", out, lse, ref, ref_lowp, ref_lse, case)


def test_split_counts_agree():
    """num_splits changes the work split only: 1, 2, 3 and 7 splits give the same answer."""
    fa = _fa()
    q = randn(2, 3, 4, 32, dtype=torch.float16, device=DEVICE)
    k = randn(2, 45, 2, 32, dtype=torch.float16, device=DEVICE)
    v = randn(2, 45, 2, 32, dtype=torch.float16, device=DEVICE)
    base, base_lse = fa.flash_attn_func(q, k, v, causal=True, num_splits=1, return_attn_probs=True)
    for n in (2, 3, 7):
        out, lse = fa.flash_attn_func(q, k, v, causal=True, num_splits=n, return_attn_probs=True)
        torch.testing.assert_close(out, base, atol=2e-3, rtol=0)
        torch.testing.assert_close(lse, base_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind, case", [
    ("dense", _case(batch=3)),
    ("dense", _case(batch=3, splits=2, seqlens=(3, 40), causal=True)),
    ("varlen", _case(seqlens=([4, 0, 9], [30, 6, 9]), causal=True)),
    ("varlen", _case(seqlens=([2, 5, 1], [30, 6, 40]), splits=2, pack=True, heads=(6, 3))),
    ("paged", _case(batch=3, page=3, batch_idx=True, leftpad=True, splits=2)),
])
def test_batch_launched_in_slices(monkeypatch, kind, case):
    """Past 65535 programs on grid axis 2 (batch * splits) the forward launches batch slices;
    a limit of 2 makes every case here take that path."""
    from flash_attn_3.backends.triton import fwd

    monkeypatch.setattr(fwd, "_MAX_GRID_Z", 2)
    {"dense": test_dense, "varlen": test_varlen, "paged": test_kvcache}[kind](case)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_gpu_batch_past_grid_limit():
    """More batches (and batches * splits) than grid axis 2 holds, on the real launch limit."""
    fa = _fa()
    # 70000 one-token sequences with one key each: out = v, lse = scale * q.k.
    n, heads, d = 70000, 2, 64
    q, k, v = (randn(n, heads, d, dtype=torch.bfloat16, device=DEVICE) for _ in range(3))
    cu = torch.arange(n + 1, dtype=torch.int32, device=DEVICE)
    out, lse = fa.flash_attn_varlen_func(q, k, v, cu, cu, 1, 1, return_attn_probs=True)
    torch.testing.assert_close(out, v, atol=1e-2, rtol=1e-2)
    expected = (q.float() * k.float()).sum(-1).t() * d ** -0.5
    torch.testing.assert_close(lse, expected, atol=1e-3, rtol=1e-3)
    # 20000 batches x 4 splits: sliced launches against the unsplit (unsliced) one.
    q = randn(20000, 1, 2, d, dtype=torch.bfloat16, device=DEVICE)
    k, v = (randn(20000, 300, 1, d, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    base, base_lse = fa.flash_attn_func(q, k, v, num_splits=1, return_attn_probs=True)
    out, lse = fa.flash_attn_func(q, k, v, num_splits=4, return_attn_probs=True)
    torch.testing.assert_close(out, base, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, base_lse, atol=1e-4, rtol=1e-4)


def test_descale_stand_in_is_not_kept_from_a_graph_capture(monkeypatch):
    """An absent fp8 descale reads a cached (1, 1) tensor of ones. One made while a CUDA graph is
    being captured holds ones only when the graph replays, so it must not be the cached one."""
    from flash_attn_3.backends.triton import fwd

    device = torch.device("cpu")
    monkeypatch.setattr(fwd, "_ONES", {})
    monkeypatch.setattr(fwd, "_capturing", lambda d: True)
    during = fwd._ones(device)
    assert torch.equal(during, torch.ones(1, 1)) and device not in fwd._ONES
    monkeypatch.setattr(fwd, "_capturing", lambda d: False)
    after = fwd._ones(device)
    assert after is not during and fwd._ones(device) is after


def test_absent_fp8_descales_are_read_at_stride_zero():
    """The stand-in for an absent descale is one element: read with its own strides, batch b and
    KV head h landed b + h elements into it (compute-sanitizer memcheck on the H100, 2026-12-07:
    a paged fp8 call without descales read past it). Given descales keep their strides."""
    from flash_attn_3.backends.params import AttnArgs
    from flash_attn_3.backends.triton import fwd

    q = randn(3, 16, 4, 64, dtype=torch.bfloat16, device=DEVICE).to(FP8)
    k, v = (randn(3, 16, 2, 64, dtype=torch.bfloat16, device=DEVICE).to(FP8) for _ in range(2))
    tensors, strides = fwd.descale_operands(AttnArgs.plain(q, k, v))
    assert strides == [0] * 6
    assert all(t.numel() == 1 and float(t.reshape(-1)[0]) == 1.0 for t in tensors)
    given = torch.rand(3, 2, dtype=torch.float32, device=DEVICE) + 0.5
    tensors, strides = fwd.descale_operands(AttnArgs.plain(q, k, v, k_descale=given))
    assert tensors[1] is given and strides == [0, 0, 2, 1, 0, 0]

"""Triton KV-cache pieces against float64 references: combine, append_kv (+ rotary), scheduler
metadata, and the split-KV decode kernel.

On CPU the kernels run under TRITON_INTERPRET=1 with tiny shapes; the `gpu` variants repeat the
checks at realistic sizes when CUDA is present.
"""

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flash_attn_3.backends.params import AttnArgs  # noqa: E402

import reference_math as rm  # noqa: E402
import tolerance as tol  # noqa: E402

# importlib: the package's routing functions (append_kv, combine) shadow the submodule names.
append_mod = importlib.import_module("flash_attn_3.backends.triton.append_kv")
combine_mod = importlib.import_module("flash_attn_3.backends.triton.combine")
decode_mod = importlib.import_module("flash_attn_3.backends.triton.decode")
scheduler = importlib.import_module("flash_attn_3.backends.triton.scheduler")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# ---------------------------------------------------------------------------------------------
# combine


def combine_reference(out_partial, lse_partial):
    lse = torch.logsumexp(lse_partial.double(), dim=0)
    weight = torch.exp(lse_partial.double() - lse).nan_to_num(0.0)
    out = (weight[..., None] * out_partial.double().nan_to_num(0.0)).sum(0)
    return out, lse


@pytest.mark.parametrize("splits,batch,seqlen,heads,head_dim,out_dtype", [
    (1, 2, 3, 2, 64, torch.float32),
    (4, 2, 1, 3, 40, torch.bfloat16),
    (7, 1, 5, 2, 256, torch.float16),
    (37, 1, 2, 3, 32, torch.bfloat16),  # more splits than one load tile holds
])
def test_combine(splits, batch, seqlen, heads, head_dim, out_dtype):
    out_partial = torch.randn(splits, batch, seqlen, heads, head_dim, device=DEVICE)
    lse_partial = torch.randn(splits, batch, seqlen, heads, device=DEVICE) * 3
    # A dominant first split overflows exp(lse - pivot) unless every tile joins the max.
    lse_partial[0] += 200
    # Empty splits: -inf LSE and garbage (NaN) partials that must not leak into the result.
    empty = torch.rand(splits, batch, seqlen, heads, device=DEVICE) < 0.3
    empty[:, 0, 0, 0] = True  # one row with every split empty
    lse_partial[empty] = float("-inf")
    out_partial[empty] = float("nan")
    out, lse = combine_mod.combine(out_partial, lse_partial, out_dtype)
    ref_out, ref_lse = combine_reference(out_partial, lse_partial)
    assert out.dtype == out_dtype and out.shape == (batch, seqlen, heads, head_dim)
    assert lse.dtype == torch.float32 and lse.shape == (batch, seqlen, heads)
    assert lse[0, 0, 0] == float("-inf") and (out[0, 0, 0] == 0).all()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-5, rtol=1e-5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[out_dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


def test_combine_into_strided_views_and_sinks():
    """The forward's use: write into a (B, H, L) lse and a strided out, +inf for empty rows."""
    splits, batch, seqlen, heads, head_dim = 3, 2, 2, 4, 32
    out_partial = torch.randn(splits, batch, seqlen, heads, head_dim, device=DEVICE)
    lse_partial = torch.randn(splits, batch, seqlen, heads, device=DEVICE)
    lse_partial[:, 1, 1, 2] = float("-inf")
    sinks = torch.randn(heads, device=DEVICE)
    out = torch.full((batch, seqlen, heads, head_dim), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    lse_bhl = torch.full((batch, heads, seqlen), float("nan"), device=DEVICE)
    combine_mod.combine_into(out_partial, lse_partial, out, lse_bhl.transpose(1, 2), float("inf"), sinks)
    with_sink = torch.cat([lse_partial, sinks.expand(1, batch, seqlen, heads)], 0)
    ref_out, ref_lse = combine_reference(torch.cat([out_partial, torch.zeros_like(out_partial[:1])]), with_sink)
    ref_lse[1, 1, 2] = float("inf")
    ref_out[1, 1, 2] = 0
    torch.testing.assert_close(lse_bhl.transpose(1, 2).double(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# append_kv


def rotate_reference(x, cos, sin, interleaved):
    """x (..., D) float64 rotated with cos/sin (..., rotary_dim / 2) float64."""
    rotary_dim = 2 * cos.shape[-1]
    xr, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def append_reference(k_cache, v_cache, k_new, v_new, q, cos, sin, cache_seqlens, cache_batch_idx,
                     page_table, cu_seqlens_q, cu_seqlens_k_new, rotary_seqlens, interleaved, per_token):
    """Token-by-token loop: caches after the append (k in float64) and q rotated (float64).
    Positions past the cache's capacity are not written (the kernels cannot refuse them: the
    lengths live on the device)."""
    k_ref, v_ref = k_cache.double().clone(), v_cache.clone()
    capacity = page_table.shape[1] * k_cache.shape[1] if page_table is not None else k_cache.shape[1]
    q_ref = q.double().clone()
    batch = cache_seqlens.shape[0]
    for b in range(batch):
        row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
        start_r = int(rotary_seqlens[b]) if rotary_seqlens is not None else int(cache_seqlens[b])
        if cu_seqlens_k_new is not None:
            lo, hi = int(cu_seqlens_k_new[b]), int(cu_seqlens_k_new[b + 1])
            kb, vb = k_new[lo:hi], v_new[lo:hi]
        else:
            kb, vb = k_new[b], v_new[b]
        for t in range(kb.shape[0]):
            pos = int(cache_seqlens[b]) + t
            if pos >= capacity:
                continue
            kt = kb[t].double()
            if cos is not None:
                kt = rotate_reference(kt, cos[start_r + t].double(), sin[start_r + t].double(), interleaved)
            if page_table is not None:
                page, slot = int(page_table[row, pos // k_cache.shape[1]]), pos % k_cache.shape[1]
            else:
                page, slot = row, pos
            k_ref[page, slot] = kt
            v_ref[page, slot] = vb[t]
        if cos is None:
            continue
        if cu_seqlens_q is not None:
            lo, hi = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        else:
            lo, hi = 0, q.shape[1]
        for i in range(hi - lo):
            r = start_r + (i if per_token else 0)
            idx = (lo + i,) if cu_seqlens_q is not None else (b, i)
            q_ref[idx] = rotate_reference(q[idx].double(), cos[r].double(), sin[r].double(), interleaved)
    return k_ref, v_ref, q_ref


def assert_rotated_close(actual, expected_f64):
    # Spec sec 8: rotated k to 1e-3; the kernel rounds once from fp32, so allow one output ulp.
    ulp = torch.finfo(actual.dtype).eps
    err = (actual.double() - expected_f64).abs()
    bound = 1e-3 + ulp * expected_f64.abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


APPEND_CASES = [
    # page_size, packed, rotary ("none"|"interleaved"|"half"), rotary_dim, batch_idx, rotary_seqlens, varlen_q, causal, dv
    dict(page_size=None, packed=False, rotary="none", rotary_dim=0, batch_idx=False, rot_seqlens=False, varlen_q=False, causal=False, dv=32),
    dict(page_size=None, packed=False, rotary="interleaved", rotary_dim=32, batch_idx=True, rot_seqlens=False, varlen_q=False, causal=True, dv=32),
    dict(page_size=None, packed=True, rotary="half", rotary_dim=16, batch_idx=False, rot_seqlens=True, varlen_q=True, causal=False, dv=64),
    dict(page_size=1, packed=False, rotary="half", rotary_dim=32, batch_idx=False, rot_seqlens=False, varlen_q=False, causal=True, dv=32),
    dict(page_size=3, packed=True, rotary="interleaved", rotary_dim=16, batch_idx=True, rot_seqlens=True, varlen_q=True, causal=True, dv=16),
    dict(page_size=16, packed=False, rotary="half", rotary_dim=32, batch_idx=True, rot_seqlens=False, varlen_q=False, causal=False, dv=32),
]


def _append_inputs(case, dtype, batch, num_heads_q, num_heads_kv, head_dim, seqlen_new_max, capacity, device):
    dv = case["dv"]
    cache_rows = batch + 2
    cache_seqlens = torch.randint(0, capacity - seqlen_new_max + 1, (batch,), dtype=torch.int32, device=device)
    cache_batch_idx = torch.randperm(cache_rows, device=device)[:batch].to(torch.int32) if case["batch_idx"] else None
    page_size = case["page_size"]
    if page_size is not None:
        pages_per_row = math.ceil(capacity / page_size)
        num_pages = cache_rows * pages_per_row + 3
        page_table = torch.randperm(num_pages, device=device)[: cache_rows * pages_per_row]
        page_table = page_table.view(cache_rows if case["batch_idx"] else batch, -1).to(torch.int32) \
            if case["batch_idx"] else page_table[: batch * pages_per_row].view(batch, -1).to(torch.int32)
        k_cache = torch.randn(num_pages, page_size, num_heads_kv, head_dim, device=device).to(dtype)
        v_cache = torch.randn(num_pages, page_size, num_heads_kv, dv, device=device).to(dtype)
    else:
        page_table = None
        k_cache = torch.randn(cache_rows, capacity, num_heads_kv, head_dim, device=device).to(dtype)
        v_cache = torch.randn(cache_rows, capacity, num_heads_kv, dv, device=device).to(dtype)
    if case["packed"]:
        lens = torch.randint(0, seqlen_new_max + 1, (batch,))
        cu_seqlens_k_new = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).to(device)
        total = int(lens.sum())
        k_new = torch.randn(total, num_heads_kv, head_dim, device=device).to(dtype)
        v_new = torch.randn(total, num_heads_kv, dv, device=device).to(dtype)
    else:
        cu_seqlens_k_new = None
        k_new = torch.randn(batch, seqlen_new_max, num_heads_kv, head_dim, device=device).to(dtype)
        v_new = torch.randn(batch, seqlen_new_max, num_heads_kv, dv, device=device).to(dtype)
    if case["varlen_q"]:
        lens_q = torch.randint(1, 4, (batch,))
        cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int64), lens_q.cumsum(0)]).to(torch.int32).to(device)
        q = torch.randn(int(lens_q.sum()), num_heads_q, head_dim, device=device).to(dtype)
        max_seqlen_q = int(lens_q.max())
    else:
        cu_seqlens_q = None
        q = torch.randn(batch, 3, num_heads_q, head_dim, device=device).to(dtype)
        max_seqlen_q = 3
    cos = sin = rotary_seqlens = None
    if case["rotary"] != "none":
        seqlen_ro = capacity + 8
        angle = torch.rand(seqlen_ro, case["rotary_dim"] // 2, device=device) * 2 * math.pi
        cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
        if case["rot_seqlens"]:
            rotary_seqlens = torch.randint(0, seqlen_ro - seqlen_new_max - 3, (batch,), dtype=torch.int32, device=device)
    return dict(k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new, q=q, rotary_cos=cos, rotary_sin=sin,
                cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx, cache_leftpad=None,
                page_table=page_table, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k_new=cu_seqlens_k_new,
                rotary_seqlens=rotary_seqlens, rotary_interleaved=case["rotary"] == "interleaved",
                rotate_q_per_token=case["causal"], max_seqlen_q=max_seqlen_q)


def _check_append(case, dtype, batch, num_heads_q, num_heads_kv, head_dim, seqlen_new_max, capacity):
    inputs = _append_inputs(case, dtype, batch, num_heads_q, num_heads_kv, head_dim, seqlen_new_max, capacity, DEVICE)
    k_ref, v_ref, q_ref = append_reference(
        inputs["k_cache"], inputs["v_cache"], inputs["k_new"], inputs["v_new"], inputs["q"],
        inputs["rotary_cos"], inputs["rotary_sin"], inputs["cache_seqlens"].cpu(),
        None if inputs["cache_batch_idx"] is None else inputs["cache_batch_idx"].cpu(),
        None if inputs["page_table"] is None else inputs["page_table"].cpu(),
        None if inputs["cu_seqlens_q"] is None else inputs["cu_seqlens_q"].cpu(),
        None if inputs["cu_seqlens_k_new"] is None else inputs["cu_seqlens_k_new"].cpu(),
        None if inputs["rotary_seqlens"] is None else inputs["rotary_seqlens"].cpu(),
        inputs["rotary_interleaved"], inputs["rotate_q_per_token"],
    )
    seqlens_before = inputs["cache_seqlens"].clone()
    q_out = append_mod.append_kv(**inputs)
    assert torch.equal(inputs["cache_seqlens"], seqlens_before)
    assert torch.equal(inputs["v_cache"], v_ref)
    assert_rotated_close(inputs["k_cache"], k_ref)
    if inputs["rotary_cos"] is None:
        assert q_out is inputs["q"]
    else:
        assert q_out.shape == inputs["q"].shape and q_out.dtype == inputs["q"].dtype
        assert_rotated_close(q_out, q_ref)


@pytest.mark.parametrize("case", APPEND_CASES, ids=lambda c: f"ps{c['page_size']}-{c['rotary']}{c['rotary_dim']}-packed{int(c['packed'])}")
def test_append_kv(case):
    _check_append(case, torch.bfloat16, batch=3, num_heads_q=4, num_heads_kv=2, head_dim=32,
                  seqlen_new_max=3, capacity=20)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", APPEND_CASES, ids=lambda c: f"ps{c['page_size']}-{c['rotary']}-packed{int(c['packed'])}")
def test_append_kv_gpu(case, dtype):
    case = dict(case, dv=128 if case["dv"] >= 32 else 64, rotary_dim=case["rotary_dim"] * 2)
    _check_append(case, dtype, batch=5, num_heads_q=16, num_heads_kv=4, head_dim=128,
                  seqlen_new_max=17, capacity=300)


# ---------------------------------------------------------------------------------------------
# scheduler


def test_choose_num_splits_fills_the_gpu_without_tiny_splits():
    # One KV head of a 128k sequence cannot fill 132 SMs: split it; a full batch is not split.
    assert scheduler.choose_num_splits(1, 8, 4, 131072, 132, block_m=16, block_n=64) >= 16
    assert scheduler.choose_num_splits(128, 8, 4, 2048, 132, block_m=16, block_n=64) == 1
    # Never more splits than the sequence has groups of MIN_BLOCKS_PER_SPLIT blocks.
    assert scheduler.choose_num_splits(1, 1, 1, 64 * 8, 132, block_n=64) <= 8 // scheduler.MIN_BLOCKS_PER_SPLIT
    assert scheduler.choose_num_splits(1, 1, 1, 10, 132) == 1


def test_decode_splits_small_caches():
    """The merge runs in the decode launch, so a small cache splits like a long one: B=1 ctx 1k
    GQA 32/8 takes 4 splits (the best measured GPU time), a forced count still wins, and a cache
    of under MIN_BLOCKS_PER_SPLIT * 2 blocks stays whole."""
    block_n = scheduler.decode_block_n(128, 128)
    cpu = torch.device("cpu")
    assert scheduler.decode_num_splits(1, 32, 8, 1, 16 * block_n, 128, 128, cpu) == 4
    assert scheduler.decode_num_splits(1, 32, 8, 1, 16 * block_n, 128, 128, cpu, num_splits=3) == 3
    assert scheduler.decode_num_splits(1, 32, 8, 1, (2 * scheduler.MIN_BLOCKS_PER_SPLIT - 1) * block_n, 128, 128,
                                       cpu) == 1


def test_scheduler_metadata_layout():
    batch, block_n = 5, scheduler.decode_block_n(64, 64)
    cache_seqlens = torch.randint(0, 3000, (batch,), dtype=torch.int32, device=DEVICE)
    cache_seqlens[0] = 0
    cu_new = torch.tensor([0, 0, 1, 3, 3, 4], dtype=torch.int32, device=DEVICE)
    leftpad = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    meta = scheduler.scheduler_metadata(batch, 1, 4096, 8, 2, 64, 64, cache_seqlens, None, cu_new, leftpad,
                                        None, 2, False, -1, -1, 0, False, 0, None, 0)
    assert meta.dtype == torch.int32 and meta.shape == (batch + 1,) and meta.device == cache_seqlens.device
    splits = int(meta[0])
    assert splits == scheduler.decode_num_splits(batch, 8, 2, 1, 4098, 64, 64, cache_seqlens.device)
    for b in range(batch):
        n_blocks = -(-(int(cache_seqlens[b]) + int(cu_new[b + 1] - cu_new[b])) // block_n)
        per = -(-n_blocks // splits)
        filled = sum(1 for s in range(splits) if s * per < n_blocks)
        assert int(meta[1 + b]) == filled
    forced = scheduler.scheduler_metadata(batch, 1, 4096, 8, 2, 64, 64, cache_seqlens, None, None, None,
                                          None, 0, False, -1, -1, 0, False, 3, None, 0)
    assert int(forced[0]) == 3


# ---------------------------------------------------------------------------------------------
# decode kernel


def _attn_args(q, k, v, **kw):
    fields = dict(qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                  max_seqlen_q=q.shape[1] if q.dim() == 4 else 0, max_seqlen_k=0, page_table=None,
                  kv_batch_idx=None, leftpad_k=None, q_descale=None, k_descale=None, v_descale=None,
                  sinks=None, softmax_scale=1.0 / math.sqrt(q.shape[-1]), window_left=-1, window_right=-1,
                  attention_chunk=0, softcap=0.0, num_splits=0, pack_gqa=None, cp_world_size=1, cp_rank=0,
                  cp_tot_seqused_k=None, scheduler_metadata=None)
    fields.update(kw)
    return AttnArgs(q=q, k=k, v=v, **fields)


def decode_reference(a: AttnArgs, lowp: bool):
    """Per batch row: gather the row's keys (leftpad .. seqused_k) and run the spec math."""
    batch = a.batch_size
    outs, lses = [], []
    for b in range(batch):
        if a.cu_seqlens_q is not None:
            lo, hi = int(a.cu_seqlens_q[b]), int(a.cu_seqlens_q[b + 1])
            qb = a.q[lo:hi]
        else:
            qb = a.q[b]
        row = int(a.kv_batch_idx[b]) if a.kv_batch_idx is not None else b
        end = int(a.seqused_k[b])
        start = int(a.leftpad_k[b]) if a.leftpad_k is not None else 0
        if a.page_table is not None:
            kb = rm.gather_pages(a.k, a.page_table[row], end)[start:]
            vb = rm.gather_pages(a.v, a.page_table[row], end)[start:]
        else:
            kb, vb = a.k[row, start:end], a.v[row, start:end]
        causal = a.window_left < 0 and a.window_right == 0
        if kb.shape[0] == 0:  # rm.attention needs at least one key; the contract says out 0, lse +inf
            dtype = torch.float64 if not lowp else a.q.dtype
            outs.append(torch.zeros(qb.shape[0], qb.shape[1], a.v.shape[-1], dtype=dtype, device=qb.device))
            lses.append(torch.full((qb.shape[1], qb.shape[0]), float("inf"), dtype=torch.float64, device=qb.device))
            continue
        o, lse = rm.attention(qb, kb, vb, softmax_scale=a.softmax_scale, causal=causal,
                              window_size=(-1, -1) if causal else (a.window_left, a.window_right),
                              attention_chunk=a.attention_chunk, softcap=a.softcap, sinks=a.sinks, lowp=lowp)
        outs.append(o)
        lses.append(lse)
    if a.cu_seqlens_q is not None:
        return torch.cat(outs, 0), torch.cat(lses, 1)
    return torch.stack(outs), torch.stack(lses)


DECODE_CASES = [
    # dense cache with cache_batch_idx, GQA 4, forced splits
    dict(page_size=None, seqlen_q=1, hq=8, hk=2, d=32, dv=32, splits=3, batch_idx=True),
    dict(page_size=None, seqlen_q=1, hq=8, hk=2, d=32, dv=32, splits=1, softcap=5.0),
    # paged, odd page size, causal spec-decode rows, softcap, leftpad
    dict(page_size=3, seqlen_q=2, hq=4, hk=4, d=32, dv=32, splits=2, causal=True, softcap=2.0, leftpad=True),
    # varlen q, sliding window, sinks, heuristic splits
    dict(page_size=16, seqlen_q=None, hq=6, hk=2, d=32, dv=32, splits=0, window=(5, 0), sinks=True),
    # several KV blocks per split (online-softmax rescaling), sinks merged by the combine
    dict(page_size=64, seqlen_q=1, hq=4, hk=2, d=32, dv=32, splits=2, sinks=True, capacity=600, q_scale=4.0),
    dict(page_size=None, seqlen_q=1, hq=2, hk=2, d=32, dv=32, splits=1, capacity=400, q_scale=4.0),
    dict(page_size=16, seqlen_q=3, hq=6, hk=2, d=32, dv=32, splits=1, window=(4, 1), sinks=True),
    # attention chunk and dv != d (d <= 64 allows a wider v)
    dict(page_size=None, seqlen_q=2, hq=2, hk=1, d=32, dv=64, splits=4, chunk=8, causal=True),
]


def _decode_inputs(case, dtype, batch, capacity, device):
    hq, hk, d, dv = case["hq"], case["hk"], case["d"], case["dv"]
    rows = batch + 1
    if case["page_size"] is not None:
        pages_per_row = -(-capacity // case["page_size"])
        num_pages = rows * pages_per_row + 2
        page_table = torch.randperm(num_pages, device=device)[: rows * pages_per_row].view(rows, -1).to(torch.int32)
        k = torch.randn(num_pages, case["page_size"], hk, d, device=device).to(dtype)
        v = torch.randn(num_pages, case["page_size"], hk, dv, device=device).to(dtype)
        max_seqlen_k = pages_per_row * case["page_size"]
    else:
        page_table = None
        k = torch.randn(rows, capacity, hk, d, device=device).to(dtype)
        v = torch.randn(rows, capacity, hk, dv, device=device).to(dtype)
        max_seqlen_k = capacity
    seqused_k = torch.randint(1, capacity + 1, (batch,), dtype=torch.int32, device=device)
    seqused_k[0] = 0  # a row with an empty cache: out 0, lse +inf
    leftpad = None
    if case.get("leftpad"):
        leftpad = torch.minimum(torch.randint(0, 5, (batch,), device=device), seqused_k.long()).to(torch.int32)
    kv_batch_idx = None
    if case.get("batch_idx") or case["page_size"] is not None:
        kv_batch_idx = torch.randperm(rows, device=device)[:batch].to(torch.int32)
    if case["seqlen_q"] is None:
        lens = torch.randint(1, 4, (batch,))
        cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).to(device)
        q = torch.randn(int(lens.sum()), hq, d, device=device).to(dtype)
        max_seqlen_q = int(lens.max())
    else:
        cu_seqlens_q = None
        q = torch.randn(batch, case["seqlen_q"], hq, d, device=device).to(dtype)
        max_seqlen_q = case["seqlen_q"]
    # Sharp logits make the running max jump between KV blocks, exercising the rescaling.
    q = q * case.get("q_scale", 1.0)
    window = case.get("window", (-1, 0 if case.get("causal") else -1))
    sinks = torch.randn(hq, device=device) if case.get("sinks") else None
    return _attn_args(q, k, v, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k, page_table=page_table, kv_batch_idx=kv_batch_idx,
                      leftpad_k=leftpad, sinks=sinks, window_left=window[0], window_right=window[1],
                      attention_chunk=case.get("chunk", 0), softcap=case.get("softcap", 0.0),
                      num_splits=case["splits"])


def _check_decode(a: AttnArgs, softcap: bool):
    assert decode_mod.supports(a) is None
    out, lse = decode_mod.forward(a)
    ref, ref_lse = decode_reference(a, lowp=False)
    ref_lowp, _ = decode_reference(a, lowp=True)
    assert out.dtype == a.q.dtype and out.shape == ref.shape
    tol.assert_matches_reference("decode out", out, ref, ref_lowp, softcap=softcap)
    tol.assert_lse_matches("decode lse", lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k not in ("hq", "hk", "d")))
def test_decode(case):
    a = _decode_inputs(case, torch.bfloat16, batch=3, capacity=case.get("capacity", 40), device=DEVICE)
    _check_decode(a, softcap=case.get("softcap", 0.0) > 0)


def test_decode_split_count_and_metadata_do_not_change_results():
    case = dict(page_size=None, seqlen_q=1, hq=4, hk=2, d=32, dv=32, splits=1)
    a = _decode_inputs(case, torch.float16, batch=2, capacity=70, device=DEVICE)
    out1, lse1 = _check_decode(a, softcap=False)
    meta = scheduler.scheduler_metadata(2, 1, 70, 4, 2, 32, 32, a.seqused_k, None, None, None, None, 0,
                                        False, -1, -1, 0, False, 4, None, 0)
    a4 = AttnArgs(**{**a.__dict__, "num_splits": 4})
    out4, lse4 = decode_mod.forward(a4)
    out4m, lse4m = decode_mod.forward(AttnArgs(**{**a4.__dict__, "scheduler_metadata": meta}))
    assert torch.equal(out4, out4m) and torch.equal(lse4, lse4m)
    torch.testing.assert_close(out4, out1, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse4, lse1, atol=1e-4, rtol=1e-4)


def _poisoned_launch(a: AttnArgs, config=None):
    """decode.launches into NaN-filled out / lse / partials: every element read must be written."""
    out, lse = decode_mod.outputs(a)
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    partials = torch.full((max(1, decode_mod.partials_numel(a, config)),), float("nan"), device=a.q.device)
    launches = decode_mod.launches(a, out, lse, partials, config=config)
    for launch in launches:
        launch()
    return out, lse, launches


def _ring_is_zero(device):
    return not any(bool(ring.slots.any()) for ring in decode_mod._RINGS.values())


def _fused_merge_case(device, batch, hq, hk, capacity, config, splits_list, page_size=None):
    case = dict(page_size=page_size, seqlen_q=2, hq=hq, hk=hk, d=32 if device == "cpu" else 128,
                dv=32 if device == "cpu" else 128, splits=1, causal=True, sinks=True, q_scale=3.0)
    a = _decode_inputs(case, torch.bfloat16, batch=batch, capacity=capacity, device=device)
    a.seqused_k[-1] = 3  # a short row: most of its splits are empty (lse -inf, out 0)
    ref, ref_lse = decode_reference(a, lowp=False)
    ref_lowp, _ = decode_reference(a, lowp=True)
    for splits in splits_list:
        a_s = AttnArgs(**{**a.__dict__, "num_splits": splits})
        out, lse, launches = _poisoned_launch(a_s, config)
        # One launch whatever the split count: the last split program of a tile merges.
        assert len(launches) == 1, (splits, len(launches))
        tol.assert_matches_reference(f"decode out, {splits} splits", out, ref, ref_lowp)
        tol.assert_lse_matches(f"decode lse, {splits} splits", lse, ref_lse)
        assert _ring_is_zero(device), f"{splits} splits left ticket counters set"


def test_decode_fused_merge_every_split_count():
    """Splits 1..16 merge in the decode launch to the reference (sinks, causal rows, a row with an
    empty cache, a short row with empty splits) and leave the ticket counters at 0. BLOCK_N 16 so
    300 keys hold 16 non-empty splits on the interpreter."""
    _fused_merge_case(DEVICE, batch=3, hq=4, hk=2, capacity=300, config=(16, 4, 1), splits_list=range(1, 17))


def test_decode_fused_merge_in_two_levels(monkeypatch):
    """Launches of more splits than a merge group merge each group, then the groups (groups of 4
    here so the interpreter sees full, ragged and empty groups: splits 5..16 over 19 blocks)."""
    monkeypatch.setattr(decode_mod, "MERGE_GROUP", 4)
    assert decode_mod._ticket_counters(6, 9) == 6 * (1 + 3)
    _fused_merge_case(DEVICE, batch=3, hq=4, hk=2, capacity=300, config=(16, 4, 1),
                      splits_list=[5, 8, 9, 13, 16])


@pytest.mark.parametrize("splits", [6, 9, 13])
def test_decode_fused_merge_in_two_levels_varlen_q(monkeypatch, splits):
    """Packed queries of 0..3 tokens (GQA 3: tiles of 0..9 rows in BLOCK_M 16, merge loads of 16
    rows sized by max_seqlen_q) merge in two levels (groups of 4) to the reference: the group
    merge writes only the tile's own rows of split g0, sinks count once, a sequence with no
    query token takes no ticket and every counter ends at 0."""
    monkeypatch.setattr(decode_mod, "MERGE_GROUP", 4)
    case = dict(page_size=16, seqlen_q=None, hq=6, hk=2, d=32, dv=32, splits=splits, sinks=True, q_scale=3.0,
                causal=True)
    a = _decode_inputs(case, torch.bfloat16, batch=4, capacity=300, device=DEVICE)
    lens = torch.tensor([3, 0, 1, 2])
    cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).to(DEVICE)
    q = torch.randn(int(lens.sum()), 6, 32, device=DEVICE).to(torch.bfloat16) * 3.0
    a = AttnArgs(**{**a.__dict__, "q": q, "cu_seqlens_q": cu_seqlens_q, "max_seqlen_q": 3})
    a.seqused_k[-1] = 3  # a short row: most of its splits and some of its groups are empty
    out, lse, launches = _poisoned_launch(a, (16, 4, 1))
    assert len(launches) == 1 and launches[0].constexprs[22] == 4  # MERGE_GROUP
    ref, ref_lse = decode_reference(a, lowp=False)
    tol.assert_matches_reference(f"decode out, varlen q, {splits} splits", out, ref, decode_reference(a, lowp=True)[0])
    tol.assert_lse_matches(f"decode lse, varlen q, {splits} splits", lse, ref_lse)
    assert _ring_is_zero(DEVICE), f"{splits} splits left ticket counters set"


def test_decode_without_ring_merges_in_a_second_launch(monkeypatch):
    """No ring (a graph capture of the first call): the split launch writes partials and
    combine.py merges them in a second launch, to the same reference."""
    case = dict(page_size=None, seqlen_q=1, hq=4, hk=2, d=32, dv=32, splits=3, sinks=True)
    a = _decode_inputs(case, torch.bfloat16, batch=2, capacity=200, device=DEVICE)
    monkeypatch.setattr(decode_mod, "ticket_ring", lambda device: None)
    out, lse, launches = _poisoned_launch(a, (16, 4, 1))
    assert len(launches) == 2
    ref, ref_lse = decode_reference(a, lowp=False)
    tol.assert_matches_reference("decode out, separate merge", out, ref, decode_reference(a, lowp=True)[0])
    tol.assert_lse_matches("decode lse, separate merge", lse, ref_lse)


def test_ticket_ring_gives_threads_distinct_slots():
    """Threads launching at once (a serving engine's) must never get the same slots: one
    ring.take racing another would let two launches count on one ticket. The cursor here yields
    the thread at every read, so without the ring's lock the threads would interleave inside
    take()."""
    import threading
    import time

    class YieldingRing(decode_mod.TicketRing):
        @property
        def cursor(self):
            value = self._cursor
            time.sleep(1e-4)
            return value

        @cursor.setter
        def cursor(self, value):
            self._cursor = value

    ring = YieldingRing(torch.device("cpu"))
    got, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        got.extend(ring.take(4) for _ in range(40))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 320 and len(set(got)) == 320  # 1280 slots: no wrap, so no repeat


def test_ticket_ring_takes_aligned_slots_and_wraps():
    ring = decode_mod.TicketRing(torch.device("cpu"))
    offsets = [ring.take(5) for _ in range(3)]
    assert offsets == [0, 8, 16]  # 16-byte multiples: Triton's alignment class of the pointer
    ring.cursor = decode_mod.TICKET_SLOTS - 4
    assert ring.take(4) == decode_mod.TICKET_SLOTS - 4
    assert ring.take(1) == 0  # no room left: wraps
    assert ring.pointer(1) == ring.base + 4 * 4


@gpu
@pytest.mark.gpu
def test_decode_gpu_fused_merge_every_split_count():
    """As the CPU test at GPU size: GQA 32/8, 3000 keys, paged, splits 1..16 and 64 and 128."""
    _fused_merge_case(DEVICE, batch=3, hq=32, hk=8, capacity=3000, config=None,
                      splits_list=[*range(1, 17), 64, 128], page_size=16)


@gpu
@pytest.mark.gpu
def test_decode_gpu_fused_merge_is_deterministic_under_load():
    """512 tiles of 16 splits (4 waves of racing tickets), 20 back-to-back launches on one stream:
    identical bits every time and counters left at 0 (a lost release / acquire shows as a stale
    partial in some repeat)."""
    case = dict(page_size=None, seqlen_q=1, hq=32, hk=8, d=128, dv=128, splits=16)
    a = _decode_inputs(case, torch.bfloat16, batch=64, capacity=2048, device=DEVICE)
    first, first_lse = decode_mod.forward(a)
    for _ in range(20):
        out, lse = decode_mod.forward(a)
        assert torch.equal(out, first) and torch.equal(lse, first_lse)
    torch.cuda.synchronize()
    assert _ring_is_zero(DEVICE)
    ref, ref_lse = decode_reference(a, lowp=False)
    tol.assert_matches_reference("decode out, 64 x 16 splits", first, ref, decode_reference(a, lowp=True)[0])


@gpu
@pytest.mark.gpu
def test_decode_gpu_graph_capture_of_a_first_split_call(monkeypatch):
    """A split call captured before any ring exists makes none (no allocation or zeroing inside
    the capture): it merges in a second launch; replays match the reference. A later eager call
    makes the ring and merges in place; a capture then replays the fused launch bit for bit."""
    case = dict(page_size=None, seqlen_q=1, hq=32, hk=8, d=128, dv=128, splits=0)
    a = _decode_inputs(case, torch.bfloat16, batch=1, capacity=4096, device=DEVICE)
    ref, ref_lse = decode_reference(a, lowp=False)
    ref_lowp, _ = decode_reference(a, lowp=True)
    decode_mod.forward(a)  # compile both variants outside the capture
    monkeypatch.setattr(decode_mod, "ticket_ring", lambda device: None)
    decode_mod.forward(a)
    monkeypatch.undo()
    torch.cuda.synchronize()
    monkeypatch.setattr(decode_mod, "_RINGS", {})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for fused in (False, True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            out, lse = decode_mod.forward(a)
        assert bool(decode_mod._RINGS) == fused, "a ring was made during the capture"
        for _ in range(2):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            tol.assert_matches_reference("captured decode out", out, ref, ref_lowp)
            tol.assert_lse_matches("captured decode lse", lse, ref_lse)
        if not fused:
            eager, eager_lse = decode_mod.forward(a)  # makes the ring
            torch.cuda.synchronize()
            assert decode_mod._RINGS
        else:
            assert torch.equal(out, eager) and torch.equal(lse, eager_lse)
    assert _ring_is_zero(DEVICE)


def test_decode_refuses_long_queries():
    q = torch.randn(1, 40, 8, 32, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 16, 2, 32, device=DEVICE, dtype=torch.bfloat16)
    assert "packed query rows" in decode_mod.supports(_attn_args(q, k, k))


GPU_DECODE_CASES = [
    dict(page_size=None, seqlen_q=1, hq=32, hk=8, d=128, dv=128, splits=0, batch_idx=True),
    dict(page_size=16, seqlen_q=1, hq=32, hk=8, d=128, dv=128, splits=0),
    dict(page_size=256, seqlen_q=4, hq=32, hk=8, d=128, dv=128, splits=7, causal=True, sinks=True),
    dict(page_size=3, seqlen_q=None, hq=16, hk=2, d=64, dv=64, splits=0, window=(300, 0), softcap=30.0),
    dict(page_size=None, seqlen_q=2, hq=8, hk=1, d=256, dv=256, splits=0, leftpad=True, causal=True),
    dict(page_size=64, seqlen_q=1, hq=16, hk=16, d=192, dv=128, splits=3, chunk=512),
    dict(page_size=None, seqlen_q=1, hq=16, hk=2, d=64, dv=512, splits=0),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_DECODE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k not in ("hq", "hk")))
def test_decode_gpu(case, dtype):
    a = _decode_inputs(case, dtype, batch=4, capacity=3000, device=DEVICE)
    _check_decode(a, softcap=case.get("softcap", 0.0) > 0)


@gpu
@pytest.mark.gpu
def test_decode_gpu_long_single_sequence():
    """Batch 1 over 128k keys: the split-KV shape the heuristic must split."""
    case = dict(page_size=64, seqlen_q=1, hq=32, hk=8, d=128, dv=128, splits=0)
    a = _decode_inputs(case, torch.bfloat16, batch=1, capacity=131072, device=DEVICE)
    a = AttnArgs(**{**a.__dict__, "seqused_k": torch.tensor([131072 - 5], dtype=torch.int32, device=DEVICE)})
    assert scheduler.decode_num_splits(1, 32, 8, 1, a.max_seqlen_k, 128, 128, a.q.device) > 8
    _check_decode(a, softcap=False)


@gpu
@pytest.mark.gpu
def test_decode_gpu_mqa_long_single_sequence():
    """MQA at batch 1 over 128k keys, contiguous: one tile split ~115 ways, the 8-warp launch
    (decode._CONTIGUOUS_WARPS_FEW_TILES), with every split merged by the last program."""
    case = dict(page_size=None, seqlen_q=1, hq=8, hk=1, d=128, dv=128, splits=0)
    a = _decode_inputs(case, torch.bfloat16, batch=1, capacity=131072, device=DEVICE)
    a = AttnArgs(**{**a.__dict__, "seqused_k": torch.tensor([131072 - 5], dtype=torch.int32, device=DEVICE)})
    plan = decode_mod._plan(1, 8, 1, 1, a.max_seqlen_k, 128, 128, False, a.q.device, 0, None)
    assert plan.num_warps == decode_mod._CONTIGUOUS_WARPS_FEW_TILES and plan.num_splits > 16
    _check_decode(a, softcap=False)


def test_decode_plan_fills_each_sm_once_then_trades_stages_for_residency():
    cpu = torch.device("cpu")  # DEFAULT_NUM_SMS (H100) stands in for the device
    one_per_sm = decode_mod._plan(1, 32, 8, 1, 131072, 128, 128, False, cpu, 0, None)
    assert one_per_sm.num_splits * 8 <= scheduler.DEFAULT_NUM_SMS < (one_per_sm.num_splits + 1) * 8
    assert one_per_sm.num_stages == decode_mod._CONTIGUOUS_STAGES
    crowded = decode_mod._plan(64, 32, 8, 1, 4096, 128, 128, False, cpu, 0, None)
    assert crowded.num_splits == 1 and crowded.num_stages == decode_mod._CONTIGUOUS_STAGES_RESIDENT
    crowded_d64 = decode_mod._plan(64, 32, 8, 1, 4096, 64, 64, False, cpu, 0, None)
    assert crowded_d64.block_n == decode_mod._RESIDENT_BLOCK_N < scheduler.decode_block_n(64, 64)
    paged = decode_mod._plan(64, 32, 8, 1, 4096, 128, 128, True, cpu, 0, None)
    assert paged.num_stages == decode_mod._PAGED_STAGES and paged.num_warps == decode_mod._PAGED_WARPS
    alone = decode_mod._plan(1, 32, 8, 1, 131072, 128, 128, True, cpu, 0, None)
    assert alone.num_warps == decode_mod._PAGED_WARPS and alone.num_splits > 1
    assert one_per_sm.num_warps == 4  # GQA 32/8: eight tiles
    mqa = decode_mod._plan(1, 8, 1, 1, 131072, 128, 128, False, cpu, 0, None)
    assert mqa.num_warps == decode_mod._CONTIGUOUS_WARPS_FEW_TILES and mqa.num_splits > 16


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 64])
def test_decode_gpu_more_programs_than_sms(d):
    """A contiguous batch wider than the GPU: the two-stage, several-programs-per-SM launch."""
    case = dict(page_size=None, seqlen_q=1, hq=32, hk=8, d=d, dv=d, splits=0)
    a = _decode_inputs(case, torch.bfloat16, batch=48, capacity=700, device=DEVICE)
    plan = decode_mod._plan(48, 32, 8, 1, a.max_seqlen_k, d, d, False, a.q.device, 0, None)
    assert plan.num_stages == decode_mod._CONTIGUOUS_STAGES_RESIDENT
    _check_decode(a, softcap=False)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_varlen_keys_and_dense_func_shapes(splits):
    """The decode kernel also serves flash_attn_func / varlen calls with few query rows."""
    dtype = torch.bfloat16
    lens_q, lens_k = [1, 2, 1], [37, 0, 150]
    cu_q = _int32([0, 1, 3, 4])
    cu_k = _int32([0, 37, 37, 187])
    q = torch.randn(4, 4, 32, device=DEVICE).to(dtype)
    k = torch.randn(187, 2, 32, device=DEVICE).to(dtype)
    v = torch.randn(187, 2, 32, device=DEVICE).to(dtype)
    a = _attn_args(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                   max_seqlen_k=max(lens_k), window_left=-1, window_right=0, num_splits=splits)
    out, lse = decode_mod.forward(a)
    kw = dict(softmax_scale=a.softmax_scale, causal=True)
    ref, ref_lse = rm.attention_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), **kw)
    ref_lowp, _ = rm.attention_varlen(q, k, v, cu_q.cpu(), cu_k.cpu(), lowp=True, **kw)
    tol.assert_matches_reference("varlen decode out", out, ref, ref_lowp)
    tol.assert_lse_matches("varlen decode lse", lse, ref_lse)

    qd = torch.randn(2, 1, 4, 32, device=DEVICE).to(dtype)
    kd = torch.randn(2, 90, 2, 32, device=DEVICE).to(dtype)
    vd = torch.randn(2, 90, 2, 32, device=DEVICE).to(dtype)
    a = _attn_args(qd, kd, vd, max_seqlen_k=90, num_splits=splits)
    out, lse = decode_mod.forward(a)
    ref, ref_lse = rm.attention_dense(qd, kd, vd, softmax_scale=a.softmax_scale)
    ref_lowp, _ = rm.attention_dense(qd, kd, vd, softmax_scale=a.softmax_scale, lowp=True)
    tol.assert_matches_reference("dense decode out", out, ref, ref_lowp)
    tol.assert_lse_matches("dense decode lse", lse, ref_lse)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU only: relies on untouched pages of a huge host buffer")
def test_combine_split_offsets_past_int32():
    """Split s of the partials at s * stride elements: past 2**31 once s * stride is. Buffers of
    2**31+ elements are reserved but only the few elements read are ever touched."""
    splits, head_dim = 17, 16  # split 16 is the second split tile: its base offset is 16 * stride
    stride = 2**27
    try:
        out_store = torch.empty(stride * (splits - 1) + head_dim, device=DEVICE)
        lse_store = torch.empty(stride * (splits - 1) + 1, device=DEVICE)
    except RuntimeError as e:  # a host that refuses to overcommit 16 GB of address space
        pytest.skip(f"cannot reserve the sparse buffers: {e}")
    out_partial = out_store.as_strided((splits, 1, 1, 1, head_dim), (stride, head_dim, head_dim, head_dim, 1))
    lse_partial = lse_store.as_strided((splits, 1, 1, 1), (stride, 1, 1, 1))
    for s in range(splits):
        out_partial[s] = torch.randn(1, 1, 1, head_dim, device=DEVICE)
        lse_partial[s] = torch.randn(1, 1, 1, device=DEVICE)
    dense_out, dense_lse = out_partial.clone(), lse_partial.clone()
    out, lse = combine_mod.combine(out_partial, lse_partial, torch.float32)
    ref_out, ref_lse = combine_reference(dense_out, dense_lse)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU only: relies on untouched pages of a huge host buffer")
def test_decode_fused_merge_group_offsets_past_int32():
    """A two-level merge reads group g's result at split 16 * g of the partials: past 2**31
    elements once 16 * the split stride is, though every split's own offset is not. 2**22
    tokens of one head (a q expanded from one token; only the first is a sequence) make the
    split stride 2**27; 17 splits of 2 blocks each put group 1 (split 16) at 2**31."""
    tokens, splits, d = 2**22, 17, 32
    seqlen_k = 2 * splits * 16
    q = torch.randn(1, 1, d, device=DEVICE).to(torch.bfloat16).expand(tokens, 1, d)
    k = torch.randn(1, seqlen_k, 1, d, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(1, seqlen_k, 1, d, device=DEVICE).to(torch.bfloat16)
    a = _attn_args(q, k, v, cu_seqlens_q=_int32([0, 1]), max_seqlen_q=1, seqused_k=_int32([seqlen_k]),
                   max_seqlen_k=seqlen_k, sinks=torch.randn(1, device=DEVICE), num_splits=splits)
    config = (16, 4, 1)
    try:
        partials = torch.empty(decode_mod.partials_numel(a, config), device=DEVICE)
        out, lse = decode_mod.outputs(a)
    except RuntimeError as e:  # a host that refuses to overcommit 9 GB of address space
        pytest.skip(f"cannot reserve the sparse buffers: {e}")
    out[0] = float("nan")
    lse[:, 0] = float("nan")
    launches = decode_mod.launches(a, out, lse, partials, config=config)
    assert len(launches) == 1 and launches[0].constexprs[22] == decode_mod.MERGE_GROUP < splits
    for launch in launches:
        launch()
    ref, ref_lse = decode_reference(a, lowp=False)
    tol.assert_matches_reference("decode out, group offsets past int32", out[:1], ref,
                                 decode_reference(a, lowp=True)[0])
    tol.assert_lse_matches("decode lse, group offsets past int32", lse[:, :1], ref_lse)
    assert _ring_is_zero(DEVICE)


def test_cache_lengths_past_the_capacity_read_only_the_cache():
    """cache_seqlens are values no check can read: a length past the capacity must clamp to the
    cache (as the reference backend's slicing does), never read past a row or a page table."""
    import flash_attn_interface as fa

    capacity, page_size = 24, 8
    q = torch.randn(2, 1, 4, 32, device=DEVICE, dtype=torch.float16)
    k_dense = torch.randn(2, capacity, 2, 32, device=DEVICE, dtype=torch.float16)
    v_dense = torch.randn(2, capacity, 2, 32, device=DEVICE, dtype=torch.float16)
    pages = torch.randperm(2 * capacity // page_size, device=DEVICE).to(torch.int32).view(2, -1)
    k_paged = torch.empty(2 * capacity // page_size, page_size, 2, 32, device=DEVICE, dtype=torch.float16)
    v_paged = torch.empty_like(k_paged)
    for b in range(2):
        for p in range(pages.shape[1]):
            k_paged[pages[b, p]] = k_dense[b, p * page_size: (p + 1) * page_size]
            v_paged[pages[b, p]] = v_dense[b, p * page_size: (p + 1) * page_size]
    want, _ = rm.attention_dense(q.double(), k_dense.double(), v_dense.double())
    for k, v, table in ((k_dense, v_dense, None), (k_paged, v_paged, pages)):
        for kernel in ("decode", "fwd"):
            a_out = _clamped_call(fa, q, k, v, table, capacity + 100, kernel)
            torch.testing.assert_close(a_out.double(), want, atol=2e-3, rtol=0)


def _clamped_call(fa, q, k, v, table, length, kernel):
    import flash_attn_3.backends.triton.routes as routes

    module = importlib.import_module(f"flash_attn_3.backends.triton.{kernel}")
    original = routes.forward_kernel
    routes.forward_kernel = lambda a: module
    old_env = os.environ.get("FLASH_ATTN_3_BACKEND")
    os.environ["FLASH_ATTN_3_BACKEND"] = "triton"
    try:
        return fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=length, page_table=table, num_splits=1)
    finally:
        routes.forward_kernel = original
        if old_env is None:
            del os.environ["FLASH_ATTN_3_BACKEND"]
        else:
            os.environ["FLASH_ATTN_3_BACKEND"] = old_env


# ---------------------------------------------------------------------------------------------
# one-token append inside the decode launch (decode.Append: the planned one-launch decode step)


FUSED_APPEND_CASES = [
    # plain append into a dense cache, unsplit
    dict(page_size=None, rotary=None, splits=1, causal=True),
    # rotary_dim < d (half pairs), cache_batch_idx, split launch that merges in place
    dict(page_size=None, rotary="half", rotary_dim=16, splits=3, causal=True, batch_idx=True),
    # page size 1, interleaved, rotary_seqlens, leftpad, non-causal (q rotated at r_b)
    dict(page_size=1, rotary="interleaved", rotary_dim=32, splits=2, rot_seqlens=True, leftpad=True),
    # two q tokens per new key (per-token q rotation), sinks and softcap, odd page size
    dict(page_size=3, rotary="half", rotary_dim=32, splits=2, seqlen_q=2, causal=True, sinks=True, softcap=3.0),
    # sliding window, heuristic splits, interleaved with rotary_dim < d, MQA
    dict(page_size=16, rotary="interleaved", rotary_dim=16, splits=0, window=(6, 0), batch_idx=True, hk=1),
    # attention chunk, dv != d
    dict(page_size=None, rotary="half", rotary_dim=32, splits=4, chunk=8, causal=True, dv=64),
]


def _fused_append_problem(case, dtype, batch, hq, hk, d, capacity, device):
    """(AttnArgs over the cache before the append with q unrotated and seqused_k the cache
    lengths, decode.Append, append_kv's keyword arguments)."""
    hk = case.get("hk", hk)
    dv = case.get("dv", d)
    rows = batch + 1
    page_size = case["page_size"]
    if page_size is not None:
        pages_per_row = -(-capacity // page_size)
        num_pages = rows * pages_per_row + 2
        page_table = torch.randperm(num_pages, device=device)[: rows * pages_per_row].view(rows, -1).to(torch.int32)
        k_cache = torch.randn(num_pages, page_size, hk, d, device=device).to(dtype)
        v_cache = torch.randn(num_pages, page_size, hk, dv, device=device).to(dtype)
        capacity = pages_per_row * page_size
    else:
        page_table = None
        k_cache = torch.randn(rows, capacity, hk, d, device=device).to(dtype)
        v_cache = torch.randn(rows, capacity, hk, dv, device=device).to(dtype)
    cache_seqlens = torch.randint(0, capacity, (batch,), dtype=torch.int32, device=device)
    cache_seqlens[0] = capacity  # a full cache: nothing written, the attention reads only the cache
    if batch > 2:
        cache_seqlens[2] = 0  # the new token is the only key
    leftpad = None
    if case.get("leftpad"):
        leftpad = torch.minimum(torch.randint(0, 6, (batch,), device=device), cache_seqlens.long()).to(torch.int32)
    kv_batch_idx = None
    if case.get("batch_idx") or page_table is not None:
        kv_batch_idx = torch.randperm(rows, device=device)[:batch].to(torch.int32)
    seqlen_q = case.get("seqlen_q", 1)
    q = (torch.randn(batch, seqlen_q, hq, d, device=device) * 2).to(dtype)
    k_new = torch.randn(batch, 1, hk, d, device=device).to(dtype)
    v_new = torch.randn(batch, 1, hk, dv, device=device).to(dtype)
    cos = sin = rotary_seqlens = None
    if case["rotary"]:
        seqlen_ro = capacity + 8
        angle = torch.rand(seqlen_ro, case["rotary_dim"] // 2, device=device) * 2 * math.pi
        cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
        if case.get("rot_seqlens"):
            rotary_seqlens = torch.randint(0, seqlen_ro - seqlen_q, (batch,), dtype=torch.int32, device=device)
    window = case.get("window", (-1, 0 if case.get("causal") else -1))
    per_token = window[0] >= 0 or window[1] >= 0 or case.get("chunk", 0) > 0
    interleaved = case["rotary"] == "interleaved"
    a = _attn_args(q, k_cache, v_cache, seqused_k=cache_seqlens, max_seqlen_k=capacity, page_table=page_table,
                   kv_batch_idx=kv_batch_idx, leftpad_k=leftpad, window_left=window[0], window_right=window[1],
                   attention_chunk=case.get("chunk", 0), softcap=case.get("softcap", 0.0), num_splits=case["splits"],
                   sinks=torch.randn(hq, device=device) if case.get("sinks") else None)
    append = decode_mod.Append(k_new, v_new, cos, sin, rotary_seqlens, interleaved, per_token)
    append_kwargs = dict(k_new=k_new, v_new=v_new, q=q, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens,
                         cache_batch_idx=kv_batch_idx, cache_leftpad=leftpad, page_table=page_table, cu_seqlens_q=None,
                         cu_seqlens_k_new=None, rotary_seqlens=rotary_seqlens, rotary_interleaved=interleaved,
                         rotate_q_per_token=per_token, max_seqlen_q=None)
    return a, append, append_kwargs


def _run_poisoned(a, config, **launch_kwargs):
    out, lse = decode_mod.outputs(a)
    out.fill_(float("nan"))
    lse.fill_(float("nan"))
    partials = torch.full((max(1, decode_mod.partials_numel(a, config)),), float("nan"), device=a.q.device)
    launches = decode_mod.launches(a, out, lse, partials, seqused_add=1, config=config, **launch_kwargs)
    for launch in launches:
        launch()
    return out, lse, launches


def _check_fused_append(case, dtype, batch, hq, hk, d, capacity, config):
    """The one-launch step against the two-launch step (append_kv, then decode): caches, out and
    lse bit for bit; and both against the float64 reference of spec sec 5."""
    a, append, append_kwargs = _fused_append_problem(case, dtype, batch, hq, hk, d, capacity, DEVICE)
    assert decode_mod.fusable_append(a, append.k_new, None)
    k0, v0 = a.k.clone(), a.v.clone()

    fused = AttnArgs(**{**a.__dict__, "k": k0.clone(), "v": v0.clone()})
    out, lse, launches = _run_poisoned(fused, config, append=append)
    assert len(launches) == 1

    ku, vu = k0.clone(), v0.clone()
    q_rot = append_mod.append_kv(k_cache=ku, v_cache=vu, **append_kwargs)
    two = AttnArgs(**{**a.__dict__, "q": q_rot, "k": ku, "v": vu})
    out2, lse2, _ = _run_poisoned(two, config)
    assert torch.equal(fused.k, ku) and torch.equal(fused.v, vu), "cache differs from the two-launch step"
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "output differs from the two-launch step"

    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    k_ref, v_ref, q_ref = append_reference(
        k0, v0, append.k_new, append.v_new, a.q, append.rotary_cos, append.rotary_sin, a.seqused_k.cpu(),
        cpu(a.kv_batch_idx), cpu(a.page_table), None, None, cpu(append.rotary_seqlens),
        append.rotary_interleaved, append.rotate_q_per_token)
    assert torch.equal(fused.v, v_ref)
    assert_rotated_close(fused.k, k_ref)
    seqused = torch.clamp(a.seqused_k + 1, max=a.max_seqlen_k).to(torch.int32)
    ref, _ = decode_reference(AttnArgs(**{**a.__dict__, "q": q_ref, "k": k_ref, "v": v_ref.double(),
                                          "seqused_k": seqused}), lowp=False)
    rounded = AttnArgs(**{**two.__dict__, "seqused_k": seqused})  # rotated q and k as stored (input dtype)
    ref_lowp, _ = decode_reference(rounded, lowp=True)
    tol.assert_matches_reference("fused append out", out, ref, ref_lowp, softcap=a.softcap > 0)
    # The lse's 1e-3 bound is tighter than the rounding of rotated q and k to the input dtype: it
    # checks the attention over the operands as stored.
    tol.assert_lse_matches("fused append lse", lse, decode_reference(rounded, lowp=False)[1])
    assert _ring_is_zero(DEVICE)


@pytest.mark.parametrize("case", FUSED_APPEND_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_decode_fused_append(case):
    # BLOCK_N 16: 40 keys are several blocks, so splits hold blocks before the new key's.
    _check_fused_append(case, torch.bfloat16, batch=3, hq=4, hk=2, d=32, capacity=40, config=(16, 4, 1))


def test_decode_fused_append_only_at_one_program_per_sm():
    """Launches with more programs than SMs keep the append launch (the fused kernel's registers
    would halve their residency); two new tokens, packed k_new or varlen q never fuse."""
    def args(batch, capacity):
        q = torch.empty(batch, 1, 32, 128, dtype=torch.bfloat16)
        k = torch.empty(batch, capacity, 8, 128, dtype=torch.bfloat16)
        return _attn_args(q, k, k, seqused_k=torch.zeros(batch, dtype=torch.int32), max_seqlen_k=capacity)

    k_new = torch.empty(1, 1, 8, 128, dtype=torch.bfloat16)
    assert decode_mod.fusable_append(args(1, 1024), k_new, None)
    assert decode_mod.fusable_append(args(16, 8192), k_new.expand(16, -1, -1, -1), None)
    assert not decode_mod.fusable_append(args(64, 4096), k_new.expand(64, -1, -1, -1), None)
    assert not decode_mod.fusable_append(args(1, 1024), torch.empty(1, 2, 8, 128, dtype=torch.bfloat16), None)
    assert not decode_mod.fusable_append(args(1, 1024), k_new[0], torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="seqused_add"):
        a = args(1, 64)
        decode_mod.launches(a, *decode_mod.outputs(a), seqused_add=0, append=decode_mod.Append(
            k_new, k_new, None, None, None, False, True))


GPU_FUSED_APPEND_CASES = [
    dict(page_size=None, rotary="half", rotary_dim=128, splits=0, causal=True),
    dict(page_size=None, rotary="interleaved", rotary_dim=128, splits=0, causal=True, dtype=torch.float16),
    dict(page_size=16, rotary="interleaved", rotary_dim=64, splits=0, causal=True, batch_idx=True, leftpad=True),
    dict(page_size=None, rotary=None, splits=1, causal=True, sinks=True),
    dict(page_size=256, rotary="half", rotary_dim=128, splits=3, seqlen_q=2, causal=True, rot_seqlens=True),
    dict(page_size=1, rotary="interleaved", rotary_dim=128, splits=0, window=(300, 0), softcap=30.0),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("capacity", [1024, 4096])
@pytest.mark.parametrize("case", GPU_FUSED_APPEND_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_decode_gpu_fused_append(case, capacity):
    """At decode size (GQA 32/8, D 128; split programs race the writer of the new row): the
    one-launch step equals the two-launch step bit for bit (caches included) and matches the
    reference. The interpreter runs programs one after another, so only this test would see a
    program that read the new row back from the cache before its writer stored it."""
    case = dict(case)
    dtype = case.pop("dtype", torch.bfloat16)
    _check_fused_append(case, dtype, batch=4, hq=32, hk=8, d=128, capacity=capacity, config=None)

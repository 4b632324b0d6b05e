"""Beyond 2^31 elements (issue 17, part 2): every offset a kernel computes from a token, page or
split index must be 64-bit where the tensor it indexes is past 2^31 elements. Each test builds
one such tensor (several GB), runs the Triton backend over all of it, and checks only the slices
past the 2^31st element (and the first ones) against the float64 reference: cheap to check,
expensive to get wrong.

GPU only; each test skips when the GPU has less free memory than it needs.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference_math as rm
from inputs import cu_seqlens
from tolerance import assert_grad_matches, assert_lse_matches, assert_matches_reference

import flash_attn_interface as fa

pytestmark = [pytest.mark.gpu, pytest.mark.bigmem,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

INT32_LIMIT = 2**31
BF16 = torch.bfloat16
GB = 2**30


@pytest.fixture(autouse=True)
def _triton_and_memory(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    torch.cuda.empty_cache()
    yield
    torch.cuda.empty_cache()


def _need(gigabytes: float):
    free, _ = torch.cuda.mem_get_info()
    if free < gigabytes * GB:
        pytest.skip(f"needs {gigabytes:.0f} GB of free GPU memory, {free / GB:.1f} GB free")


def _reference_grads(fn, inputs, g, *, lowp):
    leaves = [t.detach().to(t.dtype if lowp else torch.float64).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, g.to(out.dtype))


def test_varlen_forward_backward_past_2_31_elements():
    """1,053,188 packed tokens x 16 heads x 128: q, k, v, out, dq, dk, dv of 2.16e9 elements each.
    The last four sequences (4097, 1, 127, 129 tokens... in reverse) start past element 2^31."""
    _need(48)
    heads, d = 16, 128
    lens = [4097, 1, 127, 129] + [1024] * 1020 + [129, 127, 1, 4097]
    total = sum(lens)
    assert total * heads * d > INT32_LIMIT
    cu = cu_seqlens(lens, "cuda")
    q, k, v = (torch.randn(total, heads, d, device="cuda", dtype=BF16).requires_grad_() for _ in range(3))
    out, lse = fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                         return_attn_probs=True)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    checked = [0, 1, 2, 3, len(lens) - 4, len(lens) - 3, len(lens) - 2, len(lens) - 1]
    assert int(cu[len(lens) - 4]) * heads * d >= INT32_LIMIT, "the last sequences must start past 2^31"
    for b in checked:
        rows = slice(int(cu[b]), int(cu[b + 1]))
        qs, ks, vs = (t.detach()[rows] for t in (q, k, v))
        ref, ref_lse = rm.attention(qs, ks, vs, causal=True)
        lowp, _ = rm.attention(qs, ks, vs, causal=True, lowp=True)
        assert_matches_reference(f"sequence {b}: out", out[rows], ref, lowp)
        assert_lse_matches(f"sequence {b}: lse", lse[:, rows], ref_lse)

        def fn(a, b_, c, lowp=False):
            return rm.attention(a, b_, c, causal=True, lowp=lowp)[0]

        want = _reference_grads(fn, (qs, ks, vs), g[rows], lowp=False)
        base = _reference_grads(lambda a, b_, c: fn(a, b_, c, lowp=True), (qs, ks, vs), g[rows], lowp=True)
        for name, got, w, bl in zip("qkv", (dq[rows], dk[rows], dv[rows]), want, base):
            assert_grad_matches(f"sequence {b}: d{name}", got, w, bl)


@pytest.mark.parametrize("seqlen_q", [1, 200])
def test_paged_kvcache_with_a_pool_past_2_31_elements(seqlen_q):
    """A page pool of 8500 pages x 256 x 8 heads x 128 (2.23e9 elements per cache); the rows use
    pages at the pool's end (and page 0), and the append writes there. seqlen_q 1 takes the
    decode kernel (split), 200 the tiled forward's paged path."""
    _need(14)
    num_pages, page_size, heads_kv, heads, d = 8500, 256, 8, 32, 128
    assert num_pages * page_size * heads_kv * d > INT32_LIMIT
    k_pool = torch.randn(num_pages, page_size, heads_kv, d, device="cuda", dtype=BF16)
    v_pool = torch.randn(num_pages, page_size, heads_kv, d, device="cuda", dtype=BF16)
    pages_per_row = 14
    last = torch.arange(num_pages - 1, num_pages - 1 - 2 * pages_per_row, -1)
    table = last.view(2, pages_per_row).clone()
    table[1, 0] = 0  # one row starts at the pool's start and ends at its end
    table = table.to(device="cuda", dtype=torch.int32)
    lens = torch.tensor([3000, 2900], dtype=torch.int32, device="cuda")
    q = torch.randn(2, seqlen_q, heads, d, device="cuda", dtype=BF16)
    k_new = torch.randn(2, seqlen_q, heads_kv, d, device="cuda", dtype=BF16)
    v_new = torch.randn(2, seqlen_q, heads_kv, d, device="cuda", dtype=BF16)
    used = table.flatten().long()
    small_k, small_v = k_pool[used].clone(), v_pool[used].clone()
    small_table = torch.arange(used.numel(), device="cuda", dtype=torch.int32).view_as(table)
    args = dict(cache_seqlens=lens, causal=True)
    out, lse, *_ = fa.flash_attn_with_kvcache(q, k_pool, v_pool, k_new, v_new, page_table=table,
                                              return_softmax_lse=True, **args)
    ref, ref_lse, k_want, v_want = rm.attention_kvcache(q, small_k, small_v, k_new, v_new, page_table=small_table,
                                                        **args)
    lowp, _, _, _ = rm.attention_kvcache(q, small_k, small_v, k_new, v_new, page_table=small_table, lowp=True,
                                         **args)
    assert_matches_reference("out", out, ref, lowp)
    assert_lse_matches("lse", lse, ref_lse)
    assert torch.equal(k_pool[used], k_want), "k pages at the pool's end differ from the expected append"
    assert torch.equal(v_pool[used], v_want), "v pages at the pool's end differ from the expected append"


def test_contiguous_kvcache_row_past_2_31_elements():
    """A (3, 720000, 8, 128) cache (2.2e9 elements): decode with an append on row 2 through
    cache_batch_idx, over 719,990 keys that end past element 2^31 (split-KV over many splits).
    The float64 reference of one row takes most of the memory."""
    _need(40)
    batch_cache, capacity, heads, d = 3, 720_000, 8, 128
    assert batch_cache * capacity * heads * d > INT32_LIMIT
    k_cache = torch.randn(batch_cache, capacity, heads, d, device="cuda", dtype=BF16)
    v_cache = torch.randn(batch_cache, capacity, heads, d, device="cuda", dtype=BF16)
    q = torch.randn(1, 1, heads, d, device="cuda", dtype=BF16)
    k_new, v_new = (torch.randn(1, 1, heads, d, device="cuda", dtype=BF16) for _ in range(2))
    lens = torch.tensor([capacity - 10], dtype=torch.int32, device="cuda")
    row = torch.tensor([2], dtype=torch.int32, device="cuda")
    before = k_cache[2:3].clone(), v_cache[2:3].clone()
    out, lse, *_ = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                              cache_batch_idx=row, causal=True, return_softmax_lse=True)
    ref, ref_lse, k_want, v_want = rm.attention_kvcache(q, *before, k_new, v_new, cache_seqlens=lens, causal=True)
    del before
    lowp, _, _, _ = rm.attention_kvcache(q, k_cache[2:3], v_cache[2:3], cache_seqlens=lens + 1, causal=True,
                                         lowp=True)
    assert_matches_reference("out", out, ref, lowp)
    assert_lse_matches("lse", lse, ref_lse)
    assert torch.equal(k_cache[2:3], k_want) and torch.equal(v_cache[2:3], v_want), "append at the row's end"


def test_combine_past_2_31_elements_and_many_splits():
    """out_partial (33, 1, 65536, 8, 128) fp32 (2.2e9 elements: the last split's partials lie past
    2^31); then 256 splits, most of them empty, some positions empty in every split."""
    _need(24)
    splits, length, heads, d = 33, 65536, 8, 128
    assert splits * length * heads * d > INT32_LIMIT
    out_partial = torch.randn(splits, 1, length, heads, d, device="cuda")
    lse_partial = torch.randn(splits, 1, length, heads, device="cuda") * 4
    lse_partial[1:-1, :, -32:] = -math.inf  # the tail's only live splits: the first and the last
    out, lse = fa.flash_attn_combine(out_partial, lse_partial, out_dtype=BF16)
    for rows in (slice(0, 64), slice(length - 64, length)):
        want, want_lse = rm.combine(out_partial[:, :, rows], lse_partial[:, :, rows])
        torch.testing.assert_close(lse[:, rows].double(), want_lse, atol=1e-5, rtol=1e-5)
        err = (out[:, rows].double() - want).abs().max().item()
        rounding = (want.to(BF16).double() - want).abs().max().item()
        assert err <= 2 * rounding + 1e-5, f"rows {rows}: combine max err {err:.3g} (rounding {rounding:.3g})"
    del out_partial, lse_partial, out, lse

    many = torch.randn(256, 2, 100, 4, 64, device="cuda")
    many_lse = torch.randn(256, 2, 100, 4, device="cuda")
    many_lse[torch.rand(256, 2, 100, 4, device="cuda") < 0.9] = -math.inf
    many_lse[:, 1, :7] = -math.inf
    out, lse = fa.flash_attn_combine(many, many_lse)
    want, want_lse = rm.combine(many, many_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), torch.isfinite(want_lse).cpu()), "empty positions keep -inf"
    assert (out[1, :7] == 0).all(), "a position empty in every split gives 0"
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)

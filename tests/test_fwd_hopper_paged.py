"""Paged K/V in the Gluon Hopper forward (fwd_hopper.py's PAGE_SIZE variant): chunked prefill over
a paged cache, against the float64 reference.

Anywhere: the paged variants compile for sm_90 into the plain kernel's pipeline (every wgmma
kept, nothing of the KV loop in local memory), the scope takes pages of 16, 32, 64, ... tokens
only, and cache lengths and capacities do not recompile. On an sm_90 GPU (tests marked gpu): out
and LSE for pages of 16 / 64 / 256 tokens scattered over a pool in a random order, every slot no
sequence uses (spare pages, page tails, table entries past a sequence) NaN, ragged cache lengths
(1, 127, 129, 4097 keys), packed and batch-dense queries, GQA, causal or not, windows and softcap;
and flash_attn_with_kvcache's chunked prefill (append, then attention) routed here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import reference_math as rm
from hopper import figures_of_pinned_triton, gluon_required, on_hopper
from inputs import cu_seqlens, poison_new_buffers
from tolerance import assert_lse_matches, assert_matches_reference
from watched import run_watched

from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import fwd_hopper

TESTS = Path(__file__).resolve().parent
needs_gluon = gluon_required(fwd_hopper)

# Keys per batch row: one key, a 128-key block's end -1 / +1, and a last block of one key
# after 4k (page 256: 16 full pages and one key of the 17th).
CACHE_LENS = [1, 127, 129, 4097]
# Packed query tokens per row (the last ones of the row's keys): one token, some under a block,
# a tile and one row, a long chunk.
QUERY_LENS = [1, 100, 129, 2000]
PAGE_SIZES = [16, 64, 256]


def paged_cache(lens, page_size, heads_k, head_dim, spare_pages=5, device="cuda"):
    """(k_pages, v_pages, page_table) of a pool of (num_pages, page_size, Hk, D) pages: row b's
    logical pages are a random pick of the pool and its first lens[b] keys random; every slot
    nothing reads (spare pages, page tails, the pages of table entries past a row's keys) NaN.
    The table has one more entry per row than the longest row needs."""
    batch = len(lens)
    max_pages = math.ceil(max(lens) / page_size) + 1
    num_pages = batch * max_pages + spare_pages
    table = torch.randperm(num_pages, device=device)[:batch * max_pages]
    table = table.view(batch, max_pages).to(torch.int32)
    pools = []
    for _ in "kv":
        pool = torch.full((num_pages, page_size, heads_k, head_dim), float("nan"),
                          dtype=torch.bfloat16, device=device)
        for b, n in enumerate(lens):
            pos = torch.arange(n, device=device)
            pool[table[b].long()[pos // page_size], pos % page_size] = torch.randn(
                n, heads_k, head_dim, device=device, dtype=torch.bfloat16)
        pools.append(pool)
    return pools[0], pools[1], table


def paged_args(q, k_pages, v_pages, table, lens, *, cu_seqlens_q=None, max_seqlen_q=None,
               causal=False, **layer) -> AttnArgs:
    """AttnArgs as flash_attn_with_kvcache builds them for a paged cache: seqused_k the lengths,
    max_seqlen_k the capacity."""
    return AttnArgs.plain(
        q, k_pages, v_pages, page_table=table,
        seqused_k=torch.tensor(lens, dtype=torch.int32, device=q.device),
        max_seqlen_k=table.shape[1] * k_pages.shape[1], cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=q.shape[1] if max_seqlen_q is None else max_seqlen_q,
        **{"window_right": 0 if causal else -1, **layer})


# ---------------------------------------------------------------------------------------------
# Anywhere


def _aot(head_dim, page_size, variant):
    # A subprocess: the compiler must not run under the interpreter switch conftest sets.
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"), "--head-dim",
           str(head_dim), "--paged", str(page_size)] + variant
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_gluon
@figures_of_pinned_triton
@pytest.mark.parametrize("head_dim,page_size,variant", [
    (128, 16, ["--causal", "--varlen"]),  # 8 page copies per key block
    (128, 64, []),
    (64, 256, ["--causal"]),  # a key block inside a page
    (256, 16, ["--varlen"]),  # BLOCK_N 64: 4 copies
    (128, 16, ["--window", "100,0", "--softcap", "30"]),
], ids=str)
def test_paged_compiles_for_sm90(head_dim, page_size, variant):
    """The plain pipeline with more TMA copies in the producer: every wgmma kept and none
    serialized, nothing of the KV loops in local memory (the producer's page-table reads spill
    a few per-tile scalars of its 24 registers, outside its loop), the shared memory of the
    plain kernel."""
    got = _aot(head_dim, page_size, variant)
    plain = json.loads(subprocess.run(
        [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"), "--head-dim",
         str(head_dim)] + [x for x in variant if x != "--varlen"], capture_output=True,
        text=True, timeout=300).stdout.splitlines()[-1])
    assert got["wgmma_ptx"] > 0 and got["hgmma_sass"] == got["wgmma_ptx"], got
    assert not got["ptxas_warnings"], got
    assert all(loop["local"] == 0 for loop in got["kv_loops"]) and got["kv_loops"], got
    assert got["spill_bytes"] <= 256 and got["shared_bytes"] <= 227 * 1024, got
    assert got["shared_bytes"] <= plain["shared_bytes"] + 64, (got, plain)
    block_n = fwd_hopper.default_config(head_dim, "--causal" in variant)[0]
    if page_size < block_n:
        assert got["tma_loads_ptx"] > plain["tma_loads_ptx"], (got, plain)


def test_paged_scope_and_bounds():
    """Pages of a power of two >= 16 tokens; the window bounds and the portable-faster rule
    follow the cache's capacity, not the page size."""
    q = torch.empty(2, 300, 4, 64, dtype=torch.bfloat16)
    for page_size, reason in [(16, None), (32, None), (256, None), (1, "page size 1"),
                              (3, "page size 3"), (48, "page size 48")]:
        k = torch.empty(40, page_size, 2, 64, dtype=torch.bfloat16)
        table = torch.zeros(2, 8, dtype=torch.int32)
        a = AttnArgs.plain(q, k, k, page_table=table, seqused_k=torch.zeros(2, dtype=torch.int32),
                           max_seqlen_k=8 * page_size)
        got = fwd_hopper.paged_refusal(a)
        assert (got is None) if reason is None else (reason in got), (page_size, got)
    k = torch.empty(40, 16, 2, 64, dtype=torch.bfloat16)
    base = dict(page_table=torch.zeros(2, 32, dtype=torch.int32),
                seqused_k=torch.zeros(2, dtype=torch.int32), max_seqlen_k=512)
    assert fwd_hopper.paged_refusal(AttnArgs.plain(
        q, k, k, leftpad_k=torch.zeros(2, dtype=torch.int32), **base)) is not None
    # capacity 512: a left side of 500 still bounds, 511 does not
    a = AttnArgs.plain(q, k, k, window_left=500, window_right=0, **base)
    assert fwd_hopper.mask_bounds(a) == (500, 0, None)
    a = AttnArgs.plain(q, k, k, window_left=511, window_right=0, **base)
    assert fwd_hopper.mask_bounds(a) == (None, 0, None)
    assert not fwd_hopper._portable_faster(AttnArgs.plain(q, k, k, window_right=0, **base))


@needs_gluon
def test_paged_lengths_do_not_recompile(monkeypatch):
    """Cache capacities (the page table's row stride), lengths and batch sizes bind to one
    specialization key per page size."""
    from specialization import LaunchRecorder, specialization_keys

    def call(batch, max_pages, seqlen_q):
        q = torch.randn(batch * seqlen_q, 16, 128, dtype=torch.bfloat16)
        k = torch.randn(batch * max_pages + 3, 16, 2, 128, dtype=torch.bfloat16)
        table = torch.zeros(batch, max_pages, dtype=torch.int32)
        return paged_args(q, k, k, table, [max_pages * 16] * batch, causal=True,
                          cu_seqlens_q=cu_seqlens([seqlen_q] * batch, "cpu"),
                          max_seqlen_q=seqlen_q)

    kernel, recorder = fwd_hopper._fwd_kernel, LaunchRecorder()
    with monkeypatch.context() as patch:
        patch.setattr(fwd_hopper, "_fwd_kernel", recorder)
        patch.setattr(fwd_hopper, "_num_sms", lambda device_index: 132)
        for args in [(2, 2048, 2048), (3, 1000, 333), (1, 17, 17)]:
            fwd_hopper.forward(call(*args))
    keys = specialization_keys(kernel, recorder.launches, False)
    assert len(set(keys)) == 1, keys


# ---------------------------------------------------------------------------------------------
# On the GPU

# (head dim, layer fields): the masks the tests below combine with each page size
MASKS = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window_left=300, window_right=0),
}

_SMOKE = textwrap.dedent("""
    import torch
    from inputs import cu_seqlens
    from test_fwd_hopper_paged import MASKS, PAGE_SIZES, paged_args, paged_cache
    from flash_attn_3.backends.triton import fwd_hopper
    # every page size and head dim once, small: a byte count the copies do not fill would hang
    # the consumers on their barrier
    for head_dim in (64, 128, 256):
        for page_size in PAGE_SIZES:
            for mask, layer in MASKS.items():
                lens = [1, 300, 129]
                k, v, table = paged_cache(lens, page_size, 2, head_dim)
                q = torch.randn(sum(lens), 8, head_dim, device="cuda", dtype=torch.bfloat16)
                fwd_hopper.forward(paged_args(q, k, v, table, lens,
                                              cu_seqlens_q=cu_seqlens(lens, "cuda"),
                                              max_seqlen_q=max(lens), **layer))
                torch.cuda.synchronize()
                print(head_dim, page_size, mask, flush=True)
""")
STEP_SECONDS = 90


@pytest.fixture(scope="module")
def paged_kernel_terminates(tmp_path_factory):
    run_watched(_SMOKE, "fwd_hopper paged", STEP_SECONDS, tmp_path_factory)


def _reference_kw(a: AttnArgs) -> dict:
    return dict(softmax_scale=a.softmax_scale, window_size=(a.window_left, a.window_right),
                attention_chunk=a.attention_chunk, softcap=a.softcap, sinks=a.sinks)


def run_paged_and_check(monkeypatch, a: AttnArgs):
    """Out and LSE of fwd_hopper.forward against the float64 reference over the gathered pages;
    batch-dense q is checked as packed rows of equal length."""
    assert fwd_hopper.in_scope(a), fwd_hopper.paged_refusal(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a)
    q, dense = a.q, a.cu_seqlens_q is None
    cu_q = a.cu_seqlens_q
    if dense:
        batch, seqlen_q = q.shape[:2]
        q = q.flatten(0, 1)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * seqlen_q
    kw = dict(page_table=a.page_table, seqused_k=a.seqused_k, **_reference_kw(a))
    ref, ref_lse = rm.attention_varlen(q, a.k, a.v, cu_q, **kw)
    ref_lowp, _ = rm.attention_varlen(q, a.k, a.v, cu_q, lowp=True, **kw)
    if dense:
        ref, ref_lowp = (x.view(a.q.shape) for x in (ref, ref_lowp))
        ref_lse = ref_lse.view(a.q.shape[2], batch, seqlen_q).transpose(0, 1)
    assert out.shape == a.q.shape and lse.shape == ref_lse.shape
    assert_matches_reference("out", out, ref, ref_lowp, softcap=a.softcap > 0)
    assert_lse_matches("lse", lse, ref_lse)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("paged_kernel_terminates")
def test_paged_varlen_matches_reference(monkeypatch, page_size, mask):
    """Packed queries, the last QUERY_LENS[b] tokens of each row's CACHE_LENS[b] keys (chunked
    prefill after the append), 8 query heads over 2 KV heads."""
    k, v, table = paged_cache(CACHE_LENS, page_size, 2, 128)
    q = torch.randn(sum(QUERY_LENS), 8, 128, device="cuda", dtype=torch.bfloat16)
    run_paged_and_check(monkeypatch, paged_args(
        q, k, v, table, CACHE_LENS, cu_seqlens_q=cu_seqlens(QUERY_LENS, "cuda"),
        max_seqlen_q=max(QUERY_LENS), **MASKS[mask]))


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("paged_kernel_terminates")
def test_paged_dense_q_matches_reference(monkeypatch, page_size, mask):
    """Batch-dense q of 200 tokens per row over the ragged cache: under causal, the rows of the
    1-key and 127-key rows above the diagonal's start see no key (out 0, lse +inf)."""
    k, v, table = paged_cache(CACHE_LENS, page_size, 2, 128)
    q = torch.randn(len(CACHE_LENS), 200, 8, 128, device="cuda", dtype=torch.bfloat16)
    run_paged_and_check(monkeypatch, paged_args(q, k, v, table, CACHE_LENS, **MASKS[mask]))


@pytest.mark.parametrize("head_dim,page_size,causal", [(64, 16, True), (64, 256, False),
                                                       (256, 16, False), (256, 64, True),
                                                       (96, 32, True)])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("paged_kernel_terminates")
def test_paged_head_dims(monkeypatch, head_dim, page_size, causal):
    """D = 64 (BLOCK_N 128), 256 (BLOCK_N 64: 4 pages of 16 per block, or a quarter of a
    page of 64), and 96 on 128-column tiles (the padding columns read as zeros), MQA."""
    k, v, table = paged_cache(CACHE_LENS, page_size, 1, head_dim)
    q = torch.randn(sum(QUERY_LENS), 4, head_dim, device="cuda", dtype=torch.bfloat16)
    run_paged_and_check(monkeypatch, paged_args(
        q, k, v, table, CACHE_LENS, cu_seqlens_q=cu_seqlens(QUERY_LENS, "cuda"),
        max_seqlen_q=max(QUERY_LENS), causal=causal))


@pytest.mark.gpu
@on_hopper
def test_paged_layers(monkeypatch):
    """Window with both sides, softcap and sinks on a paged cache (one compile)."""
    k, v, table = paged_cache(CACHE_LENS, 16, 2, 128)
    q = torch.randn(sum(QUERY_LENS), 8, 128, device="cuda", dtype=torch.bfloat16)
    sinks = torch.rand(8, device="cuda") * 8 - 1
    run_paged_and_check(monkeypatch, paged_args(
        q, k, v, table, CACHE_LENS, cu_seqlens_q=cu_seqlens(QUERY_LENS, "cuda"),
        max_seqlen_q=max(QUERY_LENS), window_left=200, window_right=50, softcap=5.0,
        sinks=sinks))


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.gpu
@on_hopper
def test_kvcache_chunked_prefill_routes_here(monkeypatch, page_size):
    """flash_attn_with_kvcache's chunked prefill: packed new tokens appended to a paged cache,
    then the new tokens attend to the whole cache through this kernel (causal, GQA); the few
    query rows of a decode step stay with decode.py."""
    import flash_attn_interface as fa
    from flash_attn_3.backends.triton import decode, routes

    cached, new = [0, 500, 3000], [700, 129, 1]
    lens = [c + n for c, n in zip(cached, new)]
    k_cache, v_cache, table = paged_cache(lens, page_size, 2, 128)
    for pool in (k_cache, v_cache):  # the new tokens' slots hold garbage before the append
        for b, (c, n) in enumerate(zip(cached, new)):
            pos = torch.arange(c, c + n, device="cuda")
            pool[table[b].long()[pos // page_size], pos % page_size] = float("nan")
    q = torch.randn(sum(new), 8, 128, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(sum(new), 2, 128, device="cuda", dtype=torch.bfloat16)
                    for _ in "kv")
    cu_new = cu_seqlens(new, "cuda")
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k_new, v=v_new,
                cache_seqlens=torch.tensor(cached, dtype=torch.int32, device="cuda"),
                page_table=table, cu_seqlens_q=cu_new, cu_seqlens_k_new=cu_new, causal=True)
    ref_args = {n: x for n, x in args.items()}
    out_ref, lse_ref, k_want, v_want = rm.attention_kvcache(**ref_args)
    out_lowp, *_ = rm.attention_kvcache(**ref_args, lowp=True)
    picked = []
    real = routes.forward_kernel
    monkeypatch.setattr(routes, "forward_kernel", lambda a: picked.append(real(a)) or picked[-1])
    out, lse, *_ = fa.flash_attn_with_kvcache(**args, max_seqlen_q=max(new),
                                             return_softmax_lse=True)
    assert picked == [fwd_hopper], picked
    assert_matches_reference("out", out, out_ref, out_lowp)
    assert_lse_matches("lse", lse, lse_ref)
    written = ~torch.isnan(v_want)
    assert torch.equal(v_cache[written], v_want[written]) and torch.equal(
        k_cache[written], k_want[written]), "the append"
    # a decode step (one token per row, GQA 4) goes to decode.py
    step = paged_args(torch.randn(3, 1, 8, 128, device="cuda", dtype=torch.bfloat16), k_cache,
                      v_cache, table, lens, causal=True)
    assert decode.supports(step) is None and real(step) is decode


def test_paged_prefill_routes_here(monkeypatch):
    """What `python -m flash_attn_3 info` says of a paged call where the Gluon kernels run:
    chunked prefill with pages of 16 to this kernel, pages of 1 to the portable one with the
    page size as the reason, a decode step to decode.py."""
    from flash_attn_3.backends.triton import gluon_compat, routes

    monkeypatch.setattr(gluon_compat, "refusal", lambda device: None)
    for page_size, module, why in [(16, "fwd_hopper", "TMA copy per page"),
                                   (1, "fwd", "page size 1")]:
        pages = torch.empty(4096 // page_size + 3, page_size, 2, 128, dtype=torch.bfloat16)
        table = torch.zeros(2, 4096 // page_size, dtype=torch.int32)
        q = torch.empty(2, 2048, 8, 128, dtype=torch.bfloat16)
        got = routes.forward_route(paged_args(q, pages, pages, table, [4096, 3000], causal=True))
        assert got[0] == module and why in got[1], got
        step = paged_args(q[:, :1], pages, pages, table, [4096, 3000], causal=True)
        assert routes.forward_route(step)[0] == "decode"

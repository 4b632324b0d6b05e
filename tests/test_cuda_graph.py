"""CUDA-graph capture of a decode loop: 32 steps of paged flash_attn_with_kvcache, each appending
one rotated token and attending over the grown cache, captured once and replayed, must give the
eager loop's outputs and caches bit for bit (no host sync, no data-dependent allocation).
"""

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 32


def _decode_problem(batch, num_heads_q, num_heads_kv, head_dim, page_size, start_len, dtype):
    """Inputs of STEPS decode steps over a paged cache (random page table, uneven lengths)."""
    device = "cuda"
    capacity = start_len + STEPS + 64
    pages_per_row = math.ceil(capacity / page_size)
    num_pages = batch * pages_per_row + 5
    page_table = torch.randperm(num_pages, device=device)[: batch * pages_per_row].view(batch, -1).to(torch.int32)
    k_cache = torch.randn(num_pages, page_size, num_heads_kv, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(num_pages, page_size, num_heads_kv, head_dim, device=device, dtype=dtype)
    cache_seqlens = torch.randint(start_len // 2, start_len + 1, (batch,), dtype=torch.int32, device=device)
    q = torch.randn(STEPS, batch, 1, num_heads_q, head_dim, device=device, dtype=dtype)
    k_new = torch.randn(STEPS, batch, 1, num_heads_kv, head_dim, device=device, dtype=dtype)
    v_new = torch.randn(STEPS, batch, 1, num_heads_kv, head_dim, device=device, dtype=dtype)
    angle = torch.rand(pages_per_row * page_size, head_dim // 2, device=device) * 2 * math.pi
    return dict(k_cache=k_cache, v_cache=v_cache, page_table=page_table, cache_seqlens=cache_seqlens,
                q=q, k_new=k_new, v_new=v_new, cos=torch.cos(angle).to(dtype), sin=torch.sin(angle).to(dtype))


def _run_steps(p, outs, lses):
    """The decode loop; cache_seqlens advances on the device so the graph replays it as is."""
    import flash_attn_interface as fa3

    for step in range(STEPS):
        out, lse, *_ = fa3.flash_attn_with_kvcache(
            p["q"][step], p["k_cache"], p["v_cache"], k=p["k_new"][step], v=p["v_new"][step],
            rotary_cos=p["cos"], rotary_sin=p["sin"], cache_seqlens=p["cache_seqlens"],
            page_table=p["page_table"], causal=True, rotary_interleaved=False, return_softmax_lse=True,
        )
        outs[step].copy_(out)
        lses[step].copy_(lse)
        p["cache_seqlens"].add_(1)


def _clone(p):
    return {name: t.clone() for name, t in p.items()}


@pytest.mark.parametrize("batch,num_heads_q,num_heads_kv,page_size,start_len", [
    (1, 32, 8, 16, 1000),    # one long-ish sequence: split-KV path
    (6, 16, 2, 64, 300),     # a batch: fewer splits
    (3, 8, 8, 1, 50),        # page size 1, MHA
])
def test_graph_replay_matches_eager(monkeypatch, batch, num_heads_q, num_heads_kv, page_size, start_len):
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    head_dim, dtype = 128, torch.bfloat16
    problem = _decode_problem(batch, num_heads_q, num_heads_kv, head_dim, page_size, start_len, dtype)
    initial = _clone(problem)

    eager = _clone(initial)
    eager_out = torch.full((STEPS, batch, 1, num_heads_q, head_dim), float("nan"), device="cuda", dtype=dtype)
    eager_lse = torch.full((STEPS, batch, num_heads_q, 1), float("nan"), device="cuda")
    _run_steps(eager, eager_out, eager_lse)

    # Warm up (compiles, caches) on a side stream outside capture, as torch.cuda.graphs documents.
    warm = _clone(initial)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _run_steps(warm, torch.empty_like(eager_out), torch.empty_like(eager_lse))
    torch.cuda.current_stream().wait_stream(side)

    captured = _clone(initial)
    graph_out = torch.full_like(eager_out, float("nan"))
    graph_lse = torch.full_like(eager_lse, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run_steps(captured, graph_out, graph_lse)
    # Capture records without running: reset the state the replay starts from, then replay twice
    # (the second replay starts from the first one's end state, so restore in between).
    for name in ("k_cache", "v_cache", "cache_seqlens"):
        captured[name].copy_(initial[name])
    graph.replay()
    torch.cuda.synchronize()

    assert not torch.isnan(graph_out).any() and not torch.isnan(graph_lse).any()
    assert torch.equal(graph_out, eager_out)
    assert torch.equal(graph_lse, eager_lse)
    for name in ("k_cache", "v_cache", "cache_seqlens"):
        assert torch.equal(captured[name], eager[name]), name

    for name in ("k_cache", "v_cache", "cache_seqlens"):
        captured[name].copy_(initial[name])
    graph_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager_out)
    # Each step saw a longer cache: outputs must differ from step to step.
    assert not torch.equal(eager_out[0], eager_out[-1])

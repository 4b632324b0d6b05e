"""Tensors on a GPU other than the current one (transformers' device_map="auto" spreads layers
over several): every triton launch must run on the tensors' device. Needs two CUDA devices."""

from __future__ import annotations

import pytest
import torch

from reference_math import attention_dense

import flash_attn_interface as fa

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


def test_forward_backward_and_kvcache_on_the_second_gpu(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q, k, v = (torch.randn(2, 300, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True)
    expected = attention_dense(q.double(), k.double(), v.double(), causal=True)[0]
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    out.backward(torch.randn_like(out))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # a repeated decode step (the second call replays the step plan) with an append
    k_cache, v_cache = (torch.randn(2, 512, 4, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.full((2,), 100, dtype=torch.int32, device=dev)
    for step in range(2):
        q1, k1, v1 = (torch.randn(2, 1, 4, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        got = fa.flash_attn_with_kvcache(q1, k_cache, v_cache, k1, v1, cache_seqlens=lens + step,
                                         causal=True)
        n = 101 + step
        want = attention_dense(q1.double(), k_cache[:, :n].double(), v_cache[:, :n].double(),
                               causal=True)[0]
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    assert torch.cuda.current_device() == 0

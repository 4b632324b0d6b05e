"""torch.compile and torch.library contracts of the flash_attn_3 custom ops.

fullgraph=True fails on any graph break, so these prove the public functions trace end to end
(forward and backward); opcheck verifies schema, fake (meta) implementations and autograd
registration of every op the public functions reach.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reference_math as rm
from conftest import per_backend
from inputs import cu_seqlens, paged_copy, randn, rotary_tables
from tolerance import assert_grad_matches, assert_matches_reference

COMPILE_CASES = [dict(seqlen=64, d=64, heads=(4, 2))]
COMPILE_TINY = [dict(seqlen=16, d=32, heads=(2, 1))]
COMPILE_GPU = [dict(seqlen=1024, d=128, heads=(8, 2))]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles under its own forced backend: no cached graph may carry over.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("backend,case", per_backend(COMPILE_CASES, COMPILE_TINY, COMPILE_GPU))
def test_compiled_func_forward_and_backward(fa, case, device):
    heads, heads_kv = case["heads"]
    q = randn(2, case["seqlen"], heads, case["d"], dtype=torch.bfloat16, device=device)
    k = randn(2, case["seqlen"] + 5, heads_kv, case["d"], dtype=torch.bfloat16, device=device)
    v = randn(2, case["seqlen"] + 5, heads_kv, case["d"], dtype=torch.bfloat16, device=device)

    def attend(q, k, v):
        out, lse = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        return out * 2, lse

    compiled = torch.compile(attend, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = compiled(*leaves)
    ref, _ = rm.attention_dense(q, k, v, causal=True)
    lowp, _ = rm.attention_dense(q, k, v, causal=True, lowp=True)
    assert_matches_reference("out", out / 2, ref, lowp)

    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager_out, eager_lse = attend(*eager_leaves)
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), "compiled forward differs from eager"
    g = torch.randn_like(out)
    compiled_grads = _grads(out, leaves, g)
    eager_grads = _grads(eager_out, eager_leaves, g)
    for name, got, want in zip("qkv", compiled_grads, eager_grads):
        assert torch.equal(got, want), f"compiled d{name} differs from eager"

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lowp_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grads_ref = _grads(rm.attention_dense(*ref_leaves, causal=True)[0] * 2, ref_leaves, g.double())
    grads_lowp = _grads(rm.attention_dense(*lowp_leaves, causal=True, lowp=True)[0] * 2, lowp_leaves, g)
    for name, got, want, base in zip("qkv", compiled_grads, grads_ref, grads_lowp):
        assert_grad_matches(f"d{name}", got, want, base)


@pytest.mark.parametrize("backend,case", per_backend(COMPILE_CASES, COMPILE_TINY, COMPILE_GPU))
def test_compiled_varlen_forward_and_backward(fa, case, device):
    heads, heads_kv = case["heads"]
    n = case["seqlen"]
    lens_q, lens_k = [n, 1, n // 2], [n // 2, n, 3]
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    seqused_k = torch.tensor([n // 2, n - 3, 2], dtype=torch.int32, device=device)
    q = randn(sum(lens_q), heads, case["d"], dtype=torch.bfloat16, device=device)
    k = randn(sum(lens_k), heads_kv, case["d"], dtype=torch.bfloat16, device=device)
    v = randn(sum(lens_k), heads_kv, case["d"], dtype=torch.bfloat16, device=device)

    def attend(q, k, v):
        return fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), seqused_k=seqused_k,
                                         causal=True)

    compiled = torch.compile(attend, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    ref, _ = rm.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=seqused_k, causal=True)
    lowp, _ = rm.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=seqused_k, causal=True, lowp=True)
    assert_matches_reference("out", out, ref, lowp)
    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager_out = attend(*eager_leaves)
    assert torch.equal(out, eager_out), "compiled forward differs from eager"
    g = torch.randn_like(out)
    for name, got, want in zip("qkv", _grads(out, leaves, g), _grads(eager_out, eager_leaves, g)):
        assert torch.equal(got, want), f"compiled d{name} differs from eager"


@pytest.mark.parametrize("backend,case", per_backend(COMPILE_CASES, COMPILE_TINY))
def test_compiled_kvcache_append(fa, case, device):
    """The in-place append must survive compilation: the caches hold the new tokens afterwards."""
    heads, heads_kv = case["heads"]
    d, capacity = case["d"], case["seqlen"]
    q = randn(2, 1, heads, d, dtype=torch.bfloat16, device=device)
    k_new = randn(2, 1, heads_kv, d, dtype=torch.bfloat16, device=device)
    v_new = randn(2, 1, heads_kv, d, dtype=torch.bfloat16, device=device)
    rows = [randn(2, capacity, heads_kv, d, dtype=torch.bfloat16, device=device) for _ in range(2)]
    (k_cache, v_cache), page_table = paged_copy(*rows, page_size=4)
    cos, sin = rotary_tables(page_table.shape[1] * 4, d, torch.bfloat16, device)
    cache_seqlens = torch.tensor([3, capacity - 1], dtype=torch.int32, device=device)
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens, page_table=page_table, causal=True)
    out_ref, _, k_want, v_want = rm.attention_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    out_lowp, _, _, _ = rm.attention_kvcache(q, k_cache, v_cache, k_new, v_new, lowp=True, **kw)

    def decode(q, k_cache, v_cache, k_new, v_new):
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)

    out = torch.compile(decode, fullgraph=True)(q, k_cache, v_cache, k_new, v_new)
    assert_matches_reference("out", out, out_ref, out_lowp)
    assert torch.equal(v_cache, v_want), "compiled append left v_cache wrong"
    torch.testing.assert_close(k_cache, k_want, atol=1e-3, rtol=1e-3)


class _OpRecorder(TorchDispatchMode):
    """Records the first call of every flash_attn_3::* op, with copies of its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "flash_attn_3" and func not in self.calls:
            copy = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls[func] = (tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


def _record_public_calls(fa, device, d):
    q = randn(2, 8, 2, d, dtype=torch.bfloat16, device=device).requires_grad_()
    k = randn(2, 11, 1, d, dtype=torch.bfloat16, device=device).requires_grad_()
    v = randn(2, 11, 1, d, dtype=torch.bfloat16, device=device).requires_grad_()
    recorder = _OpRecorder()
    with recorder:
        out = fa.flash_attn_func(q, k, v, causal=True)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        rows = [randn(2, 16, 1, d, dtype=torch.bfloat16, device=device) for _ in range(2)]
        (k_cache, v_cache), page_table = paged_copy(*rows, page_size=4)
        cos, sin = rotary_tables(16, 16, torch.bfloat16, device)
        cache_seqlens = torch.tensor([2, 9], dtype=torch.int32, device=device)
        fa.flash_attn_with_kvcache(q.detach()[:, :1], k_cache, v_cache, k.detach()[:, :2], v.detach()[:, :2],
                                   rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens,
                                   page_table=page_table, causal=True)
        fa.get_scheduler_metadata(2, 1, 16, 2, 1, d, cache_seqlens, torch.bfloat16, page_size=4)
        fa.flash_attn_combine(torch.randn(3, 2, 4, 2, d, device=device), torch.randn(3, 2, 4, 2, device=device))
    return recorder.calls


@pytest.mark.parametrize("backend,case", per_backend([dict(d=64)], [dict(d=32)]))
def test_opcheck_custom_ops(fa, case, device):
    calls = _record_public_calls(fa, device, case["d"])
    assert calls, "the public functions reached no flash_attn_3::* op"
    for op, (args, kwargs) in calls.items():
        if op.name().endswith(("forward", "_attention_fwd")):
            # q, k, v require grad so that opcheck exercises the autograd registration.
            args = tuple(a.requires_grad_() if i < 3 else a for i, a in enumerate(args))
        torch.library.opcheck(op, args, kwargs)

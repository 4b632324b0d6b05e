"""PyTorch's own FA3 switch on our kernels (sm_90 only: torch's wrapper refuses other devices).

After `torch.nn.attention.activate_flash_attention_impl("FA3")`, every flash call of
`F.scaled_dot_product_attention` and `torch.nn.attention.varlen.varlen_attn` goes to
`torch.ops.flash_attn_3.fwd` / `.bwd`, which this package registers. Each test checks the result
against the float64 reference and that our Triton kernels ran (a counter on the Triton backend's
entry points), and `restore_flash_attention_impl()` puts PyTorch's own kernels back.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import flash_attn_interface  # noqa: F401  (registers torch.ops.flash_attn_3.*, as torch's switch expects)
from flash_attn_3.backends.triton import gluon_compat
import reference_math as rm
from inputs import cu_seqlens, randn
from tolerance import assert_grad_matches, assert_matches_reference

pytestmark = pytest.mark.gpu

attention = pytest.importorskip("torch.nn.attention")
if not hasattr(attention, "activate_flash_attention_impl"):
    pytest.skip("this torch has no flash attention switch (torch >= 2.11)", allow_module_level=True)
if torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("torch's FA3 wrapper accepts sm_90 devices only", allow_module_level=True)


@pytest.fixture
def switched(monkeypatch):
    """The switch on, and a record of which of our kernel modules ran."""
    from flash_attn_3.backends.triton import routes

    ran = []
    real_forward, real_backward = routes.forward, routes.backward

    def forward(a):
        ran.append(("forward", routes.forward_kernel(a).__name__.rsplit(".", 1)[-1]))
        return real_forward(a)

    def backward(dout, q, k, v, out, lse, a, deterministic, grads=None):
        ran.append(("backward", routes.backward_kernel(a, deterministic).__name__.rsplit(".", 1)[-1]))
        return real_backward(dout, q, k, v, out, lse, a, deterministic, grads=grads)

    monkeypatch.setattr(routes, "forward", forward)
    monkeypatch.setattr(routes, "backward", backward)
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    attention.activate_flash_attention_impl("FA3")
    try:
        yield ran
    finally:
        attention.restore_flash_attention_impl()


def _bhsd(batch, heads, seqlen, d, dtype):
    return randn(batch, heads, seqlen, d, dtype=dtype, device="cuda").requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,heads", [(False, (8, 8)), (True, (8, 8)), (True, (8, 2)), (False, (8, 1))])
def test_sdpa_forward_and_backward_run_on_our_kernels(switched, dtype, causal, heads):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, seqlen, d = 2, 1024, 128
    hq, hk = heads
    q, k, v = _bhsd(batch, hq, seqlen, d, dtype), _bhsd(batch, hk, seqlen, d, dtype), _bhsd(batch, hk, seqlen, d, dtype)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hk)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    # the Gluon kernel where it may run here, else the portable one (FLASH_ATTN_3_GLUON=0, the
    # path other GPUs take); never the reference backend
    gluon_off = gluon_compat.refusal(q.device) is not None
    assert ("forward", "fwd" if gluon_off else "fwd_hopper") in switched, switched
    assert any(step == "backward" for step, _ in switched), switched

    bshd = [t.detach().transpose(1, 2) for t in (q, k, v)]
    ref, _ = rm.attention_dense(*bshd, causal=causal)
    ref_lowp, _ = rm.attention_dense(*bshd, causal=causal, lowp=True)
    assert_matches_reference("out", out.transpose(1, 2), ref, ref_lowp)
    leaves = [t.double().requires_grad_() for t in bshd]
    lowp_leaves = [t.clone().requires_grad_() for t in bshd]
    g = dout.transpose(1, 2)
    want = torch.autograd.grad(rm.attention_dense(*leaves, causal=causal)[0], leaves, g.double())
    base = torch.autograd.grad(rm.attention_dense(*lowp_leaves, causal=causal, lowp=True)[0], lowp_leaves, g)
    for name, got, w, b in zip("qkv", grads, want, base):
        assert_grad_matches(f"d{name}", got.transpose(1, 2), w, b)


def test_varlen_attn_runs_on_our_kernels(switched):
    from torch.nn.attention.varlen import varlen_attn

    lengths, hq, hk, d, dtype = [300, 1, 700], 8, 2, 128, torch.bfloat16
    q = randn(sum(lengths), hq, d, dtype=dtype, device="cuda").requires_grad_()
    k, v = (randn(sum(lengths), hk, d, dtype=dtype, device="cuda").requires_grad_() for _ in range(2))
    cu = cu_seqlens(lengths, "cuda")
    causal = (dict(is_causal=True) if "is_causal" in inspect.signature(varlen_attn).parameters
              else dict(window_size=(-1, 0)))
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        causal["enable_gqa"] = True
    out = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert any(step == "forward" for step, _ in switched) and any(step == "backward" for step, _ in switched)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    ref, _ = rm.attention_varlen(qd, kd, vd, cu, cu, causal=True)
    ref_lowp, _ = rm.attention_varlen(qd, kd, vd, cu, cu, causal=True, lowp=True)
    assert_matches_reference("out", out, ref, ref_lowp)
    leaves = [t.double().requires_grad_() for t in (qd, kd, vd)]
    lowp_leaves = [t.clone().requires_grad_() for t in (qd, kd, vd)]
    want = torch.autograd.grad(rm.attention_varlen(*leaves, cu, cu, causal=True)[0], leaves, dout.double())
    base = torch.autograd.grad(rm.attention_varlen(*lowp_leaves, cu, cu, causal=True, lowp=True)[0],
                               lowp_leaves, dout)
    for name, got, w, b in zip("qkv", grads, want, base):
        assert_grad_matches(f"d{name}", got, w, b)


def test_fp8_quantized_sdpa_runs_on_our_kernels(switched):
    quantized = pytest.importorskip("torch.nn.attention.experimental._scaled_dot_product_attention_quantized")
    batch, heads, seqlen, d = 2, 4, 512, 128
    q, k, v = (randn(batch, heads, seqlen, d, dtype=torch.bfloat16, device="cuda").to(torch.float8_e4m3fn)
               for _ in range(3))
    descales = [torch.rand(batch, heads, device="cuda") + 0.5 for _ in range(3)]
    out = quantized._scaled_dot_product_attention_quantized(q, k, v, is_causal=True, q_descale=descales[0],
                                                            k_descale=descales[1], v_descale=descales[2])
    assert any(step == "forward" for step, _ in switched)
    bshd = [t.transpose(1, 2) for t in (q, k, v)]
    kw = dict(causal=True, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2])
    ref, _ = rm.attention_dense(*bshd, **kw)
    ref_lowp, _ = rm.attention_dense(*bshd, lowp=True, **kw)
    assert_matches_reference("out", out.transpose(1, 2), ref, ref_lowp, fp8=True)


def test_restore_puts_torch_kernels_back(switched):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = randn(1, 4, 256, 64, dtype=torch.bfloat16, device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention(q, q, q)
    assert switched
    attention.restore_flash_attention_impl()
    switched.clear()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention(q, q, q)
    assert not switched, "after restore_flash_attention_impl() SDPA still reached our kernels"


def test_compiled_sdpa_runs_on_our_kernels(switched):
    """torch.compile keeps SDPA's aten op in the graph; the switched kernel runs at call time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (randn(2, 8, 512, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))

    @torch.compile(fullgraph=True)
    def layer(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    out = layer(q, k, v)
    assert any(step == "forward" for step, _ in switched), switched
    bshd = [t.transpose(1, 2) for t in (q, k, v)]
    ref, _ = rm.attention_dense(*bshd, causal=True)
    ref_lowp, _ = rm.attention_dense(*bshd, causal=True, lowp=True)
    assert_matches_reference("out", (out / 2).transpose(1, 2), ref, ref_lowp)

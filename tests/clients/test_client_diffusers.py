"""diffusers' attention dispatcher with its FA3 backends against its native (SDPA) backend.

diffusers detects FA3 once, at import of ``diffusers.models.attention_dispatch``:
``_CAN_USE_FLASH_ATTN_3`` is true when the module ``flash_attn_3`` exists and the distribution of
that name has a version; it then imports ``flash_attn_func`` / ``flash_attn_varlen_func`` from
``flash_attn_interface``. Backend "_flash_varlen_3" calls the varlen function directly (any
device); "_flash_3" wraps ``flash_attn_func`` in a custom op registered for CUDA only, so it is
tested on the GPU.

Precision as in the transformers tests: the model runs in fp32 and only attention in bf16 (FA3 gets
bf16 q, k, v; the native twin runs SDPA on the same bf16 q, k, v), against native in float64.
"""

from __future__ import annotations

import collections
import copy
import functools

import pytest
import torch

pytest.importorskip("diffusers")

import reference_math as ref  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models import attention_dispatch  # noqa: E402
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402
from tolerance import assert_grad_matches, assert_matches_reference  # noqa: E402

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _in_bf16(real):
    """real(q, k, v, ...) on bf16 copies of fp32 q, k, v (positional or keyword); output back in fp32."""

    @functools.wraps(real)
    def call(*args, **kwargs):
        names = ("q", "k", "v") if "q" in kwargs else ("query", "key", "value")
        first = args[0] if args else kwargs[names[0]]
        if first.dtype != torch.float32:
            return real(*args, **kwargs)
        args = [a.to(torch.bfloat16) if i < 3 else a for i, a in enumerate(args)]
        kwargs = {k: v.to(torch.bfloat16) if k in names else v for k, v in kwargs.items()}
        result = real(*args, **kwargs)
        if isinstance(result, tuple):
            return (result[0].float(),) + tuple(result[1:])
        return result.float()

    return call


@pytest.fixture
def fa3_calls(monkeypatch):
    """Counts the dispatcher's calls into our functions, and runs attention in bf16 in fp32 models."""
    import flash_attn_interface

    assert attention_dispatch.flash_attn_3_func is flash_attn_interface.flash_attn_func
    assert attention_dispatch.flash_attn_3_varlen_func is flash_attn_interface.flash_attn_varlen_func
    calls = collections.Counter()
    for name in ("flash_attn_3_func", "flash_attn_3_varlen_func"):
        real = _in_bf16(getattr(attention_dispatch, name))

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(attention_dispatch, name, counted)
    native = AttentionBackendName.NATIVE
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, native,
                        _in_bf16(_AttentionBackendRegistry._backends[native]))
    return calls


def test_diffusers_detects_the_installed_package():
    from diffusers.utils import is_flash_attn_3_available

    assert is_flash_attn_3_available()
    assert attention_dispatch._CAN_USE_FLASH_ATTN_3
    import flash_attn_interface

    assert attention_dispatch.flash_attn_3_func is flash_attn_interface.flash_attn_func


def tiny_wan(device):
    head_dim = 64 if device == "cuda" else 16
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=4 * head_dim, num_layers=2,
        cross_attn_norm=True, rope_max_seq_len=64,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [
    "_flash_varlen_3",
    pytest.param("_flash_3", marks=pytest.mark.gpu),
])
def test_wan_transformer_matches_native(fa3_calls, device, backend):
    if backend == "_flash_3" and device != "cuda":
        pytest.skip("diffusers registers its _flash_3 custom op for CUDA only")
    base = tiny_wan(device)
    ref_model = copy.deepcopy(base).to(device, torch.float64)
    lowp_model = copy.deepcopy(base).to(device)
    fa3_model = base.to(device)
    fa3_model.set_attention_backend(backend)
    # set_attention_backend also sets the process-wide default: pin the twins to native.
    ref_model.set_attention_backend("native")
    lowp_model.set_attention_backend("native")
    side = 16 if device == "cuda" else 8
    latents = torch.randn(2, 4, 2, side, side, device=device)
    timestep = torch.randint(0, 1000, (2,), device=device)
    text = torch.randn(2, 7, 32, device=device)
    with torch.no_grad():
        got, want, want_lowp = (
            m(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=text.to(dtype)).sample
            for m, dtype in ((fa3_model, torch.float32), (ref_model, torch.float64), (lowp_model, torch.float32))
        )
    entry = "flash_attn_3_func" if backend == "_flash_3" else "flash_attn_3_varlen_func"
    # Per layer: self-attention over the video tokens, cross-attention to the 7 text tokens.
    assert fa3_calls == {entry: 2 * 2}
    assert_matches_reference(f"wan {backend}", got, want, want_lowp)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_backend_with_key_padding_mask_and_gradients(fa3_calls, device):
    """A (batch, seqlen_k) bool mask: diffusers keeps each row's first valid keys (right padding)
    and packs them for the varlen entry; gradients flow back through it."""
    batch, seqlen_q, seqlen_k, heads, head_dim = (2, 96, 80, 4, 64) if device == "cuda" else (2, 6, 9, 2, 16)
    q = torch.randn(batch, seqlen_q, heads, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, seqlen_k, heads, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn(batch, seqlen_k, heads, head_dim, device=device, dtype=torch.bfloat16)
    valid = [seqlen_k, seqlen_k // 2 + 1]
    mask = torch.arange(seqlen_k, device=device)[None, :] < torch.tensor(valid, device=device)[:, None]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_dispatch.dispatch_attention_fn(*leaves, attn_mask=mask, backend="_flash_varlen_3")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    assert fa3_calls == {"flash_attn_3_varlen_func": 1}

    def reference(lowp):
        ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref_out, _ = ref.attention_dense(*ref_leaves, seqlens_k=valid, lowp=lowp)
        return (ref_out,) + torch.autograd.grad(ref_out, ref_leaves, dout.to(ref_out.dtype))

    want, want_lowp = reference(False), reference(True)
    assert_matches_reference("varlen out", out, want[0], want_lowp[0])
    for name, got, w, wl in zip(("dq", "dk", "dv"), grads, want[1:], want_lowp[1:]):
        assert_grad_matches(name, got, w, wl)

"""transformers with attn_implementation="flash_attention_3" against its own SDPA path.

transformers turns FA3 on only with CUDA: ``is_flash_attn_3_available`` wants the module
``flash_attn_interface``, the distribution ``flash-attn-3`` providing it (importlib metadata) and
``torch.cuda.is_available()``. Without CUDA, the test models are built with SDPA and switched to
"flash_attention_3" through the config, which skips that device gate only: every call still goes
through transformers' FA3 code (unpadding, varlen packing, window and kwargs handling) into our
``flash_attn_interface``. The ``gpu`` variants use the public switch on CUDA, unpatched.

Judged with the spec's rule (section 8) on the model outputs. A whole bf16 model rounds in every
layer, which would drown the attention's error in noise the rule was not made for; so the models
run in fp32 and only attention runs in bf16: FA3 gets q, k, v cast to bf16 at its entry (and hands
back fp32), the low-precision twin is SDPA on the same bf16 q, k, v, and the reference is SDPA in
float64. Everything else in the model is then too exact to matter.
"""

from __future__ import annotations

import collections
import copy
import functools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

transformers = pytest.importorskip("transformers")

from tolerance import assert_matches_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
MODELS = ["llama", "mistral_sliding", "qwen2_mixed_window"]
PAD = 0


def tiny_config(kind: str, device: str):
    # On CUDA the head dim is one the Triton kernels specialize (64); on CPU it stays small.
    hidden = 256 if device == "cuda" else 64
    common = dict(
        vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, pad_token_id=PAD, eos_token_id=None, tie_word_embeddings=False,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "mistral_sliding":
        return transformers.MistralConfig(sliding_window=5, **common)
    if kind == "qwen2_mixed_window":
        return transformers.Qwen2Config(
            use_sliding_window=True, sliding_window=5,
            layer_types=["sliding_attention", "full_attention"], **common,
        )
    raise ValueError(kind)


class Trio:
    """One set of random weights as three models: FA3, SDPA float64, SDPA with bf16 attention."""

    def __init__(self, kind: str, device: str):
        base = transformers.AutoModelForCausalLM.from_config(
            tiny_config(kind, device), attn_implementation="sdpa", dtype=torch.float32,
        )
        self.ref = copy.deepcopy(base).to(device, torch.float64)
        self.lowp = copy.deepcopy(base).to(device)
        self.fa3 = base.to(device)
        if device == "cuda":
            self.fa3.set_attn_implementation("flash_attention_3")
        else:
            self.fa3.config._attn_implementation = "flash_attention_3"
        assert self.fa3.config._attn_implementation == "flash_attention_3"

    def models(self):
        return self.fa3, self.ref, self.lowp


def _in_bf16(real):
    """real(q, k, v, ...) run on bf16 copies of fp32 q, k, v; its output (or first output) back in fp32."""

    @functools.wraps(real)
    def call(*args, **kwargs):
        if args[0].dtype != torch.float32:
            return real(*args, **kwargs)
        result = real(*[a.to(torch.bfloat16) if i < 3 else a for i, a in enumerate(args)], **kwargs)
        if isinstance(result, tuple):
            return (result[0].float(),) + tuple(result[1:])
        return result.float()

    return call


@pytest.fixture
def fa3_calls(monkeypatch):
    """Counts calls into flash_attn_interface made by transformers, and runs attention in bf16 in
    the fp32 models (see the module docstring). The wrappers keep the signatures inspectable:
    transformers reads them to decide which keywords to send."""
    import flash_attn_interface
    import transformers.modeling_flash_attention_utils as hf_fa
    from transformers.modeling_utils import AttentionInterface

    calls = collections.Counter()
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        real = _in_bf16(getattr(flash_attn_interface, name))

        @functools.wraps(real)
        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(flash_attn_interface, name, counted)
    # transformers caches the functions it imported; make it import the wrapped ones.
    monkeypatch.setattr(hf_fa, "_loaded_implementation", None)
    sdpa = AttentionInterface._global_mapping["sdpa"]

    @functools.wraps(sdpa)
    def sdpa_in_bf16(module, query, key, value, *args, **kwargs):
        if query.dtype != torch.float32:
            return sdpa(module, query, key, value, *args, **kwargs)
        out, weights = sdpa(module, *(t.to(torch.bfloat16) for t in (query, key, value)), *args, **kwargs)
        return out.float(), weights

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_in_bf16)
    return calls


def left_padded_batch(lengths, seqlen, device):
    ids = torch.randint(1, 97, (len(lengths), seqlen), device=device)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, seqlen - length:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def lengths_for(device):
    return ([37, 64, 11], 64) if device == "cuda" else ([9, 14, 4], 14)


def test_transformers_detects_the_installed_package():
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX
    from transformers.utils import import_utils

    assert FLASH_ATTENTION_COMPATIBILITY_MATRIX[3]["pkg_availability_check"]()
    assert import_utils.is_flash_attn_3_available() == CUDA
    # We ship no top-level flash_attn: transformers would read it as FA2 or FA4.
    assert not import_utils.is_flash_attn_2_available()
    assert not import_utils.is_flash_attn_4_available()


@pytest.mark.skipif(CUDA, reason="checks the refusal transformers gives without CUDA")
def test_without_cuda_transformers_refuses_the_public_switch():
    with pytest.raises(ImportError, match="not available on CPU"):
        transformers.AutoModelForCausalLM.from_config(
            tiny_config("llama", "cpu"), attn_implementation="flash_attention_3", dtype=torch.bfloat16,
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODELS)
def test_logits_with_left_padding(fa3_calls, device, kind):
    fa3, ref, lowp = Trio(kind, device).models()
    lengths, seqlen = lengths_for(device)
    ids, mask = left_padded_batch(lengths, seqlen, device)
    with torch.no_grad():
        got, want, want_lowp = (m(input_ids=ids, attention_mask=mask).logits for m in (fa3, ref, lowp))
    assert fa3_calls["flash_attn_varlen_func"] == fa3.config.num_hidden_layers
    assert_matches_reference(f"{kind} logits", got, want, want_lowp, rows=mask.bool())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODELS)
def test_logits_without_padding_use_the_dense_entry(fa3_calls, device, kind):
    fa3, ref, lowp = Trio(kind, device).models()
    _, seqlen = lengths_for(device)
    ids = torch.randint(1, 97, (2, seqlen), device=device)
    with torch.no_grad():
        got, want, want_lowp = (m(input_ids=ids).logits for m in (fa3, ref, lowp))
    assert fa3_calls["flash_attn_func"] == fa3.config.num_hidden_layers
    assert_matches_reference(f"{kind} logits", got, want, want_lowp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODELS)
def test_greedy_generate_with_left_padding(fa3_calls, device, kind):
    """The decode steps (one query against the cache, through the varlen entry) must give the
    logits a plain full-sequence SDPA forward gives for the tokens FA3's generate chose."""
    fa3, ref, lowp = Trio(kind, device).models()
    lengths, seqlen = lengths_for(device)
    ids, mask = left_padded_batch(lengths, seqlen, device)
    new = 6
    with torch.no_grad():
        result = fa3.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=PAD,
        )
        sequences = result.sequences
        assert sequences.shape == (len(lengths), seqlen + new)
        got = torch.stack(result.logits, dim=1)
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :new])], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        want, want_lowp = (
            m(input_ids=sequences, attention_mask=full_mask, position_ids=positions).logits[:, seqlen - 1:-1]
            for m in (ref, lowp)
        )
    # The padded prefill goes varlen; a decode step goes dense once the (sliding) cache holds no
    # padding, which a window of 5 reaches within these prompts.
    layers = fa3.config.num_hidden_layers
    assert fa3_calls["flash_attn_varlen_func"] >= layers
    assert fa3_calls["flash_attn_varlen_func"] + fa3_calls["flash_attn_func"] == new * layers
    assert torch.equal(sequences[:, seqlen:], got.argmax(-1))
    assert_matches_reference(f"{kind} generate logits", got, want, want_lowp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODELS)
def test_padding_free_packed_sequences(fa3_calls, device, kind):
    """Sequences packed into one row, told apart only by position_ids restarting at 0: the varlen
    entry must keep them from attending to each other."""
    fa3, ref, lowp = Trio(kind, device).models()
    lengths = [37, 20, 64] if device == "cuda" else [6, 9, 4]
    pieces = [torch.randint(1, 97, (n,), device=device) for n in lengths]
    packed = torch.cat(pieces)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    with torch.no_grad():
        got = fa3(input_ids=packed, position_ids=positions).logits[0]
        want, want_lowp = (torch.cat([m(input_ids=p[None]).logits[0] for p in pieces]) for m in (ref, lowp))
    assert fa3_calls["flash_attn_varlen_func"] == fa3.config.num_hidden_layers
    assert_matches_reference(f"{kind} packed logits", got, want, want_lowp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MODELS)
def test_training_step_gradients(fa3_calls, device, kind):
    trio = Trio(kind, device)
    lengths, seqlen = lengths_for(device)
    ids, mask = left_padded_batch(lengths, seqlen, device)
    labels = ids.masked_fill(mask == 0, -100)
    for model in trio.models():
        model.train()
        # The SDPA references run on the math backend: on CUDA the fused backends return NaN
        # gradients for the fully padded rows of a left-padded batch.
        with sdpa_kernel([SDPBackend.MATH]):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
    assert fa3_calls["flash_attn_varlen_func"] == trio.fa3.config.num_hidden_layers
    # One vector of every parameter's gradient: a tensor of a few dozen elements (a norm weight)
    # has too few samples for a max-error ratio to be stable.
    got, want, want_lowp = (
        torch.cat([p.grad.flatten().double() for p in model.parameters()]) for model in trio.models()
    )
    assert_matches_reference(f"{kind} parameter gradients", got, want, want_lowp)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_sinks_as_gpt_oss_sends_them(fa3_calls, device):
    """GPT-OSS-style layers pass their learnable sinks as s_aux through transformers' FA3 entry
    (transformers casts them to the query dtype on the way)."""
    import reference_math as ref
    from transformers.integrations.flash_attention import flash_attention_forward

    layer = torch.nn.Module()
    layer.config = transformers.LlamaConfig()
    layer.config._attn_implementation = "flash_attention_3"
    layer.is_causal, layer.layer_idx = True, 0
    heads, heads_kv, seqlen, head_dim = (8, 2, 96, 64) if device == "cuda" else (4, 2, 10, 16)
    # transformers' layout: (batch, heads, seqlen, head_dim)
    q = torch.randn(2, heads, seqlen, head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(2, heads_kv, seqlen, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    sinks = torch.randn(heads, device=device)
    out, _ = flash_attention_forward(layer, q, k, v, None, scaling=head_dim ** -0.5, sliding_window=4,
                                     s_aux=sinks)
    assert fa3_calls["flash_attn_func"] == 1
    args = [t.transpose(1, 2) for t in (q, k, v)]
    kw = dict(causal=True, window_size=(3, 3), sinks=sinks.to(torch.bfloat16).float())
    assert_matches_reference("sinks", out, ref.attention_dense(*args, **kw)[0],
                             ref.attention_dense(*args, lowp=True, **kw)[0])

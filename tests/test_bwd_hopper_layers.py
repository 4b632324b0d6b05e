"""The Gluon Hopper backward's model-layer variants (bwd_hopper.py): sliding windows, softcap,
sinks (no gradient of their own), packed / seqused sequences and head dims padded to the next
tile width, against float64 autograd of tests/reference_math.py, judged by the spec's gradient
rule (sec 8, tests/tolerance.py).

GPU only (the Gluon kernels do not run under the interpreter; their sm_90 compiles are checked
without a GPU in test_bwd_hopper.py). Inputs are fresh random draws every run; the out given to
the backward has NaN in rows past seqused (never to be read), and every buffer the backward
allocates starts as NaN, so an element it forgets to write fails. Ragged lengths put sequence
ends on every side of a block (1, 127, 129, 4097), windows their edges at 0, 1 and past a block.
The first test runs every variant once in a watched subprocess, so a pipeline deadlock fails
this module (naming the variant) instead of hanging the run.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from hopper import on_hopper
from test_triton_bwd import run_case as _bwd_case
from watched import run_watched

from flash_attn_3.backends.triton import bwd_hopper, routes

pytestmark = [pytest.mark.gpu, on_hopper]


def run_case(monkeypatch, *, seqlens_q, seqlens_k, heads_q=4, heads_kv=2, head_dim=128,
             head_dim_v=None, varlen=False, seqused_q=None, seqused_k=None, window=(-1, -1),
             softcap=0.0, sinks=False, deterministic=False, dtype=torch.bfloat16):
    """test_triton_bwd.run_case's inputs and float64 autograd reference through
    bwd_hopper.backward, which supports() and the router must take; returns the gradients and
    the call."""
    if varlen or seqused_q is not None:
        # refused by default (bwd_hopper.query_tail_refusal); the inputs here are finite
        monkeypatch.setenv(bwd_hopper.VARLEN_ENV, "1")
    monkeypatch.delenv(bwd_hopper.DV_ENV, raising=False)  # a narrower V: taken by default

    def routed_here(a):
        assert bwd_hopper.supports(a, deterministic)
        assert routes.backward_kernel(a, deterministic) is bwd_hopper

    got, call = _bwd_case(monkeypatch, seqlens_q=seqlens_q, seqlens_k=seqlens_k, heads_q=heads_q,
                          heads_kv=heads_kv, head_dim=head_dim, head_dim_v=head_dim_v,
                          dtype=dtype, varlen=varlen,
                          seqused_q=seqused_q, seqused_k=seqused_k, window=window,
                          softcap=softcap, sinks=sinks, deterministic=deterministic,
                          device="cuda", kernel=bwd_hopper, check_args=routed_here)
    return got, (*call, deterministic)


# The pipelines the tests below run, each once: (head dim, layer arguments, deterministic).
_SMOKE_CASES = [
    (d, dict(window=w, softcap=c, varlen=vl, sinks=sk), False)
    for d in (64, 96, 128, 192, 256)
    for w, c, vl, sk in [((128, 0), 0.0, False, False), ((40, 20), 30.0, False, True),
                         ((-1, 0), 0.0, True, False), ((100, 0), 0.0, True, False)]
] + [(d, dict(window=(64, 0), softcap=0.0, varlen=True, sinks=False), True)
     for d in (64, 128, 256)] + [
    (192, dict(window=(-1, 0), softcap=0.0, varlen=False, sinks=False, dv=128), False)] + [
    (d, dict(window=(100, 0), softcap=0.0, varlen=True, sinks=False, slices=True), False)
    for d in (96, 192)]
_SMOKE = textwrap.dedent("""
    import os
    import torch
    from test_bwd_hopper_layers import _SMOKE_CASES
    from flash_attn_3.backends.params import AttnArgs
    from flash_attn_3.backends.triton import bwd_hopper
    cu = torch.tensor([0, 1, 301, 430], device="cuda", dtype=torch.int32)
    for head_dim, case, deterministic in _SMOKE_CASES:
        rows = (430, ) if case["varlen"] else (3, 300)
        dv = case.get("dv", head_dim)
        os.environ["FLASH_ATTN_3_GLUON_QK_SLICES"] = "1" if case.get("slices") else "0"
        q, do = (torch.randn(*rows, 4, d, device="cuda", dtype=torch.bfloat16)
                 for d in (head_dim, dv))
        k, v = (torch.randn(*rows, 2, d, device="cuda", dtype=torch.bfloat16)
                for d in (head_dim, dv))
        lse = torch.randn(*((4, 430) if case["varlen"] else (3, 4, 300)), device="cuda") + 10
        varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=300, max_seqlen_k=300)
        a = AttnArgs.plain(q, k, v, window_left=case["window"][0],
                           window_right=case["window"][1], softcap=case["softcap"],
                           sinks=torch.zeros(4, device="cuda") if case["sinks"] else None,
                           **(varlen if case["varlen"] else {}))
        bwd_hopper.backward(do, q, k, v, do, lse, a, deterministic)
        torch.cuda.synchronize()
        print(head_dim, case, deterministic, flush=True)
""")


@pytest.fixture(scope="module", autouse=True)
def kernel_terminates(tmp_path_factory):
    run_watched(_SMOKE, "bwd_hopper layer variants", 120, tmp_path_factory)


DENSE = dict(seqlens_q=[1000] * 2, seqlens_k=[1023] * 2)


@pytest.mark.parametrize("window", [(0, 0), (1, 0), (128, 1), (-1, 0), (256, -1), (-1, 64),
                                    (37, 300), (0, -1), (1000, 0)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_window(monkeypatch, head_dim, window):
    run_case(monkeypatch, **DENSE, head_dim=head_dim, window=window)


@pytest.mark.parametrize("shape", [(1, 1023, 1000, 6, 1), (1, 1, 700, 8, 2), (3, 128, 384, 2, 2),
                                   (2, 77, 5, 4, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("window", [(64, 0), (3, 130)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_window_shapes(monkeypatch, head_dim, window, shape):
    """Sq > Sk (rows above the diagonal see nothing), one query row, whole blocks, fewer keys than
    a block; MQA and GQA groups."""
    batch, seqlen_q, seqlen_k, heads_q, heads_kv = shape
    run_case(monkeypatch, seqlens_q=[seqlen_q] * batch, seqlens_k=[seqlen_k] * batch,
             heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, window=window)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 0)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_softcap(monkeypatch, head_dim, window):
    run_case(monkeypatch, **DENSE, head_dim=head_dim, window=window, softcap=30.0)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_softcap_saturated(monkeypatch, head_dim):
    """A small cap: most scores sit where tanh saturates and 1 - tanh^2 is small."""
    run_case(monkeypatch, **DENSE, head_dim=head_dim, window=(-1, 0), softcap=2.0)


@pytest.mark.parametrize("window", [(-1, -1), (128, 0)], ids=str)
def test_sinks(monkeypatch, window):
    """The sink logit is in the LSE: P and dS need nothing more (GPT-OSS: window 128, D = 64)."""
    run_case(monkeypatch, **DENSE, head_dim=64, heads_q=8, heads_kv=1, window=window,
             sinks=True)


VARLEN = [
    dict(seqlens_q=[1, 127, 129, 4097], seqlens_k=[1, 127, 129, 4097]),
    dict(seqlens_q=[129, 1, 300, 64], seqlens_k=[600, 5, 129, 64]),
    dict(seqlens_q=[127, 129], seqlens_k=[129, 127], seqused_q=[100, 129], seqused_k=[129, 1]),
    dict(seqlens_q=[300, 200], seqlens_k=[300, 400], seqused_q=[0, 17], seqused_k=[300, 0]),
]


@pytest.mark.parametrize("lengths", VARLEN, ids=lambda c: "-".join(
    f"{k[0] if 'seqlen' in k else 'u' + k[-1]}{'.'.join(map(str, v))}" for k, v in c.items()))
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((-1, 0), 0.0), ((128, 0), 0.0),
                                            ((40, 20), 30.0)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_varlen(monkeypatch, head_dim, window, softcap, lengths):
    run_case(monkeypatch, **lengths, varlen=True, head_dim=head_dim, window=window,
             softcap=softcap)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 3)], ids=str)
def test_seqused_dense(monkeypatch, window):
    """seqused on dense (B, S, H, D) tensors: keys past it masked, their dK / dV zero."""
    run_case(monkeypatch, seqlens_q=[700] * 3, seqlens_k=[900] * 3, seqused_q=[700, 1, 129],
             seqused_k=[900, 129, 1], window=window)


@pytest.mark.parametrize("head_dim", [32, 80, 96, 192])
@pytest.mark.parametrize("variant", ["causal", "window-varlen"])
def test_padded_head_dims(monkeypatch, head_dim, variant):
    """Head dims between the tile widths: TMA reads zeros past D; dK / dV / dQ columns past D
    are not written (the buffers are NaN-poisoned, and sized D)."""
    if variant == "causal":
        run_case(monkeypatch, **DENSE, head_dim=head_dim, window=(-1, 0))
    else:
        run_case(monkeypatch, **VARLEN[1], varlen=True, head_dim=head_dim, window=(100, 0),
                 softcap=20.0)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("case", ["window-softcap", "varlen-seqused"])
def test_deterministic(monkeypatch, head_dim, case):
    """dK/dV here, dQ by bwd.py's atomic-free kernel (which takes the same masks): bitwise equal
    across runs."""
    if case == "window-softcap":
        got, call = run_case(monkeypatch, **DENSE, head_dim=head_dim, window=(200, 0),
                             softcap=30.0, deterministic=True)
    else:
        got, call = run_case(monkeypatch, **VARLEN[2], varlen=True, head_dim=head_dim,
                             window=(64, 0), deterministic=True)
    again = bwd_hopper.backward(*call)
    for name, x, y in zip(("dq", "dk", "dv"), got, again):
        assert torch.equal(x, y), name


# Padded head dims whose S^T and dP^T skip the padding (by default; FLASH_ATTN_3_GLUON_QK_SLICES=0
# reads it):
# where the kernel takes the slices (the split kernel; the 128-key one without dQ in it)
QK_SLICED = [
    dict(head_dim=96, window=(-1, 0), deterministic=True),
    dict(head_dim=96, window=(100, 0), varlen=True, **VARLEN[1]),
    dict(head_dim=80, window=(-1, -1), varlen=True, **VARLEN[2]),
    dict(head_dim=192, window=(-1, 0)),
    dict(head_dim=192, head_dim_v=128, window=(-1, 0)),
]


@pytest.mark.parametrize("case", QK_SLICED, ids=lambda c: "-".join(
    f"{k}{v}" for k, v in c.items() if not k.startswith("seq")))
def test_qk_slices(monkeypatch, case):
    monkeypatch.delenv("FLASH_ATTN_3_GLUON_QK_SLICES", raising=False)
    case = dict(case)
    if "seqlens_q" not in case:
        case.update(DENSE)
    run_case(monkeypatch, **case)


# V narrower than Q and K: DeepSeek V2 / V3's 192 / 128, and others under Q / K's 256-wide tiles
NARROW_V = [(192, 128), (256, 128), (192, 64)]


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=str)
@pytest.mark.parametrize("head_dim,head_dim_v", NARROW_V, ids=str)
def test_narrow_v(monkeypatch, head_dim, head_dim_v, window):
    """dV at V's width from the split kernel's S side, dK at K's: every column of each checked
    (the buffers are NaN-poisoned and sized to their own head dims)."""
    run_case(monkeypatch, **DENSE, head_dim=head_dim, head_dim_v=head_dim_v, window=window)


@pytest.mark.parametrize("case", ["varlen-seqused-window-softcap", "varlen-deterministic",
                                  "gqa-shapes"])
def test_narrow_v_layers(monkeypatch, case):
    if case == "varlen-seqused-window-softcap":
        run_case(monkeypatch, **VARLEN[2], varlen=True, head_dim=192, head_dim_v=128,
                 window=(64, 0), softcap=20.0)
    elif case == "varlen-deterministic":
        got, call = run_case(monkeypatch, **VARLEN[0], varlen=True, head_dim=192,
                             head_dim_v=128, window=(-1, 0), deterministic=True)
        again = bwd_hopper.backward(*call)
        for name, x, y in zip(("dq", "dk", "dv"), got, again):
            assert torch.equal(x, y), name
    else:
        run_case(monkeypatch, seqlens_q=[1] * 3, seqlens_k=[700] * 3, heads_q=8, heads_kv=1,
                 head_dim=192, head_dim_v=128, window=(-1, 0))


def test_fp16(monkeypatch):
    run_case(monkeypatch, **VARLEN[1], varlen=True, head_dim=128, window=(128, 0),
             softcap=30.0, dtype=torch.float16)


def test_public_api_routes_layers_here(monkeypatch):
    """flash_attn_func with a window or softcap: the dispatcher's backward route is this kernel,
    and autograd's gradients come from it; flash_attn_varlen_func's stays on bwd.py."""
    import flash_attn_interface as fa

    q, k, v = (torch.randn(2, 600, h, 128, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for h in (4, 2, 2))
    calls = []
    real = bwd_hopper.backward

    def spy(*args, **kwargs):
        calls.append(args[6])
        return real(*args, **kwargs)

    bwd_hopper.backward = spy
    try:
        for kw in (dict(window_size=(128, 0)), dict(softcap=30.0, causal=True),
                   dict(window_size=(64, 64), softcap=10.0)):
            out = fa.flash_attn_func(q, k, v, **kw)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
        cu = torch.tensor([0, 1, 600], device="cuda", dtype=torch.int32)
        qp, kp, vp = (x.detach()[0].clone().requires_grad_() for x in (q, k, v))
        out = fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, 599, 599, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    finally:
        bwd_hopper.backward = real
    # the packed call stays on bwd.py by default (bwd_hopper.query_tail_refusal)
    assert len(calls) == 3, calls
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, qp, kp, vp))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", range(4))
def test_poison_stays_in_its_sequence_under_the_query_tail_clear(monkeypatch, case, causal):
    """The packed / seqused_q variant (opt-in) with NaN / Inf in a victim sequence, in rows past
    seqused and past cu_seqlens[-1]: a query block crossing a sequence's end reads those rows,
    and only _clear_query_tail keeps them (0 * NaN in the dK / dV wgmmas) out of the clean
    sequences' gradients. test_reliability_hostile's check, with the Gluon backward taking it."""
    import flash_attn_interface as fa
    from test_reliability_hostile import VARLEN_POISON_GPU, test_poison_stays_in_its_varlen_sequence

    monkeypatch.setenv(bwd_hopper.VARLEN_ENV, "1")
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")
    calls = []
    real = bwd_hopper.backward

    def spy(*args, **kwargs):
        calls.append(args[6])
        return real(*args, **kwargs)

    monkeypatch.setattr(bwd_hopper, "backward", spy)
    test_poison_stays_in_its_varlen_sequence(fa, VARLEN_POISON_GPU[case], causal, "cuda")
    assert calls and all(a.cu_seqlens_q is not None for a in calls), "not the Gluon backward"

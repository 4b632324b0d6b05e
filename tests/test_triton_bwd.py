"""Triton backward (flash_attn_3/backends/triton/bwd.py), called directly, against float64 autograd
of tests/reference_math.py, judged by the spec sec 8 rule in tests/tolerance.py.

Without a GPU the kernels run under TRITON_INTERPRET=1 on tiny shapes (tests/conftest.py sets it
and makes the interpreter round like the GPU); tests marked gpu use bigger shapes. Inputs are
fresh random draws every run. The backward gets the out/LSE a correct forward returns, with NaN
in rows past seqused (never to be read), and every buffer it allocates starts as NaN, so an
element it forgets to write fails the test.
"""

import math

import pytest
import torch

import reference_math as rm
from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import bwd
from inputs import poison_new_buffers
from tolerance import assert_grad_matches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _make_args(q, k, v, **overrides):
    fields = dict(
        q=q, k=k, v=v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
        seqused_k=None, max_seqlen_q=0, max_seqlen_k=0, page_table=None, kv_batch_idx=None,
        leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, sinks=None,
        softmax_scale=1.0 / math.sqrt(q.shape[-1]), window_left=-1, window_right=-1,
        attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, cp_world_size=1, cp_rank=0,
        cp_tot_seqused_k=None, scheduler_metadata=None,
    )
    fields.update(overrides)
    return AttnArgs(**fields)


def run_case(monkeypatch, *, seqlens_q, seqlens_k, heads_q=2, heads_kv=1, head_dim=32,
             head_dim_v=None, dtype=torch.bfloat16, varlen=False, seqused_q=None, seqused_k=None,
             window=(-1, -1), softcap=0.0, sinks=False, deterministic=False, device=DEVICE,
             kernel=bwd, check_args=None):
    """Build random inputs, run kernel.backward (bwd.py's, or bwd_hopper's from
    test_bwd_hopper_layers.py) and check dq, dk, dv against float64 autograd; check_args(args)
    runs before the call (the routing assertions of the Gluon tests)."""
    head_dim_v = head_dim_v or head_dim
    batch = len(seqlens_q)
    if not varlen:
        assert len(set(seqlens_q)) == 1 and len(set(seqlens_k)) == 1
    used_q = list(seqused_q) if seqused_q is not None else list(seqlens_q)
    used_k = list(seqused_k) if seqused_k is not None else list(seqlens_k)

    def rand(rows, heads, dim):
        shape = (sum(rows), heads, dim) if varlen else (batch, rows[0], heads, dim)
        return torch.randn(shape, device=device).to(dtype)

    q, dout = rand(seqlens_q, heads_q, head_dim), rand(seqlens_q, heads_q, head_dim_v)
    k, v = rand(seqlens_k, heads_kv, head_dim), rand(seqlens_k, heads_kv, head_dim_v)
    sink_logits = torch.randn(heads_q, device=device) if sinks else None
    scale = 1.0 / math.sqrt(head_dim)

    def rows(lengths, b, used):
        if varlen:
            start = sum(lengths[:b])
            return (slice(start, start + used),)
        return (b, slice(0, used))

    out = torch.full(dout.shape, float("nan"), device=device, dtype=dtype)
    lse_shape = (heads_q, sum(seqlens_q)) if varlen else (batch, heads_q, seqlens_q[0])
    lse = torch.full(lse_shape, float("nan"), device=device)
    grads = {exact: [torch.zeros(t.shape, dtype=torch.float64 if exact else dtype, device=device)
                     for t in (q, k, v)] for exact in (True, False)}
    for b in range(batch):
        rq, rk = rows(seqlens_q, b, used_q[b]), rows(seqlens_k, b, used_k[b])
        for exact in (True, False):
            leaves = [t[r].to(torch.float64 if exact else dtype).requires_grad_()
                      for t, r in ((q, rq), (k, rk), (v, rk))]
            o, l = rm.attention(*leaves, softmax_scale=scale, window_size=window, softcap=softcap,
                                sinks=sink_logits, lowp=not exact)
            o.backward(dout[rq].to(o.dtype))
            for acc, leaf, r in zip(grads[exact], leaves, (rq, rk, rk)):
                acc[r] = leaf.grad
            if exact:
                out[rq] = o.detach().to(dtype)
                if varlen:
                    lse[:, rq[0]] = l.detach().float()
                else:
                    lse[b, :, : used_q[b]] = l.detach().float()

    def cu(lengths):
        return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)

    def used(lengths):
        return None if lengths is None else torch.tensor(lengths, device=device, dtype=torch.int32)

    args = _make_args(
        q, k, v, softmax_scale=scale, window_left=window[0], window_right=window[1], softcap=softcap,
        sinks=sink_logits, seqused_q=used(seqused_q), seqused_k=used(seqused_k),
        cu_seqlens_q=cu(seqlens_q) if varlen else None, cu_seqlens_k=cu(seqlens_k) if varlen else None,
        max_seqlen_q=max(seqlens_q), max_seqlen_k=max(seqlens_k),
    )
    if check_args is not None:
        check_args(args)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        got = kernel.backward(dout, q, k, v, out, lse, args, deterministic)
    for name, g, ref, lowp in zip(("dq", "dk", "dv"), got, grads[True], grads[False]):
        # every element written: rows past seqused get 0, as the reference's gradient
        assert g.dtype == dtype and g.shape == ref.shape and torch.isfinite(g).all(), name
        assert_grad_matches(name, g, ref, lowp, softcap=softcap > 0)
    return got, (dout, q, k, v, out, lse, args)


# ----------------------------------------------------------------------------------------------
# interpreter-sized tests (CPU) — also run on the GPU


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_dense(monkeypatch, dtype, causal, deterministic):
    run_case(monkeypatch, seqlens_q=[40, 40], seqlens_k=[40, 40], dtype=dtype,
             window=(-1, 0) if causal else (-1, -1), deterministic=deterministic)


@pytest.mark.parametrize("heads_q,heads_kv", [(6, 2), (4, 1)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gqa(monkeypatch, heads_q, heads_kv, deterministic):
    run_case(monkeypatch, seqlens_q=[37], seqlens_k=[50], heads_q=heads_q, heads_kv=heads_kv,
             window=(-1, 0), deterministic=deterministic)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(70, 23), (23, 70), (1, 45), (45, 1)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_causal_unequal_lengths(monkeypatch, seqlen_q, seqlen_k, deterministic):
    # seqlen_q > seqlen_k leaves the first rows with no key (LSE +inf): their dq must be 0
    run_case(monkeypatch, seqlens_q=[seqlen_q], seqlens_k=[seqlen_k], window=(-1, 0),
             deterministic=deterministic)


@pytest.mark.parametrize("window", [(5, 3), (0, 0), (-1, 7), (9, -1), (20, 0)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_window(monkeypatch, window, deterministic):
    run_case(monkeypatch, seqlens_q=[45], seqlens_k=[61], window=window, deterministic=deterministic)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("size", range(32))
def test_window_edge_sweep(monkeypatch, side, size):
    """One window side at every residue of the block sizes, so each edge-block rule meets its
    boundary (the interpreter's blocks are 16 and 32). Deterministic mode runs both kernels."""
    window = (size, -1) if side == "left" else (-1, size)
    run_case(monkeypatch, seqlens_q=[37], seqlens_k=[50], window=window, deterministic=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_softcap(monkeypatch, causal, deterministic):
    run_case(monkeypatch, seqlens_q=[40], seqlens_k=[40], softcap=2.5,
             window=(-1, 0) if causal else (-1, -1), deterministic=deterministic)


@pytest.mark.parametrize("head_dim,head_dim_v", [(8, 8), (40, 40), (72, 72), (192, 128), (64, 256)])
def test_head_dims(monkeypatch, head_dim, head_dim_v):
    run_case(monkeypatch, seqlens_q=[33], seqlens_k=[33], head_dim=head_dim, head_dim_v=head_dim_v,
             window=(-1, 0))


@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_with_empty_sequence(monkeypatch, deterministic):
    run_case(monkeypatch, seqlens_q=[17, 0, 40, 9], seqlens_k=[30, 12, 0, 9], varlen=True,
             heads_q=4, heads_kv=2, window=(-1, 0), deterministic=deterministic)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_seqused(monkeypatch, varlen, deterministic):
    lengths_q, lengths_k = ([30, 30], [45, 45]) if not varlen else ([30, 21], [45, 33])
    run_case(monkeypatch, seqlens_q=lengths_q, seqlens_k=lengths_k, varlen=varlen,
             seqused_q=[19, 0], seqused_k=[40, 7], window=(-1, 0), deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_features_combined(monkeypatch, deterministic):
    run_case(monkeypatch, seqlens_q=[21, 0, 35, 6], seqlens_k=[40, 9, 0, 6], varlen=True,
             seqused_q=[18, 0, 0, 6], seqused_k=[33, 9, 0, 2], heads_q=4, heads_kv=2,
             head_dim=24, head_dim_v=40, window=(11, 3), softcap=4.0, deterministic=deterministic)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("atomic_dq", [False, True])
def test_batch_launched_in_slices(monkeypatch, varlen, atomic_dq):
    """Batch rides on grid axis 2 (at most 65535 programs): larger batches launch in slices. A
    limit of 2 makes these 3 and 4 sequence batches take that path, atomic dQ pass included."""
    monkeypatch.setattr(bwd, "_MAX_GRID_Z", 2)
    monkeypatch.setattr(bwd, "ATOMIC_DQ_BY_DEFAULT", atomic_dq)
    lengths_q, lengths_k = ([21, 0, 35, 6], [40, 9, 20, 6]) if varlen else ([19] * 3, [26] * 3)
    run_case(monkeypatch, seqlens_q=lengths_q, seqlens_k=lengths_k, varlen=varlen, heads_q=4,
             heads_kv=2, window=(-1, 0))


def test_sinks_change_only_the_lse(monkeypatch):
    run_case(monkeypatch, seqlens_q=[40], seqlens_k=[40], sinks=True, window=(-1, 0))


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(0, 8), (8, 0)])
def test_empty_sides(seqlen_q, seqlen_k):
    q = torch.randn(2, seqlen_q, 2, 16, device=DEVICE).to(torch.float16)
    k, v = (torch.randn(2, seqlen_k, 1, 16, device=DEVICE).to(torch.float16) for _ in range(2))
    args = _make_args(q, k, v, max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k)
    out = torch.zeros_like(q)
    lse = torch.full((2, 2, seqlen_q), float("inf"), device=DEVICE)
    for deterministic in (False, True):
        got = bwd.backward(torch.randn_like(q), q, k, v, out, lse, args, deterministic)
        for g, like in zip(got, (q, k, v)):
            assert g.shape == like.shape and g.dtype == like.dtype and not g.any()


def test_broadcast_dout(monkeypatch):
    """out.sum() gives a stride-0 dout."""
    q = torch.randn(1, 20, 2, 16, device=DEVICE).to(torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    args = _make_args(q, k, v, max_seqlen_q=20, max_seqlen_k=20)
    leaves = [t[0].double().requires_grad_() for t in (q, k, v)]
    o, l = rm.attention(*leaves, softmax_scale=args.softmax_scale)
    o.sum().backward()
    dout = torch.ones(1, 1, 1, 1, device=DEVICE, dtype=q.dtype).expand(q.shape)
    got = bwd.backward(dout, q, k, v, o[None].to(q.dtype), l[None].float(), args, True)
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g[0].double(), leaf.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("field,value,feature", [
    ("attention_chunk", 16, "attention_chunk"),
    ("cp_world_size", 2, "context parallel"),
    ("leftpad_k", "tensor", "cache_leftpad"),
    ("kv_batch_idx", "tensor", "kv_batch_idx"),
    ("page_table", "tensor", "page_table"),
    ("qv", "tensor", "qv"),
])
def test_refuses_unsupported(field, value, feature):
    q = torch.randn(1, 8, 1, 16, device=DEVICE).to(torch.float16)
    if value == "tensor":
        value = torch.zeros(1, 1, device=DEVICE, dtype=torch.int32)
    args = _make_args(q, q, q, max_seqlen_q=8, max_seqlen_k=8, **{field: value})
    lse = torch.zeros(1, 1, 8, device=DEVICE)
    with pytest.raises(NotImplementedError, match=feature):
        bwd.backward(q, q, q, q, q, lse, args, False)


# ----------------------------------------------------------------------------------------------
# GPU: bigger shapes, every head dim, bitwise determinism

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim,head_dim_v,causal", [
    (64, 64, True), (128, 128, False), (136, 136, True), (256, 256, True), (192, 128, False),
    (40, 40, False), (64, 512, True)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_head_dims(monkeypatch, head_dim, head_dim_v, causal, deterministic):
    run_case(monkeypatch, seqlens_q=[517, 517], seqlens_k=[701, 701], heads_q=4, heads_kv=2,
             head_dim=head_dim, head_dim_v=head_dim_v, window=(-1, 0) if causal else (-1, -1),
             deterministic=deterministic)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_varlen_features(monkeypatch, deterministic):
    run_case(monkeypatch, seqlens_q=[300, 0, 1025, 64, 7], seqlens_k=[511, 80, 0, 64, 900],
             seqused_q=[290, 0, 0, 64, 7], seqused_k=[500, 80, 0, 33, 900], varlen=True,
             heads_q=8, heads_kv=2, head_dim=128, window=(100, 0), softcap=5.0,
             deterministic=deterministic)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window", [(-1, 0), (255, 17), (-1, -1)])
def test_gpu_windows_and_sinks(monkeypatch, window):
    run_case(monkeypatch, seqlens_q=[1000], seqlens_k=[1500], heads_q=8, heads_kv=8,
             head_dim=64, window=window, sinks=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads_q,heads_kv", [(16, 16), (16, 2)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_autotuned_size(monkeypatch, heads_q, heads_kv, deterministic):
    """Big enough to autotune (bwd._TUNE_MIN_SCORES): tuning re-runs the atomic dK/dV, so this
    also checks the dq accumulator is zeroed again before the real run. Deterministic mode must
    then repeat bit for bit."""
    first, inputs = run_case(monkeypatch, seqlens_q=[4096], seqlens_k=[4096], heads_q=heads_q,
                             heads_kv=heads_kv, head_dim=128, window=(-1, 0),
                             deterministic=deterministic)
    assert 16 * 4096 * 4096 >= bwd._TUNE_MIN_SCORES
    if deterministic:
        for _ in range(3):
            again = bwd.backward(*inputs, True)
            for a, b in zip(first, again):
                assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_gpu_batch_past_grid_limit():
    """70000 one-token sequences with one key each (more than grid axis 2 holds): p = 1, so
    dv = dout and dq = dk = 0 (ds = dp - rowsum(dout * out) = 0)."""
    n, heads, d = 70000, 2, 64
    q, k, v, dout = (torch.randn(n, heads, d, device="cuda").to(torch.bfloat16) for _ in range(4))
    cu = torch.arange(n + 1, dtype=torch.int32, device="cuda")
    lse = ((q.float() * k.float()).sum(-1) * d ** -0.5).t().contiguous()
    args = _make_args(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1, max_seqlen_k=1)
    dq, dk, dv = bwd.backward(dout, q, k, v, v.clone(), lse, args, deterministic=True)
    torch.testing.assert_close(dv, dout, atol=1e-2, rtol=1e-2)
    assert dq.abs().max() < 0.05 and dk.abs().max() < 0.05


@pytest.mark.parametrize("pad", [1, 4], ids=["portable", "hopper-rows"])
def test_prep_lengths_do_not_recompile(monkeypatch, pad):
    """The H100 run of 2026-11-26 01:52 compiled the prep kernel again at 5120 queries after 1000
    and 3000: the LSE and lse2/delta strides follow the length, and Triton specializes ints on
    divisibility by 16. Dense calls that differ only in length and batch must bind to one
    specialization key (Triton's own binder for sm_90), and would not with every argument
    specialized, so the check can fail."""
    from specialization import LaunchRecorder, specialization_keys

    kernel, recorder = bwd._bwd_prep_kernel, LaunchRecorder()
    monkeypatch.setattr(bwd, "_bwd_prep_kernel", recorder)
    for batch, seqlen in ((2, 5120), (3, 1000), (1, 17), (1, 3000)):
        out, dout = (torch.randn(batch, seqlen, 16, 128, dtype=torch.bfloat16) for _ in "od")
        lse = torch.randn(batch, 16, seqlen)
        bwd.prep(out, dout, lse, AttnArgs.plain(out, out, out), pad=pad)
    launches = recorder.launches
    assert len(launches) == 4 and len(set(specialization_keys(kernel, launches))) == 1
    assert len(set(specialization_keys(kernel, launches, specialize_all=True))) > 1

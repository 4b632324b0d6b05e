"""Gluon Hopper forward (flash_attn_3/backends/triton/fwd_hopper.py) against the float64 reference.

Anywhere: the kernel compiles ahead of time for sm_90 (the triton wheel ships ptxas) into wgmma with
register reallocation between the partitions and no spills, so a drift in triton's experimental
Gluon API shows up without a GPU. On an sm_90 GPU (tests marked gpu): out and LSE over the kernel's
scope (head dims 64/128/256, causal or not, GQA/MQA, seqlen_q != seqlen_k, ragged tails, rows that
see no key, strided q/k/v) judged by the spec's rule (sec 8), with every buffer the kernel allocates
starting as NaN and fresh random inputs each run. The first GPU test runs one call in a subprocess
under a time limit, so a pipeline deadlock fails this module instead of hanging the GPU run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from inputs import FP8, descales, randn
from reference_math import attention_dense
from tolerance import assert_lse_matches, assert_matches_reference

from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import fwd_hopper

TESTS = Path(__file__).resolve().parent
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
on_hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
needs_gluon = pytest.mark.skipif(not fwd_hopper._GLUON_OK, reason="needs triton 3.6 with Gluon")
# (head_dim, (BLOCK_N, STAGES, PINGPONG, PERSISTENT)): the configs the tuning bench times besides
# the defaults, so none of its figures comes from a wrong kernel.
ALT_CONFIGS = [(d, c) for d, cs in fwd_hopper.CANDIDATES.items() for c in cs]

# (batch, seqlen_q, seqlen_k, heads_q, heads_k)
SHAPES = [
    (2, 1000, 1023, 4, 2),  # ragged tails on both sides, GQA
    (1, 1023, 1000, 6, 1),  # seqlen_q > seqlen_k: causal rows above the diagonal see no key; MQA
    (3, 128, 384, 2, 2),  # whole blocks only
    (1, 1, 700, 8, 2),  # a single query row
    (2, 77, 5, 4, 4),  # fewer keys than one block
    (4, 2000, 1999, 8, 2),  # 512 tiles: a persistent program walks several
    (8, 640, 640, 4, 2),  # 160 tiles of 5 query blocks: causal pairs and a middle block alone
]


def make_args(q, k, v, *, causal: bool, softmax_scale=None) -> AttnArgs:
    return AttnArgs(
        q=q, k=k, v=v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
        seqused_k=None, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], page_table=None,
        kv_batch_idx=None, leftpad_k=None, q_descale=None, k_descale=None, v_descale=None,
        sinks=None, softmax_scale=softmax_scale or 1.0 / math.sqrt(q.shape[-1]), window_left=-1,
        window_right=0 if causal else -1, attention_chunk=0, softcap=0.0, num_splits=1,
        pack_gqa=None, cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None,
        scheduler_metadata=None)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90 (no GPU needed)


@needs_gluon
@pytest.mark.parametrize("head_dim,causal", [(128, True), (64, False)])
def test_compiles_for_sm90(head_dim, causal):
    # A subprocess: the compiler must not run under the interpreter switch conftest sets.
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"),
           "--head-dim", str(head_dim)] + (["--causal"] if causal else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["wgmma_ptx"] > 0 and got["hgmma_sass"] == got["wgmma_ptx"], got
    assert got["tma_loads_ptx"] > 0 and got["num_warps"] == 12, got
    # the producer partition hands its registers to the consumer warpgroups
    assert fwd_hopper._PRODUCER_REGS in got["setmaxnreg"], got
    assert fwd_hopper._CONSUMER_REGS in got["setmaxnreg"], got
    # ptxas parks a few per-tile scalars in local memory across the KV loop (104 bytes at D=128
    # causal, none inside the loop); a spilled loop value would cost far more than this bound
    assert got["spill_bytes"] <= 128 and got["shared_bytes"] <= 227 * 1024, got


def test_refuses_without_hopper():
    q = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    assert not fwd_hopper.supports(make_args(q, q, q, causal=False))


# ---------------------------------------------------------------------------------------------
# On the GPU


_SMOKE = textwrap.dedent("""
    import torch
    from test_fwd_hopper import ALT_CONFIGS, make_args
    from flash_attn_3.backends.triton import fwd_hopper
    for head_dim, config in [(d, None) for d in fwd_hopper.CONFIGS] + ALT_CONFIGS:
        for causal in (False, True):
            q = torch.randn(4, 1000, 8, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(4, 900, 2, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in "kv")
            fwd_hopper.forward(make_args(q, k, v, causal=causal), config)
            torch.cuda.synchronize()
            print(head_dim, config, "causal" if causal else "full", flush=True)
""")
_SMOKE_FP8 = textwrap.dedent("""
    import torch
    from test_fwd_hopper import _fp8_inputs, make_fp8_args
    from flash_attn_3.backends.triton import fwd_hopper
    for head_dim in fwd_hopper.FP8_CONFIGS:
        for causal in (False, True):
            q, k, v, descale = _fp8_inputs(4, 1000, 900, 8, 2, head_dim, descaled=True)
            fwd_hopper.forward(make_fp8_args(q, k, v, causal=causal, descales=descale))
            torch.cuda.synchronize()
            print("fp8", head_dim, "causal" if causal else "full", flush=True)
""")
STEP_SECONDS = 90  # one compile and one small call


@pytest.fixture(scope="module")
def kernel_terminates(tmp_path_factory):
    """Every config once, in a subprocess watched step by step: a deadlocked pipeline fails the
    module (naming the config) instead of hanging the GPU run."""
    _run_watched(_SMOKE, tmp_path_factory)


@pytest.fixture(scope="module")
def fp8_kernel_terminates(tmp_path_factory):
    """The fp8 variants alike (their own fixture: `-k fp8` runs need not compile every bf16
    config first)."""
    _run_watched(_SMOKE_FP8, tmp_path_factory)


def _run_watched(script: str, tmp_path_factory):
    stderr = (tmp_path_factory.mktemp("smoke") / "stderr.txt").open("w+")
    # The child imports the package from this checkout even where it is not installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(TESTS).parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=stderr)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)),
                     daemon=True).start()
    last = "the start"
    while True:
        try:
            line = lines.get(timeout=STEP_SECONDS)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"fwd_hopper made no progress for {STEP_SECONDS} s after {last}: "
                        "pipeline deadlock?")
        if line is None:
            break
        last = line.strip()
    if proc.wait() != 0:
        stderr.seek(0)
        pytest.fail(f"fwd_hopper smoke call failed after {last}:\n{stderr.read()[-3000:]}")


def _poison_new_buffers(monkeypatch):
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def run_and_check(monkeypatch, q, k, v, *, causal, softmax_scale=None, config=None):
    a = make_args(q, k, v, causal=causal, softmax_scale=softmax_scale)
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        _poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a, config)
    kw = dict(causal=causal, softmax_scale=a.softmax_scale)
    ref, ref_lse = attention_dense(q, k, v, **kw)
    ref_lowp, _ = attention_dense(q, k, v, lowp=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_matches_reference("out", out, ref, ref_lowp)
    assert_lse_matches("lse", lse, ref_lse)


def _qkv(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, seqlen_k, heads_k, head_dim, device="cuda", dtype=dtype)
            for _ in "kv")
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_matches_reference(monkeypatch, shape, causal, head_dim, dtype):
    run_and_check(monkeypatch, *_qkv(*shape, head_dim, dtype), causal=causal)


@pytest.mark.parametrize("head_dim,config", ALT_CONFIGS, ids=str)
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_alternative_configs(monkeypatch, head_dim, config):
    """The configs the tuning bench measures (causal: every code path), on 288 tiles."""
    q, k, v = _qkv(3, 1500, 1700, 8, 4, head_dim, torch.bfloat16)
    run_and_check(monkeypatch, q, k, v, causal=True, config=config)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_fp16(monkeypatch, causal):
    run_and_check(monkeypatch, *_qkv(2, 513, 257, 6, 3, 128, torch.float16), causal=causal)


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_strided_qkv_and_scale(monkeypatch):
    """q/k/v as views of one packed (B, S, 3, H, D) tensor, and a softmax_scale of the caller's."""
    qkv = torch.randn(2, 600, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    run_and_check(monkeypatch, q, k, v, causal=True, softmax_scale=0.3)


@pytest.mark.gpu
@on_hopper
def test_scope():
    q, k, v = _qkv(1, 256, 256, 4, 2, 128, torch.bfloat16)
    assert fwd_hopper.supports(make_args(q, k, v, causal=True))
    base = make_args(q, k, v, causal=False)
    out_of_scope = [
        dict(window_left=32), dict(window_right=16), dict(softcap=5.0), dict(attention_chunk=64),
        dict(sinks=torch.zeros(4, device="cuda")), dict(num_splits=2),
        dict(seqused_k=torch.full((1,), 100, dtype=torch.int32, device="cuda")),
    ]
    for change in out_of_scope:
        assert not fwd_hopper.supports(AttnArgs(**{**base.__dict__, **change})), change
    q96 = torch.randn(1, 256, 4, 96, device="cuda", dtype=torch.bfloat16)
    assert not fwd_hopper.supports(make_args(q96, q96, q96, causal=False))
    q32 = q.float()
    assert not fwd_hopper.supports(make_args(q32, q32, q32, causal=False))


@pytest.mark.gpu
@on_hopper
def test_routes_short_causal_d64_to_portable():
    """In scope, but fwd.py measured faster there (fwd_hopper._portable_faster)."""
    q, k, v = _qkv(1, 1024, 1024, 4, 2, 64, torch.bfloat16)
    assert fwd_hopper.in_scope(make_args(q, k, v, causal=True))
    assert not fwd_hopper.supports(make_args(q, k, v, causal=True))
    assert fwd_hopper.supports(make_args(q, k, v, causal=False))
    q, k, v = _qkv(1, 4096, 4096, 4, 2, 64, torch.bfloat16)
    assert fwd_hopper.supports(make_args(q, k, v, causal=True))


# ---------------------------------------------------------------------------------------------
# fp8 e4m3 (out bf16; descales per (batch, KV head))


@needs_gluon
@pytest.mark.parametrize("head_dim,causal", [(128, False), (256, True), (64, True)])
def test_fp8_compiles_for_sm90(head_dim, causal):
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"), "--dtype", "fp8",
           "--head-dim", str(head_dim)] + (["--causal"] if causal else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    # every wgmma is an e4m3 one (QGMMA in SASS), P's from registers
    assert got["wgmma_ptx"] > 0 and got["qgmma_sass"] == got["wgmma_ptx"], got
    assert got["wgmma_register_a_ptx"] > 0, got
    # no wgmma serialized: ptxas keeps the registers an in-flight PV wgmma reads
    assert not got["ptxas_warnings"], got
    assert got["spill_bytes"] <= 128 and got["shared_bytes"] <= 227 * 1024, got


def test_fp8_values_copy_matches_the_p_operand_order():
    """What the kernel's P reinterpretation (_p_operand) and V's copy must agree on, on the CPU:
    operand column a holds key sigma(a) within its group of 32 (bits a3, a2, a1 = c2, c1, c3),
    and padding keys are zero."""
    from flash_attn_3.backends.triton.fwd_hopper import _values_keys_inner
    for seqlen_k in (5, 32, 77, 128):
        v = torch.randn(2, seqlen_k, 3, 16)
        v_t = _values_keys_inner(v)
        padded = v_t.shape[-1]
        assert padded % 32 == 0 and padded >= seqlen_k and v_t.stride(-1) == 1
        a = torch.arange(padded)
        bit = [(a >> i) & 1 for i in range(5)]
        sigma = (a & ~31) | bit[0] | bit[2] << 1 | bit[3] << 2 | bit[1] << 3 | bit[4] << 4
        want = torch.zeros(2, 3, 16, padded)
        want[..., :seqlen_k] = v.permute(0, 2, 3, 1)
        assert torch.equal(v_t, want[..., sigma])


def make_fp8_args(q, k, v, *, causal, descales):
    q_descale, k_descale, v_descale = descales
    return dataclasses.replace(make_args(q, k, v, causal=causal), q_descale=q_descale,
                               k_descale=k_descale, v_descale=v_descale)


def _fp8_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, *, descaled: bool):
    q, k, v = (randn(batch, s, h, head_dim, dtype=FP8, device="cuda")
               for s, h in ((seqlen_q, heads_q), (seqlen_k, heads_k), (seqlen_k, heads_k)))
    if not descaled:
        return q, k, v, (None, None, None)
    # (B, Hk) views with strides of both kinds: contiguous, and a transposed (Hk, B) tensor. The
    # tests keep B and Hk > 1, so every call shares one stride specialization (fewer compiles).
    q_descale, k_descale, v_descale = descales(batch, heads_k, "cuda")
    k_descale = descales(heads_k, batch, "cuda")[0].t()
    return q, k, v, (q_descale, k_descale, v_descale)


def run_and_check_fp8(monkeypatch, q, k, v, descale, *, causal):
    a = make_fp8_args(q, k, v, causal=causal, descales=descale)
    assert fwd_hopper.supports(a)
    with monkeypatch.context() as patch:
        _poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a)
    q_descale, k_descale, v_descale = descale
    kw = dict(causal=causal, softmax_scale=a.softmax_scale, q_descale=q_descale,
              k_descale=k_descale, v_descale=v_descale)
    ref, ref_lse = attention_dense(q, k, v, **kw)
    ref_lowp, _ = attention_dense(q, k, v, lowp=True, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_matches_reference("out", out, ref, ref_lowp, fp8=True)
    assert_lse_matches("lse", lse, ref_lse)


FP8_SHAPES = [
    (2, 1000, 1023, 4, 2),  # ragged tails (V's copy pads the last 31 keys), GQA
    (2, 1023, 1000, 6, 2),  # causal rows that see no key; 8 keys in V's last group
    (2, 77, 5, 4, 4),  # fewer keys than one group of 32
    (4, 2000, 1999, 8, 2),  # persistent programs walk several tiles
]


@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("fp8_kernel_terminates")
def test_fp8_matches_reference(monkeypatch, shape, causal, head_dim):
    q, k, v, descale = _fp8_inputs(*shape, head_dim, descaled=True)
    run_and_check_fp8(monkeypatch, q, k, v, descale, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("fp8_kernel_terminates")
def test_fp8_without_descales(monkeypatch, causal):
    q, k, v, descale = _fp8_inputs(2, 700, 900, 8, 2, 128, descaled=False)
    run_and_check_fp8(monkeypatch, q, k, v, descale, causal=causal)


@pytest.mark.gpu
@on_hopper
def test_fp8_routes_to_gluon():
    from flash_attn_3.backends.triton import routes
    q, k, v, descale = _fp8_inputs(2, 4096, 4096, 4, 2, 128, descaled=True)
    a = make_fp8_args(q, k, v, causal=True, descales=descale)
    assert routes.forward_kernel(a) is fwd_hopper
    # descales belong to fp8 only
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    assert not fwd_hopper.in_scope(make_fp8_args(qb, kb, vb, causal=True, descales=descale))

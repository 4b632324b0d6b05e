"""Gluon Hopper forward (flash_attn_3/backends/triton/fwd_hopper.py) against the float64 reference.

Anywhere: the kernel compiles ahead of time for sm_90 (the triton wheel ships ptxas) into wgmma with
register reallocation between the partitions and no spills, so a drift in triton's experimental
Gluon API shows up without a GPU. On an sm_90 GPU (tests marked gpu): out and LSE over the kernel's
scope (head dims 64/128/256, causal or not, GQA/MQA, seqlen_q != seqlen_k, ragged tails, rows that
see no key, strided q/k/v; packed varlen q/k/v with empty and one-token sequences, seqused_q/k,
dense with seqused; the model layers' sliding windows, attention chunks, softcap and sinks) judged
by the spec's rule (sec 8), with every buffer the kernel allocates starting as NaN and fresh random
inputs each run. The first GPU test of each family runs its calls in a subprocess under a time
limit, so a pipeline deadlock fails this module instead of hanging the GPU run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import DEVICE
from hopper import (COMMON_SHAPES, alternative_configs, figures_of_pinned_triton, gluon_required,
                    on_hopper, qkv)
from inputs import FP8, cu_seqlens, descales, poison_new_buffers, randn
from reference_math import attention_dense, attention_varlen
from tolerance import assert_lse_matches, assert_matches_reference
from watched import run_watched

from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import fwd_hopper

TESTS = Path(__file__).resolve().parent
needs_gluon = gluon_required(fwd_hopper)
ALT_CONFIGS = alternative_configs(fwd_hopper.CANDIDATES)
SHAPES = COMMON_SHAPES + [
    (4, 2000, 1999, 8, 2),  # 512 tiles: a persistent program walks several
    (8, 640, 640, 4, 2),  # 160 tiles of 5 query blocks: causal pairs and a middle block alone
]


def make_args(q, k, v, *, causal: bool, softmax_scale=None, cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, seqused_q=None,
              seqused_k=None, **layer) -> AttnArgs:
    """Dense (B, S, H, D) q/k/v, or packed (total, H, D) ones with their cu_seqlens and max;
    layer: AttnArgs fields of a model layer (layer_fields), the window overriding causal."""
    return AttnArgs.plain(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_q=seqused_q,
        seqused_k=seqused_k, max_seqlen_q=q.shape[1] if max_seqlen_q is None else max_seqlen_q,
        max_seqlen_k=k.shape[1] if max_seqlen_k is None else max_seqlen_k,
        softmax_scale=softmax_scale or 1.0 / math.sqrt(q.shape[-1]),
        **{"window_right": 0 if causal else -1, **layer})


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90 (no GPU needed)


@needs_gluon
@figures_of_pinned_triton
@pytest.mark.parametrize("head_dim,causal,variant", [(128, True, []), (64, False, []),
                                                     (128, True, ["--varlen", "--seqused"]),
                                                     (256, False, ["--varlen"])], ids=str)
def test_compiles_for_sm90(head_dim, causal, variant):
    # A subprocess: the compiler must not run under the interpreter switch conftest sets.
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"),
           "--head-dim", str(head_dim)] + (["--causal"] if causal else []) + variant
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["wgmma_ptx"] > 0 and got["hgmma_sass"] == got["wgmma_ptx"], got
    assert got["tma_loads_ptx"] > 0 and got["num_warps"] == 12, got
    # the producer partition hands its registers to the consumer warpgroups
    assert fwd_hopper._PRODUCER_REGS in got["setmaxnreg"], got
    assert fwd_hopper._CONSUMER_REGS in got["setmaxnreg"], got
    # ptxas parks a few per-tile scalars in local memory across the KV loop (104 bytes at D=128
    # causal, 68 varlen with seqused, none inside the loop); a spilled loop value would cost far
    # more than this bound
    assert all(loop["local"] == 0 for loop in got["kv_loops"]) and got["kv_loops"], got
    assert got["spill_bytes"] <= 128 and got["shared_bytes"] <= 227 * 1024, got
    # the layer variants (window, chunk, softcap, sinks) leave the plain kernels' SASS as it
    # was before them (tests/fwd_hopper_plain_sass.json; `aot_fwd_hopper.py --check-plain`
    # compares every recorded variant)
    assert got["recorded_sass_same"], got


@needs_gluon
@figures_of_pinned_triton
@pytest.mark.parametrize("head_dim,variant", [
    (128, ["--window", "100,0", "--softcap", "30", "--sinks"]),
    (64, ["--chunk", "96", "--causal"]),
    (256, ["--window", "40,20", "--varlen", "--seqused"]),
    (128, ["--dtype", "fp8", "--window", "100,0", "--softcap", "30", "--sinks"]),
    (96, ["--causal", "--varlen", "--seqused"]),
    (192, ["--head-dim-v", "128", "--causal", "--varlen"]),
], ids=str)
def test_layer_variants_compile_for_sm90(head_dim, variant):
    """Sliding window, chunk, softcap, sinks and a head dim padded to the next tile width
    compile into the same pipeline: every wgmma kept, no wgmma serialized, nothing of the KV
    loop in local memory, and softcap's tanh one MUFU op per score."""
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"),
           "--head-dim", str(head_dim)] + variant
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["wgmma_ptx"] > 0 and got["hgmma_sass"] + got["qgmma_sass"] == got["wgmma_ptx"]
    assert not got["ptxas_warnings"], got
    assert all(loop["local"] == 0 for loop in got["kv_loops"]) and got["kv_loops"], got
    assert got["spill_bytes"] <= 128 and got["shared_bytes"] <= 227 * 1024, got
    for loop in got["kv_loops"]:
        tanh = loop["ops"].get("MUFU.TANH", 0)
        assert tanh == (loop["ops"]["MUFU.EX2"] - 2 if "--softcap" in variant else 0), loop


def _aot_report(flags, env=None):
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_gluon
@figures_of_pinned_triton
@pytest.mark.parametrize("head_dim,variant", [
    (96, ["--causal"]), (96, ["--causal", "--varlen", "--seqused"]),
    (192, ["--head-dim-v", "128", "--causal"])], ids=str)
def test_qk_slices_skip_the_padding(head_dim, variant):
    """The QK wgmma of a head dim under its tile width reads
    its columns only (two power-of-two slices), so each KV loop issues (width - head dim) / 16
    fewer wgmma k-steps than the whole tile's, with no more spills and nothing in local memory;
    switched off (FLASH_ATTN_3_GLUON_QK_SLICES=0), the kernel is the padded one (the plain
    kernels' SASS is checked elsewhere)."""
    flags = ["--head-dim", str(head_dim)] + variant
    whole = _aot_report(flags, {fwd_hopper.QK_SLICES_ENV: "0"})
    sliced = _aot_report(flags, {fwd_hopper.QK_SLICES_ENV: "1"})
    saved = (fwd_hopper.tile_width(head_dim) - head_dim) // 16
    assert [loop["gmma"] + saved for loop in sliced["kv_loops"]] == [
        loop["gmma"] for loop in whole["kv_loops"]], (sliced, whole)
    assert sliced["hgmma_sass"] == sliced["wgmma_ptx"] < whole["wgmma_ptx"], sliced
    assert all(loop["local"] == 0 for loop in sliced["kv_loops"]) and sliced["kv_loops"], sliced
    assert sliced["spill_bytes"] <= whole["spill_bytes"] and not sliced["ptxas_warnings"], sliced


def test_qk_used():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(fwd_hopper.QK_SLICES_ENV, "0")
        assert [fwd_hopper.qk_used(d, w) for d, w in ((96, 128), (192, 256), (128, 128))] == [0] * 3
        patch.delenv(fwd_hopper.QK_SLICES_ENV)
        got = {(d, w): fwd_hopper.qk_used(d, w) for d, w in (
            (96, 128), (80, 128), (192, 256), (160, 256), (48, 64), (128, 128), (112, 128),
            (224, 256), (72, 128))}
        assert got == {(96, 128): 96, (80, 128): 80, (192, 256): 192, (160, 256): 160,
                       (48, 64): 48, (128, 128): 0, (112, 128): 0, (224, 256): 0,
                       (72, 128): 0}
        assert fwd_hopper.qk_used(96, 128, fp8=True) == 0


def test_mask_bounds():
    """The kernel's window and chunk arguments (None: unbounded): a window side that reaches
    past every row's keys is no bound (bottom-right diagonal: the left side past
    seqlen_k - 1, the right past seqlen_q - 1), so such calls run the plain kernels."""
    q = torch.empty(2, 300, 4, 64, dtype=torch.bfloat16)
    k = torch.empty(2, 500, 2, 64, dtype=torch.bfloat16)
    bounds = lambda **w: fwd_hopper.mask_bounds(AttnArgs.plain(q, k, k, **w))
    assert bounds() == (None, None, None)
    assert bounds(window_right=0) == (None, 0, None)
    assert bounds(window_left=498, window_right=298) == (498, 298, None)
    assert bounds(window_left=499, window_right=299) == (None, None, None)
    assert bounds(window_left=0, window_right=0, attention_chunk=7) == (0, 0, 7)
    # packed: the bounds follow max_seqlen_q / max_seqlen_k
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    packed = AttnArgs.plain(q.flatten(0, 1), k.flatten(0, 1), k.flatten(0, 1), cu_seqlens_q=cu,
                            cu_seqlens_k=cu, max_seqlen_q=200, max_seqlen_k=200,
                            window_left=198, window_right=199)
    assert fwd_hopper.mask_bounds(packed) == (198, None, None)


@needs_gluon
@pytest.mark.parametrize("dtype,config", [("bf16", "128,2,1,1,1"), ("fp8", "128,3,1,1,1")])
def test_late_pv_wait_moves_the_wait(dtype, config):
    """LATE_PV_WAIT (a config's fifth field): in the SASS every exp2 of the KV loop comes before
    the PV wgmma's wait, so the softmax runs under that wgmma (the default configs' loops have
    none there: ptxas puts the wait at the top of the softmax's basic block), and ptxas does not
    serialize the wgmmas."""
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_fwd_hopper.py"), "--dtype", dtype,
           "--head-dim", "128", "--config", config]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert not got["ptxas_warnings"] and got["kv_loops"], got
    for loop in got["kv_loops"]:
        assert loop["pv_wait"]["mufu_ex2"] == loop["ops"]["MUFU.EX2"], loop
        assert loop["local"] == 0, loop


def test_refuses_without_hopper():
    q = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    assert not fwd_hopper.supports(make_args(q, q, q, causal=False))


def _launch_keys(monkeypatch, calls, specialize_all=False):
    """The specialization key of _fwd_kernel's launch by forward() for each call (a function
    returning AttnArgs on the CPU): the key its kernel cache looks up, so two equal keys mean
    one compile."""
    from specialization import LaunchRecorder, specialization_keys

    kernel, recorder = fwd_hopper._fwd_kernel, LaunchRecorder()
    with monkeypatch.context() as patch:
        patch.setattr(fwd_hopper, "_fwd_kernel", recorder)
        patch.setattr(fwd_hopper, "_num_sms", lambda device_index: 132)  # an H100's
        for call in calls:
            fwd_hopper.forward(call())
    return specialization_keys(kernel, recorder.launches, specialize_all)


def _dense_call(batch, seqlen, fp8=False):
    def call():
        q, k, v = (torch.randn(batch, seqlen, 16, 128, dtype=torch.bfloat16) for _ in "qkv")
        if not fp8:
            return make_args(q, k, v, causal=True)
        # descales as a transposed (Hk, B) view: its stride follows the batch
        q_descale, k_descale, v_descale = (torch.rand(16, batch).t() for _ in "qkv")
        return dataclasses.replace(
            make_args(*(x.to(FP8) for x in (q, k, v)), causal=True), q_descale=q_descale,
            k_descale=k_descale, v_descale=v_descale)
    return call


def _varlen_call(lengths):
    def call():
        q, k, v = (torch.randn(sum(lengths), 16, 128, dtype=torch.bfloat16) for _ in "qkv")
        cu = cu_seqlens(lengths, "cpu")
        return make_args(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                         max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    return call


@needs_gluon
@pytest.mark.parametrize("calls", [
    # lengths and batches that differ mod 16 and in 1 vs not 1; causal pairs on (many tiles)
    # and off (fewer tiles than SMs)
    [_dense_call(2, 5120), _dense_call(3, 1000), _dense_call(1, 17)],
    [_dense_call(2, 5120, fp8=True), _dense_call(3, 1000, fp8=True),
     _dense_call(1, 17, fp8=True)],
    [_varlen_call([2560, 2560]), _varlen_call([700, 300, 9]), _varlen_call([17])],
], ids=["dense", "fp8", "varlen"])
def test_lengths_do_not_recompile(monkeypatch, calls):
    """The GPU run of 15:13 compiled the forward again for seqlen 1000 after 5120 (Triton
    specializes ints on divisibility by 16). Calls that differ only in lengths and batch must
    bind to one specialization key."""
    keys = _launch_keys(monkeypatch, calls)
    assert len(set(keys)) == 1, keys
    # The calls do reach the specialization: with every argument specialized, they would not
    # share a key.
    assert len(set(_launch_keys(monkeypatch, calls, specialize_all=True))) == len(calls)


# ---------------------------------------------------------------------------------------------
# On the GPU


_SMOKE = textwrap.dedent("""
    import torch
    from inputs import cu_seqlens
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
    # Packed, where producer and consumers must agree on the blocks they skip.
    for head_dim in fwd_hopper.CONFIGS:
        for causal in (False, True):
            lens_q, lens_k = [700, 0, 1, 1300, 200], [500, 3, 0, 1300, 900]
            q = torch.randn(sum(lens_q), 8, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(sum(lens_k), 2, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in "kv")
            cu_q, cu_k = cu_seqlens(lens_q, "cuda"), cu_seqlens(lens_k, "cuda")
            used = torch.tensor([600, 0, 1, 1000, 200], dtype=torch.int32, device="cuda")
            fwd_hopper.forward(make_args(q, k, v, causal=causal, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, max_seqlen_q=1300, max_seqlen_k=1300,
                                         seqused_q=used, seqused_k=used))
            torch.cuda.synchronize()
            print(head_dim, "varlen", "causal" if causal else "full", flush=True)
""")
_SMOKE_FP8 = textwrap.dedent("""
    import torch
    from test_fwd_hopper import _fp8_inputs, make_fp8_args
    from flash_attn_3.backends.triton import fwd_hopper
    # the defaults, then the candidates the tests below run in-process (a deadlocked pipeline
    # would hang them; here it fails the module under a time limit, naming the config)
    alternatives = [(d, c) for d, cs in fwd_hopper.FP8_CANDIDATES.items() for c in cs]
    for head_dim, config in [(d, None) for d in fwd_hopper.FP8_CONFIGS] + alternatives:
        for causal in (False, True):
            q, k, v, descale = _fp8_inputs(4, 1000, 900, 8, 2, head_dim, descaled=True)
            fwd_hopper.forward(make_fp8_args(q, k, v, causal=causal, descales=descale), config=config)
            torch.cuda.synchronize()
            print("fp8", head_dim, config, "causal" if causal else "full", flush=True)
""")
STEP_SECONDS = 90  # one compile and one small call


@pytest.fixture(scope="module")
def kernel_terminates(tmp_path_factory):
    """Every config once, in a subprocess watched step by step: a deadlocked pipeline fails the
    module (naming the config) instead of hanging the GPU run."""
    run_watched(_SMOKE, "fwd_hopper", STEP_SECONDS, tmp_path_factory)


@pytest.fixture(scope="module")
def fp8_kernel_terminates(tmp_path_factory):
    """The fp8 variants alike (their own fixture: `-k fp8` runs need not compile every bf16
    config first)."""
    run_watched(_SMOKE_FP8, "fwd_hopper", STEP_SECONDS, tmp_path_factory)


def run_and_check(monkeypatch, q, k, v, *, causal, softmax_scale=None, config=None):
    a = make_args(q, k, v, causal=causal, softmax_scale=softmax_scale)
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a, config)
    kw = dict(causal=causal, softmax_scale=a.softmax_scale)
    ref, ref_lse = attention_dense(q, k, v, **kw)
    ref_lowp, _ = attention_dense(q, k, v, lowp=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_matches_reference("out", out, ref, ref_lowp)
    assert_lse_matches("lse", lse, ref_lse)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_matches_reference(monkeypatch, shape, causal, head_dim, dtype):
    run_and_check(monkeypatch, *qkv(*shape, head_dim, dtype), causal=causal)


@pytest.mark.parametrize("head_dim,config", ALT_CONFIGS, ids=str)
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_alternative_configs(monkeypatch, head_dim, config):
    """The configs the tuning bench measures (causal: every code path), on 288 tiles."""
    q, k, v = qkv(3, 1500, 1700, 8, 4, head_dim, torch.bfloat16)
    run_and_check(monkeypatch, q, k, v, causal=True, config=config)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_fp16(monkeypatch, causal):
    run_and_check(monkeypatch, *qkv(2, 513, 257, 6, 3, 128, torch.float16), causal=causal)


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_strided_qkv_and_scale(monkeypatch):
    """q/k/v as views of one packed (B, S, 3, H, D) tensor, and a softmax_scale of the caller's."""
    packed = torch.randn(2, 600, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = packed.unbind(2)
    run_and_check(monkeypatch, q, k, v, causal=True, softmax_scale=0.3)


@pytest.mark.gpu
@on_hopper
def test_scope():
    q, k, v = qkv(1, 256, 256, 4, 2, 128, torch.bfloat16)
    assert fwd_hopper.supports(make_args(q, k, v, causal=True))
    base = make_args(q, k, v, causal=False)
    in_scope = [
        dict(window_left=32), dict(window_right=16), dict(softcap=5.0), dict(attention_chunk=64),
        dict(sinks=torch.zeros(4, device="cuda")),
    ]
    for change in in_scope:
        assert fwd_hopper.supports(AttnArgs(**{**base.__dict__, **change})), change
    out_of_scope = [
        dict(num_splits=2), dict(sinks=torch.zeros(2, device="cuda")),
        dict(leftpad_k=torch.zeros(1, dtype=torch.int32, device="cuda")),
        dict(kv_batch_idx=torch.zeros(1, dtype=torch.int32, device="cuda")),
    ]
    for change in out_of_scope:
        assert not fwd_hopper.supports(AttnArgs(**{**base.__dict__, **change})), change
    # head dims between 64, 128 and 256 take the next one's tiles, but not in fp8
    q96 = torch.randn(1, 256, 4, 96, device="cuda", dtype=torch.bfloat16)
    assert fwd_hopper.supports(make_args(q96, q96, q96, causal=False))
    assert not fwd_hopper.supports(make_args(*(q96.to(FP8), ) * 3, causal=False))
    q32 = q.float()
    assert not fwd_hopper.supports(make_args(q32, q32, q32, causal=False))


@pytest.mark.gpu
@on_hopper
def test_routes_short_causal_d64_to_portable():
    """In scope, but fwd.py measured faster there (fwd_hopper._portable_faster)."""
    q, k, v = qkv(1, 1024, 1024, 4, 2, 64, torch.bfloat16)
    assert fwd_hopper.in_scope(make_args(q, k, v, causal=True))
    assert not fwd_hopper.supports(make_args(q, k, v, causal=True))
    assert fwd_hopper.supports(make_args(q, k, v, causal=False))
    q, k, v = qkv(1, 4096, 4096, 4, 2, 64, torch.bfloat16)
    assert fwd_hopper.supports(make_args(q, k, v, causal=True))


# ---------------------------------------------------------------------------------------------
# Packed varlen and seqused

# (lengths_q, lengths_k, heads_q, heads_k)
VARLEN_SHAPES = [
    ([1024] * 4, [1024] * 4, 8, 2),  # equal lengths, whole tiles: every O store goes by TMA
    # ragged, with empty and one-token sequences on both sides: tiles that cross a sequence's
    # end (masked O store), key blocks that reach into the next sequence
    ([300, 0, 1, 777, 128, 65, 1], [300, 5, 0, 900, 1, 64, 130], 4, 2),
    ([200, 1000, 64], [1000, 200, 64], 6, 1),  # seqlen_q != seqlen_k per sequence, MQA
    ([1500, 37, 900, 1999, 640, 5, 1200, 1024], [1500, 4000, 17, 1999, 640, 70, 1200, 3],
     8, 4),  # 1024 tiles: persistent programs walk several; causal pairs across short sequences
]


def _varlen_qkv(lens_q, lens_k, heads_q, heads_k, head_dim, dtype=torch.bfloat16, extra_q=0,
                extra_k=0):
    """Packed q/k/v; extra_q / extra_k rows after the last sequence belong to none: the keys
    there are NaN, which no output may see (TMA reads them, the kernel must clear them)."""
    q = torch.randn(sum(lens_q) + extra_q, heads_q, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(lens_k) + extra_k, heads_k, head_dim, device="cuda", dtype=dtype)
            for _ in "kv")
    k[sum(lens_k):] = float("nan")
    v[sum(lens_k):] = float("nan")
    return q, k, v, cu_seqlens(lens_q, "cuda"), cu_seqlens(lens_k, "cuda")


def _used(lens):
    """seqused: a random length up to each sequence's (0 and the full length included)."""
    used = [int(torch.randint(0, n + 1, ())) for n in lens]
    used[0] = lens[0]
    return torch.tensor(used, dtype=torch.int32, device="cuda")


def _poison_unused(x, starts, used, lens):
    """NaN in the rows of each sequence past its seqused (a KV cache's unfilled tail)."""
    for start, n, length in zip(starts, used.tolist(), lens):
        x[start + n:start + length] = float("nan")


def run_varlen_and_check(monkeypatch, q, k, v, cu_q, cu_k, *, causal, seqused_q=None,
                         seqused_k=None):
    """Every row of every sequence is checked (rows past seqused_q: out 0, lse +inf); rows after
    the last sequence (q rows past total_q) must stay unwritten."""
    lens_q, lens_k = (cu[1:] - cu[:-1] for cu in (cu_q, cu_k))
    a = make_args(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  max_seqlen_q=int(lens_q.max()), max_seqlen_k=int(lens_k.max()),
                  seqused_q=seqused_q, seqused_k=seqused_k)
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a)
    kw = dict(seqused_q=seqused_q, seqused_k=seqused_k, causal=causal,
              softmax_scale=a.softmax_scale)
    ref, ref_lse = attention_varlen(q, k, v, cu_q, cu_k, **kw)
    ref_lowp, _ = attention_varlen(q, k, v, cu_q, cu_k, lowp=True, **kw)
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and lse.shape == (q.shape[1], q.shape[0])
    total_q = int(cu_q[-1])
    rows = torch.arange(q.shape[0]) < total_q
    assert_matches_reference("out", out, ref, ref_lowp, rows=rows)
    assert_lse_matches("lse", lse, ref_lse, rows=rows)
    assert out[total_q:].isnan().all() and lse[:, total_q:].isnan().all(), "rows past the end"


@pytest.mark.parametrize("shape", VARLEN_SHAPES, ids=lambda s: f"{len(s[0])}seqs-{s[2]}x{s[3]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_varlen_matches_reference(monkeypatch, shape, causal, head_dim):
    lens_q, lens_k, heads_q, heads_k = shape
    run_varlen_and_check(monkeypatch, *_varlen_qkv(lens_q, lens_k, heads_q, heads_k, head_dim,
                                                   extra_q=70, extra_k=50),
                         causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_varlen_seqused(monkeypatch, causal, head_dim):
    """Rows past seqused hold NaN: unused queries still give out 0 / lse +inf, unused keys
    nothing."""
    run_seqused_and_check(monkeypatch, head_dim, causal)


def run_seqused_and_check(monkeypatch, head_dim, causal, head_dim_v=None):
    """Ragged packed sequences with seqused_q / seqused_k and NaN in every row past them."""
    lens_q, lens_k = [700, 0, 1, 1300, 200, 129], [500, 3, 0, 1300, 900, 129]
    q, k, v, cu_q, cu_k = _varlen_qkv(lens_q, lens_k, 8, 2, head_dim)
    if head_dim_v is not None:
        v = torch.randn(*k.shape[:-1], head_dim_v, device="cuda", dtype=torch.bfloat16)
    used_q, used_k = _used(lens_q), _used(lens_k)
    _poison_unused(q, cu_q.tolist(), used_q, lens_q)
    for x in (k, v):
        _poison_unused(x, cu_k.tolist(), used_k, lens_k)
    run_varlen_and_check(monkeypatch, q, k, v, cu_q, cu_k, causal=causal, seqused_q=used_q,
                         seqused_k=used_k)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_varlen_fp16(monkeypatch, causal):
    run_varlen_and_check(monkeypatch, *_varlen_qkv([513, 90, 1], [257, 300, 40], 6, 3, 128,
                                                   torch.float16), causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_dense_seqused(monkeypatch, causal, head_dim):
    """Dense q/k/v cut short per row (a KV cache's filled length; the rest NaN): rows past
    seqused_q inside Sq are written as out 0, lse +inf."""
    q, k, v = qkv(5, 700, 900, 8, 2, head_dim, torch.bfloat16)
    used_q, used_k = _used([700] * 5), _used([900] * 5)
    _poison_unused(q.flatten(0, 1), range(0, 5 * 700, 700), used_q, [700] * 5)
    for x in (k, v):
        _poison_unused(x.flatten(0, 1), range(0, 5 * 900, 900), used_k, [900] * 5)
    a = make_args(q, k, v, causal=causal, seqused_q=used_q, seqused_k=used_k)
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a)
    kw = dict(seqlens_q=used_q.tolist(), seqlens_k=used_k.tolist(), causal=causal,
              softmax_scale=a.softmax_scale)
    ref, ref_lse = attention_dense(q, k, v, **kw)
    ref_lowp, _ = attention_dense(q, k, v, lowp=True, **kw)
    assert_matches_reference("out", out, ref, ref_lowp)
    assert_lse_matches("lse", lse, ref_lse)


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_packed_q_dense_kv(monkeypatch):
    """Packed queries over a dense K/V cache cut by seqused_k (flash_attn_with_kvcache's shape)."""
    lens_q, heads_q, heads_k, head_dim = [300, 1, 0, 513], 8, 2, 128
    q = torch.randn(sum(lens_q), heads_q, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4, 1000, heads_k, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in "kv")
    cu_q, used_k = cu_seqlens(lens_q, "cuda"), _used([1000] * 4)
    a = make_args(q, k, v, causal=True, cu_seqlens_q=cu_q, max_seqlen_q=max(lens_q),
                  seqused_k=used_k)
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a)
    # The same keys packed: row b of the cache is sequence b.
    cu_k = cu_seqlens([1000] * 4, "cuda")
    kw = dict(seqused_k=used_k, causal=True, softmax_scale=a.softmax_scale)
    ref, ref_lse = attention_varlen(q, k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, **kw)
    ref_lowp, _ = attention_varlen(q, k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, lowp=True,
                                   **kw)
    assert_matches_reference("out", out, ref, ref_lowp)
    assert_lse_matches("lse", lse, ref_lse)


@pytest.mark.gpu
@on_hopper
def test_varlen_routes_here():
    """flash_attn_varlen_func's prefill reaches this kernel (issue 3: it ran fwd.py before)."""
    from flash_attn_3.backends.triton import routes

    q, k, v, cu_q, cu_k = _varlen_qkv([4096] * 2, [4096] * 2, 16, 16, 128)
    a = make_args(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4096,
                  max_seqlen_k=4096)
    assert routes.forward_kernel(a) is fwd_hopper
    q, k, v, cu_q, cu_k = _varlen_qkv([1024] * 2, [1024] * 2, 4, 2, 64)
    short_causal = make_args(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=1024, max_seqlen_k=1024)
    assert fwd_hopper.in_scope(short_causal) and not fwd_hopper.supports(short_causal)


# ---------------------------------------------------------------------------------------------
# fp8 e4m3 (out bf16; descales per (batch, KV head))


@needs_gluon
@figures_of_pinned_triton
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
    assert got["recorded_sass_same"], got


def test_fp8_values_copy_matches_the_p_operand_order():
    """What the kernel's P reinterpretation (_p_operand) and V's copy must agree on (the copy on
    the GPU where there is one, else under the interpreter):
    operand column a holds key sigma(a) within its group of 32 (bits a3, a2, a1 = c2, c1, c3),
    and padding keys are zero."""
    from flash_attn_3.backends.triton.fwd_hopper import _values_keys_inner
    # Lengths around the kernel's 128-key tiles, head dims over one 64-wide tile, fp8 as the
    # forward copies it, and V as a strided slice of a packed qkv.
    for seqlen_k, head_dim, dtype in ((5, 16, torch.float32), (32, 16, FP8), (77, 80, FP8),
                                      (128, 16, torch.float32), (200, 64, FP8)):
        packed = torch.randn(2, seqlen_k, 3, 3, head_dim, device=DEVICE).to(dtype)
        v = packed[:, :, 2]
        v_t = _values_keys_inner(v)
        padded = v_t.shape[-1]
        assert padded % 32 == 0 and padded >= seqlen_k and v_t.stride(-1) == 1
        assert v_t.dtype == dtype
        a = torch.arange(padded, device=DEVICE)
        bit = [(a >> i) & 1 for i in range(5)]
        sigma = (a & ~31) | bit[0] | bit[2] << 1 | bit[3] << 2 | bit[1] << 3 | bit[4] << 4
        want = torch.zeros(2, 3, head_dim, padded, device=DEVICE)
        want[..., :seqlen_k] = v.float().permute(0, 2, 3, 1)
        assert torch.equal(v_t.float(), want[..., sigma])


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


@pytest.mark.gpu
@on_hopper
@needs_gluon
def test_fp8_runs_here_unless_switched_off(monkeypatch):
    q, k, v = (randn(1, 256, 2, 64, dtype=FP8, device="cuda") for _ in range(3))
    a = make_fp8_args(q, k, v, causal=False, descales=(None,) * 3)
    assert fwd_hopper.in_scope(a)
    monkeypatch.setenv("FLASH_ATTN_3_GLUON_FP8", "0")
    assert not fwd_hopper.in_scope(a)


def run_and_check_fp8(monkeypatch, q, k, v, descale, *, causal, config=None):
    a = make_fp8_args(q, k, v, causal=causal, descales=descale)
    # in_scope, not supports: short causal D=64 is routed to fwd.py, the kernel must still be right
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a, config)
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


@pytest.mark.parametrize("config", fwd_hopper.FP8_CANDIDATES[128], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("fp8_kernel_terminates")
def test_fp8_alternative_configs(monkeypatch, causal, config):
    q, k, v, descale = _fp8_inputs(2, 1000, 1023, 4, 2, 128, descaled=True)
    run_and_check_fp8(monkeypatch, q, k, v, descale, causal=causal, config=config)


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
    # V's keys-inner copy assumes dense (B, S, H, D) with every key used: fp8 varlen and seqused
    # go to the portable kernel, while their bf16 twins stay here.
    used = torch.tensor([4000, 3000], dtype=torch.int32, device="cuda")
    cu = cu_seqlens([4096] * 2, "cuda")
    for x, y, z in ((q, k, v), (qb, kb, vb)):
        packed = make_args(x.flatten(0, 1), y.flatten(0, 1), z.flatten(0, 1), causal=True,
                           cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4096,
                           max_seqlen_k=4096)
        for variant in (packed, make_args(x, y, z, causal=True, seqused_k=used),
                        make_args(x, y, z, causal=True, seqused_q=used)):
            if x.dtype == FP8:
                variant = dataclasses.replace(variant, q_descale=descale[0],
                                              k_descale=descale[1], v_descale=descale[2])
            assert fwd_hopper.in_scope(variant) == (x.dtype != FP8)
            assert (routes.forward_kernel(variant) is fwd_hopper) == (x.dtype != FP8)


# ---------------------------------------------------------------------------------------------
# Model layers: sliding window, attention_chunk, softcap, sinks (compile-time variants)


def layer_fields(layer: dict, heads_q: int) -> dict:
    """AttnArgs fields of a layer spec: window (left, right) with -1 unbounded (causal is
    (-1, 0)), chunk, softcap, and sinks (True: a fresh logit per query head, around the
    scores' log-sum-exp so that it moves the output)."""
    left, right = layer.get("window", (-1, -1))
    sinks = None
    if layer.get("sinks"):
        sinks = torch.rand(heads_q, device="cuda", dtype=torch.float32) * 8 - 1
    return dict(window_left=left, window_right=right, attention_chunk=layer.get("chunk", 0),
                softcap=layer.get("softcap", 0.0), sinks=sinks)


def reference_kw(a: AttnArgs) -> dict:
    return dict(softmax_scale=a.softmax_scale, window_size=(a.window_left, a.window_right),
                attention_chunk=a.attention_chunk, softcap=a.softcap, sinks=a.sinks)


def _layer_id(layer: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in layer.items()).replace(" ", "")


# (head dim, layer). Each distinct (head dim, set of bounded window sides, chunk, softcap,
# sinks, causal) is one compile: the windows of one head dim mostly share theirs.
DENSE_LAYERS = [
    # Sliding windows (Mistral, Gemma, Qwen2: causal plus a left side), both sides, one side,
    # narrower than a key block, and zero wide (each row sees its diagonal key only)
    (128, dict(window=(100, 0))), (128, dict(window=(5, 3))), (128, dict(window=(0, 0))),
    (128, dict(window=(64, 64))), (128, dict(window=(300, -1))), (128, dict(window=(-1, 50))),
    (256, dict(window=(64, 64))),
    # attention_chunk (Llama 4), sizes not multiples of the 128-key block, with and without a
    # window
    (128, dict(chunk=100)), (128, dict(chunk=256, window=(-1, 0))),
    (128, dict(chunk=1000, window=(300, 0))),
    # softcap (Gemma 2), alone, causal, and with a window
    (128, dict(softcap=5.0)), (128, dict(softcap=5.0, window=(-1, 0))),
    (64, dict(softcap=5.0, window=(100, 0))),
    # sinks (GPT-OSS: D = 64, a 128-token sliding window on every other layer), alone, causal
    (64, dict(sinks=True, window=(128, 0))), (128, dict(sinks=True)),
    (128, dict(sinks=True, window=(-1, 0))),
]
# (batch, seqlen_q, seqlen_k, heads_q, heads_k): ragged tails and GQA; seqlen_q > seqlen_k
# (rows above the diagonal's start, empty under causal or a chunk: out 0, lse +inf); and
# seqlen_k > seqlen_q, whole blocks
LAYER_SHAPES = [(2, 1000, 1023, 4, 2), (1, 1023, 700, 6, 1), (3, 128, 384, 2, 2)]
# Packed, ragged, with seqused (one compile each)
VARLEN_LAYERS = [dict(window=(100, 0), softcap=5.0, sinks=True), dict(chunk=100, window=(-1, 0))]
FP8_LAYER = dict(window=(100, 0), softcap=5.0, sinks=True)
# Head dims under an instantiated width (Phi-3's 96; 192), causal or not: tiles of 128 / 256
# columns, the padding read as zeros. Packed at 96 with seqused (the row-masked O store of
# tiles that cross a sequence's end writes the head dim's columns only).
PADDED_HEAD_DIMS = [(96, False), (96, True), (192, True)]
# (head dim of q and k, of v): DeepSeek V2 / V3's 192 / 128 and two more narrower Vs
NARROW_V = [(192, 128), (256, 128), (128, 64)]

_SMOKE_LAYERS = textwrap.dedent("""
    import os
    import torch
    from inputs import cu_seqlens
    from test_fwd_hopper import (DENSE_LAYERS, FP8_LAYER, NARROW_V, PADDED_HEAD_DIMS,
                                 VARLEN_LAYERS, _fp8_inputs, layer_fields, make_args)
    from flash_attn_3.backends.triton import fwd_hopper
    # every compile the layer tests make, on one small shape each (LAYER_SHAPES[0])
    for head_dim, layer in DENSE_LAYERS:
        q = torch.randn(2, 1000, 4, head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 1023, 2, head_dim, device="cuda", dtype=torch.bfloat16)
                for _ in "kv")
        fwd_hopper.forward(make_args(q, k, v, causal=False, **layer_fields(layer, 4)))
        torch.cuda.synchronize()
        print(head_dim, layer, flush=True)
    for layer in VARLEN_LAYERS:
        lens_q, lens_k = [700, 0, 1, 1300, 200], [500, 3, 0, 1300, 900]
        q = torch.randn(sum(lens_q), 8, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(sum(lens_k), 2, 128, device="cuda", dtype=torch.bfloat16)
                for _ in "kv")
        used = torch.tensor([600, 0, 1, 1000, 200], dtype=torch.int32, device="cuda")
        fwd_hopper.forward(make_args(
            q, k, v, causal=False, cu_seqlens_q=cu_seqlens(lens_q, "cuda"),
            cu_seqlens_k=cu_seqlens(lens_k, "cuda"), max_seqlen_q=1300, max_seqlen_k=1300,
            seqused_q=used, seqused_k=used, **layer_fields(layer, 8)))
        torch.cuda.synchronize()
        print("varlen", layer, flush=True)
    q, k, v, (q_descale, k_descale, v_descale) = _fp8_inputs(2, 1000, 1023, 4, 2, 128,
                                                            descaled=True)
    fwd_hopper.forward(make_args(q, k, v, causal=False, **layer_fields(FP8_LAYER, 4),
                                 q_descale=q_descale, k_descale=k_descale, v_descale=v_descale))
    torch.cuda.synchronize()
    print("fp8", FP8_LAYER, flush=True)
    for head_dim, causal in PADDED_HEAD_DIMS:
        q = torch.randn(2, 1000, 4, head_dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 1023, 2, head_dim, device="cuda", dtype=torch.bfloat16)
                for _ in "kv")
        for sliced in "01":  # the QK wgmma over the padded tile, then over the head dim's slices
            os.environ[fwd_hopper.QK_SLICES_ENV] = sliced
            fwd_hopper.forward(make_args(q, k, v, causal=causal))
            torch.cuda.synchronize()
            print(head_dim, "causal" if causal else "full", "sliced" * int(sliced), flush=True)
        del os.environ[fwd_hopper.QK_SLICES_ENV]
    lens = [700, 0, 1, 1300, 200]
    q, k, v = (torch.randn(sum(lens), h, 96, device="cuda", dtype=torch.bfloat16)
               for h in (8, 2, 2))
    cu = cu_seqlens(lens, "cuda")
    used = torch.tensor([600, 0, 1, 1000, 200], dtype=torch.int32, device="cuda")
    fwd_hopper.forward(make_args(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                 max_seqlen_q=1300, max_seqlen_k=1300, seqused_q=used,
                                 seqused_k=used))
    torch.cuda.synchronize()
    print(96, "varlen", flush=True)
    for head_dim, head_dim_v in NARROW_V:
        q = torch.randn(2, 1000, 4, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 1023, 2, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(2, 1023, 2, head_dim_v, device="cuda", dtype=torch.bfloat16)
        fwd_hopper.forward(make_args(q, k, v, causal=True))
        torch.cuda.synchronize()
        print(head_dim, head_dim_v, flush=True)
""")


@pytest.fixture(scope="module")
def layer_kernels_terminate(tmp_path_factory):
    """The layer variants' compiles and one call each, watched (see kernel_terminates)."""
    run_watched(_SMOKE_LAYERS, "fwd_hopper layers", STEP_SECONDS, tmp_path_factory)


def run_layer_and_check(monkeypatch, q, k, v, layer: dict, **extra):
    a = make_args(q, k, v, causal=False, **layer_fields(layer, q.shape[-2]), **extra)
    # in_scope, not supports: D = 64 short causal-like windows go to fwd.py, the kernel must
    # still be right
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a)
    descales = {n: getattr(a, n) for n in ("q_descale", "k_descale", "v_descale")}
    ref, ref_lse = attention_dense(q, k, v, **reference_kw(a), **descales)
    ref_lowp, _ = attention_dense(q, k, v, lowp=True, **reference_kw(a), **descales)
    assert out.dtype == a.out_dtype and lse.dtype == torch.float32
    assert_matches_reference("out", out, ref, ref_lowp, softcap=a.softcap > 0, fp8=a.is_fp8)
    assert_lse_matches("lse", lse, ref_lse)


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("head_dim,layer", DENSE_LAYERS,
                         ids=[f"D{d}-{_layer_id(x)}" for d, x in DENSE_LAYERS])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_layer_matches_reference(monkeypatch, head_dim, layer, shape):
    run_layer_and_check(monkeypatch, *qkv(*shape, head_dim, torch.bfloat16), layer)


@pytest.mark.parametrize("layer", VARLEN_LAYERS, ids=_layer_id)
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_varlen_layer_matches_reference(monkeypatch, layer):
    """Packed ragged sequences (empty and one-token ones, a key block reaching into the next
    sequence) cut by seqused, the unused rows NaN: windows and chunks count from each
    sequence's own start and bottom-right diagonal."""
    lens_q, lens_k = [700, 0, 1, 1300, 200, 129], [500, 3, 0, 1300, 900, 129]
    q, k, v, cu_q, cu_k = _varlen_qkv(lens_q, lens_k, 8, 2, 128, extra_q=70, extra_k=50)
    used_q, used_k = _used(lens_q), _used(lens_k)
    _poison_unused(q, cu_q.tolist(), used_q, lens_q)
    for x in (k, v):
        _poison_unused(x, cu_k.tolist(), used_k, lens_k)
    a = make_args(q, k, v, causal=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), seqused_q=used_q,
                  seqused_k=used_k, **layer_fields(layer, 8))
    assert fwd_hopper.in_scope(a)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        out, lse = fwd_hopper.forward(a)
    kw = dict(seqused_q=used_q, seqused_k=used_k, **reference_kw(a))
    ref, ref_lse = attention_varlen(q, k, v, cu_q, cu_k, **kw)
    ref_lowp, _ = attention_varlen(q, k, v, cu_q, cu_k, lowp=True, **kw)
    total_q = int(cu_q[-1])
    rows = torch.arange(q.shape[0]) < total_q
    assert_matches_reference("out", out, ref, ref_lowp, rows=rows, softcap=a.softcap > 0)
    assert_lse_matches("lse", lse, ref_lse, rows=rows)
    assert out[total_q:].isnan().all() and lse[:, total_q:].isnan().all(), "rows past the end"


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_fp8_layer_matches_reference(monkeypatch):
    """fp8 with window, softcap and sinks: the softcap's scale takes the descales, and the sink
    joins fp8's shifted P sum."""
    q, k, v, descale = _fp8_inputs(2, 1000, 1023, 4, 2, 128, descaled=True)
    q_descale, k_descale, v_descale = descale
    run_layer_and_check(monkeypatch, q, k, v, FP8_LAYER, q_descale=q_descale,
                        k_descale=k_descale, v_descale=v_descale)


@pytest.mark.gpu
@on_hopper
def test_layers_route_here():
    """At model sizes every layer feature reaches this kernel; a window side that reaches past
    every key is no bound (the plain kernels run)."""
    from flash_attn_3.backends.triton import routes

    q, k, v = qkv(1, 8192, 8192, 8, 8, 128, torch.bfloat16)
    for layer in (dict(window=(4095, 0)), dict(softcap=50.0), dict(chunk=8192),
                  dict(sinks=True, window=(127, 0)), dict(window=(8191, 0))):
        a = make_args(q, k, v, causal=False, **layer_fields(layer, 8))
        assert routes.forward_kernel(a) is fwd_hopper, layer
    assert fwd_hopper.mask_bounds(make_args(q, k, v, causal=False, window_left=8191,
                                            window_right=0)) == (None, 0, None)


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("head_dim,causal", PADDED_HEAD_DIMS,
                         ids=[f"D{d}-{'causal' if c else 'full'}" for d, c in PADDED_HEAD_DIMS])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_padded_head_dim_matches_reference(monkeypatch, head_dim, causal, shape):
    """The kernel writes the head dim's columns only: out is contiguous, so a padding column
    written would land on the next head's first ones, which the comparison would catch."""
    run_and_check(monkeypatch, *qkv(*shape, head_dim, torch.bfloat16), causal=causal)


def qkv_narrow(shape, head_dim, head_dim_v):
    """qkv's bf16 inputs with V head_dim_v wide."""
    q, k, v = qkv(*shape, head_dim, torch.bfloat16)
    if head_dim_v != head_dim:
        v = torch.randn(*k.shape[:-1], head_dim_v, device="cuda", dtype=torch.bfloat16)
    return q, k, v


# Head dims whose QK wgmma can skip the padding (fwd_hopper.qk_used), with V's head dim
QK_SLICED = [(96, 96, True), (96, 96, False), (80, 80, True), (192, 192, True), (192, 128, True)]


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("head_dim,head_dim_v,causal", QK_SLICED, ids=str)
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_qk_slices_match_reference(monkeypatch, head_dim, head_dim_v, causal, shape):
    """S from the head dim's columns only (two slices; FLASH_ATTN_3_GLUON_QK_SLICES=0 reads the
    whole tile)."""
    monkeypatch.delenv(fwd_hopper.QK_SLICES_ENV, raising=False)  # taken by default
    monkeypatch.delenv(fwd_hopper.DV_ENV, raising=False)  # taken by default
    run_and_check(monkeypatch, *qkv_narrow(shape, head_dim, head_dim_v), causal=causal)


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_qk_slices_varlen(monkeypatch):
    monkeypatch.delenv(fwd_hopper.QK_SLICES_ENV, raising=False)  # taken by default
    run_seqused_and_check(monkeypatch, 96, causal=True)


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_padded_head_dim_varlen(monkeypatch):
    run_seqused_and_check(monkeypatch, 96, causal=True)


def test_narrow_v_switch(monkeypatch):
    """A V narrower than Q and K (DeepSeek's 192 / 128) is taken by default; switched off, it
    stays on the portable kernel and the refusal names the switch; a V whose tiles are wider
    than Q's never comes here."""
    q, k, v = (torch.empty(1, 64, h, d, dtype=torch.bfloat16) for h, d in ((4, 192), (2, 192),
                                                                          (2, 128)))
    monkeypatch.setenv(fwd_hopper.DV_ENV, "0")
    assert fwd_hopper.DV_ENV in fwd_hopper.dv_refusal(make_args(q, k, v, causal=True))
    monkeypatch.delenv(fwd_hopper.DV_ENV)
    assert fwd_hopper.dv_refusal(make_args(q, k, v, causal=True)) is None
    assert fwd_hopper.dv_refusal(make_args(q, k, q, causal=True)) is None  # v as wide as q
    # a V wider than q's tiles (q's 128 against 192)
    narrow_q, narrow_k = q[..., :128], k[..., :128]
    assert "narrower" in fwd_hopper.dv_refusal(make_args(narrow_q, narrow_k, k, causal=True))


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim,head_dim_v", NARROW_V, ids=lambda d: str(d))
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_narrow_v_matches_reference(monkeypatch, head_dim, head_dim_v, causal, shape):
    """O is V's width: written through buffers of its own, every column of it (out is
    contiguous: a column past head_dim_v would land on the next head's)."""
    monkeypatch.delenv(fwd_hopper.DV_ENV, raising=False)  # taken by default
    run_and_check(monkeypatch, *qkv_narrow(shape, head_dim, head_dim_v), causal=causal)


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("layer_kernels_terminate")
def test_narrow_v_varlen(monkeypatch):
    monkeypatch.delenv(fwd_hopper.DV_ENV, raising=False)  # taken by default
    run_seqused_and_check(monkeypatch, 192, causal=True, head_dim_v=128)


@pytest.mark.gpu
@on_hopper
def test_narrow_v_routes_here_by_default(monkeypatch):
    from flash_attn_3.backends.triton import routes

    q, k, _ = qkv(1, 256, 256, 4, 2, 192, torch.bfloat16)
    v = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
    a = make_args(q, k, v, causal=True)
    monkeypatch.setenv(fwd_hopper.DV_ENV, "0")
    assert routes.forward_kernel(a) is not fwd_hopper
    assert fwd_hopper.DV_ENV in routes.forward_route(a)[1]
    monkeypatch.delenv(fwd_hopper.DV_ENV)
    assert routes.forward_kernel(a) is fwd_hopper

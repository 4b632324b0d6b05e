"""Gluon Hopper backward (flash_attn_3/backends/triton/bwd_hopper.py) against float64 autograd of
tests/reference_math.py, judged by the spec's gradient rule (sec 8, tests/tolerance.py).

Anywhere: the kernel compiles ahead of time for sm_90 (the triton wheel ships ptxas) into wgmma
with register reallocation between the partitions and TMA reduce-adds for dQ, so a drift in
triton's experimental Gluon API shows up without a GPU. On an sm_90 GPU (tests marked gpu): dq,
dk, dv over the kernel's scope (head dims 64/128/256, causal or not, GQA/MQA, seqlen_q !=
seqlen_k, ragged tails, rows that see no key, strided q/k/v, fp16) with every buffer the backward
allocates starting as NaN and fresh random inputs each run. The first GPU test runs every config
once in a subprocess under a time limit, so a pipeline deadlock or a crash fails this module
(naming the config) instead of hanging the run or poisoning the process. Query lengths that are
not a multiple of 4 are in every list: they put the statistics' TMA boxes off 16 bytes unless
prep() pads the rows (an illegal instruction on the H100, 15:40 UTC).
"""

from __future__ import annotations

import itertools
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
from hopper import COMMON_SHAPES, alternative_configs, gluon_required, on_hopper, qkv
import reference_math as rm
from inputs import poison_new_buffers
from tolerance import assert_grad_matches
from watched import run_watched

from flash_attn_3.backends.params import AttnArgs
from flash_attn_3.backends.triton import bwd_hopper, routes

TESTS = Path(__file__).resolve().parent
needs_gluon = gluon_required(bwd_hopper)
ALT_CONFIGS = (alternative_configs(bwd_hopper.CANDIDATES)
               + alternative_configs(bwd_hopper.DETERMINISTIC_CANDIDATES))
SHAPES = COMMON_SHAPES + [
    (2, 640, 700, 8, 2),  # a group of 4 query heads per KV head over several blocks
]


def make_args(q, k, v, *, causal: bool, softmax_scale=None) -> AttnArgs:
    return AttnArgs.plain(q, k, v, softmax_scale=softmax_scale or 1.0 / math.sqrt(q.shape[-1]),
                          window_right=0 if causal else -1)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90 (no GPU needed)


@needs_gluon
@pytest.mark.parametrize("head_dim,causal", [(128, True), (64, False)])
def test_compiles_for_sm90(head_dim, causal):
    # A subprocess: the compiler must not run under the interpreter switch conftest sets.
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"),
           "--head-dim", str(head_dim)] + (["--causal"] if causal else [])
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    # per consumer warpgroup: S^T, dP^T (K = D), dV, dK (K = BLOCK_M), dQ (K = 128 keys)
    block_m = bwd_hopper.CONFIGS[head_dim][0]
    per_warpgroup = 2 * head_dim // 16 + 2 * block_m // 16 + bwd_hopper.BLOCK_N // 16
    assert got["wgmma_ptx"] == 2 * per_warpgroup and got["hgmma_sass"] == got["wgmma_ptx"], got
    # dQ leaves by TMA reduce-add, one per 128-byte chunk of each warpgroup's half
    chunks = head_dim // 2 // bwd_hopper.DQ_REDUCE_COLS
    assert got["tma_reduce_ptx"] == 2 * chunks and got["tma_loads_ptx"] > 0, got
    assert got["num_warps"] == 12, got
    assert bwd_hopper._PRODUCER_REGS in got["setmaxnreg"], got
    assert bwd_hopper._CONSUMER_REGS in got["setmaxnreg"], got
    # D = 128 parks a few scalars (addresses, loop bounds) in local memory; a spilled
    # accumulator would be kilobytes
    assert got["spill_bytes"] <= 512 and got["shared_bytes"] <= 227 * 1024, got
    # the layer variants (window, softcap, varlen, padded head dims) leave the plain kernels'
    # SASS as it was before them (tests/bwd_hopper_plain_sass.json; `aot_bwd_hopper.py
    # --check-plain` compares every recorded variant)
    assert got["recorded_sass_same"], got


@needs_gluon
@pytest.mark.parametrize("head_dim,config", [(d, c) for d, c in ALT_CONFIGS if c.prefetch_s],
                         ids=str)
def test_candidates_compile_for_sm90(head_dim, config):
    """The round-2 variants (statistics by TMA, S^T of the next block issued early): one more
    S^T issue than the loop holds (the prologue's), both statistics loads per stage, registers
    within the budget."""
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"),
           "--head-dim", str(head_dim), "--causal", "--config",
           ",".join(str(int(x)) for x in config)]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    block_m = config.block_m
    # S^T, dP^T (K = D), dV, dK (K = BLOCK_M), dQ (K = 128 keys, one wgmma row of 64 queries
    # at a time; none where bwd.py computes dQ), the prologue's S^T
    dq_wgmma = block_m // 64 * bwd_hopper.BLOCK_N // 16 if config.dq_in_kernel else 0
    per_warpgroup = 2 * head_dim // 16 + 2 * block_m // 16 + dq_wgmma + head_dim // 16
    assert got["wgmma_ptx"] == 2 * per_warpgroup and got["hgmma_sass"] == got["wgmma_ptx"], got
    # lse2 and delta: one rank-2 copy each (a row of the (B * H, S) statistics)
    assert got["tma_loads_2d_ptx"] == 2, got
    # D = 128 with dQ in the kernel: 148 B under 3.6's by-lane masks (its loop 730 instructions,
    # 15 local ops; the column compare: 72 B, 941, 8)
    spills = 160 if head_dim == 128 and config.dq_in_kernel else 128
    assert got["spill_bytes"] <= spills and got["shared_bytes"] <= 227 * 1024, got


@needs_gluon
@pytest.mark.parametrize("head_dim,config", [
    (128, bwd_hopper.CONFIGS[128]), (128, bwd_hopper.DETERMINISTIC_CONFIGS[128])] + [
    (d, c) for d, c in alternative_configs(bwd_hopper.CANDIDATES) if c.early_dv], ids=str)
def test_early_dv_overlaps_the_elementwise_work(head_dim, config):
    """pin_dp (the D = 128 default; ptxas sinks the dP^T issue below the softmax otherwise): in
    each consumer loop the exp2 of P^T run under dP^T (the loop's second wgmma group), all of
    them with early_dv (dV issued before dP^T's wait), which also leaves no exp2 and no bf16
    pack (P^T, dS^T) with no wgmma of the warpgroup in flight. No ptxas warning (serialized
    wgmmas) either way."""
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"),
           "--head-dim", str(head_dim), "--causal", "--config",
           ",".join(str(int(x)) for x in config)]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert not got["ptxas_warnings"] and len(got["wgmma_waits"]) == 2, got
    for loop, waits in zip(got["kv_loops"], got["wgmma_waits"]):
        dp = waits["groups"][1]
        under_dp, exp2 = dp["ops"].get("MUFU.EX2", 0), loop["ops"]["MUFU.EX2"]
        # pin_dp alone: ptxas leaves the last few exp2 (28 of 32 under dP^T at D = 128) to the
        # dependent pack; unpinned, none of them ran under dP^T
        assert under_dp == exp2 if config.early_dv else 8 * under_dp >= 7 * exp2, waits
        if config.early_dv:
            assert not {"MUFU.EX2", "F2FP"} & set(waits["exposed"]), waits
    assert got["spill_bytes"] <= 256, got


@needs_gluon
@pytest.mark.parametrize("dq_in_kernel", [False, True], ids=["dq-by-bwd.py", "dq-in-kernel"])
def test_split_kernel_compiles_for_sm90(dq_in_kernel):
    """Head dim 256 (_bwd_kernel_split): each side S^T or dP^T (K = 256), dV or dK (K = 64
    queries), and with dQ in the kernel dQ for half the head dim (K = 64 keys) and a dQ reduce
    per 128-byte chunk of a half; the dK/dV accumulators (128 registers a thread) not spilled.
    The default (CONFIGS[256]) leaves dQ to bwd.py with two stages; dQ in the kernel fits one."""
    config = "64,1,1,1,0" if dq_in_kernel else "64,2,0,1,0"
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"),
           "--head-dim", "256", "--causal", "--config", config]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    per_side = 256 // 16 + 64 // 16 + (64 // 16 if dq_in_kernel else 0)
    assert got["wgmma_ptx"] == 2 * per_side and got["hgmma_sass"] == got["wgmma_ptx"], got
    reduces = 2 * 128 // bwd_hopper.DQ_REDUCE_COLS if dq_in_kernel else 0
    assert got["tma_reduce_ptx"] == reduces, got
    assert got["tma_loads_2d_ptx"] == 2 and got["num_warps"] == 12, got
    assert got["spill_bytes"] <= 256 and got["shared_bytes"] <= 227 * 1024, got


def _aot(*flags):
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"), *flags]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_gluon
@pytest.mark.parametrize("head_dim_v,variant", [
    (128, ["--causal"]), (128, ["--window", "64,0", "--softcap", "20", "--varlen", "--seqused"])],
    ids=str)
def test_narrow_v_compiles_for_sm90(head_dim_v, variant):
    """DeepSeek's 192 / 128 in the split kernel: S^T over Q / K's 256-wide tiles (their 192
    columns with the slices), dP^T over V's
    width, dV (S side) at V's width and dK at K's, each wgmma at its own N; V and dO take
    (256 - dv) fewer columns of shared memory than D = 256's tiles (one V tile, a dO tile per
    stage), and nothing spills."""
    got = _aot("--head-dim", "192", "--head-dim-v", str(head_dim_v), *variant)
    plain = _aot("--head-dim", "192", *variant)
    stages = bwd_hopper.CONFIGS[256].stages
    from flash_attn_3.backends.triton.fwd_hopper import qk_used

    qk_cols = qk_used(192, 256) or 256  # S^T over Q / K's own columns by default
    s_side = qk_cols // 16 + 64 // 16  # S^T, dV
    dp_side = head_dim_v // 16 + 64 // 16  # dP^T, dK
    assert got["wgmma_ptx"] == s_side + dp_side == got["hgmma_sass"], got
    assert got["shared_bytes"] == plain["shared_bytes"] - (256 - head_dim_v) * 2 * 64 * (
        1 + stages), (got, plain)
    assert got["spill_bytes"] == 0 and not got["ptxas_warnings"], got
    assert all(loop["local"] == 0 for loop in got["kv_loops"]) and got["kv_loops"], got


@needs_gluon
@pytest.mark.parametrize("head_dim,variant,s_saved,dp_saved", [
    (96, ["--causal", "--deterministic"], 2, 2), (96, ["--window", "100,0", "--varlen"], 2, 2),
    (192, ["--causal"], 4, 4), (192, ["--head-dim-v", "128", "--causal"], 4, 0),
    (96, ["--causal"], 0, 0)], ids=str)
def test_qk_slices_skip_the_padding(head_dim, variant, s_saved, dp_saved):
    """S^T (and dP^T, where V is as padded as Q) over the head
    dim's own columns, (tile width - head dim) / 16 fewer wgmma k-steps each, with no more
    spills and nothing in local memory; not in the 128-key kernel with dQ in it (D = 96's
    default: its registers are taken), where the kernel stays the padded one."""
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    reports = []
    for sliced in "01":
        cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"),
               "--head-dim", str(head_dim), *variant]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**env, "FLASH_ATTN_3_GLUON_QK_SLICES": sliced})
        assert done.returncode == 0, done.stderr[-3000:]
        reports.append(json.loads(done.stdout.splitlines()[-1]))
    whole, got = reports
    if bwd_hopper.tile_width(head_dim) in bwd_hopper.SPLIT_HEAD_DIMS:
        saved = [dp_saved, s_saved]  # the SASS holds the dP side's loop first
    else:  # each warpgroup issues both
        saved = [s_saved + dp_saved] * 2
    assert [loop["gmma"] + n for loop, n in zip(got["kv_loops"], saved)] == [
        loop["gmma"] for loop in whole["kv_loops"]], (got, whole)
    assert got["hgmma_sass"] == got["wgmma_ptx"] and not got["ptxas_warnings"], got
    assert got["spill_bytes"] <= whole["spill_bytes"], (got, whole)
    assert all(loop["local"] <= old["local"] for loop, old in zip(got["kv_loops"],
                                                                   whole["kv_loops"])), got


@needs_gluon
def test_plain_kernels_sass_unchanged():
    """Every recorded plain variant (bf16 / fp16, D = 64 / 128 / 256, causal or not,
    deterministic or not) compiles to the SASS it had before the layer variants existed
    (tests/bwd_hopper_plain_sass.json)."""
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"), "--check-plain"]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# (head dim, aot_bwd_hopper.py flags): what a model layer launches. The plain kernel of the same
# config spills (sm_90 ptxas, triton 3.6): D = 64 and 256 none, D = 128 52-64 bytes with dQ in the
# kernel and 136-160 with dQ left to bwd.py, which the D = 128 windowed and packed calls take
# (bwd_hopper.LAYER_CONFIGS).
LAYER_VARIANTS = [
    (64, ["--window", "128,0", "--sinks"]),  # GPT-OSS
    (128, ["--window", "100,0"]),  # Mistral
    (128, ["--window", "40,20", "--varlen", "--seqused"]),
    (128, ["--softcap", "30"]),
    (256, ["--softcap", "50", "--causal"]),  # Gemma 2
    (256, ["--window", "40,20", "--softcap", "30", "--varlen"]),
    (64, ["--causal", "--varlen", "--seqused", "--deterministic"]),
    (96, ["--causal"]),
    (192, ["--window", "40,0", "--varlen"]),
]
PLAIN_SPILLS = {64: 0, 128: 160, 256: 0}


@needs_gluon
@pytest.mark.parametrize("head_dim,variant", LAYER_VARIANTS, ids=str)
def test_layer_variants_compile_for_sm90(head_dim, variant):
    """Sliding window, softcap, sinks, packed / seqused sequences and a head dim padded to the
    next tile width compile into the same pipeline: the wgmmas of the plain kernel of the same
    config (none serialized), spills within the plain kernels' (plus a few scalars: at most 64
    bytes and 8 local accesses per loop), and softcap's tanh one MUFU op per exp2."""
    cmd = [sys.executable, str(TESTS.parent / "scripts" / "aot_bwd_hopper.py"),
           "--head-dim", str(head_dim)] + variant
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    width = bwd_hopper.tile_width(head_dim)
    dq_in_kernel = "--deterministic" not in variant and (
        bwd_hopper.LAYER_CONFIGS.get(width, bwd_hopper.CONFIGS[width]).dq_in_kernel
        if {"--window", "--varlen", "--seqused"} & set(variant)
        else bwd_hopper.CONFIGS[width].dq_in_kernel)
    # S^T and dP^T over a padded head dim's own columns where backward() slices them
    from flash_attn_3.backends.triton.fwd_hopper import qk_used

    split = width in bwd_hopper.SPLIT_HEAD_DIMS
    cols = (qk_used(head_dim, width) if split or not dq_in_kernel else 0) or width
    if split:
        per_side = cols // 16 + 64 // 16 + (64 // 16 if dq_in_kernel else 0)
        wgmma = 2 * per_side
    else:
        dq = bwd_hopper.BLOCK_N // 16 if dq_in_kernel else 0
        wgmma = 2 * (2 * cols // 16 + 2 * 64 // 16 + dq)
    assert got["wgmma_ptx"] == wgmma and got["hgmma_sass"] == wgmma, got
    assert not got["ptxas_warnings"], got
    assert got["spill_bytes"] <= PLAIN_SPILLS[width] + 64, got
    # The softcapped D = 128 loops hold the fp16 tanh factor too: with the by-lane masks 9 / 6
    # local ops under triton 3.6 (the column compare: 6 / 2), the loops 3-7 % shorter.
    local = 10 if "--softcap" in variant and width == 128 else 8
    assert all(loop["local"] <= local for loop in got["kv_loops"]) and got["kv_loops"], got
    for loop in got["kv_loops"]:
        tanh = loop["ops"].get("MUFU.TANH", 0)
        assert tanh == (loop["ops"].get("MUFU.EX2", 0) if "--softcap" in variant else 0), loop


def test_refuses_without_hopper():
    q = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    assert not bwd_hopper.supports(make_args(q, q, q, causal=False))


@pytest.mark.parametrize("block_m", [64, 128])
def test_dq_accumulator_keeps_each_sequence_apart(block_m):
    """Packed, the kernel reduce-adds dQ a whole query block at a time from row
    cu_seqlens_q[b] + b * block_m of the accumulator, and the last block of a sequence reaches
    block_m - 1 rows past its end. Those rows hold whatever that block computed there (NaN where
    the sequence's own keys are NaN: the H100 run of 2026-12-07 23:50 UTC leaked it into the
    next sequence's dq): they must land in slack, never in another sequence's rows or the
    buffer's spare tail."""
    lens = [int(n) for n in torch.randint(0, 3 * block_m, (5, ))] + [0, 1, block_m, block_m + 1]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    spare = 3
    total = int(cu[-1]) + spare
    q = torch.empty(total, 2, 8)
    acc = bwd_hopper.dq_accumulator(q, cu, block_m)
    assert acc.dtype == torch.float32 and acc.shape[1:] == q.shape[1:] and not acc.any()
    for b, n in enumerate(lens):
        start = int(cu[b]) + b * block_m
        for m0 in range(0, n, block_m):
            block = torch.full((block_m, 2, 8), float(b + 1))
            block[max(n - m0, 0):] = float("nan")  # the rows past the sequence's end
            assert start + m0 + block_m <= acc.shape[0]
            acc[start + m0:start + m0 + block_m] += block
    got = bwd_hopper.dq_rows(acc, cu, block_m, total)
    want = torch.zeros(total, 2, 8)
    for b in range(len(lens)):
        want[int(cu[b]):int(cu[b + 1])] = b + 1
    assert torch.equal(got, want)
    dense = torch.empty(2, 5, 2, 8)
    assert bwd_hopper.dq_accumulator(dense, None, block_m).shape == dense.shape


@needs_gluon
@pytest.mark.parametrize("seqlen_q", [1, 77, 640, 1023])
def test_statistics_rows_start_on_16_bytes(seqlen_q):
    """A TMA copy must start on a 16-byte aligned global address once its coordinates are applied
    (H100: an illegal instruction otherwise). The statistics' boxes start at (row, m0), m0 a
    multiple of BLOCK_M, so every row of prep()'s lse2 / delta must start on 16 bytes whatever
    seqlen_q is, and the descriptor must step by that padded stride. prep() runs under the
    interpreter here (tiny shapes; on the GPU where there is one) and must still write every real
    row."""
    from flash_attn_3.backends.triton import bwd

    batch, heads, head_dim = 2, 3, 64
    q = torch.randn(batch, seqlen_q, heads, head_dim, device=DEVICE)
    out, dout = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(batch, heads, seqlen_q, device=DEVICE)
    lse2, delta = bwd.prep(out, dout, lse, make_args(q, q, q, causal=False),
                           pad=bwd_hopper.STATS_PAD)
    torch.testing.assert_close(lse2, lse * bwd_hopper.LOG2E)
    torch.testing.assert_close(delta, (out * dout).sum(-1).transpose(1, 2))
    for block_m in sorted({c.block_m for c in bwd_hopper.CONFIGS.values()}
                          | {c.block_m for _, c in ALT_CONFIGS}):
        for x in (lse2, delta):
            desc = bwd_hopper._stats_descriptor(x, block_m)
            assert desc.shape == [batch * heads, seqlen_q] and desc.block_shape == [1, block_m]
            assert x.data_ptr() % 16 == 0 and desc.strides[0] * x.element_size() % 16 == 0
            assert block_m * x.element_size() % 16 == 0
            # the element the producer's box for (b, h, m0) starts at is where prep wrote it
            flat = torch.as_strided(x, (x.untyped_storage().nbytes() // 4, ), (1, ))
            for bh in range(batch * heads):
                for m0 in range(0, seqlen_q, block_m):
                    at = bh * desc.strides[0] + m0
                    assert at * x.element_size() % 16 == 0, (bh, m0)
                    assert flat[at] == x[bh // heads, bh % heads, m0]


# ---------------------------------------------------------------------------------------------
# On the GPU


_SMOKE = textwrap.dedent("""
    import torch
    from test_bwd_hopper import ALT_CONFIGS, make_args
    from flash_attn_3.backends.triton import bwd_hopper
    # what the tests below compile: the defaults both ways; causal only, the alternatives and
    # the deterministic variant (the default with dQ left to bwd.py). seqlen_q = 1001: the
    # statistics' rows are not a whole number of 16 bytes long.
    det = list(bwd_hopper.DETERMINISTIC_CONFIGS.items())
    for head_dim, config in [(d, None) for d in bwd_hopper.CONFIGS] + ALT_CONFIGS + det:
        for causal in (True, ) if config else (False, True):
            q, do = (torch.randn(2, 1001, 8, head_dim, device="cuda", dtype=torch.bfloat16)
                     for _ in "qo")
            k, v = (torch.randn(2, 900, 2, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in "kv")
            lse = torch.randn(2, 8, 1001, device="cuda") + 10
            bwd_hopper.backward(do, q, k, v, do, lse, make_args(q, k, v, causal=causal),
                                config=config)
            torch.cuda.synchronize()
            print(head_dim, config, "causal" if causal else "full", flush=True)
""")
STEP_SECONDS = 120  # one compile and one small call


@pytest.fixture(scope="module")
def kernel_terminates(tmp_path_factory):
    """Every config once, in a subprocess watched step by step: a deadlocked pipeline fails the
    module (naming the config) instead of hanging the GPU run."""
    run_watched(_SMOKE, "bwd_hopper", STEP_SECONDS, tmp_path_factory)


def _reference(q, k, v, dout, *, causal, softmax_scale):
    """out and lse of the float64 forward, and {exact: (dq, dk, dv)} from float64 autograd
    (exact) and autograd in the input precision (the rounding a kernel is allowed 2x of)."""
    out = torch.empty_like(dout)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device)
    grads = {}
    for exact in (True, False):
        dtype = torch.float64 if exact else q.dtype
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        for b in range(q.shape[0]):
            o, l = rm.attention(*(t[b] for t in leaves), softmax_scale=softmax_scale,
                                causal=causal, lowp=not exact)
            o.backward(dout[b].to(o.dtype))
            if exact:
                out[b] = o.detach().to(q.dtype)
                lse[b] = l.detach().float()
        grads[exact] = [t.grad for t in leaves]
    return out, lse, grads


def run_and_check(monkeypatch, q, k, v, *, causal, softmax_scale=None, config=None,
                  deterministic=False):
    a = make_args(q, k, v, causal=causal, softmax_scale=softmax_scale)
    assert bwd_hopper.supports(a)
    dout = torch.randn_like(q)
    out, lse, grads = _reference(q, k, v, dout, causal=causal, softmax_scale=a.softmax_scale)
    with monkeypatch.context() as patch:
        poison_new_buffers(patch)
        got = bwd_hopper.backward(dout, q, k, v, out, lse, a, deterministic, config=config)
    for name, g, ref, lowp, x in zip(("dq", "dk", "dv"), got, grads[True], grads[False],
                                     (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_grad_matches(name, g, ref, lowp)
    return got, (dout, q, k, v, out, lse, a)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_matches_reference(monkeypatch, shape, causal, head_dim):
    run_and_check(monkeypatch, *qkv(*shape, head_dim, torch.bfloat16), causal=causal)


@pytest.mark.parametrize("shape", [(2, 701, 900, 8, 4), (2, 77, 5, 4, 4), (1, 1023, 1000, 6, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("head_dim,config", ALT_CONFIGS, ids=str)
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_alternative_configs(monkeypatch, head_dim, config, shape):
    """The configs the tuning bench measures, causal (every code path), at query lengths that
    are not a multiple of 4 (the statistics' TMA boxes at every row offset mod 16 bytes)."""
    run_and_check(monkeypatch, *qkv(*shape, head_dim, torch.bfloat16), causal=True,
                  config=config)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_fp16(monkeypatch, causal, head_dim):
    run_and_check(monkeypatch, *qkv(2, 513, 257, 6, 3, head_dim, torch.float16), causal=causal)


@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_strided_qkv_and_scale(monkeypatch):
    """q/k/v as views of one packed (B, S, 3, H, D) tensor, and a softmax_scale of the caller's."""
    packed = torch.randn(2, 600, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = packed.unbind(2)
    run_and_check(monkeypatch, q, k, v, causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.gpu
@on_hopper
@pytest.mark.usefixtures("kernel_terminates")
def test_deterministic_path_is_bitwise_stable(monkeypatch, head_dim):
    """deterministic=True: dK/dV here, dQ by bwd.py's atomic-free kernel; two runs agree bit for
    bit (the router sends deterministic calls here too, see supports())."""
    q, k, v = qkv(2, 1000, 1000, 8, 2, head_dim, torch.bfloat16)
    got, call = run_and_check(monkeypatch, q, k, v, causal=True, deterministic=True)
    again = bwd_hopper.backward(*call, True)
    for name, x, y in zip(("dq", "dk", "dv"), got, again):
        assert torch.equal(x, y), name


@pytest.mark.gpu
@on_hopper
def test_scope_and_routing(monkeypatch):
    q, k, v = qkv(1, 256, 256, 4, 2, 128, torch.bfloat16)
    base = make_args(q, k, v, causal=False)
    assert bwd_hopper.supports(make_args(q, k, v, causal=True)) and bwd_hopper.supports(base)
    assert routes.backward_kernel(base, False) is bwd_hopper
    assert routes.backward_kernel(base, True) is bwd_hopper
    monkeypatch.setenv("FLASH_ATTN_3_GLUON", "0")
    assert routes.backward_kernel(base, False) is not bwd_hopper
    monkeypatch.undo()  # the run's own setting: =1 where it checks a triton not yet verified
    # the model layers' variants are in scope (tests/test_bwd_hopper_layers.py checks them)
    in_scope = [
        dict(window_left=32), dict(window_right=16), dict(softcap=5.0),
        dict(sinks=torch.zeros(4, device="cuda")),
        dict(seqused_k=torch.full((1,), 100, dtype=torch.int32, device="cuda")),
    ]
    for change in in_scope:
        changed = AttnArgs(**{**base.__dict__, **change})
        if "seqused_k" in change:
            # taken by default since its racecheck run; the switch's 0 sends it to bwd.py
            monkeypatch.setenv(bwd_hopper.LAYERS_ENV, "0")
            assert not bwd_hopper.supports(changed)
            assert "switched off" in routes.backward_route(changed)[1]
            monkeypatch.delenv(bwd_hopper.LAYERS_ENV)
        assert bwd_hopper.supports(changed), change
        monkeypatch.delenv(bwd_hopper.LAYERS_ENV, raising=False)
    # attention_chunk has no backward (officially neither); fp8, qv, paged K/V are not here
    out_of_scope = [dict(attention_chunk=64), dict(softcap=-1.0),
                    dict(sinks=torch.zeros(3, device="cuda"))]
    for change in out_of_scope:
        assert not bwd_hopper.supports(AttnArgs(**{**base.__dict__, **change})), change
    # rows past seqused_q (or past a packed sequence) would reach the wgmmas: opt-in only
    used_q = AttnArgs(**{**base.__dict__, "seqused_q": torch.full((1,), 100, dtype=torch.int32,
                                                                   device="cuda")})
    assert not bwd_hopper.supports(used_q)
    assert bwd_hopper.VARLEN_ENV in routes.backward_route(used_q)[1]
    monkeypatch.setenv(bwd_hopper.VARLEN_ENV, "1")
    assert bwd_hopper.supports(used_q)
    monkeypatch.delenv(bwd_hopper.VARLEN_ENV)
    x = torch.randn(1, 256, 4, 96, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv(bwd_hopper.LAYERS_ENV, "1")
    assert bwd_hopper.supports(make_args(x, x, x, causal=False))  # 128-wide tiles
    x = torch.randn(1, 256, 4, 264, device="cuda", dtype=torch.bfloat16)
    assert not bwd_hopper.supports(make_args(x, x, x, causal=False))
    x = torch.randn(1, 256, 4, 256, device="cuda", dtype=torch.bfloat16)
    assert routes.backward_kernel(make_args(x, x, x, causal=True), False) is bwd_hopper

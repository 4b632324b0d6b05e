"""The combine kernel (combine.py) compiles for sm_90 with no shared memory, for every block choice
combine_launch makes, and its one-pass merge (a running max, rescaled sums) matches float64.

compute-sanitizer's racecheck reported write-write hazards in `_combine_kernel` on an H100
(`flash_attn_combine(torch.randn(s, 2, 129, 4, 128), lse)`, s = 2, 17, 133): its reductions over
splits and the layout conversions of their results went through shared memory, where every thread
holding a copy of a value wrote it to the same address. Same data, so no wrong result, but a
finding each time; with no shared memory there is nothing for racecheck to report.

The compile check is offline, like test_aot_portable.py: triton's own compiler in a subprocess
(not under the interpreter switch conftest sets) with a fresh cache, on a machine with no GPU.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

# importlib: the package's routing functions may shadow the submodule names.
combine = importlib.import_module("flash_attn_3.backends.triton.combine")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parent.parent

# (num_splits, head_dim, out dtype, sinks): every BLOCK_S (1, 2, 4, 8) and BLOCK_D (8, 16, 32)
# combine_launch picks, each out dtype, with and without sinks; head dims 40 and 72 leave the
# rows unaligned, 512 is MLA's dv.
CASES = [(1, 128, "bfloat16", False), (2, 64, "float16", True), (3, 40, "float32", False),
         (17, 128, "bfloat16", True), (133, 256, "bfloat16", False), (5, 8, "bfloat16", True),
         (9, 16, "float32", False), (7, 512, "bfloat16", False), (33, 72, "float16", True)]

COMPILE = """
import json, sys
sys.path.insert(0, "scripts")
import aot_portable as ap
import torch
from flash_attn_3.backends.triton import combine
from flash_attn_3.backends.triton.launch import Launch

for splits, head_dim, dtype, with_sinks in json.loads(sys.argv[1]):
    heads = 4
    part, lse = torch.empty(splits, 2, 129, heads, head_dim), torch.empty(splits, 2, 129, heads)
    out = torch.empty(2, 129, heads, head_dim, dtype=getattr(torch, dtype))
    sinks = torch.empty(heads) if with_sinks else None
    launch = Launch(*combine.combine_launch(part, lse, out, torch.empty(2, 129, heads), sinks=sinks))
    kernel, _ = ap.compile_run(*ap.launch_as_run(launch), 90)
    print(json.dumps(dict(case=[splits, head_dim, dtype, with_sinks], blocks=launch.constexprs[2:],
                          shared=kernel.metadata.shared,
                          local_allocs=kernel.asm["ttgir"].count("ttg.local_alloc"))))
"""

offline = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="offline compile check (CI runs it); skipped where a GPU is")


@offline
def test_combine_uses_no_shared_memory_on_sm90():
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(CASES)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(CASES), done.stderr[-3000:]
    bad = [r for r in rows if r["shared"] or r["local_allocs"]]
    assert not bad, "\n".join(map(json.dumps, bad))
    # the cases still reach every BLOCK_S and BLOCK_D (the constexprs end BLOCK_S, BLOCK_M, BLOCK_D)
    assert {r["blocks"][0] for r in rows} == {1, 2, 4, 8}, rows
    assert {r["blocks"][2] for r in rows} == {8, 16, 32}, rows


def reference(out_partial, lse_partial, sinks, empty_lse):
    """float64: the sink is one more split whose partial is 0, for rows that saw a key."""
    lse, part = lse_partial.double(), out_partial.double().nan_to_num(0.0)
    empty = (lse == float("-inf")).all(0)
    if sinks is not None:
        lse = torch.cat([lse, sinks.double().expand(1, *lse.shape[1:])])
        part = torch.cat([part, torch.zeros_like(part[:1])])
    final = torch.logsumexp(lse, 0)
    out = (torch.exp(lse - final).nan_to_num(0.0)[..., None] * part).sum(0)
    final[empty], out[empty] = empty_lse, 0.0
    return out, final


@pytest.mark.parametrize("splits,head_dim,growing,with_sinks", [
    (1, 40, False, True),  # one split; the head dim's last column tile is partly masked
    (19, 72, True, True),  # each split's max beats the last: every step rescales the sums
    (133, 96, False, True),
    (12, 8, True, False),
])
def test_combine_matches_float64(splits, head_dim, growing, with_sinks):
    batch, seqlen, heads = 2, 3, 4
    out_partial = torch.randn(splits, batch, seqlen, heads, head_dim, device=DEVICE)
    lse_partial = torch.randn(splits, batch, seqlen, heads, device=DEVICE) * 3
    if growing:
        lse_partial += 30 * torch.arange(splits, device=DEVICE).view(-1, 1, 1, 1)
    # Empty splits: -inf LSE and NaN partials that must never be read; one row empty throughout.
    empty = torch.rand(splits, batch, seqlen, heads, device=DEVICE) < 0.3
    empty[:, 1, 2, 3] = True
    lse_partial[empty] = float("-inf")
    out_partial[empty] = float("nan")
    sinks = None
    if with_sinks:
        sinks = torch.randn(heads, device=DEVICE)
        sinks[0] = 1000.0  # head 0's sink outweighs every split: the sums rescale once more
    empty_lse = float("inf") if with_sinks else float("-inf")  # the forward's and the API's
    out = torch.full((batch, seqlen, heads, head_dim), float("nan"), device=DEVICE)
    lse = torch.full((batch, seqlen, heads), float("nan"), device=DEVICE)
    combine.combine_into(out_partial, lse_partial, out, lse, empty_lse, sinks)
    ref_out, ref_lse = reference(out_partial, lse_partial, sinks, empty_lse)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)

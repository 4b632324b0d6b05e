"""The portable kernels (fwd.py, bwd.py, decode.py, combine.py, append_kv.py) compile for every GPU
generation they pick launch configs for (arch.ARCHS: sm_80, 86, 89, 90, 100, 120), offline with the
ptxas the triton wheel ships, each config within its target's shared memory and the register-spill
budget of scripts/aot_portable.py.

Default run: per kernel and arch, the default config of each head-dim class and the table's entry
with the largest K/V tiles, and a few fixed and decode choices (`--subset`); the full matrix (every config the launch code can pick) is marked
slow (FLASH_ATTN_3_SLOW_TESTS=1). Both compile in a subprocess: the compiler must not run under the
interpreter switch conftest sets, and a fresh TRITON_CACHE_DIR keeps the check honest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from flash_attn_3.backends.triton import arch  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "aot_portable.py"


def _compile(subset: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        cmd = [sys.executable, str(SCRIPT), "--json", "--jobs", "2"] + (["--subset"] if subset else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=600 if subset else 3600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.stderr[-3000:]
    return rows


def _check(rows: list[dict]) -> None:
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(json.dumps(r, default=str) for r in bad)
    for arch_name, target in arch.ARCHS.items():
        mine = [r for r in rows if r["arch"] == arch_name]
        assert all(r["shared_bytes"] <= target.shared_bytes for r in mine if "known" not in r)
        # every portable kernel is covered on every arch
        assert {r["kernel"] for r in mine} == {"fwd", "dkdv", "dq", "prep", "decode", "combine",
                                                 "append_kv"}, arch_name


# One test each (not one per arch): under pytest-xdist every worker would compile the whole set.
# Not on a GPU machine: an offline check that CI runs, and the device's time is for the GPU.
offline = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="offline compile check (CI runs it); skipped where a GPU is")


@offline
def test_default_configs_compile_within_budget():
    _check(_compile(subset=True))


@offline
@pytest.mark.slow
def test_every_config_compiles_within_budget():
    _check(_compile(subset=False))


def test_capabilities_map_to_configs():
    assert arch.arch_of(8, 0) == "sm_80" and arch.arch_of(8, 7) == "sm_80"
    assert arch.arch_of(8, 6) == "sm_86" and arch.arch_of(8, 9) == "sm_89"
    assert arch.arch_of(9, 0) == "sm_90"
    assert arch.arch_of(10, 0) == arch.arch_of(10, 3) == arch.arch_of(11, 0) == "sm_100"
    assert arch.arch_of(12, 0) == arch.arch_of(12, 1) == "sm_120"


def test_gpu_refusals(monkeypatch):
    """Below sm_80 nothing, and fp8 below sm_89, goes to the triton kernels (the call then falls
    back with this reason instead of failing to compile)."""
    def on(major, minor):
        arch._gpu_refusal.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (major, minor))

    gpu = torch.device("cuda", 0)
    try:
        on(7, 5)
        assert "sm_80" in arch.gpu_refusal(gpu, fp8=False)
        on(8, 6)
        assert arch.gpu_refusal(gpu, fp8=False) is None
        assert "sm_89" in arch.gpu_refusal(gpu, fp8=True)
        on(8, 9)
        assert arch.gpu_refusal(gpu, fp8=True) is None
    finally:
        arch._gpu_refusal.cache_clear()


def test_decode_widens_wide_mma_v2_tiles():
    """A 64-row decode tile at D = 256 takes 8 warps and 2 stages where tl.dot is mma.sync
    (sm_86: 4 warps spilled 876 bytes, 3 stages needed 100 KB); the H100's plan is unchanged."""
    from flash_attn_3.backends.triton import decode

    call = (4, 32, 4, 8, 8192, 256, 256, False, torch.device("cpu"), 0, None)
    on_sm86, on_sm90 = decode._plan(*call, "sm_86"), decode._plan(*call, "sm_90")
    assert on_sm86.block_m == on_sm90.block_m == 64
    assert on_sm86.num_warps == 8 and on_sm86.num_stages <= 2
    assert on_sm90 == decode._plan(*call)  # sm_90 is the default: what the H100 had

"""The reliability run's own machinery, on the CPU (CI's share of issue 17's differential run):
the differential runner over a few classes under the Triton interpreter, its replay of recorded
failures, and the compute-sanitizer driver's reading of the tool's output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, _SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def differential(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")  # restored after; the runner sets it
    pytest.importorskip("triton")
    return _script("reliability_differential")


def test_differential_runs_every_family_and_reports(differential, tmp_path):
    assert differential.main(["--cases", "5", "--classes", "5", "--budget", "300", "--progress", "0",
                              "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "differential.json").read_text())
    assert result["cases_run"] == result["cases_planned"] >= 5
    assert result["failures"] == [] and result["stopped"] is None
    assert all(count > 0 for count in result["per_family"].values()), result["per_family"]


def test_the_same_seed_draws_the_same_classes(differential):
    assert differential.draw_classes("kvcache", 4, 7) == differential.draw_classes("kvcache", 4, 7)
    assert differential.draw_classes("kvcache", 4, 7) != differential.draw_classes("kvcache", 4, 8)


def test_replay_runs_recorded_cases_again(differential, tmp_path):
    drawn = differential.draw_classes("varlen", 1, 3)[0]
    recorded = tmp_path / "failures.json"
    recorded.write_text(json.dumps({"failures": [dict(family="varlen", cls=0, drawn=repr(drawn), seed=12345)]}))
    assert differential.main(["--replay", str(recorded), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "differential.json").read_text())["cases_run"] == 1


def test_sanitizer_summaries_are_read():
    sanitizer = _script("reliability_sanitizer")
    memcheck = ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 2 bytes\n"
                "=========     at _attn_fwd+0x1a70\n=========     by thread (5,0,0) in block (0,1,0)\n"
                "========= Invalid __global__ read of size 2 bytes\n========= ERROR SUMMARY: 2 errors\n")
    assert sanitizer.parse(memcheck) == dict(errors=2, warnings=None,
                                             headlines=["Invalid __global__ read of size 2 bytes"])
    racecheck = "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
    assert sanitizer.parse(racecheck)["errors"] == 1 and sanitizer.parse(racecheck)["warnings"] == 2
    assert sanitizer.parse("========= ERROR SUMMARY: 0 errors\n")["errors"] == 0
    assert sanitizer.parse("workload ok\n[killed]\n")["errors"] is None, "no summary is no result, never 0"


def test_racecheck_reports_inside_tritons_dispatch_are_told_apart():
    """A report whose every access is on the kernel's def line or its gl.warp_specialize( call
    is triton's generated dispatch; one that names a statement of ours counts as ours."""
    sanitizer = _script("reliability_sanitizer")
    lines = (_SCRIPTS.parent / "flash_attn_3" / "backends" / "triton" / "fwd_hopper.py").read_text().splitlines()
    number = {what: next(i + 1 for i, text in enumerate(lines) if text.strip().startswith(what))
              for what in ("def _fwd_kernel(", "gl.warp_specialize(", "def _clear_tail(")}
    ours = number["def _clear_tail("] + 12  # a statement in _clear_tail's body
    assert not lines[ours - 1].strip().startswith("def ")
    log = "\n".join([
        "========= COMPUTE-SANITIZER",
        f"========= Error: Race reported between Read access at _fwd_kernel+0x250 in fwd_hopper.py:{number['def _fwd_kernel(']}",
        f"=========     and Write access at _fwd_kernel+0xa850 in fwd_hopper.py:{number['def _fwd_kernel(']} [278 hazards]",
        f"=========     and Write access at _fwd_kernel+0x144b0 in fwd_hopper.py:{number['gl.warp_specialize(']} [299 hazards]",
        "=========",
        f"========= Error: Race reported between Read access at _fwd_kernel+0x6840 in fwd_hopper.py:{ours}",
        f"=========     and Write access at _fwd_kernel+0x7000 in fwd_hopper.py:{ours} [4 hazards]",
        "=========",
        "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)", ""])
    parsed = sanitizer.parse(log)
    assert (parsed["errors"], parsed["triton_dispatch"], parsed["errors_ours"]) == (2, 1, 1)
    # Cut short (no summary line): the reports shown are still told apart, and errors stays
    # None, so the run is not clean.
    cut = sanitizer.parse(log.rsplit("========= RACECHECK SUMMARY", 1)[0])
    assert (cut["errors"], cut["reports"], cut["triton_dispatch"], cut["errors_ours"]) == (None, 2, 1, 1)


def test_sanitizer_driver_passes_its_call_filter_on():
    """`--only` reaches the tools' workload runs, not only a bare --workload run."""
    sanitizer = _script("reliability_sanitizer")
    cmd = sanitizer._tool_command("compute-sanitizer", "racecheck", 60, "varlen backward,combine")
    assert cmd[cmd.index("--only") + 1] == "varlen backward,combine" and cmd[-1] == "--quick"

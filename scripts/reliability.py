"""The GPU reliability run (issue 17) in one command, under one time budget, with one summary.

    python scripts/reliability.py [--budget 470] [--out DIR] [--parts tests,differential,sanitizer]
        [--cases 10000] [--classes 48] [--seed 0] [--jobs 8] [--tools memcheck,racecheck,synccheck]

Parts, in this order, each under its share of the budget (a part cut short still reports):
  tests         pytest: tests/test_reliability_hostile.py (Triton), test_reliability_concurrency.py,
                then test_reliability_large.py alone (tensors past 2^31 elements need the memory)
  differential  scripts/reliability_differential.py: the CPU suite's random generators, --cases
                cases over --classes feature combinations, failures by seed
  sanitizer     scripts/reliability_sanitizer.py: compute-sanitizer memcheck / racecheck /
                synccheck over a workload that launches every kernel file
Writes DIR/reliability.md (the summary, also printed), DIR/reliability.json and each part's log.
hypothesis (the differential's generators) is installed from .whl/ when missing.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "differential", "sanitizer")
# Run 5 (H100, budget 300 s): the tests took 100 s, the differential run 64 s for its 10,045
# cases, and the sanitizer's ~105 s cut racecheck short: it gets the largest share. Run 6 (budget
# 380 s, a fresh machine): the hostile tests' 68 s ended while they compiled, the differential
# run's 74 s reached 9,515 cases, racecheck's 95 s 11 of 13 calls: 470 s since.
_SHARES = {"tests": 0.3, "differential": 0.24, "sanitizer": 0.46}
# Elements of the largest tensor each test of test_reliability_large.py builds.
_LARGEST = {
    "test_varlen_forward_backward_past_2_31_elements": (2_156_929_024, "varlen q/k/v/dq/dk/dv"),
    "test_paged_kvcache_with_a_pool_past_2_31_elements": (2_228_224_000, "paged KV pool"),
    "test_contiguous_kvcache_row_past_2_31_elements": (2_211_840_000, "contiguous KV cache"),
    "test_combine_past_2_31_elements_and_many_splits": (2_214_592_512, "combine partials"),
}


_RUNNING: list = []  # the part's process, for the SIGINT / SIGTERM handler
_STOPPED: list = []


def _on_stop(signum, frame):
    """gpu_check.sh's cap (SIGINT, SIGKILL 20 s later): stop the running part, skip the others,
    write the summary of what ran."""
    _STOPPED.append(signal.Signals(signum).name)
    for proc in _RUNNING:
        proc.send_signal(signal.SIGINT)


def _run(cmd, cap: float, log_path: Path, env=None) -> tuple[int, float]:
    """cmd with its output in log_path; SIGINT at the cap (pytest and our scripts then report
    what they have), SIGKILL 30 s later (10 s when this run itself is being stopped).
    (exit code, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT, env=env)
        _RUNNING[:] = [proc]
        try:
            rc = proc.wait(timeout=cap)
            if _STOPPED:  # the handler interrupted it: give it a moment to report
                raise subprocess.TimeoutExpired(cmd, cap)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=10 if _STOPPED else 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            log.write(f"\n[reliability: stopped ({_STOPPED[0] if _STOPPED else f'its cap of {cap:.0f} s'})]\n")
            rc = 124 if rc == 0 else rc
        _RUNNING.clear()
    return rc, round(time.monotonic() - t0, 1)


def _ensure_hypothesis() -> str:
    if importlib.util.find_spec("hypothesis") is not None:
        return "present"
    wheels = sorted(glob.glob(str(_ROOT / ".whl" / "hypothesis-*.whl"))
                    + glob.glob(str(_ROOT / ".whl" / "sortedcontainers-*.whl")))
    if not wheels:
        return "missing (no wheel in .whl/)"
    rc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels]).returncode
    return f"installed from .whl/ (pip exit {rc})"


def _pytest_result(log: str, xml_path: Path) -> dict:
    lines = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    result = dict(line=lines[-1].strip("= ") if lines else "no pytest summary", failed=[], passed=[])
    if xml_path.exists():
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            name = case.get("name", "")
            if case.find("failure") is not None or case.find("error") is not None:
                result["failed"].append(f"{case.get('classname', '')}::{name}")
            elif case.find("skipped") is None:
                result["passed"].append(name)
    return result


def part_tests(cap: float, out: Path, jobs: int) -> dict:
    base = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--durations=10"]
    xdist = ["-n", str(jobs)] if jobs > 1 and importlib.util.find_spec("xdist") is not None else []
    env = dict(os.environ, FLASH_ATTN_3_BACKEND="triton")
    result = {}
    # Triton only: the reference backend's cases run on the CPU suite.
    rc, seconds = _run(base + xdist + ["-k", "not reference", "--junitxml", str(out / "tests_small.xml"),
                                       "tests/test_reliability_hostile.py", "tests/test_reliability_concurrency.py"],
                       cap * 0.7, out / "tests_small.log", env)
    result["hostile+concurrency"] = dict(rc=rc, seconds=seconds, **_pytest_result(
        (out / "tests_small.log").read_text(errors="replace"), out / "tests_small.xml"))
    rc, seconds = _run(base + ["--junitxml", str(out / "tests_large.xml"), "tests/test_reliability_large.py"],
                       max(30.0, cap - seconds), out / "tests_large.log", env)
    result["large"] = dict(rc=rc, seconds=seconds, **_pytest_result(
        (out / "tests_large.log").read_text(errors="replace"), out / "tests_large.xml"))
    largest = [_LARGEST[n] for n in result["large"]["passed"] if n in _LARGEST]
    result["largest_tensor"] = max(largest) if largest else None
    return result


def part_differential(cap: float, out: Path, args) -> dict:
    cmd = [sys.executable, "scripts/reliability_differential.py", "--cases", str(args.cases), "--classes",
           str(args.classes), "--seed", str(args.seed), "--jobs", str(args.jobs), "--budget",
           f"{max(10.0, cap - 25):.0f}", "--progress", "0", "--out", str(out)]
    rc, seconds = _run(cmd, cap, out / "differential.log")
    path = out / "differential.json"
    result = json.loads(path.read_text()) if path.exists() else dict(cases_run=None, failures=[])
    result.update(rc=rc, seconds=seconds)
    return result


def part_sanitizer(cap: float, out: Path, args) -> dict:
    cmd = [sys.executable, "scripts/reliability_sanitizer.py", "--tools", args.tools, "--jobs", str(min(args.jobs, 8)),
           "--budget", f"{max(20.0, cap - 20):.0f}", "--out", str(out)]
    rc, seconds = _run(cmd, cap, out / "sanitizer.log")
    path = out / "sanitizer.json"
    result = json.loads(path.read_text()) if path.exists() else dict(tools={}, source="no result (see sanitizer.log)")
    result.update(rc=rc, seconds=seconds)
    return result


def _versions() -> str:
    code = ("import platform, torch, triton; "
            "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE'; "
            "print(f'{gpu}, {torch.cuda.device_count()} GPU(s); python {platform.python_version()}; "
            "torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton.__version__}')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()[-200:]


def summary_md(report: dict) -> str:
    stopped = f"; stopped by {report['stopped']}, parts not run: {report.get('skipped_parts')}" \
        if report.get("stopped") else ""
    lines = [f"## Reliability run, {report['date']}", "", report["versions"], "",
             f"budget {report['budget']} s, used {report['seconds']} s; commit {report['commit']}{stopped}", "",
             "| piece | result |", "| --- | --- |"]
    tests = report.get("tests")
    if tests:
        for name in ("hostile+concurrency", "large"):
            t = tests[name]
            lines.append(f"| tests: {name} | {t['line']} ({t['seconds']} s, exit {t['rc']}) |")
        largest = tests.get("largest_tensor")
        lines.append("| largest tensor tried | " + (f"{largest[0]:,} elements ({largest[1]}), past 2^31 = "
                                                     f"{2**31:,}" if largest else "none passed") + " |")
    diff = report.get("differential")
    if diff:
        lines.append(f"| differential | {diff.get('cases_run')} cases, {len(diff.get('failures', []))} failures "
                     f"({diff.get('classes')} feature classes, seed {diff.get('seed')}, {diff.get('jobs', 1)} jobs, "
                     f"{diff['seconds']} s{', stopped by ' + diff['stopped'] if diff.get('stopped') else ''}) |")
    san = report.get("sanitizer")
    if san:
        lines.append(f"| compute-sanitizer | {san.get('version', '?')}, {san.get('source')} |")
        for tool, r in san.get("tools", {}).items():
            if r.get("skipped"):
                lines.append(f"| {tool} | skipped ({r['skipped']}) |")
                continue
            errors = "no summary (cut short or crashed)" if r.get("errors") is None else f"{r['errors']} errors"
            if r.get("reports"):
                errors += (f"; {r['reports']} reports shown ({r['errors_ours']} in our code, {r['triton_dispatch']} "
                           "wholly inside triton's warp-specialize dispatch; racecheck's warnings count as ours)")
            warn = f", {r['warnings']} warnings" if r.get("warnings") is not None else ""
            lines.append(f"| {tool} | {errors}{warn}; workload calls: {r.get('calls_ok')} ok, "
                         f"{r.get('calls_failed')} failed, {r.get('calls_not_run')} not run; kernel files: "
                         f"{r.get('kernel_files')} ({r.get('seconds')} s) |")
    lines.append("")
    if tests:
        for name in ("hostile+concurrency", "large"):
            lines += [f"- FAILED {f}" for f in tests[name]["failed"][:30]]
    if diff:
        lines += [f"- differential FAIL {f['family']} class {f['cls']} seed {f['seed']}: {f['error']}"
                  for f in diff.get("failures", [])[:30]]
        lines += [f"- differential shard {lost['shard']} lost (exit {lost['rc']})" for lost in diff.get("lost_jobs", [])]
    if san:
        for tool, r in san.get("tools", {}).items():
            lines += [f"- {tool}: {h}" for h in r.get("headlines", [])[:10]]
    return "\n".join(lines) + "\n"


def _sanitizer():
    """scripts/reliability_sanitizer.py as a module (this script may be loaded by path)."""
    path = _ROOT / "scripts" / "reliability_sanitizer.py"
    spec = importlib.util.spec_from_file_location("reliability_sanitizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all parts together")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "reliability")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=8, help="processes for pytest-xdist, the differential, the warm-up")
    parser.add_argument("--tools", default="memcheck,racecheck,synccheck")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(parts) - set(PARTS))}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_ROOT)
    report = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  versions=_versions(), budget=args.budget,
                  commit=os.environ.get("FLASH_ATTN_3_COMMIT") or commit.stdout.strip() or "?",
                  hypothesis=_ensure_hypothesis())
    signal.signal(signal.SIGINT, _on_stop)
    signal.signal(signal.SIGTERM, _on_stop)
    for i, part in enumerate(parts):
        if _STOPPED:
            report.setdefault("skipped_parts", []).append(part)
            continue
        left = args.budget - (time.monotonic() - start)
        cap = left * _SHARES[part] / sum(_SHARES[p] for p in parts[i:])
        print(f"== reliability {part} (cap {cap:.0f} s)", flush=True)
        if part == "tests":
            report[part] = part_tests(cap, args.out, args.jobs)
        elif part == "differential":
            report[part] = part_differential(cap, args.out, args)
        else:
            report[part] = part_sanitizer(cap, args.out, args)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["stopped"] = _STOPPED[0] if _STOPPED else None
    text = summary_md(report)
    (args.out / "reliability.md").write_text(text)
    (args.out / "reliability.json").write_text(json.dumps(report, indent=1, default=str))
    print(text, flush=True)
    clean = (all(not report["tests"][n]["failed"] and report["tests"][n]["rc"] in (0, 5)
                 for n in ("hostile+concurrency", "large")) if "tests" in report else True)
    clean &= not report.get("differential", {}).get("failures")
    clean &= all(_sanitizer().tool_clean(r) for r in report.get("sanitizer", {}).get("tools", {}).values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())

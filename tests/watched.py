"""Run a GPU smoke script in a subprocess watched line by line: a deadlocked kernel pipeline
fails the calling test module (naming the last step that finished) instead of hanging the run."""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _smoke_key(script: str) -> str:
    """What a smoke run's outcome depends on: the script, the package's and the tests' sources,
    the versions and the package's / triton's environment switches."""
    import torch
    import triton

    digest = hashlib.sha256(script.encode())
    for path in sorted([*(TESTS.parent / "flash_attn_3").rglob("*.py"), *TESTS.glob("*.py")]):
        digest.update(path.read_bytes())
    switches = sorted((k, v) for k, v in os.environ.items() if k.startswith(("FLASH_ATTN_3_", "TRITON_")))
    # Once per pytest run, not per machine: a deadlock is a matter of timing, and a second run
    # deserves its own chance to find one.
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    digest.update(repr((triton.__version__, torch.__version__, switches, run)).encode())
    return digest.hexdigest()[:20]


def run_watched(script: str, what: str, step_seconds: float, tmp_path_factory) -> None:
    """Run `script` (printing one line per step) with the tests folder as its working directory;
    fail if a step takes longer than step_seconds or the script fails. Once per pytest run:
    under pytest-xdist every worker's module fixture calls this, and fourteen workers compiling
    the same kernels at once took 60-80 s each (H100, 2026-12-07); the first runs it, the others
    wait and find its mark, or its failure's, which fails them at once with the same message."""
    marks = Path(tempfile.gettempdir()) / f"flash_attn_3_smoke_{os.getuid()}"
    marks.mkdir(exist_ok=True)
    key = _smoke_key(script)
    mark, failed = marks / f"{key}.ok", marks / f"{key}.failed"
    with open(marks / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if failed.exists():
                pytest.fail(failed.read_text())
            if not mark.exists():
                try:
                    _run_watched(script, what, step_seconds, tmp_path_factory)
                except pytest.fail.Exception as exc:
                    failed.write_text(str(exc))
                    raise
                mark.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_watched(script: str, what: str, step_seconds: float, tmp_path_factory) -> None:
    stderr = (tmp_path_factory.mktemp("smoke") / "stderr.txt").open("w+")
    # The child imports the package from this checkout even where it is not installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=stderr)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)),
                     daemon=True).start()
    last = "the start"
    while True:
        try:
            line = lines.get(timeout=step_seconds)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"{what} made no progress for {step_seconds} s after {last}: "
                        "pipeline deadlock?")
        if line is None:
            break
        last = line.strip()
    if proc.wait() != 0:
        stderr.seek(0)
        pytest.fail(f"{what} smoke call failed after {last}:\n{stderr.read()[-3000:]}")

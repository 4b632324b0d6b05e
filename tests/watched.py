"""Run a GPU smoke script in a subprocess watched line by line: a deadlocked kernel pipeline
fails the calling test module (naming the last step that finished) instead of hanging the run."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def run_watched(script: str, what: str, step_seconds: float, tmp_path_factory) -> None:
    """Run `script` (printing one line per step) with the tests folder as its working directory;
    fail if a step takes longer than step_seconds or the script fails."""
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

"""The long differential run (issue 17, part 5): the CPU suite's random generators
(tests/test_random_combinations.py) drive the Triton backend against the float64 reference with
the spec's tolerances, thousands of cases, failures reported by seed.

    python scripts/reliability_differential.py [--cases 10000] [--seed 0] [--budget 120]
        [--classes 48] [--jobs 8] [--out DIR] [--replay FAILURES.json]

A Triton kernel compiles once per combination of its constexpr flags (head dims, masks, paging,
fp8, ...): drawing every case's features at random would spend the run compiling. So the run
draws `--classes` feature combinations from the suite's hypothesis strategies (seeded by --seed:
the same classes every run), and runs each class with new input seeds: lengths, page tables,
cache lengths, windows, chunk sizes and values are drawn from the seed by the suite's own input
builders (`_kv_inputs`, `_varlen_inputs`, `_qkv`). Families: flash_attn_with_kvcache,
flash_attn_varlen_func forward, its backward, flash_attn_func (with num_splits and pack_gqa).

Every case either matches the reference (and, for kvcache, leaves the caches as the spec says) or
refuses with a clear error before writing; anything else is a failure, recorded with its family,
drawn case and seed in failures.json. `--replay failures.json` runs exactly those cases again.
On a GPU the backend is triton; on the CPU it is triton under the interpreter (use a few cases).
--jobs N splits the classes over N processes on the one GPU: a cold run is mostly compiling and
float64 references on the host, and the device has the cores for both.
The run stops starting cases when --budget seconds are spent, or on SIGINT / SIGTERM, and always
writes its summary (differential.json, and one line per failure on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "tests"), str(_ROOT)]

import conftest  # noqa: E402,F401 - before triton: the interpreter on CPU-only machines
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

import test_random_combinations as trc  # noqa: E402

BACKEND = "triton"

# family -> (strategy factory, one-call function, share of the classes)
FAMILIES = {
    "kvcache": (trc.kv_cases, trc._one_kvcache_call, 0.4),
    "varlen": (trc.varlen_cases, trc._one_varlen_call, 0.2),
    "varlen_bwd": (trc.varlen_cases, trc._one_varlen_backward, 0.2),
    "dense": (trc.dense_cases, trc._one_dense_call, 0.2),
}


class _Env:
    """What the suite's one-call functions need of pytest's monkeypatch: setenv."""

    def setenv(self, name, value):
        os.environ[name] = value


def draw_classes(family: str, count: int, seed: int) -> list[tuple]:
    """`count` drawn examples of the family's strategy (without their input seed), the same for
    the same seed. tiny: the interpreter's shapes on the CPU; on a GPU too, since small shapes
    keep a case at a few milliseconds and most of them out of the autotuner."""
    strategy = FAMILIES[family][0](tiny=True)
    drawn = []

    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(example=strategy)
    def collect(example):
        drawn.append(example[:-1])

    collect()
    return drawn[:count]


def run_case(family: str, drawn: tuple, case_seed: int) -> None:
    FAMILIES[family][1](BACKEND, *drawn, case_seed, _Env())


class _Stop(Exception):
    pass


_STOPPING: list = []


def _stop(signum, frame):
    _STOPPING.append(signal.Signals(signum).name)
    raise _Stop(signal.Signals(signum).name)


def _failure(family, cls, drawn, case_seed, exc):
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return dict(family=family, cls=cls, drawn=repr(drawn), seed=case_seed,
                error=f"{type(exc).__name__}: {lines[0][:300]}",
                where=traceback.format_exc(limit=-3)[-1500:])


def run(args) -> dict:
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_classes(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_classes(args) -> dict:
    start = time.monotonic()
    deadline = start + args.budget
    shares = {name: share for name, (_, _, share) in FAMILIES.items() if name in args.families}
    total_share = sum(shares.values())
    classes = []
    for i, (family, share) in enumerate(shares.items()):
        count = max(1, round(args.classes * share / total_share))
        classes += [(family, drawn) for drawn in draw_classes(family, count, args.seed * 1000 + i)]
    per_class = max(1, -(-args.cases // len(classes)))
    rng = random.Random(args.seed)
    seeds = [[rng.randrange(2**31) for _ in range(per_class)] for _ in classes]
    shard, shards = args.shard
    mine = [c for c in range(len(classes)) if c % shards == shard]
    result = dict(seed=args.seed, classes=len(classes), cases_planned=per_class * len(mine), cases_run=0,
                  failures=[], per_family={f: 0 for f in shares}, stopped=None, device=_device(),
                  draw_seconds=round(time.monotonic() - start, 1))
    try:
        # Class by class: each compiles once, then runs its cases from the kernel cache. The first
        # case of every class goes first, so a short budget still covers every class once.
        order = [(c, 0) for c in mine] + [(c, i) for c in mine for i in range(1, per_class)]
        for cls, i in order:
            if time.monotonic() > deadline:
                result["stopped"] = "budget"
                break
            family, drawn = classes[cls]
            try:
                run_case(family, drawn, seeds[cls][i])
            except _Stop:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and the run goes on
                if _STOPPING:  # the stop arrived inside a library that wrapped it (the interpreter)
                    raise _Stop(_STOPPING[0]) from exc
                result["failures"].append(_failure(family, cls, drawn, seeds[cls][i], exc))
                print(f"FAIL {family} class {cls} seed {seeds[cls][i]}: {result['failures'][-1]['error']}",
                      flush=True)
            result["cases_run"] += 1
            result["per_family"][family] += 1
            if args.progress and result["cases_run"] % args.progress == 0:
                print(f"{result['cases_run']} cases, {len(result['failures'])} failures, "
                      f"{time.monotonic() - start:.0f} s", flush=True)
    except _Stop as stop:
        result["stopped"] = str(stop)
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def run_jobs(args) -> dict:
    """The run split over args.jobs worker processes (shards of the classes), merged."""
    import subprocess
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="fa3-differential-"))
    base = [sys.executable, str(Path(__file__).resolve()), "--cases", str(args.cases), "--seed", str(args.seed),
            "--classes", str(args.classes), "--budget", str(args.budget), "--families", ",".join(args.families),
            "--progress", "0"]
    procs = []
    for i in range(args.jobs):
        log = open(scratch / f"{i}.log", "w")
        procs.append((subprocess.Popen(base + ["--shard", f"{i}/{args.jobs}", "--out", str(scratch / str(i))],
                                       stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + args.budget + 60  # a case in flight at the budget may finish
    merged = dict(seed=args.seed, classes=0, cases_planned=0, cases_run=0, failures=[], per_family={},
                  stopped=None, device=_device(), jobs=args.jobs, lost_jobs=[])
    for i, (proc, log) in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, _Stop) as why:
            if isinstance(why, _Stop):
                merged["stopped"], deadline = str(why), time.monotonic()  # the other workers too
            proc.terminate()  # the worker writes what it has on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        path = scratch / str(i) / "differential.json"
        if not path.exists():
            tail = (scratch / f"{i}.log").read_text(errors="replace")[-600:]
            merged["lost_jobs"].append(dict(shard=i, rc=proc.returncode, tail=tail))
            continue
        part = json.loads(path.read_text())
        merged["classes"] = part["classes"]
        merged["cases_planned"] += part["cases_planned"]
        merged["cases_run"] += part["cases_run"]
        merged["failures"] += part["failures"]
        for family, count in part["per_family"].items():
            merged["per_family"][family] = merged["per_family"].get(family, 0) + count
        merged["stopped"] = merged["stopped"] or part["stopped"]
    for lost in merged["lost_jobs"]:
        print(f"differential shard {lost['shard']} wrote no result (exit {lost['rc']}): {lost['tail']}", flush=True)
    for failure in merged["failures"]:
        print(f"FAIL {failure['family']} class {failure['cls']} seed {failure['seed']}: {failure['error']}",
              flush=True)
    return merged


def replay(path: Path) -> dict:
    """Run the cases a failures.json recorded, each from its family, drawn case and seed."""
    recorded = json.loads(path.read_text())["failures"]
    namespace = {"torch": torch, "inf": float("inf"), "nan": float("nan")}
    result = dict(cases_run=0, failures=[], device=_device())
    for record in recorded:
        drawn = eval(record["drawn"], namespace)  # noqa: S307 - our own repr of dicts, tuples, dtypes
        try:
            run_case(record["family"], drawn, record["seed"])
        except Exception as exc:  # noqa: BLE001
            result["failures"].append(_failure(record["family"], record["cls"], drawn, record["seed"], exc))
            print(f"FAIL {record['family']} seed {record['seed']}: {result['failures'][-1]['error']}")
        result["cases_run"] += 1
    return result


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU (triton interpreter)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=48, help="feature combinations (each compiles once)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds; no case starts after it")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of "
                        + ", ".join(FAMILIES))
    parser.add_argument("--progress", type=int, default=1000, help="print a line every N cases (0: never)")
    parser.add_argument("--out", type=Path, default=None, help="folder for differential.json / failures.json")
    parser.add_argument("--replay", type=Path, default=None, help="a failures.json to run again")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, each a share of the classes")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}")
    args.shard = tuple(int(x) for x in args.shard.split("/"))
    os.environ["FLASH_ATTN_3_BACKEND"] = BACKEND
    if args.replay:
        result = replay(args.replay)
    elif args.jobs > 1:
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            result = run_jobs(args)
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        result = run(args)
    summary = (f"differential: {result['cases_run']} cases, {len(result['failures'])} failures"
               + (f", {result['classes']} feature classes, seed {result['seed']}" if "classes" in result else "")
               + (f", stopped by {result['stopped']}" if result.get("stopped") else "")
               + f" ({result['device']})")
    print(summary, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "differential.json").write_text(json.dumps(result, indent=1))
        if result["failures"]:
            (args.out / "failures.json").write_text(json.dumps({"failures": result["failures"]}, indent=1))
    return 1 if result["failures"] or result.get("lost_jobs") else 0


if __name__ == "__main__":
    sys.exit(main())

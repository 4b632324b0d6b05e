"""Compile every Gluon kernel config (fwd_hopper.py, bwd_hopper.py) for sm_90 under several triton
versions, side by side with triton 3.6, on any machine (no GPU).

    python scripts/aot_matrix.py [--versions 3.6.0,3.7.1,3.8.0,3.9.0] [--quick] [--jobs 2]
                                 [--out out/aot_matrix] [--keep-envs]

Each version other than the running interpreter's own triton is installed from PyPI with
`pip install --no-deps --target out/aot_matrix/envs/triton-X triton==X`, a throw-away directory put
in front of PYTHONPATH: it shadows triton only, and torch (which the kernel modules import) comes
from this interpreter, so no torch is downloaded per version. It is removed afterwards unless
--keep-envs. That is also how the device runs another triton (scripts/carry_wheel.sh).

Every compile runs in a fresh TRITON_CACHE_DIR with TRITON_DEFAULT_FP_FUSION=1 (3.9 warns that its
default is about to change; 1 is what 3.6-3.8 do). Figures per config: ptxas registers and spill
bytes, shared memory, warps, wgmma (PTX) / HGMMA+QGMMA (SASS), TMA loads and reduces, the
setmaxnreg values, and per consumer KV loop its SASS length, GMMAs, local-memory ops and exp2s.
A version compiles "like 3.6" when every config has the same figures, loop lengths within
LOOP_TOLERANCE (ptxas schedules a few integer ops differently between releases). --quick: the
default configs only (CONFIGS / CAUSAL_CONFIGS / FP8_CONFIGS / DETERMINISTIC_CONFIGS), not the
tuning candidates.

Prints a markdown table (one row per config, one column per version, and the verdict per version)
and writes it with the raw figures to OUT/matrix.md and OUT/matrix.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_VERSIONS = "3.6.0,3.7.1,3.8.0,3.9.0"
# Relative change of a KV loop's SASS length still called the same shape.
LOOP_TOLERANCE = 0.03


def cases(quick: bool) -> list[dict]:
    """Every config the Gluon kernels launch (defaults, causal or not) or time (candidates)."""
    os.environ.pop("TRITON_INTERPRET", None)
    from flash_attn_3.backends.triton import bwd_hopper, fwd_hopper

    out = []
    for d in fwd_hopper.CONFIGS:
        for causal in (False, True):
            out.append(dict(kernel="fwd", head_dim=d, causal=causal, dtype="bf16"))
            out.append(dict(kernel="fwd", head_dim=d, causal=causal, dtype="fp8"))
        out.append(dict(kernel="fwd", head_dim=d, causal=True, dtype="bf16", varlen=True,
                        seqused=True))
    for d in bwd_hopper.CONFIGS:
        for causal in (False, True):
            out.append(dict(kernel="bwd", head_dim=d, causal=causal))
        out.append(dict(kernel="bwd", head_dim=d, causal=False, role="deterministic default",
                        config=list(bwd_hopper.DETERMINISTIC_CONFIGS[d])))
    if not quick:
        for d, configs in fwd_hopper.CANDIDATES.items():
            out += [dict(kernel="fwd", head_dim=d, causal=False, dtype="bf16", config=list(c))
                    for c in configs]
        for d, configs in fwd_hopper.FP8_CANDIDATES.items():
            out += [dict(kernel="fwd", head_dim=d, causal=False, dtype="fp8", config=list(c))
                    for c in configs]
        for table in (bwd_hopper.CANDIDATES, bwd_hopper.DETERMINISTIC_CANDIDATES):
            for d, configs in table.items():
                out += [dict(kernel="bwd", head_dim=d, causal=False, config=list(c))
                        for c in configs]
    return out


def label(case: dict) -> str:
    parts = [case["kernel"], f"D={case['head_dim']}", "causal" if case["causal"] else "",
             case.get("dtype", "") if case.get("dtype") == "fp8" else "",
             "varlen+seqused" if case.get("seqused") else "",
             "cfg " + ",".join(str(int(x)) for x in case["config"]) if case.get("config") else "",
             case.get("role", "" if case.get("config") else "default")]
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# worker side: runs under the triton being measured


def compile_case(case: dict) -> dict:
    import re

    import torch

    from scripts import aot_bwd_hopper, aot_fwd_hopper

    t0 = time.time()
    config = tuple(case["config"]) if case.get("config") else None
    if case["kernel"] == "fwd":
        dtype = dict(bf16=torch.bfloat16, fp8=torch.float8_e4m3fn)[case["dtype"]]
        kernel = aot_fwd_hopper.compile_for_sm90(aot_fwd_hopper.plain_args(
            case["head_dim"], case["causal"], dtype, case.get("varlen", False),
            case.get("seqused", False)), config)
    else:
        kernel = aot_bwd_hopper.compile_for_sm90(aot_bwd_hopper.plain_args(
            case["head_dim"], case["causal"], torch.bfloat16), config=config)
    compile_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        got = aot_fwd_hopper.report(kernel, Path(tmp))
        sass = (Path(tmp) / "kernel.sass").read_text()
    ptx = kernel.asm["ptx"]
    loops = got.pop("kv_loops")
    if case["kernel"] == "bwd":
        # gmma_loops' innermost loops of the consumers, as aot_bwd_hopper reports them
        bodies = [[o for _, o in body] for body in aot_fwd_hopper.gmma_loops(sass)]
        loops = [dict(instructions=len(b), gmma=sum("GMMA" in o for o in b),
                      local=sum(bool(re.search(r"\b(LDL|STL)\b", o)) for o in b),
                      ops={"MUFU.EX2": sum("MUFU.EX2" in o for o in b)}) for b in bodies]
    got.update(
        tma_reduce_ptx=ptx.count("cp.reduce.async.bulk.tensor"),
        loops=len(loops),
        loop_instructions=[loop["instructions"] for loop in loops],
        loop_gmma=[loop["gmma"] for loop in loops],
        loop_local=[loop["local"] for loop in loops],
        loop_ex2=[loop["ops"].get("MUFU.EX2", 0) for loop in loops],
        compile_s=round(compile_s, 1),
    )
    return got


def worker(case_file: str) -> None:
    for case in json.loads(Path(case_file).read_text()):
        try:
            result = dict(ok=True, **compile_case(case))
        except BaseException as exc:  # a version whose API broke: report it, go on
            message = str(exc).strip().splitlines()
            result = dict(ok=False, error=f"{type(exc).__name__}: {message[-1] if message else ''}"[:300])
        print(json.dumps(dict(case=case, result=result)), flush=True)


# ---------------------------------------------------------------------------------------------
# parent side


def install(version: str, envs: Path) -> Path:
    target = envs / f"triton-{version}"
    if not (target / "triton" / "__init__.py").exists():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), f"triton=={version}"], check=True)
    return target


def run_version(version: str, pythonpath: str, all_cases: list[dict], jobs: int) -> list[dict]:
    """Each case's result under one triton, compiled by `jobs` worker processes."""
    chunks = [all_cases[i::jobs] for i in range(jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(PYTHONPATH=os.pathsep.join(p for p in (pythonpath, str(REPO)) if p),
                   TRITON_CACHE_DIR=str(Path(tmp) / "cache"), TRITON_DEFAULT_FP_FUSION="1")
        procs = []
        for i, chunk in enumerate(chunks):
            case_file = Path(tmp) / f"cases{i}.json"
            case_file.write_text(json.dumps(chunk))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(case_file)],
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True))
        results = []
        for proc in procs:
            out, _ = proc.communicate()
            results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        check = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                               env=env, capture_output=True, text=True)
        if check.stdout.strip() != version:
            raise SystemExit(f"asked for triton {version}, the workers imported {check.stdout!r}")
    by_label = {label(r["case"]): r["result"] for r in results}
    return [by_label.get(label(c), dict(ok=False, error="worker died")) for c in all_cases]


def cell(r: dict) -> str:
    if not r.get("ok"):
        return f"FAILS: {r.get('error', '')[:80]}"
    loops = "/".join(str(n) for n in r["loop_instructions"]) or "-"
    if any(r["loop_local"]):  # local-memory ops inside the loops: spilled loop values
        loops += " (local " + "/".join(str(n) for n in r["loop_local"]) + ")"
    mma = r["hgmma_sass"] + r["qgmma_sass"]
    tma = f"{r['tma_loads_ptx']}" + (f"+{r['tma_reduce_ptx']}red" if r["tma_reduce_ptx"] else "")
    return f"{r['ptxas_registers']}r {r['spill_bytes']}sp {mma}mma {tma}tma L{loops}"


def _loops(r: dict) -> list[tuple]:
    """(GMMAs, exp2s, local ops, length) per KV loop, in a fixed order: ptxas may emit the two
    consumer partitions' loops in either order (bwd D = 256 does between 3.7 and 3.8)."""
    return sorted(zip(r["loop_gmma"], r["loop_ex2"], r["loop_local"], r["loop_instructions"]))


def _structure(r: dict) -> dict:
    keys = ("ptxas_registers", "shared_bytes", "num_warps", "wgmma_ptx", "hgmma_sass",
            "qgmma_sass", "tma_loads_ptx", "tma_reduce_ptx", "setmaxnreg")
    out = {k: r.get(k) for k in keys}
    out["loops (gmma, exp2)"] = [loop[:2] for loop in _loops(r)]
    # 3.9 runs its CUDA 13 ptxas, named ptxas-blackwell, for sm_90 too
    out["ptxas notes"] = [re.sub(r"^ptxas(-blackwell)?", "ptxas", w).split(":", 1)[-1].strip()
                          for w in r.get("ptxas_warnings", [])]
    return out


# Tiers of departure from 3.6, mildest first.
SAME, SPILLS, LOOP, STRUCTURE = "same", "spills", "loop", "structure"


def compare(base: dict, other: dict) -> tuple[str, list[str]]:
    """(tier, what departs). same: every figure, loop lengths within LOOP_TOLERANCE. spills:
    the same kernel structure (registers, shared memory, warps, wgmma / TMA counts,
    setmaxnreg, each loop's GMMAs and exp2s), with spills outside the loops or loop lengths
    (within 10%) moved. loop: more local-memory ops inside a KV loop, or a loop longer by more
    than 10%. structure: anything else, a failed compile included."""
    if not other.get("ok"):
        return STRUCTURE, [other.get("error", "failed")]
    if not base.get("ok"):
        return SAME, []
    a, b = _structure(base), _structure(other)
    diffs = [f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]]
    if diffs:
        return STRUCTURE, diffs
    tier = SAME
    if base["spill_bytes"] != other["spill_bytes"]:
        tier = SPILLS
        diffs.append(f"spills {base['spill_bytes']} -> {other['spill_bytes']} B")
    for x, y in zip(_loops(base), _loops(other)):
        if y[2] > x[2]:
            tier = LOOP
            diffs.append(f"local ops in a loop {x[2]} -> {y[2]}")
        if abs(y[3] - x[3]) > 0.10 * x[3] and y[3] > x[3]:
            tier = LOOP
            diffs.append(f"loop length {x[3]} -> {y[3]}")
        elif abs(y[3] - x[3]) > LOOP_TOLERANCE * x[3]:
            tier = tier if tier != SAME else SPILLS
            diffs.append(f"loop length {x[3]} -> {y[3]}")
    return tier, diffs


def render(data: dict) -> str:
    versions, cases_, matrix = data["versions"], data["cases"], data["results"]
    base = matrix[versions[0]]
    lines = ["| config | " + " | ".join(f"triton {v}" for v in versions) + " |",
             "| --- |" + " --- |" * len(versions)]
    for i, case in enumerate(cases_):
        cells = [cell(base[i])]
        for v in versions[1:]:
            tier, _ = compare(base[i], matrix[v][i])
            cells.append(cell(matrix[v][i]) + ("" if tier == SAME else f" *{tier}*"))
        lines.append(f"| {label(case)} | " + " | ".join(cells) + " |")
    verdicts = []
    order = [SAME, SPILLS, LOOP, STRUCTURE]
    for v in versions[1:]:
        found = [(label(c), *compare(b, r)) for c, b, r in zip(cases_, base, matrix[v])]
        counts = {t: sum(f[1] == t for f in found) for t in order}
        worst = max((f[1] for f in found), key=order.index)
        # the configs calls take (the rest are tuning candidates)
        worst_default = max((f[1] for f in found if "default" in f[0]), key=order.index)
        detail = "; ".join(f"{n}: {', '.join(d)}" for n, t, d in found if t in (LOOP, STRUCTURE))
        verdicts.append(
            f"- triton {v}: default configs at worst **{worst_default}**, all configs at worst "
            f"**{worst}**; " + ", ".join(f"{counts[t]} {t}" for t in order)
            + f" (of {len(found)})" + (f". Loop and structure departures: {detail}" if detail else ""))
    legend = ("Cells: ptxas registers (r), spill bytes (sp), HGMMA/QGMMA in the SASS (mma), TMA "
              "loads (+ reduces) in the PTX (tma), SASS length of each consumer KV loop (L), "
              "local-memory ops inside the loops where any. Departure from "
              f"{versions[0]}: *spills* (same structure, spills outside the loops or loop lengths "
              "moved), *loop* (more local-memory ops inside a KV loop, or a loop > 10% longer), "
              "*structure* (registers, shared memory, wgmma / TMA counts, setmaxnreg, a loop's "
              "GMMAs or exp2s, ptxas notes, or a failed compile); unmarked: the same figures.")
    return "\n".join(lines + ["", legend, ""] + verdicts) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", default=DEFAULT_VERSIONS)
    p.add_argument("--quick", action="store_true", help="default configs only")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "out" / "aot_matrix")
    p.add_argument("--keep-envs", action="store_true")
    p.add_argument("--render", type=Path, help="print the table of an earlier run's matrix.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return
    import triton

    versions = args.versions.split(",")
    if versions[0].split(".")[:2] != ["3", "6"]:
        raise SystemExit("the first version is the baseline and must be a 3.6 release")
    all_cases = cases(args.quick)
    envs = args.out / "envs"
    matrix, seconds = {}, {}
    for version in versions:
        t0 = time.time()
        path = "" if version == triton.__version__ else str(install(version, envs))
        matrix[version] = run_version(version, path, all_cases, args.jobs)
        seconds[version] = round(time.time() - t0)
        print(f"triton {version}: {len(all_cases)} configs in {seconds[version]} s", file=sys.stderr)
    if not args.keep_envs:
        shutil.rmtree(envs, ignore_errors=True)
    data = dict(versions=versions, seconds=seconds, cases=all_cases, results=matrix)
    text = render(data)
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matrix.md").write_text(text)
    (args.out / "matrix.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()

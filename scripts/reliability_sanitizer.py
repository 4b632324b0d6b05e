"""compute-sanitizer over every Triton kernel file (issue 17, part 1).

    python scripts/reliability_sanitizer.py [--tools memcheck,racecheck,synccheck] [--budget 100]
        [--out DIR]                            (GPU: the driver)
    python scripts/reliability_sanitizer.py --workload [--budget S] [--only NAME,...]

The workload is a fixed list of small calls that together launch every kernel file (fwd.py,
fwd_hopper.py, decode.py, bwd.py, bwd_hopper.py, combine.py, append_kv.py, the step plan's
replay): dense, varlen, paged, decode, backward, fp8, at ragged and edge lengths (1, 127, 129,
4097), GQA / MQA, window edges, splits. The driver runs it once plainly (Triton compiles into its
disk cache, so the sanitized runs only load kernels), then once under each tool, one process per
tool, and reads the tool's summary ("ERROR SUMMARY: N errors", racecheck's "N hazards displayed
(E errors, W warnings)"). memcheck runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1: with the caching
allocator a read past a tensor usually lands in the same cudaMalloc block and goes unseen.

Where compute-sanitizer comes from (first found): $COMPUTE_SANITIZER, PATH, /usr/local/cuda,
an installed `nvidia-cuda-sanitizer-api` wheel (nvidia/cu13/compute-sanitizer/), or that wheel
carried in the repository's .whl/ folder, unpacked here into a temporary folder. The PyPI wheels
13.0 to 13.3 ship the binary without its TreeLauncher helpers (it then fails with "Execve of
subreaper failed"); 13.4.92 and later are complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("memcheck", "racecheck", "synccheck")
# A tool's share of the driver's budget: racecheck instruments every shared-memory access and
# is the slowest (run 5, H100: memcheck 13 s for 21 calls, synccheck 10 s for 11, racecheck cut
# at 45 s after 8 of 11, ~5.6 s a call; 13 quick calls since); what a tool leaves unused goes to
# the next ones.
_SHARES = {"memcheck": 0.2, "racecheck": 0.62, "synccheck": 0.18}
# racecheck and synccheck check shared memory and barriers: the calls of the pipelined kernels
# (Gluon fwd / bwd, decode, append, combine) at small shapes; memcheck gets every call.
QUICK = ("(fwd_hopper)", "(fwd_hopper paged)", "decode paged 16", "(bwd_hopper)", "(bwd_hopper layers",
         "combine", "(append_kv.py")


# ---------------------------------------------------------------------------------------------
# the workload (runs inside the sanitized process)


def _workload(dev: str = "cuda"):
    """name -> call. Each call allocates its own inputs (so memcheck sees each tensor as its own
    allocation) and synchronizes, so an error is reported against the call that made it."""
    import torch

    import flash_attn_interface as fa

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn

    def rnd(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev).to(dtype)

    def cu(lengths):
        return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=dev)

    def varlen(lens_q, lens_k, heads, d, **kw):
        q, k, v = rnd(sum(lens_q), heads[0], d), rnd(sum(lens_k), heads[1], d), rnd(sum(lens_k), heads[1], d)
        return fa.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), **kw)

    def dense(sq, sk, heads, d, dtype=bf16, backward=False, dv=None, **kw):
        q, k, v = rnd(2, sq, heads[0], d, dtype=dtype), rnd(2, sk, heads[1], d, dtype=dtype), rnd(2, sk, heads[1],
                                                                                                    dv or d, dtype=dtype)
        if not backward:
            return fa.flash_attn_func(q, k, v, **kw)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out = fa.flash_attn_func(*leaves, **kw)
        return torch.autograd.grad(out, leaves, torch.randn_like(out))

    def varlen_backward(lens_q, lens_k, heads, d, **kw):
        q, k, v = (rnd(sum(n), h, d).requires_grad_() for n, h in ((lens_q, heads[0]), (lens_k, heads[1]),
                                                                    (lens_k, heads[1])))
        out = fa.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), **kw)
        return torch.autograd.grad(out, (q, k, v), torch.randn_like(out))

    def kvcache(batch, seqlen_q, capacity, heads, d, *, page_size=None, new=1, rotary=False, steps=1, lens=None,
                dtype=bf16, **kw):
        """`steps` repeated calls: from the second on, the plan (step.py) replays the first."""
        if page_size is None:
            k_cache, v_cache = rnd(batch, capacity, heads[1], d, dtype=dtype), rnd(batch, capacity, heads[1], d,
                                                                                    dtype=dtype)
            table, rows = None, capacity
        else:
            per_row = math.ceil(capacity / page_size)
            pages = batch * per_row + 2
            rows = per_row * page_size  # rotary tables must cover a paged cache's whole capacity
            k_cache, v_cache = rnd(pages, page_size, heads[1], d, dtype=dtype), rnd(pages, page_size, heads[1], d,
                                                                                     dtype=dtype)
            # The last pages of the pool first: a read past a page lands past the allocation.
            table = torch.arange(pages - 1, pages - 1 - batch * per_row, -1, device=dev, dtype=torch.int32)
            table = table.view(batch, per_row)
        if lens is None:
            lens = [capacity - new * steps] * batch
        cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
        extra = {}
        if rotary:
            angle = torch.rand(rows, d // 2, device=dev)
            extra = dict(rotary_cos=torch.cos(angle).to(bf16), rotary_sin=torch.sin(angle).to(bf16))
        for step in range(steps):
            q = rnd(batch, seqlen_q, heads[0], d, dtype=dtype)
            k = v = None
            if new:
                k, v = rnd(batch, new, heads[1], d, dtype=dtype), rnd(batch, new, heads[1], d, dtype=dtype)
            fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens + step * new,
                                       page_table=table, **extra, **kw)

    def combine(splits, batch, length, heads, d):
        lse = torch.randn(splits, batch, length, heads, device=dev)
        lse[splits // 2:, 0] = -math.inf
        return fa.flash_attn_combine(torch.randn(splits, batch, length, heads, d, device=dev), lse,
                                     out_dtype=bf16)

    def opted_in(variable, call):
        """call() with an opt-in switch on (bwd_hopper's variants not yet taken by default)."""
        before = os.environ.get(variable)
        os.environ[variable] = "1"
        try:
            return call()
        finally:
            if before is None:
                del os.environ[variable]
            else:
                os.environ[variable] = before

    edges = [1, 127, 129, 4097]
    ragged = [1, 127, 129, 4097, 3, 64]
    short = [1, 127, 129, 513, 3, 64]
    calls = {
        # fwd_hopper (Gluon, dense and varlen), its fp8 path; fwd.py for what it does not take
        "varlen causal d128 gqa (fwd_hopper)": lambda: varlen(ragged, ragged[::-1], (8, 2), 128, causal=True),
        "dense d64/256 edges (fwd_hopper)": lambda: [dense(s, s, (4, 1), d, causal=c) for s in edges[:3]
                                                     for d, c in ((64, False), (256, True))],
        "dense fp8 d128 (fwd_hopper fp8)": lambda: dense(129, 4097, (4, 2), 128, dtype=fp8, causal=True),
        # V narrower than Q and K (DeepSeek's 192 / 128): O's own buffers, packed tails
        "varlen narrow v 192 / 128 causal (fwd_hopper)": lambda: fa.flash_attn_varlen_func(
            rnd(sum(ragged), 8, 192), rnd(sum(ragged), 2, 192), rnd(sum(ragged), 2, 128), cu(ragged),
            cu(ragged), max(ragged), max(ragged), causal=True),
        "varlen window edges d64 (fwd.py)": lambda: [varlen(ragged, ragged, (6, 2), 64, window_size=w)
                                                     for w in ((0, 0), (1, 0), (128, 1), (4096, -1))],
        "varlen chunk softcap sinks seqused (fwd.py)": lambda: varlen(
            ragged, ragged, (6, 3), 96, attention_chunk=100, softcap=30.0, causal=True,
            sinks=torch.randn(6, device=dev), seqused_q=torch.tensor([1, 100, 129, 3000, 0, 64], dtype=torch.int32,
                                                                     device=dev)),
        "dense split-KV num_splits=5 (fwd.py + combine)": lambda: dense(127, 4097, (8, 2), 128, num_splits=5),
        "dense qv mla d64/dv512 (fwd.py)": lambda: fa.flash_attn_func(
            rnd(2, 129, 8, 64), rnd(2, 127, 1, 64), rnd(2, 127, 1, 512), qv=rnd(2, 129, 8, 512), causal=True),
        "paged fp8 (fwd.py fp8)": lambda: kvcache(2, 129, 1000, (4, 2), 128, page_size=64, new=0, lens=[999, 1],
                                                  dtype=fp8, causal=True),
        # fwd_hopper's paged variant (chunked prefill over pages of 16, the pool read from its end)
        "paged prefill page 16 ragged (fwd_hopper paged)": lambda: kvcache(
            3, 300, 4097, (8, 2), 128, page_size=16, new=0, lens=[4097, 1, 129], causal=True),
        # decode.py: contiguous, paged (page sizes 1, 16, 256), fused append + rotary, splits, plan replay
        "decode paged 16 append rotary splits + plan replay (decode.py, step.py)": lambda: kvcache(
            3, 1, 4097, (32, 8), 128, page_size=16, rotary=True, causal=True, steps=3, lens=[4096 - 3, 1, 126]),
        "decode paged 1 and 256 mqa": lambda: [kvcache(2, 1, 1000, (8, 1), 64, page_size=ps, causal=True)
                                               for ps in (1, 256)],
        "decode contiguous leftpad batch_idx window": lambda: kvcache(
            2, 4, 4097, (16, 2), 128, new=4, causal=True, window_size=(127, 0),
            cache_leftpad=torch.tensor([5, 0], dtype=torch.int32, device=dev),
            cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32, device=dev)),
        # append_kv.py: several new tokens per row (not fused), varlen q
        "append 129 tokens paged + rotary (append_kv.py, fwd.py paged)": lambda: kvcache(
            2, 129, 4097, (8, 2), 128, page_size=256, new=129, rotary=True, causal=True, lens=[3000, 0]),
        # bwd_hopper (dense, deterministic or not), bwd.py (varlen, features it alone takes)
        "dense backward d128 causal edges (bwd_hopper)": lambda: [dense(s, s, (4, 2), 128, backward=True, causal=True)
                                                                  for s in (1, 127, 129)],
        "dense backward deterministic d64 (bwd_hopper + bwd.py dq)": lambda: dense(
            129, 4097, (4, 1), 64, backward=True, deterministic=True),
        "varlen backward ragged window softcap (bwd.py)": lambda: varlen_backward(
            ragged, ragged[::-1], (6, 2), 64, window_size=(64, 3), softcap=20.0),
        "dense backward d256 mqa (bwd.py / bwd_hopper)": lambda: dense(127, 129, (8, 1), 256, backward=True),
        # V narrower than Q and K in the split kernel: dV's accumulator and V / dO's tiles at 128
        "dense backward narrow v 192 / 128 causal (bwd_hopper)": lambda: dense(
            129, 4097, (8, 2), 192, backward=True, dv=128, causal=True),
        "backward window softcap d96 (bwd_hopper layers, opt-in)": lambda: opted_in(
            "FLASH_ATTN_3_GLUON_BWD_LAYERS", lambda: dense(129, 4097, (4, 2), 96, backward=True,
                                                           window_size=(128, 0), softcap=20.0)),
        "varlen backward ragged (bwd_hopper layers, opt-in)": lambda: opted_in(
            "FLASH_ATTN_3_GLUON_BWD_LAYERS", lambda: opted_in(
                "FLASH_ATTN_3_GLUON_VARLEN_BWD", lambda: varlen_backward(ragged, ragged[::-1], (6, 2), 128,
                                                                          causal=True))),
        # dQ reduced in the kernel (D = 64), each sequence's rows with slack after them
        "varlen backward ragged d64 dq slack, opt-in (bwd_hopper layers)": lambda: opted_in(
            "FLASH_ATTN_3_GLUON_VARLEN_BWD", lambda: varlen_backward(short, short[::-1], (4, 2), 64,
                                                                      causal=True)),
        # racecheck ran past 57 s on this call at 4097 (H100, run 6): shorter, the same edges
        "varlen backward seqused_k (bwd_hopper layers)": lambda: opted_in(
            "FLASH_ATTN_3_GLUON_VARLEN_BWD", lambda: varlen_backward(
                short, short, (6, 2), 128, causal=True,
                seqused_k=torch.tensor([1, 100, 129, 300, 0, 64], dtype=torch.int32, device=dev))),
        # combine.py
        "combine 2..133 splits": lambda: [combine(s, 2, 129, 4, 128) for s in (2, 17, 133)],
    }
    return calls


def _record_kernel_files():
    """Which kernel files the workload reached: each file's entry point, wrapped."""
    from flash_attn_3.backends.triton import routes

    seen = set()
    entries = {"fwd": "forward", "fwd_hopper": "forward", "decode": "forward", "bwd": "backward",
               "bwd_hopper": "backward", "combine": "combine", "append_kv": "append_kv", "step": "plan"}
    for name, attr in entries.items():
        module = routes._kernel(name)
        original = getattr(module, attr, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, _name=name, **kwargs):
            seen.add(_name)
            return _original(*args, **kwargs)

        setattr(module, attr, wrapped)
    return seen


def run_workload(budget: float, only=None, shard=(0, 1), quick=False) -> int:
    sys.path.insert(0, str(_ROOT))
    os.environ.setdefault("FLASH_ATTN_3_BACKEND", "triton")
    import torch

    seen = _record_kernel_files()
    deadline = time.monotonic() + budget
    failed = 0
    for index, (name, call) in enumerate(_workload().items()):
        if only and not any(o in name for o in only):
            continue
        if quick and not any(marker in name for marker in QUICK):
            continue
        if index % shard[1] != shard[0]:
            continue
        if time.monotonic() > deadline:
            print(f"workload: budget spent, not run: {name}", flush=True)
            continue
        t0 = time.monotonic()
        try:
            call()
            torch.cuda.synchronize()
            print(f"workload ok {time.monotonic() - t0:6.1f} s  {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - the next call still runs
            failed += 1
            print(f"workload ERROR {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    print(f"workload kernel files reached: {', '.join(sorted(seen))}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# the driver


def find_sanitizer(scratch: Path):
    """(path to compute-sanitizer, where it came from), or (None, why not)."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer"),
                  "/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    for path in sys.path:
        candidates += glob.glob(os.path.join(path, "nvidia", "cu1*", "compute-sanitizer", "compute-sanitizer"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c, c
    wheels = sorted(glob.glob(str(_ROOT / ".whl" / "nvidia_cuda_sanitizer_api-*.whl")))
    if not wheels:
        return None, "not installed, and no nvidia_cuda_sanitizer_api wheel in .whl/"
    target = scratch / "sanitizer"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for info in wheel.infolist():
            if "/docs/" in info.filename or "/include/" in info.filename:
                continue
            extracted = wheel.extract(info, target)
            mode = info.external_attr >> 16
            if mode:
                os.chmod(extracted, mode & 0o777)
    found = glob.glob(str(target / "nvidia" / "cu1*" / "compute-sanitizer" / "compute-sanitizer"))
    if not found:
        return None, f"{Path(wheels[-1]).name} has no compute-sanitizer/ folder (wheels before 13.4 lack its helpers)"
    return found[0], f"unpacked from .whl/{Path(wheels[-1]).name}"


_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_HEADLINE = re.compile(r"^========= (?!ERROR SUMMARY|RACECHECK SUMMARY|COMPUTE-SANITIZER|\s)(.{8,})$")


_REPORT = re.compile(r"^========= (Error|Warning): Race reported")
_LOCATION = re.compile(r"in (\S+?\.py):(\d+)")


def _generated_line(path: str, line: int) -> bool:
    """Whether a kernel file's line is one that ptxas attributes triton's own code to, not a
    statement of ours: the kernel's `def` line (its prologue, the warp-specialize dispatch) or
    the `gl.warp_specialize(` call (the code that starts and ends the partitions)."""
    source = _ROOT / "flash_attn_3" / "backends" / "triton" / Path(path).name
    try:
        text = source.read_text().splitlines()[line - 1].strip()
    except (OSError, IndexError):
        return False
    return text.startswith("def ") or text.startswith("gl.warp_specialize(")


def racecheck_reports(log: str) -> tuple[int, int]:
    """(reports, dispatch): how many racecheck reports ("Race reported between ...") the log
    shows, and how many of them have every access on generated lines (_generated_line): the
    warp-specialize dispatch that triton 3.6 emits, where the default warps write each worker
    warp's partition id (STS.64 at shared offset 0x301d0) and the workers read theirs (LDS.U8 at
    0x301cc + warp) between `BAR.SYNC 0x1`s, a named barrier racecheck does not order them by
    (docs/perf-notes.md, 2026-12-07). Not code of ours, and nothing we can order."""
    reports = dispatch = 0
    block = None
    for line in log.splitlines() + ["========= "]:
        if _REPORT.match(line) or not line.startswith("=========     "):
            if block:
                reports += 1
                locations = [loc for text in block for loc in _LOCATION.findall(text)]
                dispatch += bool(locations) and all(_generated_line(f, int(n)) for f, n in locations)
            block = [line] if _REPORT.match(line) else None
        elif block is not None:
            block.append(line)
    return reports, dispatch


def parse(log: str) -> dict:
    """errors (None when the tool printed no summary: killed or crashed), warnings, and the
    distinct first lines of its reports; for racecheck also how many of the reports lie wholly
    in triton's warp-specialize dispatch (triton_dispatch) and how many reports are left
    (errors_ours; reports: all the reports shown)."""
    errors = warnings = None
    race, summary = _RACE.search(log), _SUMMARY.search(log)
    if race:
        errors, warnings = int(race.group(2)), int(race.group(3))
    elif summary:
        errors = int(summary.group(1))
    headlines = []
    for line in log.splitlines():
        m = _HEADLINE.match(line)
        if m and m.group(1) not in headlines and not m.group(1).startswith(("at ", "by ", "Saved host", "Host Frame",
                                                                           "Device Frame")):
            headlines.append(m.group(1))
    result = dict(errors=errors, warnings=warnings, headlines=headlines[:15])
    if race or (summary is None and "Race reported" in log):
        # Cut short, the reports shown are still told apart (errors stays None: not clean).
        # racecheck's error count is not one per report shown (2026-12-07 13:08 UTC: 80 errors
        # in 50 reports), so a run is judged by its reports: those not wholly in triton's
        # dispatch are ours. Errors with no report shown at all count as ours.
        reports, dispatch = racecheck_reports(log)
        ours = reports - dispatch if reports else errors
        result.update(reports=reports, triton_dispatch=dispatch, errors_ours=ours)
    return result


def _tensor_op_checks(binary: str) -> list[str]:
    """The memcheck switches that make it follow the TMA copies and wgmma operands. Their names
    moved between releases: 2025.3 (CUDA 13.0, the device's) has --check-bulk-copy and
    --check-warpgroup-mma and refuses --check-tensor-ops, which 13.4 has."""
    helptext = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    switches = []
    for option in ("--check-tensor-ops", "--check-bulk-copy", "--check-warpgroup-mma"):
        if option in helptext:
            switches += [option, "yes"]
    return switches


def _tool_command(binary: str, tool: str, workload_budget: float, only: str = "") -> list[str]:
    cmd = [binary, "--tool", tool, "--print-limit", "50", "--target-processes", "application-only",
           "--report-api-errors", "no", "--show-backtrace", "device"]
    if tool == "memcheck":
        cmd += _tensor_op_checks(binary) + ["--leak-check", "no"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "analysis"]
    cmd += [sys.executable, str(Path(__file__).resolve()), "--workload", "--budget", f"{workload_budget:.0f}",
            "--only", only]
    return cmd + (["--quick"] if tool != "memcheck" else [])


def run_driver(tools, budget: float, out: Path, jobs: int = 4, only: str = "") -> dict:
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fa3-sanitizer-"))
    result = dict(tools={}, source=None)
    binary, source = find_sanitizer(scratch)
    result["source"] = source
    if binary is None:
        print(f"sanitizer: {source}", flush=True)
        return result
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    result["version"] = version[-1] if version else "?"
    env = dict(os.environ, FLASH_ATTN_3_BACKEND="triton", PYTHONPATH=f"{_ROOT}:{os.environ.get('PYTHONPATH', '')}")
    # Warm: compile every kernel into Triton's disk cache outside the sanitizer, `jobs` processes
    # at once (compiling is most of a cold run; the device has the cores).
    # Cut short (run 5: 23 s of 8 processes), the tools compile what it missed, under racecheck.
    warm_cap = max(30.0, 0.3 * budget)
    t0 = time.monotonic()
    warm = _run_parallel([[sys.executable, str(Path(__file__).resolve()), "--workload", "--budget",
                           f"{warm_cap - 5:.0f}", "--shard", f"{i}/{jobs}", "--only", only]
                          + ([] if "memcheck" in tools else ["--quick"])  # what the tools will run
                          for i in range(jobs)],
                         env, warm_cap, out / "sanitizer_warm.log")
    result["warm"] = dict(rc=warm, seconds=round(time.monotonic() - t0, 1))
    for tool in tools:
        left = budget - (time.monotonic() - start)
        share = _SHARES[tool] / sum(_SHARES[t] for t in tools[tools.index(tool):])
        cap = left * share
        if cap < 20:
            result["tools"][tool] = dict(errors=None, skipped="budget")
            continue
        tool_env = dict(env)
        if tool == "memcheck":
            tool_env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        log_path = out / f"sanitizer_{tool}.log"
        t0 = time.monotonic()
        # The workload stops starting calls 15 s before the cap, so the tool can print its summary.
        rc = _run(_tool_command(binary, tool, max(5.0, cap - 15), only), tool_env, cap, log_path)
        found = parse(log_path.read_text(errors="replace"))
        log = log_path.read_text(errors="replace")
        found.update(rc=rc, seconds=round(time.monotonic() - t0, 1),
                     calls_ok=log.count("workload ok"), calls_failed=log.count("workload ERROR"),
                     calls_not_run=log.count("not run:"))
        reached = re.search(r"kernel files reached: (.*)", log)
        found["kernel_files"] = reached.group(1) if reached else None
        result["tools"][tool] = found
        print(f"sanitizer {tool}: {found['errors']} errors" + (f", {found['warnings']} warnings"
                                                                if found.get("warnings") is not None else "")
              + f", {found['calls_ok']} calls ok, {found['calls_failed']} failed, {found['calls_not_run']} not run,"
              f" {found['seconds']} s", flush=True)
        for line in found["headlines"][:5]:
            print(f"  {line}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    (out / "sanitizer.json").write_text(json.dumps(result, indent=1))
    return result


def _run_parallel(cmds, env, cap: float, log_path: Path) -> int:
    """The commands at once, their output one after the other in log_path; the largest exit code."""
    logs = [log_path.with_suffix(f".{i}.log") for i in range(len(cmds))]
    handles = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(cmd, env=env, stdout=h, stderr=subprocess.STDOUT) for cmd, h in zip(cmds, handles)]
    deadline = time.monotonic() + cap
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(124)
    with open(log_path, "w") as merged:
        for log, handle in zip(logs, handles):
            handle.close()
            merged.write(log.read_text(errors="replace"))
            log.unlink()
    return max(codes)


def _run(cmd, env, cap: float, log_path: Path) -> int:
    with open(log_path, "w") as log:
        try:
            return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=cap).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[reliability_sanitizer: killed after {cap:.0f} s]\n")
            return 124


def tool_clean(result: dict) -> bool:
    """One tool's run is clean (here and in reliability.py): it finished (printed its summary),
    ran workload calls, and reported nothing in our code."""
    return (result.get("errors") is not None and bool(result.get("calls_ok"))
            and result.get("errors_ours", result["errors"]) == 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="store_true", help="run the calls (inside the sanitized process)")
    parser.add_argument("--only", default="", help="comma-separated substrings of the call names to run (default: all)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--budget", type=float, default=100.0, help="seconds for everything")
    parser.add_argument("--jobs", type=int, default=4, help="processes compiling the workload before the tools")
    parser.add_argument("--shard", default="0/1", help="with --workload: run calls i, i + n, ... (i/n)")
    parser.add_argument("--quick", action="store_true", help="with --workload: the pipelined kernels' calls only")
    parser.add_argument("--out", type=Path, default=Path("out/reliability"))
    args = parser.parse_args(argv)
    if args.workload:
        index, count = (int(x) for x in args.shard.split("/"))
        return run_workload(args.budget, [o for o in args.only.split(",") if o], (index, count), args.quick)
    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}")
    result = run_driver(tools, args.budget, args.out, args.jobs, args.only)
    ran = list(result["tools"].values())
    return 0 if ran and all(tool_clean(r) for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark script shares: options, peers, timing, ceilings, JSON, tables, plots.

A script lists its cases and, for each, the implementations to time (ours and the peers, all in
this process on the same inputs). `Runner.measure` times one of them and records the figure or the
error: our kernels are young, and a failing variant must leave a row saying why, not end the run.
The JSON is rewritten after every measurement, so a run stopped by a time cap keeps what it did.

Run from the repository root: `python -m benchmarks.bench_fwd --quick --out out/`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Optional

import torch

from flash_attn_3.bench import attention_flops, median_ms

TOKENS = 32 * 1024  # B·N of every forward and backward case
MODEL_WIDTH = 2048  # H·D
L2_BYTES = 50 * 2**20  # H100; inputs smaller than this are rotated so L2 does not flatter them
MAX_ROTATION = 256
FAKE_NOTE = "FAKE TIMINGS (--dry-run): shapes and table layout only, not measurements"
# Once one of these happens the CUDA context is dead: every later call fails, so stop early
_STICKY_ERRORS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                  "illegal instruction", "misaligned address")

__all__ = ["TOKENS", "MODEL_WIDTH", "attention_flops", "parse_args", "Runner", "Section",
           "rotating", "sdpa", "sdpa_context", "flex", "flex_masked", "render_markdown"]


def parse_args(description: str, argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="the representative subset that scripts/gpu_check.sh runs")
    p.add_argument("--out", type=Path, default=Path("out"),
                   help="folder for <bench>.json, <bench>.md (tables) and <bench>.png")
    p.add_argument("--only", action="append", default=[], metavar="KEY=V1[,V2]",
                   help="keep cases whose KEY is one of the values (key impl filters "
                        "implementations); repeatable: --only D=128 --only causal=1 "
                        "--only impl=ours,cudnn")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting measurements after this long; the JSON says truncated")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: build the case list and tables from FAKE timings")
    return p.parse_args(argv)


def _text(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def case_label(case: dict) -> str:
    return " ".join(f"{k}={_text(v)}" for k, v in case.items())


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


# ---------------------------------------------------------------------------------------------
# Peers. SDPA and FlexAttention take (B, H, N, D); ours (B, N, H, D). Transposed views cost
# nothing and both peers accept strided inputs, so every implementation reads the same memory.


def sdpa(q, k, v, causal: bool) -> Callable[[], torch.Tensor]:
    """SDPA over (B, N, H, D) inputs; run it under sdpa_context to pin the backend."""
    import torch.nn.functional as F

    qt, kt, vt = (x.transpose(-3, -2) for x in (q, k, v))
    gqa = q.shape[-2] != k.shape[-2]
    kwargs = dict(is_causal=causal, enable_gqa=True) if gqa else dict(is_causal=causal)
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, **kwargs)


def sdpa_context(backend_name: str) -> ContextManager:
    """Only 'cudnn' or only 'fa2': SDPA raises instead of falling back to another backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}
    return sdpa_kernel([backend[backend_name]])


_compiled_flex = None


def flex(q, k, v, causal: bool, doc_ids: Optional[torch.Tensor] = None):
    """Compiled FlexAttention over (B, N, H, D) inputs; doc_ids (N,) masks packed sequences."""

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx if causal else q_idx >= 0
        if doc_ids is not None:
            keep = keep & (doc_ids[q_idx] == doc_ids[kv_idx])
        return keep

    return flex_masked(q, k, v, mask_mod if causal or doc_ids is not None else None)


def flex_masked(q, k, v, mask_mod=None, score_mod=None, return_lse: bool = False):
    """Compiled FlexAttention over (B, N, H, D) inputs with a mask_mod (its block mask built
    here, outside the timed call) and a score_mod; (B, H, N, D) out, and (B, H, N) lse when
    return_lse."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _compiled_flex is None:
        # every shape of the grid is a new graph: raise the limit so none falls back to eager,
        # which materializes N² scores and would run out of memory
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 256
        _compiled_flex = torch.compile(flex_attention, dynamic=False)

    n_q, n_k = q.shape[-3], k.shape[-3]
    block_mask = (None if mask_mod is None
                  else create_block_mask(mask_mod, None, None, n_q, n_k, device=q.device))
    qt, kt, vt = (x.transpose(-3, -2) for x in (q, k, v))
    gqa = q.shape[-2] != k.shape[-2]
    extra = dict(score_mod=score_mod) if score_mod is not None else {}
    if return_lse:
        extra["return_lse"] = True
    return lambda: _compiled_flex(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa, **extra)


def rotating(make_call: Callable[[], Callable[[], object]], set_bytes: int) -> Callable[[], object]:
    """One call that cycles over fresh input sets whose total exceeds L2 (make_call builds one)."""
    count = 1 if set_bytes >= L2_BYTES else min(MAX_ROTATION, math.ceil(2 * L2_BYTES / set_bytes))
    calls = itertools.cycle([make_call() for _ in range(count)])
    return lambda: next(calls)()


# ---------------------------------------------------------------------------------------------
# Machine and ceilings


def _git_commit() -> Optional[str]:
    # The device gets a copy of the working tree whose .git may lag behind: the caller can name
    # the commit it sent (scripts/gpu_check.sh passes FLASH_ATTN_3_COMMIT through).
    if os.environ.get("FLASH_ATTN_3_COMMIT"):
        return os.environ["FLASH_ATTN_3_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip() or None
    except Exception:
        return None


def run_meta(fake: bool) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name() if cuda else "none",
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "backend": os.environ.get("FLASH_ATTN_3_BACKEND"),
        # =0 (portable kernels on the H100) or =1 (Gluon under a triton not yet verified)
        "gluon": os.environ.get("FLASH_ATTN_3_GLUON"),
        "fake": fake,
    }


def measure_ceilings() -> dict:
    """bf16 matmul 8192³ TFLOP/s and device-to-device copy TB/s (bytes read + written)."""
    ceilings = {}
    try:
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ceilings["matmul_bf16_tflops"] = 2 * 8192**3 / median_ms(lambda: a @ b) / 1e9
        del a, b
        src = torch.randn(2**28, device="cuda")  # 1 GiB
        dst = torch.empty_like(src)
        ceilings["copy_tbps"] = 2 * src.nbytes / median_ms(lambda: dst.copy_(src)) / 1e9
        del src, dst
    except Exception as e:
        ceilings["error"] = _error_text(e)
    torch.cuda.empty_cache()
    return ceilings


# ---------------------------------------------------------------------------------------------
# The run


class Section(dict):
    """How one table of a bench reads: metric ('tflops', 'tbps' or 'us'), ratio columns
    (numerator impl, denominator impl or 'ceiling:<key>'), and the plot (x key, panel key,
    series keys besides impl, and a filter of the rows plotted)."""

    def __init__(self, title: str, metric: str, ratios: Iterable[tuple[str, str]] = (),
                 plot_x: Optional[str] = None, plot_panel: Optional[str] = None,
                 plot_series: Iterable[str] = (), plot_where: Optional[dict] = None):
        super().__init__(title=title, metric=metric, ratios=[list(r) for r in ratios],
                         plot_x=plot_x, plot_panel=plot_panel, plot_series=list(plot_series),
                         plot_where=plot_where or {})


UNITS = {"tflops": "TFLOP/s", "tbps": "TB/s", "us": "µs"}


class Runner:
    """Collects one bench's rows; use as a context manager: on exit (also on Ctrl-C or a time
    cap's SIGINT) it writes <bench>.json, <bench>.md and <bench>.png and prints the tables."""

    def __init__(self, bench: str, args: argparse.Namespace, sections: dict[str, Section],
                 case_keys: Iterable[str]):
        self.bench, self.args, self.sections = bench, args, sections
        self.fake = args.dry_run
        self.filters = _parse_filters(args.only, set(case_keys) | {"impl"})
        self.started = time.monotonic()
        self.stop_reason: Optional[str] = None
        self.results: list[dict] = []
        if not self.fake:
            if not torch.cuda.is_available():
                raise SystemExit(f"{bench}: no CUDA device; --dry-run checks the case list")
            # unforced, a call the triton backend refuses runs on the reference backend, whose
            # time would then stand in the table as ours; forced, the refusal is an error row
            os.environ.setdefault("FLASH_ATTN_3_BACKEND", "triton")
        self.meta = run_meta(self.fake)
        self.ceilings = {} if self.fake else measure_ceilings()
        args.out.mkdir(parents=True, exist_ok=True)
        self.save()

    def keep(self, case: dict) -> bool:
        return all(_text(case[k]) in values for k, values in self.filters.items()
                   if k in case)

    def keep_impl(self, impl: str) -> bool:
        return impl in self.filters.get("impl", {impl})

    def stopped(self) -> bool:
        budget = self.args.time_budget
        if self.stop_reason is None and budget and time.monotonic() - self.started > budget:
            self.stop_reason = f"time budget of {budget:.0f} s spent"
        return self.stop_reason is not None

    def measure(self, section: str, case: dict, impl: str, build: Callable[[], Callable],
                *, flops: Optional[float] = None, nbytes: Optional[float] = None,
                context: Optional[Callable[[], ContextManager]] = None,
                timer: Optional[Callable[[Callable], float]] = None) -> None:
        """Build the call (inputs, compile, warm-up happen here) and time it (median_ms unless
        timer is given), both under context (e.g. an SDPA backend choice)."""
        if not self.keep_impl(impl) or self.stopped():
            return
        row = dict(section=section, case=case, impl=impl, ms=None, error=None)
        try:
            if self.fake:
                row["ms"] = _fake_ms(impl, case, flops, nbytes)
            else:
                with (context or contextlib.nullcontext)():
                    fn = build()
                    row["ms"] = (timer or median_ms)(fn)
                del fn
        except Exception as e:
            row["error"] = _error_text(e)
            if any(s in row["error"] for s in _STICKY_ERRORS):
                self.stop_reason = f"CUDA context lost at {impl} {case_label(case)}"
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        ms = row["ms"]
        row["tflops"] = flops / ms / 1e9 if flops and ms else None
        row["tbps"] = nbytes / ms / 1e9 if nbytes and ms else None
        row["us"] = ms * 1e3 if ms else None
        self.results.append(row)
        self.save()
        metric = self.sections[section]["metric"]
        shown = f"{row[metric]:.4g} {UNITS[metric]}" if row[metric] else row["error"]
        print(f"[{self.bench}] {case_label(case)} {impl}: {shown}", flush=True)

    def document(self) -> dict:
        return dict(bench=self.bench, fake=self.fake, meta=self.meta, ceilings=self.ceilings,
                    argv=sys.argv[1:], stop_reason=self.stop_reason, sections=self.sections,
                    results=self.results)

    def save(self) -> None:
        path = self.args.out / f"{self.bench}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.document(), indent=1))
        tmp.replace(path)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is KeyboardInterrupt:
            self.stop_reason = self.stop_reason or "interrupted (time cap)"
        self.save()
        doc = self.document()
        text = render_markdown(doc)
        (self.args.out / f"{self.bench}.md").write_text(text + "\n")
        print(text, flush=True)
        if not self.fake:
            plot(doc, self.args.out / f"{self.bench}.png")
        return exc_type is KeyboardInterrupt


def _parse_filters(only: list[str], known: set[str]) -> dict[str, set[str]]:
    filters: dict[str, set[str]] = {}
    for item in only:
        key, sep, values = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--only {item!r}: expected KEY=V1[,V2] with KEY one of "
                             f"{', '.join(sorted(known))}")
        filters.setdefault(key, set()).update(values.split(","))
    return filters


def _fake_ms(impl: str, case: dict, flops: Optional[float], nbytes: Optional[float]) -> float:
    # stable per (impl, case) so repeated dry runs print the same table
    # and far from real figures (1-2 TFLOP/s, 0.01-0.02 TB/s) so none passes for a measurement
    h = int(hashlib.sha1(f"{impl} {case_label(case)}".encode()).hexdigest()[:8], 16) / 2**32
    if flops:
        return flops / ((1 + h) * 1e9)
    if nbytes:
        return nbytes / ((1 + h) * 1e7)
    return 1 + h


# ---------------------------------------------------------------------------------------------
# Reading a run back: tables and plots (also used by scripts/update_benchmarks.py)


def _fmt(value: Optional[float], metric: str) -> str:
    if value is None:
        return "—"
    if metric == "tbps":
        return f"{value:.2f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _impl_order(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["impl"] for r in rows))


def render_section(doc: dict, name: str) -> str:
    """One markdown table: a row per case, a column per implementation, then the ratios."""
    spec = doc["sections"][name]
    metric = spec["metric"]
    rows = [r for r in doc["results"] if r["section"] == name]
    if not rows:
        return f"_{spec['title']}: no rows_"
    impls = _impl_order(rows)
    cases: dict[str, dict] = {}
    cells: dict[tuple[str, str], dict] = {}
    for r in rows:
        label = case_label(r["case"])
        cases.setdefault(label, r["case"])
        cells[label, r["impl"]] = r
    keys = list(next(iter(cases.values())).keys())
    ratio_names = [f"{n}/{d.removeprefix('ceiling:')}" for n, d in spec["ratios"]]
    header = keys + [f"{i} {UNITS[metric]}" for i in impls] + ratio_names
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    errors: dict[tuple[str, str], list[str]] = {}
    for label, case in cases.items():
        out = [_text(case.get(k, "")) for k in keys]
        for impl in impls:
            cell = cells.get((label, impl))
            if cell is None:
                out.append("")
            elif cell["error"]:
                errors.setdefault((impl, cell["error"]), []).append(label)
                out.append("err")
            else:
                out.append(_fmt(cell[metric], metric))
        for num, den in spec["ratios"]:
            a = cells.get((label, num), {}).get(metric)
            # a row merged from another run (scripts/update_benchmarks.py) keeps that run's ceilings
            own = cells.get((label, num), {}).get("ceilings") or doc["ceilings"]
            b = (own.get(den.removeprefix("ceiling:")) if den.startswith("ceiling:")
                 else cells.get((label, den), {}).get(metric))
            # a latency ratio reads the other way round: smaller is better
            ratio = (b / a if metric == "us" else a / b) if a and b else None
            out.append("—" if ratio is None else f"{ratio:.2f}")
        lines.append("| " + " | ".join(out) + " |")
    for (impl, message), labels in errors.items():
        more = f" (+{len(labels) - 1} more)" if len(labels) > 1 else ""
        lines.append(f"\nerr {impl} at {labels[0]}{more}: `{message}`")
    return f"**{spec['title']}**\n\n" + "\n".join(lines)


def _ceilings_text(c: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in c.items() if isinstance(v, (int, float)))


def run_header(doc: dict) -> str:
    m, c = doc["meta"], doc["ceilings"]
    ceil = _ceilings_text(c)
    if doc.get("runs"):  # merged by scripts/update_benchmarks.py: each run with its own ceilings
        head = (f"{m['gpu']}, torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, "
                f"cuDNN {m['cudnn']}; rows from the runs of "
                + " and ".join(f"{r['date']} (commit {r['commit']}; ceilings in that run: "
                               f"{_ceilings_text(r['ceilings'])})" for r in doc["runs"]))
    else:
        head = (f"{m['date']}, {m['gpu']}, torch {m['torch']}, triton {m['triton']}, "
                f"CUDA {m['cuda']}, cuDNN {m['cudnn']}, commit {m['commit']}"
                + (f"; ceilings in the same run: {ceil}" if ceil else ""))
    if m.get("gluon"):
        head += f"; FLASH_ATTN_3_GLUON={m['gluon']}"
    if doc.get("stop_reason"):
        head += f"; stopped early: {doc['stop_reason']}"
    return (FAKE_NOTE + "\n\n" + head) if doc["fake"] else head


def render_markdown(doc: dict) -> str:
    parts = [run_header(doc)] + [render_section(doc, name) for name in doc["sections"]]
    return "\n\n".join(parts)


def plot(doc: dict, path: Path) -> Optional[Path]:
    """One PNG per bench: a panel per plot_panel value, metric against plot_x, a line per
    implementation and series key. Skipped (None) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = []
    for name, spec in doc["sections"].items():
        if not spec["plot_x"]:
            continue
        rows = [r for r in doc["results"] if r["section"] == name and r[spec["metric"]]
                and all(_text(r["case"].get(k)) == _text(v) for k, v in spec["plot_where"].items())]
        for value in dict.fromkeys(_text(r["case"].get(spec["plot_panel"])) for r in rows):
            panels.append((spec, value, [r for r in rows
                                         if _text(r["case"].get(spec["plot_panel"])) == value]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (spec, value, rows) in zip(axes[0], panels):
        series: dict[str, list] = {}
        for r in rows:
            key = " ".join([r["impl"]] + [f"{k}={_text(r['case'][k])}"
                                          for k in spec["plot_series"]])
            series.setdefault(key, []).append((r["case"][spec["plot_x"]], r[spec["metric"]]))
        for key, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(spec["plot_x"])
        ax.set_ylabel(UNITS[spec["metric"]])
        ax.set_title(f"{spec['title']}\n{spec['plot_panel']}={value}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    m = doc["meta"]
    fig.suptitle(f"{m['gpu']} {m['date']} torch {m['torch']} triton {m['triton']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

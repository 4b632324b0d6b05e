"""The split-KV merge (combine.py) against an earlier revision of itself, on the GPU (~20 s).

    python scripts/time_combine.py [--against REV] [--json]

combine.py was rewritten to use no shared memory (racecheck reported its shared-memory sums,
RELIABILITY.md run 4), and many splits over few rows got slower (docs/perf-notes.md, "combine.py
under racecheck"). Per shape (splits, batch, length, heads, head dim), one line: µs a launch of
the current kernel and of combine.py as it was at REV (default 9f1c3f8, the last form with
shared memory; `git show` reads it, so this needs the repository's history), each checked
against a float64 merge of the same partials first, and the bytes moved per second (TB/s).
Times are replays of one CUDA graph of 40 launches (bench_decode.graph_ms): the merge runs once
per split decode step, and graphs are how serving engines run it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_decode import graph_ms  # noqa: E402
from flash_attn_3.backends.triton import combine  # noqa: E402

# (splits, batch, length, heads, head dim): decode steps of one or many sequences, a prefill's
# split forward, MLA's value width
SHAPES = [(4, 1, 1, 32, 128), (16, 1, 1, 32, 128), (64, 1, 1, 32, 128), (8, 16, 1, 32, 128),
          (4, 64, 1, 32, 128), (133, 2, 129, 4, 128), (16, 128, 1, 32, 128), (8, 2, 1, 16, 512)]


def revision_module(rev: str):
    """combine.py as of `rev`, imported beside the package's own (its relative imports resolve
    against flash_attn_3.backends.triton)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:flash_attn_3/backends/triton/combine.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "combine_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("flash_attn_3.backends.triton._combine_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(part: torch.Tensor, lse: torch.Tensor):
    total = torch.logsumexp(lse.double(), 0)
    weight = torch.exp(lse.double() - total).nan_to_num(0.0)
    return (weight[..., None] * part.double().nan_to_num(0.0)).sum(0), total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="9f1c3f8", help="git revision of the other combine.py")
    p.add_argument("--json", action="store_true", help="one JSON object per shape")
    args = p.parse_args()
    kernels = {"now": combine, args.against: revision_module(args.against)}
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}", flush=True)
    for shape in SHAPES:
        splits, batch, length, heads, dim = shape
        part = torch.randn(splits, batch, length, heads, dim, device="cuda")
        lse = torch.randn(splits, batch, length, heads, device="cuda") * 3
        lse[torch.rand_like(lse) < 0.2] = -math.inf
        part[lse == -math.inf] = float("nan")  # an empty split's partial is never read
        want_out, want_lse = reference(part, lse)
        seen = torch.isfinite(want_lse)
        moved = part.numel() * 4 + lse.numel() * 4 + batch * length * heads * (dim * 2 + 4)
        row = dict(shape=shape)
        for name, module in kernels.items():
            out = torch.empty(batch, length, heads, dim, device="cuda", dtype=torch.bfloat16)
            final = torch.empty(batch, length, heads, device="cuda")
            fn = lambda: module.combine_into(part, lse, out, final)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            err = (out.double() - want_out).abs().max().item()
            lse_err = (final[seen].double() - want_lse[seen]).abs().max().item() if seen.any() else 0.0
            if err > 2e-2 or lse_err > 1e-4 or not torch.equal(torch.isfinite(final), seen):
                raise SystemExit(f"{name} {shape}: wrong (out {err:.3g}, lse {lse_err:.3g})")
            us = graph_ms(fn, steps=40) * 1000
            row[name] = dict(us=round(us, 2), tbps=round(moved / us / 1e6, 3))
        print(json.dumps(row) if args.json else "  ".join(
            [str(shape)] + [f"{n} {r['us']:.2f} us ({r['tbps']:.2f} TB/s)" for n, r in row.items()
                            if n != "shape"]), flush=True)


if __name__ == "__main__":
    main()

"""Compile cost of each shape class on a cold Triton cache (issue 3's bound: first call < 30 s, no
recompilation when only sequence lengths change).

For every class this times the first call (compile + autotune, in a fresh TRITON_CACHE_DIR so
nothing comes from an earlier process) and then calls at other sequence lengths, counting the
kernels Triton compiles on each call through its post-compile hook. A later call that compiles
anything is a defect of the specialization keys.

    python scripts/compile_cost.py [--out DIR]      (GPU; writes compile_cost.json and .md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Before triton is imported: a cold cache measures the compile, not a disk hit.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fa3-compile-cost-")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flash_attn_interface as fa  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
LENGTHS = (1000, 3000, 5120)  # three autotune length buckets, ragged and whole blocks
compiled: list[str] = []


def _count_compile(**kwargs):
    compiled.append(kwargs["fn"].name if hasattr(kwargs["fn"], "name") else str(kwargs["fn"]))
    return False


def _dense(d: int, causal: bool, backward: bool = False):
    heads = 2048 // d

    def call(n: int):
        q, k, v = (torch.randn(2, n, heads, d, device=DEV, dtype=DT, requires_grad=backward)
                   for _ in range(3))
        out = fa.flash_attn_func(q, k, v, causal=causal)
        if backward:
            out.backward(torch.randn_like(out))
    return call


def _varlen(d: int, causal: bool):
    heads = 2048 // d

    def call(n: int):
        lens = torch.tensor([n // 2, n - n // 2], dtype=torch.int32)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32).to(DEV)
        q, k, v = (torch.randn(n, heads, d, device=DEV, dtype=DT) for _ in range(3))
        fa.flash_attn_varlen_func(q, k, v, cu, cu, int(lens.max()), int(lens.max()), causal=causal)
    return call


def _decode(page_size: int):
    def call(n: int):
        pages = (n + 64 + page_size - 1) // page_size * 4
        k_cache = torch.randn(pages, page_size, 8, 128, device=DEV, dtype=DT)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(pages, device=DEV, dtype=torch.int32).view(4, -1)
        q = torch.randn(4, 1, 32, 128, device=DEV, dtype=DT)
        k_new, v_new = (torch.randn(4, 1, 8, 128, device=DEV, dtype=DT) for _ in range(2))
        lens = torch.full((4,), n, dtype=torch.int32, device=DEV)
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                   page_table=table, causal=True)
    return call


CLASSES = {
    "fwd dense D=128 causal": _dense(128, True),
    "fwd dense D=64": _dense(64, False),
    "fwd dense D=256 causal": _dense(256, True),
    "fwd varlen D=128 causal": _varlen(128, True),
    "kvcache paged 16 + append, GQA 32/8": _decode(16),
    "fwd+bwd dense D=128 causal": _dense(128, True, backward=True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = parser.parse_args()
    triton.knobs.runtime.jit_post_compile_hook = _count_compile
    rows = []
    for name, call in CLASSES.items():
        row = {"class": name}
        for i, n in enumerate(LENGTHS):
            compiled.clear()
            torch.cuda.synchronize()
            start = time.perf_counter()
            call(n)
            torch.cuda.synchronize()
            row[f"s_{n}"] = round(time.perf_counter() - start, 2)
            row[f"compiles_{n}"] = len(compiled)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "lengths": LENGTHS}
    (args.out / "compile_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    first, *later = LENGTHS
    lines = [f"{meta['date']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}; "
             "cold TRITON_CACHE_DIR", "",
             f"| class | first call (N={first}) s | compiles | later calls (N={', '.join(map(str, later))}) s | compiles |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['class']} | {r[f's_{first}']} | {r[f'compiles_{first}']} | "
                     f"{' / '.join(str(r[f's_{n}']) for n in later)} | "
                     f"{' / '.join(str(r[f'compiles_{n}']) for n in later)} |")
    (args.out / "compile_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [r["class"] for r in rows if any(r[f"compiles_{n}"] for n in later)]
    if bad:
        print("recompiled when only the lengths changed:", ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

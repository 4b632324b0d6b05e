"""Write the tables of BENCHMARKS.md from the JSON that scripts/gpu_check.sh brings back.

    python scripts/update_benchmarks.py out/gpu_check            # every bench_*.json in it
    python scripts/update_benchmarks.py bench_fwd.json --doc BENCHMARKS.md
    python scripts/update_benchmarks.py run1/ run2/bench_bwd.json  # runs of one bench merged

Several files of one bench (a run cut short by its time budget, then the missing rows) merge:
a later file's cases replace the earlier ones whole, so every row's peers and ratio still come from
one process; the header names each run.

Each bench's tables replace what sits between `<!-- <bench>:begin -->` and `<!-- <bench>:end -->`,
headed by the run's date, GPU, torch/triton/CUDA/cuDNN versions and the ceilings measured in the
same run; every ratio divides by a peer timed in that same process. Dry-run (fake) files and runs
without a GPU are refused: BENCHMARKS.md only ever holds measurements.

A run under another triton, or with FLASH_ATTN_3_GLUON set, keeps the main tables and goes to a
block of its own, `<!-- <bench>@triton-3.8:begin -->` (or `@triton-3.8-gluon0`, ...), added at
the end of the document under a heading the first time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a script run by path: make benchmarks/ importable

from benchmarks.harness import render_markdown  # noqa: E402


def json_files(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        found += sorted(p.glob("bench_*.json")) if p.is_dir() else [p]
    return found


def load_measured(path: Path) -> dict:
    doc = json.loads(path.read_text())
    if doc.get("fake") or doc["meta"].get("fake"):
        raise SystemExit(f"{path}: fake timings from --dry-run; BENCHMARKS.md takes measurements "
                         "only")
    if doc["meta"].get("gpu") in (None, "none"):
        raise SystemExit(f"{path}: measured without a GPU")
    if not any(r["ms"] for r in doc["results"]):
        raise SystemExit(f"{path}: no successful measurement in it")
    return doc


def _case_key(r: dict) -> tuple:
    return r["section"], json.dumps(r["case"], sort_keys=True)


SAME_MACHINE = ("gpu", "torch", "triton", "cuda", "cudnn", "gluon")


def merge_runs(docs: list[dict]) -> dict:
    """One doc of the same bench from several runs; each case keeps the rows of its last run,
    and each row the ceilings of its run. Runs on another GPU or software stack do not merge."""
    if len(docs) == 1:
        return docs[0]
    first = docs[0]["meta"]
    for doc in docs[1:]:
        differ = [k for k in SAME_MACHINE if doc["meta"].get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{doc['bench']}: runs of {first.get('date')} and "
                             f"{doc['meta'].get('date')} differ in {', '.join(differ)}: their rows "
                             "cannot share a table")
    rows: dict[tuple, list] = {}
    for doc in docs:
        fresh: dict[tuple, list] = {}
        for r in doc["results"]:
            fresh.setdefault(_case_key(r), []).append(dict(r, ceilings=doc["ceilings"]))
        rows.update(fresh)
    merged = dict(docs[-1], results=[r for group in rows.values() for r in group],
                  sections={k: v for d in docs for k, v in d["sections"].items()},
                  runs=[dict(date=d["meta"]["date"], commit=d["meta"]["commit"],
                             ceilings=d["ceilings"]) for d in docs])
    stops = [d.get("stop_reason") for d in docs if d.get("stop_reason")]
    merged["stop_reason"] = ("rows merged from runs that stopped early (" + "; ".join(stops)
                             + "), later runs filling the missing cases") if stops else None
    return merged


# The triton and Gluon setting BENCHMARKS.md's main tables are measured with.
MAIN_TRITON = "3.6"


def block_name(doc: dict) -> str:
    """The block a run's tables go to: the bench's own, or one per other triton / Gluon setting."""
    meta = doc["meta"]
    minor = ".".join(str(meta.get("triton") or "").split(".")[:2])
    gluon = meta.get("gluon")
    if minor == MAIN_TRITON and not gluon:
        return doc["bench"]
    return f"{doc['bench']}@triton-{minor}" + (f"-gluon{gluon}" if gluon else "")


def replace_block(text: str, bench: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {re.escape(bench)}:begin -->\n).*?(<!-- {re.escape(bench)}:end -->)",
                         re.S)
    if not pattern.search(text):
        if "@" not in bench:
            raise SystemExit(f"no '<!-- {bench}:begin -->' ... '<!-- {bench}:end -->' block to fill")
        name, variant = bench.split("@", 1)
        _, minor, *gluon = variant.split("-")
        title = f"{name}, triton {minor}" + (f", FLASH_ATTN_3_GLUON={gluon[0][5:]}" if gluon else "")
        text = (text.rstrip("\n") + f"\n\n## {title}\n\n"
                f"<!-- {bench}:begin -->\n<!-- {bench}:end -->\n")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="bench_*.json files or folders")
    parser.add_argument("--doc", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--stdout", action="store_true", help="print the result, write nothing")
    args = parser.parse_args(argv)
    files = json_files(args.inputs)
    if not files:
        raise SystemExit("no bench_*.json found")
    text = args.doc.read_text()
    by_bench: dict[str, list] = {}
    for path in files:
        doc = load_measured(path)
        by_bench.setdefault(block_name(doc), []).append(doc)
        print(f"{path}: {doc['bench']} from {doc['meta']['date']} on {doc['meta']['gpu']}",
              file=sys.stderr)
    for bench, docs in by_bench.items():
        text = replace_block(text, bench, render_markdown(merge_runs(docs)))
    if args.stdout:
        print(text)
    else:
        args.doc.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

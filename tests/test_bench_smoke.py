"""The benchmark plumbing on CPU: grids, FLOP counts, failure recording, tables, BENCHMARKS.md.

No timing is checked here (CPU numbers mean nothing); the GPU run is scripts/gpu_check.sh.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_bwd, bench_decode, bench_fwd, harness

    return SimpleNamespace(fwd=bench_fwd, bwd=bench_bwd, decode=bench_decode, harness=harness)


def test_attention_flops_follow_the_published_convention():
    from flash_attn_3.bench import attention_flops

    b, h, n, d = random.randint(1, 8), random.randint(1, 32), random.randint(1, 4096), 64
    dense = 4 * b * h * n * n * d
    assert attention_flops([n] * b, h, d, causal=False) == dense
    assert attention_flops([n] * b, h, d, causal=True) == dense / 2
    assert attention_flops([n] * b, h, d, causal=False, mode="bwd") == 2.5 * dense
    assert attention_flops([n] * b, h, d, causal=False, mode="fwd_bwd") == 3.5 * dense
    lens = [random.randint(1, 999) for _ in range(5)]
    assert attention_flops(lens, h, d, False, head_dim_v=2 * d) == sum(
        2 * x * x * 3 * d for x in lens) * h


def test_grids_match_the_brief(bench):
    fwd = list(bench.fwd.cases(quick=False))
    assert len(fwd) == 3 * 5 * 2 * 3 * 2
    for c in fwd:
        assert c["H"] * c["D"] == 2048 and c["B"] * c["N"] == 32 * 1024
        lens = bench.fwd.seqlens(c)
        assert sum(lens) == 32 * 1024 and len(lens) == c["B"] and min(lens) > 0
        if c["layout"] == "varlen_ragged":
            assert len(set(lens)) > 1
    quick = list(bench.fwd.cases(quick=True))
    assert {c["D"] for c in quick} == {64, 128, 256} and {c["causal"] for c in quick} == {0, 1}
    assert {(c["layout"], c["dtype"]) for c in quick} >= {("varlen_ragged", "bf16"),
                                                          ("dense", "fp8")}
    assert all(c["dtype"] == "bf16" for c in bench.bwd.cases(quick=False))
    decode = list(bench.decode.bandwidth_cases(quick=False))
    assert {c["page"] for c in decode} == {0, 16, 64}
    assert {(c["Hq"], c["Hk"]) for c in decode} == {(32, 8), (8, 1)}
    assert all(bench.decode.kv_bytes(c) <= bench.decode.MAX_KV_BYTES for c in decode)


def test_model_layer_grid(bench):
    """Issue 16's layers at 8k and 32k tokens, each kept fraction of the causal score entries
    as the target reads it (a 4096 window at 8k keeps 75 %)."""
    fwd = bench.fwd
    layers = list(fwd.layer_cases(quick=False))
    assert {c["layer"] for c in layers} == set(fwd.LAYERS)
    assert {c["N"] for c in layers} == {8192, 32768} and all(c["layout"] == "layer" for c in layers)
    # H·D = 2048 where D divides it; Phi-3's 96 takes the 21 heads that fit (2016)
    assert all(c["H"] == 2048 // c["D"] and c["B"] * c["N"] == 32 * 1024 for c in layers)
    assert {c["D"] for c in layers} >= {64, 96, 128, 256}
    kept = {(c["layer"], c["N"]): fwd.kept_entries(c, c["layer"]) / fwd.kept_entries(c)
            for c in layers}
    assert kept["mistral_window4096", 8192] == pytest.approx(0.75, abs=1e-3)
    assert kept["llama4_chunk8192", 32768] == pytest.approx(0.25, abs=1e-3)
    assert kept["gemma2_softcap50", 32768] == 1.0
    assert {c["layer"] for c in fwd.layer_cases(quick=True)} == set(fwd.LAYERS)


def test_backward_model_layer_grid(bench):
    """The backward's layers: the forward's that have a backward (not the chunk), Mistral's
    window also packed (equal and ragged lengths, same token count), a padded head dim; both
    passes; kept fractions as the forward counts them."""
    bwd, fwd = bench.bwd, bench.fwd
    layers = list(bwd.layer_cases(quick=False))
    names = {c["layer"] for c in layers}
    assert names >= {n for n in fwd.LAYERS if not fwd.LAYERS[n].get("chunk")}
    assert not any(bwd.LAYERS[n].get("chunk") for n in names)
    assert {c["pass"] for c in layers} == {"bwd", "fwd_bwd"}
    for c in layers:
        lens = bwd.layer_lengths(c)
        assert sum(lens) == 32 * 1024 and len(lens) == c["B"]
        if c["layer"] in fwd.LAYERS:
            assert bwd.layer_kept(c) == c["B"] * fwd.kept_entries(c, c["layer"])
            assert bwd.layer_kept(c, True) == c["B"] * fwd.kept_entries(c)
    ragged = [c for c in layers if c["layer"].endswith("ragged") and c["N"] == 8192]
    assert ragged and all(len(set(bwd.layer_lengths(c))) > 1 for c in ragged)


def test_dry_runs_write_fake_json_and_tables(bench, tmp_path, capsys):
    backend_before = os.environ.get("FLASH_ATTN_3_BACKEND")
    for module, name in ((bench.fwd, "bench_fwd"), (bench.bwd, "bench_bwd"),
                         (bench.decode, "bench_decode")):
        module.main(["--dry-run", "--quick", "--out", str(tmp_path), "--only", "impl=ours,cudnn"])
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["fake"] and doc["results"] and doc["stop_reason"] is None
        assert {r["impl"] for r in doc["results"]} == {"ours", "cudnn"}
        assert all(r["ms"] and not r["error"] for r in doc["results"])
        table = (tmp_path / f"{name}.md").read_text()
        assert table.startswith(bench.harness.FAKE_NOTE) and "ours/cudnn" in table
    assert "FAKE TIMINGS" in capsys.readouterr().out
    assert os.environ.get("FLASH_ATTN_3_BACKEND") == backend_before


def test_only_rejects_unknown_keys(bench, tmp_path):
    with pytest.raises(SystemExit, match="expected KEY"):
        bench.fwd.main(["--dry-run", "--out", str(tmp_path), "--only", "headdim=128"])


def _measuring_runner(bench, tmp_path, monkeypatch, **args):
    """A non-dry Runner on CPU: device probing replaced, timings given by the test."""
    h = bench.harness
    meta = dict(h.run_meta(False), gpu="test")
    monkeypatch.setattr(h, "run_meta", lambda fake: meta)
    monkeypatch.setattr(h.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")  # restored after the test
    monkeypatch.setattr(h, "measure_ceilings", lambda: {"copy_tbps": 3.0})
    ns = SimpleNamespace(dry_run=False, only=[], out=tmp_path, time_budget=None, quick=True)
    vars(ns).update(args)
    sections = {"s": h.Section("test", "tflops", ratios=[("ours", "cudnn")])}
    return h.Runner("bench_t", ns, sections, ["N"])


def test_failing_variant_is_recorded_and_the_run_goes_on(bench, tmp_path, monkeypatch):
    flops = random.uniform(1e9, 1e12)
    ms = random.uniform(0.1, 10)

    def broken():
        raise RuntimeError("kernel not written yet\nsecond line")

    with _measuring_runner(bench, tmp_path, monkeypatch) as run:
        run.measure("s", {"N": 1}, "ours", broken, flops=flops)
        run.measure("s", {"N": 1}, "cudnn", lambda: None, flops=flops, timer=lambda fn: ms)
        run.measure("s", {"N": 2}, "ours", lambda: None, flops=flops, timer=lambda fn: ms / 2)
        run.measure("s", {"N": 2}, "cudnn", lambda: None, flops=flops, timer=lambda fn: ms)
    doc = json.loads((tmp_path / "bench_t.json").read_text())
    first, second, third, _ = doc["results"]
    assert first["error"] == "RuntimeError: kernel not written yet" and first["ms"] is None
    assert second["tflops"] == pytest.approx(flops / ms / 1e9)
    assert third["tflops"] == pytest.approx(2 * second["tflops"])
    table = (tmp_path / "bench_t.md").read_text()
    assert "| 1 | err |" in table and "| 2.00 |" in table
    assert "kernel not written yet" in table


def test_lost_cuda_context_and_interrupt_stop_the_run_but_keep_the_files(bench, tmp_path,
                                                                          monkeypatch):
    def dead():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with _measuring_runner(bench, tmp_path, monkeypatch) as run:
        run.measure("s", {"N": 1}, "ours", dead, flops=1.0)
        run.measure("s", {"N": 1}, "cudnn", lambda: None, flops=1.0, timer=lambda fn: 1.0)
        assert run.stopped() and len(run.results) == 1
    with _measuring_runner(bench, tmp_path, monkeypatch) as run:
        run.measure("s", {"N": 1}, "ours", lambda: None, flops=1.0, timer=lambda fn: 1.0)
        raise KeyboardInterrupt
    doc = json.loads((tmp_path / "bench_t.json").read_text())
    assert doc["stop_reason"].startswith("interrupted") and len(doc["results"]) == 1


def test_update_benchmarks_takes_measurements_only(bench, tmp_path):
    from scripts import update_benchmarks  # the repository root is on sys.path (fixture)

    bench.decode.main(["--dry-run", "--quick", "--out", str(tmp_path)])
    fake = tmp_path / "bench_decode.json"
    target = tmp_path / "BENCHMARKS.md"
    target.write_text((REPO / "BENCHMARKS.md").read_text())
    with pytest.raises(SystemExit, match="fake"):
        update_benchmarks.main([str(fake), "--doc", str(target)])
    # the same rows presented as a GPU run: only the rendering is under test here
    doc = json.loads(fake.read_text())
    doc["fake"] = doc["meta"]["fake"] = False
    doc["meta"]["gpu"] = "Test GPU"
    # the main tables' triton, whichever this process runs (another one's run gets a block of its own)
    doc["meta"]["triton"] = f"{update_benchmarks.MAIN_TRITON}.0"
    doc["meta"].pop("gluon", None)
    doc["ceilings"] = {"copy_tbps": 3.0}
    measured = tmp_path / "measured" / "bench_decode.json"
    measured.parent.mkdir()
    measured.write_text(json.dumps(doc))
    update_benchmarks.main([str(measured.parent), "--doc", str(target)])
    text = target.read_text()
    block = text.split("<!-- bench_decode:begin -->")[1].split("<!-- bench_decode:end -->")[0]
    assert "Test GPU" in block and "copy_tbps 3" in block and "ours/copy_tbps" in block
    assert "FAKE" not in block

    def fwd_block(doc: str) -> str:
        return doc.split("<!-- bench_fwd:begin -->")[1].split("<!-- bench_fwd:end -->")[0]

    assert fwd_block(text) == fwd_block((REPO / "BENCHMARKS.md").read_text())  # others untouched


def test_update_benchmarks_keeps_other_tritons_apart(bench, tmp_path):
    """A run under another triton (or with FLASH_ATTN_3_GLUON set) gets a table of its own, named
    by both, and leaves the main tables alone."""
    from scripts import update_benchmarks

    bench.decode.main(["--dry-run", "--quick", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "bench_decode.json").read_text())
    doc["fake"] = doc["meta"]["fake"] = False
    doc["meta"].update(gpu="Test GPU", triton="3.8.0", gluon="1")
    doc["ceilings"] = {"copy_tbps": 3.0}
    measured = tmp_path / "measured" / "bench_decode.json"
    measured.parent.mkdir()
    measured.write_text(json.dumps(doc))
    target = tmp_path / "BENCHMARKS.md"
    main_text = (REPO / "BENCHMARKS.md").read_text()
    target.write_text(main_text)
    for _ in range(2):  # the second run replaces the block the first one added
        update_benchmarks.main([str(measured.parent), "--doc", str(target)])
    text = target.read_text()
    assert text.startswith(main_text.rstrip("\n"))
    assert text.count("<!-- bench_decode@triton-3.8-gluon1:begin -->") == 1
    block = text.split("<!-- bench_decode@triton-3.8-gluon1:begin -->")[1]
    assert "triton 3.8.0" in block and "FLASH_ATTN_3_GLUON=1" in block


def test_update_benchmarks_merges_runs_case_by_case():
    from scripts import update_benchmarks

    def run(date, rows, copy_tbps=3.0, gpu="H100"):
        return dict(bench="bench_t", meta=dict(date=date, commit="abc", gpu=gpu, torch="2",
                                               triton="3", cuda="13", cudnn=1),
                    ceilings={"copy_tbps": copy_tbps}, sections={"s": {}}, stop_reason=None,
                    results=[dict(section="s", case={"N": n}, impl=impl, ms=ms)
                             for n, impl, ms in rows])

    first = run("d1", [(1, "ours", 1.0), (1, "cudnn", 2.0), (2, "ours", 3.0)], copy_tbps=2.0)
    second = run("d2", [(2, "ours", 5.0), (3, "ours", 7.0)])
    merged = update_benchmarks.merge_runs([first, second])
    got = sorted((r["case"]["N"], r["impl"], r["ms"], r["ceilings"]["copy_tbps"])
                 for r in merged["results"])
    # case N=2 comes whole from the later run; N=1 keeps both rows, and the ceilings, of the first
    assert got == [(1, "cudnn", 2.0, 2.0), (1, "ours", 1.0, 2.0), (2, "ours", 5.0, 3.0),
                   (3, "ours", 7.0, 3.0)]
    assert [r["date"] for r in merged["runs"]] == ["d1", "d2"]
    with pytest.raises(SystemExit, match="differ in gpu"):
        update_benchmarks.merge_runs([first, run("d3", [(1, "ours", 1.0)], gpu="H200")])


def test_ceiling_ratios_use_each_rows_own_run(bench):
    from benchmarks import harness

    spec = dict(metric="tbps", ratios=[("ours", "ceiling:copy_tbps")], title="t")
    doc = dict(ceilings={"copy_tbps": 3.0}, sections={"s": spec}, results=[
        dict(section="s", case={"N": 1}, impl="ours", tbps=2.4, error=None,
             ceilings={"copy_tbps": 2.4}),
        dict(section="s", case={"N": 2}, impl="ours", tbps=2.4, error=None)])
    table = harness.render_section(doc, "s")
    assert "| 1 | 2.4" in table and "| 1.00 |" in table and "| 0.80 |" in table


def test_gpu_check_script_parses_and_refuses_unknown_parts(tmp_path):
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    res = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True,
                         env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and "unknown part" in res.stdout


def test_package_bench_table_formats_ratios():
    from flash_attn_3.bench import format_rows

    ours, peer = random.uniform(1, 500), random.uniform(1, 500)
    rows = [dict(case="c1", unit="TFLOP/s", ours=ours, peer=peer, error=None),
            dict(case="c2", unit="TB/s", ours=None, peer=peer, error="ValueError: no")]
    text = format_rows(rows, "cuDNN")
    assert f"{ours / peer:.2f}" in text and "error: ValueError: no" in text

"""flash_attn_3.distributed: context parallelism on torch.distributed, against single-process attention.

Process groups of 1, 2, 3 and 4 ranks are spawned on the CPU with gloo, once per world size; each
runs every check of tests/distributed_checks.py (ring, all-gather and Ulysses, dense and packed,
causal / window / GQA / softcap, forward and backward against the float64 reference; deterministic
repeatability; decode over an interleaved cache with appends; bad input). The parent joins each
group under a timeout: a rank stuck in a collective fails the test instead of hanging the suite.
The rest runs in-process: layouts, the block planner, the ring schedule, the strategy choice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import distributed_checks

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZES = [1, 2, 3, 4]
GROUP_TIMEOUT_S = 300  # generous for a loaded 2-core machine; a healthy group takes well under a minute
CPU_CHECKS = ["ring", "allgather", "ulysses", "auto", "device_mesh", "deterministic", "decode", "bad_input"]


def spawn_group(world: int, names: list, device: str = "cpu", timeout: float = GROUP_TIMEOUT_S) -> dict:
    """Run the named checks on `world` spawned ranks; returns {name: None or 'rank r: traceback'}
    (a check missing from a rank's results: that rank never finished it)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{tmp}/store"
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # fresh inputs every run
        context = mp.start_processes(distributed_checks.run_rank, args=(world, init_method, tmp, names, seed, device),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        ended = None  # why the group ended early, if it did
        while ended is None:
            try:
                if context.join(timeout=1.0):
                    break
            except Exception as exc:  # a rank died outside a check; the others may be stuck waiting for it
                ended = f"a rank exited: {exc}"
            if ended is None and time.monotonic() > deadline:
                ended = f"hung, killed after {timeout:.0f} s"
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=30)
        per_rank = []
        for rank in range(world):
            path = Path(tmp) / f"rank{rank}.json"
            per_rank.append(json.loads(path.read_text()) if path.exists() else {})
    results = {}
    for name in names:
        failures = []
        for rank, done in enumerate(per_rank):
            if name not in done:
                failures.append(f"rank {rank}: never finished ({ended or 'exited'})")
            elif done[name] is not None:
                failures.append(f"rank {rank}:\n{done[name]}")
        results[name] = "\n".join(failures) or None
    return results


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def checks_for(world: int) -> list:
    if world != 2:
        return CPU_CHECKS
    return CPU_CHECKS + ["compile"] + (["transformers"] if HAS_TRANSFORMERS else [])


def assert_all_passed(results: dict, where: str) -> None:
    failed = {name: text for name, text in results.items() if text}
    assert not failed, f"{where}: {len(failed)} of {len(results)} checks failed ({', '.join(failed)})\n\n" + \
        "\n\n".join(f"=== {name}\n{text}" for name, text in failed.items())


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_context_parallel_matches_single_process_on_gloo(world):
    """One spawned group per world size (one test, so that pytest-xdist never spawns it twice) runs:
    - ring, allgather, ulysses and auto, dense and packed: causal, sliding window, window + softcap,
      GQA / MQA / MHA, head_dim_v != head_dim, zigzag and contiguous; out, lse, dq, dk, dv against
      the float64 single-process reference (spec tolerances);
    - a DeviceMesh as the group; the deterministic backward, bitwise twice;
    - decode with appends over an interleaved cache (contiguous and paged) against a single-rank
      cache, and the shards' contents afterwards;
    - bad input (mismatched shards, an error on one rank only, a world size that does not divide
      the layout, lengths that do not split): every rank raises and reaches the next barrier; the
      join timeout turns a deadlock into a failure;
    - at world size 2: torch.compile around ring attention, and the transformers recipe of
      docs/distributed.md on a tiny Llama.
    """
    assert_all_passed(spawn_group(world, checks_for(world)), f"world size {world}")


# ---------------------------------------------------------------------------------------------
# In-process: layouts, the block planner, the schedule, the strategy choice, the import


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_shard_and_unshard_round_trip_with_positions(world, layout):
    from flash_attn_3.distributed import (position_ids, shard_sequence, shard_varlen, unshard_sequence,
                                          unshard_varlen, varlen_position_ids)

    seqlen = 2 * world * int(torch.randint(1, 5, ()))
    x = torch.randn(2, seqlen, 3)
    shards = [shard_sequence(x, world, r, layout=layout) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    positions = torch.cat([position_ids(seqlen, world, r, layout=layout) for r in range(world)])
    assert sorted(positions.tolist()) == list(range(seqlen))
    for r, shard in enumerate(shards):
        assert torch.equal(shard, x[:, position_ids(seqlen, world, r, layout=layout)])
    if layout == "zigzag" and world > 1:  # rank 0 holds the first and the last chunk
        chunk = seqlen // (2 * world)
        assert position_ids(seqlen, world, 0)[-1] == seqlen - 1 and position_ids(seqlen, world, 0)[chunk - 1] == chunk - 1
    lengths = [2 * world * int(n) for n in torch.randint(0, 4, (4,))]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    packed = torch.randn(int(cu[-1]), 3)
    pieces = [shard_varlen(packed, cu, world, r, layout=layout) for r in range(world)]
    assert torch.equal(unshard_varlen(pieces, cu, layout=layout), packed)
    if not sum(lengths):  # every length drawn 0 (1 in 256): nothing held, no positions to check
        assert all(piece.shape[0] == 0 for piece in pieces)
        assert all(varlen_position_ids(cu, world, r, layout=layout).numel() == 0 for r in range(world))
        return
    within = torch.cat([torch.arange(n) for n in lengths])
    for r, piece in enumerate(pieces):
        starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(lengths))
        held = (packed[:, 0].unsqueeze(1) == piece[:, 0].unsqueeze(0)).float().argmax(0)
        assert torch.equal(varlen_position_ids(cu, world, r, layout=layout), held - starts[held])
        assert torch.equal(within[held], varlen_position_ids(cu, world, r, layout=layout))


def _allowed_local(row, key, rows, keys, left, right):
    diagonal = row + keys - rows
    return (left < 0 or key >= diagonal - left) and (right < 0 or key <= diagonal + right)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_block_calls_reproduce_the_global_mask(world, layout):
    """Every (query rank, key rank) pair: the planned kernel calls, with their bottom-right
    windows, allow exactly the (query, key) pairs the global mask allows, each once."""
    from flash_attn_3.distributed._blocks import band_limits, shard_calls
    from flash_attn_3.distributed.layout import position_ids

    seqlen = 2 * world * int(torch.randint(1, 4, ()))
    masks = [(False, (-1, -1)), (True, (-1, -1)), (True, tuple(torch.randint(0, seqlen, (1,)).tolist()) + (-1,)),
             (False, tuple(torch.randint(0, seqlen, (2,)).tolist())), (False, (0, 0)), (False, (-1, 2))]
    for causal, window in masks:
        lo, hi = band_limits(causal, window)
        for r in range(world):
            for s in range(world):
                rows, keys = position_ids(seqlen, world, r, layout=layout), position_ids(seqlen, world, s, layout=layout)
                want = {(i, j) for i in range(len(rows)) for j in range(len(keys))
                        if (lo is None or keys[j] - rows[i] >= lo) and (hi is None or keys[j] - rows[i] <= hi)}
                got = []
                for c in shard_calls(seqlen, world, r, s, layout, lo, hi):
                    assert c.left >= -1 and c.right >= -1
                    got += [(c.q_start + i, c.k_start + j) for i in range(c.q_len) for j in range(c.k_len)
                            if _allowed_local(i, j, c.q_len, c.k_len, c.left, c.right)]
                assert len(got) == len(set(got)) and set(got) == want, (causal, window, r, s)


def test_ring_schedule_moves_only_the_blocks_a_mask_needs():
    from flash_attn_3.distributed._blocks import band_limits
    from flash_attn_3.distributed.ring import _dense_plan

    for world in (2, 3, 4, 8):
        # Causal zigzag needs every block: half the ring each way round, every step attended.
        full = _dense_plan(64, world, 0, "zigzag", *band_limits(True, (-1, -1))).schedule
        assert (full.fwd_steps, full.bwd_steps) == (world // 2, (world - 1) // 2)
        assert sorted(full.sources) == list(range(world))
        # A causal window shorter than a chunk: one neighbour exchange, both ways for zigzag.
        window = _dense_plan(64, world, 0, "zigzag", *band_limits(True, (5, -1))).schedule
        assert window.steps == 1
        one_way = _dense_plan(64, world, 1, "contiguous", *band_limits(True, (5, -1))).schedule
        assert (one_way.fwd_steps, one_way.bwd_steps, one_way.sources) == (1, 0, [1, 0])
        # Keys ahead of the query only: the other way round (at world size 2 both ways are one hop).
        ahead = _dense_plan(64, world, 0, "contiguous", *band_limits(False, (0, 5))).schedule
        assert (ahead.fwd_steps, ahead.bwd_steps, ahead.sources) == ((1, 0) if world == 2 else (0, 1)) + ([0, 1],)


def test_choose_strategy_says_why():
    from flash_attn_3.distributed import choose_strategy

    shape = dict(num_heads=32, num_heads_kv=8, head_dim=128)
    assert choose_strategy(world_size=1, seqlen_local=1024, **shape).strategy == "ring"
    long = choose_strategy(world_size=8, seqlen_local=131072, causal=True, **shape)
    assert long.strategy == "ring" and "131072 tokens per rank" in long.reason
    window = choose_strategy(world_size=8, seqlen_local=2048, causal=True, window_size=(256, 0), **shape)
    assert window.strategy == "ring" and "window" in window.reason
    short = choose_strategy(world_size=8, seqlen_local=2048, causal=True, num_heads=32, num_heads_kv=32, head_dim=128)
    assert short.strategy == "ulysses" and "elements per rank" in short.reason
    gqa = choose_strategy(world_size=8, seqlen_local=2048, causal=True, num_heads=32, num_heads_kv=1, head_dim=128)
    assert gqa.strategy == "allgather"
    odd = choose_strategy(world_size=3, seqlen_local=2048, causal=True, **shape)
    assert odd.strategy == "allgather" and "does not divide" in odd.reason


def test_importing_flash_attn_3_does_not_import_distributed():
    code = "import sys, flash_attn_3, flash_attn_interface; sys.exit('flash_attn_3.distributed' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bench_cp_dry_run_writes_tables(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_cp

    bench_cp.main(["--dry-run", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "bench_cp.json").read_text())
    assert doc["fake"] and doc["results"]
    impls = {(r["section"], r["impl"]) for r in doc["results"]}
    assert {("scaling", i) for i in ("local", "ring", "allgather", "ulysses")} <= impls
    assert {("ring_parts", "compute"), ("ring_parts", "transfers"), ("decode", "cp")} <= impls
    assert {r["case"]["W"] for r in doc["results"]} == {1, 2, 4, 8} and doc["hidden"]
    assert max(r["case"].get("S", 0) for r in doc["results"]) == 1 << 20
    text = (tmp_path / "bench_cp.md").read_text()
    assert "FAKE" in text and "Communication hidden" in text


# ---------------------------------------------------------------------------------------------
# One GPU: the same code over NCCL at world size 1, on our Triton kernels


@pytest.mark.gpu
def test_nccl_world_size_one_on_triton_kernels():
    """Each strategy (dense and packed, forward and backward) and decode, at moderate shapes, with
    FLASH_ATTN_3_BACKEND=triton in the rank (a refusal would be an error, not a fallback)."""
    results = spawn_group(1, ["ring", "allgather", "ulysses", "auto", "deterministic", "decode"], device="cuda",
                          timeout=480)  # first calls compile the Triton kernels
    assert_all_passed(results, "NCCL, world size 1, triton")


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4, 8])
def test_nccl_several_gpus_on_triton_kernels(world):
    """The CPU groups' checks over NCCL, one GPU per rank (the multi-GPU run of issue 18)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices; this machine has {torch.cuda.device_count()}")
    results = spawn_group(world, ["ring", "allgather", "ulysses", "auto", "device_mesh", "deterministic", "decode",
                                  "bad_input"], device="cuda", timeout=600)
    assert_all_passed(results, f"NCCL, world size {world}, triton")

"""Compile the Gluon Hopper backward for sm_90 on any machine (no GPU) and report what ptxas made.

    python scripts/aot_bwd_hopper.py [--head-dim 128] [--causal] [--dtype bf16|fp16] [--keep DIR]
        [--config BLOCK_M,STAGES[,DQ_IN_KERNEL,STATS_SMEM,PREFETCH_S[,EARLY_DV,PIN_DP]]]

Prints one JSON object: shared memory bytes, warps, wgmma / TMA / TMA-reduce instructions in the
PTX, HGMMA in the SASS, ptxas' register and spill figures, and per consumer loop (`wgmma_waits`)
what runs under each wgmma group before its wait. --keep DIR writes the .ptx,
.ttgir and .sass there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

# The compiler path must not see the interpreter switch the CPU test suite sets.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from flash_attn_3.backends.triton import bwd_hopper  # noqa: E402
from scripts.aot_fwd_hopper import gmma_loops, report  # noqa: E402


def compile_for_sm90(head_dim: int, causal: bool, dtype: torch.dtype, config=None):
    """The kernel as backward() launches it (same descriptors, constants and options)."""
    cfg = bwd_hopper.Config(*config) if config else bwd_hopper.CONFIGS[head_dim]
    x = torch.empty(2, 256, 4, head_dim, dtype=dtype)
    rows = bwd_hopper._descriptor(x, cfg.block_m)
    keys = bwd_hopper._key_descriptor(x)
    dq = (bwd_hopper._descriptor(x.float(), cfg.block_m, bwd_hopper.DQ_REDUCE_COLS)
          if cfg.dq_in_kernel else rows)
    # prep()'s layout: (B, H, S) rows padded to STATS_PAD
    ptr = torch.empty(2, 4, 256 + bwd_hopper.STATS_PAD)[..., :256]
    stats = bwd_hopper._stats_descriptor(ptr, cfg.block_m)
    constants = dict(CAUSAL=causal, STAGES=cfg.stages, DQ_IN_KERNEL=bool(cfg.dq_in_kernel),
                     CONSUMER_REGS=bwd_hopper._CONSUMER_REGS,
                     PRODUCER_REGS=bwd_hopper._PRODUCER_REGS)
    if head_dim in bwd_hopper.SPLIT_HEAD_DIMS:
        keys = bwd_hopper._descriptor(x, bwd_hopper.KEYS_PER_WARPGROUP)
        # dk, dv, their strides, softmax_scale, seqlen_q, seqlen_k, heads_kv, num_n_blocks,
        # group
        runtime = [rows, rows, keys, keys, dq, stats, stats, x, x, *x.stride()[:3],
                   *x.stride()[:3], 0.125, 256, 256, 2, 4, 2]
        kernel = bwd_hopper._bwd_kernel_split
    else:
        # lse2 / delta descriptors and pointers, dk, dv, dk / dv strides, softmax_scale,
        # seqlen_q, seqlen_k, heads_kv, num_n_blocks, group
        runtime = [rows, rows, keys, keys, dq, stats, stats, ptr, ptr, x, x, *x.stride()[:3],
                   *x.stride()[:3], 0.125, 256, 256, 2, 2, 2]
        kernel = bwd_hopper._bwd_kernel
        constants.update(STATS_SMEM=bool(cfg.stats_smem), PREFETCH_S=bool(cfg.prefetch_s),
                         EARLY_DV=bool(cfg.early_dv), PIN_DP=bool(cfg.pin_dp))
    signature = {name: mangle_type(value) for name, value in zip(kernel.arg_names, runtime)}
    signature.update({name: "constexpr" for name in constants})
    return triton.compile(GluonASTSource(kernel, signature, constants),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, maxnreg=bwd_hopper._MAXNREG))


# What the consumer does between a wgmma's issue and its wait: exp2 (P^T), the fp32 -> bf16
# packs (P^T, dS^T), the dS^T arithmetic, shared memory (statistics, dS^T, dQ staging), mbarriers
# and bar.syncs, the dQ reduce, local memory.
_UNDER = ("MUFU.EX2", "F2FP", "FADD", "FMUL", "FFMA", "FSEL", "LDS", "STS", "SYNCS", "BAR.SYNC",
          "UTMAREDG", "LDL", "STL")


def _ops(body: list) -> dict:
    return {k: n for k in _UNDER if (n := sum(k in o for o in body))}


def wgmma_waits(body: list) -> dict:
    """One consumer loop's wgmma groups in issue order (shape, `.RS`: A from registers, i.e. dV
    or dK; `.tnspA`: dQ) with the instructions that run under each, from its first HGMMA to the
    WARPGROUP.DEPBAR that retires it (the instructions a wait hoisted above the softmax, or an
    issue sunk below it, takes away); the wait's position in the loop and its `keep` (groups
    left in flight). `exposed`: the loop's instructions with no wgmma of this warpgroup in
    flight."""
    groups, open_group, in_flight, exposed = [], [], [], []
    for i, op in enumerate(body):
        wait = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x(\d+)", op)
        if "GMMA" in op and not wait:
            open_group.append(i)
            if "gsb0" in op:
                shape = re.search(r"GMMA\.(\w+)", op).group(1)
                kind = (".RS" if re.search(r"GMMA\.\S+ R\d+, R\d+,", op) else "") + (
                    ".tnspA" if "tnspA" in op else "")
                groups.append(dict(name=f"{shape}{kind} x{len(open_group)}",
                                   first=open_group[0]))
                in_flight.append(groups[-1])
                open_group = []
        elif wait:
            keep = int(wait.group(1))
            retired, in_flight = in_flight[:len(in_flight) - keep], in_flight[len(in_flight) - keep:]
            for g in retired:
                under = [o for o in body[g["first"] + 1:i] if "GMMA" not in o]
                g.update(wait_at=i, keep=keep, under=len(under), ops=_ops(under))
        elif not in_flight and not open_group:
            exposed.append(op)
    for g in groups:
        g.pop("first")
    return dict(groups=groups, exposed=dict(instructions=len(exposed), **_ops(exposed)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, default=128, choices=sorted(bwd_hopper.CONFIGS))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--config", help="BLOCK_M,STAGES[,DQ_IN_KERNEL,STATS_SMEM,PREFETCH_S"
                   "[,EARLY_DV,PIN_DP]] (bwd_hopper.Config fields; default: CONFIGS[head_dim])")
    p.add_argument("--keep", type=Path)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    kernel = compile_for_sm90(args.head_dim, args.causal, dtype, config)
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        got = report(kernel, keep)
        got["tma_reduce_ptx"] = kernel.asm["ptx"].count("cp.reduce.async.bulk.tensor")
        # the row statistics' loads (stats_smem): the only rank-2 TMA copies
        got["tma_loads_2d_ptx"] = kernel.asm["ptx"].count("cp.async.bulk.tensor.2d.shared")
        sass = (keep / "kernel.sass").read_text()
        got["wgmma_waits"] = [wgmma_waits([o for _, o in body]) for body in gmma_loops(sass)]
        print(json.dumps(got))


if __name__ == "__main__":
    main()

"""Compile the Gluon Hopper backward for sm_90 on any machine (no GPU) and report what ptxas made.

    python scripts/aot_bwd_hopper.py [--head-dim 128] [--head-dim-v DV] [--causal] [--dtype bf16|fp16]
        [--deterministic] [--varlen] [--seqused] [--window L,R] [--softcap C] [--sinks]
        [--keep DIR]
        [--config BLOCK_M,STAGES[,DQ_IN_KERNEL,STATS_SMEM,PREFETCH_S[,EARLY_DV,PIN_DP]]]
    python scripts/aot_bwd_hopper.py --check-plain
    python scripts/aot_bwd_hopper.py --record-plain WHY

The kernel is compiled exactly as backward() launches it (the launch is captured, and triton's
own binder makes its signature and specialization). --deterministic compiles the deterministic
call's kernel (dQ left to bwd.py).

--varlen, --seqused, --window, --softcap and --sinks compile the layer variants (packed q/k/v with
cu_seqlens, seqused_q/k, sliding window, softcap, attention sinks); the sequences are 256 tokens
long, and a window side of 255 or more is no bound (fwd_hopper.mask_bounds). A head dim under
256 other than 64 / 128 compiles the next one's tiles.

--check-plain compiles every plain variant recorded in tests/bwd_hopper_plain_sass.json (the
kernels before the layer variants: bf16 / fp16, D = 64 / 128 / 256, causal or not,
deterministic or not) and prints, for each, whether its SASS is still the recorded one; it exits
1 if any differs.

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

from flash_attn_3.backends.params import AttnArgs  # noqa: E402
from flash_attn_3.backends.triton import bwd_hopper  # noqa: E402
from scripts import aot_fwd_hopper  # noqa: E402
from scripts.aot_fwd_hopper import compile_launch, gmma_loops, report  # noqa: E402


def plain_args(head_dim: int, causal: bool, dtype: torch.dtype, varlen: bool = False,
               seqused: bool = False, head_dim_v: int = 0, **fields) -> AttnArgs:
    """CPU AttnArgs of one shape class, the forward script's (2 sequences of 256 tokens, 4 query
    heads over 2 KV heads, packed when varlen, seqused_q/k when seqused, V head_dim_v wide when
    set; `fields` override the rest: window, softcap, sinks)."""
    return aot_fwd_hopper.plain_args(head_dim, causal, dtype, varlen, seqused,
                                     head_dim_v=head_dim_v, **fields)


PLAIN_SASS = Path(__file__).resolve().parent.parent / "tests" / "bwd_hopper_plain_sass.json"
DTYPES = dict(bf16=torch.bfloat16, fp16=torch.float16)


def plain_key(dtype: str, head_dim: int, causal: bool, deterministic: bool) -> str:
    """A variant's name in tests/bwd_hopper_plain_sass.json."""
    return (f"{dtype} D={head_dim} {'causal' if causal else 'full'}"
            + (" deterministic" if deterministic else ""))


def launch_of(a: AttnArgs, deterministic: bool = False, config=None):
    """(kernel, args, kwargs) of the launch backward() makes for a, captured instead of run
    (prep's statistics stood in for by empty tensors of its layout, dQ's pass not run)."""
    from flash_attn_3.backends.triton import bwd

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    def prep(out, dout, lse, a, pad=1):
        rows = -(-lse.shape[-1] // pad) * pad
        return tuple(torch.empty(*lse.shape[:-1], rows)[..., :lse.shape[-1]] for _ in "ld")

    saved = (bwd_hopper._bwd_kernel, bwd_hopper._bwd_kernel_split, bwd.prep, bwd.dq_only)
    bwd_hopper._bwd_kernel = Recorder(saved[0])
    bwd_hopper._bwd_kernel_split = Recorder(saved[1])
    bwd.prep, bwd.dq_only = prep, lambda *args: None
    try:
        q = a.q
        lse_shape = ((q.shape[1], q.shape[0]) if q.dim() == 3
                     else (q.shape[0], q.shape[2], q.shape[1]))
        out = torch.empty(*q.shape[:-1], a.v.shape[-1], dtype=q.dtype)  # and dout: V's width
        bwd_hopper.backward(out, q, a.k, a.v, out, torch.empty(lse_shape), a, deterministic,
                            config=config)
    finally:
        bwd_hopper._bwd_kernel, bwd_hopper._bwd_kernel_split, bwd.prep, bwd.dq_only = saved
    return launches[0]


def compile_for_sm90(a: AttnArgs, deterministic: bool = False, config=None):
    """The kernel exactly as backward() launches it for a (same descriptors, constants,
    specialization and options)."""
    return compile_launch(*launch_of(a, deterministic, config))


def check_plain() -> bool:
    return aot_fwd_hopper.check_recorded(PLAIN_SASS, _compile_plain)


def _compile_plain(dtype, head_dim, causal, words):
    return compile_for_sm90(plain_args(head_dim, causal, DTYPES[dtype]), "deterministic" in words)


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
    p.add_argument("--head-dim", type=int, default=128,
                   help="up to 256: 64, 128, 256 or a head dim padded to the next of them")
    p.add_argument("--head-dim-v", type=int, default=0,
                   help="V's head dim where narrower than Q's (DeepSeek: --head-dim 192 "
                        "--head-dim-v 128); default: Q's")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--deterministic", action="store_true",
                   help="the deterministic call's kernel (dQ left to bwd.py)")
    p.add_argument("--config", help="BLOCK_M,STAGES[,DQ_IN_KERNEL,STATS_SMEM,PREFETCH_S"
                   "[,EARLY_DV,PIN_DP]] (bwd_hopper.Config fields; default: CONFIGS[head_dim])")
    p.add_argument("--varlen", action="store_true", help="packed q/k/v with cu_seqlens")
    p.add_argument("--seqused", action="store_true", help="with seqused_q and seqused_k")
    p.add_argument("--window", default="-1,-1", help="LEFT,RIGHT (-1: unbounded; as --window=-1,R)")
    p.add_argument("--softcap", type=float, default=0.0)
    p.add_argument("--sinks", action="store_true", help="with attention sinks (no gradient)")
    p.add_argument("--keep", type=Path)
    p.add_argument("--check-plain", action="store_true",
                   help="compare every recorded plain variant's SASS (and nothing else)")
    p.add_argument("--record-plain", metavar="WHY",
                   help="write every recorded plain variant's SASS hash anew, WHY appended to "
                        "the record's note (a deliberate change of the plain kernels)")
    args = p.parse_args()
    if args.check_plain:
        raise SystemExit(0 if check_plain() else 1)
    if args.record_plain:
        aot_fwd_hopper.rerecord(PLAIN_SASS, _compile_plain, args.record_plain)
        return
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    left, right = (int(x) for x in args.window.split(","))
    layer = dict(window_left=left, window_right=0 if args.causal else right,
                 softcap=args.softcap, sinks=torch.empty(4) if args.sinks else None)
    a = plain_args(args.head_dim, args.causal, DTYPES[args.dtype], args.varlen, args.seqused,
                   args.head_dim_v, **layer)
    kernel = compile_for_sm90(a, args.deterministic, config)
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        got = report(kernel, keep)
        got["tma_reduce_ptx"] = kernel.asm["ptx"].count("cp.reduce.async.bulk.tensor")
        # the row statistics' loads (stats_smem): the only rank-2 TMA copies
        got["tma_loads_2d_ptx"] = kernel.asm["ptx"].count("cp.async.bulk.tensor.2d.shared")
        sass = (keep / "kernel.sass").read_text()
        got["wgmma_waits"] = [wgmma_waits([o for _, o in body]) for body in gmma_loops(sass)]
    # A plain variant at its default config: is its SASS the recorded one?
    key = plain_key(args.dtype, args.head_dim, args.causal, args.deterministic)
    plain = (left, right, args.softcap, args.sinks, args.varlen, args.seqused) == (
        -1, -1, 0.0, False, False, False)
    if PLAIN_SASS.exists() and config is None and plain:
        recorded = json.loads(PLAIN_SASS.read_text())
        if recorded["triton"] == triton.__version__ and key in recorded["sass_sha256"]:
            got["recorded_sass_same"] = got["sass_sha256"] == recorded["sass_sha256"][key]
    print(json.dumps(got))


if __name__ == "__main__":
    main()

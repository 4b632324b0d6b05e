"""Compile the Gluon Hopper forward for sm_90 on any machine (no GPU) and report what ptxas made.

    python scripts/aot_fwd_hopper.py [--head-dim 128] [--causal] [--dtype bf16|fp16|fp8]
                                     [--varlen] [--seqused]
                                     [--config BLOCK_N,STAGES,PINGPONG[,PERSISTENT[,LATE_PV_WAIT]]]
                                     [--keep DIR]

--varlen compiles the packed variant (q/k/v (total, H, D) with cu_seqlens_q/k), --seqused the one
that reads seqused_q/k; both together are what flash_attn_varlen_func with seqused launches.
fp8 is dense only (forward() sends fp8 varlen to the portable kernel).

Prints one JSON object: shared memory bytes, warps, wgmma and TMA instructions in the PTX,
ptxas' register and spill figures (and its warnings, serialized wgmmas included), and the size of
the SASS KV loops with where their PV wait sits. --keep DIR writes the .ptx, .ttgir and .sass
there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The compiler path must not see the interpreter switch the CPU test suite sets.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from flash_attn_3.backends.triton import fwd_hopper  # noqa: E402
from scripts.aot_fwd import assemble, ptxas_figures  # noqa: E402


def compile_for_sm90(head_dim: int, causal: bool, dtype: torch.dtype, config=None,
                     varlen: bool = False, seqused: bool = False):
    """The kernel as forward() launches it (same descriptors, constants and options)."""
    fp8 = dtype == torch.float8_e4m3fn
    if fp8 and (varlen or seqused):
        raise SystemExit("fp8 is dense only")
    block_n, stages, pingpong, _, late_pv_wait = fwd_hopper.config_fields(
        config or fwd_hopper.default_config(head_dim, causal, fp8))
    x = torch.empty(512, 4, head_dim, dtype=dtype)
    if not varlen:
        x = x.view(2, 256, 4, head_dim)
    rows = fwd_hopper._descriptor(x, fwd_hopper.ROWS_PER_WARPGROUP)
    keys = fwd_hopper._descriptor(x, block_n)
    o = torch.empty(x.shape, dtype=torch.bfloat16) if fp8 else x
    out = fwd_hopper._descriptor(o, fwd_hopper.ROWS_PER_WARPGROUP)
    values = keys
    descales, descale_strides = None, [None] * 6
    if fp8:
        values = fwd_hopper._descriptor_of_block(torch.empty(2, 4, head_dim, 256, dtype=dtype),
                                                 [1, 1, head_dim, block_n])
        descales, descale_strides = (torch.empty(2, 4), ) * 3, [4, 1] * 3
    lengths = torch.empty(3, dtype=torch.int32)
    # forward() passes None for the index tensors a call lacks: the JIT makes them constexprs.
    index = [lengths if varlen else None] * 2 + [lengths if seqused else None] * 2
    # o_ptr, lse_ptr, cu_seqlens_q/k, seqused_q/k, qk_scale, num_units, num_m_blocks,
    # num_heads_q, seqlen_q, seqlen_k, group_size, pair, descales and their strides. Lengths that
    # are multiples of 16 and causal pairs on: what a launch whose ints were specialized would
    # get at best.
    runtime = [rows, keys, values, out, o, torch.empty(1), *index, 0.125, 16, 2, 4, 256, 256, 2,
               int(causal), descales, *descale_strides]
    constants = dict(CAUSAL=causal, STAGES=stages, PINGPONG=bool(pingpong),
                     SEPARATE_O=fwd_hopper.separate_o(head_dim, block_n, stages, fp8), IS_FP8=fp8,
                     LATE_PV_WAIT=late_pv_wait,
                     CONSUMER_REGS=fwd_hopper._CONSUMER_REGS,
                     PRODUCER_REGS=fwd_hopper._PRODUCER_REGS)
    launch = dict(num_warps=4, maxnreg=fwd_hopper._MAXNREG)
    kernel = fwd_hopper._fwd_kernel
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    # Triton's own binder makes the signature, the constexprs (None arguments, ints of 1) and the
    # divisibility attributes, as at a launch: do_not_specialize is honoured.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*runtime, **constants, **launch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch, bound,
                                                              specialization, options)
    return triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def gmma_loops(sass: str) -> list:
    """The innermost SASS loops holding wgmmas, each as its (address, instruction) list from the
    loop head to its conditional backward branch (the masked path included). Unconditional
    backward branches are the out-of-line mbarrier retry stubs."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = []
    for a, op in code:
        target = re.search(r"^\s*@!?U?P\d+ BRA (?:!?U?P\d, )?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < a:
            body = [(x, o) for x, o in code if int(target.group(1), 16) <= x <= a]
            if any("GMMA" in o for _, o in body):
                spans.append((int(target.group(1), 16), a, body))
    return [body for head, tail, body in spans
            if not any(head <= h and t <= tail and (h, t) != (head, tail) for h, t, _ in spans)]


def kv_loops(sass: str) -> list:
    """The KV loops of the two consumer warpgroups (gmma_loops): their instructions, and the
    GMMA and local memory ones among them. What a change costs the loop, without a GPU."""
    bodies = [[o for _, o in body] for body in gmma_loops(sass)]
    return [dict(instructions=len(body), gmma=sum("GMMA" in o for o in body),
                 local=sum(bool(re.search(r"\b(LDL|STL)\b", o)) for o in body),
                 ops=opcode_counts(body), pv_wait=pv_wait(body))
            for body in bodies]


def pv_wait(body: list) -> dict:
    """Where the PV wgmma's wait (WARPGROUP.DEPBAR.LE gsb0, 0x0) sits after the QK one (0x1):
    the instructions between them (the mask block included) and the softmax's exp2 and row
    shuffles among them. All of a block's MUFU.EX2 before the wait: its softmax runs under the PV
    wgmma; none: the warpgroup waits for the PV before its row max."""
    qk = next((i for i, o in enumerate(body) if "DEPBAR.LE gsb0, 0x1" in o), None)
    pv = next((i for i, o in enumerate(body) if "DEPBAR.LE gsb0, 0x0" in o and qk is not None
               and i > qk), None)
    if pv is None:
        return {}
    between = body[qk + 1:pv]
    return dict(instructions=len(between), mufu_ex2=sum("MUFU.EX2" in o for o in between),
                shfl=sum("SHFL" in o for o in between))


# The pipes the softmax competes for: MUFU (exp2), the FMA pipe (FFMA, FMUL, FADD, FMNMX, FSEL),
# integer ops (IMAD, SHF, IADD3, LEA), branches and votes.
_COUNTED = ("MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FRND", "F2I", "I2F",
            "F2FP", "PRMT", "SHFL", "VOTE", "BRA", "IMAD", "IADD3", "SHF", "LEA", "LOP3", "MOV")


def opcode_counts(body: list) -> dict:
    """Instructions of a loop body by opcode (the name before the first dot, MUFU by function),
    predicated ones included: what a change to the softmax costs each pipe."""
    names = [re.sub(r"^@!?U?P\w+\s+", "", o).split()[0] for o in body]
    names = [n if n.startswith("MUFU") else n.split(".")[0] for n in names]
    return {k: names.count(k) for k in _COUNTED if names.count(k)}


def report(kernel, keep: Path) -> dict:
    ptx, ptxas_report = assemble(kernel, keep)
    sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(keep / "kernel.cubin")],
                          capture_output=True, text=True).stdout
    (keep / "kernel.sass").write_text(sass)
    return dict(
        shared_bytes=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
        wgmma_ptx=ptx.count("wgmma.mma_async"),
        hgmma_sass=sass.count("HGMMA"),
        qgmma_sass=sass.count("QGMMA"),  # fp8
        wgmma_register_a_ptx=len(re.findall(r"wgmma\.mma_async[^;]*\}, \{", ptx)),
        tma_loads_ptx=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared", ptx)),
        setmaxnreg=sorted(set(int(n) for n in re.findall(
            r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))),
        **ptxas_figures(ptxas_report),
        # "Potential Performance Loss" (wgmmas serialized) is an info line, not a warning.
        ptxas_warnings=[line for line in ptxas_report.splitlines()
                        if "arning" in line or "Performance Loss" in line],
        kv_loops=kv_loops(sass),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, default=128, choices=sorted(fwd_hopper.CONFIGS))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8"])
    p.add_argument("--config", help="BLOCK_N,STAGES,PINGPONG[,PERSISTENT[,LATE_PV_WAIT]] "
                   "(default: default_config(head_dim, causal); PERSISTENT only changes the "
                   "grid)")
    p.add_argument("--varlen", action="store_true", help="packed q/k/v with cu_seqlens")
    p.add_argument("--seqused", action="store_true", help="with seqused_q and seqused_k")
    p.add_argument("--keep", type=Path)
    args = p.parse_args()
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp8=torch.float8_e4m3fn)[args.dtype]
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    kernel = compile_for_sm90(args.head_dim, args.causal, dtype, config, args.varlen,
                              args.seqused)
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        print(json.dumps(report(kernel, keep)))


if __name__ == "__main__":
    main()

"""Compile the portable Triton forward (fwd.py) for sm_90 on any machine (no GPU) and report what
ptxas made of it: the kernel exactly as forward() would launch it for one case and config.

    python scripts/aot_fwd.py [--d 128] [--dv D] [--seqlens 4096,4096] [--heads 16,16]
        [--dtype bf16|fp16|fp8] [--causal] [--window L,R] [--paged PAGE] [--pack]
        [--splits N] [--config BM,BN,WARPS,STAGES] [--keep DIR]

Prints one JSON object: config, shared memory bytes, ptxas registers and spills, wgmma / mma.sync
instructions in the PTX.
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
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from flash_attn_3.backends.params import AttnArgs  # noqa: E402
from flash_attn_3.backends.triton import fwd  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def launch_args(a: AttnArgs, config):
    """(args, kwargs) of the _attn_fwd launch forward() makes, captured instead of launched."""
    captured = []

    def capture(self, *args, grid, warmup, **kwargs):
        if self is fwd._attn_fwd and not captured:
            captured.append((args, kwargs))
        raise _Captured

    original = JITFunction.run
    JITFunction.run = capture
    try:
        fwd.forward(a, config=config)
    except _Captured:
        pass
    finally:
        JITFunction.run = original
    return captured[0]


class _Captured(Exception):
    pass


def compile_for_sm90(args, kwargs):
    kernel = fwd._attn_fwd
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                          options=options.__dict__)


def triton_ptxas_flags(kernel) -> list:
    """The flags besides -v and --gpu-name that change code with which triton's own make_cubin
    ran ptxas for this kernel: --fmad=false without FP fusion, and from triton 3.9 on
    `--regAllocOptLevel=2` (its workaround for a CUDA 13 ptxas bug). Without the latter the
    sm_90 figures of 3.9 were not those of the cubin triton builds (default causal forward at
    D = 128: 260 B of spills and 0 / 2 local ops in the KV loops reassembled plainly, 140 B and
    1 / 1 in triton's cubin)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    source = inspect.getsource(CUDABackend.make_cubin)
    flags = re.findall(r"'(--regAllocOptLevel=\d+)'", source)
    if not getattr(kernel.metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    return flags


def assemble(kernel, keep: Path) -> tuple[str, str]:
    """Writes the kernel's PTX and TTGIR under keep and assembles the PTX for its target there
    (kernel.cubin) with the ptxas, arch name and code-changing flags triton itself takes for that
    target (its wheel ships two ptxas: triton 3.6 takes the CUDA 12.8 one below sm_100, 3.9 its
    CUDA 13 one from sm_90 on; triton_ptxas_flags): (PTX, ptxas' -v report). The cubin's SASS
    is that of the cubin triton built (kernel.asm["cubin"]); checked here, as a flag triton adds
    in a later release would otherwise go unseen."""
    capability = kernel.metadata.target.arch
    ptx = kernel.asm["ptx"]
    (keep / "kernel.ptx").write_text(ptx)
    (keep / "kernel.ttgir").write_text(kernel.asm["ttgir"])
    ptxas = subprocess.run([get_ptxas(capability).path, "-lineinfo",
                            f"--gpu-name={sm_arch_from_capability(capability)}",
                            *triton_ptxas_flags(kernel), "-v", str(keep / "kernel.ptx"),
                            "-o", str(keep / "kernel.cubin")],
                           capture_output=True, text=True)
    if ptxas.returncode != 0:
        raise SystemExit(ptxas.stderr)
    if "cubin" in kernel.asm:
        (keep / "triton.cubin").write_bytes(kernel.asm["cubin"])
        sass = [subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(keep / name)],
                               capture_output=True, text=True).stdout
                for name in ("kernel.cubin", "triton.cubin")]
        if sass[0] != sass[1]:
            raise SystemExit("ptxas here made other SASS than triton's own cubin: "
                             "triton_ptxas_flags misses a flag triton passes")
    return ptx, ptxas.stderr


def ptxas_figures(ptxas_report: str) -> dict:
    registers = re.search(r"Used (\d+) registers", ptxas_report)
    return dict(ptxas_registers=int(registers.group(1)) if registers else None,
                spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill", ptxas_report)))


def report(kernel, keep: Path) -> dict:
    ptx, ptxas_report = assemble(kernel, keep)
    return dict(
        shared_bytes=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
        wgmma=ptx.count("wgmma.mma_async"),
        mma_sync=ptx.count("mma.sync"),
        cp_async=ptx.count("cp.async"),
        **ptxas_figures(ptxas_report),
    )


def build_args(p) -> AttnArgs:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[p.dtype]
    seqlen_q, seqlen_k = (int(x) for x in p.seqlens.split(","))
    heads_q, heads_kv = (int(x) for x in p.heads.split(","))
    batch, dv = 2, p.dv or p.d
    q = torch.empty(batch, seqlen_q, heads_q, p.d, dtype=dtype)
    extra = {}
    if p.paged:
        pages = batch * triton.cdiv(seqlen_k, p.paged)
        k = torch.empty(pages, p.paged, heads_kv, p.d, dtype=dtype)
        v = torch.empty(pages, p.paged, heads_kv, dv, dtype=dtype)
        extra = dict(page_table=torch.zeros(batch, pages // batch, dtype=torch.int32),
                     seqused_k=torch.zeros(batch, dtype=torch.int32))
    else:
        k = torch.empty(batch, seqlen_k, heads_kv, p.d, dtype=dtype)
        v = torch.empty(batch, seqlen_k, heads_kv, dv, dtype=dtype)
    if p.dtype == "fp8":
        extra.update({n: torch.ones(batch, heads_kv) for n in ("q_descale", "k_descale",
                                                               "v_descale")})
    left, right = (int(x) for x in p.window.split(","))
    return AttnArgs.plain(q, k, v, max_seqlen_k=seqlen_k, window_left=left,
                          window_right=0 if p.causal else right, num_splits=p.splits,
                          pack_gqa=p.pack or None, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dv", type=int)
    p.add_argument("--seqlens", default="4096,4096")
    p.add_argument("--heads", default="16,16")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--window", default="-1,-1")
    p.add_argument("--paged", type=int, default=0, help="page size (0: contiguous)")
    p.add_argument("--pack", action="store_true")
    p.add_argument("--splits", type=int, default=1)
    p.add_argument("--config", help="BLOCK_M,BLOCK_N,WARPS,STAGES (default: the first tuned one)")
    p.add_argument("--keep", type=Path)
    args = p.parse_args()
    a = build_args(args)
    if args.config:
        config = tuple(int(x) for x in args.config.split(","))
    else:
        head_class = min(c for c in fwd._TUNE_CONFIGS if c >= max(args.d, args.dv or args.d))
        config = fwd._TUNE_CONFIGS[head_class][0]
    kernel = compile_for_sm90(*launch_args(a, config))
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        print(json.dumps(dict(config=config, **report(kernel, keep))))


if __name__ == "__main__":
    main()

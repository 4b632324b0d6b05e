"""Compile the decode kernel (decode.py) for sm_90 on any machine (no GPU) and report what ptxas
made of it: the launch exactly as decode.launches builds it for one case.

    python scripts/aot_decode.py [--d 128] [--heads 32,8] [--batch 1] [--ctx 1024] [--paged PAGE]
        [--splits N] [--sinks] [--append] [--rotary half|interleaved] [--config BLOCK_N,WARPS,STAGES]
        [--keep DIR]

--append compiles the launch that also writes the step's one new token (decode.Append, the
planned fast path of a one-token append); --rotary adds rotary of q and that token (dim D).

Prints one JSON object per launch: constexprs, shared memory, ptxas registers and spills, and
the atomics / barriers in the PTX (the in-place merge's ticket).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from aot_fwd import TARGET, report  # noqa: E402
from flash_attn_3.backends.params import AttnArgs  # noqa: E402
from flash_attn_3.backends.triton import decode  # noqa: E402


def compile_launch(launch):
    kernel = launch.launcher.fn
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    names = launch.launcher.names[len(launch.args):]
    kwargs = dict(zip(names, launch.constexprs), num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--heads", default="32,8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--paged", type=int, default=0)
    p.add_argument("--splits", type=int, default=0)
    p.add_argument("--sinks", action="store_true")
    p.add_argument("--append", action="store_true")
    p.add_argument("--rotary", choices=("half", "interleaved"))
    p.add_argument("--config")
    p.add_argument("--keep", type=Path)
    args = p.parse_args()
    hq, hk = (int(x) for x in args.heads.split(","))
    b, d, dt = args.batch, args.d, torch.bfloat16
    if args.paged:
        pages = b * -(-args.ctx // args.paged)
        k = torch.empty(pages, args.paged, hk, d, dtype=dt)
        table = torch.zeros(b, pages // b, dtype=torch.int32)
    else:
        k, table = torch.empty(b, args.ctx, hk, d, dtype=dt), None
    a = AttnArgs.plain(
        torch.empty(b, 1, hq, d, dtype=dt), k, torch.empty_like(k), seqused_k=torch.zeros(b, dtype=torch.int32),
        max_seqlen_k=args.ctx, page_table=table, sinks=torch.zeros(hq) if args.sinks else None,
        num_splits=args.splits)
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    append = None
    if args.append or args.rotary:
        cos = torch.empty(args.ctx, d // 2, dtype=dt) if args.rotary else None
        append = decode.Append(torch.empty(b, 1, hk, d, dtype=dt), torch.empty(b, 1, hk, d, dtype=dt), cos, cos,
                               None, args.rotary == "interleaved", True)
    out, lse = decode.outputs(a)
    for launch in decode.launches(a, out, lse, config=config, seqused_add=1 if append else 0, append=append):
        kernel = compile_launch(launch)
        with tempfile.TemporaryDirectory() as tmp:
            keep = args.keep or Path(tmp)
            keep.mkdir(parents=True, exist_ok=True)
            info = report(kernel, keep)
            ptx = kernel.asm["ptx"]
            info.update(kernel=launch.launcher.fn.__name__, grid=launch.grid, constexprs=launch.constexprs,
                        num_warps=launch.num_warps, num_stages=launch.num_stages,
                        atom=[line.strip() for line in ptx.splitlines() if "atom." in line][:4],
                        bar_sync=ptx.count("bar.sync"))
            print(json.dumps(info, default=str))


if __name__ == "__main__":
    main()

"""Compile the Gluon Hopper forward for sm_90 on any machine (no GPU) and report what ptxas made.

    python scripts/aot_fwd_hopper.py [--head-dim 128] [--causal] [--dtype bf16|fp16|fp8]
                                     [--varlen] [--seqused] [--window L,R] [--chunk C]
                                     [--softcap C] [--sinks] [--paged PAGE_SIZE]
    python scripts/aot_fwd_hopper.py --check-plain
                                     [--config BLOCK_N,STAGES,PINGPONG[,PERSISTENT[,LATE_PV_WAIT]]]
                                     [--keep DIR]

--varlen compiles the packed variant (q/k/v (total, H, D) with cu_seqlens_q/k), --seqused the one
that reads seqused_q/k; both together are what flash_attn_varlen_func with seqused launches.
fp8 is dense only (forward() sends fp8 varlen to the portable kernel). --window, --chunk,
--softcap and --sinks compile the layer variants (sliding window, attention_chunk, softcap,
attention sinks); the sequences are 256 tokens long, and a window side of 255 or more is no
bound (fwd_hopper.mask_bounds). --paged compiles the paged-cache variant that
flash_attn_with_kvcache's prefill launches: K/V as (num_pages, PAGE_SIZE, Hk, D) pages through a
page table, with cache_seqlens (seqused_k); q dense, or packed with --varlen (cu_seqlens_q only).

--check-plain compiles every plain variant recorded in tests/fwd_hopper_plain_sass.json (the
kernels before the layer variants: bf16 / fp16 / fp8, D = 64 / 128 / 256, causal or not, dense /
varlen / seqused) and prints, for each, whether its SASS is still the recorded one; it exits 1
if any differs.

Prints one JSON object: shared memory bytes, warps, wgmma and TMA instructions in the PTX,
ptxas' register and spill figures (and its warnings, serialized wgmmas included), and the size of
the SASS KV loops with where their PV wait sits. --keep DIR writes the .ptx, .ttgir and .sass
there.
"""

from __future__ import annotations

import argparse
import hashlib
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

from flash_attn_3.backends.params import AttnArgs  # noqa: E402
from flash_attn_3.backends.triton import fwd_hopper  # noqa: E402
from scripts.aot_fwd import assemble, ptxas_figures  # noqa: E402


def plain_args(head_dim: int, causal: bool, dtype: torch.dtype, varlen: bool = False,
               seqused: bool = False, page_size: int = 0, head_dim_v: int = 0,
               **fields) -> AttnArgs:
    """CPU AttnArgs of one shape class: 2 sequences of 256 tokens, 4 query heads over 2 KV heads,
    packed (with cu_seqlens) when varlen, seqused_q/k when seqused; with a page_size, K/V in
    pages of a 2048-token cache (seqused_k its lengths) and only q packed when varlen; `fields`
    override the rest (window, chunk, softcap, sinks); head_dim_v: a narrower V (and O)."""
    dv = head_dim_v or head_dim
    q, k, v = (torch.empty(2, 256, h, d, dtype=dtype) for h, d in ((4, head_dim), (2, head_dim),
                                                                  (2, dv)))
    extra = {}
    if page_size:
        max_pages = 2048 // page_size
        k, v = (torch.empty(2 * max_pages + 3, page_size, 2, d, dtype=dtype)
                for d in (head_dim, dv))
        extra.update(page_table=torch.empty(2, max_pages, dtype=torch.int32),
                     seqused_k=torch.empty(2, dtype=torch.int32), max_seqlen_k=2048)
        if varlen:
            q = q.flatten(0, 1)
            extra.update(cu_seqlens_q=torch.tensor([0, 256, 512], dtype=torch.int32),
                         max_seqlen_q=256)
        return AttnArgs.plain(q, k, v, **{"window_right": 0 if causal else -1, **extra,
                                          **fields})
    if varlen:
        q, k, v = (x.flatten(0, 1) for x in (q, k, v))
        lengths = torch.tensor([0, 256, 512], dtype=torch.int32)
        extra.update(cu_seqlens_q=lengths, cu_seqlens_k=lengths, max_seqlen_q=256,
                     max_seqlen_k=256)
    if seqused:
        extra.update(seqused_q=torch.empty(2, dtype=torch.int32),
                     seqused_k=torch.empty(2, dtype=torch.int32))
    if dtype == torch.float8_e4m3fn:
        extra.update({n: torch.ones(2, 2) for n in ("q_descale", "k_descale", "v_descale")})
    return AttnArgs.plain(q, k, v, **{"window_right": 0 if causal else -1, **extra, **fields})


PLAIN_SASS = Path(__file__).resolve().parent.parent / "tests" / "fwd_hopper_plain_sass.json"
DTYPES = dict(bf16=torch.bfloat16, fp16=torch.float16, fp8=torch.float8_e4m3fn)


def plain_key(dtype: str, head_dim: int, causal: bool, varlen: bool, seqused: bool) -> str:
    """A variant's name in tests/fwd_hopper_plain_sass.json."""
    return (f"{dtype} D={head_dim} {'causal' if causal else 'full'}"
            + (" varlen" if varlen else "") + (" seqused" if seqused else ""))


def check_plain() -> bool:
    def compile_variant(dtype, head_dim, causal, layout):
        return compile_for_sm90(plain_args(head_dim, causal, DTYPES[dtype], "varlen" in layout,
                                           "seqused" in layout))
    return check_recorded(PLAIN_SASS, compile_variant)


def _recorded_reports(recorded: dict, compile_variant):
    """(key, report) of every variant a plain-SASS record names (keys "<dtype> D=<d>
    causal|full [words...]"; compile_variant(dtype, d, causal, words)), compiled in turn."""
    for key in recorded["sass_sha256"]:
        dtype, head_dim, mask, *words = key.split()
        with tempfile.TemporaryDirectory() as tmp:
            yield key, report(compile_variant(dtype, int(head_dim[2:]), mask == "causal", words),
                              Path(tmp))


def check_recorded(recorded_path: Path, compile_variant) -> bool:
    """Compile every variant a plain-SASS record names and print whether its SASS is the
    recorded one; True when all are."""
    recorded = json.loads(recorded_path.read_text())
    if recorded["triton"] != triton.__version__:
        raise SystemExit(f"recorded with triton {recorded['triton']}, this is {triton.__version__}")
    same = True
    for key, got in _recorded_reports(recorded, compile_variant):
        sha = recorded["sass_sha256"][key]
        same &= got["sass_sha256"] == sha
        print(json.dumps(dict(variant=key, same_sass=got["sass_sha256"] == sha,
                              spill_bytes=got["spill_bytes"])), flush=True)
    return same


def rerecord(recorded_path: Path, compile_variant, why: str) -> None:
    """Write the SASS hash of every variant a plain-SASS record names, compiled under this
    triton, `why` appended to the record's "about": for a deliberate change of the plain
    kernels, measured on the GPU (the record then guards the new SASS)."""
    recorded = json.loads(recorded_path.read_text())
    hashes = {}
    for key, got in _recorded_reports(recorded, compile_variant):
        hashes[key] = got["sass_sha256"]
        print(json.dumps(dict(variant=key, spill_bytes=got["spill_bytes"])), flush=True)
    recorded["sass_sha256"].update(hashes)
    recorded["triton"] = triton.__version__
    recorded["about"] = f"{recorded['about']} {why}"
    recorded_path.write_text(json.dumps(recorded, indent=1) + "\n")


def launch_of(a: AttnArgs, config=None):
    """(args, kwargs) of the _fwd_kernel launch forward() makes for a, captured instead of
    launched (fp8's V copy, a kernel of its own, is stood in for by an empty tensor)."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((args, kwargs))

    def values_keys_inner(v):
        batch, seqlen_k, heads_k, head_dim = v.shape
        return torch.empty(batch, heads_k, head_dim, -(-seqlen_k // 32) * 32, dtype=v.dtype)

    saved = (fwd_hopper._fwd_kernel, fwd_hopper._num_sms, fwd_hopper._values_keys_inner)
    fwd_hopper._fwd_kernel, fwd_hopper._num_sms = Recorder(), lambda device_index: 132
    fwd_hopper._values_keys_inner = values_keys_inner
    try:
        fwd_hopper.forward(a, config)
    finally:
        fwd_hopper._fwd_kernel, fwd_hopper._num_sms, fwd_hopper._values_keys_inner = saved
    return launches[0]


def compile_for_sm90(a: AttnArgs, config=None):
    """The kernel exactly as forward() launches it for a (same descriptors, constants and
    options)."""
    args, kwargs = launch_of(a, config)
    return compile_launch(fwd_hopper._fwd_kernel, args, kwargs)


def compile_launch(kernel, args, kwargs):
    """A captured Gluon launch compiled for sm_90 as the JIT would compile it at that launch."""
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    # Triton's own binder makes the signature, the constexprs (None arguments, ints of 1) and the
    # divisibility attributes, as at a launch: do_not_specialize is honoured.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    launch = {k: kwargs[k] for k in ("num_warps", "maxnreg")}
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


# The pipes the softmax competes for: MUFU (exp2, softcap's tanh), the FMA pipe (FFMA, FMUL,
# FADD, FMNMX, FSEL), integer ops (IMAD, SHF, IADD3, LEA), branches and votes.
_COUNTED = ("MUFU.EX2", "MUFU.TANH", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FRND",
            "F2I", "I2F", "F2FP", "PRMT", "SHFL", "VOTE", "BRA", "IMAD", "IADD3", "SHF", "LEA",
            "LOP3", "MOV")


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
        sass_sha256=hashlib.sha256(sass.encode()).hexdigest(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dim", type=int, default=128,
                   help="up to 256: 64, 128, 256 or a head dim padded to the next of them")
    p.add_argument("--head-dim-v", type=int, default=0,
                   help="v's head dim where it is narrower than q's and k's (DeepSeek: 192 / 128)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp8"])
    p.add_argument("--config", help="BLOCK_N,STAGES,PINGPONG[,PERSISTENT[,LATE_PV_WAIT]] "
                   "(default: default_config(head_dim, causal); PERSISTENT only changes the "
                   "grid)")
    p.add_argument("--varlen", action="store_true", help="packed q/k/v with cu_seqlens")
    p.add_argument("--seqused", action="store_true", help="with seqused_q and seqused_k")
    p.add_argument("--window", default="-1,-1", help="LEFT,RIGHT (-1: unbounded)")
    p.add_argument("--chunk", type=int, default=0, help="attention_chunk")
    p.add_argument("--softcap", type=float, default=0.0)
    p.add_argument("--sinks", action="store_true", help="with attention sinks")
    p.add_argument("--paged", type=int, default=0, metavar="PAGE_SIZE",
                   help="K/V in a paged cache of pages of this many tokens")
    p.add_argument("--keep", type=Path)
    p.add_argument("--check-plain", action="store_true",
                   help="compare every recorded plain variant's SASS (and nothing else)")
    args = p.parse_args()
    if args.check_plain:
        raise SystemExit(0 if check_plain() else 1)
    dtype = DTYPES[args.dtype]
    config = tuple(int(x) for x in args.config.split(",")) if args.config else None
    if dtype == torch.float8_e4m3fn and (args.varlen or args.seqused or args.paged):
        raise SystemExit("fp8 is dense only")
    left, right = (int(x) for x in args.window.split(","))
    layer = dict(window_left=left, window_right=0 if args.causal else right,
                 attention_chunk=args.chunk, softcap=args.softcap,
                 sinks=torch.empty(4) if args.sinks else None)
    kernel = compile_for_sm90(plain_args(args.head_dim, args.causal, dtype, args.varlen,
                                         args.seqused, args.paged, args.head_dim_v, **layer),
                              config)
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        got = report(kernel, keep)
    # A plain variant at its default config: is its SASS the recorded one (None: none recorded)?
    plain = (left, right, args.chunk, args.softcap, args.sinks, config, args.paged,
             args.head_dim_v) == (-1, -1, 0, 0.0, False, None, 0, 0)
    recorded = json.loads(PLAIN_SASS.read_text())
    key = plain_key(args.dtype, args.head_dim, args.causal, args.varlen, args.seqused)
    if plain and recorded["triton"] == triton.__version__ and key in recorded["sass_sha256"]:
        got["recorded_sass_same"] = got["sass_sha256"] == recorded["sass_sha256"][key]
    print(json.dumps(got))


if __name__ == "__main__":
    main()

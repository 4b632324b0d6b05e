"""The triton versions the Gluon kernels (fwd_hopper.py, bwd_hopper.py) may run on, and the one
difference in triton's experimental Gluon API between them that the kernels meet.

Gluon is experimental: its API moves between releases, and a kernel that still compiles can
compile into different code (registers, spills, wgmma count, loop shape). So each triton minor
version is taken only once checked: `scripts/aot_matrix.py` compiles every Gluon config for sm_90
under each version and prints the figures beside 3.6's, and a GPU run of the test suite and the
benchmarks confirms the kernels on the H100. Any other version gets the portable kernels (fwd.py,
bwd.py) and `refusal()` says why; `python -m flash_attn_3 info` prints it.

API differences adapted here:
- triton 3.8 renamed the TMA copies (`tma.async_copy_global_to_shared` -> `tma.async_load`,
  `tma.async_copy_shared_to_global` -> `tma.async_store`) and 3.9 removed the old names. The
  kernels keep 3.6's names and import `tma` from here, where the old names point to the new
  functions wherever those exist.
- triton 3.9 removed `gl.thread_barrier()`; `gl.barrier()` (cluster=False) emits the same CTA
  barrier (both are `_semantic.debug_barrier()`). The kernels call `thread_barrier` from here.

Code-generation differences chosen here (constexprs the kernels read, so the other branch is not
compiled; each version keeps the form its GPU run measured):
- CAUSAL_MASK_BY_LANE (the forward; triton 3.7 and >= 3.9): fwd_hopper._masked compares
  per-register constants with a per-row limit for the plain causal mask instead of the columns
  with the diagonal. Under 3.9's CUDA 13.4 ptxas the columns stayed in registers across the KV
  loop and the causal forward at head dims 128 and 256 spilled inside it; with the constant form
  it does not (see docs/perf-notes.md, "Gluon under triton 3.9: the causal mask"). Under 3.6 the
  two forms time alike (the same call, H100), so 3.6 keeps its recorded SASS
  (tests/fwd_hopper_plain_sass.json).
- BWD_MASK_BY_LANE (the backward; triton 3.6, 3.7 and >= 3.9): bwd_hopper._edge_mask and
  _in_queries take the same form for the backward's query columns, which 3.9 kept live across
  its KV loops beside the wgmma descriptors it hoists (D = 128: 336 B of spills, 10 / 24 local
  ops in the loops -> none; "Gluon under triton 3.9: the backward"). Under 3.7.1 it takes the
  causal D = 128 backward from 5 local ops in a KV loop to 3.6's 4. Under 3.6 it cuts the
  D = 128 spills (plain 52-64 B -> 16, deterministic 160 -> 0, windowed 156-212 -> 24-32) and the
  loops by 8-9 %; the H100 timed the dense backward 4-9 % faster at D = 64 / 128 in one call
  ("The by-lane backward under triton 3.6"). The deterministic non-causal D = 128 kernel, which
  compiles worse with it under 3.6, takes the forward's choice (bwd_hopper._consumer). Not 3.8:
  it was run on the H100 with the other form.
FLASH_ATTN_3_CAUSAL_MASK_BY_LANE=0/1 (read at import) overrides both: the A/B timing of the forms
under one triton.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Optional

import torch

ENV_VAR = "FLASH_ATTN_3_GLUON"

# What is known of the Gluon kernels under a triton minor version.
RUN = "run on the H100"  # the GPU suite and the benchmarks passed under it: taken by default
# scripts/aot_matrix.py: every default config compiles for sm_90 with 3.6's structure (registers,
# shared memory, wgmma / TMA counts, setmaxnreg, KV loops with no more local-memory ops), at most
# spills outside the loops moved. Never run on a GPU: taken only when forced.
COMPILED = "compiles like 3.6"
# Some default config compiles differently from 3.6 in a way that may cost speed (local-memory
# ops entering a KV loop): not the code that was measured. Taken only when forced.
DIFFERS = "compiles differently"

# triton minor version -> (status, what aot_matrix.py found against 3.6.0), from its run of
# 2026-12-07 (docs/perf-notes.md, "Triton 3.7-3.9"): 3.7.1, 3.8.0, 3.9.0, all 67 Gluon configs.
# After a GPU run confirms a version (GPU suite and benchmark ratios under FLASH_ATTN_3_GLUON=1),
# change its status to RUN: that one line is the whole switch.
VERSIONS = {
    "3.6": (RUN, "the version the kernels were written and measured for"),
    # 3.7.1 with the by-lane forms (docs/perf-notes.md, "Gluon under triton 3.7 with the
    # by-lane form"; aot_matrix --quick and 21 layer / dtype variants, 2026-12-07): every default
    # config 168 registers and 3.6's wgmma / TMA structure, no KV loop with more local ops than
    # 3.6's; the softcapped D = 128 backward has more (11 / 4, causal 14 / 7; 3.6: 6 / 2 and
    # 11 / 2). H100, 2026-12-07 15:12 UTC, torch 2.11, commit 9f1c3f8: tests/test_fwd_hopper.py
    # and test_bwd_hopper.py, 313 passed, none failed; in the same call forward 0.97-1.09x cuDNN
    # (fp8 1.31-1.34x cuDNN's bf16), backward 0.90-1.05x (D = 64 0.90 / 0.93, D = 128 0.95,
    # D = 256 1.05 / 0.99).
    "3.7": (RUN, "every default config compiles like 3.6 or with fewer spills with the by-lane "
                 "causal mask; run on the H100: forward at 3.6's speed, backward 0.90-1.05x "
                 "cuDNN"),
    # H100, 2026-12-07 10:20 UTC, torch 2.11: 406 GPU tests passed (of the suite's ~550; the
    # rest cut by the call's time cap, none failed); forward within 2 % of 3.6's ratio to cuDNN
    # in the same call, fp8 +3 %; backward 1-5 % below 3.6's (D = 64 0.85 vs 0.90, D = 128
    # 0.88-0.89 vs 0.91), still well above the portable kernels.
    "3.8": (RUN, "every default config as under 3.6 (spills outside the loops move, mostly "
                 "down); run on the H100: forward at 3.6's speed, backward 1-5 % slower"),
    # 3.9 with triton's own ptxas flags (--regAllocOptLevel=2; docs/perf-notes.md, "Gluon under
    # triton 3.9: the causal mask" and "... the backward"): with CAUSAL_MASK_BY_LANE no default
    # forward or backward has a local op in a KV loop but the non-causal D = 256 backward (one
    # per loop: the thread id, reloaded for the mbarrier arrive's predicate). H100, 2026-12-07
    # 13:12-13:25 UTC, torch 2.11, commit cff046f: tests/test_fwd_hopper.py and
    # test_bwd_hopper.py, 260 passed, none failed (the call's cap cut the rest); forward at
    # 0.93-1.09x cuDNN in the same call (3.6: 0.98-1.08), backward at head dims 64 / 128
    # 0.93-0.98x (3.6: 0.88-0.90); head dim 256's backward not timed (bwd.py's dQ autotuner
    # failed on a key name under 3.9, fixed since in launch.Autotuned).
    "3.9": (RUN, "every default config compiles like 3.6 or better with the by-lane causal mask "
                 "(the non-causal head-dim-256 backward: one reload per KV loop); run on the "
                 "H100: forward within 5 % of 3.6's speed, backward at head dims 64 and 128 "
                 "4-9 % faster"),
}


def _minor_tuple(version: str) -> tuple:
    """'3.9.0' -> (3, 9)."""
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


def _by_lane_default(version: str, backward: bool = False) -> bool:
    """The by-lane forms' default for a triton version (see the docstring): the forward's under
    3.7 and >= 3.9, the backward's under 3.6 too; never under 3.8 (run on the H100 with the
    other form: changing its code would undo that run)."""
    minor = _minor_tuple(version)
    return minor == (3, 7) or minor >= (3, 9) or (backward and minor == (3, 6))


TRITON_VERSION: Optional[str] = None
IMPORT_ERROR: Optional[str] = None
_tma = None
thread_barrier = None
CAUSAL_MASK_BY_LANE = False
BWD_MASK_BY_LANE = False
try:
    import triton

    TRITON_VERSION = triton.__version__
    from triton.experimental.gluon import language as _gl
    from triton.experimental.gluon.language.nvidia.hopper import tma as _tma

    # A barrier over the CTA's threads (in a warp-specialized partition, its warps): 3.6-3.8's
    # name, or 3.9's gl.barrier, the same builtin under its new name.
    thread_barrier = getattr(_gl, "thread_barrier", None) or _gl.barrier
    # Code-generation choices that differ by version (see the docstring): constexprs the kernels
    # read, so that each version's other branch is never compiled.
    _by_lane = os.environ.get("FLASH_ATTN_3_CAUSAL_MASK_BY_LANE", "").strip()
    CAUSAL_MASK_BY_LANE = _gl.constexpr(
        _by_lane == "1" if _by_lane in ("0", "1") else _by_lane_default(TRITON_VERSION))
    BWD_MASK_BY_LANE = _gl.constexpr(
        _by_lane == "1" if _by_lane in ("0", "1") else _by_lane_default(TRITON_VERSION, True))
except ImportError as exc:  # no triton, or one without Gluon's Hopper ops
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _tma_namespace():
    """triton's Gluon `tma` module with 3.6's names for the TMA copies kept (see the docstring).
    A plain module object: Gluon's compiler resolves attributes of module globals."""
    ns = types.ModuleType(__name__ + ".tma", _tma.__doc__)
    for name in dir(_tma):
        if not name.startswith("__"):
            setattr(ns, name, getattr(_tma, name))
    if hasattr(_tma, "async_load"):
        ns.async_copy_global_to_shared = _tma.async_load
        ns.async_copy_shared_to_global = _tma.async_store
    return ns


tma = _tma_namespace() if _tma is not None else None


def minor_version(version: str) -> str:
    """'3.8.0' -> '3.8'; '3.10.0+git1234' -> '3.10'."""
    return ".".join(version.split("+")[0].split(".")[:2])


def version_status() -> Optional[str]:
    """VERSIONS' status of the installed triton (None: not listed or not importable)."""
    if TRITON_VERSION is None or IMPORT_ERROR is not None:
        return None
    return VERSIONS.get(minor_version(TRITON_VERSION), (None, ""))[0]


@functools.lru_cache(maxsize=None)
def _version_refusal() -> Optional[str]:
    if IMPORT_ERROR is not None:
        return f"triton's Gluon Hopper API does not import ({IMPORT_ERROR})"
    status = version_status()
    if status == RUN:
        return None
    verified = ", ".join(v for v, (s, _) in VERSIONS.items() if s == RUN)
    tail = f"verified: triton {verified}; {ENV_VAR}=1 forces them"
    if status is None:
        return f"triton {TRITON_VERSION} is not a version the Gluon kernels were checked on ({tail})"
    note = VERSIONS[minor_version(TRITON_VERSION)][1]
    if status == COMPILED:
        return (f"triton {TRITON_VERSION} compiles the Gluon kernels for sm_90 like triton 3.6 "
                f"({note}) but they have not been run on a GPU under it ({tail})")
    return (f"triton {TRITON_VERSION} compiles the Gluon kernels differently from triton 3.6 "
            f"({note}) and they have not been run on a GPU under it ({tail})")


@functools.lru_cache(maxsize=None)
def _device_refusal(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the Gluon kernels run on CUDA GPUs; tensors are on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return (f"the Gluon kernels are written for sm_90 (H100/H200); this GPU is sm_{major}{minor}")
    return None


def refusal(device: torch.device) -> Optional[str]:
    """None when the Gluon kernels may run on `device` with this triton, else why not.

    FLASH_ATTN_3_GLUON (read at each call): 0 turns them off; 1 forces them on under any triton
    whose Gluon API imports, checked or not (for the GPU run that checks a version); unset or
    anything else follows VERSIONS."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting == "0":
        return f"{ENV_VAR}=0 turns the Gluon kernels off"
    reason = _device_refusal(device)
    if reason is not None:
        return reason
    reason = _version_refusal()
    if reason is not None and (setting != "1" or IMPORT_ERROR is not None):
        return reason
    return None


def describe() -> str:
    """One line on this triton and the Gluon kernels, for `python -m flash_attn_3 info`."""
    if IMPORT_ERROR is not None:
        return _version_refusal()
    status = version_status()
    if status == RUN:
        return f"triton {TRITON_VERSION}: verified (compiled and run on the H100)"
    return _version_refusal()

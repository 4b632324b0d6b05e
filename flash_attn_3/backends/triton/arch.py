"""The GPU generations the portable kernels (fwd.py, bwd.py, decode.py, combine.py, append_kv.py)
pick launch configs for, and what each allows.

A CUDA device maps to one of ARCHS by its compute capability; each kernel file keeps its launch
configs per arch beside the kernel. sm_90's are the ones measured on the H100; the others are
chosen offline (tests/test_aot_portable.py compiles every one of them for its target with the
ptxas triton ships, within the target's shared memory and a register-spill budget) and are not
yet timed on those GPUs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch


class Arch(NamedTuple):
    capability: int  # the compile target, 10 * major + minor
    shared_bytes: int  # shared memory one block may opt into
    gpus: str


# cudaDevAttrMaxSharedMemoryPerBlockOptin of each generation (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"), what one program of a kernel may use.
ARCHS = {
    "sm_80": Arch(80, 163 * 1024, "A100, A800, A30"),
    "sm_86": Arch(86, 99 * 1024, "A10, A40, RTX 30xx, RTX A6000"),
    "sm_89": Arch(89, 99 * 1024, "L4, L40S, RTX 40xx, RTX 6000 Ada"),
    "sm_90": Arch(90, 227 * 1024, "H100, H200, H20, GH200"),
    "sm_100": Arch(100, 227 * 1024, "B200, B300, GB200"),
    "sm_120": Arch(120, 99 * 1024, "RTX 50xx, RTX PRO 6000 Blackwell"),
}
# The H100's: what the CPU tests (TRITON_INTERPRET) and anything off CUDA pretend to run on.
DEFAULT = "sm_90"
# Accumulator elements of one tile from which a GPU other than the H100 takes 8 warps instead of
# 4: at 4 warps 64 x 256 fp32 is 128 registers a thread before Q and the scores. sm_86 (mma.sync):
# decode at D = 256 spilled 876 bytes (8 warps: 12), the split forward at d = 64, dv = 512 2576
# (8 warps: 0); sm_100 (tcgen05, whose accumulator still passes through registers for the
# softmax): 880 and 1992 (8 warps: 48 and 0). sm_90 keeps its measured 4 warps.
WIDE_TILE = 64 * 256
WIDE_TILE_ARCHS = frozenset(ARCHS) - {"sm_90"}


def arch_of(major: int, minor: int) -> str:
    """The ARCHS entry whose configs fit a compute capability: A100-class shared memory for 8.0
    and 8.7 (Orin), the 99 KB parts for the rest of 8.x (and, conservatively, anything older),
    Hopper for 9.x, the datacenter Blackwells (10.x, 11.x) with Hopper's shared memory, the
    consumer ones (12.x) with 99 KB. Below 8.0 (no bf16 tensor cores; Turing has 64 KB) the
    configs are not checked."""
    if major >= 12:
        return "sm_120"
    if major >= 10:
        return "sm_100"
    if major == 9:
        return "sm_90"
    if major == 8 and minor in (0, 7):
        return "sm_80"
    if major == 8 and minor == 9:
        return "sm_89"
    return "sm_86"


def gpu_refusal(device: torch.device, fp8: bool) -> Optional[str]:
    """Why the triton kernels cannot run a call on this CUDA device, or None: they need bf16
    tensor cores (sm_80), and triton has fp8 e4m3 only from sm_89 on (it refuses the type below)."""
    return _gpu_refusal(device.index if device.index is not None else torch.cuda.current_device(),
                        fp8)


@functools.lru_cache(maxsize=None)
def _gpu_refusal(index: int, fp8: bool) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (f"the triton kernels need sm_80 or newer (bf16 tensor cores); this GPU is "
                f"sm_{major}{minor}")
    if fp8 and (major, minor) < (8, 9):
        return (f"fp8 e4m3 needs sm_89 or newer (Ada, Hopper, Blackwell); this GPU is "
                f"sm_{major}{minor}")
    return None


def device_arch(device: torch.device) -> str:
    """ARCHS key of a device (DEFAULT off CUDA)."""
    if device.type != "cuda":
        return DEFAULT
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    # Cached: the launch paths ask on every call.
    return arch_of(*torch.cuda.get_device_capability(index))

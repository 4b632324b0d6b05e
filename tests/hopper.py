"""What the Gluon Hopper kernel tests (test_fwd_hopper.py, test_bwd_hopper.py) share: the sm_90
markers and the shapes every Hopper kernel must get right."""

from __future__ import annotations

import pytest
import torch

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _gluon_refusal():
    """Why calls are not routed to the Gluon kernels in this run, or None: no sm_90 GPU,
    FLASH_ATTN_3_GLUON=0, or a triton version not yet verified (gluon_compat; =1 forces it)."""
    if not HOPPER:
        return "needs an sm_90 GPU"
    from flash_attn_3.backends.triton import gluon_compat

    return gluon_compat.refusal(torch.device("cuda"))


# The Gluon kernels' GPU tests assert their routing too, so they run where the kernels are taken:
# with FLASH_ATTN_3_GLUON=0 the GPU suite checks the portable kernels that run instead.
on_hopper = pytest.mark.skipif(_gluon_refusal() is not None,
                               reason=f"Gluon kernels not taken: {_gluon_refusal()}")


def gluon_required(kernel_module) -> pytest.MarkDecorator:
    """Skip unless triton's Gluon API imported in kernel_module (fwd_hopper, bwd_hopper)."""
    return pytest.mark.skipif(not kernel_module._GLUON_OK, reason="needs triton's Gluon Hopper API")


def _recorded_and_running_triton() -> tuple[str, str]:
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "fwd_hopper_plain_sass.json").read_text())["triton"]
    try:
        import triton
    except ImportError:
        return recorded, "none"
    return recorded, triton.__version__


# Offline compile tests whose bounds are ptxas figures (spill bytes, local-memory ops in a KV
# loop, the recorded plain SASS): those move with every triton release's ptxas, so they hold for
# the triton they were recorded under (CI pins it); scripts/aot_matrix.py compares the others.
_RECORDED, _RUNNING = _recorded_and_running_triton()
figures_of_pinned_triton = pytest.mark.skipif(
    _RUNNING != _RECORDED, reason=f"compile figures recorded under triton {_RECORDED}, this is "
                                  f"{_RUNNING} (scripts/aot_matrix.py compares it)")


def alternative_configs(candidates: dict) -> list:
    """(head_dim, config) for each of a kernel's CANDIDATES: the configs its tuning bench times
    besides the defaults, tested so that none of the bench's figures comes from a wrong kernel."""
    return [(d, c) for d, cs in candidates.items() for c in cs]


# (batch, seqlen_q, seqlen_k, heads_q, heads_k)
COMMON_SHAPES = [
    (2, 1000, 1023, 4, 2),  # ragged tails on both sides, GQA
    (1, 1023, 1000, 6, 1),  # seqlen_q > seqlen_k: causal rows above the diagonal see no key; MQA
    (3, 128, 384, 2, 2),  # whole blocks only
    (1, 1, 700, 8, 2),  # a single query row
    (2, 77, 5, 4, 4),  # fewer keys than one block
]


def qkv(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype):
    """Fresh random CUDA (B, S, H, D) q, k, v of one shape of these lists."""
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, seqlen_k, heads_k, head_dim, device="cuda", dtype=dtype)
            for _ in "kv")
    return q, k, v

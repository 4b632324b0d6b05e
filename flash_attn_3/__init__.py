"""flash_attn_3: the FlashAttention-3 Python API on any GPU Triton supports, and on the CPU."""

__version__ = "3.0.0"

from .interface import (  # noqa: E402
    flash_attn_combine,
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
)
from . import _C  # noqa: E402,F401  (the official op names: torch.ops.flash_attn_3.fwd, ...)

__all__ = [
    "__version__",
    "flash_attn_combine",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "get_scheduler_metadata",
]

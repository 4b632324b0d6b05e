"""`flash_attn_3.flash_attn_interface`: the same public functions as the top-level module."""

from .interface import (  # noqa: F401
    flash_attn_combine,
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    get_scheduler_metadata,
)
from .official_ops import _flash_attn_backward, _flash_attn_forward  # noqa: F401  (the official custom ops)

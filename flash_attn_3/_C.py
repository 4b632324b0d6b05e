"""`import flash_attn_3._C` registers the official ops (`torch.ops.flash_attn_3.fwd`, `bwd`,
`fwd_combine`, `get_scheduler_metadata`, `_flash_attn_forward`, `_flash_attn_backward`), as the
official build's compiled extension does. Pure Python: no compiled code, and Triton is imported
only when a kernel first runs."""

from . import official_ops  # noqa: F401

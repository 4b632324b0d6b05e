"""`flash_attn_3.flash_attn_config`: the top-level `flash_attn_config`, as officially."""

from flash_attn_config import CONFIG, show  # noqa: F401

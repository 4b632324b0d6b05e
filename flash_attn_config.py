"""The official build's `flash_attn_config`: `CONFIG["build_flags"]` says which features the build
left out. Clients read it to learn what the installed package supports; here every flag follows
the Triton backend's row of the capability table (flash_attn_3/dispatch.py), so the answer is the
one the dispatcher gives."""

from flash_attn_3.dispatch import CAPABILITIES as _CAPABILITIES


def _disabled(*features: str) -> bool:
    return any(_CAPABILITIES["triton"][f] is not None for f in features)


CONFIG = {
    "build_flags": {
        "FLASHATTENTION_DISABLE_BACKWARD": _disabled("backward"),
        "FLASHATTENTION_DISABLE_SPLIT": _disabled("split_kv", "combine"),
        "FLASHATTENTION_DISABLE_PAGEDKV": _disabled("paged_kv"),
        "FLASHATTENTION_DISABLE_APPENDKV": _disabled("append_kv", "rotary"),
        "FLASHATTENTION_DISABLE_LOCAL": _disabled("local"),
        "FLASHATTENTION_DISABLE_SOFTCAP": _disabled("softcap"),
        "FLASHATTENTION_DISABLE_PACKGQA": _disabled("gqa"),
        "FLASHATTENTION_DISABLE_FP16": False,
        "FLASHATTENTION_DISABLE_FP8": _disabled("fp8"),
        "FLASHATTENTION_DISABLE_VARLEN": _disabled("varlen"),
        # No kernel here launches thread-block clusters.
        "FLASHATTENTION_DISABLE_CLUSTER": True,
        # Every head dim up to 256 (multiple of 8) runs; the portable kernels run on sm_80+.
        "FLASHATTENTION_DISABLE_HDIM64": False,
        "FLASHATTENTION_DISABLE_HDIM96": False,
        "FLASHATTENTION_DISABLE_HDIM128": False,
        "FLASHATTENTION_DISABLE_HDIM192": False,
        "FLASHATTENTION_DISABLE_HDIM256": False,
        "FLASHATTENTION_DISABLE_SM8x": False,
        # The official fp8 V-column-major variant; our fp8 kernels transpose V themselves.
        "FLASHATTENTION_ENABLE_VCOLMAJOR": False,
        "FLASH_ATTENTION_DISABLE_HDIMDIFF64": _disabled("dv_ne_d"),
        "FLASH_ATTENTION_DISABLE_HDIMDIFF192": _disabled("dv_ne_d"),
    }
}


def show():
    from pprint import pprint

    pprint(CONFIG)

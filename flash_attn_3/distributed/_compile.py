"""How the entries meet torch.compile: as an opaque eager call (a graph break around them).

The ring's point-to-point transfers and the host reads of lengths cannot be traced. Decorating with
torch.compiler.disable at import would import torch._dynamo (seconds) for every user; instead the
entry checks whether it is being traced and only then routes the call through disable, which
dynamo treats as a graph break.
"""

from __future__ import annotations

import functools

import torch


def eager_under_compile(fn):
    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return entry

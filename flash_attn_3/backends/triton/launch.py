"""Cheap repeat launches of a @triton.jit kernel: the host half of a small decode step.

`kernel[grid](...)` re-derives Triton's specialization of every argument on every call (binder,
cache key, a launch-metadata dict, calls into the empty launch-hook chains), then its C launcher
asks the driver about every tensor's pointer: 16 us of Python on the dev CPU for the 60-argument
decode kernel before the driver calls (docs/perf-notes.md, KV section). A decode loop repeats one
call signature, so `Launcher` keys the compiled kernel by a tuple that determines Triton's
specialization, and from the second call on hands the CompiledKernel's launcher plain values:
device pointers as ints (no driver query), ints, floats, no hooks. 5 us on the same CPU.

The key must never map two calls that Triton would compile differently to one kernel. Triton
(3.6, runtime/jit.py and specialize.cc) specializes a tensor on its dtype and on data_ptr % 16,
an int on == 1, on % 16 and on its integer width, a bool and a float not at all, None as a
constant; plus the constexpr values and the launch options. The key holds the tensors' dtype and
pointer alignment, every int and bool by type and value (finer than Triton's classes: a decode
loop repeats the same ints), floats by type, None, and the constexpr values and options. A miss (or
anything unusual: launch hooks set, the interpreter) takes Triton's own path, which compiles if needed
and returns the kernel we cache. tests/test_launch.py checks the key against Triton's binder.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from triton import knobs
from triton.runtime.jit import JITFunction


# Call signatures one launcher remembers; a serving loop sees one per batch shape it runs.
MAX_CACHED = 4096


def key_and_values(args: Sequence[Any]) -> Optional[tuple[tuple, list]]:
    """(a tuple that determines Triton's specialization of the runtime arguments `args`, what the
    C launcher reads for them: device pointers as ints, the rest as they are), or None for an
    argument type this does not know (the caller then takes Triton's path). One pass: this runs
    on every launch."""
    key = []
    values = []
    for x in args:
        kind = type(x)
        if kind is torch.Tensor:
            ptr = x.data_ptr()
            key.append(x.dtype)
            key.append(ptr & 15 == 0)
            values.append(ptr)
        elif kind is float:  # never specialized: a new softmax_scale is no new kernel
            key.append(float)
            values.append(x)
        elif kind is int or kind is bool or x is None:
            # By type and value: 1 and True compare equal but compile apart.
            key.append(kind)
            key.append(x)
            values.append(x)
        else:
            return None
    return tuple(key), values


def _launch_hooks_set() -> bool:
    """Whether a profiler (proton, ...) hooks launches: Triton 3.6 keeps an empty HookChain in
    each slot when none does; a plain callable there is a hook too."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class Launcher:
    """Launches of one kernel whose constexpr parameters all follow its runtime parameters.

    `launcher(grid, args, constexprs, num_warps, num_stages)`: args are the runtime arguments in
    parameter order, constexprs the constexpr values in parameter order (a tuple: it is part of
    the key).
    """

    def __init__(self, fn):
        self.fn = fn
        self.jit = isinstance(fn, JITFunction)  # False under TRITON_INTERPRET=1
        names = getattr(fn, "arg_names", None) or list(fn.signature.parameters)
        if self.jit:
            constexpr = [p.is_constexpr for p in fn.params]
            first = constexpr.index(True) if True in constexpr else len(constexpr)
            if not all(constexpr[first:]):
                raise ValueError(f"{fn}: constexpr parameters must come after the runtime ones")
            self.num_runtime = first
        else:
            self.num_runtime = None
        self.names = names
        self.kernels: dict[tuple, tuple] = {}
        self._device = self._stream = None

    def __call__(self, grid, args: Sequence[Any], constexprs: tuple, num_warps: int, num_stages: int):
        if not self.jit or _launch_hooks_set():
            return self._slow(grid, args, constexprs, num_warps, num_stages)
        if self._device is None:
            from triton.runtime.driver import driver

            self._device = driver.active.get_current_device
            self._stream = driver.active.get_current_stream
        prepared = key_and_values(args)
        if prepared is None:
            return self._slow(grid, args, constexprs, num_warps, num_stages)
        spec, values = prepared
        device = self._device()
        # debug / instrumentation change the compiled code as the JIT path reads them per call.
        key = (device, num_warps, num_stages, constexprs, spec, knobs.runtime.debug,
               knobs.compilation.instrumentation_mode)
        hit = self.kernels.get(key)
        if hit is None:
            kernel = self._slow(grid, args, constexprs, num_warps, num_stages)
            # Only a finished CompiledKernel is cached (async compile modes hand back futures).
            if getattr(kernel, "function", None) is not None:
                if len(self.kernels) >= MAX_CACHED:  # ints vary with batch shapes: stay bounded
                    self.kernels.clear()
                self.kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata,
                                     [None] * len(constexprs))
            return
        run, function, metadata, constexpr_slots = hit
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        # The launcher parses the constexpr slots as objects and ignores them (values are compiled in).
        run(grid[0], grid_y, grid_z, self._stream(device), function, metadata, None, None, None,
            *values, *constexpr_slots)

    def _slow(self, grid, args, constexprs, num_warps, num_stages):
        if len(args) + len(constexprs) != len(self.names):
            raise TypeError(f"{self.names}: got {len(args)} runtime and {len(constexprs)} constexpr values")
        named = dict(zip(self.names[len(args):], constexprs))
        return self.fn[grid](*args, **named, num_warps=num_warps, num_stages=num_stages)

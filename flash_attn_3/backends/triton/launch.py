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

import threading
from typing import Any, NamedTuple, Optional, Sequence

import torch
import triton
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

    def _setup(self):
        from triton.runtime.driver import driver

        # _device is the "set up" flag __call__ reads without a lock: it goes last, so a second
        # thread never sees it with _stream still None.
        self._stream = driver.active.get_current_stream
        self._device = driver.active.get_current_device

    def fast(self) -> bool:
        """Whether a cached kernel may be launched directly now (compiled kernels, no launch hooks)."""
        return self.jit and not _launch_hooks_set()

    def cache_key(self, device, spec: tuple, constexprs: tuple, num_warps: int, num_stages: int) -> tuple:
        # debug / instrumentation change the compiled code as the JIT path reads them per call.
        return (device, num_warps, num_stages, constexprs, spec, knobs.runtime.debug,
                knobs.compilation.instrumentation_mode)

    def __call__(self, grid, args: Sequence[Any], constexprs: tuple, num_warps: int, num_stages: int):
        if not self.fast():
            return self._slow(grid, args, constexprs, num_warps, num_stages)
        if self._device is None:
            self._setup()
        prepared = key_and_values(args)
        if prepared is None:
            return self._slow(grid, args, constexprs, num_warps, num_stages)
        spec, values = prepared
        device = self._device()
        key = self.cache_key(device, spec, constexprs, num_warps, num_stages)
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


class Autotuned:
    """`triton.autotune(configs=..., key=..., **kwargs)(fn)`, launched as `kernel[grid](...)`
    under a lock.

    Triton 3.6's Autotuner keeps the running call's arguments on itself (`self.nargs`) from the
    start of `run` to its end, and a tuning run drops the GIL for seconds of compiles and
    benchmarks. A second thread launching meanwhile replaces them and sets them to None when it
    returns: the tuning thread then fails ("'NoneType' object is not a mapping"), or its
    reset_to_zero hook zeroes the other call's buffer (the backward's DQ_ACC).
    triton-lang/triton#11494 is open; tests/test_reliability_concurrency.py reproduces it. The
    lock covers the host side of a launch only (a few microseconds once tuned).
    """

    def __init__(self, fn, configs, key, **kwargs):
        # A key shared by several kernels names arguments only some of them have: triton 3.6-3.8
        # skip those names, 3.9 raises ("key contains names that are not kernel arguments"),
        # which failed every autotuned call of bwd.py's dQ kernel under 3.9 (H100 2026-12-07).
        key = [name for name in key if name in fn.arg_names]
        self.tuner = triton.autotune(configs=configs, key=key, **kwargs)(fn)
        self._lock = threading.Lock()

    def __getitem__(self, grid):
        launch = self.tuner[grid]

        def locked(*args, **kwargs):
            with self._lock:
                return launch(*args, **kwargs)

        return locked


class Launch(NamedTuple):
    """One launch with its arguments built but not sent (Bound replays it with other tensors)."""
    launcher: Launcher
    grid: tuple
    args: tuple
    constexprs: tuple
    num_warps: int
    num_stages: int

    def __call__(self):
        self.launcher(self.grid, self.args, self.constexprs, self.num_warps, self.num_stages)


class Unbindable(ValueError):
    """A launch argument that is no role tensor nor a view of exactly one."""


class Bound:
    """A Launch replayed for other tensors of the same layout: the host half of a repeat decode step.

    roles: the tensors a step takes (inputs, then its allocations), None where absent. Every tensor
    argument of the launch must be one of them, or a view into the storage of exactly one (two
    roles on one storage would make the view's owner a guess); it is then replayed as that role's
    pointer plus the byte offset it had. Everything else in the launch is a Python value fixed by
    the layout, so the replay is a generated call of the C launcher with constants in place.
    `go(ptrs)` needs each used role's pointer with the 16-byte residue it had when bound (that
    residue fixes Triton's alignment specialization; `residues` lists them for the caller).
    """

    def __init__(self, launch: Launch, roles: Sequence[Optional[torch.Tensor]]):
        self.launch = launch
        self.slots = []  # (argument index, role, byte offset, (size, stride, element offset) or None)
        for i, x in enumerate(launch.args):
            if type(x) is not torch.Tensor:
                if isinstance(x, torch.Tensor):
                    raise Unbindable(f"argument {i} is a {type(x).__name__}")
                continue
            same = [r for r, t in enumerate(roles) if t is x]
            if len(same) == 1:
                self.slots.append((i, same[0], 0, None))
                continue
            storage = x.untyped_storage().data_ptr()
            owners = [r for r, t in enumerate(roles)
                      if t is not None and t.untyped_storage().data_ptr() == storage]
            if len(same) > 1 or len(owners) != 1 or roles[owners[0]].dtype != x.dtype:
                raise Unbindable(f"argument {i} is not a view of exactly one role")
            role = roles[owners[0]]
            view = (tuple(x.shape), x.stride(), x.storage_offset() - role.storage_offset())
            self.slots.append((i, owners[0], x.data_ptr() - role.data_ptr(), view))
        self.residues = {r: roles[r].data_ptr() % 16 for _, r, _, _ in self.slots}
        # No tensor stays referenced: a plan must not keep a step's cache alive.
        tensor_args = {i for i, _, _, _ in self.slots}
        self.launch = launch._replace(args=tuple(None if i in tensor_args else x for i, x in enumerate(launch.args)))
        self._go = None
        self._device = None

    def _tensors(self, roles):
        args = list(self.launch.args)
        for i, r, _, view in self.slots:
            role = roles[r]
            args[i] = role if view is None else role.as_strided(view[0], view[1], role.storage_offset() + view[2])
        return args

    def _bind(self, device, args):
        """Generate go(stream, p) for the compiled kernel of these arguments, if Triton cached one."""
        launch = self.launch
        hit = launch.launcher.kernels.get(launch.launcher.cache_key(
            device, key_and_values(args)[0], launch.constexprs, launch.num_warps, launch.num_stages))
        if hit is None:
            return
        run, function, metadata, constexpr_slots = hit
        grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        names = {"run": run, "function": function, "metadata": metadata}
        items = [repr(g) for g in grid] + ["stream", "function", "metadata", "None", "None", "None"]
        slots = {i: (r, offset) for i, r, offset, _ in self.slots}
        for i, x in enumerate(launch.args):
            if i in slots:
                r, offset = slots[i]
                items.append(f"p[{r}] + {offset}" if offset else f"p[{r}]")
            else:
                names[f"c{i}"] = x
                items.append(f"c{i}")
        items += ["None"] * len(constexpr_slots)
        source = f"def go(stream, p):\n    run({', '.join(items)})\n"
        exec(source, names)  # noqa: S102 - constants and slot indices only, built above
        self._go, self._device = names["go"], device

    def go(self, roles, ptrs):
        """Launch with `roles` (tensors) whose pointers are `ptrs` (residues checked by the caller)."""
        launcher = self.launch.launcher
        if self._go is not None and launcher.fast():
            device = launcher._device()
            if device == self._device:
                self._go(launcher._stream(device), ptrs)
                return
        # First launch (compiles), interpreter, launch hooks or another device: Triton's path.
        args = self._tensors(roles)
        launch = self.launch
        launcher(launch.grid, args, launch.constexprs, launch.num_warps, launch.num_stages)
        if self._go is None and launcher.fast():
            self._bind(launcher._device(), args)

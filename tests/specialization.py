"""What Triton would compile a launch into, found on the CPU: the specialization key that its
binder for sm_90 derives from the launch arguments (two equal keys mean one compile)."""

from __future__ import annotations

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, KernelParam, create_function_from_signature

SM90 = make_backend(GPUTarget("cuda", 90, 32))


def compiling(kernel) -> JITFunction:
    """A compiling JITFunction of `kernel`, also when the suite runs under the interpreter (the
    same function and the same do_not_specialize list)."""
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"))


class LaunchRecorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records (args, kwargs)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def specialization_keys(kernel, launches, specialize_all: bool = False) -> list[str]:
    """The binder's key for each recorded launch of `kernel`; specialize_all ignores its
    do_not_specialize list (so a test can show that its calls do reach the specialization)."""
    kernel = compiling(kernel)
    params = kernel.params
    if specialize_all:
        params = [KernelParam(p.num, p._param, False, False) for p in params]
    binder = create_function_from_signature(kernel.signature, params, SM90)
    return [str(binder(*args, **kwargs)[1]) for args, kwargs in launches]

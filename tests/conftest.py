"""Backend selection for the spec tests.

Every test that requests the ``fa`` fixture runs once per backend: always "reference", and "triton"
when triton is importable (on a GPU, or on the CPU under TRITON_INTERPRET=1 with tiny shapes).
The backend is forced per test through FLASH_ATTN_3_BACKEND, so a refusal is an error that the
``fa`` fixture turns into a skip carrying the backend's reason.
"""

from __future__ import annotations

import fcntl
import gc
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must precede the first `import triton` anywhere in the process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if ON_GPU else "cpu"
BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else [])


def _make_the_interpreter_compute_like_the_gpu():
    """Two places where Triton 3.6's CPU interpreter departs from the GPU, corrected.

    - fp32 -> bf16 / fp8 e4m3 narrowing: a plain ``x.to(tl.bfloat16)`` truncates, and the
      round-to-nearest path ORs the mantissa carry into the exponent. GPUs round to nearest even,
      and the tests hold kernels to 2x the honest rounding, so truncation fails correct kernels.
    - ``tl.dot`` on bf16: the interpreter keeps bf16 as uint16 and multiplies the integers. The
      GPU multiplies the values exactly and accumulates in fp32, which is what we do instead.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    narrow_to = {tl.bfloat16: (torch.bfloat16, np.uint16), tl.float8e4nv: (torch.float8_e4m3fn, np.uint8)}
    original_convert = interpreter._convert_float

    def convert(values, src, dst, rounding_mode):
        if src == tl.float32 and dst in narrow_to and rounding_mode in (None, interpreter._ir.ROUNDING_MODE.RTNE):
            torch_dtype, storage = narrow_to[dst]
            x = torch.from_numpy(np.ascontiguousarray(values).view(np.float32).copy())
            if torch_dtype == torch.float8_e4m3fn:
                x = x.clamp(-448.0, 448.0)  # Hopper's cvt.rn.satfinite saturates instead of NaN
            narrowed = x.to(torch_dtype).view(torch.int16 if storage == np.uint16 else torch.uint8)
            return narrowed.numpy().view(storage)
        return original_convert(values, src, dst, rounding_mode)

    def bf16_as_fp32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = np.ascontiguousarray(handle.data).view(np.int16)
        values = torch.from_numpy(data.copy()).view(torch.bfloat16).float().numpy()
        return interpreter.TensorHandle(values, tl.float32)

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, bf16_as_fp32(a), bf16_as_fp32(b), d, input_precision, max_num_imprecise_acc)

    interpreter._convert_float = convert
    interpreter.InterpreterBuilder.create_dot = create_dot


if HAS_TRITON and not ON_GPU:
    _make_the_interpreter_compute_like_the_gpu()


def interpreted(backend: str) -> bool:
    """True where the backend's kernels run in the slow numpy interpreter: keep shapes tiny."""
    return backend == "triton" and not ON_GPU


def per_backend(cases, tiny_cases, gpu_cases=()):
    """pytest params (backend, case): ``cases`` for the reference backend and for triton on a GPU,
    ``tiny_cases`` for triton under the interpreter, ``gpu_cases`` (bigger shapes) for triton,
    marked ``gpu``."""
    params = []
    for backend in BACKENDS:
        chosen = tiny_cases if interpreted(backend) else cases
        params += [pytest.param(backend, case, id=f"{backend}-{_case_id(case)}") for case in chosen]
        if backend == "triton":
            params += [pytest.param(backend, case, id=f"{backend}-gpu-{_case_id(case)}",
                                    marks=pytest.mark.gpu) for case in gpu_cases]
    return params


def _case_id(case) -> str:
    if isinstance(case, dict):
        return "-".join(f"{k}={_short(v)}" for k, v in case.items()) or "default"
    return str(case)


def _short(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bigger shapes); skipped without one")


# Tests marked slow (the full offline compile matrix, minutes) run only when this is 1.
SLOW_TESTS = os.environ.get("FLASH_ATTN_3_SLOW_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: set FLASH_ATTN_3_SLOW_TESTS=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not SLOW_TESTS:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def fa(backend, monkeypatch):
    """The public module with FLASH_ATTN_3_BACKEND forced to this test's backend.

    Calls go through ``fa``'s attributes unchanged, except that a forced backend's refusal
    (NotImplementedError naming FLASH_ATTN_3_BACKEND) skips the test with the backend's reason.
    """
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", backend)
    import flash_attn_interface

    return _SkipOnRefusal(flash_attn_interface)


class _SkipOnRefusal:
    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        target = getattr(self._module, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            try:
                return target(*args, **kwargs)
            except NotImplementedError as exc:
                if "FLASH_ATTN_3_BACKEND" in str(exc):
                    pytest.skip(f"backend refuses: {exc}")
                raise

        return call


def refusal_skip(exc: BaseException) -> None:
    """For backward passes run outside ``fa`` (autograd.grad): skip on a backend refusal."""
    if isinstance(exc, NotImplementedError) and "FLASH_ATTN_3_BACKEND" in str(exc):
        pytest.skip(f"backend refuses: {exc}")
    raise exc


@pytest.fixture(autouse=True)
def _clients_use_the_default_backend(request, monkeypatch):
    """Client tests run as a user of the client gets it: under the default backend choice, even
    when the rest of the suite is run with FLASH_ATTN_3_BACKEND forced. (A conftest.py in
    tests/clients would shadow this module for `from conftest import ...`.)"""
    if "clients" in request.node.path.parts:
        monkeypatch.delenv("FLASH_ATTN_3_BACKEND", raising=False)


_GPU_LOCKS = Path(tempfile.gettempdir()) / f"flash_attn_3_gpu_{os.getuid()}"


@pytest.fixture(autouse=True)
def _share_the_gpu(request):
    """Under pytest-xdist on a GPU, a test marked ``bigmem`` (tens of GB) runs alone: every other
    test holds a shared lock while it runs, a bigmem test an exclusive one. The gate lock makes
    a waiting bigmem test block new shared holders, so a stream of small tests cannot starve it."""
    if not (ON_GPU and os.environ.get("PYTEST_XDIST_WORKER")):
        yield
        return
    _GPU_LOCKS.mkdir(exist_ok=True)
    exclusive = "bigmem" in request.keywords
    with open(_GPU_LOCKS / "gate", "a") as gate, open(_GPU_LOCKS / "memory", "a") as memory:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(memory, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            if exclusive:
                # A failed test's traceback (sys.last_*, kept until the worker's next test)
                # would hold its tens of GB past the unlock.
                sys.last_type = sys.last_value = sys.last_traceback = None
                if hasattr(sys, "last_exc"):
                    sys.last_exc = None
                gc.collect()
                torch.cuda.empty_cache()
            fcntl.flock(memory, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _give_gpu_memory_back():
    """Under pytest-xdist several workers share one GPU: a worker's caching allocator would keep
    what its biggest test reserved and starve the others (an OOM seen with 8 workers)."""
    yield
    if os.environ.get("PYTEST_XDIST_WORKER") and torch.cuda.is_available():
        torch.cuda.empty_cache()

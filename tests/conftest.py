"""Backend selection for the spec tests.

Every test that requests the ``fa`` fixture runs once per backend: always "reference", and "triton"
when triton is importable (on a GPU, or on the CPU under TRITON_INTERPRET=1 with tiny shapes).
The backend is forced per test through FLASH_ATTN_3_BACKEND, so a refusal is an error that the
``fa`` fixture turns into a skip carrying the backend's reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
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


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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

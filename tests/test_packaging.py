"""The wheel ships what clients import, and nothing that makes transformers think FA2 is here."""

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_backend_here() -> bool:
    """setuptools >= 77 reads the SPDX `license` string of pyproject.toml (and needs no `wheel`)."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def test_wheel_contents(tmp_path):
    # Where the build backend is installed, build with it: an offline machine (the GPU device)
    # cannot fetch an isolated build environment.
    isolation = ["--no-build-isolation"] if _build_backend_here() else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("flash_attn_3-3.*-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "flash_attn_interface.py" in names
    for module in ("interface", "ops", "dispatch", "checks", "backends/reference", "backends/triton/__init__"):
        assert f"flash_attn_3/{module}.py" in names
    assert not any(n.startswith("flash_attn/") for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Name: flash_attn_3" in text and "Version: 3." in text


def test_installed_metadata():
    assert metadata.version("flash_attn_3").startswith("3.")

"""Client tests run under the default backend choice, as a user of the client gets it: a backend
forced for the rest of the suite (FLASH_ATTN_3_BACKEND) would meet CPU tensors it cannot run."""

import pytest


@pytest.fixture(autouse=True)
def default_backend_choice(monkeypatch):
    monkeypatch.delenv("FLASH_ATTN_3_BACKEND", raising=False)

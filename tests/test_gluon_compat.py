"""The triton-version gate of the Gluon kernels (backends/triton/gluon_compat.py): which versions
supports() takes, the reason it gives for the others, FLASH_ATTN_3_GLUON, and the TMA names the
kernels use under every triton."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from flash_attn_3.backends.params import AttnArgs  # noqa: E402
from flash_attn_3.backends.triton import bwd_hopper, fwd_hopper, gluon_compat  # noqa: E402

H100 = torch.device("cuda", 0)


@pytest.fixture
def on_h100_with(monkeypatch):
    """Pretend an sm_90 device and the given triton version (None: the API does not import)."""

    def pretend(version, import_error=None):
        monkeypatch.setattr(gluon_compat, "TRITON_VERSION", version)
        monkeypatch.setattr(gluon_compat, "IMPORT_ERROR", import_error)
        monkeypatch.setattr(gluon_compat, "_device_refusal", lambda device: None)
        gluon_compat._version_refusal.cache_clear()

    yield pretend
    gluon_compat._version_refusal.cache_clear()


def test_only_versions_run_on_the_h100_are_taken_by_default(on_h100_with, monkeypatch):
    monkeypatch.delenv(gluon_compat.ENV_VAR, raising=False)
    for minor, (status, note) in gluon_compat.VERSIONS.items():
        on_h100_with(f"{minor}.0")
        reason = gluon_compat.refusal(H100)
        assert (reason is None) == (status == gluon_compat.RUN), (minor, reason)
        if status != gluon_compat.RUN:
            assert "not been run on a GPU" in reason and "FLASH_ATTN_3_GLUON=1" in reason
            assert note in reason
    on_h100_with("3.10.0+git1234abc")
    assert "not a version the Gluon kernels were checked on" in gluon_compat.refusal(H100)
    assert gluon_compat.VERSIONS["3.6"][0] == gluon_compat.RUN


def test_env_var_forces_or_turns_off(on_h100_with, monkeypatch):
    on_h100_with("3.99.0")
    monkeypatch.setenv(gluon_compat.ENV_VAR, "1")
    assert gluon_compat.refusal(H100) is None
    monkeypatch.setenv(gluon_compat.ENV_VAR, "0")
    assert "FLASH_ATTN_3_GLUON=0" in gluon_compat.refusal(H100)
    on_h100_with("3.6.0")
    assert "FLASH_ATTN_3_GLUON=0" in gluon_compat.refusal(H100)
    # no API to force: 1 cannot help
    on_h100_with("3.6.0", import_error="ImportError: no tma")
    monkeypatch.setenv(gluon_compat.ENV_VAR, "1")
    assert "does not import" in gluon_compat.refusal(H100)


def test_other_devices_are_refused_with_their_name():
    assert "cpu" in gluon_compat.refusal(torch.device("cpu"))


def test_supports_asks_the_gate(monkeypatch):
    """fwd_hopper and bwd_hopper take a call in their scope exactly when the gate lets them."""
    q = torch.empty(1, 128, 2, 64, dtype=torch.bfloat16)
    a = AttnArgs.plain(q, q, q)
    monkeypatch.setattr(gluon_compat, "refusal", lambda device: None)
    assert fwd_hopper.supports(a) and bwd_hopper.supports(a)
    monkeypatch.setattr(gluon_compat, "refusal", lambda device: "no")
    assert not fwd_hopper.supports(a) and not bwd_hopper.supports(a)


def test_tma_keeps_the_kernels_names():
    """The kernels call tma.async_copy_global_to_shared / async_copy_shared_to_global (3.6's
    names); triton 3.9 only has async_load / async_store, which they then point to."""
    tma = gluon_compat.tma
    assert tma.store_wait is gluon_compat._tma.store_wait
    for old, new in (("async_copy_global_to_shared", "async_load"),
                     ("async_copy_shared_to_global", "async_store")):
        assert callable(getattr(tma, old))
        if hasattr(gluon_compat._tma, new):
            assert getattr(tma, old) is getattr(gluon_compat._tma, new)


def test_minor_version():
    assert gluon_compat.minor_version("3.8.0") == "3.8"
    assert gluon_compat.minor_version("3.10.1+git1234") == "3.10"


def test_routes_say_why(monkeypatch):
    """What `python -m flash_attn_3 info` prints per typical call: the kernel and the reason."""
    from flash_attn_3.backends.triton import routes

    monkeypatch.delenv("FLASH_ATTN_3_GLUON", raising=False)  # the device check runs with it set
    q = torch.empty(1, 512, 4, 128, dtype=torch.bfloat16)
    prefill = AttnArgs.plain(q, q, q, window_right=0)
    module, why = routes.forward_route(prefill)
    assert module == "fwd" and "Gluon refused" in why and "cpu" in why
    assert routes.backward_route(prefill)[0] == "bwd"
    step = AttnArgs.plain(torch.empty(1, 1, 4, 128, dtype=torch.bfloat16), q, q)
    assert routes.forward_route(step)[0] == "decode"
    monkeypatch.setattr(gluon_compat, "refusal", lambda device: None)
    assert routes.forward_route(prefill)[0] == "fwd_hopper"
    assert routes.backward_route(prefill)[0] == "bwd_hopper"


def test_info_prints_the_triton_routes(capsys, monkeypatch):
    from flash_attn_3 import cli

    monkeypatch.delenv(bwd_hopper.VARLEN_ENV, raising=False)
    monkeypatch.delenv(fwd_hopper.DV_ENV, raising=False)
    monkeypatch.setenv(fwd_hopper.QK_SLICES_ENV, "0")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Triton kernels:" in out and "Gluon (sm_90) under this triton" in out
    assert f"{bwd_hopper.VARLEN_ENV}=off" in out and f"{fwd_hopper.DV_ENV}=on" in out
    assert f"{fwd_hopper.QK_SLICES_ENV}=off" in out


def test_by_lane_mask_follows_the_compiled_versions():
    """The forward's by-lane causal mask is on where its compiles were checked (3.7, >= 3.9) and
    off where the other form's SASS is the measured one (3.6) or was run on the GPU (3.8); the
    backward's is on under 3.6 too (timed faster there), and off under 3.8."""
    expect = {"3.6.0": False, "3.7.1": True, "3.8.0": False, "3.9.0": True, "3.10.1+git1": True}
    assert {v: gluon_compat._by_lane_default(v) for v in expect} == expect
    expect_bwd = {**expect, "3.6.0": True}
    assert {v: gluon_compat._by_lane_default(v, backward=True) for v in expect} == expect_bwd


@pytest.mark.parametrize("dims,forward,backward", [
    ((192, 128), True, True), ((256, 128), True, True), ((192, 64), True, True),
    ((128, 64), True, False), ((96, 64), True, False), ((128, 192), False, False)],
    ids=lambda x: "/".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_narrow_v_scope(monkeypatch, dims, forward, backward):
    """A V narrower than Q and K (DeepSeek's 192 / 128): held off both Gluon kernels by
    FLASH_ATTN_3_GLUON_DV=0 (the routes name the switch), otherwise taken where the kernel has the
    variant: the forward for any V whose tiles are no wider than Q's, the backward under Q / K
    tiles of 256 only (its split kernel). The kernels' layout check compares k and v but for
    their head dims (it once compared them whole, which kept every narrow V off the forward)."""
    from flash_attn_3.backends.triton import routes

    d, dv = dims
    q, k = (torch.empty(1, 512, h, d, dtype=torch.bfloat16) for h in (4, 2))
    v = torch.empty(1, 512, 2, dv, dtype=torch.bfloat16)
    a = AttnArgs.plain(q, k, v, window_right=0)
    monkeypatch.setattr(gluon_compat, "refusal", lambda device: None)
    monkeypatch.setenv(fwd_hopper.DV_ENV, "0")
    assert routes.forward_kernel(a) is not fwd_hopper
    assert not bwd_hopper.supports(a)
    assert fwd_hopper.DV_ENV in routes.forward_route(a)[1]
    assert bwd_hopper.DV_ENV in routes.backward_route(a)[1]
    monkeypatch.delenv(fwd_hopper.DV_ENV)
    assert (routes.forward_kernel(a) is fwd_hopper) == forward, routes.forward_route(a)
    assert bwd_hopper.supports(a) == backward, routes.backward_route(a)
    if not backward:
        assert "v's head dim" in routes.backward_route(a)[1]
    # k and v must agree but for their head dims
    short_v = AttnArgs.plain(q, k, v[:, :400], window_right=0)
    assert routes.forward_kernel(short_v) is not fwd_hopper and not bwd_hopper.supports(short_v)

"""The cached direct launch (backends/triton/launch.py) against Triton's own specialization.

A cached launch is only correct if its key tells apart every two calls that Triton would compile
differently. Triton's binder for sm_90 builds on the CPU, so the key is checked against it here:
per argument over values chosen at the edges of Triton's classes, and over the argument lists the
decode kernel really gets. The launcher's cache is driven with a stand-in for the compiled kernel
(no GPU): the second call of a signature must skip Triton and pass the C launcher what Triton's
path would; a changed alignment must not. The `gpu` test compares cached launches with Triton's.
"""

import importlib
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.runtime.jit import create_function_from_signature, native_specialize_impl  # noqa: E402

from specialization import SM90 as BACKEND, compiling as _jit  # noqa: E402

launch = importlib.import_module("flash_attn_3.backends.triton.launch")
decode_mod = importlib.import_module("flash_attn_3.backends.triton.decode")


def _misaligned(dtype, numel=64):
    """A tensor whose data_ptr is 2 (or 1) bytes past a 16-byte boundary."""
    base = torch.empty(numel + 16, dtype=dtype)
    offset = next(i for i in range(1, 16) if (base.data_ptr() + i * base.element_size()) % 16)
    return base[offset:offset + numel]


def _values():
    values = [0, 1, -1, 2, 15, 16, 17, 32, 48, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 16,
              2**63 - 16, 2**63, 2**64 - 16, True, False, 0.0, 1.0, 0.5, float("inf"), None]
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int32):
        values += [torch.empty(64, dtype=dtype), torch.empty(64, dtype=dtype), _misaligned(dtype)]
    return values


@pytest.mark.parametrize("specialize,align", [(True, True), (False, True), (True, False)])
def test_key_determines_triton_specialization_per_argument(specialize, align):
    """Equal keys => equal Triton specialization, for every pair of edge values."""
    values = _values()
    keys = [launch.key_and_values([x])[0] for x in values]
    specs = [tuple(native_specialize_impl(BACKEND, x, False, specialize, align)) for x in values]
    assert all(key is not None for key in keys)
    for i, j in itertools.combinations(range(len(values)), 2):
        if keys[i] == keys[j]:
            assert specs[i] == specs[j], (values[i], values[j])
    # The key is not trivially fine: same-dtype aligned tensors share one.
    assert keys[-3] == keys[-2] and keys[-2] != keys[-1]


def test_unknown_argument_types_take_triton_path():
    assert launch.key_and_values([torch.empty(2), object()]) is None


def _decode_call(q_offset=0):
    """The runtime args and constexprs decode.forward hands its launcher for a small paged call."""
    from flash_attn_3.backends.params import AttnArgs

    qbuf = torch.randn(2 * 1 * 4 * 64 + 8, dtype=torch.bfloat16)
    q = qbuf[q_offset:q_offset + 2 * 4 * 64].view(2, 1, 4, 64)
    k = torch.randn(6, 16, 2, 64, dtype=torch.bfloat16)
    a = AttnArgs(q=q, k=k, v=torch.randn_like(k), qv=None, cu_seqlens_q=None, cu_seqlens_k=None,
                 seqused_q=None, seqused_k=torch.tensor([20, 33], dtype=torch.int32), max_seqlen_q=1,
                 max_seqlen_k=48, page_table=torch.randperm(6, dtype=torch.int32).view(2, 3), kv_batch_idx=None,
                 leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, sinks=None, softmax_scale=0.125,
                 window_left=-1, window_right=0, attention_chunk=0, softcap=0.0, num_splits=2, pack_gqa=None,
                 cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None, scheduler_metadata=None)
    calls = []
    original = decode_mod._launch
    decode_mod._launch = lambda grid, args, constexprs, num_warps, num_stages: calls.append((args, constexprs))
    try:
        decode_mod.forward(a)
    finally:
        decode_mod._launch = original
    return calls[0]


def test_decode_arguments_key_against_triton_binder():
    """Two decode calls with fresh tensors share a key and Triton's specialization; a misaligned q
    changes both."""
    fn = _jit(decode_mod._decode_kernel)
    binder = create_function_from_signature(fn.signature, fn.params, BACKEND)
    names = [p.name for p in fn.params if p.is_constexpr]

    def spec(args, constexprs):
        return binder(*args, **dict(zip(names, constexprs)))[1]

    first, second, shifted = _decode_call(), _decode_call(), _decode_call(q_offset=1)
    assert len(first[0]) + len(first[1]) == len(fn.params)
    key = lambda args: launch.key_and_values(args)[0]  # noqa: E731
    assert key(first[0]) == key(second[0])
    assert spec(*first) == spec(*second)
    assert key(first[0]) != key(shifted[0])
    assert spec(*first) != spec(*shifted)


class _FakeCompiled:
    """Stands in for a CompiledKernel: records what the C launcher would receive."""

    def __init__(self):
        self.function, self.packed_metadata, self.launches = 1234, (4, 1, 0), []

    def run(self, *args):
        self.launches.append(args)


def test_launcher_caches_by_key(monkeypatch):
    fn = _jit(decode_mod._decode_kernel)
    slow_calls = []

    def fake_run(*args, grid, warmup, **kwargs):
        slow_calls.append((args, kwargs))
        return compiled

    compiled = _FakeCompiled()
    monkeypatch.setattr(fn, "run", fake_run)
    launcher = launch.Launcher(fn)
    launcher._device, launcher._stream = (lambda: 0), (lambda device: 77)

    args, constexprs = _decode_call()
    launcher((4, 2), args, constexprs, 4, 3)
    assert len(slow_calls) == 1 and compiled.launches == []
    assert slow_calls[0][1]["num_warps"] == 4 and slow_calls[0][1]["num_stages"] == 3

    args2, constexprs2 = _decode_call()
    launcher((4, 2), args2, constexprs2, 4, 3)
    assert len(slow_calls) == 1 and len(compiled.launches) == 1
    grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit_, *values = compiled.launches[0]
    assert (grid_x, grid_y, grid_z, stream, function, metadata) == (4, 2, 1, 77, 1234, (4, 1, 0))
    assert (launch_metadata, enter, exit_) == (None, None, None)
    expected = [x.data_ptr() if isinstance(x, torch.Tensor) else x for x in args2]
    assert values == expected + [None] * len(constexprs2)

    # Anything Triton specializes on differently misses the cache.
    launcher((4, 2), *_decode_call(q_offset=1), 4, 3)
    launcher((4, 2), args2, constexprs2, 4, 2)
    launcher((4, 2), args2, constexprs2[:-1] + (not constexprs2[-1],), 4, 3)
    assert len(slow_calls) == 4 and len(compiled.launches) == 1

    # A launch hook (profilers) gets Triton's path, which calls it; an empty chain is no hook.
    chain = launch.knobs.HookChain()
    monkeypatch.setattr(launch.knobs.runtime, "launch_exit_hook", chain)
    launcher((4, 2), args2, constexprs2, 4, 3)
    assert len(slow_calls) == 4 and len(compiled.launches) == 2
    chain.add(lambda metadata: None)
    launcher((4, 2), args2, constexprs2, 4, 3)
    assert len(slow_calls) == 5 and len(compiled.launches) == 2
    monkeypatch.setattr(launch.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    monkeypatch.setattr(launch.knobs.runtime, "launch_exit_hook", launch.knobs.HookChain())
    launcher((4, 2), args2, constexprs2, 4, 3)
    assert len(slow_calls) == 6 and len(compiled.launches) == 2


def test_launcher_refuses_wrong_argument_counts():
    launcher = launch.Launcher(_jit(decode_mod._decode_kernel))
    args, constexprs = _decode_call()
    with pytest.raises(TypeError, match="runtime"):
        launcher._slow((1,), args[:-1], constexprs, 4, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cached_launch_matches_triton_launch_on_gpu():
    """Aligned, then misaligned, then aligned q through the cached launcher: each equals Triton's
    own launch bit for bit (a wrong cached specialization would misread the misaligned q)."""
    from flash_attn_3.backends.params import AttnArgs

    torch.manual_seed(0)
    qbuf = torch.randn(1 * 32 * 128 + 8, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.tensor([700], dtype=torch.int32, device="cuda")

    def args(q, splits):
        return AttnArgs(q=q, k=k, v=v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
                        seqused_k=lens, max_seqlen_q=1, max_seqlen_k=1024, page_table=None, kv_batch_idx=None,
                        leftpad_k=None, q_descale=None, k_descale=None, v_descale=None, sinks=None,
                        softmax_scale=128 ** -0.5, window_left=-1, window_right=0, attention_chunk=0,
                        softcap=0.0, num_splits=splits, pack_gqa=None, cp_world_size=1, cp_rank=0,
                        cp_tot_seqused_k=None, scheduler_metadata=None)

    for offset in (0, 1, 0, 1):
        q = qbuf[offset:offset + 32 * 128].view(1, 1, 32, 128)
        for splits in (1, 4):
            fast = decode_mod.forward(args(q, splits))
            launcher = decode_mod._launch
            decode_mod._launch = launch.Launcher(decode_mod._decode_kernel)
            decode_mod._launch.jit = False  # Triton's path for every call
            try:
                slow = decode_mod.forward(args(q, splits))
            finally:
                decode_mod._launch = launcher
            torch.cuda.synchronize()
            assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]), (offset, splits)
    assert len(decode_mod._launch.kernels) >= 4  # (aligned, misaligned) x (split, unsplit)


def test_bound_launch_passes_what_the_launcher_would(monkeypatch):
    """A Bound replay of the decode launch with new tensors hands the C launcher the values
    Launcher's own cached path would for those tensors: pointers at the planned offsets, the
    constants in place. Split launch, so partial buffers are views into one workspace."""
    fn = _jit(decode_mod._decode_kernel)
    compiled = _FakeCompiled()
    monkeypatch.setattr(fn, "run", lambda *args, grid, warmup, **kwargs: compiled)
    launcher = launch.Launcher(fn)
    launcher._device, launcher._stream = (lambda: 0), (lambda device: 77)

    def build():
        args, constexprs = _decode_call()
        # One workspace role owns the split partials (arguments 3 and 4 are views of it).
        workspace = torch.empty(4096, dtype=torch.float32)
        args = list(args)
        args[3] = workspace[:1024].view(2, 2, 4, 64)
        args[4] = workspace[1024:1040].view(2, 2, 4)
        roles = list(dict.fromkeys(x for i, x in enumerate(args) if isinstance(x, torch.Tensor) and i not in (3, 4)))
        return launch.Launch(launcher, (4, 2), tuple(args), constexprs, 4, 3), roles + [workspace]

    planned, roles = build()
    bound = launch.Bound(planned, roles)
    assert all(x is None for x in (bound.launch.args[i] for i, _, _, _ in bound.slots))  # no tensor kept
    fresh, fresh_roles = build()
    ptrs = [t.data_ptr() for t in fresh_roles]
    bound.go(fresh_roles, ptrs)  # first replay: Triton's path compiles, then the bound call exists
    assert compiled.launches == [] and bound._go is not None
    bound.go(fresh_roles, ptrs)
    launcher(*fresh[1:])  # Launcher's cached path with the same tensors
    assert len(compiled.launches) == 2
    assert compiled.launches[0] == compiled.launches[1]
    assert compiled.launches[0][9 + 3] == fresh.args[3].data_ptr()
    assert compiled.launches[0][9 + 4] == fresh.args[4].data_ptr() != ptrs[-1]


def test_bound_launch_refuses_ambiguous_views():
    args, constexprs = _decode_call()
    k = args[1]
    roles = [x for x in dict.fromkeys(a for a in args if isinstance(a, torch.Tensor))]
    twin = k.view(k.shape)  # a second role on k's storage: a view of it could belong to either
    view = launch.Launch(None, (1,), (k[1:],) + tuple(args[1:]), constexprs, 4, 3)
    with pytest.raises(launch.Unbindable):
        launch.Bound(view, roles + [twin])
    same = launch.Launch(None, (1,), args, constexprs, 4, 3)
    with pytest.raises(launch.Unbindable):  # one tensor in two roles: which one moves later?
        launch.Bound(same, roles + [k])


def test_autotuned_keys_name_only_the_kernels_arguments():
    """bwd.py tunes its dK/dV and dQ kernels with one key list; ATOMIC_DQ is an argument of the
    first only. triton 3.9's Autotuner refuses a key name the kernel lacks (every tuned dQ launch
    failed on the H100 under 3.9), so Autotuned keeps, in order, the names each kernel has."""
    bwd = importlib.import_module("flash_attn_3.backends.triton.bwd")
    for fn in (bwd._bwd_dkdv_kernel, bwd._bwd_dq_kernel):
        tuned = launch.Autotuned(fn, [bwd.triton.Config({})], bwd._TUNE_KEY)
        want = [name for name in bwd._TUNE_KEY if name in fn.arg_names]
        assert list(tuned.tuner.keys) == want
    assert "ATOMIC_DQ" in bwd._bwd_dkdv_kernel.arg_names
    assert "ATOMIC_DQ" not in bwd._bwd_dq_kernel.arg_names

"""Concurrency (issue 17, part 4): calls on several CUDA streams at once, from several Python
threads, on a second GPU and inside a CUDA graph captured on a side stream give the bits of the
same calls made one after another on one stream; nothing in the launch path (autotuners, kvcache
plans, launch caches, ticket rings) lets one caller corrupt another's call.

The one CPU test reproduces Triton's autotuner race (triton-lang/triton#11494): Triton 3.6's
Autotuner keeps a call's arguments on itself while it benchmarks, so a second thread that
launches the same kernel meanwhile crashes the first (or zeroes the other call's reset_to_zero
buffer). launch.Autotuned, which the forward and backward use, serializes its launches.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from inputs import FP8, cu_seqlens

import flash_attn_interface as fa

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_autotuned_kernel_launched_from_two_threads_while_tuning():
    """Thread A tunes (its benchmark waits for thread B); B launches the same kernel for another
    key meanwhile. Plain triton.autotune: A fails with "'NoneType' object is not a mapping" once
    B's run clears the shared arguments. Autotuned: B waits for A's launch, both are right."""
    import triton
    import triton.language as tl

    from flash_attn_3.backends.triton.launch import Autotuned

    @triton.jit
    def add_one(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)

    a_benchmarking, b_done = threading.Event(), threading.Event()

    def bench(kernel_call, quantiles=None):
        kernel_call()
        if threading.current_thread().name == "A":
            a_benchmarking.set()
            b_done.wait(0.5)  # B cannot finish while A holds the launch: wait briefly, go on
        return [1.0, 1.0, 1.0]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = Autotuned(add_one, [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], ["n"],
                       do_bench=bench)
    errors = []

    def call(n):
        try:
            x = torch.randn(n, device=device)
            y = torch.full((n,), math.nan, device=device)
            kernel[(1,)](x, y, n)
            assert torch.equal(y, x + 1), f"n={n}: wrong result"
        except Exception as exc:  # noqa: BLE001 - reported below with its thread
            errors.append(f"n={n}: {exc!r}")

    def call_b():
        call(12)
        b_done.set()

    a = threading.Thread(target=call, args=(10,), name="A")
    a.start()
    assert a_benchmarking.wait(30), "thread A never reached the autotuner's benchmark"
    b = threading.Thread(target=call_b, name="B")
    b.start()
    a.join(30)
    b.join(30)
    assert not errors, errors


def test_launcher_setup_publishes_its_guard_last(monkeypatch):
    """Launcher.__call__ takes `_device is None` to mean "not set up": a second thread that sees
    `_device` set calls `_stream` at once. So `_setup` must set `_device` after `_stream` (reading
    `driver.active` between the two stores lets another thread run)."""
    import importlib
    import sys

    from flash_attn_3.backends.triton.launch import Launcher

    importlib.import_module("triton.runtime.driver")
    driver_module = sys.modules["triton.runtime.driver"]  # triton.runtime.driver is also an object's name

    seen = {}

    class Active:
        @property
        def get_current_device(self):
            return lambda: 0

        @property
        def get_current_stream(self):
            seen["device set before stream"] = launcher._device is not None
            return lambda device: 0

    class Driver:
        active = Active()

    launcher = Launcher.__new__(Launcher)
    launcher._device = launcher._stream = None
    monkeypatch.setattr(driver_module, "driver", Driver())
    launcher._setup()
    assert seen == {"device set before stream": False}
    assert launcher._device is not None and launcher._stream is not None


# ---------------------------------------------------------------------------------------------
# GPU: the same problems serial, on several streams, from threads, in a graph, on cuda:1


def _problems(device, seed=0):
    """(calls, inputs): name -> a call returning a tuple of tensors, and name -> the tensors it
    reads. Inputs are drawn on the CPU from `seed`, so the same problems can be rebuilt on another
    GPU, or their values replaced in place (graph replay); a call that appends into a cache
    appends into its own copy. Lengths are ragged (1, 127, 129, ...), heads GQA, splits left to
    the heuristic."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    calls, inputs = {}, {}
    q, k, v = inputs["prefill"] = [randn(2, 1000, 8, 128), randn(2, 1100, 2, 128), randn(2, 1100, 2, 128)]
    calls["prefill"] = lambda: fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)

    lens_q, lens_k = [1, 127, 129, 700], [129, 1, 127, 900]
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    vq, vk, vv = inputs["varlen"] = [randn(sum(lens_q), 8, 64), randn(sum(lens_k), 1, 64),
                                     randn(sum(lens_k), 1, 64)]
    calls["varlen"] = lambda: fa.flash_attn_varlen_func(vq, vk, vv, cu_q, cu_k, max(lens_q), max(lens_k),
                                                        window_size=(200, 0), return_attn_probs=True)

    bq, bk, bv, bg = inputs["backward"] = [randn(1, 600, 4, 64) for _ in range(4)]

    def backward():
        leaves = [t.clone().requires_grad_() for t in (bq, bk, bv)]
        out = fa.flash_attn_func(*leaves, causal=True, deterministic=True)
        return (out, *torch.autograd.grad(out, leaves, bg))

    calls["backward"] = backward

    pages_per_row, page_size = 313, 16
    num_pages = 3 * pages_per_row + 3
    table = torch.randperm(num_pages, generator=gen)[: 3 * pages_per_row].view(3, -1).to(torch.int32).to(device)
    lens = torch.tensor([4095, 1, 2000], dtype=torch.int32, device=device)
    angle = torch.rand(pages_per_row * page_size, 64, generator=gen) * 2 * math.pi
    k_paged, v_paged, dq, dk, dv, cos, sin = inputs["decode"] = [
        randn(num_pages, page_size, 2, 128), randn(num_pages, page_size, 2, 128),
        randn(3, 1, 16, 128), randn(3, 1, 2, 128), randn(3, 1, 2, 128),
        torch.cos(angle).to(torch.bfloat16).to(device), torch.sin(angle).to(torch.bfloat16).to(device)]
    inputs["decode"].append(table)  # drawn from the seed too: a replaced problem needs it

    def decode():
        """Two steps: the second replays the first's plan (interface._KVCACHE_PLANS)."""
        kc, vc = k_paged.clone(), v_paged.clone()
        results = []
        for step in range(2):
            out, lse, *_ = fa.flash_attn_with_kvcache(dq, kc, vc, dk, dv, rotary_cos=cos, rotary_sin=sin,
                                                      cache_seqlens=lens + step, page_table=table, causal=True,
                                                      return_softmax_lse=True)
            results += [out, lse]
        return (*results, kc, vc)

    calls["decode"] = decode

    fq, fk, fv = inputs["fp8"] = [randn(2, 300, h, 128, dtype=FP8) for h in (4, 2, 2)]
    calls["fp8"] = lambda: (fa.flash_attn_func(fq, fk, fv, causal=True),)

    partial, partial_lse = inputs["combine"] = [randn(37, 2, 64, 4, 128, dtype=torch.float32),
                                                randn(37, 2, 64, 4, dtype=torch.float32)]
    partial_lse[20:, 0] = -math.inf
    calls["combine"] = lambda: fa.flash_attn_combine(partial, partial_lse, out_dtype=torch.bfloat16)
    return calls, inputs


def _run(fn):
    result = fn()
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _assert_same_bits(name, got, want):
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}[{i}]: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), (
            f"{name}[{i}]: differs from the serial call "
            f"(max diff {(g.float() - w.float()).abs().max().item():.3g})")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "triton")


def _serial(problems):
    results = {name: _run(fn) for name, fn in problems.items()}
    torch.cuda.synchronize()
    return results


@pytest.mark.gpu
@needs_cuda
def test_streams_at_once_give_the_serial_bits(triton_backend):
    problems, _ = _problems("cuda")
    serial = _serial(problems)
    main = torch.cuda.current_stream()
    for round_ in range(3):
        streams = {name: torch.cuda.Stream() for name in problems}
        order = list(problems)[round_:] + list(problems)[:round_]
        results = {}
        for name in order:  # each call goes out before any finishes: the streams overlap
            streams[name].wait_stream(main)
            with torch.cuda.stream(streams[name]):
                results[name] = _run(problems[name])
        torch.cuda.synchronize()
        for name in problems:
            _assert_same_bits(f"round {round_}, {name}", results[name], serial[name])


@pytest.mark.gpu
@needs_cuda
def test_threads_give_the_serial_bits(triton_backend):
    """Four threads, each on its own stream, each calling every problem five times in its own
    order (the decode problem's plan is made by one thread and replayed by all)."""
    problems, _ = _problems("cuda")
    serial = _serial(problems)
    errors, results = [], {}
    start = threading.Barrier(4, timeout=120)

    def worker(t):
        try:
            stream = torch.cuda.Stream()
            names = list(problems)
            names = names[t:] + names[:t]
            start.wait()
            with torch.cuda.stream(stream):
                mine = [(name, _run(problems[name])) for _ in range(5) for name in names]
            stream.synchronize()
            results[t] = mine
        except Exception as exc:  # noqa: BLE001 - reported below with its thread
            errors.append(f"thread {t}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    for t, mine in results.items():
        for name, got in mine:
            _assert_same_bits(f"thread {t}, {name}", got, serial[name])


@pytest.mark.gpu
@needs_cuda
def test_cold_autotuning_from_threads(triton_backend, monkeypatch):
    """Fresh autotuners (as in a new process), four threads tuning the prefill forward for four
    length buckets at once (d = 64, causal, at most 1024 keys: fwd.py's autotuned kernel, not the
    Gluon one): no exception, every output right, and afterwards the serial calls give the
    threads' bits (one tuned config per key)."""
    import reference_math as rm
    from flash_attn_3.backends.triton import fwd

    monkeypatch.setattr(fwd, "_tuned_kernels", {})
    gen = torch.Generator().manual_seed(1)
    inputs = [tuple(torch.randn(1, n, 4, 64, generator=gen).to(torch.bfloat16).cuda() for _ in range(3))
              for n in (100, 200, 400, 1000)]
    errors, outs = [], {}
    start = threading.Barrier(len(inputs), timeout=120)

    def worker(i):
        try:
            start.wait()
            with torch.cuda.stream(torch.cuda.Stream()):
                outs[i] = fa.flash_attn_func(*inputs[i], causal=True)
                torch.cuda.current_stream().synchronize()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    assert not errors, errors
    for i, (q, k, v) in enumerate(inputs):
        want = rm.attention_dense(q.double(), k.double(), v.double(), causal=True)[0]
        assert (outs[i].double() - want).abs().max().item() < 2e-2, f"thread {i}: wrong output"
        _assert_same_bits(f"thread {i} against a later serial call", (outs[i],),
                          (fa.flash_attn_func(q, k, v, causal=True),))


def test_inputs_hold_everything_a_problem_reads(monkeypatch):
    """The graph test replaces a problem's values by copying another seed's `inputs` into it:
    that is only the other problem if `inputs` holds every seed-drawn tensor the call reads. The
    decode problem's page table was left out, so its graph replayed seed 2's table over seed
    3's pages and differed from the eager seed-3 call (H100, 08:27 UTC: max diff 3.75), which
    read as a kernel defect. On the CPU with the reference backend: after the copy, each
    problem gives the other seed's bits."""
    monkeypatch.setenv("FLASH_ATTN_3_BACKEND", "reference")
    problems, inputs = _problems("cpu", seed=2)
    fresh, fresh_inputs = _problems("cpu", seed=3)
    for name in problems:
        for now, new in zip(inputs[name], fresh_inputs[name], strict=True):
            now.copy_(new)
        _assert_same_bits(f"{name} after the copy", _run(problems[name]), _run(fresh[name]))


@pytest.mark.gpu
@needs_cuda
def test_graph_captured_on_a_side_stream(triton_backend):
    """Every problem captured into one CUDA graph on an explicit side stream, replayed on the
    main stream for new input values: the eager calls' bits for those values."""
    problems, inputs = _problems("cuda", seed=2)
    fresh, fresh_inputs = _problems("cuda", seed=3)
    _serial(problems)  # compiles and tunes outside the capture, as torch.cuda.graphs requires
    names = [n for n in problems if n != "backward"]  # autograd's graph allocations stay eager
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = {name: _run(problems[name]) for name in names}
    for name in names:
        for now, new in zip(inputs[name], fresh_inputs[name]):
            now.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = _serial({name: fresh[name] for name in names})
    for name in names:
        _assert_same_bits(f"graph, {name}", captured[name], eager[name])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_from_two_threads_at_once(triton_backend):
    """The problems on cuda:0 and cuda:1 at the same time, one thread each (the current device
    stays 0 in both): each GPU gives the bits the other gives (same model of GPU)."""
    torch.cuda.set_device(0)
    per_device = {d: _problems(torch.device("cuda", d), seed=4)[0] for d in (0, 1)}
    results, errors = {}, []
    start = threading.Barrier(2, timeout=120)

    def worker(d):
        try:
            start.wait()
            results[d] = {name: _run(fn) for _ in range(2) for name, fn in per_device[d].items()}
            torch.cuda.synchronize(d)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"cuda:{d}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(d,)) for d in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    if torch.cuda.get_device_name(0) != torch.cuda.get_device_name(1):
        pytest.skip("different GPU models may round differently")
    for name in per_device[0]:
        _assert_same_bits(f"cuda:1 against cuda:0, {name}", [t.cpu() for t in results[1][name]],
                          [t.cpu() for t in results[0][name]])
    assert torch.cuda.current_device() == 0

"""Kernels always called on the calling thread alone (runtime._serial: too short for the thread
pool, or one thread) are lowered as the body of their function, which calls it with (tid,
nthreads) = (0, 1) and inlines it: LLVM then knows their share of the work is all of it, as it
could not of a function called from another module. The code must compute what it did before,
and kernels run on the pool must keep their (tid, nthreads)."""
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest

import tracejit
from tracejit import nn
from tracejit.codegen import parallel, runtime

pytestmark = pytest.mark.needs_llvm

RNG = np.random.default_rng(5)
PARAMS = {"conv": (RNG.standard_normal((4, 2, 3, 3)) / 3).astype(np.float32),
          "w": (RNG.standard_normal((10, 4 * 4 * 4)) / 8).astype(np.float32),
          "b": (RNG.standard_normal(10) / 4).astype(np.float32)}
IMG = RNG.standard_normal((3, 2, 8, 8)).astype(np.float32)


def _loss(p, img):
    h = nn.relu(nn.conv2d(img, p["conv"], padding=1))
    h = nn.max_pool2d(h, 2).reshape(img.shape[0], -1)
    return tracejit.tanh(nn.linear(h, p["w"], p["b"])).sum()


def _run(backend, monkeypatch, min_ns):
    """(native function or None, gradient) with the thread pool's threshold at `min_ns`."""
    monkeypatch.setattr(parallel, "PARALLEL_MIN_NS", min_ns)
    old = tracejit.config.backend, tracejit.config.cache
    tracejit.config.backend, tracejit.config.cache = backend, False
    try:
        f = tracejit.jit_grad(_loss)
        out = f(PARAMS, IMG)
        native = next(iter(f._cache.values())).native() if backend == "llvm" else None
        return native, out
    finally:
        tracejit.config.backend, tracejit.config.cache = old


def _defined(text):
    return set(re.findall(r'^define (?:internal )?(?:fastcc )?void @"?([^"(]+)"?\(', text, re.M))


def _check_gradient(out, monkeypatch):
    _, want = _run("interp", monkeypatch, parallel.PARALLEL_MIN_NS)
    for k in want:
        np.testing.assert_allclose(out[k], want[k], rtol=1e-4, atol=1e-5)


def test_serial_kernels_are_their_body_inlined_and_compute_the_same(monkeypatch):
    native, out = _run("llvm", monkeypatch, math.inf)   # nothing goes to the pool
    kernels = [g for g in native.plan.groups if g.kind != "control"]
    assert kernels and all(runtime._serial(g, native.max_threads) for g in kernels)
    lowered = "\n".join(native.llvm_sources)
    for g in kernels:
        assert f'define internal void @"{g.name}.serial"' in lowered, g.name
        assert re.search(rf'call void @"{re.escape(g.name)}.serial"\(.*i64 0, i64 1\)',
                         lowered), g.name
    # after LLVM's optimizer only the bodies it must not optimize (optnone) are left
    left = {n for n in _defined(native.llvm_ir) if n.endswith(".serial")}
    optnone = {m.group(1) for m in re.finditer(r'define internal void @"([^"]+\.serial)"\(.*optnone',
                                                lowered)}
    assert left == optnone, (left, optnone)
    assert len(left) < len(kernels)   # the fused loops and the epilogues' kernels were inlined
    _check_gradient(out, monkeypatch)


def test_kernels_on_the_pool_keep_their_thread_arguments(monkeypatch):
    native, out = _run("llvm", monkeypatch, 0)   # every kernel that splits its work goes to the pool
    kernels = [g for g in native.plan.groups if g.kind != "control"]
    lowered = "\n".join(native.llvm_sources)
    serial = [g for g in kernels if runtime._serial(g, native.max_threads)]
    if native.max_threads > 1 and parallel.threads_available():
        assert len(serial) < len(kernels)
    else:   # one thread, or no pool: every kernel runs on the calling thread
        assert len(serial) == len(kernels)
    for g in kernels:
        assert (f'@"{g.name}.serial"' in lowered) == (g in serial), g.name
        if g not in serial:
            assert f'@"{g.name}.chunk"' in lowered, g.name
    _check_gradient(out, monkeypatch)


def test_the_kernel_key_tells_serial_from_parallel_kernels(monkeypatch):
    """Kernels equal but for how they are called are not merged: a serial body ignores the
    (tid, nthreads) a parallel call passes."""
    native, _ = _run("llvm", monkeypatch, math.inf)
    g = next(g for g in native.plan.groups if g.kind == "loop")
    twin = SimpleNamespace(**{k: getattr(g, k) for k in (
        "kind", "pointer_values", "members", "root", "leaves", "extra_outputs", "in_place",
        "extra_in_place", "scratch_bytes")})
    monkeypatch.setattr(runtime, "_serial", lambda h, max_threads: h is g)
    assert runtime._kernel_key(g, 2) != runtime._kernel_key(twin, 2)
    monkeypatch.setattr(runtime, "_serial", lambda h, max_threads: True)
    assert runtime._kernel_key(g, 2) == runtime._kernel_key(twin, 2)

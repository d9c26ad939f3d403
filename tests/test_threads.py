"""Compiled functions called from many threads at once: correct results (each thread has its own
arena, each call its own output arrays), and the first call of a signature made by several threads
at the same moment traces and compiles it once."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tracejit import codegen
import tracejit
from tracejit import nn
from helpers import use_backend

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

N_THREADS = 8


@pytest.fixture(autouse=True)
def native_backend():
    with use_backend("llvm"):
        yield


def mlp_loss(p, x, t):
    h = tracejit.tanh(nn.linear(x, p["w1"], p["b1"]))
    return nn.mse_loss(nn.linear(h, p["w2"], p["b2"]), t)


def mlp_params(rng):
    return {"w1": rng.normal(size=(64, 96)) * 0.1, "b1": rng.normal(size=64),
            "w2": rng.normal(size=(10, 64)) * 0.1, "b2": rng.normal(size=10)}


def mlp_batch(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(48, 96)), rng.normal(size=(48, 10))


def run_together(n, fn):
    """fn(i) on n threads released at the same moment; the results in order of i."""
    barrier = threading.Barrier(n)

    def job(i):
        barrier.wait()
        return fn(i)
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(job, range(n)))


class Counting:
    """Counts calls to the traced Python function (one per trace), optionally slowing each."""

    def __init__(self, fn, delay=0.0):
        self.fn, self.delay, self.calls = fn, delay, 0
        self._lock = threading.Lock()
        self.__name__ = fn.__name__

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)  # widen the window in which a second thread could start tracing
        return self.fn(*args, **kwargs)


@pytest.fixture
def count_compiles(monkeypatch):
    """Counts native compilations (codegen.compile_function calls)."""
    counter = {"n": 0}
    real = codegen.compile_function

    def counting(fn, *args, **kwargs):
        counter["n"] += 1
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(codegen, "compile_function", counting)
    return counter


def test_many_threads_calling_one_function_get_correct_results():
    params = mlp_params(np.random.default_rng(0))
    g = tracejit.jit_value_and_grad(mlp_loss)
    batches = [mlp_batch(seed) for seed in range(N_THREADS)]
    expected = [g(params, x, t) for x, t in batches]  # one thread, one call at a time
    [entry] = g._cache.values()
    assert entry.native().plan.arena_bytes > 0  # intermediates live in the per-thread arena

    def work(i):
        out = []
        for k in range(40):
            j = (i + k) % N_THREADS
            out.append((j, g(params, *batches[j])))
        return out

    for results in run_together(N_THREADS, work):
        for j, (value, grads) in results:
            np.testing.assert_allclose(value, expected[j][0], rtol=1e-12)
            for name in grads:
                np.testing.assert_allclose(grads[name], expected[j][1][name], rtol=1e-12,
                                           atol=1e-14, err_msg=f"batch {j}, {name}")


def test_threads_on_the_fast_path_get_correct_results():
    """Plain positional arrays take the call's fast path; check it under threads too."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 32)) * 0.2
    g = tracejit.jit_grad(lambda w, x: (tracejit.tanh(x @ w) ** 2).sum())
    xs = [rng.normal(size=(40, 32)) for _ in range(N_THREADS)]
    expected = [g(w, x) for x in xs]
    outs = run_together(N_THREADS, lambda i: [g(w, xs[i]) for _ in range(200)])
    for i, results in enumerate(outs):
        for r in results:
            np.testing.assert_allclose(r, expected[i], rtol=1e-12, atol=1e-14)


def test_every_call_returns_fresh_output_arrays():
    params = mlp_params(np.random.default_rng(2))
    x, t = mlp_batch(0)
    g = tracejit.jit_value_and_grad(mlp_loss)
    v1, g1 = g(params, x, t)
    kept = {k: a.copy() for k, a in g1.items()}
    v2, g2 = g(params, x, t)
    for k in g1:
        assert g1[k] is not g2[k] and not np.shares_memory(g1[k], g2[k])
        np.testing.assert_array_equal(g1[k], kept[k])  # the second call did not overwrite it
        g2[k][...] = np.nan                            # nor does writing into a result matter
    _, g3 = g(params, x, t)
    for k in g1:
        np.testing.assert_array_equal(g3[k], kept[k])

    # across threads: no two results share memory
    arrays = [a for _, grads in run_together(N_THREADS, lambda i: g(params, x, t))
              for a in grads.values()]
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            assert not np.shares_memory(a, b)


def test_each_thread_has_its_own_arena():
    params = mlp_params(np.random.default_rng(3))
    x, t = mlp_batch(0)
    g = tracejit.jit_value_and_grad(mlp_loss)
    g(params, x, t)
    [entry] = g._cache.values()
    native = entry.native()
    arenas = run_together(4, lambda i: native._arena())
    assert len(set(arenas)) == 4
    assert native._arena() not in arenas  # this thread's


def test_the_first_call_from_many_threads_traces_and_compiles_once(count_compiles):
    f = Counting(mlp_loss, delay=0.05)
    g = tracejit.jit_value_and_grad(f)
    params = mlp_params(np.random.default_rng(4))
    x, t = mlp_batch(0)
    results = run_together(N_THREADS, lambda i: g(params, x, t))
    assert f.calls == 1
    assert count_compiles["n"] == 1
    for value, grads in results[1:]:
        assert value == results[0][0]
        for k in grads:
            np.testing.assert_array_equal(grads[k], results[0][1][k])


def test_new_signatures_from_many_threads_trace_once_each(count_compiles):
    f = Counting(lambda x: (tracejit.sin(x) * x).sum(), delay=0.02)
    g = tracejit.jit_grad(f)
    shapes = [(3,), (4,), (2, 3)]
    inputs = [np.linspace(-1, 1, int(np.prod(s))).reshape(s) for s in shapes]

    def work(i):
        x = inputs[i % len(inputs)]
        return i % len(inputs), g(x)

    for j, r in run_together(2 * len(shapes) * 2, work):
        x = inputs[j]
        np.testing.assert_allclose(r, np.sin(x) + x * np.cos(x), rtol=1e-12)
    assert f.calls == len(shapes)
    assert count_compiles["n"] == len(shapes)


def test_dumps_of_cached_code_from_many_threads_agree(monkeypatch):
    """Code linked from the persistent cache lowers its LLVM IR on demand, once."""
    monkeypatch.setattr(tracejit.config, "cache", True)
    params = mlp_params(np.random.default_rng(5))
    x, t = mlp_batch(0)
    tracejit.jit_value_and_grad(mlp_loss)(params, x, t)  # compiled and stored
    g = tracejit.jit_value_and_grad(mlp_loss)
    g(params, x, t)
    assert g.compile_stats()["cache_hits"] == 1
    dumps = run_together(4, lambda i: g.ir(params, x, t, stage="llvm"))
    assert all(d == dumps[0] for d in dumps) and "define" in dumps[0]


def test_set_num_threads_caps_every_call():
    """tracejit.set_num_threads(1) makes calls use one thread (same results), None lifts it."""
    from tracejit.codegen import parallel
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    w = np.random.default_rng(4).standard_normal((512, 256)).astype(np.float32)
    g = tracejit.jit_grad(lambda w, x: tracejit.tanh(x @ w.T).sum())
    both = g(w, x)
    try:
        tracejit.set_num_threads(1)
        assert parallel.thread_limit == 1 and tracejit.get_num_threads() == 1
        one = g(w, x)
    finally:
        tracejit.set_num_threads(None)
    assert parallel.thread_limit is None
    np.testing.assert_allclose(one, both, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive int"):
        tracejit.set_num_threads(0)


def test_threads_calling_a_function_that_runs_thread_teams(monkeypatch):
    """Eight Python threads each entering the thread pool (tj_parallel) from one function: every
    result matches the closed-form gradient of its own inputs."""
    from tracejit.codegen import parallel
    if parallel.default_threads() < 2:
        monkeypatch.setenv("TRACEJIT_NUM_THREADS", "2")
    assert parallel.threads_available()

    def loss(x, y):  # 120,000 elements: above the parallel threshold
        return tracejit.tanh(x * y).sum() + (x.sum(axis=0) ** 2).sum()

    def reference(x, y):
        t = np.tanh(x * y)
        return t.sum() + (x.sum(axis=0) ** 2).sum(), y * (1 - t * t) + 2 * x.sum(axis=0)

    g = tracejit.jit_value_and_grad(loss)
    rng = np.random.default_rng(6)
    inputs = [(rng.standard_normal((300, 400)), rng.standard_normal((300, 400)))
              for _ in range(N_THREADS)]
    g(*inputs[0])
    assert "tj_parallel" in g.ir(*inputs[0], stage="llvm")
    [entry] = g._cache.values()
    assert entry.native().threads > 1

    def work(i):
        return [((i + k) % N_THREADS, g(*inputs[(i + k) % N_THREADS])) for k in range(12)]

    for results in run_together(N_THREADS, work):
        for j, (value, grad) in results:
            want_value, want_grad = reference(*inputs[j])
            np.testing.assert_allclose(value, want_value, rtol=1e-11)
            np.testing.assert_allclose(grad, want_grad, rtol=1e-11, atol=1e-12,
                                       err_msg=f"inputs {j}")

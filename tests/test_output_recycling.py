"""Large outputs are recycled (codegen/runtime.py, RECYCLE_BYTES): a call writes a fresh output of
at least that size into the array the same thread's last call returned at that position, but only
when nothing else holds it any more. An array the caller still holds, through the result, a view,
an exported buffer or another container, is never written again; results stay equal to a fresh
computation; threads never share a recycled array; small outputs are always new."""
from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

import tracejit
from helpers import use_backend
from tracejit.codegen import runtime

pytestmark = pytest.mark.needs_llvm


@pytest.fixture(autouse=True)
def native_backend():
    with use_backend("llvm"):
        yield


def loss(p, x):
    """A weight gradient of 160 x 128 float32 (80 KB, recycled) and a bias gradient (small)."""
    return (tracejit.tanh(x @ p["w"] + p["b"]) ** 2).sum()


def setup(seed=0):
    rng = np.random.default_rng(seed)
    p = {"w": rng.standard_normal((160, 128)).astype(np.float32) * 0.1,
         "b": rng.standard_normal(128).astype(np.float32)}
    xs = [rng.standard_normal((4, 160)).astype(np.float32) for _ in range(3)]
    return p, xs


def expected(p, x):
    h = np.tanh(x.astype(np.float64) @ p["w"] + p["b"])
    d = 2 * h * (1 - h * h)
    return {"w": x.T.astype(np.float64) @ d, "b": d.sum(0)}


def check(g, p, x):
    e = expected(p, x)
    for k in e:
        np.testing.assert_allclose(g[k], e[k], rtol=2e-4, atol=2e-4)


def test_threshold_covers_the_weight_gradient_only():
    p, _ = setup()
    assert p["w"].nbytes >= runtime.RECYCLE_BYTES > p["b"].nbytes


def test_a_dropped_result_is_written_again():
    p, xs = setup()
    g = tracejit.jit_grad(loss)
    r = g(p, xs[0])
    w, b = weakref.ref(r["w"]), weakref.ref(r["b"])
    del r
    r2 = g(p, xs[1])
    assert w() is r2["w"]          # the large output came back
    assert b() is None             # the small one was freed, its successor is new
    check(r2, p, xs[1])
    r3 = g(p, xs[2])               # r2 still held: a new array
    assert r3["w"] is not r2["w"]
    check(r2, p, xs[1])
    check(r3, p, xs[2])


@pytest.mark.parametrize("hold", ["result", "array", "view", "memoryview", "list", "reshape"])
def test_a_held_array_is_never_written(hold):
    p, xs = setup()
    g = tracejit.jit_grad(loss)
    r = g(p, xs[0])
    # exactly one reference beside the function's own: the holder (a weak reference counts none)
    keep = {"result": lambda: r, "array": lambda: r["w"], "view": lambda: r["w"][3:, ::2],
            "memoryview": lambda: memoryview(r["w"]), "list": lambda: [r["w"]],
            "reshape": lambda: r["w"].reshape(-1)}[hold]()
    before = np.array(r["w"], copy=True)
    arr = weakref.ref(r["w"])
    del r
    for x in xs[1:]:
        r2 = g(p, x)
        assert r2["w"] is not arr()
        check(r2, p, x)
        del r2
    assert arr() is not None
    np.testing.assert_array_equal(arr(), before)
    del keep


def test_value_and_grad_and_repeated_calls_match_fresh_results():
    p, xs = setup(1)
    vg = tracejit.jit_value_and_grad(loss)
    for i in range(6):
        x = xs[i % 3]
        v, gr = vg(p, x)
        check(gr, p, x)
        h = np.tanh(x.astype(np.float64) @ p["w"] + p["b"])
        assert abs(float(v) - (h ** 2).sum()) < 1e-3 * max(1.0, abs((h ** 2).sum()))
        del v, gr


def test_threads_do_not_share_a_recycled_array():
    p, xs = setup(2)
    g = tracejit.jit_grad(loss)
    g(p, xs[0])   # compile once
    errors, seen = [], {}
    barrier = threading.Barrier(3)

    def worker(t):
        try:
            barrier.wait()
            for i in range(30):
                x = xs[(t + i) % 3]
                r = g(p, x)
                seen.setdefault(t, set()).add(id(r["w"]))
                check(r, p, x)
                del r
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_train_step_recycles_nothing_it_returns_in_place():
    p, xs = setup(3)
    opt = tracejit.optim.sgd(0.01, momentum=0.9)
    step = tracejit.jit_train_step(loss, opt)
    state = opt.init(p)
    w = p["w"]
    for x in xs:
        _, p2, state2 = step(p, state, x)
        assert p2["w"] is w and state2 is state

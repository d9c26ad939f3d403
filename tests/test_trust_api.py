"""Front-end trust: captured arrays never go stale silently, methods can be decorated, unsupported
numpy functions and trace-time errors name the user's line and a fix, a gradient that cannot depend
on its argument says so, and get_num_threads reports what runs."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import tracejit
from helpers import use_backend

BACKENDS = ["interpreter", "llvm"]


def retrace_messages(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "tracejit" and r.levelno == logging.INFO and "retracing" in r.getMessage()]


# ------------------------------------------------------------------------------------------------
# captured arrays
# ------------------------------------------------------------------------------------------------
labels = np.zeros(4)


@tracejit.jit_grad
def _loss_with_global_labels(w):
    return ((w - labels) ** 2).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rebinding_a_global_array_retraces_with_the_new_value(backend, caplog):
    """A minibatch loop that rebinds a global the loss closes over gets the new batch's gradient."""
    global labels
    w = np.arange(4.0)
    with use_backend(backend), caplog.at_level(logging.INFO, logger="tracejit"):
        for step in range(3):
            labels = np.full(4, float(step))
            g = _loss_with_global_labels(w)
            np.testing.assert_allclose(g, 2 * (w - step))
    msgs = retrace_messages(caplog)
    assert any("labels" in m and "rebound" in m for m in msgs), msgs


def test_rebinding_a_closure_cell_retraces(caplog):
    def make():
        scale = np.array([1.0, 2.0])

        @tracejit.jit_grad
        def f(w):
            return (w * scale).sum()

        def set_scale(v):
            nonlocal scale
            scale = v
        return f, set_scale

    f, set_scale = make()
    w = np.ones(2)
    with use_backend("llvm"), caplog.at_level(logging.INFO, logger="tracejit"):
        np.testing.assert_allclose(f(w), [1.0, 2.0])
        set_scale(np.array([3.0, 5.0]))
        np.testing.assert_allclose(f(w), [3.0, 5.0])
    assert any("scale" in m and "closure" in m for m in retrace_messages(caplog))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_change_of_a_small_captured_array_is_seen(backend, caplog):
    table = np.array([1.0, 2.0, 3.0])
    f = tracejit.jit_grad(lambda w: (w * table).sum())
    w = np.ones(3)
    with use_backend(backend), caplog.at_level(logging.INFO, logger="tracejit"):
        np.testing.assert_allclose(f(w), table)
        table[1] = 10.0
        np.testing.assert_allclose(f(w), [1.0, 10.0, 3.0])
    assert any("table" in m and "in place" in m for m in retrace_messages(caplog))


def test_a_nested_jitted_functions_captures_are_guarded():
    offset = [np.array([1.0, 1.0])]

    inner = tracejit.jit(lambda w: w * offset[0])

    def make_outer():
        shift = offset

        @tracejit.jit_grad
        def outer(w):
            return (inner(w) * shift[0]).sum()
        return outer
    outer = make_outer()
    w = np.ones(2)
    with use_backend("llvm"):
        np.testing.assert_allclose(outer(w), [1.0, 1.0])
        offset[0] = np.array([3.0, 3.0])  # rebinds a list element the inner function reads
        np.testing.assert_allclose(outer(w), [9.0, 9.0])


def test_a_large_captured_array_warns_at_trace_time():
    big = np.ones((64, 64))
    f = tracejit.jit_grad(lambda w: (w @ big).sum())
    with use_backend("interpreter"), pytest.warns(tracejit.CaptureWarning,
                                                  match=r"big.*frozen.*argument") as record:
        f(np.ones((2, 64)))
    assert record[0].filename == __file__  # attributed to the user's call


def test_module_attribute_arrays_are_guarded():
    import types
    data = types.SimpleNamespace(y=np.array([1.0, 2.0]))

    @tracejit.jit_grad
    def f(w):
        return (w * data.y).sum()
    with use_backend("interpreter"):
        np.testing.assert_allclose(f(np.ones(2)), [1.0, 2.0])
        data.y = np.array([4.0, 4.0])
        np.testing.assert_allclose(f(np.ones(2)), [4.0, 4.0])


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------
class Scaled:
    def __init__(self, scale):
        self.scale = scale

    @tracejit.jit_grad
    def loss(self, w, x):
        return ((w * x) ** 2).sum() * self.scale

    @tracejit.jit_value_and_grad(argnums=1)
    def loss_x(self, w, x):
        return (w * x).sum() * self.scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_decorated_method_differentiates_the_first_argument_after_self(backend):
    w, x = np.array([1.0, 2.0]), np.array([3.0, -1.0])
    with use_backend(backend):
        for scale in (1.0, 3.0):
            m = Scaled(scale)
            np.testing.assert_allclose(m.loss(w, x), 2 * w * x * x * scale)
            np.testing.assert_allclose(m.loss(w, x), 2 * w * x * x * scale)  # fast path
            v, g = m.loss_x(w, x)
            np.testing.assert_allclose(g, w * scale)
            assert float(v) == pytest.approx((w * x).sum() * scale)
        assert "func @loss" in Scaled(2.0).loss.ir(w, x, stage="forward")


def test_a_method_of_an_unhashable_class_says_how_to_pass_arrays():
    class Model:
        __hash__ = None

        @tracejit.jit_grad
        def loss(self, w):
            return (w * w).sum()
    with pytest.raises(TypeError, match=r"self.*hashable.*argument"):
        Model().loss(np.ones(2))


def test_instance_attribute_arrays_of_a_method_are_guarded():
    class Model:
        def __init__(self):
            self.target = np.array([1.0, 2.0])

        @tracejit.jit_grad
        def loss(self, w):
            return ((w - self.target) ** 2).sum()
    m = Model()
    w = np.zeros(2)
    with use_backend("llvm"):
        np.testing.assert_allclose(m.loss(w), -2 * m.target)
        m.target = np.array([5.0, 5.0])
        np.testing.assert_allclose(m.loss(w), [-10.0, -10.0])


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, hint", [
    (lambda x: np.nanmean(x), r"np\.nanmean.*closest names.*tracejit\.mean"),
    (lambda x: np.copy(x).sum(), r"copy.*x itself"),
    (lambda x: np.empty_like(x).sum(), r"empty_like.*x \* 0"),
    (lambda x: np.add.reduce(x), r"np\.add\.reduce.*tracejit\.sum"),
    (lambda x: np.nanstd(x).sum(), r"np\.nanstd.*closest names.*tracejit\.std"),
])
def test_an_unsupported_numpy_function_names_itself_the_line_and_a_fix(call, hint):
    f = tracejit.jit_grad(call)
    with use_backend("interpreter"), pytest.raises(tracejit.UnsupportedError) as e:
        f(np.ones(3))
    assert "test_trust_api.py:" in str(e.value)
    assert e.match(hint)


def test_item_assignment_suggests_where_with_the_line():
    def f(x):
        y = x * 2
        y[0] = 5.0
        return y.sum()
    fix = r"test_trust_api\.py:\d+.*tracejit\.where"
    with use_backend("interpreter"), pytest.raises(TypeError, match=fix):
        tracejit.jit_grad(f)(np.ones(3))


@pytest.mark.parametrize("call, error", [
    (lambda x: tracejit.norm(x.reshape(1, 3), ord="nuc"), NotImplementedError),
    (lambda x: x[7].sum(), IndexError),
    (lambda x: tracejit.where(x > 0, x, "a").sum(), TypeError),
])
def test_every_trace_time_error_names_the_users_line_once(call, error):
    with use_backend("interpreter"), pytest.raises(error) as e:
        tracejit.jit_grad(call)(np.ones(3))
    assert type(e.value) is error or issubclass(type(e.value), error)
    assert str(e.value).count("(at test_trust_api.py:") == 1, str(e.value)


def test_a_gradient_that_cannot_depend_on_its_argument_warns_once_per_trace():
    f = tracejit.jit_grad(lambda w, x: (x * 2).sum() + (w > 0).sum(), argnums=(0, 1))
    with use_backend("interpreter"):
        with pytest.warns(tracejit.ZeroGradientWarning, match=r"\bw\b"):
            g = f(np.ones(2), np.ones(2))
        np.testing.assert_array_equal(g[0], 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            f(np.ones(2), np.ones(2))  # no new trace, no new warning


def test_num_threads_is_one_without_openmp():
    code = "import tracejit; print(tracejit.get_num_threads())"
    env = dict(os.environ, TRACEJIT_NO_OPENMP="1", TRACEJIT_NUM_THREADS="4")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1"


_helper_table = np.array([1.0, 2.0])


def _helper(w):
    return w * _helper_table


def test_arrays_a_helper_function_reads_are_guarded():
    """One level of plain helper functions: the helper's globals are captures of the caller."""
    global _helper_table
    f = tracejit.jit_grad(lambda w: _helper(w).sum())
    with use_backend("interpreter"):
        np.testing.assert_allclose(f(np.ones(2)), [1.0, 2.0])
        _helper_table = np.array([7.0, 8.0])
        np.testing.assert_allclose(f(np.ones(2)), [7.0, 8.0])


def test_a_method_inlined_into_another_methods_trace_does_not_retrace_every_call(caplog):
    class Inner:
        def __init__(self):
            self.k = np.array([2.0, 3.0])

        @tracejit.jit
        def apply(self, w):
            return w * self.k

    class Outer:
        def __init__(self):
            self.inner = Inner()
            self.k = np.array([1.0, 1.0])

        @tracejit.jit_grad
        def loss(self, w):
            return (self.inner.apply(w) * self.k).sum()

    m = Outer()
    with use_backend("interpreter"), caplog.at_level(logging.INFO, logger="tracejit"):
        for _ in range(3):
            np.testing.assert_allclose(m.loss(np.ones(2)), [2.0, 3.0])
        assert retrace_messages(caplog) == []
        m.inner.k = np.array([5.0, 5.0])
        np.testing.assert_allclose(m.loss(np.ones(2)), [5.0, 5.0])
    assert any("self.k" in msg or "inner" in msg for msg in retrace_messages(caplog))

"""Multi-output fused loops (codegen/schedule.py `_merge_output_loops`): a function output computed
by one fused loop and read, elementwise, only by a later fused loop is computed and stored by that
loop. Checked against numpy on the native backend for flat loops, loops over a nest (a transposed
operand), 0-d loops, a bool output and a chain of three outputs; and that the plan merged them."""
from __future__ import annotations

import numpy as np
import pytest

import tracejit as tj
from helpers import rng_for


def _plan(f, *args):
    return next(iter(f._cache.values())).native().plan


def chain(x, y):
    a = x * 2.0 + y
    b = tj.sqrt(a * a + 1.0) - y
    c = b * x + a
    return a, b, c


def chain_ref(x, y):
    a = x * 2.0 + y
    b = np.sqrt(a * a + 1.0) - y
    return a, b, b * x + a


def nested(x, y):
    a = x - y
    return a, a * tj.transpose(y) + 1.0


def nested_ref(x, y):
    a = x - y
    return a, a * y.T + 1.0


def with_bool(x, y):
    m = x > y
    return m, tj.where(m, x, y) * 3.0


def with_bool_ref(x, y):
    m = x > y
    return m, np.where(m, x, y) * 3.0


CASES = {
    "flat chain": (chain, chain_ref, (257, 3), 2),
    "nest": (nested, nested_ref, (5, 5), 1),
    "0-d": (chain, chain_ref, (), 2),
    "bool output": (with_bool, with_bool_ref, (33,), 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_read_by_a_later_loop_are_stored_by_it(case):
    f, ref, shape, n_extra = CASES[case]
    rng = rng_for("multi-output", case)
    x, y = rng.normal(size=shape), rng.normal(size=shape)
    jf = tj.jit(f)
    got = jf(x, y)
    for g, w in zip(got, ref(x, y)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13)
    loops = [g for g in _plan(jf, x, y).groups if g.kind == "loop"]
    assert len(loops) == 1 and len(loops[0].extra_outputs) == n_extra


def test_an_output_read_by_two_loops_is_not_merged():
    def f(x, y):
        a = x * y + 1.0
        return a, (a * x).sum(), a - y

    rng = rng_for("two readers")
    x, y = rng.normal(size=40), rng.normal(size=40)
    jf = tj.jit(f)
    a, s, d = jf(x, y)
    np.testing.assert_allclose(a, x * y + 1.0, rtol=1e-14)
    np.testing.assert_allclose(s, ((x * y + 1.0) * x).sum(), rtol=1e-12)
    np.testing.assert_allclose(d, x * y + 1.0 - y, rtol=1e-14)
    assert not any(g.extra_outputs for g in _plan(jf, x, y).groups)

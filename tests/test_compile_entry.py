"""The entry function only calls the kernels in order: LLVM's optimizer is not run on it (it cost
most of a deep MLP's compile time), unless a native loop runs its steps there."""
import numpy as np
import pytest

import tracejit

pytestmark = pytest.mark.needs_llvm

X = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)


def _entry_line(f, *args):
    old = tracejit.config.cache
    tracejit.config.cache = False
    try:
        out = f(*args)
    finally:
        tracejit.config.cache = old
    text = next(iter(f._cache.values())).native().llvm_sources[0]
    return out, next(line for line in text.splitlines() if line.startswith('define void @"entry"'))


def test_a_straight_line_entry_is_not_optimized():
    out, line = _entry_line(tracejit.jit_grad(lambda x: (tracejit.tanh(x @ x.T) ** 2).sum()), X)
    assert "optnone" in line and "noinline" in line, line
    x = X.astype(np.float64)
    t = np.tanh(x @ x.T)
    want = 2 * (2 * t * (1 - t * t)) @ x   # d/dx sum(tanh(x x^T)^2), the product symmetric
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_an_entry_running_a_native_loop_is_optimized():
    def f(x):
        c, _ = tracejit.scan(lambda c, row: (tracejit.tanh(c + row), None), x[0] * 0, x)
        return c.sum()
    _, line = _entry_line(tracejit.jit(f), X)
    assert "optnone" not in line, line

"""Fused loops over short rows with costly members (codegen/fused.py heavy_cost): a softmax
cross-entropy's [64, 10] exp and log loops are vectorized with masked iterations (one 16-lane
iteration per row of 10) instead of running scalar, and must still give the interpreter's
numbers, NaN and infinities included, for odd row lengths and both dtypes. Also the bias
gradient's sum over N, H, W of an NCHW tensor (a serial reduction now, see
schedule.REDUCE_NS_PER_ELEMENT), against a float64 reference at every thread count."""
from __future__ import annotations

import numpy as np
import pytest

import tracejit as tj
from tracejit.codegen import parallel

from helpers import use_backend

pytestmark = pytest.mark.needs_llvm


def _logsumexp_rows(x):
    m = tj.max(x, axis=1, keepdims=True)
    s = tj.sum(tj.exp(x - tj.stop_gradient(m)), axis=1, keepdims=True)
    return tj.log(s) + m


def _softmax_loss(x, t):
    return tj.sum(t * (_logsumexp_rows(x) - x))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the interpreter's inf - inf
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(64, 10), (37, 7), (20, 15)])
def test_short_exp_rows_match_interpreter(dtype, shape):
    rng = np.random.default_rng([14, *shape])
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    x[1, 2], x[2, 0], x[3, :] = -np.inf, np.nan, -np.inf   # a row of -inf: log(0) + (-inf)
    x[4, 1] = 1e4 if dtype == "float64" else 80.0           # exp overflows past the max shift
    t = rng.random(shape).astype(dtype)
    f = tj.jit(_logsumexp_rows)
    g = tj.jit_grad(_softmax_loss)
    got, grad = f(x), g(x, t)
    with use_backend("interpreter"):
        want, grad_want = tj.jit(_logsumexp_rows)(x), tj.jit_grad(_softmax_loss)(x, t)
    tol = 2e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(got, want, rtol=tol, atol=0)
    np.testing.assert_allclose(grad, grad_want, rtol=10 * tol, atol=10 * tol)
    # the rows are vectorized with masked iterations, not left scalar
    assert "llvm.loop.vectorize.predicate.enable" in f.ir(x, stage="llvm")
    assert "llvm.masked" in f.ir(x, stage="llvm-opt")


@pytest.mark.parametrize("shape", [(64, 6, 24, 24), (64, 16, 8, 8), (3, 5, 7, 9)])
def test_bias_gradient_sum_over_n_h_w(shape):
    rng = np.random.default_rng([10, *shape])
    x = rng.standard_normal(shape).astype(np.float32)
    f = tj.jit(lambda v: tj.sum(v, axis=(0, 2, 3)))
    want = x.astype(np.float64).sum(axis=(0, 2, 3))
    results = []
    try:
        for n in (1, 2, 3):
            tj.set_num_threads(n)
            results.append(f(x))
    finally:
        tj.set_num_threads(None)
    for r in results:
        assert r.dtype == np.float32
        np.testing.assert_array_equal(r, results[0])
        # float32 blocks of at most a plane's terms per lane, added in float32 across planes
        np.testing.assert_allclose(r, want, rtol=0, atol=1e-6 * np.abs(x).sum(axis=(0, 2, 3)).max())
    [entry] = f._cache.values()
    [g] = entry.native().plan.groups
    assert g.cost_ns < parallel.PARALLEL_MIN_NS   # read from cache at ~0.04 ns per element

"""Accuracy of float32 reductions in the native code generator on large inputs.

A float32 sum that runs one accumulator (or a few vector lanes) over millions of elements loses
about log2(n / lanes) bits; numpy's pairwise summation and PyTorch's cascade sum do not. The
native reductions add at most BLOCK terms in a row into one float32 running sum: the innermost
reduced loop sums blocks of BLOCK elements in float32 registers and adds the block sums in
float64; an output that is added to across an outer reduced loop (`x.sum(axis=0)`) keeps float32
running sums that are flushed into float64 sums every BLOCK rows. References are float64 numpy.

Error bound (Higham, "Accuracy and Stability of Numerical Algorithms", sec. 4.2): recursive
summation of m terms in precision u errs by at most (m - 1) u sum|x_i| (to first order). One
block is a recursive float32 sum of at most BLOCK terms (fewer per vector lane, the lanes then
combined in a tree, which only shortens the chains): at most (BLOCK - 1) u32 sum_block|x|. The
n / BLOCK block sums, exact in float64, are summed recursively in float64: at most
(n / BLOCK) u64 sum|x|. Rounding the float64 total to float32 adds u32 |sum|. So for a float32
result s of n float32 terms x_i reduced by one of those two loops,

    |s - sum x_i| <= ((BLOCK - 1) u32 + (n / BLOCK) u64 + u32) sum|x_i|,

u32 = 2**-24, u64 = 2**-53. (A reduction nesting both, NCHW -> C, passes each term through both
kinds of block: twice the first term.) That is ~1.2e-4 sum|x| for BLOCK = 2048, a worst case that
any summation order meets on random data, so the tests also assert the error actually reached
on the user-facing cases (uniform [0, 1) data, e.g. the mean of x**2): below 1e-6 relative, which
a float32 accumulation over 2**24 elements in 64 lanes misses by two orders of magnitude.
"""
from __future__ import annotations

import numpy as np
import pytest

import tracejit
from helpers import rng_for, use_backend

from tracejit.codegen.schedule import REDUCE_BLOCK as BLOCK

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

U32, U64 = 2.0 ** -24, 2.0 ** -53
N = 2 ** 24


def bound(n: int) -> float:
    """The relative (to sum|x|) error bound of the module docstring for n terms."""
    return (BLOCK - 1) * U32 + (n / BLOCK) * U64 + U32


@pytest.fixture(scope="module")
def data():
    rng = rng_for("reduction-accuracy")
    return rng.random(N, dtype=np.float32)


def rel_err(actual, expected):
    expected = np.asarray(expected, np.float64)
    err = np.abs(np.asarray(actual, np.float64) - expected)
    return float(np.max(err) / np.max(np.abs(expected)))


def native(fun, *args):
    with use_backend("llvm"):
        return np.asarray(tracejit.jit(fun)(*args))


def test_sum_and_mean_of_squares_within_bound(data):
    x64 = data.astype(np.float64)
    s = native(lambda x: x.sum(), data)
    assert abs(float(s) - x64.sum()) <= bound(N) * np.abs(x64).sum()
    assert rel_err(s, x64.sum()) < 1e-6
    # the terms x*x are rounded to float32 before the sum: compare with the sum of those terms
    sq = (data * data).astype(np.float64)
    m = native(lambda x: (x * x).mean(), data)
    assert abs(float(m) * N - sq.sum()) <= bound(N) * sq.sum()   # dividing by 2**24 is exact
    assert rel_err(m, (x64 * x64).mean()) < 1e-6


def test_norm_var_std(data):
    x64 = data.astype(np.float64)
    assert rel_err(native(lambda x: tracejit.norm(x), data), np.linalg.norm(x64)) < 1e-6
    assert rel_err(native(lambda x: tracejit.var(x), data), x64.var()) < 1e-6
    assert rel_err(native(lambda x: tracejit.std(x), data), x64.std()) < 1e-6


@pytest.mark.parametrize("shape,axis", [((4, N // 4), 1), ((N // 4, 4), 0), ((4, N // 16, 4), 1)],
                         ids=["rows", "cols", "middle"])
def test_long_axis(data, shape, axis):
    a = data.reshape(shape)
    a64 = a.astype(np.float64)
    s = native(lambda a: a.sum(axis=axis), a)
    n = shape[axis]
    assert np.all(np.abs(s - a64.sum(axis)) <= bound(n) * np.abs(a64).sum(axis))
    assert rel_err(s, a64.sum(axis)) < 2e-7
    assert rel_err(native(lambda a: (a * a).mean(axis=axis), a), (a64 * a64).mean(axis)) < 1e-6


def test_bias_gradient_over_big_batch(data):
    """The gradient of a bias added across a large batch is a reduction over the batch (and, for
    NCHW activations, over the spatial dimensions)."""
    n = N // 4
    x = data[:n].reshape(n // 16, 16)
    b = np.linspace(-0.5, 0.5, 16, dtype=np.float32)
    with use_backend("llvm"):
        g = np.asarray(tracejit.jit_grad(lambda b, x: (0.5 * (x + b) ** 2).sum())(b, x))
    ref = (x.astype(np.float64) + b.astype(np.float64)).sum(axis=0)
    assert rel_err(g, ref) < 1e-6
    xc = data[:n].reshape(64, 4, 128, 128)
    bc = np.linspace(-0.5, 0.5, 4, dtype=np.float32)
    with use_backend("llvm"):
        gc = np.asarray(tracejit.jit_grad(
            lambda b, x: (0.5 * (x + b[:, None, None]) ** 2).sum())(bc, xc))
    refc = (xc.astype(np.float64) + bc.astype(np.float64)[:, None, None]).sum(axis=(0, 2, 3))
    assert rel_err(gc, refc) < 1e-6


@pytest.mark.parametrize("case", ["sum", "mean_sq", "var", "rows", "cols", "nchw"])
def test_native_at_least_as_accurate_as_interpreter(case):
    """On a size the interpreter handles quickly (still many blocks long), the native result is
    as accurate as the interpreter's (numpy: pairwise along a contiguous axis, row by row across
    an outer one) up to one float32 rounding, and within 1e-6, both measured against the
    interpreter on the float64 input."""
    rng = rng_for("reduction-accuracy-small", case)
    n = 2 ** 21 + 37   # not a multiple of the block or the vector width
    x = rng.random(n, dtype=np.float32)
    fun, arg = {
        "sum": (lambda x: x.sum(), x),
        "mean_sq": (lambda x: (x * x).mean(), x),
        "var": (lambda x: tracejit.var(x), x),
        "rows": (lambda a: (a * a).sum(axis=1), x[:2 ** 21].reshape(4, 2 ** 19)),
        "cols": (lambda a: a.mean(axis=0), x[:3 * 2 ** 19].reshape(2 ** 19, 3)),
        "nchw": (lambda a: (a * a).sum(axis=(0, 2, 3)), x[:2 ** 21].reshape(2, 4, 512, 512)),
    }[case]
    with use_backend("interpreter"):
        reference = np.asarray(tracejit.jit(fun)(arg.astype(np.float64)))
        interpreted = np.asarray(tracejit.jit(fun)(arg))
    assert interpreted.dtype == np.float32
    # numpy sums across an outer axis row by row ("cols"): there the native sum must do better
    assert rel_err(native(fun, arg), reference) <= min(rel_err(interpreted, reference) + U32, 1e-6)

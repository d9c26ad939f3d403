"""A matmul with an elementwise epilogue (bias, tanh, relu...) split into the grid of column and row
groups (codegen/kernels/matmul.py `_lower_one`, `_grid_epilogue`): each chunk computes a block
of the product's columns and runs the epilogue over that window of each of its rows
(codegen/fused.py `Epilogue.call_window`). Checked against the reference interpreter on products
large enough to go parallel, with a bias broadcast along the rows (the row loop), without one (the
flat loop), partial row and column tiles, both dtypes, and on 1 and 2 threads (equal bit for bit:
the chunks split columns and rows, never an element's sum). The stand-in epilogue of
test_kernels_dense checks that every element is done exactly once."""
from __future__ import annotations

import numpy as np
import pytest

import tracejit
from helpers import rng_for, use_backend
from tracejit import nn
from tracejit.codegen.kernels import matmul


def with_bias(x, w, b):
    return (tracejit.tanh(nn.linear(x, w, b)) ** 2).sum()


def flat(x, w, b):
    return (nn.relu(x @ w.T) * 0.5 + tracejit.tanh(x @ w.T)).sum() + (b * b).sum()


# (M, K, N): B [N, K] of at least matmul.GRID_EPILOGUE_B_BYTES (in float32)
PROGRAMS = {"bias": (with_bias, (64, 784, 256)), "flat": (flat, (64, 784, 256)),
            "ragged": (with_bias, (37, 801, 203))}   # partial row and column tiles


def _arrays(name, dtype):
    rng = rng_for("epilogue-grid", name, dtype)
    m, k, n = PROGRAMS[name][1]
    x = rng.normal(size=(m, k)).astype(dtype)
    w = (rng.normal(size=(n, k)) / np.sqrt(k)).astype(dtype)
    assert n * k * 4 >= matmul.GRID_EPILOGUE_B_BYTES
    b = rng.normal(size=(n,)).astype(dtype)
    return x, w, b


def _grads(fn, arrays, backend, threads=None):
    old = tracejit.get_num_threads()
    try:
        with use_backend(backend):
            tracejit.set_num_threads(threads)
            g = tracejit.jit_grad(fn, argnums=(0, 1, 2))
            return g(*arrays), g
    finally:
        tracejit.set_num_threads(old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_grid_epilogue_matches_interpreter(name, dtype):
    fn = PROGRAMS[name][0]
    arrays = _arrays(name, dtype)
    want, _ = _grads(fn, arrays, "interpreter")
    one, _ = _grads(fn, arrays, "llvm", threads=1)
    two, g = _grads(fn, arrays, "llvm", threads=2)
    tol = 2e-4 if dtype == np.float32 else 1e-10
    for w_, o_, t_ in zip(want, one, two):
        np.testing.assert_allclose(o_, w_, rtol=tol, atol=tol)
        np.testing.assert_array_equal(o_, t_)
    # the forward product's epilogue ran in the grid's windows
    assert ".window" in g.ir(*arrays, stage="llvm")

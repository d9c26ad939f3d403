"""Gathers with traced integer indices (take_along_axis, nn.embedding, x[int_array]) and their
adjoint, the scatter-add, on both backends: values and gradients with repeated indices against
numpy (np.add.at), finite differences, second order, and indices out of range, which raise
IndexError naming the index (checked where the native code reads them) and touch no memory.

The per-op table (tests/optable.py) covers the same ops with constant indices."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tracejit as tj
from tracejit import nn
from helpers import use_backend

BACKENDS = ["interpreter", "llvm"]
RNG = np.random.default_rng(7)


def _scatter(shape, index, values):
    out = np.zeros(shape)
    np.add.at(out, index, values)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_take_along_axis_traced_indices_value_and_grad(backend, dtype):
    x = RNG.standard_normal((6, 5)).astype(dtype)
    idx = np.array([[0, 4], [4, 4], [-1, 2], [3, 3], [0, 0], [1, -5]])
    ct = RNG.standard_normal((6, 2))
    f = tj.jit_value_and_grad(lambda x, i: (tj.take_along_axis(x, i, 1) * ct).sum())
    with use_backend(backend):
        val, g = f(x, idx)
    rows = np.arange(6)[:, None]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(val, (np.take_along_axis(x, idx, 1) * ct).sum(), rtol=tol)
    np.testing.assert_allclose(g, _scatter(x.shape, (rows, idx % 5), ct), rtol=tol, atol=tol)
    assert g.dtype == dtype


# form: (x shape, the traced-index function, the same index as a numpy index tuple)
I = np.array([[1, 1], [4, 0]])          # repeated entries
J = np.array([[2, 2], [3, 0]])
LABELS = np.array([4, 0, 4, 2])
FORMS = {
    "rows": ((5, 4, 3), lambda a, i, j: a[i], (I,)),
    "columns": ((5, 4, 3), lambda a, i, j: a[:, j], (slice(None), J)),
    "pairs": ((5, 4, 3), lambda a, i, j: a[i, j], (I, J)),
    # the cross-entropy idiom on a [N, C] value, j the traced labels
    "arange-labels": ((4, 5), lambda a, i, j: a[np.arange(4), j], (np.arange(4), LABELS)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", list(FORMS))
def test_getitem_traced_int_array_and_grad(backend, form):
    shape, fn, index = FORMS[form]
    x = RNG.standard_normal(shape)
    j = LABELS if form == "arange-labels" else J
    ref = x[index]
    ct = RNG.standard_normal(ref.shape)
    f = tj.jit_value_and_grad(lambda a, i, j: (fn(a, i, j) * ct).sum())
    with use_backend(backend):
        val, g = f(x, I, j)
        np.testing.assert_allclose(tj.jit(fn)(x, I, j), ref, rtol=1e-12)
    # the gradient of sum(x[index] * ct) is np.add.at(zeros, index, ct)
    np.testing.assert_allclose(val, (ref * ct).sum(), rtol=1e-12)
    np.testing.assert_allclose(g, _scatter(x.shape, index, ct), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_traced_ids_value_grad_and_large_parallel(backend):
    # big enough for the native scatter-add to run on several threads (split over columns)
    w = RNG.standard_normal((50, 64))
    ids = RNG.integers(0, 50, size=(32, 40))
    ids[0, :5] = 7                           # many repeats of one row
    ct = RNG.standard_normal((32, 40, 64))
    f = tj.jit_value_and_grad(lambda w, t, ct: (nn.embedding(t, w) * ct).sum())
    with use_backend(backend):
        val, g = f(w, ids, ct)
        out = tj.jit(lambda w, t: nn.embedding(t, w))(w, ids)
    np.testing.assert_allclose(out, w[ids], rtol=1e-12)
    np.testing.assert_allclose(val, (w[ids] * ct).sum(), rtol=1e-10)
    np.testing.assert_allclose(g, _scatter(w.shape, ids, ct), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_idx", [3, -2])
def test_embedding_padding_row_gets_no_gradient(padding_idx, backend):
    """As torch.nn.functional.embedding: the padding row is looked up, but its gradient is zero
    (and the other rows' gradients are unchanged); a negative padding_idx counts from the end."""
    w = RNG.standard_normal((5, 3))
    ids = np.array([[3, 1, 3], [0, 3, 4]])
    ct = RNG.standard_normal((2, 3, 3))
    f = tj.jit_value_and_grad(lambda w, t: (nn.embedding(t, w, padding_idx=padding_idx) * ct)
                              .sum())
    with use_backend(backend):
        val, g = f(w, ids)
    want = _scatter(w.shape, ids, ct)
    want[3] = 0.0
    np.testing.assert_allclose(val, (w[ids] * ct).sum(), rtol=1e-12)
    np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(nn.embedding(ids, w, padding_idx=padding_idx), w[ids])


def test_embedding_rejects_unsupported_options_and_bad_padding_idx():
    w, ids = np.ones((4, 2)), np.array([0, 1])
    with pytest.raises(ValueError, match=r"embedding: max_norm=1.0 is not supported .*renormalis"):
        nn.embedding(ids, w, max_norm=1.0)
    with pytest.raises(ValueError, match="scale_grad_by_freq=True is not supported"):
        nn.embedding(ids, w, scale_grad_by_freq=True)
    with pytest.raises(ValueError, match=r"padding_idx=4 must be within \[-4, 4\)"):
        nn.embedding(ids, w, padding_idx=4)
    with pytest.raises(ValueError, match=r"padding_idx=-5 must be within"):
        nn.embedding(ids, w, padding_idx=-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_gradient_matches_finite_differences_and_second_order(backend):
    x = RNG.standard_normal((4, 3))
    idx = np.array([[2, 2, 0], [1, 2, 2]])

    def loss(x, i):
        y = tj.take_along_axis(x, i, 0)
        return (tj.tanh(y) * y).sum()

    grad = tj.jit_grad(loss)
    with use_backend(backend):
        g = grad(x, idx)
        eps = 1e-6
        fd = np.zeros_like(x)
        f = tj.jit(loss)
        for k in range(x.size):
            d = np.zeros(x.size)
            d[k] = eps
            fd.flat[k] = (f(x + d.reshape(x.shape), idx) - f(x - d.reshape(x.shape), idx)) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-8)
        # second order: the gradient of <grad loss(x), r> is the Hessian times r (through the
        # scatter-add's adjoint, a gather), against differences of the first-order gradient
        r = RNG.standard_normal(x.shape)
        hvp = tj.jit_grad(lambda x, i: (grad(x, i) * r).sum())(x, idx)
        fd2 = (grad(x + eps * r, idx) - grad(x - eps * r, idx)) / (2 * eps)
    np.testing.assert_allclose(hvp, fd2, rtol=1e-6, atol=1e-7)
    assert np.abs(hvp).max() > 0.1


def _raises_index_error(run, pattern):
    with pytest.raises(IndexError, match=pattern) as info:
        run()
    return str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index_raises_naming_the_argument(backend):
    x = RNG.standard_normal((10, 3))
    f = tj.jit(lambda x, labels: tj.take_along_axis(x, labels[:, None], 0))
    g = tj.jit_grad(lambda x, labels: (x[labels] ** 2).sum())
    good = np.array([0, 9, -10, 3])
    with use_backend(backend):
        msg = _raises_index_error(lambda: f(x, np.array([0, 12, 1, 2])),
                                  r"index 12 is out of bounds for axis 0 with size 10 in "
                                  r"take_along_axis\(labels\) at test_gather.py:\d+")
        assert re.search(r"test_gather.py:\d+$", msg)
        _raises_index_error(lambda: f(x, np.array([0, -11, 1, 2])), r"index -11 .* size 10")
        _raises_index_error(lambda: g(x, np.array([3, 10])), r"index 10 .*getitem\(labels\)")
        # the error is cleared: the next call with good indices computes the right thing
        np.testing.assert_allclose(f(x, good)[:, 0], x[good[:, None] % 10, 0][:, 0])
        np.testing.assert_allclose(g(x, good), _scatter(x.shape, good, 2 * x[good]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_rejects_negative_ids_like_pytorch(backend):
    w = RNG.standard_normal((5, 2))
    f = tj.jit(lambda w, ids: nn.embedding(ids, w))
    with use_backend(backend):
        _raises_index_error(lambda: f(w, np.array([1, -1])), r"index -1 .*embedding\(ids\)")
        _raises_index_error(lambda: f(w, np.array([5, 0])), r"index 5 .* size 5 in embedding")
        np.testing.assert_allclose(f(w, np.array([4, 0])), w[[4, 0]])


def test_native_bad_index_writes_nothing_outside_and_threads_agree():
    """A large scatter-add (several threads) with one bad index among many: the process survives,
    the result of the next good call is exact, and all threads report the same index."""
    x = RNG.standard_normal((300, 256))
    ids = RNG.integers(0, 300, size=2000)
    g = tj.jit_grad(lambda x, ids: (nn.embedding(ids, x) ** 2).sum())
    expected = _scatter(x.shape, ids, 2 * x[ids])
    bad = ids.copy()
    bad[1234] = 300
    for _ in range(3):
        _raises_index_error(lambda: g(x, bad), r"index 300 is out of bounds for axis 0 with size "
                                               r"300 in embedding\(ids\)")
        np.testing.assert_allclose(g(x, ids), expected, rtol=1e-12, atol=1e-12)


def test_constant_index_out_of_range_raises_at_trace_time():
    x = np.ones((3, 2))
    with pytest.raises(IndexError, match="index 3 is out of bounds for axis 0 with size 3"):
        tj.jit(lambda x: x[np.array([0, 3])])(x)
    with pytest.raises(IndexError, match="index 5"):
        tj.jit(lambda x: tj.take_along_axis(x, np.array([[5]]), 1))(x)


def test_gradient_ir_is_a_scatter_add_and_its_adjoint_a_gather():
    f = tj.jit_grad(lambda x, i: (tj.take_along_axis(x, i, 1) ** 2).sum())
    x, i = np.ones((2, 3)), np.zeros((2, 1), np.int32)
    f(x, i)
    entry = next(iter(f._cache.values()))
    text = str(entry.optimized)
    assert "gather %x, %i" in text and "scatter_add" in text


def test_eager_gathers_on_numpy_arrays():
    x = np.arange(12.0).reshape(3, 4)
    idx = np.array([[1], [0], [-1]])
    np.testing.assert_array_equal(tj.take_along_axis(x, idx, 1), np.take_along_axis(x, idx, 1))
    np.testing.assert_array_equal(nn.embedding(np.array([2, 0]), x), x[[2, 0]])
    with pytest.raises(IndexError, match="index 4 is out of bounds for axis 1 with size 4"):
        tj.take_along_axis(x, np.array([[4], [0], [0]]), 1)

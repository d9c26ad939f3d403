"""sort, argsort, argmax and argmin against numpy where the op table's tie-free inputs say
nothing: ties (stability, the first index), NaNs (last in a sort, the extreme of argmax), integer
inputs, rows split between threads, and the gradient of sort going back through the permutation.
Also building arrays from traced values (object arrays of tracers, np.array of tracers)."""
import numpy as np
import pytest

import helpers
import tracejit as tj

BACKENDS = ["interpreter", "llvm"]


def _ties_and_nans(shape, seed=0):
    """Few distinct values (many ties), some NaNs, signed zeros and infinities."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=shape).astype(np.float64)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=min(flat.size, 4 * max(1, flat.size // 20)), replace=False)
    flat[picks[0::4]] = np.nan
    flat[picks[1::4]] = -0.0
    flat[picks[2::4]] = np.inf
    flat[picks[3::4]] = -np.inf
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sort_and_argsort_are_numpys_stable_sort_with_nans_last(backend, dtype):
    # rows of several lengths: 1, odd, a power of two, and long ones split between threads
    sizes = (1, 6, 300) if dtype == np.float64 else (300,)   # float32: the same loop nest
    xs = {n: _ties_and_nans((7, n), seed=n).astype(dtype) for n in sizes}
    with helpers.use_backend(backend):
        got = tj.jit(lambda d: {n: (tj.argsort(x), tj.sort(x), np.argsort(x, axis=0),
                                    tj.sort(x, axis=None)) for n, x in d.items()})(xs)
    for n, x in xs.items():
        idx, vals, idx0, flat = got[n]
        assert idx.dtype == np.int64
        np.testing.assert_array_equal(idx, np.argsort(x, kind="stable"), err_msg=f"n={n}")
        np.testing.assert_array_equal(vals, np.sort(x))
        np.testing.assert_array_equal(np.signbit(vals), np.signbit(np.sort(x, kind="stable")))
        np.testing.assert_array_equal(idx0, np.argsort(x, axis=0, kind="stable"))
        np.testing.assert_array_equal(flat, np.sort(x, axis=None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_gradient_goes_back_to_where_each_value_came_from(backend):
    x = np.array([[3.0, -1.0, 2.0, 0.5], [1.0, 1.0, -2.0, 7.0]])
    w = np.arange(1.0, 5.0)            # weight of each sorted position
    with helpers.use_backend(backend):
        g = tj.jit_grad(lambda x: (tj.sort(x) * w).sum())(x)
        g0 = tj.jit_grad(lambda x: (tj.sort(x, 0) * w).sum())(x)
    want = np.zeros_like(x)
    np.put_along_axis(want, np.argsort(x, kind="stable"), np.broadcast_to(w, x.shape), 1)
    np.testing.assert_array_equal(g, want)
    want0 = np.zeros_like(x)
    np.put_along_axis(want0, np.argsort(x, 0, kind="stable"), np.broadcast_to(w, x.shape), 0)
    np.testing.assert_array_equal(g0, want0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_argmin_take_the_first_tie_and_the_first_nan(backend):
    x = np.array([[1.0, 3.0, 3.0, -1.0, -1.0],
                  [2.0, np.nan, 5.0, np.nan, -9.0],
                  [-np.inf, -np.inf, -np.inf, -np.inf, -np.inf],
                  [0.0, -0.0, 0.0, 4.0, 4.0]])
    with helpers.use_backend(backend):
        got = tj.jit(lambda x: (tj.argmax(x, 1), tj.argmin(x, 1), np.argmax(x), np.argmin(x.T),
                                tj.argmax(x, 0, keepdims=True), x.argmax(dim=1, keepdim=True),
                                x.argmin(axis=0)))(x)
    want = (np.argmax(x, 1), np.argmin(x, 1), np.argmax(x), np.argmin(x.T),
            np.argmax(x, 0, keepdims=True), np.argmax(x, 1, keepdims=True), np.argmin(x, 0))
    for g, w in zip(got, want):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


def test_integer_inputs_sort_and_argmax_as_integers():
    labels = np.array([[3, 1, 3, -2], [0, 0, 5, 5]])
    for backend in BACKENDS:
        with helpers.use_backend(backend):
            got = tj.jit(lambda i: (tj.sort(i), tj.argsort(i), tj.argmax(i, 1), tj.argmin(i)))(
                labels)
        want = (np.sort(labels), np.argsort(labels, kind="stable"), np.argmax(labels, 1),
                np.argmin(labels))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


def test_argmax_of_an_empty_axis_and_order_say_so():
    with pytest.raises(ValueError, match="argmax: attempt to get argmax of an empty sequence"):
        tj.jit(lambda x: tj.argmax(x, 1))(np.zeros((2, 0)))
    with pytest.raises(NotImplementedError, match="order="):
        tj.jit(lambda x: tj.sort(x, order="a"))(np.zeros(3))


# ------------------------------------------------------------------------------------------------
# arrays built from traced values
# ------------------------------------------------------------------------------------------------
def _object_array(*items):
    out = np.empty(len(items), dtype=object)
    for k, v in enumerate(items):
        out[k] = v
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_object_array_of_tracers_is_an_operand_like_their_stack(backend):
    a, x = np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0])

    def f(a, x):
        o = _object_array(a[0], 2.0, a[1] * 3)          # tracers and a number
        m = _object_array(a, 2 * a)                     # rows: a [2, 2] operand
        return (o * x).sum() + tj.sum(o) + np.sum(o) + tj.mean(m * 1.0) + (x @ o)

    with helpers.use_backend(backend):
        v = tj.jit(f)(a, x)
        g = tj.jit_grad(f)(a, x)
    o = np.array([a[0], 2.0, a[1] * 3])
    np.testing.assert_allclose(v, (o * x).sum() + 2 * o.sum() + 1.5 * a.mean() + x @ o,
                               rtol=1e-15)
    np.testing.assert_allclose(g, [1 + 2 + 0.75 + 1, 9 + 6 + 0.75 + 9], rtol=1e-15)


def test_np_array_of_tracers_suggests_tracejit_stack():
    for build in (lambda a: np.array([a, a]), lambda a: np.asarray([a, 1.0]),
                  lambda a: np.r_[a, a]):
        with pytest.raises(tj.TracerError, match=r"tracejit\.stack\(\[a, b\]\)"):
            tj.jit(build)(np.ones(2))

"""The everyday spellings the per-op table cannot express: integer-valued methods (x.size(),
x.numel()), errors for spellings given twice or out of range, and numpy's meaning winning where
numpy and PyTorch give one name two meanings."""
import inspect

import numpy as np
import pytest

import helpers
import tracejit as tj
from torch_golden import torch_reference


def test_size_is_numpys_count_and_pytorchs_call():
    seen = {}

    def f(x):
        seen.update(size=x.size, called=x.size(), dim=x.size(-2), numel=x.numel(), ndim=x.dim())
        return x.sum()

    tj.jit(f)(np.zeros((2, 3, 4)))
    assert seen == {"size": 24, "called": (2, 3, 4), "dim": 3, "numel": 24, "ndim": 3}
    assert type(seen["size"] + 1) is int


def test_size_of_a_missing_dimension_names_it():
    with pytest.raises(IndexError, match="dimension 3 is out of range for shape"):
        tj.jit(lambda x: x * x.size(3))(np.zeros((2, 3)))


@pytest.mark.parametrize("call, message", [
    (lambda x: tj.sum(x, 0, dim=1), "sum: got both axis= and dim="),
    (lambda x: x.mean(keepdims=True, keepdim=True), "mean: got both keepdims= and keepdim="),
    (lambda x: tj.clip(x, a_min=0.0, min=1.0), "clip: got both a_min= and min="),
    (lambda x: tj.std(x, ddof=1, correction=1), "var: got both ddof= and correction="),
])
def test_a_parameter_spelled_twice_is_an_error(call, message):
    with pytest.raises(TypeError, match=message):
        tj.jit(call)(np.ones((2, 3)))


def test_numpy_meaning_wins_where_the_names_clash():
    x = np.arange(24.0).reshape(2, 3, 4)
    # x.transpose(2, 0, 1) is numpy's permutation, x.max(1) the values only, x.std() ddof=0
    t, m, s = tj.jit(lambda x: (x.transpose(2, 0, 1), x.max(1), x.std()))(x)
    np.testing.assert_array_equal(t, x.transpose(2, 0, 1))
    np.testing.assert_array_equal(m, x.max(1))
    np.testing.assert_allclose(s, x.std(), rtol=1e-15)


def test_var_past_the_sample_size_is_inf_as_numpy():
    x = np.array([1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"), np.errstate(divide="ignore"):
        want = np.var(x, ddof=3)
    assert want == np.inf and tj.jit(lambda x: tj.var(x, ddof=3))(x) == np.inf


def test_t_and_mT_reject_wrong_ranks():
    with pytest.raises(ValueError, match="t\\(\\) expects at most 2 dimensions"):
        tj.jit(lambda x: x.t())(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="mT needs at least 2 dimensions"):
        tj.jit(lambda x: x.mT)(np.ones(3))


def test_view_as_a_dtype_is_refused():
    with pytest.raises(TypeError, match="view: only shapes"):
        tj.jit(lambda x: x.view(np.float32))(np.ones(3))


def test_flatten_range_must_be_ordered():
    with pytest.raises(ValueError, match="start_dim 2 comes after end_dim 1"):
        tj.jit(lambda x: x.flatten(2, 1))(np.ones((2, 3, 4)))


# ------------------------------------------------------------------------------------------------
# rearranging arrays: what the table cannot hold (lists of results, errors, every slice step)
# ------------------------------------------------------------------------------------------------
STEPS = [slice(None, None, -1), slice(-1, 0, -2), slice(3, None, -3), slice(1, 3, -1),
         slice(10, -10, -4), slice(None, 1, -1)]


@pytest.mark.parametrize("index", STEPS, ids=repr)
def test_negative_steps_read_and_scatter_like_numpy(index):
    x = np.arange(6.0 * 5).reshape(6, 5)
    ct = np.arange(np.size(x[index, ::-2])).reshape(x[index, ::-2].shape) + 1.0
    with np.errstate(all="ignore"):
        got = tj.jit(lambda x: x[index, ::-2])(x)
        g = tj.jit_grad(lambda x: (x[index, ::-2] * ct).sum())(x)
    np.testing.assert_array_equal(got, x[index, ::-2])
    want = np.zeros_like(x)
    want[index, ::-2] = ct
    np.testing.assert_array_equal(g, want)


def test_split_returns_numpys_pieces():
    x = np.arange(14.0).reshape(2, 7)
    for got, want in zip(tj.jit(lambda x: tj.array_split(x, 3, 1))(x), np.array_split(x, 3, 1)):
        np.testing.assert_array_equal(got, want)
    pieces = tj.jit(lambda x: np.split(x, [2, 5], axis=1))(x)
    assert [p.shape for p in pieces] == [(2, 2), (2, 3), (2, 2)]


@pytest.mark.parametrize("call, error, message", [
    (lambda x: tj.split(x, 3), ValueError, "does not split into 3 equal sections"),
    (lambda x: tj.pad(x, 4, mode="reflect"), NotImplementedError, "pads axis 0 of length 4 by at "
                                                                  "most 3"),
    (lambda x: tj.pad(x, 1, mode="mean"), NotImplementedError, "mode 'mean' is not supported"),
    (lambda x: tj.pad(x, -1), ValueError, "pad_width must be non-negative"),
    (lambda x: tj.repeat(x, [1, 2]), ValueError, "one per element of an axis of length 4"),
    (lambda x: tj.fliplr(x), ValueError, "at least 2-d"),
    (lambda x: tj.moveaxis(x, 0, 3), ValueError, "axis 3 is out of bounds"),
])
def test_rearranging_rejects_what_numpy_would_not_answer_the_same(call, error, message):
    with pytest.raises(error, match=message):
        tj.jit(call)(np.ones(4))


def test_eager_rearranging_on_numpy_arrays():
    m = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(tj.pad(m, 1, mode="edge"), np.pad(m, 1, mode="edge"))
    np.testing.assert_array_equal(tj.roll(m, 5), np.roll(m, 5))
    np.testing.assert_array_equal(tj.diag(m), np.diag(m))


# ------------------------------------------------------------------------------------------------
# products: exact gradients where elements are zero (no division by the product)
# ------------------------------------------------------------------------------------------------
def test_prod_gradient_at_zeros_is_the_product_of_the_others():
    x = np.array([[2.0, 0.0, 3.0, 5.0, 0.5], [0.0, 0.0, 4.0, 1.0, 2.0]])
    g = tj.jit_grad(lambda x: tj.prod(x, 1).sum())(x)
    want = np.array([[np.prod(np.delete(r, i)) for i in range(5)] for r in x])
    np.testing.assert_array_equal(g, want)


def test_cumprod_gradient_at_a_zero():
    x = np.array([2.0, 0.0, 3.0, 0.5])
    g = tj.jit_grad(lambda x: tj.cumprod(x).sum())(x)
    # d/dx1 of x0 + x0 x1 + x0 x1 x2 + x0 x1 x2 x3 at x1 = 0: x0 + x0 x2 + x0 x2 x3
    np.testing.assert_array_equal(g, [1.0, 2.0 + 6.0 + 3.0, 0.0, 0.0])


def test_prod_of_an_empty_axis_is_one():
    np.testing.assert_array_equal(tj.jit(lambda x: tj.prod(x, 1))(np.ones((2, 0))), [1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# elementwise composites: numpy's values over the whole float64 range, within a few ulps
# ------------------------------------------------------------------------------------------------
def _ulps(got, want):
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(all="ignore"):
        err = np.abs(got - want) / np.spacing(np.abs(want))
    return float(np.max(np.where(same, 0.0, err)))


_RNG = np.random.default_rng(11)
WIDE = np.concatenate([_RNG.normal(size=300) * 10.0 ** _RNG.uniform(-20, 2.5, 300),
                       [0.0, -0.0, 1e-300, -1e-310, 709.0, 710.2, -710.2, 750.0, -750.0,
                        np.inf, -np.inf, np.nan, -1.0, -0.9999999]])
# measured on both backends: the most any element is off, in units in the last place
UNARY_ULPS = {"log1p": 2, "expm1": 2, "log2": 2, "log10": 3, "exp2": 1, "reciprocal": 0,
              "tan": 2, "deg2rad": 0, "rad2deg": 0, "fabs": 0, "sinh": 2, "cosh": 2}
PAIRS = (_RNG.normal(size=300) * 10.0 ** _RNG.uniform(-200, 200, 300),
         _RNG.normal(size=300) * 10.0 ** _RNG.uniform(-200, 200, 300))
PAIRS[0][:6], PAIRS[1][:6] = [0, np.inf, 3, -np.inf, np.nan, 1e-300], [0, np.inf, 3, 1, 2, 1e-300]
BINARY_ULPS = {"hypot": 2, "fmax": 0, "fmin": 0, "logaddexp": 1, "logaddexp2": 2}


@pytest.mark.parametrize("backend", ["interpreter", "llvm"])
@pytest.mark.parametrize("name", sorted(UNARY_ULPS))
def test_unary_composites_match_numpy_to_the_ulp(name, backend):
    x = np.abs(WIDE) if name in ("log2", "log10") else WIDE
    with np.errstate(all="ignore"):
        want = getattr(np, name)(x)
    with helpers.use_backend(backend), np.errstate(all="ignore"):   # numpy warns at inf too
        got = tj.jit(getattr(tj, name))(x)
    assert _ulps(got, want) <= UNARY_ULPS[name]


@pytest.mark.parametrize("backend", ["interpreter", "llvm"])
@pytest.mark.parametrize("name", sorted(BINARY_ULPS))
def test_binary_composites_match_numpy_to_the_ulp(name, backend):
    for a, b in (PAIRS, (PAIRS[0] * 1e-200, PAIRS[1]), (PAIRS[1], PAIRS[1])):
        with np.errstate(all="ignore"):
            want = getattr(np, name)(a, b)
        with helpers.use_backend(backend), np.errstate(all="ignore"):
            got = tj.jit(getattr(tj, name))(a, b)
        assert _ulps(got, want) <= BINARY_ULPS[name]


def test_logaddexp_of_equal_operands_splits_the_gradient():
    ga, gb = tj.jit_grad(lambda a, b: tj.logaddexp(a, b).sum(), argnums=(0, 1))(
        np.array([1.0, -3.0]), np.array([1.0, -3.0]))
    np.testing.assert_array_equal(ga, [0.5, 0.5])
    np.testing.assert_array_equal(gb, [0.5, 0.5])


def test_hypot_gradient_at_the_origin_is_zero():
    g = tj.jit_grad(lambda a: tj.hypot(a, a * 2.0).sum())(np.array([0.0, 3.0]))
    np.testing.assert_allclose(g, [0.0, np.sqrt(5.0)], rtol=1e-15)


def test_numpy_ufuncs_dispatch_to_the_composites():
    x = np.array([0.5, 2.0])
    got = tj.jit(lambda x: (np.log1p(x), np.sinh(x), np.hypot(x, 1.0), np.radians(x)))(x)
    for g, w in zip(got, (np.log1p(x), np.sinh(x), np.hypot(x, 1.0), np.radians(x))):
        np.testing.assert_allclose(g, w, rtol=1e-15)


@pytest.mark.parametrize("backend", ["interpreter", "llvm"])
def test_constant_boolean_masks_index_as_numpy(backend):
    """A constant mask (numpy array or list of bools) fixes the result's shape at trace time: it
    indexes as numpy does, and the gradient scatters back to the selected elements."""
    x = np.arange(24.0).reshape(2, 3, 4)
    m2 = (x[0] % 3) == 1                          # 2-d mask over axes 1, 2
    cols = [True, False, True, True]
    with helpers.use_backend(backend):
        got = tj.jit(lambda x: (x[:, m2], x[..., cols], x[np.array([False, True])]))(x)
        grad = tj.jit_grad(lambda x: (x[1, m2] ** 2).sum())(x)
    for g, want in zip(got, (x[:, m2], x[..., cols], x[np.array([False, True])])):
        np.testing.assert_array_equal(np.asarray(g), want)
    expect = np.zeros_like(x)
    expect[1][m2] = 2 * x[1][m2]
    np.testing.assert_array_equal(grad, expect)


# ------------------------------------------------------------------------------------------------
# numpy functions called on traced values: numpy's own signature binds the arguments
# ------------------------------------------------------------------------------------------------
def test_numpy_positional_arguments_mean_what_they_mean_to_numpy():
    """np.mean(x, 1, np.float64) passes dtype, not keepdims; np.var(x, 0, None, None, 1) ddof."""
    x = np.arange(12.0).reshape(3, 4) ** 1.5
    calls = (lambda x: np.mean(x, 1, np.float64), lambda x: np.var(x, 0, None, None, 1),
             lambda x: np.std(x, 0, np.float64, None, 1, True),
             lambda x: np.max(x, 0, None, True), lambda x: np.sum(x, 1, None, None, True),
             lambda x: np.cumsum(x, 0, np.float64), lambda x: np.trace(x, 1, 1, 0))
    got = tj.jit(lambda x: tuple(f(x) for f in calls))(x)
    for g, f in zip(got, calls):
        want = f(x)
        assert np.shape(g) == want.shape
        np.testing.assert_allclose(g, want, rtol=1e-14)


def test_dtype_converts_before_reducing():
    x = np.float32([[1.0, 2.0 ** -30], [3.0, 4.0]])
    got = tj.jit(lambda x: (np.sum(x, dtype=np.float64), x.sum(1, dtype=np.float64),
                            np.mean(x, 0, np.float64), np.cumprod(x, 1, np.float64),
                            np.concatenate([x, x], dtype=np.float64), np.float_power(x, 2)))(x)
    for g, w in zip(got, (np.sum(x, dtype=np.float64), x.sum(1, dtype=np.float64),
                          np.mean(x, 0, np.float64), np.cumprod(x, 1, np.float64),
                          np.concatenate([x, x], dtype=np.float64), np.float_power(x, 2))):
        assert np.asarray(g).dtype == np.float64
        np.testing.assert_array_equal(g, w)


def test_numpy_linalg_functions_take_the_last_two_axes():
    """np.linalg.trace/diagonal are not np.trace/diagonal (the first two axes)."""
    x = np.arange(24.0).reshape(2, 3, 4)
    got = tj.jit(lambda x: (np.linalg.trace(x), np.trace(x), np.linalg.diagonal(x),
                            np.diagonal(x), np.linalg.matrix_transpose(x)))(x)
    for g, w in zip(got, (np.linalg.trace(x), np.trace(x), np.linalg.diagonal(x), np.diagonal(x),
                          np.linalg.matrix_transpose(x))):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("call, message", [
    (lambda x: np.sum(x, out=np.zeros(())), r"np.sum: out=array\(0.\) is not supported"),
    (lambda x: np.var(x, mean=1.0), "np.var: mean=1.0 is not supported"),
    (lambda x: np.reshape(x, 6, order="F"), "np.reshape: order='F' is not supported"),
    (lambda x: np.linalg.det(x), "np.linalg.det is not supported"),
    (lambda x: np.take(x, x > 0, mode="wrap"), "take: mode='wrap' needs constant indices"),
])
def test_numpy_arguments_tracejit_does_not_take_are_refused_by_name(call, message):
    with pytest.raises((TypeError, NotImplementedError, tj.UnsupportedError), match=message):
        tj.jit(call)(np.ones((2, 3)))


def test_asarray_of_a_list_of_tracers_suggests_stack():
    with pytest.raises(tj.TracerError, match=r"test_ops_everyday.py:\d+.*tracejit.stack"):
        tj.jit(lambda a, b: np.asarray([a, b]))(np.ones(2), np.ones(2))


def test_pytorch_spellings_of_norm_std_and_permute():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    got = tj.jit(lambda x: (x.norm(p=1), x.norm(p="fro", dim=(1, 2)), tj.norm(x, p=np.inf, dim=2),
                            x.var(dim=1, unbiased=True), x.std(unbiased=False),
                            x.permute(dims=(2, 0, 1))))(x)
    want = (np.abs(x).sum(), np.sqrt((x ** 2).sum((1, 2))), np.abs(x).max(2), x.var(1, ddof=1),
            x.std(), x.transpose(2, 0, 1))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-14)
    with pytest.raises(TypeError, match="norm: got both ord= and p="):
        tj.jit(lambda x: x.norm(1, p=1))(x)
    with pytest.raises(TypeError, match="var: got both ddof= and unbiased="):
        tj.jit(lambda x: x.var(ddof=1, unbiased=True))(x)


# ------------------------------------------------------------------------------------------------
# PyTorch's tensor methods against PyTorch (stored), numpy's newer functions at their corners
# ------------------------------------------------------------------------------------------------
def _tensor_methods(x, m):
    """The same calls on a tracer and on a torch tensor (x float64 [3, 4], m a bool mask)."""
    return dict(
        amax=x.amax(1, keepdim=True), amin=x.amin(dim=(0, 1)), amax_all=x.amax(), expand=x[:, :1].expand(2, -1, 5),
        flip=x.flip(0, 1), roll=x.roll((1, -1), (0, 1)), roll_flat=x.roll(5),
        chunk_last=x.chunk(3, 1)[-1], chunk_count=x.chunk(3, 1)[0] * 0 + len(x.chunk(3, 1)),
        split=x.split(3, dim=1)[1], split_sizes=x.split([1, 2], 0)[1],
        masked_fill=x.masked_fill(m, -1.5), softmax=x.softmax(0), log_softmax=x.log_softmax(1),
        detach=x.detach() * x, square=x.square(), neg=x.neg(), clamp_min=x.clamp_min(0.1),
        clamp_max=x.clamp_max(-0.1), swapdims=x.swapdims(0, 1), reshape=x.reshape(shape=(2, 6)),
        contiguous=x.contiguous(), double=x.float().double())


def test_tensor_methods_match_pytorch():
    rng = np.random.default_rng(11)
    x, m = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)) > 0.3
    want = torch_reference("ops_everyday-tensor-methods",
                           lambda torch: {k: v.numpy() for k, v in _tensor_methods(
                               torch.tensor(x), torch.tensor(m)).items()})
    got = tj.jit(lambda x: _tensor_methods(x, m))(x)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-7 if k == "double" else 1e-14,
                                   err_msg=k)


def test_float_and_double_convert_and_repeat_is_numpys():
    x = np.arange(6.0).reshape(2, 3)
    f, d, r = tj.jit(lambda x: (x.float(), x.float().double(), x.repeat(2, axis=1)))(x)
    assert f.dtype == np.float32 and d.dtype == np.float64
    np.testing.assert_array_equal(r, x.repeat(2, axis=1))   # not PyTorch's tiling


@pytest.mark.parametrize("call, error, message", [
    (lambda x: x.chunk(0), ValueError, "chunks must be a positive int"),
    (lambda x: x.flip(), TypeError, "flip: expects the dimensions"),
    (lambda x: x.split([1, 1], 1), ValueError, "do not add up to the length 3"),
    (lambda x: x.expand(-1, 3, 4), ValueError, "-1 is not allowed for the new leading"),
    (lambda x: np.max(x, where=x > 0), ValueError, "needs initial= to use a where= mask"),
    (lambda x: np.quantile(x, x[0, 0]), TypeError, "q must be a constant"),
    (lambda x: np.quantile(x, 1.5), ValueError, r"in the range \[0, 1\]"),
    (lambda x: np.median(x, axis=0, out=x), TypeError, "out= writes in place"),
    (lambda x: np.percentile(x, 50, method="nearest"), NotImplementedError, "method='linear'"),
    (lambda x: np.cov(x, fweights=[1, 2, 1]), NotImplementedError, "fweights="),
    (lambda x: np.interp(x, [0.0, 1.0], [1.0, 2.0], period=2.0), NotImplementedError,
     "period="),
    (lambda x: np.interp(x, x, x[0]), ValueError, "xp must be 1-d"),
    (lambda x: np.convolve(x[0], x[1], "middle"), ValueError, "mode must be 'full', 'same'"),
    (lambda x: np.correlate(x, x[0]), ValueError, "a must be a non-empty 1-d array"),
    (lambda x: np.meshgrid(x[0], indexing="yx"), ValueError, "indexing must be 'xy' or 'ij'"),
    (lambda x: np.average(x, weights=x[0]), TypeError, "axis must be specified"),
    (lambda x: np.average(x, axis=0, weights=x[0]), ValueError, "length of weights 3 differs"),
])
def test_numpy_functions_refuse_what_they_cannot_answer(call, error, message):
    with pytest.raises(error, match=message):
        tj.jit(call)(np.ones((2, 3)))


def test_signs_steps_and_floor_division_at_their_corners():
    a = np.array([0.0, -0.0, 1.0, -2.5, 1.0, 7.0, -7.0, np.inf])
    b = np.array([-0.0, 3.0, 0.1, 0.0, -0.0, -2.0, 2.0, 1.0])
    with np.errstate(all="ignore"):
        got = tj.jit(lambda a, b: (np.signbit(a), np.copysign(a + 1.0, b), np.heaviside(a, b),
                                   a // b, np.floor_divide(a, 0.1), a // 0.5))(a, b)
        want = (np.signbit(a), np.copysign(a + 1.0, b), np.heaviside(a, b), a // b,
                np.floor_divide(a, 0.1), a // 0.5)
    for g, w in zip(got, want):   # 1.0 // 0.1 is 9.0 in numpy (not floor(10.000000000000002))
        np.testing.assert_array_equal(g, w)
    i = np.array([7, -7, 6, 0, 2 ** 24])   # (2**24 + 1, the divisor below, is not a float32)
    ints = tj.jit(lambda i: (i // 3, -7 // i, i // 0, i // 16777217))(i)
    with np.errstate(all="ignore"):
        want = (i // 3, -7 // i, i // 0, i // 16777217)
    for g, w in zip(ints, want):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


def test_sinc_gradient_at_zero_and_isclose_of_infinities():
    g = tj.jit_grad(lambda x: np.sinc(x).sum())(np.array([0.0, 0.5]))
    assert g[0] == 0.0 and np.isclose(g[1], (np.pi * 0.5 * np.cos(np.pi / 2) - 1) / 0.5 ** 2
                                      / np.pi)
    a = np.array([np.inf, -np.inf, np.nan, 1.0, np.inf])
    b = np.array([np.inf, np.inf, np.nan, 1.0 + 1e-9, 1e308])
    got = tj.jit(lambda a, b: (np.isclose(a, b), np.isclose(a, b, equal_nan=True),
                               tj.allclose(a[3:4], b[3:4])))(a, b)
    np.testing.assert_array_equal(got[0], np.isclose(a, b))
    np.testing.assert_array_equal(got[1], np.isclose(a, b, equal_nan=True))
    assert got[2].shape == () and got[2].dtype == np.bool_ and got[2]


def test_allclose_in_an_if_asks_for_concrete_values():
    def f(x):
        if np.allclose(x, 0.0):
            return x
        return x * 2
    with pytest.raises(tj.TracerError, match=r"bool\(\)"):
        tj.jit(f)(np.ones(3))


def test_count_nonzero_and_eager_calls_on_numpy_arrays():
    x = np.array([[0.0, 1.5, -2.0], [0.0, 0.0, 3.0]])
    c = tj.jit(lambda x: (np.count_nonzero(x), np.count_nonzero(x, axis=0)))(x)
    assert c[0].dtype == np.int64 and c[0] == 3
    np.testing.assert_array_equal(c[1], [0, 1, 2])
    np.testing.assert_allclose(tj.median(x, axis=1), np.median(x, axis=1), rtol=1e-15)
    np.testing.assert_allclose(tj.convolve(x[0], x[1], "same"), np.convolve(x[0], x[1], "same"))
    np.testing.assert_allclose(tj.cov(x), np.cov(x), rtol=1e-14)


def test_np_r_of_traced_values_names_the_users_line():
    line = inspect.currentframe().f_lineno + 2
    with pytest.raises(tj.TracerError, match=rf"at test_ops_everyday\.py:{line}:.*concatenate"):
        tj.jit(lambda x: np.r_[x, x])(np.ones(3))

"""Numbers a user can trust at the edges: gradients at the points where a naive chain rule meets
0 * inf, PyTorch's class axis for N-d losses, Python numbers in lists of operands, the dtype of a
reduced boolean mask, "same"/"valid" convolution padding, and the errors for bad keyword values.

Every test runs on the reference interpreter and on the native backend. Oracles: hand-derived
derivatives, float64 central differences of independent numpy references (tests/optable.py),
and PyTorch's documented conventions.
"""
import inspect
import os
import re

import numpy as np
import pytest

import helpers
import tracejit
from optable import ref_conv, ref_log_softmax
from tracejit import jit, jit_grad, nn

HERE = os.path.basename(__file__)


@pytest.fixture(params=["interpreter", "llvm"], autouse=True)
def backend(request):
    with helpers.use_backend(request.param):
        yield request.param


def fd_grad(f, x):
    """float64 central differences of the scalar numpy function `f` at `x` (every element)."""
    ((_, ders),) = helpers.numeric_grad(f, [np.array(x, np.float64)], (0,)).values()
    return ders.reshape(np.shape(x))


# ------------------------------------------------------------------------------------------------
# x ** p with an array exponent
# ------------------------------------------------------------------------------------------------
COEFFS = np.array([0.5, -2.0, 3.0, 1.0])


def polynomial(x):
    return (COEFFS * x[:, None] ** np.arange(4.0)).sum()


def test_pow_array_exponent_gradient_at_zero_base():
    """d/dx x**0 is 0 also at x = 0 (PyTorch's pow_backward_self), not 0 * 0**-1 = NaN."""
    x = np.linspace(-1.0, 1.0, 5)
    got = jit_grad(polynomial)(x)
    expected = COEFFS[1] + 2 * COEFFS[2] * x + 3 * COEFFS[3] * x ** 2
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert got[2] == -2.0
    np.testing.assert_allclose(got, fd_grad(lambda v: polynomial(v), x), rtol=1e-7, atol=1e-8)


def test_pow_array_exponent_second_derivative_at_zero_base():
    """The adjoint of the adjoint stays finite: d2/dx2 of c . x**[0, 1, 2, 3] = 2 c2 + 6 c3 x."""
    x = np.linspace(-1.0, 1.0, 5)
    hess_diag = jit_grad(lambda v: jit_grad(polynomial)(v).sum())(x)
    np.testing.assert_allclose(hess_diag, 2 * COEFFS[2] + 6 * COEFFS[3] * x, rtol=1e-12,
                               atol=1e-12)


def test_pow_gradient_wrt_exponent_at_zero_base():
    """d/dp x**p at x = 0 is 0 for p >= 0 (the limit from the right) and -inf for p < 0 (0**p is
    inf there; PyTorch's pow_backward_exponent gives -inf), never NaN; elsewhere x**p log x."""
    x = np.array([0.0, 0.0, 0.0, 2.0, 0.5])
    p = np.array([0.0, 1.5, -1.0, 2.0, -0.5])
    got = jit_grad(lambda x, p: (x ** p).sum(), argnums=1)(x, p)
    expected = [0.0, 0.0, -np.inf, 4 * np.log(2.0), 0.5 ** -0.5 * np.log(0.5)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_pow_mixed_second_derivative_is_finite_at_zero_base():
    """d/dp of the x-gradient of x**p at x = 0, p in {0, 1, 2}: p * x**(p-1) has d/dp
    x**(p-1) + p x**(p-1) log x = 1 at p = 1 and 0 at p = 2; at p = 0 the x-gradient is 0 for
    every p near 0 as well as at it (by the convention above), so its p-derivative is finite."""
    x = np.zeros(3)
    p = np.array([0.0, 1.0, 2.0])
    mixed = jit_grad(lambda x, p: jit_grad(lambda a, b: (a ** b).sum())(x, p).sum(),
                     argnums=1)(x, p)
    assert np.all(np.isfinite(mixed)), mixed
    np.testing.assert_allclose(mixed[1:], [1.0, 0.0], atol=1e-12)


# ------------------------------------------------------------------------------------------------
# std and var where they are identically zero
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x, axis", [
    (np.array([[1.0, 2.0, 3.0]]), 0),          # a reduction of size 1
    (np.array(2.0), None),                      # a 0-d array
    (np.array([[1.5, 1.5, 1.5], [0.0, 1.0, 3.0]]), 1),   # a constant row beside a varying one
], ids=["size-1-axis", "0-d", "constant-row"])
def test_std_gradient_where_std_is_zero(x, axis):
    """std is |x - mean|-like where it is zero: its gradient there is 0 (PyTorch masks it; float64
    central differences agree), not inf * 0 = NaN; the second derivative stays finite too."""
    def ref(v):
        return np.std(v, axis=axis).sum()

    grad = jit_grad(lambda v: tracejit.std(v, axis=axis).sum())
    got = grad(x)
    np.testing.assert_allclose(got, fd_grad(ref, x), rtol=1e-6, atol=1e-7)
    zero_rows = np.std(x, axis=axis, keepdims=True) == 0
    assert np.all(np.where(zero_rows, got, 0.0) == 0.0)
    hess = jit_grad(lambda v: grad(v).sum())(x)
    assert np.all(np.isfinite(hess)), hess
    var_grad = jit_grad(lambda v: tracejit.var(v, axis=axis).sum())(x)
    np.testing.assert_allclose(var_grad, fd_grad(lambda v: np.var(v, axis=axis).sum(), x),
                               rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# cross_entropy and the class axis
# ------------------------------------------------------------------------------------------------
def ref_cross_entropy_nd(logits, target, reduction="mean"):
    """PyTorch's cross_entropy for [N, C, d1, ...] logits: the class axis is 1."""
    logp = ref_log_softmax(logits, axis=1)
    if np.asarray(target).dtype.kind in "iu":
        per = -np.take_along_axis(logp, np.expand_dims(target, 1), axis=1)[:, 0]
    else:
        per = -np.sum(target * logp, axis=1)
    return {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction](per)


ND_RNG = helpers.rng_for("cross_entropy-nd")
LOGITS_3D = ND_RNG.normal(size=(2, 3, 3))
LABELS_2D = np.array([[0, 2, 1], [1, 1, 0]])
LOGITS_4D = ND_RNG.normal(size=(2, 4, 3, 2))
LABELS_3D = ND_RNG.integers(0, 4, size=(2, 3, 2))
PROBS_4D = ND_RNG.dirichlet(np.ones(4), size=(2, 3, 2)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("logits, target", [
    (LOGITS_3D, LABELS_2D), (LOGITS_4D, LABELS_3D), (LOGITS_4D, PROBS_4D),
], ids=["3d-indices", "4d-indices", "4d-probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_class_axis_is_dim_1(logits, target, reduction):
    fn = jit(lambda x: nn.cross_entropy(x, target, reduction=reduction))
    expected = ref_cross_entropy_nd(logits, target, reduction)
    np.testing.assert_allclose(fn(logits), expected, rtol=1e-12)
    if reduction != "none":
        got = jit_grad(lambda x: nn.cross_entropy(x, target, reduction=reduction))(logits)
        fd = fd_grad(lambda x: ref_cross_entropy_nd(x, target, reduction), logits)
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)


def test_cross_entropy_3d_by_hand():
    """[N=1, C=2, d1=2] logits x[0, c, d]: position 0 has class logits (0, 0), position 1 has
    (log 3, 0); with label 1 at both the losses are log 2 and log 4 (the last axis as class
    axis would give log(4/3) and log 2)."""
    x = np.array([[[0.0, np.log(3.0)], [0.0, 0.0]]])
    got = jit(lambda v: nn.cross_entropy(v, np.array([[1, 1]]), reduction="none"))(x)
    np.testing.assert_allclose(got, [[np.log(2.0), np.log(4.0)]], rtol=1e-14)


def test_out_of_range_class_index_names_the_user_line():
    def loss(x):
        return nn.cross_entropy(x, np.array([[0, 3, 1], [1, 1, 0]]))  # <- raises
    line = inspect.getsourcelines(loss)[1] + 1
    with pytest.raises(IndexError, match=re.escape(f"(at {HERE}:{line})")) as info:
        jit(loss)(LOGITS_3D)
    assert "3" in str(info.value) and "[0, 3)" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Python numbers among array operands take the arrays' dtype
# ------------------------------------------------------------------------------------------------
LIST_OPS = {
    "stack-first": (lambda x: tracejit.stack([x, 0.1]), lambda x: np.stack([x, 0.1])),
    "stack-second": (lambda x: tracejit.stack([0.1, x, 0.3]), lambda x: np.stack([0.1, x, 0.3])),
    "concatenate": (lambda x: tracejit.concatenate([tracejit.reshape(x, (1,)), [0.1]]),
                    lambda x: np.concatenate([x.reshape(1), [0.1]])),
    "where": (lambda x: tracejit.where(x > 5, x, 0.1), lambda x: np.where(x > 5, x, 0.1)),
    "maximum": (lambda x: tracejit.maximum(x, 0.1), lambda x: np.maximum(x, 0.1)),
    "clip": (lambda x: tracejit.clip(x, 0.1, 0.7), lambda x: np.clip(x, 0.1, 0.7)),
}


@pytest.mark.parametrize("name", sorted(LIST_OPS))
@pytest.mark.parametrize("mode", ["jit", "eager"])
def test_python_numbers_take_the_array_dtype(name, mode):
    fn, ref = LIST_OPS[name]
    x = np.array(0.0)
    got = (jit(fn) if mode == "jit" else fn)(x)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, ref(x))   # 0.1 exactly, not float32(0.1)


# ------------------------------------------------------------------------------------------------
# reductions of boolean masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, fn, ref", [
    ("sum", lambda w: (w > 0).sum(), lambda w: (w > 0).sum()),
    ("mean", lambda w: tracejit.mean(w > 0), lambda w: (w > 0).mean()),
    ("sum-and", lambda w: tracejit.sum(tracejit.logical_and(w > 0, w < 2)),
     lambda w: ((w > 0) & (w < 2)).sum()),
    ("sum-reshaped", lambda w: tracejit.reshape(w > 0, (2, 2)).sum(0),
     lambda w: (w > 0).reshape(2, 2).sum(0)),
])
def test_bool_reduction_has_the_compared_float_dtype(dtype, name, fn, ref):
    w = np.array([1.0, -1.0, 2.0, 0.5], dtype)
    got = jit(fn)(w)
    assert got.dtype == dtype, f"{name}: {got.dtype}"
    np.testing.assert_allclose(got, ref(w), rtol=1e-7)


def test_bool_reduction_in_a_float64_loss_keeps_float64_and_its_zero_gradient():
    w = np.array([1.0, -1.0, 2.0, 1e-9])

    def loss(w):
        return (w * w).sum() + (w > 0).sum() * 0.1

    assert jit(lambda w: (w > 0).sum() * 0.1)(w) == 3 * 0.1    # float32 would round 0.1
    value = jit(loss)(w)
    assert value.dtype == np.float64 and value == (w * w).sum() + 3 * 0.1
    np.testing.assert_array_equal(jit_grad(loss)(w), 2 * w)


# ------------------------------------------------------------------------------------------------
# convolution padding "same" / "valid"
# ------------------------------------------------------------------------------------------------
def ref_conv_same(x, w, b=None):
    """PyTorch's padding="same" (stride 1): total padding k - 1 per spatial dim, the odd one on
    the right/bottom."""
    nsp = w.ndim - 2
    pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in w.shape[2:]]
    xp = np.pad(x, [(0, 0)] * (x.ndim - nsp) + pads)
    return ref_conv(xp, w, b)


CONV_SAME = {
    "conv2d-k3": (nn.conv2d, (2, 3, 5, 6), (4, 3, 3, 3)),
    "conv2d-k2x4-even": (nn.conv2d, (1, 2, 5, 5), (3, 2, 2, 4)),
    "conv2d-k1x2-unbatched": (nn.conv2d, (2, 4, 3), (2, 2, 1, 2)),
    "conv1d-k4-even": (nn.conv1d, (2, 3, 7), (2, 3, 4)),
    "conv1d-k3": (nn.conv1d, (2, 2, 6), (3, 2, 3)),
}


@pytest.mark.parametrize("name", sorted(CONV_SAME))
def test_conv_padding_same(name):
    conv, xs, ws = CONV_SAME[name]
    rng = helpers.rng_for("conv-same", name)
    x, w, b = rng.normal(size=xs), rng.normal(size=ws), rng.normal(size=ws[0])
    got = jit(lambda x, w, b: conv(x, w, b, padding="same"))(x, w, b)
    expected = ref_conv_same(x, w, b)
    assert got.shape == expected.shape and got.shape[-len(ws) + 2:] == xs[-len(ws) + 2:]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    ct = rng.normal(size=expected.shape)
    gx, gw = jit_grad(lambda x, w: (conv(x, w, padding="same") * ct).sum(), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, fd_grad(lambda v: (ref_conv_same(v, w) * ct).sum(), x),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gw, fd_grad(lambda v: (ref_conv_same(x, v) * ct).sum(), w),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("conv, xs, ws, stride", [
    (nn.conv2d, (1, 2, 6, 6), (3, 2, 3, 3), 2), (nn.conv1d, (1, 2, 9), (3, 2, 3), 3)])
def test_conv_padding_valid(conv, xs, ws, stride):
    rng = helpers.rng_for("conv-valid", len(xs))
    x, w = rng.normal(size=xs), rng.normal(size=ws)
    got = jit(lambda x, w: conv(x, w, stride=stride, padding="valid"))(x, w)
    np.testing.assert_allclose(got, ref_conv(x, w, stride=stride), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# bad keyword values name the parameter and the value
# ------------------------------------------------------------------------------------------------
X4 = np.ones((1, 2, 5, 5))
W4 = np.ones((3, 2, 3, 3))
X3 = np.ones((1, 2, 5))
W3 = np.ones((3, 2, 3))


@pytest.mark.parametrize("call, pattern", [
    (lambda: nn.conv2d(X4, W4, stride=2, padding="same"), r"padding='same'.*stride"),
    (lambda: nn.conv1d(X3, W3, stride=(2,), padding="same"), r"padding='same'.*stride"),
    (lambda: nn.conv2d(X4, W4, padding="full"), r"padding.*'full'"),
    (lambda: nn.conv2d(X4, W4, padding=-1), r"padding.*-1"),
    (lambda: nn.conv2d(X4, W4, padding=1.5), r"padding.*1\.5"),
    (lambda: nn.conv2d(X4, W4, stride=0), r"stride.*0"),
    (lambda: nn.conv2d(X4, W4, stride=(1, 2, 3)), r"stride.*\(1, 2, 3\)"),
    (lambda: nn.conv1d(X3, W3, stride="2"), r"stride.*'2'"),
    (lambda: nn.conv1d(X3, W3, padding="half"), r"padding.*'half'"),
    (lambda: nn.max_pool2d(X4, kernel_size=0), r"kernel_size.*0"),
    (lambda: nn.max_pool2d(X4, 2, padding="same"), r"padding.*'same'"),
    (lambda: nn.avg_pool1d(X3, kernel_size=(2, 2)), r"kernel_size.*\(2, 2\)"),
    (lambda: nn.avg_pool2d(X4, 2, stride=-1), r"stride.*-1"),
    (lambda: nn.max_pool1d(X3, 2, padding=True), r"padding.*True"),
    (lambda: nn.mse_loss(X3, X3, reduction="avg"), r"reduction.*'avg'"),
    (lambda: nn.cross_entropy(X3[0], np.array([0, 1]), reduction=None), r"reduction.*None"),
    (lambda: nn.softmax(X3, dim=3), r"dim.*3"),
    (lambda: nn.log_softmax(X3, dim=-4), r"dim.*-4"),
    (lambda: nn.flatten(X3, start_dim=5), r"start_dim.*5"),
])
@pytest.mark.parametrize("mode", ["jit", "eager"])
def test_bad_keyword_values_name_parameter_and_value(call, pattern, mode):
    with pytest.raises(ValueError, match=pattern) as info:
        jit(lambda: call())() if mode == "jit" else call()
    assert "invalid literal" not in str(info.value)

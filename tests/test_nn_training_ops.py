"""The activations, losses and normalisation layers of tracejit.nn beyond what the op table
(tests/optable.py) expresses: reductions against each other, class weights with ignored positions,
the branches and extremes of the numerically careful composites (softplus above its threshold,
log_sigmoid and the logit losses at |x| = 100 and beyond, erf and gelu in the tails), batch_norm's
running statistics against numpy written from PyTorch's update formulas, eval mode, and the errors.
Every test runs on the reference interpreter and on native code."""
import math

import numpy as np
import pytest

import helpers
import tracejit
from tracejit.ir.core import ShapeError
from tracejit import nn

BACKENDS = ["interpreter", "llvm"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with helpers.use_backend(request.param):
        yield request.param


def sigmoid_ref(x):
    with np.errstate(over="ignore"):     # exp(1e4) = inf gives the right limit, 0
        return 1 / (1 + np.exp(-x))


def erf_ref(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def normal_cdf_ref(x):
    return np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)), otypes=[np.float64])(x)


# ------------------------------------------------------------------------------------------------
# reductions
# ------------------------------------------------------------------------------------------------
RNG = helpers.rng_for("nn-training-ops")
X = RNG.normal(size=(5, 4))
T01 = RNG.uniform(size=(5, 4))
LABELS = np.array([3, -100, 0, 2, 1])
WEIGHT = np.array([0.5, 2.0, 1.0, 1.5])

LOSSES = {
    "bce_with_logits": lambda x, r: nn.binary_cross_entropy_with_logits(
        x, T01, WEIGHT, reduction=r, pos_weight=WEIGHT[::-1].copy()),
    "cross_entropy": lambda x, r: nn.cross_entropy(x, LABELS, WEIGHT, reduction=r,
                                                   label_smoothing=0.1),
    "nll_loss": lambda x, r: nn.nll_loss(x, LABELS, WEIGHT, reduction=r),
    "mse_loss": lambda x, r: nn.mse_loss(x, T01, reduction=r),
}
# what "mean" divides the summed losses by: the elements, or the summed weights of the target
# classes of the positions not ignored (PyTorch's normalisation of weighted class losses)
MEAN_DIVISOR = {"bce_with_logits": X.size, "mse_loss": X.size,
                "cross_entropy": WEIGHT[[3, 0, 2, 1]].sum(), "nll_loss": WEIGHT[[3, 0, 2, 1]].sum()}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sum_and_mean_reduce_the_per_element_losses(name, backend):
    f = LOSSES[name]
    per = tracejit.jit(lambda x: f(x, "none"))(X)
    total = tracejit.jit(lambda x: f(x, "sum"))(X)
    mean = tracejit.jit(lambda x: f(x, "mean"))(X)
    assert per.shape == ((5,) if name in ("cross_entropy", "nll_loss") else (5, 4))
    assert total.shape == mean.shape == ()
    np.testing.assert_allclose(total, per.sum(), rtol=1e-13)
    np.testing.assert_allclose(mean, per.sum() / MEAN_DIVISOR[name], rtol=1e-13)
    if name in ("cross_entropy", "nll_loss"):
        assert per[1] == 0.0, "the ignored position adds nothing"


def test_every_position_ignored_gives_nan_mean_like_pytorch(backend):
    labels = np.array([-100, -100])
    x = X[:2]
    assert np.isnan(tracejit.jit(lambda x: nn.cross_entropy(x, labels))(x))
    assert tracejit.jit(lambda x: nn.nll_loss(x, labels, reduction="sum"))(x) == 0.0


def test_ignore_index_may_lie_outside_the_classes_but_other_indices_may_not():
    assert np.isfinite(nn.nll_loss(X, np.array([0, 9, 1, 9, 2]), ignore_index=9))
    with pytest.raises(IndexError, match=r"nll_loss: class index 9 is out of range \[0, 4\)"):
        nn.nll_loss(X, np.array([0, 9, 1, 9, 2]))


def test_class_probabilities_with_smoothing_and_weight_mean_over_positions(backend):
    """PyTorch: probabilities t become (1 - s) t + s / C, "mean" divides by N, not the weights."""
    t = RNG.dirichlet(np.ones(4), size=5)
    got = tracejit.jit(lambda x: nn.cross_entropy(x, t, WEIGHT, label_smoothing=0.3))(X)
    logp = X - X.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    expected = -(WEIGHT * (0.7 * t + 0.3 / 4) * logp).sum() / 5
    np.testing.assert_allclose(got, expected, rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# branches and extremes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softplus_is_x_itself_above_the_threshold(dtype, backend):
    x = np.array([-3.0, 0.0, 9.9, 10.1, 25.0, 1e30], dtype=dtype)
    f = tracejit.jit(lambda x: nn.softplus(x, beta=2.0, threshold=20.0))
    g = tracejit.jit_grad(lambda x: nn.softplus(x, beta=2.0, threshold=20.0).sum())(x)
    y = f(x)
    np.testing.assert_array_equal(y[3:], x[3:])             # beta * x > 20: linear, exactly
    np.testing.assert_allclose(y[:3], np.log1p(np.exp(2.0 * x[:3].astype(np.float64))) / 2,
                               rtol=2e-7 if dtype == np.float32 else 1e-15)
    np.testing.assert_array_equal(g[3:], np.ones(3, dtype))
    np.testing.assert_allclose(g[:3], 1 / (1 + np.exp(-2.0 * x[:3].astype(np.float64))),
                               rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_softplus_keeps_relative_precision_far_below_zero(backend):
    x = np.array([-50.0, -30.0, -1e-3])
    np.testing.assert_allclose(tracejit.jit(nn.softplus)(x), np.log1p(np.exp(x)), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_log_sigmoid_and_its_gradient_stay_finite_and_exact_at_large_logits(dtype, backend):
    x = np.array([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], dtype=dtype)
    y = tracejit.jit(nn.log_sigmoid)(x)
    g = tracejit.jit_grad(lambda x: nn.log_sigmoid(x).sum())(x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
    x64 = x.astype(np.float64)
    expected = np.minimum(x64, 0) - np.log1p(np.exp(-np.abs(x64)))
    tiny = np.finfo(dtype).tiny   # float32 flushes exp(-100) = 3.7e-44 (denormal) or not
    np.testing.assert_allclose(y, expected, rtol=1e-6 if dtype == np.float32 else 1e-15,
                               atol=tiny)
    np.testing.assert_allclose(g, sigmoid_ref(-x64), rtol=1e-6 if dtype == np.float32
                               else 1e-15, atol=tiny)
    assert y[1] == -100.0 and g[0] == 1.0 and g[-1] == 0.0


def test_logit_loss_at_huge_logits_is_finite_and_exact(backend):
    x = np.array([-100.0, 100.0, 1e4, -1e4])
    t = np.array([1.0, 0.0, 1.0, 0.0])
    loss = tracejit.jit(lambda x: nn.binary_cross_entropy_with_logits(x, t, reduction="none"))(x)
    g = tracejit.jit_grad(lambda x: nn.binary_cross_entropy_with_logits(x, t, reduction="sum"))(x)
    np.testing.assert_allclose(loss, [100.0, 100.0, 0.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(g, sigmoid_ref(x) - t, rtol=1e-15)


def test_elu_keeps_relative_precision_near_zero(backend):
    x = np.array([-1e-12, -1e-5, -0.3, -40.0, -1000.0])
    got = tracejit.jit(lambda x: nn.elu(x, alpha=2.0))(x)
    np.testing.assert_allclose(got, 2.0 * np.expm1(x), rtol=1e-15)
    g = tracejit.jit_grad(lambda x: nn.elu(x, alpha=2.0).sum())(x)
    np.testing.assert_allclose(g, 2.0 * np.exp(x), rtol=1e-15)


def test_leaky_relu_and_elu_take_the_slope_at_zero_like_pytorch(backend):
    zero = np.zeros(2)
    assert np.all(tracejit.jit_grad(lambda x: nn.leaky_relu(x, 0.2).sum())(zero) == 0.2)
    assert np.all(tracejit.jit_grad(lambda x: nn.elu(x, 1.5).sum())(zero) == 1.5)


def test_gelu_tanh_matches_the_formula_across_its_range(backend):
    x = np.linspace(-12, 12, 97)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    # atol: for x < 0 the formula itself cancels in 1 + tanh(...) ~ 0, so an ulp of tanh (native
    # tanh is not numpy's) is an absolute error of ulp(1) * |x| / 2, for tracejit as for PyTorch
    np.testing.assert_allclose(tracejit.jit(lambda x: nn.gelu(x, approximate="tanh"))(x),
                               expected, rtol=1e-14, atol=12 * np.finfo(float).eps)


def test_exact_gelu_keeps_relative_precision_in_the_left_tail(backend):
    """x * Phi(x) from erfc in the tail: gelu(-10) is -7.6e-23, not the 0 of 1 + erf(-7.07)."""
    x = np.array([-10.0, -5.0, -1.0, -1e-8, 0.0, 0.5, 3.0, 10.0])
    got = tracejit.jit(nn.gelu)(x)
    # relative error about x**2 * eps in the tail: the rounding of x / sqrt(2) and of its square
    # inside exp (documented at nn._erf_parts)
    np.testing.assert_allclose(got, x * normal_cdf_ref(x), rtol=5e-14)
    assert got[0] < 0


@pytest.mark.parametrize("dtype, ulps", [(np.float64, 1.0), (np.float32, 2.0)])
def test_erf_is_within_ulps_of_the_correctly_rounded_value(dtype, ulps, backend):
    x = np.concatenate([np.linspace(-7, 7, 2801), [1e-30, -1e-8, 0.999999, 1.000001]])
    x = x.astype(dtype)
    ref = erf_ref(x.astype(np.float64))
    got = tracejit.jit(nn.erf)(x)
    assert got.dtype == dtype
    err = np.abs(got - ref) / np.maximum(np.abs(ref), np.finfo(dtype).tiny)
    assert err.max() <= ulps * np.finfo(dtype).eps, f"worst at x = {x[np.argmax(err)]!r}"
    g = tracejit.jit_grad(lambda x: nn.erf(x).sum())(x.astype(np.float64))
    np.testing.assert_allclose(g, 2 / np.sqrt(np.pi) * np.exp(-x.astype(np.float64) ** 2),
                               rtol=1e-14, atol=1e-300)


def test_erf_at_infinities_and_nan(backend):
    got = tracejit.jit(nn.erf)(np.array([np.inf, -np.inf, np.nan, 40.0]))
    np.testing.assert_array_equal(got, [1.0, -1.0, np.nan, 1.0])
    g = tracejit.jit_grad(lambda x: nn.erf(x).sum())(np.array([np.inf, -np.inf, 40.0]))
    np.testing.assert_array_equal(g, [0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------------
# batch_norm: running statistics (PyTorch's formulas, written out in numpy) and eval mode
# ------------------------------------------------------------------------------------------------
def torch_batch_norm_train(x, running_mean, running_var, w, b, momentum, eps):
    """F.batch_norm(training=True): normalise with the batch mean and biased variance, update the
    running variance with the unbiased one (n / (n - 1))."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).sum(axis=axes) / n
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape) \
        + b.reshape(shape)
    return (y, (1 - momentum) * running_mean + momentum * mean,
            (1 - momentum) * running_var + momentum * var * n / (n - 1))


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 3)], ids=["NC", "NCL", "NCHW"])
def test_batch_norm_running_statistics_follow_pytorch_over_steps(shape, backend):
    rng = helpers.rng_for("batch_norm", shape)
    w, b = rng.normal(size=3), rng.normal(size=3)
    step = tracejit.jit(lambda x, m, v, w, b: nn.batch_norm(x, m, v, w, b, training=True,
                                                            momentum=0.3, eps=1e-3))
    mean, var = np.zeros(3), np.ones(3)
    ref_mean, ref_var = mean, var
    for i in range(3):
        x = rng.normal(loc=i, scale=1 + i, size=shape)
        y, mean, var = step(x, mean, var, w, b)
        ref_y, ref_mean, ref_var = torch_batch_norm_train(x, ref_mean, ref_var, w, b, 0.3, 1e-3)
        np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
        np.testing.assert_allclose(var, ref_var, rtol=1e-13)
    # eval mode normalises with the running statistics, not the batch's
    x = rng.normal(size=shape)
    got = tracejit.jit(lambda x, m, v: nn.batch_norm(x, m, v, w, b, eps=1e-3))(x, mean, var)
    c = (1, -1) + (1,) * (len(shape) - 2)
    np.testing.assert_allclose(got, (x - mean.reshape(c)) / np.sqrt(var.reshape(c) + 1e-3)
                               * w.reshape(c) + b.reshape(c), rtol=1e-12, atol=1e-12)


def test_batch_norm_returns_named_updated_statistics_only_when_it_has_some():
    x = helpers.rng_for("bn-result").normal(size=(4, 2, 3))
    r = nn.batch_norm(x, np.zeros(2), np.ones(2), training=True)
    assert isinstance(r, nn.BatchNormResult) and len(r) == 3
    out, m, v = r
    assert out is r.output and m is r.running_mean and v is r.running_var
    np.testing.assert_allclose(m, 0.1 * x.mean(axis=(0, 2)), rtol=1e-14)
    assert isinstance(nn.batch_norm(x, None, None, training=True), np.ndarray)
    assert isinstance(nn.batch_norm(x, np.zeros(2), np.ones(2)), np.ndarray)   # eval


def test_updated_running_statistics_carry_no_gradient(backend):
    x = helpers.rng_for("bn-sg").normal(size=(4, 2))

    def f(x):
        r = nn.batch_norm(x, np.zeros(2), np.ones(2), training=True)
        return (r.running_mean * 3.0).sum() + (r.running_var * 2.0).sum()

    np.testing.assert_array_equal(tracejit.jit_grad(f)(x), np.zeros_like(x))


def test_batch_norm_float32_input_keeps_float32_with_float64_statistics(backend):
    x = helpers.rng_for("bn-f32").normal(size=(4, 2)).astype(np.float32)
    out, m, v = tracejit.jit(lambda x: tuple(nn.batch_norm(x, np.zeros(2), np.ones(2),
                                                           training=True)))(x)
    assert out.dtype == m.dtype == v.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# errors name the argument, the expected and the actual
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: nn.batch_norm(np.ones((4, 2)), None, None), ValueError,
     r"batch_norm: training=False normalises with running_mean and running_var, got None"),
    (lambda: nn.batch_norm(np.ones((1, 2)), None, None, training=True), ValueError,
     r"more than 1 value per channel.*\[1, 2\]"),
    (lambda: nn.batch_norm(np.ones((4, 2)), np.zeros(3), np.ones(3)), ShapeError,
     r"running_mean of shape \[3\] must have shape \[2\]"),
    (lambda: nn.batch_norm(np.ones(4), None, None, training=True), ShapeError,
     r"\[N, C\], \[N, C, L\] or \[N, C, H, W\], got shape \[4\]"),
    (lambda: nn.batch_norm(np.ones((4, 2)), np.zeros(2), None), ValueError,
     r"running_mean and running_var or neither"),
    (lambda: nn.layer_norm(np.ones((2, 3)), 4), ShapeError,
     r"normalized_shape 4 .* last axes of input's shape \[2, 3\]"),
    (lambda: nn.layer_norm(np.ones((2, 3)), 3, weight=np.ones(2)), ShapeError,
     r"weight of shape \[2\] must have normalized_shape \[3\]"),
    (lambda: nn.cross_entropy(X, LABELS, np.ones(3)), ShapeError,
     r"cross_entropy: weight of shape \[3\] must have shape \[4\]"),
    (lambda: nn.cross_entropy(X, LABELS, label_smoothing=1.5), ValueError,
     r"label_smoothing must be a number in \[0, 1\], got 1.5"),
    (lambda: nn.nll_loss(X, LABELS, reduction="avg"), ValueError,
     r"nll_loss: reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    (lambda: nn.binary_cross_entropy_with_logits(X, T01[:, :3]), ShapeError,
     r"target of shape \[5, 3\] and input of shape \[5, 4\] differ"),
    (lambda: nn.binary_cross_entropy_with_logits(X, T01, pos_weight=np.ones(3)), ShapeError,
     r"pos_weight of shape \[3\] does not broadcast to input's shape \[5, 4\]"),
    (lambda: nn.gelu(X, approximate="fast"), ValueError,
     r"gelu: approximate must be 'none' or 'tanh', got 'fast'"),
    (lambda: nn.leaky_relu(X, negative_slope="0.1"), TypeError,
     r"leaky_relu: negative_slope must be a number, got '0.1'"),
])
def test_bad_arguments_raise_naming_them(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()

"""tracejit.check_grads, the public gradient check: it passes on correct gradients (dense and
convolutional networks, both dtypes, second order) and fails, naming the argument path, the worst
element and both values, on gradients that are deliberately wrong at first or second order."""
import re

import numpy as np
import pytest

import helpers
import tracejit
from tracejit import nn

RNG = np.random.default_rng(0)


def mlp(p, x, t):
    h = tracejit.tanh(nn.linear(x, p["w1"], p["b1"]))
    return nn.mse_loss(nn.linear(h, p["w2"], p["b2"]), t)


def mlp_args(dtype=np.float64):
    rng = helpers.rng_for("check_grads", "mlp")
    p = {"w1": rng.normal(size=(5, 4)), "b1": rng.normal(size=5),
         "w2": rng.normal(size=(3, 5)), "b2": rng.normal(size=3)}
    p = {k: v.astype(dtype) for k, v in p.items()}
    return p, rng.normal(size=(6, 4)).astype(dtype), rng.normal(size=(6, 3))


def convnet(w, b, x):
    h = nn.relu(nn.conv2d(x, w, b, padding=1))
    return (nn.avg_pool2d(h, 2) ** 2).sum() + nn.max_pool2d(h, 2).sum()


def conv_args():
    rng = helpers.rng_for("check_grads", "conv")
    return rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3), rng.normal(size=(2, 2, 6, 6))


def with_frozen_w1_element(p, x, t):
    """mlp, but the loss does not see w1[3, 2] through the gradient (stop_gradient on one element):
    its compiled derivative is 0, the true one is not."""
    mask = np.zeros((5, 4), dtype=bool)
    mask[3, 2] = True
    w1 = tracejit.where(mask, tracejit.stop_gradient(p["w1"]), p["w1"])
    return mlp({**p, "w1": w1}, x, t)


def cube_with_flat_gradient(x):
    """The value and first derivative of sum(x**3), but the gradient is a constant to autodiff
    (a straight-through estimator gone wrong): d2/dx2 is 0 where it should be 6x."""
    sg = tracejit.stop_gradient
    return (sg(x ** 3) + (x - sg(x)) * sg(3 * x ** 2)).sum()


@pytest.mark.parametrize("backend", ["llvm", "interpreter"])
def test_passes_on_a_correct_mlp_at_second_order(backend):
    with helpers.use_backend(backend):
        assert tracejit.check_grads(mlp, mlp_args(), order=2) is None


def test_passes_on_a_correct_convnet_w_r_t_several_arguments():
    tracejit.check_grads(convnet, conv_args(), argnums=(0, 1, 2), order=2)


def test_float32_arguments_take_differences_in_float64():
    p, x, t = mlp_args(np.float32)
    tracejit.check_grads(mlp, (p, x, t), argnums=(0, 1))
    # the same float32 gradient fails the float64 tolerances: the float32 ones are in use
    with pytest.raises(AssertionError, match="float32 gradient, central differences in float64"):
        tracejit.check_grads(mlp, (p, x, t), rtol=1e-12, atol=1e-12)


def test_a_function_that_computes_in_float32_is_differenced_in_float32():
    def f(x):
        return (tracejit.tanh(x.astype(np.float32)) ** 2).sum()  # float32 whatever x is
    tracejit.check_grads(f, (np.linspace(-1, 1, 7).astype(np.float32),))
    with pytest.raises(AssertionError, match="central differences in float32"):
        tracejit.check_grads(f, (np.linspace(-1, 1, 7).astype(np.float32),), rtol=0, atol=0)


def test_names_the_path_the_worst_element_and_both_values():
    args = mlp_args()
    with pytest.raises(AssertionError) as info:
        tracejit.check_grads(with_frozen_w1_element, args)
    msg = str(info.value)
    assert "the gradient w.r.t. p['w1'][3, 2] is 0.0 but central differences give" in msg, msg
    fd = float(re.search(r"central differences give (\S+) ", msg).group(1))
    w1 = args[0]["w1"]
    step = np.zeros_like(w1)
    step[3, 2] = 1e-6
    expected = (mlp({**args[0], "w1": w1 + step}, *args[1:])
                - mlp({**args[0], "w1": w1 - step}, *args[1:])) / 2e-6
    assert abs(fd - expected) < 1e-6 and abs(fd) > 1e-3
    assert "1 of 20 checked elements of p['w1'] disagree" in msg


def test_the_inner_product_test_finds_an_element_that_was_not_sampled():
    with pytest.raises(AssertionError, match=r"along a random direction t of p, <gradient, t> = "):
        tracejit.check_grads(with_frozen_w1_element, mlp_args(), max_coords=0)


def test_a_wrong_first_derivative_of_a_scalar_argument():
    with pytest.raises(AssertionError, match=r"w.r.t. x\[2\] is 2.0 but central differences "
                                             r"give 4.0000"):
        tracejit.check_grads(lambda x: (x * tracejit.stop_gradient(x)).sum(),
                             (np.array([0.5, -1.0, 2.0]),))


def test_order_2_finds_a_wrong_second_derivative():
    x = np.array([0.5, -1.0, 2.0, 1.5])
    tracejit.check_grads(cube_with_flat_gradient, (x,))  # the first derivative is right
    with pytest.raises(AssertionError) as info:
        tracejit.check_grads(cube_with_flat_gradient, (x,), order=2)
    msg = str(info.value)
    assert "the second derivative along a random direction v (H v) w.r.t. x[" in msg, msg
    assert "is 0.0 but central differences of the gradient along v give" in msg
    tracejit.check_grads(lambda x: (x ** 3).sum(), (x,), order=2)  # the honest cube passes


def test_bad_arguments_are_type_errors():
    x = np.ones(3)
    with pytest.raises(TypeError, match=r"args must be a tuple .* \(write \(x,\)"):
        tracejit.check_grads(lambda x: x.sum(), x)
    with pytest.raises(ValueError, match="argnums 2 is out of range for 1 arguments"):
        tracejit.check_grads(lambda x: x.sum(), (x,), argnums=2)
    with pytest.raises(TypeError, match="argument n: expected a float32 or float64 array, got "
                                        "int64"):
        tracejit.check_grads(lambda x, n: (x * n).sum(), (x, np.arange(3)), argnums=1)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        tracejit.check_grads(lambda x: x.sum(), (x,), order=3)


def _one_case_per_op():
    import optable
    seen, cases = set(), []
    for case in optable.GRAD_CASES:
        if case.op not in seen:
            seen.add(case.op)
            cases.append(case)
    return cases


@pytest.mark.parametrize("case", _one_case_per_op(), ids=lambda c: c.id)
def test_every_op_of_the_table_passes(case):
    """No false alarms: check_grads accepts every differentiable public op (one table case each,
    on the interpreter so that no case compiles), at second order where the table checks it."""
    ct = helpers.case_cotangent(case)

    def loss(*xs):
        y = case.fn(*xs)
        return (y * ct).sum() + (y * y).sum() * 0.5  # the square term: second order is not 0

    xs = helpers.case_inputs(case)
    with helpers.use_backend("interpreter"):
        tracejit.check_grads(loss, tuple(xs), argnums=tuple(range(len(xs))),
                             order=2 if case.second_order else 1)

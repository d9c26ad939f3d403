"""Textbook gradients (norm, products, a shared input, powers and logs, second order, conv1d) against
values worked out by hand, on the reference interpreter."""
import numpy as np
import pytest

import tracejit
from tracejit import jit_grad, nn

pytestmark = pytest.mark.usefixtures("interpreter_backend")


def arr(*xs):
    return np.array(xs, dtype=np.float64)


def test_grad_of_norm():
    g = jit_grad(lambda x: x.norm())(arr(1, 2, 2))
    np.testing.assert_allclose(g, [1 / 3, 2 / 3, 2 / 3], rtol=1e-12)


def test_sum_times_product():
    # f = (x + y) z at (-2, 5, -4): df/dx = df/dy = z = -4, df/dz = x + y = 3
    g = jit_grad(lambda x, y, z: (x + y) * z, argnums=(0, 1, 2))(
        np.array(-2.0), np.array(5.0), np.array(-4.0))
    assert all(gi.shape == () for gi in g)
    np.testing.assert_allclose(g, [-4, -4, 3], rtol=1e-12)


def test_shared_input():
    # e = (a + b)(b + 1) at (2, 1): de/da = b + 1 = 2, de/db = (b + 1) + (a + b) = 5
    da, db = jit_grad(lambda a, b: (a + b) * (b + 1), argnums=(0, 1))(np.array(2.0), np.array(1.0))
    np.testing.assert_allclose([da, db], [2, 5], rtol=1e-12)


def test_pow_and_log():
    gt, gu = jit_grad(lambda t, u: t.pow(2).sum() + u.log().sum(), argnums=(0, 1))(
        arr(1, 2, 4), arr(10, 20))
    np.testing.assert_allclose(gt, [2, 4, 8], rtol=1e-12)
    np.testing.assert_allclose(gu, [0.1, 0.05], rtol=1e-12)


def test_cube():
    np.testing.assert_allclose(jit_grad(lambda x: x.pow(3).sum())(arr(-3, 2, 5)), [27, 12, 75],
                               rtol=1e-12)


def test_norm_plus_dot():
    # x / |x| + (-10, 10) at (3, 4) = (0.6 - 10, 0.8 + 10)
    x = arr(3, 4)
    g = jit_grad(lambda x: x.norm())(x) + jit_grad(lambda x: x.dot(arr(-10, 10)))(x)
    np.testing.assert_allclose(g, [-9.4, 10.8], rtol=1e-12)


def test_second_order_through_the_gradient():
    # s1 = sum(x^2), g1 = grad s1 = 2x = (2, 4, 6); d/dx [exp(g1[0]) - exp(g1[2])]
    # = (2 exp(2), 0, -2 exp(6)) = (14.7781, 0, -806.8576)
    x = arr(1, 2, 3)
    s1_grad = jit_grad(lambda x: x.pow(2).sum())
    np.testing.assert_allclose(s1_grad(x), [2, 4, 6], rtol=1e-12)

    @jit_grad
    def outer(x):
        g1 = s1_grad(x)
        return tracejit.exp(g1[0]) - tracejit.exp(g1[2])

    g = outer(x)
    np.testing.assert_allclose(g, [14.7781, 0, -806.8576], atol=1e-4)
    np.testing.assert_allclose(g, [2 * np.exp(2), 0, -2 * np.exp(6)], rtol=1e-12)


@pytest.mark.parametrize("signal, kernel, expected", [
    ((1, 2, 3, 4), (3, 2), (7, 12, 17)),
    ((0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 4), (-1, 1), (0, 0, 0, 1, 1, 1, 1, 0, 0, 0)),
], ids=["ramp", "edge-detector"])
def test_conv1d_is_cross_correlation(signal, kernel, expected):
    x = arr(*signal).reshape(1, 1, -1)
    w = arr(*kernel).reshape(1, 1, -1)
    y = tracejit.jit(nn.conv1d)(x, w)
    np.testing.assert_array_equal(y, arr(*expected).reshape(1, 1, -1))
    # eagerly, outside any trace, too
    np.testing.assert_array_equal(nn.conv1d(x, w), y)

"""The per-op table (tests/optable.py) compiled to native code: forward against numpy, gradients
against float64 central differences, the inner-product test and second derivatives, in both dtypes;
plus every case compiled and compared with the reference interpreter, and odd-size cases (not a
multiple of the vector width, 1-element dimensions, batch 1). The kink conventions, stop_gradient
at every order and the generated broadcasting and indexing tests of tests/test_ops.py run here
natively too, as do astype and mixed precision."""
import numpy as np
import pytest

import helpers
import tracejit
from optable import GRAD_CASES, case_id
from tracejit import nn
from shared_checks import (  # noqa: F401  (run here with this module's backend)
    test_forward, test_grad, test_inner_product, test_second_order)
from test_ops import (  # noqa: F401  (run here with this module's backend)
    test_generated_basic_indexing, test_generated_broadcasting, test_gradient_conventions_at_kinks,
    test_stop_gradient_blocks_the_gradient)

BACKEND = "llvm"
pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)


@pytest.fixture
def backend():
    return BACKEND


def _run_both(make, args):
    """(native result, interpreter result) of a fresh decorated function on `args`."""
    out = {}
    for backend in ("llvm", "interpreter"):
        with helpers.use_backend(backend):
            out[backend] = make()(*args)
    return out["llvm"], out["interpreter"]


def _compare(native, interp, dtype, what):
    # float32: rounding differences (our exp/log are within 1-2 ulp of numpy's, sums associate
    # differently) are amplified by cancellation in cases like softmax of large logits
    tol = {"f64": (1e-12, 1e-12), "f32": (1e-4, 2e-5)}[dtype]
    for a, b in zip(helpers.tree_leaves(native), helpers.tree_leaves(interp)):
        assert np.asarray(a).dtype == np.asarray(b).dtype, what
        helpers.assert_close(a, b, tol, what)


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradient_matches_interpreter(case, dtype):
    args = helpers.case_inputs(case, dtype)
    grad = helpers.case_functions(case)["grad"]
    native, interp = _run_both(lambda: grad, args)
    _compare(native, interp, dtype, case_id(case))


# ------------------------------------------------------------------------------------------------
# odd sizes: vector tails, 1-element dimensions, batch 1
# ------------------------------------------------------------------------------------------------
def _elementwise_chain(x, y):
    return (tracejit.tanh(x * y + 1.0) * tracejit.exp(-x * x) + nn.sigmoid(y)).sum()


def _reductions(x, y):
    return (x.max(axis=1) * y.sum(axis=1)).sum() + x.mean(axis=0).dot(y.max(axis=0)) + \
        (x * y).sum(axis=(0, 1))


def _dense(x, w):
    return nn.mse_loss(tracejit.tanh(x @ w.T), np.zeros((x.shape[0], w.shape[0])))


def _conv_pool(x, w):
    h = nn.relu(nn.conv2d(x, w, padding=1))
    return (nn.max_pool2d(h, 2) ** 2).sum() + nn.avg_pool2d(h, 3, stride=2, padding=1).sum()


def _conv1d(x, w):
    return (nn.max_pool1d(nn.conv1d(x, w, stride=2, padding=2), 3, stride=1) ** 2).sum()


ODD = [
    ("elementwise-17x33", _elementwise_chain, [(17, 33), (17, 33)]),
    ("elementwise-1x1", _elementwise_chain, [(1, 1), (1, 1)]),
    ("elementwise-bcast", _elementwise_chain, [(19, 1), (1, 35)]),
    ("reductions-5x37", _reductions, [(5, 37), (5, 37)]),
    ("reductions-1x17", _reductions, [(1, 17), (1, 17)]),
    ("dense-17x33x19", _dense, [(17, 33), (19, 33)]),
    ("dense-batch1", _dense, [(1, 33), (3, 33)]),
    ("conv-pool-batch1-odd", _conv_pool, [(1, 3, 9, 11), (5, 3, 3, 3)]),
    ("conv-pool-17ch", _conv_pool, [(2, 17, 7, 6), (18, 17, 3, 3)]),
    ("conv1d-odd", _conv1d, [(3, 2, 23), (5, 2, 4)]),
]


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("name,fun,shapes", ODD, ids=[o[0] for o in ODD])
def test_odd_sizes(name, fun, shapes, dtype):
    rng = helpers.rng_for("odd", name)
    np_dtype = helpers.NP_DTYPES[dtype]
    args = [rng.standard_normal(s).astype(np_dtype) for s in shapes]
    native, interp = _run_both(lambda: tracejit.jit_value_and_grad(fun, argnums=(0, 1)), args)
    _compare(native, interp, dtype, name)
    if dtype == "f64":
        grads = native[1]
        fd = helpers.numeric_grad(lambda *a: float(fun(*a)), args, (0, 1), max_coords=12,
                                  rng=helpers.rng_for("odd-fd", name))
        helpers.assert_grads_match_fd(grads, fd, dtype, name)


# ------------------------------------------------------------------------------------------------
# dtypes: astype and mixed precision
# ------------------------------------------------------------------------------------------------
def test_mixed_precision_promotes_and_grads_keep_their_dtype():
    rng = helpers.rng_for("mixed")
    x32, y = rng.standard_normal(40).astype(np.float32), rng.standard_normal(40)
    out = tracejit.jit(lambda a, b: a * b)(x32, y)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, x32.astype(np.float64) * y)
    g32, g64 = tracejit.jit_grad(lambda a, b: (tracejit.tanh(a) * b).sum(), argnums=(0, 1))(x32, y)
    assert g32.dtype == np.float32 and g64.dtype == np.float64
    t = np.tanh(x32.astype(np.float64))
    # float32 rounding of tanh, amplified by the cancellation in 1 - tanh**2
    np.testing.assert_allclose(g32, (1 - t * t) * y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g64, t, rtol=1e-6)  # float32 tanh, then widened


def test_astype_both_ways():
    x = helpers.rng_for("astype").standard_normal(37)
    f = tracejit.jit_value_and_grad(lambda x: (x.astype(np.float32) ** 2).sum() * 3)
    value, g = f(x)
    x32 = x.astype(np.float32)
    assert value.dtype == np.float32 and g.dtype == np.float64
    np.testing.assert_allclose(value, 3 * np.sum(x32.astype(np.float64) ** 2), rtol=1e-6)
    np.testing.assert_allclose(g, 6 * x32, rtol=1e-6)
    value, g = f(x32)  # float32 -> float32 is the identity
    assert value.dtype == np.float32 and g.dtype == np.float32
    widen = tracejit.jit_value_and_grad(lambda x: (x.astype(np.float64) * 3).sum())
    value, g = widen(x32)
    assert value.dtype == np.float64 and g.dtype == np.float32
    np.testing.assert_allclose(value, 3 * x32.astype(np.float64).sum(), rtol=1e-13)
    np.testing.assert_array_equal(g, np.full(37, 3, np.float32))

"""The per-op table (tests/optable.py) on the reference interpreter: forward against numpy,
gradients against float64 central differences, the inner-product test and second derivatives.

The tests that take the `backend` fixture (kinks, stop_gradient, generated broadcasting and
indexing) are also imported by tests/test_native_ops.py, whose fixture makes them native."""
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import tracejit
import helpers
import optable
from optable import CASES, case_id
from shared_checks import (  # noqa: F401  (run here with this module's backend)
    test_forward, test_grad, test_inner_product, test_second_order)

BACKEND = "interpreter"
pytestmark = pytest.mark.usefixtures("interpreter_backend")


@pytest.fixture
def backend():
    return BACKEND


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("kink", optable.KINKS, ids=lambda k: k.id)
def test_gradient_conventions_at_kinks(kink, dtype, backend):
    helpers.check_kink(kink, backend, dtype)


# ------------------------------------------------------------------------------------------------
# the table itself
# ------------------------------------------------------------------------------------------------
OPERATORS = {"operator." + o for o in
             "+ - * / ** @ -x > >= < <= == != & | ~".split()}
METHODS = {"method." + m for m in
           "T sum mean max min reshape transpose pow exp log tanh sqrt abs sin cos relu sigmoid "
           "norm dot mv mm var std clip flatten squeeze astype".split()}


def public_ops():
    """Every op function at tracejit's top level and in tracejit.nn, by the table's names."""
    top = {name for name, obj in vars(tracejit).items()
           if callable(obj) and getattr(obj, "__module__", None) == "tracejit.ops"}
    nn = {f"nn.{name}" for name, obj in vars(tracejit.nn).items()
          if callable(obj) and getattr(obj, "__module__", None) in ("tracejit.nn", "tracejit.ops")
          and not name.startswith("_") and name not in ("op", "as_value", "result_dtype", "wrap")
          and not isinstance(obj, type)}  # result types such as BatchNormResult are not ops
    return top | nn


def test_table_covers_every_public_op():
    covered = {c.op for c in CASES}
    required = public_ops() | OPERATORS | METHODS | {"getitem"}
    issue_names = set("tanh exp log sqrt abs sin cos maximum minimum where sum mean max matmul dot "
                      "reshape transpose concatenate norm".split()) | {
        f"nn.{n}" for n in "relu sigmoid linear conv1d conv2d max_pool1d max_pool2d avg_pool1d "
                           "avg_pool2d log_softmax softmax cross_entropy mse_loss".split()}
    assert issue_names <= required
    assert not required - covered, f"ops without a table entry: {sorted(required - covered)}"


def test_table_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("case", [c for c in CASES if any(a.distinct for a in c.inputs)],
                         ids=case_id)
def test_distinct_inputs_have_no_ties(case):
    values = np.concatenate([x.ravel() for x, a in zip(helpers.case_inputs(case), case.inputs)
                             if a.distinct])
    gaps = np.diff(np.sort(values))
    assert gaps.min(initial=np.inf) > 1e-3


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_stop_gradient_blocks_the_gradient(dtype, backend):
    x = np.array([0.5, -1.0, 2.0], dtype=helpers.NP_DTYPES[dtype])
    sg = tracejit.stop_gradient
    with helpers.use_backend(backend):
        # d/dx sum(x * stop_gradient(x)) = stop_gradient(x): the second factor is a constant
        g = tracejit.jit_grad(lambda x: (x * sg(x)).sum())(x)
        # ... at every order: the inner gradient is stop_gradient(x)**2, whose gradient is zero
        inner = tracejit.jit_grad(lambda y: (y * sg(y) ** 2).sum())
        first, second = inner(x), tracejit.jit_grad(lambda x: inner(x).sum())(x)
        # and at the third: the second derivative of sum(x**3 * stop_gradient(x)) is 6 x sg(x),
        # whose own gradient is 6 sg(x) (sg(x) stays a constant however often it is differentiated)
        first_of_cube = tracejit.jit_grad(lambda y: (y ** 3 * sg(y)).sum())
        d2 = tracejit.jit_grad(lambda x: first_of_cube(x).sum())
        third = tracejit.jit_grad(lambda x: d2(x).sum())(x)
        second_of_cube = d2(x)
    for got in (g, first, second, third, second_of_cube):
        assert got.dtype == x.dtype
    np.testing.assert_array_equal(g, x)
    np.testing.assert_array_equal(first, x ** 2)
    np.testing.assert_array_equal(second, 0 * x)
    np.testing.assert_allclose(second_of_cube, 6 * x * x, rtol=1e-6)
    np.testing.assert_allclose(third, 6 * x, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# generated shapes and indices (hypothesis, derandomized so every run checks the same examples)
# ------------------------------------------------------------------------------------------------
GENERATED = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


def unbroadcast(g, shape):
    """Sum `g` over the dimensions that broadcasting added or stretched to reach g.shape."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    return g.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True)


@GENERATED
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       op=st.sampled_from(["add", "subtract", "multiply", "maximum"]))
def test_generated_broadcasting(shapes, op, backend):
    (sa, sb), out = shapes
    rng = helpers.rng_for(op, sa, sb)
    a = np.asarray(rng.permutation(int(np.prod(sa))).reshape(sa), dtype=np.float64)
    b = np.asarray(rng.permutation(int(np.prod(sb))).reshape(sb) + 0.5)  # never equals a: no ties
    ct = rng.normal(size=out)
    f = getattr(tracejit, op)
    with helpers.use_backend(backend):
        ga, gb = tracejit.jit_grad(lambda a, b: (f(a, b) * ct).sum(), argnums=(0, 1))(a, b)
        np.testing.assert_array_equal(tracejit.jit(f)(a, b), getattr(np, op)(a, b))
    da, db = {"add": (1.0, 1.0), "subtract": (1.0, -1.0), "multiply": (b, a),
              "maximum": (a > b, b > a)}[op]
    np.testing.assert_allclose(ga, unbroadcast(ct * da, sa), rtol=1e-12)
    np.testing.assert_allclose(gb, unbroadcast(ct * db, sb), rtol=1e-12)


@GENERATED
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
def test_generated_basic_indexing(data, shape, backend):
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True).filter(
        lambda ix: all(not isinstance(i, slice) or (i.step or 1) > 0
                       for i in (ix if isinstance(ix, tuple) else (ix,)))))
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    expected = x[index]
    ct = helpers.rng_for(shape, repr(index)).normal(size=np.shape(expected))
    with helpers.use_backend(backend):
        np.testing.assert_array_equal(tracejit.jit(lambda x: x[index])(x), expected)
        g = tracejit.jit_grad(lambda x: (x[index] * ct).sum())(x)
    want = np.zeros_like(x)
    want[index] = ct
    np.testing.assert_array_equal(g, want)

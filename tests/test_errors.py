"""Errors users see: Python control flow and conversions on traced values, shape mismatches,
non-scalar losses, integer arguments, a primitive without an adjoint rule. Each message names the
user's file:line (or the argument) and what to do."""
import inspect
import os
import re

import numpy as np
import pytest

import tracejit
from tracejit.ir.builder import emit
from tracejit.ir.core import primitive, shape_rules
from tracejit.ir.interpreter import impls
from tracejit import TracerError, jit, jit_grad, jit_value_and_grad, nn
from tracejit.values import to_value, wrap

pytestmark = pytest.mark.usefixtures("interpreter_backend")

HERE = os.path.basename(__file__)
MARK = "# <- raises"


def marked_line(fn) -> str:
    """'test_errors.py:N' of the line of `fn` that carries the MARK comment."""
    lines, start = inspect.getsourcelines(fn)
    (offset,) = [i for i, line in enumerate(lines) if MARK in line]
    return f"{HERE}:{start + offset}"


# ------------------------------------------------------------------------------------------------
# concretization: Python needs a concrete value that depends on a traced one
# ------------------------------------------------------------------------------------------------
def uses_if(x):
    if x.sum() > 0:  # <- raises
        return x.sum()
    return -x.sum()


def uses_while(x):
    y = x
    while (y * y).sum() > 1:  # <- raises
        y = y / 2
    return y.sum()


def uses_bool(x):
    flag = bool(x[0] > 0)  # <- raises
    return x.sum() if flag else -x.sum()


def uses_and(x):
    return ((x > 0) and x).sum()  # <- raises


def uses_float(x):
    return x.sum() * float(x[0])  # <- raises


def uses_int(x):
    return x.sum() * int(x[0])  # <- raises


def uses_item(x):
    return x.sum() * x.max().item()  # <- raises


def uses_asarray(x):
    return np.asarray(x).sum()  # <- raises


def uses_array(x):
    return x.sum() + np.array(x).sum()  # <- raises


def uses_tolist(x):
    return x.sum() * len(x.tolist())  # <- raises


def uses_helper_inside(x):
    def helper(v):
        return float(v.sum())  # <- raises
    return x.sum() * helper(x)


CONCRETIZATIONS = [uses_if, uses_while, uses_bool, uses_and, uses_float, uses_int, uses_item,
                   uses_asarray, uses_array, uses_tolist, uses_helper_inside]


@pytest.mark.parametrize("transform", [jit_grad, jit, jit_value_and_grad],
                         ids=["jit_grad", "jit", "jit_value_and_grad"])
@pytest.mark.parametrize("fn", CONCRETIZATIONS, ids=lambda f: f.__name__)
def test_concretization_names_the_line_and_the_fix(fn, transform):
    with pytest.raises(TracerError) as info:
        transform(fn)(np.array([0.5, 2.0, -1.0]))
    msg = str(info.value)
    assert marked_line(fn) in msg
    assert "depends on a traced value" in msg
    assert "tracejit.where" in msg and "static" in msg


def test_concretization_inside_a_nested_gradient():
    inner = jit_grad(uses_float)
    with pytest.raises(TracerError, match="depends on a traced value") as info:
        jit_grad(lambda x: inner(x).sum())(np.ones(3))
    assert marked_line(uses_float) in str(info.value)


def test_control_flow_on_static_values_is_fine():
    def f(x, mode):
        if mode == "double":
            return (2 * x).sum()
        return x.sum()
    np.testing.assert_array_equal(jit_grad(f)(np.ones(2), "double"), [2.0, 2.0])


# ------------------------------------------------------------------------------------------------
# shape mismatches at trace time: both shapes and the user's line
# ------------------------------------------------------------------------------------------------
def bad_broadcast(x, y):
    return (x + y).sum()  # <- raises


def bad_matmul(x, y):
    return (x @ y).sum()  # <- raises


def bad_concatenate(x, y):
    return tracejit.concatenate([x, y]).sum()  # <- raises


def bad_linear(x, y):
    return nn.linear(x, y).sum()  # <- raises


def bad_conv_channels(x, y):
    return nn.conv2d(x, y).sum()  # <- raises


def bad_mse(x, y):
    return nn.mse_loss(x, y)  # <- raises


def bad_where(x, y):
    return tracejit.where(x > 0, x, y).sum()  # <- raises


def bad_reshape(x, y):
    return x.reshape(4, 2).sum() + y.sum()  # <- raises


def bad_dot(x, y):
    return x.dot(y)  # <- raises


def bad_cross_entropy(x, y):
    return nn.cross_entropy(x, y)  # <- raises


@pytest.mark.parametrize("fn, shape_x, shape_y, patterns", [
    (bad_broadcast, (3,), (4,), (r"\[3\]", r"\[4\]")),
    (bad_matmul, (3, 4), (5, 2), (r"3,\s*4", r"5,\s*2")),
    (bad_concatenate, (2, 3), (2, 4), (r"2,\s*3", r"2,\s*4")),
    (bad_linear, (4, 5), (3, 6), (r"4,\s*5", r"3,\s*6")),
    (bad_conv_channels, (1, 3, 5, 5), (2, 4, 3, 3), (r"1,\s*3,\s*5,\s*5", r"2,\s*4,\s*3,\s*3")),
    (bad_mse, (3,), (4,), (r"\[3\]", r"\[4\]")),
    (bad_where, (2,), (3,), (r"\[2\]", r"\[3\]")),
    (bad_reshape, (2, 3), (1,), (r"2,\s*3", r"4,\s*2")),
    (bad_dot, (3,), (4,), (r"\[3\]", r"\[4\]")),
    (bad_cross_entropy, (3, 4), (3, 5), (r"3,\s*4", r"3,\s*5")),
], ids=lambda v: v.__name__ if callable(v) else None)
def test_shape_mismatch_names_both_shapes_and_the_line(fn, shape_x, shape_y, patterns):
    with pytest.raises(tracejit.ShapeError) as info:
        jit_grad(fn)(np.ones(shape_x), np.ones(shape_y))
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert marked_line(fn) in msg


def test_shape_mismatch_is_a_value_error_in_eager_mode_too():
    with pytest.raises(ValueError, match=r"\[3\].*\[4\]"):
        tracejit.add(np.ones(3), np.ones(4))


def test_pooling_window_larger_than_input():
    with pytest.raises(tracejit.ShapeError, match=r"3, 3.*kernel.*5, 5"):
        jit_grad(lambda x: nn.max_pool2d(x, 5).sum())(np.ones((1, 1, 3, 3)))


# ------------------------------------------------------------------------------------------------
# what jit_grad differentiates
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transform", [jit_grad, jit_value_and_grad],
                         ids=["jit_grad", "jit_value_and_grad"])
@pytest.mark.parametrize("fn, what", [
    (lambda x: x * 2, r"f64\[3\]"),
    (lambda x: x.sum(axis=0, keepdims=True), r"f64\[1\]"),
    (lambda x: x.reshape(3, 1) @ x.reshape(1, 3), r"f64\[3,3\]"),
], ids=["elementwise", "keepdims", "outer"])
def test_non_scalar_output_is_a_type_error(fn, what, transform):
    with pytest.raises(TypeError, match=f"scalar.*{what}"):
        transform(fn)(np.ones(3))


@pytest.mark.parametrize("transform", [jit_grad, jit], ids=["jit_grad", "jit"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.bool_, np.complex128],
                         ids=lambda d: np.dtype(d).name)
def test_non_float_array_argument_names_the_argument(dtype, transform):
    def loss(weights, labels):
        return weights.sum()
    with pytest.raises(TypeError, match=rf"argument labels: .*{np.dtype(dtype).name}"):
        transform(loss)(np.ones(3), np.ones(3, dtype=dtype))


def test_non_float_leaf_in_a_pytree_names_its_path():
    with pytest.raises(TypeError, match=r"argument params\['b'\]\[1\]: .*uint16"):
        jit_grad(lambda params: params["a"].sum())({"a": np.ones(2),
                                                   "b": [np.ones(2), np.arange(3, dtype=np.uint16)]})


def test_differentiating_a_static_argument():
    with pytest.raises(TypeError, match="argument n is differentiated"):
        jit_grad(lambda x, n: x.sum() * n, argnums=1)(np.ones(3), 2.0)


def test_not_a_function():
    with pytest.raises(TypeError, match="expects a function"):
        jit_grad(3)


def test_leaked_tracer():
    leaked = []
    jit_grad(lambda x: (leaked.append(x), x.sum())[1])(np.ones(3))
    with pytest.raises(TypeError, match="leaked tracer"):
        jit_grad(lambda y: (leaked[0] * y).sum())(np.ones(3))


# ------------------------------------------------------------------------------------------------
# indexing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index, error, match", [
    (lambda x: x[x > 0], TypeError, r"traced boolean mask bool\[3\] is not supported.*where"),
    (lambda x: x[np.array([True, False])], IndexError,
     r"boolean index of shape \[2\] does not match .* shape \[3\]"),
    (lambda x: x[5], IndexError, "index 5 is out of bounds for axis 0 with size 3"),
    (lambda x: x[0, 0], IndexError, "too many indices"),
], ids=["traced-mask", "mask-shape", "out-of-bounds", "too-many"])
def test_unsupported_indexing(index, error, match):
    with pytest.raises(error, match=match):
        jit_grad(lambda x: index(x).sum())(np.ones(3))


# ------------------------------------------------------------------------------------------------
# a primitive without an adjoint rule
# ------------------------------------------------------------------------------------------------
no_adjoint_p = primitive("test_errors_no_adjoint", "unary")
shape_rules[no_adjoint_p] = lambda x: x
impls[no_adjoint_p] = lambda x: 2 * x


def uses_no_adjoint(x):
    return wrap(emit(no_adjoint_p, to_value(x))).sum()  # <- raises


def test_missing_adjoint_rule_names_the_op_and_the_line():
    with pytest.raises(tracejit.MissingRuleError) as info:
        jit_grad(uses_no_adjoint)(np.ones(3))
    msg = str(info.value)
    assert "no adjoint rule for 'test_errors_no_adjoint'" in msg
    assert marked_line(uses_no_adjoint) in msg
    # the forward function needs no adjoint and runs
    np.testing.assert_array_equal(jit(uses_no_adjoint)(np.ones(3)), 6.0)


no_impl_p = primitive("test_errors_no_impl", "unary")
shape_rules[no_impl_p] = lambda x: x


def test_missing_interpreter_rule_names_the_op():
    with pytest.raises(tracejit.MissingRuleError,
                       match="no interpreter rule for 'test_errors_no_impl'"):
        jit(lambda x: wrap(emit(no_impl_p, to_value(x))))(np.ones(3))

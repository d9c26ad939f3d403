"""Elementwise primitives: sources (const, literal), unary and binary arithmetic, comparisons,
select and dtype conversion.

Operands of an elementwise instruction have the result's shape, or are rank-0 scalars (see ir.core).
Conventions (the same in the interpreter, the adjoint rules and the code generator):
- maximum/minimum propagate NaN like numpy; at ties each operand receives half the cotangent.
- sign(0) = 0, so d|x|/dx at 0 is 0; nn.relu is `select(x <= 0, 0, x)` (NaN propagates, as with
  numpy's maximum), so its derivative at 0 is 0.
- A partial derivative that a naive formula makes 0 * inf where the function is constant in that
  argument is 0: d a^b / da at b == 0 (also a == 0), as PyTorch's pow_backward_self.
- A zero cotangent times an infinite partial derivative stays NaN, as in PyTorch and JAX: the
  gradient of `select(x > 0, log(x), 0)` at x == 0 is 0 * (1/0) = NaN, because log's adjoint
  runs on every element. Rules do not turn ct == 0 into a zero result: that would make
  d/dx sqrt(x)**2 at 0 equal 0 instead of 1, a wrong finite number where NaN at least shows
  that the chain rule broke. Keep the untaken branch away from the singularity instead
  ("double where": `select(x > 0, log(select(x > 0, x, 1)), 0)`), as tracejit's own std and
  norm do for their square roots.
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..jvp_rules import jvp_rules
from ..core import FLOAT_DTYPES, ShapeError, TensorType, Value, primitive, shape_rules
from ..interpreter import impls

# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
const_p = primitive("const", "source")
literal_p = primitive("literal", "source")


@shape_rules.register(const_p)
def _const_shape(*, value, shape, dtype):
    return TensorType(dtype, shape)


@impls.register(const_p)
def _const_impl(*, value, shape, dtype):
    return np.full(shape, value, dtype=TensorType(dtype, shape).np_dtype)


@shape_rules.register(literal_p)
def _literal_shape(*, value):
    from ..core import dtype_of_numpy
    return TensorType(dtype_of_numpy(value.dtype), value.shape)


@impls.register(literal_p)
def _literal_impl(*, value):
    return value


def full(value, shape, dtype) -> Value:
    if dtype in FLOAT_DTYPES:
        value = float(value)
    elif dtype == "bool":
        value = bool(value)
    else:
        value = int(value)
    return emit(const_p, value=value, shape=tuple(shape), dtype=dtype)


def literal(array: np.ndarray) -> Value:
    array = np.asarray(array)
    if array.ndim == 0:   # (before ascontiguousarray, which makes a 0-d array 1-d)
        return full(array.item(), (), _dtype_name(array.dtype))
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return emit(literal_p, value=array)


def _dtype_name(dt):
    from ..core import dtype_of_numpy
    return dtype_of_numpy(dt)


def scalar(value, like: Value) -> Value:
    return full(value, (), like.dtype)


def as_value(x, like: Value) -> Value:
    return x if isinstance(x, Value) else scalar(x, like)


# ---------------------------------------------------------------------------------------------
# unary
# ---------------------------------------------------------------------------------------------
def _float_unary_shape(x):
    if x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"expects a float operand, got {x}")
    return x


def _unary(name, np_fn, float_only=True):
    p = primitive(name, "unary")
    shape_rules[p] = _float_unary_shape if float_only else (lambda x: x)
    impls[p] = lambda x: np_fn(x)
    return p


def _sign(x):
    return np.sign(x)


def _log(x):
    # log(0) = -inf and log(-1) = NaN silently, as in the native code
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x)


def _logistic(x):
    # numerically stable in both tails
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


neg_p = _unary("neg", np.negative, float_only=False)
exp_p = _unary("exp", np.exp)
log_p = _unary("log", _log)
tanh_p = _unary("tanh", np.tanh)
sqrt_p = _unary("sqrt", np.sqrt)
abs_p = _unary("abs", np.abs, float_only=False)
sin_p = _unary("sin", np.sin)
cos_p = _unary("cos", np.cos)
sign_p = _unary("sign", _sign, float_only=False)
logistic_p = _unary("logistic", _logistic)
not_p = primitive("not", "unary")
shape_rules[not_p] = lambda x: x
impls[not_p] = np.logical_not


def _unary_fn(p):
    def f(x: Value) -> Value:
        return emit(p, x)
    f.__name__ = p.name
    return f


neg, exp, log, tanh, sqrt, abs_, sin, cos, sign, logistic, logical_not = map(
    _unary_fn, (neg_p, exp_p, log_p, tanh_p, sqrt_p, abs_p, sin_p, cos_p, sign_p, logistic_p, not_p))

integer_pow_p = primitive("integer_pow", "unary")
shape_rules[integer_pow_p] = lambda x, *, y: _float_unary_shape(x)


@impls.register(integer_pow_p)
def _integer_pow_impl(x, *, y):
    return np.power(x, y) if y >= 0 else 1.0 / np.power(x, -y)


def integer_pow(x: Value, y: int) -> Value:
    return emit(integer_pow_p, x, y=int(y))


# ---------------------------------------------------------------------------------------------
# binary
# ---------------------------------------------------------------------------------------------
def _binary_shape(a, b):
    if a.dtype != b.dtype:
        raise ShapeError(f"operand dtypes differ: {a} and {b}")
    if a.shape == b.shape or not b.shape:
        return a
    if not a.shape:
        return b
    raise ShapeError(f"operand shapes differ: {a} and {b} (broadcast explicitly)")


def _compare_shape(a, b):
    return _binary_shape(a, b).with_dtype("bool")


def _binary(name, np_fn, kind="binary"):
    p = primitive(name, kind)
    shape_rules[p] = _compare_shape if kind == "compare" else _binary_shape
    impls[p] = np_fn
    return p


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(a, b)


def _pow(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.power(a, b)


add_p = _binary("add", np.add)
sub_p = _binary("sub", np.subtract)
mul_p = _binary("mul", np.multiply)
div_p = _binary("div", _div)
pow_p = _binary("pow", _pow)
max_p = _binary("max", np.maximum)
min_p = _binary("min", np.minimum)
and_p = _binary("and", np.logical_and)
or_p = _binary("or", np.logical_or)
gt_p = _binary("gt", np.greater, "compare")
ge_p = _binary("ge", np.greater_equal, "compare")
lt_p = _binary("lt", np.less, "compare")
le_p = _binary("le", np.less_equal, "compare")
eq_p = _binary("eq", np.equal, "compare")
ne_p = _binary("ne", np.not_equal, "compare")


def _binary_fn(p):
    def f(a, b) -> Value:
        if not isinstance(a, Value):
            a = scalar(a, b)
        if not isinstance(b, Value):
            b = scalar(b, a)
        return emit(p, a, b)
    f.__name__ = p.name
    return f


add, sub, mul, div, pow_, maximum, minimum, logical_and, logical_or = map(
    _binary_fn, (add_p, sub_p, mul_p, div_p, pow_p, max_p, min_p, and_p, or_p))
gt, ge, lt, le, eq, ne = map(_binary_fn, (gt_p, ge_p, lt_p, le_p, eq_p, ne_p))

select_p = primitive("select", "select")


@shape_rules.register(select_p)
def _select_shape(pred, a, b):
    if pred.dtype != "bool":
        raise ShapeError(f"select predicate must be bool, got {pred}")
    out = _binary_shape(a, b)
    if pred.shape and out.shape and pred.shape != out.shape:
        raise ShapeError(f"select predicate {pred} does not match operands {out}")
    return out.with_shape(pred.shape or out.shape)


impls[select_p] = lambda p, a, b: np.where(p, a, b)


def select(pred: Value, a, b) -> Value:
    """`a` where `pred`, else `b` (numpy's `where`)."""
    like = a if isinstance(a, Value) else b
    return emit(select_p, pred, as_value(a, like), as_value(b, like))


convert_p = primitive("convert", "convert")
shape_rules[convert_p] = lambda x, *, dtype: x.with_dtype(dtype)
impls[convert_p] = lambda x, *, dtype: x.astype(TensorType(dtype, ()).np_dtype)


def convert(x: Value, dtype: str) -> Value:
    return x if x.dtype == dtype else emit(convert_p, x, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# adjoint rules
# ---------------------------------------------------------------------------------------------
def _sum_to(ct: Value | None, x: Value) -> Value | None:
    """The cotangent of an operand that was a rank-0 scalar is the sum of the result's cotangent."""
    if ct is None or ct.shape == x.shape:
        return ct
    from .reduce import reduce_sum
    return reduce_sum(ct, tuple(range(ct.ndim)))


adjoint_rules[neg_p] = lambda ct, x: (neg(ct),)
adjoint_rules[exp_p] = lambda ct, x: (mul(ct, exp(x)),)
adjoint_rules[log_p] = lambda ct, x: (div(ct, x),)
adjoint_rules[sqrt_p] = lambda ct, x: (div(mul(ct, 0.5), sqrt(x)),)
adjoint_rules[abs_p] = lambda ct, x: (mul(ct, sign(x)),)
adjoint_rules[sin_p] = lambda ct, x: (mul(ct, cos(x)),)
adjoint_rules[cos_p] = lambda ct, x: (neg(mul(ct, sin(x))),)
adjoint_rules[sign_p] = lambda ct, x: (None,)
adjoint_rules[not_p] = lambda ct, x: (None,)


@adjoint_rules.register(tanh_p)
def _tanh_adjoint(ct, x):
    y = tanh(x)
    return (mul(ct, sub(1.0, mul(y, y))),)


@adjoint_rules.register(logistic_p)
def _logistic_adjoint(ct, x):
    y = logistic(x)
    return (mul(ct, mul(y, sub(1.0, y))),)


@adjoint_rules.register(integer_pow_p)
def _integer_pow_adjoint(ct, x, *, y):
    if y == 0:
        return (None,)
    if y == 1:
        return (ct,)
    dx = mul(x, float(y)) if y == 2 else mul(integer_pow(x, y - 1), float(y))
    return (mul(ct, dx),)


adjoint_rules[add_p] = lambda ct, a, b: (_sum_to(ct, a), _sum_to(ct, b))
adjoint_rules[sub_p] = lambda ct, a, b: (_sum_to(ct, a), _sum_to(neg(ct), b))
adjoint_rules[mul_p] = lambda ct, a, b: (_sum_to(mul(ct, b), a), _sum_to(mul(ct, a), b))


@adjoint_rules.register(div_p)
def _div_adjoint(ct, a, b):
    ct_a = div(ct, b)
    return _sum_to(ct_a, a), _sum_to(neg(mul(ct_a, div(a, b))), b)


@adjoint_rules.register(pow_p)
def _pow_adjoint(ct, a, b):
    # d a^b / da = b a^(b-1), which is 0 * 0^-1 = NaN at a == 0, b == 0 although a^0 is constant:
    # 0 there (PyTorch's pow_backward_self). The exponent b-1 is replaced by 0 where b == 0
    # instead of selecting the result, so no inf is ever formed and the adjoint of this rule
    # (the second derivative) meets no 0 * inf either.
    b_is_0 = eq(b, 0.0)
    ct_a = mul(ct, mul(b, pow_(a, sub(select(b_is_0, 1.0, b), 1.0))))
    # d a^b / db = a^b log a: 0 where a == 0 and b >= 0 (the limit from the right), -inf where
    # a == 0 and b < 0 (inf * log 0, as PyTorch's pow_backward_exponent). log never sees the
    # zero it is not used at, for the same second-derivative reason.
    zero_limit = logical_and(eq(a, 0.0), ge(b, 0.0))
    safe_log = select(zero_limit, 0.0, log(select(zero_limit, 1.0, a)))
    ct_b = mul(ct, mul(pow_(a, b), safe_log))
    return _sum_to(ct_a, a), _sum_to(ct_b, b)


def _minmax_adjoint(cmp):
    def rule(ct, a, b):
        # a share of 1 where a wins, 1/2 at ties, 0 where b wins
        share = add(convert(cmp(a, b), a.dtype), mul(convert(eq(a, b), a.dtype), 0.5))
        ct_a = mul(ct, share)
        return _sum_to(ct_a, a), _sum_to(sub(ct, ct_a), b)
    return rule


adjoint_rules[max_p] = _minmax_adjoint(gt)
adjoint_rules[min_p] = _minmax_adjoint(lt)
for _p in (gt_p, ge_p, lt_p, le_p, eq_p, ne_p, and_p, or_p):
    adjoint_rules[_p] = lambda ct, a, b: (None, None)


@adjoint_rules.register(select_p)
def _select_adjoint(ct, pred, a, b):
    zero = 0.0
    ct_a = select(pred, ct, zero) if a.dtype in FLOAT_DTYPES else None
    ct_b = select(pred, zero, ct) if b.dtype in FLOAT_DTYPES else None
    return None, _sum_to(ct_a, a), _sum_to(ct_b, b)


@adjoint_rules.register(convert_p)
def _convert_adjoint(ct, x, *, dtype):
    return (convert(ct, x.dtype) if x.dtype in FLOAT_DTYPES else None,)


adjoint_rules[const_p] = lambda ct, **params: ()
adjoint_rules[literal_p] = lambda ct, **params: ()

# ---------------------------------------------------------------------------------------------
# stop_gradient: the identity whose adjoint is zero (log_softmax's max shift, user code)
# ---------------------------------------------------------------------------------------------
stop_gradient_p = primitive("stop_gradient", "unary")
shape_rules[stop_gradient_p] = lambda x: x
impls[stop_gradient_p] = lambda x: x
adjoint_rules[stop_gradient_p] = lambda ct, x: (None,)


def stop_gradient(x: Value) -> Value:
    return emit(stop_gradient_p, x)


# ---------------------------------------------------------------------------------------------
# tangent (JVP) rules: jvp(ts, tangents, out, *primals, **params), see ir.jvp_rules. They use the
# same partial derivatives as the adjoint rules above (ties, pow's limits), so <u, J v> equals
# <J^T u, v> everywhere, kinks included.
# ---------------------------------------------------------------------------------------------
def _unary_jvp(partial):
    """The tangent t * partial(x, out) of a unary op."""
    return lambda ts, tans, out, x, **params: ts.scale(tans[0], partial(x, out, **params))


jvp_rules[neg_p] = lambda ts, tans, out, x: neg(tans[0])
jvp_rules[exp_p] = _unary_jvp(lambda x, out: out)
jvp_rules[log_p] = lambda ts, tans, out, x: div(tans[0], ts.lift(x))
jvp_rules[sqrt_p] = lambda ts, tans, out, x: div(mul(tans[0], 0.5), ts.lift(out))
jvp_rules[abs_p] = _unary_jvp(lambda x, out: sign(x))
jvp_rules[sin_p] = _unary_jvp(lambda x, out: cos(x))
jvp_rules[cos_p] = lambda ts, tans, out, x: neg(ts.scale(tans[0], sin(x)))
jvp_rules[tanh_p] = _unary_jvp(lambda x, out: sub(1.0, mul(out, out)))
jvp_rules[logistic_p] = _unary_jvp(lambda x, out: mul(out, sub(1.0, out)))
for _p in (sign_p, not_p, stop_gradient_p):
    jvp_rules[_p] = lambda ts, tans, out, x: None
for _p in (gt_p, ge_p, lt_p, le_p, eq_p, ne_p, and_p, or_p):
    jvp_rules[_p] = lambda ts, tans, out, a, b: None
jvp_rules[const_p] = lambda ts, tans, out, **params: None
jvp_rules[literal_p] = lambda ts, tans, out, **params: None


@jvp_rules.register(integer_pow_p)
def _integer_pow_jvp(ts, tans, out, x, *, y):
    if y == 0:
        return None
    if y == 1:
        return tans[0]
    return ts.scale(tans[0], mul(x, float(y)) if y == 2 else mul(integer_pow(x, y - 1), float(y)))


def _operand_tangents(ts, tans, out, a, b):
    """The two operands' tangents as tangents of the result's shape (scalars broadcast)."""
    return ts.expand(tans[0], a, out.shape), ts.expand(tans[1], b, out.shape)


@jvp_rules.register(add_p)
def _add_jvp(ts, tans, out, a, b):
    return ts.add(*_operand_tangents(ts, tans, out, a, b))


@jvp_rules.register(sub_p)
def _sub_jvp(ts, tans, out, a, b):
    ta, tb = _operand_tangents(ts, tans, out, a, b)
    return ta if tb is None else (neg(tb) if ta is None else sub(ta, tb))


@jvp_rules.register(mul_p)
def _mul_jvp(ts, tans, out, a, b):
    ta, tb = _operand_tangents(ts, tans, out, a, b)
    return ts.add(ts.scale(ta, b), ts.scale(tb, a))


@jvp_rules.register(div_p)
def _div_jvp(ts, tans, out, a, b):
    # d(a/b) = (da - (a/b) db) / b
    ta, tb = _operand_tangents(ts, tans, out, a, b)
    num = ta if tb is None else (neg(ts.scale(tb, out)) if ta is None else
                                 sub(ta, ts.scale(tb, out)))
    return div(num, ts.lift(b))


@jvp_rules.register(pow_p)
def _pow_jvp(ts, tans, out, a, b):
    # the adjoint rule's partial derivatives, with its safe exponent and safe log (see there)
    ta, tb = _operand_tangents(ts, tans, out, a, b)
    da = db = None
    if ta is not None:
        b_is_0 = eq(b, 0.0)
        da = ts.scale(ta, _full_like(mul(b, pow_(a, sub(select(b_is_0, 1.0, b), 1.0))), out))
    if tb is not None:
        zero_limit = logical_and(eq(a, 0.0), ge(b, 0.0))
        safe_log = select(zero_limit, 0.0, log(select(zero_limit, 1.0, a)))
        db = ts.scale(tb, _full_like(mul(out, safe_log), out))
    return ts.add(da, db)


def _full_like(x: Value, out: Value) -> Value:
    """`x` broadcast to `out`'s shape when it is a scalar computed from scalar operands only."""
    from .structural import broadcast_in_dim
    return x if x.shape == out.shape else broadcast_in_dim(x, out.shape, ())


def _minmax_jvp(cmp):
    def rule(ts, tans, out, a, b):
        # the adjoint's shares: 1 where a wins, 1/2 at ties, 0 where b wins
        share = _full_like(add(convert(cmp(a, b), a.dtype), mul(convert(eq(a, b), a.dtype), 0.5)),
                           out)
        ta, tb = _operand_tangents(ts, tans, out, a, b)
        return ts.add(ts.scale(ta, share), ts.scale(tb, sub(1.0, share)))
    return rule


jvp_rules[max_p] = _minmax_jvp(gt)
jvp_rules[min_p] = _minmax_jvp(lt)


@jvp_rules.register(select_p)
def _select_jvp(ts, tans, out, pred, a, b):
    ta, tb = ts.expand(tans[1], a, out.shape), ts.expand(tans[2], b, out.shape)
    if ta is None and tb is None:
        return None
    return select(ts.lift(pred), 0.0 if ta is None else ta, 0.0 if tb is None else tb)


@jvp_rules.register(convert_p)
def _convert_jvp(ts, tans, out, x, *, dtype):
    return convert(tans[0], dtype) if dtype in FLOAT_DTYPES else None


# ---------------------------------------------------------------------------------------------
# rounding, inverse trigonometry and fmod. floor/ceil/trunc/rint are piecewise constant: zero
# derivative everywhere, as JAX (their jump points are measure zero; the adjoint says nothing
# there). rint rounds half to even, as numpy's rint/round. fmod is C's fmod (the sign of the
# dividend, computed exactly); numpy's remainder is built from it in tracejit.ops.
# ---------------------------------------------------------------------------------------------
def _quiet(np_fn):
    def impl(*xs):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np_fn(*xs)
    return impl


floor_p = _unary("floor", np.floor)
ceil_p = _unary("ceil", np.ceil)
trunc_p = _unary("trunc", np.trunc)
rint_p = _unary("rint", np.rint)
atan_p = _unary("atan", np.arctan)
floor, ceil, trunc, rint, atan = map(_unary_fn, (floor_p, ceil_p, trunc_p, rint_p, atan_p))
# atan2(y, x): the angle of the point (x, y), numpy's arctan2 (signed zeros and infinities too)
atan2_p = _binary("atan2", np.arctan2)
atan2 = _binary_fn(atan2_p)


def _fmod(a, b):
    # integers: numpy's fmod gives 0 for a zero divisor (with a warning we silence), as the
    # native code does
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.fmod(a, b)


fmod_p = _binary("fmod", _fmod)
fmod = _binary_fn(fmod_p)

for _p in (floor_p, ceil_p, trunc_p, rint_p):
    adjoint_rules[_p] = lambda ct, x: (None,)
    jvp_rules[_p] = lambda ts, tans, out, x: None


def _atan_partial(x):
    return div(1.0, add(mul(x, x), 1.0))


adjoint_rules[atan_p] = lambda ct, x: (mul(ct, _atan_partial(x)),)
jvp_rules[atan_p] = _unary_jvp(lambda x, out: _atan_partial(x))


def _atan2_partials(y, x):
    """(d/dy, d/dx) of atan2(y, x) = (x, -y) / (x^2 + y^2): NaN at the origin, as JAX."""
    r2 = add(mul(x, x), mul(y, y))
    return div(x, r2), neg(div(y, r2))


@adjoint_rules.register(atan2_p)
def _atan2_adjoint(ct, y, x):
    dy, dx = _atan2_partials(y, x)
    return _sum_to(mul(ct, dy), y), _sum_to(mul(ct, dx), x)


@jvp_rules.register(atan2_p)
def _atan2_jvp(ts, tans, out, y, x):
    dy, dx = _atan2_partials(y, x)
    ty, tx = _operand_tangents(ts, tans, out, y, x)
    return ts.add(ts.scale(ty, _full_like(dy, out)), ts.scale(tx, _full_like(dx, out)))


def _fmod_quotient(a, b):
    """trunc(a / b), the multiple of b that fmod(a, b) removes: d fmod / db = -trunc(a / b)."""
    return trunc(div(a, b))


@adjoint_rules.register(fmod_p)
def _fmod_adjoint(ct, a, b):
    if a.dtype not in FLOAT_DTYPES:
        return None, None
    return _sum_to(ct, a), _sum_to(neg(mul(ct, _fmod_quotient(a, b))), b)


@jvp_rules.register(fmod_p)
def _fmod_jvp(ts, tans, out, a, b):
    if a.dtype not in FLOAT_DTYPES:
        return None
    ta, tb = _operand_tangents(ts, tans, out, a, b)
    db = None if tb is None else neg(ts.scale(tb, _full_like(_fmod_quotient(a, b), out)))
    return ts.add(ta, db)

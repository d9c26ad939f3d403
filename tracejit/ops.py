"""numpy-style operations on traced values (and, outside a trace, on numpy arrays, evaluated eagerly
through the reference interpreter).

Type rules (which float dtype an op computes in) are in tracejit/values.py. Broadcasting follows
numpy and becomes explicit `broadcast_in_dim` instructions.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import itertools
import math
import numbers

import numpy as np

from .ir import builder as irb
from .ir import lax
from .ir.prims import elementwise, structural
from .ir.prims.elementwise import (atan as _atan, atan2 as _atan2, ceil as _ceil, floor as _floor,
                                   fmod as _fmod, rint as _rint, trunc as _trunc)
from .ir.prims.sort import argsort as _argsort
from .ir.builder import Builder, api_scope, building
from .ir.core import DTYPES, INT_DTYPES, ShapeError, Value
from .ir.interpreter import interpret

from . import captures
from .tracer import Tracer
from .values import (as_bool_value, as_value, float_dtype, promote, result_dtype, to_value,
                     wrap)


# ------------------------------------------------------------------------------------------------
# op decorator: API-name scope inside a trace, eager evaluation outside
# ------------------------------------------------------------------------------------------------
_NO_VALUE = getattr(np, "_NoValue", None)   # numpy's "not passed" default
# Errors an op raises about its operands (ShapeError is a ValueError); they get the user's line.
_LOCATED = (TypeError, ValueError, IndexError, NotImplementedError)


def op(name: str):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                if irb.current() is None:
                    return _eager(fn, name, args, kwargs)
                captures.note_operands(args, kwargs)
                with api_scope(name):
                    return fn(*args, **kwargs)
            except _LOCATED as e:
                raise _located(e)
        return wrapper
    return deco


def _located(e: Exception) -> Exception:
    """`e` itself (same type, same traceback) with the user's file:line appended to its message,
    unless an inner op, the builder or a concretization error already named a line."""
    loc = irb.user_location()
    msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else None
    if msg is None or loc is None or " (at " in msg or f" at {loc}" in msg:
        return e
    e.args = (f"{msg} (at {loc})",)
    return e


def _eager(fn, name, args, kwargs):
    b = Builder(f"eager.{name}")
    with building(b), api_scope(name):
        out = fn(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        vals = [to_value(o) for o in outs]
    results = interpret(b.finish(vals), [])
    results = [np.array(r) for r in results]
    return type(out)(results) if isinstance(out, (tuple, list)) else results[0]


# ------------------------------------------------------------------------------------------------
# broadcasting (dtype promotion is in tracejit/values.py)
# ------------------------------------------------------------------------------------------------
def broadcast_shapes(*shapes):
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError("operands could not be broadcast together with shapes "
                         + " and ".join(str(list(s)) for s in shapes)) from None


def broadcast_values(*vals):
    shape = broadcast_shapes(*[v.shape for v in vals])
    return [v if (not v.shape or v.shape == shape) else lax.broadcast_to(v, shape) for v in vals] \
        if shape else list(vals)


# ------------------------------------------------------------------------------------------------
# integers (labels, indices): traced integer values stay integers in comparisons, +, -, *, maximum,
# minimum, where and layout ops when every other operand is an integer too (Python ints and numpy
# integer constants take the traced value's dtype, as Python floats do for floats); any other op
# (or a float operand) computes in float, like numpy. Integers carry no gradient.
# ------------------------------------------------------------------------------------------------
def _is_int_tracer(x) -> bool:
    return isinstance(x, Tracer) and x.value.dtype in INT_DTYPES


def int_operands_dtype(*xs) -> str | None:
    """The integer dtype an op computes in for operands `xs`, or None when it computes in float:
    at least one operand is a traced integer and all are integers (bools are not)."""
    traced = [x.value.dtype for x in xs if _is_int_tracer(x)]
    if not traced:
        return None
    for x in xs:
        if isinstance(x, Tracer):
            if x.value.dtype not in INT_DTYPES:
                return None
        elif isinstance(x, (bool, np.bool_)) or \
                (not isinstance(x, numbers.Integral) and np.asarray(x).dtype.kind not in "iu"):
            return None
    return "i64" if "i64" in traced else "i32"


def int_value(x, dtype: str | None = None) -> Value:
    """Integer operand `x` (a traced integer, an int numpy array or number) as a Value of integer
    dtype `dtype` (default: its own, int64 for Python ints); a constant that does not fit raises
    OverflowError instead of wrapping."""
    if isinstance(x, Tracer):
        v = to_value(x)
        if v.dtype not in INT_DTYPES:
            raise TypeError(f"expected an integer array, got a traced {v.type}")
        return v if dtype is None else lax.convert(v, dtype)
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu" or isinstance(x, (bool, np.bool_)):
        raise TypeError(f"expected an integer array, got {type(x).__name__} of dtype {arr.dtype}")
    dtype = dtype or ("i32" if arr.dtype == np.int32 else "i64")
    info = np.iinfo(DTYPES[dtype])
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise OverflowError(f"integer constant {arr.min() if arr.min() < info.min else arr.max()} "
                            f"does not fit {DTYPES[dtype]}")
    captures.note_constant(x)
    return lax.literal(arr.astype(DTYPES[dtype]))


def _layout_value(x) -> Value:
    """Operand of a layout op: integers (and uint32 random keys) stay integers, everything else is
    float."""
    keep = isinstance(x, Tracer) and x.value.dtype in INT_DTYPES + ("u32",)
    return to_value(x) if keep else as_value(x, result_dtype(x))


def _binary(lax_fn, a, b, ints=True):
    dt = int_operands_dtype(a, b) if ints else None
    if dt is not None:
        return wrap(lax_fn(*broadcast_values(int_value(a, dt), int_value(b, dt))))
    va, vb = broadcast_values(*promote(a, b))
    if va.shape != vb.shape and va.shape and vb.shape:  # pragma: no cover - guarded above
        raise ShapeError(f"shapes {va.shape} and {vb.shape} differ")
    return wrap(lax_fn(va, vb))


def _unary(lax_fn, x):
    return wrap(lax_fn(as_value(x, result_dtype(x))))


# ------------------------------------------------------------------------------------------------
# elementwise
# ------------------------------------------------------------------------------------------------
@op("add")
def add(a, b): return _binary(lax.add, a, b)
@op("subtract")
def subtract(a, b): return _binary(lax.sub, a, b)
@op("multiply")
def multiply(a, b): return _binary(lax.mul, a, b)
@op("divide")
def divide(a, b): return _binary(lax.div, a, b, ints=False)
@op("maximum")
def maximum(a, b): return _binary(lax.maximum, a, b)
@op("minimum")
def minimum(a, b): return _binary(lax.minimum, a, b)


@op("power")
def power(a, b):
    if isinstance(b, numbers.Number) and not isinstance(b, bool) and float(b).is_integer() \
            and builtins.abs(b) <= 64:
        return _unary(lambda v: lax.integer_pow(v, int(b)), a)
    return _binary(lax.pow_, a, b, ints=False)


@op("square")
def square(x): return power(x, 2)
@op("negative")
def negative(x): return _unary(lax.neg, x)
@op("exp")
def exp(x): return _unary(lax.exp, x)
@op("log")
def log(x): return _unary(lax.log, x)
@op("tanh")
def tanh(x): return _unary(lax.tanh, x)
@op("sqrt")
def sqrt(x): return _unary(lax.sqrt, x)
@op("abs")
def abs(x): return _unary(lax.abs_, x)
@op("sin")
def sin(x): return _unary(lax.sin, x)
@op("cos")
def cos(x): return _unary(lax.cos, x)
@op("sign")
def sign(x): return _unary(lax.sign, x)
@op("stop_gradient")
def stop_gradient(x): return _unary(lax.stop_gradient, x)


# composites with numpy's accuracy: each states the rounding it avoids --------------------------
def _finite_or_zero(x):
    """`x` where finite, else 0: for corrections that are 0 in exact arithmetic and NaN or inf
    only where their formula breaks down (at infinities, where the plain result is already
    right)."""
    return where(less(abs(x), np.inf), x, 0.0)


@op("log1p")
def log1p(x):
    """log(1 + x) to full relative precision, also where 1 + x rounds to 1 (Goldberg:
    log(w) * x / (w - 1) with w = 1 + x cancels the rounding of w). The gradient is 1 / w; the
    correction log(w) * (x / (w - 1) - 1), 0 in exact arithmetic, is added as a constant."""
    w = add(x, 1.0)
    d = subtract(w, 1.0)
    exact = equal(d, 0.0)           # |x| below half an ulp of 1: log(1 + x) = x to within x**2
    log_w = log(w)
    factor = divide(x, where(exact, 1.0, d))
    correction = stop_gradient(_finite_or_zero(multiply(log_w, subtract(factor, 1.0))))
    return where(exact, x, add(log_w, correction))


@op("expm1")
def expm1(x):
    """exp(x) - 1 to full relative precision (Kahan: (u - 1) * x / log(u) with u = exp(x)
    cancels the rounding of u). The gradient is u; the correction (u - 1) * (x / log(u) - 1), 0 in
    exact arithmetic, is added as a constant."""
    u = exp(x)
    d = subtract(u, 1.0)
    exact = equal(d, 0.0)           # |x| below half an ulp of 1: exp(x) - 1 = x
    no_log = logical_or(exact, equal(u, 0.0))
    factor = where(no_log, 1.0, divide(x, log(where(no_log, 0.5, u))))
    correction = stop_gradient(_finite_or_zero(multiply(d, subtract(factor, 1.0))))
    return where(exact, x, add(d, correction))


_LN2 = math.log(2.0)


@op("log2")
def log2(x): return multiply(log(x), 1.0 / _LN2)
@op("log10")
def log10(x): return multiply(log(x), 1.0 / math.log(10.0))
@op("exp2")
def exp2(x): return power(2.0, x)
@op("reciprocal")
def reciprocal(x): return divide(1.0, x)
@op("tan")
def tan(x): return divide(sin(x), cos(x))
@op("deg2rad")
def deg2rad(x): return multiply(x, math.pi / 180.0)
@op("rad2deg")
def rad2deg(x): return multiply(x, 180.0 / math.pi)
@op("fabs")
def fabs(x): return abs(x)


def _hyperbolic(x, odd: bool):
    """sinh (odd) or cosh: (expm1(x) -+ expm1(-x)) / 2 (no cancellation near 0 for sinh), and
    for large |x| (700 in float64, 80 in float32), where exp(x) would overflow before the result
    does, e * e / 2 with e = exp(|x| / 2)."""
    limit = 700.0 if result_dtype(x) == "f64" else 80.0
    big = greater(abs(x), limit)
    small = where(big, 0.0, x)      # each branch sees only inputs where it is chosen
    near = multiply(subtract(expm1(small), expm1(negative(small))) if odd else
                    add(add(expm1(small), expm1(negative(small))), 2.0), 0.5)
    e = exp(multiply(abs(where(big, x, limit)), 0.5))
    far = multiply(multiply(e, 0.5), e)
    return where(big, multiply(sign(x), far) if odd else far, near)


@op("sinh")
def sinh(x): return _hyperbolic(x, odd=True)
@op("cosh")
def cosh(x): return _hyperbolic(x, odd=False)


@op("hypot")
def hypot(a, b):
    """sqrt(a**2 + b**2) without overflow or underflow (the larger magnitude factored out); its
    gradient at (0, 0) is 0."""
    a, b = abs(a), abs(b)
    hi, lo = maximum(a, b), minimum(a, b)
    zero = equal(hi, 0.0)
    r = divide(lo, where(zero, 1.0, hi))
    out = multiply(hi, sqrt(add(multiply(r, r), 1.0)))
    return where(zero, 0.0, where(equal(hi, np.inf), np.inf, out))


@op("fmax")
def fmax(a, b):
    """numpy's fmax: the maximum, ignoring a NaN operand (maximum propagates it)."""
    return where(not_equal(b, b), a, where(not_equal(a, a), b, maximum(a, b)))


@op("fmin")
def fmin(a, b):
    return where(not_equal(b, b), a, where(not_equal(a, a), b, minimum(a, b)))


def _log_add(a, b, tie, log_add_small):
    # numpy's: equal operands (infinities included) give x + log(2) (tie); otherwise the larger
    # plus the log of 1 + the smaller's share, which cannot overflow. Equal operands send half the
    # gradient to each.
    same = equal(a, b)
    gap = abs(subtract(a, where(same, add(a, 1.0), b)))
    return where(same, add(add(multiply(a, 0.5), multiply(b, 0.5)), tie),
                 add(maximum(a, b), log_add_small(negative(gap))))


@op("logaddexp")
def logaddexp(a, b):
    """log(exp(a) + exp(b)) without overflow, as numpy computes it."""
    return _log_add(a, b, _LN2, lambda t: log1p(exp(t)))


@op("logaddexp2")
def logaddexp2(a, b):
    """log2(2**a + 2**b) without overflow, as numpy computes it."""
    return _log_add(a, b, 1.0, lambda t: multiply(log1p(exp2(t)), 1.0 / _LN2))



# rounding: zero gradient (piecewise constant, as JAX); integers stay integers, as numpy's --------
def _rounding(lax_fn, x):
    return x if _is_int_tracer(x) else _unary(lax_fn, x)


@op("floor")
def floor(x): return _rounding(_floor, x)
@op("ceil")
def ceil(x): return _rounding(_ceil, x)
@op("trunc")
def trunc(x): return _rounding(_trunc, x)
@op("rint")
def rint(x): return _unary(_rint, x)    # numpy's rint of integers is float too


@op("round")
def round(a, decimals=0):
    """numpy's round/around: to `decimals` decimal places, halves to even (numpy's scaling:
    rint(a * 10**decimals) / 10**decimals, so e.g. round(0.285, 2) is numpy's answer)."""
    if not isinstance(decimals, (numbers.Integral, np.integer)) or isinstance(decimals, bool):
        raise TypeError(f"round: decimals must be an int, got {decimals!r}")
    decimals = int(decimals)
    if _is_int_tracer(a):
        if decimals >= 0:
            return a
        raise NotImplementedError("round: negative decimals of a traced integer array")
    if decimals == 0:
        return rint(a)
    if decimals > 0:
        return divide(rint(multiply(a, 10.0 ** decimals)), 10.0 ** decimals)
    return multiply(rint(divide(a, 10.0 ** -decimals)), 10.0 ** -decimals)


around = op("around")(round.__wrapped__)


# inverse trigonometric and hyperbolic functions: arctan and arctan2 are native (codegen/mathfns.py,
# their ulp errors measured in tests/test_elementwise_more.py); the others are composites written
# so that no step loses more than an ulp or two where the result is small
@op("arctan")
def arctan(x): return _unary(_atan, x)


@op("arctan2")
def arctan2(x1, x2):
    """numpy's arctan2(y, x): the angle of (x, y) in [-pi, pi]; its gradient is NaN at (0, 0)."""
    return _binary(_atan2, x1, x2, ints=False)


def _cathetus(x):
    """sqrt(1 - x**2) as sqrt((1 - x) * (1 + x)): 1 - x is exact near 1, so no cancellation."""
    return sqrt(multiply(subtract(1.0, x), add(1.0, x)))


@op("arcsin")
def arcsin(x):
    """arctan2(x, sqrt(1 - x**2)): accurate over all of [-1, 1], NaN outside."""
    return arctan2(x, _cathetus(x))


@op("arccos")
def arccos(x):
    """arctan2(sqrt(1 - x**2), x): accurate near both ends (0 at 1, pi at -1), NaN outside."""
    return arctan2(_cathetus(x), x)


def _magnitude(x):
    """(x < 0, |x|) where |x| has gradient +1 at 0 (abs's 0 there would zero an odd function's
    derivative at 0)."""
    neg = less(x, 0.0)
    return neg, where(neg, negative(x), x)


def _huge(x):
    """Beyond this, arcsinh/arccosh are log(2|x|) to within rounding (1 / (4 x**2) < ulp / 8)."""
    return 2.0 ** 28 if result_dtype(x) == "f64" else 2.0 ** 12


@op("arcsinh")
def arcsinh(x):
    """log1p(a + a**2 / (1 + sqrt(1 + a**2))) for a = |x| (no cancellation near 0), log(2a) for
    huge a (a**2 would overflow), odd."""
    neg, a = _magnitude(x)
    big = greater(a, _huge(x))
    am = where(big, 1.0, a)
    a2 = multiply(am, am)
    near = log1p(add(am, divide(a2, add(sqrt(add(a2, 1.0)), 1.0))))
    far = add(log(where(big, a, 2.0)), _LN2)
    r = where(big, far, near)
    return where(neg, negative(r), r)


@op("arccosh")
def arccosh(x):
    """log1p(t + sqrt(t * (t + 2))) for t = x - 1 (exact near 1, where the result is small),
    log(2x) for huge x; NaN below 1."""
    big = greater(x, _huge(x))
    t = subtract(where(big, 2.0, x), 1.0)
    near = log1p(add(t, sqrt(multiply(t, add(t, 2.0)))))
    far = add(log(where(big, x, 2.0)), _LN2)
    return where(big, far, near)


@op("arctanh")
def arctanh(x):
    """log1p(2a / (1 - a)) / 2 for a = |x|, odd: 1 - a is exact near 1, log1p is exact near 0.
    +-inf at +-1, NaN beyond."""
    neg, a = _magnitude(x)
    r = multiply(log1p(divide(multiply(a, 2.0), subtract(1.0, a))), 0.5)
    return where(neg, negative(r), r)


# remainders ----------------------------------------------------------------------------------------
@op("fmod")
def fmod(x1, x2):
    """C's fmod: x1 - trunc(x1 / x2) * x2 computed exactly, with x1's sign; integers stay
    integers (a zero divisor gives 0, as numpy). Gradient: 1 and -trunc(x1 / x2)."""
    return _binary(_fmod, x1, x2)


@op("remainder")
def remainder(x1, x2):
    """numpy's remainder (Python's %, `mod`): the sign of the divisor, x1 - floor(x1 / x2) * x2,
    from fmod plus one correction (so it is exact). Gradient: 1 and -floor(x1 / x2)."""
    m = fmod(x1, x2)
    adjust = logical_and(not_equal(m, 0), not_equal(less(x2, 0), less(m, 0)))
    out = where(adjust, add(m, x2), m)
    if int_operands_dtype(x1, x2) is not None:
        return out
    # a zero remainder takes the divisor's sign, as numpy's (fmod's has the dividend's)
    # (the signed zero computed, not a constant: constants equal as numbers may be merged)
    zero = equal(m, 0)
    signed = where(zero, multiply(where(less(x2, 0), -1.0, 1.0), 0.0), out)
    # ... with fmod's gradient there (1 and -x1 / x2), as on either side of the multiple:
    # subtracting sg(mz) - mz adds mz's gradient and +0.0, which keeps every value and sign
    mz = where(zero, m, 0.0)
    return subtract(signed, subtract(stop_gradient(mz), mz))


mod = op("mod")(remainder.__wrapped__)


# special values, choices, complex parts of real arrays --------------------------------------------
@op("nan_to_num")
def nan_to_num(x, copy=True, nan=0.0, posinf=None, neginf=None):
    """numpy's nan_to_num: NaN -> `nan`, +inf -> `posinf` (default: the dtype's largest finite
    value), -inf -> `neginf` (default: its most negative). The gradient passes where x is finite."""
    if _is_int_tracer(x):
        return x
    big = float(np.finfo(np.float64 if result_dtype(x) == "f64" else np.float32).max)
    posinf = big if posinf is None else posinf
    neginf = -big if neginf is None else neginf
    y = where(not_equal(x, x), nan, x)
    return where(equal(x, np.inf), posinf, where(equal(x, -np.inf), neginf, y))


@op("select")
def select(condlist, choicelist, default=0):
    """numpy's select: for each element, the choice of the first true condition, else
    `default`."""
    condlist, choicelist = list(condlist), list(choicelist)
    if len(condlist) != len(choicelist):
        raise ValueError(f"select: list of cases must be same length as list of conditions "
                         f"({len(condlist)} conditions, {len(choicelist)} choices)")
    if not condlist:
        raise ValueError("select: select with an empty condition list is not possible")
    out = default
    for cond, choice in reversed(list(zip(condlist, choicelist))):
        out = where(cond, choice, out)
    return out


def _real_array(x):
    return x if isinstance(x, Tracer) else wrap(_layout_value(x))


@op("real")
def real(val):
    """The real part: a real array itself."""
    return _real_array(val)


@op("imag")
def imag(val):
    """The imaginary part of a real array: zeros (of its dtype, with zero gradient)."""
    return zeros_like(val)


@op("conj")
def conj(x):
    """The complex conjugate of a real array: the array itself."""
    return _real_array(x)


conjugate = op("conjugate")(conj.__wrapped__)


def _compare(lax_fn):
    def f(a, b):
        return _binary(lax_fn, a, b)
    return f


greater = op("greater")(_compare(lax.gt))
greater_equal = op("greater_equal")(_compare(lax.ge))
less = op("less")(_compare(lax.lt))
less_equal = op("less_equal")(_compare(lax.le))
equal = op("equal")(_compare(lax.eq))
not_equal = op("not_equal")(_compare(lax.ne))


@op("logical_and")
def logical_and(a, b):
    return wrap(lax.logical_and(*broadcast_values(as_bool_value(a), as_bool_value(b))))


@op("logical_or")
def logical_or(a, b):
    return wrap(lax.logical_or(*broadcast_values(as_bool_value(a), as_bool_value(b))))


@op("logical_not")
def logical_not(a):
    return wrap(lax.logical_not(as_bool_value(a)))


@op("where")
def where(cond, a, b):
    """`a` where `cond` is true, else `b` (numpy's three-argument where). The gradient flows only
    to the chosen operand, but both are differentiated everywhere: a branch that is singular where
    it is not chosen (`where(x > 0, log(x), 0)` at x == 0) gives NaN there, as in PyTorch and
    JAX. Make the untaken branch safe: `where(x > 0, log(where(x > 0, x, 1.0)), 0.0)`."""
    dt = int_operands_dtype(a, b)
    vals = [int_value(a, dt), int_value(b, dt)] if dt is not None else promote(a, b)
    p, va, vb = broadcast_values(as_bool_value(cond), *vals)
    return wrap(lax.select(p, va, vb))


_select = where   # for reductions whose numpy parameter `where=` shadows the function


@op("clip")
def clip(a, a_min=None, a_max=None, *, min=None, max=None):
    """numpy's clip: `a` limited to [a_min, a_max] (either bound None: no limit); numpy 2's
    keywords `min=`/`max=` are the same bounds. At a bound the gradient is split in half, as for
    maximum/minimum."""
    lo = _one_of("clip", "a_min", a_min, "min", min)
    hi = _one_of("clip", "a_max", a_max, "max", max)
    if lo is not None:
        a = maximum(a, lo)
    if hi is not None:
        a = minimum(a, hi)
    return a


def _one_of(what, name, value, alias, alias_value):
    """The value of a parameter that has two spellings (numpy's and PyTorch's), given at most once."""
    if alias_value is None:
        return value
    if value is not None:
        raise TypeError(f"{what}: got both {name}= and {alias}= (two spellings of one parameter)")
    return alias_value


@op("astype")
def astype(x, dtype):
    dt = np.dtype(dtype)
    ints = {DTYPES[d]: d for d in INT_DTYPES}
    if dt in ints:  # float to integer truncates toward zero, as numpy
        return wrap(lax.convert(_layout_value(x), ints[dt]))
    if dt not in (np.float32, np.float64):
        raise TypeError(f"astype: traced values are float32, float64, int32 or int64, not {dt}")
    v = to_value(x) if _is_int_tracer(x) else as_value(x, result_dtype(x))
    return wrap(lax.convert(v, float_dtype(dt)))


# ------------------------------------------------------------------------------------------------
# reductions
# ------------------------------------------------------------------------------------------------
def _axes(x: Value, axis):
    if axis is None:
        return tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    out = []
    for a in axes:
        if not -x.ndim <= a < builtins.max(x.ndim, 1):
            raise ShapeError(f"axis {a} is out of bounds for a value of shape {list(x.shape)}")
        out.append(a % x.ndim if x.ndim else 0)
    return tuple(sorted(set(out)))


def _torch_axis(what, axis, keepdims, dim, keepdim):
    """(axis, keepdims) from numpy's spelling or PyTorch's (`dim=`, `keepdim=`), not both."""
    axis = _one_of(what, "axis", axis, "dim", dim)
    if keepdim is not None:
        if keepdims:
            raise TypeError(f"{what}: got both keepdims= and keepdim= (two spellings of one "
                            f"parameter)")
        keepdims = keepdim
    return axis, bool(keepdims)


def _in_dtype(x, dtype):
    """numpy's `dtype=` of a reduction or scan: the values converted to it first (None: as
    they are)."""
    return x if dtype is None else astype(x, dtype)


def _keep(x: Value, y: Value, axes, keepdims):
    if not keepdims:
        return y
    return lax.reshape(y, [1 if i in axes else n for i, n in enumerate(x.shape)])


def _given(value) -> bool:
    """Whether an optional numpy parameter was passed (numpy's own default is its _NoValue)."""
    return value is not None and value is not _NO_VALUE


def _masked(what, x, where, fill):
    """numpy's `where=` of a reduction: the elements where the mask is false replaced by the
    reduction's identity `fill` (no gradient reaches them); True or absent: `x` as it is."""
    if not _given(where) or where is True:
        return x
    if shape_of(where) and broadcast_shapes(shape_of(where), shape_of(x)) != tuple(shape_of(x)):
        raise ShapeError(f"{what}: the where= mask of shape {list(shape_of(where))} does not "
                         f"broadcast to the operand's shape {list(shape_of(x))}")
    return _select(where, x, fill)


def _no_identity(what, where, initial):
    if _given(where) and where is not True and not _given(initial):
        raise ValueError(f"{what}: a reduction without identity needs initial= to use a where= "
                         f"mask (an all-false row would be empty), as numpy's")


@op("sum")
def sum(x, axis=None, keepdims=False, *, dim=None, keepdim=None, dtype=None, initial=None,
        where=None):
    """numpy's sum; `initial=` is added to every sum, `where=` (a boolean mask broadcasting to
    x) leaves out the elements where it is false."""
    axis, keepdims = _torch_axis("sum", axis, keepdims, dim, keepdim)
    x = _masked("sum", _in_dtype(x, dtype), where, 0.0)
    v = as_value(x, result_dtype(x))
    axes = _axes(v, axis)
    out = wrap(_keep(v, lax.reduce_sum(v, axes), axes, keepdims))
    return add(out, initial) if _given(initial) else out


@op("mean")
def mean(x, axis=None, keepdims=False, *, dim=None, keepdim=None, dtype=None, where=None):
    """numpy's mean; with `where=` the mean of the elements where the mask is true (NaN where
    there are none, as numpy)."""
    axis, keepdims = _torch_axis("mean", axis, keepdims, dim, keepdim)
    x = _in_dtype(x, dtype)
    if _given(where) and where is not True:
        if isinstance(where, Tracer):
            count = sum(broadcast_to(_select(where, 1.0, 0.0), shape_of(x)), axis, keepdims)
        else:   # a constant mask: a constant count
            count = np.sum(np.broadcast_to(np.asarray(where, bool), shape_of(x)), axis,
                           keepdims=keepdims).astype(DTYPES[result_dtype(x)])
        return divide(sum(x, axis, keepdims, where=where), count)
    v = as_value(x, result_dtype(x))
    axes = _axes(v, axis)
    count = math.prod(v.shape[a] for a in axes)
    return wrap(_keep(v, lax.div(lax.reduce_sum(v, axes), float(count)), axes, keepdims))


@op("max")
def max(x, axis=None, keepdims=False, *, dim=None, keepdim=None, initial=None, where=None):
    """numpy's max (amax); `initial=` takes part in every maximum, `where=` (which needs
    `initial=`) leaves out the elements where the mask is false."""
    axis, keepdims = _torch_axis("max", axis, keepdims, dim, keepdim)
    _no_identity("max", where, initial)
    x = _masked("max", x, where, -np.inf)
    v = as_value(x, result_dtype(x))
    axes = _axes(v, axis)
    out = wrap(_keep(v, lax.reduce_max(v, axes), axes, keepdims))
    return maximum(out, initial) if _given(initial) else out


@op("min")
def min(x, axis=None, keepdims=False, *, dim=None, keepdim=None, initial=None, where=None):
    """numpy's min (amin), with `initial=` and `where=` as max."""
    axis, keepdims = _torch_axis("min", axis, keepdims, dim, keepdim)
    _no_identity("min", where, initial)
    return negative(max(negative(x), axis, keepdims,
                        initial=negative(initial) if _given(initial) else None, where=where))


@op("var")
def var(x, axis=None, keepdims=False, ddof=0, *, dim=None, keepdim=None, correction=None,
        unbiased=None, dtype=None):
    """numpy's var: the mean squared deviation, divided by N - ddof instead of N (ddof=1: the
    unbiased estimate; PyTorch's `correction=` is ddof and `unbiased=True` ddof=1, its default of
    1 does not apply here). N - ddof <= 0 gives inf or NaN, as numpy."""
    axis, keepdims = _torch_axis("var", axis, keepdims, dim, keepdim)
    ddof = _one_of("var", "ddof", ddof or None, "correction", correction) or 0
    if unbiased is not None:
        ddof = _one_of("var", "ddof", ddof or None, "unbiased", int(bool(unbiased))) or 0
    x = _in_dtype(x, dtype)
    d = subtract(x, mean(x, axis, keepdims=True))
    if not ddof:
        return mean(multiply(d, d), axis, keepdims)
    count = math.prod(shape_of(x)[a] for a in _axes(_layout_value(x), axis))
    # numpy divides by max(N - ddof, 0): inf or NaN past the sample size, no error
    return divide(sum(multiply(d, d), axis, keepdims), float(builtins.max(count - ddof, 0)))


def _sqrt_zero_subgradient(x):
    """sqrt(x) for x >= 0 whose gradient at x == 0 is 0 (a subgradient, as PyTorch's std and
    norm), not 0 * inf = NaN: neither sqrt nor its derivative ever sees the zero, so second
    derivatives stay finite too. For the roots of sums of squares (norm, std), which are |.|-like
    at zero and identically zero over a reduction of size 1."""
    zero = equal(x, 0.0)
    return where(zero, 0.0, sqrt(where(zero, 1.0, x)))


@op("std")
def std(x, axis=None, keepdims=False, ddof=0, *, dim=None, keepdim=None, correction=None,
        unbiased=None, dtype=None):
    """numpy's std: the square root of var (same `ddof`; PyTorch's `correction=`, `unbiased=`);
    its gradient where it is 0 (constant values, a reduction of size 1, a 0-d array) is 0."""
    return _sqrt_zero_subgradient(var(x, axis, keepdims, ddof, dim=dim, keepdim=keepdim,
                                      correction=correction, unbiased=unbiased, dtype=dtype))


@op("logsumexp")
def logsumexp(x, axis=None, keepdims=False, *, dim=None, keepdim=None):
    axis, keepdims = _torch_axis("logsumexp", axis, keepdims, dim, keepdim)
    # The shift by the maximum only guards exp against overflow. An infinite maximum (an inf, or
    # only -inf) would make it inf - inf = NaN; shifting by 0 there gives log(sum(exp(x))) = +-inf.
    m = stop_gradient(max(x, axis, keepdims=True))
    m = where(less(abs(m), np.inf), m, 0.0)
    s = log(sum(exp(subtract(x, m)), axis, keepdims=True))
    out = add(s, m)
    return out if keepdims else reshape(out, [n for i, n in enumerate(out.shape)
                                              if i not in _axes(out.value, axis)])


@op("norm")
def norm(x, ord=None, axis=None, keepdims=False, *, dim=None, keepdim=None, p=None):
    """numpy.linalg.norm for every order that needs no decomposition. Vector orders (1-d value,
    or one axis): None/2, 1, inf, -inf, 0 (the count of nonzeros, zero gradient) and any real p;
    matrix orders (2-d value, or two axes): None/'fro', 1, -1, inf, -inf. A matrix's 2, -2 and
    'nuc' need singular values: NotImplementedError. ord=None with axis=None is the 2-norm of the
    flattened value, any rank. The gradient of a 2-norm at zero is zero. PyTorch's
    `dim=`/`keepdim=` spell axis and keepdims; its `p=` (instead of ord) means PyTorch's norm: a
    vector norm over `dim` (all elements when None), 'fro' the 2-norm."""
    axis, keepdims = _torch_axis("norm", axis, keepdims, dim, keepdim)
    if p is not None:
        if ord is not None:
            raise TypeError("norm: got both ord= and p= (two spellings of one parameter)")
        if p == "nuc":
            return norm(x, "nuc", axis, keepdims)
        return vector_norm(x, axis, keepdims, 2 if p == "fro" else p)
    v = _layout_value(x)
    if axis is None:
        if ord is None:
            return _sqrt_zero_subgradient(sum(power(x, 2), None, keepdims))
        if v.ndim not in (1, 2):
            raise ValueError(f"norm: ord={ord!r} needs a 1-d or 2-d value or an axis, got shape "
                             f"{list(v.shape)}")
        axes = tuple(range(v.ndim))
    else:
        axes = (axis,) if isinstance(axis, (numbers.Integral, np.integer)) else tuple(axis)
        axes = tuple(_axis_arg(v, a, "norm") for a in axes)
        if len(axes) not in (1, 2) or len(set(axes)) != len(axes):
            raise ValueError(f"norm: axis must be one axis or two different axes, got {axis!r}")
    if len(axes) == 1:
        return _vector_norm(x, ord, axes[0], keepdims)
    return _matrix_norm(x, v, ord, axes, keepdims)


def _vector_norm(x, ord, axis, keepdims):
    if isinstance(ord, str):
        raise ValueError(f"norm: invalid order {ord!r} for vectors")
    if ord is None or ord == 2:
        return _sqrt_zero_subgradient(sum(power(x, 2), axis, keepdims))
    if ord == np.inf:
        return max(abs(x), axis, keepdims)
    if ord == -np.inf:
        return min(abs(x), axis, keepdims)
    if ord == 0:   # the number of nonzeros: piecewise constant, zero gradient
        return sum(where(not_equal(x, 0.0), ones_like(x), zeros_like(x)), axis, keepdims)
    if ord == 1:
        return sum(abs(x), axis, keepdims)
    return power(sum(power(abs(x), float(ord)), axis, keepdims), 1.0 / float(ord))


def _matrix_norm(x, v: Value, ord, axes, keepdims):
    rows, cols = axes
    if ord in (None, "fro"):
        out = _sqrt_zero_subgradient(sum(power(x, 2), axes, keepdims=True))
    elif ord in (2, -2, "nuc"):
        raise NotImplementedError(
            f"norm: ord={ord!r} of a matrix needs its singular values (a decomposition), which "
            f"tracejit does not support; matrix orders None/'fro', 1, -1, inf and -inf are")
    elif not isinstance(ord, str) and ord in (1, -1, np.inf, -np.inf):
        # 1: the largest column sum of |x|; inf: the largest row sum; -1, -inf: the smallest
        summed, across = (rows, cols) if ord in (1, -1) else (cols, rows)
        pick = max if ord > 0 else min
        out = pick(sum(abs(x), summed, keepdims=True), across, keepdims=True)
    else:
        raise ValueError(f"norm: invalid order {ord!r} for matrices")
    return out if keepdims else reshape(out, [n for i, n in enumerate(v.shape) if i not in axes])



# indices of extremes and sorting: integer results, no gradient (sort's values are a gather with
# argsort's indices, so their gradient scatters back through the permutation) ----------------------
def _sort_operand(what, a) -> Value:
    """A float Value to compare: integers as float64 (exact below 2**53)."""
    if _is_int_tracer(a):
        return lax.convert(to_value(a), "f64")
    v = as_value(a, result_dtype(a))
    if v.dtype not in ("f32", "f64"):   # pragma: no cover - as_value gives floats
        raise TypeError(f"{what}: expects a numeric array")
    return v


def _arg_extreme(what, a, axis, keepdims, largest):
    v = lax.stop_gradient(_sort_operand(what, a))
    shape = v.shape
    if axis is None:
        v, ax = lax.reshape(v, (v.type.size,)), 0
    else:
        ax = _axis_arg(v, axis, what)
    n = v.shape[ax] if v.ndim else 1
    if v.ndim == 0:
        v = lax.reshape(v, (1,))
    if n == 0:
        raise ValueError(f"{what}: attempt to get {what} of an empty sequence")
    # the first position holding the extreme, or the first NaN (numpy: NaN is the extreme)
    key = v if largest else lax.neg(v)
    m = lax.reduce_max(key, (ax,))
    m = lax.broadcast_in_dim(m, key.shape, tuple(d for d in range(key.ndim) if d != ax))
    hit = lax.logical_or(lax.eq(key, m), lax.ne(key, key))
    iota = np.arange(n, dtype=np.float64 if v.dtype == "f64" else np.float32)
    iota = lax.literal(iota.reshape((1,) * ax + (n,) + (1,) * (v.ndim - ax - 1)))
    pos = lax.select(hit, lax.broadcast_to(iota, key.shape), float(n))
    first = lax.neg(lax.reduce_max(lax.neg(pos), (ax,)))
    idx = lax.convert(first, "i64")
    if keepdims:
        kept = [1] * len(shape) if axis is None else \
            [1 if d == ax else k for d, k in enumerate(shape)]
        idx = lax.reshape(idx, kept)
    return wrap(idx)


@op("argmax")
def argmax(a, axis=None, out=None, *, keepdims=False, dim=None, keepdim=None):
    """numpy's argmax: the index (int64) of the first maximum along `axis` (None: of the
    flattened array); a NaN is the maximum (its first position), as in numpy. PyTorch's
    `dim=`/`keepdim=` are accepted."""
    axis, keepdims = _torch_axis("argmax", axis, keepdims, dim, keepdim)
    _no_out("argmax", out)
    return _arg_extreme("argmax", a, axis, keepdims, largest=True)


@op("argmin")
def argmin(a, axis=None, out=None, *, keepdims=False, dim=None, keepdim=None):
    """numpy's argmin: the index of the first minimum (or first NaN)."""
    axis, keepdims = _torch_axis("argmin", axis, keepdims, dim, keepdim)
    _no_out("argmin", out)
    return _arg_extreme("argmin", a, axis, keepdims, largest=False)


def _no_out(what, out):
    if out is not None:
        raise TypeError(f"{what}: out= writes in place, which traced values do not support")


_SORT_KINDS = (None, "stable", "mergesort", "quicksort", "heapsort")


def _argsort_value(what, a, axis, kind, order, descending=False):
    if order is not None:
        raise NotImplementedError(f"{what}: order= (structured arrays) is not supported")
    if kind not in _SORT_KINDS:
        raise ValueError(f"{what}: unknown kind {kind!r}")
    v = lax.stop_gradient(_sort_operand(what, a))
    if axis is None:
        v, axis = lax.reshape(v, (v.type.size,)), 0
    if v.ndim == 0:
        raise ValueError(f"{what}: expects an array of at least 1 dimension (or axis=None)")
    ax = _axis_arg(v, axis, what)
    perm = [d for d in range(v.ndim) if d != ax] + [ax]
    last = lax.transpose(v, perm) if ax != v.ndim - 1 else v
    idx = _argsort(last)
    if ax != v.ndim - 1:
        idx = lax.transpose(idx, [perm.index(d) for d in range(v.ndim)])
    return idx, ax


@op("argsort")
def argsort(a, axis=-1, kind=None, order=None, *, stable=None):
    """numpy's argsort: int64 indices that sort `a` along `axis` (None: flattened), always
    stable (every `kind` gives the 'stable' result: equal elements keep their order), NaNs
    last."""
    return wrap(_argsort_value("argsort", a, axis, kind, order)[0])


@op("sort")
def sort(a, axis=-1, kind=None, order=None, *, stable=None):
    """numpy's sort (stable, NaNs last): the values gathered through argsort's permutation, so
    the gradient of each sorted element goes back to the element it came from."""
    idx, ax = _argsort_value("sort", a, axis, kind, order)
    if _is_int_tracer(a):
        v = lax.convert(to_value(a), "f64")
        flat = v if axis is not None else lax.reshape(v, (v.type.size,))
        return wrap(lax.convert(lax.gather(flat, idx, ax, name="argsort"), to_value(a).dtype))
    v = as_value(a, result_dtype(a))
    if axis is None:
        v = lax.reshape(v, (v.type.size,))
    return wrap(lax.gather(v, idx, ax, name="argsort"))


# products and running sums and products: trees of multiplies and log-step scans over slices, so
# gradients are exact products (no division: zeros are fine) and second derivatives come for free
# ------------------------------------------------------------------------------------------------
def _ones_like_part(v: Value, axis: int, n: int) -> Value:
    return lax.full(1, v.shape[:axis] + (n,) + v.shape[axis + 1:], v.dtype)


@op("prod")
def prod(a, axis=None, keepdims=False, *, dim=None, keepdim=None, dtype=None, initial=None,
         where=None):
    """numpy's prod: a balanced tree of multiplies over the reduced axes (log2(n) levels of
    elementwise products of even and odd slices); `initial=` multiplies every product, `where=`
    leaves out the elements where the mask is false."""
    axis, keepdims = _torch_axis("prod", axis, keepdims, dim, keepdim)
    a = _masked("prod", _in_dtype(a, dtype), where, 1.0)
    if _given(initial):
        return multiply(prod(a, axis, keepdims), initial)
    v = as_value(a, result_dtype(a))
    axes = _axes(v, axis)
    rest = [d for d in range(v.ndim) if d not in axes]
    k = math.prod(v.shape[d] for d in axes)
    y = lax.reshape(lax.transpose(v, rest + list(axes)) if axes else v,
                    tuple(v.shape[d] for d in rest) + (k,))
    last = y.ndim - 1
    if k == 0:
        y = _ones_like_part(y, last, 1)
    while y.shape[last] > 1:
        n = y.shape[last]
        if n % 2:   # an odd length gets a 1 to pair with
            y, n = lax.concatenate([y, _ones_like_part(y, last, 1)], last), n + 1
        even = lax.slice_(y, [0] * y.ndim, y.shape, [1] * last + [2])
        odd = lax.slice_(y, [0] * last + [1], y.shape, [1] * last + [2])
        y = lax.mul(even, odd)
    y = lax.reshape(y, tuple(v.shape[d] for d in rest))
    return wrap(_keep(v, y, axes, keepdims))


def _scan(what, a, axis, combine, identity):
    """Inclusive scan along `axis` (None: of the flattened array) by log-step doubling
    (Hillis-Steele): after the step with shift d, element i combines elements i - 2d + 1 .. i."""
    v = as_value(a, result_dtype(a))
    if axis is None:
        v, axis = lax.reshape(v, (v.type.size,)), 0
    axis = _axis_arg(v, axis, what)
    n = v.shape[axis]
    d = 1
    while d < n:
        shifted = lax.concatenate([lax.full(identity, v.shape[:axis] + (d,) + v.shape[axis + 1:],
                                            v.dtype), _slice_axis(v, axis, 0, n - d)], axis)
        v = combine(v, shifted)
        d *= 2
    return wrap(v)


@op("cumsum")
def cumsum(a, axis=None, *, dim=None, dtype=None):
    """numpy's cumsum (PyTorch's `dim=` spells axis): ceil(log2 n) vectorized adds of shifted
    copies, whose adjoint is the reversed running sum."""
    return _scan("cumsum", _in_dtype(a, dtype), _one_of("cumsum", "axis", axis, "dim", dim),
                 lax.add, 0)


@op("cumprod")
def cumprod(a, axis=None, *, dim=None, dtype=None):
    """numpy's cumprod (PyTorch's `dim=` spells axis), by the same log-step scan with multiplies:
    its gradient is exact where elements are zero."""
    return _scan("cumprod", _in_dtype(a, dtype), _one_of("cumprod", "axis", axis, "dim", dim),
                 lax.mul, 1)


# ------------------------------------------------------------------------------------------------
# linear algebra
# ------------------------------------------------------------------------------------------------
@op("matmul")
def matmul(a, b):
    """numpy's matmul: products of the last two axes, leading (batch) axes broadcast; a 1-d
    operand is a row (left) or column (right) whose axis is dropped from the result."""
    from .ir.prims.linalg import batch_shape as mm_batch_shape
    va, vb = promote(a, b)
    if va.ndim == 0 or vb.ndim == 0:
        raise ShapeError(f"matmul: operands must not be scalars, got {va.type} @ {vb.type}")
    if va.ndim == 1 and vb.ndim == 1:
        if va.shape != vb.shape:
            raise ShapeError(f"matmul: vector lengths differ: {va.type} @ {vb.type}")
        return wrap(lax.reduce_sum(lax.mul(va, vb)))
    a2 = lax.reshape(va, (1,) + va.shape) if va.ndim == 1 else va
    b2 = lax.reshape(vb, vb.shape + (1,)) if vb.ndim == 1 else vb
    if a2.shape[-1] != b2.shape[-2]:
        raise ShapeError(f"matmul: inner dimensions differ: {va.type} @ {vb.type} "
                         f"({a2.shape[-1]} != {b2.shape[-2]})")
    try:
        mm_batch_shape(a2.shape, b2.shape)
    except ShapeError:
        raise ShapeError(f"matmul: batch dimensions {list(a2.shape[:-2])} and "
                         f"{list(b2.shape[:-2])} do not broadcast: {va.type} @ {vb.type}") from None
    c = lax.matmul(a2, b2)
    if va.ndim == 1 or vb.ndim == 1:   # drop the unit axis the vector operand was given
        c = lax.reshape(c, c.shape[:-2] + c.shape[-2 + (va.ndim == 1):c.ndim - (vb.ndim == 1)])
    return wrap(c)


def shape_of(x) -> tuple:
    """Shape of a tracer, array or number (np.shape would dispatch to __array_function__)."""
    return tuple(x.shape) if isinstance(x, Tracer) else np.shape(x)


@op("dot")
def dot(a, b):
    """numpy's dot: a product with a scalar, matmul up to 2-d right operands, and beyond, the sum
    over a's last axis and b's second-to-last (no batch broadcasting, unlike matmul)."""
    if not shape_of(a) or not shape_of(b):
        return multiply(a, b)
    if len(shape_of(b)) > 2:
        return tensordot(a, b, ([-1], [-2]))
    return matmul(a, b)


@op("mv")
def mv(m, v):
    if len(shape_of(m)) != 2 or len(shape_of(v)) != 1:
        raise ShapeError(f"mv expects a matrix and a vector, got shapes {list(shape_of(m))} and "
                         f"{list(shape_of(v))}")
    return matmul(m, v)


@op("mm")
def mm(a, b):
    sa, sb = shape_of(a), shape_of(b)
    if len(sa) != 2 or len(sb) != 2:
        raise ShapeError(f"mm expects two matrices, got shapes {list(sa)} and {list(sb)}")
    return matmul(a, b)


@op("outer")
def outer(a, b):
    return multiply(reshape(a, (-1, 1)), reshape(b, (1, -1)))


@op("einsum")
def einsum(subscripts, *operands, optimize=False):
    """numpy's einsum, lowered to transposes, reductions and batched matmuls (tracejit/contract.py);
    `optimize` is accepted and ignored."""
    from .contract import einsum as lowered
    return lowered(subscripts, *operands, optimize=optimize)


def _contract(vals, labels, out):
    from .contract import contract
    return wrap(contract(vals, labels, out))


@op("tensordot")
def tensordot(a, b, axes=2):
    """numpy's tensordot: the sum over a's axes axes[0] and b's axes[1] (an int n: a's last n and
    b's first n), as one (batched) matmul; the result's axes are a's others, then b's."""
    va, vb = promote(a, b)
    if isinstance(axes, (numbers.Integral, np.integer)):
        n = int(axes)
        if not 0 <= n <= builtins.min(va.ndim, vb.ndim):
            raise ValueError(f"tensordot: axes={n} for operands of shapes {list(va.shape)} and "
                             f"{list(vb.shape)}")
        ax_a, ax_b = list(range(va.ndim - n, va.ndim)), list(range(n))
    else:
        try:
            xa, xb = axes
        except (TypeError, ValueError):
            raise ValueError(f"tensordot: axes must be an int or a pair of axis lists, got "
                             f"{axes!r}") from None
        ax_a = [xa] if isinstance(xa, (numbers.Integral, np.integer)) else list(xa)
        ax_b = [xb] if isinstance(xb, (numbers.Integral, np.integer)) else list(xb)
        if len(ax_a) != len(ax_b):
            raise ValueError(f"tensordot: {len(ax_a)} axes of a against {len(ax_b)} of b")
        ax_a = [_axis_arg(va, x, "tensordot") for x in ax_a]
        ax_b = [_axis_arg(vb, x, "tensordot") for x in ax_b]
    for i, j in zip(ax_a, ax_b):
        if va.shape[i] != vb.shape[j]:
            raise ShapeError(f"tensordot: axis {i} of a (shape {list(va.shape)}) and axis {j} of b "
                             f"(shape {list(vb.shape)}) differ in size")
    la = [f"a{i}" for i in range(va.ndim)]
    lb = [f"b{j}" for j in range(vb.ndim)]
    for i, j in zip(ax_a, ax_b):
        lb[j] = la[i]
    out = [la[i] for i in range(va.ndim) if i not in ax_a] + \
        [lb[j] for j in range(vb.ndim) if j not in ax_b]
    return _contract([va, vb], [la, lb], out)


@op("inner")
def inner(a, b):
    """numpy's inner: the sum over the last axes; the result's axes are a's others, then b's."""
    if not shape_of(a) or not shape_of(b):
        return multiply(a, b)
    va, vb = promote(a, b)
    if va.shape[-1] != vb.shape[-1]:
        raise ShapeError(f"inner: last axes differ: shapes {list(va.shape)} and {list(vb.shape)}")
    return tensordot(wrap(va), wrap(vb), ([-1], [-1]))


@op("vdot")
def vdot(a, b):
    """numpy's vdot on real values: the dot product of the flattened operands."""
    va, vb = promote(a, b)
    if va.type.size != vb.type.size:
        raise ShapeError(f"vdot: operands of sizes {va.type.size} and {vb.type.size} (shapes "
                         f"{list(va.shape)} and {list(vb.shape)})")
    return wrap(lax.reduce_sum(lax.mul(lax.reshape(va, (va.type.size,)),
                                       lax.reshape(vb, (vb.type.size,)))))


@op("kron")
def kron(a, b):
    """numpy's kron: blocks a[i] * b, as one broadcast multiply of a and b with their axes
    interleaved, reshaped."""
    va, vb = promote(a, b)
    n = builtins.max(va.ndim, vb.ndim)
    sa = (1,) * (n - va.ndim) + va.shape
    sb = (1,) * (n - vb.ndim) + vb.shape
    ea = lax.reshape(va, [d for x in sa for d in (x, 1)])
    eb = lax.reshape(vb, [d for y in sb for d in (1, y)])
    prod = lax.mul(*broadcast_values(ea, eb))
    return wrap(lax.reshape(prod, [x * y for x, y in zip(sa, sb)]))


@op("cross")
def cross(a, b, axisa=-1, axisb=-1, axisc=-1, axis=None):
    """numpy's cross product of 3-vectors (or 2-vectors, whose third component is 0; two
    2-vectors give the scalar z component) along axisa/axisb, broadcast over the other axes, the
    result's vectors along axisc (`axis` sets all three)."""
    if axis is not None:
        axisa = axisb = axisc = axis
    va, vb = promote(a, b)
    if va.ndim == 0 or vb.ndim == 0:
        raise ValueError("cross: operands must have at least one axis")
    comps = []
    for v, ax in ((va, axisa), (vb, axisb)):
        ax = _axis_arg(v, ax, "cross")
        n = v.shape[ax]
        if n not in (2, 3):
            raise ValueError(f"cross: vectors must have 2 or 3 components, got shape "
                             f"{list(v.shape)} along axis {ax}")
        last = lax.transpose(v, [d for d in range(v.ndim) if d != ax] + [ax])
        comps.append([wrap(lax.reshape(_slice_axis(last, last.ndim - 1, i, i + 1),
                                       last.shape[:-1])) for i in range(n)] + [None] * (3 - n))
    (a0, a1, a2), (b0, b1, b2) = comps

    def minor(x, y, u, w):   # x*y - u*w, with None a zero component
        p = None if x is None or y is None else multiply(x, y)
        q = None if u is None or w is None else multiply(u, w)
        return p if q is None else negative(q) if p is None else subtract(p, q)

    z = minor(a0, b1, a1, b0)
    if a2 is None and b2 is None:
        return z
    c = stack([minor(a1, b2, a2, b1), minor(a2, b0, a0, b2), z], -1)
    return moveaxis(c, -1, axisc)


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------
def _resolve_shape(shape, size):
    shape = [int(s) for s in ((shape,) if isinstance(shape, numbers.Integral) else shape)]
    if shape.count(-1) > 1:
        raise ShapeError(f"reshape: only one dimension can be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or size % known:
            raise ShapeError(f"cannot reshape a value of size {size} into {shape}")
        shape[shape.index(-1)] = size // known
    return tuple(shape)


@op("reshape")
def reshape(x, shape):
    v = _layout_value(x)
    new = _resolve_shape(shape, v.type.size)
    if math.prod(new) != v.type.size:
        raise ShapeError(f"cannot reshape a value of shape {list(v.shape)} into {list(new)}")
    return wrap(lax.reshape(v, new))


@op("transpose")
def transpose(x, axes=None):
    v = _layout_value(x)
    perm = tuple(reversed(range(v.ndim))) if axes is None else tuple(a % v.ndim for a in axes)
    return wrap(lax.transpose(v, perm))


@op("swapaxes")
def swapaxes(x, axis1, axis2):
    perm = list(range(x.ndim))
    perm[axis1], perm[axis2] = perm[axis2], perm[axis1]
    return transpose(x, perm)


@op("squeeze")
def squeeze(x, axis=None, *, dim=None):
    axis = _one_of("squeeze", "axis", axis, "dim", dim)
    v = _layout_value(x)
    axes = tuple(i for i, n in enumerate(v.shape) if n == 1) if axis is None else _axes(v, axis)
    for a in axes:
        if v.shape[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of shape {list(v.shape)} is not 1")
    return wrap(lax.reshape(v, [n for i, n in enumerate(v.shape) if i not in axes]))


@op("flatten")
def flatten_dims(x, start_dim=0, end_dim=-1):
    """PyTorch's flatten: dimensions start_dim..end_dim (inclusive, negative from the end) merged
    into one; a 0-d value becomes 1-d."""
    v = _layout_value(x)
    if v.ndim == 0:
        return wrap(lax.reshape(v, (1,)))
    start, end = (_axes(v, d)[0] for d in (start_dim, end_dim))
    if start > end:
        raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim} for shape "
                         f"{list(v.shape)}")
    return wrap(lax.reshape(v, v.shape[:start] + (math.prod(v.shape[start:end + 1]),)
                            + v.shape[end + 1:]))


@op("expand_dims")
def expand_dims(x, axis):
    v = _layout_value(x)
    shape = list(v.shape)
    shape.insert(axis % (v.ndim + 1) if axis < 0 else axis, 1)
    return wrap(lax.reshape(v, shape))


@op("concatenate")
def concatenate(xs, axis=0, *, dtype=None):
    """numpy's concatenate; axis=None joins the flattened values; `dtype=` converts them."""
    if dtype is not None:
        xs = [astype(x, dtype) for x in xs]
    if axis is None:
        xs, axis = [ravel(x) for x in xs], 0
    vals = promote(*xs)
    nd = vals[0].ndim
    if nd == 0:
        raise ShapeError("concatenate: zero-dimensional values cannot be concatenated")
    return wrap(lax.concatenate(vals, axis % nd))


@op("stack")
def stack(xs, axis=0, *, dtype=None):
    if dtype is not None:
        xs = [astype(x, dtype) for x in xs]
    # promote first: a Python number alone would become float32 before meeting the arrays
    return concatenate([expand_dims(wrap(v), axis) for v in promote(*xs)], axis)


def _is_index_array(i) -> bool:
    """An advanced index: a traced integer, or an integer numpy array or list (not a 0-d one,
    which acts as an int)."""
    if _is_int_tracer(i):
        return True
    if isinstance(i, list) or (isinstance(i, np.ndarray) and i.ndim > 0):
        arr = np.asarray(i)   # (boolean masks became integer arrays first: see getitem)
        return arr.dtype.kind in "iu" or arr.size == 0
    return False


def index_name(x, default: str) -> str:
    """How an error message names index operand `x`: a traced argument by its name."""
    v = to_value(x) if isinstance(x, Tracer) else None
    # through layout ops: labels[:, None] is still `labels`
    while v is not None and v.instr is not None and v.instr.prim in _NAME_KEEPING:
        v = v.instr.inputs[0]
    if v is not None and v.instr is None and v.hint:
        return v.hint
    return default


_NAME_KEEPING = (structural.reshape_p, structural.broadcast_in_dim_p, structural.slice_p,
                 structural.transpose_p, elementwise.convert_p)


def _constant_masks_as_indices(idx: tuple, shape: tuple) -> tuple:
    """numpy's boolean-mask indexing with a constant mask (a numpy array or a list of bools): the
    result's shape is known at trace time, so a k-d mask is its k integer arrays of `np.nonzero`.
    A traced mask is an error: its result's shape would depend on the data."""
    out, dim = [], 0
    n_real = len([i for i in idx if i is not None and i is not Ellipsis])
    for i in idx:
        if isinstance(i, Tracer) and i.value.dtype == "bool":
            raise TypeError(f"indexing with a traced boolean mask {i.value.type} is not supported:"
                            f" the result's shape would depend on the data; use "
                            f"tracejit.where(mask, x, 0) (or a sum over where) instead")
        is_mask = isinstance(i, (list, np.ndarray)) and np.asarray(i).dtype == np.bool_ \
            and np.ndim(i) > 0
        if is_mask:
            mask = np.asarray(i)
            want = shape[dim:dim + mask.ndim]
            if mask.shape != want:
                raise IndexError(f"boolean index of shape {list(mask.shape)} does not match the "
                                 f"indexed axes {dim}..{dim + mask.ndim - 1} of shape "
                                 f"{list(want)}")
            out.extend(np.nonzero(mask))
            dim += mask.ndim
            continue
        out.append(i)
        if i is Ellipsis:
            dim += len(shape) - n_real
        elif i is not None:
            dim += 1
    return tuple(out)


@op("getitem")
def getitem(x, idx):
    """Basic indexing (ints, slices with any step, None and Ellipsis) and numpy's advanced
    indexing with integer arrays (traced or numpy constants) on adjacent axes: `x[idx]`,
    `x[:, idx]`, `x[np.arange(n), labels]`. Indices are checked where they are read (an IndexError
    naming the index, never a read out of bounds); negative ones count from the end."""
    v = _layout_value(x)
    idx = idx if isinstance(idx, tuple) else (idx,)
    idx = _constant_masks_as_indices(idx, v.shape)
    n_real = len([i for i in idx if i is not None and i is not Ellipsis])
    if builtins.sum(i is Ellipsis for i in idx) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if n_real > v.ndim:
        raise IndexError(f"too many indices for a value of shape {list(v.shape)}: {n_real}")
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (v.ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (v.ndim - builtins.sum(i is not None for i in expanded)))
    advanced = [k for k, i in enumerate(expanded) if _is_index_array(i)]
    if advanced and advanced != list(range(advanced[0], advanced[-1] + 1)):
        raise NotImplementedError("advanced indices (integer arrays) must be on adjacent axes "
                                  "(numpy moves the axes of separated ones to the front)")
    arrays = [expanded[k] for k in advanced]
    for k in advanced:   # basic indexing first, keeping the axes the arrays index
        expanded[k] = slice(None)
    start, limit, strides, out_shape, reverse = [], [], [], [], []
    dim, first = 0, None
    for pos, i in enumerate(expanded):
        if advanced and pos == advanced[0]:
            first = len(out_shape)   # the first advanced axis in the sliced value
        if i is None:
            out_shape.append(1)
            continue
        n = v.shape[dim]
        if isinstance(i, Tracer):
            raise TypeError(f"indexing with a traced value of type {i.value.type} is not "
                            f"supported; index with integers (arrays or Python ints) and slices, "
                            f"or use tracejit.where")
        if isinstance(i, (numbers.Integral, np.integer)) and not isinstance(i, bool):
            k = int(i)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for axis {dim} with size {n}")
            k %= n
            start.append(k), limit.append(k + 1), strides.append(1)
        elif isinstance(i, slice):
            s, l, st = i.indices(n)
            m = len(range(s, l, st))
            if st < 0:   # the same elements read forwards, then reversed
                reverse.append(len(start))
                s, l, st = (s + st * (m - 1), s + 1, -st) if m else (0, 0, 1)
            l = builtins.max(l, s)
            start.append(s), limit.append(l), strides.append(st)
            out_shape.append(m)
        else:
            raise TypeError(f"unsupported index {i!r} ({type(i).__name__}): use ints, slices, None, "
                            f"'...' or integer arrays")
        dim += 1
    sliced = lax.slice_(v, start, limit, strides)
    for axis in reverse:
        sliced = _reverse(sliced, axis)
    out = lax.reshape(sliced, out_shape)
    if arrays:
        out = _take_adjacent(out, first, arrays)
    return wrap(out)


def _take_adjacent(v: Value, axis: int, arrays) -> Value:
    """numpy's v[..., i0, i1, ..., ...] for integer index arrays on axes axis, axis + 1, ...:
    the indexed axes are replaced by the broadcast shape S of the arrays. One gather per array;
    an array that is a constant arange over its axis (x[np.arange(n), labels]) costs nothing."""
    m = len(arrays)
    post = v.shape[axis + m:]
    sizes = v.shape[axis:axis + m]
    shapes = [tuple(_shape_of_index(a)) for a in arrays]
    S = broadcast_shapes(*shapes)
    M = math.prod(S)
    names = [index_name(a, "index" if m == 1 else f"index {k}") for k, a in enumerate(arrays)]
    # the first array may be the identity on its axis: then that axis already is the result's
    first = arrays[0]
    if m > 1 and len(S) == 1 and not isinstance(first, Tracer) and \
            np.array_equal(np.broadcast_to(np.asarray(first), S), np.arange(sizes[0])):
        cur, done = v, 1
    else:
        i0 = _checked_constant(first, sizes[0], axis, names[0])
        i0 = lax.broadcast_to(i0, S) if i0.shape != S else i0
        idx = lax.reshape(i0, (1,) * axis + (M,) + (1,) * (m - 1 + len(post)))
        cur, done = lax.gather(v, idx, axis, name=names[0]), 1
    # cur: [pre, M, sizes[done:], post]; each further array picks along the axis after M
    for k in range(done, m):
        ik = _checked_constant(arrays[k], sizes[k], axis + k, names[k])
        ik = lax.broadcast_to(ik, S) if ik.shape != S else ik
        idx = lax.reshape(ik, (1,) * axis + (M, 1) + (1,) * (m - 1 - k + len(post)))
        cur = lax.gather(cur, idx, axis + 1, name=names[k])
        cur = lax.reshape(cur, cur.shape[:axis + 1] + cur.shape[axis + 2:])
    return lax.reshape(cur, v.shape[:axis] + S + post)


def _shape_of_index(a):
    return a.shape if isinstance(a, Tracer) else np.asarray(a).shape


def _checked_constant(a, size: int, axis: int, name: str) -> Value:
    """Index array `a` as an integer Value; a numpy constant is checked right away."""
    if not isinstance(a, Tracer):
        arr = np.asarray(a)
        arr = arr.astype(np.int64) if arr.size == 0 else arr
        bad = arr[(arr < -size) | (arr >= size)]
        if bad.size:
            raise IndexError(f"index {bad.flat[0]} is out of bounds for axis {axis} with size "
                             f"{size}")
        a = arr
    return int_value(a)


@op("take_along_axis")
def take_along_axis(a, indices, axis):
    """numpy's take_along_axis: out[..., j, ...] = a[..., indices[..., j, ...], ...] along `axis`
    (None: of the flattened `a`, with 1-d indices). `indices`: an integer array of a's rank
    (traced, e.g. labels, or a numpy constant), broadcast against `a` on the other axes; negative
    indices count from the end once. An index outside the axis raises IndexError naming it,
    checked natively where it is read. The gradient w.r.t. `a` is a scatter-add."""
    v = as_value(a, result_dtype(a))
    if axis is None:
        v, axis = lax.reshape(v, (v.type.size,)), 0
    if not isinstance(axis, (numbers.Integral, np.integer)) or isinstance(axis, bool) or \
            not -v.ndim <= axis < builtins.max(v.ndim, 1):
        raise ValueError(f"take_along_axis: axis {axis!r} is out of range for a value of shape "
                         f"{list(v.shape)}")
    axis = int(axis) % v.ndim
    name = index_name(indices, "indices")
    shape = tuple(_shape_of_index(indices))
    if len(shape) != v.ndim:
        raise ShapeError(f"take_along_axis: indices of shape {list(shape)} must have the rank of "
                         f"the array, shape {list(v.shape)}")
    idx = _checked_constant(indices, v.shape[axis], axis, name)
    others = broadcast_shapes(tuple(n for d, n in enumerate(v.shape) if d != axis),
                              tuple(n for d, n in enumerate(shape) if d != axis))
    full = others[:axis] + (v.shape[axis],) + others[axis:]
    if full != v.shape:
        v = lax.broadcast_to(v, full)
    return wrap(lax.gather(v, idx, axis, name=name))


# ------------------------------------------------------------------------------------------------
# rearranging and assembling arrays: composites of slices, pads, reshapes, broadcasts, transposes,
# concatenations and (for reversals and uneven repeats) gathers with constant indices
# ------------------------------------------------------------------------------------------------
def _reverse(v: Value, axis: int) -> Value:
    """`v` reversed along `axis`: a gather with constant indices (its adjoint, a scatter-add, is
    the same reversal of the cotangent)."""
    n = v.shape[axis]
    if n <= 1:
        return v
    if v.dtype not in ("f32", "f64"):
        raise TypeError(f"reversing a traced {v.type} is not supported (only float values)")
    idx = np.arange(n - 1, -1, -1).reshape((1,) * axis + (n,) + (1,) * (v.ndim - axis - 1))
    return lax.gather(v, lax.literal(idx), axis, name="reversed")


def _slice_axis(v: Value, axis: int, lo: int, hi: int) -> Value:
    start = [0] * v.ndim
    limit = list(v.shape)
    start[axis], limit[axis] = lo, hi
    return lax.slice_(v, start, limit)


def _axis_arg(v: Value, axis, what: str) -> int:
    if not isinstance(axis, (numbers.Integral, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{what}: axis must be an int, got {axis!r}")
    return _axes(v, int(axis))[0]


@op("flip")
def flip(m, axis=None):
    """numpy's flip: the order of elements reversed along `axis` (an int, a tuple, None: all)."""
    v = _layout_value(m)
    for a in _axes(v, axis):
        v = _reverse(v, a)
    return wrap(v)


@op("flipud")
def flipud(m):
    if len(shape_of(m)) < 1:
        raise ValueError("flipud: the input must be at least 1-d")
    return flip(m, 0)


@op("fliplr")
def fliplr(m):
    if len(shape_of(m)) < 2:
        raise ValueError(f"fliplr: the input must be at least 2-d, got shape {list(shape_of(m))}")
    return flip(m, 1)


_PAD_MODES = ("constant", "edge", "reflect", "symmetric", "wrap")


@op("pad")
def pad(array, pad_width, mode="constant", constant_values=0):
    """numpy's pad in modes constant (one scalar `constant_values`), edge, reflect, symmetric and
    wrap; `pad_width` as numpy takes it (n, (before, after) or one pair per axis). reflect needs
    widths below the axis length, symmetric and wrap at most the length (numpy's repeated
    reflection of wider pads is not supported: an error, never a different answer)."""
    v = _layout_value(array)
    widths = np.asarray(pad_width)
    if widths.dtype.kind not in "iu" or (widths < 0).any():
        raise ValueError(f"pad: pad_width must be non-negative integers, got {pad_width!r}")
    try:
        widths = np.broadcast_to(widths, (v.ndim, 2))
    except ValueError:
        raise ValueError(f"pad: pad_width {pad_width!r} does not fit a value of shape "
                         f"{list(v.shape)}") from None
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"pad: mode {mode!r} is not supported (use one of {_PAD_MODES})")
    if mode == "constant":
        if np.ndim(constant_values) or isinstance(constant_values, Tracer):
            raise NotImplementedError("pad: constant_values must be one Python or numpy number")
        lo, hi = [int(w) for w in widths[:, 0]], [int(w) for w in widths[:, 1]]
        out = wrap(lax.pad(v, lo, hi))
        if constant_values == 0:
            return out
        inside = np.zeros(out.shape, dtype=bool)
        inside[tuple(slice(b, b + n) for b, n in zip(lo, v.shape))] = True
        return where(inside, out, constant_values)
    for axis, (before, after) in enumerate(widths):
        v = _pad_axis(v, axis, int(before), int(after), mode)
    return wrap(v)


def _pad_axis(v: Value, axis: int, before: int, after: int, mode: str) -> Value:
    n = v.shape[axis]
    if not before and not after:
        return v
    most = n - 1 if mode == "reflect" else n
    if builtins.max(before, after) > most or n == 0:
        raise NotImplementedError(f"pad: mode {mode!r} pads axis {axis} of length {n} by at most "
                                  f"{most}, got ({before}, {after})")
    if mode == "edge":
        def edge(lo, width):
            part = _slice_axis(v, axis, lo, lo + 1)
            return lax.broadcast_to(part, part.shape[:axis] + (width,) + part.shape[axis + 1:])
        left, right = edge(0, before), edge(n - 1, after)
    elif mode == "wrap":
        left, right = _slice_axis(v, axis, n - before, n), _slice_axis(v, axis, 0, after)
    else:
        skip = 1 if mode == "reflect" else 0   # reflect leaves the edge out, symmetric repeats it
        left = _reverse(_slice_axis(v, axis, skip, skip + before), axis)
        right = _reverse(_slice_axis(v, axis, n - skip - after, n - skip), axis)
    return lax.concatenate([p for p in (left, v, right) if p.shape[axis]], axis)


def _split(what, ary, indices_or_sections, axis, equal):
    v = _layout_value(ary)
    axis = _axis_arg(v, axis, what)
    n = v.shape[axis]
    if isinstance(indices_or_sections, (numbers.Integral, np.integer)):
        k = int(indices_or_sections)
        if k <= 0:
            raise ValueError(f"{what}: the number of sections must be positive, got {k}")
        if equal and n % k:
            raise ValueError(f"{what}: an axis of length {n} does not split into {k} equal "
                             f"sections (use array_split)")
        sizes = [n // k + 1] * (n % k) + [n // k] * (k - n % k)
        bounds = list(itertools.accumulate([0] + sizes))
    else:
        cuts = [range(n)[slice(int(i), None)].start if i < 0 else builtins.min(int(i), n)
                for i in indices_or_sections]
        bounds = [0] + cuts + [n]
    return [wrap(_slice_axis(v, axis, lo, builtins.max(lo, hi)))
            for lo, hi in zip(bounds[:-1], bounds[1:])]


@op("split")
def split(ary, indices_or_sections, axis=0):
    """numpy's split: a list of views; an int splits into equal sections, a list at indices."""
    return _split("split", ary, indices_or_sections, axis, equal=True)


@op("array_split")
def array_split(ary, indices_or_sections, axis=0):
    """numpy's array_split: like split, but n sections of an axis of any length (the first
    length % n sections one longer)."""
    return _split("array_split", ary, indices_or_sections, axis, equal=False)


@op("tile")
def tile(A, reps):
    v = _layout_value(A)
    reps = (int(reps),) if isinstance(reps, (numbers.Integral, np.integer)) else \
        tuple(int(r) for r in reps)
    d = builtins.max(len(reps), v.ndim)
    reps = (1,) * (d - len(reps)) + reps
    shape = (1,) * (d - v.ndim) + v.shape
    # [1, s0, 1, s1, ...] broadcast to [r0, s0, r1, s1, ...], merged pairwise
    inter = lax.reshape(v, [x for s in shape for x in (1, s)])
    big = lax.broadcast_to(inter, [x for r, s in zip(reps, shape) for x in (r, s)])
    return wrap(lax.reshape(big, [r * s for r, s in zip(reps, shape)]))


@op("repeat")
def repeat(a, repeats, axis=None):
    """numpy's repeat: each element `repeats` times (an int, or one count per element along the
    axis) along `axis` (None: of the flattened array)."""
    v = _layout_value(a)
    if axis is None:
        v, axis = lax.reshape(v, (v.type.size,)), 0
    axis = _axis_arg(v, axis, "repeat")
    n = v.shape[axis]
    counts = np.asarray(repeats)
    if counts.dtype.kind not in "iu" or (counts < 0).any() or counts.ndim > 1 or \
            counts.ndim == 1 and counts.size not in (1, n):
        raise ValueError(f"repeat: repeats must be a non-negative int or one per element of an "
                         f"axis of length {n}, got {repeats!r}")
    if counts.size == 1 or (counts.size and (counts == counts.flat[0]).all()) or n == 0:
        r = int(counts.flat[0]) if counts.size else 0
        wide = lax.reshape(v, v.shape[:axis + 1] + (1,) + v.shape[axis + 1:])
        wide = lax.broadcast_to(wide, v.shape[:axis + 1] + (r,) + v.shape[axis + 1:])
        return wrap(lax.reshape(wide, v.shape[:axis] + (n * r,) + v.shape[axis + 1:]))
    idx = np.repeat(np.arange(n), counts)
    if not idx.size:
        return wrap(_slice_axis(v, axis, 0, 0))
    if v.dtype not in ("f32", "f64"):
        raise TypeError(f"repeat: uneven repeats of a traced {v.type} are not supported")
    idx = idx.reshape((1,) * axis + (idx.size,) + (1,) * (v.ndim - axis - 1))
    return wrap(lax.gather(v, lax.literal(idx), axis, name="repeats"))


@op("roll")
def roll(a, shift, axis=None):
    v = _layout_value(a)
    if axis is None:
        return reshape(roll(wrap(lax.reshape(v, (v.type.size,))), shift, 0), v.shape)
    axes = (axis,) if isinstance(axis, (numbers.Integral, np.integer)) else tuple(axis)
    shifts = np.broadcast_to(np.asarray(shift), (len(axes),)) if np.ndim(shift) <= 1 else None
    if shifts is None or shifts.dtype.kind not in "iu":
        raise ValueError(f"roll: shift {shift!r} must be an int or one per axis {axes!r}")
    for ax, k in zip(axes, shifts):
        ax = _axis_arg(v, ax, "roll")
        n = v.shape[ax]
        k = int(k) % n if n else 0
        if k:
            v = lax.concatenate([_slice_axis(v, ax, n - k, n), _slice_axis(v, ax, 0, n - k)], ax)
    return wrap(v)


@op("diff")
def diff(a, n=1, axis=-1, prepend=None, append=None):
    """numpy's diff: the n-th forward difference along `axis`, of `a` with `prepend` and `append`
    (scalars broadcast to one slice, or arrays) joined before and after it along `axis`."""
    if n < 0:
        raise ValueError(f"diff: order n must be non-negative, got {n}")
    if n and (prepend is not None or append is not None):
        a = _join_ends(a, axis, prepend, append)
    v = as_value(a, result_dtype(a)) if not _is_int_tracer(a) else to_value(a)
    axis = _axis_arg(v, axis, "diff")
    for _ in range(n):
        m = v.shape[axis]
        if m == 0:
            break
        v = lax.sub(_slice_axis(v, axis, 1, m), _slice_axis(v, axis, 0, m - 1))
    return wrap(v)


def _join_ends(a, axis, prepend, append):
    shape = list(shape_of(a))
    if not shape:
        raise ValueError("diff requires input that is at least one dimensional")
    ax = _axis_arg(_layout_value(a), axis, "diff")
    parts = []
    for end in (prepend, a, append):
        if end is None:
            continue
        if end is not a and not shape_of(end):   # a scalar: one slice of it
            end = broadcast_to(end, shape[:ax] + [1] + shape[ax + 1:])
        parts.append(end)
    return concatenate(parts, ax)


def _triangle(what, m, k, lower):
    shape = shape_of(m)
    if len(shape) < 2:
        raise ValueError(f"{what}: expects at least 2 dimensions, got shape {list(shape)}")
    keep = np.tri(shape[-2], shape[-1], k, dtype=bool)
    return where(keep if lower else ~np.tri(shape[-2], shape[-1], k - 1, dtype=bool), m, 0)


@op("tril")
def tril(m, k=0):
    return _triangle("tril", m, k, lower=True)


@op("triu")
def triu(m, k=0):
    return _triangle("triu", m, k, lower=False)


@op("diagonal")
def diagonal(a, offset=0, axis1=0, axis2=1):
    """numpy's diagonal: a[..., i, i + offset] over axis1, axis2, as the last axis. A strided
    slice of the flattened matrices."""
    v = _layout_value(a)
    if v.ndim < 2:
        raise ValueError(f"diagonal: expects at least 2 dimensions, got shape {list(v.shape)}")
    a1, a2 = _axis_arg(v, axis1, "diagonal"), _axis_arg(v, axis2, "diagonal")
    if a1 == a2:
        raise ValueError("diagonal: axis1 and axis2 must differ")
    rest = [d for d in range(v.ndim) if d not in (a1, a2)]
    v = lax.transpose(v, rest + [a1, a2])
    rows, cols = v.shape[-2:]
    lead = v.shape[:-2]
    length = builtins.max(0, builtins.min(rows, cols - offset) if offset >= 0 else
                          builtins.min(rows + offset, cols))
    first = offset if offset >= 0 else -offset * cols
    flat = lax.reshape(v, lead + (rows * cols,))
    if not length:
        return wrap(lax.slice_(flat, [0] * flat.ndim, lead + (0,)))
    out = lax.slice_(flat, [0] * len(lead) + [first], lead + (first + (length - 1) * (cols + 1) + 1,),
                     [1] * len(lead) + [cols + 1])
    return wrap(out)


@op("diag")
def diag(v, k=0):
    """numpy's diag: the k-th diagonal of a matrix, or the matrix with 1-d `v` on its k-th
    diagonal (zeros elsewhere)."""
    shape = shape_of(v)
    if len(shape) == 2:
        return diagonal(v, k)
    if len(shape) != 1:
        raise ValueError(f"diag: expects a 1-d or 2-d input, got shape {list(shape)}")
    size = shape[0] + builtins.abs(k)
    on = np.eye(size, size, k, dtype=bool)
    # row r of the result holds v[r] (k >= 0) or column c holds v[c] (k < 0) on the diagonal
    padded = pad(v, (0, builtins.abs(k)))
    line = reshape(padded, (size, 1) if k >= 0 else (1, size))
    return where(on, line, 0)


@op("trace")
def trace(a, offset=0, axis1=0, axis2=1, dtype=None):
    return sum(diagonal(a, offset, axis1, axis2), -1, dtype=dtype)


def eye(N, M=None, k=0, dtype=float):
    """numpy's eye, a constant (numpy array) that traced code can use like any array."""
    return np.eye(N, M, k, dtype=dtype)


def _filled_like(what, a, value, dtype):
    v = _layout_value(a)
    dt = v.dtype
    if dtype is not None:
        npdt = np.dtype(dtype)
        dt = {DTYPES[d]: d for d in INT_DTYPES}.get(npdt) or float_dtype(npdt)
        if npdt.kind not in "iuf":
            raise TypeError(f"{what}: dtype must be a float or integer dtype, got {npdt}")
    if not isinstance(value, numbers.Number) and np.ndim(value):
        raise NotImplementedError(f"{what}: the fill value must be one number")
    return wrap(lax.full(value, v.shape, dt))


@op("zeros_like")
def zeros_like(a, dtype=None):
    return _filled_like("zeros_like", a, 0, dtype)


@op("ones_like")
def ones_like(a, dtype=None):
    return _filled_like("ones_like", a, 1, dtype)


@op("full_like")
def full_like(a, fill_value, dtype=None):
    return _filled_like("full_like", a, fill_value, dtype)


@op("moveaxis")
def moveaxis(a, source, destination):
    v = _layout_value(a)
    src = (source,) if isinstance(source, (numbers.Integral, np.integer)) else tuple(source)
    dst = (destination,) if isinstance(destination, (numbers.Integral, np.integer)) \
        else tuple(destination)
    if len(src) != len(dst):
        raise ValueError("moveaxis: source and destination must have the same number of elements")
    src = [_axis_arg(v, s, "moveaxis") for s in src]
    dst = [_axis_arg(v, d, "moveaxis") for d in dst]
    if len(set(src)) < len(src) or len(set(dst)) < len(dst):
        raise ValueError("moveaxis: repeated axis")
    perm = [d for d in range(v.ndim) if d not in src]
    for d, s in sorted(zip(dst, src)):
        perm.insert(d, s)
    return wrap(lax.transpose(v, perm)) if perm != list(range(v.ndim)) else wrap(v)


@op("ravel")
def ravel(a):
    return reshape(a, (-1,))


def _at_least(what, arys, shape_for):
    out = [reshape(a, shape_for(shape_of(a))) if len(shape_of(a)) < len(shape_for(())) else
           (a if isinstance(a, Tracer) else wrap(_layout_value(a))) for a in arys]
    return out[0] if len(out) == 1 else out


@op("atleast_1d")
def atleast_1d(*arys):
    return _at_least("atleast_1d", arys, lambda s: s if len(s) >= 1 else (1,))


@op("atleast_2d")
def atleast_2d(*arys):
    return _at_least("atleast_2d", arys, lambda s: {0: (1, 1), 1: (1,) + tuple(s)}.get(len(s), s))


@op("atleast_3d")
def atleast_3d(*arys):
    return _at_least("atleast_3d", arys, lambda s: {0: (1, 1, 1), 1: (1,) + tuple(s) + (1,),
                                                    2: tuple(s) + (1,)}.get(len(s), s))


def _as_list(what, tup):
    if isinstance(tup, Tracer) or not isinstance(tup, (list, tuple)):
        raise TypeError(f"{what}: expects a list or tuple of arrays")
    return list(tup)


@op("vstack")
def vstack(tup, *, dtype=None):
    return concatenate([atleast_2d(a) for a in _as_list("vstack", tup)], 0, dtype=dtype)


@op("hstack")
def hstack(tup, *, dtype=None):
    arrs = [atleast_1d(a) for a in _as_list("hstack", tup)]
    return concatenate(arrs, 0 if arrs and arrs[0].ndim == 1 else 1, dtype=dtype)


@op("dstack")
def dstack(tup):
    return concatenate([atleast_3d(a) for a in _as_list("dstack", tup)], 2)


@op("column_stack")
def column_stack(tup):
    cols = [reshape(a, (-1, 1)) if len(shape_of(a)) < 2 else a
            for a in _as_list("column_stack", tup)]
    return concatenate(cols, 1)



@op("append")
def append(arr, values, axis=None):
    """numpy's append: `values` after `arr` along `axis` (None: both flattened)."""
    if axis is None:
        return concatenate([ravel(arr), ravel(values)], 0)
    return concatenate([arr, values], axis)


def _split_at_least(what, ary, indices_or_sections, axis, ndim):
    if len(shape_of(ary)) < ndim:
        raise ValueError(f"{what} only works on arrays of {ndim} or more dimensions, got shape "
                         f"{list(shape_of(ary))}")
    return split(ary, indices_or_sections, axis)


@op("vsplit")
def vsplit(ary, indices_or_sections):
    return _split_at_least("vsplit", ary, indices_or_sections, 0, 2)


@op("hsplit")
def hsplit(ary, indices_or_sections):
    return _split_at_least("hsplit", ary, indices_or_sections, 1 if len(shape_of(ary)) > 1 else 0,
                           1)


@op("dsplit")
def dsplit(ary, indices_or_sections):
    return _split_at_least("dsplit", ary, indices_or_sections, 2, 3)


@op("rot90")
def rot90(m, k=1, axes=(0, 1)):
    """numpy's rot90: k quarter turns from the first axis towards the second (flips and a
    transpose)."""
    nd = len(shape_of(m))
    axes = tuple(axes)
    if len(axes) != 2 or nd < 2:
        raise ValueError(f"rot90: needs 2 axes of an array of at least 2 dimensions, got axes "
                         f"{axes!r} and shape {list(shape_of(m))}")
    a0, a1 = (int(a) % nd for a in axes)
    if a0 == a1:
        raise ValueError("rot90: axes must be different")
    k %= 4
    if k == 0:
        return m if isinstance(m, Tracer) else wrap(_layout_value(m))
    if k == 2:
        return flip(flip(m, a0), a1)
    perm = list(range(nd))
    perm[a0], perm[a1] = perm[a1], perm[a0]
    return transpose(flip(m, a1), perm) if k == 1 else flip(transpose(m, perm), a1)


@op("rollaxis")
def rollaxis(a, axis, start=0):
    """numpy's rollaxis: axis `axis` moved to before position `start`."""
    nd = len(shape_of(a))
    if not -nd <= start <= nd:
        raise ValueError(f"rollaxis: start {start} is out of range for {nd} dimensions")
    axis = int(axis) % nd if -nd <= axis < nd else axis
    if not 0 <= axis < nd:
        raise ValueError(f"rollaxis: axis {axis} is out of range for {nd} dimensions")
    start = start % nd if start < 0 else start
    if axis < start:
        start -= 1
    return moveaxis(a, axis, start) if axis != start else \
        (a if isinstance(a, Tracer) else wrap(_layout_value(a)))

# ------------------------------------------------------------------------------------------------
# numpy 2's array-API spellings, numpy.linalg's versions with the last two axes, and a few more
# numpy functions
# ------------------------------------------------------------------------------------------------
@op("vector_norm")
def vector_norm(x, axis=None, keepdims=False, ord=2):
    """numpy.linalg.vector_norm: the `ord` norm of the elements over `axis` (an axis, a tuple of
    axes, or None: all of them) taken as one vector, for any real ord (0: the nonzero count)."""
    v = _layout_value(x)
    axes = _axes(v, axis)
    rest = [d for d in range(v.ndim) if d not in axes]
    flat = reshape(transpose(x, rest + list(axes)),
                   tuple(v.shape[d] for d in rest) + (math.prod(v.shape[d] for d in axes),))
    out = _vector_norm(flat, None if ord == 2 else ord, -1, False)
    return reshape(out, [1 if d in axes else n for d, n in enumerate(v.shape)]) if keepdims \
        else out


@op("matrix_norm")
def matrix_norm(x, keepdims=False, ord="fro"):
    """numpy.linalg.matrix_norm: norm() of the matrices in the last two axes."""
    return norm(x, ord, (-2, -1), keepdims)


@op("vecdot")
def vecdot(x1, x2, axis=-1):
    """numpy's vecdot of real vectors: sum(x1 * x2) along `axis` (operands broadcast)."""
    return sum(multiply(x1, x2), axis)


def _matrix_stack(what, x):
    if len(shape_of(x)) < 2:
        raise ValueError(f"{what}: needs at least 2 dimensions, got shape {list(shape_of(x))}")
    return x


@op("matrix_transpose")
def matrix_transpose(x):
    """numpy's matrix_transpose (x.mT): the last two axes swapped."""
    return swapaxes(_matrix_stack("matrix_transpose", x), -2, -1)


@op("linalg.trace")
def linalg_trace(x, offset=0, dtype=None):
    """numpy.linalg.trace: the traces of the matrices in the last two axes (np.trace takes the
    first two)."""
    return trace(_matrix_stack("linalg.trace", x), offset, -2, -1, dtype)


@op("linalg.diagonal")
def linalg_diagonal(x, offset=0):
    """numpy.linalg.diagonal: the diagonals of the matrices in the last two axes."""
    return diagonal(_matrix_stack("linalg.diagonal", x), offset, -2, -1)


@op("linalg.outer")
def linalg_outer(x1, x2):
    """numpy.linalg.outer: of 1-d vectors only (np.outer flattens)."""
    if len(shape_of(x1)) != 1 or len(shape_of(x2)) != 1:
        raise ValueError(f"linalg.outer: expects 1-d vectors, got shapes {list(shape_of(x1))} "
                         f"and {list(shape_of(x2))}")
    return outer(x1, x2)


@op("multi_dot")
def multi_dot(arrays):
    """numpy.linalg.multi_dot: the product of the matrices left to right (a 1-d first or last
    array is a row or column vector, as in matmul)."""
    arrays = _as_list("multi_dot", arrays)
    if len(arrays) < 2:
        raise ValueError("multi_dot: expects at least two arrays")
    out = arrays[0]
    for a in arrays[1:]:
        out = matmul(out, a)
    return out


@op("broadcast_to")
def broadcast_to(array, shape):
    """numpy's broadcast_to (a copy, which traced values cannot tell from a view)."""
    shape = (int(shape),) if isinstance(shape, (numbers.Integral, np.integer)) else \
        tuple(int(n) for n in shape)
    v = _layout_value(array)
    if broadcast_shapes(v.shape, shape) != shape:
        raise ValueError(f"broadcast_to: cannot broadcast shape {list(v.shape)} to {list(shape)}")
    return wrap(lax.broadcast_to(v, shape))


@op("take")
def take(a, indices, axis=None, mode="raise"):
    """numpy's take: the elements at `indices` along `axis` (None: of the flattened `a`), as
    a[..., indices, ...]. mode "raise" (an index out of range raises IndexError); "wrap" and
    "clip" for constant indices."""
    if mode not in ("raise", "wrap", "clip"):
        raise ValueError(f"take: mode must be 'raise', 'wrap' or 'clip', got {mode!r}")
    if axis is None:
        a, axis = ravel(a), 0
    n = shape_of(a)[_axis_arg(_layout_value(a), axis, "take")]
    if mode != "raise":
        if isinstance(indices, Tracer):
            raise NotImplementedError(f"take: mode={mode!r} needs constant indices, got a traced "
                                      f"value; use mode='raise'")
        indices = np.asarray(indices)
        indices = np.mod(indices, n) if mode == "wrap" else np.clip(indices, 0, n - 1)
    nd = len(shape_of(a))
    ax = int(axis) % nd
    return getitem(a, (slice(None),) * ax + (indices,))


def _with_initial(what, out, first, x, axis, include_initial):
    if not include_initial:
        return out
    shape = list(shape_of(x))
    if not shape:
        raise ValueError(f"{what}: include_initial needs at least one dimension")
    ax = _axis_arg(_layout_value(x), axis, what)
    return concatenate([broadcast_to(first, shape[:ax] + [1] + shape[ax + 1:]), out], ax)


def _cumulative(what, scan, identity, x, axis, dtype, include_initial):
    if axis is None:
        if len(shape_of(x)) > 1:
            raise ValueError(f"{what}: axis is required for arrays of more than one dimension")
        axis = 0
    x = _in_dtype(x, dtype)
    first = as_value(identity, result_dtype(x))
    return _with_initial(what, scan(x, axis), wrap(first), x, axis, include_initial)


@op("cumulative_sum")
def cumulative_sum(x, axis=None, dtype=None, include_initial=False):
    """numpy 2's cumulative_sum: cumsum, and with include_initial a leading 0 along `axis`."""
    return _cumulative("cumulative_sum", cumsum, 0.0, x, axis, dtype, include_initial)


@op("cumulative_prod")
def cumulative_prod(x, axis=None, dtype=None, include_initial=False):
    """numpy 2's cumulative_prod: cumprod, and with include_initial a leading 1 along `axis`."""
    return _cumulative("cumulative_prod", cumprod, 1.0, x, axis, dtype, include_initial)


@op("ptp")
def ptp(a, axis=None, keepdims=False):
    """numpy's ptp: max - min along `axis` (each gradient split among tied extremes)."""
    return subtract(max(a, axis, keepdims), min(a, axis, keepdims))


@op("positive")
def positive(x):
    return x if isinstance(x, Tracer) else wrap(as_value(x, result_dtype(x)))


@op("cbrt")
def cbrt(x):
    """The real cube root, sign(x) * |x|^(1/3) (its derivative at 0 is infinite, as numpy's)."""
    return multiply(sign(x), power(abs(x), 1.0 / 3.0))


@op("float_power")
def float_power(x1, x2):
    """numpy's float_power: power computed in float64."""
    return power(astype(x1, np.float64), astype(x2, np.float64))


@op("fix")
def fix(x):
    """numpy's fix: rounding toward zero (trunc), zero gradient."""
    return trunc(x)


@op("isnan")
def isnan(x):
    return not_equal(x, x)


@op("isinf")
def isinf(x):
    return equal(abs(x), np.inf)


@op("isfinite")
def isfinite(x):
    return less(abs(x), np.inf)   # False for NaN


@op("logical_xor")
def logical_xor(a, b):
    return not_equal(wrap(as_bool_value(a)), wrap(as_bool_value(b)))


def _truth_reduce(a, axis, keepdims, any_):
    """numpy's any/all: as a max (any) or min (all) of 0/1 floats, compared back to bool."""
    ones = where(a, 1.0, 0.0)
    return greater(max(ones, axis, keepdims) if any_ else min(ones, axis, keepdims), 0.5)


@op("any")
def any(a, axis=None, keepdims=False):
    return _truth_reduce(a, axis, keepdims, True)


@op("all")
def all(a, axis=None, keepdims=False):
    return _truth_reduce(a, axis, keepdims, False)


# ------------------------------------------------------------------------------------------------
# more of numpy: signs and steps, interpolation, convolution, statistics, grids, comparisons
# ------------------------------------------------------------------------------------------------
def _common(*xs):
    """Operands `xs` as traced values of their common float dtype (constants take the traced
    operands' dtype, as in the arithmetic operators)."""
    return [wrap(v) for v in promote(*xs)]


@op("signbit")
def signbit(x):
    """numpy's signbit: True where the sign bit is set, -0.0 included (1 / -0.0 is -inf); the
    sign bit of a NaN is not seen (False)."""
    return logical_or(less(x, 0), logical_and(equal(x, 0), less(divide(1.0, x), 0)))


@op("copysign")
def copysign(x1, x2):
    """numpy's copysign: |x1| with the sign bit of x2. Gradient: sign(x1) * (+-1) for x1, none
    for x2."""
    x1, x2 = _common(x1, x2)
    return multiply(abs(x1), where(signbit(x2), -1.0, 1.0))


@op("heaviside")
def heaviside(x1, x2):
    """numpy's heaviside: 0 where x1 < 0, x2 where x1 == 0, 1 where x1 > 0 (NaN for NaN)."""
    step = where(less(x1, 0), 0.0, where(greater(x1, 0), 1.0, x2))
    return where(not_equal(x1, x1), x1, step)


@op("floor_divide")
def floor_divide(x1, x2):
    """numpy's floor_divide (Python's //): floor(x1 / x2) computed as numpy does, from fmod, so
    that x1 == x2 * (x1 // x2) + x1 % x2 holds exactly; integers stay integers (a zero divisor
    gives 0, as numpy). Zero gradient (piecewise constant)."""
    dt = int_operands_dtype(x1, x2)
    if dt is not None:   # exact in float64 for |x| < 2**53
        f64 = [astype(x, np.float64) if isinstance(x, Tracer) else np.asarray(x, np.float64)
               for x in (x1, x2)]
        q = floor_divide(*f64)
        return astype(where(equal(x2, 0), 0.0, q), DTYPES[dt])
    m = fmod(x1, x2)
    div = divide(subtract(x1, m), x2)
    div = where(logical_and(not_equal(m, 0), not_equal(less(x2, 0), less(m, 0))),
                subtract(div, 1.0), div)
    q = floor(div)
    q = where(greater(subtract(div, q), 0.5), add(q, 1.0), q)
    # a zero divisor: x1 / x2 (inf or NaN), as numpy
    return stop_gradient(where(equal(x2, 0), divide(x1, x2), q))


@op("sinc")
def sinc(x):
    """numpy's normalized sinc, sin(pi x) / (pi x), 1 at 0 (where its first derivative, 0, is
    exact; higher derivatives at exactly 0 are not)."""
    zero = equal(x, 0)
    t = multiply(where(zero, 1.0, x), math.pi)
    return where(zero, 1.0, divide(sin(t), t))


@op("isclose")
def isclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    """numpy's isclose: |a - b| <= atol + rtol * |b| for finite values, equality otherwise; with
    equal_nan NaNs compare equal. A traced boolean array."""
    finite = logical_and(isfinite(a), isfinite(b))
    near = less_equal(abs(subtract(a, b)), add(atol, multiply(rtol, abs(b))))
    out = logical_or(logical_and(finite, near), logical_and(logical_not(finite), equal(a, b)))
    return logical_or(out, logical_and(isnan(a), isnan(b))) if equal_nan else out


@op("allclose")
def allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    """numpy's allclose as a traced 0-d boolean (as jax.numpy's): numpy's returns a Python bool,
    which a traced comparison cannot be; `if tracejit.allclose(...)` raises the concretization
    error (compare outside the traced function, or use tracejit.where)."""
    return all(isclose(a, b, rtol, atol, equal_nan))


@op("count_nonzero")
def count_nonzero(a, axis=None, *, keepdims=False):
    """numpy's count_nonzero: the number of nonzero (true) elements along `axis`, as int64."""
    return astype(sum(where(a, 1.0, 0.0).astype(np.float64), axis, keepdims), np.int64)


@op("average")
def average(a, axis=None, weights=None, returned=False, *, keepdims=False):
    """numpy's average: the mean along `axis`, or with `weights` (of a's shape, or 1-d along a
    single `axis`) sum(a * w) / sum(w); `returned=True` also gives the sum of the weights,
    broadcast to the average's shape."""
    keepdims = bool(keepdims) if _given(keepdims) else False
    if weights is None:
        avg = mean(a, axis, keepdims)
        if not returned:
            return avg
        shp = shape_of(avg)
        count = math.prod(shape_of(a)) // builtins.max(math.prod(shp), 1) if shape_of(a) else 1
        return avg, broadcast_to(full_like(avg, float(count)), shp)
    a, weights = _common(a, weights)
    ash, wsh = tuple(shape_of(a)), tuple(shape_of(weights))
    if wsh != ash:
        if axis is None:
            raise TypeError(f"average: axis must be specified when the shapes of a "
                            f"{list(ash)} and weights {list(wsh)} differ")
        if len(wsh) != 1 or not isinstance(axis, (numbers.Integral, np.integer)):
            raise TypeError(f"average: 1-d weights (of shape {list(wsh)}) need one int axis, "
                            f"got axis={axis!r}")
        ax = int(axis) % len(ash)
        if wsh[0] != ash[ax]:
            raise ValueError(f"average: length of weights {wsh[0]} differs from that of axis "
                             f"{axis} ({ash[ax]})")
        weights = reshape(weights, tuple(n if i == ax else 1 for i, n in enumerate(ash)))
    wsum = sum(broadcast_to(weights, ash), axis, keepdims)
    avg = divide(sum(multiply(a, weights), axis, keepdims), wsum)
    return (avg, broadcast_to(wsum, shape_of(avg))) if returned else avg


@op("meshgrid")
def meshgrid(*xi, copy=True, sparse=False, indexing="xy"):
    """numpy's meshgrid: coordinate arrays from 1-d coordinate vectors; indexing "xy" (the first
    two output axes swapped, as numpy's default) or "ij"; sparse: unit axes instead of
    broadcasting."""
    if indexing not in ("xy", "ij"):
        raise ValueError(f"meshgrid: indexing must be 'xy' or 'ij', got {indexing!r}")
    n = len(xi)
    vecs = [ravel(x) for x in xi]
    shape = [len(v) for v in vecs]
    if indexing == "xy" and n > 1:
        shape[0], shape[1] = shape[1], shape[0]
    out = []
    for i, v in enumerate(vecs):
        ax = {0: 1, 1: 0}.get(i, i) if indexing == "xy" and n > 1 else i
        grid = reshape(v, tuple(-1 if d == ax else 1 for d in range(n)))
        out.append(grid if sparse else broadcast_to(grid, tuple(shape)))
    return out


@op("interp")
def interp(x, xp, fp, left=None, right=None, period=None):
    """numpy's interp: the piecewise-linear interpolant through (xp, fp) (xp increasing, 1-d)
    at x, fp[0] (or `left`) below xp[0] and fp[-1] (or `right`) above xp[-1]. Differentiable
    in x, fp and xp. Each x is compared with every knot (len(x) * len(xp) work, no search)."""
    if period is not None:
        raise NotImplementedError("interp: period= is not supported on traced values")
    for name, arr in (("xp", xp), ("fp", fp)):
        if len(shape_of(arr)) != 1:
            raise ValueError(f"interp: {name} must be 1-d, got shape {list(shape_of(arr))}")
    n = shape_of(xp)[0]
    x, xp, fp = _common(x, xp, fp)
    if shape_of(fp)[0] != n or n == 0:
        raise ValueError(f"interp: fp and xp must have the same nonzero length, got "
                         f"{shape_of(fp)[0]} and {n}")
    xs = shape_of(x)
    col = reshape(x, tuple(xs) + (1,))
    lo_v = fp[0] if left is None else left
    hi_v = fp[n - 1] if right is None else right
    out = add(where(less(x, xp[0]), lo_v, 0.0), where(greater(x, xp[n - 1]), hi_v, 0.0))
    out = add(out, where(equal(x, xp[n - 1]), fp[n - 1], 0.0))
    if n > 1:
        x0, x1, f0, f1 = xp[:-1], xp[1:], fp[:-1], fp[1:]
        dx = subtract(x1, x0)
        # (a zero-width segment is never chosen below; keep its slope finite for the gradient)
        slope = divide(subtract(f1, f0), where(equal(dx, 0), 1.0, dx))
        inside = logical_and(greater_equal(col, x0), less(col, x1))
        seg = add(f0, multiply(slope, subtract(col, x0)))
        out = add(out, sum(where(inside, seg, 0.0), -1))
    return out


def _correlate_full(what, a, v):
    """Full cross-correlation c[k] = sum_n a[n + k - (len(v) - 1)] * v[n] of 1-d a and v, as one
    conv1d over a padded on both sides."""
    from . import nn
    for name, arr in (("a", a), ("v", v)):
        if len(shape_of(arr)) != 1 or not shape_of(arr)[0]:
            raise ValueError(f"{what}: {name} must be a non-empty 1-d array, got shape "
                             f"{list(shape_of(arr))}")
    nv = shape_of(v)[0]
    a, v = _common(a, v)
    y = nn.conv1d(reshape(a, (1, 1, -1)), reshape(v, (1, 1, -1)), padding=nv - 1)
    return reshape(y, (-1,))


def _conv_mode(what, full, na, nv, mode, flipped):
    """The part of a full correlation or convolution numpy's `mode` returns."""
    m, k = builtins.max(na, nv), builtins.min(na, nv)
    if mode == "full":
        return full
    if mode == "valid":
        lo, length = k - 1, m - k + 1
    elif mode == "same":
        lo, length = (k - 1) // 2, m
        if flipped:   # numpy correlates the swapped operands and reverses the result
            lo = na + nv - 1 - m - lo
    else:
        raise ValueError(f"{what}: mode must be 'full', 'same' or 'valid', got {mode!r}")
    return full[lo:lo + length]


@op("correlate")
def correlate(a, v, mode="valid"):
    """numpy's correlate of 1-d arrays (modes full, same, valid), one conv1d."""
    full = _correlate_full("correlate", a, v)
    na, nv = shape_of(a)[0], shape_of(v)[0]
    return _conv_mode("correlate", full, na, nv, mode, flipped=na < nv)


@op("convolve")
def convolve(a, v, mode="full"):
    """numpy's convolve of 1-d arrays (modes full, same, valid): the correlation with v
    reversed, one conv1d."""
    full = _correlate_full("convolve", a, flip(v))
    return _conv_mode("convolve", full, shape_of(a)[0], shape_of(v)[0], mode, flipped=False)


@op("cov")
def cov(m, y=None, rowvar=True, bias=False, ddof=None, fweights=None, aweights=None, *,
        dtype=None):
    """numpy's cov: the covariance of the variables in the rows (rowvar=True) or columns of m
    (and of y), normalized by N - 1, N with bias=True, or N - ddof; squeezed as numpy's."""
    if fweights is not None or aweights is not None:
        raise NotImplementedError("cov: fweights= and aweights= are not supported on traced "
                                  "values")
    if len(shape_of(m)) > 2:
        raise ValueError(f"cov: m has more than 2 dimensions (shape {list(shape_of(m))})")
    m, y = (_in_dtype(m, dtype), None) if y is None else _common(_in_dtype(m, dtype),
                                                                _in_dtype(y, dtype))
    X = atleast_2d(m)
    if not rowvar and shape_of(X)[0] != 1:
        X = transpose(X)
    if y is not None:
        Y = atleast_2d(y)
        if not rowvar and shape_of(Y)[0] != 1:
            Y = transpose(Y)
        X = concatenate([X, Y], 0)
    ddof = (0 if bias else 1) if ddof is None else int(ddof)
    n = shape_of(X)[1]
    Xc = subtract(X, mean(X, 1, keepdims=True))
    c = divide(matmul(Xc, transpose(Xc)), float(builtins.max(n - ddof, 0)))
    return squeeze(c)


@op("corrcoef")
def corrcoef(x, y=None, rowvar=True, bias=_NO_VALUE, ddof=_NO_VALUE, *, dtype=None):
    """numpy's corrcoef: the covariance normalized by the standard deviations, clipped to
    [-1, 1] as numpy's (bias and ddof cancel, as in numpy)."""
    c = cov(x, y, rowvar, dtype=dtype)
    if not shape_of(c):   # one variable: c / c
        return divide(c, c)
    d = sqrt(diagonal(c))
    c = divide(divide(c, reshape(d, (-1, 1))), reshape(d, (1, -1)))
    return clip(c, -1.0, 1.0)


def _quantile(what, a, q, axis, keepdims, method):
    """numpy's quantile with method='linear' for constant q: along `axis` of the sorted values,
    s[floor(p)] + (p - floor(p)) * (s[floor(p) + 1] - s[floor(p)]) with p = q * (n - 1); the
    gradient flows through the sorted values to the elements chosen (as jax.numpy's)."""
    if method != "linear":
        raise NotImplementedError(f"{what}: only method='linear' is supported on traced values, "
                                  f"got {method!r}")
    if isinstance(q, Tracer):
        raise TypeError(f"{what}: q must be a constant (numbers or a numpy array), not traced")
    q = np.asarray(q, dtype=np.float64)
    if q.ndim > 1 or (q.size and (q.min() < 0 or q.max() > 1)):
        raise ValueError(f"{what}: quantiles must be a number or 1-d, in the range [0, 1], "
                         f"got {q.tolist()!r}")
    v = _layout_value(a)
    axes = _axes(v, axis)
    nd = v.ndim
    # the reduced axes to the end, merged, then sorted
    rest = [d for d in range(nd) if d not in axes]
    t = transpose(a, rest + list(axes))
    t = reshape(t, tuple(v.shape[d] for d in rest) + (-1,))
    n = shape_of(t)[-1]
    if n == 0:
        raise ValueError(f"{what}: of an empty array")
    s = sort(t, -1)
    outs = []
    for qi in q.reshape(-1):
        p = qi * (n - 1)
        lo = int(math.floor(p))
        hi = builtins.min(lo + 1, n - 1)
        g = p - lo
        s_lo, s_hi = s[..., lo], s[..., hi]
        # numpy's lerp: the side nearer the point, so q = 1 gives s[-1] exactly
        outs.append(add(s_lo, multiply(subtract(s_hi, s_lo), g)) if g < 0.5 else
                    subtract(s_hi, multiply(subtract(s_hi, s_lo), 1.0 - g)))
    res = [reshape(o, [1 if d in axes else v.shape[d] for d in range(nd)]) if keepdims else o
           for o in outs]
    return res[0] if q.ndim == 0 else stack(res, 0)


@op("quantile")
def quantile(a, q, axis=None, out=None, overwrite_input=False, method="linear",
             keepdims=False, *, weights=None, interpolation=None):
    """numpy's quantile (method='linear'; q constant, in [0, 1]); a 1-d q gives its axis first."""
    _no_out("quantile", out)
    if weights is not None:
        raise NotImplementedError("quantile: weights= is not supported on traced values")
    return _quantile("quantile", a, q, axis, keepdims, interpolation or method)


@op("percentile")
def percentile(a, q, axis=None, out=None, overwrite_input=False, method="linear",
               keepdims=False, *, weights=None, interpolation=None):
    """numpy's percentile: quantile of q / 100."""
    _no_out("percentile", out)
    if weights is not None:
        raise NotImplementedError("percentile: weights= is not supported on traced values")
    if isinstance(q, Tracer):
        raise TypeError("percentile: q must be a constant (numbers or a numpy array), not traced")
    return _quantile("percentile", a, np.asarray(q, dtype=np.float64) / 100.0, axis, keepdims,
                     interpolation or method)


@op("median")
def median(a, axis=None, out=None, overwrite_input=False, keepdims=False):
    """numpy's median: the middle of the sorted values (the mean of the two middle ones for an
    even count); its gradient goes to those elements."""
    _no_out("median", out)
    return _quantile("median", a, 0.5, axis, keepdims, "linear")


# ------------------------------------------------------------------------------------------------
# numpy protocol tables (np.tanh(tracer), np.sum(tracer), ...)
# ------------------------------------------------------------------------------------------------
UFUNCS = {
    "add": add, "subtract": subtract, "multiply": multiply, "true_divide": divide,
    "divide": divide, "power": power, "negative": negative, "exp": exp, "log": log, "tanh": tanh,
    "sqrt": sqrt, "absolute": abs, "sin": sin, "cos": cos, "maximum": maximum, "minimum": minimum,
    "greater": greater, "greater_equal": greater_equal, "less": less, "less_equal": less_equal,
    "equal": equal, "not_equal": not_equal, "matmul": matmul, "square": square, "sign": sign,
    "logical_and": logical_and, "logical_or": logical_or, "logical_not": logical_not,
    "log1p": log1p, "expm1": expm1, "log2": log2, "log10": log10, "exp2": exp2,
    "reciprocal": reciprocal, "tan": tan, "deg2rad": deg2rad, "radians": deg2rad,
    "rad2deg": rad2deg, "degrees": rad2deg, "fabs": fabs, "sinh": sinh, "cosh": cosh,
    "hypot": hypot, "fmax": fmax, "fmin": fmin, "logaddexp": logaddexp, "logaddexp2": logaddexp2,
    "floor": floor, "ceil": ceil, "trunc": trunc, "rint": rint, "arctan": arctan,
    "arctan2": arctan2, "arcsin": arcsin, "arccos": arccos, "arcsinh": arcsinh,
    "arccosh": arccosh, "arctanh": arctanh, "fmod": fmod, "remainder": remainder,
    "conjugate": conj,
}
UFUNCS.update({"vecdot": vecdot, "positive": positive, "cbrt": cbrt, "float_power": float_power,
               "isnan": isnan, "isinf": isinf, "isfinite": isfinite, "logical_xor": logical_xor})
ARRAY_FUNCTIONS = {
    "sum": sum, "mean": mean, "max": max, "amax": max, "min": min, "amin": min, "dot": dot,
    "matmul": matmul, "reshape": reshape, "transpose": transpose, "concatenate": concatenate,
    "stack": stack, "where": where, "clip": clip, "var": var, "std": std, "squeeze": squeeze,
    "expand_dims": expand_dims, "norm": norm, "outer": outer, "swapaxes": swapaxes,
    "square": square, "take_along_axis": take_along_axis,
    "flip": flip, "flipud": flipud, "fliplr": fliplr, "pad": pad, "split": split,
    "array_split": array_split, "tile": tile, "repeat": repeat, "roll": roll, "diff": diff,
    "tril": tril, "triu": triu, "diagonal": diagonal, "diag": diag, "trace": trace,
    "zeros_like": zeros_like, "ones_like": ones_like, "full_like": full_like,
    "moveaxis": moveaxis, "ravel": ravel, "atleast_1d": atleast_1d, "atleast_2d": atleast_2d,
    "atleast_3d": atleast_3d, "vstack": vstack, "hstack": hstack, "dstack": dstack,
    "column_stack": column_stack, "prod": prod, "cumsum": cumsum, "cumprod": cumprod,
    "round": round, "around": around, "nan_to_num": nan_to_num, "select": select,
    "real": real, "imag": imag, "argmax": argmax, "argmin": argmin, "argsort": argsort,
    "sort": sort, "append": append, "vsplit": vsplit, "hsplit": hsplit, "dsplit": dsplit,
    "rot90": rot90, "rollaxis": rollaxis,
    # numpy's own helpers ask for these (np.r_ then fails in np.array with tracejit's message)
    "ndim": lambda a: len(a.shape), "shape": lambda a: tuple(a.shape),
    "size": lambda a, axis=None: a.value.type.size if axis is None else a.shape[axis],
}
ARRAY_FUNCTIONS.update({"einsum": einsum, "tensordot": tensordot, "inner": inner, "vdot": vdot,
                        "kron": kron, "cross": cross})
ARRAY_FUNCTIONS.update({
    "matrix_transpose": matrix_transpose, "permute_dims": transpose, "concat": concatenate,
    "broadcast_to": broadcast_to, "take": take, "cumulative_sum": cumulative_sum,
    "cumulative_prod": cumulative_prod, "ptp": ptp, "fix": fix, "any": any, "all": all,
    "row_stack": vstack})
UFUNCS.update({"signbit": signbit, "copysign": copysign, "heaviside": heaviside,
               "floor_divide": floor_divide})
ARRAY_FUNCTIONS.update({
    "sinc": sinc, "isclose": isclose, "allclose": allclose, "count_nonzero": count_nonzero,
    "average": average, "meshgrid": meshgrid, "interp": interp, "correlate": correlate,
    "convolve": convolve, "cov": cov, "corrcoef": corrcoef, "quantile": quantile,
    "percentile": percentile, "median": median})
# numpy.linalg's functions: dispatched by module as well as name, because numpy.linalg.trace and
# numpy.linalg.diagonal take the last two axes where numpy.trace and numpy.diagonal take the first
LINALG_FUNCTIONS = {
    "norm": norm, "vector_norm": vector_norm, "matrix_norm": matrix_norm, "trace": linalg_trace,
    "diagonal": linalg_diagonal, "outer": linalg_outer, "matmul": matmul, "cross": cross,
    "tensordot": tensordot, "vecdot": vecdot, "matrix_transpose": matrix_transpose,
    "multi_dot": multi_dot}

# numpy parameters that tracejit's ops do not take, accepted only at values that change nothing
# for a traced value (a C-ordered array that is never written in place)
_INERT = {"out": (None,), "order": (None, "C", "K", "A"), "subok": (True, False),
          "casting": ("same_kind", "unsafe", "safe", "equiv", "no"), "device": (None, "cpu"),
          "initial": (_NO_VALUE,), "where": (True, _NO_VALUE), "copy": (None, True, False),
          "mean": (None,), "like": (None,)}


@functools.lru_cache(maxsize=None)
def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):   # a builtin without a text signature
        return None


def array_function(func, args, kwargs):
    """numpy function `func` called on traced values (Tracer.__array_function__): tracejit's op
    of that name (numpy.linalg's own table for numpy.linalg), with the arguments bound by numpy's
    own signature, so a positional argument means what it means to numpy even where tracejit's
    spelling orders its parameters differently (np.mean(x, 1, np.float64): dtype, not keepdims).
    Parameters tracejit's op lacks are accepted at inert values only (_INERT), else refused with
    a TypeError naming them."""
    from .errors import unsupported_error
    linalg = func.__module__ == "numpy.linalg"
    name = func.__name__
    fn = (LINALG_FUNCTIONS if linalg else ARRAY_FUNCTIONS).get(name)
    spelled = f"np.linalg.{name}" if linalg else f"np.{name}"
    if fn is None:
        from .tracer import _supported_names
        return _raise(unsupported_error(spelled, name, _supported_names()))
    theirs, ours = _signature(func), _signature(fn)
    if theirs is None or ours is None:
        return fn(*args, **kwargs)
    try:
        bound = theirs.bind(*args, **kwargs)
    except TypeError as e:
        raise _located(TypeError(f"{spelled}: {e}")) from None
    P = inspect.Parameter
    our_pos = [q.name for q in ours.parameters.values()
               if q.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    pos, kw = [], {}
    for pname, value in bound.arguments.items():
        kind = theirs.parameters[pname].kind
        if kind == P.VAR_POSITIONAL:
            pos.extend(value)
            continue
        if kind == P.VAR_KEYWORD:
            kw.update(value)
            continue
        if pname not in ours.parameters and pname in _INERT:
            if not builtins.any(value is v or (isinstance(value, str) and value == v)
                                for v in _INERT[pname]):
                raise _located(TypeError(f"{spelled}: {pname}={value!r} is not supported on "
                                         f"traced values"))
            continue
        i = len(pos)
        # numpy's parameter at tracejit's position of the same name (or an operand that tracejit
        # names differently, such as np.where's condition/x/y) goes positionally; once one goes
        # by keyword, the rest do
        if not kw and i < len(our_pos) and (our_pos[i] == pname or pname not in ours.parameters):
            pos.append(value)
        elif pname in ours.parameters:
            kw[pname] = value
        else:
            raise _located(TypeError(f"{spelled}: the argument {pname}= is not supported on "
                                     f"traced values"))
    return fn(*pos, **kw)


def _raise(e):
    raise e


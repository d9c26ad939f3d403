"""numpy-style operations on traced values (and, outside a trace, on numpy arrays, evaluated eagerly
through the reference interpreter).

Type rules (which float dtype an op computes in) are in tracejit/values.py. Broadcasting follows
numpy and becomes explicit `broadcast_in_dim` instructions.
"""
from __future__ import annotations

import builtins
import functools
import math
import numbers

import numpy as np

from ir import builder as irb
from ir import lax
from ir.builder import Builder, api_scope, building
from ir.core import ShapeError, Value
from ir.interpreter import interpret

from . import captures
from .tracer import Tracer
from .values import (as_bool_value, as_value, float_dtype, promote, result_dtype, to_value,
                     wrap)


# ------------------------------------------------------------------------------------------------
# op decorator: API-name scope inside a trace, eager evaluation outside
# ------------------------------------------------------------------------------------------------
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


def _binary(lax_fn, a, b):
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
def divide(a, b): return _binary(lax.div, a, b)
@op("maximum")
def maximum(a, b): return _binary(lax.maximum, a, b)
@op("minimum")
def minimum(a, b): return _binary(lax.minimum, a, b)


@op("power")
def power(a, b):
    if isinstance(b, numbers.Number) and not isinstance(b, bool) and float(b).is_integer() \
            and builtins.abs(b) <= 64:
        return _unary(lambda v: lax.integer_pow(v, int(b)), a)
    return _binary(lax.pow_, a, b)


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
    p, va, vb = broadcast_values(as_bool_value(cond), *promote(a, b))
    return wrap(lax.select(p, va, vb))


@op("clip")
def clip(x, lo=None, hi=None):
    if lo is not None:
        x = maximum(x, lo)
    if hi is not None:
        x = minimum(x, hi)
    return x


@op("astype")
def astype(x, dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"astype: traced values are float32 or float64, not {dt}")
    return wrap(lax.convert(as_value(x, result_dtype(x)), float_dtype(dt)))


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


def _keep(x: Value, y: Value, axes, keepdims):
    if not keepdims:
        return y
    return lax.reshape(y, [1 if i in axes else n for i, n in enumerate(x.shape)])


@op("sum")
def sum(x, axis=None, keepdims=False):
    v = as_value(x, result_dtype(x))
    axes = _axes(v, axis)
    return wrap(_keep(v, lax.reduce_sum(v, axes), axes, keepdims))


@op("mean")
def mean(x, axis=None, keepdims=False):
    v = as_value(x, result_dtype(x))
    axes = _axes(v, axis)
    count = math.prod(v.shape[a] for a in axes)
    return wrap(_keep(v, lax.div(lax.reduce_sum(v, axes), float(count)), axes, keepdims))


@op("max")
def max(x, axis=None, keepdims=False):
    v = as_value(x, result_dtype(x))
    axes = _axes(v, axis)
    return wrap(_keep(v, lax.reduce_max(v, axes), axes, keepdims))


@op("min")
def min(x, axis=None, keepdims=False):
    return negative(max(negative(x), axis, keepdims))


@op("var")
def var(x, axis=None, keepdims=False):
    d = subtract(x, mean(x, axis, keepdims=True))
    return mean(multiply(d, d), axis, keepdims)


def _sqrt_zero_subgradient(x):
    """sqrt(x) for x >= 0 whose gradient at x == 0 is 0 (a subgradient, as PyTorch's std and
    norm), not 0 * inf = NaN: neither sqrt nor its derivative ever sees the zero, so second
    derivatives stay finite too. For the roots of sums of squares (norm, std), which are |.|-like
    at zero and identically zero over a reduction of size 1."""
    zero = equal(x, 0.0)
    return where(zero, 0.0, sqrt(where(zero, 1.0, x)))


@op("std")
def std(x, axis=None, keepdims=False):
    """The population standard deviation (numpy's ddof=0); its gradient where it is 0 (constant
    values, a reduction of size 1, a 0-d array) is 0."""
    return _sqrt_zero_subgradient(var(x, axis, keepdims))


@op("logsumexp")
def logsumexp(x, axis=None, keepdims=False):
    # The shift by the maximum only guards exp against overflow. An infinite maximum (an inf, or
    # only -inf) would make it inf - inf = NaN; shifting by 0 there gives log(sum(exp(x))) = +-inf.
    m = stop_gradient(max(x, axis, keepdims=True))
    m = where(less(abs(m), np.inf), m, 0.0)
    s = log(sum(exp(subtract(x, m)), axis, keepdims=True))
    out = add(s, m)
    return out if keepdims else reshape(out, [n for i, n in enumerate(out.shape)
                                              if i not in _axes(out.value, axis)])


@op("norm")
def norm(x, ord=None, axis=None, keepdims=False):
    """Vector norms (ord None/2, 1, inf) and the Frobenius norm of a whole array. The gradient of
    the 2-norm at zero is zero."""
    if ord in (None, 2, "fro"):
        if ord == 2 and axis is None and getattr(x, "ndim", 1) > 1:
            raise NotImplementedError("norm: the spectral norm (ord=2 of a matrix) is not supported; "
                                      "use ord=None for the Frobenius norm")
        return _sqrt_zero_subgradient(sum(power(x, 2), axis, keepdims))
    if ord == 1:
        return sum(abs(x), axis, keepdims)
    if ord in (np.inf, float("inf")):
        return max(abs(x), axis, keepdims)
    raise NotImplementedError(f"norm: ord={ord!r} is not supported (use None, 1 or inf)")


# ------------------------------------------------------------------------------------------------
# linear algebra
# ------------------------------------------------------------------------------------------------
@op("matmul")
def matmul(a, b):
    va, vb = promote(a, b)
    if va.ndim == 0 or vb.ndim == 0:
        raise ShapeError(f"matmul: operands must not be scalars, got {va.type} @ {vb.type}")
    if va.ndim == 1 and vb.ndim == 1:
        if va.shape != vb.shape:
            raise ShapeError(f"matmul: vector lengths differ: {va.type} @ {vb.type}")
        return wrap(lax.reduce_sum(lax.mul(va, vb)))
    if vb.ndim > 2:
        raise NotImplementedError(f"matmul: batched right operands are not supported "
                                  f"({va.type} @ {vb.type})")
    lead = va.shape[:-1]
    a2 = lax.reshape(va, (math.prod(lead), va.shape[-1]))
    b2 = lax.reshape(vb, (vb.shape[0], 1)) if vb.ndim == 1 else vb
    if a2.shape[1] != b2.shape[0]:
        raise ShapeError(f"matmul: inner dimensions differ: {va.type} @ {vb.type} "
                         f"({a2.shape[1]} != {b2.shape[0]})")
    c = lax.matmul(a2, b2)
    out_shape = lead + ((vb.shape[1],) if vb.ndim == 2 else ())
    return wrap(lax.reshape(c, out_shape))


def shape_of(x) -> tuple:
    """Shape of a tracer, array or number (np.shape would dispatch to __array_function__)."""
    return tuple(x.shape) if isinstance(x, Tracer) else np.shape(x)


@op("dot")
def dot(a, b):
    if not shape_of(a) or not shape_of(b):
        return multiply(a, b)
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
    v = as_value(x, result_dtype(x))
    new = _resolve_shape(shape, v.type.size)
    if math.prod(new) != v.type.size:
        raise ShapeError(f"cannot reshape a value of shape {list(v.shape)} into {list(new)}")
    return wrap(lax.reshape(v, new))


@op("transpose")
def transpose(x, axes=None):
    v = as_value(x, result_dtype(x))
    perm = tuple(reversed(range(v.ndim))) if axes is None else tuple(a % v.ndim for a in axes)
    return wrap(lax.transpose(v, perm))


@op("swapaxes")
def swapaxes(x, a, b):
    perm = list(range(x.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


@op("squeeze")
def squeeze(x, axis=None):
    v = as_value(x, result_dtype(x))
    axes = tuple(i for i, n in enumerate(v.shape) if n == 1) if axis is None else _axes(v, axis)
    for a in axes:
        if v.shape[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of shape {list(v.shape)} is not 1")
    return wrap(lax.reshape(v, [n for i, n in enumerate(v.shape) if i not in axes]))


@op("expand_dims")
def expand_dims(x, axis):
    v = as_value(x, result_dtype(x))
    shape = list(v.shape)
    shape.insert(axis % (v.ndim + 1) if axis < 0 else axis, 1)
    return wrap(lax.reshape(v, shape))


@op("concatenate")
def concatenate(xs, axis=0):
    vals = promote(*xs)
    nd = vals[0].ndim
    if nd == 0:
        raise ShapeError("concatenate: zero-dimensional values cannot be concatenated")
    return wrap(lax.concatenate(vals, axis % nd))


@op("stack")
def stack(xs, axis=0):
    # promote first: a Python number alone would become float32 before meeting the arrays
    return concatenate([expand_dims(wrap(v), axis) for v in promote(*xs)], axis)


@op("getitem")
def getitem(x, idx):
    """Basic indexing: ints, slices with positive steps, None and Ellipsis."""
    v = as_value(x, result_dtype(x))
    idx = idx if isinstance(idx, tuple) else (idx,)
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
    start, limit, strides, out_shape = [], [], [], []
    dim = 0
    for i in expanded:
        if i is None:
            out_shape.append(1)
            continue
        n = v.shape[dim]
        if isinstance(i, Tracer):
            raise TypeError("indexing with a traced value is not supported; index with Python ints "
                            "and slices, or use tracejit.where")
        if isinstance(i, (numbers.Integral, np.integer)) and not isinstance(i, bool):
            k = int(i)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for axis {dim} with size {n}")
            k %= n
            start.append(k), limit.append(k + 1), strides.append(1)
        elif isinstance(i, slice):
            s, l, st = i.indices(n)
            if st < 0:
                raise NotImplementedError("slices with negative steps are not supported")
            l = builtins.max(l, s)
            start.append(s), limit.append(l), strides.append(st)
            out_shape.append(len(range(s, l, st)))
        else:
            raise TypeError(f"unsupported index {i!r} ({type(i).__name__}): use ints, slices, None "
                            f"or '...' (advanced indexing is not supported)")
        dim += 1
    sliced = lax.slice_(v, start, limit, strides)
    return wrap(lax.reshape(sliced, out_shape))




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
}
ARRAY_FUNCTIONS = {
    "sum": sum, "mean": mean, "max": max, "amax": max, "min": min, "amin": min, "dot": dot,
    "matmul": matmul, "reshape": reshape, "transpose": transpose, "concatenate": concatenate,
    "stack": stack, "where": where, "clip": clip, "var": var, "std": std, "squeeze": squeeze,
    "expand_dims": expand_dims, "norm": norm, "outer": outer, "swapaxes": swapaxes,
    "square": square,
}

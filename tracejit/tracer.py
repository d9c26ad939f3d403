"""Tracer values: stand-ins for arrays while a function is traced. Each wraps an IR Value of the
builder that is tracing; every operation on it records an instruction (see tracejit.ops)."""
from __future__ import annotations

from .ir import builder as irb
from .ir.core import Value

from .errors import UnsupportedError, concretization_error, unsupported_error


class Tracer:
    __slots__ = ("value", "builder")
    __array_priority__ = 1000  # numpy defers binary operators to us

    def __init__(self, value: Value, builder):
        self.value = value
        self.builder = builder

    # ----------------------------------------------------------------------------- metadata
    @property
    def shape(self):
        return self.value.shape

    @property
    def ndim(self):
        return self.value.ndim

    @property
    def size(self):
        return self.value.type.size

    @property
    def dtype(self):
        return self.value.type.np_dtype

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d traced value")
        return self.shape[0]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self):
        return f"Tracer<{self.value.type}>"

    # ----------------------------------------------------------------------------- concretization
    def __bool__(self):
        raise concretization_error("bool() (an `if`, `while`, `and`/`or` or `not`)", self)

    def __float__(self):
        raise concretization_error("float()", self)

    def __int__(self):
        raise concretization_error("int()", self)

    def __index__(self):
        raise concretization_error("using as an index", self)

    def __complex__(self):
        raise concretization_error("complex()", self)

    def item(self):
        raise concretization_error(".item()", self)

    def tolist(self):
        raise concretization_error(".tolist()", self)

    def __array__(self, dtype=None, copy=None):
        raise concretization_error("np.asarray()/np.array()", self)

    __hash__ = object.__hash__

    # ----------------------------------------------------------------------------- numpy protocols
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        from . import ops
        fn = ops.UFUNCS.get(ufunc.__name__)
        if fn is None or method != "__call__":
            if method == "__call__":
                raise unsupported_error(f"np.{ufunc.__name__}", ufunc.__name__,
                                        _supported_names())
            # np.add.reduce is np.sum, np.add.accumulate np.cumsum, ...: hint as those
            equivalent = _UFUNC_METHODS.get((ufunc.__name__, method), "")
            raise unsupported_error(f"np.{ufunc.__name__}.{method}", equivalent,
                                    _supported_names() if equivalent else ())
        if kwargs.get("out") is not None:
            raise UnsupportedError(f"np.{ufunc.__name__}(..., out=...) writes in place, which "
                                   f"traced values do not support{_at()}; use the returned value")
        kwargs.pop("out", None)
        return fn(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        from . import ops
        fn = ops.ARRAY_FUNCTIONS.get(func.__name__)
        if fn is None:
            raise unsupported_error(f"np.{func.__name__}", func.__name__, _supported_names())
        return fn(*args, **kwargs)

    def __setitem__(self, idx, v):
        raise UnsupportedError(
            f"item assignment (y[...] = v) on a traced value{_at()}: traced values cannot be "
            f"modified in place; build the result functionally: tracejit.where(mask, v, y) with a "
            f"numpy boolean mask (e.g. mask = np.arange(n) == 0) replaces elements, and "
            f"tracejit.concatenate/tracejit.stack assemble an array from pieces")

    # ----------------------------------------------------------------------------- operators
    def __add__(self, o): return _ops().add(self, o)
    def __radd__(self, o): return _ops().add(o, self)
    def __sub__(self, o): return _ops().subtract(self, o)
    def __rsub__(self, o): return _ops().subtract(o, self)
    def __mul__(self, o): return _ops().multiply(self, o)
    def __rmul__(self, o): return _ops().multiply(o, self)
    def __truediv__(self, o): return _ops().divide(self, o)
    def __rtruediv__(self, o): return _ops().divide(o, self)
    def __pow__(self, o): return _ops().power(self, o)
    def __rpow__(self, o): return _ops().power(o, self)
    def __matmul__(self, o): return _ops().matmul(self, o)
    def __rmatmul__(self, o): return _ops().matmul(o, self)
    def __neg__(self): return _ops().negative(self)
    def __pos__(self): return self
    def __abs__(self): return _ops().abs(self)
    def __gt__(self, o): return _ops().greater(self, o)
    def __ge__(self, o): return _ops().greater_equal(self, o)
    def __lt__(self, o): return _ops().less(self, o)
    def __le__(self, o): return _ops().less_equal(self, o)
    def __eq__(self, o): return _ops().equal(self, o)  # noqa: E704
    def __ne__(self, o): return _ops().not_equal(self, o)
    def __and__(self, o): return _ops().logical_and(self, o)
    def __or__(self, o): return _ops().logical_or(self, o)
    def __invert__(self): return _ops().logical_not(self)
    def __getitem__(self, idx): return _ops().getitem(self, idx)

    # ----------------------------------------------------------------------------- methods
    @property
    def T(self): return _ops().transpose(self)
    def sum(self, axis=None, keepdims=False): return _ops().sum(self, axis, keepdims=keepdims)
    def mean(self, axis=None, keepdims=False): return _ops().mean(self, axis, keepdims=keepdims)
    def max(self, axis=None, keepdims=False): return _ops().max(self, axis, keepdims=keepdims)
    def min(self, axis=None, keepdims=False): return _ops().min(self, axis, keepdims=keepdims)
    def var(self, axis=None, keepdims=False): return _ops().var(self, axis, keepdims=keepdims)
    def std(self, axis=None, keepdims=False): return _ops().std(self, axis, keepdims=keepdims)

    def reshape(self, *shape):
        return _ops().reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        return _ops().transpose(self, (axes[0] if len(axes) == 1 else axes) or None)

    def flatten(self): return _ops().reshape(self, (-1,))
    ravel = flatten
    def squeeze(self, axis=None): return _ops().squeeze(self, axis)
    def pow(self, y): return _ops().power(self, y)
    def exp(self): return _ops().exp(self)
    def log(self): return _ops().log(self)
    def tanh(self): return _ops().tanh(self)
    def sqrt(self): return _ops().sqrt(self)
    def abs(self): return _ops().abs(self)
    def sin(self): return _ops().sin(self)
    def cos(self): return _ops().cos(self)
    def relu(self): return _nn().relu(self)
    def sigmoid(self): return _nn().sigmoid(self)
    def norm(self, ord=None, axis=None, keepdims=False):
        return _ops().norm(self, ord, axis, keepdims)
    def dot(self, o): return _ops().dot(self, o)
    def mv(self, v): return _ops().mv(self, v)
    def mm(self, o): return _ops().mm(self, o)
    def clip(self, lo=None, hi=None): return _ops().clip(self, lo, hi)
    def astype(self, dtype): return _ops().astype(self, dtype)


_UFUNC_METHODS = {("add", "reduce"): "sum", ("maximum", "reduce"): "max",
                  ("minimum", "reduce"): "min", ("multiply", "reduce"): "prod",
                  ("add", "accumulate"): "cumsum", ("add", "outer"): "outer",
                  ("multiply", "outer"): "outer"}


def _at() -> str:
    loc = irb.user_location(2)
    return f" at {loc}" if loc else ""


def _supported_names():
    """Names of what tracejit implements: its public functions and the numpy functions and ufuncs
    it accepts on traced values."""
    import tracejit
    from . import ops
    return [n for n in dir(tracejit) if not n.startswith("_")] + list(ops.UFUNCS) + \
        list(ops.ARRAY_FUNCTIONS)


def _ops():
    from . import ops
    return ops


def _nn():
    from . import nn
    return nn

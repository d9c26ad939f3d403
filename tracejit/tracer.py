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
        """numpy's element count, an int; PyTorch's spelling calls it: x.size() is the shape,
        x.size(d) dimension d."""
        return _Size(self.value.shape)

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
        # numpy asks every element of np.array([a, b]) for this too, and cannot be told to keep
        # tracers instead: say how to build the array
        e = concretization_error("np.asarray()/np.array()", self)
        e.args = (f"{e.args[0]}. To build an array from traced values (np.array([a, b]), "
                  f"np.r_[a, b]), use tracejit.stack([a, b]) or tracejit.concatenate",)
        raise e

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
        return ops.array_function(func, args, kwargs)

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
    def __mod__(self, o): return _ops().remainder(self, o)
    def __rmod__(self, o): return _ops().remainder(o, self)
    def __floordiv__(self, o): return _ops().floor_divide(self, o)
    def __rfloordiv__(self, o): return _ops().floor_divide(o, self)
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
    # reductions take numpy's axis=/keepdims= and PyTorch's dim=/keepdim=; where the two differ
    # (x.max(dim) returns values and indices in PyTorch, x.std() is unbiased there), numpy's wins
    def sum(self, axis=None, keepdims=False, **torch_kw):
        return _ops().sum(self, axis, keepdims, **torch_kw)

    def mean(self, axis=None, keepdims=False, **torch_kw):
        return _ops().mean(self, axis, keepdims, **torch_kw)

    def max(self, axis=None, keepdims=False, **torch_kw):
        return _ops().max(self, axis, keepdims, **torch_kw)

    def min(self, axis=None, keepdims=False, **torch_kw):
        return _ops().min(self, axis, keepdims, **torch_kw)

    def var(self, axis=None, keepdims=False, ddof=0, **torch_kw):
        return _ops().var(self, axis, keepdims, ddof, **torch_kw)

    def std(self, axis=None, keepdims=False, ddof=0, **torch_kw):
        return _ops().std(self, axis, keepdims, ddof, **torch_kw)

    def logsumexp(self, axis=None, keepdims=False, **torch_kw):
        return _ops().logsumexp(self, axis, keepdims, **torch_kw)

    def prod(self, axis=None, keepdims=False, **torch_kw):
        return _ops().prod(self, axis, keepdims, **torch_kw)

    def cumsum(self, axis=None, **torch_kw): return _ops().cumsum(self, axis, **torch_kw)
    def cumprod(self, axis=None, **torch_kw): return _ops().cumprod(self, axis, **torch_kw)

    def reshape(self, *shape, **kw):
        """numpy's x.reshape(shape) / x.reshape(*shape) and PyTorch's x.reshape(shape=...)."""
        if kw:
            if shape or set(kw) != {"shape"}:
                raise TypeError(f"reshape: expects the shape or shape=, got {sorted(kw)}")
            shape = (kw["shape"],)
        return _ops().reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        return _ops().transpose(self, (axes[0] if len(axes) == 1 else axes) or None)

    def flatten(self, start_dim=0, end_dim=-1):
        """numpy's x.flatten() (1-d) and PyTorch's x.flatten(start_dim, end_dim)."""
        return _ops().flatten_dims(self, start_dim, end_dim)

    def ravel(self): return _ops().reshape(self, (-1,))
    # numpy's methods with numpy's keyword names (axis1=, axis2=)
    def diagonal(self, offset=0, axis1=0, axis2=1):
        return _ops().diagonal(self, offset, axis1, axis2)

    def trace(self, offset=0, axis1=0, axis2=1, dtype=None):
        return _ops().trace(self, offset, axis1, axis2, dtype)

    def squeeze(self, axis=None, **torch_kw): return _ops().squeeze(self, axis, **torch_kw)

    # PyTorch's tensor methods, where numpy has no method of the name (x.transpose(a, b) stays
    # numpy's permutation; PyTorch's two-axis swap is x.swapaxes(a, b))
    def view(self, *shape):
        if len(shape) == 1 and not isinstance(shape[0], (tuple, list, int)) and \
                not hasattr(shape[0], "__index__"):
            raise TypeError(f"view: only shapes are supported (x.view(*shape)), not "
                            f"reinterpreting as {shape[0]!r}; use x.astype(dtype) to convert")
        return self.reshape(*shape)

    def permute(self, *dims, **kw):
        if kw:   # PyTorch's x.permute(dims=(...))
            if dims or set(kw) != {"dims"}:
                raise TypeError(f"permute: expects the dimensions or dims=, got {sorted(kw)}")
            dims = (kw["dims"],)
        return _ops().transpose(self, dims[0] if len(dims) == 1 else dims)

    def unsqueeze(self, dim): return _ops().expand_dims(self, dim)
    def swapaxes(self, axis1, axis2): return _ops().swapaxes(self, axis1, axis2)
    def numel(self): return self.value.type.size
    def dim(self): return self.value.ndim

    @property
    def mT(self):
        """The matrix transpose of a stack of matrices (numpy 2 and PyTorch): the last two axes
        swapped."""
        if self.ndim < 2:
            raise ValueError(f"mT needs at least 2 dimensions, got shape {list(self.shape)}")
        return _ops().swapaxes(self, -2, -1)

    def t(self):
        """PyTorch's t(): the transpose of a matrix; 0-d and 1-d values as they are."""
        if self.ndim > 2:
            raise ValueError(f"t() expects at most 2 dimensions, got shape {list(self.shape)}; "
                             f"use x.mT or x.swapaxes(-2, -1)")
        return _ops().transpose(self)

    def clamp(self, min=None, max=None): return _ops().clip(self, min, max)
    def clamp_min(self, min): return _ops().clip(self, min, None)
    def clamp_max(self, max): return _ops().clip(self, None, max)
    def swapdims(self, dim0, dim1): return _ops().swapaxes(self, dim0, dim1)
    # PyTorch's amax/amin: dim=() (its default) reduces over every dimension
    def amax(self, dim=(), keepdim=False): return _ops().max(self, _all_if_empty(dim), keepdim)
    def amin(self, dim=(), keepdim=False): return _ops().min(self, _all_if_empty(dim), keepdim)
    def square(self): return _ops().square(self)
    def neg(self): return _ops().negative(self)
    def detach(self): return _ops().stop_gradient(self)
    def float(self): return _ops().astype(self, "float32")
    def double(self): return _ops().astype(self, "float64")
    def contiguous(self): return self
    def softmax(self, dim): return _nn().softmax(self, dim)
    def log_softmax(self, dim): return _nn().log_softmax(self, dim)
    def masked_fill(self, mask, value): return _ops().where(mask, value, self)

    def expand(self, *sizes):
        """PyTorch's expand: broadcast to `sizes` (new dimensions in front; -1 keeps one)."""
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) \
            else sizes
        lead = len(sizes) - self.ndim
        if lead < 0:
            raise ValueError(f"expand: {len(sizes)} sizes for a value of shape "
                             f"{list(self.shape)}")
        shape = []
        for i, n in enumerate(sizes):
            if n == -1:
                if i < lead:
                    raise ValueError(f"expand: -1 is not allowed for the new leading "
                                     f"dimension {i} (sizes {list(sizes)})")
                n = self.shape[i - lead]
            shape.append(n)
        return _ops().broadcast_to(self, tuple(shape))

    def flip(self, *dims):
        """PyTorch's x.flip(dims) (an int, a tuple or several ints; numpy arrays have no flip
        method)."""
        if not dims:
            raise TypeError("flip: expects the dimensions to reverse (x.flip(0), x.flip((0, 1)))")
        dims = dims[0] if len(dims) == 1 else dims
        return _ops().flip(self, dims)

    def roll(self, shifts, dims=None): return _ops().roll(self, shifts, dims)

    def chunk(self, chunks, dim=0):
        """PyTorch's chunk: pieces of ceil(n / chunks) along `dim` (the last one smaller; fewer
        than `chunks` pieces when they run out), as a tuple."""
        if not isinstance(chunks, int) or chunks <= 0:
            raise ValueError(f"chunk: chunks must be a positive int, got {chunks!r}")
        n = self.shape[dim]
        step = max(-(-n // chunks), 1)
        return self.split(step, dim)

    def split(self, split_size_or_sections, dim=0):
        """PyTorch's split (numpy arrays have no split method): pieces of `split_size` along
        `dim` (the last one smaller), or of the given sizes, which must add up to the length."""
        n = self.shape[dim]
        s = split_size_or_sections
        if isinstance(s, int):
            if s <= 0:
                raise ValueError(f"split: split_size must be positive, got {s}")
            sizes = [min(s, n - i) for i in range(0, n, s)] or [0]
        else:
            sizes = [int(k) for k in s]
            if sum(sizes) != n:
                raise ValueError(f"split: sizes {sizes} do not add up to the length {n} of "
                                 f"dimension {dim}")
        cuts, at = [], 0
        for k in sizes[:-1]:
            at += k
            cuts.append(at)
        return tuple(_ops().split(self, cuts, dim))

    def repeat(self, repeats, axis=None):
        """numpy's x.repeat (each element `repeats` times), not PyTorch's tiling (tracejit.tile)."""
        return _ops().repeat(self, repeats, axis)

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
    def norm(self, ord=None, axis=None, keepdims=False, **torch_kw):
        return _ops().norm(self, ord, axis, keepdims, **torch_kw)
    def dot(self, o): return _ops().dot(self, o)
    def mv(self, v): return _ops().mv(self, v)
    def mm(self, o): return _ops().mm(self, o)
    def clip(self, min=None, max=None): return _ops().clip(self, min, max)
    def astype(self, dtype): return _ops().astype(self, dtype)

    # indices of extremes: numpy's axis=/keepdims= and PyTorch's dim=/keepdim= (x.argmax(1))
    def argmax(self, axis=None, out=None, **kw): return _ops().argmax(self, axis, out, **kw)
    def argmin(self, axis=None, out=None, **kw): return _ops().argmin(self, axis, out, **kw)
    # numpy's x.argsort(); x.sort() sorts in place in numpy, which traced values cannot: use
    # tracejit.sort(x)
    def argsort(self, axis=-1, kind=None, order=None): return _ops().argsort(self, axis, kind, order)
    def round(self, decimals=0): return _ops().round(self, decimals)

    @property
    def real(self): return self

    @property
    def imag(self): return _ops().imag(self)

    def conj(self): return self
    def conjugate(self): return self


class _Size(int):
    """The element count (an int, numpy's x.size) that PyTorch's x.size() and x.size(d) call."""

    def __new__(cls, shape):
        n = 1
        for d in shape:
            n *= d
        self = super().__new__(cls, n)
        self.shape = tuple(shape)
        return self

    def __call__(self, dim=None):
        if dim is None:
            return self.shape
        if not -len(self.shape) <= dim < len(self.shape):
            raise IndexError(f"size: dimension {dim} is out of range for shape {list(self.shape)}")
        return self.shape[dim]


_UFUNC_METHODS = {("add", "reduce"): "sum", ("maximum", "reduce"): "max",
                  ("minimum", "reduce"): "min", ("multiply", "reduce"): "prod",
                  ("add", "accumulate"): "cumsum", ("add", "outer"): "outer",
                  ("multiply", "outer"): "outer"}


def _all_if_empty(dim):
    return None if isinstance(dim, (tuple, list)) and not dim else dim


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

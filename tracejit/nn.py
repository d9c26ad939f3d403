"""Neural-network operations with PyTorch's conventions: NCHW inputs, OIHW weights, `stride`,
`padding`, optional `bias`, pooling stride defaulting to the kernel size, average pooling counting
zero padding (count_include_pad=True), and `reduction` in the losses.

relu(0) has derivative 0 and relu(NaN) is NaN; max pooling sends the cotangent to the first maximum
of each window.
"""
from __future__ import annotations

import builtins
import numbers

import numpy as np

from ir import lax
from ir.builder import user_location
from ir.core import ShapeError

from . import ops
from .ops import as_value, op, result_dtype
from .tracer import Tracer, wrap


_shape = ops.shape_of


def _error(cls, msg: str) -> Exception:
    """`cls(msg)` carrying the user's file:line, as tracejit's shape errors do."""
    loc = user_location()
    return cls(f"{msg} (at {loc})" if loc else msg)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ints(v, n, what, param, minimum):
    """The keyword value `v` (an int, or a tuple or list of `n` ints), each at least `minimum`, as
    a tuple of `n` ints; anything else is a ValueError naming `param` and the value."""
    vals = (v,) * n if _is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(vals) != n or not all(_is_int(a) and a >= minimum for a in vals):
        kind = "positive" if minimum == 1 else "non-negative"
        raise _error(ValueError, f"{what}: {param} must be a {kind} int or a tuple of {n} {kind} "
                                 f"ints, got {v!r}")
    return tuple(int(a) for a in vals)


def _dim(input, dim, what, param="dim"):
    """`dim` checked against the rank of `input` (a 0-d value has one valid axis, like PyTorch)."""
    n = builtins.max(len(_shape(input)), 1)
    if not _is_int(dim) or not -n <= dim < n:
        raise _error(ValueError, f"{what}: {param} must be an int in [{-n}, {n}) for an input of "
                                 f"shape {list(_shape(input))}, got {dim!r}")
    return int(dim)


@op("relu")
def relu(x):
    # 0 where x <= 0, else x: NaN propagates (NaN <= 0 is false), like numpy's maximum
    v = as_value(x, result_dtype(x))
    return wrap(lax.select(lax.le(v, 0.0), 0.0, v))


@op("sigmoid")
def sigmoid(x):
    return wrap(lax.logistic(as_value(x, result_dtype(x))))


tanh = ops.tanh


@op("linear")
def linear(input, weight, bias=None):
    """input[..., in] @ weight[out, in].T + bias[out]"""
    dt = result_dtype(input, weight, *([bias] if bias is not None else []))
    x, w = as_value(input, dt), as_value(weight, dt)
    if w.ndim != 2 or x.ndim == 0 or x.shape[-1] != w.shape[1]:
        raise ShapeError(f"linear: input {x.type} does not fit weight {w.type} (expects "
                         f"input[..., {w.shape[1] if w.ndim == 2 else '?'}] and weight[out, in])")
    lead = x.shape[:-1]
    x2 = lax.reshape(x, (int(np.prod(lead, dtype=np.int64)), x.shape[-1]))
    y = lax.matmul(x2, w, trans_b=True)
    if bias is not None:
        b = as_value(bias, dt)
        if b.shape != (w.shape[0],):
            raise ShapeError(f"linear: bias {b.type} must have shape [{w.shape[0]}]")
        y = lax.add(y, lax.broadcast_in_dim(b, y.shape, (1,)))
    return wrap(lax.reshape(y, lead + (w.shape[0],)))


def _add_channel_bias(y, bias, dt):
    b = as_value(bias, dt)
    if b.shape != (y.shape[1],):
        raise ShapeError(f"bias {b.type} must have shape [{y.shape[1]}] (one per output channel)")
    return lax.add(y, lax.broadcast_in_dim(b, y.shape, (1,)))


def _batched(x, nd, what):
    """(value with a batch dimension, whether one was added) for unbatched inputs like PyTorch."""
    if x.ndim == nd + 1:
        return lax.reshape(x, (1,) + x.shape), True
    if x.ndim != nd + 2:
        raise ShapeError(f"{what}: expected a {nd + 2}-d (batched) or {nd + 1}-d input, got "
                         f"{x.type}")
    return x, False


def _conv_padding(what, padding, stride, kernel):
    """(symmetric padding, extra padding on the right/bottom) per spatial dim. "same" pads k - 1
    in total with the odd one on the right/bottom, as PyTorch does for even kernels."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n, (0,) * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise _error(ValueError, f"{what}: padding='same' needs stride 1 (PyTorch refuses "
                                         f"it for strided convolutions), got stride={stride}; give "
                                         f"the padding as ints")
            return tuple((k - 1) // 2 for k in kernel), tuple((k - 1) % 2 for k in kernel)
        raise _error(ValueError, f"{what}: padding must be 'same', 'valid', a non-negative int or "
                                 f"a tuple of {n} non-negative ints, got {padding!r}")
    return _ints(padding, n, what, "padding", 0), (0,) * n


def _conv(what, nsp, input, weight, bias, stride, padding):
    """conv1d (nsp=1, as a conv2d of height 1) and conv2d with PyTorch's arguments."""
    dt = result_dtype(input, weight, *([bias] if bias is not None else []))
    x, squeeze = _batched(as_value(input, dt), nsp, what)
    w = as_value(weight, dt)
    if w.ndim != nsp + 2:
        layout = "[out, in, kh, kw]" if nsp == 2 else "[out, in, k]"
        raise ShapeError(f"{what}: weight must be {nsp + 2}-d {layout}, got {w.type}")
    s = _ints(stride, nsp, what, "stride", 1)
    p, extra = _conv_padding(what, padding, s, w.shape[2:])
    n = x.shape[0]
    if nsp == 1:
        x = lax.reshape(x, x.shape[:2] + (1, x.shape[2]))
        w = lax.reshape(w, w.shape[:2] + (1, w.shape[2]))
        s, p, extra = (1,) + s, (0,) + p, (0,) + extra
    x = lax.pad(x, (0,) * 4, (0, 0) + extra)
    y = lax.conv2d(x, w, s, p)
    if nsp == 1:
        y = lax.reshape(y, (n, y.shape[1], y.shape[3]))
    if bias is not None:
        y = _add_channel_bias(y, bias, dt)
    return wrap(lax.reshape(y, y.shape[1:]) if squeeze else y)


@op("conv2d")
def conv2d(input, weight, bias=None, stride=1, padding=0):
    """padding: ints, or "valid" (none) or "same" (stride 1 only; output size = input size)."""
    return _conv("conv2d", 2, input, weight, bias, stride, padding)


@op("conv1d")
def conv1d(input, weight, bias=None, stride=1, padding=0):
    """padding: ints, or "valid" (none) or "same" (stride 1 only; output size = input size)."""
    return _conv("conv1d", 1, input, weight, bias, stride, padding)


def _pool_window(what, nsp, kernel_size, stride, padding):
    k = _ints(kernel_size, nsp, what, "kernel_size", 1)
    s = k if stride is None else _ints(stride, nsp, what, "stride", 1)
    return k, s, _ints(padding, nsp, what, "padding", 0)


def _pool2d(lax_fn, what, input, kernel_size, stride, padding):
    x, squeeze = _batched(as_value(input, result_dtype(input)), 2, what)
    y = lax_fn(x, *_pool_window(what, 2, kernel_size, stride, padding))
    return wrap(lax.reshape(y, y.shape[1:]) if squeeze else y)


def _pool1d(lax_fn, what, input, kernel_size, stride, padding):
    x, squeeze = _batched(as_value(input, result_dtype(input)), 1, what)
    (k,), (s,), (p,) = _pool_window(what, 1, kernel_size, stride, padding)
    n, c, length = x.shape
    y = lax_fn(lax.reshape(x, (n, c, 1, length)), (1, k), (1, s), (0, p))
    y = lax.reshape(y, (n, c, y.shape[3]))
    return wrap(lax.reshape(y, y.shape[1:]) if squeeze else y)


@op("max_pool2d")
def max_pool2d(input, kernel_size, stride=None, padding=0):
    return _pool2d(lax.max_pool2d, "max_pool2d", input, kernel_size, stride, padding)


@op("avg_pool2d")
def avg_pool2d(input, kernel_size, stride=None, padding=0):
    return _pool2d(lax.avg_pool2d, "avg_pool2d", input, kernel_size, stride, padding)


@op("max_pool1d")
def max_pool1d(input, kernel_size, stride=None, padding=0):
    return _pool1d(lax.max_pool2d, "max_pool1d", input, kernel_size, stride, padding)


@op("avg_pool1d")
def avg_pool1d(input, kernel_size, stride=None, padding=0):
    return _pool1d(lax.avg_pool2d, "avg_pool1d", input, kernel_size, stride, padding)


@op("flatten")
def flatten(input, start_dim=1):
    shape = _shape(input)
    start_dim = _dim(input, start_dim, "flatten", "start_dim") % builtins.max(len(shape), 1)
    return ops.reshape(input, tuple(shape[:start_dim]) + (-1,))


@op("log_softmax")
def log_softmax(input, dim=-1):
    """log(softmax(input)) along `dim`. Unlike PyTorch, whose dim has no default (its deprecated
    implicit choice is 0 for 3-d input), `dim` defaults to the last axis: pass it explicitly for
    N-d input such as [N, C, H, W] logits (dim=1)."""
    dim = _dim(input, dim, "log_softmax")
    # the max shift only guards exp against overflow; it does not change the value, so no gradient
    m = ops.stop_gradient(ops.max(input, dim, keepdims=True))
    shifted = ops.subtract(input, m)
    return ops.subtract(shifted, ops.log(ops.sum(ops.exp(shifted), dim, keepdims=True)))


@op("softmax")
def softmax(input, dim=-1):
    """exp(input) normalized along `dim` (the last axis by default, see log_softmax)."""
    dim = _dim(input, dim, "softmax")
    m = ops.stop_gradient(ops.max(input, dim, keepdims=True))
    e = ops.exp(ops.subtract(input, m))
    return ops.divide(e, ops.sum(e, dim, keepdims=True))


REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction, what):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise _error(ValueError, f"{what}: reduction must be 'mean', 'sum' or 'none', got "
                                 f"{reduction!r}")


def _reduce(loss, reduction, what):
    _check_reduction(reduction, what)
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    return loss


@op("cross_entropy")
def cross_entropy(input, target, reduction="mean"):
    """PyTorch's cross_entropy. input: logits [N, C, d1, ...] (the class axis is 1, as in
    PyTorch, also for N-d input) or [C]. target: class indices [N, d1, ...] ([] for [C] logits;
    an int numpy array, not traced) or class probabilities of input's shape (e.g. one-hot, traced
    or not). The loss at each position is -sum over classes of target * log_softmax(input);
    "mean" averages it over the N * d1 * ... positions."""
    _check_reduction(reduction, "cross_entropy")
    shape = tuple(_shape(input))
    tshape = tuple(_shape(target))
    if not shape:
        raise ShapeError("cross_entropy: logits must have a class axis ([C] or [N, C, ...]), got "
                         "a 0-d value")
    axis = 1 if len(shape) > 1 else 0
    n_classes = shape[axis]
    if not isinstance(target, Tracer) and np.asarray(target).dtype.kind in "iu":
        idx = np.asarray(target)
        positions = shape[:axis] + shape[axis + 1:]
        if tshape != positions:
            raise ShapeError(f"cross_entropy: class indices of shape {list(tshape)} do not fit "
                             f"logits of shape {list(shape)} (expected indices of shape "
                             f"{list(positions)}; the class axis of logits is {axis})")
        bad = idx[(idx < 0) | (idx >= n_classes)]
        if bad.size:
            raise _error(IndexError, f"cross_entropy: class index {bad.flat[0]} is out of range "
                                     f"[0, {n_classes}) for logits of shape {list(shape)} (class "
                                     f"axis {axis})")
        target = np.moveaxis(np.eye(n_classes)[idx], -1, axis)
        tshape = target.shape
    if tshape != shape:
        raise ShapeError(f"cross_entropy: target of shape {list(tshape)} does not fit logits of "
                         f"shape {list(shape)} (give class indices [N, d1, ...] as an int array "
                         f"or probabilities [N, C, d1, ...])")
    logp = log_softmax(input, dim=axis)
    per_position = ops.negative(ops.sum(ops.multiply(target, logp), axis))
    return _reduce(per_position, reduction, "cross_entropy")


@op("mse_loss")
def mse_loss(input, target, reduction="mean"):
    if _shape(input) != _shape(target):
        raise ShapeError(f"mse_loss: input of shape {list(_shape(input))} and target of shape "
                         f"{list(_shape(target))} differ")
    _check_reduction(reduction, "mse_loss")
    return _reduce(ops.power(ops.subtract(input, target), 2), reduction, "mse_loss")

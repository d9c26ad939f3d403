"""Neural-network operations with PyTorch's conventions: NCHW inputs, OIHW weights, `stride`,
`padding`, optional `bias`, pooling stride defaulting to the kernel size, average pooling counting
zero padding (count_include_pad=True), and `reduction` in the losses.

relu(0) has derivative 0 and relu(NaN) is NaN; max pooling sends the cotangent to the first maximum
of each window.
"""
from __future__ import annotations

import numbers

import numpy as np

from ir import lax
from ir.core import ShapeError

from . import ops
from .ops import as_value, op, result_dtype
from .tracer import Tracer, wrap


_shape = ops.shape_of


def _tuple(v, n, what):
    if isinstance(v, numbers.Integral):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ShapeError(f"{what} must be an int or a tuple of {n} ints, got {v}")
    return v


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


@op("conv2d")
def conv2d(input, weight, bias=None, stride=1, padding=0):
    dt = result_dtype(input, weight)
    x, squeeze = _batched(as_value(input, dt), 2, "conv2d")
    w = as_value(weight, dt)
    if w.ndim != 4:
        raise ShapeError(f"conv2d: weight must be 4-d [out, in, kh, kw], got {w.type}")
    y = lax.conv2d(x, w, _tuple(stride, 2, "stride"), _tuple(padding, 2, "padding"))
    if bias is not None:
        y = _add_channel_bias(y, bias, dt)
    return wrap(lax.reshape(y, y.shape[1:]) if squeeze else y)


@op("conv1d")
def conv1d(input, weight, bias=None, stride=1, padding=0):
    dt = result_dtype(input, weight)
    x, squeeze = _batched(as_value(input, dt), 1, "conv1d")
    w = as_value(weight, dt)
    if w.ndim != 3:
        raise ShapeError(f"conv1d: weight must be 3-d [out, in, k], got {w.type}")
    (s,), (p,) = _tuple(stride, 1, "stride"), _tuple(padding, 1, "padding")
    n, c, length = x.shape
    y = lax.conv2d(lax.reshape(x, (n, c, 1, length)), lax.reshape(w, w.shape[:2] + (1, w.shape[2])),
                   (1, s), (0, p))
    y = lax.reshape(y, (n, y.shape[1], y.shape[3]))
    if bias is not None:
        y = _add_channel_bias(y, bias, dt)
    return wrap(lax.reshape(y, y.shape[1:]) if squeeze else y)


def _pool2d(lax_fn, what, input, kernel_size, stride, padding):
    x, squeeze = _batched(as_value(input, result_dtype(input)), 2, what)
    k = _tuple(kernel_size, 2, "kernel_size")
    s = k if stride is None else _tuple(stride, 2, "stride")
    y = lax_fn(x, k, s, _tuple(padding, 2, "padding"))
    return wrap(lax.reshape(y, y.shape[1:]) if squeeze else y)


def _pool1d(lax_fn, what, input, kernel_size, stride, padding):
    x, squeeze = _batched(as_value(input, result_dtype(input)), 1, what)
    (k,) = _tuple(kernel_size, 1, "kernel_size")
    (s,) = (k,) if stride is None else _tuple(stride, 1, "stride")
    (p,) = _tuple(padding, 1, "padding")
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
    start_dim %= len(shape)
    return ops.reshape(input, tuple(shape[:start_dim]) + (-1,))


@op("log_softmax")
def log_softmax(input, dim=-1):
    # the max shift only guards exp against overflow; it does not change the value, so no gradient
    m = ops.stop_gradient(ops.max(input, dim, keepdims=True))
    shifted = ops.subtract(input, m)
    return ops.subtract(shifted, ops.log(ops.sum(ops.exp(shifted), dim, keepdims=True)))


@op("softmax")
def softmax(input, dim=-1):
    m = ops.stop_gradient(ops.max(input, dim, keepdims=True))
    e = ops.exp(ops.subtract(input, m))
    return ops.divide(e, ops.sum(e, dim, keepdims=True))


def _reduce(loss, reduction, what):
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{what}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


@op("cross_entropy")
def cross_entropy(input, target, reduction="mean"):
    """input: logits [N, C] (or [C]). target: class indices [N] (an int numpy array, not traced) or
    class probabilities of input's shape (e.g. one-hot, traced or not)."""
    shape = _shape(input)
    tshape = _shape(target)
    logp = log_softmax(input, dim=-1)
    if not isinstance(target, Tracer) and np.asarray(target).dtype.kind in "iu":
        idx = np.asarray(target)
        if tshape != shape[:-1]:
            raise ShapeError(f"cross_entropy: class indices of shape {list(tshape)} do not fit "
                             f"logits of shape {list(shape)}")
        if idx.size and (idx.min() < 0 or idx.max() >= shape[-1]):
            raise ValueError(f"cross_entropy: class indices must be in [0, {shape[-1]}), got "
                             f"{idx.min()}..{idx.max()}")
        target = np.eye(shape[-1])[idx]
        tshape = target.shape
    if tshape != shape:
        raise ShapeError(f"cross_entropy: target of shape {list(tshape)} does not fit logits of "
                         f"shape {list(shape)} (give class indices [N] as an int array or "
                         f"probabilities [N, C])")
    per_example = ops.negative(ops.sum(ops.multiply(target, logp), -1))
    return _reduce(per_example, reduction, "cross_entropy")


@op("mse_loss")
def mse_loss(input, target, reduction="mean"):
    if _shape(input) != _shape(target):
        raise ShapeError(f"mse_loss: input of shape {list(_shape(input))} and target of shape "
                         f"{list(_shape(target))} differ")
    return _reduce(ops.power(ops.subtract(input, target), 2), reduction, "mse_loss")

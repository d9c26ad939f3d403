"""Neural-network operations with PyTorch's conventions: NCHW inputs, OIHW weights, `stride`,
`padding`, optional `bias`, pooling stride defaulting to the kernel size, average pooling counting
zero padding (count_include_pad=True), and `reduction` in the losses.

relu(0) has derivative 0 and relu(NaN) is NaN; max pooling sends the cotangent to the first maximum
of each window.

The activations, losses and normalisation layers below relu are composites of tracejit ops with
torch.nn.functional's signatures and numbers. batch_norm in training mode returns the updated
running statistics instead of mutating them (see its docstring).
"""
from __future__ import annotations

import builtins
import numbers
from typing import NamedTuple

import numpy as np

from .ir import lax
from .ir.builder import user_location
from .ir.core import DTYPES, INT_DTYPES, ShapeError

from . import ops
from .ops import as_value, op, result_dtype
from .tracer import Tracer
from .values import to_value, wrap


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


# ------------------------------------------------------------------------------------------------
# activations as composites. Two habits keep their values and gradients exact where the naive
# formula fails: a branch of `where` gets an input clamped to where it is chosen (an untaken
# exp(x) that overflows would turn the zero cotangent into 0 * inf = NaN), and log(1 + u), exp(x) - 1
# go through _log1p and _expm1, which keep full relative precision for tiny u and x.
# ------------------------------------------------------------------------------------------------
_log1p = ops.log1p   # full relative precision for tiny u, gradient 1 / (1 + u)
_expm1 = ops.expm1   # full relative precision for tiny x, gradient exp(x)


def _float(x):
    """x as a traced float value (numpy arrays and Python numbers included)."""
    return wrap(as_value(x, result_dtype(x)))


def _constant_as(v, like):
    """A numpy (not traced) operand as the float dtype of `like`. Inside a trace numpy constants
    are weak, but arithmetic among constants alone (pos_weight - 1) makes a strong float64 value
    that would turn a float32 loss into float64; so constants are cast first."""
    if v is None or isinstance(v, Tracer):
        return v
    return np.asarray(v, dtype=np.float32 if result_dtype(like) == "f32" else np.float64)


def _number(v, what, param):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise _error(TypeError, f"{what}: {param} must be a number, got {v!r}")
    return float(v)


@op("leaky_relu")
def leaky_relu(x, negative_slope=0.01):
    """x where x > 0, else negative_slope * x (derivative negative_slope at 0, as PyTorch)."""
    slope = _number(negative_slope, "leaky_relu", "negative_slope")
    x = _float(x)
    return ops.where(ops.greater(x, 0.0), x, ops.multiply(x, slope))


@op("elu")
def elu(x, alpha=1.0):
    """x where x > 0, else alpha * (exp(x) - 1) (derivative alpha at 0, as PyTorch)."""
    alpha = _number(alpha, "elu", "alpha")
    x = _float(x)
    positive = ops.greater(x, 0.0)
    return ops.where(positive, x, ops.multiply(_expm1(ops.where(positive, 0.0, x)), alpha))


@op("log_sigmoid")
def log_sigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), finite and exact for every finite x
    (-100 at x = -100; -3.7e-44 at x = 100 in float64)."""
    x = _float(x)
    negative = ops.less(x, 0.0)
    # exp(-|x|) never overflows; `where` (not abs, min) keeps the gradient smooth at 0
    e = ops.exp(ops.where(negative, x, ops.negative(x)))
    return ops.subtract(ops.where(negative, x, 0.0), _log1p(e))


@op("softplus")
def softplus(x, beta=1.0, threshold=20.0):
    """log(1 + exp(beta * x)) / beta, and x itself where beta * x > threshold (PyTorch's linear
    branch)."""
    beta = _number(beta, "softplus", "beta")
    threshold = _number(threshold, "softplus", "threshold")
    x = _float(x)
    z = ops.multiply(x, beta)
    soft = ops.divide(ops.negative(log_sigmoid(ops.negative(z))), beta)
    return ops.where(ops.greater(z, threshold), x, soft)


@op("silu")
def silu(x):
    """x * sigmoid(x) (swish)."""
    x = _float(x)
    return ops.multiply(x, sigmoid(x))


# erf as a composite. |x| <= 1: erf(x) = x * P(x**2), P of degree 12. |x| > 1: erfc(|x|) =
# exp(-x**2) * S(s) / (1 + 2 |x|), S a Chebyshev series of degree 20 in s, a linear map of
# t = (|x| - 3) / (|x| + 3) from [-1/2, 1] to [-1, 1] (the mapping of Shepherd and Laframboise,
# 1981). Both are Chebyshev interpolants of the exact functions computed with mpmath at 50 digits
# (P converted to monomials, well conditioned on [0, 1]; S summed by Clenshaw's recurrence). In
# float64 the relative error of erf is at most 3e-16 for |x| <= 1 and 1 ulp above; that of
# erfc(y) for y > 1 is about y**2 * 1.1e-16, the rounding of y * y inside exp, as in libms
# without a split of y * y (1e-15 up to y = 3). Differentiated like any composite: the derivative
# agrees with 2 / sqrt(pi) * exp(-x**2) to ~1e-14 relative.
_ERF_P = (1.1283791670955126, -0.3761263890318375, 0.11283791670954882, -0.026866170645077334,
          0.005223977624823223, -0.0008548326981129666, 0.00012055331122299266,
          -1.4925595519506043e-05, 1.6461004480962034e-06, -1.6350354461959655e-07,
          1.4660051998394848e-08, -1.1373902296430911e-09, 5.958930743134941e-11)
_ERFC_K = 3.0
_ERFC_S = (1.214373361609205, -0.08560693623397121, -0.005999640519915682, 0.007801951554945334,
           -0.002715651717391105, 0.0006115494911330234, -9.340626641960768e-05,
           7.818816898966098e-06, 2.7197258578141963e-07, -1.6637239214622205e-07,
           1.3133701262289988e-08, 2.0754203597909473e-09, -4.4148718962068737e-10,
           -1.7967351765140848e-11, 1.1481428873007284e-11, -2.807460684069243e-14,
           -3.012251024442509e-13, 7.106503405462323e-15, 8.542035882836416e-15,
           -2.329298464180819e-16, -2.6466825044432234e-16)
# erfc(30) underflows in float64: larger |x| are evaluated at 30 (erfc = 0, derivative 0), which
# also keeps t finite at |x| = inf
_ERFC_CAP = 30.0


def _erf_parts(x):
    """(small, erf(x) where small, erfc(|x|) where not), small = |x| <= 1; each part is finite
    (and its gradient too) where it is not used."""
    small = ops.less_equal(ops.where(ops.less(x, 0.0), ops.negative(x), x), 1.0)
    xs = ops.where(small, x, 0.0)
    t = ops.multiply(xs, xs)
    p = _ERF_P[-1]
    for c in reversed(_ERF_P[:-1]):
        p = ops.add(ops.multiply(p, t), c)
    erf_small = ops.multiply(xs, p)

    y = ops.where(small, 1.0, ops.where(ops.less(x, 0.0), ops.negative(x), x))
    y = ops.where(ops.greater(y, _ERFC_CAP), _ERFC_CAP, y)
    t = ops.divide(ops.subtract(y, _ERFC_K), ops.add(y, _ERFC_K))
    lo = (1.0 - _ERFC_K) / (1.0 + _ERFC_K)
    s = ops.subtract(ops.multiply(t, 2.0 / (1.0 - lo)), (1.0 + lo) / (1.0 - lo))
    b1, b2 = 0.0, 0.0            # Clenshaw: b_k = 2 s b_(k+1) - b_(k+2) + c_k
    for c in reversed(_ERFC_S[1:]):
        b1, b2 = ops.add(ops.subtract(ops.multiply(ops.multiply(s, 2.0), b1), b2), c), b1
    series = ops.add(ops.subtract(ops.multiply(s, b1), b2), _ERFC_S[0])
    erfc_large = ops.divide(ops.multiply(ops.exp(ops.negative(ops.multiply(y, y))), series),
                            ops.add(ops.multiply(y, 2.0), 1.0))
    return small, erf_small, erfc_large


@op("erf")
def erf(x):
    """The error function 2 / sqrt(pi) * integral from 0 to x of exp(-t**2) dt, to within 1 ulp
    in float64 (a composite of polynomials and exp; see _erf_parts)."""
    x = _float(x)
    small, erf_small, erfc_large = _erf_parts(x)
    one_minus = ops.subtract(1.0, erfc_large)
    return ops.where(small, erf_small,
                     ops.where(ops.less(x, 0.0), ops.negative(one_minus), one_minus))


def _normal_cdf(x):
    """Phi(x) = erfc(-x / sqrt(2)) / 2, from erfc itself in the tails, so that Phi(-10) keeps
    its relative precision (1 + erf(x / sqrt(2)) would cancel to 0)."""
    small, erf_small, erfc_large = _erf_parts(ops.multiply(x, float(np.sqrt(0.5))))
    half_tail = ops.multiply(erfc_large, 0.5)
    return ops.where(small, ops.add(ops.multiply(erf_small, 0.5), 0.5),
                     ops.where(ops.less(x, 0.0), half_tail, ops.subtract(1.0, half_tail)))


GELU_APPROXIMATIONS = ("none", "tanh")


@op("gelu")
def gelu(x, approximate="none"):
    """x * Phi(x) with Phi the standard normal CDF ("none", exact), or PyTorch's tanh
    approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x**3))) ("tanh")."""
    if not isinstance(approximate, str) or approximate not in GELU_APPROXIMATIONS:
        raise _error(ValueError, f"gelu: approximate must be 'none' or 'tanh', got "
                                 f"{approximate!r}")
    x = _float(x)
    if approximate == "tanh":
        inner = ops.multiply(ops.add(x, ops.multiply(ops.power(x, 3), 0.044715)),
                             float(np.sqrt(2.0 / np.pi)))
        return ops.multiply(ops.multiply(x, 0.5), ops.add(ops.tanh(inner), 1.0))
    return ops.multiply(x, _normal_cdf(x))


@op("embedding")
def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
              scale_grad_by_freq=False, sparse=False):
    """PyTorch's embedding: rows of `weight` [V, D] picked by the integer indices `input` (any
    shape, traced such as token ids, or a numpy constant): [*input.shape, D]. An index outside
    [0, V) (negative ones included, as in PyTorch) raises IndexError naming `input`, checked
    natively where it is read. The gradient w.r.t. weight is a scatter-add of the rows.

    `padding_idx` (in [-V, V); a negative one counts from the end) names a row that is looked up
    as usual but gets no gradient, as in PyTorch. `max_norm` (renormalising looked-up rows in
    place), `scale_grad_by_freq` and `sparse` are not supported: anything but their defaults
    raises ValueError."""
    for arg, value, default, why in (
            ("max_norm", max_norm, None, "renormalises the looked-up rows of weight in place"),
            ("scale_grad_by_freq", scale_grad_by_freq, False, "rescales the gradient"),
            ("sparse", sparse, False, "asks for a sparse gradient")):
        if value is not default and value != default:
            raise _error(ValueError, f"embedding: {arg}={value!r} is not supported (in PyTorch "
                                     f"it {why}); pass {arg}={default!r}")
    w = as_value(weight, result_dtype(weight))
    if w.ndim != 2:
        raise ShapeError(f"embedding: weight must be 2-d [num_embeddings, dim], got shape "
                         f"{list(w.shape)}")
    if padding_idx is not None:
        if not _is_int(padding_idx):
            raise _error(TypeError, f"embedding: padding_idx must be an int or None, got "
                                    f"{type(padding_idx).__name__}")
        if not -w.shape[0] <= padding_idx < w.shape[0]:
            raise _error(ValueError, f"embedding: padding_idx={padding_idx} must be within "
                                     f"[-{w.shape[0]}, {w.shape[0]}), the weight's "
                                     f"{w.shape[0]} rows")
        padding_idx %= w.shape[0]
    shape = tuple(_shape(input))
    name = ops.index_name(input, "input")
    if not isinstance(input, Tracer):
        arr = np.asarray(input)
        bad = arr[(arr < 0) | (arr >= w.shape[0])] if arr.dtype.kind in "iu" else arr[:0]
        if bad.size:
            raise _error(IndexError, f"embedding: index {bad.flat[0]} is out of range [0, "
                                     f"{w.shape[0]}) of the weight's {w.shape[0]} rows")
    idx = lax.reshape(ops.int_value(input), (int(np.prod(shape, dtype=np.int64)), 1))
    rows = lax.gather(w, idx, 0, negative="error", name=name)
    out = wrap(lax.reshape(rows, shape + (w.shape[1],)))
    if padding_idx is None:
        return out
    # the padding rows' values pass through, their cotangent does not reach the scatter-add
    is_pad = ops.expand_dims(ops.equal(input, padding_idx), -1)
    return ops.where(is_pad, ops.stop_gradient(out), out)


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


def _conv_padding(what, padding, stride, kernel, dilation):
    """(symmetric padding, extra padding on the right/bottom) per spatial dim. "same" pads
    dilation * (k - 1) in total with the odd one on the right/bottom, as PyTorch does."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n, (0,) * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise _error(ValueError, f"{what}: padding='same' needs stride 1 (PyTorch refuses "
                                         f"it for strided convolutions), got stride={stride}; give "
                                         f"the padding as ints")
            total = tuple(d * (k - 1) for k, d in zip(kernel, dilation))
            return tuple(t // 2 for t in total), tuple(t % 2 for t in total)
        raise _error(ValueError, f"{what}: padding must be 'same', 'valid', a non-negative int or "
                                 f"a tuple of {n} non-negative ints, got {padding!r}")
    return _ints(padding, n, what, "padding", 0), (0,) * n


def _groups(what, groups, c_in, c_out, in_name, out_name):
    """`groups` checked against the channel counts, as PyTorch's messages put it."""
    if not _is_int(groups) or groups < 1:
        raise _error(ValueError, f"{what}: groups must be a positive int, got {groups!r}")
    for name, n in ((in_name, c_in), (out_name, c_out)):
        if n % groups:
            raise _error(ValueError, f"{what}: {name} ({n}) must be divisible by groups "
                                     f"({groups})")
    return int(groups)


def _conv_operands(what, nsp, input, weight, bias, channels):
    """channels: the weight's two leading dimensions as PyTorch names them."""
    dt = result_dtype(input, weight, *([bias] if bias is not None else []))
    x, squeeze = _batched(as_value(input, dt), nsp, what)
    w = as_value(weight, dt)
    if w.ndim != nsp + 2:
        layout = f"[{channels}, kh, kw]" if nsp == 2 else f"[{channels}, k]"
        raise ShapeError(f"{what}: weight must be {nsp + 2}-d {layout}, got {w.type}")
    return dt, x, w, squeeze


def _as_2d(nsp, x, w, *spatial):
    """conv1d as a conv2d of height 1: x and w get a unit height, each spatial tuple of a
    (fill, tuple) pair its fill in front."""
    if nsp == 2:
        return (x, w) + tuple(t for _, t in spatial)
    x = lax.reshape(x, x.shape[:2] + (1, x.shape[2]))
    w = lax.reshape(w, w.shape[:2] + (1, w.shape[2]))
    return (x, w) + tuple((fill,) + t for fill, t in spatial)


def _conv_result(nsp, y, n, bias, dt, squeeze):
    if nsp == 1:
        y = lax.reshape(y, (n, y.shape[1], y.shape[3]))
    if bias is not None:
        y = _add_channel_bias(y, bias, dt)
    return wrap(lax.reshape(y, y.shape[1:]) if squeeze else y)


def _conv(what, nsp, input, weight, bias, stride, padding, dilation, groups):
    """conv1d (nsp=1, as a conv2d of height 1) and conv2d with PyTorch's arguments."""
    dt, x, w, squeeze = _conv_operands(what, nsp, input, weight, bias, "out, in/groups")
    s = _ints(stride, nsp, what, "stride", 1)
    d = _ints(dilation, nsp, what, "dilation", 1)
    g = _groups(what, groups, x.shape[1], w.shape[0], "input channels", "output channels")
    if x.shape[1] != w.shape[1] * g:
        raise ShapeError(f"{what}: input {x.type} has {x.shape[1]} channels but weight {w.type} "
                         f"with groups={g} expects {w.shape[1] * g}")
    p, extra = _conv_padding(what, padding, s, w.shape[2:], d)
    n = x.shape[0]
    x, w, s, p, extra, d = _as_2d(nsp, x, w, (1, s), (0, p), (0, extra), (1, d))
    x = lax.pad(x, (0,) * 4, (0, 0) + extra)
    y = lax.conv2d(x, w, s, p, d, g)
    return _conv_result(nsp, y, n, bias, dt, squeeze)


@op("conv2d")
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """weight [out, in/groups, kh, kw]; padding: ints, or "valid" (none) or "same" (stride 1
    only; output size = input size, the odd padding on the right/bottom as in PyTorch)."""
    return _conv("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)


@op("conv1d")
def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """weight [out, in/groups, k]; padding: ints, or "valid" (none) or "same" (stride 1 only)."""
    return _conv("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


def _transpose_window(L, s, p, d, k, op):
    """How one axis of a transposed convolution maps onto conv2d_input_grad, whose padding is
    symmetric and whose output size must give back L windows: (kernel padding, kernel output
    size, rows to crop in front, rows to add (> 0, zeros) or crop (< 0) at the end).

    In the coordinates of the unpadded scatter [0, F), F = (L - 1)*s + d*(k - 1) + 1, the output
    is [p, p + out) with out = F - 2p + op. A kernel with padding kp and size F - 2kp + r
    (0 <= r < s) computes [kp, F - kp + r). With output_padding < stride that is the output
    itself (kp = p, r = op); PyTorch also allows stride <= output_padding < dilation, where the
    output's last rows lie past every window (zeros) and may start before the kernel's end with
    padding p: then the kernel pads less and its extra rows are cropped."""
    f = (L - 1) * s + d * (k - 1) + 1
    end = f - p + op                       # the output's end
    for kp in range(p, -1, -1):
        r = builtins.min(s - 1, end - (f - kp))
        if r >= 0 and f - kp + r >= builtins.min(end, f):
            return kp, f - 2 * kp + r, p - kp, end - (f - kp + r)
    # unreachable: kp = p - op fits when op < p (r = 0), kp = 0 when op >= p (r = min(s-1, op-p))
    raise AssertionError(f"no conv2d_input_grad window for {(L, s, p, d, k, op)}")


def _conv_transpose(what, nsp, input, weight, bias, stride, padding, output_padding, groups,
                    dilation):
    """The adjoint of a convolution with respect to its input: conv2d_input_grad of the input,
    with the weight [in, out/groups, ...] as the convolution's [O, C/G, ...]."""
    dt, x, w, squeeze = _conv_operands(what, nsp, input, weight, bias, "in, out/groups")
    s = _ints(stride, nsp, what, "stride", 1)
    d = _ints(dilation, nsp, what, "dilation", 1)
    p = _ints(padding, nsp, what, "padding", 0)
    op_ = _ints(output_padding, nsp, what, "output_padding", 0)
    g = _groups(what, groups, x.shape[1], w.shape[0], "input channels", "weight's input channels")
    if x.shape[1] != w.shape[0]:
        raise ShapeError(f"{what}: input {x.type} has {x.shape[1]} channels but weight {w.type} "
                         f"expects {w.shape[0]}")
    if any(o >= builtins.max(a, b) for o, a, b in zip(op_, s, d)):
        raise _error(ValueError, f"{what}: output_padding must be smaller than the stride or the "
                                 f"dilation in each dimension (PyTorch's rule), got "
                                 f"output_padding={op_} with stride={s} and dilation={d}")
    # out = (L - 1)*s - 2p + d*(k - 1) + 1 + output_padding
    out_sp = tuple((L - 1) * si - 2 * pi + di * (k - 1) + 1 + o
                   for L, si, pi, di, k, o in zip(x.shape[2:], s, p, d, w.shape[2:], op_))
    if any(L < 1 for L in out_sp):
        raise ShapeError(f"{what}: the output size {out_sp} is not positive (input {x.type}, "
                         f"weight {w.type}, stride {s}, padding {p}, dilation {d})")
    windows = [_transpose_window(L, si, pi, di, k, o)
               for L, si, pi, di, k, o in zip(x.shape[2:], s, p, d, w.shape[2:], op_)]
    kp, k_sp, lo, hi = (tuple(t) for t in zip(*windows))
    n = x.shape[0]
    x, w, s, kp, d, k_sp, lo, hi = _as_2d(nsp, x, w, (1, s), (0, kp), (1, d), (1, k_sp), (0, lo),
                                          (0, hi))
    y = lax.conv2d_input_grad(x, w, k_sp, s, kp, d, g)
    y = lax.slice_(y, (0, 0) + lo, y.shape[:2] + tuple(m + builtins.min(h, 0)
                                                       for m, h in zip(k_sp, hi)))
    y = lax.pad(y, (0,) * 4, (0, 0) + tuple(builtins.max(h, 0) for h in hi))
    return _conv_result(nsp, y, n, bias, dt, squeeze)


@op("conv_transpose2d")
def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """weight [in, out/groups, kh, kw] (PyTorch's layout); the gradient of conv2d with respect to
    its input, computed by the same kernels."""
    return _conv_transpose("conv_transpose2d", 2, input, weight, bias, stride, padding,
                           output_padding, groups, dilation)


@op("conv_transpose1d")
def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """weight [in, out/groups, k]; see conv_transpose2d."""
    return _conv_transpose("conv_transpose1d", 1, input, weight, bias, stride, padding,
                           output_padding, groups, dilation)


def _pool_window(what, nsp, kernel_size, stride, padding, dilation=1):
    k = _ints(kernel_size, nsp, what, "kernel_size", 1)
    s = k if stride is None else _ints(stride, nsp, what, "stride", 1)
    p = _ints(padding, nsp, what, "padding", 0)
    if any(2 * pp > kk for pp, kk in zip(p, k)):
        raise _error(ValueError, f"{what}: padding must be at most half the kernel_size {k} "
                                 f"(PyTorch's rule), got {p}")
    return k, s, p, _ints(dilation, nsp, what, "dilation", 1)


def _spatial(what, nsp, input):
    """(x as a batched NCHW value, whether the input was unbatched, to2) where to2(t, fill)
    turns a tuple of nsp spatial values into two (1-d pooling is 2-d pooling of height 1)."""
    x, squeeze = _batched(as_value(input, result_dtype(input)), nsp, what)
    if nsp == 1:
        x = lax.reshape(x, x.shape[:2] + (1, x.shape[2]))
    return x, squeeze, (lambda t, fill: t if nsp == 2 else (fill,) + tuple(t))


def _unspatial(nsp, y, squeeze):
    if nsp == 1:
        y = lax.reshape(y, y.shape[:2] + (y.shape[3],))
    return lax.reshape(y, y.shape[1:]) if squeeze else y


def _max_pool(what, nsp, input, kernel_size, stride, padding, dilation, ceil_mode,
              return_indices):
    k, s, p, d = _pool_window(what, nsp, kernel_size, stride, padding, dilation)
    x, squeeze, to2 = _spatial(what, nsp, input)
    window = (to2(k, 1), to2(s, 1), to2(p, 0), to2(d, 1), bool(ceil_mode))
    y = wrap(_unspatial(nsp, lax.max_pool2d(x, *window), squeeze))
    if not return_indices:
        return y
    # PyTorch's indices: the flat position (h*W + w) of each maximum in its input plane, int64
    idx = lax.convert(lax.max_pool2d_argmax(x, *window), "i64")
    return y, wrap(_unspatial(nsp, idx, squeeze))


@op("max_pool2d")
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """stride defaults to kernel_size; padding is -inf; ceil_mode keeps a last partial window;
    return_indices: also the int64 flat index (h*W + w) of each window's first maximum."""
    return _max_pool("max_pool2d", 2, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


@op("max_pool1d")
def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    return _max_pool("max_pool1d", 1, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices)


def _avg_divisors(in_sp, out_sp, k, s, p, count_include_pad):
    """PyTorch's divisor of each average-pooling window [out...]: the window clipped to the
    padded input (count_include_pad) or to the input."""
    per_dim = []
    for n, o, kk, ss, pp in zip(in_sp, out_sp, k, s, p):
        start = np.arange(o) * ss - pp
        end = np.minimum(start + kk, n + pp)
        if not count_include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, n)
        per_dim.append((end - start).astype(np.float64))
    return per_dim[0][:, None] * per_dim[1][None, :] if len(per_dim) == 2 else per_dim[0]


def _avg_pool(what, nsp, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
              divisor_override):
    k, s, p, _ = _pool_window(what, nsp, kernel_size, stride, padding)
    if divisor_override is not None and (not _is_int(divisor_override) or divisor_override == 0):
        raise _error(ValueError, f"{what}: divisor_override must be a non-zero int or None, got "
                                 f"{divisor_override!r}")
    x, squeeze, to2 = _spatial(what, nsp, input)
    y = lax.avg_pool2d(x, to2(k, 1), to2(s, 1), to2(p, 0), bool(ceil_mode))   # sums / prod(k)
    in_sp, out_sp = x.shape[4 - nsp:], y.shape[4 - nsp:]
    if divisor_override is not None:
        div = np.full(out_sp, float(divisor_override))
    else:
        div = _avg_divisors(in_sp, out_sp, k, s, p, count_include_pad)
    scale = np.prod(k) / div
    if np.any(scale != 1.0):   # a constant per output position, fused into the epilogue
        c = lax.literal(scale.reshape(y.shape[2:]).astype(np.float32 if y.dtype == "f32"
                                                           else np.float64))
        y = lax.mul(y, lax.broadcast_in_dim(c, y.shape, (2, 3)))
    return wrap(_unspatial(nsp, y, squeeze))


@op("avg_pool2d")
def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """stride defaults to kernel_size; PyTorch's divisors (count_include_pad counts the zero
    padding, never what ceil_mode's last windows reach past it; divisor_override replaces them)."""
    return _avg_pool("avg_pool2d", 2, input, kernel_size, stride, padding, ceil_mode,
                     count_include_pad, divisor_override)


@op("avg_pool1d")
def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True):
    return _avg_pool("avg_pool1d", 1, input, kernel_size, stride, padding, ceil_mode,
                     count_include_pad, None)


def _output_size(what, nsp, output_size, in_sp):
    """PyTorch's output_size: an int or a tuple of ints or None (None keeps the input's size)."""
    vals = (output_size,) * nsp if _is_int(output_size) or output_size is None else \
        tuple(output_size) if isinstance(output_size, (tuple, list)) else ()
    if len(vals) != nsp or not all(v is None or (_is_int(v) and v >= 1) for v in vals):
        raise _error(ValueError, f"{what}: output_size must be a positive int or a tuple of {nsp} "
                                 f"positive ints (or None), got {output_size!r}")
    return tuple(n if v is None else int(v) for v, n in zip(vals, in_sp))


def _adaptive_bounds(n, o):
    """PyTorch's adaptive windows of an axis of n into o: [floor(i*n/o), ceil((i+1)*n/o))."""
    i = np.arange(o)
    return (i * n) // o, -((-(i + 1) * n) // o)


def _adaptive_axis_avg(y, axis, o):
    """Adaptive average along spatial axis 2 or 3 of y: a window pooling when the windows tile
    the axis, else a product with the constant [n, o] averaging matrix."""
    n = y.shape[axis]
    if n % o == 0:
        k = (n // o, 1) if axis == 2 else (1, n // o)
        return y if n == o else lax.avg_pool2d(y, k, k, (0, 0))
    start, end = _adaptive_bounds(n, o)
    m = np.zeros((n, o))
    for i in range(o):
        m[start[i]:end[i], i] = 1.0 / (end[i] - start[i])
    m = lax.literal(m.astype(np.float32 if y.dtype == "f32" else np.float64))
    if axis == 2:   # y [N, C, H, W] -> [N, C, W, H] so that H is the contracted last axis
        t = lax.transpose(y, (0, 1, 3, 2))
        r = lax.matmul(lax.reshape(t, (t.type.size // n, n)), m)
        return lax.transpose(lax.reshape(r, t.shape[:3] + (o,)), (0, 1, 3, 2))
    r = lax.matmul(lax.reshape(y, (y.type.size // n, n)), m)
    return lax.reshape(r, y.shape[:3] + (o,))


def _adaptive(what, nsp, input, output_size, axis_fn):
    x, squeeze, to2 = _spatial(what, nsp, input)
    out = to2(_output_size(what, nsp, output_size, x.shape[4 - nsp:]), 1)
    y = axis_fn(axis_fn(x, 3, out[1]), 2, out[0])   # windows are rectangles: one axis at a time
    return wrap(_unspatial(nsp, y, squeeze))


@op("adaptive_avg_pool2d")
def adaptive_avg_pool2d(input, output_size):
    """Averages over PyTorch's adaptive windows [floor(i*H/oh), ceil((i+1)*H/oh)) x (same in W)."""
    return _adaptive("adaptive_avg_pool2d", 2, input, output_size, _adaptive_axis_avg)


@op("adaptive_avg_pool1d")
def adaptive_avg_pool1d(input, output_size):
    return _adaptive("adaptive_avg_pool1d", 1, input, output_size, _adaptive_axis_avg)


def _adaptive_argmax(x, oh, ow):
    """PyTorch's indices of adaptive max pooling with windows that do not tile the input: for
    each window of x [N, C, H, W], the flat position h*W + w of its first maximum (row-major; a
    NaN is the maximum), int64 [N, C, oh, ow].

    Windows have different sizes; each is gathered padded to the longest by repeating its last
    row and column, so a window's slots in order hold non-decreasing flat positions (a repeat
    follows its original) and the first maximum is the least position among the slots holding
    it. No gradient: the positions are piecewise constant."""
    n, c, h, w = x.shape
    (sh, eh), (sw, ew) = _adaptive_bounds(h, oh), _adaptive_bounds(w, ow)
    kh, kw = int((eh - sh).max()), int((ew - sw).max())
    rows = np.minimum(sh[:, None] + np.arange(kh), eh[:, None] - 1)   # [oh, kh]
    cols = np.minimum(sw[:, None] + np.arange(kw), ew[:, None] - 1)   # [ow, kw]
    v = lax.stop_gradient(x)
    v = lax.gather(v, lax.literal(cols.reshape(1, 1, 1, ow * kw).astype(np.int32)), 3)
    v = lax.gather(v, lax.literal(rows.reshape(1, 1, oh * kh, 1).astype(np.int32)), 2)
    v = lax.transpose(lax.reshape(v, (n, c, oh, kh, ow, kw)), (0, 1, 2, 4, 3, 5))
    v = lax.reshape(v, (n, c, oh, ow, kh * kw))
    m = lax.broadcast_in_dim(lax.reduce_max(v, (4,)), v.shape, (0, 1, 2, 3))
    hit = lax.logical_or(lax.eq(v, m), lax.ne(v, v))
    # flat positions as floats of v's dtype (exact: H*W < 2^24 is checked below)
    flat = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(oh, ow, kh * kw)
    pos = lax.literal(flat.astype(np.float64 if v.dtype == "f64" else np.float32))
    pos = lax.select(hit, lax.broadcast_to(pos, v.shape), float(h * w))
    return lax.convert(lax.neg(lax.reduce_max(lax.neg(pos), (4,))), "i64")


def _adaptive_max(what, nsp, input, output_size, return_indices):
    """Adaptive max pooling: a window pooling when the windows tile the input, else the values
    at _adaptive_argmax's positions (so the gradient goes to each window's first maximum, as in
    PyTorch, also where windows overlap)."""
    x, squeeze, to2 = _spatial(what, nsp, input)
    (h, w), (oh, ow) = x.shape[2:], to2(_output_size(what, nsp, output_size, x.shape[4 - nsp:]), 1)
    if h % oh == 0 and w % ow == 0:
        k = (h // oh, w // ow)
        y = lax.max_pool2d(x, k, k, (0, 0))
        idx = lax.convert(lax.max_pool2d_argmax(x, k, k, (0, 0)), "i64") if return_indices \
            else None
    else:
        if h * w >= 1 << 24:   # the positions are compared as floats of x's dtype
            raise ShapeError(f"{what}: an input plane of {h * w} >= 2^24 positions with windows "
                             f"that do not tile it is not supported, got {x.type}")
        idx = _adaptive_argmax(x, oh, ow)
        y = lax.gather(lax.reshape(x, (x.shape[0], x.shape[1], h * w)),
                       lax.reshape(idx, x.shape[:2] + (oh * ow,)), 2)
        y = lax.reshape(y, x.shape[:2] + (oh, ow))
    y = wrap(_unspatial(nsp, y, squeeze))
    return (y, wrap(_unspatial(nsp, idx, squeeze))) if return_indices else y


@op("adaptive_max_pool2d")
def adaptive_max_pool2d(input, output_size, return_indices=False):
    """Maxima over PyTorch's adaptive windows (see adaptive_avg_pool2d); return_indices: also
    the int64 flat position (h*W + w) of each window's first maximum in its input plane. The
    gradient goes to that position, as in PyTorch."""
    return _adaptive_max("adaptive_max_pool2d", 2, input, output_size, return_indices)


@op("adaptive_max_pool1d")
def adaptive_max_pool1d(input, output_size, return_indices=False):
    """See adaptive_max_pool2d (indices: positions along the input's last axis)."""
    return _adaptive_max("adaptive_max_pool1d", 1, input, output_size, return_indices)


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


def _class_coefficients(what, input, target, weight, ignore_index, label_smoothing):
    """(class axis, coef, count) for the losses of log-probabilities `logp` over classes:
    loss at each position = -sum over classes of coef * logp, and "mean" divides the sum of those
    losses by `count` (PyTorch's normalisation).

    Traced class indices: coef is a _TracedClassIndices, which computes the same coefficients
    once the log-probabilities exist (count is None until then).
    Class indices (an int numpy array): coef = w[c] * ((1 - s) * onehot + s / C) at
    positions whose index is not `ignore_index` (0 at ignored ones), count = sum of w[target] over
    the positions not ignored (nan from "mean" when every position is ignored, as in PyTorch).
    Class probabilities t (input's shape, traced or not): coef = w[c] * ((1 - s) * t + s / C),
    count = the number of positions; ignore_index does not apply (PyTorch ignores it too)."""
    shape = tuple(_shape(input))
    tshape = tuple(_shape(target))
    if not shape:
        raise ShapeError(f"{what}: logits must have a class axis ([C] or [N, C, ...]), got a 0-d "
                         f"value")
    axis = 1 if len(shape) > 1 else 0
    n_classes = shape[axis]
    positions = shape[:axis] + shape[axis + 1:]
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or \
            not 0.0 <= label_smoothing <= 1.0:
        raise _error(ValueError, f"{what}: label_smoothing must be a number in [0, 1], got "
                                 f"{label_smoothing!r}")
    if not _is_int(ignore_index):
        raise _error(ValueError, f"{what}: ignore_index must be an int, got {ignore_index!r}")
    weight = _constant_as(weight, input)
    w = None
    if weight is not None:
        if tuple(_shape(weight)) != (n_classes,):
            raise ShapeError(f"{what}: weight of shape {list(_shape(weight))} must have shape "
                             f"[{n_classes}] (one per class; the class axis of logits of shape "
                             f"{list(shape)} is {axis})")
        # one weight per class, along the class axis of the loss coefficients
        w = ops.reshape(weight, tuple(n_classes if i == axis else 1 for i in range(len(shape))))
    smooth = float(label_smoothing)
    if isinstance(target, Tracer) and target.value.dtype in INT_DTYPES:
        if tshape != positions:
            raise ShapeError(f"{what}: class indices of shape {list(tshape)} do not fit logits "
                             f"of shape {list(shape)} (expected indices of shape "
                             f"{list(positions)}; the class axis of logits is {axis})")
        return axis, _TracedClassIndices(target, weight, int(ignore_index), smooth), None
    if not isinstance(target, Tracer) and np.asarray(target).dtype.kind in "iu":
        idx = np.asarray(target)
        if tshape != positions:
            raise ShapeError(f"{what}: class indices of shape {list(tshape)} do not fit logits "
                             f"of shape {list(shape)} (expected indices of shape "
                             f"{list(positions)}; the class axis of logits is {axis})")
        kept = idx != ignore_index
        bad = idx[kept & ((idx < 0) | (idx >= n_classes))]
        if bad.size:
            raise _error(IndexError, f"{what}: class index {bad.flat[0]} is out of range "
                                     f"[0, {n_classes}) for logits of shape {list(shape)} (class "
                                     f"axis {axis})")
        dtype = np.float32 if result_dtype(input) == "f32" else np.float64
        onehot = np.moveaxis(np.eye(n_classes, dtype=dtype)[np.where(kept, idx, 0)], -1, axis)
        kept = np.expand_dims(kept, axis).astype(dtype)
        picked = onehot * kept
        coef = (1.0 - smooth) * picked + (smooth / n_classes) * kept if smooth else picked
        if w is None:
            return axis, coef, float(picked.sum())
        return axis, ops.multiply(w, coef), ops.sum(ops.multiply(w, picked))
    if tshape != shape:
        raise ShapeError(f"{what}: target of shape {list(tshape)} does not fit logits of shape "
                         f"{list(shape)} (give class indices [N, d1, ...] as an int array or "
                         f"probabilities [N, C, d1, ...])")
    target = _constant_as(target, input)
    coef = ops.add(ops.multiply(target, 1.0 - smooth), smooth / n_classes) if smooth else target
    count = float(np.prod(positions, dtype=np.int64))
    return axis, (coef if w is None else ops.multiply(w, coef)), count


class _TracedClassIndices(NamedTuple):
    """Traced integer class indices of a loss (computed when log-probabilities exist)."""
    target: Tracer
    weight: object     # [C] float (traced or constant) or None
    ignore_index: int
    smooth: float

    def coefficients(self, logp, axis):
        """(coef, "mean" divisor) as for constant indices (_class_coefficients), as traced
        values: coef = w[c] * ((1 - s) * onehot + s / C) * kept, with the one-hot built by
        comparing the labels with the class numbers, so it fuses into the loss's loops and its
        gradient (a gather of logp[t] would add a gather and a scatter-add kernel). The labels are
        checked natively by the one gather that remains, of the class weights w[t] (ones without
        a weight): an index outside [0, C) that is not ignore_index raises IndexError naming the
        labels (negative ones too, as in PyTorch), without a pass over them in Python."""
        shape = _shape(logp)
        n_classes = shape[axis]
        dtype = logp.dtype
        t = self.target
        kept = ops.not_equal(t, self.ignore_index)
        safe = ops.where(kept, t, 0)       # ignored positions pick class 0, then weigh 0
        along = tuple(n_classes if i == axis else 1 for i in range(len(shape)))
        weight = np.ones(n_classes, dtype) if self.weight is None else self.weight
        w_t = ops.reshape(wrap(lax.gather(as_value(weight, result_dtype(logp)),
                                          ops.int_value(ops.reshape(safe, (-1,))), 0,
                                          negative="error", name=ops.index_name(t, "target"))),
                          _shape(safe))
        scale = ops.multiply(ops.astype(kept, dtype), w_t)       # w[t] at kept positions, else 0
        classes = np.arange(n_classes, dtype=DTYPES[t.value.dtype]).reshape(along)
        onehot = ops.astype(ops.equal(ops.expand_dims(safe, axis), classes), dtype)
        coef = ops.multiply(onehot, ops.expand_dims(scale, axis))
        if self.smooth:
            w_c = ops.reshape(weight, along)
            kept_w = ops.multiply(ops.expand_dims(ops.astype(kept, dtype), axis), w_c)
            coef = ops.add(ops.multiply(coef, 1.0 - self.smooth),
                           ops.multiply(kept_w, self.smooth / n_classes))
        return coef, ops.sum(scale)


def _weighted_nll(what, logp, axis, coef, count, reduction):
    if isinstance(coef, _TracedClassIndices):
        coef, count = coef.coefficients(logp, axis)
    per_position = ops.negative(ops.sum(ops.multiply(coef, logp), axis))
    if reduction == "mean":
        return ops.divide(ops.sum(per_position), count)
    return _reduce(per_position, reduction, what)


@op("cross_entropy")
def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0):
    """PyTorch's cross_entropy. input: logits [N, C, d1, ...] (the class axis is 1, as in
    PyTorch, also for N-d input) or [C]. target: class indices [N, d1, ...] ([] for [C] logits;
    int32/int64: traced, such as labels passed as an argument, or a numpy constant; an index
    outside [0, C) that is not ignore_index raises IndexError) or class probabilities of input's
    shape (e.g. one-hot, traced or not). weight: [C], a factor per class. label_smoothing s mixes the target with the uniform
    distribution: (1 - s) * target + s / C. Positions whose index is `ignore_index` add nothing.
    The loss at each position is -sum over classes of weight * target * log_softmax(input);
    "mean" divides their sum by the summed weight of the target classes of the positions not
    ignored (class indices) or by the number of positions (probabilities), as PyTorch does."""
    _check_reduction(reduction, "cross_entropy")
    axis, coef, count = _class_coefficients("cross_entropy", input, target, weight, ignore_index,
                                            label_smoothing)
    return _weighted_nll("cross_entropy", log_softmax(input, dim=axis), axis, coef, count,
                         reduction)


@op("nll_loss")
def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """PyTorch's nll_loss: cross_entropy of log-probabilities `input` ([N, C, d1, ...] or [C],
    e.g. from log_softmax(x, dim=1)) without the log_softmax: the loss at each position is
    -weight[t] * input[n, t, ...] for a class index t (int32/int64, traced or a numpy constant; positions
    whose index is `ignore_index` add nothing), or -sum over classes of weight * target * input
    for class probabilities of input's shape. "mean" is normalised as in cross_entropy."""
    _check_reduction(reduction, "nll_loss")
    axis, coef, count = _class_coefficients("nll_loss", input, target, weight, ignore_index, 0.0)
    return _weighted_nll("nll_loss", input, axis, coef, count, reduction)


@op("dropout")
def dropout(input, p=0.5, training=True, *, key=None):
    """PyTorch's dropout: in training, each element is zeroed with probability p and the others
    scaled by 1 / (1 - p); with training=False or p == 0 the input itself; with p == 1,
    input * 0 (zeros; NaN where the input is infinite or NaN, as PyTorch).

    The mask is `tracejit.random.uniform(key, input.shape) >= float32(p)` (float32 for float64
    inputs too, so a key gives one mask whatever the dtype; key: a tracejit.random key, required
    in training): the same key gives the same mask, in the native code and the interpreter
    alike. The gradient is that mask times 1 / (1 - p) times the cotangent."""
    from . import random as _random   # on first use: `import tracejit` does not load it
    p = _random.check_probability(p, "dropout")
    if not isinstance(training, (bool, np.bool_)):
        raise _error(TypeError, f"dropout: training must be a bool, got {training!r}")
    x = _float(input)
    if not training or p == 0.0:
        return x
    if key is None:
        raise _error(TypeError, "dropout: key is required when training (a uint32 array of "
                                "shape [2]: tracejit.random.key(seed), or a split of one)")
    u = wrap(_random.uniform01(key, _shape(x), "f32", "dropout"))
    if p == 1.0:
        return ops.multiply(x, 0.0)
    keep = ops.greater_equal(u, np.float32(p))
    return ops.where(keep, ops.multiply(x, 1.0 / (1.0 - p)), 0.0)


@op("mse_loss")
def mse_loss(input, target, reduction="mean"):
    if _shape(input) != _shape(target):
        raise ShapeError(f"mse_loss: input of shape {list(_shape(input))} and target of shape "
                         f"{list(_shape(target))} differ")
    _check_reduction(reduction, "mse_loss")
    return _reduce(ops.power(ops.subtract(input, target), 2), reduction, "mse_loss")


@op("binary_cross_entropy_with_logits")
def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean",
                                     pos_weight=None):
    """PyTorch's: -weight * (pos_weight * target * log_sigmoid(input)
    + (1 - target) * log_sigmoid(-input)) per element, computed as
    (1 - target) * input - (1 + (pos_weight - 1) * target) * log_sigmoid(input), which stays
    exact for logits of any size. target: input's shape, traced or not; weight: broadcasts to
    input's shape; pos_weight: broadcasts along the last (class) axis, e.g. [C] for [N, C]."""
    what = "binary_cross_entropy_with_logits"
    _check_reduction(reduction, what)
    shape = tuple(_shape(input))
    if tuple(_shape(target)) != shape:
        raise ShapeError(f"{what}: target of shape {list(_shape(target))} and input of shape "
                         f"{list(shape)} differ")
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None:
            try:
                fits = ops.broadcast_shapes(tuple(_shape(w)), shape) == shape
            except ShapeError:
                fits = False
            if not fits:
                raise ShapeError(f"{what}: {name} of shape {list(_shape(w))} does not broadcast "
                                 f"to input's shape {list(shape)}")
    x = _float(input)
    target, weight, pos_weight = (_constant_as(v, x) for v in (target, weight, pos_weight))
    log_p = log_sigmoid(x)
    if pos_weight is None:
        loss = ops.subtract(ops.multiply(ops.subtract(1.0, target), x), log_p)
    else:
        log_weight = ops.add(ops.multiply(ops.subtract(pos_weight, 1.0), target), 1.0)
        loss = ops.subtract(ops.multiply(ops.subtract(1.0, target), x),
                            ops.multiply(log_weight, log_p))
    if weight is not None:
        loss = ops.multiply(loss, weight)
    return _reduce(loss, reduction, what)


# ------------------------------------------------------------------------------------------------
# normalisation
# ------------------------------------------------------------------------------------------------
@op("layer_norm")
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """PyTorch's layer_norm: (x - mean) / sqrt(var + eps) * weight + bias, with the mean and the
    biased variance taken over the last len(normalized_shape) axes, which must equal
    normalized_shape (an int or a tuple); weight and bias have shape normalized_shape."""
    shape = tuple(_shape(input))
    norm = (normalized_shape,) if _is_int(normalized_shape) else \
        tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else None
    if norm is None or not norm or not all(_is_int(n) for n in norm) or \
            shape[len(shape) - len(norm):] != norm or len(norm) > len(shape):
        raise ShapeError(f"layer_norm: normalized_shape {normalized_shape!r} must be an int or a "
                         f"non-empty tuple of ints equal to the last axes of input's shape "
                         f"{list(shape)}")
    eps = _number(eps, "layer_norm", "eps")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(_shape(p)) != norm:
            raise ShapeError(f"layer_norm: {name} of shape {list(_shape(p))} must have "
                             f"normalized_shape {list(norm)}")
    axes = tuple(range(len(shape) - len(norm), len(shape)))
    x = _float(input)
    weight, bias = _constant_as(weight, x), _constant_as(bias, x)
    centred = ops.subtract(x, ops.mean(x, axes, keepdims=True))
    var = ops.mean(ops.multiply(centred, centred), axes, keepdims=True)
    y = ops.divide(centred, ops.sqrt(ops.add(var, eps)))
    if weight is not None:
        y = ops.multiply(y, weight)
    if bias is not None:
        y = ops.add(y, bias)
    return y


class BatchNormResult(NamedTuple):
    """What batch_norm returns in training mode when running statistics are given: the output
    and the UPDATED running statistics to carry into the next step (PyTorch updates them in place;
    tracejit returns them, as Flax returns the mutated batch_stats)."""
    output: object
    running_mean: object
    running_var: object


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """PyTorch's batch_norm over the channel axis 1 of input [N, C], [N, C, L] or [N, C, H, W]:
    (x - mean) / sqrt(var + eps) * weight + bias per channel, weight and bias of shape [C].

    training=False: mean and var are running_mean and running_var ([C], required); returns the
    output.
    training=True: mean and the biased var are the batch statistics over every axis but 1
    (N * L or N * H * W values per channel, at least 2). Without running statistics (both None)
    it returns the output. With them it returns BatchNormResult(output, running_mean,
    running_var) holding the UPDATED statistics, PyTorch's
        running_mean' = (1 - momentum) * running_mean + momentum * mean
        running_var'  = (1 - momentum) * running_var + momentum * var * n / (n - 1)
    (the unbiased variance, n values per channel). PyTorch updates the arrays in place; here
    they come back as values, as Flax returns its mutated batch_stats, so a training step must
    return them and pass them in at the next step: the result is a 3-tuple, so using it as the
    output by mistake fails loudly. The updated statistics carry no gradient (stop_gradient),
    as PyTorch updates them outside autograd. (Returned from a jitted function, the result comes
    back as a plain 3-tuple, like every tuple output.)"""
    out = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return BatchNormResult(*out) if isinstance(out, tuple) else out


@op("batch_norm")
def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    what = "batch_norm"
    shape = tuple(_shape(input))
    if len(shape) not in (2, 3, 4):
        raise ShapeError(f"{what}: input must be [N, C], [N, C, L] or [N, C, H, W], got shape "
                         f"{list(shape)}")
    if not isinstance(training, bool):
        raise _error(TypeError, f"{what}: training must be True or False, got {training!r}")
    if (running_mean is None) != (running_var is None):
        raise _error(ValueError, f"{what}: give both running_mean and running_var or neither")
    if not training and running_mean is None:
        raise _error(ValueError, f"{what}: training=False normalises with running_mean and "
                                 f"running_var, got None")
    momentum = _number(momentum, what, "momentum")
    eps = _number(eps, what, "eps")
    c = shape[1]
    for name, p in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if p is not None and tuple(_shape(p)) != (c,):
            raise ShapeError(f"{what}: {name} of shape {list(_shape(p))} must have shape [{c}] "
                             f"(one per channel of input of shape {list(shape)})")
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    running_mean, running_var, weight, bias = (_constant_as(v, input) for v in (
        running_mean, running_var, weight, bias))

    def channel(v):
        return ops.reshape(v, per_channel)

    axes = (0,) + tuple(range(2, len(shape)))
    x = _float(input)
    if training:
        n = int(np.prod([shape[a] for a in axes], dtype=np.int64))
        if n < 2:
            raise _error(ValueError, f"{what}: training needs more than 1 value per channel, "
                                     f"got input of shape {list(shape)}")
        mean = ops.mean(x, axes, keepdims=True)
        centred = ops.subtract(x, mean)
        var = ops.mean(ops.multiply(centred, centred), axes, keepdims=True)
    else:
        mean, var = channel(running_mean), channel(running_var)
        centred = ops.subtract(x, mean)
    y = ops.divide(centred, ops.sqrt(ops.add(var, eps)))
    if weight is not None:
        y = ops.multiply(y, channel(weight))
    if bias is not None:
        y = ops.add(y, channel(bias))
    if not training or running_mean is None:
        return y
    batch_mean = ops.stop_gradient(ops.reshape(mean, (c,)))
    batch_var = ops.stop_gradient(ops.reshape(var, (c,)))
    new_mean = ops.add(ops.multiply(running_mean, 1.0 - momentum),
                       ops.multiply(batch_mean, momentum))
    new_var = ops.add(ops.multiply(running_var, 1.0 - momentum),
                      ops.multiply(batch_var, momentum * n / (n - 1)))
    return y, new_mean, new_var

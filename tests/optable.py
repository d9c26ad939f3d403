"""The per-op table, as data: every public op of tracejit and tracejit.nn (functions, operators,
method forms, indexing) with an independent numpy reference and the inputs to check it on.

`CASES` is a flat list of `OpCase`; `helpers.check_op(case, backend, dtype)` and the finer
`helpers.check_*` functions run one case on one backend. The references below are written directly
in numpy (direct loops over kernel taps for convolution and pooling) and never call tracejit or the
IR interpreter, so they are an oracle for both.

Inputs keep finite differences away from kinks: `Arg.avoid` keeps values away from points such as
0 for relu/abs, and `Arg.distinct` draws all such inputs of a case from one grid with spacing at
least 4/n, so maxima, pooling windows and maximum/minimum never tie.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import tracejit as tj
from tracejit import nn


# ------------------------------------------------------------------------------------------------
# table entries
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    """One array argument: its shape and how its values are drawn."""
    shape: tuple
    lo: float = -2.0
    hi: float = 2.0
    distinct: bool = False   # drawn from a grid shared by all distinct args of the case
    avoid: tuple = ()        # keep every value at least 0.1 away from these points

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))


def pos(shape):
    return Arg(shape, lo=0.5, hi=2.0)


def nonzero(shape):
    return Arg(shape, avoid=(0.0,))


def distinct(shape, lo=-2.0, hi=2.0):
    return Arg(shape, lo=lo, hi=hi, distinct=True)


@dataclass(frozen=True, eq=False)
class OpCase:
    op: str                  # public op covered: "tanh", "nn.conv2d", "operator.+", "method.sum"
    id: str                  # the pytest id (unique)
    fn: Callable             # tracejit code: fn(*arrays)
    ref: Callable            # independent numpy reference: ref(*float64 arrays)
    inputs: tuple            # one Arg per array argument
    grad: bool = True        # False for bool-valued ops (and stop_gradient, tested apart)
    second_order: bool = True

    def make_inputs(self, rng: np.random.Generator) -> list[np.ndarray]:
        n_distinct = sum(a.size for a in self.inputs if a.distinct)
        grid = iter(rng.permutation(n_distinct) + 0.5) if n_distinct else None
        out = []
        for a in self.inputs:
            if a.distinct:
                steps = np.array([next(grid) for _ in range(a.size)])
                x = a.lo + (a.hi - a.lo) * steps / n_distinct
            else:
                x = rng.uniform(a.lo, a.hi, size=a.size)
                for p in a.avoid:
                    near = np.abs(x - p) < 0.1
                    x[near] = p + np.where(x[near] >= p, 0.1, -0.1) + 0.2 * (x[near] - p)
            out.append(x.reshape(a.shape).astype(np.float64))
        return out


def case_id(case: OpCase) -> str:
    return case.id


def _sid(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


# ------------------------------------------------------------------------------------------------
# numpy references (float64)
# ------------------------------------------------------------------------------------------------
def _tuple(v, n):
    return (v,) * n if np.isscalar(v) else tuple(v)


def ref_conv(x, w, b=None, stride=1, padding=0):
    """PyTorch conv1d/conv2d (cross-correlation), any number of spatial dims, unbatched allowed,
    padding ints, "valid" or "same": out[n, o, p] = sum over c and taps k of xpad[n, c, p * stride + k] * w[o, c, k]."""
    nsp = w.ndim - 2
    unbatched = x.ndim == nsp + 1
    x = x[None] if unbatched else x
    k = w.shape[2:]
    s = _tuple(stride, nsp)
    if padding == "same":    # PyTorch: k - 1 in total, the odd element on the right/bottom
        pads = [((kk - 1) // 2, kk - 1 - (kk - 1) // 2) for kk in k]
    else:
        pads = [(q, q) for q in _tuple(0 if padding == "valid" else padding, nsp)]
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    outsp = [(n - kk) // ss + 1 for n, kk, ss in zip(xp.shape[2:], k, s)]
    out = np.zeros((x.shape[0], w.shape[0], *outsp))
    for tap in itertools.product(*map(range, k)):
        window = xp[(slice(None), slice(None)) + tuple(
            slice(t, t + ss * (o - 1) + 1, ss) for t, ss, o in zip(tap, s, outsp))]
        # window [N, C, *out], w[:, :, tap] [O, C]
        out += np.moveaxis(np.tensordot(window, w[(slice(None), slice(None)) + tap],
                                        axes=([1], [1])), -1, 1)
    if b is not None:
        out += b.reshape((1, -1) + (1,) * nsp)
    return out[0] if unbatched else out


def ref_pool(x, kernel, stride=None, padding=0, nsp=2, mode="max"):
    """PyTorch max/avg pooling over the last `nsp` dims; avg counts the zero padding."""
    unbatched = x.ndim == nsp + 1
    x = x[None] if unbatched else x
    k = _tuple(kernel, nsp)
    s = k if stride is None else _tuple(stride, nsp)
    p = _tuple(padding, nsp)
    fill = -np.inf if mode == "max" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in p], constant_values=fill)
    outsp = [(n - kk) // ss + 1 for n, kk, ss in zip(xp.shape[2:], k, s)]
    taps = []
    for tap in itertools.product(*map(range, k)):
        taps.append(xp[(slice(None), slice(None)) + tuple(
            slice(t, t + ss * (o - 1) + 1, ss) for t, ss, o in zip(tap, s, outsp))])
    out = np.max(taps, axis=0) if mode == "max" else np.sum(taps, axis=0) / np.prod(k)
    return out[0] if unbatched else out


def ref_log_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def ref_softmax(x, axis=-1):
    return np.exp(ref_log_softmax(x, axis))


def _reduce(loss, reduction):
    return {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction](loss)


def ref_cross_entropy(logits, target, reduction="mean"):
    """PyTorch's: the class axis of [N, C, d1, ...] logits is 1 (0 for [C])."""
    axis = 1 if logits.ndim > 1 else 0
    logp = ref_log_softmax(logits, axis)
    if np.asarray(target).dtype.kind in "iu":
        picked = np.take_along_axis(logp, np.expand_dims(target, axis), axis)
        return _reduce(-np.squeeze(picked, axis), reduction)
    return _reduce(-np.sum(target * logp, axis=axis), reduction)


def ref_mse(x, t, reduction="mean"):
    return _reduce((x - t) ** 2, reduction)


def ref_linear(x, w, b=None):
    y = np.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def ref_relu(x):
    return np.where(x <= 0, 0.0, x)   # NaN stays NaN, like numpy's maximum(x, 0)


def ref_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_logsumexp(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def ref_norm(x, ord=None, axis=None, keepdims=False):
    """numpy.linalg.norm's meaning (an ord of a 2-d value with axis=None is a matrix norm)."""
    if ord is None:   # any rank, as numpy's ord=None
        return np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))
    return np.linalg.norm(x, ord, axis, keepdims)


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
CASES: list[OpCase] = []


def add(op, id, fn, ref, *inputs, **flags):
    CASES.append(OpCase(op, id, fn, ref, tuple(inputs), **flags))


UNARY_SHAPES = ((2, 3), (1,), ())


def unary(op, fn, ref, arg=Arg, shapes=UNARY_SHAPES):
    for s in shapes:
        add(op, f"{op}-{_sid(s)}", fn, ref, arg(s))


# elementwise functions --------------------------------------------------------------------------
unary("tanh", tj.tanh, np.tanh)
unary("exp", tj.exp, np.exp)
unary("log", tj.log, np.log, pos)
unary("sqrt", tj.sqrt, np.sqrt, pos)
unary("abs", tj.abs, np.abs, nonzero)
unary("sin", tj.sin, np.sin)
unary("cos", tj.cos, np.cos)
unary("negative", tj.negative, np.negative)
unary("square", tj.square, np.square)
unary("sign", tj.sign, np.sign, nonzero)
unary("nn.relu", nn.relu, ref_relu, nonzero)
unary("nn.sigmoid", nn.sigmoid, ref_sigmoid)
unary("nn.tanh", nn.tanh, np.tanh, shapes=((4,),))
add("clip", "clip-2x3", lambda x: tj.clip(x, -0.5, 0.7), lambda x: np.clip(x, -0.5, 0.7),
    Arg((4, 5), avoid=(-0.5, 0.7)))
add("clip", "clip-lo-only", lambda x: tj.clip(x, 0.2), lambda x: np.maximum(x, 0.2),
    Arg((6,), avoid=(0.2,)))
add("stop_gradient", "stop_gradient-2x3", tj.stop_gradient, lambda x: x, Arg((2, 3)), grad=False)

# binary functions, with numpy broadcasting ------------------------------------------------------
BINARY_SHAPES = (((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1), (1, 3)), ((), (2, 3)), ((1,), (1,)),
                 ((2, 1, 3), (4, 1)))


def binary(op, fn, ref, arg_a=Arg, arg_b=Arg, shapes=BINARY_SHAPES):
    for sa, sb in shapes:
        add(op, f"{op}-{_sid(sa)}+{_sid(sb)}", fn, ref, arg_a(sa), arg_b(sb))


binary("add", tj.add, np.add)
binary("subtract", tj.subtract, np.subtract)
binary("multiply", tj.multiply, np.multiply)
binary("divide", tj.divide, np.divide, arg_b=pos)
binary("power", tj.power, np.power, arg_a=pos, shapes=BINARY_SHAPES[:3])
binary("maximum", tj.maximum, np.maximum, distinct, distinct)
binary("minimum", tj.minimum, np.minimum, distinct, distinct)

# operators ---------------------------------------------------------------------------------------
binary("operator.+", lambda a, b: a + b, np.add, shapes=BINARY_SHAPES[:2])
binary("operator.-", lambda a, b: a - b, np.subtract, shapes=BINARY_SHAPES[:3])
binary("operator.*", lambda a, b: a * b, np.multiply, shapes=BINARY_SHAPES[1:4])
binary("operator./", lambda a, b: a / b, np.divide, arg_b=pos, shapes=BINARY_SHAPES[:2])
binary("operator.**", lambda a, b: a ** b, np.power, arg_a=pos, shapes=BINARY_SHAPES[:2])
add("operator.+", "radd-python-scalar", lambda x: 2.5 + x, lambda x: 2.5 + x, Arg((3,)))
add("operator.-", "rsub-python-scalar", lambda x: 1 - x, lambda x: 1 - x, Arg((3,)))
add("operator.*", "mul-python-scalar", lambda x: x * 3, lambda x: x * 3, Arg((2, 2)))
add("operator./", "rdiv-python-scalar", lambda x: 2.0 / x, lambda x: 2.0 / x, pos((3,)))
add("operator./", "div-python-scalar", lambda x: x / 4, lambda x: x / 4, Arg((3,)))
add("operator.**", "pow-int-3", lambda x: x ** 3, lambda x: x ** 3, Arg((2, 3)))
add("operator.**", "pow-int-neg2", lambda x: x ** -2, lambda x: x ** -2.0, pos((4,)))
add("operator.**", "pow-int-0", lambda x: x ** 0, lambda x: x ** 0, Arg((3,)))
add("operator.**", "pow-float-2.5", lambda x: x ** 2.5, lambda x: x ** 2.5, pos((2, 3)))
add("operator.**", "rpow-python-base", lambda x: 2.0 ** x, lambda x: 2.0 ** x, Arg((3,)))
add("operator.-x", "neg-2x3", lambda x: -x, np.negative, Arg((2, 3)))
add("operator.-x", "neg-scalar", lambda x: -x, np.negative, Arg(()))
add("operator.+", "numpy-array-operand", lambda x: np.array([1.0, -2.0, 0.5]) + x,
    lambda x: np.array([1.0, -2.0, 0.5]) + x, Arg((2, 3)))
add("operator.*", "numpy-left-operand", lambda x: np.full((2, 3), 0.5) * x,
    lambda x: 0.5 * x, Arg((2, 3)))

# comparisons and logic: forward only (bool results); their gradient use is `where` ---------------
COMPARISONS = [
    ("greater", tj.greater, np.greater), ("greater_equal", tj.greater_equal, np.greater_equal),
    ("less", tj.less, np.less), ("less_equal", tj.less_equal, np.less_equal),
    ("operator.>", lambda a, b: a > b, np.greater),
    ("operator.>=", lambda a, b: a >= b, np.greater_equal),
    ("operator.<", lambda a, b: a < b, np.less),
    ("operator.<=", lambda a, b: a <= b, np.less_equal),
]
for _name, _fn, _ref in COMPARISONS:
    add(_name, f"{_name}-2x3+3", _fn, _ref, Arg((2, 3)), Arg((3,)), grad=False)
# equality needs equal elements: compare x with relu(x) (equal where x > 0)
for _name, _fn, _ref in [("equal", tj.equal, np.equal), ("not_equal", tj.not_equal, np.not_equal),
                         ("operator.==", lambda a, b: a == b, np.equal),
                         ("operator.!=", lambda a, b: a != b, np.not_equal)]:
    add(_name, f"{_name}-x-relu(x)", lambda x, f=_fn: f(x, nn.relu(x)),
        lambda x, r=_ref: r(x, ref_relu(x)), nonzero((3, 4)), grad=False)
for _name, _fn, _ref in [("logical_and", tj.logical_and, np.logical_and),
                         ("logical_or", tj.logical_or, np.logical_or),
                         ("operator.&", lambda a, b: a & b, np.logical_and),
                         ("operator.|", lambda a, b: a | b, np.logical_or)]:
    add(_name, f"{_name}-masks", lambda a, b, f=_fn: f(a > 0, b < 0.5),
        lambda a, b, r=_ref: r(a > 0, b < 0.5), nonzero((2, 5)), Arg((5,), avoid=(0.5,)),
        grad=False)
add("logical_not", "logical_not-mask", lambda x: tj.logical_not(x > 0), lambda x: ~(x > 0),
    nonzero((2, 3)), grad=False)
add("operator.~", "invert-mask", lambda x: ~(x > 0), lambda x: ~(x > 0), nonzero((2, 3)),
    grad=False)

# where ------------------------------------------------------------------------------------------
add("where", "where-a>b", lambda a, b: tj.where(a > b, a, b), lambda a, b: np.where(a > b, a, b),
    distinct((3, 4)), distinct((3, 4)))
add("where", "where-broadcast-cond", lambda a, b: tj.where(a > 0, b, a * b),
    lambda a, b: np.where(a > 0, b, a * b), nonzero((4,)), Arg((3, 4)))
add("where", "where-const-cond-scalar-branch",
    lambda a, b: tj.where(np.array([True, False, True]), a, b),
    lambda a, b: np.where(np.array([True, False, True]), a, b), Arg((2, 3)), Arg(()))
add("where", "where-python-scalar", lambda x: tj.where(x > 0, x, 0.5 * x),
    lambda x: np.where(x > 0, x, 0.5 * x), nonzero((5,)))

# reductions -------------------------------------------------------------------------------------
for _axis, _keep in [(None, False), (0, False), (1, False), (-1, True), ((0, 2), False),
                     ((0, 2), True)]:
    _kid = f"axis{_axis}{'-keepdims' if _keep else ''}".replace(" ", "")
    add("sum", f"sum-{_kid}", lambda x, a=_axis, k=_keep: tj.sum(x, a, keepdims=k),
        lambda x, a=_axis, k=_keep: np.sum(x, axis=a, keepdims=k), Arg((2, 3, 4)))
    add("mean", f"mean-{_kid}", lambda x, a=_axis, k=_keep: tj.mean(x, a, keepdims=k),
        lambda x, a=_axis, k=_keep: np.mean(x, axis=a, keepdims=k), Arg((2, 3, 4)))
    add("max", f"max-{_kid}", lambda x, a=_axis, k=_keep: tj.max(x, a, keepdims=k),
        lambda x, a=_axis, k=_keep: np.max(x, axis=a, keepdims=k), distinct((2, 3, 4)))
for _axis in (None, 1):
    add("min", f"min-axis{_axis}", lambda x, a=_axis: tj.min(x, a),
        lambda x, a=_axis: np.min(x, axis=a), distinct((3, 4)))
    add("var", f"var-axis{_axis}", lambda x, a=_axis: tj.var(x, a),
        lambda x, a=_axis: np.var(x, axis=a), Arg((3, 4)))
    add("std", f"std-axis{_axis}", lambda x, a=_axis: tj.std(x, a),
        lambda x, a=_axis: np.std(x, axis=a), Arg((3, 4)))
    add("logsumexp", f"logsumexp-axis{_axis}", lambda x, a=_axis: tj.logsumexp(x, a),
        lambda x, a=_axis: ref_logsumexp(x, a), Arg((3, 4)))
add("logsumexp", "logsumexp-keepdims", lambda x: tj.logsumexp(x, 0, keepdims=True),
    lambda x: ref_logsumexp(x, 0, keepdims=True), Arg((3, 4)))
for _shape in ((1,), ()):
    add("sum", f"sum-{_sid(_shape)}", tj.sum, np.sum, Arg(_shape))
    add("max", f"max-{_sid(_shape)}", tj.max, np.max, Arg(_shape))
add("mean", "mean-1x1", tj.mean, np.mean, Arg((1, 1)))
add("std", "std-size-1-axis", lambda x: tj.std(x, 0), lambda x: np.std(x, axis=0), Arg((1, 4)))
add("std", "std-0d", tj.std, np.std, Arg(()))
add("norm", "norm-vector", tj.norm, ref_norm, Arg((5,)))
add("norm", "norm-frobenius", tj.norm, ref_norm, Arg((3, 4)))
add("norm", "norm-axis1-keepdims", lambda x: tj.norm(x, axis=1, keepdims=True),
    lambda x: ref_norm(x, axis=1, keepdims=True), Arg((3, 4)))
add("norm", "norm-ord1", lambda x: tj.norm(x, 1), lambda x: ref_norm(x, 1), nonzero((5,)))
add("norm", "norm-ordinf", lambda x: tj.norm(x, np.inf), lambda x: ref_norm(x, np.inf),
    distinct((5,), lo=0.5))
add("norm", "norm-1-element", tj.norm, ref_norm, nonzero((1,)))

# linear algebra ---------------------------------------------------------------------------------
MATMUL_SHAPES = (((3, 4), (4, 2)), ((4,), (4,)), ((3, 4), (4,)), ((4,), (4, 2)),
                 ((2, 3, 4), (4, 5)), ((1, 1), (1, 1)))
for _sa, _sb in MATMUL_SHAPES:
    add("matmul", f"matmul-{_sid(_sa)}@{_sid(_sb)}", tj.matmul, np.matmul, Arg(_sa), Arg(_sb))
for _sa, _sb in MATMUL_SHAPES[:3]:
    add("operator.@", f"@-{_sid(_sa)}@{_sid(_sb)}", lambda a, b: a @ b, np.matmul, Arg(_sa),
        Arg(_sb))
add("operator.@", "@-numpy-left", lambda b: np.ones((2, 3)) @ b, lambda b: np.ones((2, 3)) @ b,
    Arg((3, 2)))
for _sa, _sb in (((4,), (4,)), ((3, 4), (4,)), ((3, 4), (4, 2)), ((), (3,))):
    add("dot", f"dot-{_sid(_sa)}.{_sid(_sb)}", tj.dot, np.dot, Arg(_sa), Arg(_sb))
add("mv", "mv-3x4.4", tj.mv, np.matmul, Arg((3, 4)), Arg((4,)))
add("mm", "mm-3x4.4x2", tj.mm, np.matmul, Arg((3, 4)), Arg((4, 2)))
add("outer", "outer-3.4", tj.outer, np.outer, Arg((3,)), Arg((4,)))

# layout -----------------------------------------------------------------------------------------
add("reshape", "reshape-2x6-to-3x4", lambda x: tj.reshape(x, (3, 4)),
    lambda x: x.reshape(3, 4), Arg((2, 6)))
add("reshape", "reshape-minus1", lambda x: tj.reshape(x, (-1, 2)),
    lambda x: x.reshape(-1, 2), Arg((2, 3, 2)))
add("reshape", "reshape-scalar-to-1x1", lambda x: tj.reshape(x, (1, 1)),
    lambda x: x.reshape(1, 1), Arg(()))
add("transpose", "transpose-default", tj.transpose, np.transpose, Arg((2, 3, 4)))
add("transpose", "transpose-axes", lambda x: tj.transpose(x, (1, 2, 0)),
    lambda x: np.transpose(x, (1, 2, 0)), Arg((2, 3, 4)))
add("swapaxes", "swapaxes-0-2", lambda x: tj.swapaxes(x, 0, 2), lambda x: np.swapaxes(x, 0, 2),
    Arg((2, 3, 4)))
add("squeeze", "squeeze-all", tj.squeeze, np.squeeze, Arg((1, 3, 1)))
add("squeeze", "squeeze-axis", lambda x: tj.squeeze(x, 0), lambda x: np.squeeze(x, 0),
    Arg((1, 3, 1)))
add("expand_dims", "expand_dims-1", lambda x: tj.expand_dims(x, 1),
    lambda x: np.expand_dims(x, 1), Arg((2, 3)))
add("expand_dims", "expand_dims-minus1", lambda x: tj.expand_dims(x, -1),
    lambda x: np.expand_dims(x, -1), Arg((2, 3)))
add("concatenate", "concatenate-axis0", lambda a, b: tj.concatenate([a, b]),
    lambda a, b: np.concatenate([a, b]), Arg((2, 3)), Arg((1, 3)))
add("concatenate", "concatenate-axis1-three", lambda a, b, c: tj.concatenate((a, b, c), axis=1),
    lambda a, b, c: np.concatenate((a, b, c), axis=1), Arg((2, 1)), Arg((2, 3)), Arg((2, 2)))
add("concatenate", "concatenate-axis-minus1-reused", lambda a: tj.concatenate([a, a * a], -1),
    lambda a: np.concatenate([a, a * a], -1), Arg((2, 3)))
add("stack", "stack-axis0", lambda a, b: tj.stack([a, b]), lambda a, b: np.stack([a, b]),
    Arg((3,)), Arg((3,)))
add("stack", "stack-axis1", lambda a, b: tj.stack([a, b], axis=1),
    lambda a, b: np.stack([a, b], axis=1), Arg((2, 3)), Arg((2, 3)))
add("nn.flatten", "flatten-default", nn.flatten, lambda x: x.reshape(x.shape[0], -1),
    Arg((2, 3, 2, 2)))
add("nn.flatten", "flatten-start0", lambda x: nn.flatten(x, 0), lambda x: x.reshape(-1),
    Arg((2, 3)))

# indexing and slicing ---------------------------------------------------------------------------
INDEXES = [
    ("int", lambda x: x[1]), ("negative-int", lambda x: x[-1]),
    ("column", lambda x: x[:, 0]), ("slice", lambda x: x[1:3]),
    ("step", lambda x: x[::2]), ("2d-slices", lambda x: x[0:3:2, 1:]),
    ("ellipsis", lambda x: x[..., 2]), ("newaxis", lambda x: x[None, :, 1]),
    ("int-int", lambda x: x[2, 1]), ("empty-tail", lambda x: x[1:, 3:]),
]
for _name, _ix in INDEXES:
    add("getitem", f"getitem-{_name}", _ix, _ix, Arg((4, 4)))
add("getitem", "getitem-3d-mixed", lambda x: x[1, ::2, 1:3], lambda x: x[1, ::2, 1:3],
    Arg((2, 5, 4)))
add("getitem", "getitem-reused", lambda x: x[0] * x[1] + x[:, 0],
    lambda x: x[0] * x[1] + x[:, 0], Arg((3, 3)))

# gathers: integer index arrays (numpy constants here; traced ones in tests/test_gather.py), with
# repeated and negative indices, so the adjoint scatter-adds several cotangents into one element
TAKE_IDX = np.array([[3, 0, 3], [1, 1, -1], [-4, 2, 0]])
EMBED_IDS = np.array([[4, 0, 4], [2, 2, 1]])
add("take_along_axis", "take_along_axis-last-repeated-negative",
    lambda x: tj.take_along_axis(x, TAKE_IDX, 1), lambda x: np.take_along_axis(x, TAKE_IDX, 1),
    Arg((3, 4)))
add("take_along_axis", "take_along_axis-axis0-broadcast",
    lambda x: tj.take_along_axis(x, TAKE_IDX[:1].T, 0),
    lambda x: np.take_along_axis(x, TAKE_IDX[:1].T, 0), Arg((4, 2)))
add("take_along_axis", "take_along_axis-3d-middle",
    lambda x: tj.take_along_axis(x, TAKE_IDX[:2, :, None] % 3, 1),
    lambda x: np.take_along_axis(x, TAKE_IDX[:2, :, None] % 3, 1), Arg((2, 3, 2)))
add("nn.embedding", "embedding-repeated-ids", lambda w: nn.embedding(EMBED_IDS, w),
    lambda w: w[EMBED_IDS], Arg((5, 3)))
INT_INDEXES = [
    ("rows", lambda x: x[np.array([2, 0, 2, -1])]),
    ("columns-2d", lambda x: x[:, np.array([[1, 1], [3, 0]])]),
    ("arange-labels", lambda x: x[np.arange(4), np.array([1, 3, 3, 0])]),
    ("pairs", lambda x: x[np.array([0, 3, 0]), np.array([2, 2, 1])]),
    ("list", lambda x: x[[1, 1, 3]]),
]
for _name, _ix in INT_INDEXES:
    add("getitem", f"getitem-int-array-{_name}", _ix, _ix, Arg((4, 4)))

# method forms -----------------------------------------------------------------------------------
METHODS = [
    ("method.T", "T-2d", lambda x: x.T, lambda x: x.T, Arg((2, 3))),
    ("method.T", "T-3d", lambda x: x.T, lambda x: x.T, Arg((2, 3, 4))),
    ("method.sum", "sum-axis0", lambda x: x.sum(0), lambda x: x.sum(0), Arg((3, 4))),
    ("method.mean", "mean-keepdims", lambda x: x.mean(1, keepdims=True),
     lambda x: x.mean(1, keepdims=True), Arg((3, 4))),
    ("method.max", "max-all", lambda x: x.max(), lambda x: x.max(), distinct((3, 4))),
    ("method.min", "min-axis1", lambda x: x.min(1), lambda x: x.min(1), distinct((3, 4))),
    ("method.reshape", "reshape-args", lambda x: x.reshape(4, 3), lambda x: x.reshape(4, 3),
     Arg((3, 4))),
    ("method.reshape", "reshape-tuple", lambda x: x.reshape((2, -1)),
     lambda x: x.reshape((2, -1)), Arg((3, 4))),
    ("method.transpose", "transpose-none", lambda x: x.transpose(), lambda x: x.transpose(),
     Arg((3, 4))),
    ("method.transpose", "transpose-axes", lambda x: x.transpose(2, 0, 1),
     lambda x: x.transpose(2, 0, 1), Arg((2, 3, 4))),
    ("method.pow", "pow-2", lambda x: x.pow(2), lambda x: x ** 2, Arg((3,))),
    ("method.pow", "pow-0.5", lambda x: x.pow(0.5), np.sqrt, pos((3,))),
    ("method.exp", "exp", lambda x: x.exp(), np.exp, Arg((3,))),
    ("method.log", "log", lambda x: x.log(), np.log, pos((3,))),
    ("method.tanh", "tanh", lambda x: x.tanh(), np.tanh, Arg((3,))),
    ("method.sqrt", "sqrt", lambda x: x.sqrt(), np.sqrt, pos((3,))),
    ("method.abs", "abs", lambda x: x.abs(), np.abs, nonzero((3,))),
    ("method.sin", "sin", lambda x: x.sin(), np.sin, Arg((3,))),
    ("method.cos", "cos", lambda x: x.cos(), np.cos, Arg((3,))),
    ("method.relu", "relu", lambda x: x.relu(), ref_relu, nonzero((3,))),
    ("method.sigmoid", "sigmoid", lambda x: x.sigmoid(), ref_sigmoid, Arg((3,))),
    ("method.norm", "norm", lambda x: x.norm(), ref_norm, Arg((4,))),
    ("method.norm", "norm-axis0", lambda x: x.norm(axis=0), lambda x: ref_norm(x, axis=0),
     Arg((3, 2))),
    ("method.dot", "dot", lambda a, b: a.dot(b), np.dot, Arg((4,)), Arg((4,))),
    ("method.mv", "mv", lambda m, v: m.mv(v), np.matmul, Arg((3, 4)), Arg((4,))),
    ("method.mm", "mm", lambda a, b: a.mm(b), np.matmul, Arg((3, 4)), Arg((4, 2))),
    ("method.var", "var", lambda x: x.var(0), lambda x: x.var(0), Arg((3, 4))),
    ("method.std", "std", lambda x: x.std(), lambda x: x.std(), Arg((3, 4))),
    ("method.clip", "clip", lambda x: x.clip(-1.0, 1.0), lambda x: np.clip(x, -1.0, 1.0),
     Arg((5,), avoid=(-1.0, 1.0))),
    ("method.flatten", "flatten", lambda x: x.flatten(), lambda x: x.flatten(), Arg((2, 3))),
    ("method.squeeze", "squeeze", lambda x: x.squeeze(), lambda x: x.squeeze(), Arg((2, 1))),
    ("method.astype", "astype-round-trip", lambda x: (x.astype(np.float64) * 2.0).astype(x.dtype),
     lambda x: 2.0 * x, Arg((2, 3))),
]
for _op, _id, _fn, _ref, *_args in METHODS:
    add(_op, f"method-{_id}", _fn, _ref, *_args)

# nn: dense layers -------------------------------------------------------------------------------
add("nn.linear", "linear-bias", nn.linear, ref_linear, Arg((4, 5)), Arg((3, 5)), Arg((3,)))
add("nn.linear", "linear-no-bias", nn.linear, ref_linear, Arg((4, 5)), Arg((3, 5)))
add("nn.linear", "linear-3d-input", nn.linear, ref_linear, Arg((2, 4, 5)), Arg((3, 5)),
    Arg((3,)))
add("nn.linear", "linear-1-element", nn.linear, ref_linear, Arg((1, 1)), Arg((1, 1)), Arg((1,)))
add("nn.linear", "linear-vector-input", nn.linear, ref_linear, Arg((5,)), Arg((2, 5)))


# nn: convolution --------------------------------------------------------------------------------
def conv(op, id, tj_fn, x, w, bias=False, **kw):
    if bias:
        add(op, id, lambda x, w, b: tj_fn(x, w, b, **kw), lambda x, w, b: ref_conv(x, w, b, **kw),
            Arg(x), Arg(w), Arg((w[0],)))
    else:
        add(op, id, lambda x, w: tj_fn(x, w, **kw), lambda x, w: ref_conv(x, w, **kw),
            Arg(x), Arg(w))


conv("nn.conv1d", "conv1d-plain", nn.conv1d, (2, 3, 9), (4, 3, 3))
conv("nn.conv1d", "conv1d-stride2", nn.conv1d, (2, 3, 9), (4, 3, 3), stride=2)
conv("nn.conv1d", "conv1d-pad1", nn.conv1d, (2, 3, 9), (4, 3, 3), padding=1)
conv("nn.conv1d", "conv1d-stride3-pad2-bias", nn.conv1d, (2, 2, 10), (3, 2, 4), bias=True,
     stride=3, padding=2)
conv("nn.conv1d", "conv1d-unbatched", nn.conv1d, (3, 7), (2, 3, 2))
conv("nn.conv1d", "conv1d-1-element", nn.conv1d, (1, 1, 1), (1, 1, 1))
conv("nn.conv1d", "conv1d-same-even-kernel", nn.conv1d, (2, 3, 7), (2, 3, 4), bias=True,
     padding="same")
conv("nn.conv1d", "conv1d-valid-stride2", nn.conv1d, (1, 2, 8), (2, 2, 3), stride=2,
     padding="valid")
conv("nn.conv2d", "conv2d-plain", nn.conv2d, (2, 3, 6, 6), (4, 3, 3, 3))
conv("nn.conv2d", "conv2d-same-odd-kernel", nn.conv2d, (2, 2, 5, 4), (3, 2, 3, 3), padding="same")
conv("nn.conv2d", "conv2d-same-even-kernel", nn.conv2d, (1, 2, 5, 5), (3, 2, 2, 4), bias=True,
     padding="same")
conv("nn.conv2d", "conv2d-valid", nn.conv2d, (1, 2, 5, 5), (2, 2, 3, 2), padding="valid")
conv("nn.conv2d", "conv2d-stride2-pad1", nn.conv2d, (2, 3, 7, 7), (4, 3, 3, 3), stride=2,
     padding=1)
conv("nn.conv2d", "conv2d-stride21-pad01-bias", nn.conv2d, (1, 2, 6, 5), (3, 2, 2, 3), bias=True,
     stride=(2, 1), padding=(0, 1))
conv("nn.conv2d", "conv2d-unbatched-bias", nn.conv2d, (2, 5, 5), (3, 2, 3, 3), bias=True)
conv("nn.conv2d", "conv2d-1x1-kernel", nn.conv2d, (2, 3, 4, 4), (5, 3, 1, 1))
conv("nn.conv2d", "conv2d-kernel-covers-input", nn.conv2d, (2, 2, 3, 3), (3, 2, 3, 3))
conv("nn.conv2d", "conv2d-1-element", nn.conv2d, (1, 1, 1, 1), (1, 1, 1, 1))
conv("nn.conv2d", "conv2d-pad-exceeds-stride", nn.conv2d, (1, 1, 4, 4), (2, 1, 2, 2), stride=3,
     padding=2)


# nn: pooling ------------------------------------------------------------------------------------
def pool(op, id, tj_fn, nsp, mode, shape, *args, **kw):
    arg = distinct(shape) if mode == "max" else Arg(shape)
    add(op, id, lambda x: tj_fn(x, *args, **kw),
        lambda x: ref_pool(x, *args, nsp=nsp, mode=mode, **kw), arg)


pool("nn.max_pool2d", "max_pool2d-k2", nn.max_pool2d, 2, "max", (2, 3, 4, 4), 2)
pool("nn.max_pool2d", "max_pool2d-k3-s2-p1", nn.max_pool2d, 2, "max", (2, 2, 7, 7), 3, 2, 1)
pool("nn.max_pool2d", "max_pool2d-overlapping-k3-s1", nn.max_pool2d, 2, "max", (1, 2, 5, 5), 3, 1)
pool("nn.max_pool2d", "max_pool2d-k23-s12", nn.max_pool2d, 2, "max", (1, 2, 5, 7), (2, 3), (1, 2))
pool("nn.max_pool2d", "max_pool2d-unbatched-remainder", nn.max_pool2d, 2, "max", (2, 5, 5), 2)
pool("nn.max_pool2d", "max_pool2d-1-element", nn.max_pool2d, 2, "max", (1, 1, 1, 1), 1)
pool("nn.max_pool1d", "max_pool1d-k2", nn.max_pool1d, 1, "max", (2, 3, 8), 2)
pool("nn.max_pool1d", "max_pool1d-k3-s2-p1", nn.max_pool1d, 1, "max", (2, 2, 9), 3, 2, 1)
pool("nn.max_pool1d", "max_pool1d-unbatched", nn.max_pool1d, 1, "max", (3, 6), 3)
pool("nn.avg_pool2d", "avg_pool2d-k2", nn.avg_pool2d, 2, "avg", (2, 3, 4, 4), 2)
pool("nn.avg_pool2d", "avg_pool2d-k3-s2-p1", nn.avg_pool2d, 2, "avg", (2, 2, 7, 7), 3, 2, 1)
pool("nn.avg_pool2d", "avg_pool2d-k32-s12-p10", nn.avg_pool2d, 2, "avg", (1, 2, 6, 5), (3, 2),
     (1, 2), (1, 0))
pool("nn.avg_pool2d", "avg_pool2d-unbatched", nn.avg_pool2d, 2, "avg", (2, 4, 4), 2)
pool("nn.avg_pool2d", "avg_pool2d-1-element", nn.avg_pool2d, 2, "avg", (1, 1, 1, 1), 1)
pool("nn.avg_pool1d", "avg_pool1d-k2", nn.avg_pool1d, 1, "avg", (2, 3, 8), 2)
pool("nn.avg_pool1d", "avg_pool1d-k3-s2-p1", nn.avg_pool1d, 1, "avg", (2, 2, 9), 3, 2, 1)

# nn: softmax and losses -------------------------------------------------------------------------
for _op, _fn, _ref in (("nn.log_softmax", nn.log_softmax, ref_log_softmax),
                       ("nn.softmax", nn.softmax, ref_softmax)):
    _name = _op[3:]
    add(_op, f"{_name}-last", _fn, _ref, Arg((3, 5)))
    add(_op, f"{_name}-dim0", lambda x, f=_fn: f(x, dim=0), lambda x, r=_ref: r(x, 0), Arg((3, 5)))
    add(_op, f"{_name}-1d", _fn, _ref, Arg((4,)))
    add(_op, f"{_name}-1x1", _fn, _ref, Arg((1, 1)))
    add(_op, f"{_name}-large-logits", lambda x, f=_fn: f(x * 100.0),
        lambda x, r=_ref: r(x * 100.0), Arg((2, 3)))

LABELS = np.array([2, 0, 3])
ONE_HOT_SOFT = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.5, 0.5]])
add("nn.cross_entropy", "cross_entropy-labels", lambda x: nn.cross_entropy(x, LABELS),
    lambda x: ref_cross_entropy(x, LABELS), Arg((3, 4)))
add("nn.cross_entropy", "cross_entropy-labels-sum",
    lambda x: nn.cross_entropy(x, LABELS, reduction="sum"),
    lambda x: ref_cross_entropy(x, LABELS, "sum"), Arg((3, 4)))
add("nn.cross_entropy", "cross_entropy-probs-none",
    lambda x: nn.cross_entropy(x, ONE_HOT_SOFT, reduction="none"),
    lambda x: ref_cross_entropy(x, ONE_HOT_SOFT, "none"), Arg((3, 4)))
add("nn.cross_entropy", "cross_entropy-traced-target", nn.cross_entropy, ref_cross_entropy,
    Arg((3, 4)), pos((3, 4)))
add("nn.cross_entropy", "cross_entropy-unbatched", lambda x: nn.cross_entropy(x, np.array(1)),
    lambda x: ref_cross_entropy(x, np.array(1)), Arg((5,)))
LABELS_ND = np.array([[0, 3, 1], [2, 2, 0]])
add("nn.cross_entropy", "cross_entropy-nd-labels", lambda x: nn.cross_entropy(x, LABELS_ND),
    lambda x: ref_cross_entropy(x, LABELS_ND), Arg((2, 4, 3)))
add("nn.cross_entropy", "cross_entropy-nd-probs-none",
    lambda x, t: nn.cross_entropy(x, t, reduction="none"),
    lambda x, t: ref_cross_entropy(x, t, "none"), Arg((2, 3, 2, 2)), pos((2, 3, 2, 2)))
for _red in ("mean", "sum", "none"):
    add("nn.mse_loss", f"mse_loss-{_red}", lambda x, t, r=_red: nn.mse_loss(x, t, reduction=r),
        lambda x, t, r=_red: ref_mse(x, t, r), Arg((3, 4)), Arg((3, 4)))
add("nn.mse_loss", "mse_loss-1-element", nn.mse_loss, ref_mse, Arg((1,)), Arg((1,)))

# nn: training activations, losses and normalisation -------------------------------------------
def ref_leaky_relu(x, slope=0.01):
    return np.where(x > 0, x, slope * x)


def ref_elu(x, alpha=1.0):
    return np.where(x > 0, x, alpha * np.expm1(x))


def ref_log_sigmoid(x):
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def ref_softplus(x, beta=1.0, threshold=20.0):
    return np.where(beta * x > threshold, x, np.log1p(np.exp(beta * x)) / beta)


def ref_silu(x):
    return x / (1.0 + np.exp(-x))


def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def ref_gelu(x):
    return x * np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)),
                            otypes=[np.float64])(x)


def ref_bce_logits(x, t, weight=None, reduction="mean", pos_weight=None):
    """PyTorch's definition, -w (p t log s(x) + (1 - t) log(1 - s(x))), for moderate logits."""
    s = 1.0 / (1.0 + np.exp(-x))
    p = 1.0 if pos_weight is None else pos_weight
    loss = -(p * t * np.log(s) + (1.0 - t) * np.log(1.0 - s))
    return _reduce(loss if weight is None else weight * loss, reduction)


def ref_nll(logp, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """PyTorch's nll_loss / cross_entropy after log_softmax, as torch writes it: the nll part at
    the target class plus label_smoothing / C times the weighted sum over classes; "mean" divides
    by the summed weight of the target classes (indices) or the number of positions (probs)."""
    axis = 1 if logp.ndim > 1 else 0
    n_classes = logp.shape[axis]
    lp = np.moveaxis(logp, axis, -1)
    w = np.ones(n_classes) if weight is None else weight
    s = label_smoothing
    if np.asarray(target).dtype.kind in "iu":
        t = np.asarray(target)
        valid = t != ignore_index
        safe = np.where(valid, t, 0)
        nll = -np.take_along_axis(lp, safe[..., None], -1)[..., 0] * w[safe] * valid
        smooth = -(lp * w).sum(-1) * valid
        loss = (1 - s) * nll + s / n_classes * smooth
        if reduction == "mean":
            return loss.sum() / (w[safe] * valid).sum()
        return _reduce(loss, reduction)
    t = np.moveaxis(target, axis, -1) * (1 - s) + s / n_classes
    return _reduce(-(lp * t * w).sum(-1), reduction)


def ref_layer_norm(x, k, w=None, b=None, eps=1e-5):
    axes = tuple(range(x.ndim - k, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
    return y * (1.0 if w is None else w) + (0.0 if b is None else b)


def ref_batch_norm(x, mean=None, var=None, w=None, b=None, eps=1e-5):
    """Batch statistics when mean and var are None (training), else the given ones (eval)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if mean is None:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if w is not None:
        y = y * w.reshape(shape)
    return y if b is None else y + b.reshape(shape)


unary("nn.leaky_relu", nn.leaky_relu, ref_leaky_relu, nonzero)
add("nn.leaky_relu", "leaky_relu-slope0.2", lambda x: nn.leaky_relu(x, 0.2),
    lambda x: ref_leaky_relu(x, 0.2), nonzero((3, 4)))
unary("nn.elu", nn.elu, ref_elu, nonzero)
add("nn.elu", "elu-alpha1.5", lambda x: nn.elu(x, alpha=1.5), lambda x: ref_elu(x, 1.5),
    nonzero((3, 4)))
unary("nn.log_sigmoid", nn.log_sigmoid, ref_log_sigmoid, nonzero)
add("nn.log_sigmoid", "log_sigmoid-wide", lambda x: nn.log_sigmoid(x * 20.0),
    lambda x: ref_log_sigmoid(x * 20.0), nonzero((3, 4)))
unary("nn.softplus", nn.softplus, ref_softplus)
add("nn.softplus", "softplus-beta2-threshold1", lambda x: nn.softplus(x, beta=2.0, threshold=1.0),
    lambda x: ref_softplus(x, 2.0, 1.0), Arg((4, 5), avoid=(0.5,)))
unary("nn.silu", nn.silu, ref_silu)
add("nn.gelu", "gelu-tanh-2x3", lambda x: nn.gelu(x, approximate="tanh"), ref_gelu_tanh,
    Arg((2, 3), lo=-4.0, hi=4.0))
add("nn.erf", "erf-small", nn.erf, ref_erf, Arg((2, 3), lo=-1.0, hi=1.0))
add("nn.erf", "erf-wide", lambda x: nn.erf(x * 2.0), lambda x: ref_erf(x * 2.0), Arg((3, 4)))
add("nn.erf", "erf-scalar", nn.erf, ref_erf, Arg(()))
add("nn.gelu", "gelu-2x3", nn.gelu, ref_gelu, Arg((2, 3), lo=-4.0, hi=4.0))
add("nn.gelu", "gelu-none-1", lambda x: nn.gelu(x, approximate="none"), ref_gelu, Arg((1,)))
add("nn.gelu", "gelu-tanh-scalar", lambda x: nn.gelu(x, approximate="tanh"), ref_gelu_tanh,
    Arg(()))

BCE_WEIGHT = np.array([[0.5, 2.0, 1.0, 0.0], [1.5, 1.0, 0.25, 3.0], [1.0, 1.0, 2.0, 0.5]])
BCE_POS_WEIGHT = np.array([1.0, 3.0, 0.5, 2.0])
for _red in ("mean", "sum", "none"):
    add("nn.binary_cross_entropy_with_logits", f"bce_with_logits-{_red}",
        lambda x, t, r=_red: nn.binary_cross_entropy_with_logits(x, t, reduction=r),
        lambda x, t, r=_red: ref_bce_logits(x, t, reduction=r), Arg((3, 4)), Arg((3, 4), 0, 1))
add("nn.binary_cross_entropy_with_logits", "bce_with_logits-weight-pos_weight",
    lambda x, t: nn.binary_cross_entropy_with_logits(x, t, BCE_WEIGHT, pos_weight=BCE_POS_WEIGHT),
    lambda x, t: ref_bce_logits(x, t, BCE_WEIGHT, pos_weight=BCE_POS_WEIGHT),
    Arg((3, 4)), Arg((3, 4), 0, 1))
add("nn.binary_cross_entropy_with_logits", "bce_with_logits-traced-weights-sum",
    lambda x, t, w, p: nn.binary_cross_entropy_with_logits(x, t, w, "sum", p),
    lambda x, t, w, p: ref_bce_logits(x, t, w, "sum", p),
    Arg((2, 3)), Arg((2, 3), 0, 1), pos((2, 3)), pos((3,)))
add("nn.binary_cross_entropy_with_logits", "bce_with_logits-scalar",
    nn.binary_cross_entropy_with_logits, ref_bce_logits, Arg(()), Arg((), 0, 1))

CLASS_WEIGHT = np.array([0.5, 2.0, 1.0, 1.5])
LABELS_IGNORED = np.array([2, -100, 3, 0])
LABELS_ND_IGNORED = np.array([[0, 7, 1], [2, 2, 7]])
for _red in ("mean", "sum", "none"):
    add("nn.cross_entropy", f"cross_entropy-weight-ignore-smoothing-{_red}",
        lambda x, r=_red: nn.cross_entropy(x, LABELS_IGNORED, CLASS_WEIGHT, reduction=r,
                                           label_smoothing=0.2),
        lambda x, r=_red: ref_nll(ref_log_softmax(x, 1), LABELS_IGNORED, CLASS_WEIGHT,
                                  reduction=r, label_smoothing=0.2), Arg((4, 4)))
    add("nn.nll_loss", f"nll_loss-labels-{_red}",
        lambda x, r=_red: nn.nll_loss(x, LABELS, reduction=r),
        lambda x, r=_red: ref_nll(x, LABELS, reduction=r), Arg((3, 4)))
add("nn.cross_entropy", "cross_entropy-traced-weight-probs-smoothing",
    lambda x, t, w: nn.cross_entropy(x, t, w, label_smoothing=0.1),
    lambda x, t, w: ref_nll(ref_log_softmax(x, 1), t, w, label_smoothing=0.1),
    Arg((3, 4)), pos((3, 4)), pos((4,)))
add("nn.cross_entropy", "cross_entropy-nd-labels-ignore-7-weight",
    lambda x: nn.cross_entropy(x, LABELS_ND_IGNORED, CLASS_WEIGHT, ignore_index=7),
    lambda x: ref_nll(ref_log_softmax(x, 1), LABELS_ND_IGNORED, CLASS_WEIGHT, ignore_index=7),
    Arg((2, 4, 3)))
add("nn.nll_loss", "nll_loss-weight-ignore",
    lambda x: nn.nll_loss(x, LABELS_IGNORED, CLASS_WEIGHT),
    lambda x: ref_nll(x, LABELS_IGNORED, CLASS_WEIGHT), Arg((4, 4)))
add("nn.nll_loss", "nll_loss-traced-weight-nd-labels-sum",
    lambda x, w: nn.nll_loss(x, LABELS_ND, w, reduction="sum"),
    lambda x, w: ref_nll(x, LABELS_ND, w, reduction="sum"), Arg((2, 4, 3)), pos((4,)))
add("nn.nll_loss", "nll_loss-probs", nn.nll_loss, ref_nll, Arg((3, 4)), pos((3, 4)))
add("nn.nll_loss", "nll_loss-unbatched", lambda x: nn.nll_loss(x, np.array(1)),
    lambda x: ref_nll(x, np.array(1)), Arg((5,)))

add("nn.layer_norm", "layer_norm-last-affine", lambda x, w, b: nn.layer_norm(x, 5, w, b),
    lambda x, w, b: ref_layer_norm(x, 1, w, b), Arg((3, 5)), Arg((5,)), Arg((5,)))
add("nn.layer_norm", "layer_norm-two-axes", lambda x: nn.layer_norm(x, (3, 4)),
    lambda x: ref_layer_norm(x, 2), Arg((2, 3, 4)))
add("nn.layer_norm", "layer_norm-eps0.1-weight", lambda x, w: nn.layer_norm(x, [4], w, eps=0.1),
    lambda x, w: ref_layer_norm(x, 1, w, eps=0.1), Arg((2, 3, 4)), Arg((4,)))
for _shape in ((6, 3), (4, 3, 5), (2, 3, 3, 2)):
    add("nn.batch_norm", f"batch_norm-train-{_sid(_shape)}",
        lambda x, w, b: nn.batch_norm(x, None, None, w, b, training=True),
        lambda x, w, b: ref_batch_norm(x, w=w, b=b), Arg(_shape), Arg((3,)), Arg((3,)))
    add("nn.batch_norm", f"batch_norm-eval-{_sid(_shape)}",
        lambda x, m, v, w, b: nn.batch_norm(x, m, v, w, b),
        lambda x, m, v, w, b: ref_batch_norm(x, m, v, w, b),
        Arg(_shape), Arg((3,)), pos((3,)), Arg((3,)), Arg((3,)))
add("nn.batch_norm", "batch_norm-train-with-running-stats-output",
    lambda x: nn.batch_norm(x, np.zeros(3), np.ones(3), training=True, eps=1e-3).output,
    lambda x: ref_batch_norm(x, eps=1e-3), Arg((4, 3, 2)))


# nn: dropout ------------------------------------------------------------------------------------
def ref_threefry2x32(key, counter):
    """Threefry-2x32, 20 rounds, on Python ints, straight from Salmon et al. (SC 2011): rotations
    13 15 26 6 17 29 16 24, a key injection (ks[s], ks[s+1] + s) after every 4 rounds, ks[2] =
    k0 ^ k1 ^ 0x1BD11BDA."""
    m = 0xFFFFFFFF
    ks = (key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDA)
    x0, x1 = (counter[0] + ks[0]) & m, (counter[1] + ks[1]) & m
    for r in range(20):
        rot = (13, 15, 26, 6, 17, 29, 16, 24)[r % 8]
        x0 = (x0 + x1) & m
        x1 = (((x1 << rot) | (x1 >> (32 - rot))) & m) ^ x0
        if r % 4 == 3:
            s = r // 4 + 1
            x0, x1 = (x0 + ks[s % 3]) & m, (x1 + ks[(s + 1) % 3] + s) & m
    return x0, x1


def ref_uniform_f32(key, shape):
    """float32 uniforms: element i from the block of counter (i >> 32, i & 0xFFFFFFFF), 23 top
    bits of x0 ^ x1 as the mantissa of a float in [1, 2), minus 1."""
    out = []
    for i in range(int(np.prod(shape, dtype=np.int64))):
        x0, x1 = ref_threefry2x32(key, (i >> 32, i & 0xFFFFFFFF))
        out.append(((x0 ^ x1) >> 9) * 2.0 ** -23)
    return np.array(out).reshape(shape)


def ref_dropout(x, p, key):
    keep = ref_uniform_f32(tuple(int(k) for k in key), x.shape) >= np.float32(p)
    return np.where(keep, x / (1 - p), 0.0)


DROPOUT_KEY = np.array([0x13198A2E, 0x03707344], dtype=np.uint32)   # a fixed key, closed over
for _p, _shape in ((0.5, (4, 5)), (0.2, (3,)), (0.9, (2, 3, 4))):
    add("nn.dropout", f"dropout-p{_p}-{_sid(_shape)}",
        lambda x, p=_p: nn.dropout(x, p, key=DROPOUT_KEY),
        lambda x, p=_p: ref_dropout(x, p, DROPOUT_KEY), Arg(_shape))
add("nn.dropout", "dropout-eval", lambda x: nn.dropout(x, 0.5, training=False), lambda x: x,
    Arg((2, 3)))

# ------------------------------------------------------------------------------------------------
# everyday spellings: PyTorch's keywords and tensor methods beside numpy's, numpy's newer keywords
# ------------------------------------------------------------------------------------------------
EVERYDAY = [
    ("sum", "sum-dim-keepdim", lambda x: tj.sum(x, dim=1, keepdim=True),
     lambda x: x.sum(1, keepdims=True), Arg((2, 3, 4))),
    ("mean", "mean-dim-tuple", lambda x: tj.mean(x, dim=(0, 2)), lambda x: x.mean((0, 2)),
     Arg((2, 3, 4))),
    ("max", "max-dim", lambda x: tj.max(x, dim=-1), lambda x: x.max(-1), distinct((3, 4))),
    ("min", "min-dim-keepdim", lambda x: tj.min(x, dim=0, keepdim=True),
     lambda x: x.min(0, keepdims=True), distinct((3, 4))),
    ("var", "var-ddof1", lambda x: tj.var(x, 1, ddof=1), lambda x: np.var(x, 1, ddof=1),
     Arg((3, 4))),
    ("var", "var-correction-dim", lambda x: tj.var(x, dim=0, correction=2),
     lambda x: np.var(x, 0, ddof=2), Arg((4, 3))),
    ("std", "std-ddof1-all", lambda x: tj.std(x, ddof=1), lambda x: np.std(x, ddof=1),
     Arg((3, 4))),
    ("logsumexp", "logsumexp-dim", lambda x: tj.logsumexp(x, dim=1),
     lambda x: ref_logsumexp(x, 1), Arg((3, 4))),
    ("norm", "norm-dim-keepdim", lambda x: tj.norm(x, dim=0, keepdim=True),
     lambda x: ref_norm(x, axis=0, keepdims=True), Arg((3, 4))),
    ("clip", "clip-numpy-keywords", lambda x: tj.clip(x, a_min=-0.5, a_max=0.7),
     lambda x: np.clip(x, -0.5, 0.7), Arg((4, 5), avoid=(-0.5, 0.7))),
    ("clip", "clip-numpy2-min-max", lambda x: tj.clip(x, min=0.3), lambda x: np.maximum(x, 0.3),
     Arg((6,), avoid=(0.3,))),
    ("clip", "clip-np-dispatch-keywords", lambda x: np.clip(x, a_min=-1.0, a_max=0.5),
     lambda x: np.clip(x, -1.0, 0.5), Arg((6,), avoid=(-1.0, 0.5))),
    ("method.sum", "sum-dim", lambda x: x.sum(dim=0), lambda x: x.sum(0), Arg((3, 4))),
    ("method.mean", "mean-dim-keepdim", lambda x: x.mean(dim=-1, keepdim=True),
     lambda x: x.mean(-1, keepdims=True), Arg((3, 4))),
    ("method.max", "method-max-dim", lambda x: x.max(dim=1), lambda x: x.max(1), distinct((3, 4))),
    ("method.min", "min-dim", lambda x: x.min(dim=0), lambda x: x.min(0), distinct((3, 4))),
    ("method.std", "std-dim-correction", lambda x: x.std(dim=1, correction=1),
     lambda x: x.std(1, ddof=1), Arg((3, 4))),
    ("method.var", "var-ddof", lambda x: x.var(ddof=1), lambda x: x.var(ddof=1), Arg((3, 4))),
    ("method.logsumexp", "method-logsumexp-dim", lambda x: x.logsumexp(dim=0),
     lambda x: ref_logsumexp(x, 0), Arg((3, 4))),
    ("method.norm", "norm-dim", lambda x: x.norm(dim=1), lambda x: ref_norm(x, axis=1),
     Arg((3, 4))),
    ("method.view", "view-args", lambda x: x.view(4, -1), lambda x: x.reshape(4, -1),
     Arg((2, 3, 2))),
    ("method.view", "view-tuple", lambda x: x.view((3, 4)), lambda x: x.reshape(3, 4),
     Arg((2, 6))),
    ("method.permute", "permute-args", lambda x: x.permute(2, 0, 1),
     lambda x: x.transpose(2, 0, 1), Arg((2, 3, 4))),
    ("method.permute", "permute-tuple-negative", lambda x: x.permute((-1, 0, 1)),
     lambda x: x.transpose(2, 0, 1), Arg((2, 3, 4))),
    ("method.unsqueeze", "unsqueeze-0", lambda x: x.unsqueeze(0), lambda x: x[None],
     Arg((2, 3))),
    ("method.unsqueeze", "unsqueeze-minus1", lambda x: x.unsqueeze(-1), lambda x: x[..., None],
     Arg((2, 3))),
    ("method.squeeze", "squeeze-dim", lambda x: x.squeeze(dim=1), lambda x: x.squeeze(1),
     Arg((2, 1, 3))),
    ("method.flatten", "flatten-start1", lambda x: x.flatten(1),
     lambda x: x.reshape(2, -1), Arg((2, 3, 4))),
    ("method.flatten", "flatten-start-end", lambda x: x.flatten(1, 2),
     lambda x: x.reshape(2, 12, 5), Arg((2, 3, 4, 5))),
    ("method.flatten", "flatten-0d", lambda x: x.flatten(), lambda x: x.reshape(1), Arg(())),
    ("method.ravel", "ravel", lambda x: x.ravel(), np.ravel, Arg((2, 3))),
    ("method.mT", "mT-3d", lambda x: x.mT, lambda x: np.swapaxes(x, -1, -2), Arg((2, 3, 4))),
    ("method.swapaxes", "swapaxes", lambda x: x.swapaxes(0, -1),
     lambda x: np.swapaxes(x, 0, -1), Arg((2, 3, 4))),
    ("method.t", "t-2d", lambda x: x.t(), lambda x: x.T, Arg((3, 4))),
    ("method.t", "t-1d", lambda x: x.t(), lambda x: x, Arg((3,))),
    ("method.clamp", "clamp-min-max", lambda x: x.clamp(-0.5, 1.0),
     lambda x: np.clip(x, -0.5, 1.0), Arg((5,), avoid=(-0.5, 1.0))),
    ("method.clamp", "clamp-max-only", lambda x: x.clamp(max=0.2),
     lambda x: np.minimum(x, 0.2), Arg((5,), avoid=(0.2,))),
    ("method.clip", "clip-min-keyword", lambda x: x.clip(min=0.1), lambda x: np.maximum(x, 0.1),
     Arg((5,), avoid=(0.1,))),
]
for _op, _id, _fn, _ref, *_args in EVERYDAY:
    add(_op, f"everyday-{_id}", _fn, _ref, *_args)
# END everyday spellings

# rearranging and assembling arrays (numpy's names; np.<name>(tracer) dispatches to them) ---------
def _weighted(parts):
    """Pieces of a split combined so that each piece's gradient differs."""
    return sum((k + 1.0) * (p * p).sum() for k, p in enumerate(parts))


REARRANGE = [
    ("getitem", "negative-steps", lambda x: x[::-1, 3:0:-2, ::-3],
     lambda x: x[::-1, 3:0:-2, ::-3], Arg((3, 4, 5))),
    ("getitem", "negative-step-int-newaxis", lambda x: x[None, -2::-1, 1],
     lambda x: x[None, -2::-1, 1], Arg((4, 3))),
    ("flip", "flip-axes", lambda x: tj.flip(x, (0, 2)), lambda x: np.flip(x, (0, 2)),
     Arg((2, 3, 4))),
    ("flip", "flip-all-np", lambda x: np.flip(x), lambda x: x[::-1, ::-1], Arg((3, 2))),
    ("flipud", "flipud", tj.flipud, lambda x: x[::-1], Arg((3, 2))),
    ("fliplr", "fliplr", lambda x: np.fliplr(x), lambda x: x[:, ::-1], Arg((3, 2, 2))),
    ("pad", "pad-constant-value", lambda x: tj.pad(x, ((1, 2), (0, 1)), constant_values=1.5),
     lambda x: np.pad(x, ((1, 2), (0, 1)), constant_values=1.5), Arg((3, 4))),
    ("pad", "pad-constant-int", lambda x: np.pad(x, 2), lambda x: np.pad(x, 2), Arg((2, 3))),
    ("pad", "pad-edge", lambda x: tj.pad(x, ((1, 2), (3, 1)), mode="edge"),
     lambda x: np.pad(x, ((1, 2), (3, 1)), mode="edge"), Arg((3, 4))),
    ("pad", "pad-reflect", lambda x: tj.pad(x, ((2, 1), (1, 3)), mode="reflect"),
     lambda x: np.pad(x, ((2, 1), (1, 3)), mode="reflect"), Arg((3, 4))),
    ("pad", "pad-symmetric-3d", lambda x: tj.pad(x, (0, 2), mode="symmetric"),
     lambda x: np.pad(x, (0, 2), mode="symmetric"), Arg((2, 2, 3))),
    ("pad", "pad-wrap", lambda x: tj.pad(x, ((3, 1),), mode="wrap"),
     lambda x: np.pad(x, ((3, 1),), mode="wrap"), Arg((4,))),
    ("split", "split-sections", lambda x: _weighted(tj.split(x, 2, axis=1)),
     lambda x: _weighted(np.split(x, 2, axis=1)), Arg((3, 4))),
    ("split", "split-indices", lambda x: _weighted(np.split(x, [1, -1, 9])),
     lambda x: _weighted(np.split(x, [1, -1, 9])), Arg((5, 2))),
    ("array_split", "array_split-uneven", lambda x: _weighted(tj.array_split(x, 3, axis=-1)),
     lambda x: _weighted(np.array_split(x, 3, axis=-1)), Arg((2, 7))),
    ("tile", "tile-3d-reps", lambda x: tj.tile(x, (2, 1, 3)), lambda x: np.tile(x, (2, 1, 3)),
     Arg((2, 3))),
    ("tile", "tile-int", lambda x: np.tile(x, 2), lambda x: np.tile(x, 2), Arg((2, 3))),
    ("repeat", "repeat-axis", lambda x: tj.repeat(x, 2, axis=1), lambda x: np.repeat(x, 2, 1),
     Arg((2, 3))),
    ("repeat", "repeat-flat", lambda x: np.repeat(x, 3), lambda x: np.repeat(x, 3), Arg((2, 2))),
    ("repeat", "repeat-counts", lambda x: tj.repeat(x, [1, 0, 3], axis=0),
     lambda x: np.repeat(x, [1, 0, 3], axis=0), Arg((3, 2))),
    ("roll", "roll-flat", lambda x: tj.roll(x, 2), lambda x: np.roll(x, 2), Arg((3, 4))),
    ("roll", "roll-axes", lambda x: np.roll(x, (-1, 7), axis=(0, 1)),
     lambda x: np.roll(x, (-1, 7), axis=(0, 1)), Arg((3, 4))),
    ("diff", "diff-last", tj.diff, np.diff, Arg((3, 5))),
    ("diff", "diff-second-axis0", lambda x: np.diff(x, 2, axis=0),
     lambda x: np.diff(x, 2, axis=0), Arg((4, 3))),
    ("tril", "tril-k-minus1", lambda x: tj.tril(x, -1), lambda x: np.tril(x, -1), Arg((4, 3))),
    ("triu", "triu-batched-k1", lambda x: np.triu(x, 1), lambda x: np.triu(x, 1),
     Arg((2, 3, 4))),
    ("diagonal", "diagonal-axes-offset", lambda x: tj.diagonal(x, 1, 2, 0),
     lambda x: np.diagonal(x, 1, 2, 0), Arg((3, 2, 4))),
    ("diag", "diag-of-matrix", lambda x: tj.diag(x, -1), lambda x: np.diag(x, -1), Arg((4, 3))),
    ("diag", "diag-from-vector", lambda x: tj.diag(x, 2), lambda x: np.diag(x, 2), Arg((3,))),
    ("diag", "diag-from-vector-below", lambda x: np.diag(x, -1), lambda x: np.diag(x, -1),
     Arg((3,))),
    ("trace", "trace", tj.trace, np.trace, Arg((3, 4))),
    ("trace", "trace-offset-axes", lambda x: np.trace(x, -1, 1, 2),
     lambda x: np.trace(x, -1, 1, 2), Arg((2, 3, 3))),
    ("eye", "eye-matmul", lambda x: x @ tj.eye(4, 3, 1), lambda x: x @ np.eye(4, 3, 1),
     Arg((2, 4))),
    ("zeros_like", "zeros_like", lambda x: tj.zeros_like(x) + x, lambda x: x, Arg((2, 3))),
    ("ones_like", "ones_like", lambda x: np.ones_like(x) * x, lambda x: x, Arg((2, 3))),
    ("full_like", "full_like", lambda x: tj.full_like(x, 2.5) * x, lambda x: 2.5 * x,
     Arg((2, 3))),
    ("moveaxis", "moveaxis-two", lambda x: tj.moveaxis(x, [0, 1], [-1, 0]),
     lambda x: np.moveaxis(x, [0, 1], [-1, 0]), Arg((2, 3, 4))),
    ("ravel", "ravel", np.ravel, np.ravel, Arg((2, 3))),
    ("atleast_1d", "atleast_1d-scalar", tj.atleast_1d, np.atleast_1d, Arg(())),
    ("atleast_2d", "atleast_2d-vector", np.atleast_2d, np.atleast_2d, Arg((3,))),
    ("atleast_3d", "atleast_3d-matrix", tj.atleast_3d, np.atleast_3d, Arg((2, 3))),
    ("atleast_3d", "atleast_3d-vector", np.atleast_3d, np.atleast_3d, Arg((3,))),
    ("vstack", "vstack-vectors", lambda a, b: tj.vstack([a, b]), lambda a, b: np.vstack([a, b]),
     Arg((3,)), Arg((3,))),
    ("hstack", "hstack-matrices", lambda a, b: np.hstack([a, b]),
     lambda a, b: np.hstack([a, b]), Arg((2, 3)), Arg((2, 1))),
    ("hstack", "hstack-vectors", lambda a, b: tj.hstack((a, b)), lambda a, b: np.hstack((a, b)),
     Arg((2,)), Arg((3,))),
    ("dstack", "dstack", lambda a, b: tj.dstack([a, b]), lambda a, b: np.dstack([a, b]),
     Arg((2, 3)), Arg((2, 3))),
    ("column_stack", "column_stack", lambda a, b: np.column_stack([a, b]),
     lambda a, b: np.column_stack([a, b]), Arg((3,)), Arg((3, 2))),
]
for _op, _id, _fn, _ref, *_args in REARRANGE:
    add(_op, f"rearrange-{_id}", _fn, _ref, *_args)
# END rearranging

# products and scans ------------------------------------------------------------------------------
SCANS = [
    ("prod", "prod-all", tj.prod, np.prod, Arg((3, 4), lo=0.5, hi=1.5)),
    ("prod", "prod-axis-odd", lambda x: tj.prod(x, 1), lambda x: np.prod(x, 1), Arg((2, 7))),
    ("prod", "prod-axes-keepdims", lambda x: np.prod(x, axis=(0, 2), keepdims=True),
     lambda x: np.prod(x, axis=(0, 2), keepdims=True), Arg((3, 2, 3))),
    ("prod", "prod-dim-1-element", lambda x: tj.prod(x, dim=0), lambda x: np.prod(x, 0),
     Arg((1, 3))),
    ("method.prod", "prod-method-dim", lambda x: x.prod(dim=-1), lambda x: x.prod(-1),
     Arg((3, 5))),
    ("cumsum", "cumsum-flat", tj.cumsum, np.cumsum, Arg((3, 4))),
    ("cumsum", "cumsum-axis-odd", lambda x: np.cumsum(x, axis=1), lambda x: np.cumsum(x, 1),
     Arg((2, 11, 2))),
    ("cumsum", "cumsum-1-element", lambda x: tj.cumsum(x, 0), lambda x: np.cumsum(x, 0),
     Arg((1,))),
    ("method.cumsum", "cumsum-method-dim", lambda x: x.cumsum(dim=0), lambda x: x.cumsum(0),
     Arg((5, 2))),
    ("cumprod", "cumprod-flat", tj.cumprod, np.cumprod, Arg((2, 3), lo=0.5, hi=1.5)),
    ("cumprod", "cumprod-axis", lambda x: np.cumprod(x, axis=-1), lambda x: np.cumprod(x, -1),
     Arg((3, 6))),
    ("method.cumprod", "cumprod-method", lambda x: x.cumprod(0), lambda x: x.cumprod(0),
     Arg((5, 2))),
]
for _op, _id, _fn, _ref, *_args in SCANS:
    add(_op, f"scan-{_id}", _fn, _ref, *_args)
# END products and scans

# elementwise composites with numpy's accuracy (their ulp errors: tests/test_ops_everyday.py) ------
unary("log1p", tj.log1p, np.log1p, lambda s: Arg(s, lo=-0.9, hi=3.0))
add("log1p", "log1p-tiny", lambda x: tj.log1p(x * 1e-9), lambda x: np.log1p(x * 1e-9),
    Arg((5,)))
unary("expm1", tj.expm1, np.expm1)
add("expm1", "expm1-tiny", lambda x: np.expm1(x * 1e-9), lambda x: np.expm1(x * 1e-9), Arg((5,)))
unary("log2", tj.log2, np.log2, pos, shapes=((2, 3),))
unary("log10", np.log10, np.log10, pos, shapes=((2, 3),))
unary("exp2", tj.exp2, np.exp2, shapes=((2, 3), ()))
unary("reciprocal", tj.reciprocal, np.reciprocal, pos, shapes=((2, 3),))
unary("tan", tj.tan, np.tan, lambda s: Arg(s, lo=-1.3, hi=1.3), shapes=((2, 3),))
unary("deg2rad", tj.deg2rad, np.deg2rad, shapes=((4,),))
unary("rad2deg", np.rad2deg, np.rad2deg, shapes=((4,),))
unary("fabs", tj.fabs, np.fabs, nonzero, shapes=((4,),))
unary("sinh", tj.sinh, np.sinh, lambda s: Arg(s, lo=-4.0, hi=4.0))
unary("cosh", np.cosh, np.cosh, lambda s: Arg(s, lo=-4.0, hi=4.0), shapes=((2, 3), ()))
binary("hypot", tj.hypot, np.hypot, nonzero, nonzero, shapes=BINARY_SHAPES[:4])
binary("fmax", tj.fmax, np.fmax, distinct, distinct, shapes=BINARY_SHAPES[:3])
binary("fmin", np.fmin, np.fmin, distinct, distinct, shapes=BINARY_SHAPES[:3])
binary("logaddexp", tj.logaddexp, np.logaddexp, distinct, distinct, shapes=BINARY_SHAPES[:4])
binary("logaddexp2", np.logaddexp2, np.logaddexp2, distinct, distinct, shapes=BINARY_SHAPES[:3])
# END elementwise composites

# rounding, inverse trigonometry, remainders, choices, indices of extremes, sorting and assembling --
_NEAR_INTS = (-2.0, -1.0, 0.0, 1.0, 2.0)
_NEAR_HALVES = (-1.5, -0.5, 0.5, 1.5)


def _as_float(idx_fn):
    """An integer-valued op compared as floats of its input's dtype (the table's outputs are)."""
    return lambda x: idx_fn(x).astype(x.dtype)


def _no_kinks(lo, hi, points):
    return lambda s: Arg(s, lo=lo, hi=hi, avoid=points)


# piecewise constant: the gradient is zero (checked against finite differences away from the
# jumps); there is no second order to check
ROUNDING = [
    ("floor", "floor", tj.floor, np.floor, _no_kinks(-2.5, 2.5, _NEAR_INTS)((2, 3))),
    ("ceil", "ceil-np", np.ceil, np.ceil, _no_kinks(-2.5, 2.5, _NEAR_INTS)((2, 3))),
    ("trunc", "trunc", tj.trunc, np.trunc, _no_kinks(-2.5, 2.5, _NEAR_INTS)((4,))),
    ("rint", "rint-np", np.rint, np.rint, _no_kinks(-2.0, 2.0, _NEAR_HALVES)((2, 3))),
    ("round", "round-decimals-1", lambda x: tj.round(x, 1), lambda x: np.round(x, 1),
     Arg((2, 3))),
    ("round", "round-np", np.round, np.round, _no_kinks(-2, 2, _NEAR_HALVES)((5,))),
    ("around", "around-decimals-neg", lambda x: np.around(x * 100, -1),
     lambda x: np.around(x * 100, -1), Arg((4,))),
    ("method.round", "round-method", lambda x: x.round(1), lambda x: x.round(1), Arg((4,))),
]
for _op, _id, _fn, _ref, *_args in ROUNDING:
    add(_op, _id, _fn, _ref, *_args, second_order=False)
unary("arctan", tj.arctan, np.arctan, lambda s: Arg(s, lo=-4.0, hi=4.0))
binary("arctan2", tj.arctan2, np.arctan2, nonzero, nonzero, shapes=BINARY_SHAPES[:4])
unary("arcsin", tj.arcsin, np.arcsin, lambda s: Arg(s, lo=-0.9, hi=0.9))
unary("arccos", np.arccos, np.arccos, lambda s: Arg(s, lo=-0.9, hi=0.9), shapes=((2, 3), ()))
unary("arcsinh", tj.arcsinh, np.arcsinh, lambda s: Arg(s, lo=-5.0, hi=5.0))
unary("arccosh", np.arccosh, np.arccosh, lambda s: Arg(s, lo=1.1, hi=5.0), shapes=((2, 3),))
unary("arctanh", tj.arctanh, np.arctanh, lambda s: Arg(s, lo=-0.9, hi=0.9))
binary("fmod", tj.fmod, np.fmod, arg_b=lambda s: Arg(s, lo=0.3, hi=1.7),
       shapes=BINARY_SHAPES[:3])
binary("remainder", np.remainder, np.remainder, arg_b=nonzero, shapes=BINARY_SHAPES[:4])
binary("mod", tj.mod, np.mod, arg_b=nonzero, shapes=BINARY_SHAPES[:1])
binary("operator.%", lambda a, b: a % b, np.remainder, arg_b=nonzero, shapes=BINARY_SHAPES[:2])
add("operator.%", "rmod-python-scalar", lambda x: 2.5 % x, lambda x: 2.5 % x, nonzero((4,)))
MORE = [
    ("nan_to_num", "nan_to_num-finite", lambda x: tj.nan_to_num(x, nan=1.0, posinf=2.0),
     lambda x: x, Arg((2, 3))),
    ("select", "select-two-cases",
     lambda x: tj.select([x > 0.5, x < -0.5], [x * 2, x ** 2], 0.1),
     lambda x: np.select([x > 0.5, x < -0.5], [x * 2, x ** 2], 0.1),
     Arg((3, 4), avoid=(-0.5, 0.5))),
    ("select", "select-np-broadcast", lambda x, y: np.select([x > 0], [y], x),
     lambda x, y: np.select([x > 0], [y], x), nonzero((2, 3)), Arg((3,))),
    ("real", "real", lambda x: np.real(x) * 2, lambda x: x * 2, Arg((2, 3))),
    ("imag", "imag", lambda x: tj.imag(x) + x, lambda x: x, Arg((2, 3))),
    ("conj", "conj", lambda x: np.conj(x) * x, lambda x: x * x, Arg((3,))),
    ("conjugate", "conjugate", lambda x: tj.conjugate(x) * x.real, lambda x: x * x, Arg((3,))),
    ("sort", "sort-last", tj.sort, np.sort, distinct((3, 5))),
    ("sort", "sort-axis0-np", lambda x: np.sort(x, 0), lambda x: np.sort(x, 0), distinct((4, 3))),
    ("sort", "sort-flat", lambda x: tj.sort(x, None), lambda x: np.sort(x, None),
     distinct((2, 3))),
    ("argsort", "argsort-last", _as_float(tj.argsort),
     lambda x: np.argsort(x, kind="stable").astype(x.dtype), distinct((3, 5))),
    ("argsort", "argsort-axis0-np", _as_float(lambda x: np.argsort(x, 0)),
     lambda x: np.argsort(x, 0).astype(x.dtype), distinct((4, 3))),
    ("argmax", "argmax-all", _as_float(tj.argmax), lambda x: np.float64(np.argmax(x)),
     distinct((3, 4))),
    ("argmax", "argmax-axis1-keepdims", _as_float(lambda x: np.argmax(x, 1, keepdims=True)),
     lambda x: np.argmax(x, 1, keepdims=True).astype(x.dtype), distinct((3, 4))),
    ("argmin", "argmin-axis0", _as_float(lambda x: tj.argmin(x, 0)),
     lambda x: np.argmin(x, 0).astype(x.dtype), distinct((3, 4))),
    ("method.argmax", "argmax-method-dim", _as_float(lambda x: x.argmax(dim=1)),
     lambda x: x.argmax(1).astype(x.dtype), distinct((3, 4))),
    ("method.argmin", "argmin-method", _as_float(lambda x: x.argmin(0)),
     lambda x: x.argmin(0).astype(x.dtype), distinct((3, 4))),
    ("method.argsort", "argsort-method", _as_float(lambda x: x.argsort()),
     lambda x: x.argsort(kind="stable").astype(x.dtype), distinct((2, 4))),
    ("append", "append-flat", lambda x, y: np.append(x, y), lambda x, y: np.append(x, y),
     Arg((2, 2)), Arg((3,))),
    ("append", "append-axis", lambda x, y: tj.append(x, y, axis=1),
     lambda x, y: np.append(x, y, axis=1), Arg((2, 2)), Arg((2, 1))),
    ("vsplit", "vsplit", lambda x: _weighted(np.vsplit(x, 2)),
     lambda x: _weighted(np.vsplit(x, 2)), Arg((4, 3))),
    ("hsplit", "hsplit-indices", lambda x: _weighted(tj.hsplit(x, [1])),
     lambda x: _weighted(np.hsplit(x, [1])), Arg((2, 3))),
    ("dsplit", "dsplit", lambda x: _weighted(tj.dsplit(x, 2)),
     lambda x: _weighted(np.dsplit(x, 2)), Arg((2, 1, 4))),
    ("rot90", "rot90", tj.rot90, np.rot90, Arg((2, 3))),
    ("rot90", "rot90-k3-axes", lambda x: np.rot90(x, 3, (2, 0)),
     lambda x: np.rot90(x, 3, (2, 0)), Arg((2, 3, 2))),
    ("rollaxis", "rollaxis", lambda x: np.rollaxis(x, 2), lambda x: np.rollaxis(x, 2),
     Arg((2, 3, 4))),
    ("rollaxis", "rollaxis-start", lambda x: tj.rollaxis(x, 0, 3),
     lambda x: np.rollaxis(x, 0, 3), Arg((2, 3, 4))),
]
for _op, _id, _fn, _ref, *_args in MORE:
    add(_op, f"more-{_id}", _fn, _ref, *_args,
        grad=not _op.startswith(("argsort", "argmax", "argmin", "method.arg")))
# END rounding, inverse trigonometry, ...

# nn: convolution options (dilation, groups, transposed) -----------------------------------------
def ref_conv_options(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """PyTorch conv1d/conv2d with dilation and groups: out[n, o, p] = sum over the C/G channels c
    of o's group and taps k of xpad[n, g*C/G + c, p*stride + k*dilation] * w[o, c, k]."""
    nsp = w.ndim - 2
    s, d = _tuple(stride, nsp), _tuple(dilation, nsp)
    k = w.shape[2:]
    if padding == "same":    # d*(k - 1) in total, the odd element on the right/bottom
        pads = [(dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2) for kk, dd in zip(k, d)]
    else:
        pads = [(q, q) for q in _tuple(0 if padding == "valid" else padding, nsp)]
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    outsp = [(n - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, dd in zip(xp.shape[2:], k, s, d)]
    cg, og = x.shape[1] // groups, w.shape[0] // groups
    out = np.zeros((x.shape[0], w.shape[0], *outsp))
    for o in range(w.shape[0]):
        for c in range(cg):
            for tap in itertools.product(*map(range, k)):
                window = xp[(slice(None), (o // og) * cg + c) + tuple(
                    slice(t * dd, t * dd + ss * (q - 1) + 1, ss)
                    for t, dd, ss, q in zip(tap, d, s, outsp))]
                out[:, o] += window * w[(o, c) + tap]
    if b is not None:
        out += b.reshape((1, -1) + (1,) * nsp)
    return out


def ref_conv_transpose(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1,
                       dilation=1):
    """PyTorch conv_transpose1d/2d: every input pixel scatters x[n, c, p] * w[c, o, k] to output
    p*stride + k*dilation - padding (weight [C_in, C_out/G, k...])."""
    nsp = w.ndim - 2
    s, p, op_, d = (_tuple(v, nsp) for v in (stride, padding, output_padding, dilation))
    k = w.shape[2:]
    insp = x.shape[2:]
    full = [(L - 1) * ss + dd * (kk - 1) + 1 + o for L, ss, dd, kk, o in zip(insp, s, d, k, op_)]
    cg, og = x.shape[1] // groups, w.shape[1]
    out = np.zeros((x.shape[0], og * groups, *full))
    for c in range(x.shape[1]):
        for o in range(og):
            for tap in itertools.product(*map(range, k)):
                dst = (slice(None), (c // cg) * og + o) + tuple(
                    slice(t * dd, t * dd + ss * (L - 1) + 1, ss)
                    for t, dd, ss, L in zip(tap, d, s, insp))
                out[dst] += x[:, c] * w[(c, o) + tap]
    out = out[(slice(None), slice(None)) + tuple(slice(pp, f - pp) for pp, f in zip(p, full))]
    if b is not None:
        out += b.reshape((1, -1) + (1,) * nsp)
    return out


def conv_options(op, id, tj_fn, ref, x, w, bias=False, **kw):
    nb = w[1] * kw.get("groups", 1) if "transpose" in op else w[0]
    if bias:
        add(op, id, lambda x, w, b: tj_fn(x, w, b, **kw), lambda x, w, b: ref(x, w, b, **kw),
            Arg(x), Arg(w), Arg((nb,)))
    else:
        add(op, id, lambda x, w: tj_fn(x, w, **kw), lambda x, w: ref(x, w, **kw), Arg(x), Arg(w))


conv_options("nn.conv2d", "conv2d-depthwise-pad1", nn.conv2d, ref_conv_options, (2, 3, 5, 6),
             (3, 1, 3, 3), padding=1, groups=3)
conv_options("nn.conv2d", "conv2d-depthwise-mult2-stride2-bias", nn.conv2d, ref_conv_options,
             (1, 2, 7, 6), (4, 1, 3, 2), bias=True, stride=2, padding=(1, 0), groups=2)
conv_options("nn.conv2d", "conv2d-groups2-dilation2", nn.conv2d, ref_conv_options, (2, 4, 6, 7),
             (4, 2, 2, 3), dilation=2, groups=2)
conv_options("nn.conv2d", "conv2d-dilation21-same", nn.conv2d, ref_conv_options, (1, 2, 5, 6),
             (3, 2, 3, 2), padding="same", dilation=(2, 1))
conv_options("nn.conv1d", "conv1d-depthwise-dilation2-same", nn.conv1d, ref_conv_options,
             (2, 3, 9), (3, 1, 3), padding="same", dilation=2, groups=3)
conv_options("nn.conv1d", "conv1d-groups3-stride2", nn.conv1d, ref_conv_options, (1, 6, 10),
             (3, 2, 3), stride=2, padding=1, groups=3)
conv_options("nn.conv_transpose2d", "conv_transpose2d-plain", nn.conv_transpose2d,
             ref_conv_transpose, (2, 3, 4, 5), (3, 2, 3, 3))
conv_options("nn.conv_transpose2d", "conv_transpose2d-stride2-pad1-outpad1-bias",
             nn.conv_transpose2d, ref_conv_transpose, (1, 2, 3, 4), (2, 3, 3, 2), bias=True,
             stride=2, padding=1, output_padding=1)
conv_options("nn.conv_transpose2d", "conv_transpose2d-groups2-dilation2", nn.conv_transpose2d,
             ref_conv_transpose, (1, 4, 3, 3), (4, 1, 2, 2), groups=2, dilation=2)
conv_options("nn.conv_transpose1d", "conv_transpose1d-stride3-groups2", nn.conv_transpose1d,
             ref_conv_transpose, (2, 2, 5), (2, 2, 3), stride=3, padding=1, groups=2)


# nn: pooling options (dilation, ceil_mode, divisors) and adaptive pooling -----------------------
def _pool_windows_1d(n, k, s, p, d, ceil):
    """PyTorch's windows of one axis: (start, tap positions) per output, padding included."""
    span = d * (k - 1) + 1
    o = (n + 2 * p - span) // s + 1 if not ceil else -(-(n + 2 * p - span) // s) + 1
    if ceil and (o - 1) * s >= n + p:
        o -= 1
    return [[i * s - p + t * d for t in range(k)] for i in range(o)]


def ref_pool_options(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                     count_include_pad=True, divisor_override=None, nsp=2, mode="max"):
    """PyTorch's max/avg pooling, direct loops over the windows of each output."""
    k = _tuple(kernel_size, nsp)
    s = k if stride is None else _tuple(stride, nsp)
    p, d = _tuple(padding, nsp), _tuple(dilation, nsp)
    wins = [_pool_windows_1d(n, kk, ss, pp, dd, ceil_mode)
            for n, kk, ss, pp, dd in zip(x.shape[2:], k, s, p, d)]
    out = np.zeros(x.shape[:2] + tuple(len(w) for w in wins))
    for pos in itertools.product(*map(range, out.shape[2:])):
        taps = [w[i] for w, i in zip(wins, pos)]
        inside = [[t for t in tt if 0 <= t < n] for tt, n in zip(taps, x.shape[2:])]
        vals = x[(slice(None), slice(None)) + np.ix_(*inside)].reshape(x.shape[:2] + (-1,))
        if mode == "max":
            out[(slice(None), slice(None)) + pos] = vals.max(axis=2)
            continue
        if divisor_override:
            div = divisor_override
        elif count_include_pad:   # the window clipped to the padded input
            div = np.prod([min(tt[0] + kk, n + pp) - tt[0]
                           for tt, kk, n, pp in zip(taps, k, x.shape[2:], p)])
        else:
            div = vals.shape[2]
        out[(slice(None), slice(None)) + pos] = vals.sum(axis=2) / div
    return out


def ref_adaptive(x, output_size, nsp=2, mode="avg"):
    outs = _tuple(output_size, nsp)
    outs = tuple(n if o is None else o for o, n in zip(outs, x.shape[2:]))
    out = np.zeros(x.shape[:2] + outs)
    for pos in itertools.product(*map(range, outs)):
        sl = tuple(slice(i * n // o, -(-(i + 1) * n // o)) for i, n, o in zip(pos, x.shape[2:], outs))
        v = x[(slice(None), slice(None)) + sl].reshape(x.shape[:2] + (-1,))
        out[(slice(None), slice(None)) + pos] = v.max(axis=2) if mode == "max" else v.mean(axis=2)
    return out


def pool_options(op, id, tj_fn, nsp, mode, shape, ref=ref_pool_options, **kw):
    arg = distinct(shape) if mode == "max" else Arg(shape)
    add(op, id, lambda x: tj_fn(x, **kw), lambda x: ref(x, nsp=nsp, mode=mode, **kw), arg)


pool_options("nn.max_pool2d", "max_pool2d-dilation2-ceil", nn.max_pool2d, 2, "max", (1, 2, 8, 9),
             kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)
pool_options("nn.max_pool2d", "max_pool2d-ceil-no-padding", nn.max_pool2d, 2, "max",
             (2, 1, 5, 7), kernel_size=2, ceil_mode=True)


def pool_bias(op, id, tj_fn, shape, **kw):
    """max-pool of x plus a bias per channel: the bias gradient sums the scatter of the pooled
    cotangent over the spatial axes, which the IR passes turn into the sum of the pooled
    cotangent (passes._sum_of_max_pool_scatter). The bias keeps the values of each window
    distinct (one constant per channel)."""
    def fn(x, b):
        return tj_fn(x + tj.reshape(b, (1, -1, 1, 1)), **kw)

    def ref(x, b):
        return ref_pool_options(x + b.reshape(1, -1, 1, 1), nsp=2, mode="max", **kw)
    add(op, id, fn, ref, distinct(shape), Arg((shape[1],)))


pool_bias("nn.max_pool2d", "max_pool2d-k2-channel-bias", nn.max_pool2d, (2, 3, 4, 6),
          kernel_size=2)
pool_bias("nn.max_pool2d", "max_pool2d-overlapping-k3-s1-channel-bias", nn.max_pool2d,
          (2, 2, 5, 5), kernel_size=3, stride=1)
pool_bias("nn.max_pool2d", "max_pool2d-dilation2-ceil-pad1-channel-bias", nn.max_pool2d,
          (1, 2, 8, 9), kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)

pool_options("nn.max_pool1d", "max_pool1d-dilation3-s1-p1", nn.max_pool1d, 1, "max", (2, 2, 11),
             kernel_size=2, stride=1, padding=1, dilation=3)
pool_options("nn.avg_pool2d", "avg_pool2d-ceil-exclude-pad", nn.avg_pool2d, 2, "avg",
             (1, 2, 8, 7), kernel_size=3, stride=2, padding=1, ceil_mode=True,
             count_include_pad=False)
pool_options("nn.avg_pool2d", "avg_pool2d-ceil-include-pad", nn.avg_pool2d, 2, "avg",
             (2, 1, 6, 5), kernel_size=2, stride=2, padding=1, ceil_mode=True)
pool_options("nn.avg_pool2d", "avg_pool2d-divisor-override", nn.avg_pool2d, 2, "avg",
             (1, 2, 4, 5), kernel_size=2, stride=1, divisor_override=3)
pool_options("nn.avg_pool1d", "avg_pool1d-ceil-exclude-pad", nn.avg_pool1d, 1, "avg",
             (2, 2, 10), kernel_size=3, stride=2, padding=1, ceil_mode=True,
             count_include_pad=False)
pool_options("nn.adaptive_avg_pool2d", "adaptive_avg_pool2d-uneven", nn.adaptive_avg_pool2d, 2,
             "avg", (2, 2, 7, 8), ref=ref_adaptive, output_size=(3, 4))
pool_options("nn.adaptive_avg_pool2d", "adaptive_avg_pool2d-divisible-none",
             nn.adaptive_avg_pool2d, 2, "avg", (1, 2, 6, 5), ref=ref_adaptive,
             output_size=(2, None))
pool_options("nn.adaptive_avg_pool1d", "adaptive_avg_pool1d-uneven", nn.adaptive_avg_pool1d, 1,
             "avg", (2, 3, 10), ref=ref_adaptive, output_size=4)
pool_options("nn.adaptive_max_pool2d", "adaptive_max_pool2d-uneven", nn.adaptive_max_pool2d, 2,
             "max", (2, 2, 7, 8), ref=ref_adaptive, output_size=(3, 5))
pool_options("nn.adaptive_max_pool2d", "adaptive_max_pool2d-global", nn.adaptive_max_pool2d, 2,
             "max", (1, 3, 4, 6), ref=ref_adaptive, output_size=1)
pool_options("nn.adaptive_max_pool1d", "adaptive_max_pool1d-uneven", nn.adaptive_max_pool1d, 1,
             "max", (2, 2, 9), ref=ref_adaptive, output_size=4)

# linear algebra: batched matmul, einsum and friends, norms without decompositions ---------------
for _sa, _sb in (((2, 3, 4), (2, 4, 5)), ((3, 4), (2, 4, 5)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,)),
                 ((2, 1, 3, 4), (5, 4, 2))):
    add("matmul", f"matmul-batched-{_sid(_sa)}@{_sid(_sb)}", tj.matmul, np.matmul, Arg(_sa),
        Arg(_sb))
add("operator.@", "@-batched-2x3x4@2x4x5", lambda a, b: a @ b, np.matmul, Arg((2, 3, 4)),
    Arg((2, 4, 5)))
add("matmul", "matmul-batched-trans_b", lambda q, k: q @ k.swapaxes(-1, -2),
    lambda q, k: q @ k.swapaxes(-1, -2), Arg((2, 3, 4)), Arg((2, 5, 4)))
add("matmul", "matmul-batched-trans_a-broadcast", lambda a, b: a.swapaxes(-1, -2) @ b,
    lambda a, b: a.swapaxes(-1, -2) @ b, Arg((4, 3)), Arg((2, 4, 5)))
add("dot", "dot-2x3x4.2x4x3", tj.dot, np.dot, Arg((2, 3, 4)), Arg((2, 4, 3)))
EINSUMS = (("ij,jk->ik", (3, 4), (4, 5)), ("bij,bjk->bik", (2, 3, 4), (2, 4, 5)), ("ii->i", (4, 4)),
           ("ii", (3, 3)), ("ij->ji", (3, 4)), ("i,j->ij", (3,), (4,)), ("i,i", (4,), (4,)),
           ("bhqd,bhkd->bhqk", (2, 2, 3, 4), (2, 2, 5, 4)), ("ijk,jil->kl", (2, 3, 4), (3, 2, 5)),
           ("ij,jk,kl->il", (2, 3), (3, 4), (4, 5)), ("...ij,...jk", (2, 1, 3, 4), (3, 4, 2)),
           ("iij->j", (3, 3, 2)), ("ij,ij->i", (3, 4), (3, 4)), ("ji,jk", (4, 3), (4, 5)),
           ("ab,cd->", (2, 3), (3, 2)))
for _sub, *_shapes in EINSUMS:
    add("einsum", f"einsum-{_sub}", lambda *xs, _s=_sub: tj.einsum(_s, *xs),
        lambda *xs, _s=_sub: np.einsum(_s, *xs), *map(Arg, _shapes))
add("einsum", "np.einsum-dispatch", lambda a, b: np.einsum("ij,kj->ik", a, b),
    lambda a, b: np.einsum("ij,kj->ik", a, b), Arg((3, 4)), Arg((2, 4)))
for _axes, _sa, _sb in ((2, (2, 3, 4), (3, 4, 5)), (0, (2, 3), (4,)), (([0, 2], [2, 0]), (2, 3, 4),
                                                                    (4, 5, 2)), (1, (3, 4), (4,))):
    add("tensordot", f"tensordot-{_axes}-{_sid(_sa)}.{_sid(_sb)}",
        lambda a, b, _x=_axes: tj.tensordot(a, b, _x),
        lambda a, b, _x=_axes: np.tensordot(a, b, _x), Arg(_sa), Arg(_sb))
add("inner", "inner-2x3x4.5x4", tj.inner, np.inner, Arg((2, 3, 4)), Arg((5, 4)))
add("inner", "inner-4.4", lambda a, b: np.inner(a, b), np.inner, Arg((4,)), Arg((4,)))
add("vdot", "vdot-2x3.6", tj.vdot, np.vdot, Arg((2, 3)), Arg((6,)))
add("kron", "kron-2x3.4x1x2", tj.kron, np.kron, Arg((2, 3)), Arg((4, 1, 2)))
add("kron", "kron-3.2", lambda a, b: np.kron(a, b), np.kron, Arg((3,)), Arg((2,)))
add("cross", "cross-4x3.3", tj.cross, np.cross, Arg((4, 3)), Arg((3,)))
add("cross", "cross-axisa-axisb-axisc", lambda a, b: tj.cross(a, b, axisa=0, axisb=1, axisc=0),
    lambda a, b: np.cross(a, b, axisa=0, axisb=1, axisc=0), Arg((3, 4)), Arg((4, 3)))
add("cross", "cross-axis", lambda a, b: np.cross(a, b, axis=0),
    lambda a, b: np.cross(a, b, axis=0), Arg((3, 2)), Arg((3, 2)))
for _ord in (-np.inf, 0, 3, 0.5):
    add("norm", f"norm-vector-ord{_ord}", lambda x, _o=_ord: tj.norm(x, _o),
        lambda x, _o=_ord: np.linalg.norm(x, _o), nonzero((5,)))
add("norm", "norm-vector-ord3-axis0", lambda x: tj.norm(x, 3, axis=0),
    lambda x: np.linalg.norm(x, 3, axis=0), nonzero((4, 3)))
for _ord in ("fro", 1, -1, np.inf, -np.inf):
    add("norm", f"norm-matrix-ord{_ord}", lambda x, _o=_ord: tj.norm(x, _o),
        lambda x, _o=_ord: np.linalg.norm(x, _o), nonzero((3, 4)))
add("norm", "norm-matrix-ord1-axes-keepdims",
    lambda x: np.linalg.norm(x, 1, axis=(2, 0), keepdims=True),
    lambda x: np.linalg.norm(x, 1, axis=(2, 0), keepdims=True), nonzero((3, 2, 4)))
# adaptive max pooling with indices: the values (the indices are checked against PyTorch in
# test_conv_options), odd sizes with overlapping windows, and the first maximum taking the gradient
pool_options("nn.adaptive_max_pool2d", "adaptive_max_pool2d-overlap-return_indices",
             lambda x, **kw: nn.adaptive_max_pool2d(x, **kw, return_indices=True)[0], 2, "max",
             (2, 3, 7, 5), ref=ref_adaptive, output_size=(4, 3))
pool_options("nn.adaptive_max_pool1d", "adaptive_max_pool1d-overlap-return_indices",
             lambda x, **kw: nn.adaptive_max_pool1d(x, **kw, return_indices=True)[0], 1, "max",
             (2, 2, 7), ref=ref_adaptive, output_size=5)

# numpy functions and spellings the everyday sweep found missing ----------------------------------
add("vector_norm", "vector_norm-ord3-axes-keepdims",
    lambda x: tj.vector_norm(x, axis=(0, 2), keepdims=True, ord=3),
    lambda x: np.linalg.vector_norm(x, axis=(0, 2), keepdims=True, ord=3), nonzero((2, 3, 4)))
add("vector_norm", "np.linalg.vector_norm-all-inf", lambda x: np.linalg.vector_norm(x, ord=np.inf),
    lambda x: np.linalg.vector_norm(x, ord=np.inf), distinct((3, 4), lo=0.1))
add("matrix_norm", "np.linalg.matrix_norm-ord1-batched",
    lambda x: np.linalg.matrix_norm(x, ord=1), lambda x: np.linalg.matrix_norm(x, ord=1),
    distinct((2, 3, 4)))
add("matrix_norm", "matrix_norm-fro-keepdims", lambda x: tj.matrix_norm(x, keepdims=True),
    lambda x: np.linalg.matrix_norm(x, keepdims=True), nonzero((2, 3, 4)))
add("norm", "method.norm-torch-p1-dim", lambda x: x.norm(p=1, dim=1, keepdim=True),
    lambda x: np.abs(x).sum(1, keepdims=True), nonzero((2, 3, 4)))
add("norm", "norm-torch-p3-all", lambda x: tj.norm(x, p=3),
    lambda x: np.sum(np.abs(x) ** 3) ** (1 / 3), nonzero((3, 4)))
add("vecdot", "vecdot-broadcast", tj.vecdot, np.vecdot, Arg((2, 3, 4)), Arg((3, 4)))
add("vecdot", "np.vecdot-axis0", lambda a, b: np.vecdot(a, b, axis=0),
    lambda a, b: np.vecdot(a, b, axis=0), Arg((3, 4)), Arg((3, 4)), second_order=False)
add("matrix_transpose", "matrix_transpose-3d", tj.matrix_transpose, np.matrix_transpose,
    Arg((2, 3, 4)))
add("trace", "np.linalg.trace-last-axes-offset", lambda x: np.linalg.trace(x, offset=1),
    lambda x: np.linalg.trace(x, offset=1), Arg((2, 3, 4)))
add("diagonal", "np.linalg.diagonal-last-axes", np.linalg.diagonal, np.linalg.diagonal,
    Arg((2, 3, 4)), second_order=False)
add("outer", "np.linalg.outer", np.linalg.outer, np.linalg.outer, Arg((3,)), Arg((4,)),
    second_order=False)
add("multi_dot", "multi_dot-vector-ends", lambda a, b, c: tj.multi_dot([a, b, c]),
    lambda a, b, c: np.linalg.multi_dot([a, b, c]), Arg((3,)), Arg((3, 4)), Arg((4,)))
add("broadcast_to", "broadcast_to-3x1-to-2x3x4", lambda x: tj.broadcast_to(x, (2, 3, 4)),
    lambda x: np.broadcast_to(x, (2, 3, 4)), Arg((3, 1)))
add("broadcast_to", "np.broadcast_to-int-shape", lambda x: np.broadcast_to(x, 5),
    lambda x: np.broadcast_to(x, 5), Arg((1,)), second_order=False)
add("take", "take-axis1-repeats", lambda x: tj.take(x, [2, 0, 2, -1], axis=1),
    lambda x: np.take(x, [2, 0, 2, -1], axis=1), Arg((2, 3, 4)))
add("take", "np.take-flat-2d-indices", lambda x: np.take(x, [[0, 5], [11, 5]]),
    lambda x: np.take(x, [[0, 5], [11, 5]]), Arg((3, 4)))
add("take", "take-mode-wrap", lambda x: tj.take(x, [-5, 4], mode="wrap"),
    lambda x: np.take(x, [-5, 4], mode="wrap"), Arg((3,)))
add("take", "take-mode-clip", lambda x: tj.take(x, [-5, 9], axis=0, mode="clip"),
    lambda x: np.take(x, [-5, 9], axis=0, mode="clip"), Arg((3, 2)))
add("cumulative_sum", "cumulative_sum-include_initial",
    lambda x: tj.cumulative_sum(x, axis=1, include_initial=True),
    lambda x: np.cumulative_sum(x, axis=1, include_initial=True), Arg((2, 3)))
add("cumulative_prod", "np.cumulative_prod-1d", np.cumulative_prod, np.cumulative_prod,
    Arg((4,)))
add("ptp", "ptp-axis1-keepdims", lambda x: tj.ptp(x, 1, keepdims=True),
    lambda x: np.ptp(x, 1, keepdims=True), distinct((3, 4)))
add("positive", "np.positive", np.positive, np.positive, Arg((2, 3)))
add("cbrt", "np.cbrt", np.cbrt, np.cbrt, Arg((4,), lo=-9.0, hi=9.0, avoid=(0.0,)))
# (float_power's result is float64 for float32 operands: checked in test_ops_everyday)
add("float_power", "float_power", lambda a, b: tj.float_power(a, b).astype(a.dtype),
    np.float_power, pos((2, 3)), Arg((3,)))
add("fix", "np.fix", np.fix, np.fix, Arg((2, 3), lo=-3, hi=3, avoid=(-2.0, -1.0, 0.0, 1.0, 2.0)))
for _name in ("isnan", "isinf", "isfinite"):
    add(_name, f"{_name}-inf-nan", lambda x, _n=_name: getattr(tj, _n)(tj.log(x) * x),
        lambda x, _n=_name: getattr(np, _n)(np.log(x) * x), Arg((7,), lo=-1.0, hi=1.0),
        grad=False)
add("logical_xor", "logical_xor-masks", lambda a, b: tj.logical_xor(a > 0, b),
    lambda a, b: np.logical_xor(a > 0, b), nonzero((2, 5)), nonzero((5,)), grad=False)
add("any", "any-axis0-keepdims", lambda x: tj.any(x > 1.0, 0, keepdims=True),
    lambda x: np.any(x > 1.0, 0, keepdims=True), Arg((3, 4), avoid=(1.0,)), grad=False)
add("all", "np.all-axis1", lambda x: np.all(x > -1.0, axis=1), lambda x: np.all(x > -1.0, axis=1),
    Arg((4, 3), avoid=(-1.0,)), grad=False)
# numpy's positional order (dtype before keepdims); converting dtypes is in test_ops_everyday
add("sum", "np.sum-positional-dtype-keepdims", lambda x: np.sum(x, 1, x.dtype, None, True),
    lambda x: np.sum(x, 1, x.dtype, None, True), Arg((3, 4)), second_order=False)
add("mean", "np.mean-positional-dtype", lambda x: np.mean(x, 1, x.dtype),
    lambda x: np.mean(x, 1, x.dtype), Arg((3, 4)), second_order=False)
add("var", "np.var-positional-ddof", lambda x: np.var(x, 0, None, None, 1),
    lambda x: np.var(x, 0, None, None, 1), Arg((3, 4)), second_order=False)
add("std", "method.std-torch-unbiased", lambda x: x.std(dim=1, unbiased=True, keepdim=True),
    lambda x: x.std(1, ddof=1, keepdims=True), Arg((3, 4)), second_order=False)
add("prod", "method.prod-dtype", lambda x: x.prod(0, dtype=x.dtype),
    lambda x: x.prod(0, dtype=x.dtype), Arg((3, 4)), second_order=False)
add("cumsum", "np.cumsum-positional-dtype", lambda x: np.cumsum(x, 1, x.dtype),
    lambda x: np.cumsum(x, 1, x.dtype), Arg((3, 4)), second_order=False)
add("trace", "method.trace-axis1-axis2", lambda x: x.trace(axis1=1, axis2=2),
    lambda x: x.trace(axis1=1, axis2=2), Arg((2, 3, 4)), second_order=False)
add("diagonal", "method.diagonal-offset-axes", lambda x: x.diagonal(1, axis1=2, axis2=0),
    lambda x: x.diagonal(1, axis1=2, axis2=0), Arg((3, 2, 4)), second_order=False)
add("swapaxes", "np.swapaxes-keywords", lambda x: np.swapaxes(x, axis1=0, axis2=2),
    lambda x: np.swapaxes(x, axis1=0, axis2=2), Arg((2, 3, 4)), second_order=False)
add("concatenate", "np.concatenate-axis-None", lambda a, b: np.concatenate([a, b], axis=None),
    lambda a, b: np.concatenate([a, b], axis=None), Arg((2, 3)), Arg((4,)), second_order=False)
add("vstack", "np.row_stack", lambda a, b: np.row_stack([a, b]), lambda a, b: np.vstack([a, b]),
    Arg((3,)), Arg((3,)), second_order=False)
add("hstack", "np.hstack-dtype", lambda a, b: np.hstack([a, b], dtype=a.dtype),
    lambda a, b: np.hstack([a, b], dtype=a.dtype), Arg((2,)), Arg((3,)), second_order=False)
add("diff", "np.diff-prepend-append", lambda x: np.diff(x, axis=0, prepend=0.5, append=x[:1]),
    lambda x: np.diff(x, axis=0, prepend=0.5, append=x[:1]), Arg((3, 4)))
add("diff", "diff-n2-prepend-array", lambda x, p: tj.diff(x, 2, prepend=p),
    lambda x, p: np.diff(x, 2, prepend=p), Arg((2, 4)), Arg((2, 2)))
# END linear algebra
# more of numpy and PyTorch's tensor methods (ids "more-..."): forward against numpy, gradients
# against differences of the numpy reference; several outputs of one call are stacked into one.
# Second order only where an entry adds arithmetic of its own: composites of ops whose second order
# the table checks already (conv1d, sort, matmul, layout) skip it (CI time)
_XP = np.array([-1.5, -0.4, 0.3, 1.1, 1.8])
_MASK = np.array([[True, False, True, True], [False, False, True, False], [True] * 4])
MORE = [
    ("copysign", "np.copysign", np.copysign, np.copysign, nonzero((2, 3)), nonzero((3,))),
    ("signbit", "np.signbit", np.signbit, np.signbit, nonzero((2, 3)), dict(grad=False)),
    # floor(a) has zeros: there heaviside takes b, and b's gradient is 1
    ("heaviside", "np.heaviside-at-zero", lambda a, b: np.heaviside(np.floor(a), b),
     lambda a, b: np.heaviside(np.floor(a), b), Arg((2, 4), avoid=(-1.0, 0.0, 1.0)),
     Arg((4,))),
    ("floor_divide", "np.floor_divide", lambda a, b: np.floor_divide(a * 3.0, b),
     lambda a, b: np.floor_divide(a * 3.0, b), Arg((2, 3)), nonzero((3,))),
    ("operator.//", "operator-floordiv", lambda a, b: (a * 3.0) // b + 2.0 // b,
     lambda a, b: (a * 3.0) // b + 2.0 // b, Arg((2, 3)), nonzero((3,)), dict(grad=False)),
    ("sinc", "np.sinc", np.sinc, np.sinc, Arg((2, 4), lo=-3.0, hi=3.0)),
    ("isclose", "np.isclose-rtol", lambda a, b: np.isclose(a, a + b * 1e-3, rtol=1e-3),
     lambda a, b: np.isclose(a, a + b * 1e-3, rtol=1e-3), Arg((2, 4)), Arg((4,)),
     dict(grad=False)),
    ("allclose", "allclose-0d-bool", lambda a, b: tj.allclose(a, a + b * 1e-9),
     lambda a, b: np.asarray(np.allclose(a, a + b * 1e-9)), Arg((2, 3)), Arg((3,)),
     dict(grad=False)),
    ("count_nonzero", "count_nonzero-axis-keepdims",
     lambda x: tj.count_nonzero(x > 0, axis=1, keepdims=True).astype(x.dtype),
     lambda x: np.count_nonzero(x > 0, axis=1, keepdims=True).astype(x.dtype),
     nonzero((3, 4)), dict(grad=False)),
    ("average", "np.average-weights-1d-returned",
     lambda x, w: tj.stack(np.average(x, axis=1, weights=w, returned=True)),
     lambda x, w: np.stack(np.average(x, axis=1, weights=w, returned=True)), Arg((2, 3)),
     pos((3,))),
    ("average", "average-weights-full", lambda x, w: tj.average(x, weights=w),
     lambda x, w: np.average(x, weights=w), Arg((2, 3)), pos((2, 3)), dict(second_order=False)),
    ("meshgrid", "np.meshgrid-xy", lambda a, b: tj.stack(np.meshgrid(a, b)),
     lambda a, b: np.stack(np.meshgrid(a, b)), Arg((3,)), Arg((2,)), dict(second_order=False)),
    ("meshgrid", "meshgrid-ij-3", lambda a, b, c: tj.stack(tj.meshgrid(a, b, c, indexing="ij")),
     lambda a, b, c: np.stack(np.meshgrid(a, b, c, indexing="ij")), Arg((2,)), Arg((3,)),
     Arg((2,)), dict(second_order=False)),
    # x covers both ends (fp[0] and fp[-1] beyond) and stays away from the knots
    ("interp", "np.interp-constant-xp", lambda x, fp: np.interp(x, _XP, fp),
     lambda x, fp: np.interp(x, _XP, fp), Arg((2, 4), lo=-2.5, hi=2.5, avoid=tuple(_XP)),
     Arg((5,)), dict(second_order=False)),
    ("interp", "interp-traced-xp-left-right",
     lambda x, d, fp: tj.interp(x, tj.cumsum(tj.exp(d)) - 2.0, fp, left=-3.0, right=fp[0]),
     lambda x, d, fp: np.interp(x, np.cumsum(np.exp(d)) - 2.0, fp, left=-3.0, right=fp[0]),
     Arg((6,), lo=-2.5, hi=5.0), Arg((4,), lo=-1.0, hi=0.5), Arg((4,)),
     dict(second_order=False)),
    ("convolve", "np.convolve-full-same-valid",
     lambda a, v: tj.concatenate([np.convolve(a, v), np.convolve(a, v, "same"),
                                  np.convolve(v, a, "valid")]),
     lambda a, v: np.concatenate([np.convolve(a, v), np.convolve(a, v, "same"),
                                  np.convolve(v, a, "valid")]), Arg((7,)), Arg((4,)),
     dict(second_order=False)),
    ("correlate", "np.correlate-full-same-valid-shorter-a",
     lambda a, v: tj.concatenate([np.correlate(a, v, "full"), np.correlate(a, v, "same"),
                                  np.correlate(a, v), np.correlate(v, a, "same")]),
     lambda a, v: np.concatenate([np.correlate(a, v, "full"), np.correlate(a, v, "same"),
                                  np.correlate(a, v), np.correlate(v, a, "same")]),
     Arg((4,)), Arg((6,)), dict(second_order=False)),
    ("cov", "np.cov-rows", np.cov, np.cov, Arg((3, 5))),
    ("cov", "cov-columns-y-ddof-bias", lambda x, y: tj.stack(
        [tj.cov(x, y, rowvar=False, ddof=0), tj.cov(x, y, rowvar=False, bias=True)]),
     lambda x, y: np.stack([np.cov(x, y, rowvar=False, ddof=0),
                            np.cov(x, y, rowvar=False, bias=True)]), Arg((5, 2)), Arg((5,)),
     dict(second_order=False)),
    ("corrcoef", "np.corrcoef-x-y", np.corrcoef, np.corrcoef, Arg((2, 5)), Arg((5,)),
     dict(second_order=False)),
    ("median", "np.median-axis1-even-odd",
     lambda x: tj.concatenate([np.median(x, axis=1), np.median(x[:, :3], 1)]),
     lambda x: np.concatenate([np.median(x, axis=1), np.median(x[:, :3], 1)]),
     distinct((3, 4)), dict(second_order=False)),
    ("quantile", "np.quantile-1d-q-axis0-keepdims",
     lambda x: np.quantile(x, [0.0, 0.3, 0.5, 1.0], axis=0, keepdims=True),
     lambda x: np.quantile(x, [0.0, 0.3, 0.5, 1.0], axis=0, keepdims=True), distinct((5, 3)),
     dict(second_order=False)),
    ("percentile", "np.percentile-axes-all", lambda x: np.percentile(x, 37.0),
     lambda x: np.percentile(x, 37.0), distinct((3, 4)), dict(second_order=False)),
    # numpy's initial= and where= of the reductions
    ("sum", "np.sum-where-initial", lambda x: np.sum(x, 1, where=_MASK, initial=0.5),
     lambda x: np.sum(x, 1, where=_MASK, initial=0.5), Arg((3, 4)), dict(second_order=False)),
    ("mean", "np.mean-where-keepdims", lambda x: np.mean(x, 0, where=_MASK, keepdims=True),
     lambda x: np.mean(x, 0, where=_MASK, keepdims=True), Arg((3, 4)),
     dict(second_order=False)),
    ("max", "np.max-where-initial", lambda x: np.max(x, 1, where=_MASK, initial=-1.0),
     lambda x: np.max(x, 1, where=_MASK, initial=-1.0), distinct((3, 4), lo=-0.9),
     dict(second_order=False)),
    ("min", "method.min-initial", lambda x: x.min(initial=0.25), lambda x: x.min(initial=0.25),
     distinct((3, 4)), dict(second_order=False)),
    ("prod", "np.prod-where-initial", lambda x: np.prod(x, 0, where=_MASK, initial=2.0),
     lambda x: np.prod(x, 0, where=_MASK, initial=2.0), Arg((3, 4)), dict(second_order=False)),
    # PyTorch's tensor methods (numpy references; test_ops_everyday compares with PyTorch)
    ("method.amax", "method.amax-dim-keepdim", lambda x: x.amax(1, keepdim=True),
     lambda x: x.max(1, keepdims=True), distinct((3, 4))),
    ("method.amin", "method.amin-dims", lambda x: x.amin(dim=(0, 2)),
     lambda x: x.min((0, 2)), distinct((2, 3, 2))),
    ("method.expand", "method.expand-minus1-new-dim", lambda x: x.expand(2, -1, 4),
     lambda x: np.broadcast_to(x, (2, 3, 4)), Arg((3, 1)), dict(second_order=False)),
    ("method.flip", "method.flip-dims", lambda x: x.flip((0, 2)), lambda x: np.flip(x, (0, 2)),
     Arg((2, 3, 2)), dict(second_order=False)),
    ("method.roll", "method.roll-shifts-dims", lambda x: x.roll((1, -2), (0, 1)),
     lambda x: np.roll(x, (1, -2), (0, 1)), Arg((3, 4)), dict(second_order=False)),
    ("method.chunk", "method.chunk-uneven", lambda x: x.chunk(3, 1)[1] * x.chunk(3, 1)[2][:, :1],
     lambda x: x[:, 2:4] * x[:, 4:5], Arg((2, 5))),
    ("method.split", "method.split-size-and-sections",
     lambda x: tj.concatenate([x.split(2, dim=1)[2], x.split([1, 4], 1)[1][:, :1]], 1),
     lambda x: np.concatenate([x[:, 4:], x[:, 1:2]], 1), Arg((2, 5)),
     dict(second_order=False)),
    ("method.masked_fill", "method.masked_fill", lambda x: x.masked_fill(x > 0.5, -1.0),
     lambda x: np.where(x > 0.5, -1.0, x), Arg((3, 4), avoid=(0.5,)), dict(second_order=False)),
    ("method.softmax", "method.softmax-dim0", lambda x: x.softmax(0),
     lambda x: np.exp(x) / np.exp(x).sum(0), Arg((3, 4))),
    ("method.log_softmax", "method.log_softmax-dim1", lambda x: x.log_softmax(dim=1),
     lambda x: x - np.log(np.exp(x).sum(1, keepdims=True)), Arg((3, 4))),
    ("method.square", "method.square-neg", lambda x: x.square().neg(), lambda x: -x * x,
     Arg((3,))),
    ("method.clamp_min", "method.clamp_min-clamp_max", lambda x: x.clamp_min(-0.5).clamp_max(1.0),
     lambda x: np.clip(x, -0.5, 1.0), Arg((6,), avoid=(-0.5, 1.0)), dict(second_order=False)),
    ("method.swapdims", "method.swapdims", lambda x: x.swapdims(0, 2),
     lambda x: np.swapaxes(x, 0, 2), Arg((2, 3, 4)), dict(second_order=False)),
    ("method.reshape", "method.reshape-shape-keyword", lambda x: x.reshape(shape=(3, -1)),
     lambda x: x.reshape(3, -1), Arg((2, 3)), dict(second_order=False)),
    ("method.contiguous", "method.contiguous-double",
     lambda x: x.contiguous().double().astype(x.dtype), lambda x: x, Arg((3,)),
     dict(second_order=False)),
    ("method.repeat", "method.repeat-numpy-meaning", lambda x: x.repeat(2, 1),
     lambda x: x.repeat(2, 1), Arg((2, 3)), dict(second_order=False)),
]
for _op, _id, _fn, _ref, *_args in MORE:
    _flags = _args.pop() if _args and isinstance(_args[-1], dict) else {}
    add(_op, f"more-{_id}", _fn, _ref, *_args, **_flags)

GRAD_CASES = [c for c in CASES if c.grad]
SECOND_ORDER_CASES = [c for c in GRAD_CASES if c.second_order]

# ------------------------------------------------------------------------------------------------
# at kinks, where finite differences are no oracle: the documented conventions (ir/prims), exactly
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class KinkCase:
    id: str
    fn: Callable             # scalar tracejit function of one array
    x: tuple                 # the point (nested tuples)
    grad: tuple              # the gradient there


KINKS = [
    KinkCase("relu-derivative-0-at-0", lambda x: nn.relu(x).sum(), (-1, 0, 1), (0, 0, 1)),
    KinkCase("abs-derivative-0-at-0", lambda x: tj.abs(x).sum(), (-1, 0, 1), (-1, 0, 1)),
    KinkCase("maximum-tie-halves", lambda x: tj.maximum(x, 1.0).sum(), (0, 1, 2), (0, 0.5, 1)),
    KinkCase("minimum-tie-halves", lambda x: tj.minimum(x, 1.0).sum(), (0, 1, 2), (1, 0.5, 0)),
    KinkCase("maximum-of-equal-operands", lambda x: tj.maximum(x, x * 1.0).sum(), (1, -2),
             (1, 1)),
    KinkCase("clip-at-bounds", lambda x: tj.clip(x, 0.0, 1.0).sum(), (-1, 0, 0.5, 1, 2),
             (0, 0.5, 1, 0.5, 0)),
    KinkCase("max-splits-ties", lambda x: x.max(), (1, 3, 3), (0, 0.5, 0.5)),
    KinkCase("max-axis-splits-ties", lambda x: x.max(axis=1).sum(), ((2, 2, 1), (0, 1, 4)),
             ((0.5, 0.5, 0), (0, 0, 1))),
    KinkCase("min-splits-ties", lambda x: x.min(), (1, 1, 3), (0.5, 0.5, 0)),
    KinkCase("max_pool1d-first-maximum", lambda x: nn.max_pool1d(x.reshape(1, 1, -1), 3).sum(),
             (1, 3, 3), (0, 1, 0)),
    KinkCase("max_pool2d-first-maximum", lambda x: nn.max_pool2d(x.reshape(1, 1, 2, 2), 2).sum(),
             ((5, 5), (5, 5)), ((1, 0), (0, 0))),
    KinkCase("max_pool2d-padding-never-wins",
             lambda x: nn.max_pool2d(x.reshape(1, 1, 2, 2), 2, padding=1).sum(),
             ((-1, -1), (-1, -1)), ((1, 1), (1, 1))),
    KinkCase("where-at-the-boundary", lambda x: tj.where(x > 0, x, 2 * x).sum(), (-1, 0, 1),
             (2, 2, 1)),
    KinkCase("sign-has-zero-derivative", lambda x: (tj.sign(x) * 3.0).sum(), (-1, 0, 1),
             (0, 0, 0)),
]


KINKS += [
    KinkCase("adaptive_max_pool2d-first-maximum-of-overlapping-windows",
             lambda x: nn.adaptive_max_pool2d(x.reshape(1, 1, 3, 3), 2).sum(),
             ((5, 5, 5), (5, 5, 5), (5, 5, 5)), ((1, 1, 0), (1, 1, 0), (0, 0, 0))),
    KinkCase("adaptive_max_pool1d-first-maximum-of-overlapping-windows",
             lambda x: nn.adaptive_max_pool1d(x.reshape(1, 1, 5), 3, return_indices=True)[0].sum(),
             (5, 5, 5, 5, 5), (1, 1, 0, 1, 0)),
]
KINKS += [
    KinkCase("remainder-at-exact-multiples-has-fmods-gradient", lambda x: (x % 1.5).sum(),
             (3.0, -3.0, 0.0, 2.5), (1, 1, 1, 1)),
    KinkCase("remainder-divisor-at-exact-multiples", lambda x: tj.remainder(3.0, x).sum(),
             (1.5, -1.5, 1.0), (-2, 2, -3)),
]

"""Layout primitives: broadcast_in_dim, reshape, transpose, slice, pad, concatenate.

All are linear, so each adjoint is another layout primitive (or a reduction for broadcast).
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..jvp_rules import jvp_rules
from ..core import ShapeError, Value, primitive, shape_rules
from ..interpreter import impls

broadcast_in_dim_p = primitive("broadcast_in_dim", "layout")
reshape_p = primitive("reshape", "layout")
transpose_p = primitive("transpose", "layout")
slice_p = primitive("slice", "layout")
pad_p = primitive("pad", "layout")
concatenate_p = primitive("concatenate", "layout")


# --------------------------------------------------------------------------- broadcast_in_dim
@shape_rules.register(broadcast_in_dim_p)
def _broadcast_shape(x, *, shape, dims):
    if len(dims) != x.ndim or any(d >= len(shape) for d in dims) or list(dims) != sorted(set(dims)):
        raise ShapeError(f"cannot broadcast {x} to {list(shape)} along dims {dims}")
    for i, d in enumerate(dims):
        if x.shape[i] not in (1, shape[d]):
            raise ShapeError(f"cannot broadcast {x} to {list(shape)}: dimension {i} is "
                             f"{x.shape[i]}, target {shape[d]}")
    return x.with_shape(shape)


@impls.register(broadcast_in_dim_p)
def _broadcast_impl(x, *, shape, dims):
    expanded = [1] * len(shape)
    for i, d in enumerate(dims):
        expanded[d] = x.shape[i]
    return np.broadcast_to(x.reshape(expanded), shape)


def broadcast_in_dim(x: Value, shape, dims) -> Value:
    shape, dims = tuple(shape), tuple(dims)
    if x.shape == shape and dims == tuple(range(len(shape))):
        return x
    return emit(broadcast_in_dim_p, x, shape=shape, dims=dims)


def broadcast_to(x: Value, shape) -> Value:
    """numpy-style broadcast (align trailing dimensions)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    if x.ndim > len(shape):
        raise ShapeError(f"cannot broadcast {x.type} to {list(shape)}")
    offset = len(shape) - x.ndim
    return broadcast_in_dim(x, shape, tuple(range(offset, len(shape))))


@adjoint_rules.register(broadcast_in_dim_p)
def _broadcast_adjoint(ct, x, *, shape, dims):
    from .reduce import reduce_sum
    summed = tuple(d for d in range(len(shape)) if d not in dims)
    expanded = tuple(d for i, d in enumerate(dims) if x.shape[i] == 1 and shape[d] != 1)
    out = reduce_sum(ct, tuple(sorted(summed + expanded)))
    return (reshape(out, x.shape),)


# --------------------------------------------------------------------------- reshape
@shape_rules.register(reshape_p)
def _reshape_shape(x, *, shape):
    if int(np.prod(shape, dtype=np.int64)) != x.size:
        raise ShapeError(f"cannot reshape {x} to {list(shape)}")
    return x.with_shape(shape)


impls[reshape_p] = lambda x, *, shape: x.reshape(shape)


def reshape(x: Value, shape) -> Value:
    shape = tuple(int(s) for s in shape)
    if x.shape == shape:
        return x
    return emit(reshape_p, x, shape=shape)


adjoint_rules[reshape_p] = lambda ct, x, *, shape: (reshape(ct, x.shape),)


# --------------------------------------------------------------------------- transpose
@shape_rules.register(transpose_p)
def _transpose_shape(x, *, perm):
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"transpose of {x} needs a permutation of {x.ndim} axes, got {perm}")
    return x.with_shape([x.shape[p] for p in perm])


impls[transpose_p] = lambda x, *, perm: np.transpose(x, perm)


def transpose(x: Value, perm) -> Value:
    perm = tuple(int(p) for p in perm)
    if perm == tuple(range(x.ndim)):
        return x
    return emit(transpose_p, x, perm=perm)


adjoint_rules[transpose_p] = lambda ct, x, *, perm: (transpose(ct, tuple(np.argsort(perm))),)


# --------------------------------------------------------------------------- slice
def _slice_len(start, limit, stride):
    return max(0, -(-(limit - start) // stride))


@shape_rules.register(slice_p)
def _slice_shape(x, *, start, limit, strides):
    if not (len(start) == len(limit) == len(strides) == x.ndim):
        raise ShapeError(f"slice of {x} needs {x.ndim} starts, limits and strides")
    for s, l, k, n in zip(start, limit, strides, x.shape):
        if not (0 <= s <= l <= n) or k < 1:
            raise ShapeError(f"slice [{s}:{l}:{k}] out of range for dimension of size {n} in {x}")
    return x.with_shape([_slice_len(s, l, k) for s, l, k in zip(start, limit, strides)])


impls[slice_p] = lambda x, *, start, limit, strides: x[
    tuple(slice(s, l, k) for s, l, k in zip(start, limit, strides))]


def slice_(x: Value, start, limit, strides=None) -> Value:
    strides = tuple(strides) if strides is not None else (1,) * x.ndim
    start, limit = tuple(start), tuple(limit)
    if start == (0,) * x.ndim and limit == x.shape and strides == (1,) * x.ndim:
        return x
    return emit(slice_p, x, start=start, limit=limit, strides=strides)


@adjoint_rules.register(slice_p)
def _slice_adjoint(ct, x, *, start, limit, strides):
    lo, hi, interior = [], [], []
    for s, k, m, n in zip(start, strides, ct.shape, x.shape):
        lo.append(s)
        interior.append(k - 1)
        hi.append(n - s - (m - 1) * k - 1 if m > 0 else n - s)
    return (pad(ct, tuple(lo), tuple(hi), tuple(interior)),)


# --------------------------------------------------------------------------- pad (zeros)
@shape_rules.register(pad_p)
def _pad_shape(x, *, lo, hi, interior):
    if min(lo + hi + interior, default=0) < 0:
        raise ShapeError(f"pad amounts must be non-negative, got lo={lo} hi={hi} interior={interior}")
    return x.with_shape([l + n + max(n - 1, 0) * i + h
                         for n, l, h, i in zip(x.shape, lo, hi, interior)])


@impls.register(pad_p)
def _pad_impl(x, *, lo, hi, interior):
    out_shape = [l + n + max(n - 1, 0) * i + h for n, l, h, i in zip(x.shape, lo, hi, interior)]
    out = np.zeros(out_shape, dtype=x.dtype)
    out[tuple(slice(l, l + max(n - 1, 0) * (i + 1) + 1 if n else l, i + 1)
              for n, l, i in zip(x.shape, lo, interior))] = x
    return out


def pad(x: Value, lo, hi, interior=None) -> Value:
    interior = tuple(interior) if interior is not None else (0,) * x.ndim
    lo, hi = tuple(lo), tuple(hi)
    if not any(lo + hi + interior):
        return x
    return emit(pad_p, x, lo=lo, hi=hi, interior=interior)


@adjoint_rules.register(pad_p)
def _pad_adjoint(ct, x, *, lo, hi, interior):
    limit = tuple(l + max(n - 1, 0) * (i + 1) + 1 if n else l
                  for n, l, i in zip(x.shape, lo, interior))
    return (slice_(ct, lo, limit, tuple(i + 1 for i in interior)),)


# --------------------------------------------------------------------------- concatenate
@shape_rules.register(concatenate_p)
def _concat_shape(*xs, axis):
    first = xs[0]
    for x in xs[1:]:
        if x.dtype != first.dtype or x.ndim != first.ndim or any(
                a != b for i, (a, b) in enumerate(zip(x.shape, first.shape)) if i != axis):
            raise ShapeError(f"cannot concatenate {first} and {x} along axis {axis}")
    shape = list(first.shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return first.with_shape(shape)


impls[concatenate_p] = lambda *xs, axis: np.concatenate(xs, axis=axis)


def concatenate(xs, axis: int) -> Value:
    xs = list(xs)
    if len(xs) == 1:
        return xs[0]
    return emit(concatenate_p, *xs, axis=int(axis))


@adjoint_rules.register(concatenate_p)
def _concat_adjoint(ct, *xs, axis):
    out, offset = [], 0
    for x in xs:
        start = [0] * ct.ndim
        limit = list(ct.shape)
        start[axis], limit[axis] = offset, offset + x.shape[axis]
        out.append(slice_(ct, start, limit))
        offset += x.shape[axis]
    return tuple(out)


# --------------------------------------------------------------------------- tangent rules
# Linear: the tangent is the same primitive applied to the tangent (its axes shifted past the
# batch axis of batched tangents, see ir.jvp_rules).
@jvp_rules.register(broadcast_in_dim_p)
def _broadcast_jvp(ts, tans, out, x, *, shape, dims):
    return broadcast_in_dim(tans[0], ts.shape(shape), tuple(range(ts.k)) + ts.axes(dims))


jvp_rules[reshape_p] = lambda ts, tans, out, x, *, shape: reshape(tans[0], ts.shape(shape))
jvp_rules[transpose_p] = lambda ts, tans, out, x, *, perm: transpose(
    tans[0], tuple(range(ts.k)) + ts.axes(perm))


@jvp_rules.register(slice_p)
def _slice_jvp(ts, tans, out, x, *, start, limit, strides):
    return slice_(tans[0], (0,) * ts.k + tuple(start), ts.lead + tuple(limit),
                  (1,) * ts.k + tuple(strides))


@jvp_rules.register(pad_p)
def _pad_jvp(ts, tans, out, x, *, lo, hi, interior):
    zero = (0,) * ts.k
    return pad(tans[0], zero + tuple(lo), zero + tuple(hi), zero + tuple(interior))


@jvp_rules.register(concatenate_p)
def _concat_jvp(ts, tans, out, *xs, axis):
    return concatenate([ts.materialize(t, x) for t, x in zip(tans, xs)], ts.axis(axis))

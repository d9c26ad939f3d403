"""Reductions over a set of axes (the reduced axes are removed; keepdims is a reshape in ir.lax).

reduce_max propagates NaN like numpy; its adjoint splits the cotangent evenly among tied maxima.
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..jvp_rules import jvp_rules
from ..core import ShapeError, Value, primitive, shape_rules
from ..interpreter import impls
from . import elementwise as ew
from . import structural as st

reduce_sum_p = primitive("reduce_sum", "reduce")
reduce_max_p = primitive("reduce_max", "reduce")


def _reduce_shape(x, *, axes):
    if len(set(axes)) != len(axes) or any(not 0 <= a < x.ndim for a in axes):
        raise ShapeError(f"invalid reduction axes {axes} for {x}")
    return x.with_shape([n for i, n in enumerate(x.shape) if i not in axes])


shape_rules[reduce_sum_p] = _reduce_shape


@shape_rules.register(reduce_max_p)
def _reduce_max_shape(x, *, axes):
    if any(x.shape[a] == 0 for a in axes):
        raise ShapeError(f"max of an empty axis of {x}")
    return _reduce_shape(x, axes=axes)


impls[reduce_sum_p] = lambda x, *, axes: np.sum(x, axis=axes)
impls[reduce_max_p] = lambda x, *, axes: np.max(x, axis=axes)


def _normalize(x: Value, axes):
    if axes is None:
        return tuple(range(x.ndim))
    return tuple(sorted(a % x.ndim if x.ndim else a for a in axes))


def reduce_sum(x: Value, axes=None) -> Value:
    axes = _normalize(x, axes)
    if not axes:
        return x
    return emit(reduce_sum_p, x, axes=axes)


def reduce_max(x: Value, axes=None) -> Value:
    axes = _normalize(x, axes)
    if not axes:
        return x
    return emit(reduce_max_p, x, axes=axes)


def _kept(x, axes):
    return tuple(i for i in range(x.ndim) if i not in axes)


@adjoint_rules.register(reduce_sum_p)
def _reduce_sum_adjoint(ct, x, *, axes):
    return (st.broadcast_in_dim(ct, x.shape, _kept(x, axes)),)


@adjoint_rules.register(reduce_max_p)
def _reduce_max_adjoint(ct, x, *, axes):
    kept = _kept(x, axes)
    y = st.broadcast_in_dim(reduce_max(x, axes), x.shape, kept)
    mask = ew.eq(x, y)
    count = reduce_sum(ew.convert(mask, x.dtype), axes)
    share = st.broadcast_in_dim(ew.div(ct, count), x.shape, kept)
    return (ew.select(mask, share, 0.0),)


# --------------------------------------------------------------------------- tangent rules
jvp_rules[reduce_sum_p] = lambda ts, tans, out, x, *, axes: reduce_sum(tans[0], ts.axes(axes))


@jvp_rules.register(reduce_max_p)
def _reduce_max_jvp(ts, tans, out, x, *, axes):
    # the mean of the tangent over the tied maxima: the adjoint's even split, transposed
    kept = _kept(x, axes)
    mask = ew.eq(x, st.broadcast_in_dim(out, x.shape, kept))
    count = reduce_sum(ew.convert(mask, x.dtype), axes)
    picked = ew.select(ts.lift(mask), tans[0], 0.0)
    return ew.div(reduce_sum(picked, ts.axes(axes)), ts.lift(count))

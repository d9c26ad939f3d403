"""Gather and scatter-add along one axis, with indices that are checked (never read out of bounds).

    gather(x[..., X, ...], idx[..., n, ...]) -> [..., n, ...]       {axis, negative, name}
        out[pre, j, post] = x[pre, idx[pre', j, post'], post]   (numpy's take_along_axis)
    scatter_add(ct[..., n, ...], idx[..., n, ...]) -> [..., X, ...]  {axis, size, negative, name}
        out = 0; out[pre, idx[pre', j, post'], post] += ct[pre, j, post]   (np.add.at)

`idx` is i32 or i64 of the result's rank. Its dimensions other than `axis` each match the float
operand's or are 1 (broadcast), and to keep the loop nests simple the dimensions before `axis` are
either all 1 or all matching, and likewise the dimensions after it (`gather`/`scatter_add` below
broadcast the indices explicitly otherwise). `negative` says what an index below zero means:
"wrap" counts from the end once (numpy: -1 is the last), "error" rejects it (PyTorch's embedding).
An index outside the axis raises `IndexOutOfBounds` naming `name` (the index operand as the user
knows it), the operation and the user's file:line: the interpreter raises it directly, native code
skips the access and reports through the status word (codegen/kernels/gather.py).

The two are each other's adjoint in the float operand, so differentiating closes:
<gather(x, idx), ct> = <x, scatter_add(ct, idx)>.
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..core import FLOAT_DTYPES, INT_DTYPES, IRError, ShapeError, Value, primitive, shape_rules
from ..interpreter import impls
from ..jvp_rules import jvp_rules

# "nn" kind: a loop-nest kernel of its own (codegen/kernels/gather.py), not a fused loop
gather_p = primitive("gather", "nn")
scatter_add_p = primitive("scatter_add", "nn")


class IndexOutOfBounds(IRError, IndexError):
    """An index operand of a gather or scatter-add held a value outside its axis. `fields` keeps
    (value, axis, size, name) so that a caller knowing the instruction can name its op and line."""

    def __init__(self, message, fields=None):
        super().__init__(message)
        self.fields = fields


def out_of_bounds_message(value: int, axis: int, size: int, api: str, name: str,
                          loc: str | None) -> str:
    """The message of IndexOutOfBounds (shared by the interpreter and the native runtime)."""
    where = f" at {loc}" if loc else ""
    return (f"index {value} is out of bounds for axis {axis} with size {size} in "
            f"{api}({name}){where}")


# --------------------------------------------------------------------------- shape rules
def _check(what, data, idx, axis, data_axis_size=None):
    if data.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{what}: expects a float operand, got {data}")
    if idx.dtype not in INT_DTYPES:
        raise ShapeError(f"{what}: indices must be integers (i32 or i64), got {idx}")
    if idx.ndim != data.ndim or not 0 <= axis < data.ndim:
        raise ShapeError(f"{what}: indices {idx} must have the rank of {data} (axis {axis})")
    for part in (range(axis), range(axis + 1, data.ndim)):
        dims = [idx.shape[d] for d in part]
        if not (all(n == 1 for n in dims) or dims == [data.shape[d] for d in part]):
            raise ShapeError(f"{what}: indices {idx} must match {data} or be 1 in all dimensions "
                             f"before axis {axis}, and likewise after it")


@shape_rules.register(gather_p)
def _gather_shape(x, idx, *, axis, negative, name):
    _check("gather", x, idx, axis)
    return x.with_shape(x.shape[:axis] + (idx.shape[axis],) + x.shape[axis + 1:])


@shape_rules.register(scatter_add_p)
def _scatter_add_shape(ct, idx, *, axis, size, negative, name):
    _check("scatter_add", ct, idx, axis)
    if idx.shape[axis] != ct.shape[axis]:
        raise ShapeError(f"scatter_add: indices {idx} do not fit the cotangent {ct} on axis {axis}")
    return ct.with_shape(ct.shape[:axis] + (int(size),) + ct.shape[axis + 1:])


# --------------------------------------------------------------------------- numpy reference
def checked_indices(idx, size, axis, negative, api, name, loc=None):
    """`idx` as int64 indices into [0, size), or IndexOutOfBounds for the first bad one."""
    idx = idx.astype(np.int64)
    low = -size if negative == "wrap" else 0
    bad = (idx < low) | (idx >= size)
    if bad.any():
        value = int(idx[bad].flat[0])
        raise IndexOutOfBounds(out_of_bounds_message(value, axis, size, api, name, loc),
                               (value, axis, size, name))
    return np.where(idx < 0, idx + size, idx)


@impls.register(gather_p)
def _gather_impl(x, idx, *, axis, negative, name):
    k = checked_indices(idx, x.shape[axis], axis, negative, "gather", name)
    return np.take_along_axis(x, k, axis=axis)


@impls.register(scatter_add_p)
def _scatter_add_impl(ct, idx, *, axis, size, negative, name):
    k = checked_indices(idx, size, axis, negative, "scatter_add", name)
    k = np.broadcast_to(k, ct.shape)
    out = np.zeros(ct.shape[:axis] + (size,) + ct.shape[axis + 1:], dtype=ct.dtype)
    grid = list(np.indices(ct.shape, sparse=True))
    grid[axis] = k
    np.add.at(out, tuple(grid), ct)
    return out


# --------------------------------------------------------------------------- emitters
def _normalize_indices(idx: Value, shape, axis) -> Value:
    """`idx` broadcast where its dimensions before (after) `axis` mix 1 and full sizes."""
    from .structural import broadcast_in_dim
    target = list(idx.shape)
    for part in (range(axis), range(axis + 1, len(shape))):
        dims = [idx.shape[d] for d in part]
        if not all(n == 1 for n in dims) and dims != [shape[d] for d in part]:
            for d in part:
                target[d] = shape[d]
    if tuple(target) == idx.shape:
        return idx
    return broadcast_in_dim(idx, tuple(target), tuple(range(idx.ndim)))


def gather(x: Value, idx: Value, axis: int, negative: str = "wrap", name: str = "indices") -> Value:
    """take_along_axis(x, idx, axis) with `idx` of x's rank, broadcastable on the other axes."""
    idx = _normalize_indices(idx, x.shape, axis)
    return emit(gather_p, x, idx, axis=int(axis), negative=negative, name=name)


def scatter_add(ct: Value, idx: Value, axis: int, size: int, negative: str = "wrap",
                name: str = "indices") -> Value:
    idx = _normalize_indices(idx, ct.shape, axis)
    return emit(scatter_add_p, ct, idx, axis=int(axis), size=int(size), negative=negative,
                name=name)


# --------------------------------------------------------------------------- adjoint rules
@adjoint_rules.register(gather_p)
def _gather_adjoint(ct, x, idx, *, axis, negative, name):
    return scatter_add(ct, idx, axis, x.shape[axis], negative, name), None


@adjoint_rules.register(scatter_add_p)
def _scatter_add_adjoint(g, ct, idx, *, axis, size, negative, name):
    return gather(g, idx, axis, negative, name), None


# --------------------------------------------------------------------------- tangent rules
# Both are linear in their float operand; a batched tangent [B, ...] gathers along axis + 1 with
# the indices lifted to the tangent's layout.
@jvp_rules.register(gather_p)
def _gather_jvp(ts, tans, out, x, idx, *, axis, negative, name):
    return gather(tans[0], ts.lift(idx), ts.axis(axis), negative, name)


@jvp_rules.register(scatter_add_p)
def _scatter_add_jvp(ts, tans, out, ct, idx, *, axis, size, negative, name):
    return scatter_add(tans[0], ts.lift(idx), ts.axis(axis), size, negative, name)

"""Sorting: one primitive, the stable argsort along the last axis.

    argsort(x[..., n]) -> i64[..., n]
        out[r, :] is the permutation that sorts row r of x in ascending order, stably (equal
        elements keep their order) with NaNs last in their original order: numpy's
        argsort(kind="stable").

The sorted values are a gather with these indices (tracejit.ops.sort), so the gradient of a sort
is the scatter-add of the cotangent back through the permutation, and argsort itself, an integer
result, has no derivative. Only the last axis: tracejit.ops moves any other axis there first. The
loop nest is a per-row bottom-up merge sort (codegen/kernels/sort.py).
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..core import FLOAT_DTYPES, ShapeError, Value, primitive, shape_rules
from ..interpreter import impls
from ..jvp_rules import jvp_rules

# "nn" kind: a loop-nest kernel of its own, not a fused loop
argsort_p = primitive("argsort", "nn")


@shape_rules.register(argsort_p)
def _argsort_shape(x):
    if x.dtype not in FLOAT_DTYPES or x.ndim == 0:
        raise ShapeError(f"argsort: expects a float operand of rank >= 1, got {x}")
    return x.with_dtype("i64")


@impls.register(argsort_p)
def _argsort_impl(x):
    return np.argsort(x, axis=-1, kind="stable").astype(np.int64)


adjoint_rules[argsort_p] = lambda ct, x: (None,)
jvp_rules[argsort_p] = lambda ts, tans, out, x: None


def argsort(x: Value) -> Value:
    return emit(argsort_p, x)

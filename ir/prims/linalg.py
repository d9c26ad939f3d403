"""matmul: C = op(A) @ op(B) for 2-d operands, op = transpose where `trans_a`/`trans_b` is set.

Transposes stay attributes so the code generator picks the loop order instead of copying operands.
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..jvp_rules import jvp_rules
from ..core import ShapeError, Value, primitive, shape_rules
from ..interpreter import impls

matmul_p = primitive("matmul", "nn")


@shape_rules.register(matmul_p)
def _matmul_shape(a, b, *, trans_a=False, trans_b=False):
    if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype:
        raise ShapeError(f"matmul needs two 2-d operands of one dtype, got {a} and {b}")
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ShapeError(f"matmul inner dimensions differ: {a}{' (transposed)' if trans_a else ''} "
                         f"@ {b}{' (transposed)' if trans_b else ''}: {k} != {k2}")
    return a.with_shape((m, n))


@impls.register(matmul_p)
def _matmul_impl(a, b, *, trans_a=False, trans_b=False):
    return np.matmul(a.T if trans_a else a, b.T if trans_b else b)


def matmul(a: Value, b: Value, trans_a=False, trans_b=False) -> Value:
    return emit(matmul_p, a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


@adjoint_rules.register(matmul_p)
def _matmul_adjoint(ct, a, b, *, trans_a=False, trans_b=False):
    # C = op(A) op(B):  d op(A) = ct op(B)^T,  d op(B) = op(A)^T ct
    if trans_a:
        ct_a = matmul(b, ct, trans_a=trans_b, trans_b=True)
    else:
        ct_a = matmul(ct, b, trans_b=not trans_b)
    if trans_b:
        ct_b = matmul(ct, a, trans_a=True, trans_b=trans_a)
    else:
        ct_b = matmul(a, ct, trans_a=not trans_a)
    return ct_a, ct_b


# --------------------------------------------------------------------------- tangent rule
@jvp_rules.register(matmul_p)
def _matmul_jvp(ts, tans, out, a, b, *, trans_a=False, trans_b=False):
    """d(op(A) op(B)) = op(dA) op(B) + op(A) op(dB). Batched tangents fold their batch axis into
    the rows of op(dA) ([B*m, k]) and into the columns of op(dB) ([k, B*n]), so each term stays
    one matmul."""
    from .structural import transpose
    ta, tb = tans
    da = db = None
    if ta is not None:
        if ts.k and trans_a:  # [B, k, m] -> [B, m, k], then rows
            ta = transpose(ta, (0, 2, 1))
        da = ts.unfold(matmul(ts.fold(ta), b, trans_a=trans_a and not ts.k, trans_b=trans_b))
    if tb is not None:
        if ts.k:
            # op(dB) per batch entry is [k, n]; as one operand [k, B*n] (trans_b: [B*n, k])
            folded = ts.fold(tb) if trans_b else ts.fold_at(tb, 1)
            db = ts.unfold_at(matmul(a, folded, trans_a=trans_a, trans_b=trans_b), 1)
        else:
            db = matmul(a, tb, trans_a=trans_a, trans_b=trans_b)
    return ts.add(da, db)

"""matmul: C = op(A) @ op(B) over the last two axes, op = transpose where `trans_a`/`trans_b` is set,
with numpy's broadcasting of the leading (batch) axes: A [*ba, m, k], B [*bb, k, n] ->
C [*broadcast(ba, bb), m, n] (batch axes aligned on the right; an axis of size 1, or a missing
one, is shared by every batch entry).

Transposes stay attributes, and broadcast batch axes stay unmaterialised, so the code generator
picks the loop order and reads a shared operand in place instead of copying operands.
"""
from __future__ import annotations

import math

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..jvp_rules import jvp_rules
from ..core import ShapeError, Value, primitive, shape_rules
from ..interpreter import impls

matmul_p = primitive("matmul", "nn")


def batch_shape(a_shape, b_shape) -> tuple:
    """The broadcast batch shape of two matmul operands' shapes (ShapeError if incompatible)."""
    ba, bb = tuple(a_shape[:-2]), tuple(b_shape[:-2])
    n = max(len(ba), len(bb))
    ba, bb = (1,) * (n - len(ba)) + ba, (1,) * (n - len(bb)) + bb
    out = []
    for x, y in zip(ba, bb):
        if x != y and 1 not in (x, y):
            raise ShapeError(f"matmul batch dimensions do not broadcast: {list(a_shape[:-2])} and "
                             f"{list(b_shape[:-2])}")
        out.append(y if x == 1 else x)
    return tuple(out)


def mat_dims(shape, trans: bool) -> tuple:
    """(rows, cols) of op(X) for an operand of `shape`."""
    r, c = shape[-2], shape[-1]
    return (c, r) if trans else (r, c)


@shape_rules.register(matmul_p)
def _matmul_shape(a, b, *, trans_a=False, trans_b=False):
    if a.ndim < 2 or b.ndim < 2 or a.dtype != b.dtype:
        raise ShapeError(f"matmul needs two operands of rank >= 2 and one dtype, got {a} and {b}")
    m, k = mat_dims(a.shape, trans_a)
    k2, n = mat_dims(b.shape, trans_b)
    if k != k2:
        raise ShapeError(f"matmul inner dimensions differ: {a}{' (transposed)' if trans_a else ''} "
                         f"@ {b}{' (transposed)' if trans_b else ''}: {k} != {k2}")
    return a.with_shape(batch_shape(a.shape, b.shape) + (m, n))


@impls.register(matmul_p)
def _matmul_impl(a, b, *, trans_a=False, trans_b=False):
    return np.matmul(np.swapaxes(a, -1, -2) if trans_a else a,
                     np.swapaxes(b, -1, -2) if trans_b else b)


def matmul(a: Value, b: Value, trans_a=False, trans_b=False) -> Value:
    """Emit op(a) @ op(b). A batched `a` (not transposed) times an unbatched `b` is emitted as one
    2-d matmul on a's batch folded into its rows (a free reshape): one large product instead of
    many small ones."""
    from .structural import reshape
    if a.ndim > 2 and b.ndim == 2 and not trans_a:
        rows = reshape(a, (math.prod(a.shape[:-1]), a.shape[-1]))
        c = emit(matmul_p, rows, b, trans_a=False, trans_b=bool(trans_b))
        return reshape(c, a.shape[:-1] + (c.shape[-1],))
    return emit(matmul_p, a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


def _sum_to_operand(ct: Value, x: Value) -> Value:
    """The cotangent of operand `x` from a cotangent `ct` of its batch-broadcast shape: summed
    over the batch axes `x` was broadcast along."""
    from .reduce import reduce_sum
    from .structural import reshape
    if ct.shape == x.shape:
        return ct
    extra = ct.ndim - x.ndim
    axes = tuple(range(extra)) + tuple(extra + d for d in range(x.ndim - 2)
                                       if x.shape[d] == 1 and ct.shape[extra + d] != 1)
    return reshape(reduce_sum(ct, axes), x.shape)


@adjoint_rules.register(matmul_p)
def _matmul_adjoint(ct, a, b, *, trans_a=False, trans_b=False):
    # C = op(A) op(B):  d op(A) = ct op(B)^T,  d op(B) = op(A)^T ct  (per batch entry)
    from .structural import reshape
    if trans_a:
        ct_a = matmul(b, ct, trans_a=trans_b, trans_b=True)
    else:
        ct_a = matmul(ct, b, trans_b=not trans_b)
    if b.ndim == 2 and a.ndim > 2 and not trans_a:
        # an unbatched B shared by the whole batch of A (rows on A's second-to-last axis): the
        # sum over the batch of A_i^T ct_i is one 2-d product over the batch folded into the rows
        # (free reshapes); A's batch is the result's, since B has none
        a2 = reshape(a, (math.prod(a.shape[:-1]), a.shape[-1]))
        c2 = reshape(ct, (math.prod(ct.shape[:-1]), ct.shape[-1]))
        ct_b = matmul(c2, a2, trans_a=True) if trans_b else matmul(a2, c2, trans_a=True)
        return ct_a, ct_b
    if trans_b:
        ct_b = matmul(ct, a, trans_a=True, trans_b=trans_a)
    else:
        ct_b = matmul(a, ct, trans_a=not trans_a)
    return _sum_to_operand(ct_a, a), _sum_to_operand(ct_b, b)


# --------------------------------------------------------------------------- tangent rule
@jvp_rules.register(matmul_p)
def _matmul_jvp(ts, tans, out, a, b, *, trans_a=False, trans_b=False):
    """d(op(A) op(B)) = op(dA) op(B) + op(A) op(dB). A batched tangent's leading axis is one more
    batch axis of the matmul: each tangent gets size-1 axes up to the result's batch rank (free
    reshapes), and broadcasting shares the primal operand across the tangent directions."""
    from .structural import reshape
    nbatch = out.ndim - 2

    def lifted(t, x):
        if t is None or not ts.k:
            return t
        return reshape(t, ts.lead + (1,) * (nbatch - (x.ndim - 2)) + x.shape)

    ta, tb = lifted(tans[0], a), lifted(tans[1], b)
    da = None if ta is None else matmul(ta, b, trans_a=trans_a, trans_b=trans_b)
    if tb is not None and ts.k and nbatch == 0 and trans_b:
        db = _times_batch_transposed(a, tb, trans_a)
    else:
        db = None if tb is None else matmul(a, tb, trans_a=trans_a, trans_b=trans_b)
    return ts.add(da, db)


def _times_batch_transposed(a, tb, trans_a):
    """op(A) @ dB_t^T for every t of a batch tb [T, N, K] of tangents of a 2-d B, as one 2-d
    product: (dB_t op(A)^T)^T over the batch's rows [T*N, K] (a free reshape), its result
    [T, N, M] read transposed by its consumers (a fused loop reads it in place: no copy). T small
    products, [32, 1] @ [1, 10] each for a Hessian's dY_t @ W^T, ran several times slower. (The
    tangent dA_t op(B) is folded the same way by matmul(); a batch of dB_t not transposed would
    need a copy of the batch transposed, which cost about what it saved.)"""
    from .structural import reshape, transpose
    t, n, k = tb.shape
    c = matmul(reshape(tb, (t * n, k)), a, trans_b=not trans_a)   # [T*N, M]
    return transpose(reshape(c, (t, n, c.shape[-1])), (0, 2, 1))

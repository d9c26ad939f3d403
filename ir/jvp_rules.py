"""The tangent-rule (JVP) registry, filled by `ir/prims/*` next to the adjoint rules, and the
tangent layout every rule works in.

Signature of every rule: `jvp(ts, tangents, out, *primals, **params) -> Value | None`, where
`tangents` has one entry per primal input (None is a symbolic zero tangent; at least one entry is
not None when a rule runs), `out` is the primal result (rules may reuse it, e.g. exp's tangent is
`t * out`) and `ts` is the `TangentSpace`. The result is the tangent of `out` (None for a zero
tangent, e.g. of a comparison). Rules emit ordinary IR through `ir.lax`, so tangents are printed,
verified, optimized, lowered and differentiated again like any other IR.

Batched tangents: with `ts.batch = B` every tangent carries a leading axis of size B (the tangent
of a primal of shape S has shape [B] + S); this pushes B tangent directions through one pass
(jacfwd). Rules never look at B themselves: they broadcast primal factors with `ts.lift`, shift
axis parameters with `ts.axis`, and fold B into a leading dimension with `ts.fold`/`ts.unfold`
for the loop-nest primitives (matmul, convolution, pooling).
"""
from __future__ import annotations

from .core import Registry, Value

jvp_rules = Registry("jvp")


class TangentSpace:
    """Where tangents live: the primal's type (`batch=None`) or [batch] + the primal's shape."""

    def __init__(self, batch: int | None = None):
        self.batch = batch

    @property
    def lead(self) -> tuple:
        """The leading tangent dimensions: () or (B,)."""
        return () if self.batch is None else (self.batch,)

    @property
    def k(self) -> int:
        """How many leading axes a tangent has beyond its primal's: 0 or 1."""
        return len(self.lead)

    def shape(self, primal_shape) -> tuple:
        return self.lead + tuple(primal_shape)

    def axis(self, a: int) -> int:
        """Axis `a` of a primal, as an axis of its tangent."""
        return a + self.k

    def axes(self, axes) -> tuple:
        return tuple(self.axis(a) for a in axes)

    def lift(self, x: Value) -> Value:
        """Primal value `x` broadcast to the tangent layout of its own shape, to multiply a tangent
        elementwise (a rank-0 value is already an elementwise scalar operand)."""
        from .prims.structural import broadcast_in_dim
        if not self.k or not x.shape:
            return x
        return broadcast_in_dim(x, self.shape(x.shape), tuple(range(self.k, self.k + x.ndim)))

    def expand(self, t: Value | None, primal: Value, shape) -> Value | None:
        """Tangent `t` of `primal`, an elementwise operand that may be a rank-0 scalar, as a tangent
        of a result of `shape` (a scalar operand's tangent is broadcast)."""
        from .prims.structural import broadcast_in_dim
        if t is None or tuple(primal.shape) == tuple(shape):
            return t
        return broadcast_in_dim(t, self.shape(shape), tuple(range(self.k)))

    def zeros(self, primal: Value) -> Value:
        from .prims.elementwise import full
        return full(0, self.shape(primal.shape), primal.dtype)

    def materialize(self, t: Value | None, primal: Value) -> Value:
        """`t`, or explicit zeros of `primal`'s tangent type where a rule needs an operand."""
        return self.zeros(primal) if t is None else t

    def scale(self, t: Value | None, factor) -> Value | None:
        """t * factor, with `factor` a primal value (or Python number) of t's primal shape."""
        from .prims.elementwise import mul
        if t is None:
            return None
        return mul(t, self.lift(factor) if isinstance(factor, Value) else factor)

    @staticmethod
    def add(a: Value | None, b: Value | None) -> Value | None:
        from .prims.elementwise import add
        if a is None:
            return b
        return a if b is None else add(a, b)

    def fold(self, t: Value) -> Value:
        """[B, N, ...] -> [B*N, ...]: the batch joins the tangent's leading dimension."""
        from .prims.structural import reshape
        if not self.k:
            return t
        return reshape(t, (t.shape[0] * t.shape[1],) + t.shape[2:])

    def unfold(self, y: Value) -> Value:
        """[B*N, ...] -> [B, N, ...] (the inverse of `fold`)."""
        from .prims.structural import reshape
        if not self.k:
            return y
        return reshape(y, (self.batch, y.shape[0] // self.batch) + y.shape[1:])

    def fold_at(self, t: Value, dim: int) -> Value:
        """[B, d0, ..., d_dim, ...] -> [d0, ..., B*d_dim, ...]: the batch joins primal dimension
        `dim` (a transpose, then a reshape)."""
        from .prims.structural import reshape, transpose
        if not self.k:
            return t
        n = t.ndim - 1
        perm = tuple(range(1, dim + 1)) + (0,) + tuple(range(dim + 1, n + 1))
        moved = transpose(t, perm)
        shape = t.shape[1:dim + 1] + (self.batch * t.shape[dim + 1],) + t.shape[dim + 2:]
        return reshape(moved, shape)

    def unfold_at(self, y: Value, dim: int) -> Value:
        """The inverse of `fold_at`: [d0, ..., B*d_dim, ...] -> [B, d0, ..., d_dim, ...]."""
        from .prims.structural import reshape, transpose
        if not self.k:
            return y
        shape = y.shape[:dim] + (self.batch, y.shape[dim] // self.batch) + y.shape[dim + 1:]
        split = reshape(y, shape)
        perm = (dim,) + tuple(range(dim)) + tuple(range(dim + 1, split.ndim))
        return transpose(split, perm)

    def tile(self, x: Value) -> Value:
        """Primal value `x` [N, ...] repeated for every batch entry, folded: [B*N, ...] (the saved
        indices of max pooling, shared by all tangent directions)."""
        return self.fold(self.lift(x))

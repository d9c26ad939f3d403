"""numpy's einsum (tracejit.einsum; this module is not named einsum, which would shadow the
function in the package's namespace once imported), lowered at trace time to the ops the code generator is good at: transposes,
reshapes, reductions, broadcast multiplies and (batched) matmuls. Never a scalar loop.

The plan, for `einsum("ij,jk->ik", a, b)` and any other subscripts:

1. parse: each operand's labels (an ellipsis becomes labels of its own, right-aligned, so that
   ellipsis axes broadcast as numpy's do); the output's labels (implicit mode: the ellipsis, then
   the labels seen once, sorted);
2. per operand: repeated labels ("ii") take the diagonal; a size-1 axis whose label has a larger
   size elsewhere is dropped (numpy's broadcasting); labels no other operand and not the output
   use are summed away first, while the operand is small;
3. operands are contracted pairwise from the left: labels of both operands that are still needed
   are batch axes, labels of both that are not are contracted, the others are rows (left) and
   columns (right) of one batched matmul. Each operand is transposed into that layout unless it
   already is in it, either way round (the matmul's trans flags, no copy). Without contracted
   labels the product is a broadcast multiply; without rows and columns, a multiply and a sum;
4. the result is transposed into the output's order.

`contract(values, labels, out)` is the entry point on IR values for tensordot, inner and friends.
"""
from __future__ import annotations

import math
import string

from .ir import lax
from .ir.core import ShapeError, Value
from .values import promote, wrap

_LETTERS = set(string.ascii_letters)


def _ellipsis_label(k: int) -> str:
    """The label of the k-th ellipsis axis, counted from the right (never a letter)."""
    return chr(0x2460 + k)


def parse(subscripts: str, shapes) -> tuple[list[list[str]], list[str]]:
    """(labels of each operand, labels of the output) for `subscripts` and operand `shapes`."""
    if not isinstance(subscripts, str):
        raise TypeError(f"einsum: subscripts must be a string such as 'ij,jk->ik', got "
                        f"{type(subscripts).__name__} (the interleaved operand/sublist form is "
                        f"not supported)")
    spec = subscripts.replace(" ", "")
    lhs, arrow, rhs = spec.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum: subscripts {subscripts!r} name {len(terms)} operand(s), got "
                         f"{len(shapes)}")
    labels, n_ell = [], 0
    for i, (term, shape) in enumerate(zip(terms, shapes)):
        explicit = _letters(term.replace("...", ""), subscripts)
        if "..." in term:
            head, _, tail = term.partition("...")
            k = len(shape) - len(explicit)
            if k < 0:
                raise ValueError(f"einsum: operand {i} of shape {list(shape)} has fewer axes than "
                                 f"the labels {term!r}")
            n_ell = max(n_ell, k)
            labels.append(list(head) + [_ellipsis_label(j) for j in reversed(range(k))]
                          + list(tail))
        else:
            if len(explicit) != len(shape):
                raise ValueError(f"einsum: operand {i} has shape {list(shape)} ({len(shape)} "
                                 f"axes) but subscripts {term!r} ({len(explicit)} labels)")
            labels.append(list(term))
    ell = [_ellipsis_label(j) for j in reversed(range(n_ell))]
    if arrow:
        out = _letters(rhs.replace("...", ""), subscripts)
        if "..." in rhs:
            head, _, tail = rhs.partition("...")
            out = list(head) + ell + list(tail)
        elif n_ell:
            raise ValueError(f"einsum: the output {rhs!r} has no '...' but the operands do")
        if len(set(out)) != len(out):
            raise ValueError(f"einsum: output subscripts {rhs!r} repeat a label")
        seen = {lb for ls in labels for lb in ls}
        missing = [lb for lb in out if lb not in seen]
        if missing:
            raise ValueError(f"einsum: output label {missing[0]!r} appears in no operand of "
                             f"{subscripts!r}")
    else:
        counts = {}
        for ls in labels:
            for lb in ls:
                counts[lb] = counts.get(lb, 0) + 1
        out = ell + sorted(lb for lb, c in counts.items() if c == 1 and lb in _LETTERS)
    return labels, out


def _letters(term: str, subscripts: str) -> list:
    bad = [c for c in term if c not in _LETTERS]
    if bad:
        raise ValueError(f"einsum: invalid subscript {bad[0]!r} in {subscripts!r} (labels are "
                         f"letters, '...', ',' and '->')")
    return list(term)


def einsum(subscripts, *operands, optimize=False):
    """numpy's einsum (`optimize` is accepted and ignored: operands are contracted left to
    right)."""
    vals = promote(*operands)
    labels, out = parse(subscripts, [v.shape for v in vals])
    return wrap(contract(vals, labels, out))


def contract(vals: list, labels: list, out: list) -> Value:
    """The einsum of IR values `vals` with labels `labels` (one list per value) into `out`."""
    sizes = {}
    for v, ls in zip(vals, labels):
        for lb, n in zip(ls, v.shape):
            if sizes.get(lb, 1) not in (1, n) and n != 1:
                raise ShapeError(f"einsum: label {_show(lb)} has size {sizes[lb]} in one operand "
                                 f"and {n} in another (shapes "
                                 f"{', '.join(str(list(v.shape)) for v in vals)})")
            sizes[lb] = max(sizes.get(lb, 1), n)
    terms = [_prepare(v, list(ls), sizes) for v, ls in zip(vals, labels)]
    for i in range(len(terms)):   # labels used by one operand alone: summed first
        others = set(out).union(*[set(t[1]) for j, t in enumerate(terms) if j != i])
        terms[i] = _sum_except(*terms[i], others)
    acc, acc_labels = terms[0]
    for i in range(1, len(terms)):
        keep = set(out).union(*[set(t[1]) for t in terms[i + 1:]])
        acc, acc_labels = _pair(acc, acc_labels, *terms[i], keep)
    acc, acc_labels = _sum_except(acc, acc_labels, set(out))
    for lb in out:   # an output label all operands broadcast (size 1 everywhere)
        if lb not in acc_labels:
            acc = lax.reshape(acc, acc.shape + (1,))
            acc_labels = acc_labels + [lb]
    return lax.transpose(acc, [acc_labels.index(lb) for lb in out])


def _show(lb: str) -> str:
    return repr(lb) if lb in _LETTERS else "'...'"


def _prepare(v: Value, ls: list, sizes: dict):
    """Diagonals of repeated labels, and size-1 axes that broadcast against a larger size
    dropped."""
    from . import ops
    while len(set(ls)) != len(ls):
        lb = next(lb for lb in ls if ls.count(lb) > 1)
        p = ls.index(lb)
        q = ls.index(lb, p + 1)
        if v.shape[p] != v.shape[q]:
            raise ShapeError(f"einsum: repeated label {lb!r} on axes of sizes {v.shape[p]} and "
                             f"{v.shape[q]}")
        v = ops.diagonal(wrap(v), 0, p, q).value   # the diagonal becomes the last axis
        ls = [x for k, x in enumerate(ls) if k not in (p, q)] + [lb]
    drop = [k for k, lb in enumerate(ls) if v.shape[k] == 1 and sizes[lb] != 1]
    if drop:
        v = lax.reshape(v, [n for k, n in enumerate(v.shape) if k not in drop])
        ls = [lb for k, lb in enumerate(ls) if k not in drop]
    return v, ls


def _sum_except(v: Value, ls: list, keep: set):
    axes = tuple(k for k, lb in enumerate(ls) if lb not in keep)
    if not axes:
        return v, ls
    return lax.reduce_sum(v, axes), [lb for lb in ls if lb in keep]


def _arranged(v: Value, ls: list, groups: list):
    """`v` transposed so that its labels come in the order of `groups` (lists of labels) and
    reshaped to one axis per group."""
    order = [lb for g in groups for lb in g]
    t = lax.transpose(v, [ls.index(lb) for lb in order])
    return lax.reshape(t, [math.prod(v.shape[ls.index(lb)] for lb in g) for g in groups])


def _layout(ls: list, batch: list, first: list, second: list) -> bool:
    """Whether an operand with labels `ls` is best read transposed: True when its labels already
    come as batch + second + first (the product reads it in place with a trans flag), False when
    they come as batch + first + second or in neither order (transposed into that one)."""
    return ls == batch + second + first and ls != batch + first + second


def _pair(a: Value, la: list, b: Value, lb: list, keep: set):
    a, la = _sum_except(a, la, keep | set(lb))
    b, lb = _sum_except(b, lb, keep | set(la))
    batch = [x for x in la if x in lb and x in keep]
    con = [x for x in la if x in lb and x not in keep]
    rows = [x for x in la if x not in lb]
    cols = [x for x in lb if x not in la]
    size = {x: n for x, n in zip(la + lb, a.shape + b.shape)}
    out_labels = batch + rows + cols
    out_shape = [size[x] for x in out_labels]
    if not con or not (rows or cols):
        # no contraction: a broadcast multiply; no rows and columns: a multiply and a sum (a
        # fused reduction, not a matmul of 1 x 1 blocks)
        ea = lax.broadcast_in_dim(lax.transpose(a, [la.index(x) for x in batch + con + rows]),
                                  [size[x] for x in batch + con + out_labels[len(batch):]],
                                  range(len(batch) + len(con) + len(rows)))
        eb = _align(b, lb, batch + con, rows, cols, size)
        prod = lax.mul(ea, eb)
        return lax.reduce_sum(prod, tuple(range(len(batch), len(batch) + len(con)))) \
            if con else prod, out_labels
    ta = _layout(la, batch, rows, con)
    tb = _layout(lb, batch, con, cols)
    ga = [batch, con, rows] if ta else [batch, rows, con]
    gb = [batch, cols, con] if tb else [batch, con, cols]
    a3, b3 = _arranged(a, la, ga), _arranged(b, lb, gb)
    if not batch:   # plain 2-d operands: the kernel's unbatched path
        a3, b3 = lax.reshape(a3, a3.shape[1:]), lax.reshape(b3, b3.shape[1:])
    c = lax.matmul(a3, b3, trans_a=ta, trans_b=tb)
    return lax.reshape(c, out_shape), out_labels


def _align(b: Value, lb: list, lead: list, rows: list, cols: list, size: dict) -> Value:
    """`b` (labels lead + cols in some order) as lead + rows + cols, broadcast along rows."""
    t = lax.transpose(b, [lb.index(x) for x in lead + cols])
    shape = [size[x] for x in lead + rows + cols]
    dims = list(range(len(lead))) + list(range(len(lead) + len(rows), len(shape)))
    return lax.broadcast_in_dim(t, shape, dims)

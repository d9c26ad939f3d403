"""Pytree helpers: functions over nests of dicts, lists and tuples whose leaves are arrays.

    grads = loss_grad(params, x, t)
    params = tracejit.tree.map(lambda p, g: p - 0.1 * g, params, grads)

What is a leaf, and in which order leaves come, is exactly what the compiled functions use for
their arguments (tracejit.pytree.flatten), so `leaves(params)` lines up with the parameters of a
traced function: numpy arrays and tracers are leaves (other libraries' array-likes become numpy
arrays); dicts (keys in insertion order, not sorted as in JAX), lists and tuples are containers;
anything else (Python numbers, None, strings) is a static value. A static value is part of the
structure, not a leaf: `map` keeps it unchanged and two trees have the same structure only if their
static values are equal. Subclasses of dict, list and tuple come back as plain dicts, lists and
tuples.

Every function works on numpy arrays outside a trace and on tracers inside one (`zeros_like` of a
tracer is a constant of the traced computation). The arithmetic helpers `add` and `scale` use the
operands' own operators: numpy's outside a trace, tracejit's inside one.
"""
from __future__ import annotations

import numpy as np

from . import pytree
from .tracer import Tracer
from .values import wrap

__all__ = ["Structure", "map", "leaves", "structure", "unflatten", "zeros_like", "add", "scale"]


class _Hole:
    """Stands for an array leaf when a structure is printed."""

    def __repr__(self):
        return "*"


class Structure:
    """The nest of a pytree without its array leaves: containers, dict keys in order, static values.

    Hashable and comparable (equal structures flatten to lists of leaves that line up position by
    position); `num_leaves` is how many array leaves it holds. Build one with `structure(tree)`."""
    __slots__ = ("_treedef", "num_leaves")

    def __init__(self, treedef, num_leaves: int):
        self._treedef = treedef
        self.num_leaves = num_leaves

    def __eq__(self, other):
        return isinstance(other, Structure) and self._treedef == other._treedef

    def __hash__(self):
        return hash(self._treedef)

    def __repr__(self):
        return f"Structure({pytree.unflatten(self._treedef, [_Hole()] * self.num_leaves)!r})"


def _flatten(tree, name: str):
    """(paths, leaves, treedef) of `tree`, paths spelled from the root `name` (`grads['w'][0]`)."""
    items, treedef = pytree.flatten(tree, name, name)
    return [p for p, _, _ in items], [v for _, _, v in items], treedef


def leaves(tree) -> list:
    """The array leaves of `tree` in the order compiled functions flatten their arguments."""
    return _flatten(tree, "tree")[1]


def structure(tree) -> Structure:
    """The structure of `tree` (see `Structure`): `unflatten(structure(t), leaves(t))` is t."""
    _, vals, treedef = _flatten(tree, "tree")
    return Structure(treedef, len(vals))


def unflatten(structure: Structure, leaves) -> object:
    """The tree of `structure` with its array leaves taken in order from the sequence `leaves`."""
    if not isinstance(structure, Structure):
        raise TypeError(f"unflatten: structure must be a tracejit.tree.Structure (from "
                        f"tracejit.tree.structure), got {type(structure).__name__}")
    leaves = list(leaves)
    if len(leaves) != structure.num_leaves:
        raise ValueError(f"unflatten: {structure} has {structure.num_leaves} leaves, got "
                         f"{len(leaves)}")
    return pytree.unflatten(structure._treedef, leaves)


def map(f, tree, *rest):
    """The tree of `f(x, *ys)` for every array leaf `x` of `tree` and the leaves `ys` at the same
    place in the trees `rest`, which must have the same structure as `tree` (ValueError naming the
    first place where they differ). Static values of `tree` are kept as they are; a numpy scalar
    returned by `f` becomes a 0-d array (numpy returns scalars from arithmetic on 0-d arrays)."""
    return map_named(f, [tree, *rest], ["tree"] + [f"rest[{i}]" for i in range(len(rest))],
                     "tree.map")


def map_named(f, trees, names, who: str):
    """`map(f, *trees)`, with a structure mismatch reported by the trees' `names` (the first
    tree's static values are kept) under the function name `who`."""
    _, leaf_lists, struct = flatten_same(trees, names, who)
    return unflatten(struct, [_as_leaf(f(*xs)) for xs in zip(*leaf_lists)])


def _as_leaf(x):
    # numpy arithmetic on 0-d arrays returns numpy scalars, which pytrees treat as static values:
    # keep them arrays, so that `map(lambda p: 2 * p, tree)` has the structure of `tree`.
    return np.asarray(x) if isinstance(x, np.generic) else x


def flatten_same(trees, names, who: str):
    """(paths, leaf_lists, structure) of trees of one structure: the paths of the first tree's
    leaves (spelled from `names[0]`), the leaves of each tree, their common Structure. A tree of
    another structure is a ValueError naming it by `names` and the first place it differs."""
    paths, vals, treedef = _flatten(trees[0], names[0])
    leaf_lists = [vals]
    for other, name in zip(trees[1:], names[1:]):
        _, ovals, odef = _flatten(other, name)
        if odef != treedef:
            raise ValueError(f"{who}: {name} does not have the structure of {names[0]}: "
                             f"{difference(trees[0], other, names[0], name)}")
        leaf_lists.append(ovals)
    return paths, leaf_lists, Structure(treedef, len(vals))


def zeros_like(tree):
    """A tree of C-contiguous, writable zero arrays of the shapes and dtypes of `tree`'s leaves
    (for tracers, zero constants of the trace)."""
    return map(_zeros_like_leaf, tree)


def _zeros_like_leaf(x):
    if isinstance(x, Tracer):
        from .ir import lax
        return wrap(lax.full(0, x.shape, x.value.dtype))
    # np.zeros rather than np.zeros_like: a buffer built from a Fortran-ordered or read-only
    # parameter must still be C-contiguous and writable (in-place updates need both).
    return np.zeros(x.shape, x.dtype)


def add(a, b):
    """The leafwise sum of two trees of the same structure."""
    return map_named(lambda x, y: x + y, [a, b], ["a", "b"], "tree.add")


def scale(tree, s):
    """Every leaf of `tree` times `s` (a number, or a scalar array or tracer)."""
    return map(lambda x: x * s, tree)


# ------------------------------------------------------------------------------------------------
# where two trees differ (for error messages)
# ------------------------------------------------------------------------------------------------
def _kind(o) -> str:
    if isinstance(o, dict):
        return "dict"
    if isinstance(o, (list, tuple)):
        return "list" if isinstance(o, list) else "tuple"
    return "array" if pytree.flatten(o, "x", "x")[0] else "static"


def _show(o, kind: str) -> str:
    if kind == "array":
        return f"an array of shape {list(np.shape(o))}"
    if kind == "static":
        return f"the static value {o!r}"
    return f"a {kind} of {len(o)}"


def difference(a, b, name_a: str, name_b: str) -> str:
    """Where the nests of trees `a` and `b` first differ, as a sentence ("" if they do not)."""
    def go(x, y, pa, pb):
        kx, ky = _kind(x), _kind(y)
        if kx != ky:
            return f"{pa} is {_show(x, kx)} but {pb} is {_show(y, ky)}"
        if kx == "dict":
            kx_, ky_ = list(x.keys()), list(y.keys())
            if kx_ != ky_:
                why = (" (the same keys in another order: leaves pair up by position, so build "
                       "both dicts in the same key order)") if set(kx_) == set(ky_) else ""
                return f"{pa} has keys {kx_} but {pb} has keys {ky_}{why}"
            for k in kx_:
                d = go(x[k], y[k], f"{pa}[{k!r}]", f"{pb}[{k!r}]")
                if d:
                    return d
        elif kx in ("list", "tuple"):
            if len(x) != len(y):
                return f"{pa} is {_show(x, kx)} but {pb} is {_show(y, ky)}"
            for i, (u, v) in enumerate(zip(x, y)):
                d = go(u, v, f"{pa}[{i}]", f"{pb}[{i}]")
                if d:
                    return d
        elif kx == "static" and (type(x), x) != (type(y), y):
            return f"{pa} is {_show(x, kx)} but {pb} is {_show(y, ky)}"
        return ""

    return go(a, b, name_a, name_b)

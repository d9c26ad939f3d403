"""Pytrees: nests of dicts, lists and tuples whose leaves are arrays (traced) or static values.

A `TreeDef` is a hashable description of the nest with the static leaves' values in it, so it can
be part of the compile key. Array leaves are described by their position only; their shapes and
dtypes join the key separately.

What is a leaf: numpy arrays and tracers are array leaves; array-likes of other libraries (objects
with `__array__` or `__array_interface__`) become numpy arrays first; masked arrays are refused
(their mask would be silently ignored). Dicts, lists and tuples are containers. Everything else must
be hashable and is a static value, including Python and numpy scalars and lists of Python numbers
(see `numeric_sequences`).
"""
from __future__ import annotations

import numbers
import operator
import sys

import numpy as np

from .tracer import Tracer

class TreeDef(tuple):
    """The structure of a pytree: its containers (dict keys in order, lengths), the positions of
    its array leaves, and its static values with their types.

    Immutable, hashable and compared by value (a compile key holds one per argument). Two
    treedefs are equal when the nests are: the same kinds, keys and lengths, array leaves in the
    same places, and static values of the same type that compare equal (1 and 1.0 differ, so do True and 1). `kind` is "array" (the one instance `ARRAY`),
    "dict", "list", "tuple" or "static"; `children` are a container's treedefs (values of a
    dict in key order); `value` and `type_name` are a static leaf's."""
    # A tuple underneath: built for every argument of every call that misses the fast path and
    # hashed and compared in the compile cache's lookup, which tuples do in C.
    __slots__ = ()

    def __new__(cls, kind: str, children: tuple = (), keys: tuple | None = None, value=None):
        if kind == "static":
            return tuple.__new__(cls, (kind, keys, children, type(value).__name__, value, 0))
        n = 1 if kind == "array" else sum([c[5] for c in children])
        return tuple.__new__(cls, (kind, keys, children, None, value, n))

    def __getnewargs__(self):
        # pickle (Ray sends structures to its workers) and copy rebuild through __new__
        return (self.kind, self.children, self.keys, self.value)

    kind = property(operator.itemgetter(0))
    keys = property(operator.itemgetter(1))
    children = property(operator.itemgetter(2))
    type_name = property(operator.itemgetter(3))
    value = property(operator.itemgetter(4))
    num_leaves = property(operator.itemgetter(5))

    def __repr__(self):
        return f"TreeDef({self.describe()})"

    @property
    def has_static(self) -> bool:
        """Whether any leaf is a static value."""
        return self.kind == "static" or any(c.has_static for c in self.children)

    def child_paths(self, path: str):
        """The paths of the children, spelled as `flatten` spells them (`p['w']`, `p[0]`)."""
        if self.kind == "dict":
            return [f"{path}[{k!r}]" for k in self.keys]
        return [f"{path}[{i}]" for i in range(len(self.children))]

    def array_paths(self, path: str) -> list[str]:
        """Paths of the array leaves, in leaf order, from the root `path`."""
        if self.kind == "array":
            return [path]
        return [q for c, p in zip(self.children, self.child_paths(path)) for q in c.array_paths(p)]

    def without_static_values(self) -> TreeDef:
        """This structure with every static value replaced by None (for comparing structures
        whose static values need not agree, as tangents and primals)."""
        if self.kind == "array":
            return self
        if self.kind == "static":
            return _STATIC
        return TreeDef(self.kind, tuple(c.without_static_values() for c in self.children),
                       self.keys)

    def unflatten(self, leaves):
        """The pytree of this structure with `leaves` (an iterable, in leaf order) as its arrays."""
        return self._build(iter(leaves))

    def _build(self, it):
        kind = self.kind
        if kind == "array":
            return next(it)
        if kind == "dict":
            return {k: c._build(it) for k, c in zip(self.keys, self.children)}
        if kind == "list":
            return [c._build(it) for c in self.children]
        if kind == "tuple":
            return tuple([c._build(it) for c in self.children])
        return self.value

    def builder(self):
        """A function taking an iterator of leaves (consuming exactly `num_leaves` of them) and
        returning the pytree of this structure: `unflatten` precompiled into closures, for the
        call path, which rebuilds the same structure on every call."""
        kind = self.kind
        if kind == "array":
            return next
        if kind == "static":
            value = self.value
            return lambda it: value
        children = self.children
        if all(c is ARRAY for c in children):
            # zip pulls from `keys` first, so it stops without consuming a leaf too many
            if kind == "dict":
                keys = self.keys
                return lambda it: dict(zip(keys, it))
            n = range(len(children))
            if kind == "list":
                return lambda it: [next(it) for _ in n]
            return lambda it: tuple([next(it) for _ in n])
        builders = [c.builder() for c in children]
        if kind == "dict":
            pairs = list(zip(self.keys, builders))
            return lambda it: {k: b(it) for k, b in pairs}
        if kind == "list":
            return lambda it: [b(it) for b in builders]
        return lambda it: tuple([b(it) for b in builders])

    def describe(self) -> str:
        """Short human form for error and log messages: `{'w': array, 'n': 3}`."""
        if self.kind == "array":
            return "array"
        if self.kind == "dict":
            return "{" + ", ".join(f"{k!r}: {c.describe()}"
                                   for k, c in zip(self.keys, self.children)) + "}"
        if self.kind in ("list", "tuple"):
            inner = ", ".join(c.describe() for c in self.children)
            return f"[{inner}]" if self.kind == "list" else f"({inner})"
        return repr(self.value)


ARRAY = TreeDef("array")
_STATIC = TreeDef("static")


def is_array_leaf(x) -> bool:
    return isinstance(x, (np.ndarray, Tracer))


def _is_masked(o) -> bool:
    """Whether `o` is a numpy masked array, without importing numpy.ma (0.04 s, imported lazily
    by numpy): while it is not imported, no masked array can exist."""
    ma = sys.modules.get("numpy.ma")
    return ma is not None and isinstance(o, ma.MaskedArray)


def _array_like(o) -> bool:
    t = type(o)
    return not isinstance(o, np.generic) and (hasattr(t, "__array__")
                                              or hasattr(t, "__array_interface__"))


def flatten(obj, path: str, hint: str, numeric=None) -> tuple[list, TreeDef]:
    """(leaves, treedef): leaves are (path, ir_name_hint, value) for every array or tracer.

    With a list `numeric`, appends (path, description) for every outermost list or tuple of Python
    numbers, which is a static value but likely meant as an array (see `signature.Signature`)."""
    leaves = []

    def go(o, p, h, in_numeric):
        if is_array_leaf(o):
            if _is_masked(o):
                raise TypeError(f"argument {p}: a masked array cannot be traced (its mask would be "
                                f"ignored); pass x.filled(value) or np.asarray(x)")
            leaves.append((p, h, o))
            return ARRAY
        if isinstance(o, dict):
            keys = tuple(o.keys())
            return TreeDef("dict", tuple(go(o[k], f"{p}[{k!r}]", f"{h}.{k}", False) for k in keys),
                           keys)
        if isinstance(o, (list, tuple)):
            if numeric is not None and not in_numeric and _is_numeric_sequence(o):
                numeric.append((p, _describe_numbers(o)))
                in_numeric = True
            kind = "list" if isinstance(o, list) else "tuple"
            return TreeDef(kind, tuple(go(v, f"{p}[{i}]", f"{h}.{i}", in_numeric)
                                       for i, v in enumerate(o)))
        if _array_like(o):
            leaves.append((p, h, np.asarray(o)))
            return ARRAY
        try:
            hash(o)
        except TypeError:
            raise TypeError(f"argument {p}: a {type(o).__name__} is neither an array, a dict/list/"
                            f"tuple of arrays, nor a hashable static value") from None
        return TreeDef("static", value=o)

    return leaves, go(obj, path, hint, False)


def _is_numeric_sequence(o) -> bool:
    """A non-empty list or tuple (nested or not) whose leaves are all numbers, not bools."""
    return len(o) > 0 and all(
        _is_numeric_sequence(v) if isinstance(v, (list, tuple))
        else isinstance(v, numbers.Number) and not isinstance(v, (bool, np.bool_))
        for v in o)


def _describe_numbers(o) -> str:
    kind = type(o).__name__
    try:
        shape = np.shape(o)
    except ValueError:  # ragged
        return f"a nested {kind} of Python numbers"
    if len(shape) == 1:
        return f"a {kind} of {shape[0]} Python numbers"
    return f"a nested {kind} of Python numbers of shape {list(shape)}"


def unflatten(treedef: TreeDef, leaves):
    """The pytree of structure `treedef` with `leaves` as its arrays (inverse of `flatten`)."""
    return treedef.unflatten(leaves)

"""Pytrees: nests of dicts, lists and tuples whose leaves are arrays (traced) or static values.

A treedef is a hashable description of the nest with the static leaves' values in it, so it can be
part of the compile key. Array leaves are described by their position only; their shapes and dtypes
join the key separately.

What is a leaf: numpy arrays and tracers are array leaves; array-likes of other libraries (objects
with `__array__` or `__array_interface__`) become numpy arrays first; masked arrays are refused
(their mask would be silently ignored). Dicts, lists and tuples are containers. Everything else must
be hashable and is a static value, including Python and numpy scalars and lists of Python numbers
(see `numeric_sequences`).
"""
from __future__ import annotations

import numbers

import numpy as np

from .tracer import Tracer

ARRAY = ("*",)


def is_array_leaf(x) -> bool:
    return isinstance(x, (np.ndarray, Tracer))


def _array_like(o) -> bool:
    t = type(o)
    return not isinstance(o, np.generic) and (hasattr(t, "__array__")
                                              or hasattr(t, "__array_interface__"))


def flatten(obj, path: str, hint: str, numeric=None):
    """(leaves, treedef): leaves are (path, ir_name_hint, value) for every array or tracer.

    With a list `numeric`, appends (path, description) for every outermost list or tuple of Python
    numbers, which is a static value but likely meant as an array (see `signature.Signature`)."""
    leaves = []

    def go(o, p, h, in_numeric):
        if is_array_leaf(o):
            if isinstance(o, np.ma.MaskedArray):
                raise TypeError(f"argument {p}: a masked array cannot be traced (its mask would be "
                                f"ignored); pass x.filled(value) or np.asarray(x)")
            leaves.append((p, h, o))
            return ARRAY
        if isinstance(o, dict):
            keys = tuple(o.keys())
            return ("dict", keys, tuple(go(o[k], f"{p}[{k!r}]", f"{h}.{k}", False) for k in keys))
        if isinstance(o, (list, tuple)):
            if numeric is not None and not in_numeric and _is_numeric_sequence(o):
                numeric.append((p, _describe_numbers(o)))
                in_numeric = True
            kind = "list" if isinstance(o, list) else "tuple"
            return (kind, tuple(go(v, f"{p}[{i}]", f"{h}.{i}", in_numeric)
                                for i, v in enumerate(o)))
        if _array_like(o):
            leaves.append((p, h, np.asarray(o)))
            return ARRAY
        try:
            hash(o)
        except TypeError:
            raise TypeError(f"argument {p}: a {type(o).__name__} is neither an array, a dict/list/"
                            f"tuple of arrays, nor a hashable static value") from None
        return ("static", type(o).__name__, o)

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


def array_paths(treedef, path: str):
    """Paths of the array leaves of `treedef` (spelled as `flatten` spells them)."""
    if treedef == ARRAY:
        return [path]
    if treedef[0] == "dict":
        return [q for k, c in zip(treedef[1], treedef[2]) for q in array_paths(c, f"{path}[{k!r}]")]
    if treedef[0] in ("list", "tuple"):
        return [q for i, c in enumerate(treedef[1]) for q in array_paths(c, f"{path}[{i}]")]
    return []


def unflatten(treedef, leaves):
    it = iter(leaves)

    def go(d):
        if d == ARRAY:
            return next(it)
        if d[0] == "dict":
            return {k: go(c) for k, c in zip(d[1], d[2])}
        if d[0] in ("list", "tuple"):
            vals = [go(c) for c in d[1]]
            return vals if d[0] == "list" else tuple(vals)
        return d[2]

    return go(treedef)


def count(treedef) -> int:
    if treedef == ARRAY:
        return 1
    if treedef[0] == "dict":
        return sum(count(c) for c in treedef[2])
    if treedef[0] in ("list", "tuple"):
        return sum(count(c) for c in treedef[1])
    return 0


def describe(treedef) -> str:
    """Short human form of a treedef for error and log messages."""
    if treedef == ARRAY:
        return "array"
    if treedef[0] == "dict":
        return "{" + ", ".join(f"{k!r}: {describe(c)}" for k, c in zip(treedef[1], treedef[2])) + "}"
    if treedef[0] in ("list", "tuple"):
        inner = ", ".join(describe(c) for c in treedef[1])
        return f"[{inner}]" if treedef[0] == "list" else f"({inner})"
    return repr(treedef[2])

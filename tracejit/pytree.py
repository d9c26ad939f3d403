"""Pytrees: nests of dicts, lists and tuples whose leaves are arrays (traced) or static values.

A treedef is a hashable description of the nest with the static leaves' values in it, so it can be
part of the compile key. Array leaves are described by their position only; their shapes and dtypes
join the key separately.
"""
from __future__ import annotations

import numpy as np

from .tracer import Tracer

ARRAY = ("*",)


def is_array_leaf(x) -> bool:
    return isinstance(x, (np.ndarray, Tracer))


def flatten(obj, path: str, hint: str):
    """(leaves, treedef): leaves are (path, ir_name_hint, value) for every array or tracer."""
    leaves = []

    def go(o, p, h):
        if is_array_leaf(o):
            leaves.append((p, h, o))
            return ARRAY
        if isinstance(o, dict):
            keys = tuple(o.keys())
            return ("dict", keys, tuple(go(o[k], f"{p}[{k!r}]", f"{h}.{k}") for k in keys))
        if isinstance(o, (list, tuple)):
            kind = "list" if isinstance(o, list) else "tuple"
            return (kind, tuple(go(v, f"{p}[{i}]", f"{h}.{i}") for i, v in enumerate(o)))
        try:
            hash(o)
        except TypeError:
            raise TypeError(f"argument {p}: a {type(o).__name__} is neither an array, a dict/list/"
                            f"tuple of arrays, nor a hashable static value") from None
        return ("static", type(o).__name__, o)

    return leaves, go(obj, path, hint)


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

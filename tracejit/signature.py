"""How a call's arguments become a compile key, and why a new key traces again.

A `Signature` splits one call's arguments into traced array leaves and static structure (the
policy is in its docstring); its `key` indexes the compiled functions of a `Jitted`. When a call
has a key not seen before, `explain_retrace` names the arguments that differ from the closest key
already traced. `check_numeric_sequences` refuses lists of numbers where arrays are expected.
"""
from __future__ import annotations

import logging
import operator

import numpy as np

from .ir.builder import current
from .ir.core import DTYPES, TensorType

from . import pytree
from .tracer import Tracer

log = logging.getLogger("tracejit")

class Signature:
    """How one call's arguments split into traced leaves and static structure.

    What a call may pass (checked here, before anything is traced or run):
    - float32 and float64 numpy arrays are traced; their shapes and dtypes are part of the compile
      key, so a new shape or dtype traces again. Integer arrays of the IR's integer dtypes (int32,
      int64: labels, indices; uint32: random keys, tracejit.random) are traced too, so a new
      batch of labels runs the same code; they carry no gradient (differentiating w.r.t. one
      raises TypeError naming it). Any layout works: non-contiguous, Fortran-ordered,
      read-only, misaligned and byte-swapped arrays are copied to what the native code reads (see
      `c_contiguous`); the caller's arrays are never written to. Arrays of other dtypes (int,
      bool, complex, float16, object, strings, ...) raise TypeError naming the argument path
      (`params['conv1']`), the expected and the actual type. Array-likes of other libraries
      (`__array__`) are converted with np.asarray; masked arrays raise TypeError.
    - dicts, lists and tuples are containers; their structure (dict keys in order, lengths) is part
      of the key, so a dict with other keys is a new signature and traces again.
    - anything else hashable (None, strings, Python and numpy scalars) is a static value: the
      function sees it as it is and its value is part of the key.
    - A list (or tuple) of Python numbers is therefore a container of static numbers, not an array:
      unlike JAX, which traces Python scalars (a list of floats is a pytree of traced scalars
      there), tracejit never traces Python numbers, so `shape=(3, 1)` and `kernel=[2, 2]` stay
      usable as static arguments. Because such a list is almost always an array by mistake when
      it takes the place of one, a call raises TypeError when a list or tuple of numbers is
      passed where an earlier call of the same function traced an array (`Jitted.__call__`), or
      in a differentiated argument (argnums); pass np.asarray(x) to trace it.
    """

    def __init__(self, fun_name, arg_names, args, kwargs):
        leaves, defs, numeric = [], [], []
        try:
            for i, a in enumerate(args):
                name = arg_name(arg_names, i)
                lv, d = pytree.flatten(a, name, name.replace("[", ".").replace("]", ""), numeric)
                leaves.extend(lv)
                defs.append(d)
            for k in sorted(kwargs):
                lv, d = pytree.flatten(kwargs[k], k, k, numeric)
                leaves.extend(lv)
                defs.append(d)
        except RecursionError:
            raise TypeError(f"{fun_name}: an argument nests containers too deeply (does a list or "
                            f"dict contain itself?)") from None
        except TypeError as e:  # an unhashable or masked leaf
            raise TypeError(f"{fun_name}: {e}") from None
        self.leaves = leaves
        self.treedef = tuple(defs)  # one TreeDef per argument: positional, then by keyword
        self.numeric = numeric  # [(path, description)] of lists/tuples of Python numbers
        self.n_args = len(args)
        self.kw_names = tuple(sorted(kwargs))
        self.types = []
        for path, _, x in leaves:
            if isinstance(x, Tracer):
                self.types.append(x.value.type)
                continue
            dt = x.dtype
            if dt.kind in "iu" and dt.newbyteorder("=") in TRACED_INTS:
                self.types.append(TensorType(TRACED_INTS[dt.newbyteorder("=")], x.shape))
                continue
            if dt.kind != "f" or dt.itemsize not in (4, 8):
                names = [str(d) for d in TRACED_INTS]
                ints = ", ".join(names[:-1]) + " or " + names[-1]
                raise TypeError(f"{fun_name}: argument {path}: expected a float32 or float64 "
                                f"array (integer data: {ints}), got an array of dtype {dt} and "
                                f"shape {list(x.shape)}{DTYPE_HINTS.get(dt.kind, '')}")
            self.types.append(TensorType("f64" if dt.itemsize == 8 else "f32", x.shape))
        self.key = (self.treedef, self.kw_names, tuple(self.types))

    def array_paths(self, arg_names) -> dict:
        """{path: i} of the array leaves of this signature, i indexing `self.types`."""
        paths = [p for root, d in _roots(self.treedef, self.kw_names, arg_names)
                 for p in d.array_paths(root)]
        return {p: i for i, p in enumerate(paths)}

    def leaf_ranges(self):
        """Index range of each positional argument's leaves in `self.leaves`."""
        ranges, start = [], 0
        for d in self.treedef[:self.n_args]:
            n = d.num_leaves
            ranges.append(range(start, start + n))
            start += n
        return ranges

    def rebuild(self, leaf_values):
        """(args, kwargs) with the array leaves replaced by `leaf_values`."""
        vals, pos = [], 0
        for d in self.treedef:
            n = d.num_leaves
            vals.append(d.unflatten(leaf_values[pos:pos + n]))
            pos += n
        return vals[:self.n_args], dict(zip(self.kw_names, vals[self.n_args:]))


def _roots(treedef, kw_names, arg_names):
    """(root path, TreeDef) per argument of a signature: positional ones named by `arg_names`,
    keyword ones by their keyword."""
    n = len(treedef) - len(kw_names)
    return [(arg_name(arg_names, i) if i < n else kw_names[i - n], d)
            for i, d in enumerate(treedef)]


def describe_key(key, arg_names) -> dict:
    """{path: (parent path or None, description, dict keys or None)} for every node of a
    signature key (treedefs, keyword names, leaf types): arrays as their type, containers by their
    kind and size, static values by their repr. Arguments passed by keyword are also listed under
    ("keyword", name)."""
    treedef, kw_names, types = key
    types = iter(types)
    out = {}

    def go(d, path, parent):
        if d.kind == "array":
            out[path] = (parent, str(next(types)), None)
        elif d.kind == "static":
            out[path] = (parent, f"{d.type_name} {d.value!r}", None)
        else:
            if d.kind == "dict":
                out[path] = (parent, f"a dict with keys {list(d.keys)}", d.keys)
            else:
                out[path] = (parent, f"a {d.kind} of {len(d.children)}", None)
            for c, p in zip(d.children, d.child_paths(path)):
                go(c, p, path)

    for root, d in _roots(treedef, kw_names, arg_names):
        go(d, root, None)
    for name in kw_names:
        out["keyword", name] = (None, "", None)
    return out


def key_changes(old: dict, new: dict) -> list[str]:
    """The differences between two `describe_key` results, one phrase each."""
    changes = []
    for path, (parent, text, keys) in new.items():
        if isinstance(path, tuple):  # ("keyword", name)
            if path not in old and path[1] in old:
                changes.append(f"argument {path[1]} was passed by keyword, before by position")
            continue
        if path not in old:
            if parent is None:
                changes.append(f"argument {path} is new ({text})")
            continue
        old_text, old_keys = old[path][1], old[path][2]
        if old_text == text:
            continue
        if keys is not None and old_keys is not None:
            added = [k for k in keys if k not in old_keys]
            removed = [k for k in old_keys if k not in keys]
            parts = ([f"added {', '.join(map(repr, added))}"] if added else []) + \
                    ([f"removed {', '.join(map(repr, removed))}"] if removed else [])
            changes.append(f"argument {path} changed its keys ({'; '.join(parts) or 'reordered'})")
        else:
            changes.append(f"argument {path} changed from {_short(old_text)} to {_short(text)}")
    for path, (parent, text, _) in old.items():
        if isinstance(path, tuple):
            if path not in new and path[1] in new:
                changes.append(f"argument {path[1]} was passed by position, before by keyword")
        elif path not in new and parent is None:
            changes.append(f"argument {path} ({text}) is no longer passed")
    return changes


def _short(text: str) -> str:
    """A static value's description without its type name when the repr says enough."""
    kind, _, rest = text.partition(" ")
    return rest if kind in ("int", "float", "str", "bool", "NoneType") else text


# numpy integer dtype -> IR dtype of the integer arrays a call may trace (every integer IR dtype)
TRACED_INTS = {DTYPES[d]: d for d in DTYPES if DTYPES[d].kind in "iu"}

DTYPE_HINTS = {
    "i": " (convert integer data such as class labels with x.astype(np.int64))",
    "u": " (convert integer data such as class labels with x.astype(np.int64))",
    "b": " (pass masks as float arrays, x.astype(np.float32), or close over them as constants)",
    "c": " (complex numbers are not supported)",
    "f": " (tracejit computes in float32 and float64: convert with x.astype(np.float32))",
    "O": " (an array of Python objects cannot be traced)",
}


def c_contiguous(x):
    """`x` as an array the native code reads: C-contiguous, aligned to its element size (the native
    code uses element-aligned vector loads) and in native byte order. `x` itself when it already is
    (writeable or not: native code never writes its inputs), otherwise a copy. Not
    np.ascontiguousarray: it turns 0-d arrays into 1-d ones. The fast path of `Jitted.__call__`
    inlines the common case (`x.flags.carray`: C-contiguous, aligned and writeable)."""
    if x.flags.c_contiguous and x.flags.aligned and x.dtype.isnative:
        return x
    return np.array(x, dtype=x.dtype.newbyteorder("="), order="C")


def fast_key(args):
    """(key, leaves) of a call's positional arguments when they are a pytree of only numpy arrays
    in dicts, lists and tuples (exact types, no subclasses), else None: a cheap lookup key built
    without a `Signature` (jit_train_step's runners).

    The key is the containers' structure (see fast_leaves) and every leaf's (shape, dtype,
    flags.carray) in the leaf order of `pytree.flatten`, so equal keys mean equal structure,
    shapes and dtypes (byte order included) and the same arrays needing a copy for the native
    code. Anything else (tracers, static values, array-likes, masked arrays, kwargs) returns None
    and takes the full Signature path, which checks and explains it."""
    found = fast_leaves(args)
    if found is None:
        return None
    return (found[0], tuple(map(leaf_facts, found[1]))), found[1]


# What the pytree fast path pins of each leaf (see fast_leaves), read in C by map():
# flags.carray is C-contiguous, aligned and writeable; the dtype compares its byte order too.
leaf_facts = operator.attrgetter("shape", "dtype", "flags.carray")


def dict_structure(d):
    """fast_leaves' structure of the call f(d) with `d` an exact dict of exact ndarrays only."""
    return (1, None, dict, tuple(d), np.ndarray)


def fast_leaves(args):
    """(structure, leaves) of a call's positional arguments when they are a pytree of only exact
    numpy arrays in exact dicts, lists and tuples, else None: the per-call half of
    `Jitted.__call__`'s pytree fast path. `structure` is a hashable key of the containers alone
    (types, dict keys in order, lengths, and which children are arrays); the leaves come in
    pytree.flatten's order. The caller pins the leaves with `list(map(leaf_facts, leaves))`, so
    structure and facts together say what `fast_key` says, for one attribute read per fact and
    one comparison instead of building and hashing a key of every leaf's facts."""
    if len(args) == 1 and type(args[0]) is dict:   # the common call: f(params); as below
        d = args[0]
        leaves = list(d.values())
        if list(map(type, leaves)).count(np.ndarray) == len(leaves):
            return dict_structure(d), leaves
    key, leaves = [len(args)], []
    try:
        if _struct_walk(args, key, leaves):
            return tuple(key), leaves
    except RecursionError:  # a list containing itself: the Signature path says so
        pass
    return None


def _struct_walk(items, key, leaves) -> bool:
    # A container of arrays only (the common case) costs a map(type) and a count, in C; mixed
    # ones are encoded child by child (an array as its class), so the key decodes uniquely.
    ndarray = np.ndarray
    types = list(map(type, items))
    if types.count(ndarray) == len(types):
        key.append(ndarray)
        leaves.extend(items)
        return True
    key.append(None)
    for a, t in zip(items, types):
        if t is ndarray:
            key.append(ndarray)
            leaves.append(a)
            continue
        if t is dict:
            key.append(dict)
            key.append(tuple(a))
            a = a.values()
        elif t is list or t is tuple:
            key.append(t)
            key.append(len(a))
        else:
            return False
        if not _struct_walk(a, key, leaves):
            return False
    return True


def check_tracers_alive(fun_name, sig: Signature):
    """Tracer arguments must belong to a trace that is still running (this one or an outer one)."""
    active, b = set(), current()
    while b is not None:
        active.add(id(b))
        b = b.outer
    for path, _, x in sig.leaves:
        if isinstance(x, Tracer) and id(x.builder) not in active:
            raise TypeError(f"{fun_name}: argument {path} is a traced value from a trace that has "
                            f"ended (a leaked tracer); pass an array instead")


def is_under(path: str, root: str) -> bool:
    """Whether pytree path `path` is `root` or inside it (`params['w'][0]` is under `params`)."""
    return path == root or (path.startswith(root) and path[len(root)] == "[")




def explain_retrace(fun_name, key, old_keys, arg_names) -> str:
    """Which arguments of a new signature `key` differ from the closest of `old_keys` (the
    signatures already traced), and how ("argument x changed from f32[64,784] to f32[32,784]")."""
    try:
        new = describe_key(key, arg_names)
        best = None
        for old_key in list(old_keys)[-32:]:
            changes = key_changes(describe_key(old_key, arg_names), new)
            if best is None or len(changes) <= len(best):
                best = changes
        if best:
            more = f" (and {len(best) - 4} more changes)" if len(best) > 4 else ""
            return ", and ".join(best[:4]) + more
    except Exception:  # an explanation must never break a call
        log.debug("%s: could not explain the retrace", fun_name, exc_info=True)
    return f"its arguments have a new signature {key!r}"


def check_numeric_sequences(fun_name, sig: Signature, old_keys, arg_names, argnums):
    """A list or tuple of Python numbers is static (see `Signature`); refuse it where an array is
    expected: in a differentiated argument (`argnums`, empty for jit), or where an earlier call
    traced one (`old_keys`: the signatures traced so far)."""
    traced = {}  # path -> type, over every signature traced so far
    for key in list(old_keys):
        old = Signature.__new__(Signature)
        old.treedef, old.kw_names, old.types = key
        for path, i in old.array_paths(arg_names).items():
            traced[path] = old.types[i]
    n = sig.n_args
    argnums = [a for a in argnums if -n <= a < n]
    for path, what in sig.numeric:
        for a in argnums:
            if is_under(path, arg_name(arg_names, a % n)):
                raise TypeError(f"{fun_name}: argument {path} is differentiated (argnums={a}) "
                                f"but is {what}, which tracejit treats as a static value; "
                                f"pass np.asarray({path}) to trace it")
        before = next((t for p, t in traced.items() if is_under(p, path)), None)
        if before is not None:
            raise TypeError(f"{fun_name}: argument {path}: expected an array (an earlier call "
                            f"traced {before} here), got {what}, which tracejit treats as a "
                            f"static value; pass np.asarray({path}) to trace it")


def arg_name(arg_names, i) -> str:
    """The name of positional argument `i`: its parameter name, or `args[i]` past the named ones."""
    return arg_names[i] if i < len(arg_names) else f"args[{i}]"

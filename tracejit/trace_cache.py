"""The persistent trace cache: a warm process does not trace a function it has traced before.

With the native backend (the interpreter, the test oracle, always traces), an entry holds what
`Jitted._compile` makes for one signature (the forward IR, the transformed
IR, the optimized IR, the output structure), pickled, in the compile cache's directory (same
checks: a private directory, atomic writes, checksummed entries, LRU pruning; see
codegen/cache.py) as `<sha256 of key>.trace`. The key is the SHA-256 of a fingerprint of
everything the trace can depend on:

- the function: its module and qualified name, its code object (bytecode, constants, names, file,
  line table: provenance comments quote lines), defaults, closure cell values, and the values of
  the globals its code names; recursively for the Python functions, jitted functions and
  functools.partial objects reached that way (helpers it calls);
- the call's signature (pytree structure, static values, leaf types) and the transformation
  (jit / grad / value_and_grad, argnums, has_aux);
- tracejit's version and a hash of its sources (tracejit/, ir/, codegen/), Python's and numpy's
  versions.

A miss must be safe, so anything whose fingerprint is not reliable makes the function uncacheable
(it is traced as before): numpy arrays in closures or globals (the trace captures them and guards
them, see captures.py), objects of classes other than plain data (ints, floats, strings, bytes,
None, tuples, lists, dicts, sets, numpy scalars and dtypes), modules other than tracejit, numpy,
math and operator (a helper in a user module would otherwise go unseen), a local import of such a
module, builtins that read the outside world (open, input, id, hash, ...) and names that suggest
it (`random`, `load`, `fromfile`, `time`, ...: an array the code made from those while traced
would be frozen into the entry), side effects a hit would skip (print, assigning globals or an
enclosing function's variables, `calls.append(...)` on a captured object: a bytecode check),
functions nested more than `MAX_DEPTH` deep, and methods (`self` is an arbitrary object). Nor is
a trace stored when it captured arrays (captures.Guards) or warned (a hit would not warn again).
Functions and classes of tracejit, numpy, math and operator are named, not fingerprinted (the
version and source hash cover them), when the name finds that very object: a closure or an
instance they made is fingerprinted like any other value.

Loading an entry unpickles it: like the object code of the compile cache, it must come from a
directory only this user can write (checked).
"""
from __future__ import annotations

import builtins
import dis
import functools
import hashlib
import io
import logging
import pickle
import sys
import types
from pathlib import Path

import numpy as np

from .ir.core import Primitive, TensorType, primitives

log = logging.getLogger("tracejit")

FORMAT = 1
MAX_DEPTH = 16
# modules whose functions are named by the key rather than fingerprinted (their sources or
# versions are in it); a global or local import of any other module makes a function uncacheable
_KNOWN_MODULES = ("tracejit", "numpy", "math", "operator")
_IMPURE_BUILTINS = frozenset({"open", "input", "eval", "exec", "compile", "__import__", "id",
                              "hash", "globals", "locals", "vars", "breakpoint", "setattr",
                              "delattr", "print"})
# names (globals or attributes) through which a function's own code may read the outside world
# while it is traced: arrays it makes from them would be frozen into the cached trace
_IMPURE_NAMES = frozenset({"random", "default_rng", "load", "loadtxt", "genfromtxt", "fromfile",
                           "memmap", "fromregex", "open", "read", "readline", "urandom", "time",
                           "perf_counter", "monotonic", "getenv", "environ", "now"})
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "popitem", "remove", "clear",
                       "update", "add", "discard", "setdefault", "write", "writelines", "put",
                       "send", "sort", "reverse", "__setitem__", "__delitem__", "__iadd__"})
_SCALARS = (type(None), bool, int, float, complex, str, bytes)

# Counters of this process, for tests and benchmarks: "traces" (functions traced by
# Jitted._compile), "hits" (traces skipped), "stores", "uncacheable" (functions or traces the
# cache refuses, see the module docstring). `store_stats`: the entry files' (codegen/cache.py).
stats = {"traces": 0, "hits": 0, "stores": 0, "uncacheable": 0}
store_stats = {"hits": 0, "misses": 0, "stores": 0, "corrupt": 0, "errors": 0}


class Uncacheable(Exception):
    """The fingerprint of a function cannot be trusted (the reason is the message)."""


# ------------------------------------------------------------------------------------------------
# the fingerprint
# ------------------------------------------------------------------------------------------------
def _known(module) -> bool:
    return isinstance(module, str) and module.split(".")[0] in _KNOWN_MODULES


class _Fingerprint:
    def __init__(self):
        self.active: set = set()   # functions being fingerprinted (recursion ends there)

    def value(self, o, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise Uncacheable("values nested too deeply")
        t, d = type(o), depth + 1
        if t in _SCALARS or o is Ellipsis:
            return f"{t.__name__}:{o!r}"
        if t in (slice, range):
            return f"{t.__name__}(" + ",".join(self.value(x, d)
                                               for x in (o.start, o.stop, o.step)) + ")"
        if isinstance(o, tuple) and t.__module__ in ("builtins", "tracejit.pytree"):
            return f"{t.__name__}(" + ",".join(self.value(x, d) for x in o) + ")"
        if t is list:
            return "list(" + ",".join(self.value(x, d) for x in o) + ")"
        if t is dict:
            return "dict(" + ",".join(f"{self.value(k, d)}:{self.value(v, d)}"
                                      for k, v in o.items()) + ")"
        if t in (set, frozenset):
            return f"{t.__name__}(" + ",".join(sorted(self.value(x, d) for x in o)) + ")"
        if isinstance(o, np.generic):
            return f"np:{o.dtype.str}:{o.tobytes().hex()}"
        if t is TensorType:
            return f"type:{o}"
        if isinstance(o, np.dtype):
            return f"dtype:{o.str}"
        if t is types.FunctionType:
            return self.function(o, d)
        if t is types.CodeType:
            return self.code(o, d)
        if t is functools.partial:
            return (f"partial({self.value(o.func, d)};{self.value(o.args, d)};"
                    f"{self.value(o.keywords, d)})")
        if t is types.ModuleType:
            if _known(o.__name__):
                return f"module:{o.__name__}"
            raise Uncacheable(f"it uses the module {o.__name__}")
        from .api import Jitted
        if t is Jitted and not o._method:
            return f"jitted({o.kind};{o.argnums};{o.has_aux};{o.single};{self.value(o.fun, d)})"
        if t is types.BuiltinFunctionType and getattr(o, "__module__", None) == "builtins":
            if o.__name__ in _IMPURE_BUILTINS:
                raise Uncacheable(f"it calls {o.__name__}()")
            return f"builtin:{o.__name__}"
        name = _named(o)
        if name is not None:   # a class or function of tracejit, numpy, math, ... (no state)
            return f"ref:{name}"
        raise Uncacheable(f"it uses a {t.__module__}.{t.__qualname__} object")

    def code(self, c: types.CodeType, depth: int) -> str:
        impure = _IMPURE_NAMES.intersection(c.co_names)
        if impure:
            raise Uncacheable(f"it names {sorted(impure)[0]} (it may read the outside world)")
        prev = None
        for ins in dis.get_instructions(c):
            if ins.opname == "IMPORT_NAME" and not _known(ins.argval):
                raise Uncacheable(f"it imports {ins.argval}")
            # side effects on the world outside the call would not happen on a hit: assigning a
            # global or an enclosing function's variable, or calling a mutating method of an
            # object read from a global or a closure cell (`calls.append(1)`)
            if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL") or (
                    ins.opname in ("STORE_DEREF", "DELETE_DEREF") and ins.argval in c.co_freevars):
                raise Uncacheable(f"it assigns {ins.argval} outside itself")
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval in _MUTATORS \
                    and prev is not None and prev.opname in ("LOAD_GLOBAL", "LOAD_DEREF"):
                raise Uncacheable(f"it calls {prev.argval}.{ins.argval}()")
            prev = ins
        consts = ",".join(self.value(k, depth + 1) for k in c.co_consts)
        return ("code(" + "|".join(map(str, (
            c.co_qualname, c.co_filename, c.co_firstlineno, c.co_argcount, c.co_posonlyargcount,
            c.co_kwonlyargcount, c.co_flags, c.co_names, c.co_varnames, c.co_freevars,
            c.co_cellvars, c.co_code.hex(), c.co_linetable.hex(), c.co_exceptiontable.hex())))
            + f"|{consts})")

    def function(self, f: types.FunctionType, depth: int) -> str:
        name = f"{f.__module__}.{f.__qualname__}"
        named = _named(f)
        if named is not None:   # the name it is found under: factories share one __qualname__
            return f"ref:{named}"
        if id(f) in self.active:
            return f"recursive:{name}"
        self.active.add(id(f))
        try:
            parts = [name, self.code(f.__code__, depth), self.value(f.__defaults__, depth),
                     self.value(f.__kwdefaults__, depth)]
            for var, cell in zip(f.__code__.co_freevars, f.__closure__ or ()):
                try:
                    contents = cell.cell_contents
                except ValueError:   # not yet assigned
                    parts.append(f"cell {var}: empty")
                    continue
                parts.append(f"cell {var}: {self.value(contents, depth)}")
            g = f.__globals__
            for n in sorted(_global_names(f.__code__)):
                if n in g:
                    parts.append(f"global {n}: {self.value(g[n], depth)}")
                elif hasattr(builtins, n):
                    parts.append(f"builtin {n}: {self.value(getattr(builtins, n), depth)}")
            return "function(" + "\n".join(parts) + ")"
        finally:
            self.active.discard(id(f))


def _named(o) -> str | None:
    """`module.qualname` of `o` if it is a function or class of a known module (tracejit, numpy,
    math, operator: their sources or versions are in the key) found under that name there: a
    closure or an instance those modules made carries state the name does not tell."""
    module = getattr(o, "__module__", None)
    qualname = getattr(o, "__qualname__", None) or getattr(o, "__name__", None)
    if isinstance(o, np.ufunc):
        module = "numpy"
    if not (_known(module) or module == "builtins") or not isinstance(qualname, str):
        return None
    found = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is o:
        return f"{module}.{qualname}"
    # made by a decorator or factory and published under another name (tracejit.ops.greater)
    for name, v in vars(sys.modules[module]).items() if module in sys.modules else ():
        if v is o:
            return f"{module}.{name}"
    return None


def _global_names(c: types.CodeType) -> set:
    """Names the code (and code nested in it) may read as globals or builtins (attribute names
    too: co_names does not tell them apart, so this errs on the side of more)."""
    names = set(c.co_names)
    for k in c.co_consts:
        if isinstance(k, types.CodeType):
            names |= _global_names(k)
    return names


@functools.lru_cache(maxsize=None)
def _sources_hash() -> str:
    """SHA-256 over tracejit's sources (the tracer, ops, IR passes and code generator)."""
    from . import ir as _ir
    roots = sorted({Path(__file__).resolve().parent, Path(_ir.__file__).resolve().parent})
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def key(jitted, sig) -> str | None:
    """The entry key of `jitted` traced for signature `sig`, or None when the function cannot be
    cached (logged at DEBUG with the reason; counted in stats["uncacheable"])."""
    from . import __version__
    if jitted._method:
        stats["uncacheable"] += 1
        return None
    fp = _Fingerprint()
    try:
        text = "\n".join([
            f"trace cache {FORMAT}", f"tracejit {__version__} {_sources_hash()}",
            f"python {sys.implementation.cache_tag} {sys.version}", f"numpy {np.__version__}",
            f"kind {jitted.kind} argnums {jitted.argnums} single {jitted.single} "
            f"aux {jitted.has_aux} name {jitted.name}",
            f"signature {fp.value(sig.key)}",
            fp.value(jitted.fun)])
    except (Uncacheable, RecursionError) as e:
        stats["uncacheable"] += 1
        log.debug("%s: not in the trace cache: %s", jitted.name, e)
        return None
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# entries
# ------------------------------------------------------------------------------------------------
def _primitive(name: str) -> Primitive:
    return primitives[name]


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is Primitive:   # primitives are registry singletons: stored by name
            return _primitive, (obj.name,)
        return NotImplemented


def _store_dir(disk):
    from .codegen.cache import DiskCache
    return DiskCache(disk.directory, disk.version, suffix=".trace", counters=store_stats)


def load(disk, k: str):
    """(forward, transformed, optimized, out_treedef, n_value_outputs) stored under `k`, or None."""
    store = _store_dir(disk)
    data = store.load(k)
    if data is None:
        return None
    try:
        entry = pickle.loads(data)
        if not (isinstance(entry, tuple) and len(entry) == 5):
            raise ValueError("not a trace cache entry")
    except Exception as e:  # noqa: BLE001 - any failure is a miss, the entry goes
        store.discard(k, f"{type(e).__name__}: {e}")
        return None
    stats["hits"] += 1
    return entry


def store(disk, k: str, entry) -> bool:
    """Store (forward, transformed, optimized, out_treedef, n_value_outputs); False if it cannot
    be pickled (logged at DEBUG) or written."""
    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(tuple(entry))
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as e:
        stats["uncacheable"] += 1
        log.debug("trace cache: cannot pickle the trace (%s)", e)
        return False
    if not _store_dir(disk).store(k, buf.getvalue()):
        return False
    stats["stores"] += 1
    return True

"""Guards on captured arrays: numpy arrays a traced function reads from outside its arguments.

A trace freezes every numpy array it meets into the compiled code as a constant. Arrays the
function reads through its closure cells, the globals it names, attributes (of modules, objects and,
for methods, of `self`) it names, and elements of dicts/lists held there would otherwise go stale
silently when the user rebinds them (`labels = next_batch`). So each trace records where the
arrays it may have used came from (`discover`), and every call first checks (`Guards.ok`):

- rebinding: each source still holds the very object the trace saw (an identity test). A source
  that no longer resolves (a deleted global, an emptied cell) counts as changed.
- in-place changes: arrays of at most `SMALL_BYTES` bytes are also compared by content with a copy
  taken at trace time. Larger ones are not (that would cost a pass over the data on every call);
  the trace warns (CaptureWarning) that they are frozen and that passing them as arguments keeps
  them current.

A failed check retraces (the caller logs why at INFO). Discovery looks at the traced function
itself, every jitted function it inlines (they register themselves while the trace runs), and one
level further: plain functions named by those (their own globals and cells). Elements of dicts
and lists are guarded when the trace used them as operands. Not guarded (frozen at the first
trace, like any constant): arrays reached only through deeper helper chains, class attributes,
and objects whose attributes cannot be read; data that changes between calls belongs in the
arguments.

Cost: nothing for a function without captured arrays; per captured array, one identity test and,
up to SMALL_BYTES, one `tobytes()` comparison per call (~0.1-0.2 us for a small array).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import types

import numpy as np

from .errors import CaptureWarning, warn

SMALL_BYTES = 4096

log = logging.getLogger("tracejit")
_state = threading.local()
_MISSING = object()


class _Recording:
    """What one outermost trace saw: the functions it ran and the arrays it made constants."""

    def __init__(self):
        self.functions: list = []       # (python function, bound instance or None)
        self.constants: dict = {}       # id -> array (kept alive so ids stay unique)


@contextlib.contextmanager
def recording():
    """Record the functions and constants of the trace run inside (nested traces add to the
    outermost recording, as their code is inlined into it); yields the recording."""
    outer = getattr(_state, "rec", None)
    if outer is not None:
        yield outer
        return
    rec = _state.rec = _Recording()
    try:
        yield rec
    finally:
        _state.rec = None


def note_function(fun, instance=None):
    rec = getattr(_state, "rec", None)
    if rec is not None:
        rec.functions.append((fun, instance))


def note_constant(x):
    rec = getattr(_state, "rec", None)
    if rec is not None and isinstance(x, np.ndarray):
        rec.constants[id(x)] = x


def note_operands(args, kwargs):
    """Record the numpy arrays among an op's operands (and in lists/tuples of operands, as
    concatenate takes them), before the op converts them to constants of another dtype."""
    rec = getattr(_state, "rec", None)
    if rec is None:
        return
    for a in (*args, *kwargs.values()):
        if isinstance(a, np.ndarray):
            rec.constants[id(a)] = a
        elif isinstance(a, (list, tuple)):
            for x in a:
                if isinstance(x, np.ndarray):
                    rec.constants[id(x)] = x


class Guards:
    """The checks of one compiled signature (see the module docstring). `ok` is on the fast call
    path: identity tests and, for small arrays, a bytes comparison."""

    __slots__ = ("slots", "seqs", "cells", "small", "instance", "labels")

    def __init__(self):
        self.slots = []     # (dict, key, object): d.get(key) is object
        self.seqs = []      # (list, index, object): the list still holds object there
        self.cells = []     # (cell, object)
        self.small = []     # (array, bytes at trace time)
        self.instance = None  # for methods whose attributes were captured: the `self` traced
        self.labels = {}    # id(object) -> how the user spells where it came from

    def ok(self, instance=None) -> bool:
        # Written for speed: this runs before every call of a function that captured arrays.
        # A source that no longer resolves (deleted name, shortened list, empty cell) fails.
        if self.instance is not None and instance is not self.instance:
            return False
        for d, k, o in self.slots:
            if d.get(k, _MISSING) is not o:
                return False
        for a, saved in self.small:
            if a.tobytes() != saved:
                return False
        if self.cells or self.seqs:
            try:
                for c, o in self.cells:
                    if c.cell_contents is not o:
                        return False
                for seq, i, o in self.seqs:
                    if seq[i] is not o:
                        return False
            except (IndexError, ValueError):
                return False
        return True

    def why(self, instance=None) -> str:
        """Which capture changed, in words (only called after `ok` returned False)."""
        if self.instance is not None and instance is not self.instance:
            return "the method is called on another instance (its attributes were captured)"
        for d, k, o in [(d, k, o) for d, k, o in self.slots] + self.seqs:
            try:
                now = d[k]
            except (KeyError, IndexError):
                return f"{self.labels[id(o)]} no longer exists"
            if now is not o:
                return f"{self.labels[id(o)]} was rebound to another object"
        for c, o in self.cells:
            try:
                if c.cell_contents is not o:
                    return f"{self.labels[id(o)]} was rebound to another object"
            except ValueError:
                return f"{self.labels[id(o)]} was deleted"
        for a, saved in self.small:
            if a.tobytes() != saved:
                return f"the captured array {self.labels[id(a)]} was changed in place"
        return "a captured value changed"

    def __bool__(self):
        return bool(self.slots or self.seqs or self.cells or self.small
                    or self.instance is not None)


def _code_names(code, out: set, depth=0):
    """Global and attribute names used by `code` and the code objects nested in it (lambdas,
    comprehensions, inner functions)."""
    out.update(code.co_names)
    if depth < 4:
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                _code_names(c, out, depth + 1)
    return out


def discover(rec: _Recording, fun_name: str) -> Guards:
    """The guards of the trace recorded in `rec`; warns about large captured arrays."""
    from .api import Jitted  # api imports this module
    g = Guards()
    seen_funcs: set = set()
    guarded: set = set()

    def bind(o, label, slot, cell):
        """Guard that `slot` (d, key) or `cell` still holds `o`."""
        g.labels.setdefault(id(o), label)
        if slot is not None:
            (g.seqs if isinstance(slot[0], list) else g.slots).append((*slot, o))
        if cell is not None:
            g.cells.append((cell, o))

    def add_array(a, label, slot=None, cell=None):
        if id(a) in guarded:
            return
        guarded.add(id(a))
        bind(a, label, slot, cell)
        if a.nbytes <= SMALL_BYTES:
            g.small.append((a, a.tobytes()))
        else:
            warn(
                f"{fun_name}: the captured array {label} ({a.dtype}{list(a.shape)}, "
                f"{a.nbytes} bytes) is frozen into the compiled code as a constant; changing it "
                f"in place will not be seen (rebinding it retraces). Pass it as an argument to use "
                f"its current value on every call", CaptureWarning)

    def visit(v, label, names, depth, slot=None, cell=None) -> bool:
        """Guard the arrays `v` holds (it sits in `slot` or `cell`); whether any were found."""
        if isinstance(v, np.ndarray):
            add_array(v, label, slot, cell)
            return True
        found = False
        if isinstance(v, dict):
            for k, x in list(v.items()):
                if id(x) in rec.constants:
                    add_array(x, f"{label}[{k!r}]", slot=(v, k))
                    found = True
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if id(x) in rec.constants:
                    add_array(x, f"{label}[{i}]", slot=(v, i))
                    found = True
        elif isinstance(v, tuple):
            for i, x in enumerate(v):
                if isinstance(x, np.ndarray):
                    add_array(x, f"{label}[{i}]")
                    found = True
        elif isinstance(v, (types.FunctionType, types.MethodType, Jitted)):
            # a helper holding captured arrays: rebinding the helper itself retraces too
            if depth > 0:
                found = scan(getattr(v, "fun", v), getattr(v, "__self__", None), depth - 1)
        elif not isinstance(v, type):
            attrs = getattr(v, "__dict__", None)
            if isinstance(attrs, dict):
                module = isinstance(v, types.ModuleType)
                for name in names:
                    x = attrs.get(name, _MISSING)
                    if isinstance(x, np.ndarray) or (isinstance(x, (dict, list, tuple))
                                                     and not module):
                        found |= visit(x, f"{label}.{name}", names, 0, slot=(attrs, name))
        if found:  # rebinding the container itself must retrace too
            bind(v, label, slot, cell)
        return found

    def scan(f, instance, depth, own=False) -> bool:
        """Guard what function `f` (bound to `instance`, if not None) captured; whether it
        captured any array. `own`: `instance` is the `self` of the traced method."""
        f = getattr(f, "__func__", f)  # bound methods
        code = getattr(f, "__code__", None)
        if code is None or id(f) in seen_funcs:
            return False
        seen_funcs.add(id(f))
        n_guards = len(guarded)
        names = _code_names(code, set())
        glob = getattr(f, "__globals__", {})
        sources = [(f"global {n}", glob[n], (glob, n), None) for n in sorted(names) if n in glob]
        for n, c in zip(code.co_freevars, f.__closure__ or ()):
            try:
                sources.append((f"closure variable {n}", c.cell_contents, None, c))
            except ValueError:  # not yet assigned
                continue
        for label, v, slot, cell in sources:
            try:
                visit(v, label, names, depth, slot=slot, cell=cell)
            except Exception:  # an odd object (a proxy whose attributes raise) is not guarded
                log.debug("could not inspect %s for captured arrays", label, exc_info=True)
        if instance is not None:
            if visit(instance, "self", names, 0) and own:
                g.instance = instance
        return len(guarded) > n_guards

    # the first function recorded is the one traced; the others were inlined into its trace
    for i, (fun, instance) in enumerate(rec.functions):
        scan(fun, instance, 1, own=i == 0)
    return g

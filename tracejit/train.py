"""jit_train_step: a whole training step (forward, adjoint, optimizer update) as one native call
that updates the parameters and the optimizer state in place.

    opt = tracejit.optim.adam(lr=1e-3)
    step = tracejit.jit_train_step(loss, opt)
    params, state = init_params(), opt.init(params)
    for x, t in batches:
        l, params, state = step(params, state, x, t)   # the same objects, updated

The step traces `loss_fn(params, *batch)`, differentiates it with respect to `params` (the
machinery of jit_value_and_grad, inlined into the step's trace) and traces
`optimizer.update(grads, state, params)` after it, so the update fuses with the gradient's
kernels. The compiled function's outputs for the new parameters and the new state are *donated*
the arrays passed in (codegen/schedule.py `_place_donated`): the kernel computing a new parameter
usually writes it straight into the parameter's array (the update reads each element before
writing it, after every other kernel reading the parameter has run); when that is not possible
the value is computed aside and copied in at the end of the native call. A parameter's update
is one fused loop storing the new parameter and its state together (codegen/schedule.py
`_merge_output_loops`), run where it can as the epilogue of the loop nest computing the
parameter's gradient, on each block of the gradient while it is in cache
(`_fuse_epilogues_apart`; a matmul writes every block of the gradient over its first one, so the
gradient never goes out to memory and the update's traffic is the parameter and its state),
where the kernel says that pays (`Kernel.epilogue_apart`: a matmul's gradient up to half the
L2; over a larger one the update is a loop of its own after it). Either way no array is
allocated per step but the loss (and aux), and the results equal the functional update
`optimizer.update(grads, state, params)`.

Contract on the arrays of `params` and `state` (checked on every call, before anything is
written; a violation is a TypeError naming the leaf's path, e.g. `state['exp_avg']['w1']`):
numpy arrays that are writeable, C-contiguous, aligned and in native byte order, no two of which
share memory, none sharing memory with a batch array; the update must return, for each of them,
an array of its own dtype and shape. Batch arrays are read only and may have any layout.
"""
from __future__ import annotations

import bisect
import ctypes
import operator
import weakref

import numpy as np

from .ir.builder import current

from . import pytree
from .api import Jitted
from .signature import Signature as _Signature, c_contiguous as _c_contiguous, fast_key
from .config import config
from .tracer import Tracer

__all__ = ["jit_train_step", "TrainStep"]


def jit_train_step(loss_fn, optimizer, *, has_aux=False) -> "TrainStep":
    """A compiled training step `step(params, state, *batch) -> (loss, params, state)` (with
    has_aux, `((loss, aux), params, state)`): the gradient of `loss_fn(params, *batch)` with
    respect to `params` (a pytree of float arrays), then `optimizer.update(grads, state, params)`
    (a tracejit.optim optimizer, or anything with that method written in tracejit ops), all in
    one native function that writes the new parameters and state into the arrays of `params` and
    `state` and returns those same objects (see this module's docstring for the contract)."""
    if not callable(loss_fn):
        raise TypeError(f"jit_train_step expects a loss function, got {type(loss_fn).__name__}")
    if not callable(getattr(optimizer, "update", None)):
        raise TypeError(f"jit_train_step: optimizer must have an update(grads, state, params) "
                        f"method (see tracejit.optim), got {type(optimizer).__name__}")
    return TrainStep(loss_fn, optimizer, has_aux)


class _StepJitted(Jitted):
    """The step traced as a plain `jit` function returning (loss, aux, new_params, new_state);
    compiling a signature also decides which outputs are stored into which arguments."""

    def __init__(self, fun, n_donated_args: int):
        super().__init__(fun, "jit")
        self.n_donated_args = n_donated_args

    def _compile(self, sig: _Signature):
        entry = super()._compile(sig)
        loss_def, aux_def, params_def, state_def = entry.out_treedef.children
        paths = list(sig.array_paths(self.arg_names))
        for name, new_def, old_def in (("params", params_def, sig.treedef[0]),
                                       ("state", state_def, sig.treedef[1])):
            if new_def != old_def:
                raise TypeError(f"{self.name}: the optimizer's update returns new {name} of "
                                f"structure {new_def.describe()}, but {name} is "
                                f"{old_def.describe()}; it cannot be updated in place")
        base = 1 + aux_def.num_leaves
        n = params_def.num_leaves + state_def.num_leaves
        fn = entry.optimized
        for i in range(n):
            new, old = fn.outputs[base + i].type, fn.params[i].type
            if new != old:
                raise TypeError(f"{self.name}: {paths[i]} is {old}, but the update returns {new} "
                                f"for it; it cannot be updated in place (keep the update in the "
                                f"array's dtype)")
        entry.donate = {base + i: i for i in range(n)}
        return entry


class TrainStep:
    """See jit_train_step. `step.ir(params, state, *batch, stage=...)` dumps the step's IR like
    Jitted.ir ("forward" and "grad" are the traced step: the loss, its adjoint and the update;
    "optimized" also says which outputs are written in place)."""

    def __init__(self, loss_fn, optimizer, has_aux: bool):
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.has_aux = has_aux
        grad = Jitted(loss_fn, "value_and_grad", 0, has_aux)
        self.name = f"{grad.name}.step"

        def step(params, state, *batch):
            value, grads = grad(params, *batch)   # tracers: inlined into this trace
            loss, aux = value if has_aux else (value, None)
            new_params, new_state = optimizer.update(grads, state, params)
            return loss, aux, new_params, new_state

        step.__name__ = step.__qualname__ = self.name
        self._jitted = _StepJitted(step, 2)
        # batch arguments are named as the loss function names them (`x`, not `args[2]`)
        self._jitted.arg_names = ["params", "state"] + grad.arg_names[1:]
        # signature.fast_key of a call -> runner: calls like one the slow path checked skip the
        # Signature and the per-leaf layout checks (the key pins shapes, dtypes and carray flags;
        # a runner checks that its call has its signature, see _add_runner)
        self._runners: dict = {}
        self._last = None   # the runner of the last call's signature, tried first

    def __repr__(self):
        return f"<jit_train_step {self.name} of {self.optimizer!r}>"

    def _signature(self, params, state, batch):
        j = self._jitted
        if current() is not None:
            raise TypeError(f"{self.name}: a training step updates arrays in place and cannot be "
                            f"called inside a trace; call the loss's gradient and the optimizer's "
                            f"update there instead")
        sig = _Signature(self.name, j.arg_names, (params, state) + batch, {})
        n = len(sig.leaf_ranges()[0]) + len(sig.leaf_ranges()[1])
        for path, _, x in sig.leaves:
            if isinstance(x, Tracer):
                raise TypeError(f"{self.name}: argument {path} is a traced value; a training "
                                f"step runs on numpy arrays")
        _check_in_place(self.name, sig.leaves[:n], sig.leaves[n:])
        return sig, n

    def __call__(self, params, state, *batch):
        if config.backend != "interpreter" and current() is None:
            # the runner of the signature called last, then the one of this call's fast_key
            run = self._last
            if run is not None:
                out = run(params, state, batch)
                if out is not None:
                    return out
            found = fast_key((params, state) + batch)
            if found is not None:
                run = self._runners.get(found[0])
                if run is not None:
                    out = run(params, state, batch)
                    if out is not None:
                        self._last = run
                        return out
        sig, n = self._signature(params, state, batch)
        entry = self._jitted._lookup(sig)
        donated = [x for _, _, x in sig.leaves[:n]]
        arrays = tuple(donated + [_c_contiguous(x) for _, _, x in sig.leaves[n:]])
        base = min(entry.donate) if entry.donate else len(entry.optimized.outputs)
        if config.backend == "interpreter":
            from .ir.interpreter import interpret
            outs = interpret(entry.optimized, arrays)
            # an output may be an input array itself: read every result before writing any
            outs = [o.copy() if any(o is a for a in donated) else o for o in outs]
            for i, a in enumerate(donated):
                a[...] = outs[base + i]
        else:
            outs = entry.native()(arrays)
            self._add_runner((params, state) + batch, sig, n, entry, base)
        loss = outs[0]
        if self.has_aux:
            aux_def = entry.out_treedef.children[1]
            return (loss, pytree.unflatten(aux_def, outs[1:base])), params, state
        return loss, params, state

    def _add_runner(self, args, sig, n, entry, base):
        """Register the fast path for calls of `sig`'s signature (see __init__), under its
        fast_key, and make it the one tried first. A runner returns None for a call of another
        signature. It matches the call's containers against the signature's structure, then
        compares every leaf's (class, shape, dtype, flags.carray) with the signature's in one pass
        in C (`_leaf_facts`): that pins what the slow path checked leaf by leaf (flags.carray means
        C-contiguous, aligned and writeable; the dtype its byte order and kind). What it does not
        pin is checked by the runner too: captured arrays (guards), and that no two donated arrays
        and no donated and batch array share memory. The donated arrays' byte spans are checked
        once and kept while the same array objects come back (an array's memory never moves; a
        change of shape or layout changes its facts), so a call checks its batch only."""
        found = fast_key(args)
        if found is None or len(found[1]) != len(sig.leaves) \
                or not all(x.dtype.isnative for x in found[1]):
            return
        leaves = found[1]
        facts = list(map(_leaf_facts, leaves))
        copy = [i for i, x in enumerate(leaves[n:], n) if not x.flags.carray]
        paths = [path for path, _, _ in sig.leaves]
        batch_paths = paths[n:]
        collect = [_collector(d) for d in sig.treedef]
        collect_params, collect_state, collect_batch = collect[0], collect[1], collect[2:]
        n_batch = len(collect_batch)
        plain_batch = all(d is pytree.ARRAY for d in sig.treedef[2:])
        native, guards, who = entry.native(), entry.guards, self.name
        ok = guards.ok if guards is not None else None
        build_aux = entry.out_treedef.children[1].builder() if self.has_aux else None
        # The donated arrays last checked for sharing memory: their ids, spans and the spans'
        # starts. A weak reference to each forgets the record when the array dies, as a new array
        # may then reuse its id (never the id of a live one: equal ids of live arrays are the
        # same arrays). The batch is checked against the spans on every call (it is usually new):
        # the facts pin each batch array's size and, for most, contiguity, so a C-contiguous one
        # costs its address and a bisection.
        donated_checked = None
        donated_refs = []   # keeps the weak references, and so their callbacks, alive
        contiguous_batch = all(f[3] for f in facts[n:])
        batch_sizes = [x.nbytes for x in leaves[n:]]

        def forget_donated(_):
            nonlocal donated_checked
            donated_checked = None

        def run(params, state, batch):
            nonlocal donated_checked
            leaves = []
            if not (collect_params(params, leaves) and collect_state(state, leaves)
                    and len(batch) == n_batch):
                return None
            donated_ids = list(map(id, leaves))
            if plain_batch:
                leaves.extend(batch)
            else:
                for c, b in zip(collect_batch, batch):
                    if not c(b, leaves):
                        return None
            try:
                if list(map(_leaf_facts, leaves)) != facts:
                    return None
            except AttributeError:   # a leaf that is not an array
                return None
            if ok is not None and not ok(None):
                return None   # a captured array changed: the slow path retraces
            checked = donated_checked
            if checked is None or checked[0] != donated_ids:
                donated = leaves[:n]
                spans = _check_in_place(who, list(zip(paths, paths, donated)), [])
                donated_refs[:] = [weakref.ref(x, forget_donated) for x in donated]
                donated_checked = checked = donated_ids, spans, [lo for lo, _, _ in spans]
            batch_leaves = batch if plain_batch else leaves[n:]
            spans, starts = checked[1], checked[2]
            if not contiguous_batch:
                _check_batch(who, spans, zip(batch_paths, batch_leaves), starts)
            elif spans:
                for x, size in zip(batch_leaves, batch_sizes):
                    low = _address(x)   # its bytes are [low, low + size): see above
                    k = bisect.bisect_left(starts, low + size) - 1
                    if size and k >= 0 and spans[k][1] > low:   # raises, naming both arrays
                        _check_batch(who, spans, zip(batch_paths, batch_leaves), starts)
            for i in copy:
                leaves[i] = _c_contiguous(leaves[i])
            outs = native(leaves)
            if build_aux is not None:
                return (outs[0], build_aux(iter(outs[1:base]))), params, state
            return outs[0], params, state

        run.guards = guards
        self._runners[found[0]] = self._last = run

    def ir(self, params, state, *batch, stage: str = "grad") -> str:
        """The IR of the step for these arguments at `stage` (see Jitted.ir)."""
        self._signature(params, state, batch)
        return self._jitted.ir(params, state, *batch, stage=stage)

    def compile_stats(self) -> dict:
        return self._jitted.compile_stats()


# (class, shape, dtype, flags.carray) of an array leaf, read in C: what a runner compares
_leaf_facts = operator.attrgetter("__class__", "shape", "dtype", "flags.carray")


def _collector(d: pytree.TreeDef):
    """`collect(obj, out) -> bool` for a structure `d` without static values: appends `obj`'s
    array leaves to `out` in pytree.flatten's order and returns True when `obj`'s containers are
    those of `d` (exact dict, list and tuple types; the same keys in order, the same lengths);
    False otherwise (what it appended is then meaningless). The leaves themselves are not
    checked: the caller compares their `_leaf_facts`."""
    if d.kind == "array":
        def collect(o, out):
            out.append(o)
            return True
        return collect
    typ = {"dict": dict, "list": list, "tuple": tuple}[d.kind]
    keys, size = d.keys, len(d.children)
    if all(c is pytree.ARRAY for c in d.children):
        if typ is dict:
            def collect(o, out):
                if type(o) is not dict or tuple(o) != keys:
                    return False
                out.extend(o.values())
                return True
        else:
            def collect(o, out):
                if type(o) is not typ or len(o) != size:
                    return False
                out.extend(o)
                return True
        return collect
    # A child that is an array (None here) or a dict of arrays (its keys here) is collected in
    # this loop rather than by a call of its own collector: the state of an optimizer is a dict
    # of such dicts, and a call costs more than the rest of the check of a child.
    subs = [None if c is pytree.ARRAY
            else c.keys if c.kind == "dict" and all(x is pytree.ARRAY for x in c.children)
            else _collector(c) for c in d.children]
    is_dict = typ is dict

    def collect(o, out):
        if type(o) is not typ or (tuple(o) != keys if is_dict else len(o) != size):
            return False
        for sub, v in zip(subs, o.values() if is_dict else o):
            if sub is None:
                out.append(v)
            elif type(sub) is tuple:
                if type(v) is not dict or tuple(v) != sub:
                    return False
                out.extend(v.values())
            elif not sub(v, out):
                return False
        return True
    return collect


def _check_in_place(who: str, donated, batch) -> list:
    """TypeError naming the first leaf of `donated` ((path, hint, array) of params and state) that
    cannot be updated in place, or that shares memory with another one or with a batch array.
    Returns the donated arrays' byte spans [(start, end, path)], sorted (see `_check_batch`)."""
    spans = []
    for path, _, x in donated:
        why = None
        if not isinstance(x, np.ndarray):
            why = f"it is a {type(x).__name__}, not a numpy array"
        elif not x.flags.writeable:
            why = "it is read-only"
        elif not x.flags.c_contiguous:
            why = "it is not C-contiguous (a Fortran-ordered array or a strided view)"
        elif not x.flags.aligned:
            why = f"its data is not aligned to its {x.dtype.itemsize}-byte elements"
        elif not x.dtype.isnative:
            why = "it is not in native byte order"
        elif x.dtype.kind != "f":   # an integer array would be traced, but carries no gradient
            why = f"it is an array of {x.dtype}, and parameters and optimizer state are float arrays"
        if why is not None:
            raise TypeError(f"{who}: {path} cannot be updated in place: {why}; pass a writeable "
                            f"C-contiguous array (np.ascontiguousarray(x), or x.copy())")
        if x.nbytes:
            start = _address(x)
            spans.append((start, start + x.nbytes, path))
    spans.sort()
    for (lo1, hi1, p1), (lo2, hi2, p2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise TypeError(f"{who}: {p1} and {p2} share memory (the same array passed twice, or "
                            f"views of one buffer); each must own its memory to be updated in "
                            f"place")
    if batch:
        _check_batch(who, spans, [(path, x) for path, _, x in batch])
    return spans


def _check_batch(who: str, spans: list, batch, starts: list | None = None):
    """TypeError when a batch array ((path, array) pairs) shares memory with a donated array
    (`spans`: their sorted, disjoint byte spans; `starts`: the spans' starts, if known)."""
    if not spans:
        return
    if starts is None:
        starts = [lo for lo, _, _ in spans]
    for path, x in batch:
        if not x.nbytes:
            continue
        if x.flags.c_contiguous:   # the common case, without a call of _byte_range
            low = _address(x)
            high = low + x.nbytes
        else:
            low, high = _byte_range(x)
        # the spans are disjoint and sorted: only the last one starting below `high` can overlap
        k = bisect.bisect_left(starts, high) - 1
        if k >= 0 and spans[k][1] > low:
            p = spans[k][2]
            raise TypeError(f"{who}: {path} and {p} share memory, and the step updates {p} in "
                            f"place; pass a copy of {path}")


def _interface_address(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


def _object_address(x: np.ndarray) -> int:
    return _data_pointer(id(x) + _NDARRAY_DATA_OFFSET).value


# An array's data pointer, read from the ndarray object as the native entry reads it
# (codegen/runtime.py checks this layout too): ~10x faster than `__array_interface__`, which
# builds a dict, and unlike `x.ctypes.data` leaves nothing in numpy's caches.
_NDARRAY_DATA_OFFSET = 16
_data_pointer = ctypes.c_void_p.from_address
_probe = np.zeros(1, np.float32)
_address = _object_address if _object_address(_probe) == _interface_address(_probe) \
    else _interface_address   # pragma: no cover - another ndarray layout
del _probe


def _byte_range(x: np.ndarray):
    """[low, high): the bytes from the lowest to the highest element of non-empty `x`."""
    start = _address(x)
    if x.flags.c_contiguous:
        return start, start + x.nbytes
    low = start + sum(s * (n - 1) for s, n in zip(x.strides, x.shape) if s < 0)
    high = start + sum(s * (n - 1) for s, n in zip(x.strides, x.shape) if s > 0) + x.itemsize
    return low, high

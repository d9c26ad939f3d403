"""The user-facing transformations: jit, jit_grad, jit_value_and_grad.

A decorated function traces its Python function once per input signature (pytree structure, static
values, array shapes and dtypes) into IR, transforms it (adjoint), optimizes it, and runs it. Called
with tracer arguments inside another trace, it inlines itself into that trace instead, so
`jit_grad(lambda x: jit_grad(f)(x).sum())` is a second derivative.
"""
from __future__ import annotations

import functools
import inspect
import logging
import numbers
import threading
import time

import numpy as np

from .ir.adjoint import grad_function
from .ir.builder import Builder, building, current, inline
from .ir.core import FLOAT_DTYPES
from .ir.passes import optimize
from .ir.verify import verify

from . import captures, errors, pytree
from .config import config
from .errors import ZeroGradientWarning, warn
from .signature import (Signature, arg_name, c_contiguous, check_numeric_sequences,
                        check_tracers_alive, explain_retrace,
                        dict_structure, fast_key, fast_leaves, leaf_facts)
from .tracer import Tracer
from .values import to_value, wrap

log = logging.getLogger("tracejit")

STAGES = ("forward", "grad", "optimized", "llvm", "llvm-opt", "asm")


class _Compiled:
    """Everything compiled for one signature. `seconds` splits the time it took: "trace",
    "passes" (verification, adjoint, optimization), and once native code exists "plan", "lower",
    "llvm" and "cache" (see NativeFunction.compile_seconds)."""

    def __init__(self, forward, transformed, out_treedef, n_value_outputs, seconds=None,
                 optimized=None):
        self.forward = forward          # ir.Function as traced
        self.transformed = transformed  # with the adjoint (grad kinds) or the forward again (jit)
        t0 = time.perf_counter()
        # (given when it comes from the trace cache)
        self.optimized = optimize(transformed) if optimized is None else optimized
        self.seconds = {"trace": 0.0, "passes": 0.0, **(seconds or {})}
        self.seconds["passes"] += time.perf_counter() - t0
        self.out_treedef = out_treedef
        self.n_value_outputs = n_value_outputs
        self._native = None
        self._lock = threading.Lock()
        self.guards = None  # captures.Guards of the trace, None when it captured no arrays
        # {output index: parameter index}: outputs the native code stores into the parameters'
        # arrays (a training step's parameters and state, see tracejit/train.py)
        self.donate = None
        self.assemble = None  # Jitted._assembler for this signature, made by its first call
        self.cacheable = False  # whether the trace cache may keep it (see Jitted._compile)
        self.trace_hit = False  # whether it came from the trace cache

    def native(self):
        """Native code of the optimized function, compiled on first use (once, even when two
        threads ask at the same time), through the persistent compile cache if enabled."""
        if self._native is None:
            with self._lock:
                if self._native is None:
                    from .codegen import compile_function
                    self._native = compile_function(self.optimized, cache=_disk_cache(),
                                                    donate=self.donate)
                    self.seconds.update(self._native.compile_seconds)
        return self._native

    def executable(self):
        """The runner of the optimized function: native code, or the interpreter if configured."""
        if config.backend == "interpreter":
            from .ir.interpreter import interpret
            return lambda arrays: interpret(self.optimized, arrays)
        return self.native()


class Jitted:
    """A compiled transformation of `fun` (see jit, jit_grad, jit_value_and_grad).

    Methods: decorating a method (`def loss(self, w, x)` in a class) works through the descriptor
    protocol: `m.loss` is bound to `m`, and `self` is a static argument: its hash and == are part
    of the compile key (so it must be hashable; a class defining __eq__ without __hash__ is not),
    and arrays read from its attributes are captured constants, guarded like other captures.
    argnums counts from the first argument after `self`, as for a bound method: argnums=0 is `w`.

    Captured arrays (numpy arrays the function reads from globals, closure cells or attributes
    rather than from its arguments) are constants of the compiled code; every call checks that
    they were neither rebound nor, up to captures.SMALL_BYTES bytes, changed in place, and traces
    again if they were (see tracejit/captures.py). Larger captured arrays warn at trace time
    (CaptureWarning): pass data that changes between calls as arguments.
    """

    # Whether calls with pytree arguments may take the fast path (see __call__); only the
    # benchmark and the tests turn it off, to time and compare the full Signature path.
    _fast_trees = True

    def __init__(self, fun, kind: str, argnums=0, has_aux=False, method=False):
        if not callable(fun):
            raise TypeError(f"{kind} expects a function, got {type(fun).__name__}")
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.kind = kind  # "jit", "grad" or "value_and_grad"
        self.has_aux = has_aux
        if isinstance(argnums, int):
            self.argnums, self.single = (argnums,), True
        else:
            self.argnums, self.single = tuple(argnums), False
            if not self.argnums or not all(isinstance(a, int) for a in self.argnums):
                raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
        self.name = getattr(fun, "__name__", "fun").replace("<lambda>", "lambda")
        try:
            params = inspect.signature(fun).parameters.values()
            self.arg_names = [p.name for p in params
                              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            self.arg_names = []
        self._cache: dict = {}
        self._fast: dict = {}   # (shape, dtype) per positional array -> runner (native backend)
        # (signature.fast_leaves structure, leaf_facts of every leaf) of pytree arguments -> runner
        self._tree_runners: dict = {}
        self._tree_last: dict = {}  # structure -> (facts list, runner) of its last fast call
        self._lock = threading.Lock()
        self._warned_retracing = False
        self._stale = 0  # retraces because a captured array changed
        # A method's twin: `fun` takes `self` first, passed as a static argument (see __get__);
        # argnums (as the user wrote them) count from the argument after it.
        self._method = method
        self._method_twin = None
        if method:
            self.argnums = tuple(a + 1 if a >= 0 else a for a in self.argnums)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        twin = self._method_twin
        if twin is None:
            user_argnums = self.argnums[0] if self.single else self.argnums
            twin = self._method_twin = Jitted(self.fun, self.kind, user_argnums, self.has_aux,
                                              method=True)
        return _BoundJitted(twin, instance)

    # --------------------------------------------------------------------------------- tracing
    def _check_argnums(self, n_args):
        shift = 1 if self._method else 0
        for a in self.argnums:
            if not -n_args <= a < n_args or (shift and a % n_args == 0):
                raise ValueError(f"{self.name}: argnums {a - shift if a >= 0 else a} is out of "
                                 f"range for {n_args - shift} positional arguments"
                                 f"{' after self' if shift else ''}")

    def _wrt(self, sig: Signature):
        ranges = sig.leaf_ranges()
        wrt = []
        for a in self.argnums:
            r = ranges[a % sig.n_args]
            d = sig.treedef[a % sig.n_args]
            if d.num_leaves == 0 or d.has_static:
                name = self.arg_names[a] if a < len(self.arg_names) else f"args[{a}]"
                a = a - 1 if self._method and a > 0 else a
                raise TypeError(f"{self.name}: argument {name} is differentiated (argnums={a}) but "
                                f"holds no arrays or also holds static values "
                                f"({d.describe()}); pass float arrays there")
            for i in r:
                if sig.types[i].dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{self.name}: cannot differentiate with respect to "
                                    f"{sig.leaves[i][0]}, an integer array ({sig.types[i]}): "
                                    f"integers carry no gradient; leave it out of argnums")
            wrt.extend(r)
        return wrt

    def _trace(self, sig: Signature, builder: Builder):
        """Trace the Python function into `builder`; returns (outputs, out_treedef, n_value)."""
        tracers = []
        for (path, hint, _), t in zip(sig.leaves, sig.types):
            tracers.append(Tracer(builder.add_param(t, hint), builder))
        args, kwargs = sig.rebuild(tracers)
        captures.note_function(self.fun, args[0] if self._method else None)
        out = self.fun(*args, **kwargs)
        if self.kind == "jit":
            leaves, treedef = pytree.flatten(out, "output", "out")
            return [to_value(v) for _, _, v in leaves], treedef, len(leaves)
        if self.has_aux:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(f"{self.name}: with has_aux=True the function must return "
                                f"(loss, aux), got {type(out).__name__}")
            loss, aux = out
        else:
            loss, aux = out, None
        if not isinstance(loss, (Tracer, np.ndarray, numbers.Real)):
            hint = " (to return more than the loss, pass has_aux=True and return (loss, aux))" \
                if isinstance(loss, (tuple, list, dict)) and not self.has_aux else ""
            what = "None" if loss is None else f"a {type(loss).__name__}"
            raise TypeError(f"{self.name}: {self.kind_name} needs a function returning a scalar; "
                            f"it returned {what}{hint}")
        loss_v = to_value(loss)
        if loss_v.shape != () or loss_v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self.name}: {self.kind_name} needs a function returning a scalar; "
                            f"it returned {loss_v.type} (reduce it, e.g. with .sum() or .mean())")
        aux_leaves, aux_def = pytree.flatten(aux, "aux", "aux")
        return [loss_v] + [to_value(v) for _, _, v in aux_leaves], aux_def, 1 + len(aux_leaves)

    @property
    def kind_name(self):
        return {"jit": "jit", "grad": "jit_grad", "value_and_grad": "jit_value_and_grad"}[self.kind]

    def _compile(self, sig: Signature) -> _Compiled:
        """Trace, transform and optimize for `sig`, or take all that from the persistent trace
        cache (tracejit/trace_cache.py), and store it there when the trace may be cached."""
        from . import trace_cache   # (here: pickle and dis would slow down `import tracejit`)
        t0 = time.perf_counter()
        # native code only: the interpreter, the test oracle, always traces (and so never loads
        # the code generator's modules)
        disk = _disk_cache() if config.backend != "interpreter" else False
        key = trace_cache.key(self, sig) if disk else None
        if key is not None:
            cached = trace_cache.load(disk, key)
            if cached is not None:
                fwd, transformed, optimized, out_def, n_value = cached
                entry = _Compiled(fwd, transformed, out_def, n_value,
                                  {"passes": time.perf_counter() - t0}, optimized=optimized)
                entry.trace_hit = True
                return entry
        entry = self._trace_and_transform(sig, t0)
        if key is not None and entry.guards is None and entry.cacheable:
            trace_cache.store(disk, key, (entry.forward, entry.transformed, entry.optimized,
                                          entry.out_treedef, entry.n_value_outputs))
        return entry

    def _trace_and_transform(self, sig: Signature, t0: float) -> _Compiled:
        from . import trace_cache
        trace_cache.stats["traces"] += 1
        warned = errors.warnings_issued
        b = Builder(self.name)
        with captures.recording() as rec, building(b):
            outs, out_def, n_value = self._trace(sig, b)
            guards = captures.discover(rec, self.name)
        if b.captured:
            raise TypeError(f"{self.name}: the function uses a traced value from a trace that has "
                            f"ended (a leaked tracer); pass it as an argument instead")
        fwd = b.finish(outs)
        t1 = time.perf_counter()
        fwd = verify(fwd)
        if self.kind == "jit":
            entry = _Compiled(fwd, fwd, out_def, n_value,
                              {"trace": t1 - t0, "passes": time.perf_counter() - t1})
        else:
            wrt = self._wrt(sig)
            self._warn_zero_gradients(sig, fwd, wrt)
            grad = verify(grad_function(fwd, wrt, name=f"{self.name}.grad"))
            entry = _Compiled(fwd, grad, out_def, n_value,
                              {"trace": t1 - t0, "passes": time.perf_counter() - t1})
        entry.guards = guards or None
        # the trace cache keeps no trace that warned (a hit would not warn again)
        entry.cacheable = errors.warnings_issued == warned
        return entry

    def _warn_zero_gradients(self, sig, fwd, wrt):
        """Warn (ZeroGradientWarning) for each differentiated array the loss cannot depend on
        through float-valued data flow: no path in the IR from the parameter to the loss, or only
        through comparisons and other bool values. Its gradient is then zero everywhere: correct,
        but almost always a mistake in the function or in argnums (JAX errs or warns alike)."""
        needed = {id(fwd.outputs[0])}
        for ins in reversed(fwd.instrs):
            # (a loop's tuple of results carries the gradients of its float results)
            if id(ins.out) in needed and ins.out.dtype in FLOAT_DTYPES + ("tuple",):
                needed.update(id(v) for v in ins.inputs)
        paths = list(sig.array_paths(self.arg_names))
        dead = [paths[i] for i in wrt if id(fwd.params[i]) not in needed]
        if dead:
            its = "its gradient is" if len(dead) == 1 else "their gradients are"
            warn(f"{self.name}: the output does not depend (differentiably) on {', '.join(dead)}, "
                 f"so {its} zero everywhere; check the function and argnums", ZeroGradientWarning)

    def _lookup(self, sig: Signature, instance=None) -> _Compiled:
        entry = self._cache.get(sig.key)
        if entry is None or (entry.guards is not None and not entry.guards.ok(instance)):
            with self._lock:
                entry = self._cache.get(sig.key)
                why = None
                if entry is not None and entry.guards is not None \
                        and not entry.guards.ok(instance):
                    why = entry.guards.why(instance)
                    self._stale += 1
                    # the fast path may hold the stale code under this key
                    # (list(): another thread may be adding a runner meanwhile)
                    for runners in (self._fast, self._tree_runners):
                        for k, run in list(runners.items()):
                            if getattr(run, "guards", None) is entry.guards:
                                runners.pop(k, None)
                    self._tree_last.clear()
                    entry = None
                if entry is None:
                    if why is None and self._cache:
                        why = explain_retrace(self.name, sig.key, self._cache, self.arg_names)
                    if why is not None:
                        log.info("%s: retracing because %s", self.name, why)
                    entry = self._compile(sig)
                    self._cache[sig.key] = entry
                    n = len(self._cache) + self._stale
                    if n > config.retrace_warning and not self._warned_retracing:
                        self._warned_retracing = True
                        log.warning(
                            "%s has been traced for %d different signatures (the latest because "
                            "%s); every new signature traces and compiles again. Keep shapes, "
                            "dtypes, containers and static arguments fixed (pad batches to one "
                            "size; pass changing numbers as arrays, and data that changes between "
                            "calls as arguments rather than captured arrays).", self.name, n, why)
        return entry

    def compile_stats(self) -> dict:
        """Compile-related time of every signature traced so far, summed: "trace", "passes" (IR
        verification, adjoint, optimization), "plan", "lower", "llvm" and "cache" (native code:
        see NativeFunction.compile_seconds); "total"; "signatures"; "cache_hits" (signatures
        whose native code was loaded from the persistent cache); "trace_hits" (signatures whose
        traced and optimized IR came from the trace cache, tracejit/trace_cache.py)."""
        entries = list(self._cache.values())
        stats = {k: 0.0 for k in ("trace", "passes", "plan", "lower", "llvm", "cache")}
        for e in entries:
            for k, v in e.seconds.items():
                stats[k] = stats.get(k, 0.0) + v
        stats["total"] = sum(stats.values())
        stats["signatures"] = len(entries)
        stats["cache_hits"] = sum(1 for e in entries
                                  if e._native is not None and getattr(e._native, "cache_hit", False))
        stats["trace_hits"] = sum(1 for e in entries if e.trace_hit)
        return stats

    # --------------------------------------------------------------------------------- calling
    def __call__(self, *args, **kwargs):
        if not kwargs and config.backend != "interpreter":
            # fast paths, for calls whose signature was compiled before: positional plain arrays
            # keyed by their shapes and dtypes; positional pytrees of arrays keyed by their
            # structure too (signature.fast_leaves). The runner of a function with captured arrays
            # checks them first (captures.Guards.ok) and raises _StaleCapture to send the call
            # down the slow path, which retraces. Any miss takes the slow path, which checks
            # everything and registers a runner for the next call.
            if len(args) == 1 and type(args[0]) is dict and self._fast_trees:
                # the commonest pytree call, f(params), straight to the structure's last runner:
                # its native check (codegen/leafcheck.py) also tells that every value is an
                # exact ndarray, which fast_leaves below would check in Python first
                d = args[0]
                last = self._tree_last.get(dict_structure(d))
                if last is not None:
                    leaves = tuple(d.values())
                    if last[0](leaves):
                        try:
                            return last[1](leaves)
                        except _StaleCapture:
                            pass
            key = tuple([(a.shape, a.dtype) for a in args if type(a) is np.ndarray])
            if len(key) == len(args):
                run = self._fast.get(key)
                if run is not None:
                    try:
                        return run(args)
                    except _StaleCapture:
                        pass
            elif self._fast_trees:
                found = fast_leaves(args)
                if found is not None:
                    # the runner last used for this structure when its native check passes
                    # (codegen/leafcheck.py: the same leaf types, dtypes, shapes and layout);
                    # else the one registered under the structure and every leaf's facts
                    structure, leaves = found
                    last = self._tree_last.get(structure)
                    if last is not None and last[0](tuple(leaves)):
                        run = last[1]
                    else:
                        run = self._tree_runners.get(
                            (structure, tuple(map(leaf_facts, leaves))))
                        if run is not None and run.check is not None:
                            if run.check is True:   # made on the runner's first use
                                from .codegen.leafcheck import leaf_checker
                                run.check = leaf_checker(leaves, _disk_cache())
                            if run.check is not None:
                                self._tree_last[structure] = (run.check, run)
                    if run is not None:
                        try:
                            return run(leaves)
                        except _StaleCapture:
                            pass
        if self.kind != "jit":
            self._check_argnums(len(args))
        sig = Signature(self.name, self.arg_names, args, kwargs)
        if sig.numeric:
            check_numeric_sequences(self.name, sig, self._cache, self.arg_names,
                                    () if self.kind == "jit" else self.argnums)
        # inside another trace, inline even without tracer arguments: the function may close
        # over a tracer of that trace
        if current() is not None or any(isinstance(x, Tracer) for _, _, x in sig.leaves):
            check_tracers_alive(self.name, sig)
            return self._inline(sig, args, kwargs)
        try:
            entry = self._lookup(sig, args[0] if self._method else None)
        except Exception as e:
            if self.kind != "jit":
                try:  # a differentiated argument without arrays is the better explanation
                    self._wrt(sig)
                except TypeError as why:
                    raise why from e
            raise
        arrays = tuple(c_contiguous(x) for _, _, x in sig.leaves)
        if entry._native is None and not kwargs and self._fast_trees and \
                config.backend != "interpreter" and not (
                    len(sig.leaves) == len(args) and all(type(a) is np.ndarray for a in args)):
            # a pytree call: its runner will want the native leaf check, which the compile
            # can build alongside (codegen/leafcheck.py)
            from .codegen import leafcheck
            leafcheck.request()
        assemble = entry.assemble
        if assemble is None:
            assemble = entry.assemble = self._assembler(sig, entry.out_treedef,
                                                        entry.n_value_outputs)
        result = assemble(entry.executable()(arrays))
        if not kwargs and config.backend != "interpreter":
            self._add_runner(args, sig, entry)
        return result

    def _add_runner(self, args, sig, entry):
        """Register a fast-path runner for calls like this one (positional arguments only, every
        leaf a numpy array in native byte order): called after the slow path checked the call.
        Its key pins every leaf's shape and dtype (byte order included, so only native byte order
        gets one) and, for pytrees, the structure; the runner copies what the native code cannot
        read (see c_contiguous). Inputs are never written: copies are the runner's own. A pytree
        runner that copies nothing gets `run.check` on its first use (True until then; None for
        the others; codegen/leafcheck.py): one native call telling whether a call's leaves have
        the types, dtypes, shapes and layout of the leaves it was made from, which `__call__`
        tries first for the structure's last runner instead of reading every leaf's facts (a
        process that calls each signature once never pays for compiling the check)."""
        if len(sig.leaves) == len(args) and all(type(a) is np.ndarray and a.dtype.isnative
                                                for a in args):
            key, runners, copy = tuple((a.shape, a.dtype) for a in args), self._fast, None
        elif self._fast_trees:
            found = fast_key(args)
            # equal counts: fast_key refuses array-likes, so these are the Signature's leaves
            if found is None or len(found[1]) != len(sig.leaves) \
                    or not all(x.dtype.isnative for x in found[1]):
                return
            # the key pins which leaves need a copy (flags.carray): the runner copies those
            key, runners = found[0], self._tree_runners
            copy = [i for i, x in enumerate(found[1]) if not x.flags.carray]
        else:
            return
        native, assemble, guards = entry.native(), entry.assemble, entry.guards
        ok = guards.ok if guards is not None else None
        contiguous = c_contiguous
        if copy is None:  # plain arrays (a tuple): check each one's layout
            def run(a):
                if ok is not None and not ok(None):
                    raise _StaleCapture
                return assemble(native(tuple([x if x.flags.carray else contiguous(x)
                                              for x in a])))
        elif copy:  # pytree leaves (a fresh list, ours to change)
            def run(leaves):
                if ok is not None and not ok(None):
                    raise _StaleCapture
                for i in copy:
                    leaves[i] = contiguous(leaves[i])
                return assemble(native(leaves))
        else:
            def run(leaves):
                if ok is not None and not ok(None):
                    raise _StaleCapture
                return assemble(native(leaves))
        run.guards = guards
        # a pytree runner that copies nothing gets a native check of its leaves on first use
        run.check = True if copy == [] else None
        runners[key] = run

    def _arg_name(self, i):
        return arg_name(self.arg_names, i)

    def _assembler(self, sig, out_def, n_value):
        """A function turning the flat outputs of the compiled function into what the call
        returns: the value, aux and gradients in the structure of the arguments."""
        if self.kind == "jit":
            build_out = out_def.builder()
            return lambda results: build_out(iter(results[:n_value]))
        grad_defs = [sig.treedef[a % sig.n_args] for a in self.argnums]
        has_aux, single, kind = self.has_aux, self.single, self.kind

        if single and not has_aux and grad_defs[0] is pytree.ARRAY:
            if kind == "grad":
                return lambda results: results[n_value]
            return lambda results: (results[0], results[n_value])

        # the gradients follow the value outputs, one per leaf of each differentiated argument
        # in argnums order; prebuilt unflatteners (TreeDef.builder) consume them in turn
        build_aux = out_def.builder() if has_aux else None
        build_grads = [d.builder() for d in grad_defs]

        def assemble(results):
            it = iter(results)
            loss = next(it)
            aux = build_aux(it) if has_aux else None
            if single:
                g = build_grads[0](it)
            else:
                g = tuple([b(it) for b in build_grads])
            if kind == "grad":
                return (g, aux) if has_aux else g
            return ((loss, aux), g) if has_aux else (loss, g)
        return assemble

    def _inline(self, sig, args, kwargs):
        """Called on tracers inside another trace: inline this function into that trace."""
        if self.kind == "jit":
            captures.note_function(self.fun, args[0] if self._method else None)
            return self.fun(*args, **kwargs)
        sub = Builder(self.name)
        with building(sub):
            outs, out_def, n_value = self._trace(sig, sub)
        fwd = sub.finish(outs)
        captured = list(sub.captured.values())
        wrt = self._wrt(sig)
        self._warn_zero_gradients(sig, fwd, wrt)
        grad = grad_function(fwd, wrt)
        inputs = [to_value(x) for _, _, x in sig.leaves] + [to_value(t) for t, _ in captured]
        results = [wrap(v) for v in inline(grad, inputs)]
        return self._assembler(sig, out_def, n_value)(results)

    # --------------------------------------------------------------------------------- dumps
    def ir(self, *args, stage: str = "grad", **kwargs) -> str:
        """The IR dump of this function for these arguments at `stage`: "forward" (as traced),
        "grad" (after the adjoint transformation), "optimized" (after the IR passes, with the
        kernels), "llvm" (as lowered: blocks named after the loop nests), "llvm-opt" (after
        LLVM's optimizations) or "asm" (the native assembly)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        sig = Signature(self.name, self.arg_names, args, kwargs)
        entry = self._lookup(sig, args[0] if self._method else None)
        if stage == "forward":
            return str(entry.forward)
        if stage == "grad":
            return str(entry.transformed)
        if stage == "optimized":
            from .codegen import describe
            return describe(entry.optimized, entry.donate)
        native = entry.native()
        if stage == "llvm":
            return native.llvm_ir_unoptimized
        return native.llvm_ir if stage == "llvm-opt" else native.asm

    def graph(self, *args, stage: str = "grad", path=None, **kwargs) -> str:
        """The IR at `stage` ("forward", "grad" or "optimized", drawn with its kernels) as
        Graphviz DOT text; with `path` (.svg, .png, .pdf) also rendered there, which needs
        `pip install 'tracejit[viz]'` and Graphviz's `dot` (see tracejit.graph)."""
        from .graph import graph_of_entry
        entry = self._lookup(Signature(self.name, self.arg_names, args, kwargs))
        return graph_of_entry(entry, stage, path)


class _StaleCapture(Exception):
    """Raised by a fast-path runner whose captured arrays changed (see Jitted.__call__)."""


class _BoundJitted:
    """A decorated method bound to an instance (`m.loss`): calls and `.ir` pass the instance as
    the static first argument of the method's twin Jitted (see Jitted's docstring)."""

    def __init__(self, twin: Jitted, instance):
        self._twin = twin
        self.__self__ = instance
        self.__func__ = twin.fun
        self.__name__ = twin.name
        self.__doc__ = twin.fun.__doc__

    def _check_instance(self):
        try:
            hash(self.__self__)
        except TypeError:
            cls = type(self.__self__).__name__
            raise TypeError(
                f"{self._twin.name}: a decorated method takes `self` as a static argument, whose "
                f"hash and == are part of the compile key, but {cls} instances are not hashable "
                f"(a class defining __eq__ without __hash__ is not); give {cls} a __hash__ (or "
                f"drop its __eq__), or decorate a function that takes the model's arrays as an "
                f"argument, e.g. loss(params, x) called as loss(model.params, x)") from None

    def __call__(self, *args, **kwargs):
        self._check_instance()
        return self._twin(self.__self__, *args, **kwargs)

    def ir(self, *args, **kwargs) -> str:
        """Jitted.ir for this instance."""
        self._check_instance()
        return self._twin.ir(self.__self__, *args, **kwargs)

    def compile_stats(self) -> dict:
        return self._twin.compile_stats()

    def __repr__(self):
        return f"<bound {self._twin.kind_name} method {self._twin.name} of {self.__self__!r}>"


def _disk_cache():
    """The persistent compile cache as configured (tracejit.config.cache / cache_dir), or False."""
    if not config.cache:
        return False
    from .codegen.cache import DiskCache

    from . import __version__
    return DiskCache(config.cache_dir, version=f"tracejit {__version__}")



def jit(fun=None):
    """Compile `fun` (its forward computation) for each input signature."""
    if fun is None:
        return jit
    return Jitted(fun, "jit")


def jit_grad(fun=None, *, argnums=0, has_aux=False):
    """The gradient of scalar-valued `fun` w.r.t. argument(s) `argnums`, compiled.

    On a method, argnums counts from the argument after `self` (see Jitted). A differentiated
    argument the output cannot depend on gets zeros and a ZeroGradientWarning at trace time."""
    if fun is None:
        return lambda f: Jitted(f, "grad", argnums, has_aux)
    return Jitted(fun, "grad", argnums, has_aux)


def jit_value_and_grad(fun=None, *, argnums=0, has_aux=False):
    """Like jit_grad, returning (value, grads); with has_aux, ((value, aux), grads)."""
    if fun is None:
        return lambda f: Jitted(f, "value_and_grad", argnums, has_aux)
    return Jitted(fun, "value_and_grad", argnums, has_aux)

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

import numpy as np

from ir.adjoint import grad_function
from ir.builder import Builder, building, current, inline
from ir.core import FLOAT_DTYPES, TensorType
from ir.passes import optimize
from ir.verify import verify

from . import pytree
from .config import config
from .tracer import Tracer, to_value, wrap

log = logging.getLogger("tracejit")

STAGES = ("forward", "grad", "optimized", "llvm", "llvm-opt", "asm")


class _Signature:
    """How one call's arguments split into traced leaves and static structure.

    What a call may pass (checked here, before anything is traced or run):
    - float32 and float64 numpy arrays are traced; their shapes and dtypes are part of the compile
      key, so a new shape or dtype traces again. Any layout works: non-contiguous, Fortran-ordered,
      read-only, misaligned and byte-swapped arrays are copied to what the native code reads (see
      `_c_contiguous`); the caller's arrays are never written to. Arrays of other dtypes (int,
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
                name = arg_names[i] if i < len(arg_names) else f"args[{i}]"
                lv, d = pytree.flatten(a, name, name.replace("[", ".").replace("]", ""), numeric)
                leaves.extend(lv)
                defs.append(d)
            for k in sorted(kwargs):
                lv, d = pytree.flatten(kwargs[k], k, k, numeric)
                leaves.extend(lv)
                defs.append(("kw", k, d))
        except RecursionError:
            raise TypeError(f"{fun_name}: an argument nests containers too deeply (does a list or "
                            f"dict contain itself?)") from None
        except TypeError as e:  # an unhashable or masked leaf
            raise TypeError(f"{fun_name}: {e}") from None
        self.leaves = leaves
        self.treedef = tuple(defs)
        self.numeric = numeric  # [(path, description)] of lists/tuples of Python numbers
        self.n_args = len(args)
        self.kw_names = sorted(kwargs)
        self.types = []
        for path, _, x in leaves:
            if isinstance(x, Tracer):
                self.types.append(x.value.type)
                continue
            dt = x.dtype
            if dt.kind != "f" or dt.itemsize not in (4, 8):
                raise TypeError(f"{fun_name}: argument {path}: expected a float32 or float64 "
                                f"array, got an array of dtype {dt} and shape {list(x.shape)}"
                                f"{_DTYPE_HINTS.get(dt.kind, '')}")
            self.types.append(TensorType("f64" if dt.itemsize == 8 else "f32", x.shape))
        self.key = (self.treedef, tuple(self.types))

    def array_paths(self, arg_names) -> dict:
        """{path: i} of the array leaves of this signature, i indexing `self.types`."""
        paths = []
        for i, d in enumerate(self.treedef):
            if d[0] == "kw":
                paths += pytree.array_paths(d[2], d[1])
            else:
                paths += pytree.array_paths(d, arg_names[i] if i < len(arg_names) else f"args[{i}]")
        return {p: i for i, p in enumerate(paths)}

    def leaf_ranges(self):
        """Index range of each positional argument's leaves in `self.leaves`."""
        ranges, start = [], 0
        for d in self.treedef[:self.n_args]:
            n = pytree.count(d)
            ranges.append(range(start, start + n))
            start += n
        return ranges

    def rebuild(self, leaf_values):
        """(args, kwargs) with the array leaves replaced by `leaf_values`."""
        args, kwargs, pos = [], {}, 0
        for d in self.treedef:
            sub = d[2] if d[0] == "kw" else d
            n = pytree.count(sub)
            val = pytree.unflatten(sub, leaf_values[pos:pos + n])
            pos += n
            if d[0] == "kw":
                kwargs[d[1]] = val
            else:
                args.append(val)
        return args, kwargs


class _Compiled:
    """Everything compiled for one signature."""

    def __init__(self, forward, transformed, out_treedef, n_value_outputs):
        self.forward = forward          # ir.Function as traced
        self.transformed = transformed  # with the adjoint (grad kinds) or the forward again (jit)
        self.optimized = optimize(transformed)
        self.out_treedef = out_treedef
        self.n_value_outputs = n_value_outputs
        self._native = None
        self._lock = threading.Lock()

    def native(self):
        """Native code of the optimized function, compiled on first use (once, even when two
        threads ask at the same time)."""
        if self._native is None:
            with self._lock:
                if self._native is None:
                    from codegen import compile_function
                    self._native = compile_function(self.optimized)
        return self._native

    def executable(self):
        """The runner of the optimized function: native code, or the interpreter if configured."""
        if config.backend == "interpreter":
            from ir.interpreter import interpret
            return lambda arrays: interpret(self.optimized, arrays)
        return self.native()


class Jitted:
    def __init__(self, fun, kind: str, argnums=0, has_aux=False):
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
        self._lock = threading.Lock()

    # --------------------------------------------------------------------------------- tracing
    def _check_argnums(self, n_args):
        for a in self.argnums:
            if not -n_args <= a < n_args:
                raise ValueError(f"{self.name}: argnums {a} is out of range for {n_args} positional "
                                 f"arguments")

    def _wrt(self, sig: _Signature):
        ranges = sig.leaf_ranges()
        wrt = []
        for a in self.argnums:
            r = ranges[a % sig.n_args]
            d = sig.treedef[a % sig.n_args]
            if pytree.count(d) == 0 or _has_static(d):
                name = self.arg_names[a] if a < len(self.arg_names) else f"args[{a}]"
                raise TypeError(f"{self.name}: argument {name} is differentiated (argnums={a}) but "
                                f"holds no arrays or also holds static values "
                                f"({pytree.describe(d)}); pass float arrays there")
            wrt.extend(r)
        return wrt

    def _trace(self, sig: _Signature, builder: Builder):
        """Trace the Python function into `builder`; returns (outputs, out_treedef, n_value)."""
        tracers = []
        for (path, hint, _), t in zip(sig.leaves, sig.types):
            tracers.append(Tracer(builder.add_param(t, hint), builder))
        args, kwargs = sig.rebuild(tracers)
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

    def _compile(self, sig: _Signature) -> _Compiled:
        b = Builder(self.name)
        with building(b):
            outs, out_def, n_value = self._trace(sig, b)
        if b.captured:
            raise TypeError(f"{self.name}: the function uses a traced value from a trace that has "
                            f"ended (a leaked tracer); pass it as an argument instead")
        fwd = verify(b.finish(outs))
        if self.kind == "jit":
            return _Compiled(fwd, fwd, out_def, n_value)
        grad = verify(grad_function(fwd, self._wrt(sig), name=f"{self.name}.grad"))
        return _Compiled(fwd, grad, out_def, n_value)

    def _lookup(self, sig: _Signature) -> _Compiled:
        entry = self._cache.get(sig.key)
        if entry is None:
            with self._lock:
                entry = self._cache.get(sig.key)
                if entry is None:
                    if self._cache:
                        log.info("%s: tracing a new signature %s", self.name,
                                 ", ".join(f"{p}: {t}" for (p, _, _), t in zip(sig.leaves, sig.types)))
                    entry = self._compile(sig)
                    self._cache[sig.key] = entry
        return entry

    # --------------------------------------------------------------------------------- calling
    def __call__(self, *args, **kwargs):
        if not kwargs and config.backend != "interpreter":
            # fast path: positional plain arrays seen before with these shapes and dtypes
            try:
                key = tuple([(a.shape, a.dtype) for a in args if type(a) is np.ndarray])
            except AttributeError:  # pragma: no cover
                key = None
            if key is not None and len(key) == len(args):
                run = self._fast.get(key)
                if run is not None:
                    return run(args)
        if self.kind != "jit":
            self._check_argnums(len(args))
        sig = _Signature(self.name, self.arg_names, args, kwargs)
        if sig.numeric:
            self._check_numeric_sequences(sig)
        # inside another trace, inline even without tracer arguments: the function may close
        # over a tracer of that trace
        if current() is not None or any(isinstance(x, Tracer) for _, _, x in sig.leaves):
            return self._inline(sig, args, kwargs)
        try:
            entry = self._lookup(sig)
        except Exception as e:
            if self.kind != "jit":
                try:  # a differentiated argument without arrays is the better explanation
                    self._wrt(sig)
                except TypeError as why:
                    raise why from e
            raise
        arrays = tuple(_c_contiguous(x) for _, _, x in sig.leaves)
        assemble = self._assembler(sig, entry.out_treedef, entry.n_value_outputs)
        result = assemble(entry.executable()(arrays))
        # The fast path's key pins every parameter's shape and dtype (byte order included, so
        # only native byte order gets one); its runner copies what the native code cannot read.
        if not kwargs and config.backend != "interpreter" and len(sig.leaves) == len(args) \
                and all(type(a) is np.ndarray and a.dtype.isnative for a in args):
            native = entry.native()
            contiguous = _c_contiguous
            self._fast[tuple((a.shape, a.dtype) for a in args)] = lambda a: assemble(native(
                tuple([x if x.flags.carray else contiguous(x) for x in a])))
        return result

    def _check_numeric_sequences(self, sig: _Signature):
        """A list or tuple of Python numbers is static (see `_Signature`); refuse it where an
        array is expected: in a differentiated argument, or where an earlier call traced one."""
        traced = {}  # path -> type, over every signature traced so far
        for key in list(self._cache):
            old = _Signature.__new__(_Signature)
            old.treedef, old.types = key
            for path, i in old.array_paths(self.arg_names).items():
                traced[path] = old.types[i]
        n = sig.n_args
        argnums = () if self.kind == "jit" else [a for a in self.argnums if -n <= a < n]
        for path, what in sig.numeric:
            for a in argnums:
                if _is_under(path, self._arg_name(a % n)):
                    raise TypeError(f"{self.name}: argument {path} is differentiated (argnums={a}) "
                                    f"but is {what}, which tracejit treats as a static value; "
                                    f"pass np.asarray({path}) to trace it")
            before = next((t for p, t in traced.items() if _is_under(p, path)), None)
            if before is not None:
                raise TypeError(f"{self.name}: argument {path}: expected an array (an earlier call "
                                f"traced {before} here), got {what}, which tracejit treats as a "
                                f"static value; pass np.asarray({path}) to trace it")

    def _arg_name(self, i):
        return self.arg_names[i] if i < len(self.arg_names) else f"args[{i}]"

    def _assembler(self, sig, out_def, n_value):
        """A function turning the flat outputs of the compiled function into what the call
        returns: the value, aux and gradients in the structure of the arguments."""
        if self.kind == "jit":
            return lambda results: pytree.unflatten(out_def, results[:n_value])
        ranges = sig.leaf_ranges()
        grad_defs = []
        for a in self.argnums:
            d = sig.treedef[a % sig.n_args]
            grad_defs.append((d, len(ranges[a % sig.n_args])))
        has_aux, single, kind = self.has_aux, self.single, self.kind

        if single and not has_aux and grad_defs[0][0] == pytree.ARRAY:
            if kind == "grad":
                return lambda results: results[n_value]
            return lambda results: (results[0], results[n_value])

        def assemble(results):
            loss = results[0]
            aux = pytree.unflatten(out_def, results[1:n_value]) if has_aux else None
            per_arg, pos = [], n_value
            for d, n in grad_defs:
                per_arg.append(pytree.unflatten(d, results[pos:pos + n]))
                pos += n
            g = per_arg[0] if single else tuple(per_arg)
            if kind == "grad":
                return (g, aux) if has_aux else g
            return ((loss, aux), g) if has_aux else (loss, g)
        return assemble

    def _inline(self, sig, args, kwargs):
        """Called on tracers inside another trace: inline this function into that trace."""
        if self.kind == "jit":
            return self.fun(*args, **kwargs)
        sub = Builder(self.name)
        with building(sub):
            outs, out_def, n_value = self._trace(sig, sub)
        fwd = sub.finish(outs)
        captured = list(sub.captured.values())
        grad = grad_function(fwd, self._wrt(sig))
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
        sig = _Signature(self.name, self.arg_names, args, kwargs)
        entry = self._lookup(sig)
        if stage == "forward":
            return str(entry.forward)
        if stage == "grad":
            return str(entry.transformed)
        if stage == "optimized":
            from codegen import describe
            return describe(entry.optimized)
        native = entry.native()
        if stage == "llvm":
            return native.llvm_ir_unoptimized
        return native.llvm_ir if stage == "llvm-opt" else native.asm


_DTYPE_HINTS = {
    "i": " (pass integer data such as class labels as one-hot float arrays, or close over it as a "
         "constant)",
    "u": " (pass integer data such as class labels as one-hot float arrays, or close over it as a "
         "constant)",
    "b": " (pass masks as float arrays, x.astype(np.float32), or close over them as constants)",
    "c": " (complex numbers are not supported)",
    "f": " (tracejit computes in float32 and float64: convert with x.astype(np.float32))",
    "O": " (an array of Python objects cannot be traced)",
}


def _c_contiguous(x):
    """`x` as an array the native code reads: C-contiguous, aligned to its element size (the native
    code uses element-aligned vector loads) and in native byte order. `x` itself when it already is
    (writeable or not: native code never writes its inputs), otherwise a copy. Not
    np.ascontiguousarray: it turns 0-d arrays into 1-d ones. The fast path of `Jitted.__call__`
    inlines the common case (`x.flags.carray`: C-contiguous, aligned and writeable)."""
    if x.flags.c_contiguous and x.flags.aligned and x.dtype.isnative:
        return x
    return np.array(x, dtype=x.dtype.newbyteorder("="), order="C")


def _is_under(path: str, root: str) -> bool:
    """Whether pytree path `path` is `root` or inside it (`params['w'][0]` is under `params`)."""
    return path == root or (path.startswith(root) and path[len(root)] == "[")


def _has_static(d) -> bool:
    if d == pytree.ARRAY:
        return False
    if d[0] == "dict":
        return any(_has_static(c) for c in d[2])
    if d[0] in ("list", "tuple"):
        return any(_has_static(c) for c in d[1])
    return True


def jit(fun=None):
    """Compile `fun` (its forward computation) for each input signature."""
    if fun is None:
        return jit
    return Jitted(fun, "jit")


def jit_grad(fun=None, *, argnums=0, has_aux=False):
    """The gradient of scalar-valued `fun` w.r.t. argument(s) `argnums`, compiled."""
    if fun is None:
        return lambda f: Jitted(f, "grad", argnums, has_aux)
    return Jitted(fun, "grad", argnums, has_aux)


def jit_value_and_grad(fun=None, *, argnums=0, has_aux=False):
    """Like jit_grad, returning (value, grads); with has_aux, ((value, aux), grads)."""
    if fun is None:
        return lambda f: Jitted(f, "value_and_grad", argnums, has_aux)
    return Jitted(fun, "value_and_grad", argnums, has_aux)

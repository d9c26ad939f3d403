"""compile_function: optimized IR -> one LLVM module -> native code, and the call wrapper.

The module holds one function per kernel (fused loops and loop-nest kernels) and an entry

    void entry(PyObject *inputs, PyObject *outputs, ptr arena)

where `inputs` / `outputs` are Python tuples of C-contiguous numpy arrays (parameters, outputs) whose
types the caller has checked, and `arena` is the planned intermediate memory. The entry reads the
arrays' data pointers straight from the objects (tuple items at offset 24, ndarray data at offset
16; checked at import), so a call costs one ctypes call with no per-array conversions. ctypes
releases the GIL for the call; the caller holds references to every array meanwhile. Literal arrays
become LLVM constants. The wrapper allocates outputs with numpy, reuses one arena per thread, and
copies the outputs the plan says are copies.
"""
from __future__ import annotations

import ctypes
import functools
import operator
import sys
import threading
import time
import weakref

import llvmlite.ir as ir
import numpy as np

from ..ir.core import Function, IRError, Namer, instr_text

from . import cache as _cache
from . import fused, leafcheck, parallel, schedule, settings, target
from .kernels import _load_all, kernels
from .kernels.pool import lower_max_pool2d_with_argmax
from .loops import I64, PTR, VOID, for_range, i64, llvm_type
from .target import JITModule, cfunc

_load_all()

# Outputs of at least this many bytes are recycled (NativeFunction._fill_fresh): a large fresh
# array is memory the C library returns to the system when it is freed (an mmap of its own, or
# the trimmed top of the heap once more than twice the mmap threshold is free), so a call
# allocating it afresh faults in and zeroes its pages again. The gradients of a 32-layer MLP
# (31 x 256 KB) spent 3.4 ms of a 17.0 ms call on 1 thread in those faults (12.8 ms with glibc
# told to keep its memory: MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_); PyTorch's and XLA's
# allocators keep theirs.
RECYCLE_BYTES = 64 << 10

# Object layout the entry relies on (CPython tuples, numpy arrays); checked once here.
TUPLE_ITEMS_OFFSET = 24
NDARRAY_DATA_OFFSET = 16


def _check_object_layout():
    a = np.zeros(1, np.float32)
    t = (a,)
    ok = ctypes.c_void_p.from_address(id(t) + TUPLE_ITEMS_OFFSET).value == id(a) and \
        ctypes.c_void_p.from_address(id(a) + NDARRAY_DATA_OFFSET).value == a.ctypes.data
    if not ok:  # pragma: no cover - other Python implementations
        raise ImportError("tracejit's native calls need CPython's tuple and numpy's ndarray "
                          "object layout, which this interpreter does not have")


_check_object_layout()


def plan_for(fn: Function, max_threads: int, donate=None):
    """The kernel and buffer plan of `fn` as compiled for `max_threads` threads, with outputs
    `donate` ({output index: parameter index}) stored into parameters (the dump of the
    "optimized" stage shows this same plan)."""
    return schedule.plan(fn, lambda ins: kernels[ins.prim].scratch_bytes(ins, max_threads),
                         lambda ins, apart=False: kernels[ins.prim].takes_epilogue(ins, apart),
                         lambda ins: kernels[ins.prim].cost(ins), donate)


class NativeFunction:
    """Native code for one IR function. Call with a list of numpy arrays matching the parameters
    (dtype, shape, C-contiguous); returns the list of outputs."""

    def __init__(self, fn: Function, max_threads: int | None = None, cache=None, donate=None):
        """`cache`: the persistent compile cache (see codegen/cache.py): a `DiskCache`, a
        directory, False for none, or None for the default (unless TRACEJIT_CACHE=0).
        `compile_seconds` splits the time spent: "plan", "lower" (IR -> LLVM IR of the module
        this process compiles), "llvm" (the rest until the object code is ready: optimization,
        code generation, waiting for the modules compiled by other processes), "cache" (key,
        load or store); a compile split over processes adds "own", "pool", "wait", "child" and
        "child_late" (see `_critical_path`).
        `donate`: {output index: parameter index}: that output is stored into that parameter's
        array, which the call returns as the output (see `schedule._place_donated`)."""
        t0 = time.perf_counter()
        self.fn = fn
        self.max_threads = max_threads or parallel.default_threads()
        self.donate = dict(donate or {})
        self.plan = plan_for(fn, self.max_threads, self.donate)
        self.profiling = settings.profile()   # (the compile cache keys TRACEJIT_PROFILE)
        t1 = time.perf_counter()
        # which module each kernel is lowered into (decided here, once: every build of the
        # modules, in whichever process, must place the kernels alike)
        self._same = _same_kernels(self.plan, self.max_threads)
        self._processes = target.processes_for(
            _total_weight([g for g in self.plan.groups if g.index not in self._same]))
        self._home, self._pipelines = _modules(self.plan.groups, self._same, self._processes)
        self.n_modules = len(self._pipelines)
        self._source = None
        self._source_lock = threading.Lock()  # lowering twice would reuse a plan's epilogues
        # kernels that check their indices, by status code (see kernels/__init__.py, Checks)
        self._checked = _checked_kernels(self.plan)
        self._jit, self.cache_hit, self.compile_seconds = self._load_or_compile(cache)
        self.compile_seconds["plan"] = t1 - t0
        self._entry = cfunc(self._jit.addresses["entry"],
                            [ctypes.py_object, ctypes.py_object, ctypes.c_void_p, ctypes.c_int64])
        self.threads = self.max_threads  # threads a call may use (at most max_threads)
        self._local = threading.local()
        self._out_types = [o.type for o in fn.outputs]
        # (shape, dtype) of every output, for the call's allocation (a list comprehension over
        # prepared pairs: 0.26 us an output, against 0.45 us through a generator and attributes)
        self._out_specs = [(t.shape, t.np_dtype) for t in self._out_types]
        self._copies = self._resolve_copies()
        self._donor = [self.donate.get(k) for k in range(len(fn.outputs))]
        # a call's outputs when parameters are donated: the donated parameters taken in one
        # C call (a fresh output's position takes parameter 0 first), then the fresh ones
        self._take_donated = operator.itemgetter(*[j or 0 for j in self._donor], 0)
        self._fresh = [(k, *spec) for k, (spec, j) in
                       enumerate(zip(self._out_specs, self._donor)) if j is None]
        self._early, self._late = _split_copies(self._copies, self.donate)
        # the fresh outputs a call may take back from this thread's last call (RECYCLE_BYTES),
        # and the others, allocated afresh by every call
        self._big = [k for k, _, _ in self._fresh
                     if self._out_types[k].nbytes >= RECYCLE_BYTES]
        self._small = [f for f in self._fresh if f[0] not in self._big]

    def _load_or_compile(self, cache):
        """(JITModule, cache hit?, seconds): linked from the persistent cache's object code if it
        has this function, else lowered, compiled and stored."""
        disk = _cache.resolve(cache)
        seconds = {"lower": 0.0, "llvm": 0.0, "cache": 0.0}
        t0 = time.perf_counter()
        key = _donated_key(disk.key(self.fn, self.max_threads), self.donate) \
            if disk is not None else None
        obj = disk.load(key) if disk is not None else None
        if obj is not None:
            me = weakref.ref(self)  # no reference cycle through the JIT module
            try:
                jit = JITModule.from_object(obj, ["entry"], source=lambda: me()._compiled_sources())
            except Exception as e:  # the object file passed its checksum but does not link
                disk.discard(key, f"{type(e).__name__}: {e}")
            else:
                seconds["cache"] = time.perf_counter() - t0
                return jit, True, seconds
        t1 = time.perf_counter()
        # each module is lowered by the process that compiles it
        me = weakref.ref(self)
        lowering = {}
        source = [(functools.partial(_lower_part, me, k, lowering), self._pipelines[k])
                  for k in range(self.n_modules)]
        # a pytree call's fast path checks its leaves natively from its second call on: when
        # another process compiles along, the check's module goes last in the queue (else the
        # second call compiles it, ~10-25 ms)
        side = leafcheck.side_source(disk) if self._processes > 1 else None
        t2 = time.perf_counter()
        jit = JITModule(source, ["entry"], source=lambda: me()._compiled_sources(),
                        processes=self._processes, side=[side] if side else ())
        t3 = time.perf_counter()
        if side:
            leafcheck.provide(jit.side_objects[0], disk)
        if disk is not None:
            disk.store(key, jit.object_code)
        # this process's lowering (the children lower the modules they compile)
        low = sum(lowering.values())
        seconds.update(lower=low, llvm=t3 - t2 - low, cache=(t1 - t0) + (time.perf_counter() - t3))
        seconds.update(_critical_path(target.last_timeline()))
        return jit, False, seconds

    @property
    def llvm_sources(self) -> list:
        """The LLVM IR of each module the lowering produced (lowered now if the code came from
        the cache)."""
        with self._source_lock:
            if self._source is None:
                self._source = [target.module_text(m) for m in self._build_modules()]
        return self._source

    def _compiled_sources(self) -> list:
        """(LLVM IR, optimization pipeline) of each module, as compiled (for the dumps)."""
        return list(zip(self.llvm_sources, self._pipelines))

    @property
    def llvm_ir_unoptimized(self) -> str:
        """The LLVM IR as lowered, all modules (the entry's first)."""
        return "\n\n".join(self.llvm_sources)

    # ------------------------------------------------------------------------------------- build
    def _build_modules(self, part: int | None = None) -> list:
        """The LLVM modules of this function: the entry in the first, the kernels spread over
        the rest (`_modules`) so that separate processes can lower and compile them at once (see
        target.compile_objects). `part`: build only that module."""
        plan = self.plan
        fn = plan.fn
        parts = range(self.n_modules) if part is None else [part]
        modules = {k: ir.Module(name=fn.name if k == 0 else f"{fn.name}.part{k}") for k in parts}
        home = self._home
        module = modules.get(0)
        namer = Namer()
        for v in list(fn.params) + [i.out for i in fn.instrs]:
            namer.define(v)
        kernel_fns = _lower_kernels(plan, modules, home, module, namer, self.max_threads,
                                    self._same)
        if module is None:
            return [modules[k] for k in parts]
        entry = ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, PTR, I64]), "entry")
        if _straight_line(plan.groups):
            # Straight-line calls of the kernels, a few instructions each: LLVM's optimizer
            # gains nothing measurable on them, and spent most of a deep MLP's compile there
            # (depth 64: 0.45 of 0.71 s for the entry's module, 0.08 without). A native loop
            # runs its steps in the entry: then it is optimized.
            entry.attributes.add("noinline")
            entry.attributes.add("optnone")
        ins_arg, outs_arg, arena_arg, nthreads_arg = entry.args
        ins_arg.name, outs_arg.name, arena_arg.name = "inputs", "outputs", "arena"
        nthreads_arg.name = "nthreads"
        b = ir.IRBuilder(entry.append_basic_block("entry"))

        def tuple_item(tup, k, name):   # the data pointer of item k of a tuple of arrays
            item = b.load(b.gep(tup, [i64(TUPLE_ITEMS_OFFSET + 8 * k)], source_etype=ir.IntType(8)),
                          typ=PTR)
            return b.load(b.gep(item, [i64(NDARRAY_DATA_OFFSET)], source_etype=ir.IntType(8)),
                          typ=PTR, name=name)
        pointer = _pointers(module, b, plan, namer, ins_arg, outs_arg, arena_arg, tuple_item)
        status = b.gep(arena_arg, [i64(_status_offset(plan))], source_etype=ir.IntType(8),
                       name="status")
        counters = b.gep(arena_arg, [i64(_status_offset(plan) + 16)],
                         source_etype=ir.IntType(8), name="profile") if self.profiling else None
        _emit_calls(module, b, plan, kernel_fns, pointer, nthreads_arg, arena_arg, status,
                    self.max_threads, counters)
        _emit_donated_copies(module, b, plan, pointer)
        b.ret_void()
        return [modules[k] for k in parts]

    def _resolve_copies(self):
        """For outputs that are copies: where to copy from ("in", k) / ("out", k) / ("const", arr)."""
        plan = self.plan
        # a value a donated output holds is in that output's array once the entry has run
        donated = {id(plan.fn.outputs[k]): k for k, _, how in plan.donated if how != "caller"}
        res = []
        for k, v in plan.out_copies:
            v = schedule.base_value(v, plan.locations)
            loc = plan.locations.get(id(v))
            if id(v) in donated:
                res.append((k, "out", donated[id(v)]))
            elif loc is None or loc.kind == "global":
                res.append((k, "const", np.array(v.instr.params["value"])))
            else:
                res.append((k, loc.kind, loc.index))
        return res

    # ------------------------------------------------------------------------------------- call
    def _arena(self):
        """This thread's arena address."""
        return self._arena_state()[1]

    def _arena_state(self):
        """(buffer, arena address, status words or None) of this thread."""
        arena = getattr(self._local, "arena", None)
        if arena is None:
            # checked kernels report through two i64 status words after the planned memory
            status_at = _status_offset(self.plan)
            raw = np.zeros(status_at + 16 + self._profile_bytes() + 64, dtype=np.uint8)
            off = (-raw.ctypes.data) % 64
            status = raw[off + status_at:off + status_at + 16].view(np.int64)
            status[:] = 0
            arena = self._local.arena = (raw, raw.ctypes.data + off,
                                         status if self._checked else None)
        return arena

    def _profile_bytes(self) -> int:
        return 16 * len(self.plan.groups) if self.profiling else 0

    def profile(self, reset: bool = False) -> list:
        """TRACEJIT_PROFILE: (group, calls, cycles) of each top-level kernel, summed over this
        thread's calls since the last reset (a loop kernel's bodies count as the loop)."""
        if not self.profiling:
            raise RuntimeError("compiled without profiling counters: set TRACEJIT_PROFILE=1 "
                               "before the function is compiled")
        raw, base, _ = self._arena_state()
        at = base - raw.ctypes.data + _status_offset(self.plan) + 16
        counts = raw[at:at + self._profile_bytes()].view(np.int64)
        res = [(g, int(counts[2 * k + 1]), int(counts[2 * k]))
               for k, g in enumerate(self.plan.groups)]
        if reset:
            counts[:] = 0
        return res

    def _check_status(self, status):
        """Raise the IndexError a checked kernel reported (and clear the status for the next
        call); the message was decided at compile time, the kernel supplies the value."""
        code, value = int(status[0]), int(status[1])
        status[:] = 0
        from ..ir.prims.gather import IndexOutOfBounds, out_of_bounds_message
        ins = self._checked[code]
        axis, data = ins.params["axis"], ins.inputs[0]
        size = ins.params.get("size", data.shape[axis] if data.ndim else 0)
        fields = (value, axis, size, ins.params["name"])
        raise IndexOutOfBounds(out_of_bounds_message(value, axis, size, ins.api or ins.prim.name,
                                                     ins.params["name"], ins.loc), fields)

    def __call__(self, arrays):
        """Run on `arrays` (a sequence of C-contiguous arrays of the parameter types). A donated
        output (see __init__) is the parameter's array itself, overwritten with the output."""
        arrays = tuple(arrays)
        if self.donate:
            outs = list(self._take_donated(arrays))
            outs.pop()
            outs = self._fill_fresh(outs)
            late = _run_copies(self._early, arrays, outs) + self._late if self._early \
                else self._late
        elif self._big:
            outs = self._fill_fresh([None] * len(self._out_specs))
            late = self._copies
        else:
            empty = np.empty
            outs = tuple([empty(shape, dtype) for shape, dtype in self._out_specs])
            late = self._copies
        limit = parallel.thread_limit
        arena = self._arena_state()
        self._entry(arrays, outs, arena[1],
                    self.threads if limit is None else min(self.threads, limit))
        status = arena[2]
        if status is not None and status[0]:
            self._check_status(status)
        _run_copies(late, arrays, outs)
        return outs

    def _fill_fresh(self, outs: list) -> tuple:
        """`outs` with its fresh outputs filled in, as a tuple: the small ones new arrays; each
        large one (self._big) the array this thread's last call returned at that position when
        nothing but this function holds it any more (the caller has dropped it, and every view
        of it, and every buffer exported from it), else a new array, which is kept for the next
        call. The outputs are written whole, so a recycled array's old values never show."""
        for k, shape, dtype in self._small:
            outs[k] = np.empty(shape, dtype)
        if self._big:
            kept = getattr(self._local, "kept", None)
            if kept is None:
                kept = self._local.kept = [None] * len(self._out_specs)
            specs = self._out_specs
            for k in self._big:
                if kept[k] is None or sys.getrefcount(kept[k]) != _ONLY_KEPT:
                    kept[k] = np.empty(*specs[k])
                outs[k] = kept[k]
        return tuple(outs)

    @property
    def llvm_ir(self) -> str:
        return self._jit.optimized_ir

    @property
    def asm(self) -> str:
        return self._jit.asm


def _only_kept() -> int:
    """The reference count `NativeFunction._fill_fresh` sees for an array held by its list only,
    measured the same way (sys.getrefcount of a list item), whatever this interpreter counts."""
    kept = [np.empty(1)]
    return sys.getrefcount(kept[0])


_ONLY_KEPT = _only_kept()


def _scratch_stride(g, max_threads: int) -> int:
    """Bytes of scratch per thread of a loop-nest kernel (each executing thread gets its own
    region, see parallel.emit_call); 0 for a fused loop, whose scratch all threads share (a
    reduction's float64 sums, indexed by output element)."""
    if g.kind == "loop" or not g.scratch_bytes:
        return 0
    stride = kernels[g.root.prim].scratch_bytes(g.root, 1)
    assert stride % 64 == 0 and stride * max_threads == g.scratch_bytes, (stride, g.scratch_bytes)
    return stride


def _run_copies(copies, arrays, outs):
    """Fill outputs by copying (see `_resolve_copies`); returns the copies to make later (those
    whose source `_split_copies` snapshotted)."""
    later = []
    for k, kind, src in copies:
        if kind == "in":
            outs[k][...] = arrays[src]
        elif kind == "out":
            outs[k][...] = outs[src]
        elif kind == "snapshot":   # a donated parameter's value before the call: kept for later
            later.append((k, "const", arrays[src].copy()))
        else:
            outs[k][...] = src
    return later


def _split_copies(copies, donate: dict):
    """(before the entry runs, after it) for the output copies of a function with donated
    parameters: an output that is a parameter reads it before the entry may overwrite it (a
    donated output's array is a parameter too, so that copy waits: it snapshots the source)."""
    donated_out = set(donate)
    early, late = [], []
    for k, kind, src in copies:
        if kind == "in" and k in donated_out:
            if donate[k] != src:   # the same parameter: already in place
                early.append((k, "snapshot", src))
        elif kind == "in":
            early.append((k, kind, src))
        else:
            late.append((k, kind, src))
    return early, late


def _donated_key(key: str, donate: dict) -> str:
    """The compile cache key of code that stores outputs into parameters (`donate`)."""
    if not donate:
        return key
    import hashlib
    text = f"{key} donate {sorted(donate.items())}"
    return hashlib.sha256(text.encode()).hexdigest()


def _emit_donated_copies(module: ir.Module, b: ir.IRBuilder, plan, pointer):
    """After the last kernel: copy each donated output the plan computed in the arena into its
    parameter's buffer (see schedule._place_donated)."""
    for k, j, how in plan.donated:
        if how == "copy":
            o = plan.fn.outputs[k]
            _memcpy(module, b, pointer(plan.fn.params[j]), pointer(o), o.type.nbytes)


def _lower_kernels(plan, modules: dict, home: dict, module, namer, max_threads: int,
                   same=None) -> list:
    """Lower the kernels of `plan` into their home modules (`home`: group index -> module
    index); returns, per group, the function the calling module calls (a declaration when the
    kernel lives in another module; None for a loop, whose body is lowered where it is called).
    `module` is the calling module (None when building only other modules). A kernel whose
    lowering input equals an earlier one's (`_same_kernels`) is not lowered again: its call
    goes to the earlier kernel's function. A kernel always called on one thread (`_serial`) is
    lowered as the body of its function, which calls it with that thread's (tid, nthreads)
    (`_serial_kernel`)."""
    kernel_fns = []
    same = _same_kernels(plan, max_threads) if same is None else same
    by_index = {}
    for g in plan.groups:
        if g.kind == "control":
            kernel_fns.append(None)
            continue
        if g.index in same:
            if module is not None:
                kernel_fns.append(by_index[same[g.index]])
            continue
        fname = g.name
        serial = _serial(g, max_threads)
        body = f"{fname}.serial" if serial else fname
        kernel_module = modules.get(home[g.index])
        if kernel_module is None:   # lowered by another process: declared for the entry
            if module is not None:
                kernel_fns.append(ir.Function(module, _kernel_type(g), fname))
                by_index[g.index] = kernel_fns[-1]
            continue
        try:
            if g.kind == "nn":
                epi = fused.Epilogue(g.epilogue, g.root.out, f"{fname}.epilogue",
                                     apart=g.epilogue_apart) \
                    if g.epilogue is not None else None
                extra = {} if epi is None else {"epilogue": epi}
                if kernels[g.root.prim].checks:
                    extra["status_code"] = g.status_code
                if g.companion is not None:
                    lower_max_pool2d_with_argmax(kernel_module, body, g.root, **extra)
                else:
                    kernels[g.root.prim].lower(kernel_module, body, g.root, **extra)
                kfn = kernel_module.globals[body]
            else:
                kfn = fused.lower_group(kernel_module, body, g)
            if serial:
                kfn = _serial_kernel(kernel_module, kfn, fname)
            # Kept out of line: inlined, a kernel is compiled once per call site (a parallel
            # kernel has two, its trampoline's and the serial one) and the entry grows into
            # one huge function; LeNet-5's gradient compiled ~30% faster, ran as fast.
            if "noinline" not in kfn.attributes:
                kfn.attributes.add("noinline")
            if kernel_module is not module:   # called across modules: a declaration there
                kfn.linkage = ""
                if module is not None:
                    kfn = ir.Function(module, kfn.function_type, fname)
            kernel_fns.append(kfn)
            by_index[g.index] = kfn
        except Exception as e:
            raise _lowering_error(g, namer, e) from e
    return kernel_fns


def _lowering_error(g, namer, e) -> IRError:
    loc = f" ({g.root.loc})" if g.root.loc else ""
    text = instr_text(g.root, namer, with_comment=False) if id(g.root.out) in namer.names \
        else g.root.prim.name
    return IRError(f"lowering `{text}`{loc}: {type(e).__name__}: {e}")


def _pointers(module, b, plan, namer, ins_arg, outs_arg, arena_arg, item):
    """`pointer(v)`: the address of value `v`'s buffer in the function being built with `b`
    (computed once, where first asked for: ask before any loop). `item(table, k, name)` loads
    the k-th parameter's or output's address from `ins_arg` / `outs_arg`."""
    cache = {}

    def pointer(v):
        v = schedule.base_value(v, plan.locations)
        loc = plan.locations[id(v)]
        key = id(v)
        if key in cache:
            return cache[key]
        name = namer.names.get(id(v), "v").replace(".", "_")
        if loc.kind in ("in", "out"):
            p = item(ins_arg if loc.kind == "in" else outs_arg, loc.index, f"{loc.kind}.{name}")
        elif loc.kind == "arena":
            p = b.gep(arena_arg, [i64(loc.index)], source_etype=ir.IntType(8), name=f"buf.{name}")
        elif loc.kind == "global":
            p = _literal_global(module, v, f"lit.{name}")
        else:  # pragma: no cover
            raise IRError(f"unknown location {loc}")
        cache[key] = p
        return p
    return pointer


def _emit_calls(module, b, plan, kernel_fns, pointer, nthreads, arena, status, max_threads,
                counters=None):
    """Call every kernel of `plan` in order (a loop kernel runs its native loop right here).
    `counters` (TRACEJIT_PROFILE): i64 pairs, one per group, to which each call adds the cycles
    it took and 1."""
    for pos, (g, kfn) in enumerate(zip(plan.groups, kernel_fns)):
        start = _cycles(module, b) if counters is not None else None
        _emit_call(module, b, g, kfn, pointer, nthreads, arena, status, max_threads)
        if counters is not None:
            spent = b.sub(_cycles(module, b), start)
            for k, add in ((2 * pos, spent), (2 * pos + 1, i64(1))):
                at = b.gep(counters, [i64(k)], source_etype=I64)
                b.store(b.add(b.load(at, typ=I64), add), at)


def _cycles(module, b):
    """The time-stamp counter (constant rate on x86-64)."""
    fn = module.globals.get("llvm.readcyclecounter") or ir.Function(
        module, ir.FunctionType(I64, []), "llvm.readcyclecounter")
    return b.call(fn, [])


def _emit_call(module, b, g, kfn, pointer, nthreads, arena, status, max_threads):
    if g.kind == "control":
        _loop_lowerings[g.root.prim.name](module, b, g, pointer, nthreads, arena, status,
                                          max_threads)
    else:
        args = [pointer(v) for v in g.pointer_values]
        if _checks(g):
            args.append(status)
        scratch = b.gep(arena, [i64(g.scratch)], source_etype=ir.IntType(8)) \
            if g.scratch_bytes else ir.Constant(PTR, None)
        limit = kernels[g.root.prim].most_chunks if g.kind != "loop" else None
        parallel.emit_call(module, b, kfn, args + [scratch], nthreads,
                           not _serial(g, max_threads), g.cost_ns, _scratch_stride(g, max_threads),
                           limit(g.root) if limit is not None else None)


def _serial(g, max_threads: int) -> bool:
    """Whether kernel `g` (not a control group) is always called on the calling thread alone,
    as call (tid 0, nthreads 1): it does not split its work, is too short for the thread pool
    (parallel.PARALLEL_MIN_NS), or there is no pool or one thread."""
    splits = g.kind == "loop" or kernels[g.root.prim].parallel
    return not (max_threads > 1 and splits and g.cost_ns >= parallel.PARALLEL_MIN_NS
                and parallel.threads_available())


def _serial_kernel(module: ir.Module, body: ir.Function, name: str) -> ir.Function:
    """The kernel function `name`, of `body`'s type, calling `body` with (tid, nthreads) =
    (0, 1), the only values a serial kernel is called with (`_serial`); `body` becomes internal
    and always inlined, so that LLVM folds its share of the work (toolkit.thread_range) to all
    of it and its loop bounds to constants, which it cannot know of a function called from
    another module. LeNet-5's gradient: its fused loops' modules took 97 ms of LLVM instead of
    131, its serial pooling and matmul kernels less too (Zen 3, CPU time, split compile). A
    body left unoptimized (optnone: a matmul without epilogue, control code around calls)
    cannot be inlined: it is called."""
    fn = ir.Function(module, body.function_type, name)
    for a, b_arg in zip(fn.args, body.args):
        a.name = b_arg.name
        for attr in b_arg.attributes:
            a.add_attribute(attr)
    for attr in body.attributes:
        if attr not in ("alwaysinline", "noinline"):
            fn.attributes.add(attr)
    body.linkage = "internal"
    if "optnone" not in body.attributes:
        body.attributes.discard("noinline")
        body.attributes.add("alwaysinline")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.call(body, list(fn.args[:-2]) + [i64(0), i64(1)])
    b.ret_void()
    return fn


# ------------------------------------------------------------------------------------ loops
def _lower_body(module, plan, fname: str, max_threads: int) -> ir.Function:
    """A loop body as its own function `void fname(ptr params, ptr outputs, ptr arena, i64
    nthreads, ptr status)`: `params` / `outputs` are tables of buffer addresses (the step's
    slices of xs and ys, the carries, the consts), `arena` the body's planned memory. Its kernels
    are lowered into `module` too; it copies the outputs that are parameters or constants
    itself."""
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, PTR, I64, PTR]), fname)
    fn.linkage = "internal"
    ins_arg, outs_arg, arena_arg, nthreads_arg, status_arg = fn.args
    for a, name in zip(fn.args, ("params", "outputs", "arena", "nthreads", "status")):
        a.name = name
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    namer = Namer()
    for v in list(plan.fn.params) + [i.out for i in plan.fn.instrs]:
        namer.define(v)
    kernel_fns = _lower_kernels(plan, {0: module}, {g.index: 0 for g in plan.groups}, module,
                                namer, max_threads)

    def item(table, k, name):
        return b.load(b.gep(table, [i64(k)], source_etype=PTR), typ=PTR, name=name)
    pointer = _pointers(module, b, plan, namer, ins_arg, outs_arg, arena_arg, item)
    _emit_calls(module, b, plan, kernel_fns, pointer, nthreads_arg, arena_arg, status_arg,
                max_threads)
    for k, v in plan.out_copies:   # outputs that are parameters, constants or other outputs
        _memcpy(module, b, item(outs_arg, k, f"out{k}"), pointer(v), v.type.nbytes)
    b.ret_void()
    return fn


def _memcpy(module, b, dst, src, nbytes: int):
    memcpy = module.globals.get("llvm.memcpy.p0.p0.i64") or ir.Function(
        module, ir.FunctionType(VOID, [PTR, PTR, I64, ir.IntType(1)]), "llvm.memcpy.p0.p0.i64")
    b.call(memcpy, [dst, src, i64(nbytes), ir.Constant(ir.IntType(1), 0)])


def _byte_gep(b, ptr, offset, name=""):
    return b.gep(ptr, [offset if isinstance(offset, ir.Value) else i64(offset)],
                 source_etype=ir.IntType(8), name=name)


def _store_table(b, table, k, ptr):
    b.store(ptr, b.gep(table, [i64(k)], source_etype=PTR))


def _lower_scan(module, b, g, pointer, nthreads, arena, status, max_threads):
    """One native loop over the steps: the body is called with the step's slices of xs and ys
    addressed in place (base + step * slice bytes) and with the carries, double-buffered in the
    loop's scratch: each step reads one buffer and writes the other, then the tables swap them.
    The trip count is only the loop's bound: the code does not grow with it."""
    ins, lay = g.root, g.layout
    p = ins.params
    nc, nx, steps = p["num_carry"], p["num_xs"], p["length"]
    body_plan = g.bodies["body"]
    body = _lower_body(module, body_plan, f"{g.prefix}body", max_threads)
    scratch = _byte_gep(b, arena, g.scratch, f"{g.prefix}scratch")
    types = ins.out.type.types
    final = [pointer(v) if v is not None else _byte_gep(b, scratch, lay.unread[k])
             for k, v in enumerate(g.outs)]
    nxt = [_byte_gep(b, scratch, off) for off in lay.next]
    xs = [pointer(v) for v in ins.inputs[nc:nc + nx]]
    consts = [pointer(v) for v in ins.inputs[nc + nx:]]
    inits = [pointer(v) for v in ins.inputs[:nc]]
    tin, tout = [_byte_gep(b, scratch, off) for off in lay.tables["body"]]
    body_arena = _byte_gep(b, scratch, lay.arena)
    for k in range(nc):
        _memcpy(module, b, final[k], inits[k], types[k].nbytes)
        _store_table(b, tin, k, final[k])
        _store_table(b, tout, k, nxt[k])
    for j, c in enumerate(consts):
        _store_table(b, tin, nc + nx + j, c)
    x_bytes = [v.type.nbytes // max(steps, 1) for v in ins.inputs[nc:nc + nx]]
    y_bytes = [t.nbytes // max(steps, 1) for t in types[nc:]]
    with for_range(b, i64(0), i64(steps), 1, f"{g.prefix}step", scalar=True) as t:
        step = b.sub(i64(steps - 1), t, name="step") if p["reverse"] else t
        for j in range(nx):
            _store_table(b, tin, nc + j, _byte_gep(b, xs[j], b.mul(step, i64(x_bytes[j]))))
        for j, y in enumerate(final[nc:]):
            _store_table(b, tout, nc + j, _byte_gep(b, y, b.mul(step, i64(y_bytes[j]))))
        b.call(body, [tin, tout, body_arena, nthreads, status])
        for k in range(nc):   # the carries just written are the next step's input
            slot_in, slot_out = b.gep(tin, [i64(k)], source_etype=PTR), \
                b.gep(tout, [i64(k)], source_etype=PTR)
            a, c = b.load(slot_in, typ=PTR), b.load(slot_out, typ=PTR)
            b.store(c, slot_in)
            b.store(a, slot_out)
    if steps % 2:   # after an odd number of steps the final carries are in the other buffers
        for k in range(nc):
            _memcpy(module, b, final[k], nxt[k], types[k].nbytes)


def _lower_while(module, b, g, pointer, nthreads, arena, status, max_threads):
    """`while cond(carries): carries = body(carries)` as one native loop; the condition writes
    its bool into the loop's scratch."""
    ins, lay = g.root, g.layout
    nc = ins.params["num_carry"]
    cond = _lower_body(module, g.bodies["cond"], f"{g.prefix}cond", max_threads)
    body = _lower_body(module, g.bodies["body"], f"{g.prefix}body", max_threads)
    scratch = _byte_gep(b, arena, g.scratch, f"{g.prefix}scratch")
    types = ins.out.type.types
    final = [pointer(v) if v is not None else _byte_gep(b, scratch, lay.unread[k])
             for k, v in enumerate(g.outs)]
    nxt = [_byte_gep(b, scratch, off) for off in lay.next]
    consts = [pointer(v) for v in ins.inputs[nc:]]
    inits = [pointer(v) for v in ins.inputs[:nc]]
    flag = _byte_gep(b, scratch, lay.flag, "flag")
    body_arena = _byte_gep(b, scratch, lay.arena)
    cin, cout = [_byte_gep(b, scratch, off) for off in lay.tables["cond"]]
    bin_, bout = [_byte_gep(b, scratch, off) for off in lay.tables["body"]]
    for k in range(nc):
        _memcpy(module, b, final[k], inits[k], types[k].nbytes)
        _store_table(b, cin, k, final[k])
        _store_table(b, bin_, k, final[k])
        _store_table(b, bout, k, nxt[k])
    for j, c in enumerate(consts):
        _store_table(b, cin, nc + j, c)
        _store_table(b, bin_, nc + j, c)
    _store_table(b, cout, 0, flag)
    fn = b.block.function
    head = fn.append_basic_block(f"{g.prefix}while.cond")
    step = fn.append_basic_block(f"{g.prefix}while.body")
    done = fn.append_basic_block(f"{g.prefix}while.done")
    b.branch(head)
    b.position_at_end(head)
    b.call(cond, [cin, cout, body_arena, nthreads, status])
    go = b.icmp_unsigned("!=", b.load(flag, typ=ir.IntType(8)), ir.Constant(ir.IntType(8), 0))
    b.cbranch(go, step, done)
    b.position_at_end(step)
    b.call(body, [bin_, bout, body_arena, nthreads, status])
    for k in range(nc):
        _memcpy(module, b, final[k], nxt[k], types[k].nbytes)
    b.branch(head)
    b.position_at_end(done)


# loop kernels by primitive name (codegen does not import the loop primitives' rules)
_loop_lowerings = {"scan": _lower_scan, "while": _lower_while}



def _critical_path(t: dict) -> dict:
    """Where a split compile's wall time went (target.last_timeline()): "own" (this process's modules,
    lowered and compiled, until the queue was empty, and the thread pool), "pool" (the thread
    pool, built after the entry's module), "wait" (then waiting for the children), "child"
    (the busiest child's lowering and compiling) and "child_late" (how long after this
    process's last module the last child finished; negative: it finished first)."""
    if not t.get("children"):
        return {}
    spans = [s for child in t["children"] for s in child]
    return {"own": t["own"] - t["start"], "pool": t["pool"] - t["entry"],
            "wait": t["end"] - t["own"],
            "child": max(sum(done - started for started, done in child) for child in t["children"]),
            "child_late": max(done for _, done in spans) - t["own"] if spans else 0.0}


def _lower_part(native_ref, part: int, seconds: dict) -> str:
    t0 = time.perf_counter()
    text = target.module_text(native_ref()._build_modules(part)[0])
    seconds[part] = time.perf_counter() - t0
    return text


def _kernel_type(g) -> ir.FunctionType:
    """The contract's type of kernel `g`: result, companion or extra outputs, buffers, [status,]
    scratch, tid, nthreads."""
    n_ptrs = len(g.pointer_values) + 1 + _checks(g)
    return ir.FunctionType(VOID, [PTR] * n_ptrs + [I64, I64])


def _checks(g) -> bool:
    """Whether kernel `g` checks its inputs and takes the status pointer."""
    return g.kind == "nn" and kernels[g.root.prim].checks


def _checked_kernels(plan) -> dict:
    """{status code: instruction} of the plan's checking kernels, loop bodies' included; sets
    each one's `status_code` (a kernel's index + 1; then the bodies' kernels, numbered on)."""
    codes = {}
    for g in plan.groups:
        if _checks(g):
            g.status_code = g.index + 1
            codes[g.status_code] = g.root

    def walk(p):
        for g in p.groups:
            if _checks(g):
                g.status_code = len(plan.groups) + 1 + len(codes)
                codes[g.status_code] = g.root
            for body in g.bodies.values():
                walk(body)
    for g in plan.groups:
        for body in g.bodies.values():
            walk(body)
    return codes


def _status_offset(plan) -> int:
    """Byte offset in the arena of the status words (after the planned memory, 64-aligned)."""
    return -(-plan.arena_bytes // 64) * 64


def _compile_weight(g) -> int:
    """Rough LLVM cost of a kernel's own code, to spread kernels over modules: a loop nest's is
    its kernel's (codegen/kernels); a fused loop's two units and one more per eight
    instructions (LLVM takes 5 to 15 ms on one, AVX-512 Xeon, whatever its size: the
    vectorizer's loop versions and the code generator's fixed costs per function). The shared
    functions it calls are weighed apart (`_shared_weights`): once per module."""
    if g.kind == "control":   # its bodies' kernels
        return 1 + sum(_compile_weight(h) for p in g.bodies.values() for h in p.groups)
    if g.kind != "nn":
        return 2 + len(g.members) // 8
    return kernels[g.root.prim].compile_weight


def _shared_weights(g) -> dict:
    """{key: compile weight} of the shape-generic functions kernel `g` calls, which a module
    defines (and LLVM compiles) once for all its kernels (Kernel.shared_weights)."""
    if g.kind == "control":
        out = {}
        for p in g.bodies.values():
            for h in p.groups:
                out.update(_shared_weights(h))
        return out
    if g.kind != "nn" or kernels[g.root.prim].shared_weights is None:
        return {}
    return kernels[g.root.prim].shared_weights(g.root)


def _total_weight(groups) -> int:
    """The compile weight of `groups` in one module: their own code and each shared function
    once."""
    shared = {}
    for g in groups:
        shared.update(_shared_weights(g))
    return sum(_compile_weight(g) for g in groups) + sum(shared.values())


# The weight a module of fused loops is filled up to (LLVM spends about 1 ms on a module besides
# its functions, the lowering about as much)
FILLER_WEIGHT = 6


def _modules(groups, same=None, processes: int = 1):
    """({kernel index: module index}, [optimization pipeline of each module]): how the kernels
    are lowered into modules that `processes` processes take from a queue, in order
    (target.compile_objects); the loop-nest kernels' modules get the "kernels" pipeline
    (target.PIPELINES), a module of their own for it even when one process compiles all, and
    the entry's module, the entry alone when several processes compile, the "entry" one; the
    fused loops' modules (module 0 too when it holds loops) the "fused" one.
    Module 0, which this process compiles first, holds the entry and the loops (control
    groups, which call their bodies' kernels from the entry). Then one module per process of
    loop-nest kernels, balanced by weight; then the fused loops, a few to a module, the
    heaviest first: whichever process is done first takes more of them, which evens out what
    the weights got wrong (LeNet-5's convolution kernels take 40 to 140 ms, and a new machine
    shifts every estimate) at a small cost per module. Loop-nest kernels that share generic
    functions (the same primitive's matmuls and their tile and packing functions, a
    convolution and its input gradient the convolution's, all convolutions the padding) go
    into one module when they can: each module defines them, and LLVM compiles them, again (a
    unit heavier than a process's share of all the work, the fused loops' included, is split
    after all: a deep MLP's matmuls, where compiling their shared functions twice costs less
    than one process compiling them all).
    `same` ({kernel index: index of the equal kernel it calls}, see `_same_kernels`): those
    are not lowered, and live where that one does."""
    same = same or {}
    home = {g.index: 0 for g in groups}
    if processes <= 1:   # the loop-nest kernels apart all the same, for their pipeline
        nn = [g.index for g in groups if g.kind == "nn" and g.index not in same]
        if not nn:
            return home, ["fused"]
        home.update({k: 1 for k in nn})
        home.update({k: home[j] for k, j in same.items()})
        return home, ["fused", "kernels"]
    units, loops = {}, []
    for g in groups:
        if g.index in same or g.kind == "control":
            continue
        if g.kind == "nn":
            units.setdefault(_sharing_unit(g), []).append(g)
        else:
            loops.append(g)
    big = [[] for _ in range(processes)]
    defined = [set() for _ in range(processes)]   # the shared functions each one has
    load = [0] * processes

    def added(g, k):   # the weight kernel g adds to module k: its code, shared functions new there
        return _compile_weight(g) + sum(w for s, w in _shared_weights(g).items()
                                        if s not in defined[k])

    def place(g, k):
        load[k] += added(g, k)
        defined[k].update(_shared_weights(g))
        big[k].append(g)

    # a process's share of all the work: the fused loops' modules, taken from the queue by
    # whichever process is free, even out modules of loop-nest kernels that differ by less
    share = (_total_weight([g for u in units.values() for g in u])
             + sum(_compile_weight(g) for g in loops)) / processes
    for members in sorted(units.values(), key=lambda u: -_total_weight(u)):
        whole = _total_weight(members) <= share
        k = load.index(min(load))
        for g in members:
            # (a split unit: each kernel where it adds least to the most loaded module)
            place(g, k if whole else min(range(processes),
                                         key=lambda j: (load[j] + added(g, j), j)))
    modules = sorted([m for m in big if m], key=lambda m: -_total_weight(m))
    entry = "entry" if _straight_line(groups) else "fused"   # (the entry alone)
    pipelines = [entry] + ["kernels"] * len(modules)
    fillers = []
    for g in sorted(loops, key=lambda g: -_compile_weight(g)):
        if not fillers or _total_weight(fillers[-1]) >= FILLER_WEIGHT:
            fillers.append([])
        fillers[-1].append(g)
    modules += sorted(fillers, key=lambda m: -_total_weight(m))
    pipelines += ["fused"] * len(fillers)
    for k, members in enumerate(modules, start=1):
        for g in members:
            home[g.index] = k
    home.update({k: home[j] for k, j in same.items()})
    return home, pipelines


def _straight_line(groups) -> bool:
    """Whether the entry calling `groups` is straight-line calls (no native loop runs in it)."""
    return not any(g.kind == "control" for g in groups)


def _sharing_unit(g):
    """Loop-nest kernels of one unit may call the same generic functions: those lowered by one
    file or package of codegen/kernels (the convolutions' generic kernels and padding, the
    pooling kernels), and of those that declare their shared functions (matmul), the kernels
    declaring the same ones."""
    kernel = kernels[g.root.prim]
    source = kernel.lower.__module__.rpartition(".kernels.")[2].partition(".")[0]
    if kernel.shared_weights is None:
        return (source,)
    return (source, g.root.prim.name, tuple(sorted(map(repr, _shared_weights(g)))))


def _same_kernels(plan, max_threads: int) -> dict:
    """{kernel index: index of an earlier kernel of `plan` that lowers to the same function}:
    kernels whose lowering reads equal inputs (`_kernel_key`). The layers of a deep MLP and
    their gradients are such kernels: lowered and compiled once, compile time stays flat as
    the network deepens."""
    first, same = {}, {}
    for g in plan.groups:
        key = _kernel_key(g, max_threads)
        if key is None:
            continue
        k = first.setdefault(key, g.index)
        if k != g.index:
            same[g.index] = k
    return same


def _kernel_key(g, max_threads: int):
    """Everything the lowering of kernel `g` reads, with values named by their place (pointer
    argument k, or the n-th value defined inside), so that two kernels with equal keys lower
    to the same function up to its name; None for a kernel never shared (a loop, whose bodies
    are planned apart; a kernel that checks its indices, whose status code is its own)."""
    if g.kind == "control" or _checks(g):
        return None
    names = {}
    for k, v in enumerate(g.pointer_values):
        names.setdefault(id(v), f"p{k}")

    def name(v):
        return names.setdefault(id(v), f"m{len(names)}")

    def instr(ins):
        return (ins.prim.name, tuple(name(x) for x in ins.inputs), name(ins.out),
                str(ins.out.type), _param_key(ins.params))

    def fused(h):   # what codegen/fused.py reads of a fused loop
        return (tuple(instr(m) for m in h.members), name(h.root.out),
                tuple(name(v) for v in h.leaves), tuple(name(v) for v in h.extra_outputs),
                tuple(name(v) for v in h.in_place),
                tuple((name(v), name(o)) for v, o in h.extra_in_place))

    ptrs = tuple((names[id(v)], str(v.type)) for v in g.pointer_values)
    serial = _serial(g, max_threads)
    if g.kind == "loop":
        return ("loop", serial, ptrs, fused(g), g.scratch_bytes)
    return ("nn", serial, ptrs, instr(g.root), g.scratch_bytes, g.epilogue_apart,
            None if g.companion is None else instr(g.companion),
            None if g.epilogue is None else fused(g.epilogue))


def _param_key(value):
    """A hashable, exact stand-in for an instruction parameter (arrays by their bytes); an
    object of another kind stands for itself (by identity: never equal to another's)."""
    if isinstance(value, dict):
        return tuple((k, _param_key(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_param_key(v) for v in value)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        return (type(value).__name__, repr(value))
    return ("object", id(value))


def _literal_global(module: ir.Module, v, name: str):
    arr = v.instr.params["value"]
    ety = llvm_type(v.dtype)
    flat = arr.ravel()
    convert = float if v.dtype in ("f32", "f64") else int
    vals = [convert(x) for x in flat.tolist()]
    aty = ir.ArrayType(ety, len(vals))
    g = ir.GlobalVariable(module, aty, name=module.get_unique_name(name))
    g.global_constant = True
    g.linkage = "private"
    g.initializer = ir.Constant(aty, vals)
    g.align = 64
    return g


def compile_function(fn: Function, max_threads: int | None = None, cache=None,
                     donate=None) -> NativeFunction:
    return NativeFunction(fn, max_threads, cache, donate)

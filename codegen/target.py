"""The host target: LLVM initialisation, the target machine, the optimisation pipeline and the JIT.

Every LLVM C-API call is serialised behind `LLVM_LOCK` (llvmlite is not thread-safe); compile from
one thread at a time.
"""
from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
import functools
import itertools
import threading
import time

import llvmlite.binding as llvm
import llvmlite.ir as ir
from llvmlite.ir import instructions as _I, values as _V

from . import settings

LLVM_LOCK = threading.RLock()
# LLVM's optimization level for generated code. 2 runs as fast as 3 on our kernels (the hot loops
# are explicit vector code or simple loops the vectorizer handles at 2 as well) and compiles ~10%
# faster (LeNet-5 gradient, measured).
SPEED_LEVEL = 2
_names = itertools.count()


@functools.lru_cache(maxsize=None)
def _init():
    with LLVM_LOCK:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
    return True


# TRACEJIT_TARGET (settings.target) other than "host": a generic x86-64 level, the CPU features it
# needs from the host (code for a level the host lacks would die of SIGILL: refused instead), and
# whether it has AVX-512. Kernels choose register blocks and vector widths from the target
# (vector_registers, vector_width), so the 16-register (AVX2) choices can be compiled, run and
# tested on an AVX-512 machine as well.
_LEVELS = {"avx2": ("x86-64-v3", ("avx2", "fma")),
           "avx512": ("x86-64-v4", ("avx512f", "avx512bw", "avx512dq", "avx512vl"))}


@functools.lru_cache(maxsize=None)
def _target(name: str):
    """(cpu name, features, info dict) of the target `name` (settings.TARGETS)."""
    _init()
    host = llvm.get_host_cpu_features()
    if name == "host":
        cpu, features, avx512 = llvm.get_host_cpu_name(), host.flatten(), bool(host.get("avx512f"))
        avx2, fma = bool(host.get("avx2")), bool(host.get("fma"))
    else:
        cpu, needs = _LEVELS[name]
        missing = [f for f in needs if not host.get(f)]
        if missing:
            raise RuntimeError(f"TRACEJIT_TARGET={name}: this CPU ({llvm.get_host_cpu_name()}) "
                               f"lacks {', '.join(missing)}, so code compiled for {cpu} cannot "
                               f"run here; unset TRACEJIT_TARGET to compile for the host")
        features, avx512, avx2, fma = "", name == "avx512", True, True
    if avx512:
        features = ",".join(f for f in (features, "-prefer-256-bit") if f)
    info = {"cpu": cpu, "avx512": avx512, "avx2": avx2, "fma": fma,
            "triple": llvm.get_process_triple(), "target": name}
    return cpu, features, info


@functools.lru_cache(maxsize=None)
def _target_machine(name: str, codegen_level: int):
    cpu, features, _ = _target(name)
    with LLVM_LOCK:
        target = llvm.Target.from_default_triple()
        return target.create_target_machine(cpu=cpu, features=features, opt=codegen_level,
                                            jit=True, codemodel="jitdefault")


def target_machine(codegen_level: int = 3):
    """The target machine code is compiled for (TRACEJIT_TARGET; by default the host's CPU and
    features), with 512-bit vectors preferred where it has AVX-512; `codegen_level`: the code
    generator's optimization level (0: the fast instruction selector and register allocator)."""
    return _target_machine(settings.target(), codegen_level)


def host_info() -> dict:
    """The compile target's CPU name, its vector extensions (avx512, avx2, fma), the triple and
    the TRACEJIT_TARGET it comes from (the host's own CPU unless that variable says otherwise)."""
    return _target(settings.target())[2]


def vector_registers() -> int:
    """Vector registers of the target: 32 zmm with AVX-512, else 16 ymm (AVX2). Register blocks
    are sized from it: a block with more accumulators than registers spills on every step."""
    return 32 if host_info()["avx512"] else 16


def vector_width(dtype_bits: int) -> int:
    """Elements in one vector register for the target (512-bit with AVX-512, else 256-bit)."""
    bits = 512 if host_info()["avx512"] else 256
    return bits // dtype_bits


# The optimization pipelines, by module kind. "kernels": modules of loop-nest kernels only, whose
# hot loops are explicit vector code (codegen/kernels): speed level 1 without unrolling, SLP or
# interleaving compiles them ~20% faster (LeNet-5's gradient: ~80 ms of 420, AVX-512 Xeon) and
# they run as fast; the loop vectorizer stays on for their epilogues (scalar fused loops,
# codegen/fused.py).
# "fused": modules of fused loops (codegen/fused.py; with the entry when it is not alone): the
# full pipeline without the loop unroller. The unroller fully unrolled short constant-trip inner
# loops before the vectorizer, which then vectorized the outer loop with gathers (LeNet-5's
# log-softmax row sum: 500 lines of optimized IR instead of 112, 34 ms of LLVM instead of 13;
# its fused loops ~122 ms instead of ~97 in all, AVX-512 Xeon) for loops that run in a
# microsecond either way (that row sum: 0.4 us slower, the others alike within noise).
# "full": everything else (modules built outside a NativeFunction: tests, benchmarks).
# "entry": a module of the entry alone, straight-line calls marked optnone (runtime): the fast
# code generator (LeNet-5's gradient: 4 ms instead of 12, ResNet-8's ~25 ms less) makes code
# that runs once per call, a few spilled registers slower.
PIPELINES = {
    "full": {},
    "fused": {"loop_unrolling": False},
    "kernels": {"speed_level": 1, "slp_vectorization": False, "loop_unrolling": False,
                "loop_interleaving": False},
    "entry": {"codegen_level": 0},
}


def _codegen(pipeline: str):
    """The target machine that generates code for a module of `pipeline`."""
    return target_machine(PIPELINES[pipeline].get("codegen_level", 3))


def optimize_module(mod_ref, speed_level: int = SPEED_LEVEL, pipeline: str = "full"):
    tm = target_machine()
    options = PIPELINES[pipeline]
    pto = llvm.create_pipeline_tuning_options(
        speed_level=min(speed_level, options.get("speed_level", speed_level)))
    pto.slp_vectorization = options.get("slp_vectorization", True)
    pto.loop_vectorization = True
    for name in ("loop_unrolling", "loop_interleaving"):
        if name in options:
            setattr(pto, name, options[name])
    pb = llvm.create_pass_builder(tm, pto)
    pm = pb.getModulePassManager()
    pm.run(mod_ref, pb)


# Functions compiled by LLVM from this process (compile_objects calls: its modules compiled here or
# by its children), and modules this process parsed and optimized (the dumps' too); neither
# counts cache loads: tests check they stay 0 on a warm persistent cache.
llvm_compiles = 0
llvm_modules = 0


def optimized_module(llvm_ir: str, speed_level: int = SPEED_LEVEL, pipeline: str = "full"):
    """Parse, verify and optimize `llvm_ir` for the host (with PIPELINES[pipeline]); returns
    the module ref."""
    global llvm_modules
    _init()
    tm = target_machine()
    with LLVM_LOCK:
        mod = llvm.parse_assembly(llvm_ir)
        mod.triple = llvm.get_process_triple()
        mod.data_layout = str(tm.target_data)
        mod.verify()
        optimize_module(mod, speed_level, pipeline)
        llvm_modules += 1
        return mod


# ------------------------------------------------------------------------------------------------
# compiling several modules at once
# ------------------------------------------------------------------------------------------------
# llvmlite serializes every LLVM call behind one lock, so a process compiles one module at a time.
# A big function is therefore lowered into several modules, which this process and forked
# children compile at once; the object files are linked together. The modules are handed out
# from a queue, each process taking the next one when it is done with the last (the caller
# orders them heaviest first): how long a module takes LLVM is known only roughly beforehand
# (LeNet-5's convolution kernels take 40 to 140 ms, and a new machine shifts every estimate),
# and a fixed split left one process idle while the other still compiled (LeNet-5's gradient:
# 80 ms). TRACEJIT_COMPILE_PROCESSES=1 turns this off.
SPLIT_WEIGHT = 48   # compile weight (runtime._compile_weight) above which a function is split


def compile_processes() -> int:
    n = settings.compile_processes()
    if n is not None:
        return n
    if not hasattr(os, "fork") or sys.platform != "linux":
        return 1
    try:
        return min(2, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return 1


def processes_for(weight: int) -> int:
    """How many processes compile a function of this compile weight."""
    return compile_processes() if weight >= SPLIT_WEIGHT else 1


def _split_source(item):
    """(LLVM IR text or a function returning it, pipeline name) of a module to compile: `item`
    is either, or such a pair."""
    return item if isinstance(item, tuple) else (item, "full")


def _compile_object(item, speed_level: int) -> bytes:
    """Object file of a module (see `_split_source`), lowered here if given as a function."""
    llvm_ir, pipeline = _split_source(item)
    mod = optimized_module(llvm_ir() if callable(llvm_ir) else llvm_ir, speed_level, pipeline)
    with LLVM_LOCK:
        return _codegen(pipeline).emit_object(mod)


_INDEX = struct.Struct("<I")   # a queue entry: the index of a module (atomic pipe writes and reads)
_RESULT = struct.Struct("<IQdd")   # a child's object: index, length, started, done


def _take(queue: int):
    """The next module index from the queue pipe, None when it is empty (a read of one entry
    is atomic: two processes never take the same module)."""
    data = os.read(queue, _INDEX.size)
    return _INDEX.unpack(data)[0] if len(data) == _INDEX.size else None


def _compile_in_child(sources, queue: int, speed_level: int):
    """Fork a process that compiles the modules it takes from `queue` and then writes their
    object files to a pipe; returns (pid, read end) or None if forking failed."""
    r, w = os.pipe()
    try:
        with LLVM_LOCK:   # no other thread of ours is inside LLVM while we fork
            pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # the child: compile, write, and leave without running any Python cleanup
        code = 1
        try:
            os.close(r)
            out = []
            # (written at the end: a pipe holds 64 KiB, and the parent reads once it is done)
            while (k := _take(queue)) is not None:
                started = time.perf_counter()
                obj = _compile_object(sources[k], speed_level)
                # (CLOCK_MONOTONIC: the parent compares these with its clock, last_timeline)
                out.append(_RESULT.pack(k, len(obj), started, time.perf_counter()) + obj)
            view = memoryview(b"".join(out))
            while view:
                view = view[os.write(w, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(child, timeline: dict | None = None) -> dict:
    """{module index: object file} of what the child compiled (empty if it failed); notes when
    it started and finished each in `timeline` (see last_timeline)."""
    pid, r = child
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if status != 0:
        return {}
    out, pos, spans = {}, 0, []
    while pos + _RESULT.size <= len(data):
        k, n, started, done = _RESULT.unpack_from(data, pos)
        pos += _RESULT.size
        if pos + n > len(data):
            return {}
        out[k] = data[pos:pos + n]
        spans.append((started, done))
        pos += n
    if pos != len(data):
        return {}
    if timeline is not None:
        timeline.setdefault("children", []).append(spans)
    return out


def compile_objects(sources, speed_level: int = SPEED_LEVEL, processes: int | None = None) -> list:
    """Object files of `sources` (LLVM IR texts, or functions returning them, called by the
    process that compiles them; or pairs of one and a PIPELINES name): the first compiled here
    (then the thread pool is built, if it links against it), the others taken from a queue, in
    their order, by this process and forked ones, all at once (a module a child took but did
    not deliver is compiled here after all). `processes`: how many processes at most (default
    compile_processes())."""
    global llvm_compiles
    _init()
    llvm_compiles += 1
    timeline = _timeline.value = {"start": time.perf_counter()}
    objects = [None] * len(sources)
    queue, children = None, []
    processes = compile_processes() if processes is None else min(processes, compile_processes())
    if len(sources) > 1 and processes > 1:
        r, w = os.pipe()
        # (in one write: the pipe holds 16384 entries; a function has far fewer modules)
        os.write(w, b"".join(_INDEX.pack(k) for k in range(1, len(sources))))
        os.close(w)   # the queue is then empty at its end: a read returns nothing
        queue = r
        for _ in range(processes - 1):
            child = _compile_in_child(sources, queue, speed_level)
            if child is not None:
                children.append(child)
    try:
        objects[0] = _compile_object(sources[0], speed_level)
        timeline["entry"] = time.perf_counter()
        if children:
            # while the children compile: build the thread pool the entry links against (~20
            # ms of LLVM, else done after the last child, in series); before the queue's
            # modules, so that they even out the work (after them the children would wait)
            from .threadpool import symbols
            symbols(objects[:1])
        timeline["pool"] = time.perf_counter()
        if queue is not None:
            while (k := _take(queue)) is not None:
                objects[k] = _compile_object(sources[k], speed_level)
    except BaseException:
        for pid, r in children:   # (not left running, nor unreaped)
            os.kill(pid, signal.SIGKILL)
            _collect((pid, r))
        raise
    finally:
        if queue is not None:
            os.close(queue)
    timeline["own"] = time.perf_counter()
    for child in children:
        for k, obj in _collect(child, timeline).items():
            objects[k] = obj
    timeline["end"] = time.perf_counter()
    return [obj if obj is not None else _compile_object(src, speed_level)
            for src, obj in zip(sources, objects)]


_timeline = threading.local()


def last_timeline() -> dict:
    """When the last compile_objects of this thread started and ended ("start", "end"), had
    compiled the entry's module ("entry") and built the thread pool ("pool"), ran out of
    modules to compile ("own"), and when each child started and finished compiling each of its
    modules ("children": a list of (started, done) per child): perf_counter seconds,
    comparable across processes on Linux (one monotonic clock). NativeFunction.compile_seconds
    reports the spans."""
    return getattr(_timeline, "value", {})


# Several object files in one cache entry: magic, count, lengths, then the files.
_MULTI_MAGIC = b"TJMULTI1"


def pack_objects(objects) -> bytes:
    if len(objects) == 1:
        return objects[0]
    head = _MULTI_MAGIC + struct.pack(f"<I{len(objects)}Q", len(objects), *map(len, objects))
    return head + b"".join(objects)


def unpack_objects(data: bytes) -> list:
    if not data.startswith(_MULTI_MAGIC):
        return [data]
    (n,) = struct.unpack_from("<I", data, 8)
    lengths = struct.unpack_from(f"<{n}Q", data, 12)
    pos, out = 12 + 8 * n, []
    for length in lengths:
        out.append(data[pos:pos + length])
        pos += length
    if pos != len(data):
        raise ValueError("object container of the wrong length")
    return out


class JITModule:
    """Native code of one LLVM module, linked into an ORC JIT. Keep it alive while its functions
    are used.

    `JITModule(llvm_ir, exports)` compiles; `JITModule.from_object(obj, exports, source)` links
    object code compiled before (the persistent cache) without running LLVM, and compiles
    `source()` (the LLVM IR text) only when `optimized_ir` or `asm` is asked for. `object_code` is
    the linked object file."""

    def __init__(self, llvm_ir, exports, speed_level: int = SPEED_LEVEL, source=None,
                 processes: int | None = None, side=()):
        """`llvm_ir`: one module's text, or a list of texts or functions returning them, or of
        pairs of one and a PIPELINES name (linked together; see compile_objects). `source()`
        gives them again for the dumps (by default `llvm_ir`). `processes`: see
        compile_objects. `side`: more modules (alike) compiled at the same time, last, but not
        linked: their object files are `side_objects`."""
        sources = [llvm_ir] if isinstance(llvm_ir, str) else list(llvm_ir)
        self._source, self._speed_level = source or (lambda: sources), speed_level
        # emit_object runs the code generator's IR passes on the module: `optimized_ir`
        # recompiles from the source rather than printing a module afterwards
        objects = compile_objects(sources + list(side), speed_level, processes)
        self.side_objects = objects[len(sources):]
        self.object_code = pack_objects(objects[:len(sources)])
        self._mod = None
        self._optimized_ir = self._asm = None
        self._link(exports)

    @classmethod
    def from_object(cls, object_code: bytes, exports, source=None,
                    speed_level: int = SPEED_LEVEL):
        self = cls.__new__(cls)
        _init()
        self._source, self._speed_level = source, speed_level
        self._mod, self.object_code = None, object_code
        self._optimized_ir = self._asm = None
        self._link(exports)
        return self

    def _link(self, exports):
        from .threadpool import symbols   # (built once per process before its first use)
        imports = symbols(unpack_objects(self.object_code))
        with LLVM_LOCK:
            self._lljit = llvm.create_lljit_compiler(target_machine())
            builder = llvm.JITLibraryBuilder()
            for obj in unpack_objects(self.object_code):
                builder.add_object_img(obj)
            for name in exports:
                builder.export_symbol(name)
            for name, address in imports.items():   # the thread pool's entry, by name
                builder.import_symbol(name, address)
            self._tracker = builder.link(self._lljit, f"tracejit{next(_names)}")
            self.addresses = {name: self._tracker[name] for name in exports}

    def _recompile(self):
        if self._source is None:
            raise RuntimeError("this JIT module was linked from object code without its source")
        src = self._source()
        out = []
        for item in [src] if isinstance(src, str) else src:
            text, pipeline = _split_source(item)
            out.append((optimized_module(text() if callable(text) else text, self._speed_level,
                                         pipeline), pipeline))
        return out

    @property
    def optimized_ir(self) -> str:
        """The modules after LLVM's optimizer (compiled again on first use)."""
        if self._optimized_ir is None:
            mods = self._recompile()
            with LLVM_LOCK:
                self._optimized_ir = "\n\n".join(str(m) for m, _ in mods)
        return self._optimized_ir

    @property
    def asm(self) -> str:
        if self._asm is None:
            if self._mod is None:
                self._mod = self._recompile()
            with LLVM_LOCK:
                self._asm = "\n".join(_codegen(pipeline).emit_assembly(m)
                                       for m, pipeline in self._mod)
        return self._asm


def cfunc(address: int, argtypes, restype=None):
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


# ------------------------------------------------------------------------------------------------
# the LLVM IR text of a module
# ------------------------------------------------------------------------------------------------
# llvmlite prints a module through a method call, a str.format and a cached-attribute lookup per
# operand: 0.11 s for LeNet-5's gradient (two modules), in both processes before LLVM starts. The
# printer below writes the same text (byte for byte: tests/test_compile_printer.py) for the
# instruction kinds the code generator emits, in half the time; any other instruction, or one
# carrying metadata, is printed by llvmlite.
_Constant = ir.Constant
_NAMED_REF = _V.NamedValue._get_reference


def _ref_fn():
    cache = {}

    def ref(v):
        """The operand's reference text, as v.get_reference() gives it."""
        r = cache.get(id(v))   # (every value printed is alive while the module is)
        if r is not None:
            return r
        t = type(v)
        if t is _Constant:
            key = _constant_key(v)
            if key is None:
                return v.get_reference()
            r = cache.get(key)
            if r is None:
                r = cache[key] = v.get_reference()
            return r
        if getattr(t, "_get_reference", None) is _NAMED_REF:
            name = v._name
            if '\\' in name or '"' in name:
                name = name.replace('\\', '\\5c').replace('"', '\\22')
            r = cache[id(v)] = f'{v.name_prefix}"{name}"'
            return r
        return v.get_reference()
    return ref


def _constant_key(v):
    """A key equal for constants that print alike (None: not cached): the type and the value,
    a float by its exact hex form (-0.0 apart from 0.0; NaNs, whose payloads print, never)."""
    c = v.constant
    tc = type(c)
    if tc is int or tc is bool:
        return (str(v.type), tc, c)
    if tc is float:
        return (str(v.type), c.hex()) if c == c else None
    if tc is list:
        keys = []
        for e in c:
            if type(e) is not _Constant:
                return None
            k = _constant_key(e)
            if k is None:
                return None
            keys.append(k)
        return (str(v.type), tuple(keys))
    return None


def module_text(module) -> str:
    """`str(module)`, faster (see above)."""
    ref = _ref_fn()
    lines = ['; ModuleID = "%s"' % (module.name,), 'target triple = "%s"' % (module.triple,),
             'target datalayout = "%s"' % (module.data_layout,), '']
    lines += [it.get_declaration() for it in module.get_identified_types().values()]
    for v in module.globals.values():
        if type(v) is ir.Function and v.blocks:
            buf = []
            v.descr_prototype(buf)
            buf.append("{\n")
            for blk in v.blocks:
                buf.append(f"{blk._format_name()}:\n")
                for ins in blk.instructions:
                    buf.append(f"  {_instr(ins, ref)}\n")
            buf.append("}\n")
            lines.append("".join(buf))
        else:
            lines.append(str(v))
    lines += module._get_metadata_lines()
    return "\n".join(lines)


def _tr(v, ref):
    return f"{v.type} {ref(v)}"


def _instr(ins, ref):
    f = _FORMATS.get(type(ins))
    if f is None or ins.metadata:
        return str(ins)
    body = f(ins, ref)
    if body is None:
        return str(ins)
    if isinstance(ins.type, ir.VoidType):
        return body.rstrip()
    return f"{ref(ins)} = {body}".rstrip()


def _generic(ins, ref):
    opname = ins.opname
    if ins.flags:
        opname = ' '.join([opname] + ins.flags)
    return f"{opname} {ins.type} {', '.join([ref(op) for op in ins.operands])}"


def _terminator(ins, ref):
    return f"{ins.opname} {', '.join([_tr(op, ref) for op in ins.operands])}"


def _ret(ins, ref):
    if ins.operands:
        v = ins.operands[0]
        return f"{ins.opname} {v.type} {ref(v)}"
    return ins.opname


def _gep(ins, ref):
    p = ins.pointer
    op = "getelementptr inbounds" if ins.inbounds else "getelementptr"
    return f"{op} {ins.source_etype}, {p.type} {ref(p)}, {', '.join([_tr(i, ref) for i in ins.indices])}"


def _call(ins, ref):
    if ins.arg_attributes or ins.cconv or ins.tail:
        return None
    callee = ins.operands[0]
    fnty = callee.function_type
    if fnty.var_arg:
        return None
    rt = fnty.return_type
    fm = (' ' + ' '.join(ins.fastmath._to_list(rt))) if ins.fastmath else ''
    at = (' ' + ' '.join(ins.attributes._to_list(rt))) if ins.attributes else ''
    args = ', '.join([_tr(a, ref) for a in ins.operands[1:]])
    return f"{ins.opname}{fm} {rt} {ref(callee)}({args}){at}"


def _load(ins, ref):
    v = ins.operands[0]
    align = f", align {ins.align}" if ins.align is not None else ''
    return f"load {ins.type}, {v.type} {ref(v)}{align}"


def _store(ins, ref):
    val, ptr = ins.operands
    align = f", align {ins.align}" if ins.align is not None else ''
    return f"store {val.type} {ref(val)}, {ptr.type} {ref(ptr)}{align}"


def _cmp(ins, ref):
    a, b = ins.operands
    flags = ''.join(' ' + it for it in ins.flags)
    return f"{ins.opname}{flags} {ins.op} {a.type} {ref(a)}, {ref(b)}"


def _select(ins, ref):
    c, a, b = ins.operands
    return f"select {' '.join(ins.flags)} {c.type} {ref(c)}, {a.type} {ref(a)}, {b.type} {ref(b)}"


def _phi(ins, ref):
    incs = ', '.join([f"[{ref(v)}, {ref(b)}]" for v, b in ins.incomings])
    return f"phi {' '.join(ins.flags)} {ins.type} {incs}"


def _operands(ins, ref):
    return f"{ins.opname} {', '.join([_tr(op, ref) for op in ins.operands])}"


def _cast(ins, ref):
    v = ins.operands[0]
    return f"{ins.opname} {v.type} {ref(v)} to {ins.type}"


def _alloca(ins, ref):
    s = f"{ins.opname} {ins.allocated_type}"
    if ins.operands:
        s += f", {_tr(ins.operands[0], ref)}"
    if ins.align is not None:
        s += f", align {ins.align}"
    return s


_FORMATS = {_I.Instruction: _generic, _I.Branch: _terminator, _I.ConditionalBranch: _terminator,
            _I.Ret: _ret, _I.GEPInstr: _gep, _I.CallInstr: _call, _I.LoadInstr: _load,
            _I.StoreInstr: _store, _I.ICMPInstr: _cmp, _I.FCMPInstr: _cmp,
            _I.SelectInstr: _select, _I.PhiInstr: _phi, _I.ShuffleVector: _operands,
            _I.InsertElement: _operands, _I.ExtractElement: _operands, _I.CastInstr: _cast,
            _I.AllocaInstr: _alloca}

"""tracejit's own thread pool, generated as LLVM IR (no C compiler, no libgomp).

One pool per process, compiled and linked on first use; every module of generated code reaches
its entry by name (`target.JITModule` imports the symbol when it links, so object code from the
persistent cache finds it too):

    void tj_parallel(ptr fn, ptr ctx, i64 nthreads, i64 max_chunks)

runs `fn(ctx, chunk, nchunks, slot)` for every chunk in [0, nchunks), nchunks = min(max_chunks,
CHUNKS_PER_THREAD * nthreads), on at most `nthreads` threads (the caller included), and returns
when all chunks are done. `slot` (0 for the caller, 1 .. nthreads-1 for workers) names the
executing thread inside this call: no two chunks that run at the same time share a slot, so a
kernel's per-thread scratch is indexed by slot, its share of the work by chunk.

Why this and not libgomp: with the machine shared (two processes, or a busy loop beside us), a
static split of a kernel into one share per thread waits for the slowest thread, and a thread that
was descheduled holds the whole call for a time slice (milliseconds), while OpenMP's spinning
workers take the CPU the other process needs. Here:

- a call is split into more chunks than threads, claimed dynamically (a compare-and-swap on one
  word); the caller claims chunks too, so a worker that never gets the CPU claims nothing and
  delays nothing. The caller waits only for chunks a worker has already claimed; if that takes
  long it sleeps (a futex) instead of spinning, so the scheduler may move the preempted worker
  onto the caller's core;
- workers spin briefly after a job (SPIN_CYCLES of `pause`, tens of microseconds: the next
  kernel of the same call usually comes sooner), then sleep on a futex; the caller makes the
  wake-up system call only when a worker sleeps.

The job word: generation (32 bits) | free worker slots (8) | chunks claimed from the bottom (12)
| unclaimed chunks (12). A claim decrements the unclaimed count (and, for a worker's first claim,
the free slots) with a CAS that fails when the generation moved on, so a worker that wakes up late
can never claim a chunk of a later job with the state of an earlier one. The caller claims chunks
from the bottom (chunk = the bottom count, which it increments), workers from the top (chunk =
bottom count + unclaimed count - 1): on two threads of an idle machine the caller runs the first
chunks of every kernel and the worker the last ones, the same rows or columns call after call, so
what one kernel writes is in the cache of the core whose thread reads it next (an optimizer's
update of a weight and the next step's forward product; with one counter for both, the halves
changed cores at random). The job's function, context and chunk count are read after a successful
claim: the job cannot end before that chunk is done.

Concurrency and fork: the pool runs one job at a time. A caller that finds it busy (another Python
thread of the process is inside a parallel kernel) runs its kernel alone on its own thread, as one
chunk: never waiting on the other. The lock word holds the owner's pid; after a fork the child
finds its parent's pid there (or none), takes the lock over and starts workers of its own (the
parent's do not exist in the child), so a forked child never waits for a thread it does not have.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

import llvmlite.binding as llvm
import llvmlite.ir as ir

from . import settings, target
from .loops import I32, I64, PTR, VOID, i32, i64

# Part of the compile cache's key (cache.py): generated code calls `tj_parallel` with this
# contract; change it when the contract changes.
VERSION = "tjpool-1 chunk,nchunks,slot"
ENTRY = "tj_parallel"

CHUNKS_PER_THREAD = 4      # chunks per thread: a slow thread holds back at most ~1/4 of its share
# no chunk smaller than this (estimated single-thread time, real ns on the target since the cost
# models were calibrated: the 8 us of the former estimates, 2-3x too high, were ~3-4 us of work; a
# chunk's claim costs tens of ns, and a kernel just over parallel.PARALLEL_MIN_NS then still gets
# the CHUNKS_PER_THREAD chunks per thread of 2 threads that keep a slow thread from holding it back)
MIN_CHUNK_NS = 4_000
# A kernel estimated under this (just over parallel.PARALLEL_MIN_NS) splits into 2 chunks at most:
# LeNet-5's fc2 forward (x @ W^T with its epilogue, rows split, 27 us estimated) took 21 us on 2
# threads in its 6 chunks against 20 on one, 14 us in 2 (Zen 3, TRACEJIT_PROFILE minima)
FEW_CHUNKS_NS = 30_000
MAX_CHUNKS = (1 << 12) - 1  # the job word's fields (CHUNKS_PER_THREAD * 256 threads fit)
MAX_WORKERS = 255          # the job word's slot field (8 bits)
SPIN_CYCLES = 100_000      # a worker's spin after a job: ~30-50 us at 2-3 GHz
WAIT_SPIN_CYCLES = 60_000  # the caller's spin for claimed chunks before it sleeps

# Linux on x86-64 only: futex(2) is system call 202 there, `pause` and the time-stamp counter
# (llvm.readcyclecounter) are what the spins use. Elsewhere (untested: aarch64's cycle counter may
# trap in user mode) kernels run on the calling thread.
SYS_FUTEX = 202
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129


def supported() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def chunk_limit(cost_ns: float) -> int:
    """The most chunks a kernel of this estimated single-thread time is split into."""
    if cost_ns < FEW_CHUNKS_NS:
        return min(2, max(1, int(cost_ns // MIN_CHUNK_NS)))
    return max(1, min(MAX_CHUNKS, int(cost_ns // MIN_CHUNK_NS)))


class _Emitter:
    """The pool's module: its globals and the helpers its functions are written with."""

    def __init__(self):
        m = self.m = ir.Module("tracejit.pool")
        self.fnty = ir.FunctionType(VOID, [PTR, I64, I64, I64])
        self.g = {}
        # one cache line each for the words the threads fight over; the job's fields share one
        for name, ty in [("gen", I32), ("word", I64), ("done", I32), ("waiting", I32),
                         ("sleepers", I32), ("lock", I32), ("nworkers", I32), ("pid", I32),
                         ("fn", PTR), ("ctx", PTR), ("nchunks", I64)]:
            gv = ir.GlobalVariable(m, ty, f"pool.{name}")
            gv.linkage = "internal"
            gv.initializer = ir.Constant(ty, None)
            gv.align = 64 if name not in ("ctx", "nchunks") else 8
            self.g[name] = gv
        self.syscall = ir.Function(m, ir.FunctionType(I64, [I64], var_arg=True), "syscall")
        self.getpid = ir.Function(m, ir.FunctionType(I32, []), "getpid")
        self.create = ir.Function(m, ir.FunctionType(I32, [PTR, PTR, PTR, PTR]), "pthread_create")
        self.detach = ir.Function(m, ir.FunctionType(I32, [I64]), "pthread_detach")
        self.cycles = ir.Function(m, ir.FunctionType(I64, []), "llvm.readcyclecounter")

    # -- small helpers ---------------------------------------------------------------------------
    def load(self, b, name, order="seq_cst"):
        gv = self.g[name]
        return b.load_atomic(gv, order, _size(gv), typ=gv.value_type)

    def store(self, b, name, value, order="seq_cst"):
        gv = self.g[name]
        # IRBuilder.store_atomic checks a pointee type, which opaque pointers lack
        b._insert(ir.instructions.StoreAtomicInstr(b.block, value, gv, order, _size(gv)))

    def pause(self, b):
        # an intrinsic: inline asm text would need LLVM's asm parser, which llvmlite lacks
        f = self.m.globals.get("llvm.x86.sse2.pause")
        if f is None:
            f = ir.Function(self.m, ir.FunctionType(VOID, []), "llvm.x86.sse2.pause")
        b.call(f, [])

    def futex(self, b, name, op, value):
        b.call(self.syscall, [i64(SYS_FUTEX), self.g[name], i64(op), value,
                              ir.Constant(PTR, None), ir.Constant(PTR, None), i64(0)])

    def callee(self, b, fn):
        """`fn` (a pointer) as the callee of an indirect call of the chunk function's type."""
        return _Indirect(fn, self.fnty)

    def block(self, b, name):
        return b.function.append_basic_block(name)


class _Indirect:
    """A pointer value as the callee of an indirect call: llvmlite takes a callee's type from
    `function_type`, which opaque pointers do not carry."""

    def __init__(self, value, fnty):
        self.value, self.function_type, self.type = value, fnty, value.type

    def get_reference(self):
        return self.value.get_reference()

    def __str__(self):
        return str(self.value)


def _size(gv):
    t = gv.value_type
    return 8 if isinstance(t, ir.PointerType) else t.width // 8


def _claim(e: _Emitter) -> ir.Function:
    """i64 claim(i32 gen, i1 take_slot, i1 bottom): -1 when job `gen` has no chunk left for the
    caller (or no free slot when one is asked for), else chunk | slot << 32 (slot 0 without
    take_slot); the lowest unclaimed chunk with `bottom`, else the highest."""
    f = ir.Function(e.m, ir.FunctionType(I64, [I32, ir.IntType(1), ir.IntType(1)]),
                    "pool.claim")
    f.linkage = "internal"
    gen, take, bottom = f.args
    b = ir.IRBuilder(f.append_basic_block("entry"))
    loop, check, cas, won, none = (e.block(b, n) for n in ("loop", "check", "cas", "won", "none"))
    first = e.load(b, "word", "monotonic")
    b.branch(loop)
    b.position_at_end(loop)
    w = b.phi(I64, "w")
    w.add_incoming(first, b.function.entry_basic_block)
    same = b.icmp_unsigned("==", b.trunc(b.lshr(w, i64(32)), I32), gen)
    b.cbranch(same, check, none)
    b.position_at_end(check)
    rem = b.and_(w, i64(MAX_CHUNKS), "remaining")
    low = b.and_(b.lshr(w, i64(12)), i64(MAX_CHUNKS), "bottom.claimed")
    free = b.and_(b.lshr(w, i64(24)), i64(0xff), "free")
    no_slot = b.and_(take, b.icmp_unsigned("==", free, i64(0)))
    b.cbranch(b.or_(b.icmp_unsigned("==", rem, i64(0)), no_slot), none, cas)
    b.position_at_end(cas)
    new = b.sub(w, b.add(i64(1), b.select(take, i64(1 << 24), i64(0))))
    new = b.add(new, b.select(bottom, i64(1 << 12), i64(0)))
    res = b.cmpxchg(e.g["word"], w, new, "acq_rel", "monotonic")
    seen = b.extract_value(res, 0)
    w.add_incoming(seen, cas)
    b.cbranch(b.extract_value(res, 1), won, loop)
    b.position_at_end(won)
    slot = b.select(take, free, i64(0))
    chunk = b.select(bottom, low, b.sub(b.add(low, rem), i64(1)))
    b.ret(b.or_(chunk, b.shl(slot, i64(32))))
    b.position_at_end(none)
    b.ret(i64(-1))
    return f


def _run_claimed(e: _Emitter, b, claim, gen, slot_var=None):
    """Claim and run chunks of job `gen` until none is left. A worker passes `slot_var` (an i64
    alloca, 0 before its first claim of the job): its first claim takes a slot, kept for the
    job; the caller passes None and runs with slot 0. Leaves the builder after the loop."""
    loop, run, after = e.block(b, "chunks"), e.block(b, "chunk.run"), e.block(b, "chunks.done")
    b.branch(loop)
    b.position_at_end(loop)
    if slot_var is None:
        take = ir.Constant(ir.IntType(1), 0)
    else:
        take = b.icmp_unsigned("==", b.load(slot_var), i64(0))
    # the caller from the bottom, workers from the top (see the module docstring)
    r = b.call(claim, [gen, take, ir.Constant(ir.IntType(1), int(slot_var is None))])
    b.cbranch(b.icmp_signed("<", r, i64(0)), after, run)
    b.position_at_end(run)
    if slot_var is None:
        slot = i64(0)
    else:
        slot = b.select(take, b.lshr(r, i64(32)), b.load(slot_var))
        b.store(slot, slot_var)
    fn, ctx, n = (b.load(e.g[k], typ=e.g[k].value_type) for k in ("fn", "ctx", "nchunks"))
    b.call(e.callee(b, fn), [ctx, b.and_(r, i64(0xffffffff)), n, slot])
    b.atomic_rmw("add", e.g["done"], i32(1), "seq_cst")
    wake, next_ = e.block(b, "chunk.wake"), e.block(b, "chunk.next")
    b.cbranch(b.icmp_unsigned("!=", e.load(b, "waiting"), i32(0)), wake, next_)
    b.position_at_end(wake)
    e.futex(b, "done", FUTEX_WAKE_PRIVATE, i64(1))
    b.branch(next_)
    b.position_at_end(next_)
    b.branch(loop)
    b.position_at_end(after)


def _worker(e: _Emitter, claim) -> ir.Function:
    """ptr worker(ptr seen0): run chunks of every new job; spin SPIN_CYCLES after one, then
    sleep on the generation word. `seen0` is the generation when the worker was created (before
    the job that created it was published, so that job counts as new)."""
    f = ir.Function(e.m, ir.FunctionType(PTR, [PTR]), "pool.worker")
    f.linkage = "internal"
    b = ir.IRBuilder(f.append_basic_block("entry"))
    seen = b.alloca(I32, name="seen")
    slot = b.alloca(I64, name="slot")
    start = b.alloca(I64, name="spin.start")
    b.store(b.trunc(b.ptrtoint(f.args[0], I64), I32), seen)
    top, job, idle, spin, sleep, wait, woke = (e.block(b, n) for n in (
        "top", "job", "idle", "spin", "sleep", "wait", "woke"))
    b.branch(top)

    b.position_at_end(top)          # a new job?
    gen = e.load(b, "gen", "acquire")
    b.cbranch(b.icmp_unsigned("!=", gen, b.load(seen)), job, idle)

    b.position_at_end(job)
    b.store(gen, seen)
    b.store(i64(0), slot)
    _run_claimed(e, b, claim, gen, slot)
    b.branch(top)

    b.position_at_end(idle)         # spin a little: the next kernel usually comes soon
    b.store(b.call(e.cycles, []), start)
    b.branch(spin)
    b.position_at_end(spin)
    e.pause(b)
    again = b.icmp_unsigned("!=", e.load(b, "gen", "acquire"), b.load(seen))
    spun = b.icmp_unsigned(">", b.sub(b.call(e.cycles, []), b.load(start)), i64(SPIN_CYCLES))
    cont = e.block(b, "spin.more")
    b.cbranch(again, top, cont)
    b.position_at_end(cont)
    b.cbranch(spun, sleep, spin)

    # sleep: announce it, then wait unless the generation moved (the caller stores the
    # generation, then reads `sleepers`; both seq_cst, so one of the two sees the other)
    b.position_at_end(sleep)
    b.atomic_rmw("add", e.g["sleepers"], i32(1), "seq_cst")
    still = b.icmp_unsigned("==", e.load(b, "gen"), b.load(seen))
    b.cbranch(still, wait, woke)
    b.position_at_end(wait)
    e.futex(b, "gen", FUTEX_WAIT_PRIVATE, b.zext(b.load(seen), I64))
    b.branch(woke)
    b.position_at_end(woke)
    b.atomic_rmw("sub", e.g["sleepers"], i32(1), "seq_cst")
    b.branch(top)
    return f


def _parallel(e: _Emitter, claim, worker) -> ir.Function:
    """The entry, tj_parallel(fn, ctx, nthreads, max_chunks) (see the module docstring)."""
    f = ir.Function(e.m, ir.FunctionType(VOID, [PTR, PTR, I64, I64]), ENTRY)
    fn, ctx, nthreads, max_chunks = f.args
    fn.name, ctx.name, nthreads.name, max_chunks.name = "fn", "ctx", "nthreads", "max_chunks"
    b = ir.IRBuilder(f.append_basic_block("entry"))
    thread_handle = b.alloca(I64, name="thread")
    call_fn = e.callee(b, fn)

    def smin(x, y):
        return b.select(b.icmp_signed("<", x, y), x, y)

    nchunks = smin(smin(b.mul(nthreads, i64(CHUNKS_PER_THREAD)), max_chunks), i64(MAX_CHUNKS))
    alone, locking, busy, locked = (e.block(b, n) for n in ("alone", "lock", "busy", "locked"))
    b.cbranch(b.or_(b.icmp_signed("<=", nthreads, i64(1)), b.icmp_signed("<=", nchunks, i64(1))),
              alone, locking)

    b.position_at_end(alone)        # one thread, or the pool is busy: the whole range here
    b.call(call_fn, [ctx, i64(0), i64(1), i64(0)])
    b.ret_void()

    # the lock holds its owner's pid: another pid there is a lock inherited through fork
    b.position_at_end(locking)
    pid = b.call(e.getpid, [])
    res = b.cmpxchg(e.g["lock"], i32(0), pid, "acquire", "monotonic")
    old = b.extract_value(res, 0)
    b.cbranch(b.extract_value(res, 1), locked, busy)
    b.position_at_end(busy)
    steal = e.block(b, "steal")
    b.cbranch(b.icmp_unsigned("==", old, pid), alone, steal)
    b.position_at_end(steal)
    res2 = b.cmpxchg(e.g["lock"], old, pid, "acquire", "monotonic")
    b.cbranch(b.extract_value(res2, 1), locked, alone)

    b.position_at_end(locked)
    fresh, ready = e.block(b, "fresh"), e.block(b, "ready")
    b.cbranch(b.icmp_unsigned("!=", e.load(b, "pid", "monotonic"), pid), fresh, ready)
    b.position_at_end(fresh)        # first use in this process: no workers yet
    e.store(b, "pid", pid, "monotonic")
    e.store(b, "nworkers", i32(0), "monotonic")
    e.store(b, "sleepers", i32(0))
    b.branch(ready)

    b.position_at_end(ready)        # start the workers this call may use (once per process)
    want = b.trunc(smin(b.sub(nthreads, i64(1)), i64(MAX_WORKERS)), I32)
    grow, create, created, publish = (e.block(b, n) for n in ("grow", "create", "created",
                                                               "publish"))
    b.branch(grow)
    b.position_at_end(grow)
    have = e.load(b, "nworkers", "monotonic")
    b.cbranch(b.icmp_signed("<", have, want), create, publish)
    b.position_at_end(create)
    seen0 = b.inttoptr(b.zext(e.load(b, "gen", "monotonic"), I64), PTR)
    rc = b.call(e.create, [thread_handle, ir.Constant(PTR, None), worker, seen0])
    b.cbranch(b.icmp_signed("==", rc, i32(0)), created, publish)
    b.position_at_end(created)
    b.call(e.detach, [b.load(thread_handle)])
    e.store(b, "nworkers", b.add(have, i32(1)), "monotonic")
    b.branch(grow)

    b.position_at_end(publish)
    have = e.load(b, "nworkers", "monotonic")
    slots = b.zext(b.select(b.icmp_signed("<", have, want), have, want), I64)
    # plain stores: workers read these only after a claim of this job (see the docstring)
    b.store(fn, e.g["fn"])
    b.store(ctx, e.g["ctx"])
    b.store(nchunks, e.g["nchunks"])
    e.store(b, "done", i32(0))
    e.store(b, "waiting", i32(0))
    gen = b.add(e.load(b, "gen", "monotonic"), i32(1), name="gen")
    word = b.or_(b.or_(b.shl(b.zext(gen, I64), i64(32)), b.shl(slots, i64(24))), nchunks)
    e.store(b, "word", word)
    e.store(b, "gen", gen)
    wake, work = e.block(b, "wake"), e.block(b, "work")
    b.cbranch(b.icmp_unsigned(">", e.load(b, "sleepers"), i32(0)), wake, work)
    b.position_at_end(wake)
    e.futex(b, "gen", FUTEX_WAKE_PRIVATE, slots)
    b.branch(work)

    b.position_at_end(work)
    _run_claimed(e, b, claim, gen)
    # every chunk is claimed: wait for those a worker runs (spin, then sleep on `done`)
    start = b.call(e.cycles, [])
    target_done = b.trunc(nchunks, I32)
    check, pause, sleep, wait, finished = (e.block(b, n) for n in (
        "join", "join.pause", "join.sleep", "join.wait", "finished"))
    b.branch(check)
    b.position_at_end(check)
    d = e.load(b, "done", "acquire")
    b.cbranch(b.icmp_unsigned("==", d, target_done), finished, pause)
    b.position_at_end(pause)
    e.pause(b)
    spun = b.icmp_unsigned(">", b.sub(b.call(e.cycles, []), start), i64(WAIT_SPIN_CYCLES))
    b.cbranch(spun, sleep, check)
    b.position_at_end(sleep)
    e.store(b, "waiting", i32(1))
    d2 = e.load(b, "done")
    b.cbranch(b.icmp_unsigned("==", d2, target_done), finished, wait)
    b.position_at_end(wait)
    e.futex(b, "done", FUTEX_WAIT_PRIVATE, b.zext(d2, I64))
    b.branch(sleep)

    b.position_at_end(finished)
    e.store(b, "waiting", i32(0))
    e.store(b, "lock", i32(0), "release")
    b.ret_void()
    return f


def _info(e: _Emitter) -> ir.Function:
    """i64 tj_pool_info(): the workers started in this process (for tests)."""
    f = ir.Function(e.m, ir.FunctionType(I64, []), "tj_pool_info")
    b = ir.IRBuilder(f.append_basic_block("entry"))
    started = b.icmp_unsigned("==", e.load(b, "pid", "monotonic"), b.call(e.getpid, []))
    b.ret(b.select(started, b.sext(e.load(b, "nworkers", "monotonic"), I64), i64(0)))
    return f


def pool_ir() -> str:
    """The pool module's LLVM IR."""
    e = _Emitter()
    claim = _claim(e)
    _parallel(e, claim, _worker(e, claim))
    _info(e)
    return str(e.m)


class _Pool:
    """The linked pool of this process. Never freed: worker threads run its code until exit."""

    def __init__(self):
        # Unoptimized IR and the fast code generator: ~15 ms instead of ~150 ms at -O2 for a
        # module whose loops are spin-waits and compare-and-swaps (paid once per process)
        target._init()
        with target.LLVM_LOCK:
            tm = llvm.Target.from_default_triple().create_target_machine(
                cpu=llvm.get_host_cpu_name(), opt=0, jit=True, codemodel="jitdefault")
            mod = llvm.parse_assembly(pool_ir())
            mod.triple = llvm.get_process_triple()
            mod.verify()
            obj = tm.emit_object(mod)   # (not counted in target.llvm_compiles: not a function's)
        with target.LLVM_LOCK:
            self._lljit = llvm.create_lljit_compiler(target.target_machine())
            builder = llvm.JITLibraryBuilder()
            builder.add_object_img(obj)
            builder.export_symbol(ENTRY)
            builder.export_symbol("tj_pool_info")
            self._tracker = builder.link(self._lljit, "tracejit.pool")
        self.address = self._tracker[ENTRY]
        self.workers = ctypes.CFUNCTYPE(ctypes.c_int64)(self._tracker["tj_pool_info"])


_the_pool: _Pool | None = None
_build_lock = threading.Lock()


def _after_fork_in_child():
    # a child forked while another thread was building the pool would wait on that thread's
    # lock forever; a pool already built works in the child (its lock word notices the fork)
    global _build_lock
    _build_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _build() -> _Pool:
    """The process's pool (one, however many threads link code at the same moment)."""
    global _the_pool
    with _build_lock:
        if _the_pool is None:
            pool = _Pool()
            # worker threads may be inside the pool's code at interpreter exit, after module
            # globals are cleared: a reference never dropped keeps the code mapped until the end
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(pool))
            _the_pool = pool
        return _the_pool


def available() -> bool:
    """Whether kernels run on the pool: a supported platform and TRACEJIT_NO_OPENMP unset."""
    return supported() and not settings.no_openmp()


def symbols(objects=()) -> dict:
    """{name: address} of the pool's entry for linking the object files `objects`, if they
    refer to it (the pool is built then, once per process); else nothing."""
    if not available() or not any(ENTRY.encode() in obj for obj in objects):
        return {}
    return {ENTRY: _build().address}


def workers_started() -> int:
    """Worker threads this process has started (0 before the first parallel call)."""
    return _build().workers() if available() else 0

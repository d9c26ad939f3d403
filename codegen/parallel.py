"""Running a kernel on several threads: OpenMP's runtime (libgomp) when the process can load it.

`GOMP_parallel(fn, data, nthreads, 0)` runs `fn(data)` on a team of threads (the caller included)
and joins them; a fork/join costs about 1.5 us here, so only kernels with enough work go parallel
(see `PARALLEL_MIN_NS`). Without libgomp every kernel runs on the calling thread.
"""
from __future__ import annotations

import functools
import os

import llvmlite.binding as llvm
import llvmlite.ir as ir

from . import settings
from .loops import I32, I64, PTR, VOID, i32, i64

# A kernel goes parallel when its estimated single-thread time (schedule.Group.cost_ns) reaches
# this: a fork/join costs ~1.5 us on an idle machine and far more when the other core is busy, so
# only kernels that run for tens of microseconds are worth splitting.
PARALLEL_MIN_NS = 30_000


@functools.lru_cache(maxsize=None)
def gomp_available() -> bool:
    if settings.no_openmp():
        return False
    for name in ("libgomp.so.1", "libgomp.so"):
        try:
            llvm.load_library_permanently(name)
            return True
        except RuntimeError:
            continue
    return False


# Run-time cap on the threads of every call (tracejit.set_num_threads); None: no cap beyond what
# each function was compiled for.
thread_limit: int | None = None


def default_threads() -> int:
    n = settings.num_threads()
    if n is not None:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _declare(module, name, ret, args):
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, args), name)
    return fn


def emit_call(module: ir.Module, b: ir.IRBuilder, kfn: ir.Function, args, nthreads, parallel: bool):
    """Call kernel `kfn(*args, tid, nthreads)`: on a thread team when `parallel` and the run-time
    `nthreads` (i64) is above 1, else directly with (0, 1)."""
    if not parallel or not gomp_available():
        b.call(kfn, list(args) + [i64(0), i64(1)])
        return
    # trampoline: void kfn.omp(ptr ctx) { kfn(ctx[0], ..., ctx[k-1], thread_num, num_threads) }
    tname = f"{kfn.name}.omp"
    tramp = module.globals.get(tname)
    if tramp is None:
        tramp = ir.Function(module, ir.FunctionType(VOID, [PTR]), tname)
        tramp.linkage = "internal"
        tb = ir.IRBuilder(tramp.append_basic_block("entry"))
        ctx = tramp.args[0]
        loaded = [tb.load(tb.gep(ctx, [i64(k)], source_etype=PTR), typ=PTR) for k in range(len(args))]
        tnum = tb.call(_declare(module, "omp_get_thread_num", I32, []), [])
        tcount = tb.call(_declare(module, "omp_get_num_threads", I32, []), [])
        tb.call(kfn, loaded + [tb.sext(tnum, I64), tb.sext(tcount, I64)])
        tb.ret_void()
    fn = b.block.function
    par = fn.append_basic_block(f"{kfn.name}.parallel")
    seq = fn.append_basic_block(f"{kfn.name}.serial")
    done = fn.append_basic_block(f"{kfn.name}.done")
    with b.goto_entry_block():
        ctx = b.alloca(PTR, size=len(args), name=f"{kfn.name}.ctx")
    b.cbranch(b.icmp_signed(">", nthreads, i64(1)), par, seq)
    b.position_at_end(par)
    for k, a in enumerate(args):
        b.store(a, b.gep(ctx, [i64(k)], source_etype=PTR))
    gomp = _declare(module, "GOMP_parallel", VOID, [PTR, PTR, I32, I32])
    b.call(gomp, [tramp, ctx, b.trunc(nthreads, I32), i32(0)])
    b.branch(done)
    b.position_at_end(seq)
    b.call(kfn, list(args) + [i64(0), i64(1)])
    b.branch(done)
    b.position_at_end(done)

"""Running a kernel on several threads: tracejit's own thread pool (codegen/threadpool.py).

A parallel kernel `kfn(args..., tid, nthreads)` is called through `tj_parallel` with a trampoline
that runs one chunk: `kfn(args..., chunk, nchunks)`, so a kernel's share of the work
(toolkit.thread_range) is its chunk's, and there are more chunks than threads (claimed
dynamically, the caller included). Per-thread scratch is indexed by the executing thread's slot,
not by chunk: the trampoline passes the kernel `scratch + slot * scratch_stride`, so a loop-nest
kernel's `scratch` argument is its own region (see kernels/__init__.py). A fork/join costs about
a microsecond or two, so only kernels with enough work go parallel (see `PARALLEL_MIN_NS`).
Without the pool (TRACEJIT_NO_OPENMP) every kernel runs on the calling thread.
"""
from __future__ import annotations

import os

import llvmlite.ir as ir

from . import settings, threadpool
from .loops import I64, PTR, VOID, i64

# A kernel goes parallel when its estimated single-thread time (schedule.Group.cost_ns, in real
# nanoseconds on the target: see the cost models in codegen/kernels) reaches this. Break-even
# measured on the 2-core AVX-512 Xeon (every kernel of LeNet-5's gradient forced onto the pool in 2
# chunks, 1 vs 2 threads, TRACEJIT_PROFILE cycles, minima): flop-bound kernels gain from ~7 us of
# single-thread time (matmuls of 7-9 us: 1.25x; convolutions of 24-59 us: 1.2-1.7x) and lose
# below ~6 us (0.7x); pooling loses at 5 us (0.65x) and, beside a busy process, still at 20 us;
# fused loops and reductions under 2 us always lose (the dispatch alone is 0.2-0.4 us with the
# workers spinning, microseconds when they sleep or the other core is busy). The threshold sits
# well above the idle break-even so that a busy machine's slower fork/join does not make the
# pool a loss. 20 us, not 30 (Zen 3, 2 threads, LeNet-5's gradient, TRACEJIT_PROFILE minima over
# alternating windows): its backward fc products of 15-19 us on one thread take 10-12 us, fc2's
# forward 20 -> 14 us in two chunks (threadpool.chunk_limit: more chunks made it slower, 21 us),
# and the pool's workers still spin when the next parallel kernel comes (fc1's input gradient
# 33 -> 26 us): 770 -> 749 us a call.
PARALLEL_MIN_NS = 20_000


def threads_available() -> bool:
    """Whether parallel kernels run on the thread pool (else on the calling thread only)."""
    return threadpool.available()



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


def emit_call(module: ir.Module, b: ir.IRBuilder, kfn: ir.Function, args, nthreads, parallel: bool,
              cost_ns: float = 0.0, scratch_stride: int = 0, most_chunks: int | None = None):
    """Call kernel `kfn(*args, tid, nthreads)`: split into chunks on the thread pool when
    `parallel` and the run-time `nthreads` (i64) is above 1, else directly with (0, 1).
    `cost_ns` (the estimated single-thread time) bounds the chunk count
    (threadpool.chunk_limit), and `most_chunks` (the kernel's own limit, kernels.Kernel) when
    given; `scratch_stride` > 0: the last argument is scratch holding one region of that many
    bytes per thread, and each executing thread gets its own."""
    if not parallel or not threads_available():
        b.call(kfn, list(args) + [i64(0), i64(1)])
        return
    # trampoline: void kfn.chunk(ptr ctx, i64 chunk, i64 nchunks, i64 slot)
    #   { kfn(ctx[0], ..., ctx[k-1] [+ slot * stride], chunk, nchunks) }
    tname = f"{kfn.name}.chunk"
    tramp = module.globals.get(tname)
    if tramp is None:
        tramp = ir.Function(module, ir.FunctionType(VOID, [PTR, I64, I64, I64]), tname)
        tramp.linkage = "internal"
        tb = ir.IRBuilder(tramp.append_basic_block("entry"))
        ctx, chunk, nchunks, slot = tramp.args
        loaded = [tb.load(tb.gep(ctx, [i64(k)], source_etype=PTR), typ=PTR) for k in range(len(args))]
        if scratch_stride:
            loaded[-1] = tb.gep(loaded[-1], [tb.mul(slot, i64(scratch_stride))],
                                source_etype=ir.IntType(8), name="scratch.own")
        tb.call(kfn, loaded + [chunk, nchunks])
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
    entry = module.globals.get(threadpool.ENTRY)
    if entry is None:
        entry = ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, I64, I64]), threadpool.ENTRY)
    chunks = threadpool.chunk_limit(cost_ns)
    if most_chunks is not None:
        chunks = max(1, min(chunks, most_chunks))
    b.call(entry, [tramp, ctx, nthreads, i64(chunks)])
    b.branch(done)
    b.position_at_end(seq)
    b.call(kfn, list(args) + [i64(0), i64(1)])
    b.branch(done)
    b.position_at_end(done)

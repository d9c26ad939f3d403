"""The machine's FP32 peak, measured with a generated FMA-throughput kernel.

    python benchmarks/peak.py            # prints single-thread and all-core GFLOP/s

The kernel is LLVM IR built with llvmlite and compiled through tracejit's own target
(`codegen.target.JITModule`, the same target machine and pipeline as the generated gradients):

    void fma_peak(i64 iters, float m, float c, ptr out)

keeps `ACCUMULATORS` independent `<16 x float>` accumulators (`<8 x float>` without AVX-512) and
does `acc = llvm.fma(acc, m, c)` on each of them `iters` times, then stores their sum to `out` so the
loop is not dead. Independent accumulators hide the FMA latency (about 4 cycles with two FMA units
needs at least 8 in flight); `m` and `c` are arguments so nothing is constant-folded.

Flops counted: iters * ACCUMULATORS * lanes * 2 (an FMA is a multiply and an add).

All-core peak: `threads` Python threads call the kernel at once through ctypes (a ctypes call releases
the GIL, so the calls run in parallel); the time is from a barrier release to the last thread's end.
Each figure is the best of many short runs (5 ms each, 60 runs): the peak is an upper bound and other
processes only make runs slower, and on a shared machine a short run is far more likely than a long
one to have its cores to itself.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ACCUMULATORS = 10


def _build_ir(lanes: int, accumulators: int = ACCUMULATORS) -> str:
    import llvmlite.ir as ir

    f32 = ir.FloatType()
    i64 = ir.IntType(64)
    vty = ir.VectorType(f32, lanes)
    mod = ir.Module(name="fma_peak")
    fma = ir.Function(mod, ir.FunctionType(vty, [vty, vty, vty]), f"llvm.fma.v{lanes}f32")
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i64, f32, f32, ir.PointerType()]),
                     "fma_peak")
    iters, m, c, out = fn.args
    entry = fn.append_basic_block("entry")
    loop = fn.append_basic_block("loop")
    done = fn.append_basic_block("done")
    b = ir.IRBuilder(entry)

    def splat(x):
        undef = ir.Constant(vty, ir.Undefined)
        v = b.insert_element(undef, x, ir.Constant(ir.IntType(32), 0))
        return b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                                                      [0] * lanes))

    vm, vc = splat(m), splat(c)
    # different starting values so no two accumulators are provably equal
    inits = [ir.Constant(vty, [float(k + 1) / (lanes * (a + 1))
                               for k in range(lanes)]) for a in range(accumulators)]
    b.cbranch(b.icmp_signed(">", iters, ir.Constant(i64, 0)), loop, done)

    b.position_at_end(loop)
    i = b.phi(i64, name="i")
    i.add_incoming(ir.Constant(i64, 0), entry)
    accs = []
    for a in range(accumulators):
        p = b.phi(vty, name=f"acc{a}")
        p.add_incoming(inits[a], entry)
        accs.append(p)
    new = [b.call(fma, [acc, vm, vc], name=f"acc{a}.next") for a, acc in enumerate(accs)]
    nxt = b.add(i, ir.Constant(i64, 1), name="i.next")
    i.add_incoming(nxt, loop)
    for p, n in zip(accs, new):
        p.add_incoming(n, loop)
    b.cbranch(b.icmp_signed("<", nxt, iters), loop, done)

    b.position_at_end(done)
    results = []
    for a in range(accumulators):
        r = b.phi(vty, name=f"res{a}")
        r.add_incoming(inits[a], entry)
        r.add_incoming(new[a], loop)
        results.append(r)
    total = results[0]
    for r in results[1:]:
        total = b.fadd(total, r)
    b.store(total, out, align=4)
    b.ret_void()
    return str(mod)


class FMAKernel:
    def __init__(self, accumulators: int = ACCUMULATORS):
        from tracejit.codegen.target import JITModule, cfunc, vector_width

        self.lanes = vector_width(32)
        self.accumulators = accumulators
        self._jit = JITModule(_build_ir(self.lanes, accumulators), ["fma_peak"])
        self._fn = cfunc(self._jit.addresses["fma_peak"],
                         [ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_void_p])

    def flops(self, iters: int) -> int:
        return iters * self.accumulators * self.lanes * 2

    def __call__(self, iters: int):
        out = (ctypes.c_float * self.lanes)()
        self._fn(iters, 0.999999, 1e-7, ctypes.addressof(out))
        return out


def _run_threads(kernel: FMAKernel, iters: int, threads: int) -> float:
    """Seconds from releasing `threads` threads to the last one finishing `iters` iterations."""
    if threads == 1:
        t0 = time.perf_counter()
        kernel(iters)
        return time.perf_counter() - t0
    barrier = threading.Barrier(threads + 1)
    ends = [0.0] * threads

    def work(k):
        barrier.wait()
        kernel(iters)
        ends[k] = time.perf_counter()

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return max(ends) - t0


def measure(threads: int | None = None, seconds: float = 0.005, repeats: int = 60,
            accumulators: int = ACCUMULATORS) -> dict:
    """{"threads": n, "single": GFLOP/s on one thread, "all": GFLOP/s on n threads, ...}.
    Each run takes about `seconds`; best of `repeats` runs."""
    threads = threads or _default_threads()
    kernel = FMAKernel(accumulators)
    kernel(1000)  # page in the code
    # calibrate the iteration count to `seconds` on one thread
    iters = 100_000
    while True:
        dt = _run_threads(kernel, iters, 1)
        if dt > 0.02:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / dt))
    result = {"threads": threads, "lanes": kernel.lanes, "accumulators": kernel.accumulators,
              "iters": iters}
    for key, n in (("single", 1), ("all", threads)):
        best = min(_run_threads(kernel, iters, n) for _ in range(repeats))
        result[key] = kernel.flops(iters) * n / best / 1e9
    return result


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for the all-core figure")
    ap.add_argument("--accumulators", type=int, default=ACCUMULATORS)
    args = ap.parse_args(argv)
    r = measure(args.threads, accumulators=args.accumulators)
    print(f"FP32 FMA peak ({r['accumulators']} x <{r['lanes']} x float> accumulators): "
          f"{r['single']:.1f} GFLOP/s on 1 thread, {r['all']:.1f} GFLOP/s on {r['threads']} threads")


if __name__ == "__main__":
    main()

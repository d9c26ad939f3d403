"""Where a workload's time goes, kernel by kernel.

    python benchmarks/kernel_profile.py lenet [--threads 2] [--seconds 2] [--top 25]

Compiles the workload (benchmarks/workloads.py; a training workload such as `mlp-adam`, or a
point of a scaling series such as `mlp-depth:32` (benchmarks/scaling.py) too) with
TRACEJIT_PROFILE=1, which makes the entry read the time-stamp counter around every kernel call,
runs it for `--seconds`, and prints each kernel's time per call (the counter's rate calibrated
against a sleep), its share, and what it computes. The counters cost a few nanoseconds per kernel, so the
total is the ordinary time per call within noise. A kernel run on the thread pool counts from the
caller's dispatch to the last chunk's end.

    python benchmarks/kernel_profile.py lenet-batch:16 --calibrate [--chunks 2] [--seconds 3]

`--calibrate` checks the cost models that decide which kernels run on the thread pool
(codegen/kernels, schedule.Group.cost_ns, parallel.PARALLEL_MIN_NS): it compiles with every kernel
forced onto the pool in `--chunks` chunks, alternates windows of 20 calls on 1 and on 2 threads,
and prints per kernel the estimate, the fastest window's time per call on 1 and on 2 threads and
their ratio (> 1: the pool wins). The workload may be a scaling point (benchmarks/scaling.py), e.g.
`lenet-batch:16` or `conv-size:32`. On a busy machine the 2-thread times are the first to suffer.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def describe(g) -> str:
    """A kernel's primitive (and its fused members) with the root's type."""
    root = g.root
    label = root.prim.name
    if g.kind == "loop":
        prims = [i.prim.name for i in g.members if i.prim.name != root.prim.name]
        if prims:
            label += " + " + ",".join(sorted(set(prims)))[:60]
    if getattr(g, "epilogue", None) is not None:
        label += " (+epilogue)"
    return f"{g.kind:7s} {label}  {root.out.type}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--calibrate", action="store_true",
                    help="every kernel on the pool; 1- vs 2-thread time per kernel")
    ap.add_argument("--chunks", type=int, default=2, help="chunks per kernel with --calibrate")
    args = ap.parse_args(argv)
    if args.calibrate:
        return calibrate(args)
    os.environ["TRACEJIT_PROFILE"] = "1"
    os.environ["TRACEJIT_CACHE"] = "0"
    import systems
    systems.import_system("tracejit", args.threads)
    bench = _build(systems, args.workload)
    bench.step()
    jitted = getattr(bench.fn, "_jitted", bench.fn)   # a training step holds its jitted function
    natives = [e._native for e in jitted._cache.values() if getattr(e, "_native", None)]
    for n in natives:
        n.profile(reset=True)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds or calls < 3:
        bench.step()
        calls += 1
    wall = time.perf_counter() - t0
    rows = [row for n in natives for row in n.profile()]
    total_cycles = sum(c for _, _, c in rows)
    rate = _tsc_rate()
    print(f"{args.workload}: {calls} calls, {wall / calls * 1e3:.3f} ms per call (wall), "
          f"kernels {total_cycles / rate / calls * 1e3:.3f} ms per call; "
          f"{len(rows)} kernels, {args.threads} threads")
    print(f"{'ms/call':>8} {'share':>6}  kernel")
    for g, n_calls, cycles in sorted(rows, key=lambda r: -r[2])[:args.top]:
        ms = cycles / rate / calls * 1e3
        print(f"{ms:8.3f} {cycles / max(total_cycles, 1):6.1%}  k{g.index} {describe(g)}")


def _build(systems, workload: str):
    """tracejit's bench of a workload (`lenet`, `mlp-adam`) or of a scaling point (`mlp-depth:32`,
    `lenet-batch:1`: benchmarks/scaling.py's series)."""
    if ":" in workload:
        from workloads import make_scaled
        series, point = workload.split(":")
        return systems.build_model("tracejit", *make_scaled(series, int(point)))
    return systems.build("tracejit", workload)


def calibrate(args):
    """See the module's doc: estimate, 1- and 2-thread ns per call of every kernel."""
    os.environ["TRACEJIT_PROFILE"] = "1"
    os.environ["TRACEJIT_CACHE"] = "0"
    import systems
    from tracejit.codegen import parallel, threadpool
    systems.import_system("tracejit", 2)
    import tracejit
    parallel.PARALLEL_MIN_NS = 0
    threadpool.chunk_limit = lambda cost_ns: args.chunks
    bench = _build(systems, args.workload)
    bench.step()
    jitted = getattr(bench.fn, "_jitted", bench.fn)
    natives = [e._native for e in jitted._cache.values() if getattr(e, "_native", None)]
    per_ns = _tsc_rate() / 1e9
    best = {}
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        for threads in (1, 2):
            tracejit.set_num_threads(threads)
            for n in natives:
                n.profile(reset=True)
            for _ in range(20):
                bench.step()
            for k, n in enumerate(natives):
                for g, calls, cycles in n.profile():
                    row = best.setdefault((k, g.index), [g, math.inf, math.inf])
                    if calls:
                        row[threads] = min(row[threads], cycles / calls / per_ns)
    tracejit.set_num_threads(None)
    print(f"{args.workload}: every kernel on the pool in {args.chunks} chunks; ns per call, "
          f"fastest window; parallel threshold {parallel.PARALLEL_MIN_NS} ns estimated")
    print(f"{'estimate':>10} {'1 thread':>10} {'2 threads':>10} {'1/2':>5}  kernel")
    for g, one, two in sorted(best.values(), key=lambda r: -r[1]):
        print(f"{g.cost_ns:10.0f} {one:10.0f} {two:10.0f} {one / two:5.2f}  k{g.index} "
              f"{describe(g)}")


def _tsc_rate() -> float:
    """Time-stamp counter ticks per second, measured over 0.2 s."""
    import ctypes

    from tracejit.codegen.target import JITModule, cfunc
    src = """define i64 @tsc() {
  %t = call i64 @llvm.readcyclecounter()
  ret i64 %t
}
declare i64 @llvm.readcyclecounter()
"""
    jit = JITModule(src, ["tsc"])
    tsc = cfunc(jit.addresses["tsc"], [], restype=ctypes.c_int64)
    a, t0 = tsc(), time.perf_counter()
    time.sleep(0.2)
    b, t1 = tsc(), time.perf_counter()
    return (b - a) / (t1 - t0)


if __name__ == "__main__":
    main()

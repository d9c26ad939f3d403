"""Where a workload's time goes, kernel by kernel.

    python benchmarks/kernel_profile.py lenet [--threads 2] [--seconds 2] [--top 25]

Compiles the workload (benchmarks/workloads.py; a training workload such as `mlp-adam` too) with
TRACEJIT_PROFILE=1, which makes the entry read the time-stamp counter around every kernel call,
runs it for `--seconds`, and prints each kernel's time per call (the counter's rate calibrated
against a sleep), its share, and what it computes. The counters cost a few nanoseconds per kernel, so the
total is the ordinary time per call within noise. A kernel run on the thread pool counts from the
caller's dispatch to the last chunk's end.
"""
from __future__ import annotations

import argparse
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
    args = ap.parse_args(argv)
    os.environ["TRACEJIT_PROFILE"] = "1"
    os.environ["TRACEJIT_CACHE"] = "0"
    import systems
    systems.import_system("tracejit", args.threads)
    bench = systems.build("tracejit", args.workload)
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

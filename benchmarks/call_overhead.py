"""Python overhead of one gradient call as the parameter pytree grows.

    python benchmarks/call_overhead.py            # leaves 1, 10, 20, 100
    python benchmarks/call_overhead.py --quick

The workload is `jit_grad` of the sum of squares of every leaf of a dict of 3-element float32
arrays, so the native kernel does almost nothing and the call's Python dominates. For each size it
measures, interleaved in rounds within one run (CPU time of the calling thread, time.thread_time,
so a loaded machine inflates it less than wall time):

- `call`: an ordinary call (the pytree fast path: a cached plan keyed by the tree's structure,
  shapes and dtypes);
- `signature`: the same call forced down the full Signature path (`Jitted._fast_trees = False`),
  which is what every pytree call cost before the fast path existed;
- `kernel`: the native function alone, called on the prepared tuple of arrays (allocating its
  outputs included): what no Python front end can avoid;
- `overhead` = call - kernel, the figure the fast path is meant to keep under 5 us up to 20 leaves;
- `tiny`: the gradient of one 3-element array passed as a plain array (the positional fast path,
  the cheapest call there is) as the reference measured in the same run.
Medians over rounds; the spread is the range of the round medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tracejit  # noqa: E402
from tracejit.api import Jitted  # noqa: E402


def sum_of_squares(params):
    total = 0.0
    for v in params.values():
        total = total + (v * v).sum()
    return total


def per_call(fn, calls):
    """CPU seconds of the calling thread per call of fn() over `calls` calls."""
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls


def measure(n_leaves, rounds, calls):
    params = {f"w{i}": np.full(3, 0.5 + i, np.float32) for i in range(n_leaves)}
    f = tracejit.jit_grad(sum_of_squares)
    f(params)
    native = next(iter(f._cache.values())).native()
    arrays = tuple(params.values())

    def forced_signature():
        Jitted._fast_trees = False
        try:
            return f(params)
        finally:
            Jitted._fast_trees = True

    tiny = tracejit.jit_grad(lambda x: (x * x).sum())
    x = np.ones(3, np.float32)
    tiny(x)
    runs = {"call": lambda: f(params), "signature": forced_signature,
            "kernel": lambda: native(arrays), "tiny": lambda: tiny(x)}
    samples = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            samples[k].append(per_call(fn, calls) * 1e6)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--leaves", default="1,10,20,100")
    opts = ap.parse_args()
    rounds, calls = (5, 500) if opts.quick else (15, 2000)
    print(f"us per call (CPU time of the calling thread), median of {rounds} rounds of {calls} "
          f"calls [min-max of the round medians]")
    header = f"{'leaves':>6} | {'call':>16} | {'signature':>18} | {'kernel':>8} | " \
             f"{'overhead':>8} | {'tiny':>6} | {'signature/call':>14}"
    print(header)
    print("-" * len(header))
    for n in [int(s) for s in opts.leaves.split(",")]:
        r = measure(n, rounds, calls)
        call, sig, kern, tiny = r["call"], r["signature"], r["kernel"], r["tiny"]
        print(f"{n:>6} | {call[0]:6.2f} [{call[1]:.1f}-{call[2]:.1f}] | "
              f"{sig[0]:7.2f} [{sig[1]:.1f}-{sig[2]:.1f}] | {kern[0]:8.2f} | "
              f"{call[0] - kern[0]:8.2f} | {tiny[0]:6.2f} | {sig[0] / call[0]:14.1f}")


if __name__ == "__main__":
    main()

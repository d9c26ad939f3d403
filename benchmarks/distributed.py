"""Data-parallel LeNet-5 training steps on Ray (tracejit.distributed.DataParallel).

    python benchmarks/distributed.py                  # about 1-2 minutes on 2 cores
    python benchmarks/distributed.py --steps 40 --json out.json

Measures, on a local Ray with one CPU per worker and TRACEJIT_NUM_THREADS=1 in each worker and
in the driver:
- a LeNet-5 step (SGD with momentum, float32, batch 256, one-hot labels; the model of
  benchmarks/workloads.py) on 1 and 2 workers, split into compute (the slowest worker's gradient
  call, timed inside the worker), all-reduce (the workers' ring reduce-scatter through the object
  store and the driver fetching the mean: `last_step_times["reduce"]`) and overhead (the rest:
  sending the parameters, Ray's task round trips, splitting the batch, the optimizer update);
- the same step as one single-threaded jit_train_step in this process, the baseline of the
  scaling efficiency T(1 process) / (N * T(N workers));
- communication alone: DataParallel steps of a loss whose gradient is its data (no compute to
  speak of) with 0, 1, 4, 16 MB of parameters; lines through the all-reduce times and through
  the parameter-sending times give their fixed costs and costs per MB, which docs/DISTRIBUTED.md's
  cost model takes as parameters.
Times are medians over the timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

# The driver runs single-threaded too: the 1-process baseline is one thread, and the driver's
# optimizer update must not spin OpenMP threads on the cores the workers compute on.
os.environ["TRACEJIT_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ray  # noqa: E402

import tracejit  # noqa: E402
from tracejit import optim  # noqa: E402
from tracejit.distributed import DataParallel  # noqa: E402
import workloads  # noqa: E402

BATCH = 256


lenet_loss = workloads.tracejit_lenet_loss


def lenet_problem():
    params, _ = workloads.make("lenet")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[rng.integers(0, 10, BATCH)]
    return params, x, onehot


def optimizer():
    return optim.sgd(0.01, momentum=0.9)


def single_process(steps: int) -> float:
    params, x, onehot = lenet_problem()
    opt = optimizer()
    state = opt.init(params)
    step = tracejit.jit_train_step(lenet_loss, opt)
    for _ in range(2):
        step(params, state, x, onehot)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(params, state, x, onehot)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def data_parallel(num_workers: int, steps: int, allreduce: str) -> dict:
    params, x, onehot = lenet_problem()
    opt = optimizer()
    state = opt.init(params)
    t0 = time.perf_counter()
    with DataParallel(lenet_loss, opt, num_workers, threads_per_worker=1,
                      allreduce=allreduce) as dp:
        started = time.perf_counter() - t0
        t0 = time.perf_counter()
        dp.step(params, state, x, onehot)   # compiles on every worker
        first = time.perf_counter() - t0
        dp.step(params, state, x, onehot)
        parts = {k: [] for k in ("total", "compute", "reduce", "update")}
        for _ in range(steps):
            dp.step(params, state, x, onehot)
            for k in parts:
                parts[k].append(dp.last_step_times[k])
        grad_bytes = dp._layout.nbytes
    out = {k: statistics.median(v) for k, v in parts.items()}
    out.update(start=started, first_step=first, grad_bytes=grad_bytes)
    return out


def echo_loss(p, x):
    """A loss whose gradient is its data (one multiply-add per parameter): a DataParallel step
    of it is all communication."""
    return tracejit.sum(p["g"] * x)


def allreduce(num_workers: int, sizes_mb, repeats: int, kind: str) -> dict:
    """{MB: (median seconds of the ring all-reduce, of sending the parameters)} of DataParallel
    steps of `echo_loss` with P MB of float32 parameters: "reduce" of `last_step_times` (the
    workers' ring and the driver fetching the mean) and "wait" - "compute" (putting the
    parameters, which change every step, and the workers' round trip)."""
    out = {}
    for mb in sizes_mb:
        n = max(16, int(mb * 2**20) // 4)
        rng = np.random.default_rng(0)
        params = {"g": rng.standard_normal(n).astype(np.float32)}
        x = rng.standard_normal((num_workers, n)).astype(np.float32)
        opt = optim.sgd(1e-6)   # the parameters change every step, so they are sent every step
        state = opt.init(params)
        reduce, send = [], []
        with DataParallel(echo_loss, opt, num_workers, threads_per_worker=1,
                          allreduce=kind) as dp:
            for r in range(repeats + 2):
                dp.step(params, state, x)
                t = dp.last_step_times
                if r >= 2:
                    reduce.append(t["reduce"])
                    send.append(t["wait"] - t["compute"])
        out[mb] = (statistics.median(reduce), statistics.median(send))
    return out


def fit_line(points: dict):
    """(intercept seconds, seconds per MB) of a least-squares line through {MB: seconds}."""
    xs, ys = np.array(list(points)), np.array(list(points.values()))
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(intercept), float(slope)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--allreduce", choices=("ring", "tree"), default="ring",
                    help="DataParallel's all-reduce (on 2 workers both take one round)")
    args = ap.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"LeNet-5, batch {BATCH}, float32, SGD momentum; 1 thread per worker")
    base = single_process(args.steps)
    print(f"single process, 1 thread (jit_train_step): {base * 1e3:8.2f} ms/step")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [ROOT, os.path.join(ROOT, "benchmarks"), os.environ.get("PYTHONPATH", "")])}})
    try:
        sizes = [0.0, 1.0, 4.0, 16.0]
        ar = {n: allreduce(n, sizes, max(3, args.steps // 4), args.allreduce) for n in (1, 2)}
        fits = {n: fit_line({mb: v[0] for mb, v in ar[n].items()}) for n in ar}
        send_fits = {n: fit_line({mb: v[1] for mb, v in ar[n].items()}) for n in ar}
        for n in ar:
            pts = ", ".join(f"{mb:g} MB {r * 1e3:.2f}/{s * 1e3:.2f} ms"
                            for mb, (r, s) in ar[n].items())
            print(f"communication alone, {n} worker(s), all-reduce/params sent: {pts}\n"
                  f"    all-reduce {fits[n][0] * 1e3:.2f} ms + {fits[n][1] * 1e3:.2f} ms/MB, "
                  f"params {send_fits[n][0] * 1e3:.2f} ms + {send_fits[n][1] * 1e3:.2f} ms/MB")
        runs = {n: data_parallel(n, args.steps, args.allreduce) for n in (1, 2)}
    finally:
        ray.shutdown()

    print(f"\n{'workers':>7} {'step ms':>8} {'compute':>8} {'allred.':>8} {'overhead':>8} "
          f"{'efficiency':>10}   (start s, first step s)")
    table = {}
    for n, r in runs.items():
        allred = r["reduce"]
        overhead = r["total"] - r["compute"] - allred
        eff = base / (n * r["total"])
        table[n] = dict(r, allreduce=allred, overhead=overhead, efficiency=eff)
        print(f"{n:>7} {r['total'] * 1e3:8.2f} {r['compute'] * 1e3:8.2f} {allred * 1e3:8.2f} "
              f"{overhead * 1e3:8.2f} {eff:10.2f}   ({r['start']:.1f}, {r['first_step']:.1f})")
    mb = runs[1]["grad_bytes"] / 2**20
    print(f"\ngradient buffer: {runs[1]['grad_bytes']} bytes ({mb:.3f} MB); all-reduce cost per "
          f"MB: {fits[1][1] * 1e3:.2f} ms (1 worker), {fits[2][1] * 1e3:.2f} ms (2 workers); "
          f"fixed: {fits[1][0] * 1e3:.2f} ms, {fits[2][0] * 1e3:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"single_process": base, "allreduce": {str(n): {str(k): v for k, v in
                                                                    ar[n].items()} for n in ar},
                       "allreduce_fit": {str(n): fits[n] for n in fits},
                       "params_send_fit": {str(n): send_fits[n] for n in send_fits},
                       "steps": {str(n): table[n] for n in table}}, f, indent=1)


if __name__ == "__main__":
    main()

"""Second-order benchmarks: Hessian-vector products and a full Hessian, tracejit vs torch.func and
jax, each system in its own process, medians of many calls.

    python benchmarks/hessian.py            # every system that is installed
    python benchmarks/hessian.py --quick

Workloads (float32, the same arrays for every system):
- `hvp`: H v of the MLP loss (x[64,784] -> linear 256 -> tanh -> linear 10 -> mean squared error)
  w.r.t. all its parameters, along a random direction v: tracejit `jit_jvp` of `jit_grad` compiled
  in one function; torch.func.jvp of torch.func.grad; jax.jit of jax.jvp of jax.grad.
- `hessian`: the full 100 x 100 Hessian of a small model's loss w.r.t. its parameter vector
  (x[32,8] -> linear 10 (tanh) -> linear 1 -> mean squared error, 80 + 10 + 10 parameters):
  tracejit.hessian (forward over reverse, one native function); torch.func.hessian (jacfwd of
  jacrev, vmapped); jax.jit(jax.hessian).
A peer that is not installed is reported as such. Ratios are peer time / tracejit time (above 1:
tracejit faster) within one run of this script.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this script's folder is sys.path[0]: its profile.py would shadow the standard library's
# `profile`, which torch imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(ROOT, "benchmarks")]
SYSTEMS = ("tracejit", "torch", "jax")
WORKLOADS = ("hvp", "hessian")


def data(workload):
    rng = np.random.default_rng(0)
    f32 = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    if workload == "hvp":
        params = {"w1": f32(784, 256), "b1": f32(256), "w2": f32(256, 10), "b2": f32(10)}
        v = {k: f32(*p.shape) for k, p in params.items()}
        return params, v, f32(64, 784), f32(64, 10)
    return f32(100), None, f32(32, 8), f32(32, 1)


def _time(call, seconds):
    for _ in range(3):
        call()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 11:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), call()


def run_tracejit(workload, threads, seconds):
    os.environ["TRACEJIT_NUM_THREADS"] = str(threads)
    sys.path.insert(0, ROOT)
    import tracejit as tj
    params, v, x, t = data(workload)
    if workload == "hvp":
        def loss(p, x, t):
            h = tj.tanh(x @ p["w1"] + p["b1"])
            return ((h @ p["w2"] + p["b2"] - t) ** 2).mean()
        grad = tj.jit_grad(loss)
        hvp = tj.jit(lambda p, v, x, t: tj.jit_jvp(lambda q: grad(q, x, t))((p,), (v,))[1])
        seconds_, out = _time(lambda: hvp(params, v, x, t), seconds)
        return seconds_, {k: np.asarray(a) for k, a in out.items()}

    def loss(theta, x, t):
        w1, b1, w2 = theta[:80].reshape(8, 10), theta[80:90], theta[90:].reshape(10, 1)
        return ((tj.tanh(x @ w1 + b1) @ w2 - t) ** 2).mean()
    hess = tj.hessian(loss)
    seconds_, out = _time(lambda: hess(params, x, t), seconds)
    return seconds_, {"H": np.asarray(out)}


def run_torch(workload, threads, seconds):
    import torch
    from torch.func import grad, hessian, jvp
    torch.set_num_threads(threads)
    params, v, x, t = data(workload)
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    x, t = T(x), T(t)
    if workload == "hvp":
        p = {k: T(a) for k, a in params.items()}
        vv = {k: T(a) for k, a in v.items()}

        def loss(p):
            h = torch.tanh(x @ p["w1"] + p["b1"])
            return ((h @ p["w2"] + p["b2"] - t) ** 2).mean()
        call = lambda: jvp(grad(loss), (p,), (vv,))[1]  # noqa: E731
        seconds_, out = _time(call, seconds)
        return seconds_, {k: a.numpy() for k, a in out.items()}

    def loss(theta):
        w1, b1, w2 = theta[:80].reshape(8, 10), theta[80:90], theta[90:].reshape(10, 1)
        return ((torch.tanh(x @ w1 + b1) @ w2 - t) ** 2).mean()
    theta = T(params)
    seconds_, out = _time(lambda: hessian(loss)(theta), seconds)
    return seconds_, {"H": out.numpy()}


def run_jax(workload, threads, seconds):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if threads == 1:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import jax
    import jax.numpy as jnp
    params, v, x, t = data(workload)
    if workload == "hvp":
        def loss(p, x, t):
            h = jnp.tanh(x @ p["w1"] + p["b1"])
            return ((h @ p["w2"] + p["b2"] - t) ** 2).mean()
        hvp = jax.jit(lambda p, v, x, t: jax.jvp(lambda q: jax.grad(loss)(q, x, t), (p,), (v,))[1])
        p = {k: jnp.asarray(a) for k, a in params.items()}
        vv = {k: jnp.asarray(a) for k, a in v.items()}
        xj, tj_ = jnp.asarray(x), jnp.asarray(t)
        seconds_, out = _time(lambda: jax.block_until_ready(hvp(p, vv, xj, tj_)), seconds)
        return seconds_, {k: np.asarray(a) for k, a in out.items()}

    def loss(theta, x, t):
        w1, b1, w2 = theta[:80].reshape(8, 10), theta[80:90], theta[90:].reshape(10, 1)
        return ((jnp.tanh(x @ w1 + b1) @ w2 - t) ** 2).mean()
    hess = jax.jit(jax.hessian(loss))
    args = [jnp.asarray(a) for a in (params, x, t)]
    seconds_, out = _time(lambda: jax.block_until_ready(hess(*args)), seconds)
    return seconds_, {"H": np.asarray(out)}


def worker(system, workload, threads, seconds):
    try:
        s, out = {"tracejit": run_tracejit, "torch": run_torch, "jax": run_jax}[system](
            workload, threads, seconds)
        np.savez(f"/tmp/hessian_bench_{system}_{workload}.npz", **out)
        print(json.dumps({"seconds": s}))
    except ImportError as e:
        print(json.dumps({"error": f"not installed ({e.name})"}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", nargs=2)
    a = ap.parse_args()
    seconds = 0.3 if a.quick else a.seconds
    if a.worker:
        return worker(*a.worker, a.threads, seconds)
    print(f"{os.cpu_count()} cores, {a.threads} threads per system; median per call")
    print(f"{'workload':10} {'system':9} {'median':>11} {'peer/tracejit':>14} {'max |diff|':>11}")
    for wl in WORKLOADS:
        res = {}
        for system in SYSTEMS:
            p = subprocess.run([sys.executable, __file__, "--worker", system, wl, "--threads",
                                str(a.threads), "--seconds", str(seconds)],
                               capture_output=True, text=True, timeout=900)
            try:
                res[system] = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                res[system] = {"error": (p.stderr.strip().splitlines() or ["crashed"])[-1]}
        base = res["tracejit"].get("seconds")
        ref = np.load(f"/tmp/hessian_bench_tracejit_{wl}.npz") if base else None
        for system in SYSTEMS:
            r = res[system]
            if "error" in r:
                print(f"{wl:10} {system:9} {r['error']}")
                continue
            out = np.load(f"/tmp/hessian_bench_{system}_{wl}.npz")
            diff = max(float(np.abs(out[k] - ref[k]).max()) for k in ref.files) if ref else np.nan
            ratio = f"{r['seconds'] / base:.2f}x" if base and system != "tracejit" else ""
            print(f"{wl:10} {system:9} {r['seconds'] * 1e6:9.1f}us {ratio:>14} {diff:11.1e}")


if __name__ == "__main__":
    main()

"""One system's measurements, in a process of its own (started by run.py; not meant to be run by hand).

    python benchmarks/worker.py time   --system S --workloads mlp,lenet --out DIR [--seconds T]
    python benchmarks/worker.py first  --system S --out DIR      # LeNet-5 first call (compile time)
    python benchmarks/worker.py memory --system S --out DIR      # LeNet-5 gradient memory

Results are appended as JSON lines to --log (default DIR/<system>.<mode>.jsonl) as they are made (a "start" line
before each workload, then its result), so run.py can tell which workload a crash happened in.
Gradients of the first call of each timed workload are saved to DIR/<system>.<workload>.npz for the
correctness check. A training workload (mlp-sgd, ...) is timed in windows alternating with its
model's gradient (time_paired); every timed record also carries the cores other processes used
(others_cores) and the hypervisor stole (steal_cores) meanwhile.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from machine import NOISY_CORES, cpu_snapshot, others_cores, parse_steal, steal_cores, \
    wait_idle  # noqa: E402,F401  (parse_steal: for the tests)
from workloads import TRAINING, split  # noqa: E402


class Out:
    def __init__(self, path):
        self.f = open(path, "a")

    def write(self, **rec):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def _error_text(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return " ".join(msg.split())[:400]


# ------------------------------------------------------------------------------------------ timing
def time_calls(step, seconds: float, warmup_seconds: float, min_samples: int, max_samples: int = 1000,
               min_sample_seconds: float = 2e-4):
    """Median seconds per call of `step` after a warm-up (at least 3 calls and `warmup_seconds`).
    Samples are taken until `seconds` have passed (at least `min_samples`, at most `max_samples`);
    calls shorter than `min_sample_seconds` are timed in batches (a sample is the mean of a batch)
    so the timer's resolution and overhead do not matter."""
    clock = time.perf_counter
    est, warm_calls = _warm(step, warmup_seconds, seconds)
    batch = max(1, math.ceil(min_sample_seconds / est))
    if seconds / (batch * est) > max_samples:
        batch = math.ceil(seconds / (max_samples * est))
    samples = []
    gc.collect()
    deadline = clock() + seconds
    while len(samples) < max_samples and (len(samples) < min_samples or clock() < deadline):
        t0 = clock()
        for _ in range(batch):
            step()
        samples.append((clock() - t0) / batch)
    rec = _stats(samples)
    rec.update(batch=batch, warmup_calls=warm_calls)
    return rec


# Paired step/gradient windows (training workloads): about PAIR_WINDOW seconds each, at least
# MIN_PAIRS pairs; a window takes at least MIN_WINDOW_SAMPLES samples (one: a call slower than a
# window, e.g. PyTorch's 2-thread LeNet-5 step beside another busy process, 0.23 s seen, then
# costs a call per window, not three; time_calls's 11 samples would have cost as much).
PAIR_WINDOW = 0.1
MIN_PAIRS = 3
MIN_WINDOW_SAMPLES = 1


def _warm(step, warmup_seconds: float, slow: float):
    """Warm-up calls (at least 3 and `warmup_seconds`, fewer seconds if a call takes over `slow`);
    the estimated seconds per call: the fastest warm-up call after the first (slower ones were
    disturbed or still warming up)."""
    clock = time.perf_counter
    warm = []
    t_stop = clock() + warmup_seconds
    while len(warm) < 3 or clock() < t_stop:
        t0 = clock()
        step()
        warm.append(clock() - t0)
        if len(warm) >= 3 and warm[-1] > slow:  # slow: do not spend long in warm-up
            break
    return max(min(warm[1:] or warm), 1e-8), len(warm)


def _window(step, batch: int, seconds: float, min_samples: int):
    """Seconds per call of `step`, one sample per batch of calls, for about `seconds`."""
    clock = time.perf_counter
    samples = []
    deadline = clock() + seconds
    while len(samples) < min_samples or clock() < deadline:
        t0 = clock()
        for _ in range(batch):
            step()
        samples.append((clock() - t0) / batch)
    return samples


def _stats(samples):
    samples = sorted(samples)
    return {"median": statistics.median(samples), "min": samples[0],
            "p25": samples[len(samples) // 4], "p75": samples[(3 * len(samples)) // 4],
            "samples": len(samples)}


def time_paired(step, grad, seconds: float, warmup_seconds: float,
                min_sample_seconds: float = 2e-4):
    """A training step and its model's gradient timed in alternating windows of about PAIR_WINDOW
    seconds (`seconds` in all, half each; which one goes first alternates from pair to pair), so a
    slow period of the machine that spans a pair slows both: the ratio of a pair's window medians
    (step / grad) is what the step costs over the gradient, and the median over pairs is robust to
    the pairs a slow period cut through. The step's statistics are over all its windows' samples
    (batched like time_calls for calls under `min_sample_seconds`)."""
    est_s, warm_s = _warm(step, warmup_seconds, seconds)
    est_g, warm_g = _warm(grad, warmup_seconds, seconds)
    batch_s = max(1, math.ceil(min_sample_seconds / est_s))
    batch_g = max(1, math.ceil(min_sample_seconds / est_g))
    pairs = max(MIN_PAIRS, round(seconds / (2 * PAIR_WINDOW)))
    window = seconds / (2 * pairs)
    step_samples, grad_medians, ratios = [], [], []
    gc.collect()
    for k in range(pairs):
        if k % 2 == 0:
            g = _window(grad, batch_g, window, MIN_WINDOW_SAMPLES)
            s = _window(step, batch_s, window, MIN_WINDOW_SAMPLES)
        else:
            s = _window(step, batch_s, window, MIN_WINDOW_SAMPLES)
            g = _window(grad, batch_g, window, MIN_WINDOW_SAMPLES)
        step_samples += s
        grad_medians.append(statistics.median(g))
        ratios.append(statistics.median(s) / grad_medians[-1])
    rec = _stats(step_samples)
    rec.update(batch=batch_s, warmup_calls=warm_s,
               paired={"ratios": ratios, "window_s": window, "grad_median":
                       statistics.median(grad_medians), "grad_batch": batch_g,
                       "grad_warmup_calls": warm_g})
    return rec


# ------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the peak resident set size (VmHWM) to the current one (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -------------------------------------------------------------------------------------------- modes
def mode_time(args, out: Out):
    import systems
    for w in args.workloads:
        out.write(kind="start", workload=w, time=time.time())
        try:
            bench = systems.build(args.system, w)
            first = bench.step()
            g = bench.grads(first)
            np.savez(os.path.join(args.out, f"{args.system}.{w}.npz"), **g)
            del first, g
            grad = None
            if w in TRAINING:  # timed in windows alternating with its model's gradient
                grad = systems.build(args.system, split(w)[0])
            res = None
            for _attempt in range(3 if args.wait_idle else 1):
                if args.wait_idle:
                    wait_idle(args.wait_idle)
                snap = cpu_snapshot()
                if grad is None:
                    r = time_calls(bench.step, args.seconds, args.warmup, args.min_samples)
                else:
                    r = time_paired(bench.step, grad.step, args.seconds, args.warmup)
                after = cpu_snapshot()
                r["others_cores"] = others_cores(snap, after)
                r["steal_cores"] = steal_cores(snap[3], after[3], after[0] - snap[0])
                if res is None or (r["others_cores"] or 0) < (res["others_cores"] or 0):
                    res = r
                if (res["others_cores"] or 0) <= NOISY_CORES:
                    break  # with --wait-idle, a disturbed measurement is taken again (3 at most)
        except Exception as e:  # a missing kernel etc.: report it and go on
            traceback.print_exc()
            out.write(kind="result", workload=w, error=_error_text(e))
            continue
        out.write(kind="result", workload=w, **res)
        del bench, grad
        gc.collect()


def mode_first(args, out: Out):
    """Compile time: the first LeNet-5 gradient call in this fresh process."""
    import systems
    out.write(kind="start", workload="compile", time=time.time())
    try:
        bench = systems.build(args.system, "lenet")
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        bench.step()
        t_first = time.perf_counter() - t0
        busy = others_cores(snap, cpu_snapshot())
        t0 = time.perf_counter()
        bench.step()
        t_second = time.perf_counter() - t0
    except Exception as e:
        traceback.print_exc()
        out.write(kind="result", workload="compile", error=_error_text(e))
        return
    rec = {"median": t_first, "second_call": t_second, "import": args.import_seconds,
           "others_cores": busy}
    if args.system == "tracejit":
        rec.update(_tracejit_compile_breakdown(bench.fn))
    out.write(kind="result", workload="compile", **rec)


def mode_memory(args, out: Out):
    """Memory of the LeNet-5 gradient (run with MALLOC_MMAP_THRESHOLD_ fixed by run.py, so large
    blocks are returned to the system when freed and show up in the resident set when used).

    - first_call_mb: peak RSS during the first call above the RSS before it (includes tracing,
      compiling and their caches).
    - retained_mb: RSS after the warm-up calls minus RSS before the first call (compiled code,
      caches, arenas/workspaces kept between calls).
    - per_call_mb: peak RSS during 10 steady-state calls above the RSS before them (saved
      activations, temporaries and the gradient outputs of a call).
    - tracejit only, numpy_per_call_mb: tracemalloc's peak of numpy allocations in one call, and
      arena_mb, the planned intermediate buffer reused between calls.
    """
    import systems
    out.write(kind="start", workload="memory", time=time.time())
    mb = 1.0 / 1024
    try:
        bench = systems.build(args.system, "lenet")
        gc.collect()
        rss0 = _status_kb("VmRSS")
        maxrss0 = _maxrss_kb()
        reset = _reset_peak()
        r = bench.step()
        first_peak = (_status_kb("VmHWM") if reset else _maxrss_kb()) - (rss0 if reset else maxrss0)
        for _ in range(3):
            r = bench.step()
        del r
        gc.collect()
        rss1 = _status_kb("VmRSS")
        per_call = None
        if _reset_peak():
            r = None
            for _ in range(10):
                r = bench.step()
            del r
            per_call = (_status_kb("VmHWM") - rss1) * mb
        rec = {"first_call_mb": first_peak * mb, "retained_mb": (rss1 - rss0) * mb,
               "per_call_mb": per_call,
               "method": "VmHWM reset via /proc/self/clear_refs" if reset else "ru_maxrss delta"}
        if args.system == "tracejit":
            import tracemalloc
            tracemalloc.start()
            bench.step()
            tracemalloc.reset_peak()
            cur0 = tracemalloc.get_traced_memory()[0]
            bench.step()
            rec["numpy_per_call_mb"] = (tracemalloc.get_traced_memory()[1] - cur0) / 2**20
            tracemalloc.stop()
            arena = _tracejit_arena_bytes(bench.fn)
            if arena is not None:
                rec["arena_mb"] = arena / 2**20
    except Exception as e:
        traceback.print_exc()
        out.write(kind="result", workload="memory", error=_error_text(e))
        return
    out.write(kind="result", workload="memory", **rec)


def _native_entries(jitted):
    for entry in getattr(jitted, "_cache", {}).values():
        native = getattr(entry, "_native", None)
        if native is not None:
            yield native


def _tracejit_compile_breakdown(jitted) -> dict:
    out = {}
    try:
        from tracejit.codegen import cache
        out["cache"] = dict(cache.stats)
    except Exception:  # noqa: BLE001 - no compile cache in this version
        pass
    try:
        for native in _native_entries(jitted):
            for k, v in getattr(native, "compile_seconds", {}).items():
                out[f"compile_{k}"] = v
    except Exception:  # introspection only; internals move
        pass
    return out


def _tracejit_arena_bytes(jitted):
    try:
        for native in _native_entries(jitted):
            return int(native.plan.arena_bytes)
    except Exception:
        return None
    return None


def _versions(system):
    try:
        if system == "tracejit":
            import llvmlite
            import tracejit
            return {"tracejit": tracejit.__version__, "llvmlite": llvmlite.__version__,
                    "numpy": np.__version__, "backend": tracejit.config.backend}
        if system == "torch":
            import torch
            return {"torch": torch.__version__, "threads": torch.get_num_threads()}
        if system == "jax":
            import jax
            import jaxlib
            return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    except Exception as e:
        return {"error": _error_text(e)}
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("time", "first", "memory"))
    ap.add_argument("--system", required=True)
    ap.add_argument("--workloads", default="")
    ap.add_argument("--out", required=True, help="directory for gradients (and the log)")
    ap.add_argument("--log", default=None, help="JSON-lines result file")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.3)
    ap.add_argument("--min-samples", type=int, default=11)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--wait-idle", type=float, default=0)
    args = ap.parse_args()
    args.workloads = [w for w in args.workloads.split(",") if w]
    faulthandler.enable()
    if args.threads < (os.cpu_count() or 1) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    if args.system == "tracejit" and args.backend:
        os.environ["TRACEJIT_BACKEND"] = args.backend
    out = Out(args.log or os.path.join(args.out, f"{args.system}.{args.mode}.jsonl"))
    import systems
    t0 = time.perf_counter()
    try:
        systems.import_system(args.system, args.threads)
    except ImportError as e:
        out.write(kind="not installed", error=_error_text(e))
        return
    args.import_seconds = time.perf_counter() - t0
    out.write(kind="import", seconds=args.import_seconds, versions=_versions(args.system))
    {"time": mode_time, "first": mode_first, "memory": mode_memory}[args.mode](args, out)


if __name__ == "__main__":
    main()

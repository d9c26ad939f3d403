"""tracejit vs PyTorch eager vs jax.jit(jax.grad(...)) on CPU gradients and training steps.

    python benchmarks/run.py                 # everything, about 2-4 minutes
    python benchmarks/run.py --quick         # smoke run, well under a minute
    python benchmarks/run.py --systems tracejit,torch --workloads mlp,lenet --json out.json
    python benchmarks/run.py --workloads mlp,mlp-sgd,mlp-adam,lenet,lenet-sgd,lenet-adam
    python benchmarks/run.py --systems tracejit,torch --workloads contention
    python benchmarks/run.py --rounds 3      # for published numbers: 3 rounds, medians and spread

Each system runs in a process of its own (benchmarks/worker.py), one after the other, so imports,
thread pools and allocators do not interfere; with `--rounds N` the timed workloads are measured N
times, the systems in turn each round (a fresh worker per system and round). Per workload: a
warm-up (which includes compiling), then calls timed one by one (or in batches for calls under
0.2 ms) until about `--seconds` (default 2, `--quick` 0.2) have passed; the median is reported (with
rounds, the median of the round medians and their spread). Compile time is the first LeNet-5
gradient call in a fresh process (median of 3 processes; 1 with --quick); memory is measured in one
more fresh process (see worker.mode_memory). Peers that are not installed are reported as such.

Columns: median time per gradient call; spread (with rounds) = (max - min) / median of the round
medians; GFLOP/s from the analytic flop count of workloads.flops (forward + backward
matmul/convolution flops); peer/tracejit = a peer's median / tracejit's median, with rounds the
median of the rounds' ratios (> 1: tracejit is faster; on tracejit's row, against the fastest
peer); % peak = GFLOP/s over the all-thread FP32 FMA peak measured by benchmarks/peak.py at the
start of the run; check = the gradients agree with PyTorch's (max |a - b| / max |b| per parameter,
below CHECK_TOL). Training workloads (mlp-sgd, ...; a whole step: gradient and optimizer update)
check each parameter's change in the first step instead (||a - b|| / ||b||, see check_grads); they
are timed in windows alternating with their model's gradient in the same worker
(worker.time_paired), and a note gives each system's step time over its gradient's (the median of
the window pairs' ratios) and the issue's targets.

`contention` (only when asked for): the MLP gradient's MEAN time per call (the tail counts: a call
held up by a descheduled thread shows in the mean, not the median) of one process alone, of each of
two identical processes running at once, and of one process beside a busy-loop process, with the
ratios to alone (fair share: 2x; target for tracejit: at most CONTENTION_TARGET). Every process is
started fresh, compiles and warms up, then all start timing at the same moment.

`resnet8`: a CIFAR-sized ResNet-8 gradient (workloads.RESNET8_BLOCKS), also against torch.compile
when asked for (`--systems tracejit,torch,torch.compile,jax`; left out by default because its first
call compiles C++ for minutes; it runs resnet8 only, see systems.ONLY_WORKLOADS).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

import peak as peak_mod  # noqa: E402
from machine import NOISY_CORES, wait_idle  # noqa: E402
from systems import IMPORT_NAMES, ONLY_WORKLOADS, SYSTEMS  # noqa: E402
from workloads import ALL, TRAINING, WORKLOADS, flops, make, split  # noqa: E402

PEERS = ("torch", "torch.compile", "jax")
CHECK_TOL = 1e-3  # float32: summation order differs between systems
# the targets for a training step: tracejit's speed-up over PyTorch eager per model, and the
# most a step may cost over the gradient alone
STEP_TARGETS = {"mlp": 3.0, "lenet": 6.0}
STEP_OVER_GRAD_MAX = 1.10
MMAP_THRESHOLD = 131072  # fixed glibc mmap threshold for the memory process (see worker.py)
CONTENTION_WORKLOAD = "mlp"
CONTENTION_TARGET = 2.3   # the bound on the mean under contention, as a ratio to alone
EXTRA_WORKLOADS = ("memory", "contention")   # not timed by worker.py; contention only on request
# torch.compile only when asked for: its first ResNet-8 gradient compiles C++ through inductor for
# 1-3 minutes on this 2-core machine (seen: 172 s with other processes running), longer than all
# the other workloads together
OPT_IN_SYSTEMS = ("torch.compile",)
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s not in OPT_IN_SYSTEMS)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- workers
class WorkerRun:
    """Runs worker.py for one system and mode; survives crashes and hangs of the worker: the
    workload it was in is reported as an error and the worker restarts with the remaining ones."""

    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.launch = 0

    def run(self, system, mode, workloads, extra_env=None):
        results, meta = {}, {}
        todo = list(workloads)
        while True:
            if self.args.wait_idle:
                wait_idle(self.args.wait_idle)
            self.launch += 1
            logf = os.path.join(self.tmp, f"{system}.{mode}.{self.launch}.jsonl")
            errf = os.path.join(self.tmp, f"{system}.{mode}.{self.launch}.stderr")
            cmd = [sys.executable, os.path.join(HERE, "worker.py"), mode, "--system", system,
                   "--out", self.tmp, "--log", logf, "--threads", str(self.args.threads),
                   "--seconds", str(self.args.seconds), "--warmup", str(self.args.warmup),
                   "--min-samples", str(self.args.min_samples), "--workloads", ",".join(todo),
                   "--wait-idle", str(self.args.wait_idle)]
            if self.args.backend:
                cmd += ["--backend", self.args.backend]
            env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
            if system == "tracejit" and not (extra_env or {}).get("TRACEJIT_CACHE_DIR"):
                # a cold, private compile cache: no entries from earlier runs, none left behind
                env["TRACEJIT_CACHE_DIR"] = self.fresh_cache_dir()
            with open(errf, "w") as err:
                proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT)
                failure = self._wait(proc, logf)
            recs = _read_jsonl(logf)
            current = None
            for r in recs:
                if r["kind"] == "not installed":
                    return {"not installed": r.get("error", "")}, meta
                if r["kind"] == "import":
                    meta = r
                elif r["kind"] == "start":
                    current = r["workload"]
                elif r["kind"] == "result":
                    results[r["workload"]] = r
                    current = None
            if self.args.verbose or (failure and not current):
                sys.stderr.write(_tail(errf, 40))
            if failure is None:
                return results, meta
            why = f"{failure}{_crash_summary(errf)}"
            if current is None:  # died outside a workload (e.g. at import)
                for w in todo:
                    results.setdefault(w, {"error": why})
                return results, meta
            results[current] = {"error": why}
            log(f"  {system} {current}: {results[current]['error']}")
            todo = [w for w in todo if w not in results]
            if not todo:
                return results, meta

    def fresh_cache_dir(self):
        self.launch += 1
        d = os.path.join(self.tmp, f"tracejit-cache.{self.launch}")
        os.makedirs(d, mode=0o700)
        return d

    def _wait(self, proc, logf):
        """None if the worker ended normally, else why it did not."""
        last_start, last_len = time.time(), 0
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                if rc == 0:
                    return None
                if rc < 0:
                    try:
                        return f"worker killed by {signal.Signals(-rc).name}"
                    except ValueError:
                        return f"worker killed by signal {-rc}"
                return f"worker exited with {rc}"
            except subprocess.TimeoutExpired:
                pass
            try:
                size = os.path.getsize(logf)
            except OSError:
                size = 0
            if size != last_len:
                last_len, last_start = size, time.time()
            if time.time() - last_start > self.args.timeout:
                proc.kill()
                proc.wait()
                return f"timed out after {self.args.timeout:.0f} s"


def _read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _crash_summary(path):
    """': <what>' from a dead worker's output: faulthandler's fatal error and innermost frame, or
    the last line (a Python exception)."""
    text = _tail(path, 200)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        return ""
    fatal = next((x for x in lines if x.startswith("Fatal Python error")), None)
    if fatal:
        i = next((k for k, x in enumerate(lines) if "most recent call first" in x), None)
        frame = lines[i + 1] if i is not None and i + 1 < len(lines) else ""
        return f": {fatal}" + (f" at {frame}" if frame.startswith("File") else "")
    return f": {lines[-1][:300]}"


def _tail(path, n):
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-n:]) + "\n" if lines else ""


# --------------------------------------------------------------------------------------- checking
def check_grads(tmp, system, workload, ref="torch"):
    """(ok, relative error, worst parameter) of `system`'s gradients against `ref`'s, or None if
    either is missing: max |a - b| / max |b| per parameter, the worst one.

    For a training workload the saved arrays are the parameters after the first step, and what is
    compared is each parameter's change in that step (new - start): comparing the new parameters
    themselves would pass a step that forgot an update (the first SGD step moves LeNet-5's conv1
    weights by about 2e-4 of their largest). The change is compared in the 2-norm,
    ||a - b|| / ||b||, because Adam's first step, lr * g / (|g| + eps), is ill-conditioned in the
    few elements whose gradient is as small as eps (1e-8): there float32 rounding differences of
    the gradient (1e-6 of its largest element) change the element's step by up to ~10%, which a
    max-norm would report as a failure."""
    a_path = os.path.join(tmp, f"{system}.{workload}.npz")
    b_path = os.path.join(tmp, f"{ref}.{workload}.npz")
    if not (os.path.exists(a_path) and os.path.exists(b_path)):
        return None
    a, b = np.load(a_path), np.load(b_path)
    if set(a.files) != set(b.files):
        return False, float("inf"), f"parameters differ: {sorted(a.files)} vs {sorted(b.files)}"
    start = make(workload)[0] if workload in TRAINING else None
    worst, where = 0.0, ""
    for k in b.files:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        if x.shape != y.shape:
            return False, float("inf"), f"{k}: shape {x.shape} vs {y.shape}"
        if start is not None:
            x, y = x - start[k], y - start[k]
            err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30) if y.size else 0.0
        else:
            err = np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30) if y.size else 0.0
        if not np.isfinite(err):
            err = float("inf")
        if err >= worst:
            worst, where = err, k
    return worst < CHECK_TOL, worst, where


# ------------------------------------------------------------------------------------ aggregation
def spread(values):
    """How far rounds disagree: (max - min) / median of their medians (0 for one round)."""
    return (max(values) - min(values)) / statistics.median(values)


def _worst(values):
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def merge_paired(paired):
    """One system's paired step/gradient measurements of a training workload, one per round
    (worker.time_paired's "paired"): the median and quartiles of all window pairs' step/grad ratios
    (pooled over the rounds), each round's median ratio and their spread."""
    ratios = sorted(x for p in paired for x in p["ratios"])
    per_round = [statistics.median(p["ratios"]) for p in paired]
    n = len(ratios)
    return {"ratio": statistics.median(ratios), "p25": ratios[n // 4], "p75": ratios[(3 * n) // 4],
            "min": ratios[0], "max": ratios[-1], "pairs": n, "round_ratios": per_round,
            "spread": spread(per_round), "window_s": paired[0]["window_s"],
            "grad_median": statistics.median(p["grad_median"] for p in paired)}


def merge_rounds(recs):
    """One record of a workload and system from its per-round records (worker results): the median
    of the round medians, each round's median (round_medians, for per-round ratios) and their
    spread; the worst noise (others_cores, steal_cores) of any round; the paired step/grad
    windows merged. A round that failed makes the workload an error: a median over the rounds
    that happened to work would hide it."""
    for k, r in enumerate(recs):
        if "error" in r:
            where = f" (round {k + 1} of {len(recs)})" if len(recs) > 1 else ""
            return {"error": r["error"] + where}
    meds = [r["median"] for r in recs]
    out = {"median": statistics.median(meds), "round_medians": meds, "spread": spread(meds),
           "min": min(r["min"] for r in recs), "samples": sum(r["samples"] for r in recs),
           "batch": recs[0]["batch"],
           "others_cores": _worst(r.get("others_cores") for r in recs),
           "steal_cores": _worst(r.get("steal_cores") for r in recs)}
    if all("paired" in r for r in recs):
        out["paired"] = merge_paired([r["paired"] for r in recs])
    return out


def round_ratio(num, den):
    """(ratio, per-round ratios or None): `num`'s time over `den`'s, as the median over rounds of
    the ratio within each round (the two systems measured minutes apart at most, alternating), so
    a slow period of the machine moves one round's ratio instead of one system's median; records
    without rounds (compile) give the ratio of their medians."""
    a, b = num.get("round_medians"), den.get("round_medians")
    if a and b and len(a) == len(b):
        per_round = [x / y for x, y in zip(a, b)]
        return statistics.median(per_round), per_round
    return num["median"] / den["median"], None


# ---------------------------------------------------------------------------------------- report
def machine_info(threads):
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from tracejit.codegen.target import host_info
        h = host_info()
        info["llvm_cpu"] = h["cpu"]
        info["avx512"] = h["avx512"]
    except Exception as e:  # noqa: BLE001
        info["llvm_cpu"] = f"? ({e})"
    try:
        info["git"] = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def _fmt_time(workload, sec):
    if workload == "tiny":
        return f"{sec * 1e6:.2f} us"
    if workload == "compile":
        return f"{sec:.3f} s"
    return f"{sec * 1e3:.3f} ms"


def reference_system(results):
    """The system whose gradients the others are checked against: PyTorch, else jax."""
    for s in ("torch", "jax"):
        if isinstance(results.get(s), dict):
            return s
    return None


def build_rows(results, peak_all, tmp, systems, workloads):
    rows = []
    ref = reference_system(results)
    for w in workloads:
        if w == "memory":
            continue
        recs = {s: results[s][w] for s in systems
                if isinstance(results.get(s), dict) and "median" in results[s].get(w, {})}
        peer_times = {s: r["median"] for s, r in recs.items() if s in PEERS}
        tj = recs.get("tracejit")
        fastest_peer = min(peer_times, key=peer_times.get) if peer_times else None
        fl = flops(w) if w in WORKLOADS else 0
        for s in systems:
            r = results.get(s)
            row = {"workload": w, "system": s}
            if r == "not installed" or r is None:
                continue
            rec = r.get(w)
            if rec is None:
                continue
            if "error" in rec:
                row["error"] = rec["error"]
                rows.append(row)
                continue
            t = rec["median"]
            row["median_s"] = t
            if fl:
                row["gflops"] = fl / t / 1e9
                if peak_all:
                    row["peak_fraction"] = row["gflops"] / peak_all
            if tj:
                ratio = None
                if s == "tracejit" and fastest_peer:
                    ratio = round_ratio(recs[fastest_peer], tj)
                    row["speedup_vs"] = fastest_peer
                elif s != "tracejit":
                    ratio = round_ratio(rec, tj)
                if ratio is not None:
                    row["speedup"] = ratio[0]
                    if ratio[1] is not None:
                        row["speedup_rounds"] = ratio[1]
            if w in WORKLOADS and ref and s != ref:
                c = check_grads(tmp, s, w, ref)
                if c is not None:
                    row["check"] = {"ok": bool(c[0]), "max_rel_err": c[1], "where": c[2],
                                    "reference": ref}
            elif w in WORKLOADS and s == ref:
                row["check_reference"] = True
            for k in ("samples", "batch", "second_call", "import", "compile_lower",
                      "compile_llvm", "runs", "others_cores", "steal_cores", "round_medians",
                      "spread"):
                if k in rec:
                    row[k] = rec[k]
            if "paired" in rec:  # a training step over its model's gradient, paired windows
                row["step_over_grad"] = rec["paired"]["ratio"]
                row["paired"] = rec["paired"]
            rows.append(row)
    return rows


def _noisy(rec):
    """Other processes or the hypervisor took more than NOISY_CORES during the measurement."""
    return max(rec.get("others_cores") or 0, rec.get("steal_cores") or 0) > NOISY_CORES


def print_table(rows, label, ref):
    # the spread column when some workload ran in several rounds
    rounds = max((len(r.get("round_medians", ())) for r in rows), default=0)
    head = ("workload", "system", "median", "spread", "GFLOP/s", "peer/tracejit", "% peak",
            "check")
    lines = []
    for r in rows:
        sys_name = label.get(r["system"], r["system"])
        if "error" in r:
            lines.append((r["workload"], sys_name, "error: " + r["error"]) + ("",) * 5)
            continue
        sp = ""
        if "speedup" in r:
            sp = f"{r['speedup']:.2f}x"
            if r["system"] == "tracejit":
                sp += f" (vs {r['speedup_vs']})"
        chk = ""
        if "check" in r:
            c = r["check"]
            chk = f"{'✓' if c['ok'] else '✗'} {c['max_rel_err']:.0e}"
            if not c["ok"]:
                chk += f" ({c['where']})"
        elif r.get("check_reference"):
            chk = "(ref)"
        noisy = "*" if _noisy(r) else ""
        lines.append((r["workload"], sys_name, _fmt_time(r["workload"], r["median_s"]) + noisy,
                      f"{100 * r['spread']:.1f}%" if len(r.get("round_medians", ())) > 1 else "-",
                      f"{r['gflops']:.1f}" if "gflops" in r else "-", sp or "-",
                      f"{100 * r['peak_fraction']:.1f}%" if "peak_fraction" in r else "-", chk))
    cols = [i for i in range(len(head)) if i != 3 or rounds > 1]
    head = [head[i] for i in cols]
    lines = [[line[i] for i in cols] for line in lines]
    # (every line may be an error, e.g. when the tracejit worker failed to start)
    widths = [max([len(head[i])] + [len(str(line[i])) for line in lines
                                    if not str(line[2]).startswith("error")])
              for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), "  ".join("-" * w for w in widths)]
    prev = None
    for line in lines:
        wl = line[0] if line[0] != prev else ""
        prev = line[0]
        if str(line[2]).startswith("error"):
            out.append(f"{wl:<{widths[0]}}  {line[1]:<{widths[1]}}  {line[2]}")
        else:
            out.append(fmt.format(wl, *line[1:]).rstrip())
    print("\n".join(out))
    if any(_noisy(r) for r in rows):
        print(f"* other processes or the hypervisor (steal) took more than {NOISY_CORES} cores "
              f"while this was measured: noisy (slower than on an idle machine)")
    if rounds > 1:
        print(f"median: of the {rounds} rounds' medians (systems measured in turn each round); "
              "spread: (max - min) / median\nof the round medians; peer/tracejit: the median of "
              "the rounds' ratios.")
    print("GFLOP/s: matmul/conv flops of forward + backward (first layer 2x its forward flops, "
          "later layers 3x;\nbenchmarks/workloads.py); peer/tracejit: peer median / tracejit "
          "median (> 1: tracejit faster;\non tracejit's row vs the fastest peer); % peak: of the "
          "all-thread FMA peak; check: gradients vs\n"
          f"{ {'torch': 'PyTorch', 'jax': 'jax'}.get(ref, 'no reference')}'s (ref), max |a - b| / "
          f"max |b| over parameters (✓ below {CHECK_TOL:g})"
          + (";\nfor a training step (mlp-sgd, ...), each parameter's change in the first step, "
             "||a - b|| / ||b||." if any(r["workload"] in TRAINING for r in rows) else "."))


def step_notes(rows):
    """Lines on the training workloads: each system's step time over its gradient's, measured in
    alternating windows of the same process (worker.time_paired), and tracejit's targets (step over
    gradient; speed-up over PyTorch, the median of the rounds' ratios)."""
    by = {(r["workload"], r["system"]): r for r in rows if "median_s" in r}
    lines = []
    pairs = rounds = 0
    for w in TRAINING:
        model = split(w)[0]
        parts = []
        for s in SYSTEMS:
            p = by.get((w, s), {}).get("paired")
            if p:
                parts.append(f"{s} {p['ratio']:.2f} [{p['p25']:.2f}-{p['p75']:.2f}]")
                pairs = max(pairs, p["pairs"])
                rounds = max(rounds, len(p["round_ratios"]))
        tj = by.get((w, "tracejit"))
        if not parts and tj is None:
            continue
        line = f"  {w:<11} step / grad: " + (", ".join(parts) if parts else "-")
        targets = []
        if tj is not None and "step_over_grad" in tj:
            ratio = tj["step_over_grad"]
            targets.append(f"step/grad {ratio:.3f} <= {STEP_OVER_GRAD_MAX:.2f} "
                           f"{'✓' if ratio <= STEP_OVER_GRAD_MAX else '✗'}")
        if tj is not None and "speedup" in by.get((w, "torch"), {}):
            sp = by[w, "torch"]["speedup"]
            targets.append(f"vs torch {sp:.2f}x >= {STEP_TARGETS[model]:g}x "
                           f"{'✓' if sp >= STEP_TARGETS[model] else '✗'}")
        if targets:
            line += "\n" + " " * 14 + "tracejit targets: " + ", ".join(targets)
        lines.append(line)
    if lines:
        where = f"up to {pairs}" + (f", over {rounds} rounds" if rounds > 1 else "")
        print(f"\nTraining steps: step / grad = the median over window pairs ({where}) of the "
              "step's median\nin a window over the gradient's median in the window next to it, "
              "in one process; [quartiles of the\npairs' ratios]:")
        print("\n".join(lines))


def print_memory(results, systems, label):
    recs = [(s, results[s]["memory"]) for s in systems
            if isinstance(results.get(s), dict) and "memory" in results[s]]
    if not recs:
        return
    print(f"\nLeNet-5 gradient memory (fresh process; RSS in MB; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}):")
    head = ("system", "per call", "retained", "first call", "numpy per call", "arena")
    print(f"{head[0]:<22}{head[1]:>10}{head[2]:>10}{head[3]:>12}{head[4]:>16}{head[5]:>8}")
    for s, r in recs:
        name = label.get(s, s)
        if "error" in r:
            print(f"{name:<22}error: {r['error']}")
            continue

        def f(k):
            v = r.get(k)
            return "-" if v is None else f"{v:.1f}"
        print(f"{name:<22}{f('per_call_mb'):>10}{f('retained_mb'):>10}{f('first_call_mb'):>12}"
              f"{f('numpy_per_call_mb'):>16}{f('arena_mb'):>8}")
    print("  per call: peak RSS over 10 steady-state calls above the RSS before them (saved "
          "activations,\n  temporaries, gradient outputs); retained: RSS kept after the warm-up "
          "calls (code, caches,\n  workspaces); first call: peak RSS of the first call incl. "
          "tracing/compiling; numpy per call:\n  tracemalloc peak of numpy allocations in one call; "
          "arena: tracejit's planned buffer for\n  intermediates, reused between calls (part of "
          "retained).")


# ------------------------------------------------------------------------------------ contention
def contention_child(system, threads, seconds, out):
    """In a process of its own: build the contention workload, warm up, say "ready" on stdout,
    wait for a line on stdin, then call for `seconds` and write the mean time per call (JSON) to
    `out`."""
    import systems
    systems.import_system(system, int(threads))
    bench = systems.build(system, CONTENTION_WORKLOAD)
    t_stop = time.perf_counter() + 0.5
    while time.perf_counter() < t_stop:
        bench.step()
    print("ready", flush=True)
    sys.stdin.readline()
    clock = time.perf_counter
    times = []
    deadline = clock() + float(seconds)
    while clock() < deadline:
        t0 = clock()
        bench.step()
        times.append(clock() - t0)
    times.sort()
    with open(out, "w") as f:
        json.dump({"mean": sum(times) / len(times), "median": times[len(times) // 2],
                   "p99": times[int(0.99 * (len(times) - 1))], "calls": len(times)}, f)


def _contention_run(system, args, runner, copies, busy_loop):
    """Start `copies` timing processes (and a busy loop if asked), release them together; their
    results."""
    outs = [os.path.join(runner.tmp, f"contention.{system}.{runner.launch}.{k}.json")
            for k in range(copies)]
    runner.launch += 1
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if system == "tracejit":
        env["TRACEJIT_CACHE_DIR"] = runner.fresh_cache_dir()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--contention-child",
                               system, str(args.threads), str(args.seconds), out],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT) for out in outs]
    busy = None
    try:
        for p in procs:   # compiled and warm (one after the other: their compiles may overlap)
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {system} contention process failed to start")
        if busy_loop:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.3)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            p.wait(timeout=args.timeout)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    res = []
    for out in outs:
        with open(out) as f:
            res.append(json.load(f))
    return res


def measure_contention(system, args, runner):
    """{"alone", "pair" (both processes), "busy"}: per-call statistics, and each condition's mean
    over the mean alone (for the pair, the worse of the two processes)."""
    try:
        alone = _contention_run(system, args, runner, 1, False)[0]
        pair = _contention_run(system, args, runner, 2, False)
        busy = _contention_run(system, args, runner, 1, True)[0]
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    return {"alone": alone, "pair": pair, "busy": busy,
            "pair_ratio": max(r["mean"] for r in pair) / alone["mean"],
            "busy_ratio": busy["mean"] / alone["mean"]}


def print_contention(results, systems, label):
    rows = [(s, results[s]["contention"]) for s in systems
            if isinstance(results.get(s), dict) and "contention" in results[s]]
    if not rows:
        return
    print(f"\nContention: {CONTENTION_WORKLOAD} gradient, MEAN ms per call; two identical "
          f"processes at once, or one beside a busy loop (fair share 2x; target <= "
          f"{CONTENTION_TARGET}x alone)")
    print(f"{'system':<12}{'alone':>9}{'two at once':>18}{'x alone':>9}{'beside busy':>13}"
          f"{'x alone':>9}{'p99 alone/two/busy':>24}")
    for s, c in rows:
        if "error" in c:
            print(f"{label.get(s, s):<12}error: {c['error']}")
            continue
        pair = max(c["pair"], key=lambda r: r["mean"])
        p99 = "/".join(f"{x['p99'] * 1e3:.2f}" for x in (c["alone"], pair, c["busy"]))
        both = "/".join(f"{r['mean'] * 1e3:.3f}" for r in c["pair"])
        print(f"{label.get(s, s):<12}{c['alone']['mean'] * 1e3:>9.3f}{both:>18}"
              f"{c['pair_ratio']:>8.2f}x{c['busy']['mean'] * 1e3:>13.3f}{c['busy_ratio']:>8.2f}x"
              f"{p99:>24}")


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark tracejit's gradients against PyTorch eager and jax.jit(jax.grad).",
        epilog=f"workloads: {', '.join(ALL + EXTRA_WORKLOADS)}")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"comma-separated, from {','.join(SYSTEMS)} (default: all but "
                         f"{','.join(OPT_IN_SYSTEMS)})")
    ap.add_argument("--workloads", default=",".join(ALL + ("memory",)),
                    help=f"comma-separated, from {','.join(ALL + EXTRA_WORKLOADS)} (default: "
                         "all but contention)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every system (default: all CPUs available)")
    ap.add_argument("--quick", action="store_true",
                    help="short timings (0.2 s per workload, 1 compile-time process)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="timed seconds per workload and system (default 2, 0.2 with --quick)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the timed workloads this many times, the systems in turn each "
                         "round; report the median of the rounds and their spread (use 3 for "
                         "published numbers)")
    ap.add_argument("--compile-runs", type=int, default=None,
                    help="fresh processes for the compile time (default 3, 1 with --quick)")
    ap.add_argument("--backend", default=None,
                    help="tracejit backend: llvm or interpreter (default: $TRACEJIT_BACKEND, "
                         "else llvm)")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds one workload may take before its worker is killed")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each system, wait up to this long for other processes to leave "
                         "the CPUs idle (also before each workload and the peak; default: do "
                         "not wait)")
    ap.add_argument("--no-peak", action="store_true", help="skip the FMA peak measurement")
    ap.add_argument("--json", default=None, help="save all results to this file")
    ap.add_argument("--keep", default=None, help="keep worker logs and gradients in this directory")
    ap.add_argument("--verbose", "-v", action="store_true", help="show the workers' output")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in args.systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r} (one of {', '.join(SYSTEMS)})")
    for w in args.workloads:
        if w not in ALL + EXTRA_WORKLOADS:
            ap.error(f"unknown workload {w!r} (one of {', '.join(ALL + EXTRA_WORKLOADS)})")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    if args.seconds is None:
        args.seconds = 0.2 if args.quick else 2.0
    args.warmup = 0.05 if args.quick else 0.3
    args.min_samples = 5 if args.quick else 11
    if args.compile_runs is None:
        args.compile_runs = 1 if args.quick else 3
    if args.backend is None:
        args.backend = os.environ.get("TRACEJIT_BACKEND") or "llvm"
    return args


def time_rounds(args, runner, results, metas, label):
    """The timed workloads, `args.rounds` times with the systems in turn (round 1: tracejit, torch,
    jax; round 2: the same again ...), a fresh worker per system and round; each workload's rounds
    merged into results[system][workload] (merge_rounds). A slow period of the machine then
    lands in one round of some systems instead of in all of one system's workloads."""
    # (torch.compile: resnet8 only; see systems.ONLY_WORKLOADS)
    timed = {s: [w for w in args.workloads if w in WORKLOADS and
                 w in ONLY_WORKLOADS.get(s, args.workloads)]
             for s in args.systems if results[s] != "not installed"}
    rounds = {s: [] for s in timed}
    cache = None
    for k in range(args.rounds):
        for s, todo in timed.items():
            if not todo or results[s] == "not installed":
                continue
            t0 = time.time()
            env = None
            if s == "tracejit":  # the compiled code of round 1, from its cache in later rounds
                cache = cache or runner.fresh_cache_dir()
                env = {"TRACEJIT_CACHE_DIR": cache}
            log(f"{label.get(s, s)}: timing {', '.join(todo)}"
                + (f" (round {k + 1} of {args.rounds})" if args.rounds > 1 else "") + " ...")
            r, metas[s] = runner.run(s, "time", todo, env)
            if "not installed" in r:
                print(f"{s}: not installed ({r['not installed']})")
                results[s] = "not installed"
                continue
            rounds[s].append(r)
            log(f"{label.get(s, s)}: timed in {time.time() - t0:.0f} s")
    for s, todo in timed.items():
        if results[s] != "not installed" and rounds[s]:
            results[s].update({w: merge_rounds([r.get(w, {"error": "no result"}) for r in rounds[s]])
                               for w in todo})


def measure_peak(args, previous=None):
    """The FMA peak (peak.measure); with `previous`, the better of both figures: the peak is an upper
    bound that other processes can only hide, so the best measurement is the best estimate."""
    if args.no_peak:
        return None
    if args.wait_idle:
        wait_idle(args.wait_idle)
    try:
        p = peak_mod.measure(args.threads, repeats=20 if args.quick else 60)
    except Exception as e:  # noqa: BLE001
        print(f"FP32 FMA peak: error: {type(e).__name__}: {e}")
        return previous
    if previous is None:
        print(f"FP32 FMA peak ({p['accumulators']} x <{p['lanes']} x float> accumulators): "
              f"{p['single']:.1f} GFLOP/s on 1 thread, {p['all']:.1f} GFLOP/s on "
              f"{p['threads']} threads")
        return p
    best = dict(previous)
    for k in ("single", "all"):
        best[k] = max(previous[k], p[k])
        best[f"{k}_runs"] = [previous[k], p[k]]
    return best


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# Run in a fresh Python set up like a worker: the directories of the tracejit package it imports.
_BYTE_COMPILE = """
import compileall, sys
sys.path.insert(0, sys.argv[1])
import systems, tracejit, tracejit.ir, tracejit.codegen
# (tracejit.__path__ also holds a source checkout's root, where its ir/ and codegen/ are found)
dirs = sorted({tracejit.__path__[0], *tracejit.ir.__path__, *tracejit.codegen.__path__})
ok = all(compileall.compile_dir(d, quiet=1) for d in dirs)
print(("byte-compiled " if ok else "could not byte-compile all of ") + ", ".join(dirs))
"""


def byte_compile_tracejit() -> str:
    """Write the .pyc files of the tracejit the workers import, as pip does when it installs a
    wheel: with PYTHONDONTWRITEBYTECODE set (or a read-only checkout), each fresh process would
    otherwise compile tracejit's modules from source during its first call (0.1-0.15 s here),
    which no installed copy does; the peers' site-packages have their .pyc files."""
    done = subprocess.run([sys.executable, "-c", _BYTE_COMPILE, HERE], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return f"tracejit: byte-compiling failed ({done.stderr.strip()[-300:]})"
    return "tracejit: " + done.stdout.strip() + " (as pip does on install)"


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--contention-child"]:
        return contention_child(*sys.argv[2:])
    args = parse_args(argv)
    info = machine_info(args.threads)
    info["load_before"] = os.getloadavg()
    print(f"tracejit benchmarks  {info['date']}  git {info.get('git', '?')}")
    print(f"machine: {info.get('cpu_model', '?')} (LLVM cpu {info.get('llvm_cpu')}), nproc "
          f"{info['nproc']}, {args.threads} threads per system, Python {info['python']}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in info['load_before'])}")

    if "resnet8" in args.workloads and "torch.compile" not in args.systems:
        print("torch.compile (a resnet8 peer) is not in this run: its first call compiles for "
              "1-3 minutes here; add it with --systems tracejit,torch,torch.compile,jax")
    peak = measure_peak(args)
    peak_all = peak["all"] if peak else None
    sys.stdout.flush()

    tmp = args.keep or tempfile.mkdtemp(prefix="tracejit-bench-")
    os.makedirs(tmp, exist_ok=True)
    runner = WorkerRun(args, tmp)
    results, metas = {}, {}
    label = {"tracejit": "tracejit" if args.backend == "llvm" else f"tracejit[{args.backend}]"}
    try:
        for s in args.systems:
            if s != "tracejit" and not _importable(IMPORT_NAMES[s]):
                print(f"{s}: not installed (see benchmarks/README.md)")
                results[s] = "not installed"
            else:
                results[s] = {}
        time_rounds(args, runner, results, metas, label)
        for s in args.systems:
            if results[s] == "not installed":
                continue
            res = results[s]
            t0 = time.time()
            wanted = [w for w in args.workloads if w in ONLY_WORKLOADS.get(s, args.workloads)]
            if "compile" in wanted:
                if s == "tracejit":
                    log(byte_compile_tracejit())
                log(f"{label.get(s, s)}: compile time ({args.compile_runs} fresh processes) ...")
                runs = []
                env = {}
                for _ in range(args.compile_runs):
                    if s == "tracejit":  # cold: an empty compile cache each time
                        env = {"TRACEJIT_CACHE_DIR": runner.fresh_cache_dir()}
                    r, _meta = runner.run(s, "first", ["compile"], env)
                    rec = r.get("compile", {"error": r.get("not installed", "no result")})
                    runs.append(rec)
                    if "error" in rec:
                        break
                ok = [x for x in runs if "error" not in x]
                if ok and len(ok) == len(runs):
                    ok.sort(key=lambda x: x["median"])
                    med = dict(ok[len(ok) // 2])
                    med["runs"] = [x["median"] for x in runs]
                    if s == "tracejit":  # once more with the cache the last run filled
                        r, _meta = runner.run(s, "first", ["compile"], env)
                        if "median" in r.get("compile", {}):
                            med["warm_cache"] = r["compile"]["median"]
                    res["compile"] = med
                else:
                    res["compile"] = runs[-1]
            if "contention" in wanted and s in ("tracejit", "torch"):
                log(f"{label.get(s, s)}: contention ({CONTENTION_WORKLOAD} alone, two at once, "
                    f"beside a busy loop) ...")
                res["contention"] = measure_contention(s, args, runner)
            if "memory" in wanted:
                log(f"{label.get(s, s)}: LeNet-5 memory ...")
                r, _meta = runner.run(s, "memory", ["memory"],
                                      {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
                res["memory"] = r.get("memory", {"error": "no result"})
            if time.time() - t0 > 1:
                log(f"{label.get(s, s)}: done in {time.time() - t0:.0f} s")

        if peak:  # again at the end: the better of the two
            peak = measure_peak(args, peak)
            peak_all = peak["all"]
            print(f"FP32 FMA peak, best of the measurements at the start and the end: "
                  f"{peak['single']:.1f} GFLOP/s on 1 thread, {peak['all']:.1f} GFLOP/s on "
                  f"{peak['threads']} threads")
        order = [w for w in ALL if w in args.workloads]
        rows = build_rows(results, peak_all, tmp, args.systems, order)
        if order:   # (not for a contention-only run)
            print()
            print_table(rows, label, reference_system(results))
        step_notes(rows)
        print_memory(results, args.systems, label)
        print_contention(results, args.systems, label)
        _print_notes(results, metas, args, info)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "peak": peak, "args": {k: v for k, v in vars(args).items()},
                           "versions": {s: m.get("versions", {}) for s, m in metas.items()},
                           "rows": rows, "results": results}, f, indent=1, default=str)
            print(f"\nsaved {args.json}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def worst_per_system(results, key):
    """{system: the worst (largest) `key` (others_cores, steal_cores) of its timed measurements}
    (systems without that reading left out)."""
    out = {}
    for s, res in results.items():
        if isinstance(res, dict):
            worst = _worst(r.get(key) for r in res.values() if isinstance(r, dict))
            if worst is not None:
                out[s] = worst
    return out


def worst_steal(results):
    """{system: the most cores stolen by the hypervisor during any of its timed measurements}."""
    return worst_per_system(results, "steal_cores")


def _print_notes(results, metas, args, info):
    notes = []
    tj = results.get("tracejit")
    if isinstance(tj, dict) and "compile" in tj and "error" not in tj["compile"]:
        c = tj["compile"]
        parts = [f"{k[8:]} {v:.3f} s" for k, v in c.items() if k.startswith("compile_")]
        note = (f"tracejit LeNet-5 first call, cold compile cache, package byte-compiled: "
                f"{c['median']:.3f} s (runs: "
                f"{', '.join(f'{x:.3f}' for x in c.get('runs', []))})")
        if parts:
            note += f"; native code: {', '.join(parts)}"
        if "warm_cache" in c:
            note += f"; with a warm compile cache: {c['warm_cache']:.3f} s"
        notes.append(note + f"; second call {c['second_call'] * 1e3:.1f} ms")
    vers = []
    for s, m in metas.items():
        v = m.get("versions", {})
        if v:
            vers.append(f"{s}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    if vers:
        notes.append("versions: " + "; ".join(vers))
    busy = worst_per_system(results, "others_cores")
    info["other_processes_cores"] = busy
    if busy:
        notes.append("cores used by other processes while each system was measured (worst "
                     "workload): " + ", ".join(f"{s} {c:.2f}" for s, c in busy.items())
                     + f" of {info['nproc']}")
    steal = worst_steal(results)
    info["steal_cores"] = steal
    if any(steal.values()):
        notes.append("steal time (CPU the hypervisor gave to other guests) while each system was "
                     "measured (worst workload): " + ", ".join(f"{s} {c:.2f}" for s, c in
                                                                steal.items()) + " cores")
    if notes:
        print()
        for n in notes:
            print(n)


if __name__ == "__main__":
    main()

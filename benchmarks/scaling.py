"""How cost grows: time per call and first-call (compile) time as the work grows, tracejit vs PyTorch
eager (and jax.jit, cheap here), with the fitted growth exponent of each series.

    python benchmarks/scaling.py                       # every series, all systems (~5-10 minutes)
    python benchmarks/scaling.py --quick               # fewer points, short timings
    python benchmarks/scaling.py --series mlp-depth --points 1,2 --systems tracejit,torch
    python benchmarks/scaling.py --out results/        # scaling.json (and scaling.png) there

Series (workloads.SCALING, arrays from workloads.make_scaled, models from systems.py):
- lenet-batch: the LeNet-5 gradient at batch 1..512; the table shows time per SAMPLE (time per call
  / batch). Small batches are what online learning and inference run.
- mlp-depth: an MLP with 1..64 hidden layers of 256 (depth 1 is run.py's `mlp`): first-call time
  (tracing + compiling + one call; PyTorch eager has nothing to compile) and time per call.
- conv-size: the conv block (conv3x3 pad 1 (64) - relu - avgpool2 - sum of squares, batch 16, 64
  channels) at image size 8..128.

Each system runs each series in a process of its own (this script, `--child`), one after the other
as run.py does, so imports, thread pools and allocators do not interfere; tracejit gets a fresh,
empty compile cache (TRACEJIT_CACHE_DIR) per process, so every first call is a cold compile. Per
point: the first call (timed: "first"), then worker.time_calls (warm-up, then samples for about
--seconds; the MEDIAN is reported). The growth exponent b is the least-squares slope of log(time per
call) against log(point), i.e. time ~ point^b over the measured range (for mlp-depth also of the
first-call time). tracejit vs a peer: the peer's median / tracejit's (> 1: tracejit faster), at
every point.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

from workloads import SCALING, make_scaled  # noqa: E402

SYSTEMS = ("tracejit", "torch", "jax")
PEERS = ("torch", "jax")
# the series whose first-call time is a result of its own (the others record it too)
COMPILE_SERIES = ("mlp-depth",)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ child
def child(system, series, points, out, seconds, warmup, min_samples, threads):
    """In a process of its own: every point of one series for one system, one JSON line each to
    `out` as it is made ({"point", "first", "median", ...} or {"point", "error"})."""
    import traceback

    import systems
    from worker import time_calls
    systems.import_system(system, threads)
    with open(out, "a") as f:
        for x in points:
            try:
                model, params, inputs = make_scaled(series, x)
                bench = systems.build_model(system, model, params, inputs)
                t0 = time.perf_counter()
                bench.step()
                first = time.perf_counter() - t0
                rec = time_calls(bench.step, seconds, warmup, min_samples)
                rec.update(point=x, first=first)
                del bench
            except Exception as e:  # noqa: BLE001 - a point that fails is reported, not fatal
                traceback.print_exc()
                rec = {"point": x, "error": f"{type(e).__name__}: {e}"[:300]}
            f.write(json.dumps(rec) + "\n")
            f.flush()


def run_child(system, series, points, args, tmp):
    """{point: record} from a child process (points it did not reach: an error naming why)."""
    out = os.path.join(tmp, f"{system}.{series}.jsonl")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if system == "tracejit":
        env["TRACEJIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="cache.", dir=tmp)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", system, series,
           ",".join(map(str, points)), out, str(args.seconds), str(args.warmup),
           str(args.min_samples), str(args.threads)]
    errf = os.path.join(tmp, f"{system}.{series}.stderr")
    why = None
    with open(errf, "w") as err:
        try:
            rc = subprocess.run(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=args.timeout).returncode
            if rc:
                why = f"worker exited with {rc}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {args.timeout:.0f} s"
    recs = {}
    if os.path.exists(out):
        with open(out) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    recs[r["point"]] = r
    if why:
        with open(errf) as f:
            tail = [x.strip() for x in f.read().splitlines() if x.strip()][-1:]
        why += f": {tail[0][:200]}" if tail else ""
    for x in points:
        if x not in recs:
            recs[x] = {"point": x, "error": why or "no result"}
    return recs


# ------------------------------------------------------------------------------------------ report
def growth_exponent(xs, ys):
    """Least-squares slope of log(y) against log(x): y ~ x^b. None with fewer than two points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def _ok(rec):
    return rec is not None and "median" in rec


def summarize(results, systems):
    """{series: {"exponents": {system: {"run": b, "first": b}}, "ratios": {peer: {point: r}}}}."""
    summary = {}
    for series, by_sys in results.items():
        ex, ratios = {}, {}
        for s in systems:
            recs = [r for r in by_sys.get(s, {}).values() if _ok(r)]
            xs = [r["point"] for r in recs]
            ex[s] = {"run": growth_exponent(xs, [r["median"] for r in recs]),
                     "first": growth_exponent(xs, [r["first"] for r in recs])}
        tj = by_sys.get("tracejit", {})
        for peer in PEERS:
            if peer in by_sys:
                ratios[peer] = {x: by_sys[peer][x]["median"] / tj[x]["median"]
                                for x in by_sys[peer] if _ok(by_sys[peer][x]) and _ok(tj.get(x))}
        summary[series] = {"exponents": ex, "ratios": ratios}
    return summary


def _fmt_s(sec):
    if sec is None:
        return "-"
    if sec < 1e-3:
        return f"{sec * 1e6:.1f} us"
    if sec < 1:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec:.2f} s"


def table(results, summary, systems):
    """The report as text: per series a row per point (per system its median time per call, per
    sample for lenet-batch; its first call for mlp-depth; each peer's time over tracejit's), then the
    fitted exponents."""
    lines = []
    for series, by_sys in results.items():
        model, what, _d, _q = SCALING[series]
        per_sample = series == "lenet-batch"
        first = series in COMPILE_SERIES
        peers = [p for p in PEERS if p in systems and "tracejit" in systems]
        head = [what]
        for s in systems:
            head.append(f"{s} {'per sample' if per_sample else 'per call'}")
            if first:
                head.append(f"{s} first call")
        head += [f"{p}/tracejit" for p in peers]
        rows = []
        for x in sorted({x for r in by_sys.values() for x in r}):
            row = [str(x)]
            for s in systems:
                rec = by_sys.get(s, {}).get(x)
                if not _ok(rec):
                    row.append("error" if rec else "-")
                    if first:
                        row.append("-")
                    continue
                row.append(_fmt_s(rec["median"] / (x if per_sample else 1)))
                if first:
                    row.append(_fmt_s(rec["first"]))
            for p in peers:
                r = summary[series]["ratios"].get(p, {}).get(x)
                row.append("-" if r is None else f"{r:.2f}x")
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        lines.append(f"\n{series}: {model}, {what} {', '.join(str(r[0]) for r in rows)}")
        lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        ex = summary[series]["exponents"]
        parts = []
        for s in systems:
            b = ex.get(s, {})
            txt = f"{s} {'-' if b.get('run') is None else format(b['run'], '.2f')}"
            if first:
                txt += f" (first call {'-' if b.get('first') is None else format(b['first'], '.2f')})"
            parts.append(txt)
        lines.append(f"growth exponent of time per call in {what}: " + ", ".join(parts))
        errors = [f"{s} at {x}: {r['error']}" for s in systems
                  for x, r in by_sys.get(s, {}).items() if "error" in r]
        lines += [f"  error: {e}" for e in errors[:5]]
        if per_sample and 1 in by_sys.get("tracejit", {}):
            lines.append(batch_one_note(summary[series]["ratios"]))
    return "\n".join(lines)


def batch_one_note(ratios):
    """The issue's requirement: at batch 1 tracejit beats both peers."""
    have = {p: r[1] for p, r in ratios.items() if 1 in r}
    if not have:
        return "batch 1: no peer measured"
    ok = all(r > 1 for r in have.values())
    return ("batch 1: tracejit vs " + ", ".join(f"{p} {r:.2f}x" for p, r in have.items())
            + f" ({'faster than every peer measured ✓' if ok else 'NOT faster than every peer ✗'})")


def plot(results, path):
    """A PNG: per series, time per call (per sample for lenet-batch) against the point, log-log, one
    line per system; mlp-depth's first-call times dashed. False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (series, by_sys) in zip(axes[0], results.items()):
        _model, what, _d, _q = SCALING[series]
        for s, recs in by_sys.items():
            ok = sorted((r for r in recs.values() if _ok(r)), key=lambda r: r["point"])
            xs = [r["point"] for r in ok]
            div = xs if series == "lenet-batch" else [1] * len(xs)
            line, = ax.loglog(xs, [r["median"] / d for r, d in zip(ok, div)], "o-", label=s)
            if series in COMPILE_SERIES:
                ax.loglog(xs, [r["first"] for r in ok], "s--", color=line.get_color(),
                          label=f"{s} first call")
        points = sorted({x for recs in by_sys.values() for x in recs})
        ax.set_xticks(points, [str(x) for x in points])   # the measured points, not powers of 10
        ax.minorticks_off()
        ax.set_xlabel(what)
        ax.set_ylabel("seconds per sample" if series == "lenet-batch" else "seconds")
        ax.set_title(series)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="How time per call and compile time grow with the "
                                             "work, tracejit vs PyTorch eager (and jax.jit).")
    ap.add_argument("--series", default=",".join(SCALING),
                    help=f"comma-separated, from {','.join(SCALING)} (default: all)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated, from tracejit,torch,jax (default: all)")
    ap.add_argument("--points", default=None,
                    help="comma-separated points for every series chosen (default: the series', "
                         "fewer with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer points, 0.1 s per point")
    ap.add_argument("--seconds", type=float, default=None,
                    help="timed seconds per point (default 1, 0.1 with --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every system (default: all CPUs available)")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds one system may take for one series")
    ap.add_argument("--out", default=".", help="directory for scaling.json and scaling.png")
    args = ap.parse_args(argv)
    args.series = [s.strip() for s in args.series.split(",") if s.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in args.series:
        if s not in SCALING:
            ap.error(f"unknown series {s!r} (one of {', '.join(SCALING)})")
    for s in args.systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r} (one of {', '.join(SYSTEMS)})")
    if args.points is not None:
        try:
            args.points = [int(x) for x in args.points.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--points: expected comma-separated integers, got {args.points!r}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    if args.seconds is None:
        args.seconds = 0.1 if args.quick else 1.0
    args.warmup = 0.02 if args.quick else 0.2
    args.min_samples = 3 if args.quick else 7
    return args


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--child"]:
        s, series, points, out, sec, warm, mins, threads = sys.argv[2:10]
        return child(s, series, [int(x) for x in points.split(",")], out, float(sec), float(warm),
                     int(mins), int(threads))
    args = parse_args(argv)
    for s in [s for s in args.systems if s != "tracejit"]:
        if importlib.util.find_spec(s) is None:
            print(f"{s}: not installed, left out (see benchmarks/README.md)")
            args.systems.remove(s)
    print(f"tracejit scaling  {time.strftime('%Y-%m-%d %H:%M:%S')}  {args.threads} threads per "
          f"system, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tracejit-scaling-") as tmp:
        for series in args.series:
            _model, _what, default, quick = SCALING[series]
            points = args.points or list(quick if args.quick else default)
            results[series] = {}
            for s in args.systems:
                log(f"{series}: {s} at {', '.join(map(str, points))} ...")
                results[series][s] = run_child(s, series, points, args, tmp)
    summary = summarize(results, args.systems)
    print(table(results, summary, args.systems))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scaling.json")
    with open(path, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()},
                   "results": {se: {s: list(r.values()) for s, r in by.items()}
                               for se, by in results.items()},
                   "summary": summary}, f, indent=1, default=str)
    print(f"saved {path}")
    png = os.path.join(args.out, "scaling.png")
    if plot(results, png):
        print(f"plot: {png}")
    else:
        print("plot: matplotlib is not installed, no PNG (pip install matplotlib)")


if __name__ == "__main__":
    main()

"""benchmarks/run.py's rounds and paired step/gradient windows: the aggregation (medians over rounds,
their spread, per-round ratios, paired ratios), the steal-time reading, and one quick run of the
real runner that checks the JSON carries them."""
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def run():
    return _load("run")


@pytest.fixture(scope="module")
def worker():
    return _load("worker")


def _rec(median, **kw):
    return dict({"median": median, "min": median * 0.9, "samples": 10, "batch": 1}, **kw)


# ------------------------------------------------------------------------------------ merging
def test_merge_rounds_median_of_round_medians_and_spread(run):
    m = run.merge_rounds([_rec(3.0, others_cores=0.05, steal_cores=None),
                          _rec(1.0, others_cores=None, steal_cores=0.0),
                          _rec(2.0, others_cores=0.4, steal_cores=0.02)])
    assert m["median"] == 2.0
    assert m["round_medians"] == [3.0, 1.0, 2.0]  # in round order, for per-round ratios
    assert m["spread"] == pytest.approx((3.0 - 1.0) / 2.0)
    assert m["min"] == pytest.approx(0.9)
    assert m["samples"] == 30
    assert m["others_cores"] == 0.4 and m["steal_cores"] == 0.02  # the worst round
    assert "paired" not in m


def test_merge_rounds_one_round(run):
    m = run.merge_rounds([_rec(5e-4, others_cores=None, steal_cores=None)])
    assert m["median"] == 5e-4 and m["spread"] == 0.0
    assert m["others_cores"] is None and m["steal_cores"] is None


def test_merge_rounds_failed_round_is_an_error(run):
    m = run.merge_rounds([_rec(1.0), {"error": "worker killed by SIGSEGV"}, _rec(1.0)])
    assert m == {"error": "worker killed by SIGSEGV (round 2 of 3)"}
    assert run.merge_rounds([{"error": "boom"}]) == {"error": "boom"}


def test_merge_paired_pools_window_pairs(run):
    p1 = {"ratios": [1.0, 1.2, 1.1], "window_s": 0.1, "grad_median": 2.0}
    p2 = {"ratios": [1.3, 1.05, 1.4, 1.15], "window_s": 0.1, "grad_median": 4.0}
    m = run.merge_rounds([_rec(1.0, paired=p1), _rec(2.0, paired=p2)])["paired"]
    pooled = sorted(p1["ratios"] + p2["ratios"])
    assert m["pairs"] == 7
    assert m["ratio"] == pooled[3] == 1.15
    assert (m["p25"], m["p75"]) == (pooled[1], pooled[5])
    assert (m["min"], m["max"]) == (1.0, 1.4)
    assert m["round_ratios"] == [1.1, pytest.approx(1.225)]
    assert m["spread"] == pytest.approx((1.225 - 1.1) / 1.1625)
    assert m["grad_median"] == 3.0


def test_round_ratio_is_median_of_per_round_ratios(run):
    # round 2 hit tracejit with a slow period: the ratio of the medians (3.3) would show it
    tj = {"median": 1.0, "round_medians": [1.0, 2.0, 1.0]}
    torch = {"median": 3.3, "round_medians": [3.0, 6.0, 3.3]}
    ratio, per_round = run.round_ratio(torch, tj)
    assert per_round == [3.0, 3.0, pytest.approx(3.3)]
    assert ratio == 3.0
    # records without rounds (compile): the ratio of the medians
    assert run.round_ratio({"median": 0.5}, {"median": 0.25}) == (2.0, None)


def _results():
    grad_tj = {"median": 1.0e-3, "round_medians": [1.0e-3, 1.5e-3, 0.9e-3], "spread": 0.6}
    grad_pt = {"median": 4.0e-3, "round_medians": [4.0e-3, 4.2e-3, 3.0e-3], "spread": 0.3}
    paired = {"ratio": 1.05, "p25": 1.02, "p75": 1.08, "pairs": 30, "round_ratios": [1.05] * 3}
    step_tj = {"median": 1.1e-3, "round_medians": [1.1e-3, 1.1e-3, 2.0e-3], "spread": 0.8,
               "paired": paired}
    step_pt = {"median": 6.0e-3, "round_medians": [6.0e-3, 7.7e-3, 14.0e-3], "spread": 1.3,
               "paired": dict(paired, ratio=1.4, p25=1.3, p75=1.5)}
    return {"tracejit": {"mlp": grad_tj, "mlp-sgd": step_tj},
            "torch": {"mlp": grad_pt, "mlp-sgd": step_pt}}


def test_build_rows_ratios_per_round_and_paired_step(run, tmp_path):
    rows = run.build_rows(_results(), None, str(tmp_path), ["tracejit", "torch"],
                          ["mlp", "mlp-sgd"])
    by = {(r["workload"], r["system"]): r for r in rows}
    # mlp: per-round torch/tracejit 4.0, 2.8, 3.33 -> 3.33 (the medians' ratio would be 4.0)
    assert by["mlp", "torch"]["speedup"] == pytest.approx(3.0e-3 / 0.9e-3)
    assert by["mlp", "tracejit"]["speedup"] == by["mlp", "torch"]["speedup"]
    assert by["mlp", "tracejit"]["speedup_vs"] == "torch"
    assert len(by["mlp", "torch"]["speedup_rounds"]) == 3
    assert by["mlp", "tracejit"]["spread"] == 0.6
    assert by["mlp", "tracejit"]["round_medians"] == [1.0e-3, 1.5e-3, 0.9e-3]
    # the step over the gradient is the paired ratio, not 1.1 / 1.0 of the medians
    assert by["mlp-sgd", "tracejit"]["step_over_grad"] == 1.05
    assert by["mlp-sgd", "torch"]["step_over_grad"] == 1.4
    assert by["mlp-sgd", "torch"]["speedup"] == pytest.approx(7.0)  # rounds: 5.45, 7.0, 7.0


def test_table_spread_column_and_step_notes(run, tmp_path, capsys):
    rows = run.build_rows(_results(), None, str(tmp_path), ["tracejit", "torch"],
                          ["mlp", "mlp-sgd"])
    run.print_table(rows, {}, "torch")
    run.step_notes(rows)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["workload", "system", "median", "spread"]
    assert "60.0%" in lines[2] and "1.000 ms" in lines[2]
    assert "median: of the 3 rounds' medians" in out
    assert "tracejit 1.05 [1.02-1.08], torch 1.40 [1.30-1.50]" in out
    assert "step/grad 1.050 <= 1.10 ✓" in out
    assert "vs torch 7.00x >= 3x ✓" in out
    assert "window pairs (up to 30, over 3 rounds)" in out


def test_table_without_rounds_has_no_spread_column(run, capsys):
    rows = [{"workload": "mlp", "system": "tracejit", "median_s": 2.5e-4, "round_medians": [2.5e-4],
             "spread": 0.0, "steal_cores": 0.3}]
    run.print_table(rows, {}, None)
    out = capsys.readouterr().out
    assert "spread" not in out.splitlines()[0]
    assert "0.250 ms*" in out  # steal counts as noise
    assert "(steal)" in out


def test_worst_steal(run):
    results = {"tracejit": {"mlp": {"steal_cores": 0.0}, "tiny": {"steal_cores": 0.04},
                            "memory": {"per_call_mb": 1.0}},
               "torch": {"mlp": {"steal_cores": None}}, "jax": "not installed"}
    assert run.worst_steal(results) == {"tracejit": 0.04}


def test_rounds_option(run):
    assert run.parse_args(["--quick"]).rounds == 1
    assert run.parse_args(["--rounds", "3"]).rounds == 3
    with pytest.raises(SystemExit):
        run.parse_args(["--rounds", "0"])


# --------------------------------------------------------------------------------------- worker
STAT = """cpu  4705 356 584 3699 23 23 0 37 0 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 12 0 0
intr 114930548 113199788 3 0 5 263 0 4 [...]
"""


def test_parse_steal(worker):
    assert worker.parse_steal(STAT) == 37  # the cpu line (all CPUs), not cpu0's
    assert worker.parse_steal("cpu  1 2 3 4 5 6 7\n") is None  # no steal field
    assert worker.parse_steal("intr 1 2\n") is None
    assert worker.steal_cores(10.0, 10.5, 2.0) == 0.25
    assert worker.steal_cores(None, 10.5, 2.0) is None
    with open("/proc/stat") as f:  # the real file has the field on Linux
        assert worker.parse_steal(f.read()) >= 0


class FakeClock:
    """time.perf_counter for worker.py: advanced by the fake calls; between `slow` times every call
    costs `factor` times as much (a slow period of the machine)."""

    def __init__(self, slow=(0.0, 0.0), factor=1.0):
        self.now, self.slow, self.factor, self.calls = 0.0, slow, factor, []

    def perf_counter(self):
        return self.now

    def call(self, name, cost):
        def f():
            self.calls.append(name)
            self.now += cost * (self.factor if self.slow[0] <= self.now < self.slow[1] else 1.0)
        return f


def test_time_paired_alternates_windows(worker, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(worker, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    rec = worker.time_paired(clock.call("s", 3e-4), clock.call("g", 2.5e-4), 0.2, 0.01)
    p = rec["paired"]
    assert len(p["ratios"]) == worker.MIN_PAIRS
    assert p["window_s"] == pytest.approx(0.2 / (2 * worker.MIN_PAIRS))
    assert all(r == pytest.approx(1.2) for r in p["ratios"])
    assert rec["median"] == pytest.approx(3e-4) and p["grad_median"] == pytest.approx(2.5e-4)
    assert rec["batch"] == 1 and p["grad_batch"] == 1
    # after the warm-ups, windows grad, step | step, grad | grad, step: runs of calls g s g s
    # whose middle two are two windows long
    timed = "".join(clock.calls[rec["warmup_calls"] + p["grad_warmup_calls"]:])
    runs = [(c[0], len(c)) for c in timed.replace("gs", "g s").replace("sg", "s g").split()]
    assert [c for c, _n in runs] == ["g", "s", "g", "s"]
    assert abs(runs[1][1] - 2 * runs[3][1]) <= 2 and abs(runs[2][1] - 2 * runs[0][1]) <= 2


def test_time_paired_ratio_survives_a_slow_period(worker, monkeypatch):
    # 2 s of pairs, a 3x slow period over 0.5 s of it: only pairs cut by its edges see it
    clock = FakeClock(slow=(0.8, 1.3), factor=3.0)
    monkeypatch.setattr(worker, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    rec = worker.time_paired(clock.call("s", 1e-3), clock.call("g", 1e-3), 2.0, 0.02)
    p = rec["paired"]
    assert len(p["ratios"]) == 10
    assert statistics.median(p["ratios"]) == pytest.approx(1.0)
    assert sum(r != pytest.approx(1.0) for r in p["ratios"]) <= 2
    assert rec["min"] == pytest.approx(1e-3) and rec["p75"] >= 1e-3


# ------------------------------------------------------------------------------------ end to end
def test_quick_run_json_has_rounds_and_pairs(tmp_path):
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--systems", "tracejit",
         "--workloads", "tiny,mlp-sgd", "--rounds", "2", "--no-peak", "--threads", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=120,
        cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(round 2 of 2)" in done.stderr
    data = json.loads(out.read_text())
    assert data["args"]["rounds"] == 2
    rows = {r["workload"]: r for r in data["rows"]}
    for w in ("tiny", "mlp-sgd"):
        assert len(rows[w]["round_medians"]) == 2
        assert rows[w]["spread"] >= 0
        assert "steal_cores" in rows[w]
    p = rows["mlp-sgd"]["paired"]
    assert p["pairs"] >= 6 and len(p["round_ratios"]) == 2
    assert 0.5 < p["ratio"] < 3.0  # a step is a gradient and an update
    assert "step / grad: tracejit" in done.stdout

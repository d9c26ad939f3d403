"""benchmarks/scaling.py (how cost grows) and the resnet8 workload of benchmarks/run.py.

The scaling script runs for real on a tiny subset (tracejit alone, one series, two points, short
timings), so its processes, table and JSON are exercised end to end; the report's arithmetic (the
fitted exponent, the peer ratios, the batch-1 verdict) is checked on made-up timings.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tracejit
from helpers import use_backend
from torch_golden import torch_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import scaling  # noqa: E402
import systems  # noqa: E402
import workloads  # noqa: E402


def test_scaling_quick_run_prints_the_table_and_finite_exponents(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "scaling.py"), "--quick", "--series", "mlp-depth",
         "--points", "1,2", "--systems", "tracejit", "--seconds", "0.01", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    i = lines.index("mlp-depth: deepmlp, depth 1, 2")
    assert lines[i + 1].split() == ["depth", "tracejit", "per", "call", "tracejit", "first", "call"]
    assert set(lines[i + 2]) == {"-", " "}
    rows = [line.split() for line in lines[i + 3:i + 5]]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(r[2] in ("us", "ms", "s") and float(r[1]) > 0 for r in rows), rows
    assert lines[i + 5].startswith("growth exponent of time per call in depth: tracejit ")
    data = json.loads((tmp_path / "scaling.json").read_text())
    ex = data["summary"]["mlp-depth"]["exponents"]["tracejit"]
    assert math.isfinite(ex["run"]) and math.isfinite(ex["first"]), ex
    recs = data["results"]["mlp-depth"]["tracejit"]
    assert [r["point"] for r in recs] == [1, 2] and all(r["median"] > 0 for r in recs)
    assert "plot: " in proc.stdout


def _fake(times):
    return {x: {"point": x, "median": t, "first": 10 * t} for x, t in times.items()}


def test_scaling_plot_writes_a_png(tmp_path):
    """The plot (matplotlib, from the test extra): one panel per series, a PNG file."""
    results = {"lenet-batch": {"tracejit": _fake({1: 1e-4, 4: 2e-4, 16: 4e-4}),
                               "torch": _fake({1: 3e-4, 4: 1.2e-3, 16: 4.8e-3})}}
    path = tmp_path / "scaling.png"
    assert scaling.plot(results, str(path)) is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_scaling_report_fits_exponents_and_ratios_per_point():
    # tracejit ~ batch^0.5, torch ~ batch^1 (and slower at batch 1), jax missing one point
    results = {"lenet-batch": {
        "tracejit": _fake({1: 1e-4, 4: 2e-4, 16: 4e-4}),
        "torch": _fake({1: 3e-4, 4: 1.2e-3, 16: 4.8e-3}),
        "jax": {**_fake({1: 5e-5, 16: 1e-3}), 4: {"point": 4, "error": "RuntimeError: boom"}}}}
    systems_ = ["tracejit", "torch", "jax"]
    summary = scaling.summarize(results, systems_)
    ex = summary["lenet-batch"]["exponents"]
    assert ex["tracejit"]["run"] == pytest.approx(0.5)
    assert ex["torch"]["run"] == pytest.approx(1.0)
    assert summary["lenet-batch"]["ratios"]["torch"] == pytest.approx({1: 3.0, 4: 6.0, 16: 12.0})
    assert summary["lenet-batch"]["ratios"]["jax"] == pytest.approx({1: 0.5, 16: 2.5})
    text = scaling.table(results, summary, systems_)
    assert "torch/tracejit" in text and "jax/tracejit" in text
    row4 = next(line.split() for line in text.splitlines() if line.split()[:1] == ["4"])
    # batch 4: per-sample times (50 us, 300 us), jax's error, then the ratios
    assert row4 == ["4", "50.0", "us", "300.0", "us", "error", "6.00x", "-"]
    assert "batch 1: tracejit vs torch 3.00x, jax 0.50x (NOT faster than every peer" in text
    assert "jax at 4: RuntimeError: boom" in text
    assert scaling.growth_exponent([1], [1.0]) is None


def _small_resnet8():
    """ResNet-8's parameters from the workload, on a batch of 2 images of 8x8 (global average
    pooling makes the model independent of the image size)."""
    params, _ = workloads.make("resnet8")
    rng = np.random.default_rng(3)
    inputs = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
              "labels": np.array([3, 7], np.int64)}
    return params, inputs


@pytest.fixture(scope="module")
def resnet8_tracejit_grads():
    """(params, inputs, tracejit's gradient through the benchmark's own build): one compile of the
    model (seconds) for both tests."""
    params, inputs = _small_resnet8()
    bench = systems.build_model("tracejit", "resnet8", params, inputs)
    return params, inputs, bench.grads(bench.step())


def test_resnet8_tracejit_gradient_matches_finite_differences(resnet8_tracejit_grads):
    params, inputs, g = resnet8_tracejit_grads
    assert set(g) == set(params)
    # the directional derivative in float64 on the reference interpreter, central differences
    rng = np.random.default_rng(4)
    d = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    loss = tracejit.jit(workloads.tracejit_resnet8_loss)
    eps = 1e-5
    with use_backend("interpreter"):
        lp, lm = (float(loss({k: p64[k] + s * eps * d[k] for k in p64},
                             inputs["x"].astype(np.float64), inputs["labels"])) for s in (1, -1))
    fd = (lp - lm) / (2 * eps)
    ad = sum(float(np.vdot(g[k].astype(np.float64), d[k])) for k in g)
    assert ad == pytest.approx(fd, rel=1e-3, abs=1e-5)


def test_resnet8_tracejit_gradient_matches_pytorch(resnet8_tracejit_grads):
    params, inputs, got = resnet8_tracejit_grads

    def compute(torch):   # PyTorch's gradient through the benchmark's own torch build, stored
        systems.import_system("torch", 1)
        bench = systems.build_model("torch", "resnet8", params, inputs)
        return bench.grads(bench.step())
    want = torch_reference("benchmarks-resnet8-small", compute)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * np.abs(want[k]).max(),
                                   err_msg=k)

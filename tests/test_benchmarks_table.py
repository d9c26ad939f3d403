"""benchmarks/run.py prints its table even when every measurement failed (a worker that could not
start, e.g. on a machine without llvmlite, used to end the run in a TypeError instead of the
workers' error messages)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def run():
    """benchmarks/run.py as a module (loaded once)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", BENCHMARKS / "run.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_table_of_errors_only(run, capsys):
    rows = [{"workload": "mlp", "system": "tracejit", "error": "ModuleNotFoundError: llvmlite"},
            {"workload": "mlp", "system": "torch", "error": "not installed"}]
    run.print_table(rows, {}, None)
    out = capsys.readouterr().out
    assert "error: ModuleNotFoundError: llvmlite" in out
    assert "error: not installed" in out
    assert out.splitlines()[0].split()[:2] == ["workload", "system"]


def test_table_mixes_errors_and_results(run, capsys):
    rows = [{"workload": "mlp", "system": "tracejit", "median_s": 2.5e-4, "gflops": 100.0},
            {"workload": "mlp", "system": "torch", "error": "boom"}]
    run.print_table(rows, {}, None)
    out = capsys.readouterr().out
    assert "0.250 ms" in out and "100.0" in out and "error: boom" in out

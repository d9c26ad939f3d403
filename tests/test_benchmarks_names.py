"""The benchmark scripts run with their folder first on sys.path: a script named like a standard
library module (profile.py) shadows it for every import in that process (cProfile, and torch
through it)."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_benchmark_script_shadows_a_standard_module():
    names = {p.stem for p in BENCHMARKS.glob("*.py")}
    assert len(names) > 5
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)

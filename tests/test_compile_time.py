"""What the first call of a fresh process spends besides LLVM: no import it does not need, and
the benchmark's compile time measured with the package byte-compiled, as an installed copy is."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_MASKED_ARRAY_MODULE = """
import sys
import numpy as np
import tracejit
tracejit.config.backend = "interpreter"
g = tracejit.jit_grad(lambda p, x: ((x @ p["w"]) ** 2).sum())
g({"w": np.ones((3, 2), np.float32)}, np.ones((4, 3), np.float32))
assert "numpy.ma" not in sys.modules, "a first call imported numpy.ma"
"""


def _run(program: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", program], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_flattening_arguments_does_not_import_numpy_ma():
    """numpy imports numpy.ma lazily (0.04 s): the masked-array check of the arguments must not
    be what imports it."""
    _run(NO_MASKED_ARRAY_MODULE)


def test_the_benchmark_byte_compiles_the_package_its_workers_import():
    """benchmarks/run.py writes tracejit's .pyc files before timing a first call (as pip does on
    install): the code generator's, which a first call imports, are among them."""
    bench = os.path.join(ROOT, "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import importlib.util

    import run
    import tracejit.codegen.runtime as module
    cached = importlib.util.cache_from_source(module.__file__)
    if os.path.exists(cached):
        os.unlink(cached)
    message = run.byte_compile_tracejit()
    assert message.startswith("tracejit: byte-compiled "), message
    assert os.path.exists(cached), (message, cached)

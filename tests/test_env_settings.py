"""Environment settings that change the generated code, each run in a fresh process (they are read
once per process): TRACEJIT_NO_OPENMP (every kernel on the calling thread, no thread teams) and
TRACEJIT_NO_EPILOGUES (no elementwise epilogue fused into a conv/matmul/pool kernel).

A LeNet-like gradient (conv -> relu -> max-pool -> linear -> cross-entropy, a batch large enough
for thread teams) is compiled with the setting and without it: the value against the numpy
references, the gradients against the reference interpreter, and the dumps show the setting took
effect (no tj_parallel call in the LLVM IR; no epilogue in the optimized IR) where the default
build has it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import helpers

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = {"default": {}, "no_openmp": {"TRACEJIT_NO_OPENMP": "1"},
            "no_epilogues": {"TRACEJIT_NO_EPILOGUES": "1"}}
LABELS = np.arange(32) % 10
F32_TOL = (2e-5, 2e-5)


def _loss(ns, p, x):
    h = ns.max_pool2d(ns.relu(ns.conv2d(x, p["conv"], p["bias"], padding=1)), 2)
    return ns.cross_entropy(ns.linear(ns.flatten(h), p["w"], p["b"]), LABELS)


def _args(dtype=np.float32):
    """float32, as training runs (float64 would give the same checks)."""
    rng = np.random.default_rng(11)
    p = {"conv": rng.normal(size=(8, 3, 3, 3)) / 5, "bias": rng.normal(size=8) * 0.1,
         "w": rng.normal(size=(10, 8 * 8 * 8)) / 23, "b": rng.normal(size=10) * 0.1}
    p = {k: v.astype(dtype) for k, v in p.items()}
    return p, rng.normal(size=(len(LABELS), 3, 16, 16)).astype(dtype)


def _run_worker(tmp_path, setting):
    out = tmp_path / f"{setting}.npz"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRACEJIT_NO_OPENMP", "TRACEJIT_NO_EPILOGUES")}
    env.update(SETTINGS[setting], PYTHONPATH=os.pathsep.join([ROOT, HERE,
                                                              os.environ.get("PYTHONPATH", "")]),
               TRACEJIT_NUM_THREADS="2")   # thread teams even on a one-core host
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, dict(np.load(out))


@pytest.mark.parametrize("setting", SETTINGS)
def test_setting_changes_the_code_not_the_results(tmp_path, setting):
    report, arrays = _run_worker(tmp_path, setting)
    from corpus import NP
    p, x = _args(np.float64)
    helpers.assert_close(arrays["native value"], _loss(NP, p, x), F32_TOL,
                         f"{setting}: loss against numpy (float64)")
    grads = [k for k in arrays if k.startswith("native grad")]
    assert len(grads) == 5   # the four parameters and x
    for k in grads:
        helpers.assert_close(arrays[k], arrays[k.replace("native", "interpreter")],
                             F32_TOL, f"{setting}: {k} against the interpreter")
    threads_used = report["parallel_calls"] > 0
    epilogues = report["epilogue_kernels"] > 0
    assert threads_used == (setting != "no_openmp"), report
    assert epilogues == (setting != "no_epilogues"), report


# ------------------------------------------------------------------------------------------------
# the worker: `python test_env_settings.py OUT.npz` with the setting in its environment
# ------------------------------------------------------------------------------------------------
def _worker(out):
    import tracejit
    from corpus import TJ
    from helpers import tree_leaves, use_backend

    p, x = _args()
    g = tracejit.jit_value_and_grad(lambda p, x: _loss(TJ, p, x), argnums=(0, 1))
    arrays = {}
    for backend in ("llvm", "interpreter"):
        with use_backend(backend):
            value, grads = g(p, x)
        arrays[f"{backend} value"] = value
        for i, leaf in enumerate(tree_leaves(grads)):
            arrays[f"{backend} grad {i}"] = leaf
    np.savez(out, **{k.replace("llvm", "native"): v for k, v in arrays.items()})
    llvm_ir = g.ir(p, x, stage="llvm")
    optimized = g.ir(p, x, stage="optimized")
    print(json.dumps({
        "parallel_calls": llvm_ir.count("call void @tj_parallel")
        + llvm_ir.count('call void @"tj_parallel"'),
        "epilogue_kernels": sum("// kernel" in line and "epilogue" in line
                                for line in optimized.splitlines()),
    }))


if __name__ == "__main__":
    _worker(sys.argv[1])

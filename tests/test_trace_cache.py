"""The persistent trace cache (tracejit/trace_cache.py): a new process, or a new jitted function
with the same source, closure, globals and signature, takes the traced, differentiated and
optimized IR from the cache instead of tracing; any change to what the trace depends on traces
again, and functions whose dependencies cannot be fingerprinted reliably are always traced.

Traces are counted with trace_cache.stats["traces"] (Jitted._compile), not timed. The in-process
tests ask for the IR dumps (which trace but compile nothing) with a private cache directory; the
interpreter never uses the cache (it is the test oracle)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tracejit
from tracejit import trace_cache
from tracejit.codegen.cache import DiskCache
from helpers import use_backend

pytestmark = pytest.mark.needs_llvm  # the trace cache serves the native backend

ROOT = Path(__file__).resolve().parents[1]

X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
W = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])

SOURCE = """
import numpy as np
import tracejit
from tracejit import nn

SCALE = {scale}

def helper(h):
    return {helper}

def make(offset):
    def loss(w, x):
        h = helper(x @ w) * SCALE + offset
        return (h * h).sum()
    return loss
"""


def define(scale=2.0, helper="tracejit.tanh(h)", offset=0.5, kind=tracejit.jit_grad):
    """A jitted function made from SOURCE in a fresh module namespace (as a new process would)."""
    ns = {"__name__": "trace_cache_user"}
    exec(compile(SOURCE.format(scale=scale, helper=helper), "<trace-cache-test>", "exec"), ns)
    return kind(ns["make"](offset))


def traces_of(g, *args):
    """(traces it took, the IR after the adjoint) for `g` at `args` (no native compile)."""
    before = trace_cache.stats["traces"]
    result = g.ir(*args, stage="grad")
    return trace_cache.stats["traces"] - before, result


@pytest.fixture
def private_cache(tmp_path):
    old = tracejit.config.cache, tracejit.config.cache_dir
    tracejit.config.cache, tracejit.config.cache_dir = True, str(tmp_path / "cache")
    with use_backend("llvm"):
        yield tmp_path / "cache"
    tracejit.config.cache, tracejit.config.cache_dir = old


def test_the_same_function_again_skips_tracing_and_gives_the_same_result(private_cache):
    n, first = traces_of(define(), W, X)
    assert n == 1 and list(private_cache.glob("*.trace"))
    n, again = traces_of(define(), W, X)
    assert n == 0
    assert again == first and "tanh" in again and "matmul" in again
    g = define()
    assert traces_of(g, W, X)[0] == 0   # a hit keeps every stage for the dumps
    assert "tanh" in g.ir(W, X, stage="forward") and "matmul" in g.ir(W, X, stage="optimized")


def test_the_interpreter_always_traces(private_cache):
    with use_backend("interpreter"):
        for _ in range(2):
            assert traces_of(define(), W, X)[0] == 1
    assert not list(private_cache.glob("*.trace"))


@pytest.mark.parametrize("change", [
    dict(offset=0.25),                          # a closure cell's value
    dict(scale=3.0),                            # a global constant
    dict(helper="tracejit.tanh(h) * 1.0"),      # a called helper's source
    dict(kind=tracejit.jit_value_and_grad),     # the transformation
    "signature",                                # the arguments' shapes
])
def test_a_change_the_trace_depends_on_traces_again(private_cache, change):
    assert traces_of(define(), W, X)[0] == 1
    assert traces_of(define(), W, X)[0] == 0   # unchanged: a hit
    if change == "signature":
        n, _ = traces_of(define(), W[:2], X[:, :2])
    else:
        n, _ = traces_of(define(**change), W, X)
    assert n == 1


UNCACHEABLE = {   # module sources (np and tracejit are in their namespace)
    "a captured array": """
SCALE_ARRAY = np.ones(2)
def loss(w, x):
    return ((x @ w) * SCALE_ARRAY).sum()
""",
    "a side effect": """
calls = []
def loss(w, x):
    calls.append(1)
    return (x @ w).sum()
""",
    "print": """
def loss(w, x):
    print(x.shape)
    return (x @ w).sum()
""",
    "a user module": """
import json
def loss(w, x):
    return (x @ w).sum() * len(json.dumps(1))
""",
    "a random number": """
def loss(w, x):
    return (x @ w).sum() * np.random.rand()
""",
    "an unknown object": """
class Opaque:
    k = 2.0
O = Opaque()
def loss(w, x):
    return (x @ w).sum() * O.k
""",
    # a tracejit class's instance carries state its class's name does not tell
    "a tracejit object": """
OPT = tracejit.optim.sgd(0.1)
def loss(w, x):
    return (x @ w).sum() * (1.0 if OPT else 2.0)
""",
}


@pytest.mark.parametrize("what", sorted(UNCACHEABLE))
def test_what_cannot_be_fingerprinted_is_always_traced(private_cache, what, capsys):
    refused = trace_cache.stats["uncacheable"]
    for _ in range(2):
        ns = {"__name__": "trace_cache_user", "np": np, "tracejit": tracejit}
        exec(compile(UNCACHEABLE[what], "<trace-cache-test>", "exec"), ns)
        n, _ = traces_of(tracejit.jit_grad(ns["loss"]), W, X)
        assert n == 1
    assert not list(private_cache.glob("*.trace"))
    assert trace_cache.stats["uncacheable"] == refused + 2


def test_functions_of_tracejit_and_numpy_are_named_not_fingerprinted(private_cache):
    source = """
from tracejit.ops import greater     # made by a factory, published as tracejit.ops.greater
from numpy import float64
def loss(w, x):
    h = x[..., 0:2] @ w[0:2, ...]
    return (tracejit.where(greater(h, 0.0), h, 0.0) * float64(2.0)).sum()
"""
    for expected in (1, 0):
        ns = {"__name__": "trace_cache_user", "np": np, "tracejit": tracejit}
        exec(compile(source, "<trace-cache-test>", "exec"), ns)
        assert traces_of(tracejit.jit_grad(ns["loss"]), W, X)[0] == expected


def test_functions_one_factory_made_are_told_apart_by_the_name_they_are_published_under(
        private_cache):
    """tracejit.less and tracejit.greater are closures of one factory with one __qualname__
    (`_compare.<locals>.f`): their keys must differ, or one would be served the other's trace."""
    x, y = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])
    for name in ("greater", "less", "not_equal", "greater"):
        f = tracejit.jit(getattr(tracejit, name))
        np.testing.assert_array_equal(f(x, y), getattr(np, name)(x, y), err_msg=name)
    assert len(list(private_cache.glob("*.trace"))) == 3


def test_a_corrupt_entry_is_discarded_and_traced_again(private_cache):
    traces_of(define(), W, X)
    (entry,) = private_cache.glob("*.trace")
    DiskCache(private_cache, suffix=".trace").store(entry.stem, b"not a pickle")
    n, _ = traces_of(define(), W, X)
    assert n == 1


SCRIPT = SOURCE.format(scale=2.0, helper="tracejit.tanh(h)") + textwrap.dedent("""
    import json
    from tracejit import trace_cache
    tracejit.config.backend = "llvm"
    w = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])
    x = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    f = tracejit.jit_grad(make(0.5))
    g = f(w, x)
    print(json.dumps({"grad": g.tolist(), "stats": trace_cache.stats,
                      "compile": f.compile_stats()}))
""")


def test_a_second_process_with_the_same_source_does_not_trace(tmp_path):
    env = dict(os.environ, TRACEJIT_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    env.pop("TRACEJIT_CACHE", None)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["stats"]["traces"] == 1 and runs[0]["stats"]["stores"] == 1
    assert runs[1]["stats"]["traces"] == 0 and runs[1]["stats"]["hits"] == 1
    assert [r["compile"]["trace_hits"] for r in runs] == [0, 1]
    assert runs[1]["compile"]["trace"] == 0.0 and runs[1]["compile"]["cache_hits"] == 1
    assert runs[1]["grad"] == runs[0]["grad"]

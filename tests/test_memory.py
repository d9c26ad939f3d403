"""100,000 calls of a small compiled gradient leave the resident set flat: nothing per call is kept
(outputs, argument tuples, arenas, ctypes objects, cache entries)."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import tracejit
from tracejit import nn
from helpers import use_backend

CALLS = 100_000
WARMUP = 2_000
MAX_GROWTH_MB = 20.0

pytestmark = [pytest.mark.slow, pytest.mark.needs_llvm,
              pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                 reason="reads the resident set from /proc/self/statm")]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def growth_mb(call) -> float:
    for _ in range(WARMUP):
        call()
    gc.collect()
    before = rss_mb()
    for _ in range(CALLS):
        call()
    gc.collect()
    return rss_mb() - before


def test_calls_on_the_fast_path_leave_memory_flat():
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(8, 8)), rng.normal(size=(4, 8))
    g = tracejit.jit_grad(lambda w, x: (tracejit.tanh(x @ w) ** 2).sum())
    with use_backend("llvm"):
        grown = growth_mb(lambda: g(w, x))
    assert grown < MAX_GROWTH_MB, f"RSS grew by {grown:.1f} MB over {CALLS} calls"


def test_calls_with_a_parameter_dict_leave_memory_flat():
    """Pytree arguments take the general path (signature, lookup, assembly of the result)."""
    rng = np.random.default_rng(1)
    p = {"w": rng.normal(size=(3, 6)).astype(np.float32), "b": np.zeros(3, np.float32)}
    x = rng.normal(size=(5, 6)).astype(np.float32)
    t = rng.normal(size=(5, 3)).astype(np.float32)
    g = tracejit.jit_value_and_grad(lambda p, x, t: nn.mse_loss(nn.linear(x, p["w"], p["b"]), t))
    with use_backend("llvm"):
        grown = growth_mb(lambda: g(p, x, t))
    assert grown < MAX_GROWTH_MB, f"RSS grew by {grown:.1f} MB over {CALLS} calls"

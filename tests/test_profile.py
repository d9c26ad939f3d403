"""TRACEJIT_PROFILE: compiled code counts each kernel's calls and cycles; the counters never
change the results, and code compiled without them says how to get them."""
import numpy as np
import pytest

import tracejit
from tracejit import nn


def _loss(w, x):
    return nn.relu(x @ w).sum() + tracejit.tanh(w).sum()


def _native(f):
    (entry,) = [e for e in f._cache.values() if getattr(e, "_native", None) is not None]
    return entry._native


def test_profile_counts_every_kernel_call(monkeypatch):
    monkeypatch.setenv("TRACEJIT_PROFILE", "1")
    monkeypatch.setenv("TRACEJIT_CACHE", "0")
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((16, 8)), rng.standard_normal((4, 16))
    f = tracejit.jit_grad(_loss)
    g = f(w, x)
    native = _native(f)
    native.profile(reset=True)
    for _ in range(3):
        np.testing.assert_allclose(f(w, x), g)   # the counters do not change the results
    rows = native.profile()
    assert len(rows) == len(native.plan.groups) >= 2
    assert all(calls == 3 and cycles > 0 for _, calls, cycles in rows), rows
    native.profile(reset=True)
    assert all(calls == 0 and cycles == 0 for _, calls, cycles in native.profile())


def test_profile_needs_the_counters_compiled_in(monkeypatch):
    monkeypatch.delenv("TRACEJIT_PROFILE", raising=False)
    f = tracejit.jit_grad(_loss)
    f(np.ones((16, 8)), np.ones((4, 16)))
    with pytest.raises(RuntimeError, match="TRACEJIT_PROFILE=1"):
        _native(f).profile()

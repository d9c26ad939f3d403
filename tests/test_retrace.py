"""Retracing is explained: the "tracejit" logger says at INFO which argument changed and how, and
warns once when one function has been traced for many signatures. No LLVM needed."""
from __future__ import annotations

import logging

import numpy as np
import pytest

import tracejit

pytestmark = pytest.mark.usefixtures("interpreter_backend")


def total(x, *rest, **kw):
    """The sum of every array in the arguments (static values only select the code path)."""
    out = tracejit.sum(x)
    for v in list(rest) + list(kw.values()):
        if isinstance(v, dict):
            for a in v.values():
                out = out + tracejit.sum(a)
        elif isinstance(v, (list, tuple)):
            for a in v:
                out = out + tracejit.sum(a)
        elif isinstance(v, (np.ndarray, tracejit.Tracer)):
            out = out + tracejit.sum(v)
        else:
            out = out * v
    return out


def loss(x, scale=1.0, params=None):
    return total(x, scale, params or {})


def messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == "tracejit" and r.levelno == level]


def calls_and_log(caplog, calls, fun=loss):
    g = tracejit.jit_grad(fun)
    with caplog.at_level(logging.INFO, logger="tracejit"):
        for args, kwargs in calls:
            g(*args, **kwargs)
    return messages(caplog)


A = np.ones((64, 784), np.float32)
B = np.ones((32, 784), np.float32)


def test_the_first_trace_and_repeated_calls_say_nothing(caplog):
    assert calls_and_log(caplog, [((A,), {}), ((A,), {}), ((A + 1,), {})]) == []


W3 = {"w": np.ones(3)}
CHANGES = {
    "shape": ((A,), {}, (B,), {}, "argument x changed from f32[64,784] to f32[32,784]"),
    "dtype": ((A,), {}, (A.astype(np.float64),), {},
              "argument x changed from f32[64,784] to f64[64,784]"),
    "static": ((A, 0.1), {}, (A, 0.2), {}, "argument scale changed from 0.1 to 0.2"),
    "keys": ((A, 0.1, W3), {}, (A, 0.1, {"w": np.ones(3), "b": np.ones(2)}), {},
             "argument params changed its keys (added 'b')"),
    "nested shape": ((A, 0.1, W3), {}, (A, 0.1, {"w": np.ones(4)}), {},
                     "argument params['w'] changed from f64[3] to f64[4]"),
    "keyword": ((A, 0.1, W3), {}, (A, 0.1), {"params": W3},
                "argument params was passed by keyword, before by position"),
    "missing": ((A, 0.1, W3), {}, (A, 0.1), {},
                "argument params (a dict with keys ['w']) is no longer passed"),
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_a_retrace_names_the_argument_and_the_change(caplog, change):
    args1, kw1, args2, kw2, why = CHANGES[change]
    logged = calls_and_log(caplog, [(args1, kw1), (args2, kw2), (args1, kw1), (args2, kw2)])
    assert logged == [f"loss: retracing because {why}"]


def test_the_explanation_compares_with_the_closest_signature(caplog):
    calls = [((A, 0.1), {}), ((B, 0.2), {}), ((B, 0.3), {})]
    logged = calls_and_log(caplog, calls)
    assert logged[-1] == "loss: retracing because argument scale changed from 0.2 to 0.3"
    assert "argument x changed from f32[64,784] to f32[32,784], and argument scale changed " \
           "from 0.1 to 0.2" in logged[0]


def test_a_list_length_change_is_explained(caplog):
    def f(x, layers):
        return total(x, layers)
    logged = calls_and_log(caplog, [((A, [np.ones(2)]), {}), ((A, [np.ones(2), np.ones(2)]), {})],
                           fun=f)
    assert logged == ["f: retracing because argument layers changed from a list of 1 to a list "
                      "of 2"]


def test_many_signatures_warn_once(caplog, monkeypatch):
    monkeypatch.setattr(tracejit.config, "retrace_warning", 8)
    g = tracejit.jit_grad(loss)
    with caplog.at_level(logging.INFO, logger="tracejit"):
        for n in range(1, 13):
            g(np.ones(n))
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith("loss has been traced for 9 different signatures (the latest "
                                  "because argument x changed from f64[8] to f64[9])")
    assert len(messages(caplog)) == 11


def test_an_unexplainable_change_still_logs(caplog):
    # a static value whose repr does not change although it compares unequal
    class Opaque:
        def __init__(self, k):
            self.k = k

        def __eq__(self, other):
            return isinstance(other, Opaque) and other.k == self.k

        def __hash__(self):
            return hash(self.k)

        def __repr__(self):
            return "Opaque()"

    def f(x, o):
        return tracejit.sum(x)
    logged = calls_and_log(caplog, [((A, Opaque(1)), {}), ((A, Opaque(2)), {})], fun=f)
    assert len(logged) == 1 and logged[0].startswith("f: retracing because its arguments have a "
                                                     "new signature")

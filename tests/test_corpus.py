"""The corpus of whole programs (tests/corpus.py) on the reference interpreter: forward values
against the same program run on numpy references, gradients against float64 finite differences
(float32 too), and second derivatives against finite differences of the gradient."""
import pytest

import corpus
import helpers
import tracejit
from shared_checks import (  # noqa: F401  (run here with this module's backend)
    test_program_forward, test_program_grad, test_program_second_order)

BACKEND = "interpreter"
pytestmark = pytest.mark.usefixtures("interpreter_backend")


@pytest.fixture
def backend():
    return BACKEND


def test_static_loop_length_retraces_once_per_value():
    """One decorated loss traced for k=1 and k=3 (k static): two traces, each matching the
    program run for that k alone, and no third trace when k=1 comes back."""
    traces = []

    def loss(w, x, k):
        traces.append(k)
        return corpus.loop_k(corpus.TJ, w, x, k)

    grad = tracejit.jit_grad(loss, argnums=(0, 1))
    w, x = corpus.loop_args(helpers.rng_for("static-loop"))
    results = {k: grad(w, x, k) for k in (1, 3, 1)}
    assert traces == [1, 3]
    for k in (1, 3):
        fd = helpers.numeric_grad(lambda w, x: corpus.loop_k(corpus.NP, w, x, k), (w, x), (0, 1))
        helpers.assert_grads_match_fd(results[k], fd, "f64", f"k={k}")
    # k=1 does not touch w[1] and w[2]; k=3 does
    assert not results[1][0][1:].any() and results[3][0][1:].all()

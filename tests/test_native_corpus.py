"""The corpus of whole programs (tests/corpus.py) compiled to native code: forward values against
the numpy references, gradients against float64 finite differences (float32 too) and against the
reference interpreter, and second derivatives run natively."""
import numpy as np
import pytest

import helpers
from corpus import PROGRAMS, program_id
from shared_checks import (  # noqa: F401  (run here with this module's backend)
    test_program_forward, test_program_grad, test_program_second_order)

BACKEND = "llvm"
pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)


@pytest.fixture
def backend():
    return BACKEND


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("prog", PROGRAMS, ids=program_id)
def test_matches_interpreter(prog, dtype):
    args = helpers.program_args(prog, dtype)
    fns = helpers.program_functions(prog)
    results = {}
    for backend in ("llvm", "interpreter"):
        with helpers.use_backend(backend):
            results[backend] = fns["value_and_grad"](*args)
    tol = {"f64": (1e-11, 1e-11), "f32": (2e-5, 2e-5)}[dtype]
    native = helpers.tree_leaves(results["llvm"])
    interp = helpers.tree_leaves(results["interpreter"])
    assert len(native) == len(interp)
    for a, b in zip(native, interp):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        helpers.assert_close(a, b, tol, program_id(prog))

"""Test functions that run on every backend: the op table (tests/optable.py) and the corpus of
whole programs (tests/corpus.py). A test module imports the ones it runs and defines a `backend`
fixture ("interpreter" in the no-LLVM modules, "llvm" in the native ones); the checking logic is in
tests/helpers.py."""
import pytest

import helpers
from corpus import PROGRAMS, program_id
from optable import CASES, GRAD_CASES, SECOND_ORDER_CASES, case_id


# ------------------------------------------------------------------------------------------------
# the op table
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward(case, dtype, backend):
    helpers.check_forward(case, backend, dtype)


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_grad(case, dtype, backend):
    helpers.check_grad(case, backend, dtype)


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_inner_product(case, backend):
    helpers.check_inner_product(case, backend)


@pytest.mark.parametrize("case", SECOND_ORDER_CASES, ids=case_id)
def test_second_order(case, backend):
    helpers.check_second_order(case, backend)


# ------------------------------------------------------------------------------------------------
# the corpus
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("prog", PROGRAMS, ids=program_id)
def test_program_forward(prog, dtype, backend):
    helpers.check_program_forward(prog, backend, dtype)


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("prog", PROGRAMS, ids=program_id)
def test_program_grad(prog, dtype, backend):
    helpers.check_program_grad(prog, backend, dtype)


@pytest.mark.parametrize("prog", [p for p in PROGRAMS if p.second_order], ids=program_id)
def test_program_second_order(prog, backend):
    helpers.check_program_second_order(prog, backend)

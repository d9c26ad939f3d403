"""Shared fixtures. The no-LLVM test modules run on the reference interpreter:

    pytestmark = pytest.mark.usefixtures("interpreter_backend")
"""
import pytest

import helpers


@pytest.fixture
def interpreter_backend():
    """tracejit.config.backend = "interpreter" for the test (restored afterwards)."""
    with helpers.use_backend("interpreter"):
        yield

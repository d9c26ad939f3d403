"""Shared fixtures. The no-LLVM test modules run on the reference interpreter:

    pytestmark = pytest.mark.usefixtures("interpreter_backend")
"""
import os

import pytest

import helpers


@pytest.fixture(scope="session", autouse=True)
def private_compile_cache(tmp_path_factory):
    """The persistent compile cache in a temporary directory, never the user's real one
    (subprocesses inherit TRACEJIT_CACHE_DIR)."""
    old = os.environ.get("TRACEJIT_CACHE_DIR")
    os.environ["TRACEJIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("compile-cache") / "tracejit")
    yield
    if old is None:
        os.environ.pop("TRACEJIT_CACHE_DIR", None)
    else:
        os.environ["TRACEJIT_CACHE_DIR"] = old


@pytest.fixture
def interpreter_backend():
    """tracejit.config.backend = "interpreter" for the test (restored afterwards)."""
    with helpers.use_backend("interpreter"):
        yield

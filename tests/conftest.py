"""Shared fixtures. The no-LLVM test modules run on the reference interpreter:

    pytestmark = pytest.mark.usefixtures("interpreter_backend")

The persistent compile cache of a test run is project-local and kept between runs
(`.pytest_cache/tracejit-compile` under the rootdir, git-ignored), so the op table, the corpus and
the derandomized property tests compile only what changed since the last run. An entry can only
be reused for the same code: its key covers the IR (literal contents included), a hash of every
source file of codegen/, the LLVM/llvmlite versions, the host and the code-changing TRACEJIT_*
settings, and it is checksummed on load (a corrupt entry is removed and compiled again). Tests of
the cache itself use private temporary directories. TRACEJIT_TEST_COLD_CACHE=1 runs with an empty
temporary cache instead (a cold-compile run).
"""
import os

import pytest

import helpers


@pytest.fixture(scope="session", autouse=True)
def private_compile_cache(request, tmp_path_factory):
    """TRACEJIT_CACHE_DIR for the run (subprocesses inherit it), never the user's real cache."""
    if os.environ.get("TRACEJIT_TEST_COLD_CACHE", "").strip() not in ("", "0"):
        directory = tmp_path_factory.mktemp("compile-cache") / "tracejit"
    else:
        directory = request.config.rootpath / ".pytest_cache" / "tracejit-compile"
    old = os.environ.get("TRACEJIT_CACHE_DIR")
    os.environ["TRACEJIT_CACHE_DIR"] = str(directory)
    yield directory
    if old is None:
        os.environ.pop("TRACEJIT_CACHE_DIR", None)
    else:
        os.environ["TRACEJIT_CACHE_DIR"] = old


@pytest.fixture
def interpreter_backend():
    """tracejit.config.backend = "interpreter" for the test (restored afterwards)."""
    with helpers.use_backend("interpreter"):
        yield


@pytest.fixture
def avx2_target(monkeypatch):
    """Code compiled for the AVX2 level (TRACEJIT_TARGET=avx2: 16 vector registers, 256-bit
    vectors) whatever the host, for tests of the choices made for 16 registers: every machine of
    this project has had AVX2, and an AVX-512 host runs that code too (codegen/target.py).
    The target is read when a function is compiled: a jitted function called before the fixture
    keeps its host code (compile a fresh one, as helpers.check_native_matches_interpreter does)."""
    monkeypatch.setenv("TRACEJIT_TARGET", "avx2")

"""The README shows what runs: every Python snippet of the tour runs on its own (its imports
included) and prints exactly the output block that follows it, on the default (native) backend;
the IR dumps it quotes are what examples/quickstart.py prints."""
import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()

# a ```python block, then (after blank lines) an unlabelled ``` block: the snippet and its output
_PAIR = re.compile(r"```python\n(.*?)```\n\s*```\n(.*?)```", re.S)
SNIPPETS = _PAIR.findall(README)


def test_the_tour_has_snippets_with_outputs():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("code,expected", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_prints_its_output(code, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.join(ROOT, "examples"))  # quickstart-style snippets name no paths
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})  # a fresh namespace
    # a snippet that also prints IR dumps shows only the first lines of its output
    assert out.getvalue().startswith(expected), (out.getvalue(), expected)


def test_quoted_dumps_are_what_quickstart_prints():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT, "TRACEJIT_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr
    # the "optimized" dump shows the plan for the thread count in force: the README's is for two
    dumps = re.findall(r"```\n(func @loss\.grad.*?\n)```", README, re.S)
    assert len(dumps) == 2  # the "grad" and the "optimized" stage
    # The arena's size includes the kernels' scratch, which follows the machine's vector width
    # and register blocks (the README's is from an AVX-512 machine): the number is compared
    # only on one like it, the rest everywhere
    from tracejit.codegen.target import host_info
    arena = re.compile(r"intermediate arena \d+ bytes")
    for dump in dumps:
        if not host_info()["avx512"]:
            dump, out = arena.sub("intermediate arena N bytes", dump), \
                arena.sub("intermediate arena N bytes", run.stdout)
            assert "intermediate arena N bytes" in out
        else:
            out = run.stdout
        assert dump in out, dump

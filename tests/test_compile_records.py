"""codegen's `record` decorator: the dataclass contract the code generator relies on (equality
and hashing of compile-time keys, keyword-only parameter records, factories, `dataclasses.fields`
and `replace`), at a fraction of dataclass's cost when the kernels are imported."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from tracejit.codegen import record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@record(frozen=True)
class _Key:
    dtype: str
    width: int = 8


@record(frozen=True, kw_only=True)
class _Params:
    rows: int
    cols: "int" = 1


@record
class _Mutable:
    name: str
    members: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.seen = True


def test_frozen_records_compare_and_hash_by_fields_like_dataclasses():
    a, b = _Key("f32"), _Key("f32", 8)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != _Key("f32", 16) and a != _Key("f64")
    assert a != ("f32", 8)   # another class is never equal
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.width = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        del a.dtype
    assert repr(a) == "_Key(dtype='f32', width=8)"


def test_keyword_only_records_and_the_dataclasses_helpers():
    p = _Params(rows=3)
    with pytest.raises(TypeError):
        _Params(3)
    assert [f.name for f in dataclasses.fields(_Params)] == ["rows", "cols"]
    assert dataclasses.fields(_Params)[1].type == "'int'"
    assert dataclasses.is_dataclass(p)
    assert dataclasses.replace(p, cols=4) == _Params(rows=3, cols=4)
    with pytest.raises(TypeError):
        _Params(rows=1, depth=2)


def test_mutable_records_are_unhashable_and_get_fresh_defaults():
    a, b = _Mutable("x"), _Mutable("x")
    assert a == b and a.seen
    a.members.append(1)
    assert b.members == [] and a != b
    a.name = "y"
    assert a.name == "y"
    with pytest.raises(TypeError):
        hash(a)


def test_records_match_dataclasses_on_the_same_class_body():
    def body():
        class K:
            a: int
            b: tuple = (1,)
        return K
    ours, theirs = record(frozen=True)(body()), dataclasses.dataclass(frozen=True)(body())
    for args in [(1,), (2, (3,))]:
        x, y = ours(*args), theirs(*args)
        assert dataclasses.astuple(x) == dataclasses.astuple(y)
        assert repr(x).split("(", 1)[1] == repr(y).split("(", 1)[1]


def test_importing_the_code_generator_runs_no_dataclass_machinery():
    """Each dataclass costs ~1.5 ms of `exec` at import: the first compile imports ~40 records."""
    program = ("import dataclasses, tracejit\n"
               "def refuse(*a, **k): raise AssertionError('a dataclass on the compile path')\n"
               "dataclasses._process_class = refuse\n"
               "import tracejit.codegen.runtime\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", program], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_bad_arguments_are_refused_as_dataclass_refuses_them():
    for call in (lambda: _Key(), lambda: _Key("f32", 8, 1), lambda: _Key("f32", dtype="f64"),
                 lambda: _Key("f32", depth=1), lambda: _Params(cols=2)):
        with pytest.raises(TypeError, match=r"__init__\(\)"):
            call()
    assert _Key(width=4, dtype="f16") == _Key("f16", 4)

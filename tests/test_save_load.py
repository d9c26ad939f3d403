"""tracejit.save / tracejit.load: exact round trips of parameter and optimizer-state trees, no
pickle, and atomic replacement (a failure mid-write leaves the old file intact)."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

import tracejit
from tracejit import io as tio

pytestmark = pytest.mark.usefixtures("interpreter_backend")


def example_tree():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4),
              "layers": [np.ones((2, 3)), np.array(2.5)]}
    opt = tracejit.optim.adam()
    return {"params": params, "opt": opt.init(params), "epoch": 3,
            "ints": [np.arange(6, dtype=np.int32).reshape(2, 3), np.full((), -3, np.int64)],
            "lr": 0.001, "name": "mlp",
            "done": False, "note": None, 7: (np.int64(5), np.float32(0.5), np.array([True, False])),
            "empty": {"a": [], "b": ()}, "big": np.arange(4, dtype=">f8").reshape(2, 2).T,
            "c": np.array([1 + 2j], np.complex64), "u": np.array(7, np.uint8)}


def assert_same(a, b, path="tree"):
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, path


def test_round_trip_is_exact(tmp_path):
    tree = example_tree()
    path = tmp_path / "ckpt.npz"
    tracejit.save(path, tree)
    back = tracejit.load(path)
    assert_same(back, tree)
    assert back["params"]["layers"][1].ndim == 0 and back["opt"]["step"].ndim == 0
    assert back["ints"][1].shape == () and back["ints"][1].dtype == np.int64
    assert back["big"].flags.c_contiguous and back["big"].flags.writeable
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no suffix added, no temporary file left


def test_special_floats_and_keys(tmp_path):
    tree = {"nan": float("nan"), "inf": -float("inf"), "neg0": -0.0, "big": 2 ** 80, 3: "x"}
    tracejit.save(tmp_path / "f", tree)
    back = tracejit.load(tmp_path / "f")
    assert list(back) == ["nan", "inf", "neg0", "big", 3]
    assert np.isnan(back["nan"]) and back["inf"] == -float("inf")
    assert str(back["neg0"]) == "-0.0" and back["big"] == 2 ** 80 and back[3] == "x"


def test_file_has_no_pickle(tmp_path):
    path = tmp_path / "ckpt.npz"
    tracejit.save(path, example_tree())
    with np.load(path, allow_pickle=False) as z:  # would raise on any object array
        for k in z.files:
            assert z[k].dtype != object
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert "__tracejit_structure__.npy" in names and all(n.endswith(".npy") for n in names)


@pytest.mark.parametrize("bad,match", [
    ({"f": lambda x: x}, "tree\\['f'\\] is a function"),
    ({"o": np.array([object()], dtype=object)}, "tree\\['o'\\] is an array of dtype object"),
    ({(1, 2): np.ones(2)}, "key \\(1, 2\\) of type tuple"),
    ([np.ma.masked_array([1.0, 2.0], mask=[0, 1])], "tree\\[0\\] is a masked array"),
])
def test_unsupported_values_raise_type_error_naming_the_path(tmp_path, bad, match):
    path = tmp_path / "ckpt"
    tracejit.save(path, {"old": np.ones(2)})
    with pytest.raises(TypeError, match=match):
        tracejit.save(path, bad)
    assert_same(tracejit.load(path), {"old": np.ones(2)})
    assert os.listdir(tmp_path) == ["ckpt"]


def test_tracer_cannot_be_saved(tmp_path):
    @tracejit.jit
    def f(x):
        tracejit.save(tmp_path / "t", {"x": x})
        return x

    with pytest.raises(TypeError, match="tree\\['x'\\] is a traced value"):
        f(np.ones(2))


def test_failure_mid_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    old = {"w": np.arange(3.0)}
    tracejit.save(path, old)
    before = path.read_bytes()

    def write_half_then_fail(f, arrays):
        f.write(b"PK\x03\x04 partial archive")
        raise OSError("disk full")

    monkeypatch.setattr(tio, "_write", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tracejit.save(path, {"w": np.zeros(1000)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    monkeypatch.undo()
    assert_same(tracejit.load(path), old)


def test_interrupt_inside_numpy_writer_leaves_old_file(tmp_path, monkeypatch):
    """A failure deep inside numpy's writer (after the first arrays went out) and a
    KeyboardInterrupt are cleaned up the same way."""
    path = tmp_path / "ckpt.npz"
    tracejit.save(path, [np.ones(2)])
    before = path.read_bytes()
    real = np.lib.format.write_array
    calls = []

    def write_array(fp, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    with pytest.raises(KeyboardInterrupt):
        tracejit.save(path, [np.zeros(5), np.zeros(6), np.zeros(7)])
    assert len(calls) == 2
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.npz"]


def test_replacing_keeps_permissions(tmp_path):
    path = tmp_path / "ckpt"
    tracejit.save(path, [np.ones(1)])
    os.chmod(path, 0o600)
    tracejit.save(path, [np.zeros(1)])
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert_same(tracejit.load(path), [np.zeros(1)])


def test_load_refuses_foreign_files(tmp_path):
    np.savez(tmp_path / "plain.npz", x=np.ones(2))
    with pytest.raises(ValueError, match="without a tracejit structure entry"):
        tracejit.load(tmp_path / "plain.npz")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a tracejit.save file"):
        tracejit.load(tmp_path / "pickled.npy")
    tampered = {"__tracejit_structure__": np.frombuffer(json.dumps(
        {"format": "tracejit.save", "version": 1, "tree": {"array": 5}}).encode(), np.uint8)}
    np.savez(tmp_path / "tampered.npz", **tampered)
    with pytest.raises(ValueError, match="malformed structure"):
        tracejit.load(tmp_path / "tampered.npz")


def test_training_state_round_trip_continues_identically(tmp_path):
    """Saving parameters and optimizer state mid-training and resuming from the file gives the
    same trajectory as not stopping."""
    opt = tracejit.optim.sgd(0.1, momentum=0.9)
    params = {"w": np.array([1.0, -2.0])}
    state = opt.init(params)
    grad = {"w": np.array([0.5, 0.25])}
    params, state = opt.update(grad, state, params)
    tracejit.save(tmp_path / "ckpt", {"params": params, "state": state})
    ck = tracejit.load(tmp_path / "ckpt")
    a = opt.update(grad, state, params)
    b = opt.update(grad, ck["state"], ck["params"])
    for x, y in zip(tracejit.tree.leaves(a), tracejit.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)

"""Saving and loading pytrees of arrays (parameters, optimizer state) to one file.

    tracejit.save("ckpt.npz", {"params": params, "opt": state, "epoch": 3})
    ckpt = tracejit.load("ckpt.npz")

The file is a numpy .npz archive: one entry per array and one entry holding a JSON description of
the nest. Nothing is pickled and `load` reads with `allow_pickle=False`, so loading a file from an
untrusted source cannot run code.

What round-trips: dicts (str or int keys, in order), lists, tuples; numpy arrays of bool, integer,
float and complex dtypes with their exact dtype (byte order included) and shape, 0-d ones too;
numpy scalars (back as numpy scalars of the same dtype); Python bool, int, float, str and None.
Arrays come back C-contiguous and writable. Anything else (tracers, object arrays, other classes)
is a TypeError naming its path.

Writing is atomic: the archive is written to a temporary file in the target's directory, flushed
to disk (fsync) and renamed over `path` (os.replace). A failure or crash mid-write leaves the old
file untouched, and the temporary file is removed on any exception.
"""
from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["save", "load"]

FORMAT = "tracejit.save"
VERSION = 1
_STRUCTURE_KEY = "__tracejit_structure__"


# ------------------------------------------------------------------------------------------------
# the JSON description: {"dict": [[key, node], ...]}, {"list": [...]}, {"tuple": [...]},
# {"array": n} (entry "a<n>"), {"scalar": n} (a numpy scalar stored as a 0-d entry), {"py": value}
# ------------------------------------------------------------------------------------------------
def _encode(tree, arrays: dict):
    def go(o, path):
        if isinstance(o, dict):
            items = []
            for k, v in o.items():
                if type(k) not in (str, int):
                    raise TypeError(f"save: {path} has the key {k!r} of type {type(k).__name__}; "
                                    f"dict keys must be str or int")
                items.append([k, go(v, f"{path}[{k!r}]")])
            return {"dict": items}
        if isinstance(o, (list, tuple)):
            kind = "list" if isinstance(o, list) else "tuple"
            return {kind: [go(v, f"{path}[{i}]") for i, v in enumerate(o)]}
        if isinstance(o, (np.ndarray, np.generic)):
            arr = np.asarray(o)
            if arr.dtype.kind not in "biufc":
                raise TypeError(f"save: {path} is an array of dtype {arr.dtype}; only bool, "
                                f"integer, float and complex arrays can be saved")
            if isinstance(o, np.ma.MaskedArray):
                raise TypeError(f"save: {path} is a masked array (its mask would be lost); "
                                f"save x.filled(value) and the mask separately")
            n = len(arrays)
            arrays[f"a{n}"] = arr
            return {"scalar" if isinstance(o, np.generic) else "array": n}
        if o is None or type(o) in (bool, int, float, str):
            return {"py": o}
        what = "a traced value (save concrete arrays, outside the traced function)" \
            if type(o).__name__ == "Tracer" else f"a {type(o).__name__}"
        raise TypeError(f"save: {path} is {what}; a saved tree holds dicts, lists, tuples, numpy "
                        f"arrays and scalars, and Python bool/int/float/str/None")

    return go(tree, "tree")


def _decode(node, z, path: str, seen: set):
    bad = ValueError(f"load: {path}: not a valid tracejit.save file (malformed structure)")
    if not isinstance(node, dict) or len(node) != 1:
        raise bad
    (kind, val), = node.items()
    if kind == "dict":
        if not isinstance(val, list) or not all(isinstance(kv, list) and len(kv) == 2 and
                                                type(kv[0]) in (str, int) for kv in val):
            raise bad
        return {k: _decode(v, z, f"{path}[{k!r}]", seen) for k, v in val}
    if kind in ("list", "tuple"):
        if not isinstance(val, list):
            raise bad
        items = [_decode(v, z, f"{path}[{i}]", seen) for i, v in enumerate(val)]
        return items if kind == "list" else tuple(items)
    if kind in ("array", "scalar"):
        key = f"a{val}"
        if type(val) is not int or key not in z.files or key in seen:
            raise bad
        seen.add(key)
        arr = z[key]
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = arr.copy(order="C")  # not np.ascontiguousarray: it turns 0-d into shape (1,)
        return arr[()] if kind == "scalar" else arr
    if kind == "py":
        if val is not None and type(val) not in (bool, int, float, str):
            raise bad
        return val
    raise bad


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def save(path, tree) -> None:
    """Write `tree` (see the module docstring for what it may hold) to the file `path`, replacing
    it atomically. The name is used as given (no ".npz" is appended, unlike numpy.savez)."""
    path = os.fspath(path)
    arrays: dict = {}
    structure = {"format": FORMAT, "version": VERSION, "tree": _encode(tree, arrays)}
    text = json.dumps(structure, allow_nan=True, ensure_ascii=True)
    arrays[_STRUCTURE_KEY] = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}."
                                  f"{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            _keep_mode(path, tmp)
            _write(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: never leave the temporary file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _write(f, arrays: dict) -> None:
    np.savez(f, **arrays)


def _keep_mode(path: str, tmp: str) -> None:
    """A replaced file keeps its permission bits (a private checkpoint stays private)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        return
    os.chmod(tmp, mode)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); not possible on every platform and file system."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path):
    """The tree saved by `save` at `path`. Never unpickles: a file that is not a tracejit.save
    archive is a ValueError."""
    path = os.fspath(path)
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:  # a .npy/pickle file, not an archive
        raise ValueError(f"load: {path} is not a tracejit.save file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"load: {path} is a single .npy array, not a tracejit.save file")
    with z:
        if _STRUCTURE_KEY not in z.files:
            raise ValueError(f"load: {path} is an .npz archive without a tracejit structure entry "
                             f"(not written by tracejit.save)")
        raw = z[_STRUCTURE_KEY]
        try:
            meta = json.loads(raw.tobytes().decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"load: {path}: the structure entry is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"load: {path} is not a tracejit.save file")
        if meta.get("version") != VERSION:
            raise ValueError(f"load: {path} has format version {meta.get('version')!r}; this "
                             f"tracejit reads version {VERSION}")
        return _decode(meta.get("tree"), z, "tree", set())

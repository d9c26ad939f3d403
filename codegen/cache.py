"""The persistent compile cache: object code of compiled functions, on disk between processes.

An entry is the object file `JITModule` linked for one optimized IR function, stored under the
SHA-256 of a key text that covers everything that changes the code:

- the IR without its provenance comments, with every literal array's dtype, shape and bytes (the
  printer abbreviates large literals) and every instruction's parameters;
- the thread count the module was planned for (`max_threads`: scratch sizes, parallel calls);
- the kernels' blocking overrides (`FORCE` of kernels/matmul.py and kernels/conv2d/layout.py);
- the host: CPU name and features, target triple, the thread pool's version (or that it is off);
- the compiler: the caller's version string (tracejit's), a hash of every source file of
  `codegen/`, llvmlite's and LLVM's versions, and the TRACEJIT_* environment variables that change
  code generation.

Entry file `<sha256 of key>.o`: a header (magic, format, payload length, SHA-256 of the payload,
SHA-256 of the key) and the object file (the trace cache, tracejit/trace_cache.py, keeps its
entries in the same directory and format as `.trace` files). It is written to a temporary file in
the same directory and renamed into place (`os.replace`), so readers see a whole entry or none.
A truncated or corrupted entry fails the header check, is logged (logger "tracejit", WARNING),
removed and compiled again. The directory is created with mode 0o700; a directory that someone
else owns or that others can write to is not used (loading object code from it would run their
code).

The directory: `TRACEJIT_CACHE_DIR`, else `$XDG_CACHE_HOME/tracejit`, else `~/.cache/tracejit`.
`TRACEJIT_CACHE=0` (or `tracejit.config.cache = False`) disables the cache. A hit refreshes the
entry's modification time; the first store of a process prunes the least recently used entries
when the directory holds more than `TRACEJIT_CACHE_MAX_MB` (default 1024) megabytes, since every
change to the code generator leaves the old entries unused.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..ir.core import Function, Namer, instr_text, regions

from . import settings

log = logging.getLogger("tracejit")

FORMAT = 1
MAGIC = b"TRACEJIT"
_HEADER = struct.Struct("<8sIQ32s32s")   # magic, format, payload length, sha256(payload), sha256(key)

# TRACEJIT_* variables that do not change generated code (the thread count is keyed separately as
# `max_threads`); every other one is part of the key.
DEFAULT_MAX_MB = settings.DEFAULT_CACHE_MAX_MB
_STALE_TEMP_SECONDS = 3600
_pruned: set = set()  # directories pruned by this process
# every kind of entry counts toward the size bound (".check": the native leaf check's object
# code, codegen/leafcheck.py)
_ENTRY_SUFFIXES = (".o", ".trace", ".check")

# Counters of this process, for tests and benchmarks.
stats = {"hits": 0, "misses": 0, "stores": 0, "corrupt": 0, "errors": 0}


def enabled_by_env() -> bool:
    return settings.cache_enabled()


def default_directory() -> Path:
    """TRACEJIT_CACHE_DIR, else $XDG_CACHE_HOME/tracejit, else ~/.cache/tracejit (read now)."""
    return settings.cache_directory()


# ------------------------------------------------------------------------------------------------
# the key
# ------------------------------------------------------------------------------------------------
def ir_key_text(fn: Function) -> str:
    """The IR of `fn` as the code generator sees it: the printed instructions without provenance
    comments (so moving code in the user's file does not invalidate the entry), inline constants
    included, and a digest of every array parameter (literal contents)."""
    namer = Namer()
    lines = [fn.name]
    for p in fn.params:
        lines.append(f"param %{namer.define(p)}: {p.type}")
    for ins in fn.instrs:
        namer.define(ins.out)
        lines.append(instr_text(ins, namer, with_comment=False))
        for k, arr in _array_params(ins.params):
            arr = np.ascontiguousarray(arr)
            digest = hashlib.sha256(arr.view(np.uint8).reshape(-1) if arr.size else b"").hexdigest()
            lines.append(f"  {k}: {arr.dtype.str}{list(arr.shape)} sha256={digest}")
        for name, body in regions(ins):   # a loop's body is part of its code
            lines.append(f"  {name} {{")
            lines.extend("    " + line for line in ir_key_text(body).split("\n"))
            lines.append("  }")
    lines.append("return " + ", ".join(namer.ref(o) for o in fn.outputs))
    return "\n".join(lines)


def _array_params(params: dict, prefix=""):
    for k, v in params.items():
        yield from _arrays(v, f"{prefix}{k}")


def _arrays(v, path):
    if isinstance(v, np.ndarray):
        yield path, v
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _arrays(x, f"{path}[{i}]")
    elif isinstance(v, dict):
        yield from _array_params(v, f"{path}.")


@functools.lru_cache(maxsize=None)
def codegen_source_hash() -> str:
    """SHA-256 over the sources of `codegen/` (this package, kernels included): any change to the
    code generator invalidates every entry."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _host_and_compiler() -> str:
    import llvmlite
    import llvmlite.binding as llvm

    from . import parallel, threadpool
    from .target import _init
    _init()
    features = llvm.get_host_cpu_features().flatten()
    return "\n".join([
        f"cache format {FORMAT}",
        f"codegen sources {codegen_source_hash()}",
        f"llvmlite {llvmlite.__version__}",
        f"llvm {'.'.join(map(str, llvm.llvm_version_info))}",
        f"python {sys.implementation.cache_tag}",
        f"triple {llvm.get_process_triple()}",
        f"cpu {llvm.get_host_cpu_name()}",
        f"features {features}",
        f"threads {threadpool.VERSION if parallel.threads_available() else 'off'}",
    ])


def _overrides() -> str:
    """The kernels' blocking overrides in force (the FORCE dicts of the tuning runs and tests:
    benchmarks/kernels_dense.py --force, tests/test_fuzz_kernels.py). They change the code and
    the scratch it needs, which the caller sizes from its own plan: code stored under another
    override, linked on a hit, overran the arena (heap corruption on AVX2, where the conv input
    gradient's transposed form needs more scratch than the core's)."""
    from .kernels import matmul
    from .kernels.conv2d import layout
    return " ".join(f"{name}.{k}={v!r}" for name, force in (("matmul", matmul.FORCE),
                                                             ("conv2d", layout.FORCE))
                    for k, v in sorted(force.items()))


def key_text(fn: Function, max_threads: int, version: str = "") -> str:
    """Everything the object code of `fn` depends on, as text (its SHA-256 names the entry)."""
    env = settings.code_environment()
    return "\n".join([f"version {version}", _host_and_compiler(), f"max_threads {max_threads}",
                      f"environment {' '.join(env)}", f"overrides {_overrides()}", "",
                      ir_key_text(fn)])


def key_of(fn: Function, max_threads: int, version: str = "") -> str:
    return hashlib.sha256(key_text(fn, max_threads, version).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# the store
# ------------------------------------------------------------------------------------------------
class DiskCache:
    """Object code entries in `directory` (default: `default_directory()`, read when created).
    `version` (the caller's version string) is part of every key. Load and store never raise for
    I/O problems: they log and behave as a miss."""

    def __init__(self, directory: str | os.PathLike | None = None, version: str = "",
                 suffix: str = ".o", counters: dict | None = None):
        """`suffix`: of the entry files (".o" object code; the trace cache's entries, see
        tracejit/trace_cache.py, share the directory as ".trace"); `counters`: the dict counting
        hits, misses, ... (default: this module's `stats`)."""
        self.directory = Path(directory).expanduser() if directory else default_directory()
        self.version = version
        self.suffix = suffix
        self.stats = stats if counters is None else counters
        self._usable = None

    def __repr__(self):
        return f"DiskCache({str(self.directory)!r})"

    def key(self, fn: Function, max_threads: int) -> str:
        return key_of(fn, max_threads, self.version)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{self.suffix}"

    def _prepare(self) -> bool:
        """Create the directory (0o700) if needed; False if it cannot or must not be used."""
        if self._usable is not None:
            return self._usable
        d = self.directory
        try:
            if not d.is_dir():
                d.parent.mkdir(parents=True, exist_ok=True)
                try:
                    d.mkdir(mode=0o700)
                except FileExistsError:  # another process made it meanwhile
                    pass
                else:
                    os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
            st = d.stat()
        except OSError as e:
            log.warning("tracejit: compile cache disabled: cannot create %s (%s)", d, e)
            self._usable = False
            return False
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP |
                                                                                 stat.S_IWOTH)):
            log.warning("tracejit: compile cache disabled: %s is owned by another user or writable "
                        "by others (code loaded from it would run in this process); use a private "
                        "directory (chmod 700) or set TRACEJIT_CACHE_DIR", d)
            self._usable = False
            return False
        self._usable = True
        return True

    def load(self, key: str) -> bytes | None:
        """The object code stored under `key`, or None (missing, or corrupt: then logged and
        removed)."""
        if not self._prepare():
            return None
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.stats["misses"] += 1
            return None
        except OSError as e:
            log.warning("tracejit: cannot read compile cache entry %s (%s); compiling", path, e)
            self.stats["errors"] += 1
            return None
        problem = _check(data, key)
        if problem is not None:
            log.warning("tracejit: compile cache entry %s is corrupt (%s); removing it and "
                        "compiling again", path, problem)
            self.stats["corrupt"] += 1
            _unlink(path)
            return None
        self.stats["hits"] += 1
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:
            pass
        return data[_HEADER.size:]

    def discard(self, key: str, why: str):
        """Remove an entry that loaded but could not be used (logged)."""
        log.warning("tracejit: compile cache entry %s could not be used (%s); removing it and "
                    "compiling again", self.path(key), why)
        self.stats["corrupt"] += 1
        _unlink(self.path(key))

    def store(self, key: str, object_code: bytes) -> bool:
        """Write the entry atomically; False (logged) if it could not be written."""
        if not self._prepare():
            return False
        header = _HEADER.pack(MAGIC, FORMAT, len(object_code),
                              hashlib.sha256(object_code).digest(), bytes.fromhex(key))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key[:16]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(object_code)
            os.replace(tmp, self.path(key))
        except OSError as e:
            log.warning("tracejit: cannot write compile cache entry in %s (%s)", self.directory, e)
            self.stats["errors"] += 1
            if tmp is not None:
                _unlink(tmp)
            return False
        self.stats["stores"] += 1
        if self.directory not in _pruned:
            _pruned.add(self.directory)
            self.prune()
        return True

    def prune(self, max_bytes: int | None = None):
        """Remove the least recently used entries while the directory holds more than
        `max_bytes` (default TRACEJIT_CACHE_MAX_MB), down to three quarters of it; remove
        temporary files that writers left behind over an hour ago."""
        if max_bytes is None:
            max_bytes = settings.cache_max_bytes()
        entries, now = [], time.time()
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if e.name.endswith(_ENTRY_SUFFIXES):
                        entries.append((st.st_mtime, st.st_size, e.path))
                    elif e.name.endswith(".tmp") and now - st.st_mtime > _STALE_TEMP_SECONDS:
                        _unlink(e.path)
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        if total <= max_bytes:
            return
        entries.sort()
        removed = 0
        for _, size, path in entries:
            if total <= max_bytes * 3 // 4:
                break
            if _unlink(path):
                total -= size
                removed += 1
        log.info("tracejit: pruned %d least recently used entries from the compile cache %s",
                 removed, self.directory)


def _unlink(path) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _check(data: bytes, key: str) -> str | None:
    """What is wrong with entry `data` for `key`, or None."""
    if len(data) < _HEADER.size:
        return f"{len(data)} bytes, shorter than its header"
    magic, fmt, length, digest, key_digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return "not a tracejit cache entry"
    if fmt != FORMAT:
        return f"format {fmt}, expected {FORMAT}"
    if key_digest != bytes.fromhex(key):
        return "stored under another key"
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != length:
        return f"object code is {len(payload)} bytes, the header says {length} (truncated)"
    if hashlib.sha256(payload).digest() != digest:
        return "checksum mismatch"
    return None


def resolve(option) -> DiskCache | None:
    """The cache for a `cache=` option: a DiskCache as is; None or True: the default directory
    (unless TRACEJIT_CACHE=0); False: no cache; a path: that directory."""
    if isinstance(option, DiskCache) or option is False:
        return option or None
    if option is None or option is True:
        return DiskCache() if enabled_by_env() else None
    return DiskCache(option)

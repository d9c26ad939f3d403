"""Every environment variable tracejit reads, each in exactly one function of this module.

Both front end (tracejit/config.py) and code generation read their settings here, so one list
documents them all. The module imports nothing but the standard library: `import tracejit` loads
it, and must not load llvmlite. Each function reads the environment when called; callers decide
when (tracejit.config at import, code generation at first use).

- TRACEJIT_BACKEND: "llvm" (default) or "interpreter", the initial tracejit.config.backend.
- TRACEJIT_CACHE: 0/false/no/off turns the persistent compile cache off.
- TRACEJIT_CACHE_DIR, else $XDG_CACHE_HOME/tracejit, else ~/.cache/tracejit: its directory.
- TRACEJIT_CACHE_MAX_MB: the cache's size bound (default 1024).
- TRACEJIT_NUM_THREADS: threads per call (default: the CPUs this process may run on).
- TRACEJIT_NO_OPENMP: run every kernel on the calling thread.
- TRACEJIT_COMPILE_PROCESSES: processes compiling one function's kernels.
- TRACEJIT_NO_EPILOGUES: no fused epilogues (for debugging).
- TRACEJIT_PROFILE: compiled code counts the cycles and calls of each kernel
  (NativeFunction.profile(); benchmarks/kernel_profile.py prints the table).
- TRACEJIT_TARGET: the CPU code is compiled for: "host" (default), or "avx2" / "avx512" (the
  x86-64-v3 / x86-64-v4 levels, which the host must have; see codegen/target.py).
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE_MAX_MB = 1024

# TRACEJIT_* variables that do not change the code compiled for a function, so the compile
# cache's key leaves them out (the thread count joins the key as max_threads).
_NOT_KEYED = {"TRACEJIT_CACHE", "TRACEJIT_CACHE_DIR", "TRACEJIT_CACHE_MAX_MB",
              "TRACEJIT_BACKEND", "TRACEJIT_NUM_THREADS"}


def backend() -> str:
    value = os.environ.get("TRACEJIT_BACKEND", "llvm")
    if value not in ("llvm", "interpreter"):
        raise ValueError(f"TRACEJIT_BACKEND must be 'llvm' or 'interpreter', got {value!r}")
    return value


def cache_enabled() -> bool:
    return os.environ.get("TRACEJIT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_directory() -> Path:
    """TRACEJIT_CACHE_DIR, else $XDG_CACHE_HOME/tracejit, else ~/.cache/tracejit."""
    env = os.environ.get("TRACEJIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) \
        else Path.home() / ".cache"
    return base / "tracejit"


def cache_max_bytes() -> int:
    """TRACEJIT_CACHE_MAX_MB in bytes; the default when unset or not a number."""
    try:
        return int(float(os.environ.get("TRACEJIT_CACHE_MAX_MB", DEFAULT_CACHE_MAX_MB)) * 2**20)
    except ValueError:
        return DEFAULT_CACHE_MAX_MB * 2**20


def num_threads() -> int | None:
    """TRACEJIT_NUM_THREADS (at least 1), or None when unset."""
    env = os.environ.get("TRACEJIT_NUM_THREADS")
    return max(1, int(env)) if env else None


def no_openmp() -> bool:
    return bool(os.environ.get("TRACEJIT_NO_OPENMP"))


def compile_processes() -> int | None:
    """TRACEJIT_COMPILE_PROCESSES (at least 1), or None when unset."""
    env = os.environ.get("TRACEJIT_COMPILE_PROCESSES")
    return max(1, int(env)) if env else None


def no_epilogues() -> bool:
    return bool(os.environ.get("TRACEJIT_NO_EPILOGUES"))


def profile() -> bool:
    return os.environ.get("TRACEJIT_PROFILE", "").strip().lower() not in ("", "0", "false", "no",
                                                                         "off")


def code_environment() -> list[str]:
    """`NAME=value` of every TRACEJIT_* variable set that may change compiled code, sorted (part
    of the compile cache's key, so a variable added later is keyed without being listed here)."""
    return sorted(f"{k}={v}" for k, v in os.environ.items()
                  if k.startswith("TRACEJIT_") and k not in _NOT_KEYED)


TARGETS = ("host", "avx2", "avx512")


def target() -> str:
    """TRACEJIT_TARGET (one of TARGETS; default "host")."""
    value = os.environ.get("TRACEJIT_TARGET", "host").strip().lower() or "host"
    if value not in TARGETS:
        raise ValueError(f"TRACEJIT_TARGET must be one of {', '.join(TARGETS)}, got {value!r}")
    return value

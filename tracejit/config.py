"""Run-time options.

- `backend`: "llvm" (native code, the default) or "interpreter" (the numpy reference interpreter:
  the test oracle, for debugging); the environment variable TRACEJIT_BACKEND sets the initial value.
- `cache`: keep compiled code in the persistent compile cache on disk (codegen/cache.py), so
  another process skips LLVM; TRACEJIT_CACHE=0 sets it False initially.
- `cache_dir`: the cache's directory; None means TRACEJIT_CACHE_DIR, else
  $XDG_CACHE_HOME/tracejit, else ~/.cache/tracejit (read at each compile).
- `retrace_warning`: log a warning when one function has been traced for more signatures than
  this (each new signature traces and compiles again).

Environment variables read by code generation (at first use, so set them before the first call;
all of them are read in codegen/settings.py):
TRACEJIT_NUM_THREADS (threads per call; default: the CPUs this process may run on),
TRACEJIT_NO_OPENMP (run every kernel on the calling thread; get_num_threads() then reports 1),
TRACEJIT_COMPILE_PROCESSES (processes compiling one function's kernels),
TRACEJIT_NO_EPILOGUES (no fused epilogues, for debugging), TRACEJIT_CACHE_MAX_MB (size bound of the
persistent compile cache).
"""
from .codegen import settings  # the environment variables; no llvmlite


class _Config:
    def __init__(self):
        self.backend = settings.backend()
        self.cache = settings.cache_enabled()
        self.cache_dir = None
        self.retrace_warning = 8

    def __repr__(self):
        return (f"tracejit.config(backend={self.backend!r}, cache={self.cache!r}, "
                f"cache_dir={self.cache_dir!r}, retrace_warning={self.retrace_warning!r})")


config = _Config()


def set_num_threads(n: int | None) -> None:
    """Use at most `n` threads per call from now on (None: as many as each function was compiled
    for, which is TRACEJIT_NUM_THREADS or the CPUs this process may run on)."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads expects a positive int or None, got {n!r}")
    from .codegen import parallel
    parallel.thread_limit = n


def get_num_threads() -> int:
    """The threads a call may use now: 1 when the thread pool is off (TRACEJIT_NO_OPENMP, or a
    platform without it), since every kernel then runs on the calling thread; else the cap set
    by set_num_threads, else the default."""
    from .codegen import parallel
    if not parallel.threads_available():
        return 1
    default = parallel.default_threads()
    return default if parallel.thread_limit is None else min(default, parallel.thread_limit)

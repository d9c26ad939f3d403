"""Run-time options.

- `backend`: "llvm" (native code, the default) or "interpreter" (the numpy reference interpreter:
  the test oracle, for debugging); the environment variable TRACEJIT_BACKEND sets the initial value.
- `cache`: keep compiled code in the persistent compile cache on disk (codegen/cache.py), so
  another process skips LLVM; TRACEJIT_CACHE=0 sets it False initially.
- `cache_dir`: the cache's directory; None means TRACEJIT_CACHE_DIR, else
  $XDG_CACHE_HOME/tracejit, else ~/.cache/tracejit (read at each compile).
- `retrace_warning`: log a warning when one function has been traced for more signatures than
  this (each new signature traces and compiles again).
"""
import os


class _Config:
    def __init__(self):
        self.backend = os.environ.get("TRACEJIT_BACKEND", "llvm")
        if self.backend not in ("llvm", "interpreter"):
            raise ValueError(f"TRACEJIT_BACKEND must be 'llvm' or 'interpreter', got "
                             f"{self.backend!r}")
        self.cache = os.environ.get("TRACEJIT_CACHE", "1").strip().lower() not in (
            "0", "false", "no", "off")
        self.cache_dir = None
        self.retrace_warning = 8

    def __repr__(self):
        return (f"tracejit.config(backend={self.backend!r}, cache={self.cache!r}, "
                f"cache_dir={self.cache_dir!r}, retrace_warning={self.retrace_warning!r})")


config = _Config()

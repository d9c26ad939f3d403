"""Run-time options. `backend` is "llvm" (native code, the default once codegen exists) or
"interpreter" (the numpy reference, for debugging); the environment variable TRACEJIT_BACKEND sets
the initial value."""
import os


class _Config:
    def __init__(self):
        self.backend = os.environ.get("TRACEJIT_BACKEND", "interpreter")

    def __repr__(self):
        return f"tracejit.config(backend={self.backend!r})"


config = _Config()

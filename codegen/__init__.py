"""IR -> LLVM -> native code: the schedule (fusion groups, buffer plan), fused loop lowering,
loop-nest kernels, and the runtime that compiles a module and calls it."""


def compile_function(fn):
    """Compile an (optimized) ir.Function to a NativeFunction (see codegen/runtime.py)."""
    from .runtime import compile_function as _compile
    return _compile(fn)

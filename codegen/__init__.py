"""IR -> LLVM -> native code: the schedule (fusion groups, buffer plan), fused loop lowering,
loop-nest kernels, and the runtime that compiles a module and calls it."""


def compile_function(fn, cache=None, donate=None):
    """Compile an (optimized) ir.Function to a NativeFunction (see codegen/runtime.py), through
    the persistent compile cache `cache` (see codegen/cache.py; None: the default one).
    `donate` ({output index: parameter index}) stores outputs into parameters' arrays."""
    from .runtime import compile_function as _compile
    return _compile(fn, cache=cache, donate=donate)


def describe(fn, donate=None) -> str:
    """The IR of `fn` annotated with its kernels (fusion groups), the arena size and what the
    backward pass keeps alive, without compiling it: the plan that compiling it now would run
    (the thread count of tracejit's settings, TRACEJIT_NO_EPILOGUES)."""
    from ..ir.core import print_function
    from . import parallel, schedule
    from .runtime import plan_for
    p = plan_for(fn, parallel.default_threads(), donate)
    return "\n".join([print_function(fn, annotate=schedule.annotate(p)), schedule.summary(p)])

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
    backward pass keeps alive, without compiling it."""
    from ir.core import print_function
    from . import schedule
    from .kernels import _load_all, kernels
    _load_all()

    def kernel(ins):
        try:
            return kernels[ins.prim]
        except Exception:  # a kernel not written yet must not break the dump
            return None

    def scratch(ins):
        k = kernel(ins)
        return k.scratch_bytes(ins, 1) if k is not None else 0

    def epilogue(ins):
        k = kernel(ins)
        return k is not None and k.epilogue
    p = schedule.plan(fn, scratch, epilogue, donate)
    return "\n".join([print_function(fn, annotate=schedule.annotate(p)), schedule.summary(p)])

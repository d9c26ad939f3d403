"""Loop-nest kernels for the primitives that need their own loop nests (matmul, convolution,
pooling and their backward passes). Elementwise ops, reductions and layout ops are lowered by the
fusion code in codegen/fused.py instead.

Contract of a kernel (one per primitive, registered with `@register("prim_name")`):

    lower(module: llvmlite.ir.Module, name: str, ins: ir.core.Instr) -> None

defines in `module` the function

    void name(ptr out, ptr in0, ..., ptr in{k-1}, ptr scratch, i64 tid, i64 nthreads)

that computes `ins.out` from `ins.inputs`. All buffers are dense, row-major (C order), of the IR
types (f32 -> float, f64 -> double, i32 -> i32); `out` never aliases an input; inputs are read-only.
Thread `tid` of `nthreads` (0 <= tid < nthreads) writes a disjoint part of `out`; the parts of all
threads together cover `out` entirely and overwrite it (out is not zeroed beforehand). `scratch`
points to `scratch_bytes(ins, nthreads)` bytes (64-byte aligned, uninitialised, shared by the
threads of one call: give each thread its own region).

Epilogues: a kernel registered with `epilogue=True` is called as
`lower(module, name, ins, epilogue=e)` where `e` is None or a `codegen.fused.Epilogue`. With one,
the function takes `e.n_args` more pointers right after its inputs, and after writing each block of
its output it calls `e.call(builder, out, extra_args, start, count)` for that block's flat range
(whole multiples of the last dimension); the epilogue rewrites the block in place.

Checks: a kernel registered with `checks=True` (gathers: indices read from data) is called as
`lower(module, name, ins, status_code=k)` with a code k > 0, and the function takes one more
pointer `status` right after its inputs: two i64 words, zero before the call. On a failed check
it skips the access and, unless status[0] is already set, sets status[0] = k (compare-and-swap,
so concurrent failures leave one consistent pair) and status[1] = the offending value; the runtime
raises after the call (codegen/runtime.py, `NativeFunction._check_status`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ir.core import Registry, primitives


@dataclass
class Kernel:
    lower: Callable
    scratch_bytes: Callable = staticmethod(lambda ins, nthreads: 0)
    epilogue: bool = False
    checks: bool = False


kernels = Registry("kernel lowering")


def register(prim_name: str, scratch_bytes: Callable | None = None, epilogue: bool = False,
             checks: bool = False):
    def deco(fn):
        kernels[primitives[prim_name]] = Kernel(fn, scratch_bytes or (lambda ins, nthreads: 0),
                                                epilogue, checks)
        return fn
    return deco


def _load_all():
    import importlib
    import pkgutil
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")

"""Loop nests of gather and scatter_add (ir/prims/gather.py), with checked indices.

Both view their operands as [outer, axis, inner] (the dimensions before the axis, the axis, the
dimensions after it); the index operand is [outer or 1, n, inner or 1]. Every index is checked
against the axis before it is used: a bad one is never dereferenced (gather writes 0 for it,
scatter_add skips it) and is reported through the status word (kernels/__init__.py: the kernel's
`status` pointer): the first failing kernel of a call stores its code with a compare-and-swap and
then the offending index, which the runtime turns into an IndexError.

Threads: gather partitions the output rows (outer x n). scatter_add accumulates into rows chosen by
the data, so two threads must never own the same output element: it partitions over `outer` when
that is at least `inner` (take_along_axis on the last axis: one row per sample), else over the
`inner` columns (embedding: one table column per thread); a thread zeroes exactly the part of
the output it accumulates into.
"""
from __future__ import annotations

import math

import llvmlite.ir as ir

from ..loops import I64, PTR, VOID, for_range, i64, if_then, llvm_type, load, store
from ...ir.prims.gather import gather_p, scatter_add_p

from . import POOL_WEIGHT, memory_cost, register
from .toolkit import thread_range


def _geometry(data_shape, idx_shape, axis):
    outer = math.prod(data_shape[:axis])
    inner = math.prod(data_shape[axis + 1:])
    pre_full = outer > 1 and any(n != 1 for n in idx_shape[:axis])
    post_full = inner > 1 and any(n != 1 for n in idx_shape[axis + 1:])
    return outer, inner, pre_full, post_full


def _function(module, name, n_inputs):
    """`void name(ptr out, ptr in.., ptr status, ptr scratch, i64 tid, i64 nthreads)`."""
    n_ptr = 1 + n_inputs + 2
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * n_ptr + [I64, I64]), name)
    fn.attributes.add("nounwind")
    names = ["out"] + [f"in{k}" for k in range(n_inputs)] + ["status", "scratch", "tid",
                                                             "nthreads"]
    for arg, an in zip(fn.args, names):
        arg.name = an
    for arg in fn.args[:n_inputs + 1]:
        arg.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block(f"{name}.entry"))
    return b, fn.args


def _checked(b, status, code, raw, size, negative, name):
    """(in range?, the index in [0, size) where it is): raw (i32/i64) wrapped once when
    `negative` is "wrap"; a failure records (code, raw) in the status word."""
    k = b.sext(raw, I64) if raw.type != I64 else raw
    if negative == "wrap":
        k = b.select(b.icmp_signed("<", k, i64(0)), b.add(k, i64(size)), k, name=f"{name}.wrap")
    ok = b.icmp_unsigned("<", k, i64(size), name=f"{name}.ok")   # negative is huge unsigned
    with if_then(b, b.not_(ok), f"{name}.bad"):
        old = b.cmpxchg(status, i64(0), i64(code), "monotonic", "monotonic")
        with if_then(b, b.extract_value(old, 1), f"{name}.first"):
            store(b, b.sext(raw, I64) if raw.type != I64 else raw, status, i64(1), I64)
    return ok, b.select(ok, k, i64(0))


def _lower_gather(module, name, ins, *, status_code):
    x, idx = ins.inputs
    axis, negative = ins.params["axis"], ins.params["negative"]
    outer, inner, pre_full, post_full = _geometry(x.shape, idx.shape, axis)
    X, n = x.shape[axis], idx.shape[axis]
    ety, ity = llvm_type(x.dtype), llvm_type(idx.dtype)
    b, (out, xp, ip, status, _scratch, tid, nthreads) = _function(module, name, 2)
    r0, r1 = thread_range(b, outer * n, tid, nthreads)
    zero = ir.Constant(ety, 0.0)
    with for_range(b, r0, r1, name="gather.row", scalar=True) as r:
        o = b.udiv(r, i64(n), name="gather.o")
        irow = r if pre_full else b.urem(r, i64(n))          # the index row (o, j) or (0, j)
        src_o = b.mul(o, i64(X * inner))
        dst = b.mul(r, i64(inner), name="gather.dst")
        if post_full:
            with for_range(b, i64(0), i64(inner), name="gather.i", scalar=True) as i:
                raw = load(b, ip, b.add(b.mul(irow, i64(inner)), i), ity)
                ok, k = _checked(b, status, status_code, raw, X, negative, "gather.k")
                v = load(b, xp, b.add(b.add(src_o, b.mul(k, i64(inner))), i), ety)
                store(b, b.select(ok, v, zero), out, b.add(dst, i), ety)
        else:
            ok, k = _checked(b, status, status_code, load(b, ip, irow, ity), X, negative,
                             "gather.k")
            src = b.add(src_o, b.mul(k, i64(inner)), name="gather.src")
            # a bad row is filled with 0 (k was clamped to 0: the load stays in bounds)
            with for_range(b, i64(0), i64(inner), name="gather.copy") as i:
                v = load(b, xp, b.add(src, i), ety)
                store(b, b.select(ok, v, zero), out, b.add(dst, i), ety)
    b.ret_void()


def _lower_scatter_add(module, name, ins, *, status_code):
    ct, idx = ins.inputs
    axis, negative, X = ins.params["axis"], ins.params["negative"], ins.params["size"]
    outer, inner, pre_full, post_full = _geometry(ct.shape, idx.shape, axis)
    n = ct.shape[axis]
    ety, ity = llvm_type(ct.dtype), llvm_type(idx.dtype)
    b, (out, cp, ip, status, _scratch, tid, nthreads) = _function(module, name, 2)
    if outer >= inner:
        o0, o1 = thread_range(b, outer, tid, nthreads)
        c0, c1 = i64(0), i64(inner)
    else:
        o0, o1 = i64(0), i64(outer)
        c0, c1 = thread_range(b, inner, tid, nthreads)
    with for_range(b, o0, o1, name="scatter.zero.o", scalar=True) as o:
        with for_range(b, i64(0), i64(X), name="scatter.zero.row", scalar=True) as row:
            base = b.mul(b.add(b.mul(o, i64(X)), row), i64(inner))
            with for_range(b, c0, c1, name="scatter.zero.i") as i:
                store(b, ir.Constant(ety, 0.0), out, b.add(base, i), ety)
    with for_range(b, o0, o1, name="scatter.o", scalar=True) as o:
        with for_range(b, i64(0), i64(n), name="scatter.j", scalar=True) as j:
            irow = b.add(b.mul(o, i64(n)), j) if pre_full else j
            src = b.mul(b.add(b.mul(o, i64(n)), j), i64(inner), name="scatter.src")
            dst_o = b.mul(o, i64(X * inner))
            if post_full:
                with for_range(b, c0, c1, name="scatter.i", scalar=True) as i:
                    raw = load(b, ip, b.add(b.mul(irow, i64(inner)), i), ity)
                    ok, k = _checked(b, status, status_code, raw, X, negative, "scatter.k")
                    with if_then(b, ok, "scatter.add"):
                        at = b.add(b.add(dst_o, b.mul(k, i64(inner))), i)
                        v = b.fadd(load(b, out, at, ety), load(b, cp, b.add(src, i), ety))
                        store(b, v, out, at, ety)
            else:
                ok, k = _checked(b, status, status_code, load(b, ip, irow, ity), X, negative,
                                 "scatter.k")
                with if_then(b, ok, "scatter.row"):
                    dst = b.add(dst_o, b.mul(k, i64(inner)), name="scatter.dst")
                    with for_range(b, c0, c1, name="scatter.add") as i:
                        at = b.add(dst, i)
                        v = b.fadd(load(b, out, at, ety), load(b, cp, b.add(src, i), ety))
                        store(b, v, out, at, ety)
    b.ret_void()


# both read and write about once per element, like pooling; short loop nests
register(gather_p, checks=True, epilogue=False, parallel=True, cost=memory_cost,
         compile_weight=POOL_WEIGHT)(_lower_gather)
register(scatter_add_p, checks=True, epilogue=False, parallel=True, cost=memory_cost,
         compile_weight=POOL_WEIGHT)(_lower_scatter_add)

"""matmul kernel: C[M,N] = op(A) @ op(B), op = transpose where `trans_a` / `trans_b` is set.

Two register-blocked micro-kernels, both with their accumulators in vector registers:

- outer-product form (B not transposed, or B^T packed into scratch): an MR x NV tile of C (MR rows,
  NV vectors of columns) accumulates op(A)[i, k] (broadcast) * B[k, j:j+VL] over k. op(A) is read in
  place for either transpose (it is only ever broadcast).
- dot form (trans_b without trans_a, the `x @ W^T` of a linear layer): an MR x NR tile of C keeps
  MR*NR vector partial sums of A[i, k:k+VL] * B[j, k:k+VL], reduced horizontally once at the end;
  both operands are read contiguously along K, so nothing is packed.

trans_b together with trans_a, or with a short K, packs B^T into the calling thread's scratch
region ([K, N] row-major) and uses the outer-product form.

Edge tiles clamp their row (and dot-form column) indices to the last one: the extra lanes recompute
and store the same value into the same element, which costs a little work on the border and no
code variants. Columns of the outer-product form are masked.

Threads: the tiles are numbered column block major; thread tid takes a contiguous range of them.

This module also holds the small emitting helpers shared with the convolution kernels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import llvmlite.ir as ir

from ..loops import (FAST, I64, PTR, VOID, for_range, fma, gep, i32, i64, llvm_type, load,
                     masked_load, masked_store, splat, store, vload, vstore)
from ..target import vector_width
from . import register


# ------------------------------------------------------------------------------------------------
# helpers shared by the dense kernels (matmul, conv2d)
# ------------------------------------------------------------------------------------------------
@dataclass
class KernelFunction:
    b: ir.IRBuilder
    out: ir.Argument
    ins: list
    scratch: ir.Argument
    tid: ir.Argument
    nthreads: ir.Argument


def kernel_function(module: ir.Module, name: str, n_inputs: int) -> KernelFunction:
    """Define `void name(ptr out, ptr in0.., ptr scratch, i64 tid, i64 nthreads)` (the kernel
    contract); the builder is left in the entry block. Buffers never alias, hence `noalias`."""
    fnty = ir.FunctionType(VOID, [PTR] * (n_inputs + 2) + [I64, I64])
    fn = ir.Function(module, fnty, name)
    fn.attributes.add("nounwind")
    names = ["out"] + [f"in{k}" for k in range(n_inputs)] + ["scratch", "tid", "nthreads"]
    for arg, an in zip(fn.args, names):
        arg.name = an
    for arg in fn.args[:n_inputs + 2]:
        arg.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block(f"{name}.entry"))
    args = fn.args
    return KernelFunction(b, args[0], list(args[1:n_inputs + 1]), args[n_inputs + 1],
                          args[n_inputs + 2], args[n_inputs + 3])


def thread_range(b: ir.IRBuilder, total: int, tid, nthreads):
    """[t0, t1): thread tid's contiguous share of `total` work items (the shares tile the range)."""
    t = i64(total)
    t0 = b.sdiv(b.mul(tid, t), nthreads, name="work.begin")
    t1 = b.sdiv(b.mul(b.add(tid, i64(1)), t), nthreads, name="work.end")
    return t0, t1


def clamp_hi(b: ir.IRBuilder, v, hi: int, name: str = ""):
    """min(v, hi) for i64 values."""
    return b.select(b.icmp_signed("<", v, i64(hi)), v, i64(hi), name=name)


class Carry:
    """State of a `carry_loop`: induction variable, loop-carried values; set `next` in the body,
    read `out` (the values after the last iteration) after the loop."""

    def __init__(self, iv, vals):
        self.iv, self.vals, self.next, self.out = iv, vals, None, None


def _loop_metadata(module: ir.Module, unroll):
    """A loop ID (self-referential metadata node) that turns off LLVM's loop vectorizer and
    sets unrolling: False disables it, an int n asks for n copies."""
    key = f"_tracejit_loop_md_{unroll}"
    cached = getattr(module, key, None)
    if cached is not None:
        return cached
    opts = [module.add_metadata([ir.MetaDataString(module, "llvm.loop.vectorize.width"), i32(1)])]
    if unroll is False:
        opts.append(module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")]))
    else:
        opts.append(module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.count"),
                                         i32(unroll)]))
    loop_id = module.add_metadata(opts)
    loop_id.operands = (loop_id,) + tuple(loop_id.operands)
    setattr(module, key, loop_id)
    return loop_id


@contextlib.contextmanager
def carry_loop(b: ir.IRBuilder, start, stop, inits, name: str, step: int = 1, unroll=None):
    """`for iv in range(start, stop, step)` carrying `inits` (vector accumulators) through phis.

    `unroll`: None leaves the decision to LLVM; False or an unroll count pins it (loops over tiles
    are not worth LLVM's runtime unrolling: it multiplies code size and compile time)."""
    start = i64(start) if isinstance(start, int) else start
    stop = i64(stop) if isinstance(stop, int) else stop
    pre = b.block
    fn = pre.function
    cond = fn.append_basic_block(f"{name}.cond")
    body = fn.append_basic_block(f"{name}.body")
    end = fn.append_basic_block(f"{name}.end")
    b.branch(cond)
    b.position_at_end(cond)
    iv = b.phi(I64, name=f"{name}.i")
    iv.add_incoming(start, pre)
    phis = []
    for k, v in enumerate(inits):
        p = b.phi(v.type, name=f"{name}.acc{k}")
        p.add_incoming(v, pre)
        phis.append(p)
    b.cbranch(b.icmp_signed("<", iv, stop, name=f"{name}.more"), body, end)
    b.position_at_end(body)
    state = Carry(iv, phis)
    yield state
    latch = b.block
    iv.add_incoming(b.add(iv, i64(step), name=f"{name}.next"), latch)
    for p, v in zip(phis, state.next or []):
        p.add_incoming(v, latch)
    br = b.branch(cond)
    if unroll is not None:
        br.set_metadata("llvm.loop", _loop_metadata(b.module, unroll))
    b.position_at_end(end)
    state.out = phis


def hsum(b: ir.IRBuilder, v):
    """Sum of the lanes of vector `v` (a halving shuffle tree)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n))))
        hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                list(range(n, 2 * n))))
        v = b.fadd(lo, hi, flags=FAST)
    return b.extract_element(v, i32(0))


def lane_mask(b: ir.IRBuilder, remaining, vl: int):
    """<vl x i1> with lanes [0, remaining) set; `remaining` is an i64 value of small magnitude
    (compared in 32-bit lanes: a <16 x i64> compare would take two registers)."""
    lanes = ir.Constant(ir.VectorType(ir.IntType(32), vl), list(range(vl)))
    return b.icmp_signed("<", lanes, splat(b, b.trunc(remaining, ir.IntType(32)), vl))


def static_mask(vl: int, valid: int):
    """<vl x i1> constant with lanes [0, valid) set."""
    return ir.Constant(ir.VectorType(ir.IntType(1), vl), [k < valid for k in range(vl)])


def zero_vector(ety, vl: int):
    return ir.Constant(ir.VectorType(ety, vl), [0.0] * vl)


def dtype_info(dtype: str):
    """(LLVM element type, vector lanes, element bytes) for a float dtype."""
    bits = {"f32": 32, "f64": 64}[dtype]
    return llvm_type(dtype), vector_width(bits), bits // 8


# ------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    m: int
    n: int
    k: int
    trans_a: bool
    form: str   # "outer" | "dot"
    packed: bool  # outer form on B^T packed into scratch
    mr: int
    nr: int     # outer: vectors of columns per tile; dot: columns per tile
    vl: int
    esize: int


def _plan(ins) -> _Plan:
    a, bb = ins.inputs
    ta, tb = bool(ins.params.get("trans_a")), bool(ins.params.get("trans_b"))
    m, n = ins.out.shape
    k = a.shape[0] if ta else a.shape[1]
    _, vl, es = dtype_info(ins.out.dtype)
    if tb and not ta and k >= 2 * vl:
        nr = min(n, min((4, 5, 6), key=lambda r: (-(-n // r) * r, -r)))
        return _Plan(m, n, k, ta, "dot", False, min(m, 4), nr, vl, es)
    nv = max(1, min(4, -(-n // vl)))
    mr = max(1, min(m, 24 // nv, 12))
    return _Plan(m, n, k, ta, "outer", tb, mr, nv, vl, es)


def _pack_elems(p: _Plan) -> int:
    return -(-(p.k * p.n) // 16) * 16  # keep each thread's region 64-byte aligned


def _matmul_scratch(ins, nthreads: int) -> int:
    p = _plan(ins)
    return nthreads * _pack_elems(p) * p.esize if p.packed else 0


@register("matmul", scratch_bytes=_matmul_scratch)
def _matmul_lower(module: ir.Module, name: str, ins) -> None:
    p = _plan(ins)
    ety = llvm_type(ins.out.dtype)
    kf = kernel_function(module, name, 2)
    b = kf.b
    if p.m == 0 or p.n == 0:
        b.ret_void()
        return
    if p.form == "dot":
        _emit_dot(b, kf, p, ety)
    else:
        bmat = kf.ins[1]
        if p.packed:
            bmat = _emit_pack_bt(b, kf, p, ety)
        _emit_outer(b, kf, p, ety, bmat)
    b.ret_void()


@contextlib.contextmanager
def _tiles(b, kf, p: _Plan, mb: int, nb: int, cols: int):
    """Loop over this thread's tiles (numbered column block major: consecutive tiles share their
    B panel); yields the first column and the (clamped) rows of the tile."""
    t0, t1 = thread_range(b, mb * nb, kf.tid, kf.nthreads)
    with carry_loop(b, t0, t1, [], "matmul.tile", unroll=False) as tile:
        i0 = b.mul(b.urem(tile.iv, i64(mb)), i64(p.mr), name="matmul.i0")
        j0 = b.mul(b.udiv(tile.iv, i64(mb)), i64(cols), name="matmul.j0")
        yield j0, [clamp_hi(b, b.add(i0, i64(r)), p.m - 1, name=f"matmul.row{r}")
                   for r in range(p.mr)]


def _emit_pack_bt(b, kf, p: _Plan, ety):
    """Copy B^T (B is [N, K]) into this thread's scratch region as a [K, N] matrix."""
    dst = gep(b, kf.scratch, b.mul(kf.tid, i64(_pack_elems(p))), ety, name="matmul.packed")
    with for_range(b, 0, p.n, name="matmul.pack.j") as j:
        src_row = b.mul(j, i64(p.k))
        with for_range(b, 0, p.k, name="matmul.pack.k") as kk:
            v = load(b, kf.ins[1], b.add(src_row, kk), ety)
            store(b, v, dst, b.add(b.mul(kk, i64(p.n)), j), ety)
    return dst


def _emit_outer(b, kf, p: _Plan, ety, bmat):
    vl, mr, nv = p.vl, p.mr, p.nr
    vty = ir.VectorType(ety, vl)
    cols = nv * vl
    mb, nb = -(-p.m // mr), -(-p.n // cols)
    full_cols = p.n % cols == 0
    with _tiles(b, kf, p, mb, nb, cols) as (j0, rows):
        masks = None
        if nb == 1 and not full_cols:
            masks = [static_mask(vl, p.n - v * vl) for v in range(nv)]
        elif not full_cols:
            left = b.sub(i64(p.n), j0)
            masks = [lane_mask(b, b.sub(left, i64(v * vl)), vl) for v in range(nv)]
        if p.trans_a:   # op(A)[i, k] = A[k, i]
            arow = [gep(b, kf.ins[0], r, ety) for r in rows]
            astep = p.m
        else:
            arow = [gep(b, kf.ins[0], b.mul(r, i64(p.k)), ety) for r in rows]
            astep = 1
        zero = zero_vector(ety, vl)
        with carry_loop(b, 0, p.k, [zero] * (mr * nv), "matmul.k") as lp:
            kk = lp.iv
            brow = b.add(b.mul(kk, i64(p.n)), j0)
            bv = []
            for v in range(nv):
                idx = b.add(brow, i64(v * vl))
                bv.append(masked_load(b, bmat, idx, vty, masks[v]) if masks
                          else vload(b, bmat, idx, vty))
            aoff = b.mul(kk, i64(astep)) if astep != 1 else kk
            nxt = []
            for r in range(mr):
                av = splat(b, load(b, arow[r], aoff, ety), vl)
                for v in range(nv):
                    nxt.append(fma(b, av, bv[v], lp.vals[r * nv + v]))
            lp.next = nxt
        for r in range(mr):
            crow = b.add(b.mul(rows[r], i64(p.n)), j0)
            for v in range(nv):
                idx = b.add(crow, i64(v * vl))
                acc = lp.out[r * nv + v]
                if masks:
                    masked_store(b, acc, kf.out, idx, masks[v])
                else:
                    vstore(b, acc, kf.out, idx)


def _emit_dot(b, kf, p: _Plan, ety):
    vl, mr, nr = p.vl, p.mr, p.nr
    vty = ir.VectorType(ety, vl)
    mb, nb = -(-p.m // mr), -(-p.n // nr)
    kfull = p.k - p.k % vl
    with _tiles(b, kf, p, mb, nb, nr) as (j0, rows):
        cols = [clamp_hi(b, b.add(j0, i64(c)), p.n - 1, name=f"matmul.col{c}") for c in range(nr)]
        arow = [gep(b, kf.ins[0], b.mul(r, i64(p.k)), ety) for r in rows]
        brow = [gep(b, kf.ins[1], b.mul(c, i64(p.k)), ety) for c in cols]
        zero = zero_vector(ety, vl)
        with carry_loop(b, 0, kfull, [zero] * (mr * nr), "matmul.k", step=vl) as lp:
            av = [vload(b, pa, lp.iv, vty) for pa in arow]
            bv = [vload(b, pb, lp.iv, vty) for pb in brow]
            lp.next = [fma(b, av[r], bv[c], lp.vals[r * nr + c])
                       for r in range(mr) for c in range(nr)]
        acc = lp.out
        if kfull < p.k:
            mask = static_mask(vl, p.k - kfull)
            av = [masked_load(b, pa, i64(kfull), vty, mask) for pa in arow]
            bv = [masked_load(b, pb, i64(kfull), vty, mask) for pb in brow]
            acc = [fma(b, av[r], bv[c], acc[r * nr + c]) for r in range(mr) for c in range(nr)]
        for r in range(mr):
            crow = b.mul(rows[r], i64(p.n))
            for c in range(nr):
                store(b, hsum(b, acc[r * nr + c]), kf.out, b.add(crow, cols[c]), ety)

"""Native kernels of the dense primitives (matmul, conv2d and its two backward passes), compiled in
LLVM modules of many kernels (as the runtime does: kernels of equal register blocking share their
loop functions) and called through ctypes exactly as the kernel contract says
(codegen/kernels/__init__.py), against the numpy reference implementations of the IR interpreter.

The output buffer is pre-filled with NaN and the scratch with NaN bytes, so an element no thread
writes, or a read of uninitialised scratch, fails the comparison; with several threads the tids are
called one after the other in both orders, and once on real threads. Epilogues (elementwise loops
fused into a kernel) are checked through the runtime, which decides them.
"""
from __future__ import annotations

import ctypes
import re
import threading

import llvmlite.ir as llir
import numpy as np
import pytest

import tracejit
from tracejit.codegen.kernels import _load_all, kernels
from tracejit.codegen.loops import for_range
from tracejit.codegen.target import JITModule, cfunc
from tracejit.ir import lax
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType
from tracejit.ir.interpreter import impls
from tracejit import nn

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

_load_all()

NP = {"f32": np.float32, "f64": np.float64}
# error bound relative to the same reduction over |terms| (so cancellation does not matter)
RTOL = {"f32": 3e-5, "f64": 1e-12}


def make_instr(prim: str, in_shapes, dtype: str, **params):
    """The instruction `prim(*params of in_shapes)` of a freshly traced one-instruction function."""
    with building(Builder("t")) as b:
        xs = [b.add_param(TensorType(dtype, s)) for s in in_shapes]
        return getattr(lax, prim)(*xs, **params).instr


class Kernels:
    """Several kernels compiled together in one LLVM module, as the runtime does (kernels of equal
    register blocking share their loop functions there); `call(i, ...)` runs kernel i like the
    runtime would."""

    def __init__(self, instrs):
        self.instrs = list(instrs)
        mod = llir.Module()
        names = [f"kernel{i}" for i in range(len(self.instrs))]
        for name, ins in zip(names, self.instrs):
            kernels[ins.prim].lower(mod, name, ins)
        self.jit = JITModule(str(mod), names)
        self.fns = [cfunc(self.jit.addresses[name],
                          [ctypes.c_void_p] * (len(ins.inputs) + 2) + [ctypes.c_int64] * 2)
                    for name, ins in zip(names, self.instrs)]

    def buffers(self, i, arrays, nthreads):
        ins = self.instrs[i]
        out = np.full(ins.out.shape, np.nan, dtype=ins.out.type.np_dtype)
        nbytes = kernels[ins.prim].scratch_bytes(ins, nthreads)
        raw = np.full(nbytes + 64, 0xFF, dtype=np.uint8)  # garbage (NaN bytes) in scratch
        scratch = raw.ctypes.data + (-raw.ctypes.data) % 64
        args = [out.ctypes.data] + [a.ctypes.data for a in arrays] + [scratch]
        return out, raw, args

    def call(self, i, arrays, nthreads=1, order=None):
        out, _keep, args = self.buffers(i, arrays, nthreads)
        for tid in order if order is not None else range(nthreads):
            self.fns[i](*args, tid, nthreads)
        return out

    def call_threads(self, i, arrays, nthreads=2):
        """Each share on a thread of its own, with its own scratch region (as the pool does)."""
        out, _keep, args = self.buffers(i, arrays, nthreads)
        region = kernels[self.instrs[i].prim].scratch_bytes(self.instrs[i], 1)
        ths = [threading.Thread(target=self.fns[i],
                                args=(*args[:-1], args[-1] + t * region, t, nthreads))
               for t in range(nthreads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return out


def reference(ins, arrays):
    """The float64 numpy reference and the bound on the rounding error of the result."""
    ref = impls[ins.prim](*[a.astype(np.float64) for a in arrays], **ins.params)
    mag = impls[ins.prim](*[np.abs(a).astype(np.float64) for a in arrays], **ins.params)
    return ref, RTOL[ins.out.dtype] * mag + 1e-30


def check_all(specs, dtype, thread_counts=(1, 2, 3), seed=0):
    """Compile the kernels of `specs` [(prim, in_shapes, params)] in one module and check each
    against numpy for every thread count (tids called in both orders)."""
    instrs = [make_instr(prim, shapes, dtype, **params) for prim, shapes, params in specs]
    ks = Kernels(instrs)
    rng = np.random.default_rng(seed)
    for i, ins in enumerate(instrs):
        arrays = [rng.standard_normal(v.shape).astype(NP[dtype]) for v in ins.inputs]
        ref, tol = reference(ins, arrays)
        for nt in thread_counts:
            orders = [range(nt)] if nt == 1 else [range(nt), range(nt - 1, -1, -1)]
            for order in orders:
                got = ks.call(i, arrays, nt, order)
                bad = ~(np.abs(got - ref) <= tol)
                if bad.any():
                    at = tuple(np.argwhere(bad)[0])
                    raise AssertionError(
                        f"{ins.prim.name} {[v.shape for v in ins.inputs]} {dtype} {ins.params} "
                        f"nthreads={nt} order={list(order)}: {bad.sum()} of {bad.size} elements "
                        f"wrong, first at {at}: got {got[at]}, want {ref[at]}")
    return ks


def check(prim, in_shapes, dtype, thread_counts=(1, 2, 3), seed=0, **params):
    return check_all([(prim, in_shapes, params)], dtype, thread_counts, seed)


# ------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------
MATMUL_SHAPES = [  # (M, N, K)
    (1, 1, 1), (2, 1, 3), (5, 7, 3), (17, 33, 40), (3, 100, 1), (13, 16, 32), (40, 70, 5),
    (64, 256, 784), (64, 10, 256), (784, 256, 64), (10, 256, 64), (64, 84, 120), (1, 300, 33),
    (33, 1, 65),
    (13, 37, 300), (3, 9, 0),   # K in blocks: a partial last block, clamped rows, masked columns
    (29, 45, 300),   # packed B panels: a partial last K block, a partial last column tile
    (30, 7, 100),    # x @ W^T with K > 3 M: the dot form on clamped rows and columns, a K tail
]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("trans", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["nn", "tn", "nt", "tt"])
def test_matmul(trans, dtype):
    """All shapes of one transpose combination in one module (they share loop functions)."""
    ta, tb = trans
    specs = []
    for m, n, k in MATMUL_SHAPES:
        if m * n * k > 10 ** 6 and dtype == "f64" and (ta, tb) != (False, True):
            continue   # large f64 shapes: one transpose combination is enough
        specs.append(("matmul", [(k, m) if ta else (m, k), (n, k) if tb else (k, n)],
                      dict(trans_a=ta, trans_b=tb)))
    check_all(specs, dtype)


def test_matmul_outer_form_runs_k_in_blocks():
    """A weight gradient x^T @ g over a long K (an RNN's steps x batch) walks K in blocks, so
    its B panel stays in L1 across the row tiles; the partial column tile (24 columns of a
    tile of 32 or 64) adds each block to its stack tile, filled from C before every block but
    the first."""
    rng = np.random.default_rng(5)
    x, g = rng.standard_normal((300, 8), np.float32), rng.standard_normal((300, 24), np.float32)
    f = tracejit.jit(lambda x, g: x.T @ g)
    assert "matmul.kb.body" in f.ir(x, g, stage="llvm")
    np.testing.assert_allclose(f(x, g), x.astype(np.float64).T @ g, rtol=1e-4, atol=1e-4)


# matrix-vector products: (a shape, b shape, trans_a, trans_b), batched with broadcast operands
MATVEC_SPECS = [
    ((37, 19), (19, 1), False, False),        # A @ b: rows of A . b, a partial row tile
    ((3, 19, 37), (19, 1), True, False),      # A^T @ b, batched A: v^T A, masked columns
    ((1, 70), (2, 70, 45), False, False),     # a @ B, batched B: axpy over 45 columns
    ((1, 9), (2, 13, 9), False, True),        # a @ B^T, batched B: rows of B . a, K < VL
    ((4, 1, 17, 1), (1, 17), True, True),     # a dot product, batched a
    ((5, 1), (1, 1), False, False),           # K = 1
    ((2, 16, 24), (2, 1, 24), False, True),   # whole row tiles and K a multiple of the vector
]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_matvec_kernels(dtype):
    """Products with N == 1 or M == 1 take the matrix-vector kernels (a dot per row, or a sum of
    scaled rows) for every transpose, batched or broadcast, with sizes off the vector width."""
    from tracejit.codegen.kernels.matmul import _plan
    specs = [("matmul", [a, b], dict(trans_a=ta, trans_b=tb)) for a, b, ta, tb in MATVEC_SPECS]
    ks = check_all(specs, dtype)
    assert [_plan(ins).form for ins in ks.instrs] == [
        "mv_dot", "mv_axpy", "mv_axpy", "mv_dot", "mv_dot", "mv_dot", "mv_dot"]


def test_matvec_compiled_matches_interpreter():
    """A function of matrix-vector products (with an epilogue on one), compiled and interpreted."""
    from helpers import use_backend
    rng = np.random.default_rng(1)
    A, v, w = (rng.standard_normal(s).astype(np.float32) for s in ((29, 11), (11, 1), (1, 29)))
    f = tracejit.jit(lambda A, v, w: (tracejit.tanh(A @ v) + 1.0, w @ A, A.T @ w.T, v.T @ A.T))
    want = [np.tanh(A @ v) + 1.0, w @ A, A.T @ w.T, v.T @ A.T]
    got = f(A, v, w)
    with use_backend("interpreter"):
        ref = f(A, v, w)
    for g, r, x in zip(got, ref, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-6)
    assert "matmul.mv.k" in f.ir(A, v, w, stage="llvm")


def _placed(a: np.ndarray, offset: int, keep: list) -> np.ndarray:
    """A copy of `a` starting `offset` bytes past a 64-byte boundary (its buffer kept in `keep`)."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    keep.append(raw)
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_matmul_operands_at_every_alignment(dtype):
    """The kernels align their loads to cache lines at run time (the dot form's K loop starts on
    a line of B's first row after a masked head step; see matmul._emit_dot): operands placed at
    every element offset within a line, K shorter than, equal to and past the head, and rows
    whose alignment differs (K not a multiple of the vector), match numpy on 1-2 threads."""
    specs = [("matmul", [(m, k), (n, k)], dict(trans_b=True))
             for m, n, k in [(5, 7, 40), (9, 13, 37), (4, 6, 100), (3, 5, 33), (6, 4, 16)]]
    specs += [("matmul", [(k, m), (k, n)], dict(trans_a=True)) for m, n, k in [(30, 45, 20)]]
    specs += [("matmul", [(m, k), (k, n)], {}) for m, n, k in [(30, 45, 20), (70, 33, 7)]]
    ks = Kernels([make_instr(prim, shapes, dtype, **params) for prim, shapes, params in specs])
    rng = np.random.default_rng(3)
    es = np.dtype(NP[dtype]).itemsize
    forms = set()
    for i, ins in enumerate(ks.instrs):
        from tracejit.codegen.kernels.matmul import _plan
        forms.add(_plan(ins).form)
        arrays = [rng.standard_normal(v.shape).astype(NP[dtype]) for v in ins.inputs]
        ref, tol = reference(ins, arrays)
        for off_a in range(0, 64, es * 3):
            for off_b in (0, es, 64 - es):
                keep = []
                placed = [_placed(arrays[0], off_a, keep), _placed(arrays[1], off_b, keep)]
                for nt in (1, 2):
                    got = ks.call(i, placed, nt)
                    assert (np.abs(got - ref) <= tol).all(), (ins.params, ins.out.shape, off_a,
                                                              off_b, nt)
    assert {"dot", "outer"} <= forms


def test_matmul_chunks_form_a_grid_of_column_and_row_groups():
    """Without an epilogue the chunks split a product's column tiles and, when there are more
    chunks than column tiles, its row tiles too (4 column tiles x 2 row groups for 8 chunks);
    chunks past the grid (5 or 7 chunks over 2-3 column tiles) do nothing. Every element is
    written once (the output starts as NaN), with B in place, B^T packed and the dot form."""
    from tracejit.codegen.kernels import FLOPS_PER_NS
    from tracejit.codegen.parallel import PARALLEL_MIN_NS
    specs = [("matmul", [(200, 40), (40, 200)], {}),                       # 4 column tiles
             ("matmul", [(180, 64), (150, 64)], dict(trans_b=True)),       # B^T panels
             ("matmul", [(160, 70), (160, 150)], dict(trans_a=True)),      # 3 or 1 column tiles
             ("matmul", [(7, 2400), (100, 2400)], dict(trans_b=True))]     # the dot form
    ks = check_all(specs, "f32", thread_counts=(4, 5, 7, 8))
    # (each big enough to run on the pool, where the grid applies)
    assert all(2 * ins.out.type.size * ins.inputs[0].shape[0 if ins.params.get("trans_a") else 1]
               / FLOPS_PER_NS >= PARALLEL_MIN_NS for ins in ks.instrs)
    for ins in ks.instrs:
        mod = llir.Module()
        kernels[ins.prim].lower(mod, "k", ins)
        assert "matmul.split.rows" in str(mod)


def test_matmul_copied_panels_of_b(monkeypatch):
    """The outer form's copied panels of B (a run-time mode the plan does not choose by
    default): partial K blocks and column tiles, batched, on 1-3 threads."""
    from tracejit.codegen.kernels import matmul
    monkeypatch.setitem(matmul.FORCE, "pack", "b")
    specs = [("matmul", [(29, 300), (300, 45)], {}), ("matmul", [(2, 30, 130), (2, 130, 19)], {})]
    ks = check_all(specs, "f32")
    assert [matmul._plan(ins).pack for ins in ks.instrs] == ["b", "b"]


def test_matmul_plan_packs_panels_and_keeps_the_dot_form_for_long_k():
    """The form and packing each shape class gets (lowering only: nothing is compiled)."""
    from tracejit.codegen.kernels.matmul import _plan
    from tracejit.codegen.target import vector_registers

    def plan(shapes, **params):
        p = _plan(make_instr("matmul", shapes, "f32", **params))
        return p.form, p.pack

    # B read in place, or copied into panels where misaligned (AVX-512), or wherever enough row
    # tiles share them (16 registers); decided at run time
    auto = "auto" if vector_registers() >= 32 else "shared"

    # attention's projections and heads: the outer form on panels (B^T transposed into them)
    assert plan([(1024, 256), (256, 256)], trans_b=True) == ("outer", "bt")
    assert plan([(8, 4, 128, 64), (8, 4, 128, 64)], trans_b=True) == ("outer", "bt")
    assert plan([(8, 4, 128, 64), (8, 4, 64, 128)]) == ("outer", auto)
    assert plan([(1024, 256), (1024, 256)], trans_a=True) == ("outer", auto)
    # an MLP's first layer at batch 64 (K > 3 M), a few rows, a matrix-vector product: in place
    assert plan([(64, 784), (256, 784)], trans_b=True) == ("dot", "")
    assert plan([(8, 256), (256, 256)], trans_b=True) == ("dot", "")
    assert plan([(8, 256), (256, 256)]) == ("outer", auto)
    assert plan([(300, 256), (1, 256)], trans_b=True) == ("mv_dot", "")
    # a small x @ W^T with few columns (LeNet-5's classifier) shares the dot form's block
    # rather than compiling the outer form's narrow block (AVX-512: 10 columns are narrow
    # there); with 16 registers 10 columns take the outer form's ordinary block; a big one keeps
    # the outer form
    assert plan([(64, 84), (10, 84)], trans_b=True) == (
        ("dot", "") if vector_registers() >= 32 else ("outer", "bt"))
    assert plan([(64, 84), (8, 84)], trans_b=True) == ("dot", "")
    assert plan([(4096, 84), (10, 84)], trans_b=True) == ("outer", "bt")


# ------------------------------------------------------------------------------------------------
# convolutions
# ------------------------------------------------------------------------------------------------
CONV_CASES = [  # x [N,C,H,W], w [O,C,KH,KW], stride, padding
    ((2, 3, 7, 9), (4, 3, 3, 3), (1, 1), (1, 1)),
    ((1, 1, 28, 28), (6, 1, 5, 5), (1, 1), (0, 0)),        # LeNet-5 conv1 (batch 1)
    ((2, 6, 12, 12), (16, 6, 5, 5), (1, 1), (0, 0)),       # LeNet-5 conv2
    ((2, 5, 11, 13), (7, 5, 3, 2), (2, 3), (1, 2)),
    ((1, 2, 5, 5), (3, 2, 1, 1), (1, 1), (2, 0)),           # padding beyond the kernel
    ((3, 4, 17, 40), (5, 4, 4, 3), (3, 2), (0, 1)),
    ((1, 3, 9, 70), (2, 3, 3, 3), (1, 1), (1, 1)),          # rows of several column blocks
    ((2, 16, 8, 8), (24, 16, 3, 3), (1, 1), (1, 1)),
    ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1), (0, 0)),
    ((2, 3, 6, 20), (2, 3, 5, 5), (1, 1), (2, 2)),
    ((1, 2, 4, 37), (3, 2, 2, 7), (2, 1), (1, 3)),          # wide kernel, odd width
    ((2, 1, 9, 9), (1, 1, 3, 3), (3, 3), (0, 0)),           # stride == kernel
    ((1, 3, 10, 1), (2, 3, 3, 1), (1, 1), (1, 0)),          # conv1d as H x 1
    ((1, 2, 1, 50), (3, 2, 1, 5), (1, 2), (0, 2)),          # conv1d as 1 x W
    ((1, 2, 35, 36), (3, 2, 2, 2), (1, 1), (0, 0)),
    ((3, 5, 9, 7), (16, 5, 3, 3), (1, 1), (1, 1)),         # O = 16, short rows: channel mode
    ((2, 3, 6, 4), (32, 3, 2, 2), (1, 1), (0, 0)),          # (f32)
    ((2, 5, 13, 11), (16, 5, 3, 3), (2, 2), (1, 1)),        # strided channel mode (f32)
    ((1, 3, 9, 15), (16, 3, 2, 4), (1, 3), (0, 1)),         # 3 phases, 4 taps a row (f32)
    ((2, 3, 7, 8), (8, 3, 3, 3), (2, 2), (0, 1)),           # strided channel mode (f64)
    ((2, 16, 6, 7), (5, 16, 3, 3), (1, 1), (1, 1)),         # input gradient: channel mode
    ((1, 16, 5, 6), (3, 16, 2, 3), (1, 1), (0, 0)),         # (rows of pitch W, f32)
    ((2, 8, 5, 4), (3, 8, 3, 3), (1, 1), (1, 0)),           # (rows of pitch W, f64)
]


def _out_hw(x, w, s, p):
    return tuple((n + 2 * pp - k) // ss + 1 for n, k, ss, pp in zip(x[2:], w[2:], s, p))


def _conv_specs(prim, case):
    x, w, s, p = case
    ct = (x[0], w[0]) + _out_hw(x, w, s, p)
    return {"conv2d": ("conv2d", [x, w], dict(stride=s, padding=p)),
            "conv2d_input_grad": ("conv2d_input_grad", [ct, w],
                                  dict(in_hw=x[2:], stride=s, padding=p)),
            "conv2d_weight_grad": ("conv2d_weight_grad", [ct, x],
                                   dict(kernel=w[2:], stride=s, padding=p))}[prim]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("prim", ["conv2d", "conv2d_input_grad", "conv2d_weight_grad"])
def test_conv(prim, dtype):
    """Every case of CONV_CASES, compiled together (cases of equal blocking share functions)."""
    check_all([_conv_specs(prim, case) for case in CONV_CASES], dtype)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_all_dense_kernels_in_one_module(dtype):
    """The forward pass and both gradients of every conv case plus matmuls, in one module: shared
    loop functions must not mix up the compile-time constants of different kernels."""
    specs = [_conv_specs(prim, case) for case in CONV_CASES
             for prim in ("conv2d", "conv2d_input_grad", "conv2d_weight_grad")]
    specs += [("matmul", [(m, k), (n, k)], dict(trans_b=True)) for m, n, k in MATMUL_SHAPES[:8]]
    check_all(specs, dtype, thread_counts=(2,))


def test_conv_block_shape_and_real_threads():
    """The benchmark's conv block (smaller batch), each pass run on two real threads. Its padded
    image copy (296 KB) does not fit L1: the core prefetches the next channel's rows (AVX-512
    and AVX2 alike: measured on a Xeon and on Zen 3)."""
    case = ((2, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1))
    specs = [_conv_specs(prim, case)
             for prim in ("conv2d", "conv2d_input_grad", "conv2d_weight_grad")]
    specs.append(("matmul", [(64, 784), (256, 784)], dict(trans_b=True)))
    ks = check_all(specs, "f32", thread_counts=(2,))
    prefetches = "prefetch1" in ks.jit.asm and "prefetcht0" in ks.jit.asm
    assert prefetches
    rng = np.random.default_rng(1)
    for i, ins in enumerate(ks.instrs):
        arrays = [rng.standard_normal(v.shape).astype(np.float32) for v in ins.inputs]
        ref, tol = reference(ins, arrays)
        assert (np.abs(ks.call_threads(i, arrays, 2) - ref) <= tol).all(), ins.prim.name


@pytest.mark.parametrize("flat", [True, False])
def test_conv_flat_mode_forced(flat):
    """The flat mode of the core and of the weight gradient (rows of several output rows in one
    vector; codegen/kernels/conv2d.py) forced on, or off, for every unit-stride case."""
    from tracejit.codegen.kernels import conv2d
    cases = [c for c in CONV_CASES if c[2] == (1, 1) and _out_hw(*c)[0] > 1]
    cases.append(((3, 2, 9, 7), (5, 2, 3, 4), (1, 1), (0, 0)))
    try:
        conv2d.FORCE.update(flat=flat, wflat=flat)
        check_all([_conv_specs(prim, case) for case in cases
                   for prim in ("conv2d", "conv2d_input_grad", "conv2d_weight_grad")], "f32",
                  thread_counts=(1, 2))
    finally:
        conv2d.FORCE.clear()


STRIDED_COPY_CASES = [  # odd sizes, strides 2 and 3, padding 0 / 1 / 2
    ((2, 3, 9, 11), (4, 3, 3, 3), (2, 2), (1, 1)),
    ((1, 2, 10, 13), (3, 2, 3, 3), (3, 3), (2, 2)),
    ((2, 1, 7, 20), (2, 1, 3, 3), (2, 2), (0, 0)),
    ((1, 3, 5, 3), (2, 3, 2, 3), (3, 2), (2, 1)),      # an image smaller than a vector
    ((1, 2, 11, 37), (3, 2, 3, 5), (2, 3), (1, 2)),    # rows of several vectors per phase
]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_conv_strided_copy_in_phase_rows_by_shuffles(dtype):
    """Strided convolutions (forward and weight gradient) split the input's rows into their
    phase rows a vector at a time (loads, shuffles, whole-vector stores whose spill past a phase
    row the next block overwrites; masked loads only where a vector leaves the image), not
    element by element: the copy function of each stride is in the module, and the results
    match numpy on every border case."""
    specs = [_conv_specs(prim, case) for case in STRIDED_COPY_CASES
             for prim in ("conv2d", "conv2d_weight_grad")]
    ks = check_all(specs, dtype, thread_counts=(1, 2))
    for sx in (2, 3):
        assert f"conv.pad.dtype{dtype}.contiguous0.phases{sx}" in ks.jit.asm


def test_conv_weight_gradient_flat_mode_with_an_inf_pixel():
    """The flat weight gradient sums over the columns between the output rows too (with zero
    cotangents there): they must not turn an Inf input pixel into 0 * Inf = NaN."""
    ins = make_instr("conv2d_weight_grad", [(2, 3, 8, 8), (2, 2, 12, 12)], "f32", kernel=(5, 5),
                     stride=(1, 1), padding=(0, 0))
    rng = np.random.default_rng(3)
    ct = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    x = rng.standard_normal((2, 2, 12, 12)).astype(np.float32)
    x[1, 0, 4, 11] = np.inf
    x[0, 1, 7, 0] = -np.inf
    ref = impls[ins.prim](ct.astype(np.float64), x.astype(np.float64), **ins.params)
    got = Kernels([ins]).call(0, [ct, x], 1)
    assert (np.isnan(got) == np.isnan(ref)).all() and (np.isinf(got) == np.isinf(ref)).all()
    fin = np.isfinite(ref)
    assert np.allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-4)


def test_conv_weight_gradient_in_many_chunks():
    """The weight gradient split in more chunks than channels or channel blocks (the runtime's
    4 chunks per thread; the channel blocks shrink with the chunk count): shares straddling
    blocks, strided and padded copies, and the unpadded input read in place."""
    check_all([_conv_specs("conv2d_weight_grad", case) for case in [
        ((3, 5, 9, 9), (4, 5, 3, 3), (2, 2), (1, 1)),
        ((2, 17, 6, 6), (9, 17, 3, 3), (1, 1), (1, 1)),
        ((2, 3, 10, 12), (6, 3, 5, 5), (1, 1), (0, 0)),
        ((3, 1, 13, 11), (2, 1, 5, 3), (1, 1), (0, 0))]], "f32", thread_counts=(5, 8))


def test_conv_weight_gradient_reads_an_unpadded_input_in_place():
    """No padding and unit strides (LeNet-5): the padded copy would equal the input, so the
    weight gradient reads the input itself: no copy function in its module."""
    ins = make_instr("conv2d_weight_grad", [(4, 16, 8, 8), (4, 6, 12, 12)], "f32",
                     kernel=(5, 5), stride=(1, 1), padding=(0, 0))
    ks = Kernels([ins])
    assert "conv.pad" not in ks.jit.asm
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(v.shape).astype(np.float32) for v in ins.inputs]
    ref, tol = reference(ins, arrays)
    assert (np.abs(ks.call(0, arrays, 3) - ref) <= tol).all()


def test_more_threads_than_work():
    check("matmul", [(2, 3), (3, 1)], "f32", thread_counts=(5,))
    check("conv2d", [(1, 1, 3, 3), (1, 1, 2, 2)], "f64", thread_counts=(4,), stride=(1, 1),
          padding=(0, 0))


# ------------------------------------------------------------------------------------------------
# epilogues
# ------------------------------------------------------------------------------------------------
class AffineEpilogue:
    """A stand-in for codegen.fused.Epilogue (the same interface): out = out * scale + k[0] over
    the block, with one extra buffer k. Not idempotent, so a block done twice or not at all
    shows."""
    n_args = 1

    def call(self, b, out, extra_args, start, count):
        ety = self.ety
        k = b.load(b.gep(extra_args[0], [llir.Constant(llir.IntType(64), 0)], source_etype=ety),
                   typ=ety)
        with for_range(b, start, b.add(start, count), 1, "epi") as i:
            p = b.gep(out, [i], source_etype=ety)
            b.store(b.fadd(b.fmul(b.load(p, typ=ety), llir.Constant(ety, 3.0)), k), p)

    def call_window(self, b, out, extra_args, start, count, col0, col1):
        """`call` over the columns [col0, col1) of each row of out[start, start + count)."""
        n = llir.Constant(llir.IntType(64), self.n)
        with for_range(b, b.sdiv(start, n), b.sdiv(b.add(start, count), n), 1, "epi.row") as r:
            row = b.mul(r, n)
            self.call(b, out, extra_args, b.add(row, col0), b.sub(col1, col0))


def _lower_with_epilogue(specs, dtype, epi):
    """(instructions, kernel names, JIT module): the kernels of `specs` lowered into one module
    with the stand-in epilogue `epi` (its element type set for `dtype`)."""
    instrs = [make_instr(prim, shapes, dtype, **params) for prim, shapes, params in specs]
    epi.ety = llir.FloatType() if dtype == "f32" else llir.DoubleType()
    mod = llir.Module()
    names = [f"kernel{i}" for i in range(len(instrs))]
    for name, ins in zip(names, instrs):
        epi.n = ins.out.shape[-1]   # the row length of call_window's rows
        kernels[ins.prim].lower(mod, name, ins, epilogue=epi)
    return instrs, names, JITModule(str(mod), names)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_epilogue_applied_once_to_every_element(dtype):
    specs = [("matmul", [(m, k), (n, k)], dict(trans_b=True)) for m, n, k in MATMUL_SHAPES[:9]]
    specs += [("matmul", [(k, m), (k, n)], dict(trans_a=True)) for m, n, k in MATMUL_SHAPES[:9]]
    specs += [_conv_specs(prim, case) for case in CONV_CASES[:8]
              for prim in ("conv2d", "conv2d_input_grad")]
    instrs, names, jit = _lower_with_epilogue(specs, dtype, AffineEpilogue())
    rng = np.random.default_rng(6)
    shift = np.array([0.5], dtype=NP[dtype])
    for name, ins in zip(names, instrs):
        fn = cfunc(jit.addresses[name], [ctypes.c_void_p] * (len(ins.inputs) + 3)
                   + [ctypes.c_int64] * 2)
        arrays = [rng.standard_normal(v.shape).astype(NP[dtype]) for v in ins.inputs]
        ref, tol = reference(ins, arrays)
        for nt in (1, 2, 3):
            out = np.full(ins.out.shape, np.nan, dtype=NP[dtype])
            raw = np.full(kernels[ins.prim].scratch_bytes(ins, nt) + 64, 0xFF, dtype=np.uint8)
            args = ([out.ctypes.data] + [a.ctypes.data for a in arrays] + [shift.ctypes.data,
                    raw.ctypes.data + (-raw.ctypes.data) % 64])
            for tid in range(nt):
                fn(*args, tid, nt)
            assert (np.abs(out - (3 * ref + 0.5)) <= 3 * tol + 1e-6).all(), \
                (ins.prim.name, [v.shape for v in ins.inputs], ins.params, nt)


# epilogues through the runtime: the fusion planner decides them
def _epilogue_program(x, w1, b1, w2, b2, wl, bl):
    h = nn.relu(nn.conv2d(x, w1, b1, padding=1))             # conv + bias + relu epilogue
    h = nn.relu(nn.conv2d(h, w2, b2, stride=2, padding=1))   # input grad with the relu mask
    z = nn.relu(nn.linear(nn.flatten(h), wl, bl))            # matmul + bias + relu epilogue
    return (z * z).sum()


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_epilogues_in_compiled_gradient(dtype):
    rng = np.random.default_rng(5)
    shapes = [(3, 2, 9, 11), (5, 2, 3, 3), (5,), (4, 5, 3, 3), (4,), (7, 4 * 5 * 6), (7,)]
    args = [rng.standard_normal(sh).astype(NP[dtype]) for sh in shapes]
    old = tracejit.config.backend
    try:
        results = []
        for backend in ("llvm", "interpreter"):
            tracejit.config.backend = backend
            grad = tracejit.jit_grad(_epilogue_program, argnums=tuple(range(len(args))))
            results.append(grad(*args))
            if backend == "llvm":
                dump = grad.ir(*args, stage="optimized")
    finally:
        tracejit.config.backend = old
    # which kernels get epilogues is the fusion planner's decision; at least one dense kernel must
    dense = [ln for ln in dump.splitlines() if "epilogue" in ln and
             any(f"loop nest {prim} " in ln for prim in ("conv2d", "conv2d_input_grad", "matmul"))]
    assert dense, dump
    for native, ref in zip(*results):
        native, ref = np.asarray(native), np.asarray(ref)
        assert np.allclose(native, ref, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10 *
                           np.abs(ref).max()), (native, ref)


# ------------------------------------------------------------------------------------------------
# the assembly has vector FMAs
# ------------------------------------------------------------------------------------------------
_VFMA = re.compile(r"vfmadd\w*\s+[^\n]*%[yz]mm")
_SPILL = re.compile(r"vmov\w+\s+%[yz]mm\d+, -?\d*\(%rsp\)")


def test_asm_weight_gradient_block_without_masks():
    """The weight gradient's full steps of a row need no lane mask (all the pixels are real, only
    the flat mode has columns between rows): plain loads, no `and`, and the freed register
    holds a 4 output channels x 3 taps block on AVX2 (12 FMAs per step; more on AVX-512)."""
    ins = make_instr("conv2d_weight_grad", [(2, 16, 16, 16), (2, 16, 16, 16)], "f32",
                     kernel=(3, 3), stride=(1, 1), padding=(1, 1))
    asm = Kernels([ins]).jit.asm
    assert not re.findall(r"vandp[sd]\s+[^\n]*%[yz]mm", asm)
    assert len(_VFMA.findall(asm)) >= 12
    assert not _SPILL.findall(asm)


@pytest.mark.parametrize("prim, shapes, params", [
    ("matmul", [(64, 784), (256, 784)], dict(trans_b=True)),
    ("matmul", [(64, 256), (64, 784)], dict(trans_a=True)),
    ("conv2d", [(16, 64, 32, 32), (64, 64, 3, 3)], dict(stride=1, padding=1)),
    ("conv2d_input_grad", [(16, 64, 32, 32), (64, 64, 3, 3)],
     dict(in_hw=(32, 32), stride=1, padding=1)),
    ("conv2d_weight_grad", [(16, 64, 32, 32), (16, 64, 32, 32)],
     dict(kernel=(3, 3), stride=1, padding=1)),
])
def test_asm_has_vector_fma(prim, shapes, params):
    asm = Kernels([make_instr(prim, shapes, "f32", **params)]).jit.asm
    # a register block of FMAs (9 to 12 accumulators with AVX2's 16 registers, 24 with AVX-512's
    # 32; the weight gradient's smallest is 3 output channels x 3 taps)
    assert len(_VFMA.findall(asm)) >= 9, f"{prim}: no vector FMAs in\n{asm[:3000]}"
    if prim.startswith("conv"):
        # and the block fits the registers: no vector register is spilled to the stack (a
        # 16-accumulator block on AVX2 spilled on every tap and ran at 60-80% of the speed)
        spills = _SPILL.findall(asm)
        assert not spills, f"{prim}: {len(spills)} vector spills, e.g. {spills[:3]}"


def test_epilogue_reads_the_element_it_writes_without_an_alias_check():
    """A matmul's epilogue reads the product where it stores the result: the row index it reads
    with must be the one it writes with (a remainder on it made LLVM add a run-time alias check
    that sent every row to the scalar loop: the fused tanh cost 4x a separate loop)."""
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((64, 96), (96, 40), (40,)))
    f = tracejit.jit(lambda x, w, b: tracejit.tanh(x @ w + b))
    np.testing.assert_allclose(f(x, w, b), np.tanh(x @ w + b), rtol=1e-5, atol=1e-5)
    text = f.ir(x, w, b, stage="llvm-opt")
    start = text.index("define void @k0.matmul")
    kernel = text[start:text.index("\n}\n", start)]
    assert re.search(r"<\d+ x float>", kernel)
    assert "diff.check" not in kernel and " srem " not in kernel, kernel


def test_matmul_kernel_without_epilogue_is_left_unoptimized():
    """A matmul kernel without an epilogue is control code around calls of the tile function:
    marked optnone (compile time); with an epilogue it is optimized (the epilogue, inlined into
    it, is vectorized: see the test above). Both compute the product."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((40, 24)).astype(np.float32), rng.standard_normal((24, 30))
    w = w.astype(np.float32)
    for fn, ref, optnone in [(lambda x, w: x @ w, x @ w, True),
                             (lambda x, w: tracejit.tanh(x @ w), np.tanh(x @ w), False)]:
        f = tracejit.jit(fn)
        np.testing.assert_allclose(f(x, w), ref, rtol=1e-5, atol=1e-5)
        head = re.search(r'define void @"k0\.matmul"[^\n]*', f.ir(x, w, stage="llvm")).group(0)
        assert ("optnone" in head) == optnone, head


class ApartEpilogue(AffineEpilogue):
    """AffineEpilogue applied apart (as fused.Epilogue with apart=True): stores out * 3 + k[0]
    into a buffer of its own (the first extra argument), leaving the kernel's result alone."""
    n_args = 2
    apart = True

    def call(self, b, out, extra_args, start, count):
        ety = self.ety
        dst, kp = extra_args
        k = b.load(b.gep(kp, [llir.Constant(llir.IntType(64), 0)], source_etype=ety), typ=ety)
        with for_range(b, start, b.add(start, count), 1, "epi") as i:
            x = b.load(b.gep(out, [i], source_etype=ety), typ=ety)
            b.store(b.fadd(b.fmul(x, llir.Constant(ety, 3.0)), k),
                    b.gep(dst, [i], source_etype=ety))


def test_epilogue_apart_reuses_one_panel_of_the_product():
    """An epilogue applied apart is the only reader of the product, so a matmul writes every
    panel of its rows over its first one: the epilogue still sees each element once, and most
    of the product's buffer is never touched (it stays in cache instead)."""
    # (520 and 400 rows: several panels a thread also where copied panels of B make them 128
    # rows)
    specs = [("matmul", [(520, 20), (20, 33)], {}), ("matmul", [(20, 400), (33, 20)],
                                                     dict(trans_a=True, trans_b=True)),
             ("matmul", [(2, 400, 20), (2, 20, 9)], {})]
    instrs, names, jit = _lower_with_epilogue(specs, "f32", ApartEpilogue())
    rng = np.random.default_rng(7)
    shift = np.array([0.5], dtype=np.float32)
    for name, ins in zip(names, instrs):
        fn = cfunc(jit.addresses[name], [ctypes.c_void_p] * (len(ins.inputs) + 4)
                   + [ctypes.c_int64] * 2)
        arrays = [rng.standard_normal(v.shape).astype(np.float32) for v in ins.inputs]
        ref, tol = reference(ins, arrays)
        for nt in (1, 2, 3):
            out = np.full(ins.out.shape, np.nan, dtype=np.float32)
            dst = np.full(ins.out.shape, np.nan, dtype=np.float32)
            raw = np.full(kernels[ins.prim].scratch_bytes(ins, nt) + 64, 0xFF, dtype=np.uint8)
            args = ([out.ctypes.data] + [a.ctypes.data for a in arrays]
                    + [dst.ctypes.data, shift.ctypes.data,
                       raw.ctypes.data + (-raw.ctypes.data) % 64])
            for tid in range(nt):
                fn(*args, tid, nt)
            assert (np.abs(dst - (3 * ref + 0.5)) <= 3 * tol + 1e-6).all(), (ins.params, nt)
            rows = out.reshape(-1, out.shape[-1])
            written = int(np.isfinite(rows).all(axis=1).sum())
            assert written < len(rows), (ins.params, nt, written, len(rows))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_transpose_sums_do_not_see_a_common_rotation_of_the_lanes(dtype):
    """The dot form leaves its accumulators' lanes rotated by where B's row starts (matmul.py
    _emit_dot) and relies on transpose_sums giving the same bits for every rotation; sums whose
    order depended on the lanes' positions would differ on these terms of mixed magnitude."""
    from tracejit.codegen.kernels.toolkit import dtype_info
    _, vl, _ = dtype_info(dtype)
    for count in sorted({3, vl // 2 + 1, vl}):    # the sums of up to a vector's lanes
        _check_transpose_sums_rotated(dtype, count)


def _check_transpose_sums_rotated(dtype, count):
    from tracejit.codegen.kernels.matmul import transpose_sums
    from tracejit.codegen.kernels.toolkit import dtype_info, rotate_lanes
    from tracejit.codegen.loops import vload, vstore
    ety, vl, _ = dtype_info(dtype)
    vty = llir.VectorType(ety, vl)
    mod = llir.Module()
    fn = llir.Function(mod, llir.FunctionType(llir.VoidType(), [llir.PointerType()] * 2
                                              + [llir.IntType(64)]), "sums")
    b = llir.IRBuilder(fn.append_basic_block("entry"))
    src, dst, shift = fn.args
    vecs = [rotate_lanes(b, vload(b, src, llir.Constant(llir.IntType(64), i * vl), vty), shift)
            for i in range(count)]
    vstore(b, transpose_sums(b, vecs), dst, llir.Constant(llir.IntType(64), 0))
    b.ret_void()
    jit = JITModule(str(mod), ["sums"])
    call = cfunc(jit.addresses["sums"], [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64])
    rng = np.random.default_rng(count)
    terms = (rng.standard_normal((count, vl)) * 10.0 ** rng.integers(-6, 7, (count, vl)))
    terms = terms.astype(NP[dtype])
    got = []
    for r in range(vl):
        out = np.full(vl, np.nan, NP[dtype])
        call(terms.ctypes.data, out.ctypes.data, r)
        got.append(out[:count].tobytes())
    assert len(set(got)) == 1
    np.testing.assert_allclose(np.frombuffer(got[0], NP[dtype]),
                               terms.sum(axis=1, dtype=np.float64), rtol=RTOL[dtype],
                               atol=RTOL[dtype] * np.abs(terms).sum(axis=1).max())
    # the terms are such that another order of the additions gives other bits
    assert any(np.add.reduce(row) != np.add.reduce(np.roll(row, 1)) or
               np.add.reduce(row[::-1]) != np.add.reduce(row) for row in terms)

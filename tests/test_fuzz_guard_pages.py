"""The dense kernels (matmul in all its forms, the conv2d family) on random small shapes, with every
operand and the output placed against an inaccessible (PROT_NONE) guard page: a kernel that reads
or writes one element past the end (or before the start) of a buffer faults instead of reading
garbage into lanes it may store. Results are checked against the interpreter's numpy references
(output NaN-filled, scratch filled with NaN bytes, 1-3 threads with the tids called one after the
other in several orders, and 2 real threads).

The kernels are called directly as the runtime calls them (test_kernels_dense.Kernels): the call
boundary copies non-contiguous arguments, but contiguous ones are read in place, so a user's array
that ends at the end of a mapping is exactly what these buffers model. Buffers sit at the end of
the mapping (the common case: reads past the end) or at its start, and their sizes are not
multiples of the vector width, so they are not 32-byte aligned either.

The cases run in a subprocess (this file run as a script), so a fault fails the test and names the
case. TRACEJIT_GUARD_CASES sets how many cases (default: a small fixed set, a few seconds),
TRACEJIT_GUARD_SEED the seed.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import sys
import threading

import numpy as np
import pytest

import helpers

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

N_CASES = int(os.environ.get("TRACEJIT_GUARD_CASES", "30"))
SEED = int(os.environ.get("TRACEJIT_GUARD_SEED", "3"))
PER_MODULE = 40   # kernels compiled together in one LLVM module


def test_kernels_never_touch_past_their_buffers(tmp_path):
    summary, _ = helpers.run_case_worker(__file__, SEED, N_CASES, tmp_path, "guard-page")
    assert summary["cases"] == N_CASES
    assert not summary["failures"], "\n".join(summary["failures"][:10])
    # every risky path was drawn at least once (see _cases)
    from tracejit.codegen.target import vector_registers
    # (with 16 registers only unpadded inputs take the lanes plan: not always drawn)
    lanes = {"wgrad_lanes"} if vector_registers() >= 32 else set()
    assert set(summary["paths"]) >= {"outer", "dot", "mv_dot", "mv_axpy", "bt", "fold",
                                     "tgrad", "core_igrad", "conv2d", "wgrad"} | lanes, \
        summary["paths"]


# ------------------------------------------------------------------------------------------------
# the worker
# ------------------------------------------------------------------------------------------------
PROT_NONE = 0


def _mprotect(addr: int, size: int, prot: int):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(addr, size, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


def guarded(shape, dtype, at_end: bool) -> np.ndarray:
    """A C-contiguous array whose last byte is followed (at_end) or whose first byte is preceded
    by a PROT_NONE page. (The mapping lives as long as the array: it is the array's base.)"""
    dtype = np.dtype(dtype)
    nbytes = max(1, math.prod(shape)) * dtype.itemsize
    page = mmap.PAGESIZE
    npages = -(-nbytes // page) + 2
    mm = mmap.mmap(-1, npages * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    _mprotect(addr, page, PROT_NONE)
    _mprotect(addr + (npages - 1) * page, page, PROT_NONE)
    offset = (npages - 1) * page - nbytes if at_end else page
    arr = np.frombuffer(mm, dtype, count=nbytes // dtype.itemsize, offset=offset)
    return arr[:math.prod(shape)].reshape(shape)


SIZES = [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 23, 24, 25, 31, 32, 33, 40, 47,
         48, 49]
BATCHES = [((), ()), ((), ()), ((3,), ()), ((), (3,)), ((4,), (4,)), ((2, 1), (3,)), ((1,), (5,)),
           ((2, 3), ()), ((), (2, 3)), ((2, 1), (1, 2))]


def _matmul_case(rng):
    dt = str(rng.choice(["f32", "f64"]))
    m, n, k = (int(rng.choice(SIZES)) for _ in range(3))
    if rng.random() < 0.3:
        n = 1
    elif rng.random() < 0.3:
        m = 1
    if rng.random() < 0.05:
        k = int(rng.choice([0, 130, 257]))
    ta, tb = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    ba, bb = BATCHES[rng.integers(len(BATCHES))]
    a = ba + ((k, m) if ta else (m, k))
    b = bb + ((n, k) if tb else (k, n))
    return ("matmul", dt, [a, b], dict(trans_a=ta, trans_b=tb), None)


# conv2d.FORCE settings: the transposed input gradient with the core's 4x2 block (conv2d, strided
# input gradients), and the core's flat mode for both
FORCES = [None, (("core", (4, 2, 1)), ("flat", False), ("tgrad", True)),
          (("core", (2, 1, 6)), ("flat", True), ("tgrad", False))]


def _conv_case(rng, prim=None):
    dt = str(rng.choice(["f32", "f64"]))
    prim = prim or str(rng.choice(["conv2d", "conv2d_input_grad", "conv2d_input_grad",
                                   "conv2d_weight_grad"]))
    n, c, o = (int(rng.integers(1, 5)) for _ in range(3))
    kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    s = (1, 1) if rng.random() < 0.7 else (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    p = (int(rng.integers(0, kh)), int(rng.integers(0, kw)))
    h = int(rng.integers(max(1, kh - 2 * p[0]), 20))
    w = int(rng.integers(max(1, kw - 2 * p[1]), 20 if rng.random() < 0.8 else 40))
    oh, ow = (h + 2 * p[0] - kh) // s[0] + 1, (w + 2 * p[1] - kw) // s[1] + 1
    x, wt, ct = (n, c, h, w), (o, c, kh, kw), (n, o, oh, ow)
    # blocking overrides (conv2d.FORCE), from a short list so that cases share modules
    force = FORCES[rng.integers(len(FORCES))] if prim != "conv2d_weight_grad" else None
    if force == FORCES[2] and (s != (1, 1) or min(oh, h) < 2):
        force = None   # the flat mode needs unit strides and several rows
    if prim == "conv2d":
        return (prim, dt, [x, wt], dict(stride=s, padding=p), force)
    if prim == "conv2d_input_grad":
        return (prim, dt, [ct, wt], dict(in_hw=(h, w), stride=s, padding=p), force)
    return (prim, dt, [ct, x], dict(kernel=(kh, kw), stride=s, padding=p), None)


def _cases(seed: int, count: int):
    """`count` cases: matmuls and convolutions; the first ones are fixed so that a small run
    covers every path (partial column tiles, short M, folded batches, matrix-vector tails,
    packed B^T, the transposed input gradient)."""
    fixed = [
        ("matmul", "f32", [(32, 8), (100, 8, 10)], {}, None),   # a shared A, partial tile
        ("matmul", "f64", [(1, 13), (13, 10)], {}, None),                  # mv_axpy partial
        ("matmul", "f32", [(29, 10), (10, 1)], {}, None),      # mv_dot K tail
        ("matmul", "f32", [(32, 1), (10, 1)], dict(trans_b=True), None),   # packed B^T
        ("matmul", "f64", [(32, 10), (7, 10, 1)], {}, None),               # fold of vectors
        ("matmul", "f32", [(7, 1, 10), (9, 10)], dict(trans_b=True), None),   # fold a_t op(B)
        ("matmul", "f32", [(30, 100), (7, 100)], dict(trans_b=True), None),   # dot form
        ("matmul", "f64", [(5, 8, 3), (5, 8, 6)], dict(trans_a=True), None),   # short M
        ("matmul", "f32", [(50, 300), (300, 13)], {}, None),   # K blocks, a partial tile
        ("matmul", "f64", [(3, 1, 5), (3, 5)], dict(trans_b=True), None),   # fold, N < VL
        ("conv2d_input_grad", "f32", [(2, 3, 8, 8), (3, 4, 5, 5)],      # transposed form
         dict(in_hw=(12, 12), stride=(1, 1), padding=(0, 0)), FORCES[1]),
        ("conv2d_input_grad", "f64", [(1, 3, 7, 9), (3, 4, 3, 3)],      # the core (n*c < 8)
         dict(in_hw=(7, 9), stride=(1, 1), padding=(1, 1)), None),
        ("conv2d", "f64", [(1, 5, 6, 13), (7, 5, 3, 3)], dict(stride=(1, 1), padding=(1, 1)),
         FORCES[1]),     # the 4x2 block, a partial last channel block
        ("conv2d", "f32", [(2, 3, 9, 11), (4, 3, 3, 3)], dict(stride=(1, 1), padding=(1, 1)), None),
        ("conv2d_weight_grad", "f32", [(2, 4, 7, 9), (2, 3, 9, 11)],
         dict(kernel=(3, 3), stride=(1, 1), padding=(0, 0)), None),
        # output channels in the lanes (AVX-512): in place with a partial transpose block, and
        # from padded copies with strides
        ("conv2d_weight_grad", "f32", [(2, 32, 4, 5), (2, 4, 6, 7)],
         dict(kernel=(3, 3), stride=(1, 1), padding=(0, 0)), None),
        ("conv2d_weight_grad", "f64", [(1, 16, 4, 4), (1, 4, 7, 8)],
         dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1)), None),
    ]
    rng = np.random.default_rng(seed)
    out = fixed[:count]
    while len(out) < count:
        out.append(_matmul_case(rng) if rng.random() < 0.65 else _conv_case(rng))
    return out


def _paths(case, ins):
    from tracejit.codegen.kernels.matmul import _plan
    prim, _, shapes, params, force = case
    if prim == "matmul":
        p = _plan(ins)
        tags = {p.form}
        if p.pack:
            tags.add(p.pack)
        if len(ins.out.shape) > 2 and p.batch == ():
            tags.add("fold")
        return tags
    if prim == "conv2d_input_grad":
        from tracejit.codegen.kernels.conv2d.transposed import Transposed
        from tracejit.codegen.kernels.conv2d.core import _input_grad_core
        return {"tgrad" if isinstance(_input_grad_core(ins), Transposed) else "core_igrad"}
    if prim == "conv2d_weight_grad":
        from tracejit.codegen.kernels.conv2d.wgrad import _lanes_plan
        return {"wgrad_lanes" if _lanes_plan(ins) is not None else "wgrad"}
    return {prim}


def _run(seed: int, count: int, progress_path: str) -> dict:
    import test_kernels_dense as dense
    from tracejit.codegen.kernels import kernels
    from tracejit.codegen.kernels.conv2d.layout import FORCE as CONV_FORCE
    from tracejit.ir.builder import Builder, building, emit
    from tracejit.ir.core import TensorType
    from tracejit.ir.prims.linalg import matmul_p

    def make(case):
        prim, dt, shapes, params, _ = case
        if prim == "matmul":   # emitted as is (lax.matmul folds some batches itself)
            with building(Builder("t")) as bld:
                pa, pb = (bld.add_param(TensorType(dt, s)) for s in shapes)
                return emit(matmul_p, pa, pb, **params).instr
        return dense.make_instr(prim, shapes, dt, **params)

    def forced(force):
        CONV_FORCE.clear()
        CONV_FORCE.update(force or ())

    cases = _cases(seed, count)
    failures, paths = [], set()
    with open(progress_path, "w") as progress:
        # one module per (conv force) group of up to PER_MODULE cases
        groups = {}
        for i, case in enumerate(cases):
            groups.setdefault(case[4], []).append(i)
        for force, idx in groups.items():
            for start in range(0, len(idx), PER_MODULE):
                chunk = idx[start:start + PER_MODULE]
                forced(force)
                instrs = [make(cases[i]) for i in chunk]
                for i, ins in zip(chunk, instrs):
                    paths |= _paths(cases[i], ins)
                ks = dense.Kernels(instrs)
                rng = np.random.default_rng(seed * 1000 + chunk[0])
                for j, (i, ins) in enumerate(zip(chunk, instrs)):
                    progress.write(f"{i} {cases[i]}\n")
                    progress.flush()
                    np_dt = dense.NP[ins.out.dtype]
                    for at_end in (True, False):
                        arrays = []
                        for v in ins.inputs:
                            g = guarded(v.shape, np_dt, at_end)
                            g[...] = rng.standard_normal(v.shape)
                            arrays.append(g)
                        ref, tol = dense.reference(ins, arrays)
                        for nt, order in [(1, [0]), (2, [1, 0]), (3, [0, 2, 1]), (2, None)]:
                            got = _call(ks, j, ins, arrays, nt, order, at_end, kernels)
                            bad = ~(np.abs(got - ref) <= tol)
                            if bad.any():
                                failures.append(f"case {i} {cases[i]} threads {order} at_end "
                                                f"{at_end}: {bad.sum()} of {bad.size} wrong")
                                break
                forced(None)
    # CI: a few shapes (each costs two compiles); a long run: all of them
    failures += _through_jit(seed, JIT_SHAPES if count > 100 else JIT_SHAPES[:3])
    return dict(cases=len(cases), failures=failures, paths=sorted(paths))


JIT_SHAPES = [  # (A's shape, B's shape): partial column tiles of every form, folds, N = 1, M = 1
    ((32, 8), (5, 8, 10)), ((1, 13), (13, 10)), ((29, 10), (10, 1)), ((7, 1, 10), (10, 9)),
    ((32, 10), (7, 10, 1)), ((5, 3), (3, 17)), ((6, 9), (9, 7)), ((2, 4, 9), (9, 31)),
]


def _through_jit(seed, shapes):
    """The same through the call boundary: contiguous arguments against guard pages are read in
    place (no copy), so the kernels see the user's buffers; values and gradients against the
    interpreter."""
    import helpers
    import tracejit as tj
    from tracejit.signature import c_contiguous
    failures = []
    rng = np.random.default_rng(seed)

    def f(a, b):
        return tj.sum(tj.tanh(a @ b) * 0.5)

    for i, (sa, sb) in enumerate(shapes):
        dt = (np.float32, np.float64)[i % 2]
        for at_end in (True, False):
            args = []
            for shape in (sa, sb):
                g = guarded(shape, dt, at_end)
                g[...] = rng.standard_normal(shape)
                assert c_contiguous(g) is g, "the call boundary would copy it"
                args.append(g)
            with helpers.use_backend("interpreter"):
                want = [tj.jit(f)(*args)] + list(tj.jit_grad(f, argnums=(0, 1))(*args))
            got = [tj.jit(f)(*args)] + list(tj.jit_grad(f, argnums=(0, 1))(*args))
            tol = helpers.FORWARD_TOL["f32" if dt == np.float32 else "f64"]
            for g, w in zip(got, want):
                try:
                    helpers.assert_close(g, w, (tol[0] * 10, tol[1] * 10))
                except AssertionError as e:
                    failures.append(f"jit {sa} @ {sb} {dt.__name__} at_end {at_end}: {e}")
    return failures


def _call(ks, j, ins, arrays, nthreads, order, at_end, kernels):
    out = guarded(ins.out.shape, ins.out.type.np_dtype, at_end)
    out[...] = np.nan
    # the scratch against a guard page too (its end rounded up to 64 bytes: regions start
    # 64-byte aligned), filled with NaN bytes
    raw = guarded((-(-max(1, kernels[ins.prim].scratch_bytes(ins, nthreads)) // 64) * 64,),
                  np.uint8, True)
    raw[...] = 0xFF
    scratch = raw.ctypes.data
    args = [out.ctypes.data] + [a.ctypes.data for a in arrays]
    if order is None:   # each tid on a real thread with its own region, as the pool runs them
        region = kernels[ins.prim].scratch_bytes(ins, 1)
        ths = [threading.Thread(target=ks.fns[j], args=(*args, scratch + t * region, t, nthreads))
               for t in range(nthreads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    for tid in order or ():
        ks.fns[j](*args, scratch, tid, nthreads)
    return np.array(out)


if __name__ == "__main__":
    import faulthandler
    faulthandler.enable()
    summary = _run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    print(json.dumps(summary))

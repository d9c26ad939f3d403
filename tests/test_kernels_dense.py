"""Native kernels of the dense primitives (matmul, conv2d and its two backward passes), each compiled
alone in an LLVM module and called through ctypes exactly as the kernel contract says
(codegen/kernels/__init__.py), against the numpy reference implementations of the IR interpreter.

The output buffer is pre-filled with NaN, so an element no thread writes fails the comparison; with
several threads the tids are called one after the other in both orders, and once on real threads.
"""
from __future__ import annotations

import ctypes
import re
import threading

import llvmlite.ir as llir
import numpy as np
import pytest

from codegen.kernels import _load_all, kernels
from codegen.target import JITModule, cfunc
from ir import lax
from ir.builder import Builder, building
from ir.core import TensorType
from ir.interpreter import impls

_load_all()

NP = {"f32": np.float32, "f64": np.float64}
# error bound relative to the same reduction over |terms| (so cancellation does not matter)
RTOL = {"f32": 3e-5, "f64": 1e-12}


def make_instr(prim: str, in_shapes, dtype: str, **params):
    """The instruction `prim(*params of in_shapes)` of a freshly traced one-instruction function."""
    with building(Builder("t")) as b:
        xs = [b.add_param(TensorType(dtype, s)) for s in in_shapes]
        return getattr(lax, prim)(*xs, **params).instr


class Kernel:
    """One kernel compiled alone; call(...) runs it like the runtime would."""

    def __init__(self, ins, name="kernel"):
        self.ins = ins
        self.spec = kernels[ins.prim]
        mod = llir.Module()
        self.spec.lower(mod, name, ins)
        self.jit = JITModule(str(mod), [name])
        n = len(ins.inputs)
        self.fn = cfunc(self.jit.addresses[name],
                        [ctypes.c_void_p] * (n + 2) + [ctypes.c_int64] * 2)

    def buffers(self, arrays, nthreads):
        out = np.full(self.ins.out.shape, np.nan, dtype=self.ins.out.type.np_dtype)
        nbytes = self.spec.scratch_bytes(self.ins, nthreads)
        raw = np.full(nbytes + 64, 0xFF, dtype=np.uint8)  # garbage (NaN bytes) in scratch
        scratch = raw.ctypes.data + (-raw.ctypes.data) % 64
        args = [out.ctypes.data] + [a.ctypes.data for a in arrays] + [scratch]
        return out, raw, args

    def call(self, arrays, nthreads=1, order=None):
        out, _keep, args = self.buffers(arrays, nthreads)
        for tid in order if order is not None else range(nthreads):
            self.fn(*args, tid, nthreads)
        return out

    def call_threads(self, arrays, nthreads=2):
        out, _keep, args = self.buffers(arrays, nthreads)
        ths = [threading.Thread(target=self.fn, args=(*args, t, nthreads)) for t in range(nthreads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return out


def check(prim, in_shapes, dtype, thread_counts=(1, 2, 3), seed=0, **params):
    ins = make_instr(prim, in_shapes, dtype, **params)
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(NP[dtype]) for s in in_shapes]
    ref = impls[ins.prim](*[a.astype(np.float64) for a in arrays], **ins.params)
    mag = impls[ins.prim](*[np.abs(a).astype(np.float64) for a in arrays], **ins.params)
    tol = RTOL[dtype] * mag + 1e-30
    k = Kernel(ins)
    for nt in thread_counts:
        orders = [range(nt)] if nt == 1 else [range(nt), range(nt - 1, -1, -1)]
        for order in orders:
            got = k.call(arrays, nt, order)
            bad = ~(np.abs(got - ref) <= tol)
            assert not bad.any(), (
                f"{prim} {in_shapes} {dtype} {params} nthreads={nt} order={list(order)}: "
                f"{bad.sum()} of {bad.size} elements wrong, first at {np.argwhere(bad)[0]}: "
                f"got {got[tuple(np.argwhere(bad)[0])]}, want {ref[tuple(np.argwhere(bad)[0])]}")
    return k, arrays, ref, tol


# ------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------
MATMUL_SHAPES = [  # (M, N, K)
    (1, 1, 1), (2, 1, 3), (5, 7, 3), (17, 33, 40), (3, 100, 1), (13, 16, 32), (40, 70, 5),
    (64, 256, 784), (64, 10, 256), (784, 256, 64), (10, 256, 64), (64, 84, 120), (1, 300, 33),
    (33, 1, 65),
]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("trans", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["nn", "tn", "nt", "tt"])
@pytest.mark.parametrize("mnk", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul(mnk, trans, dtype):
    m, n, k = mnk
    ta, tb = trans
    if m * n * k > 10 ** 6 and dtype == "f64" and (ta or tb) != (False, True):
        pytest.skip("large f64 shapes: one transpose combination is enough")
    a_shape = (k, m) if ta else (m, k)
    b_shape = (n, k) if tb else (k, n)
    check("matmul", [a_shape, b_shape], dtype, trans_a=ta, trans_b=tb)


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
]


def _conv_ids(case):
    x, w, s, p = case
    return f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s[0]}{s[1]}-p{p[0]}{p[1]}"


def _out_hw(x, w, s, p):
    return tuple((n + 2 * pp - k) // ss + 1 for n, k, ss, pp in zip(x[2:], w[2:], s, p))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_ids)
def test_conv2d(case, dtype):
    x, w, s, p = case
    check("conv2d", [x, w], dtype, stride=s, padding=p)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_ids)
def test_conv2d_input_grad(case, dtype):
    x, w, s, p = case
    ct = (x[0], w[0]) + _out_hw(x, w, s, p)
    check("conv2d_input_grad", [ct, w], dtype, in_hw=x[2:], stride=s, padding=p)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_ids)
def test_conv2d_weight_grad(case, dtype):
    x, w, s, p = case
    ct = (x[0], w[0]) + _out_hw(x, w, s, p)
    check("conv2d_weight_grad", [ct, x], dtype, kernel=w[2:], stride=s, padding=p)


def test_conv_block_shape_and_real_threads():
    """The benchmark's conv block (smaller batch), each pass run on two real threads."""
    x, w, s, p = (2, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1)
    ct = (2, 64, 32, 32)
    for prim, shapes, params in [
            ("conv2d", [x, w], dict(stride=s, padding=p)),
            ("conv2d_input_grad", [ct, w], dict(in_hw=x[2:], stride=s, padding=p)),
            ("conv2d_weight_grad", [ct, x], dict(kernel=w[2:], stride=s, padding=p))]:
        k, arrays, ref, tol = check(prim, shapes, "f32", thread_counts=(2,), **params)
        got = k.call_threads(arrays, 2)
        assert (np.abs(got - ref) <= tol).all(), prim


def test_matmul_real_threads():
    k, arrays, ref, tol = check("matmul", [(64, 784), (256, 784)], "f32", thread_counts=(2,),
                                trans_b=True)
    assert (np.abs(k.call_threads(arrays, 2) - ref) <= tol).all()


def test_more_threads_than_work():
    check("matmul", [(2, 3), (3, 1)], "f32", thread_counts=(5,))
    check("conv2d", [(1, 1, 3, 3), (1, 1, 2, 2)], "f64", thread_counts=(4,), stride=(1, 1),
          padding=(0, 0))


# ------------------------------------------------------------------------------------------------
# the assembly has vector FMAs
# ------------------------------------------------------------------------------------------------
_VFMA = re.compile(r"vfmadd\w*\s+[^\n]*%[yz]mm")


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
    asm = Kernel(make_instr(prim, shapes, "f32", **params)).jit.asm
    assert len(_VFMA.findall(asm)) >= 16, f"{prim}: no vector FMAs in\n{asm[:3000]}"

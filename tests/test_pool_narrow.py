"""The narrow tails of the pooling kernels (codegen/kernels/pool.py): a row's last few outputs (at
most half a vector) as a half-width vector instead of a full one shifted back, in max_pool2d, its
argmax, avg_pool2d, max_pool2d_grad and avg_pool2d_grad, against the reference interpreter.

Inputs are small integers (ties in every window: the argmax and the gradient go to the first
maximum), with NaNs and infinities; the shapes put the narrow vector at the row's end exactly and
shifted back over outputs of the previous vector, with padding, overlapping windows, stride 1 and
stride > kernel.
"""
from __future__ import annotations

import zlib

import llvmlite.ir as llir
import numpy as np
import pytest

from tracejit.codegen.kernels import _load_all, kernels
from tracejit.codegen.target import vector_width
from tracejit.ir.interpreter import impls

from test_kernels_pool import _check, _compile, _empty, _inputs, _trace

pytestmark = pytest.mark.needs_llvm

_load_all()

PRIMS = ("max_pool2d", "max_pool2d_argmax", "avg_pool2d", "max_pool2d_grad", "avg_pool2d_grad")

# (x shape, kernel, stride, padding); which of them take a narrow tail depends on the vector width
CONFIGS = [
    ((2, 3, 6, 24), 2, 2, 0),        # LeNet's rows: 12 = 8 + 4 outputs (f32, AVX2)
    ((1, 2, 6, 22), 2, 2, 0),        # 11 = 8 + 4 shifted back by one
    ((2, 1, 4, 10), 2, 2, 0),        # 5 = 4 + 2 shifted back by one (f64)
    ((1, 2, 5, 25), 2, 2, 1),        # padding: the narrow tail ends inside the row (f64)
    ((2, 3, 6, 23), 2, 2, (0, 1)),   # padded columns only: rows in pairs whose first chunk reads
    #                                  the padding, an odd last row (f32)
    ((1, 2, 7, 28), 3, 2, 0),        # overlapping windows (f64)
    ((1, 2, 4, 36), 2, 3, 0),        # stride > kernel: 12 outputs, blocks of 4x3 in the gradient
    ((1, 1, 3, 13), 2, 1, 0),        # stride 1: a load per tap (f32)
    ((1, 1, 3, 14), 2, 1, 0),        # stride 1, 13 = 12 + 1 (f64)
]


@pytest.mark.filterwarnings("ignore:invalid value")   # inf - inf in the reference's sums
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_narrow_tails_match_interpreter(dtype):
    instrs = {(prim, k): _trace(prim, shape, dtype, kernel, stride, padding)
              for k, (shape, kernel, stride, padding) in enumerate(CONFIGS) for prim in PRIMS}
    ks = _compile({f"{prim}_{k}": ins for (prim, k), ins in instrs.items()})
    npdt = np.dtype("float32" if dtype == "f32" else "float64")
    for k, config in enumerate(CONFIGS):
        shape = config[0]
        rng = np.random.default_rng(zlib.crc32(repr(config + (dtype,)).encode()))
        for specials in (None, "nan", "inf"):
            x = _inputs(rng, shape, npdt, specials)
            for prim in ("max_pool2d", "max_pool2d_argmax", "avg_pool2d"):
                ins = instrs[prim, k]
                with np.errstate(invalid="ignore"):
                    ref = impls[ins.prim](x, **ins.params)
                _check(ks.call(f"{prim}_{k}", _empty(ins), x), ref, dtype)
            argmax = instrs["max_pool2d_argmax", k]
            idx = impls[argmax.prim](x, **argmax.params)
            ct = rng.standard_normal(idx.shape).astype(npdt)
            grad = instrs["max_pool2d_grad", k]
            _check(ks.call(f"max_pool2d_grad_{k}", _empty(grad), ct, idx),
                   impls[grad.prim](ct, idx, **grad.params), dtype)
            avg = instrs["avg_pool2d_grad", k]
            _check(ks.call(f"avg_pool2d_grad_{k}", _empty(avg), ct),
                   impls[avg.prim](ct, **avg.params), dtype)


def test_lenet_rows_take_a_half_vector_tail():
    """Rows of 1.5 vectors of outputs (LeNet's 12 on AVX2) run a full vector and a half one,
    not two full ones: pairs of rows run their two half tails as one full vector of two pieces
    (the `.oh2` loop), an odd last row a vector of half the host's width."""
    V = vector_width(32)
    for rows, odd in ((2, False), (3, True)):
        shape = (1, 2, 2 * rows, 3 * V)
        for prim in ("max_pool2d", "max_pool2d_argmax", "max_pool2d_grad", "avg_pool2d_grad"):
            mod = llir.Module()
            ins = _trace(prim, shape, "f32", 2, 2, 0)
            kernels[ins.prim].lower(mod, "k", ins)
            text = str(mod)
            assert f"{prim}.oh2" in text, prim
            # an instruction on a half-width vector of outputs: only in a row of its own
            op = {"max_pool2d_grad": "in.block", "avg_pool2d_grad": "fdiv"}.get(prim, "fcmp")
            half = [line for line in text.splitlines() if f"<{V // 2} x" in line and op in line]
            assert bool(half) == odd, (prim, rows)


@pytest.mark.parametrize("bits,V", [(32, 8), (32, 16), (64, 4), (64, 8)])
def test_stride_2_taps_are_in_lane_shuffles(bits, V):
    """The forward kernels' output order for 2x2 stride-2 windows (pool._in_lane_order): every
    tap of a vector takes each 128-bit lane of it from the same 128-bit lane of one of the wide
    access's two registers (what AVX's vshufps / vunpcklpd do without a lane-crossing permute);
    the order is a permutation of the outputs."""
    from tracejit.codegen.kernels import pool
    g = pool._Geom(1, 4, 4 * V, 2, 2 * V, 2, 2, 2, 2, 0, 0)
    plain = pool._layout(g, V)
    assert (plain.R, plain.L) == (1, 2 * V)
    order = pool._in_lane_order(g, plain, bits)
    assert sorted(order) == list(range(V))
    lay = pool._Layout(plain.V, plain.L, plain.R, plain.pieces, order)
    e = 128 // bits
    for j in range(2):
        for k, q in enumerate(lay.lanes(g, 0, j)):
            assert q % V // e == k // e, (j, k, q)

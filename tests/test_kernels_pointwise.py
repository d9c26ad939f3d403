"""Native 1x1 convolutions without padding (codegen/kernels/conv2d/pointwise.py: matrix products
over the channels of the subsampled image), compiled alone and called through ctypes, against the
IR interpreter's numpy references: unit and mixed strides, odd image sizes (a partial last output
row and column, a row of the input with no output), channel counts off the register blocks, one
and three threads (partial row tiles per chunk), both dtypes; and a jitted gradient through the
kernels with their epilogues (bias, ReLU, residual sum) against the interpreter. Also the strided
input gradient's column-phase pairs (codegen/kernels/conv2d/phased.py, column stride 2: two
phases interleaved by shuffles) at odd widths, where the second phase is one column shorter."""
from __future__ import annotations

import numpy as np
import pytest

import tracejit as tj
from tracejit import nn
from tracejit.ir import lax
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType
from tracejit.ir.interpreter import impls

from helpers import use_backend
from test_kernels_pool import _check, _compile, _empty


def _call(ks, name, ins, args, nthreads):
    """The kernel's chunks one after the other, each with a fresh region of NaN scratch."""
    import ctypes
    from tracejit.codegen.kernels import kernels
    out = _empty(ins)
    size = kernels[ins.prim].scratch_bytes(ins, 1)
    fn = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * (len(args) + 2), ctypes.c_int64,
                          ctypes.c_int64)(ks.jit.addresses[name])
    for tid in range(nthreads):
        scratch = np.full(size // 4 + 16, np.nan, np.float32)
        at = scratch.ctypes.data + (-scratch.ctypes.data) % 64
        fn(out.ctypes.data, *[a.ctypes.data for a in args], at, tid, nthreads)
    return out

pytestmark = pytest.mark.needs_llvm

# (x shape, output channels, stride)
CASES = [
    ((2, 5, 9, 11), 7, (2, 2)),     # odd sizes: the last input row and column are not read
    ((3, 3, 7, 20), 13, (1, 1)),    # unit strides: no gather, dx written in place
    ((1, 17, 10, 23), 4, (3, 2)),   # mixed strides (scalar gather on rows, shuffles on columns)
    ((2, 4, 5, 7), 9, (1, 3)),      # column stride 3: scalar gather and spread
    ((2, 16, 6, 19), 6, (1, 1)),    # whole vl x vl blocks of the transposed copy, a partial one
]


def _instrs(dtype):
    out = {}
    with building(Builder("t")) as b:
        for k, (xs, o, s) in enumerate(CASES):
            x = b.add_param(TensorType(dtype, xs))
            w = b.add_param(TensorType(dtype, (o, xs[1], 1, 1)))
            y = lax.conv2d(x, w, stride=s, padding=(0, 0))
            ct = b.add_param(TensorType(dtype, y.type.shape))
            out[f"fwd{k}"] = y.instr
            out[f"igrad{k}"] = lax.conv2d_input_grad(ct, w, xs[2:], stride=s, padding=(0, 0)).instr
            out[f"wgrad{k}"] = lax.conv2d_weight_grad(ct, x, (1, 1), stride=s, padding=(0, 0)).instr
    return out


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_pointwise_convolutions_match_interpreter(dtype):
    from tracejit.codegen.kernels.conv2d.pointwise import is_pointwise
    instrs = _instrs(dtype)
    assert all(is_pointwise(ins) for ins in instrs.values())
    ks = _compile(instrs)
    rng = np.random.default_rng(0)
    for name, ins in instrs.items():
        args = [rng.standard_normal(v.type.shape).astype(v.type.np_dtype) for v in ins.inputs]
        for nthreads in (1, 3):
            _check(_call(ks, name, ins, args, nthreads),
                   impls[ins.prim](*args, **ins.params), dtype)


def test_strided_shortcut_gradient_matches_interpreter():
    """A ResNet shortcut (1x1, stride 2, bias) summed with a 3x3 branch and a ReLU: the 1x1
    kernels run with epilogues in the compiled gradient."""
    def loss(x, w1, b1, w3):
        short = nn.conv2d(x, w1, b1, stride=2)
        y = nn.conv2d(x, w3, stride=2, padding=1)
        return (nn.relu(y + short) ** 2).sum()

    rng = np.random.default_rng(1)
    args = (rng.standard_normal((3, 6, 9, 11)).astype(np.float32),
            rng.standard_normal((10, 6, 1, 1)).astype(np.float32),
            rng.standard_normal(10).astype(np.float32),
            rng.standard_normal((10, 6, 3, 3)).astype(np.float32))
    native = tj.jit_grad(loss, argnums=(0, 1, 2))(*args)
    with use_backend("interpreter"):
        ref = tj.jit_grad(loss, argnums=(0, 1, 2))(*args)
    for a, r in zip(native, ref):
        np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-4)


# (x shape, weight shape, stride, padding) of strided input gradients with column stride 2
PAIRED = [
    ((2, 5, 9, 11), (6, 5, 3, 3), (2, 2), (1, 1)),     # ResNet's downsampling conv, odd sizes
    ((1, 3, 8, 13), (4, 3, 5, 5), (2, 2), (2, 2)),     # 5x5: sub-kernels of 9, 6, 6, 4 taps
    ((1, 2, 7, 19), (3, 2, 3, 2), (3, 2), (0, 1)),     # row stride 3: three row phases
]


def test_paired_strided_input_gradients_match_interpreter():
    instrs = {}
    with building(Builder("t")) as b:
        for k, (xs, ws, s, p) in enumerate(PAIRED):
            w = b.add_param(TensorType("f32", ws))
            oh, ow = ((xs[2] + 2 * p[0] - ws[2]) // s[0] + 1, (xs[3] + 2 * p[1] - ws[3]) // s[1] + 1)
            ct = b.add_param(TensorType("f32", (xs[0], ws[0], oh, ow)))
            instrs[f"igrad{k}"] = lax.conv2d_input_grad(ct, w, xs[2:], stride=s, padding=p).instr
    from tracejit.codegen.kernels.conv2d.core import _input_grad_core
    assert all(_input_grad_core(ins).paired for ins in instrs.values())
    ks = _compile(instrs)
    rng = np.random.default_rng(2)
    for name, ins in instrs.items():
        args = [rng.standard_normal(v.type.shape).astype(np.float32) for v in ins.inputs]
        for nthreads in (1, 2):
            _check(_call(ks, name, ins, args, nthreads), impls[ins.prim](*args, **ins.params),
                   "f32")


def test_strided_input_gradient_phases_share_their_padded_copy():
    """The four phases of a 3x3 stride-2 convolution with padding 1 read the cotangent at the same
    offset: one padded copy per thread, made once per image (not four), as large as the largest
    phase needs."""
    from tracejit.codegen.kernels.conv2d.core import _input_grad_core
    with building(Builder("t")) as b:
        ct = b.add_param(TensorType("f32", (2, 8, 5, 6)))
        w = b.add_param(TensorType("f32", (8, 4, 3, 3)))
        plan = _input_grad_core(lax.conv2d_input_grad(ct, w, (9, 11), (2, 2), (1, 1)).instr)
    assert len(plan.phases) == 4
    (prep,) = plan._regions()
    assert (prep.rows, prep.q) == (max(p.core.oy + p.core.kh - 1 for p in plan.phases),
                                   max(p.core.ox + p.core.kw - 1 for p in plan.phases))

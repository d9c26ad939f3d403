"""Native kernels of grouped, dilated and depthwise convolutions (codegen/kernels/conv2d/window.py)
compiled alone and called through ctypes, against the IR interpreter's numpy references, at row
widths where a row has interior vectors (plain loads), border vectors (masked loads: padding) and
a partial last chunk, in both dtypes."""
from __future__ import annotations

import numpy as np
import pytest

from tracejit.ir import lax
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType
from tracejit.ir.interpreter import impls

from test_kernels_pool import _check, _compile, _empty

pytestmark = pytest.mark.needs_llvm

# (x shape, weight shape, stride, padding, dilation, groups)
CASES = [
    ((2, 3, 5, 29), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3),      # depthwise 3x3, MobileNet's
    ((1, 4, 7, 37), (4, 2, 3, 3), (1, 1), (2, 2), (2, 2), 2),      # grouped, dilated
    ((1, 2, 6, 41), (4, 1, 3, 3), (2, 2), (1, 1), (1, 1), 2),      # depthwise x2, strided
    ((2, 2, 9, 21), (2, 1, 5, 5), (1, 1), (2, 2), (1, 1), 2),      # 5x5: weight gradient in passes
]


def _instrs(dtype):
    out = {}
    with building(Builder("t")) as b:
        for k, (xs, ws, s, p, d, g) in enumerate(CASES):
            x, w = b.add_param(TensorType(dtype, xs)), b.add_param(TensorType(dtype, ws))
            params = dict(stride=s, padding=p, dilation=d, groups=g)
            y = lax.conv2d(x, w, **params)
            ct = b.add_param(TensorType(dtype, y.type.shape))
            out[f"fwd{k}"] = y.instr
            out[f"igrad{k}"] = lax.conv2d_input_grad(ct, w, xs[2:], **params).instr
            out[f"wgrad{k}"] = lax.conv2d_weight_grad(ct, x, ws[2:], **params).instr
    return out


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_window_convolutions_match_interpreter(dtype):
    instrs = _instrs(dtype)
    ks = _compile(instrs)
    rng = np.random.default_rng(0)
    for name, ins in instrs.items():
        args = [rng.standard_normal(v.type.shape).astype(v.type.np_dtype) for v in ins.inputs]
        for nthreads in (1, 3):
            _check(ks.call(name, _empty(ins), *args, nthreads=nthreads),
                   impls[ins.prim](*args, **ins.params), dtype)

"""The convolution core's prefetch of the next input channel's rows (codegen/kernels/conv2d/
direct.py, `_PREFETCH_BYTES`): taken on every target (AVX-512 and AVX2) when the padded image copy
does not fit L1. Checked against numpy on the border cases of the register blocks (channel counts
that the block's R does not divide, row counts that its PR does not divide, widths that end in a
partial vector, row chunks of a small batch, strides), on the host's target and pinned to AVX2
(16 registers, `avx2_target`), on several threads; and that copies which fit L1 keep the plain
loop."""
from __future__ import annotations

import numpy as np
import pytest

import tracejit
from tracejit import nn
from tracejit.codegen.kernels.conv2d import FORCE, core, direct
from tracejit.codegen.kernels.conv2d.layout import Prep

from helpers import check_native_matches_interpreter
from test_kernels_dense import _conv_specs, check_all, make_instr, Kernels

pytestmark = pytest.mark.needs_llvm

# x [N,C,H,W], w [O,C,KH,KW], stride, padding: padded copies larger than _PREFETCH_BYTES (f32)
LARGE = [
    ((2, 13, 31, 29), (11, 13, 3, 3), (1, 1), (1, 1)),   # O = 11: partial channel blocks
    ((1, 20, 27, 30), (7, 20, 3, 3), (2, 2), (1, 1)),     # strided: phase rows; one image (chunks)
    ((1, 9, 40, 37), (10, 9, 5, 5), (1, 1), (2, 2)),      # 5 x 5, odd rows, 37 = 4 vectors + 5
    ((3, 17, 33, 25), (5, 17, 3, 2), (1, 1), (0, 1)),     # KW = 2, O smaller than a block
]


def _copy_bytes(x, w, stride, padding, dtype="f32"):
    (n, c, h, wd), (o, _, kh, kw) = x, w
    (sh, sw), (ph, pw) = stride, padding
    oy, ox = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    rows, q = (oy - 1) * sh + kh, -(-((ox - 1) * sw + kw) // sw)
    prep = Prep(h, wd, rows, q, sw, 1, 1, ph, pw)
    return c * prep.chan_pitch * (4 if dtype == "f32" else 8)


def test_cases_have_large_copies():
    """Every case's padded copy exceeds the threshold (else the tests below test nothing)."""
    for case in LARGE:
        assert _copy_bytes(*case) > direct._PREFETCH_BYTES, case


def _forward_specs():
    return [_conv_specs("conv2d", case) for case in LARGE]


def _prefetches(ins) -> bool:
    asm = Kernels([ins]).jit.asm
    return "prefetcht0" in asm


@pytest.mark.parametrize("pin", [False, True], ids=["host", "avx2"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_large_copies_prefetch_and_match_numpy(pin, dtype, request):
    """The forward core with the prefetch, on the host's blocks and on AVX2's, 1-3 threads
    (KW = 2 takes the flat mode)."""
    if pin:
        request.getfixturevalue("avx2_target")
    specs = _forward_specs()
    ks = check_all(specs, dtype, thread_counts=(1, 2, 3))
    for ins in ks.instrs:   # the direct core (row tiles or the flat mode), which prefetches
        assert not core._conv_core(ins).chan
    assert "prefetcht0" in ks.jit.asm


def test_each_large_forward_kernel_prefetches(avx2_target):
    """Each case's kernel alone (AVX2 blocks): the prefetch is in its code."""
    for prim, shapes, params in _forward_specs():
        ins = make_instr(prim, shapes, "f32", **params)
        assert _prefetches(ins), shapes


@pytest.mark.parametrize("block", [(6, 2, 1), (4, 2, 1), (4, 3, 1), (6, 1, 2)])
def test_avx2_blocks_with_prefetch(avx2_target, block):
    """The AVX2 register blocks forced on the large cases: every block's border tiles (clamped
    channels and rows, masked columns) with the prefetch."""
    specs = [s for s in _forward_specs() if s[2]["stride"] == (1, 1)]
    try:
        FORCE.update(core=block, flat=False, chan=False)
        ks = check_all(specs, "f32", thread_counts=(1, 2))
    finally:
        FORCE.clear()
    assert "prefetcht0" in ks.jit.asm


def test_input_gradient_core_with_prefetch(avx2_target):
    """The input gradient on the core (not the transposed form) over a large cotangent copy."""
    case = ((2, 11, 30, 27), (14, 11, 3, 3), (1, 1), (1, 1))
    spec = _conv_specs("conv2d_input_grad", case)
    try:
        FORCE.update(tgrad=False)
        ins = make_instr(spec[0], spec[1], "f32", **spec[2])
        c = core._input_grad_core(ins)
        assert isinstance(c, core.Core) and not c.chan
        assert c.ci * c.prep.chan_pitch * 4 > direct._PREFETCH_BYTES
        ks = check_all([spec], "f32", thread_counts=(1, 2))
    finally:
        FORCE.clear()
    assert "prefetcht0" in ks.jit.asm


def test_small_copies_keep_the_plain_loop(avx2_target):
    """Copies that fit L1 (ResNet-8's 32 channels of 16 x 16: 41 KB) do not prefetch."""
    case = ((2, 32, 16, 16), (32, 32, 3, 3), (1, 1), (1, 1))
    assert _copy_bytes(*case) <= direct._PREFETCH_BYTES
    ins = make_instr(*_conv_specs("conv2d", case)[:2], "f32", **_conv_specs("conv2d", case)[2])
    assert not _prefetches(ins)


def test_prefetch_forced_on_small_copy_is_correct(avx2_target):
    """The prefetch forced on a copy of a few channels: it reads past the last channel's rows
    (a prefetch never faults) and changes no result."""
    specs = [_conv_specs("conv2d", ((2, 3, 9, 11), (5, 3, 3, 3), (1, 1), (1, 1)))]
    try:
        FORCE.update(prefetch=True)
        ks = check_all(specs, "f32", thread_counts=(1, 2))
    finally:
        FORCE.clear()
    assert "prefetcht0" in ks.jit.asm


def test_conv_relu_pool_gradient_matches_interpreter(avx2_target):
    """The conv block's shape of program (conv with its relu epilogue, pool, sum of squares) on a
    large copy, compiled end to end for AVX2, 1 and 2 threads, against the interpreter."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 21, 30, 27)).astype(np.float32)
    w = (0.2 * rng.standard_normal((10, 21, 3, 3))).astype(np.float32)
    assert _copy_bytes(x.shape, w.shape, (1, 1), (1, 1)) > direct._PREFETCH_BYTES

    def loss(w, x):
        h = nn.relu(nn.conv2d(x, w, padding=1))
        h = nn.avg_pool2d(h, 2)
        return (h * h).sum()

    check_native_matches_interpreter(loss, (w, x), "conv block", argnums=0, threads=(1, 2))

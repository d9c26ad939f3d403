"""The stride-1 input gradient as a transposed convolution (codegen/kernels/conv2d/transposed.py):
cotangent rows times weight taps, shifted into place after the sums, so that no multiply-add sees
the padding of the core's full convolution. Checked against numpy on every border case (odd widths,
remainders of the row tiles and of the vectors, padding up to KH-1 / KW-1, one-row and one-column
images), with epilogues and on several threads; and chosen for LeNet-5's second convolution."""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from tracejit.codegen.kernels import conv2d, kernels
from tracejit.codegen.kernels.conv2d import core, transposed, wgrad
from tracejit.codegen.target import cfunc, vector_width
from tracejit.ir.interpreter import impls

from test_kernels_dense import (NP, AffineEpilogue, Kernels, _conv_specs, _lower_with_epilogue,
                                check_all, make_instr, reference)

pytestmark = pytest.mark.needs_llvm

CASES = [  # x [N,C,H,W], w [O,C,KH,KW], padding (stride 1)
    ((2, 6, 12, 12), (16, 6, 5, 5), (0, 0)),      # LeNet-5 conv2
    ((2, 3, 7, 9), (4, 3, 3, 3), (1, 1)),
    ((3, 2, 9, 7), (5, 2, 3, 4), (0, 0)),         # KH != KW
    ((2, 3, 6, 20), (2, 3, 5, 5), (2, 2)),        # cotangent rows of 2.5 vectors (f32)
    ((1, 2, 35, 11), (3, 2, 2, 2), (0, 0)),       # a last row tile of one row
    ((1, 3, 10, 1), (2, 3, 3, 1), (1, 0)),        # one column, KW = 1
    ((1, 2, 1, 50), (3, 2, 1, 5), (0, 2)),        # one row, KH = 1
    ((2, 1, 5, 13), (3, 1, 4, 5), (3, 1)),        # padding KH - 1
]


def _forced_specs(dtype):
    """The input gradients of CASES that the transposed form takes (KW - 1 <= vector length)."""
    vl = 8 if dtype == "f32" else 4
    out = []
    for x, w, p in CASES:
        if transposed.applies(1, 1, w[2], w[3], p[0], p[1], vl):
            out.append(_conv_specs("conv2d_input_grad", (x, w, (1, 1), p)))
    return out


@pytest.fixture
def forced():
    conv2d.FORCE["tgrad"] = True
    yield
    conv2d.FORCE.clear()


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_transposed_input_grad_matches_numpy(dtype, forced):
    specs = _forced_specs(dtype)
    assert len(specs) >= 7
    ks = check_all(specs, dtype, thread_counts=(1, 3))
    assert "tracejit.conv_tgrad" in ks.jit.asm


# x [N,C,H,W], w [O,C,KH,KW], padding (stride 1): cotangent rows of at most one vector (4, 8 or
# 16 lanes), gradient rows longer than a vector, shorter, of one column; at least _MIN_ITEMS
# planes (fewer take the core whatever FORCE says)
IN_PLACE = [((2, 6, 12, 12), (16, 6, 5, 5), (0, 0)),    # LeNet-5 conv2 (f32: 8 -> 12 columns)
            ((2, 6, 8, 7), (5, 6, 3, 4), (1, 0)),       # 4 -> 7 columns
            ((4, 2, 6, 3), (3, 2, 3, 2), (0, 0)),       # 2 -> 3 columns
            ((3, 3, 10, 1), (2, 3, 3, 1), (1, 0)),      # one column
            ((2, 4, 6, 20), (3, 4, 3, 5), (0, 0))]      # 16 -> 20 columns (AVX-512 f32)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_one_vector_rows_store_in_place(dtype, forced):
    """Cotangent rows of one vector without column padding store each gradient row from the
    registers (its summed vector, then the carry where the row is longer than a vector): no row
    buffer. Checked against numpy on 1 and 3 threads, with an epilogue too."""
    vl = vector_width(64 if dtype == "f64" else 32)
    direct = []
    for x, w, p in IN_PLACE:
        oh, ow = x[2] - w[2] + 1 + 2 * p[0], x[3] - w[3] + 1 + 2 * p[1]
        t = transposed.transposed_input_grad(dtype, x[0], w[0], x[1], x[2], x[3], oh, ow,
                                             w[2], w[3], p[0], p[1])
        assert t.direct == (ow <= vl)
        if t.direct:
            direct.append((x, w, p))
    widths = {x[3] for x, _, _ in direct}
    assert min(widths) == 1 and max(widths) > vl, direct
    specs = [_conv_specs("conv2d_input_grad", (x, w, (1, 1), p)) for x, w, p in direct]
    ks = check_all(specs, dtype, thread_counts=(1, 3))
    assert "tracejit.conv_tgrad" in ks.jit.asm and "direct1" in ks.jit.asm
    instrs, names, jit = _lower_with_epilogue(specs, dtype, AffineEpilogue())
    _check_affine_epilogue(instrs, names, jit, dtype)


@pytest.mark.parametrize("group", [None, 2])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_transposed_input_grad_with_an_epilogue(dtype, group, forced):
    """Each plane is final when the epilogue runs on it (an affine map that shows a plane done
    twice or not at all): the planes of a thread in one group (transposed.EPILOGUE_BYTES holds
    them all here), or in groups of 2 and a last partial one."""
    if group is not None:
        conv2d.FORCE["tgrad_epi"] = group
    instrs, names, jit = _lower_with_epilogue(_forced_specs(dtype)[:5], dtype, AffineEpilogue())
    _check_affine_epilogue(instrs, names, jit, dtype)


def _check_affine_epilogue(instrs, names, jit, dtype):
    """Each kernel's result on 1 and 3 threads is 3 * (the input gradient) + 0.5."""
    rng = np.random.default_rng(2)
    shift = np.array([0.5], dtype=NP[dtype])
    for name, ins in zip(names, instrs):
        fn = cfunc(jit.addresses[name], [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2)
        arrays = [rng.standard_normal(v.shape).astype(NP[dtype]) for v in ins.inputs]
        ref, tol = reference(ins, arrays)
        for nt in (1, 3):
            out = np.full(ins.out.shape, np.nan, dtype=NP[dtype])
            raw = np.full(kernels[ins.prim].scratch_bytes(ins, nt) + 64, 0xFF, dtype=np.uint8)
            args = [out.ctypes.data] + [a.ctypes.data for a in arrays] + [
                shift.ctypes.data, raw.ctypes.data + (-raw.ctypes.data) % 64]
            for tid in range(nt):
                fn(*args, tid, nt)
            assert (np.abs(out - (3 * ref + 0.5)) <= 3 * tol + 1e-6).all(), (ins.params, nt)


def test_lenet_second_convolution_takes_the_transposed_form(monkeypatch):
    """Its 8 x 8 cotangents padded to 16 x 16 would waste 5/9 of the core's multiply-adds; with
    16 vector registers the cost model picks the transposed form there (with 32, the core's flat
    mode of 6 channels x 3 vectors is faster: 80-83 GF/s on one thread against 56 on a Xeon),
    and keeps the core for 3 x 3 kernels with padding 1 on larger images (little padding to
    save). The transposed kernel is checked against numpy either way."""
    lenet = make_instr("conv2d_input_grad", [(64, 16, 8, 8), (16, 6, 5, 5)], "f32",
                       in_hw=(12, 12), stride=(1, 1), padding=(0, 0))
    block = make_instr("conv2d_input_grad", [(16, 64, 32, 32), (64, 64, 3, 3)], "f32",
                       in_hw=(32, 32), stride=(1, 1), padding=(1, 1))
    form = core.Core if core.vector_registers() >= 32 else transposed.Transposed
    assert isinstance(core._input_grad_core(lenet), form)
    assert isinstance(core._input_grad_core(block), core.Core)
    monkeypatch.setitem(conv2d.FORCE, "tgrad", True)
    ks = Kernels([lenet])
    assert "tracejit.conv_tgrad" in ks.jit.asm
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(v.shape).astype(np.float32) for v in lenet.inputs]
    ref, tol = reference(lenet, arrays)
    assert (np.abs(ks.call_threads(0, arrays, 2) - ref) <= tol).all()


def test_core_takes_four_by_two_blocks_where_six_channels_do_not_divide(avx2_target):
    """With 16 vector registers, 16 or 32 output channels take 4 channels x 2 rows of
    accumulators (6 x 2 would compute 18 of 16 channels), 64 channels on large images keep 6 x 2;
    the 4 x 2 block is checked against numpy on channel and row remainders, both dtypes."""

    def block(x, w, p):
        c = core._conv_core(make_instr("conv2d", [x, w], "f32", stride=(1, 1), padding=p))
        return c.r, c.pr, c.pv

    assert block((64, 6, 12, 12), (16, 6, 5, 5), (0, 0)) == (4, 2, 1)      # LeNet-5 conv2
    assert block((32, 32, 16, 16), (32, 32, 3, 3), (1, 1)) == (4, 2, 1)    # ResNet-8
    assert block((16, 64, 32, 32), (64, 64, 3, 3), (1, 1)) == (6, 2, 1)    # the conv block
    cases = [((2, 3, 7, 9), (6, 3, 3, 3), (1, 1), (1, 1)), ((1, 2, 9, 5), (7, 2, 2, 3), (1, 1),
                                                            (0, 1)),
             ((2, 3, 11, 13), (5, 3, 3, 3), (2, 2), (1, 1))]
    try:
        conv2d.FORCE["core"] = (4, 2, 1)
        for dtype in ("f32", "f64"):
            check_all([_conv_specs(prim, case) for case in cases
                       for prim in ("conv2d", "conv2d_input_grad")], dtype, thread_counts=(2,))
    finally:
        conv2d.FORCE.clear()


def test_core_takes_three_by_three_vectors_for_rows_of_three_vectors(avx2_target):
    """With 16 vector registers, 6 channels on rows of three vectors (LeNet-5's first conv, 24
    columns) take 3 channels x 1 row x 3 vectors: the cost model ties it with 6 x 2 x 1, and
    Zen 3 ran it 10% faster (one thread, 145.9 -> 129.7 us, 85 GF/s of 102.6); other shapes keep
    their blocks. The block is checked against numpy on channel, row and column remainders."""

    def block(x, w, p):
        c = core._conv_core(make_instr("conv2d", [x, w], "f32", stride=(1, 1), padding=p))
        return c.r, c.pr, c.pv

    assert block((64, 1, 28, 28), (6, 1, 5, 5), (0, 0)) == (3, 1, 3)      # LeNet-5 conv1
    assert block((512, 1, 28, 28), (6, 1, 5, 5), (0, 0)) == (3, 1, 3)
    assert block((64, 6, 12, 12), (16, 6, 5, 5), (0, 0)) == (4, 2, 1)      # LeNet-5 conv2
    cases = [((2, 1, 9, 30), (7, 1, 5, 5), (1, 1), (0, 0)),
             ((1, 2, 6, 19), (4, 2, 3, 3), (1, 1), (1, 1))]
    try:
        conv2d.FORCE["core"] = (3, 1, 3)
        conv2d.FORCE["flat"] = False
        for dtype in ("f32", "f64"):
            check_all([_conv_specs(prim, case) for case in cases
                       for prim in ("conv2d", "conv2d_input_grad")], dtype, thread_counts=(2,))
    finally:
        conv2d.FORCE.clear()


def test_core_blocks_of_the_32_register_list(monkeypatch):
    """With 32 vector registers: 8 channels x 2 rows for 64 channels (4 x 4 loads each input row
    for 4 channels only), 6 x 2 rows x 2 vectors for 6 channels on rows of 17-32 columns (LeNet-5's
    first conv, not in the flat mode: its copy costs more than the 12% of vectors it saves with 25
    taps per output); with 16 (AVX2) blocks of its own list. Both blocks are checked against
    numpy on channel and row remainders, both dtypes, wherever they run."""
    def block(x, w, p):
        c = core._conv_core(make_instr("conv2d", [x, w], "f32", stride=(1, 1), padding=p))
        return c.r, c.pr, c.pv, c.flat

    got = [block((16, 64, 32, 32), (64, 64, 3, 3), (1, 1)),
           block((64, 1, 28, 28), (6, 1, 5, 5), (0, 0))]
    if core.vector_registers() >= 32:
        assert got == [(8, 2, 1, False), (6, 2, 2, False)]
    else:
        assert all(g[:3] in core._BLOCKS[16] + core._FLAT_BLOCKS[16] for g in got), got
    shapes = [((2, 3, 7, 21), (13, 3, 3, 3), (1, 1), (1, 1)),
              ((1, 2, 9, 30), (5, 2, 2, 3), (1, 1), (0, 1)),
              ((2, 3, 11, 29), (7, 3, 3, 3), (2, 2), (1, 1))]
    for blk in ((8, 2, 1), (6, 2, 2)):
        monkeypatch.setitem(conv2d.FORCE, "core", blk)
        monkeypatch.setitem(conv2d.FORCE, "flat", False)
        for dtype in ("f32", "f64"):
            check_all([_conv_specs(prim, case) for case in shapes
                       for prim in ("conv2d", "conv2d_input_grad")], dtype, thread_counts=(2,))


def test_conv_epilogue_reads_the_element_it_writes_without_an_alias_check():
    """A conv's bias + relu epilogue reads the conv's result where it stores its own: over the
    four axes of NCHW the offset it reads at must be the row's own (one recomputed from the
    remainders of the index made LLVM add a run-time alias check that ran every row in the
    scalar loop: LeNet-5's first conv + bias + relu took 1.5x the conv alone)."""
    import tracejit
    from tracejit import nn
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32)
               for s in ((2, 1, 28, 28), (6, 1, 5, 5), (6,)))
    f = tracejit.jit(lambda x, w, b: nn.relu(nn.conv2d(x, w, b)))
    ins = make_instr("conv2d", [x.shape, w.shape], "f32", stride=(1, 1), padding=(0, 0))
    ref = impls[ins.prim](x.astype(np.float64), w.astype(np.float64), **ins.params)
    np.testing.assert_allclose(f(x, w, b), np.maximum(ref + b[None, :, None, None], 0),
                               rtol=1e-5, atol=1e-5)
    text = f.ir(x, w, b, stage="llvm-opt")
    start = text.index("define void @k0.conv2d")
    kernel = text[start:text.index("\n}\n", start)]
    assert re.search(r"<\d+ x float>", kernel)
    assert "diff.check" not in kernel, kernel


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_weight_gradient_unrolls_rows_of_few_whole_vectors(dtype, avx2_target):
    """Rows of at most four whole vectors (LeNet-5's 8 and 24 columns) are unrolled in the weight
    gradient, in a function of their own (else a row loop and a tail test around a few FMAs):
    read in place, from padded copies, strided, and in many chunks."""
    vl = 8 if dtype == "f32" else 4
    cases = [((2, 2, 12, 12), (3, 2, 5, 5), (1, 1), (0, 0)),      # ox 8, in place
             ((2, 3, 8, 8), (5, 3, 3, 3), (1, 1), (1, 1)),        # ox 8, padded copy
             ((1, 2, 28, 28), (4, 2, 5, 5), (1, 1), (0, 0)),      # ox 24
             ((2, 2, 9, 33), (3, 2, 3, 3), (2, 2), (0, 0)),       # ox 16, strided
             ((1, 1, 6, 4 * vl + 2), (2, 1, 3, 3), (1, 1), (0, 0))]   # one vector too many
    ks = check_all([_conv_specs("conv2d_weight_grad", c) for c in cases], dtype,
                   thread_counts=(1, 2, 7))
    names = set(re.findall(r"tracejit\.conv_wgrad\.[\w.]*nxv(\d)", ks.jit.asm))
    # 8 and 16 columns: one and two vectors of 8 lanes (AVX2 f32, AVX-512 f64), two and four
    # of 4 (AVX2 f64); 16 lanes (AVX-512 f32) unroll 16 columns and the flat 8-column rows
    lanes = vector_width(64 if dtype == "f64" else 32)
    assert ({"2", "4"} if lanes == 4 else {"1", "2"}) <= names, names


@pytest.mark.parametrize("avx2", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_weight_gradient_puts_output_channels_in_the_lanes(dtype, avx2, request):
    """With 32 vector registers, output channels a multiple of the vector go in the lanes (every
    lane real on LeNet-5's 8 x 8 rows): in place, from padded copies, strided, with several
    channels and kernel rows per item, on several chunks of images and thread counts; with 16
    registers only an input read in place (no padding) with enough accumulators (2 or 4 output
    vectors), one channel per item; the others keep the pixel layout."""
    if avx2:   # the 16-register choices on any host
        request.getfixturevalue("avx2_target")
    vl = vector_width(64 if dtype == "f64" else 32)
    cases = [((3, 6, 12, 12), (vl, 6, 5, 5), (1, 1), (0, 0)),          # LeNet-5 conv2 shape
             ((2, 4, 9, 10), (4 * vl, 4, 3, 3), (1, 1), (1, 1)),       # padded copy, 4 vectors
             ((3, 4, 11, 13), (2 * vl, 4, 3, 3), (2, 1), (0, 1)),      # strided, padded columns
             ((2, 4, 12, 14), (vl, 4, 5, 3), (1, 2), (2, 0)),          # column stride 2
             ((3, 6, 12, 12), (2 * vl, 6, 5, 5), (1, 1), (0, 0)),      # LeNet-5 conv2
             ((2, 3, 11, 13), (4 * vl, 3, 3, 3), (2, 1), (0, 0))]      # strided, in place
    specs = [_conv_specs("conv2d_weight_grad", c) for c in cases]
    plans = [wgrad._lanes_plan(make_instr(prim, shapes, dtype, **params))
             for prim, shapes, params in specs]
    if core.vector_registers() >= 32:
        assert None not in plans
        # several pixels per step (unit and column stride 2), channels, output vectors
        assert {p.px for p in plans} >= {1, 2, 4} and {p.sx for p in plans if p.px > 1} == {1, 2}
        assert max(p.cc for p in plans) > 1 and max(p.ro for p in plans) > 1
    else:
        assert plans[:4] == [None] * 4
        assert [(p.ro, p.cc, p.gr, p.px) for p in plans[4:]] == [(2, 1, 1, 1), (4, 1, 1, 1)]
    conv2d.FORCE["ng"] = 2   # several chunks of images
    try:
        check_all(specs, dtype, thread_counts=(1, 2, 7))
    finally:
        del conv2d.FORCE["ng"]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_weight_gradient_blocks_output_channels_without_clamped_ones(dtype):
    """In the pixel layout, an item's R output channels divide O where the registers allow: LeNet-5
    conv1's 6 channels are not computed as 4 + 4 (2 clamped copies for nothing); the blocks are
    checked against numpy."""
    from tracejit.codegen.kernels.conv2d.wgrad import _wgrad_plan
    cases = [((3, 1, 28, 28), (6, 1, 5, 5), (1, 1), (0, 0)),      # LeNet-5 conv1
             ((2, 2, 9, 10), (6, 2, 3, 3), (1, 1), (1, 1)),
             ((2, 2, 9, 10), (3, 2, 3, 3), (2, 2), (0, 0))]
    specs = [_conv_specs("conv2d_weight_grad", c) for c in cases]
    for (prim, shapes, params), (_, w, _, _) in zip(specs, cases):
        p = _wgrad_plan(make_instr(prim, shapes, dtype, **params))
        assert p.r > 1 and w[0] % p.r == 0, (w, p.r)
    check_all(specs, dtype, thread_counts=(1, 2, 7))


# x [N,C,H,W], w [O,C,KH,KW], padding (stride 1): tiles over several images (ni of them divide
# the tile's PR rows: PR = 2 for KW = 5, 3 for KW = 3 or 4 with 16 registers), batches that
# ni does not divide (the last group holds copies of the last image), rows of one vector stored
# in place and rows of several through the row buffer; N * C >= 8 (fewer take the core)
IMAGE_TILES = [((3, 6, 12, 12), (16, 6, 5, 5), (0, 0)),    # LeNet-5 conv2, 3 images
               ((3, 3, 7, 9), (4, 3, 3, 3), (1, 1)),
               ((4, 2, 9, 7), (5, 2, 3, 4), (0, 0)),
               ((5, 3, 6, 20), (2, 3, 5, 5), (2, 2)),       # cotangent rows of 2.5 vectors (f32)
               ((4, 2, 6, 3), (3, 2, 3, 2), (0, 0))]


@pytest.mark.parametrize("ni", [2, 3])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_tiles_over_several_images(dtype, ni, forced, avx2_target):
    """Each tile's accumulator rows are rows of ni images (one kernel-row range for all), their
    padded copies side by side: against numpy on 1 and 3 threads (shares that start and end
    inside a group of images), and with an epilogue that shows a plane done twice or not at all,
    in runs of planes of one group and in runs of one plane."""
    conv2d.FORCE["tgrad_ni"] = ni
    specs, tiled = [], 0
    for x, w, p in IMAGE_TILES:
        oh, ow = x[2] - w[2] + 1 + 2 * p[0], x[3] - w[3] + 1 + 2 * p[1]
        t = transposed.transposed_input_grad(dtype, x[0], w[0], x[1], x[2], x[3], oh, ow,
                                             w[2], w[3], p[0], p[1])
        tiled += t.ni == ni
        specs.append(_conv_specs("conv2d_input_grad", (x, w, (1, 1), p)))
    assert tiled >= 2
    ks = check_all(specs, dtype, thread_counts=(1, 3))
    assert f"ni{ni}" in ks.jit.asm
    for group in (None, 1):
        if group is not None:
            conv2d.FORCE["tgrad_epi"] = group
        instrs, names, jit = _lower_with_epilogue(specs, dtype, AffineEpilogue())
        _check_affine_epilogue(instrs, names, jit, dtype)


def test_lenet_second_convolution_tiles_two_images(avx2_target):
    """With 16 registers LeNet-5's input gradient of conv2 takes tiles of one row of two images:
    every row of a tile runs over the same kernel rows (40 (row, kernel row) pairs per image,
    against 44 in tiles of two rows of one image: Zen 3, one thread, 262 -> 238 us); a batch of
    one image keeps tiles of one image, and so does a batch too small to share between threads."""
    def plan(n):
        return core._input_grad_core(make_instr(
            "conv2d_input_grad", [(n, 16, 8, 8), (16, 6, 5, 5)], "f32", in_hw=(12, 12),
            stride=(1, 1), padding=(0, 0)))

    t = plan(64)
    assert isinstance(t, transposed.Transposed) and (t.ni, t.pr, t.ry) == (2, 2, 1)
    assert t.tap_rows() == 40 and t.items == 32 * 6
    assert plan(2).ni == 1

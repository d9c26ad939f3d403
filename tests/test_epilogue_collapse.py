"""Epilogues of loop-nest kernels (conv, pooling, matmul) over outputs with a short last axis:
the trailing axes that every value read is contiguous or constant over run as one loop, against
the interpreter, on one and two threads (partial rows), and vectorized."""
import re

import numpy as np
import pytest

import tracejit
from tracejit import nn

from helpers import use_backend


def both_backends(f, *args):
    """f(*args) natively on 1 and 2 threads, and on the interpreter."""
    out = []
    try:
        for n in (1, 2):
            tracejit.set_num_threads(n)
            out.append(np.asarray(f(*args)))
    finally:
        tracejit.set_num_threads(None)
    with use_backend("interpreter"):
        ref = np.asarray(f(*args))
    return out, ref


def function_text(text: str, kernel: str) -> str:
    """The LLVM text of the function `kernel` (e.g. "k0.conv2d", its epilogue inlined)."""
    start = re.search(rf"^define [^\n]*@{re.escape(kernel)}\(", text, re.M).start()
    return text[start:text.index("\n}\n", start)]


# (last axis width, dtype): conv outputs [2, 3, 2, width] (a 2 x width kernel over a 3 x
# (2 width - 1) input), each read of the epilogue constant or contiguous over the plane
CASES = [(1, "float32"), (3, "float64"), (7, "float32"), (8, "float64"), (15, "float32")]


@pytest.mark.parametrize("width,dtype", CASES)
def test_conv_epilogue_over_short_planes_matches_interpreter(width, dtype):
    """bias per channel, a scalar, a map over the plane and the conv's own result: all read
    right when the plane runs as one row."""
    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, 2, 3, 2 * width - 1)).astype(dtype)
    w = rng.standard_normal((3, 2, 2, width)).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype)
    plane = rng.standard_normal((2, width)).astype(dtype)
    s = np.asarray(1.5, dtype)

    def f(x, w, bias, plane, s):
        return nn.relu(nn.conv2d(x, w, bias)) * s + plane

    jf = tracejit.jit(f)
    out, ref = both_backends(jf, x, w, bias, plane, s)
    # the plane runs as one row: its column range is clamped to the rows called for
    assert "epilogue.col0" in jf.ir(x, w, bias, plane, s, stage="llvm")
    tol = 1e-5 if dtype == "float32" else 1e-12
    for o in out:
        np.testing.assert_allclose(o, ref, rtol=tol, atol=tol)


def test_epilogue_with_a_bias_per_row_keeps_rows():
    """A bias per output row (varies along the plane's rows) is neither constant nor contiguous
    over the plane: only the last axis collapses, and the result is still right."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    rows = rng.standard_normal((4, 1)).astype(np.float32)
    jf = tracejit.jit(lambda x, w, r: nn.relu(nn.conv2d(x, w) + r))
    out, ref = both_backends(jf, x, w, rows)
    assert "epilogue.col0" not in jf.ir(x, w, rows, stage="llvm")
    for o in out:
        np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


def test_matmul_epilogue_collapsed_to_one_row_runs_partial_rows():
    """A matmul's epilogue that reads only the product and a scalar collapses the whole output
    into one row; the kernel runs it over panels of rows (and threads over parts of them), so
    each call covers part of that row."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((100, 24)), rng.standard_normal((24, 7))
    s = np.full((1, 1), 0.5)   # broadcast (a scalar would read at the flat index)
    jf = tracejit.jit(lambda x, w, s: tracejit.tanh(x @ w * s))
    out, ref = both_backends(jf, x, w, s)
    assert "epilogue.col0" in jf.ir(x, w, s, stage="llvm")
    np.testing.assert_allclose(ref, np.tanh(x @ w * 0.5), rtol=1e-12, atol=1e-12)
    for o in out:
        np.testing.assert_allclose(o, ref, rtol=1e-12, atol=1e-12)


def test_collapsed_axes_of_conv_bias_relu():
    """LeNet-5's conv2 + bias + relu, f32[64,16,8,8]: the 8 x 8 planes collapse (bias per
    channel is constant over them), the channels do not."""
    x = np.zeros((64, 6, 12, 12), np.float32)
    w = np.zeros((16, 6, 5, 5), np.float32)
    bias = np.zeros(16, np.float32)
    text = tracejit.jit(lambda x, w, b: nn.relu(nn.conv2d(x, w, b))).ir(x, w, bias, stage="llvm-opt")
    m = re.search(r"define void @(k\d+\.conv2d[\w.]*)\(", text)
    assert m, text[:2000]
    kernel = function_text(text, m.group(1))
    # the epilogue's column loop (64 floats a row) is vectorized, without a run-time alias check;
    # before, rows of 8 ran scalar
    loop = kernel[kernel.index("epilogue.col.body"):kernel.rindex("epilogue.col.end")]
    assert re.search(r"store <(8|16) x float>", loop), loop
    assert "diff.check" not in kernel, kernel


# fused loops (no kernel) with the same reads: [N, C, H, W] with bias per channel, a map over
# the plane and a broadcast [1, 1, 1, 1] value
LOOP_SHAPES = [((2, 3, 5, 1), "float64"), ((3, 4, 7, 3), "float32"), ((8, 16, 8, 8), "float32")]


@pytest.mark.parametrize("shape,dtype", LOOP_SHAPES)
def test_fused_loop_over_short_planes_matches_interpreter(shape, dtype):
    rng = np.random.default_rng(len(shape) + shape[-1])
    n, c, h, w = shape
    x = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal((c, 1, 1)).astype(dtype)
    plane = rng.standard_normal((h, w)).astype(dtype)
    s = rng.standard_normal((1, 1, 1, 1)).astype(dtype)
    jf = tracejit.jit(lambda x, bias, plane, s: tracejit.tanh(x + bias) * plane + s)
    out, ref = both_backends(jf, x, bias, plane, s)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for o in out:
        np.testing.assert_allclose(o, ref, rtol=tol, atol=tol)
    if shape == (8, 16, 8, 8):
        # the 8 x 8 planes run as rows of 64, vectorized (before: rows of 8, scalar)
        text = jf.ir(x, bias, plane, s, stage="llvm-opt")
        m = re.search(r"define [^@\n]*@(k0\.[\w.]*)\(", text)
        assert m, text[:2000]
        assert re.search(r"store <(8|16) x float>", function_text(text, m.group(1))), \
            text[:4000]


def _masked_selects(asm: str) -> list:
    """Masked stores whose mask a comparison just made (x86, AVX2): a `select(c, k, out)` the
    instruction selection turned into a conditional store of k."""
    lines = asm.splitlines()
    return [lines[k] for k, line in enumerate(lines) if "vmaskmovps" in line and "(" in line
            and any("vcmp" in prev for prev in lines[max(0, k - 3):k])]


def test_relu_gradient_epilogue_stores_whole_vectors(avx2_target):
    """LeNet-5's conv2 input gradient with the ReLU gradient of its input as epilogue, f32
    [64, 6, 12, 12]: the epilogue reads the element it writes and keeps it where x > 0. Without a
    `freeze` on that read x86 stored the zeros through vmaskmovps (one per 12 cycles on Zen 3:
    26 of 274 us); with it, an `and` and a whole store. Right against the interpreter too."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 6, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    t = rng.standard_normal((64, 16, 8, 8)).astype(np.float32)

    def loss(x, w, t):
        return tracejit.sum(nn.conv2d(nn.relu(x), w) * t)

    g = tracejit.jit_grad(loss, argnums=0)
    asm = g.ir(x, w, t, stage="asm")
    m = re.search(r"^(k\d+\.conv2d_input_grad):", asm, re.M)
    assert m, asm[:2000]
    kernel = asm[m.start():asm.index(".Lfunc_end", m.start())]
    assert "vcmp" in kernel, kernel   # the epilogue is inlined in the kernel
    assert _masked_selects(kernel) == [], kernel
    out, ref = both_backends(g, x, w, t)
    for o in out:
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)

"""Random small programs around the dense kernels, compiled, against the reference interpreter:
values and gradients (jit_grad) of matmuls over every transpose, broadcast batch pattern and size-1
axis (N = 1, M = 1, K = 1, batches of vectors times a shared matrix, short M), with fused
epilogues (bias, scale, tanh, relu, ...) and non-contiguous arguments at the call boundary, on
1-3 threads; convolutions whose input gradient takes the transposed form or the core (forced
both ways); and functions with several kernels that differ in one thing only (epilogue constant,
epilogue op, dtype, operand order, transpose), which the runtime must not merge into one
function (kernels with equal lowering inputs are lowered once and shared).

CI runs a few fixed seeds (each a program of its own, chosen to cover the paths above);
TRACEJIT_FUZZ_KERNEL_SEEDS=N runs seeds 0..N-1 of each kind instead, for a longer search.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import helpers
import tracejit as tj
from tracejit import nn

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

SIZES = [1, 1, 2, 3, 5, 7, 8, 9, 10, 13, 16, 17, 24, 33, 47, 49]
BATCHES = [((), ()), ((), ()), ((3,), ()), ((), (3,)), ((2,), (2,)), ((2, 1), (3,)),
           ((1,), (4,)), ((2, 1), (1, 2))]
EPILOGUES = ["none", "bias", "scale", "tanh", "relu", "bias_tanh", "square", "const"]


def _epilogue(kind, y, bias, c):
    if kind == "bias":
        return y + bias
    if kind == "scale":
        return y * c
    if kind == "tanh":
        return tj.tanh(y)
    if kind == "relu":
        return tj.maximum(y, 0.0)
    if kind == "bias_tanh":
        return tj.tanh(y * 0.5 + bias)
    if kind == "square":
        return y * y
    if kind == "const":
        return y - c
    return y


def _view(rng, arr):
    """`arr` or a non-contiguous view with the same values (the call boundary copies it)."""
    r = rng.random()
    if r < 0.2 and arr.ndim >= 2:
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(arr, -1, -2)), -1, -2)
    if r < 0.35:
        big = np.zeros(arr.shape[:-1] + (2 * arr.shape[-1],), arr.dtype)
        big[..., ::2] = arr
        return big[..., ::2]
    return arr


def matmul_program(seed):
    """(function, arguments, what): loss = sum(w * epilogue(op(a) @ op(b)))."""
    rng = np.random.default_rng(seed)
    dt = str(rng.choice(["f32", "f64"]))
    np_dt = helpers.NP_DTYPES[dt]
    m, n, k = (int(rng.choice(SIZES)) for _ in range(3))
    if rng.random() < 0.3:
        n = 1
    elif rng.random() < 0.3:
        m = 1
    ta, tb = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    ba, bb = BATCHES[rng.integers(len(BATCHES))]
    epi = str(rng.choice(EPILOGUES))
    c = float(np.round(rng.uniform(0.5, 2.0), 3))
    a = rng.standard_normal(ba + ((k, m) if ta else (m, k))).astype(np_dt)
    b = rng.standard_normal(bb + ((n, k) if tb else (k, n))).astype(np_dt)
    bias = rng.standard_normal((n,)).astype(np_dt)
    batch = np.broadcast_shapes(ba, bb)
    w = rng.standard_normal(batch + (m, n)).astype(np_dt)

    def f(a, b, bias, w):
        y = tj.matmul(tj.swapaxes(a, -1, -2) if ta else a, tj.swapaxes(b, -1, -2) if tb else b)
        return tj.sum(w * _epilogue(epi, y, bias, c))

    args = [_view(rng, x) for x in (a, b, bias, w)]
    return f, args, f"{dt} a{a.shape} b{b.shape} ta={ta} tb={tb} epi={epi}", dt


def conv_program(seed):
    """loss = sum(w * epilogue(conv2d(x, k))) with the stride-1 input gradient forced to the
    transposed form or the core."""
    rng = np.random.default_rng(seed)
    dt = str(rng.choice(["f32", "f64"]))
    np_dt = helpers.NP_DTYPES[dt]
    nb, c, o = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 5))
    kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    ph, pw = int(rng.integers(0, kh)), int(rng.integers(0, kw))
    h, wd = int(rng.integers(max(1, kh - 2 * ph), 16)), int(rng.integers(max(1, kw - 2 * pw), 16))
    x = rng.standard_normal((nb, c, h, wd)).astype(np_dt)
    kern = rng.standard_normal((o, c, kh, kw)).astype(np_dt)
    bias = rng.standard_normal((o,)).astype(np_dt)
    oh, ow = h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1
    w = rng.standard_normal((nb, o, oh, ow)).astype(np_dt)
    epi = str(rng.choice(["none", "tanh", "relu", "bias"]))

    def f(x, kern, bias, w):
        y = nn.conv2d(x, kern, bias if epi == "bias" else None, padding=(ph, pw))
        return tj.sum(w * (tj.tanh(y) if epi == "tanh" else tj.maximum(y, 0.0) if epi == "relu"
                           else y))

    return f, [x, kern, bias, w], f"{dt} x{x.shape} k{kern.shape} pad={(ph, pw)} {epi}", dt


def twins_program(seed):
    """Kernels of equal shapes that differ in one thing only (epilogue op, epilogue constant,
    transpose, dtype, a loop's constant or op), next to pairs that are equal but for their
    buffers (which the runtime lowers once)."""
    rng = np.random.default_rng(seed)
    m, n, k = (int(rng.choice(SIZES[2:])) for _ in range(3))
    xs = [rng.standard_normal((m, k)) for _ in range(7)]
    b, bt = rng.standard_normal((k, n)), rng.standard_normal((n, k))
    c1, c2 = 1.0, float(np.float32(1.0 + 2 ** -20))   # equal in f32, not in f64

    def f(x0, x1, x2, x3, x4, x5, x6, b, bt, x32, b32):
        return (tj.tanh(x0 @ b), tj.tanh(x1 @ b), tj.maximum(x2 @ b, 0.0),   # merged, op
                x3 @ b + c1, x4 @ b + c2, x5 @ b + c1,   # constant, merged
                x6 @ bt.T + c1, x32 @ b32 + c1,   # transpose, dtype
                tj.exp(x0 * c1), tj.exp(x1 * c1), tj.exp(x2 * c2), tj.sin(x3 * c1))

    args = xs + [b, bt, xs[0].astype(np.float32), b.astype(np.float32)]
    return f, args, f"twins m={m} n={n} k={k}", "f64"


def check(kind, seed, force=None):
    from tracejit.codegen.kernels.conv2d.layout import FORCE
    fn, args, what, dt = {"matmul": matmul_program, "conv": conv_program,
                          "twins": twins_program}[kind](seed)
    if force is not None:
        FORCE["tgrad"] = force
    try:
        for argnums in ([None] if kind == "twins" else [None, (0, 1)]):
            helpers.check_native_matches_interpreter(
                fn, args, f"{kind} seed {seed} {what} grad={argnums is not None}", argnums,
                threads=(1, 2, 3))
    finally:
        FORCE.pop("tgrad", None)


N_HUNT = int(os.environ.get("TRACEJIT_FUZZ_KERNEL_SEEDS", "0"))
# CI's seeds: an N = 1 product over a broadcast batch (f32, tanh), partial column tiles over
# broadcast batches (f32), a batch of vectors times a shared matrix folded into one product
# (f64, bias); a 5x5 convolution whose input gradient takes the transposed form (f64) and a 3x4
# one whose takes the core (f32)
MATMUL_SEEDS = list(range(N_HUNT)) if N_HUNT else [1, 9, 12]
CONV_SEEDS = [(s, f) for s in range(N_HUNT) for f in (True, False)] if N_HUNT \
    else [(4, True), (21, False)]


@pytest.mark.parametrize("seed", MATMUL_SEEDS)
def test_matmul_programs(seed):
    check("matmul", seed)


@pytest.mark.parametrize("seed,force", CONV_SEEDS)
def test_conv_programs(seed, force):
    check("conv", seed, force)


@pytest.mark.parametrize("seed", list(range(N_HUNT)) if N_HUNT else [0])
def test_kernels_that_differ_are_not_merged(seed, monkeypatch):
    from tracejit.codegen import runtime
    merged = []

    def spy(plan, max_threads):
        same = same_kernels(plan, max_threads)
        merged.append({plan.groups[i].name: plan.groups[j].name for i, j in same.items()})
        return same

    same_kernels = runtime._same_kernels
    monkeypatch.setattr(runtime, "_same_kernels", spy)
    check("twins", seed)
    # the equal pairs were lowered once (so the check above saw shared kernels at work) and
    # nothing else was merged: 3 merges (tanh epilogue, + c1 epilogue, exp(x * c1) loop)
    assert merged and all(len(m) == 3 for m in merged), merged

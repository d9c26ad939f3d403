"""The cost models behind the thread-pool decision (codegen/kernels, schedule.Group.cost_ns,
parallel.PARALLEL_MIN_NS): they scale with the target's vector lanes, buffers beyond one core's L2
cost at least their streaming time, and LeNet-5's gradient at batch 64 runs its convolutions and
big matmuls on the pool but its relu-gradient selects and in-cache pooling (a few microseconds
each, slower on the pool) on the calling thread; the split kernels give the one-thread result bit for
bit."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tracejit
from tracejit import nn
from tracejit.codegen import kernels, parallel, target
from helpers import use_backend

pytestmark = pytest.mark.needs_llvm


def test_rates_follow_the_vector_lanes_of_the_target():
    lanes = target.vector_width(32)
    assert kernels.LANES == lanes
    assert kernels.FLOPS_PER_NS == kernels.FLOPS_PER_LANE_NS * lanes
    assert kernels.ELEMENTS_PER_NS == kernels.ELEMENT_OPS_PER_NS == lanes


def test_streaming_bounds_only_buffers_beyond_the_cache():
    assert kernels.CACHED_BYTES >= 1 << 18
    assert kernels.streaming_ns(kernels.CACHED_BYTES) == 0.0
    big = 4 * kernels.CACHED_BYTES
    assert kernels.streaming_ns(big) == pytest.approx(big / kernels.STREAM_BYTES_PER_NS)


def lenet_loss(w1, w2, v, x):
    y = nn.max_pool2d(nn.relu(nn.conv2d(x, w1)), 2)
    y = nn.max_pool2d(nn.relu(nn.conv2d(y, w2)), 2)
    return (nn.linear(y.reshape(x.shape[0], -1), v) ** 2).sum()


def test_lenet_batch_64_splits_its_convolutions_but_not_its_small_loops():
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((6, 1, 5, 5), np.float32) * 0.2,
            rng.standard_normal((16, 6, 5, 5), np.float32) * 0.1,
            rng.standard_normal((120, 256), np.float32) * 0.05,
            rng.standard_normal((64, 1, 28, 28), np.float32))
    g = tracejit.jit_value_and_grad(lenet_loss, argnums=(0, 1, 2))
    with use_backend("llvm"):
        expected, got = (called_on(n, g, args) for n in (1, 2))
        [entry] = g._cache.values()
        groups = entry.native().plan.groups
    split = {(gr.root.prim.name, tuple(gr.root.out.shape)) for gr in groups
             if gr.cost_ns >= parallel.PARALLEL_MIN_NS}
    names = {n for n, _ in split}
    assert {"conv2d", "conv2d_input_grad", "conv2d_weight_grad"} <= names, split
    # the relu-gradient selects (a few microseconds): serial
    assert "select" not in names, split
    # pooling over conv1's planes (1.1 MB in and out): serial where one core's L2 holds them
    # (AVX-512 Xeon, 2 MiB: 5 us, slower on the pool), split where they stream from L3 (Zen 3,
    # 512 KiB L2: 31 us on one thread, 19 us on two)
    pool_bytes = (64 * 6 * 24 * 24 + 64 * 6 * 12 * 12) * 4
    assert (("max_pool2d", (64, 6, 12, 12)) in split) == (pool_bytes > kernels.CACHED_BYTES), split
    # conv2's pooling (0.3 MB) stays on the calling thread either way
    assert ("max_pool2d", (64, 16, 4, 4)) not in split, split
    assert parallel.threads_available()
    np.testing.assert_array_equal(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        np.testing.assert_array_equal(a, b)


def called_on(threads, fn, args):
    """fn(*args) with at most `threads` threads per call."""
    tracejit.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        tracejit.set_num_threads(None)


def test_a_kernel_just_over_the_threshold_splits_into_two_chunks_only():
    """Kernels estimated at PARALLEL_MIN_NS up to threadpool.FEW_CHUNKS_NS (LeNet-5's fc
    products, 15-27 us) go on the pool in 2 chunks (more made fc2's forward slower than one
    thread); a product of that size gives the one-thread result bit for bit."""
    from tracejit.codegen import threadpool
    assert parallel.PARALLEL_MIN_NS < threadpool.FEW_CHUNKS_NS
    assert threadpool.chunk_limit(parallel.PARALLEL_MIN_NS) == 2
    assert threadpool.chunk_limit(threadpool.FEW_CHUNKS_NS - 1) == 2
    assert threadpool.chunk_limit(threadpool.FEW_CHUNKS_NS) == \
        threadpool.FEW_CHUNKS_NS // threadpool.MIN_CHUNK_NS
    # x @ W^T with a relu epilogue, ~25 us estimated on this target (the vector lanes set the rate)
    m, n = 64, 84
    k = -(-25_000 * kernels.FLOPS_PER_NS // (2 * m * n))
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, k), np.float32) * 0.1
    x = rng.standard_normal((m, k), np.float32)

    def loss(w, x):
        return (nn.relu(nn.linear(x, w)) ** 2).sum()

    g = tracejit.jit_value_and_grad(loss)
    with use_backend("llvm"):
        expected, got = (called_on(t, g, (w, x)) for t in (1, 2))
        [entry] = g._cache.values()
        groups = entry.native().plan.groups
    fwd = [gr for gr in groups if gr.root.prim.name == "matmul" and
           tuple(gr.root.out.shape) == (m, n)]
    assert fwd and all(parallel.PARALLEL_MIN_NS <= gr.cost_ns < threadpool.FEW_CHUNKS_NS
                       for gr in fwd), [gr.cost_ns for gr in fwd]
    assert parallel.threads_available()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    ref = np.maximum(x @ w.T, 0)
    np.testing.assert_allclose(expected[0], (ref.astype(np.float64) ** 2).sum(), rtol=1e-4)
    np.testing.assert_allclose(expected[1], 2 * (ref * (ref > 0)).T @ x, rtol=1e-3, atol=1e-3)


def test_weight_gradient_with_few_items_splits_into_few_chunks():
    """LeNet-5's conv1 weight gradient reads its input in place: every chunk passes over all of
    the images for its items (10 of them), so it goes on the pool in 4 chunks (its kernel's
    `most_chunks`), not in the 8 or more its estimate gives. Bit for bit the one-thread
    result."""
    from tracejit.codegen import threadpool
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    w = rng.standard_normal((6, 1, 5, 5)).astype(np.float32) * 0.2
    t = rng.standard_normal((64, 6, 24, 24)).astype(np.float32)

    def loss(w, x, t):
        return (nn.conv2d(x, w) * t).sum()

    g = tracejit.jit_grad(loss)
    with use_backend("llvm"):
        expected, got = (called_on(n, g, (w, x, t)) for n in (1, 2))
        [entry] = g._cache.values()
        native = entry.native()
    [wg] = [gr for gr in native.plan.groups if gr.root.prim.name == "conv2d_weight_grad"]
    assert threadpool.chunk_limit(wg.cost_ns) > 4, wg.cost_ns
    calls = re.findall(r'call void @"?tj_parallel"?\(.*@"?(k\d+)\.conv2d_weight_grad\.chunk"?'
                       r'.*, i64 (\d+)\)', native.llvm_ir_unoptimized)
    assert calls == [(f"k{wg.index}", "4")], calls
    np.testing.assert_array_equal(got, expected)

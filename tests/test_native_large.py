"""Native code at sizes above the schedule's small-value limit (schedule.SMALL_VALUE elements) and
the parallel threshold (parallel.PARALLEL_MIN_NS of estimated work), where intermediates get
buffers of their own in the arena and kernels run on the thread pool. The op table's values
are all far below both, so these programs, one per op family, check that path: values against
independent numpy references, gradients against sampled float64 central differences of those
references and everything against the reference interpreter."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

import helpers
import tracejit as tj
from tracejit.codegen import parallel, runtime, schedule
from optable import (ref_conv, ref_cross_entropy, ref_log_softmax, ref_logsumexp, ref_norm,
                     ref_pool, ref_sigmoid, ref_softmax)
from tracejit import nn

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

TJ = SimpleNamespace(
    tanh=tj.tanh, exp=tj.exp, log=tj.log, sqrt=tj.sqrt, abs=tj.abs, sin=tj.sin, cos=tj.cos,
    sigmoid=nn.sigmoid, maximum=tj.maximum, minimum=tj.minimum, where=tj.where,
    concatenate=tj.concatenate, conv1d=nn.conv1d, conv2d=nn.conv2d, max_pool1d=nn.max_pool1d,
    avg_pool1d=nn.avg_pool1d, max_pool2d=nn.max_pool2d, avg_pool2d=nn.avg_pool2d,
    softmax=nn.softmax, log_softmax=nn.log_softmax, cross_entropy=nn.cross_entropy,
    logsumexp=tj.logsumexp, norm=tj.norm, std=tj.std, var=tj.var)
NP = SimpleNamespace(
    tanh=np.tanh, exp=np.exp, log=np.log, sqrt=np.sqrt, abs=np.abs, sin=np.sin, cos=np.cos,
    sigmoid=ref_sigmoid, maximum=np.maximum, minimum=np.minimum, where=np.where,
    concatenate=np.concatenate,
    conv1d=lambda x, w, b=None, stride=1, padding=0: ref_conv(x, w, b, stride, padding),
    conv2d=lambda x, w, b=None, stride=1, padding=0: ref_conv(x, w, b, stride, padding),
    max_pool1d=lambda x, k, s=None, p=0: ref_pool(x, k, s, p, nsp=1, mode="max"),
    avg_pool1d=lambda x, k, s=None, p=0: ref_pool(x, k, s, p, nsp=1, mode="avg"),
    max_pool2d=lambda x, k, s=None, p=0: ref_pool(x, k, s, p, nsp=2, mode="max"),
    avg_pool2d=lambda x, k, s=None, p=0: ref_pool(x, k, s, p, nsp=2, mode="avg"),
    softmax=lambda x, dim=-1: ref_softmax(x, dim), log_softmax=lambda x, dim=-1:
    ref_log_softmax(x, dim), cross_entropy=ref_cross_entropy, logsumexp=ref_logsumexp,
    norm=ref_norm, std=np.std, var=np.var)


def elementwise_unary(ns, x):
    return (ns.tanh(x) * ns.exp(-x * x) + ns.sin(x) * ns.cos(x) + ns.sqrt(ns.abs(x) + 1.0)
            + ns.log(x * x + 1.0) + ns.sigmoid(x) ** 2).sum()


def elementwise_binary(ns, a, b, c):
    # b [300] and c [200, 1] broadcast against a [200, 300]; their gradients are large reductions
    return (ns.maximum(a, b) * c - ns.minimum(a * b, c) / (1.0 + b * b)
            + ns.where(a > c, a, b) * 0.5).sum()


def reductions(ns, x):
    return ((x.sum(axis=0) ** 2).sum() + ns.tanh(x.max(axis=1)).sum()
            + (x.mean(axis=2) ** 3).sum() + (x.min(axis=(0, 2)) * np.linspace(-1, 1, 50)).sum()
            + (x.sum(axis=1, keepdims=True) * x).mean())


def matmul(ns, a, b):
    return (ns.tanh(a @ b) ** 2).sum() + (b.T @ a.T).mean()


def conv2d(ns, x, w, b):
    return (ns.tanh(ns.conv2d(x, w, b, padding=1)) ** 2).sum() + \
        ns.conv2d(x, w, stride=2).mean()


def conv1d(ns, x, w):
    return (ns.tanh(ns.conv1d(x, w, padding=2)) ** 2).sum() + ns.conv1d(x, w, stride=3).mean()


def pool2d(ns, x):
    return (ns.max_pool2d(x, 2) ** 2).sum() + (ns.avg_pool2d(x, 3, 2, 1) ** 2).sum()


def pool1d(ns, x):
    return (ns.max_pool1d(x, 3, 2, 1) ** 2).sum() + (ns.avg_pool1d(x, 2) ** 2).sum()


def layout(ns, x):
    y = ns.concatenate([x[:, ::2], x[:, 1::2] * 2.0], axis=0)    # [480, 150]
    z = y.reshape(300, 240).T                                     # [240, 300]
    return (ns.tanh(z) * x).sum() + (x.transpose()[10:290:3] ** 2).sum() + (x[:, 7, None] * z).sum()


LABELS = np.random.default_rng(7).integers(0, 100, size=512)


def softmax_losses(ns, logits):
    return (ns.cross_entropy(logits, LABELS) + (ns.softmax(logits, dim=0) ** 2).sum()
            + ns.logsumexp(logits, axis=1).mean() + (ns.log_softmax(logits) * logits).mean())


def norms(ns, x):
    return (ns.norm(x) + ns.norm(x, axis=1).sum() + ns.std(x, axis=0).sum()
            + ns.var(x, axis=1).sum() + ns.norm(x, 1) * 1e-3)


CONV_KERNELS = {"conv2d", "conv2d_input_grad", "conv2d_weight_grad"}
POOL_KERNELS = {"max_pool2d", "avg_pool2d", "avg_pool2d_grad"}


def program(name, loss, shapes, kernels=None, marks=()):
    """One test case: `loss(ns, *arrays)` on arrays of `shapes`; the kernels of primitives
    `kernels` (every large fused loop if None) must run on thread teams."""
    return pytest.param(name, loss, shapes, kernels, id=name, marks=marks)


PROGRAMS = [
    program("elementwise-unary", elementwise_unary, [(240, 300)]),
    program("elementwise-binary-broadcast", elementwise_binary, [(200, 300), (300,), (200, 1)]),
    program("reductions-each-axis", reductions, [(40, 50, 60)]),
    program("matmul", matmul, [(128, 256), (256, 96)], {"matmul"}),
    program("conv2d", conv2d, [(8, 8, 32, 32), (16, 8, 3, 3), (16,)], CONV_KERNELS),
    program("conv1d", conv1d, [(8, 16, 512), (32, 16, 5)], CONV_KERNELS),
    program("pool2d", pool2d, [(8, 16, 64, 64)], POOL_KERNELS),
    program("pool1d", pool1d, [(16, 32, 1024)], POOL_KERNELS),
    program("indexing-reshape-transpose", layout, [(240, 300)]),
    program("softmax-cross_entropy-logsumexp", softmax_losses, [(512, 100)]),
    program("norms", norms, [(240, 300)]),
]
# float32 matmul too
FLOAT32_PROGRAMS = [p for p in PROGRAMS if p.id in ("elementwise-unary", "conv2d")] + [
    program("matmul", matmul, [(128, 256), (256, 96)], {"matmul"})]


@pytest.fixture(scope="module", autouse=True)
def several_threads():
    """At least two threads per call, so thread teams run even on a one-CPU machine."""
    mp = pytest.MonkeyPatch()
    if parallel.default_threads() < 2:
        mp.setenv("TRACEJIT_NUM_THREADS", "2")
    yield
    mp.undo()


def traced(fun):
    return lambda *args: fun(TJ, *args)


def native_entry(g):
    """The native code of the one signature `g` has compiled."""
    [entry] = g._cache.values()
    return entry.native()


def check_takes_the_large_parallel_path(native, prims, name):
    """Some kernel writes more than SMALL_VALUE elements; the kernels of `prims` (if None: some
    fused loop) are above the parallel threshold, and their calls go through the thread pool."""
    plan = native.plan
    assert native.max_threads > 1, name
    big = [g for g in plan.groups if g.result.type.size > schedule.SMALL_VALUE]
    assert big, f"{name}: no kernel writes more than {schedule.SMALL_VALUE} elements"
    if prims:
        wanted = [g for g in plan.groups if g.root.prim.name in prims]
        assert {g.root.prim.name for g in wanted} == prims, name
        slow = [g.name for g in wanted if g.cost_ns < parallel.PARALLEL_MIN_NS]
        assert not slow, f"{name}: kernels below the parallel threshold: {slow}"
    else:
        wanted = [g for g in plan.groups
                  if g.kind == "loop" and g.cost_ns >= parallel.PARALLEL_MIN_NS]
        assert wanted, f"{name}: no fused loop above the parallel threshold"
    if parallel.threads_available():
        # a kernel equal to an earlier one calls that one's function (runtime._same_kernels)
        same, by_index = runtime._same_kernels(plan, native.max_threads), {h.index: h for h in plan.groups}
        for g in wanted:
            lowered = by_index[same.get(g.index, g.index)]
            assert f"{lowered.name}.parallel" in native.llvm_ir_unoptimized, f"{name}: {g.name}"
        assert "tj_parallel" in native.llvm_ir, name
    else:  # only where the pool is turned off on purpose, never silently
        assert os.environ.get("TRACEJIT_NO_OPENMP"), "no thread pool on this platform"


@pytest.mark.parametrize("name,fun,shapes,prims", PROGRAMS)
def test_large_program(name, fun, shapes, prims):
    rng = helpers.rng_for("large", name)
    args = [rng.standard_normal(s) for s in shapes]
    argnums = tuple(range(len(args)))
    with helpers.use_backend("llvm"):
        g = tj.jit_value_and_grad(traced(fun), argnums=argnums)
        value, grads = g(*args)
        check_takes_the_large_parallel_path(native_entry(g), prims, name)
    helpers.assert_close(value, fun(NP, *args), helpers.FORWARD_TOL["f64"], f"{name}: value")
    with helpers.use_backend("interpreter"):
        value_i, grads_i = tj.jit_value_and_grad(traced(fun), argnums=argnums)(*args)
    helpers.assert_close(value, value_i, (1e-12, 1e-12), f"{name}: value vs interpreter")
    for k, (a, b) in enumerate(zip(grads, grads_i)):
        helpers.assert_close(a, b, (1e-10, 1e-12), f"{name}: gradient {k} vs interpreter")
    # eps 1e-4: these losses sum ~1e5 terms, so a smaller step would drown in rounding
    fd = helpers.numeric_grad(lambda *a: fun(NP, *a), args, argnums, eps=1e-4, max_coords=4,
                              rng=helpers.rng_for("large-fd", name))
    helpers.assert_grads_match_fd(grads, fd, "f64", name)


@pytest.mark.parametrize("name,fun,shapes,prims", FLOAT32_PROGRAMS)
def test_large_program_float32(name, fun, shapes, prims):
    rng = helpers.rng_for("large-f32", name)
    args = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    argnums = tuple(range(len(args)))
    out = {}
    for backend in ("llvm", "interpreter"):
        with helpers.use_backend(backend):
            g = tj.jit_value_and_grad(traced(fun), argnums=argnums)
            out[backend] = g(*args)
        if backend == "llvm":
            check_takes_the_large_parallel_path(native_entry(g), prims, name)
    (value, grads), (value_i, grads_i) = out["llvm"], out["interpreter"]
    assert value.dtype == np.float32 and all(x.dtype == np.float32 for x in grads)
    expected = fun(NP, *[a.astype(np.float64) for a in args])
    helpers.assert_close(value, expected, (1e-4, 1e-5), f"{name}: value")
    for k, (a, b) in enumerate(zip(grads, grads_i)):
        helpers.assert_close(a, b, (1e-4, 1e-5), f"{name}: gradient {k} vs interpreter")

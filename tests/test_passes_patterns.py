"""The IR passes' rewrite patterns do not depend on how the front end spells an op.

relu can be written as a select with its comparison and its branches in either order; every spelling
with the same values and derivative gives the same optimized IR as `nn.relu`, and the two rewrites
that read relu (the adjoint's mask computed from the relu output, the mask moved after the max-pool
scatter) fire for each. A golden "optimized" dump of conv -> relu -> max-pool -> linear shows them.

Regenerate the golden file after an intended change of the printed dump with
    TRACEJIT_UPDATE_GOLDEN=1 python -m pytest tests/test_passes_patterns.py -k golden
and review the diff.
"""
import os
import re

import numpy as np
import pytest

import tracejit as tj
from tracejit.ir.adjoint import grad_function
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType, print_function
from tracejit.ir.interpreter import interpret
from tracejit.ir.passes import optimize
from tracejit.ir.verify import verify
from tracejit import Tracer, nn
from tracejit.values import to_value


# ------------------------------------------------------------------------------------------------
# the golden function: keep it first in this file, its line numbers are in the dump
# ------------------------------------------------------------------------------------------------
def conv_relu_pool_linear(w, b, fc_w, fc_b, x):
    h = nn.max_pool2d(nn.relu(nn.conv2d(x, w, b)), 2)
    y = nn.linear(nn.flatten(h), fc_w, fc_b)
    return (y * y).sum()


GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
RNG = np.random.default_rng(0)
# x[2,3,8,8] -> conv 3x3 (4) -> [2,4,6,6] -> max-pool 2 -> [2,4,3,3] -> linear 36 -> 5
SHAPES = dict(w=(4, 3, 3, 3), b=(4,), fc_w=(5, 36), fc_b=(5,), x=(2, 3, 8, 8))
ARGS = tuple(RNG.standard_normal(s).astype(np.float32) for s in SHAPES.values())


def test_golden_optimized_dump_conv_relu_pool_linear(monkeypatch):
    # one thread: the dump shows the plan compiled for the thread count in force (its arena holds
    # each thread's scratch), which must not depend on the machine here
    monkeypatch.setenv("TRACEJIT_NUM_THREADS", "1")
    text = tj.jit_grad(conv_relu_pool_linear, argnums=(0, 1, 2, 3)).ir(
        *ARGS, stage="optimized") + "\n"
    # the arena holds the kernels' scratch, sized by register blocks chosen for the host's
    # vector registers (AVX2 or AVX-512): the one host-dependent figure of the dump
    text = re.sub(r"intermediate arena \d+ bytes", "intermediate arena N bytes", text)
    path = os.path.join(GOLDEN_DIR, "conv_relu_pool_linear.optimized.txt")
    if os.environ.get("TRACEJIT_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"the optimized dump of conv_relu_pool_linear differs from {path}"


# ------------------------------------------------------------------------------------------------
# relu spellings
# ------------------------------------------------------------------------------------------------
# 0 where u <= 0, u elsewhere, NaN where u is NaN; derivative 0 at 0 (nn.relu)
RELU_NAN_PROPAGATING = {
    "nn.relu": nn.relu,
    "where(u <= 0, 0, u)": lambda u: tj.where(u <= 0, 0.0, u),
    "where(0 >= u, 0, u)": lambda u: tj.where(tj.greater_equal(0.0, u), 0.0, u),
    "where(not(u <= 0), u, 0)": lambda u: tj.where(tj.logical_not(u <= 0), u, 0.0),
    "where(not(0 >= u), u, 0)": lambda u: tj.where(tj.logical_not(tj.greater_equal(0.0, u)),
                                                   u, 0.0),
}
# 0 where u <= 0 or u is NaN, u elsewhere; derivative 0 at 0 (relu before NaN propagated)
RELU_NAN_TO_ZERO = {
    "where(u > 0, u, 0)": lambda u: tj.where(u > 0, u, 0.0),
    "where(0 < u, u, 0)": lambda u: tj.where(tj.less(0.0, u), u, 0.0),
    "where(not(u > 0), 0, u)": lambda u: tj.where(tj.logical_not(u > 0), 0.0, u),
    "where(not(0 < u), 0, u)": lambda u: tj.where(tj.logical_not(tj.less(0.0, u)), 0.0, u),
}
# NaN-propagating too, but the derivative at 0 is 1/2 (maximum's ties split the cotangent)
RELU_MAXIMUM = {
    "maximum(u, 0)": lambda u: tj.maximum(u, 0.0),
    "maximum(0, u)": lambda u: tj.maximum(0.0, u),
}
ALL_SPELLINGS = {**RELU_NAN_PROPAGATING, **RELU_NAN_TO_ZERO, **RELU_MAXIMUM}


def _model(relu):
    def f(w, b, fc_w, fc_b, x):
        h = nn.max_pool2d(relu(nn.conv2d(x, w, b)), 2)
        y = nn.linear(nn.flatten(h), fc_w, fc_b)
        return (y * y).sum()
    return f


def _trace(fun, args):
    """(forward, grad w.r.t. all but the last parameter) ir.Functions of fun(*args)."""
    b = Builder("f")
    with building(b):
        params = [Tracer(b.add_param(TensorType("f32", a.shape), name), b)
                  for a, name in zip(args, SHAPES)]
        fwd = verify(b.finish([to_value(fun(*params))]))
    return fwd, verify(grad_function(fwd, range(len(args) - 1)))


def _text(fn) -> str:
    """The printed function without its provenance comments (the spellings differ in those)."""
    return "\n".join(re.sub(r"\s+#.*$", "", line) for line in print_function(fn).splitlines())


def _optimized(relu, stage):
    fwd, grad = _trace(_model(relu), ARGS)
    return verify(optimize(fwd if stage == "forward" else grad))


def _users(fn, v):
    return [ins for ins in fn.instrs if any(x is v for x in ins.inputs)]


@pytest.mark.parametrize("stage", ["forward", "grad"])
@pytest.mark.parametrize("name", list(RELU_NAN_PROPAGATING)[1:])
def test_nan_propagating_relu_spellings_optimize_like_nn_relu(name, stage):
    expected = _text(_optimized(nn.relu, stage))
    assert _text(_optimized(RELU_NAN_PROPAGATING[name], stage)) == expected


@pytest.mark.parametrize("stage", ["forward", "grad"])
@pytest.mark.parametrize("name", list(RELU_NAN_TO_ZERO)[1:])
def test_nan_to_zero_relu_spellings_optimize_alike(name, stage):
    expected = _text(_optimized(RELU_NAN_TO_ZERO["where(u > 0, u, 0)"], stage))
    assert _text(_optimized(RELU_NAN_TO_ZERO[name], stage)) == expected


def _relu_instrs(fn):
    """(pre-activation u, relu output r) of the one conv -> bias -> relu in `fn`."""
    conv = next(ins for ins in fn.instrs if ins.prim.name == "conv2d")
    (bias_add,) = [ins for ins in _users(fn, conv.out) if ins.prim.name == "add"]
    u = bias_add.out
    pool = next(ins for ins in fn.instrs if ins.prim.name == "max_pool2d")
    return u, pool.inputs[0]


@pytest.mark.parametrize("name", [*RELU_NAN_PROPAGATING, *RELU_NAN_TO_ZERO])
def test_relu_rewrites_fire(name):
    fn = _optimized(ALL_SPELLINGS[name], "grad")
    u, r = _relu_instrs(fn)
    # the adjoint's mask reads the relu output: the pre-activation is read by the relu alone
    relu = r.instr
    assert all(ins is relu or ins.out is relu.inputs[0] for ins in _users(fn, u)), \
        print_function(fn)
    # the mask is applied to the pooled cotangent before the scatter, computed from the pooled
    # values: the full-size relu output is read by the pooling kernel alone
    (scatter,) = [ins for ins in fn.instrs if ins.prim.name == "max_pool2d_grad"]
    masked = scatter.inputs[0].instr
    assert masked.prim.name == "select", print_function(fn)
    pooled = next(ins.out for ins in fn.instrs if ins.prim.name == "max_pool2d")
    assert masked.inputs[0].instr.inputs[0] is pooled, print_function(fn)
    assert {ins.prim.name for ins in _users(fn, r)} == {"max_pool2d", "max_pool2d_argmax"}, \
        print_function(fn)


@pytest.mark.parametrize("name", list(RELU_MAXIMUM))
def test_maximum_relu_mask_reads_the_output(name):
    """maximum's adjoint also needs u == 0 (ties get half the cotangent), which the output cannot
    tell, so u stays live; the masks that the output can tell read it."""
    fn = _optimized(ALL_SPELLINGS[name], "grad")
    u, r = _relu_instrs(fn)
    masks = {ins.prim.name for ins in _users(fn, u) if ins.out is not r}
    assert masks <= {"eq", "lt"}, print_function(fn)


@pytest.mark.parametrize("inputs", ["kink", "nan"])
@pytest.mark.parametrize("name", list(ALL_SPELLINGS))
def test_optimized_relu_spellings_compute_what_they_did(name, inputs):
    """The rewrites keep the values, at relu's kink and at NaN included (the bias gradient's sum
    of the pooled cotangent adds the same terms as the sum of its scatter, in another order:
    equal to rounding, NaN where it was NaN)."""
    args = [a.copy() for a in ARGS]
    args[1][:] = 0.0
    if inputs == "kink":
        args[4][0, :, :3, :] = 0.0      # pre-activations exactly 0 in the first output row
    else:
        args[4][1, 2, 4, 4] = np.nan    # NaN pre-activations (the loss is NaN)
    fwd, grad = _trace(_model(ALL_SPELLINGS[name]), args)
    expected = interpret(grad, args)
    actual = interpret(optimize(grad), args)
    bias = list(SHAPES).index("b") + 1   # outputs: the loss, then the gradients
    for k, (e, a) in enumerate(zip(expected, actual)):
        if k == bias:
            np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6 * np.nanmax(np.abs(e), initial=0))
        else:
            np.testing.assert_array_equal(a, e)


def test_mask_used_before_the_relu_keeps_reading_the_pre_activation():
    """A use of u <= 0 that comes before relu(u) cannot read the relu output (not yet defined)."""
    def f(w, b, fc_w, fc_b, x):
        u = nn.conv2d(x, w, b)
        first = tj.where(u <= 0, 2.0 * u, u).sum()
        return first + _model(nn.relu)(w, b, fc_w, fc_b, x)
    fwd, grad = _trace(f, ARGS)
    opt = verify(optimize(grad))
    np.testing.assert_array_equal(interpret(opt, ARGS)[0], interpret(grad, ARGS)[0])


@pytest.mark.parametrize("backend", ["interpreter", "llvm"])
def test_constants_of_opposite_zero_signs_stay_distinct(backend):
    """-0.0 == 0.0 as numbers, but not as values (1 / -0.0 is -inf): common-subexpression
    elimination must not merge the two constants."""
    from helpers import use_backend
    with use_backend(backend):
        f = tj.jit(lambda x: tj.where(x > 0, -0.0, 0.0) * 1.0)
        out = f(np.array([1.0, -1.0]))
    assert np.array_equal(np.signbit(out), [True, False])


# ------------------------------------------------------------------------------------------------
# the sum of a max-pool scatter
# ------------------------------------------------------------------------------------------------
def test_bias_gradient_sums_the_pooled_cotangent():
    """conv -> bias -> relu -> max-pool: the bias gradient (a sum over N, H, W) reads the pooled
    cotangent, not the full-size scatter, which only the weight gradient reads."""
    fn = _optimized(nn.relu, "grad")
    (scatter,) = [ins for ins in fn.instrs if ins.prim.name == "max_pool2d_grad"]
    (db,) = [ins for ins in fn.instrs if ins.prim.name == "reduce_sum"
             and ins.params["axes"] == (0, 2, 3)]
    assert db.inputs[0] is scatter.inputs[0], print_function(fn)
    assert {ins.prim.name for ins in _users(fn, scatter.out)} == {"conv2d_weight_grad"}


# (kernel, stride, padding, dilation, ceil) of the pooling: adjacent, overlapping, padded and
# dilated windows, a last window cut by ceil mode
POOLS = [((2, 2), (2, 2), (0, 0), (1, 1), False), ((3, 3), (1, 1), (0, 0), (1, 1), False),
         ((3, 2), (2, 1), (1, 1), (1, 1), False), ((3, 3), (2, 2), (1, 1), (2, 2), True)]


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: "k{}{}-s{}{}-p{}{}-d{}{}-{}".format(
    *p[0], *p[1], *p[2], *p[3], "ceil" if p[4] else "floor"))
@pytest.mark.parametrize("axes", [(2, 3), (0, 2, 3), (0, 1, 2, 3), (0, 3), (1,)])
def test_sum_of_max_pool_scatter(pool, axes):
    """reduce_sum(max_pool2d_grad(ct, idx)) over both spatial axes becomes the sum of ct (each
    element lands once in its plane), on the interpreter and compiled; a sum that keeps a spatial
    axis keeps the scatter."""
    from tracejit.codegen import compile_function
    from tracejit.ir import lax
    kernel, stride, padding, dilation, ceil = pool
    x = RNG.standard_normal((2, 3, 9, 8)).astype(np.float32)
    b = Builder("f")
    with building(b):
        px = b.add_param(TensorType("f32", x.shape), "x")
        idx = lax.max_pool2d_argmax(px, kernel, stride, padding, dilation, ceil)
        pct = b.add_param(TensorType("f32", idx.shape), "ct")
        fn = verify(b.finish([lax.reduce_sum(lax.max_pool2d_grad(pct, idx, x.shape[2:]), axes)]))
    ct = RNG.standard_normal(idx.shape).astype(np.float32)
    opt = verify(optimize(fn))
    (total,) = [ins for ins in opt.instrs if ins.prim.name == "reduce_sum"]
    spatial = {2, 3} <= set(axes)
    assert (total.inputs[0].instr is None) == spatial, print_function(opt)
    assert any(ins.prim.name == "max_pool2d_grad" for ins in opt.instrs) != spatial
    (expected,) = interpret(fn, [x, ct])
    (reordered,) = interpret(opt, [x, ct])
    (compiled,) = compile_function(opt)([x, ct])
    np.testing.assert_allclose(reordered, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled, expected, rtol=1e-5, atol=1e-5)
    if spatial:   # the sum of the cotangent itself, in float64
        np.testing.assert_allclose(expected, ct.astype(np.float64).sum(axis=axes), rtol=1e-5,
                                   atol=1e-5)

"""Convolution options against torch.nn.functional in float64: dilation, groups (depthwise and
general), padding "same"/"valid", transposed convolutions; values and both gradients of the
compiled code, over a compact grid of option combinations, and the errors for bad options.
PyTorch's numbers are stored (tests/torch_golden.py): torch is not a dependency of the tests."""
import itertools

import numpy as np
import pytest

import tracejit as tj
from tracejit import nn

from helpers import use_backend
from torch_golden import torch_reference

# (input shape, weight shape, stride, padding, dilation, groups): each a distinct compile
CONV2D = [
    ((2, 4, 7, 9), (4, 1, 3, 3), 1, 1, 1, 4),              # depthwise
    ((1, 3, 8, 19), (6, 1, 3, 3), 2, 1, 1, 3),             # depthwise x2, strided, wide rows
    ((2, 4, 7, 9), (8, 2, 3, 2), (2, 1), (1, 0), (2, 1), 2),
    ((1, 6, 6, 6), (3, 2, 2, 3), 1, "same", 2, 3),
    ((1, 2, 9, 8), (2, 2, 3, 3), 1, "valid", 3, 1),        # dilation alone
    ((2, 4, 5, 5), (4, 2, 1, 1), 1, 0, 1, 2),              # grouped 1x1
]
CONV1D = [
    ((2, 3, 17), (3, 1, 5), 1, "same", 2, 3),
    ((1, 4, 12), (6, 2, 3), 3, 2, 1, 2),
]
TRANSPOSE2D = [   # (input, weight [C_in, C_out/G, kh, kw], stride, padding, output_padding, groups, dilation)
    ((2, 4, 4, 5), (4, 3, 3, 3), 2, 1, 1, 2, 1),
    ((1, 3, 3, 4), (3, 1, 2, 3), (1, 2), (0, 1), (0, 1), 3, (2, 1)),
    ((1, 2, 5, 3), (2, 2, 3, 1), 1, 0, 0, 1, 1),
    # stride <= output_padding < dilation: zero rows past every window, the output's end past
    # the kernel's (padding 0 < output_padding) and before it (padding 2 > output_padding)
    ((1, 4, 5, 7), (4, 1, 3, 2), 1, (0, 2), 1, 2, (2, 3)),
]
TRANSPOSE1D = [((2, 2, 6), (2, 2, 4), 2, 1, 1, 1, 2),
               ((1, 2, 5), (2, 3, 3), 2, 2, 2, 1, 3)]


def _check(name, tj_fn, torch_fn, xs, ws, bias_size, seed):
    """Values and the gradients w.r.t. input, weight and bias of <y, r> for random x, w, b, r;
    `torch_fn(F, x, w, b)` is PyTorch's spelling."""
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(bias_size)

    def loss(x, w, b, r):   # one compile: the output rides along as aux
        y = tj_fn(x, w, b)
        return (y * r).sum(), y

    r = rng.standard_normal(tj.jit(tj_fn)(x, w, b).shape)

    def compute(torch):
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        ty = torch_fn(torch.nn.functional, tx, tw, tb)
        (ty * torch.tensor(r)).sum().backward()
        return {"y": ty.detach().numpy(), "dx": tx.grad.numpy(), "dw": tw.grad.numpy(),
                "db": tb.grad.numpy()}
    ref = torch_reference(name, compute)
    (_, y), grads = tj.jit_value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, b, r)
    np.testing.assert_allclose(np.asarray(y), ref["y"], rtol=0, atol=1e-10)
    for g, k in zip(grads, ("dx", "dw", "db")):
        np.testing.assert_allclose(np.asarray(g), ref[k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("nsp, case", [(2, c) for c in CONV2D] + [(1, c) for c in CONV1D],
                         ids=str)
def test_conv_matches_torch(nsp, case):
    xs, ws, s, p, d, g = case
    tjf, tname = (nn.conv2d, "conv2d") if nsp == 2 else (nn.conv1d, "conv1d")
    _check(f"conv_options-{tname}-{case}", lambda x, w, b: tjf(x, w, b, s, p, d, g),
           lambda F, x, w, b: getattr(F, tname)(x, w, b, s, p, d, g), xs, ws, (ws[0],), 0)


@pytest.mark.parametrize("nsp, case", [(2, c) for c in TRANSPOSE2D] + [(1, c) for c in TRANSPOSE1D],
                         ids=str)
def test_conv_transpose_matches_torch(nsp, case):
    xs, ws, s, p, op, g, d = case
    tjf, tname = (nn.conv_transpose2d, "conv_transpose2d") if nsp == 2 else \
        (nn.conv_transpose1d, "conv_transpose1d")
    _check(f"conv_options-{tname}-{case}", lambda x, w, b: tjf(x, w, b, s, p, op, g, d),
           lambda F, x, w, b: getattr(F, tname)(x, w, b, s, p, op, g, d), xs, ws, (ws[1] * g,), 1)


def test_conv_transpose1d_option_grid_matches_torch():
    """Every stride 1-3, padding 0-2, dilation 1-2, groups 1-2 and output_padding below
    max(stride, dilation), values and gradients, on the interpreter (the lowering to
    conv2d_input_grad is per axis, so 1-d covers its arithmetic; native code is checked above)."""
    grid = [(s, p, op, g, d)
            for s, p, d, g in itertools.product((1, 2, 3), (0, 1, 2), (1, 2), (1, 2))
            for op in range(max(s, d))]
    rng = np.random.default_rng(5)
    data = [(rng.standard_normal((2, 2 * g, 5)), rng.standard_normal((2 * g, 2, 3)),
             rng.standard_normal(2 * g)) for _, _, _, g, _ in grid]

    def compute(torch):
        out = {}
        for i, ((s, p, op, g, d), arrays) in enumerate(zip(grid, data)):
            tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in arrays)
            ty = torch.nn.functional.conv_transpose1d(tx, tw, tb, s, p, op, g, d)
            (ty * ty.detach().cos()).sum().backward()
            out.update({f"y{i}": ty.detach().numpy(), f"dx{i}": tx.grad.numpy(),
                        f"dw{i}": tw.grad.numpy(), f"db{i}": tb.grad.numpy()})
        return out
    ref = torch_reference("conv_options-conv_transpose1d-grid", compute)
    with use_backend("interpreter"):
        for i, ((s, p, op, g, d), arrays) in enumerate(zip(grid, data)):
            def loss(x, w, b):
                y = nn.conv_transpose1d(x, w, b, s, p, op, g, d)
                return (y * tj.stop_gradient(tj.cos(y))).sum(), y
            (_, y), grads = tj.jit_value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*arrays)
            for k, v in zip(("y", "dx", "dw", "db"), (y,) + tuple(grads)):
                np.testing.assert_allclose(np.asarray(v), ref[f"{k}{i}"], rtol=0, atol=1e-12,
                                           err_msg=f"{k} at (s, p, op, g, d)={grid[i]}")


def test_keywords_in_pytorch_order():
    x, w = np.ones((1, 4, 5, 5)), np.ones((4, 1, 3, 3))
    a = nn.conv2d(x, w, None, 1, 1, 1, 4)
    b = nn.conv2d(x, w, groups=4, padding=1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs, words", [
    (dict(groups=3), ["groups", "input channels (4)", "3"]),
    (dict(groups=0), ["groups", "positive", "0"]),
    (dict(groups=2.0), ["groups", "2.0"]),
    (dict(dilation=0), ["dilation", "positive", "0"]),
    (dict(padding="full"), ["padding", "'same'", "'full'"]),
    (dict(padding="same", stride=2), ["padding='same'", "stride", "(2, 2)"]),
])
def test_bad_conv_options_name_the_argument(kwargs, words):
    x, w = np.ones((1, 4, 6, 6)), np.ones((4, 2, 3, 3))
    kwargs.setdefault("groups", 2)
    with pytest.raises(ValueError) as e:
        nn.conv2d(x, w, **kwargs)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_weight_channels_must_match_groups():
    with pytest.raises(tj.ShapeError, match=r"groups=2 expects 6"):
        nn.conv2d(np.ones((1, 4, 6, 6)), np.ones((4, 3, 3, 3)), groups=2)


def test_bad_conv_transpose_options():
    x, w = np.ones((1, 4, 3, 3)), np.ones((4, 1, 2, 2))
    with pytest.raises(ValueError, match=r"output_padding must be smaller than the stride or the "
                                         r"dilation .* got output_padding=\(2, 2\) with "
                                         r"stride=\(2, 2\) and dilation=\(1, 2\)"):
        nn.conv_transpose2d(x, w, stride=2, output_padding=2, dilation=(1, 2))
    with pytest.raises(ValueError, match=r"groups \(3\)"):
        nn.conv_transpose2d(x, w, groups=3)
    with pytest.raises(tj.ShapeError, match=r"weight must be 4-d \[in, out/groups, kh, kw\]"):
        nn.conv_transpose2d(x, np.ones((4, 1, 2)))


def test_max_pool_return_indices_match_torch():
    x = np.random.default_rng(2).standard_normal((2, 3, 7, 8))
    for fn, tname, kw in ((nn.max_pool2d, "max_pool2d", dict(kernel_size=3, stride=2, padding=1,
                                                              dilation=2, ceil_mode=True)),
                          (nn.max_pool1d, "max_pool1d", dict(kernel_size=2, ceil_mode=True))):
        xi = x if fn is nn.max_pool2d else x[:, :, 0]
        y, idx = tj.jit(lambda a: fn(a, return_indices=True, **kw))(xi)

        def compute(torch):
            ty, tidx = getattr(torch.nn.functional, tname)(torch.tensor(xi), return_indices=True,
                                                           **kw)
            return {"y": ty.numpy(), "idx": tidx.numpy()}
        ref = torch_reference(f"conv_options-{tname}-indices", compute)
        np.testing.assert_array_equal(np.asarray(y), ref["y"])
        np.testing.assert_array_equal(np.asarray(idx), ref["idx"])
        assert np.asarray(idx).dtype == np.int64


ADAPTIVE_MAX = [   # (nsp, input shape, output_size): overlapping odd windows, tiling, unbatched
    (2, (2, 3, 7, 5), (3, 2)), (2, (1, 2, 6, 4), (3, 2)), (1, (2, 3, 7), 3),
    (2, (2, 5, 5), (3, None))]


@pytest.mark.parametrize("backend", ["llvm", "interpreter"])
def test_adaptive_max_pool_return_indices_match_torch(backend):
    """Values, int64 indices (flat h*W + w per input plane) and the gradient w.r.t. the input
    against PyTorch, with tied values so that each window's first maximum must be the one."""
    for nsp, shape, size in ADAPTIVE_MAX:
        rng = np.random.default_rng(3)
        x = rng.standard_normal(shape).round(0)   # few distinct values: ties in most windows
        fn, tname = (nn.adaptive_max_pool2d, "adaptive_max_pool2d") if nsp == 2 else \
            (nn.adaptive_max_pool1d, "adaptive_max_pool1d")

        def compute(torch):
            tx = torch.tensor(x, requires_grad=True)
            ty, ti = getattr(torch.nn.functional, tname)(tx, size, return_indices=True)
            (ty * ty.detach().cos()).sum().backward()
            return {"y": ty.detach().numpy(), "idx": ti.numpy(), "dx": tx.grad.numpy()}
        ref = torch_reference(f"conv_options-{tname}-indices-{shape}-{size}", compute)

        def loss(x):
            y, idx = fn(x, size, return_indices=True)
            return (y * tj.stop_gradient(tj.cos(y))).sum(), (y, idx)
        with use_backend(backend):
            (_, (y, idx)), dx = tj.jit_value_and_grad(loss, has_aux=True)(x)
        assert np.asarray(idx).dtype == np.int64
        np.testing.assert_array_equal(np.asarray(idx), ref["idx"], err_msg=f"{shape} {size}")
        np.testing.assert_array_equal(np.asarray(y), ref["y"])
        np.testing.assert_allclose(np.asarray(dx), ref["dx"], rtol=0, atol=1e-15)


def test_adaptive_max_pool_indices_have_no_gradient():
    def f(x):
        y, idx = nn.adaptive_max_pool2d(x, (2, 3), return_indices=True)
        return y.sum() + (idx * 1.0).sum()
    x = np.random.default_rng(4).standard_normal((1, 2, 5, 7))
    g = tj.jit_grad(f)(x)
    want = tj.jit_grad(lambda x: nn.adaptive_max_pool2d(x, (2, 3)).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(want))


@pytest.mark.parametrize("call, words", [
    (lambda x: nn.max_pool2d(x, 2, padding=2), ["padding", "half", "(2, 2)"]),
    (lambda x: nn.max_pool2d(x, 2, dilation=0), ["dilation", "0"]),
    (lambda x: nn.avg_pool2d(x, 2, divisor_override=0), ["divisor_override", "0"]),
    (lambda x: nn.adaptive_avg_pool2d(x, (2, 0)), ["output_size", "(2, 0)"]),
    (lambda x: nn.adaptive_max_pool2d(x, 3.5, return_indices=True), ["output_size", "3.5"]),
])
def test_bad_pool_options_name_the_argument(call, words):
    with pytest.raises((ValueError, NotImplementedError)) as e:
        call(np.ones((1, 2, 6, 6)))
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_strided_input_gradient_skips_the_dilation_zeros():
    """The input gradient of a stride-2 3x3 convolution plans about KH*KW/(sh*sw) multiply-adds
    per input-gradient pixel and channel pair (per output phase, only the taps that reach it), not
    the KH*KW of a stride-1 convolution over the cotangent dilated with zeros."""
    from tracejit.codegen.kernels.conv2d.core import _input_grad_core
    from tracejit.ir import lax
    from tracejit.ir.builder import Builder, building
    from tracejit.ir.core import TensorType
    n, o, c, h, w = 2, 8, 4, 13, 12
    with building(Builder("t")) as b:
        ct = b.add_param(TensorType("f32", (n, o, 7, 6)))
        wt = b.add_param(TensorType("f32", (o, c, 3, 3)))
        ins = lax.conv2d_input_grad(ct, wt, (h, w), (2, 2), (1, 1)).instr
    plan = _input_grad_core(ins)
    macs = sum(p.core.n * p.core.ci * p.core.co * p.core.kh * p.core.kw * p.core.oy * p.core.ox
               for p in plan.phases)
    assert sum(p.core.oy * p.core.ox for p in plan.phases) == h * w   # the phases tile dx
    assert macs == n * o * c * (4 * 6 * 6 + 2 * 6 * 6 + 2 * 7 * 6 + 1 * 7 * 6)   # 3x3 taps split 4/2/2/1

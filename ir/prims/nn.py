"""Neural-network primitives with their own loop nests: 2-d convolution and pooling (NCHW / OIHW).

1-d convolution and pooling are these with H = 1 (the tracejit.nn layer reshapes).

    conv2d(x[N,C,H,W], w[O,C/G,KH,KW]) -> [N,O,OH,OW],  OH = (H + 2*ph - dh*(KH-1) - 1) // sh + 1
    conv2d_input_grad(ct[N,O,OH,OW], w) -> [N,C,H,W]       {in_hw}
    conv2d_weight_grad(ct[N,O,OH,OW], x[N,C,H,W]) -> [O,C/G,KH,KW]   {kernel}

The three convolution primitives take `stride`, `padding` and, left out of the params when they
are 1 (so that the IR of ordinary convolutions prints and hashes as before), `dilation` (dh, dw:
tap (i, j) reads input (y*sh + i*dh - ph, x*sw + j*dw - pw)) and `groups` G (output channel o
sees input channels [g*C/G, (g+1)*C/G) of its group g = o // (O/G); depthwise is G == C).
    max_pool2d(x) -> [N,C,OH,OW]; padding is -inf
    max_pool2d_argmax(x) -> i32[N,C,OH,OW]: flat index (h*W + w) of the first maximum (row-major
        scan of the window) in the unpadded input plane; this is what the backward pass saves.
    max_pool2d_grad(ct, idx) -> [N,C,H,W]   scatter-add of ct to idx       {in_hw}
    max_pool2d_gather(g, idx) -> [N,C,OH,OW]  g at idx (the adjoint of max_pool2d_grad)
    avg_pool2d(x) -> [N,C,OH,OW]: zero padding counted in the divisor (PyTorch's count_include_pad)
    avg_pool2d_grad(ct) -> [N,C,H,W]        {in_hw}

The pooling primitives take `kernel`, `stride`, `padding` and, only when not the defaults,
`dilation` (max pooling) and `ceil` (PyTorch's ceil_mode: a last partial window is kept when it
starts inside the input or its left padding; it reads padding past the end). avg_pool2d always
divides by KH*KW; tracejit.nn rescales for PyTorch's other divisors.

The convolution's two backward passes and their adjoints close under differentiation:
<g, conv2d_input_grad(ct, w)> = <conv2d(g, w), ct> = <w, conv2d_weight_grad(ct, g)>.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..jvp_rules import jvp_rules
from ..core import FLOAT_DTYPES, ShapeError, TensorType, Value, primitive, shape_rules
from ..interpreter import impls

conv2d_p = primitive("conv2d", "nn")
conv2d_input_grad_p = primitive("conv2d_input_grad", "nn")
conv2d_weight_grad_p = primitive("conv2d_weight_grad", "nn")
max_pool2d_p = primitive("max_pool2d", "nn")
max_pool2d_argmax_p = primitive("max_pool2d_argmax", "nn")
max_pool2d_grad_p = primitive("max_pool2d_grad", "nn")
max_pool2d_gather_p = primitive("max_pool2d_gather", "nn")
avg_pool2d_p = primitive("avg_pool2d", "nn")
avg_pool2d_grad_p = primitive("avg_pool2d_grad", "nn")


def out_size(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _check_window(what, x_hw, kernel, stride, padding, dilation=(1, 1)):
    for n, k, s, p, d in zip(x_hw, kernel, stride, padding, dilation):
        if k < 1 or s < 1 or p < 0 or d < 1:
            raise ShapeError(f"{what}: kernel {kernel}, stride {stride}, dilation {dilation} and "
                             f"padding {padding} must be positive (padding non-negative)")
        if n + 2 * p < d * (k - 1) + 1:
            raise ShapeError(f"{what}: input spatial size {tuple(x_hw)} with padding {padding} is "
                             f"smaller than the kernel {tuple(kernel)} dilated by {dilation}")
    return tuple(out_size(n, k, s, p, d)
                 for n, k, s, p, d in zip(x_hw, kernel, stride, padding, dilation))


def _check_groups(what, groups, *channels):
    """channels: (name, count) pairs that must split into `groups` equal groups."""
    if not isinstance(groups, int) or groups < 1:
        raise ShapeError(f"{what}: groups must be a positive int, got {groups!r}")
    for name, n in channels:
        if n % groups:
            raise ShapeError(f"{what}: {name} ({n}) must be divisible by groups ({groups})")


def _float4(what, *ts):
    for t in ts:
        if t.ndim != 4 or t.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{what} expects 4-d float tensors (NCHW / OIHW), got {t}")
    if len({t.dtype for t in ts}) > 1:
        raise ShapeError(f"{what}: operand dtypes differ: {', '.join(map(str, ts))}")
    for t in ts:
        if t.size == 0:  # the loop nests assume at least one element everywhere
            raise ShapeError(f"{what}: zero-size operand {t} (an empty batch, channel, kernel or "
                             f"spatial dimension) is not supported; skip the call instead")


# --------------------------------------------------------------------------- shape rules
@shape_rules.register(conv2d_p)
def _conv2d_shape(x, w, *, stride, padding, dilation=(1, 1), groups=1):
    _float4("conv2d", x, w)
    _check_groups("conv2d", groups, ("input channels", x.shape[1]),
                  ("output channels", w.shape[0]))
    if x.shape[1] != w.shape[1] * groups:
        raise ShapeError(f"conv2d: input {x} has {x.shape[1]} channels but weight {w} with "
                         f"groups={groups} expects {w.shape[1] * groups}")
    oh, ow = _check_window("conv2d", x.shape[2:], w.shape[2:], stride, padding, dilation)
    return x.with_shape((x.shape[0], w.shape[0], oh, ow))


@shape_rules.register(conv2d_input_grad_p)
def _conv2d_input_grad_shape(ct, w, *, in_hw, stride, padding, dilation=(1, 1), groups=1):
    _float4("conv2d_input_grad", ct, w)
    _check_groups("conv2d_input_grad", groups, ("output channels", w.shape[0]))
    if _check_window("conv2d_input_grad", in_hw, w.shape[2:], stride, padding,
                     dilation) != ct.shape[2:] or ct.shape[1] != w.shape[0]:
        raise ShapeError(f"conv2d_input_grad: cotangent {ct} does not fit weight {w} and input "
                         f"size {in_hw}")
    return ct.with_shape((ct.shape[0], w.shape[1] * groups) + tuple(in_hw))


@shape_rules.register(conv2d_weight_grad_p)
def _conv2d_weight_grad_shape(ct, x, *, kernel, stride, padding, dilation=(1, 1), groups=1):
    _float4("conv2d_weight_grad", ct, x)
    _check_groups("conv2d_weight_grad", groups, ("input channels", x.shape[1]),
                  ("output channels", ct.shape[1]))
    if _check_window("conv2d_weight_grad", x.shape[2:], kernel, stride, padding,
                     dilation) != ct.shape[2:] or ct.shape[0] != x.shape[0]:
        raise ShapeError(f"conv2d_weight_grad: cotangent {ct} does not fit input {x}")
    return ct.with_shape((ct.shape[1], x.shape[1] // groups) + tuple(kernel))


def pool_out_hw(what, x_hw, kernel, stride, padding, dilation=(1, 1), ceil=False):
    """The output size of a pooling window (PyTorch's rule): with `ceil`, a last partial window
    is kept when it starts inside the input or its left padding."""
    out = _check_window(what, x_hw, kernel, stride, padding, dilation)
    if not ceil:
        return out
    res = []
    for o, n, k, s, p, d in zip(out, x_hw, kernel, stride, padding, dilation):
        c = -(-(n + 2 * p - d * (k - 1) - 1) // s) + 1
        res.append(c - 1 if (c - 1) * s >= n + p else c)
    return tuple(res)


def _pool_shape(what, x, kernel, stride, padding, dtype=None, dilation=(1, 1), ceil=False):
    _float4(what, x)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ShapeError(f"{what}: padding {padding} must be at most half the kernel {kernel}")
    oh, ow = pool_out_hw(what, x.shape[2:], kernel, stride, padding, dilation, ceil)
    return TensorType(dtype or x.dtype, (x.shape[0], x.shape[1], oh, ow))


shape_rules[max_pool2d_p] = lambda x, **p: _pool_shape("max_pool2d", x, **p)
shape_rules[max_pool2d_argmax_p] = lambda x, **p: _pool_shape("max_pool2d_argmax", x,
                                                              dtype="i32", **p)
shape_rules[avg_pool2d_p] = lambda x, **p: _pool_shape("avg_pool2d", x, **p)


@shape_rules.register(max_pool2d_grad_p)
def _max_pool2d_grad_shape(ct, idx, *, in_hw):
    if idx.dtype != "i32" or idx.shape != ct.shape or ct.ndim != 4:
        raise ShapeError(f"max_pool2d_grad: indices {idx} must be i32 of the cotangent's shape {ct}")
    return ct.with_shape(ct.shape[:2] + tuple(in_hw))


@shape_rules.register(max_pool2d_gather_p)
def _max_pool2d_gather_shape(g, idx):
    if idx.dtype != "i32" or idx.ndim != 4 or idx.shape[:2] != g.shape[:2]:
        raise ShapeError(f"max_pool2d_gather: indices {idx} do not fit {g}")
    return g.with_shape(idx.shape)


@shape_rules.register(avg_pool2d_grad_p)
def _avg_pool2d_grad_shape(ct, *, in_hw, kernel, stride, padding, ceil=False):
    _float4("avg_pool2d_grad", ct)
    if pool_out_hw("avg_pool2d_grad", in_hw, kernel, stride, padding, ceil=ceil) != ct.shape[2:]:
        raise ShapeError(f"avg_pool2d_grad: cotangent {ct} does not fit input size {in_hw}")
    return ct.with_shape(ct.shape[:2] + tuple(in_hw))


# --------------------------------------------------------------------------- numpy reference
def _windows(x, kernel, stride, padding, fill=0.0, dilation=(1, 1), ceil=False):
    """[N,C,OH,OW,KH,KW] view of the padded input's windows (`ceil`: pooling's ceil_mode, the
    last windows reaching past the padding read `fill` there)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = pool_out_hw("windows", x.shape[2:], kernel, stride, padding, dilation, ceil)
    eh = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (x.shape[2] + 2 * ph))
    ew = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (x.shape[3] + 2 * pw))
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=fill)
    win = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]


def _scatter_windows(ct_per_tap, in_shape, kernel, stride, padding, dtype, dilation=(1, 1)):
    """Adjoint of `_windows`: add ct_per_tap(i, j) [N,C,OH,OW] into the input at tap (i, j)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, c, h, w = in_shape
    oh, ow = ct_per_tap(0, 0).shape[2:]   # (ceil mode: windows past the padding)
    eh = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (h + 2 * ph))
    ew = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (w + 2 * pw))
    out = np.zeros((n, c, h + 2 * ph + eh, w + 2 * pw + ew), dtype=dtype)
    for i in range(kh):
        for j in range(kw):
            t = ct_per_tap(i, j)
            oh, ow = t.shape[2:]
            y0, x0 = i * dh, j * dw
            out[:, :, y0:y0 + sh * (oh - 1) + 1:sh, x0:x0 + sw * (ow - 1) + 1:sw] += t
    return out[:, :, ph:ph + h, pw:pw + w]


def _split_groups(a, groups, axis):
    """a with its dimension `axis` split into (groups, size / groups)."""
    return a.reshape(a.shape[:axis] + (groups, a.shape[axis] // groups) + a.shape[axis + 1:])


@impls.register(conv2d_p)
def _conv2d_impl(x, w, *, stride, padding, dilation=(1, 1), groups=1):
    win = _split_groups(_windows(x, w.shape[2:], stride, padding, dilation=dilation), groups, 1)
    y = np.einsum("ngchwij,gocij->ngohw", win, _split_groups(w, groups, 0), optimize=True)
    return y.reshape((x.shape[0], w.shape[0]) + y.shape[3:])


@impls.register(conv2d_input_grad_p)
def _conv2d_input_grad_impl(ct, w, *, in_hw, stride, padding, dilation=(1, 1), groups=1):
    n, c = ct.shape[0], w.shape[1] * groups
    ctg, wg = _split_groups(ct, groups, 1), _split_groups(w, groups, 0)

    def tap(i, j):
        t = np.einsum("ngohw,goc->ngchw", ctg, wg[:, :, :, i, j])
        return t.reshape((n, c) + t.shape[3:])
    return _scatter_windows(tap, (n, c) + tuple(in_hw), w.shape[2:], stride, padding, ct.dtype,
                            dilation)


@impls.register(conv2d_weight_grad_p)
def _conv2d_weight_grad_impl(ct, x, *, kernel, stride, padding, dilation=(1, 1), groups=1):
    win = _split_groups(_windows(x, kernel, stride, padding, dilation=dilation), groups, 1)
    dw = np.einsum("ngohw,ngchwij->gocij", _split_groups(ct, groups, 1), win, optimize=True)
    return dw.reshape((ct.shape[1], x.shape[1] // groups) + tuple(kernel))


@impls.register(max_pool2d_p)
def _max_pool2d_impl(x, *, kernel, stride, padding, dilation=(1, 1), ceil=False):
    return _windows(x, kernel, stride, padding, -np.inf, dilation, ceil).max(axis=(4, 5))


@impls.register(max_pool2d_argmax_p)
def _max_pool2d_argmax_impl(x, *, kernel, stride, padding, dilation=(1, 1), ceil=False):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    win = _windows(x, kernel, stride, padding, -np.inf, dilation, ceil)
    valid = _windows(np.ones_like(x, dtype=bool), kernel, stride, padding, False, dilation, ceil)
    n, c, oh, ow = win.shape[:4]
    win = win.reshape(n, c, oh, ow, kh * kw)
    valid = valid.reshape(n, c, oh, ow, kh * kw)
    # the first real element equal to the window's maximum (the first NaN if there is one), so a
    # window of -inf values never points into the padding
    m = win.max(axis=4, keepdims=True)
    hit = valid & ((win == m) | (np.isnan(m) & np.isnan(win)))
    tap = hit.argmax(axis=4)
    i, j = tap // kw, tap % kw
    rows = np.arange(oh)[:, None] * sh + i * dh - ph
    cols = np.arange(ow)[None, :] * sw + j * dw - pw
    return (rows * x.shape[3] + cols).astype(np.int32)


@impls.register(max_pool2d_grad_p)
def _max_pool2d_grad_impl(ct, idx, *, in_hw):
    n, c = ct.shape[:2]
    out = np.zeros((n, c, in_hw[0] * in_hw[1]), dtype=ct.dtype)
    flat_idx = idx.reshape(n, c, -1)
    for a in range(n):
        for b in range(c):
            np.add.at(out[a, b], flat_idx[a, b], ct[a, b].ravel())
    return out.reshape((n, c) + tuple(in_hw))


@impls.register(max_pool2d_gather_p)
def _max_pool2d_gather_impl(g, idx):
    n, c = g.shape[:2]
    flat = g.reshape(n, c, -1)
    return np.take_along_axis(flat, idx.reshape(n, c, -1).astype(np.int64), axis=2).reshape(idx.shape)


@impls.register(avg_pool2d_p)
def _avg_pool2d_impl(x, *, kernel, stride, padding, ceil=False):
    win = _windows(x, kernel, stride, padding, ceil=ceil)
    return win.sum(axis=(4, 5)) / (kernel[0] * kernel[1])


@impls.register(avg_pool2d_grad_p)
def _avg_pool2d_grad_impl(ct, *, in_hw, kernel, stride, padding, ceil=False):
    scaled = ct / (kernel[0] * kernel[1])
    return _scatter_windows(lambda i, j: scaled, ct.shape[:2] + tuple(in_hw), kernel, stride,
                            padding, ct.dtype)


# --------------------------------------------------------------------------- emitters
def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else tuple(int(a) for a in v)


def _conv_params(stride, padding, dilation, groups):
    """The params of a convolution primitive; dilation and groups only when they are not 1."""
    params = dict(stride=_pair(stride), padding=_pair(padding))
    if _pair(dilation) != (1, 1):
        params["dilation"] = _pair(dilation)
    if groups != 1:
        params["groups"] = int(groups)
    return params


def conv2d(x: Value, w: Value, stride=1, padding=0, dilation=1, groups=1) -> Value:
    return emit(conv2d_p, x, w, **_conv_params(stride, padding, dilation, groups))


def conv2d_input_grad(ct, w, in_hw, stride, padding, dilation=1, groups=1) -> Value:
    return emit(conv2d_input_grad_p, ct, w, in_hw=tuple(in_hw),
                **_conv_params(stride, padding, dilation, groups))


def conv2d_weight_grad(ct, x, kernel, stride, padding, dilation=1, groups=1) -> Value:
    return emit(conv2d_weight_grad_p, ct, x, kernel=tuple(kernel),
                **_conv_params(stride, padding, dilation, groups))


def _pool_params(kernel, stride, padding, dilation=1, ceil=False):
    """Pooling params; dilation and ceil (ceil_mode) only when they are not the defaults."""
    kernel = _pair(kernel)
    params = dict(kernel=kernel, stride=_pair(stride) if stride is not None else kernel,
                  padding=_pair(padding))
    if _pair(dilation) != (1, 1):
        params["dilation"] = _pair(dilation)
    if ceil:
        params["ceil"] = True
    return params


def max_pool2d(x: Value, kernel, stride=None, padding=0, dilation=1, ceil=False) -> Value:
    return emit(max_pool2d_p, x, **_pool_params(kernel, stride, padding, dilation, ceil))


def max_pool2d_argmax(x: Value, kernel, stride, padding, dilation=1, ceil=False) -> Value:
    return emit(max_pool2d_argmax_p, x, **_pool_params(kernel, stride, padding, dilation, ceil))


def max_pool2d_grad(ct: Value, idx: Value, in_hw) -> Value:
    return emit(max_pool2d_grad_p, ct, idx, in_hw=tuple(in_hw))


def max_pool2d_gather(g: Value, idx: Value) -> Value:
    return emit(max_pool2d_gather_p, g, idx)


def avg_pool2d(x: Value, kernel, stride=None, padding=0, ceil=False) -> Value:
    """The window sums divided by KH*KW (a ceil-mode window past the padding too: the front end
    rescales for PyTorch's divisors)."""
    return emit(avg_pool2d_p, x, **_pool_params(kernel, stride, padding, ceil=ceil))


def avg_pool2d_grad(ct: Value, in_hw, kernel, stride, padding, ceil=False) -> Value:
    return emit(avg_pool2d_grad_p, ct, in_hw=tuple(in_hw),
                **_pool_params(kernel, stride, padding, ceil=ceil))


# --------------------------------------------------------------------------- adjoint rules
@adjoint_rules.register(conv2d_p)
def _conv2d_adjoint(ct, x, w, **p):
    return (conv2d_input_grad(ct, w, x.shape[2:], **p), conv2d_weight_grad(ct, x, w.shape[2:], **p))


@adjoint_rules.register(conv2d_input_grad_p)
def _conv2d_input_grad_adjoint(g, ct, w, *, in_hw, **p):
    return (conv2d(g, w, **p), conv2d_weight_grad(ct, g, w.shape[2:], **p))


@adjoint_rules.register(conv2d_weight_grad_p)
def _conv2d_weight_grad_adjoint(g, ct, x, *, kernel, **p):
    return (conv2d(x, g, **p), conv2d_input_grad(ct, g, x.shape[2:], **p))


@adjoint_rules.register(max_pool2d_p)
def _max_pool2d_adjoint(ct, x, **p):
    idx = max_pool2d_argmax(x, **p)
    return (max_pool2d_grad(ct, idx, x.shape[2:]),)


adjoint_rules[max_pool2d_argmax_p] = lambda ct, x, **params: (None,)
adjoint_rules[max_pool2d_grad_p] = lambda g, ct, idx, *, in_hw: (max_pool2d_gather(g, idx), None)
adjoint_rules[max_pool2d_gather_p] = lambda ct, g, idx: (
    max_pool2d_grad(ct, idx, g.shape[2:]), None)


@adjoint_rules.register(avg_pool2d_p)
def _avg_pool2d_adjoint(ct, x, **p):
    return (avg_pool2d_grad(ct, x.shape[2:], **p),)


@adjoint_rules.register(avg_pool2d_grad_p)
def _avg_pool2d_grad_adjoint(g, ct, *, in_hw, **p):
    return (avg_pool2d(g, **p),)


# --------------------------------------------------------------------------- tangent rules
# conv2d and its two backward ops are bilinear (product rule); pooling and the pooling backward
# ops are linear in their float operand. Batched tangents fold their batch axis into the batch
# (N), output-channel or input-channel dimension, whichever the tangent operand owns, so every
# term stays one loop-nest instruction; max pooling reuses the saved argmax for every direction.
def _fold_grouped(ts, t, dim, groups):
    """ts.fold_at(t, dim) for a channel dimension split into `groups`: [B, .., G*d, ..] ->
    [.., G*B*d, ..], so that the batch stays inside each group of a grouped convolution."""
    from .structural import reshape
    if not ts.k or groups == 1:
        return ts.fold(t) if dim == 0 else ts.fold_at(t, dim)
    a = dim + 1   # the axis of the tangent
    split = reshape(t, t.shape[:a] + (groups, t.shape[a] // groups) + t.shape[a + 1:])
    f = ts.fold_at(split, dim + 1)
    return reshape(f, f.shape[:dim] + (f.shape[dim] * f.shape[dim + 1],) + f.shape[dim + 2:])


def _unfold_grouped(ts, y, dim, groups):
    """The inverse of `_fold_grouped`: [.., G*B*d, ..] -> [B, .., G*d, ..]."""
    from .structural import reshape
    if not ts.k or groups == 1:
        return ts.unfold(y) if dim == 0 else ts.unfold_at(y, dim)
    split = reshape(y, y.shape[:dim] + (groups, y.shape[dim] // groups) + y.shape[dim + 1:])
    u = ts.unfold_at(split, dim + 1)
    a = dim + 1
    return reshape(u, u.shape[:a] + (u.shape[a] * u.shape[a + 1],) + u.shape[a + 2:])


@jvp_rules.register(conv2d_p)
def _conv2d_jvp(ts, tans, out, x, w, **p):
    tx, tw = tans
    g = p.get("groups", 1)
    dx = None if tx is None else ts.unfold(conv2d(ts.fold(tx), w, **p))
    # the weight tangent's batch joins the output channels O (inside each group)
    dw = None if tw is None else _unfold_grouped(
        ts, conv2d(x, _fold_grouped(ts, tw, 0, g), **p), 1, g)
    return ts.add(dx, dw)


@jvp_rules.register(conv2d_input_grad_p)
def _conv2d_input_grad_jvp(ts, tans, out, ct, w, *, in_hw, **p):
    tct, tw = tans
    g = p.get("groups", 1)
    d1 = None if tct is None else ts.unfold(conv2d_input_grad(ts.fold(tct), w, in_hw, **p))
    # the weight tangent's batch joins its channel dimension C/G, the result's channels per group
    d2 = None if tw is None else _unfold_grouped(
        ts, conv2d_input_grad(ct, ts.fold_at(tw, 1), in_hw, **p), 1, g)
    return ts.add(d1, d2)


@jvp_rules.register(conv2d_weight_grad_p)
def _conv2d_weight_grad_jvp(ts, tans, out, ct, x, *, kernel, **p):
    tct, tx = tans
    g = p.get("groups", 1)
    # the cotangent's batch joins its channels O (the result's rows), the input's its channels C
    d1 = None if tct is None else _unfold_grouped(
        ts, conv2d_weight_grad(_fold_grouped(ts, tct, 1, g), x, kernel, **p), 0, g)
    d2 = None if tx is None else ts.unfold_at(
        conv2d_weight_grad(ct, _fold_grouped(ts, tx, 1, g), kernel, **p), 1)
    return ts.add(d1, d2)


@jvp_rules.register(max_pool2d_p)
def _max_pool2d_jvp(ts, tans, out, x, **p):
    idx = max_pool2d_argmax(x, **p)
    return ts.unfold(max_pool2d_gather(ts.fold(tans[0]), ts.tile(idx)))


jvp_rules[max_pool2d_argmax_p] = lambda ts, tans, out, x, **params: None
jvp_rules[max_pool2d_grad_p] = lambda ts, tans, out, ct, idx, *, in_hw: ts.unfold(
    max_pool2d_grad(ts.fold(tans[0]), ts.tile(idx), in_hw))
jvp_rules[max_pool2d_gather_p] = lambda ts, tans, out, g, idx: ts.unfold(
    max_pool2d_gather(ts.fold(tans[0]), ts.tile(idx)))
jvp_rules[avg_pool2d_p] = lambda ts, tans, out, x, **p: ts.unfold(avg_pool2d(ts.fold(tans[0]), **p))
jvp_rules[avg_pool2d_grad_p] = lambda ts, tans, out, ct, *, in_hw, **p: \
    ts.unfold(avg_pool2d_grad(ts.fold(tans[0]), in_hw, **p))

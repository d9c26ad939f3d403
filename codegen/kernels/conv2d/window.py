"""Grouped and dilated convolutions (`groups` > 1 or `dilation` > 1), depthwise the main case:
the three convolution primitives as window loops over planes, on the pooling kernels' window
machinery (kernels/pool.py `_Window`: a vector of V outputs of one output row, its inputs read by
one wide load per tap row whose lanes are shuffled apart per tap, or with unit column stride one
plain load per tap; plain inside the plane, masked or shuffled with zeros at the padding).

A grouped convolution is a sum of few input planes per output plane (C/G of them; one for
depthwise), so there is no channel block to keep in registers as the dense core does; the window
loop does per output vector and tap one broadcast weight and one FMA.

- conv2d ("gather"): out plane (n, o) = sum over its group's C/G input planes k and taps (i, j)
  of w[o, k, i, j] * tap. Threads own whole output planes (an epilogue runs on each final plane).
- conv2d_input_grad, unit strides: the same gather over the cotangent planes, a convolution of the
  cotangent with the flipped weights, padding dh*(KH-1) - ph (negative: the window starts inside).
- conv2d_input_grad, strided: "scatter": per input-gradient plane (n, c), zeroed first, each
  cotangent vector of the group's O/G channels times w[o, c % (C/G), i, j] is spread over the wide
  vector of its tap row (one shuffle per tap) and added to the plane (read-modify-write).
- conv2d_weight_grad: per weight row (o, k), KH*KW vector accumulators summed over the images and
  the cotangent vectors (ct * tap), each summed across its lanes at the end; a kernel whose
  accumulators would not fit the vector registers takes a pass over the data per group of tap
  rows.

Lanes past the end of a row hold zeros (of the masked loads, or shuffled in), so they add nothing (an Inf or NaN
input or weight next to them gives NaN there, as in the dense kernels' 0 * Inf note).
"""
from __future__ import annotations


import llvmlite.ir as ir

from ... import record
from ...loops import fma, for_range, gep, i64, load, splat, store
from ...target import vector_registers
from ..pool import _Geom, _ivec, _plane_done, _plane_ptr, _Window
from ..toolkit import hsum, kernel_function, thread_range, wide_load, wide_store, zero_fill


def is_window(ins) -> bool:
    """Whether a convolution instruction runs here (the dense kernels take groups = dilation = 1)."""
    return ins.params.get("groups", 1) != 1 or tuple(ins.params.get("dilation", (1, 1))) != (1, 1)


@record(frozen=True)
class _Weights:
    """Weight element of (group g, output channel o_loc of the group, source channel k of the
    group, tap i, j): g*sg + o_loc*so + k*sk + i*si + j*sj + s0."""
    sg: int
    so: int
    sk: int
    si: int
    sj: int
    s0: int = 0

    def index(self, b, g, o_loc, k, i: int, j: int):
        v = b.add(b.mul(g, i64(self.sg)), b.mul(o_loc, i64(self.so)))
        v = b.add(v, b.mul(k, i64(self.sk)))
        return b.add(v, i64(i * self.si + j * self.sj + self.s0), name=f"w{i}{j}.at")


def _split(b, p, channels: int, per_group: int):
    """(image, group, channel within the group) of plane p of an NCHW tensor."""
    n = b.udiv(p, i64(channels), name="n")
    c = b.urem(p, i64(channels), name="c")
    return n, b.udiv(c, i64(per_group), name="g"), b.urem(c, i64(per_group), name="c.loc")


def _gather(module, name, ins, epilogue, g: _Geom, co: int, og: int, ci: int, kin: int,
            wts: _Weights):
    """out plane (n, o) (co channels, og per group) = sum over the kin source planes of its group
    (of ci channels) of the weighted taps."""
    f = kernel_function(module, name, 2, epilogue)
    b, out, (src, w) = f.b, f.out, f.ins
    win = _Window(b, g, ins.out.type.dtype, ins.prim.name, shift_tail=True, reads_only=True)
    T, V, L = win.T, win.V, win.L
    zero_w = ir.Constant(win.wide_ty, [0.0] * L)
    plane = g.H * g.W
    weights = {}

    def splats(grp, o_loc, k):
        return {(i, j): splat(b, load(b, w, wts.index(b, grp, o_loc, k, i, j), T), V)
                for i in range(g.kh) for j in range(g.kw)}

    def begin_plane(p):
        # one source plane (depthwise): the plane's weights, broadcast once, stay in registers
        if kin == 1:
            n, grp, o_loc = _split(b, p, co, og)
            weights["plane"] = splats(grp, o_loc, i64(0))

    def accumulate(acc, src_p, loads, wv):
        for rows, off, mask in loads:
            for (i, j), tap in win.taps_of(src_p, off, mask, zero_w, rows):
                acc = fma(b, tap, wv[i, j], acc)
        return acc

    def body(p, c0, base, r, h0, out_mask, loads):
        n, grp, o_loc = _split(b, p, co, og)
        first = b.mul(b.add(b.mul(n, i64(ci)), b.mul(grp, i64(kin))), i64(plane))
        zero = ir.Constant(win.vty, [0.0] * V)
        if kin == 1:
            acc = accumulate(zero, gep(b, src, first, T, name="src.plane"), loads, weights["plane"])
        else:
            acc_slot = b.alloca(win.vty, name="acc")
            b.store(zero, acc_slot)
            with for_range(b, 0, kin, name=f"{ins.prim.name}.k") as k:
                src_p = gep(b, src, b.add(first, b.mul(k, i64(plane))), T, name="src.plane")
                b.store(accumulate(b.load(acc_slot), src_p, loads, splats(grp, o_loc, k)),
                        acc_slot)
            acc = b.load(acc_slot)
        win.store(acc, _plane_ptr(b, out, p, g.OH * g.OW, T, "out.plane"), r, c0, out_mask)

    planes = thread_range(b, g.planes, f.tid, f.nthreads)
    win.loop(*planes, body, begin_plane, lambda p: _plane_done(f, p, g.OH * g.OW))
    b.ret_void()


def _params(ins):
    p = ins.params
    return (tuple(p["stride"]), tuple(p["padding"]), tuple(p.get("dilation", (1, 1))),
            p.get("groups", 1))


def lower_conv2d(module, name, ins, epilogue=None):
    (sh, sw), (ph, pw), (dh, dw), groups = _params(ins)
    n, c, h, wd = ins.inputs[0].type.shape
    o, cg, kh, kw = ins.inputs[1].type.shape
    oh, ow = ins.out.type.shape[2:]
    g = _Geom(n * o, h, wd, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)
    og, t = o // groups, kh * kw
    _gather(module, name, ins, epilogue, g, o, og, c, cg, _Weights(og * cg * t, cg * t, t, kw, 1))


def lower_conv2d_input_grad(module, name, ins, epilogue=None):
    (sh, sw), (ph, pw), (dh, dw), groups = _params(ins)
    n, o, oh, ow = ins.inputs[0].type.shape
    _, cg, kh, kw = ins.inputs[1].type.shape
    h, wd = ins.params["in_hw"]
    c, og, t = cg * groups, o // groups, kh * kw
    if (sh, sw) != (1, 1):
        _scatter(module, name, ins, epilogue)
        return
    # a unit-stride convolution of ct with the flipped weights: out channel c of group g reads
    # the group's og cotangent planes k with w[g*og + k, c % cg, kh-1-i, kw-1-j]
    g = _Geom(n * c, oh, ow, h, wd, kh, kw, 1, 1, dh * (kh - 1) - ph, dw * (kw - 1) - pw, dh, dw)
    _gather(module, name, ins, epilogue, g, c, cg, o, og,
            _Weights(og * cg * t, t, cg * t, -kw, -1, t - 1))


def _scatter(module, name, ins, epilogue):
    """conv2d_input_grad of a strided convolution (see the module docstring)."""
    (sh, sw), (ph, pw), (dh, dw), groups = _params(ins)
    n, o, oh, ow = ins.inputs[0].type.shape
    _, cg, kh, kw = ins.inputs[1].type.shape
    h, wd = ins.params["in_hw"]
    c, og, t = cg * groups, o // groups, kh * kw
    g = _Geom(n * c, h, wd, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)
    f = kernel_function(module, name, 2, epilogue)
    b, out, (ct, w) = f.b, f.out, f.ins
    win = _Window(b, g, ins.out.type.dtype, ins.prim.name)
    T, V, L = win.T, win.V, win.L
    zero_v, zero_w = ir.Constant(win.vty, [0.0] * V), ir.Constant(win.wide_ty, [0.0] * L)
    used = win.lay.used(g)

    def spread_index(i, j):
        """Wide lane q <- output lane l of tap (i, j) (lane V of the zero vector elsewhere)."""
        at = {q: l for l, q in enumerate(win.lay.lanes(g, i, j)[:used])}
        return _ivec([at.get(q, V) for q in range(L)])

    weights = {}

    def w_row(grp, k, c_loc):
        return b.add(b.mul(b.add(b.mul(grp, i64(og)), k), i64(cg * t)), b.mul(c_loc, i64(t)),
                     name="w.row")

    def splats(wrow):
        return {(i, j): splat(b, load(b, w, b.add(wrow, i64(i * kw + j)), T), V)
                for i in range(kh) for j in range(kw)}

    def begin_plane(p):
        zero_fill(b, _plane_ptr(b, out, p, h * wd, T, "out.plane"), h * wd, T, V, ins.prim.name)
        if og == 1:   # depthwise: the plane's weights, broadcast once
            _, grp, c_loc = _split(b, p, c, cg)
            weights["plane"] = splats(w_row(grp, i64(0), c_loc))

    def spread(out_p, ct_p, r, c0, out_mask, loads, wv):
        ctv = wide_load(b, ct_p, win.out_offset(r, c0), win.vty, out_mask, zero_v)
        for rows, off, mask in loads:
            add = None
            for i in rows:
                for j in range(kw):
                    part = b.shuffle_vector(b.fmul(ctv, wv[i, j]), zero_v, spread_index(i, j))
                    add = part if add is None else b.fadd(add, part)
            add = b.fadd(wide_load(b, out_p, off, win.wide_ty, mask, zero_w), add)
            wide_store(b, add, out_p, off, mask)

    def body(p, c0, base, r, h0, out_mask, loads):
        nn_, grp, c_loc = _split(b, p, c, cg)
        out_p = _plane_ptr(b, out, p, h * wd, T, "out.plane")
        first = b.mul(b.add(b.mul(nn_, i64(o)), b.mul(grp, i64(og))), i64(oh * ow))
        if og == 1:
            spread(out_p, gep(b, ct, first, T, name="ct.plane"), r, c0, out_mask, loads,
                   weights["plane"])
            return
        with for_range(b, 0, og, name=f"{ins.prim.name}.k") as k:
            ct_p = gep(b, ct, b.add(first, b.mul(k, i64(oh * ow))), T, name="ct.plane")
            spread(out_p, ct_p, r, c0, out_mask, loads, splats(w_row(grp, k, c_loc)))

    planes = thread_range(b, g.planes, f.tid, f.nthreads)
    win.loop(*planes, body, begin_plane, lambda p: _plane_done(f, p, h * wd))
    b.ret_void()


def lower_conv2d_weight_grad(module, name, ins):
    """dw[o, k, i, j] = sum over images and output pixels of ct[n, o] * tap (i, j) of x[n, g*cg + k]:
    threads own rows (o, k) of dw."""
    (sh, sw), (ph, pw), (dh, dw), groups = _params(ins)
    n, o, oh, ow = ins.inputs[0].type.shape
    _, c, h, wd = ins.inputs[1].type.shape
    kh, kw = ins.params["kernel"]
    cg, og = c // groups, o // groups
    g = _Geom(n, h, wd, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)
    f = kernel_function(module, name, 2)
    b, out, (ct, x) = f.b, f.out, f.ins
    win = _Window(b, g, ins.out.type.dtype, ins.prim.name, reads_only=True)
    T, V, L = win.T, win.V, win.L
    zero_v, zero_w = ir.Constant(win.vty, [0.0] * V), ir.Constant(win.wide_ty, [0.0] * L)
    accs = [[b.alloca(win.vty, name=f"acc{i}{j}") for j in range(kw)] for i in range(kh)]
    # the accumulators of a pass (tap rows `group`) stay in registers beside the cotangent, a
    # tap and the loop's constants; larger kernels take several passes over the data
    per = max(1, (vector_registers() - 4) // kw)
    t0, t1 = thread_range(b, o * cg, f.tid, f.nthreads)
    with for_range(b, t0, t1, name=f"{ins.prim.name}.row") as row:
        oc, k = b.udiv(row, i64(cg), name="o"), b.urem(row, i64(cg), name="k")
        xc = b.add(b.mul(b.udiv(oc, i64(og)), i64(cg)), k, name="x.channel")
        for group in (range(i0, min(i0 + per, kh)) for i0 in range(0, kh, per)):
            for i in group:
                for j in range(kw):
                    b.store(zero_v, accs[i][j])

            def body(p, c0, base, r, h0, out_mask, loads, group=group):
                ct_p = gep(b, ct, b.mul(b.add(b.mul(p, i64(o)), oc), i64(oh * ow)), T,
                           name="ct.plane")
                x_p = gep(b, x, b.mul(b.add(b.mul(p, i64(c)), xc), i64(h * wd)), T, name="x.plane")
                ctv = wide_load(b, ct_p, win.out_offset(r, c0), win.vty, out_mask, zero_v)
                for rows, off, mask in loads:
                    rows = [i for i in rows if i in group]
                    if not rows:
                        continue
                    for (i, j), tap in win.taps_of(x_p, off, mask, zero_w, rows):
                        b.store(fma(b, tap, ctv, b.load(accs[i][j])), accs[i][j])

            win.loop(i64(0), i64(n), body)
            for i in group:
                for j in range(kw):
                    store(b, hsum(b, b.load(accs[i][j])), out, b.add(b.mul(row, i64(kh * kw)),
                                                                     i64(i * kw + j)), T)
    b.ret_void()

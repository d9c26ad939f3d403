"""1x1 convolutions without padding (ResNet's strided shortcuts, the pointwise half of a
depthwise-separable block) as matrix products on matmul.py's register-blocked tile functions.

A 1x1 convolution with strides (sh, sw) is a product over the channels of the subsampled image
Xs_n[c, p] = x[n, c, y*sh, x*sw] (p = y*OX + x):

- conv2d:             out_n [O, P] = W [O, C] @ Xs_n [C, P]          (outer form, per image)
- conv2d_input_grad:  dXs_n [C, P] = W^T [C, O] @ ct_n [O, P]        (outer form, per image)
                      dx_n is dXs_n at the pixels (y*sh, x*sw) and zero elsewhere
- conv2d_weight_grad: dW [O, C] = sum_n ct_n [O, P] @ Xs_n^T [P, C]    (outer form, per image)

The direct core would spend its register block on one tap per input channel (loop overhead and a
padded copy per image for a handful of FMAs: 3-10 GFLOP/s); the matmul tiles keep K = C (or P)
in their inner loop. With unit strides Xs_n is x_n itself and dx_n is dXs_n; otherwise Xs_n is
gathered into the thread's scratch (`_gather_body`), and dXs_n is computed there and spread into
dx_n with the zeros between (`_spread_body`); Xs_n^T is always gathered (`_gather_t_body`, in
vl x vl blocks transposed by shuffles). The register block is matmul's accumulator count in the
shape that pads the channel count least (`_outer_plan`). The IR keeps the conv2d instructions:
this is a choice of loop nest for one shape class, like the flat and channel modes of the direct
core.

Threads: conv2d and the input gradient split the (image, row tile) pairs as matmul's batches do
(a chunk gathers each image it visits once), with the epilogue on each image's rows of planes;
the weight gradient splits the rows of dW into _WGRAD_ITEMS groups of whole row tiles, each
summing over all images (the first image's product is stored in dW, the others' added to it
from a buffer).
"""
from __future__ import annotations

import dataclasses

import llvmlite.ir as ir

from ... import record
from ....ir.prims.nn import conv2d_p
from ...loops import FAST, PTR, carry_loop, gep, i64, if_then, load, masked_load, masked_store, \
    store, vload, vstore
from ..matmul import _block_plan, _tiles_function, _TileParams
from ..toolkit import I64Arg, Params, ceil_div, dtype_info, kernel_function, lane_mask, params, \
    round_up, shared_function, smax, smin, thread_range
from .channel import _transpose
from .layout import ALIGN

# Weight-gradient items (groups of whole row tiles of dW): each item transposes every image
# (C*P elements) for its rows' C*P multiply-adds per row, so as few items as keep two threads
# busy (with a tile of rows per item the transposes cost as much as the products).
_WGRAD_ITEMS = 2


def is_pointwise(ins) -> bool:
    """Whether a dense (groups = dilation = 1) convolution instruction runs here: a 1x1 kernel
    without padding."""
    p = ins.params
    if p.get("groups", 1) != 1 or tuple(p.get("dilation", (1, 1))) != (1, 1):
        return False
    kernel = tuple(p["kernel"]) if "kernel" in p else tuple(ins.inputs[1].shape[2:])
    return kernel == (1, 1) and tuple(p["padding"]) == (0, 0)


@record(frozen=True)
class _Geom:
    """The subsampling of one image: C channels of H x W pixels, strides sh, sw, OY x OX
    output pixels."""
    c: int
    h: int
    w: int
    sh: int
    sw: int
    oy: int
    ox: int

    @property
    def strided(self) -> bool:
        return (self.sh, self.sw) != (1, 1)

    @property
    def p(self) -> int:
        return self.oy * self.ox

    def params(self, nchan) -> "_SubParams":
        return _SubParams(nchan=nchan, h=self.h, w=self.w, sh=self.sh, sw=self.sw, oy=self.oy,
                          ox=self.ox)


@params
class _SubParams(Params):
    """Channels [0, nchan) of planes h x w subsampled by (sh, sw) to oy x ox."""
    nchan: I64Arg
    h: I64Arg
    w: I64Arg
    sh: I64Arg
    sw: I64Arg
    oy: I64Arg
    ox: I64Arg


@record(frozen=True)
class _SubKey:
    dtype: str
    sw2: bool   # column stride 2 (vector shuffles), else any (scalar)


def _even_lanes(b, lo, hi, vl):
    """The even lanes of lo ++ hi."""
    idx = ir.Constant(ir.VectorType(ir.IntType(32), vl), list(range(0, 2 * vl, 2)))
    return b.shuffle_vector(lo, hi, idx)


def _gather_body(s, k: _SubKey):
    """dst[c, y, x] = src[c, y*sh, x*sw]."""
    b = s.b
    dst, src = s.ptrs
    ety, vl, _ = dtype_info(k.dtype)
    vty = ir.VectorType(ety, vl)
    with carry_loop(b, 0, b.mul(s.nchan, s.oy), [], "pw.gather.row") as lr:
        c, y = b.udiv(lr.iv, s.oy), b.urem(lr.iv, s.oy)
        srow = gep(b, src, b.add(b.mul(c, b.mul(s.h, s.w)), b.mul(b.mul(y, s.sh), s.w)), ety)
        drow = gep(b, dst, b.mul(lr.iv, s.ox), ety)
        if k.sw2:
            with carry_loop(b, 0, s.ox, [], "pw.gather.col", step=vl) as lq:
                left = b.sub(s.w, b.mul(lq.iv, i64(2)))
                at = b.mul(lq.iv, i64(2))
                lo = masked_load(b, srow, at, vty, lane_mask(b, left, vl))
                hi = masked_load(b, srow, b.add(at, i64(vl)), vty,
                                 lane_mask(b, b.sub(left, i64(vl)), vl))
                masked_store(b, _even_lanes(b, lo, hi, vl), drow, lq.iv,
                             lane_mask(b, b.sub(s.ox, lq.iv), vl))
        else:
            with carry_loop(b, 0, s.ox, [], "pw.gather.col") as lq:
                store(b, load(b, srow, b.mul(lq.iv, s.sw), ety), drow, lq.iv, ety)


@record(frozen=True)
class _GatherTKey:
    dtype: str
    sw: int   # column stride 1 or 2 (vector loads and a transpose), 0: any (scalar)


def _gather_t_body(s, k: _GatherTKey):
    """dst[y*ox + x, c] = src[c, y*sh, x*sw] (Xs transposed: the weight gradient's B operand).
    With column stride 1 or 2, blocks of vl channels x vl pixels: a vector per channel along the
    row, transposed by shuffles into a vector per pixel along the channels."""
    b = s.b
    dst, src = s.ptrs
    ety, vl, _ = dtype_info(k.dtype)
    vty = ir.VectorType(ety, vl)

    def src_row(c, y):
        return gep(b, src, b.add(b.mul(c, b.mul(s.h, s.w)), b.mul(b.mul(y, s.sh), s.w)), ety)

    if not k.sw:
        with carry_loop(b, 0, b.mul(s.nchan, s.oy), [], "pw.gather_t.row") as lr:
            c, y = b.udiv(lr.iv, s.oy), b.urem(lr.iv, s.oy)
            drow = gep(b, dst, b.add(b.mul(b.mul(y, s.ox), s.nchan), c), ety)
            with carry_loop(b, 0, s.ox, [], "pw.gather_t.col") as lq:
                store(b, load(b, src_row(c, y), b.mul(lq.iv, s.sw), ety), drow,
                      b.mul(lq.iv, s.nchan), ety)
        return
    c_last = b.sub(s.nchan, i64(1))
    with carry_loop(b, 0, s.oy, [], "pw.gather_t.y") as ly:
        with carry_loop(b, 0, s.nchan, [], "pw.gather_t.c", step=vl) as lc:
            rows = [src_row(smin(b, b.add(lc.iv, i64(t)), c_last), ly.iv) for t in range(vl)]
            with carry_loop(b, 0, s.ox, [], "pw.gather_t.x", step=vl) as lx:
                left = b.sub(s.ox, lx.iv)
                base = b.add(b.mul(b.add(b.mul(ly.iv, s.ox), lx.iv), s.nchan), lc.iv)
                # a whole block (vl channels, vl pixels whose source columns are in the row)
                # takes plain loads and stores (masked ones are slow on znver1: the 1x1 weight
                # gradient of x[32,32,16,16] took 0.41 ms with them, 0.30 without)
                full = b.and_(b.icmp_signed(">=", left, i64(vl)),
                              b.icmp_signed("<=", b.add(lc.iv, i64(vl)), s.nchan))
                if k.sw == 2:
                    full = b.and_(full, b.icmp_signed(
                        "<=", b.mul(b.add(lx.iv, i64(vl)), i64(2)), s.w))
                with b.if_else(full) as (whole, part):
                    with whole:
                        _gather_t_block(b, k, s, dst, rows, lx.iv, left, lc.iv, base, True)
                    with part:
                        _gather_t_block(b, k, s, dst, rows, lx.iv, left, lc.iv, base, False)


def _gather_t_block(b, k: _GatherTKey, s, dst, rows, x0, left, c0, base, whole: bool):
    """A block of vl channels (source rows `rows`) x vl pixels from x0 of `_gather_t_body`,
    stored transposed from element `base`; not `whole`: its lanes masked to the row's pixels
    (`left` of them) and the channels [c0, nchan)."""
    ety, vl, _ = dtype_info(k.dtype)
    vty = ir.VectorType(ety, vl)
    if k.sw == 1:
        mask = lane_mask(b, left, vl)
        vecs = [vload(b, r, x0, vty) if whole else masked_load(b, r, x0, vty, mask) for r in rows]
    else:
        at = b.mul(x0, i64(2))
        if whole:
            vecs = [_even_lanes(b, vload(b, r, at, vty), vload(b, r, b.add(at, i64(vl)), vty), vl)
                    for r in rows]
        else:
            m_lo = lane_mask(b, b.sub(s.w, at), vl)
            m_hi = lane_mask(b, b.sub(b.sub(s.w, at), i64(vl)), vl)
            vecs = [_even_lanes(b, masked_load(b, r, at, vty, m_lo),
                                masked_load(b, r, b.add(at, i64(vl)), vty, m_hi), vl)
                    for r in rows]
    cols = _transpose(b, vecs)
    for u in range(vl):   # (pixels past the row's end: no lanes)
        at_u = b.add(base, b.mul(i64(u), s.nchan))
        if whole:
            vstore(b, cols[u], dst, at_u)
        else:
            rem = b.select(b.icmp_signed(">", left, i64(u)), b.sub(s.nchan, c0), i64(0))
            masked_store(b, cols[u], dst, at_u, lane_mask(b, rem, vl))


def _spread_body(s, k: _SubKey):
    """dst[c, y, x] = src[c, y/sh, x/sw] where sh | y and sw | x, else 0."""
    b = s.b
    dst, src = s.ptrs
    ety, vl, _ = dtype_info(k.dtype)
    vty = ir.VectorType(ety, vl)
    zero = ir.Constant(vty, [0.0] * vl)
    with carry_loop(b, 0, b.mul(s.nchan, s.h), [], "pw.spread.row") as lr:
        c, y = b.udiv(lr.iv, s.h), b.urem(lr.iv, s.h)
        drow = gep(b, dst, b.mul(lr.iv, s.w), ety)
        srow = gep(b, src, b.mul(b.add(b.mul(c, s.oy), b.udiv(y, s.sh)), s.ox), ety)
        data = b.icmp_unsigned("==", b.urem(y, s.sh), i64(0))
        if k.sw2:
            # lanes 2x, 2x+1 of the destination are source lane x and a zero
            lo_idx = ir.Constant(ir.VectorType(ir.IntType(32), vl),
                                 [(t // 2) if t % 2 == 0 else vl for t in range(vl)])
            hi_idx = ir.Constant(ir.VectorType(ir.IntType(32), vl),
                                 [(vl + t) // 2 if t % 2 == 0 else vl for t in range(vl)])
            with carry_loop(b, 0, s.w, [], "pw.spread.col", step=2 * vl) as lq:
                half = b.udiv(lq.iv, i64(2))
                v = masked_load(b, srow, half, vty, lane_mask(b, b.sub(s.ox, half), vl))
                v = b.select(data, v, zero)
                left = b.sub(s.w, lq.iv)
                masked_store(b, b.shuffle_vector(v, zero, lo_idx), drow, lq.iv,
                             lane_mask(b, left, vl))
                masked_store(b, b.shuffle_vector(v, zero, hi_idx), drow, b.add(lq.iv, i64(vl)),
                             lane_mask(b, b.sub(left, i64(vl)), vl))
        else:
            with carry_loop(b, 0, s.w, [], "pw.spread.zero", step=vl) as lq:
                masked_store(b, zero, drow, lq.iv, lane_mask(b, b.sub(s.w, lq.iv), vl))
            n = b.select(data, s.ox, i64(0))
            with carry_loop(b, 0, n, [], "pw.spread.col") as lq:
                store(b, load(b, srow, lq.iv, ety), drow, b.mul(lq.iv, s.sw), ety)


def _sub_function(module, dtype: str, g: _Geom, body, kind: str):
    return shared_function(module, kind, _SubKey(dtype, g.sw == 2), 2, _SubParams, body)


def _geom(x_shape, out_hw, stride) -> _Geom:
    _, c, h, w = x_shape
    return _Geom(c, h, w, stride[0], stride[1], out_hw[0], out_hw[1])


def _outer_plan(dtype, m: int, n: int, k: int):
    """matmul's outer-form plan for C [m, n] = A [m, k] @ B [k, n], with the register block (MR
    rows x NV vectors, MR*NV accumulators as matmul chooses) that computes the fewest padded
    elements: a convolution's M is a channel count (16, 32, 64), which 4-row tiles divide and
    matmul's 6-row tiles do not (36 rows for 32)."""
    # B (the image) is read in place: a convolution's product has few rows (the channels), too
    # few to pay for packing its panels
    p = dataclasses.replace(_block_plan(dtype, m, n, k, False, False), pack="")
    acc = p.mr * p.nr
    blocks = [(p.mr, p.nr)] + [(acc // nv, nv) for nv in range(1, 5)
                               if acc % nv == 0 and acc // nv <= 12]

    def padded(block):
        mr, nv = block
        return ceil_div(m, mr) * mr * ceil_div(n, nv * p.vl) * nv * p.vl

    mr, nv = min(blocks, key=padded)   # the first of the best: matmul's own on a tie
    return dataclasses.replace(p, mr=mr, nr=nv)


# the outer form's panel buffer, unused with pack=0 (B read in place)
_NO_PANEL = ir.Constant(PTR, None)


def _sub_elems(g: _Geom, vl: int) -> int:
    """Scratch of one subsampled image (with a vector of slack for the tiles' masked tails)."""
    return round_up(g.c * g.p + vl, ALIGN) if g.strided else 0


# ------------------------------------------------------------------------------------------------
# conv2d and conv2d_input_grad: a product per image
# ------------------------------------------------------------------------------------------------
def _product_plan(ins):
    """(geometry, rows m, k, A strides (sa_i, sa_k), the matmul plan) of a per-image product."""
    dtype = ins.out.dtype
    stride = tuple(ins.params["stride"])
    if ins.prim is conv2d_p:
        x, w = ins.inputs
        o, c = w.shape[:2]
        g = _geom(x.shape, ins.out.shape[2:], stride)
        m, k, sa = o, c, (c, 1)
    else:
        ct, w = ins.inputs
        o, c = w.shape[:2]
        g = _geom(ins.out.shape, ct.shape[2:], stride)
        m, k, sa = c, o, (1, c)
    return g, m, k, sa, _outer_plan(dtype, m, g.p, k)


def product_scratch(ins, nthreads) -> int:
    g, m, k, sa, p = _product_plan(ins)
    return nthreads * _sub_elems(g, p.vl) * p.esize


def lower_product(module, name, ins, epilogue=None):
    """conv2d or conv2d_input_grad of a 1x1 kernel (see the module docstring)."""
    g, m, k, (sa_i, sa_k), p = _product_plan(ins)
    forward = ins.prim is conv2d_p
    kf = kernel_function(module, name, 2, epilogue)
    b = kf.b
    ety, vl = dtype_info(p.dtype)[:2]
    n_img = ins.out.shape[0]
    fn = _tiles_function(module, p)
    sub = kf.scratch   # this thread's own region: Xs_n or dXs_n
    mb = ceil_div(m, p.mr)
    out_image = m * (g.p if forward else g.h * g.w)
    src_image = (g.c * g.h * g.w) if forward else (k * g.p)
    t0, t1 = thread_range(b, n_img * mb, kf.tid, kf.nthreads)
    first = b.udiv(t0, i64(mb))
    last = b.udiv(b.add(t1, i64(mb - 1)), i64(mb))
    with carry_loop(b, first, last, [], "pw.image") as ln:
        base = b.mul(ln.iv, i64(mb))
        lo, hi = smax(b, b.sub(t0, base), 0), smin(b, b.sub(t1, base), mb)
        r0, r1 = b.mul(lo, i64(p.mr)), smin(b, b.mul(hi, i64(p.mr)), m)
        src = gep(b, kf.ins[0], b.mul(ln.iv, i64(src_image)), ety)
        out = gep(b, kf.out, b.mul(ln.iv, i64(out_image)), ety)
        shape = _TileParams(m=m, n=g.p, k=k, sa_i=sa_i, sa_k=sa_k, r0=r0, r1=r1, c0=0, c1=g.p,
                            pack=0)
        if forward:
            if g.strided:
                _sub_function(module, p.dtype, g, _gather_body, "conv.pw.gather").call(
                    b, [sub, src], g.params(g.c))
                src = sub
            fn.call(b, [out, kf.ins[1], src, _NO_PANEL], shape)
            plane = g.p
        else:
            fn.call(b, [sub if g.strided else out, kf.ins[1], src, _NO_PANEL], shape)
            if g.strided:   # rows [r0, r1) of dXs_n into dx_n's planes r0 ...
                _sub_function(module, p.dtype, g, _spread_body, "conv.pw.spread").call(
                    b, [gep(b, out, b.mul(r0, i64(g.h * g.w)), ety),
                        gep(b, sub, b.mul(r0, i64(g.p)), ety)], g.params(b.sub(r1, r0)))
            plane = g.h * g.w
        kf.epilogue_rows(b.add(b.mul(ln.iv, i64(out_image)), b.mul(r0, i64(plane))),
                         b.mul(b.sub(r1, r0), i64(plane)))
    b.ret_void()


# ------------------------------------------------------------------------------------------------
# conv2d_weight_grad: a sum of products over the images
# ------------------------------------------------------------------------------------------------
def _wgrad_plan(ins):
    ct, x = ins.inputs
    o, c = ins.out.shape[:2]
    g = _geom(x.shape, ct.shape[2:], tuple(ins.params["stride"]))
    p = _outer_plan(ins.out.dtype, o, c, g.p)
    rows = p.mr * ceil_div(ceil_div(o, _WGRAD_ITEMS), p.mr)
    return g, o, c, rows, p


def _sub_t_elems(g: _Geom, vl: int) -> int:
    return round_up(g.c * g.p + vl, ALIGN)


def wgrad_scratch(ins, nthreads) -> int:
    g, o, c, rows, p = _wgrad_plan(ins)
    return nthreads * (_sub_t_elems(g, p.vl) + round_up(o * c + p.vl, ALIGN)) * p.esize


def lower_wgrad(module, name, ins):
    """conv2d_weight_grad of a 1x1 kernel: items are groups of `rows` rows of dW; per image, the
    product of the group's rows goes to dW (first image) or to a buffer added to dW."""
    g, o, c, rows, p = _wgrad_plan(ins)
    n_img = ins.inputs[0].shape[0]
    kf = kernel_function(module, name, 2)
    b = kf.b
    ety, vl = dtype_info(p.dtype)[:2]
    vty = ir.VectorType(ety, vl)
    fn = _tiles_function(module, p)
    sub = kf.scratch
    tmp = gep(b, sub, i64(_sub_t_elems(g, vl)), ety, name="pw.wgrad.partial")
    t0, t1 = thread_range(b, ceil_div(o, rows), kf.tid, kf.nthreads)
    r0, r1 = b.mul(t0, i64(rows)), smin(b, b.mul(t1, i64(rows)), o)
    at, count = b.mul(r0, i64(c)), b.mul(smax(b, b.sub(r1, r0), 0), i64(c))
    shape = _TileParams(m=o, n=c, k=g.p, sa_i=g.p, sa_k=1, r0=r0, r1=r1, c0=0, c1=c, pack=0)
    with carry_loop(b, 0, n_img, [], "pw.wgrad.image") as ln:
        ct_n = gep(b, kf.ins[0], b.mul(ln.iv, i64(o * g.p)), ety)
        x_n = gep(b, kf.ins[1], b.mul(ln.iv, i64(g.c * g.h * g.w)), ety)
        key = _GatherTKey(p.dtype, g.sw if g.sw in (1, 2) else 0)
        shared_function(module, "conv.pw.gather_t", key, 2, _SubParams, _gather_t_body).call(
            b, [sub, x_n], g.params(g.c))
        first = b.icmp_unsigned("==", ln.iv, i64(0))
        fn.call(b, [b.select(first, kf.out, tmp), ct_n, sub, _NO_PANEL], shape)
        # whole vectors, then a masked tail (see `_gather_t_body`)
        whole = b.sub(count, b.urem(count, i64(vl)))
        with carry_loop(b, b.select(first, count, i64(0)), whole, [], "pw.wgrad.add",
                        step=vl) as la:
            idx = b.add(at, la.iv)
            vstore(b, b.fadd(vload(b, kf.out, idx, vty), vload(b, tmp, idx, vty), flags=FAST),
                   kf.out, idx)
        with if_then(b, b.and_(b.icmp_signed("<", whole, count), b.not_(first)),
                     name="pw.wgrad.tail"):
            mask = lane_mask(b, b.sub(count, whole), vl)
            idx = b.add(at, whole)
            s = b.fadd(masked_load(b, kf.out, idx, vty, mask), masked_load(b, tmp, idx, vty, mask),
                       flags=FAST)
            masked_store(b, s, kf.out, idx, mask)
    b.ret_void()

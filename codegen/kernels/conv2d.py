"""Direct-convolution kernels: conv2d, conv2d_input_grad, conv2d_weight_grad (NCHW / OIHW).

All three read the image operand through a zero-padded copy that each thread prepares in its scratch
region (`_Prep`). The copy makes every tap of every output pixel an in-bounds, unmasked read, so the
inner loops have no border cases; it costs O(input) per image against O(input * O * KH * KW) FMAs.
The copy also removes the strides from the inner loops:

- a horizontal stride sx is undone by splitting each padded row into sx phase rows (column
  q = q' * sx + phase is stored at [phase][q']), so the input pixels of sixteen consecutive output
  pixels are sixteen consecutive floats for every tap;
- the input gradient is a stride-1 convolution of the cotangent, dilated by the stride (zeros between
  the pixels) and padded by KH-1-ph / KW-1-pw, with the weights flipped and transposed; dilation and
  padding are both done by the copy, the flip and transpose by the weight strides.

conv2d and conv2d_input_grad share one register-blocked core (`_Core`): an item is one image and a
block of R output channels; a tile is R channels x PR output rows x PV vectors of output columns in
R*PR*PV vector accumulators (vectors run along the output row, which is contiguous in NCHW). The
input-channel loop stays a loop; the KH*KW taps are unrolled inside it. Each tap costs PR*PV vector
loads (shared between rows for stride 1), R broadcast weights and R*PR*PV FMAs.

conv2d_weight_grad is a reduction over the images and output pixels: an item is one input channel,
a block of R output channels and a group of taps, with R*taps vector accumulators fed by the
cotangent rows and the shifted rows of the padded input, reduced horizontally at the end.

Border tiles clamp their channel and row indices to the last valid one (they recompute and store the
same values into the same elements) instead of having code variants; the weight gradient, which
accumulates, adds zero for the clamped duplicates.
"""
from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from ..loops import I8, I64, PTR, fma, gep, i64, if_then, intrinsic, load, masked_load, \
    masked_store, splat, store, vload, vstore
from . import register
from .matmul import carry_loop, clamp_hi, dtype_info, hsum, kernel_function, static_mask, \
    thread_range, zero_vector

_ALIGN = 16  # elements; scratch regions start 64-byte aligned for f32 and f64


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil(a, b) * b


# ------------------------------------------------------------------------------------------------
# the padded copy
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prep:
    """Copy of one image src[C, SH, SW] into P[C][rows][sx][q] (zeros elsewhere), with source pixel
    (sr, sc) at padded row sr*dr + offr and padded column sc*dq + offq (column Q = q'*sx + phase is
    stored at [phase][q'])."""
    src_h: int
    src_w: int
    rows: int
    q: int
    sx: int
    dr: int
    dq: int
    offr: int
    offq: int

    @property
    def row_pitch(self) -> int:
        return self.sx * self.q

    @property
    def chan_pitch(self) -> int:
        return self.rows * self.row_pitch

    def _span(self, n_src: int, d: int, off: int, limit: int):
        """Source indices s in [lo, hi) with 0 <= s*d + off < limit."""
        lo = max(0, _ceil(-off, d))
        hi = min(n_src, _ceil(limit - off, d))
        return lo, max(lo, hi)

    def emit(self, b, ety, src, dst, nchan):
        """Fill dst[0:nchan] from src[0:nchan] (pointers at the first channel; nchan an i64)."""
        es = _esize(ety)
        memset = intrinsic(b.module, "llvm.memset.p0.i64", ir.VoidType(),
                           [PTR, I8, I64, ir.IntType(1)])
        b.call(memset, [dst, ir.Constant(I8, 0), b.mul(nchan, i64(self.chan_pitch * es)),
                        ir.Constant(ir.IntType(1), 0)])
        r_lo, r_hi = self._span(self.src_h, self.dr, self.offr, self.rows)
        c_lo, c_hi = self._span(self.src_w, self.dq, self.offq, self.sx * self.q)
        if r_lo >= r_hi or c_lo >= c_hi:
            return
        with carry_loop(b, 0, nchan, [], "prep.c", unroll=False) as lc:
            s_c = gep(b, src, b.mul(lc.iv, i64(self.src_h * self.src_w)), ety)
            d_c = gep(b, dst, b.mul(lc.iv, i64(self.chan_pitch)), ety)
            with carry_loop(b, r_lo, r_hi, [], "prep.row", unroll=False) as lr:
                s_r = gep(b, s_c, b.mul(lr.iv, i64(self.src_w)), ety)
                r = b.add(b.mul(lr.iv, i64(self.dr)), i64(self.offr))
                d_r = gep(b, d_c, b.mul(r, i64(self.row_pitch)), ety)
                if self.sx == 1 and self.dq == 1:
                    # a contiguous run: LLVM turns this loop into a memcpy or vector copies
                    d_r = gep(b, d_r, i64(self.offq), ety)
                    with carry_loop(b, c_lo, c_hi, [], "prep.col") as lq:
                        store(b, load(b, s_r, lq.iv, ety), d_r, lq.iv, ety)
                else:
                    with carry_loop(b, c_lo, c_hi, [], "prep.col") as lq:
                        col = b.add(b.mul(lq.iv, i64(self.dq)), i64(self.offq))
                        at = b.add(b.mul(b.urem(col, i64(self.sx)), i64(self.q)),
                                   b.udiv(col, i64(self.sx)))
                        store(b, load(b, s_r, lq.iv, ety), d_r, at, ety)


def _esize(ety) -> int:
    return 8 if ety == ir.DoubleType() else 4


# ------------------------------------------------------------------------------------------------
# the direct-convolution core (conv2d, conv2d_input_grad)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Core:
    """out[n, o, y, x] = sum_{c, i, j} W(o, c, i, j) * P_n[c][y*sy + i][phase j%sx][x + j//sx]
    with W(o, c, i, j) = w[w_off + o*ws_o + c*ws_c + i*ws_i + j*ws_j]."""
    n: int
    ci: int
    co: int
    oy: int
    ox: int
    kh: int
    kw: int
    sy: int
    sx: int
    w_off: int
    ws_o: int
    ws_c: int
    ws_i: int
    ws_j: int
    prep: _Prep
    src_image: int   # elements of one source image
    vl: int
    r: int = 0       # register block, chosen by `blocked`
    pr: int = 0
    pv: int = 0
    yc: int = 1      # row chunks per item (parallelism for small batches)

    def blocked(self) -> "_Core":
        vl = self.vl
        nvec = _ceil(self.ox, vl)
        if nvec <= 4:
            pvs = [nvec]
        else:
            pvs = [min((4, 3, 2), key=lambda pv: (_ceil(nvec, pv) * pv, -pv))]
        best = None
        for pv in pvs:
            for r in range(1, min(self.co, 16) + 1):
                for pr in range(1, min(self.oy, 8) + 1):
                    acc = r * pr * pv
                    if acc > 28:
                        continue
                    if acc + r + pv > 31:   # accumulators, broadcast weights, one input row
                        continue
                    taps = self.kh * self.kw
                    loads = r * taps + pr * taps * pv
                    fmas = acc * taps
                    cycles = max(fmas, loads) * max(1.0, 12.0 / acc)
                    work = _ceil(self.co, r) * _ceil(self.oy, pr) * _ceil(nvec, pv)
                    cost = (cycles * work, -acc)
                    if best is None or cost < best[0]:
                        best = (cost, r, pr, pv)
        _, r, pr, pv = best
        items = self.n * _ceil(self.co, r)
        yc = 1
        if items < 8:
            yc = max(1, min(_ceil(8, items), _ceil(self.oy, pr)))
        return _replace(self, r=r, pr=pr, pv=pv, yc=yc)

    @property
    def scratch_elems(self) -> int:
        """Per thread: the padded copy of one image plus slack for the over-reading last vector."""
        slack = self.pv * self.vl + self.kw + self.vl
        return _round_up(self.ci * self.prep.chan_pitch + slack, _ALIGN)

    def emit(self, b, kf, ety, src_arg, w_arg):
        vl, r_, pr_, pv_ = self.vl, self.r, self.pr, self.pv
        vty = ir.VectorType(ety, vl)
        ob_count = _ceil(self.co, r_)
        rows_per_chunk = pr_ * _ceil(_ceil(self.oy, pr_), self.yc)
        yc = _ceil(self.oy, rows_per_chunk)
        total = self.n * ob_count * yc
        nvec = _ceil(self.ox, vl)
        single = nvec == pv_
        xblocks = 1 if single else _ceil(nvec, pv_)
        masks = [None] * pv_
        if single and self.ox % vl:
            masks[-1] = static_mask(vl, self.ox % vl)
        pbuf = gep(b, kf.scratch, b.mul(kf.tid, i64(self.scratch_elems)), ety, name="conv.padded")
        t0, t1 = thread_range(b, total, kf.tid, kf.nthreads)
        plane = self.oy * self.ox
        with carry_loop(b, t0, t1, [i64(-1)], "conv.item", unroll=False) as item:
            t = item.iv
            n = b.udiv(t, i64(ob_count * yc), name="conv.n")
            rest = b.urem(t, i64(ob_count * yc))
            o0 = b.mul(b.udiv(rest, i64(yc)), i64(r_), name="conv.o0")
            y_begin = b.mul(b.urem(rest, i64(yc)), i64(rows_per_chunk), name="conv.y0")
            y_end = clamp_hi(b, b.add(y_begin, i64(rows_per_chunk)), self.oy)
            with if_then(b, b.icmp_signed("!=", n, item.vals[0]), name="conv.prep"):
                self.prep.emit(b, ety, gep(b, src_arg, b.mul(n, i64(self.src_image)), ety), pbuf,
                               i64(self.ci))
            item.next = [n]
            chans = [clamp_hi(b, b.add(o0, i64(r)), self.co - 1) for r in range(r_)]
            wrow = [gep(b, w_arg, b.add(b.mul(o, i64(self.ws_o)), i64(self.w_off)), ety)
                    for o in chans]
            out_n = gep(b, kf.out, b.mul(n, i64(self.co * plane)), ety)
            with carry_loop(b, y_begin, y_end, [], "conv.y", step=pr_, unroll=False) as ly:
                ys = [clamp_hi(b, b.add(ly.iv, i64(p)), self.oy - 1) for p in range(pr_)]
                xloop = None
                if xblocks > 1:
                    xloop = carry_loop(b, 0, xblocks, [], "conv.x", unroll=False)
                    lx = xloop.__enter__()
                    x0 = clamp_hi(b, b.mul(lx.iv, i64(pv_ * vl)), self.ox - pv_ * vl)
                else:
                    x0 = i64(0)
                # Opaque row offsets: otherwise GVN merges the loads that rows share (row y+1, tap
                # i == row y, tap i+1) and the merged vectors stay live across all taps, which
                # spills most accumulators. Reloading from L1 is cheaper.
                xrow = [opaque(b, b.add(b.mul(y, i64(self.sy * self.prep.row_pitch)), x0))
                        for y in ys]
                zero = zero_vector(ety, vl)
                with carry_loop(b, 0, self.ci, [zero] * (r_ * pr_ * pv_), "conv.c",
                                unroll=False) as lc:
                    pc = gep(b, pbuf, b.mul(lc.iv, i64(self.prep.chan_pitch)), ety)
                    wc = b.mul(lc.iv, i64(self.ws_c))
                    acc = list(lc.vals)
                    for i in range(self.kh):
                        for j in range(self.kw):
                            off = i * self.prep.row_pitch + (j % self.sx) * self.prep.q + j // self.sx
                            xv = [[vload(b, pc, b.add(xrow[p], i64(off + v * vl)), vty)
                                   for v in range(pv_)] for p in range(pr_)]
                            woff = b.add(wc, i64(i * self.ws_i + j * self.ws_j))
                            for r in range(r_):
                                wv = splat(b, load(b, wrow[r], woff, ety), vl)
                                for p in range(pr_):
                                    for v in range(pv_):
                                        k = (r * pr_ + p) * pv_ + v
                                        acc[k] = fma(b, wv, xv[p][v], acc[k])
                    lc.next = acc
                for r in range(r_):
                    o_plane = b.mul(chans[r], i64(plane))
                    for p in range(pr_):
                        base = b.add(b.add(o_plane, b.mul(ys[p], i64(self.ox))), x0)
                        for v in range(pv_):
                            val = lc.out[(r * pr_ + p) * pv_ + v]
                            idx = b.add(base, i64(v * vl))
                            if masks[v] is not None:
                                masked_store(b, val, out_n, idx, masks[v])
                            else:
                                vstore(b, val, out_n, idx)
                if xloop is not None:
                    xloop.__exit__(None, None, None)


def opaque(b: ir.IRBuilder, v):
    """`v`, hidden from LLVM's value analysis (an empty inline asm)."""
    return b.asm(ir.FunctionType(I64, [I64]), "", "=r,0", [v], False, name="opaque")


def _replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def _conv_core(ins) -> _Core:
    x, w = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oy, ox = ins.out.shape[2:]
    _, vl, _ = dtype_info(ins.out.dtype)
    rows = (oy - 1) * sh + kh
    q = _ceil((ox - 1) * sw + kw, sw)
    prep = _Prep(h, wd, rows, q, sw, 1, 1, ph, pw)
    core = _Core(n, c, o, oy, ox, kh, kw, sh, sw, 0, c * kh * kw, kh * kw, kw, 1, prep,
                 c * h * wd, vl)
    return core.blocked()


def _input_grad_core(ins) -> _Core:
    ct, w = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    n, o, oh, ow = ct.shape
    _, c, kh, kw = w.shape
    h, wd = ins.params["in_hw"]
    _, vl, _ = dtype_info(ins.out.dtype)
    prep = _Prep(oh, ow, h - 1 + kh, wd - 1 + kw, 1, sh, sw, kh - 1 - ph, kw - 1 - pw)
    # out channel (of the core) = c, in channel = o, tap (i, j) reads w[o, c, kh-1-i, kw-1-j]
    core = _Core(n, o, c, h, wd, kh, kw, 1, 1, (kh - 1) * kw + kw - 1, kh * kw, c * kh * kw, -kw,
                 -1, prep, o * oh * ow, vl)
    return core.blocked()


def _register_core(prim: str, make):
    """Register the lowering of a primitive computed by the shared core; `make(ins) -> _Core`."""
    def scratch_bytes(ins, nthreads):
        return nthreads * make(ins).scratch_elems * dtype_info(ins.out.dtype)[2]

    def lower(module: ir.Module, name: str, ins) -> None:
        kf = kernel_function(module, name, 2)
        make(ins).emit(kf.b, kf, dtype_info(ins.out.dtype)[0], kf.ins[0], kf.ins[1])
        kf.b.ret_void()

    register(prim, scratch_bytes=scratch_bytes)(lower)


_register_core("conv2d", _conv_core)
_register_core("conv2d_input_grad", _input_grad_core)


# ------------------------------------------------------------------------------------------------
# conv2d_weight_grad
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _WGrad:
    n: int
    c: int
    o: int
    oy: int
    ox: int
    kh: int
    kw: int
    sy: int
    sx: int
    prep: _Prep
    vl: int
    r: int
    taps_per_item: int
    ng: int   # images per prepared chunk

    @property
    def scratch_elems(self) -> int:
        slack = 4 * self.vl + self.kw + self.vl
        return _round_up(self.ng * self.prep.chan_pitch + slack, _ALIGN)


def _wgrad_plan(ins) -> _WGrad:
    ct, x = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    kh, kw = ins.params["kernel"]
    n, o, oy, ox = ct.shape
    _, c, h, wd = x.shape
    _, vl, es = dtype_info(ins.out.dtype)
    rows = (oy - 1) * sh + kh
    q = _ceil((ox - 1) * sw + kw, sw)
    prep = _Prep(h, wd, rows, q, sw, 1, 1, ph, pw)
    taps = kh * kw
    best = None
    for r in range(1, min(o, 8) + 1):
        for group in range(1, taps + 1):
            if r * group > 26:
                continue
            acc = r * group
            loads = r + group
            cycles = max(acc, loads) * max(1.0, 12.0 / acc)
            work = _ceil(o, r) * _ceil(taps, group)
            cost = (cycles * work, -acc)
            if best is None or cost < best[0]:
                best = (cost, r, group)
    _, r, group = best
    ng = max(1, min(n, (160 * 1024) // max(1, prep.chan_pitch * es)))
    return _WGrad(n, c, o, oy, ox, kh, kw, sh, sw, prep, vl, r, group, ng)


def _wgrad_scratch(ins, nthreads):
    p = _wgrad_plan(ins)
    return nthreads * p.scratch_elems * dtype_info(ins.out.dtype)[2]


@register("conv2d_weight_grad", scratch_bytes=_wgrad_scratch)
def _conv2d_weight_grad_lower(module: ir.Module, name: str, ins) -> None:
    p = _wgrad_plan(ins)
    ety = dtype_info(ins.out.dtype)[0]
    kf = kernel_function(module, name, 2)
    b = kf.b
    ct_arg, x_arg = kf.ins
    vl, r_ = p.vl, p.r
    vty = ir.VectorType(ety, vl)
    taps = p.kh * p.kw
    groups = _ceil(taps, p.taps_per_item)
    ob_count = _ceil(p.o, r_)
    per_c = ob_count * groups
    total = p.c * per_c
    ksize = taps  # elements of one (o, c) kernel in out
    t0, t1 = thread_range(b, total, kf.tid, kf.nthreads)
    pbuf = gep(b, kf.scratch, b.mul(kf.tid, i64(p.scratch_elems)), ety, name="wgrad.padded")

    def decode(t):
        c = b.udiv(t, i64(per_c), name="wgrad.c")
        rest = b.urem(t, i64(per_c))
        o0 = b.mul(b.udiv(rest, i64(groups)), i64(r_), name="wgrad.o0")
        g = b.urem(rest, i64(groups), name="wgrad.group")
        return c, o0, g

    # zero this thread's part of out: the taps of its items' groups (other groups of the same
    # (o, c) may belong to another thread)
    with carry_loop(b, t0, t1, [], "wgrad.zero", unroll=False) as lz:
        c, o0, g = decode(lz.iv)
        for taps_g in _tap_groups(b, p, g, "wgrad.zero"):
            for r in range(r_):
                o = clamp_hi(b, b.add(o0, i64(r)), p.o - 1)
                base = b.mul(b.add(b.mul(o, i64(p.c)), c), i64(ksize))
                for k in taps_g:
                    store(b, ir.Constant(ety, 0.0), kf.out, b.add(base, i64(k)), ety)

    nvec = _ceil(p.ox, vl)
    tail = p.ox % vl
    chunks = _ceil(p.n, p.ng)
    img_ct = p.o * p.oy * p.ox
    img_x = p.c * p.prep.src_h * p.prep.src_w
    with carry_loop(b, 0, chunks, [], "wgrad.chunk", unroll=False) as lch:
        n0 = b.mul(lch.iv, i64(p.ng), name="wgrad.n0")
        nimg = b.sub(clamp_hi(b, b.add(n0, i64(p.ng)), p.n), n0, name="wgrad.nimg")
        with carry_loop(b, t0, t1, [i64(-1)], "wgrad.item", unroll=False) as item:
            c, o0, g = decode(item.iv)
            # (re)build the padded copy of channel c of this chunk's images
            with if_then(b, b.icmp_signed("!=", c, item.vals[0]), name="wgrad.prep"):
                with carry_loop(b, 0, nimg, [], "wgrad.prep.n", unroll=False) as lpn:
                    img = b.add(n0, lpn.iv)
                    src = gep(b, x_arg, b.add(b.mul(img, i64(img_x)),
                                              b.mul(c, i64(p.prep.src_h * p.prep.src_w))), ety)
                    dst = gep(b, pbuf, b.mul(lpn.iv, i64(p.prep.chan_pitch)), ety)
                    p.prep.emit(b, ety, src, dst, i64(1))
            item.next = [c]
            chans = [clamp_hi(b, b.add(o0, i64(r)), p.o - 1) for r in range(r_)]
            valid = [b.icmp_signed("<", b.add(o0, i64(r)), i64(p.o)) for r in range(r_)]
            for tap_ids in _tap_groups(b, p, g, "wgrad"):
                _wgrad_tile(b, p, kf, ety, vty, tap_ids, chans, valid, c, n0, nimg, pbuf, ct_arg,
                            img_ct, nvec, tail)
    b.ret_void()


def _tap_groups(b, p: _WGrad, g, name: str):
    """For each tap group gi: yields its taps, with the builder inside `if g == gi`."""
    taps = p.kh * p.kw
    for gi in range(_ceil(taps, p.taps_per_item)):
        with if_then(b, b.icmp_signed("==", g, i64(gi)), name=f"{name}.g{gi}"):
            yield list(range(gi * p.taps_per_item, min(taps, (gi + 1) * p.taps_per_item)))


def _wgrad_tile(b, p, kf, ety, vty, tap_ids, chans, valid, c, n0, nimg, pbuf, ct_arg, img_ct,
                nvec, tail):
    vl, r_ = p.vl, p.r
    plane = p.oy * p.ox
    zero = zero_vector(ety, vl)
    nt = len(tap_ids)
    ct_rows = [b.mul(o, i64(plane)) for o in chans]
    with carry_loop(b, 0, nimg, [zero] * (r_ * nt), "wgrad.n", unroll=False) as ln:
        ct_n = gep(b, ct_arg, b.mul(b.add(n0, ln.iv), i64(img_ct)), ety)
        p_n = gep(b, pbuf, b.mul(ln.iv, i64(p.prep.chan_pitch)), ety)
        with carry_loop(b, 0, p.oy, ln.vals, "wgrad.y", unroll=False) as ly:
            ct_y = [b.add(row, b.mul(ly.iv, i64(p.ox))) for row in ct_rows]
            x_y = b.mul(ly.iv, i64(p.sy * p.prep.row_pitch))

            def step(acc, x0, mask):
                cv = [masked_load(b, ct_n, b.add(ct_y[r], x0), vty, mask) if mask is not None
                      else vload(b, ct_n, b.add(ct_y[r], x0), vty) for r in range(r_)]
                acc = list(acc)
                for ti, tap in enumerate(tap_ids):
                    i, j = divmod(tap, p.kw)
                    off = i * p.prep.row_pitch + (j % p.sx) * p.prep.q + j // p.sx
                    at = b.add(b.add(x_y, x0), i64(off))
                    xv = masked_load(b, p_n, at, vty, mask) if mask is not None \
                        else vload(b, p_n, at, vty)
                    for r in range(r_):
                        acc[r * nt + ti] = fma(b, cv[r], xv, acc[r * nt + ti])
                return acc

            acc = list(ly.vals)
            full = p.ox // vl
            if full <= 4:
                for v in range(full):
                    acc = step(acc, i64(v * vl), None)
            else:
                with carry_loop(b, 0, full * vl, acc, "wgrad.x", step=vl, unroll=False) as lx:
                    lx.next = step(lx.vals, lx.iv, None)
                acc = list(lx.out)
            if tail:
                acc = step(acc, i64(full * vl), static_mask(vl, tail))
            ly.next = acc
        ln.next = ly.out
    ksize = p.kh * p.kw
    for r in range(r_):
        base = b.mul(b.add(b.mul(chans[r], i64(p.c)), c), i64(ksize))
        for ti, tap in enumerate(tap_ids):
            s = hsum(b, ln.out[r * nt + ti])
            s = b.select(valid[r], s, ir.Constant(ety, 0.0))
            at = b.add(base, i64(tap))
            store(b, b.fadd(load(b, kf.out, at, ety), s), kf.out, at, ety)

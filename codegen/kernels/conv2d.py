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

FORCE = {}  # overrides of the blocking decisions, for experiments

_ALIGN = 16  # elements; scratch regions start 64-byte aligned for f32 and f64


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil(a, b) * b


def _pitch(q: int) -> int:
    """Padded row length: rows of a vector or more start 64-byte aligned (FORCE "align")."""
    align = FORCE.get("align", 1)
    return _round_up(q, align) if q >= 16 else q


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

    def data_rows(self):
        """First and last padded row that holds source data (the others are all zero)."""
        lo, hi = self._span(self.src_h, self.dr, self.offr, self.rows)
        return lo * self.dr + self.offr, (hi - 1) * self.dr + self.offr

    def emit(self, b, ety, vl, src, dst, nchan):
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
                    # a contiguous run: explicit vector copies (smaller code than LLVM's
                    # vectorized loop with its epilogue and run-time checks)
                    d_r = gep(b, d_r, i64(self.offq + c_lo), ety)
                    s_r = gep(b, s_r, i64(c_lo), ety)
                    run = c_hi - c_lo
                    vty = ir.VectorType(ety, vl)
                    if run >= vl:
                        with carry_loop(b, 0, run - run % vl, [], "prep.col", step=vl,
                                        unroll=False) as lq:
                            vstore(b, vload(b, s_r, lq.iv, vty), d_r, lq.iv)
                    if run % vl:
                        mask = static_mask(vl, run % vl)
                        at = i64(run - run % vl)
                        masked_store(b, masked_load(b, s_r, at, vty, mask), d_r, at, mask)
                else:
                    with carry_loop(b, c_lo, c_hi, [], "prep.col", unroll=False) as lq:
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
    kh_loop: bool = False  # kernel rows as a loop (big kernels: keeps the body small)

    def blocked(self) -> "_Core":
        vl = self.vl
        nvec = _ceil(self.ox, vl)
        if nvec <= 4:
            pvs = [nvec]
        else:
            pvs = [min((4, 3, 2), key=lambda pv: (_ceil(nvec, pv) * pv, -pv))]
        best = None
        taps = self.kh * self.kw
        for pv in pvs:
            for r in range(1, min(self.co, 16) + 1):
                for pr in range(1, min(self.oy, 8) + 1):
                    acc = r * pr * pv
                    if acc + r + pv > 31:   # accumulators, broadcast weights, one input row
                        continue
                    # per tap: acc FMAs, r broadcasts and pr*pv unaligned vector loads (most
                    # split a cache line: two L1 accesses); two FMAs and two loads per cycle
                    cycles = max(acc, r + 2 * pr * pv) * max(1.0, 10.0 / acc)
                    work = _ceil(self.co, r) * _ceil(self.oy, pr) * _ceil(nvec, pv)
                    # ties: fewer weight pointers (general registers)
                    cost = (cycles * work * taps, r)
                    if best is None or cost < best[0]:
                        best = (cost, r, pr, pv)
        _, r, pr, pv = best
        if "core" in FORCE:
            r, pr, pv = FORCE["core"]
        items = self.n * _ceil(self.co, r)
        yc = 1
        if items < 8:
            yc = max(1, min(_ceil(8, items), _ceil(self.oy, pr)))
        kh_loop = FORCE.get("kh_loop", self.kh > 1 and r * pr * pv * self.kh * self.kw > 64)
        return _replace(self, r=r, pr=pr, pv=pv, yc=yc, kh_loop=kh_loop)

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
                self.prep.emit(b, ety, vl, gep(b, src_arg, b.mul(n, i64(self.src_image)), ety), pbuf,
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
                if self.kh_loop:   # skip kernel rows that see only padding rows of P
                    first, last = self.prep.data_rows()
                    i_lo = _smax(b, b.sub(i64(first), b.mul(ys[-1], i64(self.sy))), 0)
                    i_hi = _smin(b, b.sub(i64(last + 1), b.mul(ys[0], i64(self.sy))), self.kh)
                zero = zero_vector(ety, vl)
                with carry_loop(b, 0, self.ci, [zero] * (r_ * pr_ * pv_), "conv.c",
                                unroll=False) as lc:
                    # opaque: keeps the ~100 addresses of the body out of loop strength
                    # reduction, which is slow on them (x86 addressing modes do the work anyway)
                    pc = gep(b, pbuf, opaque(b, b.mul(lc.iv, i64(self.prep.chan_pitch))), ety)
                    wc = opaque(b, b.mul(lc.iv, i64(self.ws_c)))
                    if self.kh_loop:
                        with carry_loop(b, i_lo, i_hi, lc.vals, "conv.kh", unroll=False) as li:
                            pi = gep(b, pc, opaque(b, b.mul(li.iv, i64(self.prep.row_pitch))), ety)
                            wi = b.add(wc, b.mul(li.iv, i64(self.ws_i)))
                            li.next = self._taps(b, ety, li.vals, pi, wi, xrow, wrow, [0])
                        lc.next = li.out
                    else:
                        lc.next = self._taps(b, ety, lc.vals, pc, wc, xrow, wrow,
                                             range(self.kh))
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

    def _taps(self, b, ety, acc, pc, wc, xrow, wrow, kernel_rows):
        """FMAs of the taps of `kernel_rows` (all columns) into the R*PR*PV accumulators; pc / wc
        locate the input channel (and kernel row, in the kh loop) in P and in the weights."""
        vl, r_, pr_, pv_ = self.vl, self.r, self.pr, self.pv
        vty = ir.VectorType(ety, vl)
        acc = list(acc)
        for i in kernel_rows:
            for j in range(self.kw):
                off = i * self.prep.row_pitch + (j % self.sx) * self.prep.q + j // self.sx
                xv = [[vload(b, pc, b.add(xrow[p], i64(off + v * vl)), vty) for v in range(pv_)]
                      for p in range(pr_)]
                woff = b.add(wc, i64(i * self.ws_i + j * self.ws_j))
                for r in range(r_):
                    wv = splat(b, load(b, wrow[r], woff, ety), vl)
                    for p in range(pr_):
                        for v in range(pv_):
                            k = (r * pr_ + p) * pv_ + v
                            acc[k] = fma(b, wv, xv[p][v], acc[k])
        return acc


def _smax(b, v, k: int):
    return b.select(b.icmp_signed(">", v, i64(k)), v, i64(k))


def _smin(b, v, k: int):
    return b.select(b.icmp_signed("<", v, i64(k)), v, i64(k))


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
    q = _pitch(_ceil((ox - 1) * sw + kw, sw))
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
    prep = _Prep(oh, ow, h - 1 + kh, _pitch(wd - 1 + kw), 1, sh, sw, kh - 1 - ph, kw - 1 - pw)
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
    """dw[o, c, i, j] = sum_{n, y, x} ct[n, o, y, x] * P_n[c][y*sy + i][phase j%sx][x + j//sx].

    Images are processed in chunks of `ng` whose cotangents fit in L2; within a chunk an item is
    (input channel c, block of R output channels, group of GR kernel rows) with R*GR*KW vector
    accumulators, reduced horizontally and added to out at the end of the chunk. Items are
    numbered by blocks of CB input channels, then output channel block: the padded copies of a
    channel block (of the chunk's images) are made when the item loop reaches it, so a thread
    copies only its own channels, and a block of cotangent rows is reused from L1 by CB channels."""
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
    gr: int   # kernel rows per item
    ng: int   # images per chunk
    cb: int   # input channels per channel block

    @property
    def cblocks(self) -> int:
        return _ceil(self.c, self.cb)

    @property
    def groups(self) -> int:
        return _ceil(self.kh, self.gr)

    @property
    def per_cb(self) -> int:
        """Items per channel block."""
        return _ceil(self.o, self.r) * self.cb * self.groups

    @property
    def slack(self) -> int:
        """Over-read past the last channel: rows of clamped-out taps, the last vector."""
        return self.gr * self.prep.row_pitch + 2 * self.vl + self.kw

    @property
    def spill_elems(self) -> int:
        return _round_up(self.r * self.gr * self.kw * self.vl, _ALIGN)

    @property
    def scratch_elems(self) -> int:
        return self.spill_elems + _round_up(self.cb * self.ng * self.prep.chan_pitch + self.slack,
                                            _ALIGN)


def _wgrad_plan(ins) -> _WGrad:
    ct, x = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    kh, kw = ins.params["kernel"]
    n, o, oy, ox = ct.shape
    _, c, h, wd = x.shape
    _, vl, es = dtype_info(ins.out.dtype)
    prep = _Prep(h, wd, (oy - 1) * sh + kh, _pitch(_ceil((ox - 1) * sw + kw, sw)), sw, 1, 1, ph,
                 pw)
    best = None
    for r in range(1, min(o, 24) + 1):
        for gr in range(1, kh + 1):
            acc = r * gr * kw
            if acc + min(r, gr * kw) > 29 and (r, gr) != (1, 1):
                continue
            loads = r + gr * kw
            cycles = max(acc, loads) * max(1.0, 12.0 / acc)
            work = _ceil(o, r) * _ceil(kh, gr)
            cost = (cycles * work, -acc)
            if best is None or cost < best[0]:
                best = (cost, r, gr)
    _, r, gr = best
    if "wgrad" in FORCE:
        r, gr = FORCE["wgrad"]
    # a chunk's cotangents stay in L2 while all input channels go by
    ng = max(1, min(n, (512 * 1024) // ((prep.chan_pitch + o * oy * ox) * es)))
    ng = FORCE.get("ng", ng)
    cb = _ceil(c, _ceil(c, FORCE.get("cb", 8)))
    return _WGrad(n, c, o, oy, ox, kh, kw, sh, sw, prep, vl, r, gr, ng, cb)


def _wgrad_scratch(ins, nthreads):
    return nthreads * _wgrad_plan(ins).scratch_elems * dtype_info(ins.out.dtype)[2]


@register("conv2d_weight_grad", scratch_bytes=_wgrad_scratch)
def _conv2d_weight_grad_lower(module: ir.Module, name: str, ins) -> None:
    p = _wgrad_plan(ins)
    ety, vl, _ = dtype_info(ins.out.dtype)
    kf = kernel_function(module, name, 2)
    b = kf.b
    ct_arg, x_arg = kf.ins
    vty = ir.VectorType(ety, vl)
    t0, t1 = thread_range(b, p.cblocks * p.per_cb, kf.tid, kf.nthreads)
    # the accumulators go through `spill` on their way to out (a small reduction loop instead of
    # unrolled horizontal sums), then come the padded copies of the chunk's images, for the
    # channels of one channel block
    spill = gep(b, kf.scratch, b.mul(kf.tid, i64(p.scratch_elems)), ety, name="wgrad.acc")
    pbuf = gep(b, spill, i64(p.spill_elems), ety, name="wgrad.padded")
    pitch = p.prep.chan_pitch
    _memset0(b, gep(b, pbuf, i64(p.cb * p.ng * pitch), ety), p.slack * _esize(ety))
    with carry_loop(b, t0, t1, [], "wgrad.zero", unroll=False) as lz:
        _wgrad_item_reduce(b, p, kf, ety, lz.iv, spill, zero=True)
    with carry_loop(b, 0, _ceil(p.n, p.ng), [], "wgrad.chunk", unroll=False) as lch:
        n0 = b.mul(lch.iv, i64(p.ng), name="wgrad.n0")
        nimg = b.sub(clamp_hi(b, b.add(n0, i64(p.ng)), p.n), n0, name="wgrad.nimg")
        with carry_loop(b, t0, t1, [i64(-1)], "wgrad.item", unroll=False) as item:
            cblock, o0, c_in, _, g = _wgrad_decode(b, p, item.iv)
            with if_then(b, b.icmp_signed("!=", cblock, item.vals[0]), name="wgrad.prep"):
                with carry_loop(b, 0, p.cb * p.ng, [], "wgrad.prep.cn", unroll=False) as lpn:
                    # (channel, image) pairs of the block; the channels past C copy the last one
                    c = clamp_hi(b, b.add(b.mul(cblock, i64(p.cb)), b.udiv(lpn.iv, i64(p.ng))),
                                 p.c - 1)
                    nn = b.urem(lpn.iv, i64(p.ng))
                    with if_then(b, b.icmp_signed("<", nn, nimg), name="wgrad.prep.img"):
                        src = gep(b, x_arg, b.mul(b.add(b.mul(b.add(n0, nn), i64(p.c)), c),
                                                  i64(p.prep.src_h * p.prep.src_w)), ety)
                        p.prep.emit(b, ety, vl, src, gep(b, pbuf, b.mul(lpn.iv, i64(pitch)), ety),
                                    i64(1))
            item.next = [cblock]
            p_c = gep(b, pbuf, b.add(b.mul(c_in, i64(p.ng * pitch)),
                                     b.mul(g, i64(p.gr * p.prep.row_pitch))), ety)
            chans = [clamp_hi(b, b.add(o0, i64(r)), p.o - 1) for r in range(p.r)]
            acc = _wgrad_tile(b, p, ety, vty, ct_arg, p_c, i64(pitch), n0, nimg, chans)
            for k, v in enumerate(acc):
                vstore(b, v, spill, i64(k * vl))
            _wgrad_item_reduce(b, p, kf, ety, item.iv, spill, zero=False)
    b.ret_void()


def _memset0(b, ptr, nbytes: int):
    memset = intrinsic(b.module, "llvm.memset.p0.i64", ir.VoidType(),
                       [PTR, I8, I64, ir.IntType(1)])
    b.call(memset, [ptr, ir.Constant(I8, 0), i64(nbytes), ir.Constant(ir.IntType(1), 0)])


def _wgrad_decode(b, p: _WGrad, t):
    """Item t -> (channel block, first output channel, channel in the block, input channel
    (clamped), kernel row group); items run channel block, output block, channel, row group."""
    cblock = b.udiv(t, i64(p.per_cb), name="wgrad.cblock")
    rest = b.urem(t, i64(p.per_cb))
    per_ob = p.cb * p.groups
    o0 = b.mul(b.udiv(rest, i64(per_ob)), i64(p.r), name="wgrad.o0")
    rest = b.urem(rest, i64(per_ob))
    c_in = b.udiv(rest, i64(p.groups), name="wgrad.c_in")
    c = b.add(b.mul(cblock, i64(p.cb)), c_in, name="wgrad.c")
    return cblock, o0, c_in, c, b.urem(rest, i64(p.groups), name="wgrad.g")


def _wgrad_item_reduce(b, p: _WGrad, kf, ety, t, spill, zero: bool):
    """out[o, c, i, j] of item t: set to 0 (zero=True) or += the horizontal sum of its
    accumulator in `spill`. Taps of clamped channels or kernel rows add nothing."""
    _, o0, _, c_raw, g = _wgrad_decode(b, p, t)
    c_ok = b.icmp_signed("<", c_raw, i64(p.c))
    c = clamp_hi(b, c_raw, p.c - 1)
    ntap = p.gr * p.kw
    vty = ir.VectorType(ety, p.vl)
    i0 = b.mul(g, i64(p.gr))
    rows_ok = [b.icmp_signed("<", b.add(i0, i64(di)), i64(p.kh)) for di in range(p.gr)]
    rows = [clamp_hi(b, b.add(i0, i64(di)), p.kh - 1) for di in range(p.gr)]
    with carry_loop(b, 0, p.r, [], "wgrad.reduce", unroll=False) as lr:
        o = b.add(o0, lr.iv)
        o_ok = b.and_(c_ok, b.icmp_signed("<", o, i64(p.o)))
        base = b.mul(b.add(b.mul(clamp_hi(b, o, p.o - 1), i64(p.c)), c), i64(p.kh))
        for di in range(p.gr):
            valid = b.and_(o_ok, rows_ok[di])
            row = b.mul(b.add(base, rows[di]), i64(p.kw))
            for j in range(p.kw):
                at = b.add(row, i64(j))
                if zero:
                    old = load(b, kf.out, at, ety)
                    store(b, b.select(valid, ir.Constant(ety, 0.0), old), kf.out, at, ety)
                else:
                    k = b.add(b.mul(lr.iv, i64(ntap)), i64(di * p.kw + j))
                    v = vload(b, spill, b.mul(k, i64(p.vl)), vty)
                    s = b.select(valid, hsum(b, v), ir.Constant(ety, 0.0))
                    store(b, b.fadd(load(b, kf.out, at, ety), s), kf.out, at, ety)


def _wgrad_tile(b, p: _WGrad, ety, vty, ct_arg, p_c, img_pitch, n0, nimg, chans):
    """The R x GR x KW vector accumulators of one item over the images of the chunk."""
    vl = p.vl
    plane = p.oy * p.ox
    ntap = p.gr * p.kw
    zero = zero_vector(ety, vl)
    ct_rows = [b.mul(o, i64(plane)) for o in chans]
    with carry_loop(b, 0, nimg, [zero] * (p.r * ntap), "wgrad.n", unroll=False) as ln:
        ct_n = gep(b, ct_arg, b.mul(b.add(n0, ln.iv), i64(p.o * plane)), ety)
        p_n = gep(b, p_c, b.mul(ln.iv, img_pitch), ety)
        with carry_loop(b, 0, p.oy, ln.vals, "wgrad.y", unroll=False) as ly:
            # opaque offsets keep the many addresses out of loop strength reduction (compile time)
            ct_y = [opaque(b, b.add(row, b.mul(ly.iv, i64(p.ox)))) for row in ct_rows]
            x_y = opaque(b, b.mul(ly.iv, i64(p.sy * p.prep.row_pitch)))

            def step(acc, x0, mask):
                def ld(ptr, at):
                    return masked_load(b, ptr, at, vty, mask) if mask is not None \
                        else vload(b, ptr, at, vty)
                def x_at(t):
                    i, j = divmod(t, p.kw)
                    off = i * p.prep.row_pitch + (j % p.sx) * p.prep.q + j // p.sx
                    return ld(p_n, b.add(b.add(x_y, x0), i64(off)))

                acc = list(acc)
                # keep the smaller operand set in registers, stream the other (register pressure:
                # accumulators + min(R, taps) + 1)
                if ntap <= p.r:
                    xv = [x_at(t) for t in range(ntap)]
                    for r in range(p.r):
                        cv = ld(ct_n, b.add(ct_y[r], x0))
                        for t in range(ntap):
                            acc[r * ntap + t] = fma(b, cv, xv[t], acc[r * ntap + t])
                else:
                    cv = [ld(ct_n, b.add(row, x0)) for row in ct_y]
                    for t in range(ntap):
                        xv = x_at(t)
                        for r in range(p.r):
                            acc[r * ntap + t] = fma(b, cv[r], xv, acc[r * ntap + t])
                return acc

            acc = list(ly.vals)
            full = p.ox // vl
            if full <= 2:
                for v in range(full):
                    acc = step(acc, i64(v * vl), None)
            else:
                with carry_loop(b, 0, full * vl, acc, "wgrad.x", step=vl, unroll=False) as lx:
                    lx.next = step(lx.vals, lx.iv, None)
                acc = list(lx.out)
            if p.ox % vl:
                acc = step(acc, i64(full * vl), static_mask(vl, p.ox % vl))
            ly.next = acc
        ln.next = ly.out
    return ln.out

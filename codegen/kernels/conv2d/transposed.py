"""The stride-1 input gradient as a transposed convolution (`Transposed`): each row of the
cotangent times each weight tap, added at the tap's column offset, so that no multiply-add sees
the padding of the core's full convolution.

The core (direct.py) computes dx as the convolution of the cotangent padded by KH-1 / KW-1 with
the flipped weights: an output pixel near the border reads mostly padding, and a vector of output
pixels cannot skip a tap that some of its lanes need. With LeNet-5's second convolution (8 x 8
cotangents, 5 x 5 taps, 12 x 12 gradients) only 4/9 of those multiply-adds see a cotangent; the
kernel-row skipping of the core recovers the rows, not the columns (21.7 GF/s of a 40 GF/s peak
on one znver1 core, at the peak per multiply-add).

Here the vectors run along the cotangent's rows instead, and the column offset of a tap is applied
after the sums: for an item (image n, input channel c) and a tile of PR output rows Y and one vector
of cotangent columns x0 .. x0+vl-1,

    A[p][j] = sum_{o, i} w[o, c, i, j] * ct[n, o, Y_p + ph - i, x0 : x0 + vl]

(PR*KW vector accumulators; each (o, i) step costs PR vector loads, KW broadcast weights and
PR*KW FMAs), and full-convolution column x0 + l + j of row Y_p gets A[p][j][l]: the KW shifted
accumulators are summed by shuffles into two vectors, columns x0 .. x0+vl-1 (stored) and the
KW-1 columns after them (carried into the next vector's sum, so needs KW - 1 <= vl). Only the lanes past the
cotangent's width (and the kernel rows of a tile's other rows) are wasted. The rows are read
from a zero-padded copy of the image's cotangent (`layout.Prep`: KH-1 zero rows above and below,
rows of whole vectors), so that kernel rows outside the cotangent read zeros; the kernel-row loop
covers only the rows that see some cotangent row for one of the tile's rows. The summed rows go
to a per-thread row buffer, whose columns pw .. pw+W-1 of the full convolution are the gradient's row
(padding: ph <= KH-1, pw <= KW-1). Cotangent rows of one vector without column padding (`direct`:
LeNet-5's 8 columns) skip the buffer: the row is the summed vector and its carry, stored from the
registers (Zen 3, one thread, LeNet-5's [64, 6, 12, 12]: 255 -> 242 us). An item is one whole
gradient plane (of each image of its tile), then the epilogue.

The PR accumulator rows of a tile may be rows of ni images instead of PR rows of one
(`images_per_tile`): the rows of one image near its top and bottom see different kernel rows,
and a tile runs over all that any of its rows sees, so LeNet-5's tiles of two rows ran 44
(row, kernel row) pairs per image where 40 see a cotangent row; one row of two images runs
exactly those (both share the weights' broadcasts; a row of each image is one load). The
images' padded copies lie side by side in the thread region. Zen 3, one thread, the kernel
alone: 262 -> 238 us.
"""
from __future__ import annotations

from dataclasses import replace

import llvmlite.ir as ir

from ... import record
from ...loops import I64, carry_loop, fma, gep, i64, if_then, load, masked_store, splat, store, \
    vload, vstore
from ...target import vector_registers
from ..toolkit import I64Arg, Params, ceil_div, dtype_info, kernel_function, lane_mask, opaque, \
    params, round_up, shared_function, smax, smin, thread_range, zero_vector
from .layout import ALIGN, FORCE, Prep, PrepParams, pad, pad_key


# An epilogue runs on groups of gradient planes of about this many bytes (half an L1), where
# the planes are still in cache. Plane by plane it cost a call and its set-up per plane.
EPILOGUE_BYTES = 16 << 10
# The padded copies of a tile's images (`images_per_tile`) within this many bytes: half an L1,
# the other half for the weights and the gradient rows.
COPY_BYTES = 16 << 10
# Tiles over several images when they cost less than this fraction of one image's tiles.
_IMAGES_GAIN = 0.97


def tile_rows(kw: int) -> int:
    """Output rows per tile: PR*KW accumulators, PR cotangent vectors and a broadcast weight in
    the vector registers."""
    regs = 32 if vector_registers() >= 32 else 16
    return max(1, (regs - 1) // (kw + 1))


def applies(sh, sw, kh, kw, ph, pw, vl) -> bool:
    """Stride 1, padding within the kernel (the copy's KH-1 zero rows cover every row read),
    and the KW - 1 columns past a vector held in one more vector."""
    return (sh, sw) == (1, 1) and ph <= kh - 1 and pw <= kw - 1 and kw - 1 <= vl


@record(frozen=True)
class Transposed:
    dtype: str
    n: int
    o: int     # cotangent channels
    c: int     # gradient channels
    h: int     # gradient rows and columns
    w: int
    oh: int    # cotangent rows and columns
    ow: int
    kh: int
    kw: int
    ph: int
    pw: int
    vl: int
    pr: int    # accumulator rows of a tile: ni images x pr / ni gradient rows
    ni: int = 1

    @property
    def ry(self) -> int:
        """Gradient rows of a tile (of each of its ni images)."""
        return self.pr // self.ni

    @property
    def nv(self) -> int:
        return ceil_div(self.ow, self.vl)

    @property
    def prep(self) -> Prep:
        """The cotangent image with KH-1 zero rows above and below, rows of nv whole vectors."""
        return Prep(self.oh, self.ow, self.oh + 2 * (self.kh - 1), self.nv * self.vl, 1, 1, 1,
                    self.kh - 1, 0)

    @property
    def buf_pitch(self) -> int:
        """Row pitch of the row buffer: nv vectors, the spill vector of the last, and the
        over-read of the copy to the gradient's row (whole vectors from column pw)."""
        return round_up((self.nv + 2) * self.vl, ALIGN)

    @property
    def buf_offset(self) -> int:
        """The row buffer, after the state slot and the padded copy (and its last vector's
        spill)."""
        return ALIGN + round_up(self.ni * self.o * self.prep.chan_pitch + self.vl, ALIGN)

    @property
    def thread_elems(self) -> int:
        return self.buf_offset + self.pr * self.buf_pitch

    @property
    def groups(self) -> int:
        """Groups of ni images (the last one's missing images: copies of the batch's last)."""
        return ceil_div(self.n, self.ni)

    @property
    def items(self) -> int:
        return self.groups * self.c

    @property
    def direct(self) -> bool:
        """Cotangent rows of one vector without column padding (LeNet-5's second convolution):
        a gradient row is the summed vector and its carry, stored in place (no row buffer)."""
        return self.nv == 1 and self.pw == 0

    def tap_rows(self) -> int:
        """(Tile, kernel row) pairs the kernel-row loop runs over, in one item."""
        total = 0
        for y0 in range(0, self.h, self.ry):
            y1 = min(y0 + self.ry, self.h) - 1
            total += max(0, min(self.kh, y1 + self.ph + 1) - max(0, y0 + self.ph - self.oh + 1))
        return total

    def cost(self) -> float:
        """Half-cycles of one image, in the units of `core.Core.cost`."""
        from .core import tap_cycles
        return (tap_cycles(self.pr * self.kw, self.kw + 2 * self.pr) * self.c * self.o
                * self.nv * self.tap_rows() * self.groups / self.n)

    def lower(self, module, name, epilogue):
        kf = kernel_function(module, name, 2, epilogue)
        b = kf.b
        region = kf.scratch   # this thread's own
        store(b, i64(-1), region, i64(0), I64)   # no image in the padded copy yet
        key = _TKey(self.dtype, self.pr, self.kw, self.direct, self.ni)
        fn = shared_function(module, "conv_tgrad", key, 4, TParams, _tgrad_body)
        prep = self.prep
        shape = dict(n=self.n, c=self.c, o=self.o, h=self.h, w=self.w, oh=self.oh, kh=self.kh,
                     nv=self.nv, ph=self.ph, pw=self.pw, src_image=self.o * self.oh * self.ow,
                     buf_pitch=self.buf_pitch, buf_offset=self.buf_offset, prep=prep.params())
        ptrs = [kf.out, kf.ins[0], kf.ins[1], region]
        t0, t1 = thread_range(b, self.items, kf.tid, kf.nthreads)
        if epilogue is None:
            fn.call(b, ptrs, TParams(t0=t0, t1=t1, **shape))
        elif self.ni == 1:   # a group of whole planes, then the epilogue on them in cache
            plane = self.h * self.w
            group = self.epilogue_planes
            with carry_loop(b, t0, t1, [], "tgrad.epilogue", step=group) as lt:
                end = smin(b, b.add(lt.iv, i64(group)), t1)
                fn.call(b, ptrs, TParams(t0=lt.iv, t1=end, **shape))
                kf.epilogue_rows(b.mul(lt.iv, i64(plane)), b.mul(b.sub(end, lt.iv), i64(plane)))
        else:
            self._lower_image_groups(kf, fn, ptrs, shape, t0, t1)
        b.ret_void()

    def _lower_image_groups(self, kf, fn, ptrs, shape, t0, t1):
        """Items [t0, t1) with an epilogue when a tile spans ni images: the items of a group
        of images in runs of about epilogue_planes planes (the channels [c0, c1) of each image),
        then the epilogue on each image's run; a copy of the last image is not run twice."""
        b = kf.b
        plane, c, group = self.h * self.w, self.c, max(1, self.epilogue_planes // self.ni)
        with carry_loop(b, b.udiv(t0, i64(c)), b.udiv(b.add(t1, i64(c - 1)), i64(c)), [],
                        "tgrad.images") as lg:
            first = b.mul(lg.iv, i64(c))
            a, e = smax(b, t0, first), smin(b, t1, b.add(first, i64(c)))
            with carry_loop(b, a, e, [], "tgrad.epilogue", step=group) as lt:
                end = smin(b, b.add(lt.iv, i64(group)), e)
                fn.call(b, ptrs, TParams(t0=lt.iv, t1=end, **shape))
                count = b.mul(b.sub(end, lt.iv), i64(plane))
                for m in range(self.ni):
                    image = b.add(b.mul(lg.iv, i64(self.ni)), i64(m))
                    start = b.mul(b.add(b.mul(image, i64(c)), b.sub(lt.iv, first)), i64(plane))
                    if m == 0:
                        kf.epilogue_rows(start, count)
                        continue
                    with if_then(b, b.icmp_signed("<", image, i64(self.n)), name="tgrad.image"):
                        kf.epilogue_rows(start, count)

    @property
    def epilogue_planes(self) -> int:
        """Planes computed between two calls of the epilogue: EPILOGUE_BYTES of them."""
        esize = dtype_info(self.dtype)[2]
        return FORCE.get("tgrad_epi", max(1, EPILOGUE_BYTES // (self.h * self.w * esize)))


def transposed_input_grad(dtype, n, o, c, h, w, oh, ow, kh, kw, ph, pw,
                          min_items: int = 1) -> Transposed:
    """The plan; its tiles span ni images where that skips more kernel rows (`images_per_tile`)
    and leaves at least min_items items."""
    vl = dtype_info(dtype)[1]
    t = Transposed(dtype, n, o, c, h, w, oh, ow, kh, kw, ph, pw, vl, min(tile_rows(kw), h))
    return images_per_tile(t, min_items)


def images_per_tile(t: Transposed, min_items: int) -> Transposed:
    """t with tiles of ni images x PR / ni rows: the tile's rows share the kernel rows it runs
    over, and rows of one image see different ones near the top and bottom (LeNet-5's second
    convolution, 12 rows of 5 x 5 taps from 8: tiles of two rows run 22 (tile, kernel row)
    pairs, 10% more than the 40 / 2 that the rows of two images at once run). The images'
    copies stay within COPY_BYTES (in L1)."""
    esize = dtype_info(t.dtype)[2]
    best = t
    for ni in range(2, t.pr + 1):
        if t.pr % ni or ni > t.n:
            continue
        u = replace(t, ni=ni)
        if (u.items < min_items or ni * t.o * t.prep.chan_pitch * esize > COPY_BYTES
                or u.cost() >= _IMAGES_GAIN * best.cost()):
            continue
        best = u
    forced = FORCE.get("tgrad_ni")   # tests: any ni that divides PR, copies of images too
    if forced is not None and t.pr % forced == 0:
        return replace(t, ni=forced)
    return best


@record(frozen=True)
class _TKey:
    """What the shared function depends on at compile time."""
    dtype: str
    pr: int
    kw: int
    direct: bool   # Transposed.direct
    ni: int        # images per tile


@params
class TParams(Params):
    """Items [t0, t1) (group g of ni images, gradient channel c: t = g*c_count + c); n images,
    c gradient and o cotangent channels; h x w gradient pixels, oh cotangent rows, kh kernel
    rows, nv vectors per cotangent row; padding ph, pw; src_image elements per cotangent image;
    the row buffer at buf_offset in the thread region, rows of buf_pitch; the padded copy's
    shapes."""
    t0: I64Arg = None
    t1: I64Arg = None
    n: I64Arg
    c: I64Arg
    o: I64Arg
    h: I64Arg
    w: I64Arg
    oh: I64Arg
    kh: I64Arg
    nv: I64Arg
    ph: I64Arg
    pw: I64Arg
    src_image: I64Arg
    buf_pitch: I64Arg
    buf_offset: I64Arg
    prep: PrepParams


def _shifted(b, v, j: int, vl: int):
    """(lo, hi): v moved j lanes up across two vectors, zeros elsewhere (lo[l] = v[l - j],
    hi[l] = v[l + vl - j])."""
    i32v = ir.VectorType(ir.IntType(32), vl)
    zero = ir.Constant(v.type, [0.0] * vl)
    lo = [l - j if l >= j else vl for l in range(vl)]
    hi = [l + vl - j if l < j else vl for l in range(vl)]
    return (b.shuffle_vector(v, zero, ir.Constant(i32v, lo)),
            b.shuffle_vector(v, zero, ir.Constant(i32v, hi)))


def _tgrad_body(s, k: _TKey):
    b = s.b
    out, ct, w, region = s.ptrs
    ety, vl, _ = dtype_info(k.dtype)
    vty = ir.VectorType(ety, vl)
    pr, kw, ni = k.pr, k.kw, k.ni
    ry = pr // ni   # rows of each image; accumulator row p is image p // ry, row p % ry
    pbuf = gep(b, region, i64(ALIGN), ety, name="tgrad.padded")
    rbuf = gep(b, region, s.buf_offset, ety, name="tgrad.rows")
    zero = zero_vector(ety, vl)
    taps = b.mul(s.kh, i64(kw))
    ws_o = b.mul(s.c, taps)
    plane = b.mul(s.h, s.w)
    image = b.mul(s.o, s.cp)   # one image's padded copy
    h1 = b.sub(s.h, i64(1))
    with carry_loop(b, s.t0, s.t1, [load(b, region, i64(0), I64)], "tgrad.item") as item:
        g = b.udiv(item.iv, s.c, name="tgrad.g")
        c = b.urem(item.iv, s.c, name="tgrad.c")
        ns = [smin(b, b.add(b.mul(g, i64(ni)), i64(m)), b.sub(s.n, i64(1))) if ni > 1 else g
              for m in range(ni)]
        with if_then(b, b.icmp_signed("!=", g, item.vals[0]), name="tgrad.pad"):
            for m, n in enumerate(ns):
                pad(b, pad_key(k.dtype, 1, True), gep(b, ct, b.mul(n, s.src_image), ety),
                    gep(b, pbuf, b.mul(i64(m), image), ety) if m else pbuf, s.o, s.prep)
        item.next = [g]
        outs = [gep(b, out, b.mul(b.add(b.mul(n, s.c), c), plane), ety) for n in ns]
        w_c = gep(b, w, b.mul(c, taps), ety)
        with carry_loop(b, 0, s.h, [], "tgrad.y", step=ry) as ly:
            yr = [smin(b, b.add(ly.iv, i64(r)), h1) for r in range(ry)]
            ys = [yr[p % ry] for p in range(pr)]
            out_p = [outs[p // ry] for p in range(pr)]
            # kernel rows i with a cotangent row Y + ph - i in [0, oh) for some row Y of the tile
            i_lo = smax(b, b.sub(b.add(yr[0], s.ph), b.sub(s.oh, i64(1))), 0)
            i_hi = smin(b, b.add(b.add(yr[-1], s.ph), i64(1)), s.kh)
            # padded row of (Y, i): Y + ph - i + (KH - 1), in the copy of image p // ry
            base = []
            for p, y in enumerate(ys):
                at = b.mul(b.add(b.add(y, s.ph), b.sub(s.kh, i64(1))), s.rp)
                if p >= ry:
                    at = b.add(at, b.mul(i64(p // ry), image))
                base.append(opaque(b, at))
            with carry_loop(b, 0, s.nv, [zero] * pr, "tgrad.v") as lv:
                x0 = b.mul(lv.iv, i64(vl))
                # the kernel rows outside, the channels inside: the inner loop's trip count is
                # the same for every tile (its exit predicted), the kernel rows' is not
                with carry_loop(b, i_lo, i_hi, [zero] * (pr * kw), "tgrad.kh") as li:
                    back = b.sub(x0, b.mul(li.iv, s.rp))
                    pi = [gep(b, pbuf, b.add(bs, back), ety) for bs in base]
                    wi = gep(b, w_c, b.mul(li.iv, i64(kw)), ety)
                    with carry_loop(b, 0, s.o, li.vals, "tgrad.o") as lo:
                        rows = [vload(b, row, b.mul(lo.iv, s.cp), vty) for row in pi]
                        wo = gep(b, wi, b.mul(lo.iv, ws_o), ety)
                        acc = list(lo.vals)
                        for j in range(kw):
                            wv = splat(b, load(b, wo, i64(j), ety), vl)
                            for p in range(pr):
                                acc[p * kw + j] = fma(b, wv, rows[p], acc[p * kw + j])
                        lo.next = acc
                    li.next = lo.out
                sums = li.out   # A[p][j] of the vector of cotangent columns at x0
                carry = []
                for p in range(pr):
                    lo_v, hi_v = b.fadd(lv.vals[p], sums[p * kw]), zero
                    for j in range(1, kw):
                        sl, sh_ = _shifted(b, sums[p * kw + j], j, vl)
                        lo_v, hi_v = b.fadd(lo_v, sl), b.fadd(hi_v, sh_)
                    if k.direct:   # the one vector: columns 0 .. vl-1, then vl .. w-1
                        _store_row_part(b, lo_v, out_p[p], b.mul(ys[p], s.w), s.w, plane, vl)
                        with if_then(b, b.icmp_signed(">", s.w, i64(vl)), name="tgrad.hi"):
                            _store_row_part(b, hi_v, out_p[p], b.add(b.mul(ys[p], s.w), i64(vl)),
                                            b.sub(s.w, i64(vl)), plane, vl)
                    else:
                        vstore(b, lo_v, gep(b, rbuf, b.mul(i64(p), s.buf_pitch), ety), x0)
                    carry.append(hi_v)
                lv.next = carry
            if not k.direct:
                _copy_rows(b, s, rbuf, out_p, ys, lv.out, plane, ety, vl)
    store(b, item.out[0], region, i64(0), I64)


def _copy_rows(b, s, rbuf, out_p, ys, carry, plane, ety, vl):
    """The tile's rows from the row buffer (the carry after their last vector stored first) to
    the gradient: columns pw .. pw + w - 1 of the full convolution are the gradient's row."""
    end = b.mul(s.nv, i64(vl))
    for p, y in enumerate(ys):
        row = gep(b, rbuf, b.mul(i64(p), s.buf_pitch), ety)
        vstore(b, carry[p], row, end)
        src = gep(b, row, s.pw, ety)
        at_row = b.mul(y, s.w)
        with carry_loop(b, 0, s.w, [], "tgrad.col", step=vl) as lq:
            v = vload(b, src, lq.iv, ir.VectorType(ety, vl))
            _store_row_part(b, v, out_p[p], b.add(at_row, lq.iv), b.sub(s.w, lq.iv), plane,
                            vl)


def _store_row_part(b, v, out_c, at, left, plane, vl):
    """v at element `at` of the gradient plane out_c, where `left` columns of its row remain:
    a whole vector (the lanes past the row land in the next row, which is written after this
    one) but where it would leave the plane, there the row's lanes only (masked stores are slow
    on znver1)."""
    inside = b.icmp_signed("<=", b.add(at, i64(vl)), plane)
    with b.if_else(inside) as (whole, part):
        with whole:
            vstore(b, v, out_c, at)
        with part:
            masked_store(b, v, out_c, at, lane_mask(b, left, vl))

"""conv2d_weight_grad: a reduction over the images and output pixels. Two plans: with output
channels a multiple of the vector (and, with 16 vector registers, an input read in place), the
output channels go in the lanes and the pixels are broadcast (`_WLanes`); else vector
accumulators over the pixels per (input channel, R output channels, kernel row), summed
horizontally at the end (`_WGrad`).
"""
from __future__ import annotations

import itertools

import llvmlite.ir as ir

from ... import record
from ....ir.prims.nn import conv2d_weight_grad_p

from ...loops import carry_loop, fma, gep, i64, if_then, load, masked_load, masked_store, splat, \
    store, vload, vstore
from .. import CONV_WEIGHT, conv2d_weight_grad_cost, register
from ..toolkit import DtypeKey, I64Arg, Params, ceil_div, dtype_info, hsum, kernel_function, \
    lane_mask, memset0, opaque, params, round_up, shared_function, smax, smin, thread_range
from ...target import vector_registers
from .layout import ALIGN, FORCE, Prep, PrepParams, pad, pad_key
from .pointwise import is_pointwise, lower_wgrad, wgrad_scratch
from .window import is_window, lower_conv2d_weight_grad

WGRAD_CHUNK_BYTES = 64 * 1024  # target size of a chunk of images of the weight gradient


def _wgrad_registers(flat: bool) -> int:
    """Vector registers the R*GR*KW accumulators and min(R, GR*KW) held operands may take: of the
    32 of AVX-512 or the 16 of AVX2, all but the streamed load and (flat mode only: the full steps
    of rows need none) the lane mask. AVX2's 15 admit 4 output channels x 3 taps: 7 loads per 12
    FMAs instead of 6 loads and 3 mask `and`s per 9."""
    return (32 if vector_registers() >= 32 else 16) - 1 - int(flat)
# The flat mode when it needs at most this fraction of the vectors of the row mode: it also
# copies the cotangents (into rows of the padded pitch) and masks the columns between rows.
_WFLAT_GAIN = 0.85
# Rows of at most this many whole vectors are unrolled (`_WGrad.row_vectors`).
_ROW_UNROLL = 4
# Reading the input in place (_wgrad_most_chunks): items per chunk of the thread pool at least,
# in this many chunks at least.
_CHUNK_ITEMS = 4
_MIN_CHUNKS = 4
# Input channels per channel block at most (the blocks are balanced): the block's padded copies
# of a chunk of images, and a row of cotangents reused by all of them from L1.
_MAX_CB = 8


@record(frozen=True)
class _WShapes:
    """The shapes both plans of the weight gradient start from: n images, c input and o output
    channels, oy x ox output pixels, a kh x kw kernel, strides sy, sx, the padded copy, the
    vector's lanes vl."""
    dtype: str
    n: int
    c: int
    o: int
    oy: int
    ox: int
    kh: int
    kw: int
    sy: int
    sx: int
    prep: Prep
    vl: int


@record(frozen=True)
class _WGrad(_WShapes):
    """dw[o, c, i, j] = sum_{n, y, x} ct[n, o, y, x] * P_n[c][y*sy + i][phase j%sx][x + j//sx].

    An item is (input channel c, block of R output channels, group of GR kernel rows) with
    R*GR*KW vector accumulators. Items are numbered by blocks of CB input channels, then output
    channel block, channel, row group. A thread takes the channel blocks of its items one by one;
    for each, the images go by in chunks of `ng` whose cotangents fit in L2: the padded copies of
    the block's channels of the chunk's images are made (a thread copies only its channels), then
    every item of the block adds the chunk to its vector accumulators, kept in scratch between
    chunks (a block of cotangent rows is reused from L1 by the CB channels). After the last chunk
    the accumulators are summed horizontally into out, once per item."""
    r: int
    gr: int   # kernel rows per item
    ng: int   # images per chunk
    cb: int   # input channels per channel block
    flat: bool = False   # see `flat_len`

    @property
    def direct(self) -> bool:
        """The padded copy would equal the image (no padding, unit strides: LeNet-5): the sums
        read the input itself and the copies are skipped (they cost as much as the sums of a
        thread's share when the work is split in many chunks). Not with row groups past KH
        (they read rows past the image)."""
        pr = self.prep
        return (pr.offr == 0 and pr.offq == 0 and pr.sx == 1 and pr.dr == 1 and pr.dq == 1
                and pr.rows == pr.src_h and pr.row_pitch == pr.src_w and not self.flat
                and self.kh % self.gr == 0)

    @property
    def flat_len(self) -> int:
        """Flat mode (short rows, unit strides): the cotangents of a chunk are copied into rows of
        the padded copy's pitch rp, zeros between them, and the sum runs over x' = y*rp + x in
        [0, flat_len) as one row: whole vectors where rows are shorter than a vector."""
        return (self.oy - 1) * self.prep.row_pitch + self.ox

    @property
    def row_vectors(self) -> int:
        """Rows of at most _ROW_UNROLL whole vectors (LeNet-5: 8 and 24 columns): their vector
        steps are unrolled, without the row's loop and tail test, which cost as much as the few
        FMAs of a step (conv2's weight gradient 0.82 ms with them, 0.58 without on znver1).
        0 otherwise."""
        nx, rem = divmod(self.row_len, self.vl)
        return nx if rem == 0 and nx <= _ROW_UNROLL else 0

    @property
    def row_len(self) -> int:
        return self.flat_len if self.flat else self.ox

    @property
    def ct_main(self) -> int:
        """Flat mode: the chunk's cotangents; then (both modes) a table of lane masks, one
        vl-bit integer per vector of a row, bits set at the real pixels."""
        return round_up(self.ng * self.o * self.flat_len, ALIGN) if self.flat else 0

    @property
    def ct_elems(self) -> int:
        return self.ct_main + round_up(self.row_len + self.vl, ALIGN)

    @property
    def groups(self) -> int:
        return ceil_div(self.kh, self.gr)

    @property
    def per_cb(self) -> int:
        """Items per channel block."""
        return ceil_div(self.o, self.r) * self.cb * self.groups

    @property
    def items(self) -> int:
        return ceil_div(self.c, self.cb) * self.per_cb

    @property
    def slack(self) -> int:
        """Over-read past the last copy: rows of clamped-out kernel rows, the last vector."""
        return self.gr * self.prep.row_pitch + 2 * self.vl + self.kw

    @property
    def partial_elems(self) -> int:
        """The vector accumulators of the items of one channel block."""
        return round_up(self.per_cb * self.r * self.gr * self.kw * self.vl, ALIGN)

    @property
    def region_elems(self) -> int:
        copies = 0 if self.direct else self.cb * self.ng * self.prep.chan_pitch
        return self.partial_elems + round_up(copies + self.slack, ALIGN) + self.ct_elems


def _instr_shapes(ins):
    """(n, c, o, oy, ox, h, wd, kh, kw, sh, sw, ph, pw, vl, es) of a weight gradient: images,
    input and output channels, output and input pixels, kernel, strides, padding, vector lanes,
    element bytes."""
    ct, x = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    kh, kw = ins.params["kernel"]
    n, o, oy, ox = ct.shape
    _, c, h, wd = x.shape
    _, vl, es = dtype_info(ins.out.dtype)
    return n, c, o, oy, ox, h, wd, kh, kw, sh, sw, ph, pw, vl, es


def _wgrad_plan(ins) -> _WGrad:
    n, c, o, oy, ox, h, wd, kh, kw, sh, sw, ph, pw, vl, es = _instr_shapes(ins)
    prep = Prep(h, wd, (oy - 1) * sh + kh, ceil_div((ox - 1) * sw + kw, sw), sw, 1, 1,
                 ph, pw)
    # Few choices, so that kernels of different shapes share functions (compile time): one kernel
    # row per item (GR = 1; a whole 3-wide kernel for a single output channel), as many output
    # channels R as the registers hold (R*GR*KW accumulators + min(R, GR*KW) operands) among
    # those computing the fewest clamped channels: LeNet-5 conv1's 6 channels take 3 + 3, not
    # 4 + 4 with 2 computed for nothing (39% of the 1-thread peak instead of 30% on AVX-512).
    flat_len = (oy - 1) * prep.row_pitch + ox
    flat = sh == 1 and sw == 1 and oy > 1 and \
        ceil_div(flat_len, vl) <= _WFLAT_GAIN * oy * ceil_div(ox, vl)
    flat = FORCE.get("wflat", flat)
    gr = kh if o == 1 and kw <= 3 else 1
    fits = [r for r in (8, 4, 3, 2, 1)
            if r == 1 or r * gr * kw + min(r, gr * kw) <= _wgrad_registers(flat)]
    r = min(fits, key=lambda r: (ceil_div(o, r) * r, -r))
    r, gr = FORCE.get("wgrad", (r, gr))
    # a chunk's cotangents stay in L2 while all input channels go by
    ct_image = o * (flat_len if flat else oy * ox)
    ng = max(1, min(n, WGRAD_CHUNK_BYTES // ((prep.chan_pitch + ct_image) * es)))
    ng = FORCE.get("ng", ng)
    cb = ceil_div(c, ceil_div(c, _MAX_CB))
    return _WGrad(ins.out.dtype, n, c, o, oy, ox, kh, kw, sh, sw, prep, vl, r, gr, ng, cb, flat)


def _wgrad_scratch(ins, nthreads):
    if is_window(ins):
        return 0
    if is_pointwise(ins):
        return wgrad_scratch(ins, nthreads)
    lanes = _lanes_plan(ins)
    if lanes is not None:
        return nthreads * lanes.region_elems * dtype_info(ins.out.dtype)[2]
    return nthreads * _wgrad_plan(ins).region_elems * dtype_info(ins.out.dtype)[2]


@params
class _WRunParams(Params):
    """What the shared functions of both plans take first: items [t0, t1), n images, c input and
    o output channels, oy x ox output pixels, row stride sy, kh kernel rows, ng images per
    chunk."""
    t0: I64Arg
    t1: I64Arg
    n: I64Arg
    c: I64Arg
    o: I64Arg
    oy: I64Arg
    ox: I64Arg
    sy: I64Arg
    kh: I64Arg
    ng: I64Arg


@params
class WGradParams(_WRunParams):
    """The run-time arguments of the weight gradient's shared function: items [t0, t1); n images,
    c input and o output channels; oy x ox the pixels summed over (flat mode: 1 x flat_len);
    sy row stride; kh kernel rows; ng images per chunk; cb channels per block; groups of kernel
    rows; per_cb items per channel block; the region's layout (slack, partial, ct_elems,
    ct_main: see `_WGrad`); ct_oy x ct_ox the cotangent planes; flat (0 or 1); tpitch the row
    pitch of the summed pixels (for the table of real pixels); the padded copy's shapes."""
    cb: I64Arg
    groups: I64Arg
    per_cb: I64Arg
    slack: I64Arg
    partial: I64Arg
    ct_oy: I64Arg
    ct_ox: I64Arg
    ct_elems: I64Arg
    ct_main: I64Arg
    flat: I64Arg
    tpitch: I64Arg
    prep: PrepParams


def _wgrad_most_chunks(ins) -> int | None:
    """Reading the input in place (`_WGrad.direct`), each chunk passes over all of the images
    once for all of its items: few items (LeNet-5's first conv: 10) go in chunks of
    _CHUNK_ITEMS at least, not in the pool's 8 chunks of one or two items, but in 4 chunks at
    least (two a thread of two: in 2, a worker that woke late left both to the caller). Zen 3,
    2 threads, LeNet-5 + SGD, TRACEJIT_PROFILE minima, alternating runs: 75.0 us in 8 chunks,
    69.6 in 4, 88.5 in 2."""
    if is_window(ins) or is_pointwise(ins) or _lanes_plan(ins) is not None:
        return None
    p = _wgrad_plan(ins)
    return max(_MIN_CHUNKS, p.items // _CHUNK_ITEMS) if p.direct else None


@register(conv2d_weight_grad_p, scratch_bytes=_wgrad_scratch, epilogue=False, parallel=True,
          cost=conv2d_weight_grad_cost, compile_weight=CONV_WEIGHT,
          most_chunks=_wgrad_most_chunks)
def _conv2d_weight_grad_lower(module: ir.Module, name: str, ins) -> None:
    if is_window(ins):   # grouped or dilated
        lower_conv2d_weight_grad(module, name, ins)
        return
    if is_pointwise(ins):   # 1x1, no padding: matrix products (pointwise.py)
        lower_wgrad(module, name, ins)
        return
    lanes = _lanes_plan(ins)
    if lanes is not None:   # O a multiple of the vector (AVX2: no padding)
        _lower_lanes(module, name, lanes)
        return
    p = _wgrad_plan(ins)
    kf = kernel_function(module, name, 2)
    b = kf.b
    region = kf.scratch   # this thread's own (see kernels/__init__.py)
    cb, per_cb, items = p.cb, p.per_cb, p.items
    if not p.direct:
        # Split in many chunks (a share each), a chunk copies every channel of each channel
        # block it has items of, for all the images: with blocks of at most C / chunks channels
        # (fewer items reuse a cotangent row from L1) each channel is copied about once or twice
        # in all instead of up to chunks times (ResNet-8's strided 3x3: 1.75x the time of one
        # chunk with 8 chunks).
        cb = smax(b, smin(b, b.udiv(b.add(i64(p.c - 1), kf.nthreads), kf.nthreads), p.cb), 1,
                  name="wgrad.cb")
        per_cb = b.mul(cb, i64(p.per_cb // p.cb), name="wgrad.per_cb")
        items = b.mul(b.udiv(b.add(cb, i64(p.c - 1)), cb), per_cb, name="wgrad.items")
    t0, t1 = thread_range(b, items, kf.tid, kf.nthreads)
    key = _WGradKey(p.dtype, p.r, p.gr, p.kw, p.sx, p.flat, p.direct, p.row_vectors)
    fn = shared_function(module, "conv_wgrad", key, 4, WGradParams, _wgrad_body)
    fn.call(b, [kf.out, kf.ins[0], kf.ins[1], region],
            WGradParams(t0=t0, t1=t1, n=p.n, c=p.c, o=p.o, oy=1 if p.flat else p.oy,
                        ox=p.flat_len if p.flat else p.ox, sy=p.sy, kh=p.kh, ng=p.ng, cb=cb,
                        groups=p.groups, per_cb=per_cb, slack=p.slack,
                        partial=p.partial_elems, ct_oy=p.oy, ct_ox=p.ox, ct_elems=p.ct_elems,
                        ct_main=p.ct_main, flat=int(p.flat),
                        tpitch=p.prep.row_pitch if p.flat else p.ox, prep=p.prep.params()))
    b.ret_void()


@record(frozen=True)
class _WGradKey:
    """What the shared function of the weight gradient depends on at compile time."""
    dtype: str
    r: int
    gr: int
    kw: int
    sx: int
    flat: bool   # the full steps mask the x operand (the columns between the rows)
    direct: bool   # the sums read the input, no padded copies (see `_WGrad.direct`)
    nxv: int = 0   # > 0: rows of exactly nxv vectors, unrolled (see `_WGrad.row_vectors`)

    @property
    def nacc(self) -> int:
        return self.r * self.gr * self.kw


def _wgrad_body(s, p: _WGradKey):
    """Items [t0, t1) with the run-time shapes of `s`; ptrs: out, ct, x, thread region (the
    items' vector accumulators, then the padded copies of a chunk's images for the channels of
    one channel block)."""
    b = s.b
    out, ct, x, region = s.ptrs
    ety, vl, es = dtype_info(p.dtype)
    partials = region
    pbuf = gep(b, region, s.partial, ety, name="wgrad.padded")
    copies = i64(0) if p.direct else b.mul(b.mul(s.cb, s.ng), s.cp)
    memset0(b, gep(b, pbuf, copies, ety), b.mul(s.slack, i64(es)))
    vty = ir.VectorType(ety, vl)
    # flat mode: the chunk's cotangents in rows of pitch rp (the columns between stay zero);
    # both modes: the table of the real pixels of a row (flat: their mask keeps 0 * Inf out of
    # the sums)
    flat = b.icmp_signed("!=", s.flat, i64(0))
    plane = b.mul(s.src_h, s.src_w)
    img_pitch = b.mul(s.c, plane) if p.direct else s.cp   # of the images the sums read
    ctbuf = gep(b, pbuf, b.add(copies, s.slack), ety, name="wgrad.ct")
    memset0(b, ctbuf, b.mul(s.ct_elems, i64(es)))
    table = gep(b, ctbuf, s.ct_main, ety, name="wgrad.table")
    ity = _lane_int(ety)
    with carry_loop(b, 0, s.ox, [], "wgrad.table") as lt:   # (zeroed above: lanes past ox)
        real = b.sext(b.icmp_signed("<", b.urem(lt.iv, s.tpitch), s.ct_ox), ity)
        store(b, real, table, lt.iv, ity)
    acc_elems = i64(p.nacc * vl)
    cb_first = b.udiv(s.t0, s.per_cb)
    cb_end = b.udiv(b.add(s.t1, b.sub(s.per_cb, i64(1))), s.per_cb)
    with carry_loop(b, cb_first, cb_end, [], "wgrad.cblock") as lcb:
        cblock = lcb.iv
        it0 = smax(b, s.t0, b.mul(cblock, s.per_cb), name="wgrad.it0")
        it1 = smin(b, s.t1, b.mul(b.add(cblock, i64(1)), s.per_cb), name="wgrad.it1")
        memset0(b, partials, b.mul(b.mul(b.sub(it1, it0), acc_elems), i64(es)))
        with carry_loop(b, 0, s.n, [], "wgrad.chunk", step=s.ng) as lch:
            n0 = lch.iv
            nimg = b.sub(smin(b, b.add(n0, s.ng), s.n), n0, name="wgrad.nimg")
            if not p.direct:
                pairs = b.mul(s.cb, s.ng)
                with carry_loop(b, 0, pairs, [], "wgrad.pad") as lpn:
                    # (channel, image) pairs of the block; the channels past C copy the last one
                    c = smin(b, b.add(b.mul(cblock, s.cb), b.udiv(lpn.iv, s.ng)),
                             b.sub(s.c, i64(1)))
                    nn = b.urem(lpn.iv, s.ng)
                    with if_then(b, b.icmp_signed("<", nn, nimg), name="wgrad.pad.img"):
                        img = b.add(b.mul(b.add(n0, nn), s.c), c)
                        src = gep(b, x, b.mul(img, b.mul(s.src_h, s.src_w)), ety)
                        pad(b, pad_key(p.dtype, p.sx, p.sx == 1), src,
                            gep(b, pbuf, b.mul(lpn.iv, s.cp), ety), i64(1), s.prep)
            with if_then(b, flat, name="wgrad.ct.copy"):
                ct_plane = b.mul(s.ct_oy, s.ct_ox)
                ct_src = gep(b, ct, b.mul(n0, b.mul(s.o, ct_plane)), ety)
                with carry_loop(b, 0, b.mul(b.mul(nimg, s.o), s.ct_oy), [], "wgrad.ct.row") as lr:
                    src_row = gep(b, ct_src, b.mul(lr.iv, s.ct_ox), ety)
                    dst_row = gep(b, ctbuf, b.add(b.mul(b.udiv(lr.iv, s.ct_oy), s.ox),
                                                  b.mul(b.urem(lr.iv, s.ct_oy), s.rp)), ety)
                    with carry_loop(b, 0, s.ct_ox, [], "wgrad.ct.col", step=vl) as lq:
                        mask = lane_mask(b, b.sub(s.ct_ox, lq.iv), vl)
                        masked_store(b, masked_load(b, src_row, lq.iv, vty, mask), dst_row,
                                     lq.iv, mask)
            ct_chunk = b.select(flat, ctbuf, ct)
            n0_ct = b.select(flat, i64(0), n0)
            with carry_loop(b, it0, it1, [], "wgrad.item") as item:
                _, o0, c_in, c, g = _wgrad_decode(b, s, p, item.iv)
                row0 = b.mul(g, b.mul(i64(p.gr), s.rp))
                if p.direct:
                    img_c = b.add(b.mul(n0, s.c), smin(b, c, b.sub(s.c, i64(1))))
                    p_c = gep(b, x, b.add(b.mul(img_c, plane), row0), ety)
                else:
                    p_c = gep(b, pbuf, b.add(b.mul(c_in, b.mul(s.ng, s.cp)), row0), ety)
                chans = [smin(b, b.add(o0, i64(r)), b.sub(s.o, i64(1))) for r in range(p.r)]
                mine = gep(b, partials, b.mul(b.sub(item.iv, it0), acc_elems), ety)
                acc = [vload(b, mine, i64(k * vl), ir.VectorType(ety, vl)) for k in range(p.nacc)]
                acc = _wgrad_tile(b, s, p, ct_chunk, p_c, img_pitch, n0_ct, nimg, chans, acc,
                                  table)
                for k, v in enumerate(acc):
                    vstore(b, v, mine, i64(k * vl))
        with carry_loop(b, it0, it1, [], "wgrad.out") as lo:
            _wgrad_item_out(b, s, p, out, lo.iv,
                            gep(b, partials, b.mul(b.sub(lo.iv, it0), acc_elems), ety))


def _lane_int(ety) -> ir.IntType:
    """The integer of a lane's width: the table of real pixels holds one all-ones (real) or zero
    lane per pixel, loaded as a vector and compared: the mask that AVX2's masked loads take as it
    is (a bit table would cost ~40 scalar instructions per vector to expand without AVX-512)."""
    return ir.IntType(64 if ety == ir.DoubleType() else 32)


def _wgrad_decode(b, s, p: _WGradKey, t):
    """Item t -> (channel block, first output channel, channel in the block, input channel
    (unclamped), kernel row group); items run channel block, output block, channel, row group."""
    cblock = b.udiv(t, s.per_cb, name="wgrad.cblock")
    rest = b.urem(t, s.per_cb)
    per_ob = b.mul(s.cb, s.groups)
    o0 = b.mul(b.udiv(rest, per_ob), i64(p.r), name="wgrad.o0")
    rest = b.urem(rest, per_ob)
    c_in = b.udiv(rest, s.groups, name="wgrad.c_in")
    c = b.add(b.mul(cblock, s.cb), c_in, name="wgrad.c")
    return cblock, o0, c_in, c, b.urem(rest, s.groups, name="wgrad.g")


def _wgrad_item_out(b, s, p: _WGradKey, out, t, acc_ptr):
    """out[o, c, i, j] of item t: the horizontal sums of its accumulators at acc_ptr. Clamped
    channels and kernel rows do not touch out (a clamped channel's element belongs to another
    item, perhaps of another thread)."""
    ety, vl, _ = dtype_info(p.dtype)
    _, o0, _, c, g = _wgrad_decode(b, s, p, t)
    c_ok = b.icmp_signed("<", c, s.c)
    ntap = p.gr * p.kw
    vty = ir.VectorType(ety, vl)
    i0 = b.mul(g, i64(p.gr))
    with carry_loop(b, 0, p.nacc, [], "wgrad.sum") as lk:
        o = b.add(o0, b.udiv(lk.iv, i64(ntap)))
        tap = b.urem(lk.iv, i64(ntap))
        i = b.add(i0, b.udiv(tap, i64(p.kw)))
        j = b.urem(tap, i64(p.kw))
        valid = b.and_(b.and_(c_ok, b.icmp_signed("<", o, s.o)), b.icmp_signed("<", i, s.kh))
        with if_then(b, valid, name="wgrad.valid"):
            at = b.add(b.mul(b.add(b.mul(b.add(b.mul(o, s.c), c), s.kh), i), i64(p.kw)), j)
            store(b, hsum(b, vload(b, acc_ptr, b.mul(lk.iv, i64(vl)), vty)), out, at, ety)


def _wgrad_tile(b, s, p: _WGradKey, ct, p_c, img_pitch, n0, nimg, chans, acc, table):
    """The R x GR x KW vector accumulators `acc` of one item plus the images of the chunk, read
    at p_c + image * img_pitch (`table`: the lane masks of the real pixels of a row)."""
    ety, vl, _ = dtype_info(p.dtype)
    vty = ir.VectorType(ety, vl)
    plane = b.mul(s.oy, s.ox)
    ntap = p.gr * p.kw
    ct_rows = [b.mul(o, plane) for o in chans]
    row_step = b.mul(s.sy, s.rp)
    with carry_loop(b, 0, nimg, acc, "wgrad.n") as ln:
        ct_n = gep(b, ct, b.mul(b.add(n0, ln.iv), b.mul(s.o, plane)), ety)
        p_n = gep(b, p_c, b.mul(ln.iv, img_pitch), ety)
        with carry_loop(b, 0, s.oy, ln.vals, "wgrad.y") as ly:
            # opaque offsets keep the many addresses out of loop strength reduction (compile time)
            ct_y = [gep(b, ct_n, opaque(b, b.add(row, b.mul(ly.iv, s.ox))), ety) for row in ct_rows]
            x_y = gep(b, p_n, opaque(b, b.mul(ly.iv, row_step)), ety)
            phases = [b.mul(s.q, i64(ph)) for ph in range(p.sx)]
            def x_step(acc, x0, full):
                """One vector of pixels at x0 added to `acc`. `full`: the vector lies inside the
                row: plain loads; in flat mode the x operand and-ed with the lanes of the real
                pixels (no 0 * Inf from the pixels between the rows; the cotangents there are
                zeros of the copy). Else masked loads: AVX2's masked load is several times
                slower than a load and an `and`, so it is kept out of the main loop."""
                lanes = None if full and not p.flat else \
                    vload(b, table, x0, ir.VectorType(_lane_int(ety), vl))
                mask = None if full else \
                    b.icmp_signed("<", lanes, ir.Constant(lanes.type, [0] * vl))   # the tail's

                def x_at(t):
                    i, j = divmod(t, p.kw)
                    at = b.add(b.add(b.add(b.mul(i64(i), s.rp), phases[j % p.sx]), x0),
                               i64(j // p.sx))
                    if not full:
                        return masked_load(b, x_y, at, vty, mask)
                    if not p.flat:   # a full vector of a row: all its pixels are real
                        return vload(b, x_y, at, vty)
                    raw = b.bitcast(vload(b, x_y, at, vty), lanes.type)
                    return b.bitcast(b.and_(raw, lanes), vty)

                def ct_at(row):
                    return vload(b, row, x0, vty) if full else masked_load(b, row, x0, vty, mask)

                acc = list(acc)
                # keep the smaller operand set in registers, stream the other (register pressure:
                # accumulators + min(R, taps) + 1)
                if ntap <= p.r:
                    xv = [x_at(t) for t in range(ntap)]
                    for r in range(p.r):
                        cv = ct_at(ct_y[r])
                        for t in range(ntap):
                            acc[r * ntap + t] = fma(b, cv, xv[t], acc[r * ntap + t])
                else:
                    cv = [ct_at(row) for row in ct_y]
                    for t in range(ntap):
                        xv = x_at(t)
                        for r in range(p.r):
                            acc[r * ntap + t] = fma(b, cv[r], xv, acc[r * ntap + t])
                return acc

            if p.nxv:   # rows of nxv whole vectors: unrolled, no row loop, no tail test
                acc = ly.vals
                for v in range(p.nxv):
                    acc = x_step(acc, i64(v * vl), True)
                ly.next = acc
            else:
                xfull = b.sub(s.ox, b.urem(s.ox, i64(vl)), name="wgrad.xfull")
                with carry_loop(b, 0, xfull, ly.vals, "wgrad.x", step=vl) as lx:
                    lx.next = x_step(lx.vals, lx.iv, True)
                # the masked tail step only where the row has one
                before = b.block
                fn = before.function
                tail_block = fn.append_basic_block("wgrad.x.tail")
                joined = fn.append_basic_block("wgrad.x.joined")
                b.cbranch(b.icmp_signed("<", xfull, s.ox), tail_block, joined)
                b.position_at_end(tail_block)
                tail = x_step(lx.out, xfull, False)
                tail_end = b.block
                b.branch(joined)
                b.position_at_end(joined)
                merged = []
                for t, a in zip(tail, lx.out):
                    phi = b.phi(a.type)
                    phi.add_incoming(a, before)
                    phi.add_incoming(t, tail_end)
                    merged.append(phi)
                ly.next = merged
        ln.next = ly.out
    return ln.out



# ------------------------------------------------------------------------------------------------
# output channels in the lanes (AVX-512)
# ------------------------------------------------------------------------------------------------
# Cotangents of a chunk of images, transposed to pixel-major order, at most this many bytes (they
# stay in L2 while every item of the thread goes by).
WGRAD_LANES_CHUNK_BYTES = 256 * 1024
# Accumulators of an item at most, and with the PX*RO cotangent vectors and the broadcast pixels
# of a kernel row, the registers a step may take (of 32).
_LANES_ACC = 28
_LANES_REGISTERS = 32
# With 16 registers (AVX2): at most 12 accumulators, one input channel per item, and the
# accumulators and cotangent vectors may take all 16 (a cotangent vector can be an FMA's memory
# operand). Zen 3, 1 thread, the kernel alone: channel pairs (2 x 2 x 3 and 1 x 2 x 5
# accumulators) ran at 42 and 75 GFLOP/s, one channel (4 x 3 and 2 x 5) at 92 and 86.
_LANES_ACC_16 = 12
# The loop's own instructions per step, in loads: the conv block's weight gradient runs at 82% of
# the peak with 2 output vectors x 4 channels x 2 pixels, 75% with 4 x 2 x 1 (as many loads
# per FMA, twice the steps).
_LANES_STEP_COST = 2
# Independent sums an item needs to hide the FMA latency (4 cycles x 2 ports, and some slack).
_LANES_MIN_ACC = 10
# Items at least (the threads share them, in more chunks than threads under the thread pool).
_LANES_MIN_ITEMS = 4
# The cost of transposing a cotangent element in multiply-adds per element of the sums, and the
# fraction of the work the transposes of all shares may add (see `_WLanes.shares`).
_LANES_TRANSPOSE_FMAS = 10
_LANES_SHARE_BUDGET = 0.08


@record(frozen=True)
class _WLanes(_WShapes):
    """dw[o, c, i, j] = sum_{n, y, x} ctT[n, y, x][o] * P_n[c][y*sy + i][x*sx + j], with the
    output channels in the lanes: per pixel, RO cotangent vectors (vl output channels each) times
    one broadcast pixel per (channel, tap). Every lane is a real output channel (O % vl == 0),
    whatever the shape of the image (LeNet-5's 8x8 rows would fill half a vector in the pixel
    layout), strides cost nothing (the pixels are broadcast, not loaded as vectors), and the sums
    need no horizontal reduction. The price is the transposed copy of the cotangents, made per
    chunk of images by vl x vl register transposes: one copy per ~C*KH*KW/vl FMAs per element.

    An item is (CC input channels, RO vectors of output channels, GR kernel rows): RO*CC*GR*KW
    accumulators, PX pixels per step (a broadcast pixel serves the taps of neighbouring pixels
    that read it), kept in the thread's scratch between chunks. Items run channel group, output
    block, row group; a thread's share of items spans consecutive channel groups, whose padded
    copies (when there is padding) are made per chunk just before their items."""
    ro: int
    cc: int
    gr: int
    px: int   # pixels per step (see `_lanes_tile`)
    ng: int

    @property
    def direct(self) -> bool:
        """No padding: the sums read the input itself (any stride)."""
        return self.prep.offr == 0 and self.prep.offq == 0

    @property
    def pixels(self) -> int:
        """Pixels per image in the transposed cotangents (rounded up to whole transposes)."""
        return round_up(self.oy * self.ox, self.vl)

    @property
    def groups(self) -> int:
        return ceil_div(self.kh, self.gr)

    @property
    def per_cg(self) -> int:
        return self.o // (self.ro * self.vl) * self.groups

    @property
    def items(self) -> int:
        return self.c // self.cc * self.per_cg

    @property
    def nacc(self) -> int:
        return self.ro * self.cc * self.gr * self.kw

    @property
    def shares(self) -> int:
        """Shares of the items at most, each transposing all the cotangents: a transpose costs
        about _LANES_TRANSPOSE_FMAS / (C*KH*KW) of the whole weight gradient (measured 6% for
        LeNet-5 conv2, 3% for the conv block), at most _LANES_SHARE_BUDGET of it all together,
        but two shares whatever it costs (two threads). With a share per chunk of the thread
        pool (8 on 2 threads) LeNet-5 conv2 took 1.4x its 2-thread time, the conv block 1.2x."""
        return max(2, int(_LANES_SHARE_BUDGET * self.c * self.kh * self.kw
                          / _LANES_TRANSPOSE_FMAS))

    @property
    def partial_elems(self) -> int:
        return round_up(self.items * self.nacc * self.vl, ALIGN)

    @property
    def ct_elems(self) -> int:
        return round_up(self.ng * self.pixels * self.o, ALIGN)

    @property
    def copy_elems(self) -> int:
        if self.direct:
            return 0
        return round_up(self.ng * self.cc * self.prep.chan_pitch + self.prep.row_pitch
                        + 2 * self.vl, ALIGN)

    @property
    def region_elems(self) -> int:
        return self.partial_elems + self.ct_elems + self.copy_elems


def _lanes_plan(ins):
    """The lanes plan of the weight gradient, or None where it does not apply: output channels a
    multiple of the vector, no dilation or groups (window.py takes those); with 16 registers
    (AVX2) only for an input read in place (no padding). Zen 3, 1 thread, the kernel alone: the
    pixel layout's R x KW accumulators read the pixels by unaligned vector loads, many across
    cache lines (LeNet-5's rows of 12 floats), the lanes plan broadcasts them: LeNet-5 conv2
    (batch 64) 257 -> 230 us, at batch 256 1128 -> 909, ResNet-8's 32-channel 3x3 unpadded
    56 -> 92 GFLOP/s; with padding the copies per channel and chunk cost more than that (the
    conv block equal, ResNet-8's 16-channel 3x3 78 -> 61-69 GFLOP/s)."""
    wide = vector_registers() >= 32
    if FORCE.get("wlanes", True) is False:
        return None
    n, c, o, oy, ox, h, wd, kh, kw, sh, sw, ph, pw, vl, es = _instr_shapes(ins)
    if o % vl or (not wide and (ph or pw)):
        return None
    prep = Prep(h, wd, (oy - 1) * sh + kh, (ox - 1) * sw + kw, 1, 1, 1, ph, pw)
    # broadcasts per kernel row with px pixels a step (held in registers when px > 1, else FMA
    # operands)
    cols = {px: len({q * sw + j for q in range(px) for j in range(kw)})
            for px in (1, 2, 4) if ox % px == 0}
    best = None
    for ro, cc, gr, px in itertools.product([r for r in (4, 2, 1) if (o // vl) % r == 0],
                                            [d for d in range(8 if wide else 1, 0, -1)
                                             if c % d == 0],
                                            [g for g in range(kh, 0, -1) if kh % g == 0], cols):
        nacc = ro * cc * gr * kw
        held = cols[px] if px > 1 else 1
        if wide and (nacc > _LANES_ACC or nacc + px * ro + held > _LANES_REGISTERS):
            continue
        if not wide and (nacc > _LANES_ACC_16 or nacc + px * ro + held - 1 > 16):
            continue
        # items for the threads, enough independent sums for the FMA latency, then fewest loads
        # and loop instructions per FMA, then most accumulators
        items = c // cc * (o // vl // ro) * (kh // gr)
        score = (min(items, _LANES_MIN_ITEMS), min(nacc, _LANES_MIN_ACC),
                 -(px * ro + cc * gr * cols[px] + _LANES_STEP_COST) / (px * nacc), nacc)
        if best is None or score > best[0]:
            best = (score, ro, cc, gr, px)
    if best is None or best[0][0] < _LANES_MIN_ITEMS or best[0][1] < _LANES_MIN_ACC:
        # a kernel row wider than the registers, or too few items to share or sums per item
        # (ResNet-8's first convolution, 3 input channels: one item of 27 sums ran on one thread,
        # 25% of the 2-thread peak; the pixel layout has 18 items)
        return None
    _, ro, cc, gr, px = FORCE.get("lanes", best)
    assert ox % px == 0, "a row is whole steps of PX pixels"
    # (16 registers: the pixel plan's 64 KiB chunks, LeNet-5 conv2 227 -> 218 us on Zen 3)
    chunk = WGRAD_LANES_CHUNK_BYTES if wide else WGRAD_CHUNK_BYTES
    ng = max(1, min(n, chunk // (round_up(oy * ox, vl) * o * es)))
    ng = FORCE.get("ng", ng)
    return _WLanes(ins.out.dtype, n, c, o, oy, ox, kh, kw, sh, sw, prep, vl, ro, cc, gr, px, ng)


@params
class WLanesParams(_WRunParams):
    """Run-time arguments of `_lanes_body`: items [t0, t1); n images, c input and o output
    channels; oy x ox output pixels; sy row stride; kh kernel rows; ng images per chunk;
    groups of kernel rows; per_cg items per channel group; pixels per transposed image; the
    region's layout (partial, ct_elems); the padded copy's shapes."""
    groups: I64Arg
    per_cg: I64Arg
    pixels: I64Arg
    partial: I64Arg
    ct_elems: I64Arg
    prep: PrepParams


@record(frozen=True)
class _WLanesKey:
    dtype: str
    ro: int
    cc: int
    gr: int
    px: int
    kw: int
    sx: int
    direct: bool

    @property
    def nacc(self) -> int:
        return self.ro * self.cc * self.gr * self.kw


def _lower_lanes(module, name, p: _WLanes) -> None:
    kf = kernel_function(module, name, 2)
    b = kf.b
    # Every share transposes all the cotangents, so the work goes in at most p.shares shares:
    # under the thread pool (4 chunks a thread) chunk tid works on share tid / group when it is
    # the group's first, the other chunks of the group return at once.
    shares = smin(b, kf.nthreads, p.shares, name="wlanes.shares")
    group = b.udiv(kf.nthreads, shares, name="wlanes.group")
    share = b.udiv(kf.tid, group)
    first = b.icmp_signed("==", b.urem(kf.tid, group), i64(0))
    with if_then(b, b.and_(first, b.icmp_signed("<", share, shares)), name="wlanes.share"):
        t0, t1 = thread_range(b, p.items, share, shares)
        key = _WLanesKey(p.dtype, p.ro, p.cc, p.gr, p.px, p.kw, p.sx, p.direct)
        fn = shared_function(module, "conv_wgrad_lanes", key, 4, WLanesParams, _lanes_body)
        fn.call(b, [kf.out, kf.ins[0], kf.ins[1], kf.scratch],
                WLanesParams(t0=t0, t1=t1, n=p.n, c=p.c, o=p.o, oy=p.oy, ox=p.ox, sy=p.sy,
                             kh=p.kh, ng=p.ng, groups=p.groups, per_cg=p.per_cg,
                             pixels=p.pixels, partial=p.partial_elems, ct_elems=p.ct_elems,
                             prep=p.prep.params()))
    b.ret_void()


@params
class TransposeParams(Params):
    """nimg images from n0 of o channels of oy x ox pixels; pixels per transposed image."""
    n0: I64Arg
    nimg: I64Arg
    o: I64Arg
    oy: I64Arg
    ox: I64Arg
    pixels: I64Arg


def _transpose_ct(b, s, dtype, ct, ctT, n0, nimg):
    """ctT[nn, p, o] = ct[n0 + nn, o, p] for the chunk's images, by a function of its own (its
    shuffle constants stay out of the caller's registers)."""
    fn = shared_function(b.module, "conv_wgrad_ct_t", DtypeKey(dtype), 2, TransposeParams,
                         _transpose_body)
    fn.call(b, [ctT, ct], TransposeParams(n0=n0, nimg=nimg, o=s.o, oy=s.oy, ox=s.ox,
                                          pixels=s.pixels))


def _transpose_body(s, key: DtypeKey):
    """vl x vl blocks (vl channels x vl pixels, the pixels past the plane masked off) transposed
    in registers by log2(vl) stages of two-vector shuffles (each swaps the off-diagonal
    sub-blocks of size d)."""
    b = s.b
    ctT, ct = s.ptrs
    n0, nimg = s.n0, s.nimg
    ety, vl, _ = dtype_info(key.dtype)
    vty = ir.VectorType(ety, vl)
    plane = b.mul(s.oy, s.ox)
    nblk = b.mul(b.mul(nimg, b.udiv(s.o, i64(vl))), b.udiv(s.pixels, i64(vl)))
    with carry_loop(b, 0, nblk, [], "wlanes.tr") as lt:
        pb = b.udiv(s.pixels, i64(vl))
        p0 = b.mul(b.urem(lt.iv, pb), i64(vl))
        rest = b.udiv(lt.iv, pb)
        ob = b.urem(rest, b.udiv(s.o, i64(vl)))
        nn = b.udiv(rest, b.udiv(s.o, i64(vl)))
        src = gep(b, ct, b.add(b.mul(b.add(b.mul(b.add(n0, nn), s.o), b.mul(ob, i64(vl))), plane),
                               p0), ety)
        mask = lane_mask(b, b.sub(plane, p0), vl)
        rows = [masked_load(b, src, b.mul(i64(k), plane), vty, mask) for k in range(vl)]
        d = vl // 2
        while d:
            lo = ir.Constant(ir.VectorType(ir.IntType(32), vl),
                             [k if k & d == 0 else vl + k - d for k in range(vl)])
            hi = ir.Constant(ir.VectorType(ir.IntType(32), vl),
                             [k + d if k & d == 0 else vl + k for k in range(vl)])
            new = list(rows)
            for i in range(vl):
                if i & d == 0:
                    new[i] = b.shuffle_vector(rows[i], rows[i + d], lo)
                    new[i + d] = b.shuffle_vector(rows[i], rows[i + d], hi)
            rows = new
            d //= 2
        dst = gep(b, ctT, b.add(b.mul(b.add(b.mul(nn, s.pixels), p0), s.o), b.mul(ob, i64(vl))),
                  ety)
        for k in range(vl):
            vstore(b, rows[k], dst, b.mul(i64(k), s.o))


def _lanes_body(s, p: _WLanesKey):
    b = s.b
    out, ct, x, region = s.ptrs
    ety, vl, es = dtype_info(p.dtype)
    vty = ir.VectorType(ety, vl)
    partials = region
    ctT = gep(b, region, s.partial, ety, name="wlanes.ct")
    pbuf = gep(b, ctT, s.ct_elems, ety, name="wlanes.padded")
    acc_elems = i64(p.nacc * vl)
    memset0(b, partials, b.mul(b.mul(b.sub(s.t1, s.t0), acc_elems), i64(es)))
    plane = b.mul(s.src_h, s.src_w)
    if p.direct:
        img_pitch, chan_pitch, rp = b.mul(s.c, plane), plane, s.src_w
    else:
        img_pitch, chan_pitch, rp = b.mul(i64(p.cc), s.cp), s.cp, s.rp
    if not p.direct:   # the slack after the copies that the copy's last vector store may touch
        memset0(b, gep(b, pbuf, b.mul(b.mul(s.ng, i64(p.cc)), s.cp), ety),
                b.mul(b.add(s.rp, i64(2 * vl)), i64(es)))
    cg_first = b.udiv(s.t0, s.per_cg)
    cg_end = b.udiv(b.add(s.t1, b.sub(s.per_cg, i64(1))), s.per_cg)
    with carry_loop(b, 0, s.n, [], "wlanes.chunk", step=s.ng) as lch:
        n0 = lch.iv
        nimg = b.sub(smin(b, b.add(n0, s.ng), s.n), n0, name="wlanes.nimg")
        _transpose_ct(b, s, p.dtype, ct, ctT, n0, nimg)
        with carry_loop(b, cg_first, cg_end, [], "wlanes.cgroup") as lcg:
            c0 = b.mul(lcg.iv, i64(p.cc))
            if p.direct:
                base = gep(b, x, b.add(b.mul(n0, img_pitch), b.mul(c0, plane)), ety)
            else:
                with carry_loop(b, 0, nimg, [], "wlanes.pad") as lp:
                    src = gep(b, x, b.mul(b.add(b.mul(b.add(n0, lp.iv), s.c), c0), plane), ety)
                    dst = gep(b, pbuf, b.mul(lp.iv, img_pitch), ety)
                    pad(b, pad_key(p.dtype, 1, True), src, dst, i64(p.cc), s.prep)
                base = pbuf
            it0 = smax(b, s.t0, b.mul(lcg.iv, s.per_cg))
            it1 = smin(b, s.t1, b.mul(b.add(lcg.iv, i64(1)), s.per_cg))
            with carry_loop(b, it0, it1, [], "wlanes.item") as li:
                rest = b.urem(li.iv, s.per_cg)
                o0 = b.mul(b.udiv(rest, s.groups), i64(p.ro * vl))
                g = b.urem(rest, s.groups)
                mine = gep(b, partials, b.mul(b.sub(li.iv, s.t0), acc_elems), ety)
                acc = [vload(b, mine, i64(k * vl), vty) for k in range(p.nacc)]
                p_item = gep(b, base, b.mul(b.mul(g, i64(p.gr)), rp), ety)
                acc = _lanes_tile(b, s, p, ctT, p_item, img_pitch, chan_pitch, rp, nimg,
                                  gep(b, ctT, o0, ety), acc)
                for k, v in enumerate(acc):
                    vstore(b, v, mine, i64(k * vl))
    with carry_loop(b, s.t0, s.t1, [], "wlanes.out") as lo:
        _lanes_out(b, s, p, out, lo.iv, gep(b, partials, b.mul(b.sub(lo.iv, s.t0), acc_elems),
                                              ety))


def _lanes_tile(b, s, p: _WLanesKey, ctT, p_item, img_pitch, chan_pitch, rp, nimg, ct_o, acc):
    """Adds the chunk's nimg images to the item's accumulators acc[r, cc, i, j]: the pixels at
    p_item + image * img_pitch + cc * chan_pitch (rows of pitch rp), the cotangents of the item's
    output channels at ct_o + pixel * o."""
    ety, vl, _ = dtype_info(p.dtype)
    vty = ir.VectorType(ety, vl)
    ntap = p.cc * p.gr * p.kw
    row_step = b.mul(s.sy, rp)
    with carry_loop(b, 0, nimg, acc, "wlanes.n") as ln:
        ct_n = gep(b, ct_o, b.mul(b.mul(ln.iv, s.pixels), s.o), ety)
        x_n = gep(b, p_item, b.mul(ln.iv, img_pitch), ety)
        with carry_loop(b, 0, s.oy, ln.vals, "wlanes.y") as ly:
            ct_y = gep(b, ct_n, b.mul(b.mul(ly.iv, s.ox), s.o), ety)
            x_y = gep(b, x_n, b.mul(ly.iv, row_step), ety)
            # the rows' offsets, hidden from loop strength reduction (compile time; x86
            # addressing takes base + index + displacement anyway)
            offs = [opaque(b, b.add(b.mul(i64(cc), chan_pitch), b.mul(i64(i), rp)))
                    for cc in range(p.cc) for i in range(p.gr)]

            def step(acc, x0, npx):
                """npx pixels from column x0: a broadcast pixel serves every (pixel, tap) that
                reads it (with PX pixels, PX + KW - 1 broadcasts per kernel row at unit stride
                instead of PX * KW)."""
                ct_x = gep(b, ct_y, b.mul(x0, s.o), ety)
                x_x = gep(b, x_y, b.mul(x0, i64(p.sx)), ety)
                cv = [[vload(b, ct_x, b.add(b.mul(i64(px), s.o), i64(r * vl)), vty)
                       for r in range(p.ro)] for px in range(npx)]
                acc = list(acc)
                cols = sorted({px * p.sx + j for px in range(npx) for j in range(p.kw)})
                for row, off in enumerate(offs):
                    xv = {k: splat(b, load(b, x_x, b.add(off, i64(k)), ety), vl) for k in cols}
                    for px in range(npx):
                        for r in range(p.ro):
                            for j in range(p.kw):
                                a = r * ntap + row * p.kw + j
                                acc[a] = fma(b, cv[px][r], xv[px * p.sx + j], acc[a])
                return acc

            with carry_loop(b, 0, s.ox, ly.vals, "wlanes.x", step=p.px) as lx:   # PX | ox
                lx.next = step(lx.vals, lx.iv, p.px)
            ly.next = lx.out
        ln.next = ly.out
    return ln.out


def _lanes_out(b, s, p: _WLanesKey, out, t, acc_ptr):
    """out[o0 + r*vl + lane, c0 + cc, g*GR + i, j] = lane of accumulator [r, cc, i, j] of item t
    (GR divides KH: no row past it), one element at a time from the accumulators in scratch."""
    ety, vl, _ = dtype_info(p.dtype)
    cg = b.udiv(t, s.per_cg)
    rest = b.urem(t, s.per_cg)
    o0 = b.mul(b.udiv(rest, s.groups), i64(p.ro * vl))
    i0 = b.mul(b.urem(rest, s.groups), i64(p.gr))
    c0 = b.mul(cg, i64(p.cc))
    ntap = p.cc * p.gr * p.kw
    with carry_loop(b, 0, p.nacc * vl, [], "wlanes.sum") as lk:
        k, lane = b.udiv(lk.iv, i64(vl)), b.urem(lk.iv, i64(vl))
        o = b.add(b.add(o0, b.mul(b.udiv(k, i64(ntap)), i64(vl))), lane)
        tap = b.urem(k, i64(ntap))
        c = b.add(c0, b.udiv(tap, i64(p.gr * p.kw)))
        i = b.add(i0, b.urem(b.udiv(tap, i64(p.kw)), i64(p.gr)))
        at = b.add(b.mul(b.add(b.mul(b.add(b.mul(o, s.c), c), s.kh), i), i64(p.kw)),
                   b.urem(tap, i64(p.kw)))
        store(b, load(b, acc_ptr, lk.iv, ety), out, at, ety)

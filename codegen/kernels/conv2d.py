"""Direct-convolution kernels: conv2d, conv2d_input_grad, conv2d_weight_grad (NCHW / OIHW).

All three read the image operand through a zero-padded copy that each thread prepares in its scratch
region (`_Prep`). The copy makes every tap of every output pixel an in-bounds, unmasked read, so the
inner loops have no border cases; it costs O(input) per image against O(input * O * KH * KW) FMAs.
The copy also removes the strides from the inner loops:

- a horizontal stride sx is undone by splitting each padded row into sx phase rows (column
  Q = q' * sx + phase is stored at [phase][q']), so the input pixels of sixteen consecutive output
  pixels are sixteen consecutive floats for every tap;
- the input gradient is a stride-1 convolution of the cotangent, dilated by the stride (zeros between
  the pixels) and padded by KH-1-ph / KW-1-pw, with the weights flipped and transposed: the copy
  dilates and pads, and a flipped, transposed copy of the weights (also in scratch) lets it share
  the forward core.

conv2d and conv2d_input_grad share one register-blocked core (`_Core`): an item is one image and a
block of R output channels (and a chunk of rows when there are few items); a tile is R channels x
PR output rows x PV vectors of output columns in R*PR*PV vector accumulators (vectors run along the
output row, which is contiguous in NCHW). The input-channel loop and the kernel-row loop (which
skips rows that only see padding) stay loops; the KW taps of a kernel row are unrolled. Each tap
costs PR*PV vector loads, R broadcast weights and R*PR*PV FMAs. With an epilogue, it runs on each
item's R output planes right after they are computed.

conv2d_weight_grad is a reduction over the images and output pixels (`_WGrad`): vector
accumulators per (input channel, R output channels, kernel row), summed horizontally at the end.

Short rows (LeNet-5's 8, 12 and 24 columns would fill half or three quarters of the vectors) go
in a flat mode when the strides are 1 and it saves vectors: out'[x'] with x' = y*rp + x is one long
row over the padded copy's row pitch rp (the columns x >= ox between the rows are computed and
dropped), so vectors run across output rows. The core writes out' of an item's R channels to a
per-thread buffer and copies the valid columns to out (then the epilogue); the kernel-row loop skips
per block of vectors the kernel rows that see only padding rows for all of the block's output rows.
The weight gradient copies each chunk's cotangents into rows of pitch rp (zeros between them) and
sums over x' in the same way; a per-vector lane-mask table keeps the x reads of the columns between
rows out of the sums (0 * Inf). The input gradient without column padding (pw = 0) stores its
padded copy with row pitch W instead of W + KW - 1: the KW - 1 columns of right padding of a row
are the KW - 1 columns of left padding of the next one (all zeros), so out' is out with no columns
between the rows (whole vectors), and a zero row after the last absorbs the wrap of the last row.

Rows at most half a vector long with O a multiple of the vector length (LeNet-5's second conv)
use a channel mode instead (`_chan_body`): vectors over vl output channels, PR whole output rows of
pixels in PR*OX accumulators, each tap one vector of weights (transposed to [c][i][j][o] in scratch)
and one broadcast input pixel per accumulator; a 16x16 shuffle transpose turns the accumulators
into rows of the output planes. No lane is wasted.

Border tiles clamp their channel and row indices to the last valid one (they recompute and store the
same values into the same elements) instead of having code variants; the weight gradient writes only
the valid ones. Output columns are masked.

Compile time: as in matmul.py, the loops are shape-generic functions shared by all kernels of an
LLVM module with equal compile-time keys (`shared_function`: dtype, register block, kernel width,
stride phases); the kernel of an instruction passes its shapes, strides and padding as constants.
Inf or NaN weights: the input gradient multiplies them by the zeros of the padding and dilation
(0 * Inf = NaN) where the reference skips those (output, tap) pairs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import llvmlite.ir as ir

from ..loops import I8, I64, PTR, fma, gep, i64, if_then, intrinsic, load, masked_load, \
    masked_store, splat, store, vload, vstore
from . import register
from .matmul import call_shared, carry_loop, ceil_div, dtype_info, epilogue_rows, hsum, \
    kernel_function, lane_mask, opaque, shared_function, smax, smin, thread_range, zero_vector

FORCE = {}  # blocking overrides for tuning runs (benchmarks/kernels_dense.py --force)

WGRAD_CHUNK_BYTES = 64 * 1024  # target size of a chunk of images of the weight gradient
_ALIGN = 16  # elements; scratch regions start 64-byte aligned for f32 and f64


def _round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def _memset0(b, ptr, nbytes):
    memset = intrinsic(b.module, "llvm.memset.p0.i64", ir.VoidType(),
                       [PTR, I8, I64, ir.IntType(1)])
    nbytes = i64(nbytes) if isinstance(nbytes, int) else nbytes
    b.call(memset, [ptr, ir.Constant(I8, 0), nbytes, ir.Constant(ir.IntType(1), 0)])


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
    extra: int = 0   # zero rows after the last (the input gradient's rows that wrap around)

    @property
    def row_pitch(self) -> int:
        return self.sx * self.q

    @property
    def chan_pitch(self) -> int:
        return (self.rows + self.extra) * self.row_pitch

    @staticmethod
    def _span(n_src: int, d: int, off: int, limit: int):
        """Source indices s in [lo, hi) with 0 <= s*d + off < limit."""
        lo = max(0, ceil_div(-off, d))
        hi = min(n_src, ceil_div(limit - off, d))
        return lo, max(lo, hi)

    def data_rows(self):
        """First and last padded row that holds source data (the others are all zero)."""
        lo, hi = self._span(self.src_h, self.dr, self.offr, self.rows)
        return lo * self.dr + self.offr, (hi - 1) * self.dr + self.offr

    def params(self) -> dict:
        r_lo, r_hi = self._span(self.src_h, self.dr, self.offr, self.rows)
        c_lo, c_hi = self._span(self.src_w, self.dq, self.offq, self.sx * self.q)
        return dict(src_h=self.src_h, src_w=self.src_w, cp=self.chan_pitch, rp=self.row_pitch,
                    q=self.q, sx=self.sx, dr=self.dr, dq=self.dq, offr=self.offr, offq=self.offq,
                    r_lo=r_lo, r_hi=r_hi, c_lo=c_lo, c_hi=c_hi)

    @property
    def contiguous(self) -> bool:
        """Source rows land as contiguous runs (no phases, no dilation)."""
        return self.sx == 1 and self.dq == 1


_PREP_PARAMS = ("nchan", "src_h", "src_w", "cp", "rp", "q", "sx", "dr", "dq", "offr", "offq",
                "r_lo", "r_hi", "c_lo", "c_hi")


@dataclass(frozen=True)
class _PadKey:
    dtype: str
    contiguous: bool


def _pad(b, key: _PadKey, src, dst, nchan, s):
    """The padded copy of channels [0, nchan) of src into dst, with the copy's run-time shapes
    taken from `s` (a Shared with the _PREP_PARAMS but nchan)."""
    fn = shared_function(b.module, "conv.pad", key, 2, _PREP_PARAMS, _pad_body)
    call_shared(b, fn, [dst, src],
                dict({k: getattr(s, k) for k in _PREP_PARAMS if k != "nchan"}, nchan=nchan))


def _pad_body(s, key: _PadKey):
    ety, vl, es = dtype_info(key.dtype)
    vty = ir.VectorType(ety, vl)
    b = s.b
    dst, src = s.ptrs
    _memset0(b, dst, b.mul(b.mul(s.nchan, s.cp), i64(es)))
    with carry_loop(b, 0, s.nchan, [], "pad.c") as lc:
        s_c = gep(b, src, b.mul(lc.iv, b.mul(s.src_h, s.src_w)), ety)
        d_c = gep(b, dst, b.mul(lc.iv, s.cp), ety)
        with carry_loop(b, s.r_lo, s.r_hi, [], "pad.row") as lr:
            s_r = gep(b, s_c, b.mul(lr.iv, s.src_w), ety)
            d_r = gep(b, d_c, b.mul(b.add(b.mul(lr.iv, s.dr), s.offr), s.rp), ety)
            if key.contiguous:   # a run of c_hi - c_lo elements: vector copies, the last masked
                d_r = gep(b, d_r, b.add(s.offq, s.c_lo), ety)
                s_r = gep(b, s_r, s.c_lo, ety)
                run = b.sub(s.c_hi, s.c_lo)
                with carry_loop(b, 0, run, [], "pad.col", step=vl) as lq:
                    mask = lane_mask(b, b.sub(run, lq.iv), vl)
                    masked_store(b, masked_load(b, s_r, lq.iv, vty, mask), d_r, lq.iv, mask)
            else:
                with carry_loop(b, s.c_lo, s.c_hi, [], "pad.col") as lq:
                    col = b.add(b.mul(lq.iv, s.dq), s.offq)
                    at = b.add(b.mul(b.urem(col, s.sx), s.q), b.udiv(col, s.sx))
                    store(b, load(b, s_r, lq.iv, ety), d_r, at, ety)


# ------------------------------------------------------------------------------------------------
# the direct-convolution core (conv2d, conv2d_input_grad)
# ------------------------------------------------------------------------------------------------
# Register blocks (R, PR, PV) tried, in order of preference: few of them, so that kernels of
# different shapes share functions. A tile of PV vectors per row is the same work as PV row blocks
# of one vector, so PV = 1 but for images of one row (conv1d).
_BLOCKS = ((4, 4, 1), (8, 2, 1), (2, 8, 1), (1, 16, 1), (4, 6, 1), (8, 1, 2), (6, 2, 1))
# Blocks of the flat mode (one long row: PR = 1).
_FLAT_BLOCKS = ((8, 1, 2), (8, 1, 3), (6, 1, 3), (4, 1, 4), (6, 1, 2))


@dataclass(frozen=True)
class _Core:
    """out[n, o, y, x] = sum_{c, i, j} W(o, c, i, j) * P_n[c][y*sy + i][phase j%sx][x + j//sx]
    with W(o, c, i, j) = w[o*ws_o + c*ws_c + i*ws_i + j]; `flip` (the input gradient): W is a
    flipped, transposed copy of the OIHW weights w (shape `flip`) made in scratch."""
    dtype: str
    n: int
    ci: int
    co: int
    oy: int
    ox: int
    kh: int
    kw: int
    sy: int
    sx: int
    ws_o: int
    ws_c: int
    ws_i: int
    flip: tuple | None
    prep: _Prep
    src_image: int   # elements of one source image
    vl: int
    r: int = 0       # register block, chosen by `blocked`
    pr: int = 0
    pv: int = 0
    yc: int = 1      # row chunks per item (parallelism for small batches)
    flat: bool = False   # short rows: the output as one row of pitch rp (see `flat_len`)
    chan: bool = False   # short rows, O a multiple of vl: vectors over output channels (`_chan_body`)

    @property
    def flat_len(self) -> int:
        """Flat mode: out'[x'] = sum W * P[i*rp + x' + j] for x' = y*rp + x is out[y, x] (when
        x < ox; the other columns are computed and dropped): whole vectors for rows shorter than
        a vector. Needs unit strides. The core writes out' to a per-thread buffer, then the
        valid columns are copied to out."""
        return (self.oy - 1) * self.prep.row_pitch + self.ox

    def _best(self, blocks, oy, nvec):
        costs = []
        for r, pr, pv in blocks:
            acc = r * pr * pv
            # per tap: acc FMAs, r broadcasts and pr*pv unaligned vector loads (most split a
            # cache line: two L1 accesses); two FMAs and two loads per cycle
            cycles = max(acc, r + 2 * pr * pv) * max(1.0, 10.0 / acc)
            work = ceil_div(self.co, r) * ceil_div(oy, pr) * ceil_div(nvec, pv)
            costs.append(cycles * work)
        # the first block within 10% of the best: sharing a function saves compile time
        return next((blk, c) for blk, c in zip(blocks, costs) if c <= 1.1 * min(costs))

    def blocked(self, epilogue) -> "_Core":
        blk, cost = self._best(_BLOCKS, self.oy, ceil_div(self.ox, self.vl))
        flat = False
        if self.sy == 1 and self.sx == 1 and self.oy > 1:
            fblk, fcost = self._best(_FLAT_BLOCKS, 1, ceil_div(self.flat_len, self.vl))
            flat = fcost < 0.9 * cost
            blk = fblk if flat else blk
        flat = FORCE.get("flat", flat)
        r, pr, pv = FORCE.get("core", blk)
        chan = FORCE.get("chan", self.co % self.vl == 0 and 2 * self.ox <= self.vl and
                         self.sy == 1 and self.sx == 1 and not self.flip)
        if chan:
            return dataclasses.replace(self, r=self.vl, pr=max(1, self.vl // self.ox), pv=1,
                                       chan=True)
        items = self.n * ceil_div(self.co, r)
        yc = 1
        if items < 8 and epilogue is None and not flat:  # an epilogue needs whole planes
            yc = max(1, min(ceil_div(8, items), ceil_div(self.oy, pr)))
        return dataclasses.replace(self, r=r, pr=pr, pv=pv, yc=yc, flat=flat)

    @property
    def region_elems(self) -> int:
        """Per thread: a state slot, the padded copy of one image, slack for the over-reading
        last vectors."""
        slack = self.pv * self.vl + self.kw + self.vl
        return _ALIGN + _round_up(self.ci * self.prep.chan_pitch + slack, _ALIGN)

    @property
    def flip_elems(self) -> int:
        return _round_up(self.ci * self.co * self.kh * self.kw, _ALIGN) if self.flip else 0

    @property
    def tmp_elems(self) -> int:
        """Flat mode: the R rows out' of one item."""
        if not self.flat:
            return 0
        return _round_up(self.r * self.flat_len + self.pv * self.vl, _ALIGN)

    @property
    def wt_elems(self) -> int:
        """Channel mode: the weights as [c][i][j][o]."""
        return _round_up(self.ci * self.co * self.kh * self.kw, _ALIGN) if self.chan else 0

    @property
    def thread_elems(self) -> int:
        return self.region_elems + self.flip_elems + self.tmp_elems + self.wt_elems

    @property
    def rows_per_chunk(self) -> int:
        if self.flat:
            return 1
        return self.pr * ceil_div(ceil_div(self.oy, self.pr), self.yc)

    @property
    def items(self) -> int:
        if self.chan:
            return self.n * (self.co // self.vl)
        if self.flat:
            return self.n * ceil_div(self.co, self.r)
        return self.n * ceil_div(self.co, self.r) * ceil_div(self.oy, self.rows_per_chunk)

    def lower(self, module, name, epilogue):
        kf = kernel_function(module, name, 2, epilogue)
        b = kf.b
        ety = dtype_info(self.dtype)[0]
        region = gep(b, kf.scratch, b.mul(kf.tid, i64(self.thread_elems)), ety,
                     name="conv.region")
        store(b, i64(-1), region, i64(0), I64)   # no image in the padded copy yet
        w = kf.ins[1]
        if self.flip:
            w = gep(b, region, i64(self.region_elems), ety, name="conv.flipped")
            o, c, kh, kw = self.flip   # dst[c, o, i, j] = src[o, c, kh-1-i, kw-1-j]
            taps = kh * kw
            _weights_copy(b, self.dtype, w, kf.ins[1], o, c, taps, (taps, o * taps, 1),
                          (c * taps, taps, taps - 1, -1))
        first, last = self.prep.data_rows()
        yc = ceil_div(self.oy, self.rows_per_chunk)
        plane = self.oy * self.ox
        shape = dict(self.prep.params(), ci=self.ci, co=self.co, oy=self.oy, ox=self.ox, kh=self.kh,
                     sy=self.sy, ws_o=self.ws_o, ws_c=self.ws_c, ws_i=self.ws_i,
                     src_image=self.src_image, yc=yc, rows_per_chunk=self.rows_per_chunk,
                     ob_count=ceil_div(self.co, self.r), first=first, last=last,
                     on=self.co * plane, oc=plane, orow=self.ox, orel=0, fpitch=1 << 40)
        ptrs = [kf.out, kf.ins[0], w, region]
        t0, t1 = thread_range(b, self.items, kf.tid, kf.nthreads)
        if self.chan:
            self._lower_chan(b, kf, module, region, shape, t0, t1, epilogue)
            b.ret_void()
            return
        fn = self._function(module)
        if self.flat:
            self._lower_flat(b, kf, fn, ptrs, shape, t0, t1, epilogue)
        elif epilogue is None:
            call_shared(b, fn, ptrs, dict(shape, t0=t0, t1=t1))
        else:   # item by item (R whole planes), then the epilogue on them while they are in cache
            plane = self.oy * self.ox
            with carry_loop(b, t0, t1, [], "conv.epilogue") as lt:
                call_shared(b, fn, ptrs, dict(shape, t0=lt.iv, t1=b.add(lt.iv, i64(1))))
                ob_count = ceil_div(self.co, self.r)
                n = b.udiv(lt.iv, i64(ob_count))
                o0 = b.mul(b.urem(lt.iv, i64(ob_count)), i64(self.r))
                nchan = b.sub(smin(b, b.add(o0, i64(self.r)), self.co), o0)
                start = b.mul(b.add(b.mul(n, i64(self.co)), o0), i64(plane))
                epilogue_rows(b, kf, epilogue, start, b.mul(nchan, i64(plane)))
        b.ret_void()

    def _lower_chan(self, b, kf, module, region, shape, t0, t1, epilogue):
        """Item by item (an image and vl output channels, whole planes), then the epilogue."""
        ety, vl, _ = dtype_info(self.dtype)
        wt = gep(b, region, i64(self.region_elems + self.flip_elems + self.tmp_elems), ety,
                 name="conv.wt")
        taps = self.kh * self.kw   # (taps contiguous: ws_i == kw without `flip`)
        _weights_copy(b, self.dtype, wt, kf.ins[1], self.co, self.ci, taps,
                      (1, taps * self.co, self.co), (self.ws_o, self.ws_c, 0, 1))
        key = _ChanKey(self.dtype, self.ox, self.pr, self.prep.contiguous)
        fn = shared_function(module, "conv_chan", key, 4, _CHAN_PARAMS, _chan_body)
        plane = self.oy * self.ox
        shape = dict(shape, kw=self.kw)
        if epilogue is None:
            call_shared(b, fn, [kf.out, kf.ins[0], wt, region], dict(shape, t0=t0, t1=t1))
            return
        with carry_loop(b, t0, t1, [], "conv.chan.item") as lt:
            call_shared(b, fn, [kf.out, kf.ins[0], wt, region],
                        dict(shape, t0=lt.iv, t1=b.add(lt.iv, i64(1))))
            epilogue_rows(b, kf, epilogue, b.mul(lt.iv, i64(vl * plane)), i64(vl * plane))

    def _lower_flat(self, b, kf, fn, ptrs, shape, t0, t1, epilogue):
        """Item by item: the core writes out' of the item's R channels into the thread's buffer
        (one row of flat_len, all kernel rows), then the valid columns go to out."""
        ety, vl, _ = dtype_info(self.dtype)
        vty = ir.VectorType(ety, vl)
        tmp = gep(b, ptrs[3], i64(self.region_elems + self.flip_elems), ety, name="conv.flat")
        fl, rp, plane = self.flat_len, self.prep.row_pitch, self.oy * self.ox
        shape = dict(shape, oy=1, ox=fl, on=0, oc=fl, orow=0, orel=1, yc=1, rows_per_chunk=1,
                     fpitch=rp)
        ob_count = ceil_div(self.co, self.r)
        with carry_loop(b, t0, t1, [], "conv.flat.item") as lt:
            call_shared(b, fn, [tmp] + ptrs[1:], dict(shape, t0=lt.iv, t1=b.add(lt.iv, i64(1))))
            n = b.udiv(lt.iv, i64(ob_count))
            o0 = b.mul(b.urem(lt.iv, i64(ob_count)), i64(self.r))
            nchan = b.sub(smin(b, b.add(o0, i64(self.r)), self.co), o0)
            start = b.mul(b.add(b.mul(n, i64(self.co)), o0), i64(plane))
            dst = gep(b, kf.out, start, ety)
            with carry_loop(b, 0, b.mul(nchan, i64(self.oy)), [], "conv.flat.row") as lr:
                o = b.udiv(lr.iv, i64(self.oy))
                y = b.urem(lr.iv, i64(self.oy))
                src_row = gep(b, tmp, b.add(b.mul(o, i64(fl)), b.mul(y, i64(rp))), ety)
                dst_row = gep(b, dst, b.mul(lr.iv, i64(self.ox)), ety)
                with carry_loop(b, 0, self.ox, [], "conv.flat.col", step=vl) as lq:
                    mask = lane_mask(b, b.sub(i64(self.ox), lq.iv), vl)
                    masked_store(b, masked_load(b, src_row, lq.iv, vty, mask), dst_row, lq.iv,
                                 mask)
            epilogue_rows(b, kf, epilogue, start, b.mul(nchan, i64(plane)))

    def _function(self, module):
        key = _CoreKey(self.dtype, self.r, self.pr, self.pv, self.kw, self.sx,
                       self.prep.contiguous)
        return shared_function(module, "conv", key, 4, _CORE_PARAMS, _core_body)


@dataclass(frozen=True)
class _CoreKey:
    """What the shared function of the convolution core depends on at compile time."""
    dtype: str
    r: int
    pr: int
    pv: int
    kw: int
    sx: int
    contiguous: bool   # of the padded copy


def _core_body(s, k: _CoreKey):
    """Items [t0, t1) with the run-time shapes of `s`; ptrs: out, src, w, thread region."""
    b = s.b
    out, src, w, region = s.ptrs
    ety, vl, _ = dtype_info(k.dtype)
    r_, pr_, pv_ = k.r, k.pr, k.pv
    pbuf = gep(b, region, i64(_ALIGN), ety, name="conv.padded")
    per_n = b.mul(s.ob_count, s.yc)
    co1, oy1 = b.sub(s.co, i64(1)), b.sub(s.oy, i64(1))
    row_step = b.mul(s.sy, s.rp)
    with carry_loop(b, s.t0, s.t1, [load(b, region, i64(0), I64)], "conv.item") as item:
        t = item.iv
        n = b.udiv(t, per_n, name="conv.n")
        rest = b.urem(t, per_n)
        o0 = b.mul(b.udiv(rest, s.yc), i64(r_), name="conv.o0")
        y_begin = b.mul(b.urem(rest, s.yc), s.rows_per_chunk, name="conv.y0")
        y_end = smin(b, b.add(y_begin, s.rows_per_chunk), s.oy)
        with if_then(b, b.icmp_signed("!=", n, item.vals[0]), name="conv.pad"):
            _pad(b, _PadKey(k.dtype, k.contiguous), gep(b, src, b.mul(n, s.src_image), ety),
                 pbuf, s.ci, s)
        item.next = [n]
        chans = [smin(b, b.add(o0, i64(r)), co1) for r in range(r_)]
        wrow = [gep(b, w, b.mul(o, s.ws_o), ety) for o in chans]
        out_n = gep(b, out, b.mul(n, s.on), ety)
        o_rel = b.mul(o0, s.orel)
        with carry_loop(b, y_begin, y_end, [], "conv.y", step=pr_) as ly:
            ys = [smin(b, b.add(ly.iv, i64(p)), oy1) for p in range(pr_)]
            with carry_loop(b, 0, s.ox, [], "conv.x", step=pv_ * vl) as lx:
                x0 = lx.iv
                # kernel rows that see some data row of P (the others only padding); in the flat
                # mode the block's vectors span the output rows x0 / fpitch ... (its end) / fpitch
                y_lo = b.add(ys[0], b.udiv(x0, s.fpitch))
                y_hi = b.add(ys[-1], b.udiv(b.add(x0, i64(pv_ * vl - 1)), s.fpitch))
                i_lo = smax(b, b.sub(s.first, b.mul(y_hi, s.sy)), 0)
                i_hi = smin(b, b.sub(b.add(s.last, i64(1)), b.mul(y_lo, s.sy)), s.kh)
                xrow = [opaque(b, b.add(b.mul(y, row_step), x0)) for y in ys]
                zero = zero_vector(ety, vl)
                with carry_loop(b, 0, s.ci, [zero] * (r_ * pr_ * pv_), "conv.c") as lc:
                    pc = gep(b, pbuf, opaque(b, b.mul(lc.iv, s.cp)), ety)
                    wc = opaque(b, b.mul(lc.iv, s.ws_c))
                    with carry_loop(b, i_lo, i_hi, lc.vals, "conv.kh") as li:
                        pi = gep(b, pc, opaque(b, b.mul(li.iv, s.rp)), ety)
                        wi = b.add(wc, b.mul(li.iv, s.ws_i))
                        li.next = _core_taps(b, k, li.vals, pi, wi, xrow, wrow, s.q)
                    lc.next = li.out
                masks = [lane_mask(b, b.sub(b.sub(s.ox, x0), i64(v * vl)), vl)
                         for v in range(pv_)]
                for r in range(r_):
                    o_plane = b.mul(b.sub(chans[r], o_rel), s.oc)
                    for p in range(pr_):
                        row = gep(b, out_n, b.add(b.add(o_plane, b.mul(ys[p], s.orow)), x0), ety)
                        for v in range(pv_):
                            masked_store(b, lc.out[(r * pr_ + p) * pv_ + v], row, i64(v * vl),
                                         masks[v])
    store(b, item.out[0], region, i64(0), I64)


def _core_taps(b, k: _CoreKey, acc, pi, wi, xrow, wrow, q):
    """FMAs of the KW taps of one kernel row into the R*PR*PV accumulators; pi / wi locate the
    input channel and kernel row in P and in the weights."""
    ety, vl, _ = dtype_info(k.dtype)
    vty = ir.VectorType(ety, vl)
    r_, pr_, pv_ = k.r, k.pr, k.pv
    acc = list(acc)
    rows = [gep(b, pi, xrow[p], ety) for p in range(pr_)]
    bases = [[gep(b, row, b.mul(q, i64(ph)), ety) if ph else row for row in rows]
             for ph in range(k.sx)]
    wbase = [gep(b, wr, wi, ety) for wr in wrow]
    for j in range(k.kw):
        base = bases[j % k.sx]
        xv = [[vload(b, base[p], i64(j // k.sx + v * vl), vty) for v in range(pv_)]
              for p in range(pr_)]
        for r in range(r_):
            wv = splat(b, load(b, wbase[r], i64(j), ety), vl)
            for p in range(pr_):
                for v in range(pv_):
                    i = (r * pr_ + p) * pv_ + v
                    acc[i] = fma(b, wv, xv[p][v], acc[i])
    return acc


_CORE_PARAMS = ("t0", "t1", "ci", "co", "oy", "ox", "kh", "sy", "ws_o", "ws_c", "ws_i",
                "src_image", "yc", "rows_per_chunk", "ob_count", "first", "last", "on", "oc", "orow",
                "orel", "fpitch") + \
    tuple(k for k in _PREP_PARAMS if k != "nchan")


@dataclass(frozen=True)
class _ChanKey:
    """Compile-time constants of the channel mode: PR rows of OX pixels are the accumulators."""
    dtype: str
    ox: int
    pr: int
    contiguous: bool   # of the padded copy


_CHAN_PARAMS = ("t0", "t1", "ci", "co", "oy", "kh", "kw", "src_image", "ob_count") + \
    tuple(k for k in _PREP_PARAMS if k != "nchan")


def _transpose(b, vs):
    """The transpose of a square matrix of len(vs) == vl vectors (swaps of off-diagonal blocks
    of halving size: two-source shuffles)."""
    n = len(vs)
    vs = list(vs)
    blk = n // 2
    while blk >= 1:
        lo = [l for l in range(n) if not l & blk]
        for a in range(n):
            if a & blk:
                continue
            c = a + blk
            m_a, m_c = [0] * n, [0] * n
            for l in lo:
                m_a[l], m_a[l + blk] = l, n + l
                m_c[l], m_c[l + blk] = l + blk, n + l + blk
            va, vc = vs[a], vs[c]
            vs[a] = b.shuffle_vector(va, vc, ir.Constant(ir.VectorType(ir.IntType(32), n), m_a))
            vs[c] = b.shuffle_vector(va, vc, ir.Constant(ir.VectorType(ir.IntType(32), n), m_c))
        blk //= 2
    return vs


def _chan_body(s, k: _ChanKey):
    """Channel mode, items [t0, t1) (image, block of vl output channels): for PR output rows of
    OX pixels at a time, PR*OX vector accumulators over the vl channels; each tap is one vector
    of weights (wt[c][i][j][o]) and a broadcast input pixel per accumulator. The accumulators
    are transposed (vl pixels per channel: rows of the output plane, contiguous) and stored."""
    b = s.b
    out, src, wt, region = s.ptrs
    ety, vl, _ = dtype_info(k.dtype)
    vty = ir.VectorType(ety, vl)
    npx = k.pr * k.ox
    pbuf = gep(b, region, i64(_ALIGN), ety, name="conv.padded")
    plane = b.mul(s.oy, i64(k.ox))
    oy1 = b.sub(s.oy, i64(1))
    taps_c = b.mul(b.mul(s.kh, s.kw), s.co)
    with carry_loop(b, s.t0, s.t1, [load(b, region, i64(0), I64)], "conv.chan.item") as item:
        n = b.udiv(item.iv, s.ob_count, name="conv.n")
        o0 = b.mul(b.urem(item.iv, s.ob_count), i64(vl), name="conv.o0")
        with if_then(b, b.icmp_signed("!=", n, item.vals[0]), name="conv.pad"):
            _pad(b, _PadKey(k.dtype, k.contiguous), gep(b, src, b.mul(n, s.src_image), ety),
                 pbuf, s.ci, s)
        item.next = [n]
        out_o = gep(b, out, b.mul(b.add(b.mul(n, s.co), o0), plane), ety)
        wt_o = gep(b, wt, o0, ety)
        with carry_loop(b, 0, s.oy, [], "conv.chan.y", step=k.pr) as ly:
            rows = [opaque(b, b.mul(smin(b, b.add(ly.iv, i64(p)), oy1), s.rp))
                    for p in range(k.pr)]
            with carry_loop(b, 0, s.ci, [zero_vector(ety, vl)] * npx, "conv.chan.c") as lc:
                pc = gep(b, pbuf, opaque(b, b.mul(lc.iv, s.cp)), ety)
                wc = gep(b, wt_o, opaque(b, b.mul(lc.iv, taps_c)), ety)
                with carry_loop(b, 0, s.kh, lc.vals, "conv.chan.kh") as li:
                    pi = gep(b, pc, opaque(b, b.mul(li.iv, s.rp)), ety)
                    wi = gep(b, wc, opaque(b, b.mul(li.iv, b.mul(s.kw, s.co))), ety)
                    with carry_loop(b, 0, s.kw, li.vals, "conv.chan.kw") as lj:
                        # (a run-time loop: unrolled, the KW taps would make the function KW times
                        # as big, for a few percent)
                        prow = [gep(b, pi, b.add(r, lj.iv), ety) for r in rows]
                        wv = vload(b, wi, b.mul(lj.iv, s.co), vty)
                        acc = list(lj.vals)
                        for p in range(k.pr):
                            for x in range(k.ox):
                                px = splat(b, load(b, prow[p], i64(x), ety), vl)
                                acc[p * k.ox + x] = fma(b, px, wv, acc[p * k.ox + x])
                        lj.next = acc
                    li.next = lj.out
                lc.next = li.out
            cols = _transpose(b, list(lc.out) + [zero_vector(ety, vl)] * (vl - npx))
            count = b.mul(b.sub(smin(b, b.add(ly.iv, i64(k.pr)), s.oy), ly.iv), i64(k.ox))
            mask = lane_mask(b, count, vl)
            at = b.mul(ly.iv, i64(k.ox))
            for o in range(vl):
                masked_store(b, cols[o], gep(b, out_o, b.mul(i64(o), plane), ety), at, mask)
    store(b, item.out[0], region, i64(0), I64)


@dataclass(frozen=True)
class _DtypeKey:
    dtype: str


def _weights_copy(b, dtype: str, dst, src, o: int, c: int, taps: int, d, s_):
    """dst[o*d[0] + c*d[1] + t*d[2]] = src[o*s_[0] + c*s_[1] + s_[2] + t*s_[3]] for all output
    channels, input channels and taps t (the flipped, transposed weights of the input gradient;
    the [c][i][j][o] weights of the channel mode)."""
    def body(s, key):
        ety = dtype_info(key.dtype)[0]
        b = s.b
        dst, src = s.ptrs
        with carry_loop(b, 0, s.o, [], "wcopy.o") as lo:
            with carry_loop(b, 0, s.c, [], "wcopy.c") as lc:
                d_oc = gep(b, dst, b.add(b.mul(lo.iv, s.d_o), b.mul(lc.iv, s.d_c)), ety)
                s_oc = gep(b, src, b.add(b.add(b.mul(lo.iv, s.s_o), b.mul(lc.iv, s.s_c)), s.s_0),
                           ety)
                with carry_loop(b, 0, s.taps, [], "wcopy.tap") as lt:
                    store(b, load(b, s_oc, b.mul(lt.iv, s.s_t), ety), d_oc,
                          b.mul(lt.iv, s.d_t), ety)
    names = ("o", "c", "taps", "d_o", "d_c", "d_t", "s_o", "s_c", "s_0", "s_t")
    fn = shared_function(b.module, "conv.wcopy", _DtypeKey(dtype), 2, names, body)
    call_shared(b, fn, [dst, src], dict(zip(names, (o, c, taps) + tuple(d) + tuple(s_))))


def _conv_core(ins, epilogue=None) -> _Core:
    x, w = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oy, ox = ins.out.shape[2:]
    _, vl, _ = dtype_info(ins.out.dtype)
    rows = (oy - 1) * sh + kh
    q = ceil_div((ox - 1) * sw + kw, sw)
    prep = _Prep(h, wd, rows, q, sw, 1, 1, ph, pw)
    core = _Core(ins.out.dtype, n, c, o, oy, ox, kh, kw, sh, sw, c * kh * kw, kh * kw, kw, None,
                 prep, c * h * wd, vl)
    return core.blocked(epilogue)


def _input_grad_core(ins, epilogue=None) -> _Core:
    ct, w = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    n, o, oh, ow = ct.shape
    _, c, kh, kw = w.shape
    h, wd = ins.params["in_hw"]
    _, vl, _ = dtype_info(ins.out.dtype)
    if pw == 0:
        # Rows of pitch W instead of W + KW - 1: the KW - 1 columns of right padding overlap the
        # KW - 1 columns of left padding of the next row (all zeros either way), so that rows
        # of output pixels are contiguous in the flat mode (out' is out: whole vectors). The
        # last row's reads run into one more (zero) row.
        prep = _Prep(oh, ow, h - 1 + kh, wd, 1, sh, sw, kh - 1 - ph, kw - 1, extra=1)
    else:
        prep = _Prep(oh, ow, h - 1 + kh, wd - 1 + kw, 1, sh, sw, kh - 1 - ph, kw - 1 - pw)
    # out channel (of the core) = c, in channel = o, tap (i, j) is w[o, c, kh-1-i, kw-1-j]
    core = _Core(ins.out.dtype, n, o, c, h, wd, kh, kw, 1, 1, o * kh * kw, kh * kw, kw,
                 (o, c, kh, kw), prep, o * oh * ow, vl)
    return core.blocked(epilogue)


def _register_core(prim: str, make):
    """Register the lowering of a primitive computed by the shared core; `make(ins) -> _Core`.
    (The scratch size does not depend on the epilogue: only `yc` does, not the region.)"""
    def scratch_bytes(ins, nthreads):
        core = make(ins)
        return nthreads * core.thread_elems * dtype_info(ins.out.dtype)[2]

    def lower(module: ir.Module, name: str, ins, epilogue=None) -> None:
        make(ins, epilogue).lower(module, name, epilogue)

    register(prim, scratch_bytes=scratch_bytes, epilogue=True)(lower)


_register_core("conv2d", _conv_core)
_register_core("conv2d_input_grad", _input_grad_core)


# ------------------------------------------------------------------------------------------------
# conv2d_weight_grad
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _WGrad:
    """dw[o, c, i, j] = sum_{n, y, x} ct[n, o, y, x] * P_n[c][y*sy + i][phase j%sx][x + j//sx].

    An item is (input channel c, block of R output channels, group of GR kernel rows) with
    R*GR*KW vector accumulators. Items are numbered by blocks of CB input channels, then output
    channel block, channel, row group. A thread takes the channel blocks of its items one by one;
    for each, the images go by in chunks of `ng` whose cotangents fit in L2: the padded copies of
    the block's channels of the chunk's images are made (a thread copies only its channels), then
    every item of the block adds the chunk to its vector accumulators, kept in scratch between
    chunks (a block of cotangent rows is reused from L1 by the CB channels). After the last chunk
    the accumulators are summed horizontally into out, once per item."""
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
    prep: _Prep
    vl: int
    r: int
    gr: int   # kernel rows per item
    ng: int   # images per chunk
    cb: int   # input channels per channel block
    flat: bool = False   # see `flat_len`

    @property
    def flat_len(self) -> int:
        """Flat mode (short rows, unit strides): the cotangents of a chunk are copied into rows of
        the padded copy's pitch rp, zeros between them, and the sum runs over x' = y*rp + x in
        [0, flat_len) as one row: whole vectors where rows are shorter than a vector."""
        return (self.oy - 1) * self.prep.row_pitch + self.ox

    @property
    def row_len(self) -> int:
        return self.flat_len if self.flat else self.ox

    @property
    def ct_main(self) -> int:
        """Flat mode: the chunk's cotangents; then (both modes) a table of lane masks, one
        vl-bit integer per vector of a row, bits set at the real pixels."""
        return _round_up(self.ng * self.o * self.flat_len, _ALIGN) if self.flat else 0

    @property
    def ct_elems(self) -> int:
        return self.ct_main + _round_up(self.row_len + self.vl, _ALIGN)

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
        return _round_up(self.per_cb * self.r * self.gr * self.kw * self.vl, _ALIGN)

    @property
    def region_elems(self) -> int:
        return self.partial_elems + _round_up(self.cb * self.ng * self.prep.chan_pitch
                                              + self.slack, _ALIGN) + self.ct_elems


def _wgrad_plan(ins) -> _WGrad:
    ct, x = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    kh, kw = ins.params["kernel"]
    n, o, oy, ox = ct.shape
    _, c, h, wd = x.shape
    _, vl, es = dtype_info(ins.out.dtype)
    prep = _Prep(h, wd, (oy - 1) * sh + kh, ceil_div((ox - 1) * sw + kw, sw), sw, 1, 1,
                 ph, pw)
    # Few choices, so that kernels of different shapes share functions: one kernel row per item
    # (GR = 1; a whole 3-wide kernel for a single output channel), as many output channels R as
    # the registers hold (R*KW accumulators + min(R, KW) operands + 1), fewer only for small O.
    gr = kh if o == 1 and kw <= 3 else 1
    # (Few choices: kernels of different shapes share functions, which saves compile time.)
    r = next((r for r in (8, 4, 2) if r * gr * kw + min(r, gr * kw) <= 29), 1)
    while r > 1 and r // 2 >= o:
        r //= 2
    r, gr = FORCE.get("wgrad", (r, gr))
    flat_len = (oy - 1) * prep.row_pitch + ox
    flat = sh == 1 and sw == 1 and oy > 1 and \
        ceil_div(flat_len, vl) <= 0.85 * oy * ceil_div(ox, vl)
    flat = FORCE.get("wflat", flat)
    # a chunk's cotangents stay in L2 while all input channels go by
    ct_image = o * (flat_len if flat else oy * ox)
    ng = max(1, min(n, WGRAD_CHUNK_BYTES // ((prep.chan_pitch + ct_image) * es)))
    ng = FORCE.get("ng", ng)
    cb = ceil_div(c, ceil_div(c, 8))
    return _WGrad(ins.out.dtype, n, c, o, oy, ox, kh, kw, sh, sw, prep, vl, r, gr, ng, cb, flat)


def _wgrad_scratch(ins, nthreads):
    return nthreads * _wgrad_plan(ins).region_elems * dtype_info(ins.out.dtype)[2]


_WGRAD_PARAMS = ("t0", "t1", "n", "c", "o", "oy", "ox", "sy", "kh", "ng", "cb", "groups",
                 "per_cb", "slack", "partial", "ct_oy", "ct_ox", "ct_elems", "ct_main", "flat", "tpitch") + tuple(k for k in _PREP_PARAMS if k != "nchan")


@register("conv2d_weight_grad", scratch_bytes=_wgrad_scratch)
def _conv2d_weight_grad_lower(module: ir.Module, name: str, ins) -> None:
    p = _wgrad_plan(ins)
    kf = kernel_function(module, name, 2)
    b = kf.b
    ety = dtype_info(p.dtype)[0]
    region = gep(b, kf.scratch, b.mul(kf.tid, i64(p.region_elems)), ety, name="wgrad.region")
    t0, t1 = thread_range(b, p.items, kf.tid, kf.nthreads)
    key = _WGradKey(p.dtype, p.r, p.gr, p.kw, p.sx)
    fn = shared_function(module, "conv_wgrad", key, 4, _WGRAD_PARAMS, _wgrad_body)
    call_shared(b, fn, [kf.out, kf.ins[0], kf.ins[1], region],
                dict(p.prep.params(), t0=t0, t1=t1, n=p.n, c=p.c, o=p.o, oy=p.oy, ox=p.ox,
                     sy=p.sy, kh=p.kh, ng=p.ng, cb=p.cb, groups=p.groups, per_cb=p.per_cb,
                     slack=p.slack, partial=p.partial_elems, ct_oy=p.oy,
                     ct_ox=p.ox, ct_elems=p.ct_elems, ct_main=p.ct_main, flat=int(p.flat),
                     tpitch=p.prep.row_pitch if p.flat else p.ox)
                | (dict(oy=1, ox=p.flat_len) if p.flat else {}))
    b.ret_void()


@dataclass(frozen=True)
class _WGradKey:
    """What the shared function of the weight gradient depends on at compile time."""
    dtype: str
    r: int
    gr: int
    kw: int
    sx: int

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
    copies = b.mul(b.mul(s.cb, s.ng), s.cp)
    _memset0(b, gep(b, pbuf, copies, ety), b.mul(s.slack, i64(es)))
    vty = ir.VectorType(ety, vl)
    # flat mode: the chunk's cotangents in rows of pitch rp (the columns between stay zero);
    # both modes: the table of the real pixels of a row (flat: their mask keeps 0 * Inf out of
    # the sums)
    flat = b.icmp_signed("!=", s.flat, i64(0))
    ctbuf = gep(b, pbuf, b.add(copies, s.slack), ety, name="wgrad.ct")
    _memset0(b, ctbuf, b.mul(s.ct_elems, i64(es)))
    table = gep(b, ctbuf, s.ct_main, ety, name="wgrad.table")
    mty = ir.IntType(vl)
    with carry_loop(b, 0, s.ox, [], "wgrad.table") as lt:   # (zeroed above)
        real = b.zext(b.icmp_signed("<", b.urem(lt.iv, s.tpitch), s.ct_ox), mty)
        at = b.udiv(lt.iv, i64(vl))
        bit = b.shl(real, b.trunc(b.urem(lt.iv, i64(vl)), mty))
        store(b, b.or_(load(b, table, at, mty), bit), table, at, mty)
    acc_elems = i64(p.nacc * vl)
    cb_first = b.udiv(s.t0, s.per_cb)
    cb_end = b.udiv(b.add(s.t1, b.sub(s.per_cb, i64(1))), s.per_cb)
    with carry_loop(b, cb_first, cb_end, [], "wgrad.cblock") as lcb:
        cblock = lcb.iv
        it0 = smax(b, s.t0, b.mul(cblock, s.per_cb), name="wgrad.it0")
        it1 = smin(b, s.t1, b.mul(b.add(cblock, i64(1)), s.per_cb), name="wgrad.it1")
        _memset0(b, partials, b.mul(b.mul(b.sub(it1, it0), acc_elems), i64(es)))
        with carry_loop(b, 0, s.n, [], "wgrad.chunk", step=s.ng) as lch:
            n0 = lch.iv
            nimg = b.sub(smin(b, b.add(n0, s.ng), s.n), n0, name="wgrad.nimg")
            pairs = b.mul(s.cb, s.ng)
            with carry_loop(b, 0, pairs, [], "wgrad.pad") as lpn:
                # (channel, image) pairs of the block; the channels past C copy the last one
                c = smin(b, b.add(b.mul(cblock, s.cb), b.udiv(lpn.iv, s.ng)), b.sub(s.c, i64(1)))
                nn = b.urem(lpn.iv, s.ng)
                with if_then(b, b.icmp_signed("<", nn, nimg), name="wgrad.pad.img"):
                    img = b.add(b.mul(b.add(n0, nn), s.c), c)
                    src = gep(b, x, b.mul(img, b.mul(s.src_h, s.src_w)), ety)
                    _pad(b, _PadKey(p.dtype, p.sx == 1), src,
                         gep(b, pbuf, b.mul(lpn.iv, s.cp), ety), i64(1), s)
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
                _, o0, c_in, _, g = _wgrad_decode(b, s, p, item.iv)
                p_c = gep(b, pbuf, b.add(b.mul(c_in, b.mul(s.ng, s.cp)),
                                         b.mul(g, b.mul(i64(p.gr), s.rp))), ety)
                chans = [smin(b, b.add(o0, i64(r)), b.sub(s.o, i64(1))) for r in range(p.r)]
                mine = gep(b, partials, b.mul(b.sub(item.iv, it0), acc_elems), ety)
                acc = [vload(b, mine, i64(k * vl), ir.VectorType(ety, vl)) for k in range(p.nacc)]
                acc = _wgrad_tile(b, s, p, ct_chunk, p_c, n0_ct, nimg, chans, acc, table)
                for k, v in enumerate(acc):
                    vstore(b, v, mine, i64(k * vl))
        with carry_loop(b, it0, it1, [], "wgrad.out") as lo:
            _wgrad_item_out(b, s, p, out, lo.iv,
                            gep(b, partials, b.mul(b.sub(lo.iv, it0), acc_elems), ety))


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


def _wgrad_tile(b, s, p: _WGradKey, ct, p_c, n0, nimg, chans, acc, table):
    """The R x GR x KW vector accumulators `acc` of one item plus the images of the chunk
    (`table`: the lane masks of the real pixels of a row)."""
    ety, vl, _ = dtype_info(p.dtype)
    vty = ir.VectorType(ety, vl)
    plane = b.mul(s.oy, s.ox)
    ntap = p.gr * p.kw
    ct_rows = [b.mul(o, plane) for o in chans]
    row_step = b.mul(s.sy, s.rp)
    with carry_loop(b, 0, nimg, acc, "wgrad.n") as ln:
        ct_n = gep(b, ct, b.mul(b.add(n0, ln.iv), b.mul(s.o, plane)), ety)
        p_n = gep(b, p_c, b.mul(ln.iv, s.cp), ety)
        with carry_loop(b, 0, s.oy, ln.vals, "wgrad.y") as ly:
            # opaque offsets keep the many addresses out of loop strength reduction (compile time)
            ct_y = [gep(b, ct_n, opaque(b, b.add(row, b.mul(ly.iv, s.ox))), ety) for row in ct_rows]
            x_y = gep(b, p_n, opaque(b, b.mul(ly.iv, row_step)), ety)
            phases = [b.mul(s.q, i64(ph)) for ph in range(p.sx)]
            with carry_loop(b, 0, s.ox, ly.vals, "wgrad.x", step=vl) as lx:
                x0 = lx.iv
                # the real pixels only (flat: no 0 * Inf from the pixels between the rows)
                bits = load(b, table, b.udiv(x0, i64(vl)), ir.IntType(vl))
                mask = b.bitcast(bits, ir.VectorType(ir.IntType(1), vl))
                xmask = mask

                def x_at(t):
                    i, j = divmod(t, p.kw)
                    at = b.add(b.add(b.mul(i64(i), s.rp), phases[j % p.sx]), x0)
                    return masked_load(b, x_y, b.add(at, i64(j // p.sx)), vty, xmask)

                acc = list(lx.vals)
                # keep the smaller operand set in registers, stream the other (register pressure:
                # accumulators + min(R, taps) + 1)
                if ntap <= p.r:
                    xv = [x_at(t) for t in range(ntap)]
                    for r in range(p.r):
                        cv = masked_load(b, ct_y[r], x0, vty, mask)
                        for t in range(ntap):
                            acc[r * ntap + t] = fma(b, cv, xv[t], acc[r * ntap + t])
                else:
                    cv = [masked_load(b, row, x0, vty, mask) for row in ct_y]
                    for t in range(ntap):
                        xv = x_at(t)
                        for r in range(p.r):
                            acc[r * ntap + t] = fma(b, cv[r], xv, acc[r * ntap + t])
                lx.next = acc
            ly.next = lx.out
        ln.next = ly.out
    return ln.out

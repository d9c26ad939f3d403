"""What the convolution kernels share: the zero-padded copy of an image (`Prep`, `pad`), the
weights copy (`weights_copy`), the scratch alignment and the blocking overrides."""
from __future__ import annotations


import llvmlite.ir as ir

from ... import record
from ...loops import carry_loop, gep, i64, load, masked_load, masked_store, splat, store, vstore
from ..toolkit import DtypeKey, I64Arg, Params, ceil_div, dtype_info, lane_mask, memset0, params, \
    shared_function, smin

FORCE = {}  # blocking overrides for tuning runs (benchmarks/kernels_dense.py --force)

ALIGN = 16  # elements; scratch regions start 64-byte aligned for f32 and f64


@params
class PrepParams(Params):
    """The run-time shapes of a padded copy (see `Prep.params`): source image src_h x src_w,
    channel pitch cp and row pitch rp of the copy, q columns per phase, sx phases, dilation
    dr / dq and offset offr / offq of a source pixel, source rows [r_lo, r_hi) and columns
    [c_lo, c_hi) that land inside the copy."""
    src_h: I64Arg
    src_w: I64Arg
    cp: I64Arg
    rp: I64Arg
    q: I64Arg
    sx: I64Arg
    dr: I64Arg
    dq: I64Arg
    offr: I64Arg
    offq: I64Arg
    r_lo: I64Arg
    r_hi: I64Arg
    c_lo: I64Arg
    c_hi: I64Arg


@params
class PadParams(Params):
    """The padded copy of channels [0, nchan)."""
    nchan: I64Arg
    prep: PrepParams


@record(frozen=True)
class Prep:
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

    def __post_init__(self):
        # the phase-row copy (`_phase_rows`, keyed by sx alone) has no dilation
        assert self.sx == 1 or self.dq == 1, "a copy with phases has no column dilation"

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

    def params(self) -> PrepParams:
        r_lo, r_hi = self._span(self.src_h, self.dr, self.offr, self.rows)
        c_lo, c_hi = self._span(self.src_w, self.dq, self.offq, self.sx * self.q)
        return PrepParams(src_h=self.src_h, src_w=self.src_w, cp=self.chan_pitch, rp=self.row_pitch,
                    q=self.q, sx=self.sx, dr=self.dr, dq=self.dq, offr=self.offr, offq=self.offq,
                    r_lo=r_lo, r_hi=r_hi, c_lo=c_lo, c_hi=c_hi)

    @property
    def contiguous(self) -> bool:
        """Source rows land as contiguous runs (no phases, no dilation)."""
        return self.sx == 1 and self.dq == 1



@record(frozen=True)
class PadKey:
    """What the shared function of the padded copy depends on at compile time. phases > 1: the
    copy's sx (it must be), and no dilation (dq = 1): each source row is split into its phase rows
    by vector shuffles (`_phase_rows`) instead of element by element."""
    dtype: str
    contiguous: bool
    phases: int = 0


def pad_key(dtype: str, sx: int, contiguous: bool) -> PadKey:
    """The key of the copy of a Prep with sx phases (only the strided copies have dq = 1 and
    sx > 1: the dilated ones have sx = 1)."""
    return PadKey(dtype, contiguous, sx if sx > 1 else 0)


def pad(b, key: PadKey, src, dst, nchan, prep: PrepParams):
    """The padded copy of channels [0, nchan) of src into dst, with the copy's run-time shapes
    `prep` (e.g. the `prep` arguments of the calling shared function)."""
    fn = shared_function(b.module, "conv.pad", key, 2, PadParams, _pad_body)
    fn.call(b, [dst, src], PadParams(nchan=nchan, prep=prep))


def _pad_body(s, key: PadKey):
    ety, vl, es = dtype_info(key.dtype)
    vty = ir.VectorType(ety, vl)
    b = s.b
    dst, src = s.ptrs
    memset0(b, dst, b.mul(b.mul(s.nchan, s.cp), i64(es)))
    with carry_loop(b, 0, s.nchan, [], "pad.c") as lc:
        s_c = gep(b, src, b.mul(lc.iv, b.mul(s.src_h, s.src_w)), ety)
        d_c = gep(b, dst, b.mul(lc.iv, s.cp), ety)
        with carry_loop(b, s.r_lo, s.r_hi, [], "pad.row") as lr:
            s_r = gep(b, s_c, b.mul(lr.iv, s.src_w), ety)
            d_r = gep(b, d_c, b.mul(b.add(b.mul(lr.iv, s.dr), s.offr), s.rp), ety)
            at = b.add(b.mul(lc.iv, b.mul(s.src_h, s.src_w)), b.mul(lr.iv, s.src_w))
            size = b.mul(s.nchan, b.mul(s.src_h, s.src_w))
            if key.contiguous:
                # a run of c_hi - c_lo elements: vector copies; the last one's lanes past the run
                # are zeros and land in padding columns (or the next row, copied later, or the
                # slack), see `_phase_rows`
                d_r = gep(b, d_r, b.add(s.offq, s.c_lo), ety)
                run = b.sub(s.c_hi, s.c_lo)
                with carry_loop(b, 0, run, [], "pad.col", step=vl) as lq:
                    start = b.add(s.c_lo, lq.iv)
                    inside = lane_mask(b, b.sub(run, lq.iv), vl)
                    vstore(b, _row_load(b, vty, s_r, start, inside, b.add(at, start), size),
                           d_r, lq.iv)
            elif key.phases > 1:
                _phase_rows(b, key, s, s_r, d_r, at, size)
            else:
                with carry_loop(b, s.c_lo, s.c_hi, [], "pad.col") as lq:
                    col = b.add(b.mul(lq.iv, s.dq), s.offq)
                    at = b.add(b.mul(b.urem(col, s.sx), s.q), b.udiv(col, s.sx))
                    store(b, load(b, s_r, lq.iv, ety), d_r, at, ety)


def _phase_rows(b, key: PadKey, s, s_r, d_r, at, size):
    """The phase rows d_r[ph][q'] = s_r[q'*sx + ph - offq] (zero outside the source row) of one
    source row (element `at` of an image of `size` elements), vl columns q' of every phase at a
    time: sx vector loads of the sx*vl source columns they hold, and one shuffle per phase.
    Columns outside the row (the left and right padding) and those of q' >= q are zeroed, so
    the last block's whole-vector stores spill only zeros into the next phase row (or the next
    row's phase 0, a zero padding row, or the region's slack): the blocks go from the last to
    the first, so that the first block of each phase overwrites them. The loads are plain
    loads and a select unless they would leave the image (its first and last row). Measured on
    znver1 (x[32,16,32,32], stride 2, one thread): the element-by-element copy 2.85 ms for the
    whole convolution; this copy with masked loads and stores 3.58, with masked loads 3.18,
    with plain loads 2.65-2.75 (vmaskmovps is slow there).
    """
    ety, vl, _ = dtype_info(key.dtype)
    vty = ir.VectorType(ety, vl)
    sx = key.phases
    i32 = ir.IntType(32)
    lanes = ir.Constant(ir.VectorType(i32, vl), list(range(vl)))
    zero = ir.Constant(lanes.type, [0] * vl)
    limit = smin(b, s.src_w, b.sub(b.mul(s.q, i64(sx)), s.offq))
    limit = splat(b, b.trunc(limit, i32), vl)
    nblocks = b.udiv(b.add(s.q, i64(vl - 1)), i64(vl))
    with carry_loop(b, 0, nblocks, [], "pad.qv") as lq:
        q0 = b.mul(b.sub(b.sub(nblocks, i64(1)), lq.iv), i64(vl))
        base = b.sub(b.mul(q0, i64(sx)), s.offq)   # source column of lane 0, phase 0
        parts = []
        for k in range(sx):
            start = b.add(base, i64(k * vl))
            cols = b.add(lanes, splat(b, b.trunc(start, i32), vl))
            inside = b.and_(b.icmp_signed(">=", cols, zero), b.icmp_signed("<", cols, limit))
            parts.append(_row_load(b, vty, s_r, start, inside, b.add(at, start), size))
        while len(parts) > 1:   # concatenate to one <sx*vl> vector
            merged = []
            for a, c in zip(parts[0::2], parts[1::2]):
                n = a.type.count
                c = _widen(b, c, n) if c.type.count < n else c
                merged.append(b.shuffle_vector(a, c, ir.Constant(ir.VectorType(i32, 2 * n),
                                                                 list(range(2 * n)))))
            parts = merged + parts[len(merged) * 2:]
        wide = parts[0]
        undef = ir.Constant(wide.type, ir.Undefined)
        for ph in range(sx):
            v = b.shuffle_vector(wide, undef, ir.Constant(ir.VectorType(i32, vl),
                                                          [ph + sx * t for t in range(vl)]))
            vstore(b, v, d_r, b.add(b.mul(i64(ph), s.q), q0))


def _row_load(b, vty, s_r, start, inside, first, size):
    """The vector at element `start` of s_r (element `first` of an image of `size` elements),
    zero in the lanes not `inside`: a plain load and a select unless the vector leaves the image
    (its first row's left padding, its last row's end), where a masked load does not read them.
    Masked loads measured slow on znver1 (see `_phase_rows`)."""
    vl = vty.count
    safe = b.and_(b.icmp_signed(">=", first, i64(0)),
                  b.icmp_signed("<=", b.add(first, i64(vl)), size))
    # not inbounds: the lanes left out may lie before the tensor
    ptr = b.gep(s_r, [start], source_etype=vty.element)
    with b.if_else(safe) as (plain, masked):
        with plain:
            align = 8 if isinstance(vty.element, ir.DoubleType) else 4   # the element's
            v_plain = b.select(inside, b.load(ptr, typ=vty, align=align),
                               ir.Constant(vty, [0.0] * vl))
            bb_plain = b.block
        with masked:
            v_masked = masked_load(b, ptr, i64(0), vty, inside)
            bb_masked = b.block
    v = b.phi(vty)
    v.add_incoming(v_plain, bb_plain)
    v.add_incoming(v_masked, bb_masked)
    return v


def _widen(b, v, n):
    """v padded with undefined lanes to n lanes (n >= its count)."""
    i32 = ir.IntType(32)
    m = v.type.count
    undef = ir.Constant(v.type, ir.Undefined)
    return b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(i32, n),
                                                  list(range(m)) + [m] * (n - m)))


@params
class WCopyParams(Params):
    """dst[o*d_o + c*d_c + t*d_t] = src[o*s_o + c*s_c + s_0 + t*s_t] for o < `o`, c < `c`,
    t < `taps`."""
    o: I64Arg
    c: I64Arg
    taps: I64Arg
    d_o: I64Arg
    d_c: I64Arg
    d_t: I64Arg
    s_o: I64Arg
    s_c: I64Arg
    s_0: I64Arg
    s_t: I64Arg


def weights_copy(b, dtype: str, dst, src, o: int, c: int, taps: int, d, s_):
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
    fn = shared_function(b.module, "conv.wcopy", DtypeKey(dtype), 2, WCopyParams, body)
    d_o, d_c, d_t = d
    s_o, s_c, s_0, s_t = s_
    fn.call(b, [dst, src], WCopyParams(o=o, c=c, taps=taps, d_o=d_o, d_c=d_c, d_t=d_t, s_o=s_o,
                                       s_c=s_c, s_0=s_0, s_t=s_t))


def blocked_weights_elems(co: int, ci: int, r: int, taps: int) -> int:
    """Elements of `block_weights`' copy: ceil(co / r) blocks of r channels."""
    return ceil_div(co, r) * r * ci * taps


def block_weights(b, dtype: str, dst, src, co: int, ci: int, r: int, taps: int, src_strides,
                  ntaps: int | None = None):
    """The weights of the core (direct.py) in blocks of r output channels, the r weights of one
    tap of one input channel side by side: dst[(k // r)*ci*taps*r + m*taps*r + t*r + k % r] =
    src[k*sk + m*sm + s0 + t*st] for output channel k < co, input channel m < ci and tap
    t < ntaps (default: taps), src_strides = (sk, sm, s0, st). The slots of the last block past
    co hold channel co - 1 (the core computes that channel again there and stores the same
    values). One pointer per tile then addresses all r broadcast weights of a tap at constant
    offsets: with r pointers (and the clamps of the last block) live through the tap loops, a
    loop function shared by kernels of different shapes ran out of registers on znver1 and
    recomputed them at every tap (ResNet-8's 16-channel 3x3 conv at 12.7 GF/s, 35 alone)."""
    sk, sm, s0, st = src_strides
    ntaps = taps if ntaps is None else ntaps
    nb = ceil_div(co, r)
    blk = ci * taps * r
    for res in range(r):
        count = ceil_div(co - res, r) if res < co else 0
        if count:
            weights_copy(b, dtype, gep(b, dst, i64(res), dtype_info(dtype)[0]), src, count, ci,
                         ntaps, (blk, taps * r, r), (r * sk, sm, s0 + res * sk, st))
        if count < nb:   # the last block's slot past co: channel co - 1
            at = (nb - 1) * blk + res
            weights_copy(b, dtype, gep(b, dst, i64(at), dtype_info(dtype)[0]), src, 1, ci, ntaps,
                         (0, taps * r, r), (0, sm, s0 + (co - 1) * sk, st))

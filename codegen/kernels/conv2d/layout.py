"""What the convolution kernels share: the zero-padded copy of an image (`Prep`, `pad`), the
weights copy (`weights_copy`), the scratch alignment and the blocking overrides."""
from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from ...loops import carry_loop, gep, i64, load, masked_load, masked_store, store
from ..toolkit import DtypeKey, I64Arg, Params, ceil_div, dtype_info, lane_mask, memset0, params, \
    shared_function

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


@dataclass(frozen=True)
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



@dataclass(frozen=True)
class PadKey:
    """What the shared function of the padded copy depends on at compile time."""
    dtype: str
    contiguous: bool


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

"""The direct algorithm of `Core` (core.py): an item is one image and a block of R output channels
(and a chunk of rows when there are few items); a tile is R channels x PR output rows x PV vectors
of output columns in R*PR*PV vector accumulators. The input-channel loop and the kernel-row loop
(which skips rows that only see padding) stay loops; the KW taps of a kernel row are unrolled.
In the flat mode (short rows) the same function computes one long row out' per channel, which is
copied to out afterwards (`_lower_flat`).
"""
from __future__ import annotations

from dataclasses import replace

import llvmlite.ir as ir

from ... import record
from ...loops import I64, carry_loop, fma, gep, i64, if_then, load, masked_load, masked_store, \
    prefetch, splat, store, vload
from ..toolkit import I64Arg, Params, ceil_div, dtype_info, lane_mask, opaque, params, \
    shared_function, smax, smin, zero_vector
from .layout import ALIGN, FORCE, PrepParams, pad, pad_key


@params
class CoreParams(Params):
    """The run-time arguments of the core's shared function: items [t0, t1); ci input and co
    output channels; oy x ox outputs; kh kernel rows; row stride sy; ws_o, ws_c, ws_i the
    strides of the weights in blocks of R channels (layout.block_weights: a block starts at
    o0*ws_o, tap j of its channel r is at j*R + r of a kernel row); src_image elements per source image; yc row chunks of rows_per_chunk rows per item;
    ob_count channel blocks; first / last: the padded rows that hold data. Output element
    (n, o, y, x) is at n*on + (o - o0*orel)*oc + y*orow + x (o0: the item's first channel; flat
    mode: relative to the item's buffer); fpitch: the row pitch of the flat mode's out' (else
    larger than any row)."""
    t0: I64Arg = None
    t1: I64Arg = None
    ci: I64Arg
    co: I64Arg
    oy: I64Arg
    ox: I64Arg
    kh: I64Arg
    sy: I64Arg
    ws_o: I64Arg
    ws_c: I64Arg
    ws_i: I64Arg
    src_image: I64Arg
    yc: I64Arg
    rows_per_chunk: I64Arg
    ob_count: I64Arg
    first: I64Arg
    last: I64Arg
    on: I64Arg
    oc: I64Arg
    orow: I64Arg
    orel: I64Arg
    fpitch: I64Arg
    prep: PrepParams


def lower_direct(core, kf, ptrs, t0, t1):
    """The items [t0, t1) of `core` (a Core) in the kernel function `kf`; ptrs: out, src, weights,
    thread region."""
    b = kf.b
    plane = core.oy * core.ox
    shape = core_shape(core)
    fn = core_function(b.module, core)
    if core.flat:
        _lower_flat(core, kf, fn, ptrs, shape, t0, t1)
    elif kf.epilogue is None:
        fn.call(b, ptrs, replace(shape, t0=t0, t1=t1))
    else:   # item by item (R whole planes), then the epilogue on them while they are in cache
        with carry_loop(b, t0, t1, [], "conv.epilogue") as lt:
            fn.call(b, ptrs, replace(shape, t0=lt.iv, t1=b.add(lt.iv, i64(1))))
            ob_count = ceil_div(core.co, core.r)
            n = b.udiv(lt.iv, i64(ob_count))
            o0 = b.mul(b.urem(lt.iv, i64(ob_count)), i64(core.r))
            nchan = b.sub(smin(b, b.add(o0, i64(core.r)), core.co), o0)
            start = b.mul(b.add(b.mul(n, i64(core.co)), o0), i64(plane))
            kf.epilogue_rows(start, b.mul(nchan, i64(plane)))


def core_shape(core) -> CoreParams:
    """The run-time arguments of `core` (a blocked Core) for its whole output, items unset."""
    first, last = core.prep.data_rows()
    plane = core.oy * core.ox
    taps = core.kh * core.kw   # the weights in blocks of R channels (layout.block_weights)
    return CoreParams(ci=core.ci, co=core.co, oy=core.oy, ox=core.ox, kh=core.kh, sy=core.sy,
                      ws_o=core.ci * taps, ws_c=taps * core.r, ws_i=core.kw * core.r,
                      src_image=core.src_image,
                      yc=ceil_div(core.oy, core.rows_per_chunk),
                      rows_per_chunk=core.rows_per_chunk, ob_count=ceil_div(core.co, core.r),
                      first=first, last=last, on=core.co * plane, oc=plane, orow=core.ox, orel=0,
                      fpitch=1 << 40, prep=core.prep.params())


def _lower_flat(core, kf, fn, ptrs, shape: CoreParams, t0, t1):
    """Item by item: the core writes out' of the item's R channels into the thread's buffer
    (one row of flat_len, all kernel rows), then the valid columns go to out."""
    b = kf.b
    ety, vl, _ = dtype_info(core.dtype)
    vty = ir.VectorType(ety, vl)
    tmp = gep(b, ptrs[3], i64(core.region_elems + core.flip_elems), ety, name="conv.flat")
    fl, rp, plane = core.flat_len, core.prep.row_pitch, core.oy * core.ox
    shape = replace(shape, oy=1, ox=fl, on=0, oc=fl, orow=0, orel=1, yc=1, rows_per_chunk=1,
                    fpitch=rp)
    ob_count = ceil_div(core.co, core.r)
    with carry_loop(b, t0, t1, [], "conv.flat.item") as lt:
        fn.call(b, [tmp] + ptrs[1:], replace(shape, t0=lt.iv, t1=b.add(lt.iv, i64(1))))
        n = b.udiv(lt.iv, i64(ob_count))
        o0 = b.mul(b.urem(lt.iv, i64(ob_count)), i64(core.r))
        nchan = b.sub(smin(b, b.add(o0, i64(core.r)), core.co), o0)
        start = b.mul(b.add(b.mul(n, i64(core.co)), o0), i64(plane))
        dst = gep(b, kf.out, start, ety)
        with carry_loop(b, 0, b.mul(nchan, i64(core.oy)), [], "conv.flat.row") as lr:
            o = b.udiv(lr.iv, i64(core.oy))
            y = b.urem(lr.iv, i64(core.oy))
            src_row = gep(b, tmp, b.add(b.mul(o, i64(fl)), b.mul(y, i64(rp))), ety)
            dst_row = gep(b, dst, b.mul(lr.iv, i64(core.ox)), ety)
            with carry_loop(b, 0, core.ox, [], "conv.flat.col", step=vl) as lq:
                mask = lane_mask(b, b.sub(i64(core.ox), lq.iv), vl)
                masked_store(b, masked_load(b, src_row, lq.iv, vty, mask), dst_row, lq.iv,
                             mask)
        kf.epilogue_rows(start, b.mul(nchan, i64(plane)))


# Padded copies of an image larger than this (bytes) do not stay in L1 between the tiles: the
# kernel-row loop prefetches its rows of the next input channel. 3x3, 64 channels, 32 x 32 (296 KB
# in L2): 5-7% faster on one thread (Xeon, AVX-512), 22% on Zen 3 (AVX2, 6 x 2 block: 15.7 ->
# 12.8 ms, 75 -> 90-92% of the FMA peak). Zen 3, one thread, CPU-time minima, interleaved: 64
# channels of 16 x 16 (82 KB) +8%, 48 of 32 x 32 (222 KB) +7%; the tiles of fewer channels keep
# their rows in L1 from one tile to the next: 16-48 channels of 16 x 16 or 32 x 32 (41-148 KB)
# -1 to +2%, LeNet-5's second conv (3 KB) -0.5%. So the threshold stays: below it the prefetch
# would cost a function variant (LLVM time) for nothing.
_PREFETCH_BYTES = 48 << 10

# Kernels of at most this many taps (the strided input gradient's sub-kernels: 1x1, 1x2, 2x1,
# 2x2) unroll their kernel rows and take the input channels in groups of about this many taps:
# with one or two taps per channel, the channel and kernel-row loops cost as much as the FMAs
# (1x1: 11 GFLOP/s against 25 for 3x3 on znver1).
_SMALL_TAPS = 4


def core_function(module, core):
    small = core.kh * core.kw <= _SMALL_TAPS
    copy_bytes = core.ci * core.prep.chan_pitch * dtype_info(core.dtype)[2]
    prefetch = not small and FORCE.get("prefetch", copy_bytes > _PREFETCH_BYTES)
    key = _CoreKey(core.dtype, core.r, core.pr, core.pv, core.kw, core.sx, core.prep.contiguous,
                   core.kh if small else 0, max(1, _SMALL_TAPS // (core.kh * core.kw)) if small
                   else 1, prefetch)
    return shared_function(module, "conv", key, 4, CoreParams, _core_body)


@record(frozen=True)
class _CoreKey:
    """What the shared function of the convolution core depends on at compile time."""
    dtype: str
    r: int
    pr: int
    pv: int
    kw: int
    sx: int
    contiguous: bool   # of the padded copy
    kh: int = 0        # > 0: the kernel rows, unrolled (every row read: the padded copy holds
                       # all of them, zeros where they see padding), channels in groups of cu
    cu: int = 1
    prefetch: bool = False   # the kernel-row loop prefetches the next channel's rows


def _core_body(s, k: _CoreKey):
    """Items [t0, t1) with the run-time shapes of `s`; ptrs: out, src, w, thread region."""
    b = s.b
    out, src, w, region = s.ptrs
    ety, vl, _ = dtype_info(k.dtype)
    r_, pr_, pv_ = k.r, k.pr, k.pv
    pbuf = gep(b, region, i64(ALIGN), ety, name="conv.padded")
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
            pad(b, pad_key(k.dtype, k.sx, k.contiguous), gep(b, src, b.mul(n, s.src_image), ety),
                pbuf, s.ci, s.prep)
        item.next = [n]
        chans = [smin(b, b.add(o0, i64(r)), co1) for r in range(r_)]
        wrow = gep(b, w, b.mul(o0, s.ws_o), ety, name="conv.wblock")
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
                accs = [zero] * (r_ * pr_ * pv_)
                if k.kh:
                    lc = _small_kernel(s, k, accs, pbuf, xrow, wrow)
                else:
                    with carry_loop(b, 0, s.ci, accs, "conv.c") as lc:
                        pc = gep(b, pbuf, opaque(b, b.mul(lc.iv, s.cp)), ety)
                        wc = opaque(b, b.mul(lc.iv, s.ws_c))
                        with carry_loop(b, i_lo, i_hi, lc.vals, "conv.kh") as li:
                            pi = gep(b, pc, opaque(b, b.mul(li.iv, s.rp)), ety)
                            wi = b.add(wc, b.mul(li.iv, s.ws_i))
                            if k.prefetch:   # this row of the next channel into L1
                                nxt = gep(b, pi, s.cp, ety)
                                for p in range(pr_):
                                    for v in range(pv_ + 1):
                                        prefetch(b, gep(b, nxt, b.add(xrow[p], i64(v * vl)),
                                                        ety))
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


def _small_kernel(s, k: _CoreKey, accs, pbuf, xrow, wrow):
    """The channel loop of a kernel of k.kh (unrolled) x k.kw taps: groups of k.cu channels,
    then the rest one by one. Returns the last loop (its `out`: the accumulators)."""
    b = s.b
    ety = dtype_info(k.dtype)[0]

    def channel(acc, c):
        pc = gep(b, pbuf, opaque(b, b.mul(c, s.cp)), ety)
        wc = opaque(b, b.mul(c, s.ws_c))
        for i in range(k.kh):
            pi = gep(b, pc, b.mul(i64(i), s.rp), ety) if i else pc
            wi = b.add(wc, b.mul(i64(i), s.ws_i)) if i else wc
            acc = _core_taps(b, k, acc, pi, wi, xrow, wrow, s.q)
        return acc

    full = b.sub(s.ci, b.urem(s.ci, i64(k.cu)))
    with carry_loop(b, 0, full, accs, "conv.cg", step=k.cu) as lg:
        acc = lg.vals
        for cc in range(k.cu):
            acc = channel(acc, b.add(lg.iv, i64(cc)) if cc else lg.iv)
        lg.next = acc
    if k.cu == 1:
        return lg
    with carry_loop(b, full, s.ci, lg.out, "conv.c") as lc:
        lc.next = channel(lc.vals, lc.iv)
    return lc


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
    wbase = gep(b, wrow, wi, ety)
    for j in range(k.kw):
        base = bases[j % k.sx]
        xv = [[vload(b, base[p], i64(j // k.sx + v * vl), vty) for v in range(pv_)]
              for p in range(pr_)]
        for r in range(r_):
            wv = splat(b, load(b, wbase, i64(j * r_ + r), ety), vl)
            for p in range(pr_):
                for v in range(pv_):
                    i = (r * pr_ + p) * pv_ + v
                    acc[i] = fma(b, wv, xv[p][v], acc[i])
    return acc


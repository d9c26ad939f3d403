"""The channel mode of `Core` (core.py): rows at most half a vector long with O a multiple of the
vector length (LeNet-5's second conv; ResNet-8's stride-2 convs to 8 x 8: the strides only move
the broadcast pixels, 119 GF/s on one thread against 80 in the row core, which wastes half of
each vector there). Vectors run over vl output channels: PR whole output rows
of pixels in PR*OX accumulators, each tap one vector of weights (transposed to [c][i][j][o] in
scratch) and one broadcast input pixel per accumulator; a vl x vl shuffle transpose turns the
accumulators into rows of the output planes. No lane is wasted.
"""
from __future__ import annotations

from dataclasses import replace

import llvmlite.ir as ir

from ... import record
from ...loops import I64, carry_loop, fma, gep, i64, if_then, load, masked_store, splat, store, \
    vload
from ..toolkit import I64Arg, Params, ceil_div, dtype_info, lane_mask, opaque, params, \
    shared_function, smin, zero_vector
from .layout import ALIGN, PrepParams, pad, pad_key, weights_copy


@record(frozen=True)
class _ChanKey:
    """Compile-time constants of the channel mode: PR rows of OX pixels are the accumulators."""
    dtype: str
    ox: int
    pr: int
    contiguous: bool   # of the padded copy
    sx: int = 1        # its phases (the horizontal stride)


@params
class ChanParams(Params):
    """The run-time arguments of the channel mode: items [t0, t1) (image, block of vl output
    channels; ob_count blocks per image); ci input and co output channels, oy output rows, kh x kw
    taps, src_image elements per source image, the padded copy's shapes."""
    t0: I64Arg = None
    t1: I64Arg = None
    ci: I64Arg
    co: I64Arg
    oy: I64Arg
    sy: I64Arg
    kh: I64Arg
    kw: I64Arg
    src_image: I64Arg
    ob_count: I64Arg
    prep: PrepParams


def lower_channel(core, kf, region, t0, t1):
    """The items [t0, t1) of `core` (a Core in channel mode) in the kernel function `kf`, one by
    one (an image and vl output channels, whole planes) when there is an epilogue, which then
    runs on them."""
    b = kf.b
    ety, vl, _ = dtype_info(core.dtype)
    wt = gep(b, region, i64(core.region_elems + core.flip_elems + core.tmp_elems), ety,
             name="conv.wt")
    taps = core.kh * core.kw   # (taps contiguous: ws_i == kw without `flip`)
    # W(k, m, i, j) = w[m, k, kh-1-i, kw-1-j] for the input gradient (as in Core.lower)
    src = (taps, core.co * taps, taps - 1, -1) if core.flip else (core.ws_o, core.ws_c, 0, 1)
    weights_copy(b, core.dtype, wt, kf.ins[1], core.co, core.ci, taps,
                 (1, taps * core.co, core.co), src)
    key = _ChanKey(core.dtype, core.ox, core.pr, core.prep.contiguous, core.sx)
    fn = shared_function(b.module, "conv_chan", key, 4, ChanParams, _chan_body)
    plane = core.oy * core.ox
    shape = ChanParams(ci=core.ci, co=core.co, oy=core.oy, sy=core.sy, kh=core.kh, kw=core.kw,
                       src_image=core.src_image, ob_count=ceil_div(core.co, core.r),
                       prep=core.prep.params())
    ptrs = [kf.out, kf.ins[0], wt, region]
    if kf.epilogue is None:
        fn.call(b, ptrs, replace(shape, t0=t0, t1=t1))
        return
    with carry_loop(b, t0, t1, [], "conv.chan.item") as lt:
        fn.call(b, ptrs, replace(shape, t0=lt.iv, t1=b.add(lt.iv, i64(1))))
        kf.epilogue_rows(b.mul(lt.iv, i64(vl * plane)), i64(vl * plane))


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
    pbuf = gep(b, region, i64(ALIGN), ety, name="conv.padded")
    plane = b.mul(s.oy, i64(k.ox))
    oy1 = b.sub(s.oy, i64(1))
    taps_c = b.mul(b.mul(s.kh, s.kw), s.co)
    with carry_loop(b, s.t0, s.t1, [load(b, region, i64(0), I64)], "conv.chan.item") as item:
        n = b.udiv(item.iv, s.ob_count, name="conv.n")
        o0 = b.mul(b.urem(item.iv, s.ob_count), i64(vl), name="conv.o0")
        with if_then(b, b.icmp_signed("!=", n, item.vals[0]), name="conv.pad"):
            pad(b, pad_key(k.dtype, k.sx, k.contiguous), gep(b, src, b.mul(n, s.src_image), ety),
                pbuf, s.ci, s.prep)
        item.next = [n]
        out_o = gep(b, out, b.mul(b.add(b.mul(n, s.co), o0), plane), ety)
        wt_o = gep(b, wt, o0, ety)
        with carry_loop(b, 0, s.oy, [], "conv.chan.y", step=k.pr) as ly:
            row_step = b.mul(s.sy, s.rp)
            rows = [opaque(b, b.mul(smin(b, b.add(ly.iv, i64(p)), oy1), row_step))
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
                        # tap j of pixel x: column x*sx + j, at [j % sx][x + j // sx]
                        tap = lj.iv if k.sx == 1 else b.add(
                            b.mul(b.urem(lj.iv, i64(k.sx)), s.q), b.udiv(lj.iv, i64(k.sx)))
                        prow = [gep(b, pi, b.add(r, tap), ety) for r in rows]
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


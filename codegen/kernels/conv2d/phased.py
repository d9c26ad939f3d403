"""The input gradient of a strided convolution, computed directly (`Phased`): without the zeros
of a dilated cotangent, so with sh*sw times fewer multiply-adds than the stride-1 convolution over
the dilated copy.

Input-gradient pixels of one phase (py, px) (rows py + sh*y', columns px + sw*x') see only the
kernel taps i = i0 + sh*t (i0 = (py + ph) mod sh) and j = j0 + sw*t': per phase, the gradient is
a stride-1 convolution of the (undilated, padded) cotangent with a sub-kernel of
Th = ceil((KH - i0)/sh) x Tw taps of the flipped, transposed weights (a phase that no tap reaches
gets one zero tap: its pixels have gradient 0):

    dx[c, py + sh*y', px + sw*x'] = sum_{o, u, v} Wp[c, o, u, v] * P_p[o][y' + u][x' + v]
    Wp[c, o, u, v] = w[o, c, i0 + sh*(Th-1-u), j0 + sw*(Tw-1-v)],  P_p[o][r][q] = ct[o][r - offr][q - offq]
    offr = Th - 1 - (py + ph - i0) / sh   (and likewise offq)

Each phase runs on the shared core (direct.py) with its sub-kernel in the thread's scratch and a
padded copy of the cotangent image; phases that read the cotangent at the same offset share one
copy (as large as the largest of them needs), which the core pads once per image. All phases
share the core's item structure (an image and a block of R input channels), so a thread computes
an item's phases one after the other into a buffer of R planes and interleaves them into the R
planes of dx, which are then final (the epilogue runs on them). With column stride 2 the two
column phases of a row phase go to two buffers and are interleaved by vector shuffles.
"""
from __future__ import annotations

import dataclasses

import llvmlite.ir as ir

from ... import record
from ...loops import I64, carry_loop, gep, i64, load, masked_load, masked_store, store
from ..toolkit import ceil_div, dtype_info, kernel_function, lane_mask, round_up, smin, \
    thread_range, zero_fill
from .direct import core_function, core_shape
from .layout import ALIGN, FORCE, Prep, block_weights, blocked_weights_elems


@record(frozen=True)
class _Phase:
    py: int
    px: int
    core: object     # a blocked Core: out = the phase's [C, Hp, Wp] planes
    taps: tuple      # (u, v, i, j): sub-kernel tap (u, v) is weight tap (i, j)


@record(frozen=True)
class Phased:
    dtype: str
    n: int
    o: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    r: int
    phases: tuple

    @property
    def items(self) -> int:
        return self.n * ceil_div(self.c, self.r)

    def _w_elems(self, ph: _Phase) -> int:
        return round_up(blocked_weights_elems(self.c, self.o, self.r, ph.core.kh * ph.core.kw),
                        ALIGN)

    @property
    def paired(self) -> bool:
        """Column stride 2 (and two column phases): a row's two column phases are computed into
        two buffers, then interleaved by vector shuffles (`_interleave_pair`)."""
        return self.sw == 2 and self.w >= 2

    @property
    def tmp_elems(self) -> int:
        vl = dtype_info(self.dtype)[1]
        return round_up(max(self.r * ph.core.oy * ph.core.ox for ph in self.phases) + vl, ALIGN)

    def _regions(self) -> dict:
        """Elements of each padded copy, by its Prep (phases of equal Prep share one)."""
        out = {}
        for ph in self.phases:
            out[ph.core.prep] = max(out.get(ph.core.prep, 0), ph.core.region_elems)
        return out

    @property
    def thread_elems(self) -> int:
        return (sum(self._w_elems(ph) for ph in self.phases) + sum(self._regions().values())
                + self.tmp_elems * (2 if self.paired else 1))

    def lower(self, module, name, epilogue):
        kf = kernel_function(module, name, 2, epilogue)
        b = kf.b
        ety, vl, _ = dtype_info(self.dtype)
        at = i64(0)   # kf.scratch is the executing thread's own region (parallel.emit_call)
        regions = {}   # per Prep: its region (padded copy; the core pads it once per image)
        for prep, elems in self._regions().items():
            regions[prep] = gep(b, kf.scratch, at, ety, name="igrad.region")
            at = b.add(at, i64(elems))
            store(b, i64(-1), regions[prep], i64(0), I64)   # no image in the padded copy yet
        ptrs = []   # per phase: its sub-kernel and its region
        for ph in self.phases:
            wp = gep(b, kf.scratch, at, ety, name="igrad.subkernel")
            at = b.add(at, i64(self._w_elems(ph)))
            region = regions[ph.core.prep]
            th, tw = ph.core.kh, ph.core.kw
            taps = th * tw
            zero_fill(b, wp, blocked_weights_elems(self.c, self.o, self.r, taps), ety, vl,
                      "igrad.subkernel")
            for u, v, i, j in ph.taps:   # Wp[c, o, u, v] = w[o, c, i, j], in blocks of R c's
                block_weights(b, self.dtype, gep(b, wp, i64((u * tw + v) * self.r), ety),
                              kf.ins[1], self.c, self.o, self.r, taps,
                              (self.kh * self.kw, self.c * self.kh * self.kw, i * self.kw + j, 0),
                              ntaps=1)
            ptrs.append((wp, region))
        tmp = gep(b, kf.scratch, at, ety, name="igrad.phase.out")
        tmp2 = gep(b, tmp, i64(self.tmp_elems), ety, name="igrad.phase.out2")
        nb = ceil_div(self.c, self.r)
        t0, t1 = thread_range(b, self.items, kf.tid, kf.nthreads)
        with carry_loop(b, t0, t1, [], "igrad.item") as lt:
            n = b.udiv(lt.iv, i64(nb))
            o0 = b.mul(b.urem(lt.iv, i64(nb)), i64(self.r))
            nchan = b.sub(smin(b, b.add(o0, i64(self.r)), self.c), o0)
            start = b.mul(b.add(b.mul(n, i64(self.c)), o0), i64(self.h * self.w))
            dst = gep(b, kf.out, start, ety)
            for k, (ph, (wp, region)) in enumerate(zip(self.phases, ptrs)):
                buf = tmp2 if self.paired and ph.px == 1 else tmp
                shape = dataclasses.replace(core_shape(ph.core), t0=lt.iv,
                                            t1=b.add(lt.iv, i64(1)), on=0, orel=1)
                core_function(b.module, ph.core).call(b, [buf, kf.ins[0], wp, region], shape)
                if not self.paired:
                    self._interleave(b, ph, tmp, dst, nchan, ph.core.oy * ph.core.ox)
                elif ph.px == 1:   # phases run px-minor: (py, 0) is in tmp
                    self._interleave_pair(b, self.phases[k - 1], ph, tmp, tmp2, dst, nchan)
            kf.epilogue_rows(start, b.mul(nchan, i64(self.h * self.w)))
        b.ret_void()

    def _interleave_pair(self, b, ph0: _Phase, ph1: _Phase, tmp0, tmp1, dst, nchan):
        """dst[ch, py + sh*y', 2*x' + px] = tmp_px[ch, y', x'] for px = 0, 1: a vector of each
        phase gives two vectors of the row (lanes alternating between them)."""
        ety, vl, _ = dtype_info(self.dtype)
        vty = ir.VectorType(ety, vl)
        idx = ir.VectorType(ir.IntType(32), vl)
        lo = ir.Constant(idx, [t // 2 + (t % 2) * vl for t in range(vl)])
        hi = ir.Constant(idx, [vl // 2 + t // 2 + (t % 2) * vl for t in range(vl)])
        hp, wp0, wp1 = ph0.core.oy, ph0.core.ox, ph1.core.ox
        with carry_loop(b, 0, b.mul(nchan, i64(hp)), [], "igrad.pair.row") as lr:
            ch, y = b.udiv(lr.iv, i64(hp)), b.urem(lr.iv, i64(hp))
            src0 = gep(b, tmp0, b.add(b.mul(ch, i64(hp * wp0)), b.mul(y, i64(wp0))), ety)
            src1 = gep(b, tmp1, b.add(b.mul(ch, i64(hp * wp1)), b.mul(y, i64(wp1))), ety)
            row = b.add(b.mul(ch, i64(self.h)), b.add(b.mul(y, i64(self.sh)), i64(ph0.py)))
            out = gep(b, dst, b.mul(row, i64(self.w)), ety)
            with carry_loop(b, 0, wp0, [], "igrad.pair.col", step=vl) as lq:
                v0 = masked_load(b, src0, lq.iv, vty, lane_mask(b, b.sub(i64(wp0), lq.iv), vl))
                v1 = masked_load(b, src1, lq.iv, vty, lane_mask(b, b.sub(i64(wp1), lq.iv), vl))
                x = b.mul(lq.iv, i64(2))
                left = b.sub(i64(self.w), x)
                masked_store(b, b.shuffle_vector(v0, v1, lo), out, x, lane_mask(b, left, vl))
                masked_store(b, b.shuffle_vector(v0, v1, hi), out, b.add(x, i64(vl)),
                             lane_mask(b, b.sub(left, i64(vl)), vl))

    def _interleave(self, b, ph: _Phase, tmp, dst, nchan, plane: int):
        """dst[ch, py + sh*y', px + sw*x'] = tmp[ch, y', x'] for the item's channels."""
        ety, vl, _ = dtype_info(self.dtype)
        hp, wp = ph.core.oy, ph.core.ox
        with carry_loop(b, 0, b.mul(nchan, i64(hp)), [], "igrad.interleave.row") as lr:
            ch, y = b.udiv(lr.iv, i64(hp)), b.urem(lr.iv, i64(hp))
            src = gep(b, tmp, b.add(b.mul(ch, i64(plane)), b.mul(y, i64(wp))), ety)
            row = b.add(b.mul(ch, i64(self.h)), b.add(b.mul(y, i64(self.sh)), i64(ph.py)))
            out = gep(b, dst, b.add(b.mul(row, i64(self.w)), i64(ph.px)), ety)
            if self.sw == 1:
                vty = ir.VectorType(ety, vl)
                with carry_loop(b, 0, wp, [], "igrad.interleave.col", step=vl) as lq:
                    mask = lane_mask(b, b.sub(i64(wp), lq.iv), vl)
                    masked_store(b, masked_load(b, src, lq.iv, vty, mask), out, lq.iv, mask)
            else:
                with carry_loop(b, 0, wp, [], "igrad.interleave.col") as lq:
                    store(b, load(b, src, lq.iv, ety), out, b.mul(lq.iv, i64(self.sw)), ety)


def phased_input_grad(dtype, n, o, c, h, w, oh, ow, kh, kw, sh, sw, ph_, pw_, epilogue,
                      make_core) -> Phased:
    """The plan; make_core(**fields) -> an unblocked Core (core.py passes its class)."""
    vl = dtype_info(dtype)[1]
    phases = []
    for py in range(min(sh, h)):
        i0 = (py + ph_) % sh
        a_h = (py + ph_ - i0) // sh
        th = max(1, ceil_div(kh - i0, sh))   # taps i0, i0 + sh, ... below kh (none: zeros)
        hp = ceil_div(h - py, sh)
        for px in range(min(sw, w)):
            j0 = (px + pw_) % sw
            a_w = (px + pw_ - j0) // sw
            tw = max(1, ceil_div(kw - j0, sw))
            wp = ceil_div(w - px, sw)
            prep = Prep(oh, ow, hp - 1 + th, wp - 1 + tw, 1, 1, 1, th - 1 - a_h, tw - 1 - a_w)
            core = make_core(dtype=dtype, n=n, ci=o, co=c, oy=hp, ox=wp, kh=th, kw=tw, sy=1, sx=1,
                             ws_o=o * th * tw, ws_c=th * tw, ws_i=tw, flip=None, prep=prep,
                             src_image=o * oh * ow, vl=vl)
            taps = tuple((u, v, i0 + sh * (th - 1 - u), j0 + sw * (tw - 1 - v))
                         for u in range(th) for v in range(tw)
                         if i0 + sh * (th - 1 - u) < kh and j0 + sw * (tw - 1 - v) < kw)
            phases.append(_Phase(py, px, core, taps))
    # Phases whose cotangent sits at the same offset in their padded copies share one copy, as
    # large as the largest (the others read part of it): the core pads it once per image, not
    # once per phase (ResNet's 3x3 stride-2 with padding 1: all four phases).
    preps = {}
    for ph in phases:
        pr_ = ph.core.prep
        key = (pr_.offr, pr_.offq)
        old = preps.get(key, pr_)
        preps[key] = dataclasses.replace(old, rows=max(old.rows, pr_.rows), q=max(old.q, pr_.q))
    phases = [dataclasses.replace(ph, core=dataclasses.replace(
        ph.core, prep=preps[ph.core.prep.offr, ph.core.prep.offq])) for ph in phases]
    # one register block for all phases (the items are an image and R channels), the row block of
    # the largest phase (a flat mode's block had PV = 2 on rows of one vector: ResNet-8's stride-2
    # input gradient to 32 x 16 x 16, 69 GF/s on one thread against 80 with 8 x 2 x 1 on a Xeon);
    # whole planes (the phases interleave into them)
    first = phases[0].core.blocked(epilogue, plain=True)
    r, pr, pv = FORCE.get("core", (first.r, first.pr, first.pv))
    phases = tuple(dataclasses.replace(p, core=dataclasses.replace(
        p.core, r=r, pr=pr, pv=pv, yc=1, flat=False, chan=False)) for p in phases)
    return Phased(dtype, n, o, c, h, w, kh, kw, sh, sw, r, phases)

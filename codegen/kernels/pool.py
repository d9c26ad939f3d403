"""Kernels of the pooling primitives (NCHW): max/avg pooling, the argmax the backward pass saves,
and the backward passes (see ir/prims/nn.py for their meaning and the numpy reference).

Every kernel partitions the N*C planes among the threads (toolkit.thread_range); a thread owns
whole planes of `out`.

The window kernels (max_pool2d, max_pool2d_argmax, avg_pool2d, avg_pool2d_grad) compute one vector
of V outputs at a time and read its inputs with wide loads whose lanes they shuffle apart:

- "row" layout (the general case): the vector is V consecutive outputs (r, c0 .. c0+V-1) of one
  output row. For tap row i the input columns [c0*sw - pw, c0*sw - pw + L) of input row
  r*sh + i - ph are one wide load (L = V*sw plus the taps reaching past the stride, rounded up
  to whole registers); tap (i, j) is lanes j, j+sw, j+2*sw, ... of it (with unit column stride,
  a plain load of its own). Inside the plane the loads are plain; the column chunks at a row's
  edges (known when compiling) load inside the row and shuffle the padding value in, or take
  masked loads whose mask drops the columns outside the row and the rows outside the plane,
  which then read as the padding value - so padding costs no scalar edge loops (`_Window`).
  2x2/2 pooling of a row is two wide loads, four shuffles and three max. A row's last few
  outputs (at most half a vector) take a vector of half the width or less (`narrow_tail`); where
  no padding rows are, the rows go two at a time and their two tails make one full vector of two
  pieces (`pair`: LeNet's rows of 12 outputs are 1.5 vectors of 8 lanes, not 2 vectors). The
  forward kernels of stride-2 windows keep their outputs in the order that makes each tap an
  in-lane shuffle of the wide access's two registers, reordered once when stored (`order`).
- "block" layout (output rows shorter than half a vector, no padding, e.g. LeNet's 8x8 -> 4x4):
  the vector is R whole output rows (lane rr*OW + c) and one masked load reads the R*sh input rows
  they cover (all tap rows at once); tap (i, j) is lanes (rr*sh + i)*W + c*sw + j of it.

avg_pool2d_grad runs the same loops backwards: shuffles spread ct lanes over their taps' lanes of
the wide vector, which is stored (disjoint windows) or added to the plane (overlapping windows).

The argmax's and the gradients' indices are compared and built relative to the vector's first
wide access (constant vectors per tap, one add or subtract of its offset per vector).

max_pool2d_grad / max_pool2d_gather know only the indices, not the window. They try the disjoint
blocks of H//OH x W//OW inputs per output - the windows of stride == kernel pooling - as windows:
the block lane an index points at gets ct (grad) or is selected (gather), all in vectors with the
loops above. Indices outside their block (overlapping windows, or any index at all) are handled
by scalar code: a scatter-add after the plane's dense pass, only in planes that have such
indices (grad), or a scalar gather of the vectors that have them (gather). Without usable blocks
(stride 1) grad zeroes the plane and scatter-adds, gather loads each element.

Each kernel can take an elementwise epilogue (kernels/__init__.py), run on each plane of out as
soon as the plane is final, while it is in L1.

NaN convention (numpy's): a NaN in a window makes its max NaN and the first NaN of the window (in
row-major tap order) its argmax; otherwise the argmax is the first maximum (strictly greater
replaces). Padding taps never win: a window whose real elements are all -inf points at its first
real element (the numpy reference points at the padding there, an index outside the plane).
Indices outside the plane given to max_pool2d_grad / max_pool2d_gather are ignored / read as 0.
"""
from __future__ import annotations


import llvmlite.ir as ir

from .. import record
from ...ir.prims.nn import (avg_pool2d_grad_p, avg_pool2d_p, max_pool2d_argmax_p, max_pool2d_gather_p,
                         max_pool2d_grad_p, max_pool2d_p)

from ..loops import I1, I32, I64, for_range, gep, i32, i64, if_then, intrinsic, llvm_type, load, \
    splat, store, vec, vload, vstore
from ..target import vector_width
from . import POOL_WEIGHT, memory_cost, register
from .toolkit import kernel_function, lane_mask, round_up, thread_range, wide_load, wide_store, \
    zero_fill

# overrides for tuning runs: {"pair": False} takes the narrow tails of rows one by one
FORCE = {}


# --------------------------------------------------------------------------- geometry
@record(frozen=True)
class _Geom:
    """The window geometry of one pooling instruction: planes of H x W inputs, OH x OW outputs."""
    planes: int
    H: int
    W: int
    OH: int
    OW: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int = 1     # dilation: tap (i, j) is input (r*sh + i*dh - ph, c*sw + j*dw - pw)
    dw: int = 1

    @property
    def rows_outside(self) -> bool:
        """Whether some window rows fall outside the plane (padding, or ceil mode's last
        windows), so that the row loop masks them."""
        return self.ph != 0 or (self.OH - 1) * self.sh + (self.kh - 1) * self.dh - self.ph >= self.H

    @property
    def cols_outside(self) -> bool:
        return self.pw != 0 or (self.OW - 1) * self.sw + (self.kw - 1) * self.dw - self.pw >= self.W


def _geom(in_shape, out_shape, params) -> _Geom:
    (kh, kw), (sh, sw), (ph, pw) = params["kernel"], params["stride"], params["padding"]
    dh, dw = params.get("dilation", (1, 1))
    n, c, h, w = in_shape
    return _Geom(n * c, h, w, out_shape[2], out_shape[3], kh, kw, sh, sw, ph, pw, dh, dw)


@record(frozen=True)
class _Layout:
    """Which outputs one vector holds and which lanes of which wide load feed tap (i, j)."""
    V: int          # lanes of an output vector
    L: int          # lanes of a wide load
    R: int          # output rows per vector: 1 = "row" layout, > 1 = "block" layout
    pieces: int = 1  # "row" layout: the vector is this many equal pieces, piece k of output row
    #                  r + k (the wide access: as many pieces of L / pieces lanes, sh rows apart)
    order: tuple = ()  # "row" layout: lane k holds output lane order[k] (see `_in_lane_order`)

    def lanes(self, g: _Geom, i: int, j: int):
        """Lane of the wide load holding tap (i, j) of each output lane. "row": the load is of tap
        row i; "block": one load serves all tap rows. Lanes past R*OW repeat a valid lane."""
        if self.R == 1:
            vp, lp = self.V // self.pieces, self.L // self.pieces
            q = [l // vp * lp + l % vp * g.sw + j * g.dw for l in range(self.V)]
            return [q[l] for l in self.order] if self.order else q
        q = [(rr * g.sh + i * g.dh) * g.W + c * g.sw + j * g.dw for rr in range(self.R)
             for c in range(g.OW)]
        return q + [q[-1]] * (self.V - len(q))

    def used(self, g: _Geom) -> int:
        """Output lanes that hold outputs (the rest of a block vector is idle)."""
        return self.V if self.R == 1 else self.R * g.OW

    def cover(self, g: _Geom, rows):
        """For each lane of a wide load serving tap rows `rows`: the output lanes reading it."""
        cov = [[] for _ in range(self.L)]
        for i in rows:
            for j in range(g.kw):
                for l, q in enumerate(self.lanes(g, i, j)[:self.used(g)]):
                    cov[q].append(l)
        return cov


def _in_lane_order(g: _Geom, lay: _Layout, bits: int) -> tuple:
    """For a "row" layout of stride-2 windows read as two registers: the order of the outputs in
    the vector that makes every tap an in-lane shuffle of the two (AVX's vshufps takes the even
    or odd elements of each 128-bit lane of both), so that the lanes need reordering once per
    stored vector instead of once per tap (vpermpd). () where it does not apply."""
    e, V = 128 // bits, lay.V
    if lay.R != 1 or g.sw != 2 or g.kw > 2 or g.dw != 1 or lay.L != 2 * V or V <= e or \
            g.rows_outside or g.cols_outside:
        return ()
    return tuple(t * e // 2 + u if u < e // 2 else V // 2 + t * e // 2 + u - e // 2
                 for t in range(V // e) for u in range(e))


def _layout(g: _Geom, V: int) -> _Layout:
    if not g.rows_outside and not g.cols_outside and 2 * g.OW <= V:
        # as many whole rows as fit, as long as their inputs fit in four registers
        for R in range(min(V // g.OW, g.OH), 1, -1):
            L = round_up(_block_span(g, R), V)
            if L <= 4 * V:
                return _Layout(V, L, R)
    return _Layout(V, round_up(V * g.sw + max(0, g.dw * (g.kw - 1) + 1 - g.sw), V), 1)


def _block_span(g: _Geom, rows) -> int:
    """Elements from the first input of a block of `rows` whole output rows to its last + 1."""
    return ((rows - 1) * g.sh + (g.kh - 1) * g.dh) * g.W + (g.OW - 1) * g.sw + \
        (g.kw - 1) * g.dw + 1


# --------------------------------------------------------------------------- LLVM helpers
def _plane_done(f, p, size: int):
    """Plane p of out (size elements) is final: run the epilogue (if any) over it."""
    if f.epilogue is not None:
        f.epilogue_rows(f.b.mul(p, i64(size)), i64(size))


def _ivec(values):
    return ir.Constant(ir.VectorType(I32, len(values)), [int(v) for v in values])


def _bvec(bits):
    return ir.Constant(ir.VectorType(I1, len(bits)), [1 if x else 0 for x in bits])


def _in_range(b: ir.IRBuilder, v, lo: int, hi: int, name: str = ""):
    """lo <= v < hi (signed), for a scalar or a vector of i32."""
    if isinstance(v.type, ir.VectorType):
        n = v.type.count
        lo_c, hi_c = _ivec([lo] * n), _ivec([hi] * n)
    else:
        lo_c, hi_c = ir.Constant(v.type, lo), ir.Constant(v.type, hi)
    return b.and_(b.icmp_signed(">=", v, lo_c), b.icmp_signed("<", v, hi_c), name=name)


# --------------------------------------------------------------------------- window loop
@record(frozen=True)
class _Edge:
    """The `mask` of a wide access at a row's edge whose columns are known when compiling:
    window column `base` (the access's first column, possibly < 0) of a row of W. Read as a
    plain load moved to lie inside the row and a constant shuffle that puts its lanes in place
    and the padding value in the lanes outside the row (see `_Window.taps_of`)."""
    base: int


class _Window:
    """The loop nest `plane / row (group) / column chunk` over a pooling's outputs, and the wide
    loads (or read-modify-writes) of its inputs, shared by the window kernels.

    In the "row" layout the vectors whose output lanes are all real and whose wide accesses lie
    inside the plane (no padding, no tail: the interior) run a copy of the body with plain loads
    and stores (masks None): AVX2's masked loads cost several plain ones. The other column
    chunks of a row are known when compiling and are emitted one by one: with `reads_only`
    (bodies that only read the wide accesses, through `taps_of`) a chunk at the row's edge reads
    plain loads shifted into the row and shuffled with the padding value (an `_Edge` mask); the
    rest, and rows of the padding, take masked loads (<N x i1> masks). `shift_tail` (for bodies
    that only write their own outputs from their inputs, so computing an output twice is
    harmless) moves a row's last, partial chunk back to end at the row's end, a full vector."""

    def __init__(self, b: ir.IRBuilder, g: _Geom, dtype: str, prim: str, shift_tail: bool = False,
                 reads_only: bool = False, narrow_tail: bool = False, lanes: int | None = None,
                 pieces: tuple[int, int] | None = None, in_lane: bool = False):
        self.b, self.g, self.prim = b, g, prim
        self.T = llvm_type(dtype)
        bits = 64 if dtype == "f64" else 32
        V = lanes or vector_width(bits)
        # pieces (k, lanes of each): the "row" layout in k pieces of output rows (see `pair`)
        self.lay = _layout(g, V) if pieces is None else _Layout(V, pieces[0] * pieces[1], 1,
                                                                pieces[0])
        if in_lane and FORCE.get("in_lane", True):   # bodies reading taps, storing outputs
            self.lay = _Layout(self.lay.V, self.lay.L, self.lay.R, self.lay.pieces,
                               _in_lane_order(g, self.lay, bits))
        self.V, self.L = V, self.lay.L
        self.vty, self.wide_ty = vec(self.T, V), vec(self.T, self.L)
        self.shift = shift_tail and g.OW > V and g.OW % V != 0
        self.reads_only = reads_only
        # columns from `base` a plain access of the body reaches: a tap load each with unit
        # column stride when the body only reads taps, else the wide access
        self.direct = self.lay.R == 1 and g.sw == 1 and self.lay.pieces == 1
        self.reach = (V + (g.kw - 1) * g.dw) if reads_only and self.direct else self.L
        # `narrow_tail` (with shift_tail): a row's last few outputs (at most half a vector) as a
        # narrower vector ending at the row's end instead of a full one shifted back (LeNet's
        # 12 outputs: 8 + 4 lanes, not 8 + 8). A half-width vector costs about half: znver1
        # splits every 256-bit operation in two 128-bit ones, and 128-bit deinterleaves need no
        # lane-crossing permutes. The body gets the window of each vector as its first argument.
        self.narrow, self.with_window = None, narrow_tail
        # `pair` (with narrow_tail): the narrow tails of two rows as one vector of two pieces
        # (LeNet's 12 outputs a row: 8 + 8 lanes for two rows instead of 8 + 4 + 8 + 4), when
        # the planes have no padding rows
        self.pair = None
        rem = g.OW % V
        if narrow_tail and self.shift and self.lay.R == 1 and 0 < rem <= V // 2:
            n = _Window(b, g, dtype, prim, shift_tail, reads_only,
                        lanes=max(2, 1 << (rem - 1).bit_length()), in_lane=in_lane)
            base = (g.OW - n.V) * g.sw - g.pw
            if base >= 0 and base + n.reach <= g.W:   # plain loads (no padding at the row's end)
                self.narrow = n
                if 2 * n.V == V and g.OH >= 2 and not g.rows_outside and base + n.L <= g.W \
                        and FORCE.get("pair", True):
                    self.pair = _Window(b, g, dtype, prim, lanes=V, pieces=(2, n.L),
                                        in_lane=in_lane)

    def loop(self, plane_start, plane_stop, body, begin_plane=None, end_plane=None):
        """Calls body(p, c0, base, r, h0, out_mask, loads) per output vector of the planes, where
        `loads` lists (tap rows, element offset in the plane of the access's first window column,
        mask) of the wide accesses, c0/base the chunk's first output/input column and r/h0 its
        first output/input row; begin_plane(p) / end_plane(p) before / after the vectors of
        plane p; with `narrow_tail` the body takes the vector's window first: body(w, p, ...),
        w this window or a narrower one. A mask is None where every lane is real and inside the plane, an `_Edge` (only
        with `reads_only`) or an <L x i1>; out_mask None or an <V x i1>. The body is emitted for
        each kind (see the class docstring)."""
        b = self.b
        with for_range(b, plane_start, plane_stop, name=f"{self.prim}.plane", scalar=True) as p:
            if begin_plane is not None:
                begin_plane(p)
            self._plane(body, p)
            if end_plane is not None:
                end_plane(p)

    def _emit(self, body, w, *args):
        """The body of one vector, told its window `w` when the tail may be narrower."""
        if self.with_window:
            body(w, *args)
        else:
            body(*args)

    def _chunks(self):
        """[(first output column, kind)] of a row's column chunks, kind "plain", "edge" or
        "masked" (see the class docstring)."""
        g, V = self.g, self.V
        starts = list(range(0, g.OW, V))
        if self.narrow is not None:
            return [(c0, self._kind(c0)) for c0 in starts[:-1]] + [(g.OW - self.narrow.V, "narrow")]
        if self.shift:
            starts[-1] = g.OW - V
        return [(c0, self._kind(c0)) for c0 in starts]

    def _kind(self, c0):
        g, V = self.g, self.V
        base = c0 * g.sw - g.pw
        if c0 + V > g.OW:
            return "masked"
        if base >= 0 and base + self.reach <= g.W:
            return "plain"
        if self.reads_only and g.W >= (V if self.direct else self.L):
            return "edge"
        return "masked"

    def _plane(self, body, p):
        b, g, lay, V = self.b, self.g, self.lay, self.V
        if lay.R > 1:   # a few groups of rows: LLVM's unrolling of them pays (LeNet's 8x8: 1.4x)
            with for_range(b, 0, g.OH, lay.R, name=f"{self.prim}.oh") as r:
                self._block(body, p, r)
            return
        chunks = self._chunks()
        run = [c0 for c0, k in chunks if k == "plain" and c0 % V == 0]
        lo, hi = (run[0], run[-1] + V) if run else (0, 0)
        assert run == list(range(lo, hi, V))
        if self.pair is not None:
            self._pairs(body, p, chunks, run, lo, hi)
            return
        # rows outside, columns inside: the plane is read in memory order
        with for_range(b, 0, g.OH, name=f"{self.prim}.oh", scalar=True) as r:
            h0 = self._row_base(r)
            if not g.rows_outside:
                self._row(body, p, chunks, run, lo, hi, r, h0)
                return
            last = b.add(h0, i64((g.kh - 1) * g.dh))
            rows_in = b.and_(b.icmp_signed(">=", h0, i64(0)), b.icmp_signed("<", last, i64(g.H)),
                             name="rows.in")
            with b.if_else(rows_in) as (inside, outside):
                with inside:
                    self._row(body, p, chunks, run, lo, hi, r, h0)
                with outside:   # a row of the padding: every chunk masked
                    with for_range(b, 0, g.OW, V, name=f"{self.prim}.ow.pad", scalar=True) as c0:
                        if self.shift:
                            c0 = b.select(b.icmp_signed(">", c0, i64(g.OW - V)), i64(g.OW - V), c0,
                                          name="c0")
                        self._masked_row(body, p, c0, b.sub(b.mul(c0, i64(g.sw)), i64(g.pw)), r, h0)

    def _row_base(self, r):
        """The input row of output row r's first tap row."""
        return self.b.sub(self.b.mul(r, i64(self.g.sh)), i64(self.g.ph), name="row.base")

    def _row(self, body, p, chunks, run, lo, hi, r, h0, tail: bool = True):
        """The chunks of output row r (tap rows inside the plane, from input row h0): the run
        of plain whole vectors [lo, hi) as a loop, the others one by one; without `tail`, all
        but the narrow tail (`_pairs`)."""
        b, V = self.b, self.V
        for c0, kind in chunks:
            if kind == "narrow" and not tail:
                continue
            if c0 == lo and hi > lo:
                with for_range(b, lo, hi, V, name=f"{self.prim}.ow", scalar=True) as c:
                    self._chunk(body, p, c, "plain", r, h0)
            elif c0 not in run:
                self._chunk(body, p, i64(c0), kind, r, h0)

    def _chunk(self, body, p, c0, kind, r, h0):
        """The vector of outputs from column c0 of row r, of `kind` (see `_kind`)."""
        b, g = self.b, self.g
        base = b.sub(b.mul(c0, i64(g.sw)), i64(g.pw), name="col.base")
        if kind == "masked":
            self._masked_row(body, p, c0, base, r, h0)
            return
        mask = None if kind in ("plain", "narrow") else _Edge(c0.constant * g.sw - g.pw)
        self._emit(body, self.narrow if kind == "narrow" else self, p, c0, base, r, h0, None,
                   self._row_loads(h0, base, mask))

    def _row_loads(self, h0, base, mask):
        b, g = self.b, self.g
        return [([i], b.add(b.mul(b.add(h0, i64(i * g.dh)), i64(g.W)), base), mask)
                for i in range(g.kh)]

    def _pairs(self, body, p, chunks, run, lo, hi):
        """The rows of a plane two at a time (no padding rows, plain narrow tails): each row's
        chunks but the narrow tail, then both tails as one vector of the `pair` window."""
        b, g = self.b, self.g
        c_tail = chunks[-1][0]
        assert chunks[-1][1] == "narrow"
        with for_range(b, 0, g.OH - g.OH % 2, 2, name=f"{self.prim}.oh2", scalar=True) as r:
            h0 = self._row_base(r)
            self._row(body, p, chunks, run, lo, hi, r, h0, tail=False)
            r1 = b.add(r, i64(1))
            self._row(body, p, chunks, run, lo, hi, r1, self._row_base(r1), tail=False)
            base = i64(c_tail * g.sw - g.pw)
            self._emit(body, self.pair, p, i64(c_tail), base, r, h0, None,
                       self._row_loads(h0, base, None))
        if g.OH % 2:
            r = i64(g.OH - 1)
            self._row(body, p, chunks, run, lo, hi, r, self._row_base(r))

    def _masked_row(self, body, p, c0, base, r, h0):
        """A vector of the row layout at a border or tail: masks drop the lanes outside the plane
        and the outputs past the row."""
        b, g, V, L = self.b, self.g, self.V, self.L
        cols = b.add(splat(b, b.trunc(base, I32), L), _ivec(range(L)))
        col_ok = _in_range(b, cols, 0, g.W, name="col.ok")
        out_mask = lane_mask(b, b.sub(i64(g.OW), c0), V)
        loads = []
        for i in range(g.kh):
            h = b.add(h0, i64(i * g.dh), name=f"row{i}")
            mask = col_ok
            if g.rows_outside:   # rows of the padding read nothing: no column is below 0
                ok = _in_range(b, h, 0, g.H, name=f"row{i}.ok")
                hi = splat(b, b.select(ok, ir.Constant(I32, g.W), ir.Constant(I32, 0)), L)
                mask = b.and_(b.icmp_signed(">=", cols, _ivec([0] * L)),
                              b.icmp_signed("<", cols, hi), name=f"row{i}.mask")
                h = b.select(ok, h, i64(0))
            loads.append(([i], b.add(b.mul(h, i64(g.W)), base), mask))
        self._emit(body, self, p, c0, base, r, h0, out_mask, loads)

    def _block(self, body, p, r):
        b, g, lay = self.b, self.g, self.lay
        used = lay.R * g.OW
        span = lambda rows: _block_span(g, rows)
        if g.OH % lay.R == 0:
            out_mask = _bvec([q < used for q in range(self.V)])
            mask = _bvec([q < span(lay.R) for q in range(self.L)])
        else:   # the last group has fewer rows
            rows = b.sub(i64(g.OH), r)
            rows = b.select(b.icmp_signed("<", rows, i64(lay.R)), rows, i64(lay.R))
            out_mask = lane_mask(b, b.mul(rows, i64(g.OW)), self.V)
            n = b.add(b.mul(b.sub(rows, i64(1)), i64(g.sh * g.W)), i64(span(1)))
            mask = lane_mask(b, n, self.L)
        h0 = b.mul(r, i64(g.sh), name="row.base")
        loads = [(list(range(g.kh)), b.mul(h0, i64(g.W)), mask)]
        self._emit(body, self, p, i64(0), i64(0), r, h0, out_mask, loads)

    def taps_of(self, ptr, off, mask, fill, rows):
        """[((i, j), vector of tap (i, j) for the V output lanes)] of the wide access at `off`
        of ptr (an entry of `loads`) for its tap rows, `fill` (a constant of wide_ty) in lanes
        outside the plane. Unmasked with unit column stride, each tap is one plain load (its
        lanes are consecutive inputs); else one wide load whose lanes are shuffled apart. An
        `_Edge` access loads inside the row and shuffles the fill in (constant shuffles)."""
        b, g, V, L = self.b, self.g, self.V, self.L
        if isinstance(mask, _Edge) and self.direct:
            fill_v = ir.Constant(self.vty, [c.constant for c in fill.constant[:V]])
            out = []
            for i in rows:
                for j in range(g.kw):
                    at = mask.base + j * g.dw
                    v = self._edge_load(ptr, b.add(off, i64(j * g.dw)), at, V, fill_v)
                    out.append(((i, j), v))
            return out
        if mask is None and self.direct:
            return [((i, j), vload(b, ptr, b.add(off, i64(j * g.dw)), self.vty, name=f"tap{i}{j}"))
                    for i in rows for j in range(g.kw)]
        if isinstance(mask, _Edge):
            wide = self._edge_load(ptr, off, mask.base, L, fill)
        else:
            wide = self.load(ptr, off, mask, fill)
        undef = ir.Constant(self.wide_ty, ir.Undefined)
        return [((i, j), b.shuffle_vector(wide, undef, self.taps(i, j), name=f"tap{i}{j}"))
                for i in rows for j in range(g.kw)]

    def _edge_load(self, ptr, off, col: int, n: int, fill):
        """Columns col .. col+n of the row at `off` (the element of column col), `fill` outside
        the row: a plain load of n columns moved inside the row (W >= n) and a constant shuffle."""
        b, W = self.b, self.g.W
        start = min(max(col, 0), W - n)
        v = vload(b, ptr, b.add(off, i64(start - col)), vec(self.T, n))
        idx = [q + col - start if 0 <= col + q < W else n + q for q in range(n)]
        if idx == list(range(n)):
            return v
        return b.shuffle_vector(v, fill, _ivec(idx), name="edge")

    def taps(self, i, j):
        """The lanes of the wide access holding tap (i, j) (a shuffle mask)."""
        return _ivec(self.lay.lanes(self.g, i, j))

    def pos(self, q: int) -> int:
        """Element offset of lane q of a wide access from the access's offset (pieces are sh
        rows apart)."""
        lp = self.L // self.lay.pieces
        return q // lp * self.g.sh * self.g.W + q % lp

    def positions(self, i, j):
        """The element offsets of tap (i, j) of each output lane from its access's offset."""
        return _ivec([self.pos(q) for q in self.lay.lanes(self.g, i, j)])

    def _join(self, parts):
        """One vector of the pieces (two of equal length)."""
        a, c = parts
        return self.b.shuffle_vector(a, c, _ivec(range(2 * a.type.count)))

    def _split(self, v, k: int):
        """Piece k of v (see `_join`)."""
        n = v.type.count // self.lay.pieces
        return self.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                     _ivec(range(k * n, (k + 1) * n)))

    def load(self, ptr, off, mask, fill):
        """The wide access at `off` (an entry of `loads`): wide_ty, `fill` where masked."""
        k = self.lay.pieces
        if k == 1:
            return wide_load(self.b, ptr, off, self.wide_ty, mask, fill)
        assert mask is None
        step = self.g.sh * self.g.W
        return self._join([vload(self.b, ptr, self.b.add(off, i64(q * step)),
                                 vec(self.T, self.L // k)) for q in range(k)])

    def wide_store(self, value, ptr, off, mask):
        """Store a wide_ty vector as the wide access at `off` (the inverse of `load`)."""
        k = self.lay.pieces
        if k == 1:
            wide_store(self.b, value, ptr, off, mask)
            return
        step = self.g.sh * self.g.W
        for q in range(k):
            vstore(self.b, self._split(value, q), ptr, self.b.add(off, i64(q * step)))

    def out_load(self, ptr, r, c0, ty, out_mask, fill):
        """The vector of outputs (r, c0 ..) of an array shaped like out (ty: V lanes)."""
        assert not self.lay.order
        k = self.lay.pieces
        if k == 1:
            return wide_load(self.b, ptr, self.out_offset(r, c0), ty, out_mask, fill)
        assert out_mask is None
        at = self.out_offset(r, c0)
        return self._join([vload(self.b, ptr, self.b.add(at, i64(q * self.g.OW)),
                                 vec(ty.element, ty.count // k)) for q in range(k)])

    def delta(self, rows) -> int | None:
        """Element offset of the wide access serving tap rows `rows` from the first access of
        the vector (`loads[0]`), when known at compile time: always unless rows of the padding
        move the accesses (rows_outside)."""
        if self.g.rows_outside:
            return None
        return rows[0] * self.g.dh * self.g.W if self.lay.R == 1 else 0

    def out_offset(self, r, c0):
        return self.b.add(self.b.mul(r, i64(self.g.OW)), c0)

    def _memory_order(self, v):
        """v (in the vector's lane order) in the outputs' order (see _Layout.order)."""
        order = self.lay.order
        if not order:
            return v
        inv = [order.index(m) for m in range(len(order))]
        return self.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), _ivec(inv))

    def store(self, value, ptr, r, c0, out_mask):
        value = self._memory_order(value)
        k = self.lay.pieces
        if k == 1:
            wide_store(self.b, value, ptr, self.out_offset(r, c0), out_mask)
            return
        for q in range(k):
            vstore(self.b, self._split(value, q), ptr,
                   self.b.add(self.out_offset(r, c0), i64(q * self.g.OW)))


def _plane_ptr(b, ptr, p, size: int, ty, name: str):
    return gep(b, ptr, b.mul(p, i64(size)), ty, name=name)


# --------------------------------------------------------------------------- forward kernels
def _lower_pool(module, name, ins, mode: str, epilogue=None):
    """max_pool2d ("max"), max_pool2d_argmax ("argmax"), both at once ("max+argmax": out is the
    max, in0 the argmax output, in1 x) or avg_pool2d ("avg")."""
    x_t = ins.inputs[0].type
    g = _geom(x_t.shape, ins.out.type.shape, ins.params)
    f = kernel_function(module, name, 2 if mode == "max+argmax" else 1, epilogue)
    b, out, x = f.b, f.out, f.ins[-1]
    idx_out = f.ins[0] if mode == "max+argmax" else (out if mode == "argmax" else None)
    w = _Window(b, g, x_t.dtype, ins.prim.name, shift_tail=True, reads_only=True, narrow_tail=True,
                in_lane=True)
    T = w.T
    want_max, want_idx = mode in ("max", "max+argmax"), mode in ("argmax", "max+argmax")
    fill = 0.0 if mode == "avg" else float("-inf")

    def body(w, p, c0, base, r, h0, out_mask, loads):
        V, fill_vec = w.V, ir.Constant(w.wide_ty, [fill] * w.L)
        x_p = _plane_ptr(b, x, p, g.H * g.W, T, "x.plane")
        acc = best = bidx = None
        # the argmax relative to the first access's offset while the accesses lie at constant
        # distances from it: each tap's index is a constant vector, the offset added once
        rel = want_idx and w.delta(loads[0][0]) is not None
        base32 = b.trunc(loads[0][1], I32) if rel else None

        def tap_index(rows, off, i, j):
            if rel:
                return _ivec([w.delta(rows) + w.pos(q) for q in w.lay.lanes(g, i, j)])
            return b.add(splat(b, b.trunc(off, I32), V), w.positions(i, j))

        if want_idx and (g.rows_outside or g.cols_outside):
            best = ir.Constant(w.vty, [float("-inf")] * V)
            bidx = _first_real_tap(b, w, base, h0, loads)
            if rel:
                bidx = b.sub(bidx, splat(b, base32, V))
        for rows, off, mask in loads:
            for (i, j), v in w.taps_of(x_p, off, mask, fill_vec, rows):
                if want_idx and best is None:   # no padding: tap (0, 0) is real, the start
                    best, bidx = v, tap_index(rows, off, i, j)
                elif want_idx:
                    # first NaN or first strict maximum; NaN stays once found
                    upd = b.and_(b.fcmp_unordered(">", v, best), b.fcmp_ordered("ord", best, best))
                    best = b.select(upd, v, best)
                    bidx = b.select(upd, tap_index(rows, off, i, j), bidx)
                elif acc is None:
                    acc = v
                elif mode == "avg":
                    acc = b.fadd(acc, v)
                else:
                    upd = b.and_(b.fcmp_unordered(">", v, acc), b.fcmp_ordered("ord", acc, acc))
                    acc = b.select(upd, v, acc)
        if mode == "avg":
            acc = b.fdiv(acc, ir.Constant(w.vty, [float(g.kh * g.kw)] * V))
        if want_idx:
            if rel:
                bidx = b.add(splat(b, base32, V), bidx, name="argmax")
            w.store(bidx, _plane_ptr(b, idx_out, p, g.OH * g.OW, I32, "idx.plane"), r, c0, out_mask)
        if want_max or mode == "avg":
            w.store(best if acc is None else acc, _plane_ptr(b, out, p, g.OH * g.OW, T, "out.plane"),
                    r, c0, out_mask)

    planes = thread_range(b, g.planes, f.tid, f.nthreads)
    w.loop(*planes, body, end_plane=lambda p: _plane_done(f, p, g.OH * g.OW))
    b.ret_void()


def _first_real_tap(b, w: _Window, base, h0, loads):
    """Index of each window's first non-padding element: where the argmax starts, so that padding
    (-inf) never wins, not even against real -inf."""
    g, V = w.g, w.V
    if w.lay.R > 1:   # no padding: tap (0, 0)
        return b.add(splat(b, b.trunc(loads[0][1], I32), V), w.positions(0, 0))
    # the first tap row/column at or after 0: h0 + ceil(-h0 / dh) * dh when h0 < 0
    up = b.mul(b.sdiv(b.sub(i64(g.dh - 1), h0), i64(g.dh)), i64(g.dh))
    h = b.select(b.icmp_signed("<", h0, i64(0)), b.add(h0, up), h0)
    cols = b.add(splat(b, b.trunc(base, I32), V), _ivec([l * g.sw for l in range(V)]))
    zero = _ivec([0] * V)
    up = b.mul(b.sdiv(b.sub(_ivec([g.dw - 1] * V), cols), _ivec([g.dw] * V)), _ivec([g.dw] * V))
    cols = b.select(b.icmp_signed("<", cols, zero), b.add(cols, up), cols)
    return b.add(splat(b, b.trunc(b.mul(h, i64(g.W)), I32), V), cols)


# Registered without `epilogue=True`, so the scheduler never fuses an epilogue into a max_pool2d,
# alone or paired with its argmax (the lowering and lower_max_pool2d_with_argmax would take one,
# and codegen/runtime.py passes one to the paired kernel).
@register(max_pool2d_p, epilogue=False, parallel=True, cost=memory_cost,
          compile_weight=POOL_WEIGHT)
def _max_pool2d_lower(module, name, ins, epilogue=None):
    _lower_pool(module, name, ins, "max", epilogue)


@register(max_pool2d_argmax_p, epilogue=True, parallel=True, cost=memory_cost,
          compile_weight=POOL_WEIGHT)
def _max_pool2d_argmax_lower(module, name, ins, epilogue=None):
    _lower_pool(module, name, ins, "argmax", epilogue)


@register(avg_pool2d_p, epilogue=True, parallel=True, cost=memory_cost,
          compile_weight=POOL_WEIGHT)
def _avg_pool2d_lower(module, name, ins, epilogue=None):
    _lower_pool(module, name, ins, "avg", epilogue)


def lower_max_pool2d_with_argmax(module, name, ins, epilogue=None):
    """A fused kernel for the scheduler: max_pool2d `ins` and the argmax of the same x and window
    in one pass, `void name(ptr out, ptr idx_out, ptr x, [epilogue ptrs], ptr scratch, i64 tid,
    i64 nthreads)`; an epilogue applies to `out`. Not registered: a kernel is one primitive."""
    _lower_pool(module, name, ins, "max+argmax", epilogue)


# --------------------------------------------------------------------------- backward kernels
def _spread(b, w: _Window, v, cover, depth: int, other):
    """The wide vector with, at each lane, output lane cover[q][depth] of v (else a lane of
    `other`, a vector of v's type)."""
    return b.shuffle_vector(v, other, _ivec([c[depth] if len(c) > depth else w.V for c in cover]))


@register(avg_pool2d_grad_p, epilogue=True, parallel=True, cost=memory_cost,
          compile_weight=POOL_WEIGHT)
def _avg_pool2d_grad_lower(module, name, ins, epilogue=None):
    """Each output's ct/(kh*kw) spread over its window: one shuffle per wide access when the
    windows do not overlap (stored directly), else a read-modify-write of the sum."""
    ct_t = ins.inputs[0].type
    g = _geom(ins.out.type.shape, ct_t.shape, ins.params)
    f = kernel_function(module, name, 1, epilogue)
    b, out, (ct,) = f.b, f.out, f.ins
    tiles = g.ph == g.pw == 0 and (g.kh, g.kw) == (g.sh, g.sw) and (g.H, g.W) == (g.OH * g.sh,
                                                                                 g.OW * g.sw)
    overlap = g.kh > g.sh or g.kw > g.sw
    # disjoint windows store what they spread (zeros between windows): storing twice is harmless
    w = _Window(b, g, ct_t.dtype, ins.prim.name, shift_tail=not overlap, narrow_tail=True)
    T = w.T

    def zero_plane(p):   # unless the windows tile the plane exactly
        if not tiles:
            zero_fill(b, _plane_ptr(b, out, p, g.H * g.W, T, "out.plane"), g.H * g.W, T, w.V,
                      ins.prim.name)

    def body(w, p, c0, base, r, h0, out_mask, loads):
        V, L = w.V, w.L
        zero_v, zero_w = ir.Constant(w.vty, [0.0] * V), ir.Constant(w.wide_ty, [0.0] * L)
        out_p = _plane_ptr(b, out, p, g.H * g.W, T, "out.plane")
        ct_p = _plane_ptr(b, ct, p, g.OH * g.OW, T, "ct.plane")
        ctv = w.out_load(ct_p, r, c0, w.vty, out_mask, zero_v)
        ctv = b.fdiv(ctv, ir.Constant(w.vty, [float(g.kh * g.kw)] * V), name="ct.scaled")
        for rows, off, mask in loads:
            cover = w.lay.cover(g, rows)
            depth = max(len(c) for c in cover)
            add = _spread(b, w, ctv, cover, 0, zero_v)
            for d in range(1, depth):
                add = b.fadd(add, _spread(b, w, ctv, cover, d, zero_v))
            if overlap:   # add to what other windows wrote
                add = b.fadd(w.load(out_p, off, mask, zero_w), add)
            w.wide_store(add, out_p, off, mask)

    planes = thread_range(b, g.planes, f.tid, f.nthreads)
    w.loop(*planes, body, zero_plane, lambda p: _plane_done(f, p, g.H * g.W))
    b.ret_void()


def _blocks(ins) -> _Geom | None:
    """For max_pool2d_grad / _gather (inputs: data, idx[N,C,OH,OW]): the disjoint blocks
    (H//OH x W//OW, one per output, as windows with stride == kernel) that max-pool windows are
    when the stride equals the kernel, where these kernels look for each index first. None when
    they are degenerate (stride-1 pooling) or too large to unroll."""
    n, c, OH, OW = ins.inputs[1].type.shape
    H, W = ins.inputs[0].type.shape[2:] if ins.prim is max_pool2d_gather_p else \
        ins.out.type.shape[2:]
    if OH == 0 or OW == 0:
        return None
    bh, bw = H // OH, W // OW
    if 1 <= bh <= 5 and 1 <= bw <= 5 and bh * bw >= 2:
        return _Geom(n * c, H, W, OH, OW, bh, bw, bh, bw, 0, 0)
    return None


def _block_offset(b, w: _Window, idxv, loads):
    """Each output's index relative to its block's first element (tap (0, 0))."""
    return b.sub(idxv, b.add(splat(b, b.trunc(loads[0][1], I32), w.V), w.positions(0, 0)),
                 name="in.block")


def _block_lanes(w: _Window, rows, cover):
    """For max_pool2d_grad's wide access serving tap rows `rows`: per lane, its offset from the
    first element of the block of the output lane covering it (-1 where none does), so that an
    output whose `_block_offset` equals it points at that lane."""
    first = w.lay.lanes(w.g, 0, 0)
    return _ivec([w.delta(rows) + w.pos(q) - w.pos(first[c[0]]) if c else -1
                  for q, c in enumerate(cover)])


def _outside_block(b, w: _Window, d, out_mask):
    """Lanes (of out_mask) whose index is not in the output's block (d: `_block_offset`)."""
    g = w.g
    inside = None
    for dh in range(g.kh):
        dd = b.sub(d, _ivec([dh * g.W] * w.V)) if dh else d
        t = b.icmp_unsigned("<", dd, _ivec([g.kw] * w.V))
        inside = t if inside is None else b.or_(inside, t)
    if out_mask is None:
        return b.not_(inside, name="outside")
    return b.and_(out_mask, b.not_(inside), name="outside")


def _any(b, mask):
    n = mask.type.count
    f = intrinsic(b.module, f"llvm.vector.reduce.or.v{n}i1", I1, [mask.type])
    return b.call(f, [mask])


def _scatter_add(b, g_hw: int, ohw_shape, out_p, ct_p, idx_p, T, block: _Geom | None):
    """out_p[idx] += ct for the outputs of a plane whose index is not in their block (all when
    block is None); indices outside the plane are skipped."""
    OH, OW = ohw_shape
    with for_range(b, 0, OH, name="max_pool2d_grad.scatter.oh") as r:
        with for_range(b, 0, OW, name="max_pool2d_grad.scatter.ow") as c:
            o = b.add(b.mul(r, i64(OW)), c)
            k = b.sext(load(b, idx_p, o, I32, name="k"), I64)
            ok = b.icmp_unsigned("<", k, i64(g_hw))
            if block is not None:
                d = b.sub(k, b.add(b.mul(r, i64(block.kh * block.W)), b.mul(c, i64(block.kw))))
                for dh in range(block.kh):
                    inside = b.icmp_unsigned("<", b.sub(d, i64(dh * block.W)), i64(block.kw))
                    ok = b.and_(ok, b.not_(inside))
            with if_then(b, ok, name="max_pool2d_grad.add"):
                dst = gep(b, out_p, k, T)
                b.store(b.fadd(b.load(dst, typ=T), load(b, ct_p, o, T)), dst)


# On two threads (the 2-core Zen 3 VM) LeNet-5's conv1 pool gradient (f32[64,6,24,24], 885 KB
# written) is no faster than on one (26-31 us, TRACEJIT_PROFILE minima), and not for its
# instructions: a second pass over the same output in the same call took 12 us on two threads (each
# core's half then in its L2), on one thread as long as the first (885 KB exceed one L2), and each
# quarter of the planes cost ~6.5 us on one thread or two. The first pass pays for where the lines
# were: the arena (schedule._place_arena, first fit) lays the output over conv1's output and
# pool1's, 96 planes apart from their own, so a quarter of each core's planes were written by the
# other core in the forward pass. With k26's 221 KB output placed above the rest (an experiment, not
# done), so that the gradient lies exactly over conv1's output, it took 21.5-22.8 us instead of
# 24.5-25.4 (2 threads, alternating windows, load 1-3); in a region of its own (touched only by it
# and conv1's weight gradient, which reads every image on both cores) 38.5 instead of 31.5, and 36
# instead of 28 on one thread (cold lines).
@register(max_pool2d_grad_p, epilogue=True, parallel=True, cost=memory_cost,
          compile_weight=POOL_WEIGHT)
def _max_pool2d_grad_lower(module, name, ins, epilogue=None):
    """Scatter-add of ct to idx. When the plane splits into disjoint blocks, one per output (the
    windows of stride == kernel pooling), it is dense: each block lane gets ct where idx points at
    it, else 0 - vector compares and selects. Indices outside their block (overlapping windows)
    are added by a scalar pass afterwards, only in planes that have any."""
    ct_t = ins.inputs[0].type
    f = kernel_function(module, name, 2, epilogue)
    b, out, (ct, idx) = f.b, f.out, f.ins
    (n, c, OH, OW), (H, W), T = ct_t.shape, ins.out.type.shape[2:], llvm_type(ct_t.dtype)
    block = _blocks(ins)
    ptrs = lambda p: (_plane_ptr(b, out, p, H * W, T, "out.plane"),
                      _plane_ptr(b, ct, p, OH * OW, T, "ct.plane"),
                      _plane_ptr(b, idx, p, OH * OW, I32, "idx.plane"))
    if block is None:
        V = vector_width(64 if ct_t.dtype == "f64" else 32)
        planes = thread_range(b, n * c, f.tid, f.nthreads)
        with for_range(b, *planes, name="max_pool2d_grad.plane") as p:
            out_p, ct_p, idx_p = ptrs(p)
            zero_fill(b, out_p, H * W, T, V, "max_pool2d_grad")
            _scatter_add(b, H * W, (OH, OW), out_p, ct_p, idx_p, T, None)
            _plane_done(f, p, H * W)
        b.ret_void()
        return

    # a vector's stores are its blocks' lanes (kw == sw: nothing else), set from its own ct and
    # idx, so storing them twice (shift_tail) is harmless
    w = _Window(b, block, ct_t.dtype, ins.prim.name, shift_tail=True, narrow_tail=True)
    any_outside = b.alloca(I1, name="any_outside")

    def begin_plane(p):
        b.store(ir.Constant(I1, 0), any_outside)
        if (H, W) != (OH * block.kh, OW * block.kw):   # rows/columns beyond the last block
            zero_fill(b, ptrs(p)[0], H * W, T, w.V, "max_pool2d_grad")

    def body(w, p, c0, base, r, h0, out_mask, loads):
        V, L = w.V, w.L
        zero_v, none_v = ir.Constant(w.vty, [0.0] * V), ir.Constant(vec(I32, V), [-1] * V)
        out_p, ct_p, idx_p = ptrs(p)
        ctv = w.out_load(ct_p, r, c0, w.vty, out_mask, zero_v)
        idxv = w.out_load(idx_p, r, c0, vec(I32, V), out_mask, none_v)
        d = _block_offset(b, w, idxv, loads)
        outside = _any(b, _outside_block(b, w, d, out_mask))
        b.store(b.or_(b.load(any_outside), outside), any_outside)
        for rows, off, mask in loads:
            cover = w.lay.cover(block, rows)
            # lane q is hit when its output's index points at it (both relative to the block)
            hit = b.icmp_signed("==", _spread(b, w, d, cover, 0, none_v),
                                _block_lanes(w, rows, cover))
            val = b.select(hit, _spread(b, w, ctv, cover, 0, zero_v), ir.Constant(w.wide_ty, [0.0] * L))
            w.wide_store(val, out_p, off, mask)

    def end_plane(p):
        with if_then(b, b.load(any_outside), name="max_pool2d_grad.outside"):
            _scatter_add(b, H * W, (OH, OW), *ptrs(p), T, block)
        _plane_done(f, p, H * W)

    planes = thread_range(b, n * c, f.tid, f.nthreads)
    w.loop(*planes, body, begin_plane, end_plane)
    b.ret_void()


@register(max_pool2d_gather_p, epilogue=True, parallel=True, cost=memory_cost,
          compile_weight=POOL_WEIGHT)
def _max_pool2d_gather_lower(module, name, ins, epilogue=None):
    """g at idx per plane. With disjoint blocks (see max_pool2d_grad) a vector of outputs selects
    among its blocks' taps (wide loads and shuffles, as max_pool2d reads x); a vector with an
    index outside its block is gathered with scalar loads instead."""
    g_t = ins.inputs[0].type
    f = kernel_function(module, name, 2, epilogue)
    b, out, (g, idx) = f.b, f.out, f.ins
    (n, c, H, W), (OH, OW), T = g_t.shape, ins.out.type.shape[2:], llvm_type(g_t.dtype)
    block = _blocks(ins)

    def scalar_gather(g_p, k):
        ok = b.icmp_unsigned("<", k, i64(H * W))
        v = load(b, g_p, b.select(ok, k, i64(0)), T)
        return b.select(ok, v, ir.Constant(T, 0.0))

    if block is None:
        planes = thread_range(b, n * c, f.tid, f.nthreads)
        with for_range(b, *planes, name="max_pool2d_gather.plane") as p:
            g_p = _plane_ptr(b, g, p, H * W, T, "g.plane")
            out_p = _plane_ptr(b, out, p, OH * OW, T, "out.plane")
            idx_p = _plane_ptr(b, idx, p, OH * OW, I32, "idx.plane")
            with for_range(b, 0, OH * OW, name="max_pool2d_gather.o") as o:
                k = b.sext(load(b, idx_p, o, I32, name="k"), I64)
                store(b, scalar_gather(g_p, k), out_p, o, T)
            _plane_done(f, p, OH * OW)
        b.ret_void()
        return

    w = _Window(b, block, g_t.dtype, ins.prim.name, shift_tail=True, reads_only=True)
    V = w.V
    slot = b.alloca(w.vty, name="gathered")
    zero_w = ir.Constant(w.wide_ty, [0.0] * w.L)

    def body(p, c0, base, r, h0, out_mask, loads):
        g_p = _plane_ptr(b, g, p, H * W, T, "g.plane")
        idx_p = _plane_ptr(b, idx, p, OH * OW, I32, "idx.plane")
        idxv = wide_load(b, idx_p, w.out_offset(r, c0), vec(I32, V), out_mask,
                          ir.Constant(vec(I32, V), [-1] * V))
        val = ir.Constant(w.vty, [0.0] * V)
        d = _block_offset(b, w, idxv, loads)
        first = w.lay.lanes(block, 0, 0)
        for rows, off, mask in loads:
            for (i, j), tap in w.taps_of(g_p, off, mask, zero_w, rows):
                at = _ivec([w.delta(rows) + w.pos(q) - w.pos(f)
                            for q, f in zip(w.lay.lanes(block, i, j), first)])
                val = b.select(b.icmp_signed("==", d, at), tap, val)
        b.store(val, slot)
        with if_then(b, _any(b, _outside_block(b, w, d, out_mask)),
                     name="max_pool2d_gather.outside"):
            v = ir.Constant(w.vty, ir.Undefined)
            for l in range(V):
                k = b.sext(b.extract_element(idxv, i32(l)), I64)
                v = b.insert_element(v, scalar_gather(g_p, k), i32(l))
            b.store(v, slot)
        w.store(b.load(slot), _plane_ptr(b, out, p, OH * OW, T, "out.plane"), r, c0, out_mask)

    planes = thread_range(b, n * c, f.tid, f.nthreads)
    w.loop(*planes, body, end_plane=lambda p: _plane_done(f, p, OH * OW))
    b.ret_void()

"""The plan of the direct convolution (`Core`: conv2d, and conv2d_input_grad as a convolution of
the dilated cotangent with the flipped weights): which register block and which of the three
algorithms (direct.py: row tiles or the flat mode; channel.py: vectors over output channels), the
scratch layout, and the lowering of the kernel function around the algorithm's shared function.
"""
from __future__ import annotations

import dataclasses

import llvmlite.ir as ir

from ... import record
from ....ir.prims.nn import conv2d_input_grad_p, conv2d_p

from ...loops import I64, gep, i64, store
from .. import CONV_WEIGHT, conv2d_cost, conv2d_input_grad_cost, register
from ...target import vector_registers
from ..toolkit import ceil_div, dtype_info, kernel_function, round_up, thread_range
from .channel import lower_channel
from .direct import lower_direct
from .layout import ALIGN, FORCE, Prep, block_weights, blocked_weights_elems
from .phased import phased_input_grad
from .transposed import applies as transposed_applies, transposed_input_grad
from .pointwise import is_pointwise, lower_product, product_scratch
from .window import is_window, lower_conv2d, lower_conv2d_input_grad

# Register blocks (R, PR, PV) tried, in order of preference: few of them, so that kernels of
# different shapes share functions. A tile of PV vectors per row is the same work as PV row blocks
# of one vector, so PV = 1 but for images of one row (conv1d). With 32 registers (AVX-512) up to
# 24 accumulators; with 16 (AVX2) at most 12, leaving the tap's loads and the broadcast weight
# their registers (16 accumulators spilled on every tap: 26 GF/s against 33 with 6 x 2 on znver1).
# 4 x 2 (8 accumulators: fewer loads per FMA than the 12 blocks but 4 x 3) for channel counts that
# 6 does not divide (6 x 2 computes 18 of 16 channels). On znver1, one thread: LeNet-5's second
# conv 36.0 GF/s against 32.9 with 6 x 2, ResNet-8's 3x3 convs with 16 and 32 channels 35.7-37.0
# against 31.8-32.7 (4 x 3: 35.2-35.3, 3 x 4: 30.3); 64 channels on 32 x 32 images stay with 6 x 2
# (33.4 against 32.9).
# AVX-512 (Xeon, one thread, CPU-time minima against a 227 GF/s FMA peak): 8 x 2 before 4 x 4 (the
# same 16 accumulators and loads per tap, but each input row loaded serves 8 channels, not 4):
# the conv block's 3x3x64 convs 154-158 GF/s against 138-139, ResNet-8's 16 and 32 channels
# 145-159 against 133-145 (24 accumulators, 6 x 4 or 8 x 3: no better). 6 x 2 x 2 (24
# accumulators) for 6 channels on rows of 17-32 columns: LeNet-5's first conv 120 against 111
# with 6 x 1 x 2 (the cost model counts them equal: it comes first).
# AVX2 (Zen 3, one thread): 3 x 1 x 3 first, for 6 channels on rows of three vectors (LeNet-5's
# first conv, 24 columns; 1-2 input channels): the model ties it with 6 x 2 x 1, measured 85
# GF/s against 76 (9 accumulators, 3 vectors of one row per tap); no other shape of the
# workloads comes within the slack of it.
_BLOCKS = {32: ((8, 2, 1), (4, 4, 1), (2, 8, 1), (1, 16, 1), (4, 6, 1), (8, 1, 2), (6, 2, 2),
                (6, 2, 1)),
           16: ((3, 1, 3), (6, 2, 1), (4, 2, 1), (4, 3, 1), (2, 6, 1), (1, 12, 1), (3, 4, 1),
                (6, 1, 2), (4, 1, 3))}
# Blocks of the flat mode (one long row: PR = 1).
_FLAT_BLOCKS = {32: ((8, 1, 2), (8, 1, 3), (6, 1, 3), (4, 1, 4), (6, 1, 2)),
                16: ((6, 1, 2), (4, 1, 3), (3, 1, 4), (2, 1, 6))}

# Cost model of a block (`Core._best`). Per tap a block of acc = R*PR*PV accumulators issues acc
# FMAs and R + 2*PR*PV L1 accesses (R broadcasts, PR*PV unaligned vector loads, most of which
# split a cache line); the core does two FMAs and two loads per cycle, so a tap costs
# max(acc, R + 2*PR*PV) half-cycles. An FMA's result is ready four cycles later, so two FMA
# pipes need about eight independent accumulators: with fewer, the chains stall in proportion.
# (znver1 splits a 256-bit FMA in two 128-bit halves, one vector FMA per cycle at a latency of
# five: five suffice there.)
_FMAS_IN_FLIGHT = 8.0
# Blocks whose cost is within this factor of the best count as equal: the first of them (in
# order of preference) is taken, since sharing a function saves compile time.
_SHARE_SLACK = 1.1
# The flat mode must save more than this fraction of the block cost: it adds a copy of the
# valid columns and a per-thread buffer.
_FLAT_GAIN = 0.9
# Half-cycles per output vector of the flat mode's copy of the valid columns (a masked load and
# store, the row's address): it counts where there are few taps per output, LeNet-5's first conv
# (one input channel, 5 x 5: 25 taps; the flat mode saves 12% of the vectors, the copy costs more:
# one thread 99 GF/s flat against 111 with 6 channels x 2 vectors of each row). Measured with
# AVX-512 only; AVX2 machines keep the choice they were tuned with.
_FLAT_COPY = 8
# The input gradient as a transposed convolution (transposed.py) when it costs less than this
# fraction of the core: it adds a row buffer and the copy of its rows.
_TRANSPOSED_GAIN = 0.9
# Fewer items (image x channel block) than this split the rows into chunks too, so that the
# threads of a small batch have work (not with an epilogue or the flat mode: whole planes).
_MIN_ITEMS = 8


def tap_cycles(acc: int, loads: int) -> float:
    """Half-cycles of a step of `acc` independent FMAs with `loads` L1 accesses (see above)."""
    return max(acc, loads) * max(1.0, _FMAS_IN_FLIGHT / acc)


@record(frozen=True)
class Core:
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
    prep: Prep
    src_image: int   # elements of one source image
    vl: int
    r: int = 0       # register block, chosen by `blocked`
    pr: int = 0
    pv: int = 0
    yc: int = 1      # row chunks per item (parallelism for small batches)
    flat: bool = False   # short rows: the output as one row of pitch rp (see `flat_len`)
    chan: bool = False   # short rows, O a multiple of vl: vectors over output channels (channel.py)

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
            # half-cycles per tap (see the cost model above)
            cycles = tap_cycles(acc, r + 2 * pr * pv)
            work = ceil_div(self.co, r) * ceil_div(oy, pr) * ceil_div(nvec, pv)
            costs.append(cycles * work)
        return next((blk, c) for blk, c in zip(blocks, costs) if c <= _SHARE_SLACK * min(costs))

    def cost(self) -> float:
        """Half-cycles of one image (of a blocked core): every block's taps over the kernel
        rows it does not skip (see `direct._core_body`)."""
        first, last = self.prep.data_rows()
        span = self.pv * self.vl
        rows = 0
        if self.flat:
            rp = self.prep.row_pitch
            for x0 in range(0, self.flat_len, span):
                y_lo, y_hi = x0 // rp, (x0 + span - 1) // rp
                rows += max(0, min(self.kh, last + 1 - y_lo * self.sy)
                            - max(0, first - y_hi * self.sy))
        else:
            nx = ceil_div(self.ox, span)
            for y0 in range(0, self.oy, self.pr):
                y1 = min(y0 + self.pr, self.oy) - 1
                rows += nx * max(0, min(self.kh, last + 1 - y0 * self.sy)
                                 - max(0, first - y1 * self.sy))
        acc = self.r * self.pr * self.pv
        return (tap_cycles(acc, self.r + 2 * self.pr * self.pv) * ceil_div(self.co, self.r)
                * self.ci * self.kw * rows)

    def blocked(self, epilogue, plain: bool = False) -> "Core":
        """The register block and algorithm; `plain`: a row block of the direct core (no flat or
        channel mode: the strided input gradient's phases, phased.py)."""
        regs = 32 if vector_registers() >= 32 else 16
        blk, cost = self._best(_BLOCKS[regs], self.oy, ceil_div(self.ox, self.vl))
        if plain:
            return dataclasses.replace(self, r=blk[0], pr=blk[1], pv=blk[2])
        flat = False
        if self.sy == 1 and self.sx == 1 and self.oy > 1:
            fblk, fcost = self._best(_FLAT_BLOCKS[regs], 1, ceil_div(self.flat_len, self.vl))
            work = self.ci * self.kh * self.kw   # taps per output vector
            copy = (_FLAT_COPY * self.co * self.oy * ceil_div(self.ox, self.vl)
                    if regs >= 32 else 0)
            flat = fcost * work + copy < _FLAT_GAIN * cost * work
            blk = fblk if flat else blk
        flat = FORCE.get("flat", flat)
        r, pr, pv = FORCE.get("core", blk)
        chan = FORCE.get("chan", self.co % self.vl == 0 and 2 * self.ox <= self.vl)
        if chan:
            return dataclasses.replace(self, r=self.vl, pr=max(1, self.vl // self.ox), pv=1,
                                       chan=True)
        items = self.n * ceil_div(self.co, r)
        yc = 1
        if items < _MIN_ITEMS and epilogue is None and not flat:  # an epilogue: whole planes
            yc = max(1, min(ceil_div(_MIN_ITEMS, items), ceil_div(self.oy, pr)))
        return dataclasses.replace(self, r=r, pr=pr, pv=pv, yc=yc, flat=flat)

    @property
    def region_elems(self) -> int:
        """Per thread: a state slot, the padded copy of one image, slack for the over-reading
        last vectors."""
        slack = self.pv * self.vl + self.kw + self.vl
        return ALIGN + round_up(self.ci * self.prep.chan_pitch + slack, ALIGN)

    @property
    def flip_elems(self) -> int:
        """The weights in blocks of R output channels (`layout.block_weights`; flipped and
        transposed for the input gradient); none in channel mode."""
        if self.chan:
            return 0
        return round_up(blocked_weights_elems(self.co, self.ci, self.r, self.kh * self.kw),
                        ALIGN)

    @property
    def tmp_elems(self) -> int:
        """Flat mode: the R rows out' of one item."""
        if not self.flat:
            return 0
        return round_up(self.r * self.flat_len + self.pv * self.vl, ALIGN)

    @property
    def wt_elems(self) -> int:
        """Channel mode: the weights as [c][i][j][o]."""
        return round_up(self.ci * self.co * self.kh * self.kw, ALIGN) if self.chan else 0

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
        region = kf.scratch   # this thread's own (see kernels/__init__.py)
        store(b, i64(-1), region, i64(0), I64)   # no image in the padded copy yet
        t0, t1 = thread_range(b, self.items, kf.tid, kf.nthreads)
        if self.chan:
            lower_channel(self, kf, region, t0, t1)
            b.ret_void()
            return
        w = gep(b, region, i64(self.region_elems), ety, name="conv.blocked")
        taps = self.kh * self.kw
        if self.flip:   # W(k, m, i, j) = w[m, k, kh-1-i, kw-1-j]
            strides = (taps, self.co * taps, taps - 1, -1)
        else:           # (taps contiguous: ws_i == kw)
            strides = (self.ws_o, self.ws_c, 0, 1)
        block_weights(b, self.dtype, w, kf.ins[1], self.co, self.ci, self.r, taps, strides)
        lower_direct(self, kf, [kf.out, kf.ins[0], w, region], t0, t1)
        b.ret_void()


def _conv_core(ins, epilogue=None) -> Core:
    x, w = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oy, ox = ins.out.shape[2:]
    _, vl, _ = dtype_info(ins.out.dtype)
    rows = (oy - 1) * sh + kh
    q = ceil_div((ox - 1) * sw + kw, sw)
    prep = Prep(h, wd, rows, q, sw, 1, 1, ph, pw)
    core = Core(ins.out.dtype, n, c, o, oy, ox, kh, kw, sh, sw, c * kh * kw, kh * kw, kw, None,
                 prep, c * h * wd, vl)
    return core.blocked(epilogue)


def _input_grad_core(ins, epilogue=None):
    ct, w = ins.inputs
    (sh, sw), (ph, pw) = ins.params["stride"], ins.params["padding"]
    n, o, oh, ow = ct.shape
    _, c, kh, kw = w.shape
    h, wd = ins.params["in_hw"]
    _, vl, _ = dtype_info(ins.out.dtype)
    if (sh, sw) != (1, 1) and not FORCE.get("dilated_igrad", False):
        # per output phase, without the dilation's zeros (phased.py)
        return phased_input_grad(ins.out.dtype, n, o, c, h, wd, oh, ow, kh, kw, sh, sw, ph, pw,
                                 epilogue, Core)
    if pw == 0:
        # Rows of pitch W instead of W + KW - 1: the KW - 1 columns of right padding overlap the
        # KW - 1 columns of left padding of the next row (all zeros either way), so that rows
        # of output pixels are contiguous in the flat mode (out' is out: whole vectors). The
        # last row's reads run into one more (zero) row.
        prep = Prep(oh, ow, h - 1 + kh, wd, 1, sh, sw, kh - 1 - ph, kw - 1, extra=1)
    else:
        prep = Prep(oh, ow, h - 1 + kh, wd - 1 + kw, 1, sh, sw, kh - 1 - ph, kw - 1 - pw)
    # out channel (of the core) = c, in channel = o, tap (i, j) is w[o, c, kh-1-i, kw-1-j]
    core = Core(ins.out.dtype, n, o, c, h, wd, kh, kw, 1, 1, o * kh * kw, kh * kw, kw,
                 (o, c, kh, kw), prep, o * oh * ow, vl).blocked(epilogue)
    if transposed_applies(sh, sw, kh, kw, ph, pw, vl) and n * c >= _MIN_ITEMS:
        # without the padding columns of the full convolution (transposed.py)
        t = transposed_input_grad(ins.out.dtype, n, o, c, h, wd, oh, ow, kh, kw, ph, pw,
                                  _MIN_ITEMS)
        cheaper = t.cost() < _TRANSPOSED_GAIN * core.cost()
        if FORCE.get("tgrad", cheaper):
            return t
    return core


def _register_core(prim, make, cost, lower_window):
    """Register the lowering of a primitive computed by the shared core; `make(ins) -> Core`.
    (The scratch size does not depend on the epilogue: only `yc` does, not the region.) Grouped
    or dilated instructions go to `lower_window` instead (window.py, no scratch)."""
    def scratch_bytes(ins, nthreads):
        if is_window(ins):
            return 0
        if is_pointwise(ins):
            return product_scratch(ins, nthreads)
        core = make(ins)
        return nthreads * core.thread_elems * dtype_info(ins.out.dtype)[2]

    def lower(module: ir.Module, name: str, ins, epilogue=None) -> None:
        if is_window(ins):
            lower_window(module, name, ins, epilogue)
        elif is_pointwise(ins):   # 1x1, no padding: matrix products (pointwise.py)
            lower_product(module, name, ins, epilogue)
        else:
            make(ins, epilogue).lower(module, name, epilogue)

    register(prim, scratch_bytes=scratch_bytes, epilogue=True, parallel=True, cost=cost,
             compile_weight=CONV_WEIGHT)(lower)


_register_core(conv2d_p, _conv_core, conv2d_cost, lower_conv2d)
_register_core(conv2d_input_grad_p, _input_grad_core, conv2d_input_grad_cost,
               lower_conv2d_input_grad)

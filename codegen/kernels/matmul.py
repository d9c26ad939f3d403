"""matmul kernel: C[..., M, N] = op(A) @ op(B), op = transpose where `trans_a` / `trans_b` is set,
for every entry of the broadcast batch axes (ir/prims/linalg.py).

Two register-blocked micro-kernels, both with their accumulators in vector registers:

- outer-product form: an MR x NV tile of C (MR rows, NV vectors of columns) accumulates
  op(A)[i, k] (broadcast) * B[k, j:j+VL] over k. op(A) is read in place for either transpose (it
  is only ever broadcast). B is read in place (rows N apart); B^T, which has no in-place form,
  is transposed one (column tile, K block) panel at a time into the calling thread's scratch
  region, where its rows are contiguous (see _pack_function). Copying panels of B the same way
  is a run-time mode of the same function, not chosen (slower here; FORCE["pack"] = "b").
- dot form (trans_b without trans_a on fewer rows, or a matrix-vector product): an MR x NR tile
  of C keeps MR*NR vector partial sums of A[i, k:k+VL] * B[j, k:k+VL], reduced horizontally once
  at the end; both operands are read contiguously along K, so nothing is packed.

trans_b together with trans_a, or with a short K, uses the outer form on B^T panels whatever M.

Matrix-vector products (N == 1 or M == 1) have their own two kernels, as the forms above would
fill one lane of NV vectors (outer) or recompute MR clamped rows (dot) for the one column or row
(the size-1 axes of second-order code are full of them). A vector operand is contiguous
whichever its transpose, and C [M, 1] has the layout of C^T [1, M], so every case is one of:

- `mv_dot`: C[i] = <Mat[i, :], v> for Mat [R, K] (A for N == 1 without trans_a; B for M == 1
  with trans_b): VL rows at a time, one vector accumulator each, their VL sums transposed into one
  vector of consecutive results (one store).
- `mv_axpy`: C[j] = sum_k v[k] Mat[k, j] for Mat [K, C] (B for M == 1 without trans_b; A for
  N == 1 with trans_a): NV vectors of columns accumulate v[k] (broadcast) * Mat[k, j:j+VL].

The plan swaps the operands where Mat is B (`swap`), so the tile function always sees (out, A', B')
of a product with M' == 1 (mv_axpy) or N' == 1 (mv_dot).

Edge tiles clamp their row (and dot-form column) indices to the last one: the extra lanes recompute
and store the same value into the same element, which costs a little work on the border and no
code variants (a short M whose clamped rows would be a quarter of its rows picks the row block
that clamps fewest). The K tail of the dot form is masked. The outer form's whole column tiles run
without masks; its last (partial) column tile runs the same loops on other run-time values (see
_outer_columns): it reads B's rows in place without masks while they end inside B (lanes past N
read the next row: computed, never stored), its last rows from a small panel copied masked, and
stores through a stack tile in plain pieces: masked stores are microcoded on AVX2 machines such
as znver1.

Compile time: the loops live in shape-generic functions (`shared_function`), one per form, dtype
and register block, defined once per LLVM module and shared by every matmul of the module (the
transpose of A is a pair of run-time strides, the packing of B a run-time mode); the kernel of an
instruction is a small wrapper that partitions the work between threads and passes its shape as
constants.

Without an epilogue the chunks of a call form a grid of column groups (up to one a column tile)
by row groups of C (whole tiles each; see _lower_one); a thread walks its columns tile by tile
and, within a column tile, its rows, so the B panel of the column tile is reused from L1. With an
epilogue, threads split rows only and the epilogue runs on each panel of rows once all its columns
are written.

Batches: a batch whose shared operand makes it one 2-d product on the same buffers (a batch of
vectors times a shared matrix, a batch of A's rows times a shared B) is planned as that product
(_fold_batch). Otherwise the work items are (batch entry, MR-row tile) pairs, split evenly between
threads; a thread walks its items entry by entry, calling the same tile function on the entry's
matrices (an operand broadcast along a batch axis is read in place: its offset ignores that axis).
"""
from __future__ import annotations

import math
from dataclasses import replace

import llvmlite.ir as ir

from .. import record
from ...ir.prims.linalg import matmul_p

from ..loops import carry_loop, fma, gep, i64, llvm_type, load, masked_load, masked_store, \
    splat, store, vload, vstore
from ..parallel import PARALLEL_MIN_NS
from ..target import vector_registers
from . import CACHED_BYTES, FLOPS_PER_NS, MATMUL_TILE_WEIGHTS, MATMUL_WEIGHT, matmul_cost, \
    register
from .toolkit import I64Arg, KernelFunction, Params, Shared, SharedFunction, ceil_div, \
    dtype_info, kernel_function, lane_mask, opaque, params, shared_function, smax, \
    smin, thread_range, zero_vector


def transpose_sums(b: ir.IRBuilder, vecs):
    """A vector whose lane i is the sum of the lanes of vecs[i] (len(vecs) <= lanes). Pairs of
    vectors are folded into one (half of each, added) level by level, then the segments left in
    the one vector are folded in place: about 3 instructions per sum against 13 for `hsum`.
    Each sum adds lanes t and t + h of a segment of 2h lanes (h = lanes/2 down to 1), without
    reassociation (no fast-math flags): the sums of vectors whose lanes are rotated alike are
    the same bits (see _emit_dot)."""
    w = vecs[0].type.count
    zero = ir.Constant(vecs[0].type, [0.0] * w)
    n = 1
    while n < len(vecs):
        n *= 2
    level = list(vecs) + [zero] * (n - len(vecs))
    order = [[k] for k in range(n)]   # the accumulators of each vector, by segment
    seg = w                           # lanes per segment
    idx_ty = ir.VectorType(ir.IntType(32), w)
    while len(level) > 1:
        half = seg // 2
        nxt, nxt_order = [], []
        for (x, ox), (y, oy) in zip(zip(level[0::2], order[0::2]), zip(level[1::2], order[1::2])):
            lo, hi = [], []
            for k in range(len(ox)):          # segment k of x, then of y, each folded in two
                for base in (k * seg, w + k * seg):
                    lo.extend(base + t for t in range(half))
                    hi.extend(base + half + t for t in range(half))
            nxt.append(b.fadd(b.shuffle_vector(x, y, ir.Constant(idx_ty, lo)),
                              b.shuffle_vector(x, y, ir.Constant(idx_ty, hi))))
            nxt_order.append([a for pair in zip(ox, oy) for a in pair])
        level, order, seg = nxt, nxt_order, half
    v, order = level[0], order[0]
    while seg > 1:   # fold each segment onto its first lane
        half = seg // 2
        shift = [min(t + half, w - 1) for t in range(w)]
        v = b.fadd(v, b.shuffle_vector(v, v, ir.Constant(idx_ty, shift)))
        seg = half
    # lane k*seg_len of the folded vector holds the sum of accumulator order[k]
    seg_len = w // len(order)
    lanes = [0] * w
    for k, acc in enumerate(order):
        lanes[acc] = k * seg_len
    return b.shuffle_vector(v, v, ir.Constant(idx_ty, lanes))


# ------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------
OUTER_KC = 128   # K block of the outer form: 128 x 64 bytes of B panel, 8 KB of the 32 KB L1
# With 16 registers (AVX2) the tile is 16 floats (64 bytes) wide: 256 rows, a 16 KB panel, halve
# the row tiles' per-block cost (C tile loads and stores, loop set-up: ~10% of a block of 128
# steps). Zen 3, 1 thread: x @ W [1024, 256] @ [256, 256] 1.58 -> 1.45 ms, [512, 512]^2
# 3.32 -> 3.05; others within noise (x^T @ dy at K = 1024, x [64, 256] @ [256, 784])
OUTER_KC_AVX2 = 256
PACK_MIN_ROWS = 24   # rows of C from which x @ W^T may take the outer form on B^T panels
PACKED_PANEL_ROWS = 128   # rows of C an epilogue follows when B is packed (see _rows)
# An epilogue applied apart: C's panel on the executing thread's stack up to this (see _rows;
# a thread of the pool or the caller's, megabytes of stack: a 30-row panel of [*, 784] is 94 KB)
STACK_PANEL_BYTES = 128 << 10
# An epilogue applied apart (an optimizer's update) on products of at most this share of the L2;
# a larger product's update runs as a loop of its own (see _epilogue_apart)
APART_L2_SHARE = 0.5
DOT_K_PER_ROW = 3    # x @ W^T: the dot form when K > 3 M (see _block_plan)
# the outer form's run-time `pack` parameter
PACK_MODES = {"": 0, "b": 1, "bt": 2, "auto": 3, "shared": 4}
AUTO_PACK_TILES = 3   # "auto": B's panels are copied for at least this many row tiles a call
SMALL_DOT_FLOPS = 1 << 21   # x @ W^T with narrow N: the dot form up to this many flops (_block_plan)
SMALL_M = 48   # the outer form picks its row block for rows of C fewer than this (_fewest_rows)
SHORT_M_WASTE = 0.25   # ... when the full row block's clamped rows are at least this share
FORCE = {}   # tuning overrides (benchmarks/kernels_dense.py --force): "dot"/"outer" blocks, "pack",
# "dot_align" ("a", "b" or None: whose rows the dot form aligns), "dot_store" ("pieces"/"masked":
# how the dot form stores a whole tile's rows), "split" ("rows"/"cols"),
# "apart" (True/False: whether an optimizer's update over any product is its epilogue)


@record(frozen=True)
class _Plan:
    dtype: str
    batch: tuple  # the result's batch shape
    a_batch: tuple  # the operands' batch shapes, padded on the left with 1s to len(batch)
    b_batch: tuple
    m: int
    n: int
    k: int
    trans_a: bool
    form: str     # "outer" | "dot" | "mv_dot" | "mv_axpy"
    pack: str     # outer form: "" (B read in place), "b" (panels of B), "bt" (panels of B^T)
    mr: int
    nr: int       # outer, mv_axpy: vectors of columns per tile; dot: columns per tile
    vl: int
    esize: int
    swap: bool = False  # matvec forms: the kernel's operands (A, B) are the tile function's (B', A')

    @property
    def tile_cols(self) -> int:
        return self.nr * self.vl if self.form in ("outer", "mv_axpy") else self.nr


def _plan(ins) -> _Plan:
    a, bm = ins.inputs
    ta, tb = bool(ins.params.get("trans_a")), bool(ins.params.get("trans_b"))
    m, n = ins.out.shape[-2:]
    k = a.shape[-2] if ta else a.shape[-1]
    dt = ins.out.dtype
    batch = tuple(ins.out.shape[:-2])
    folded = _fold_batch(batch, a, bm, m, n, ta, tb)
    if folded is not None:
        m2, n2, tb2, pre = folded
        plan = _matvec_plan(dt, m2, n2, k, False, tb2) if m2 == 1 or n2 == 1 else None
        plan = plan or _block_plan(dt, m2, n2, k, False, tb2)
        return replace(plan, swap=plan.swap != pre)
    a_batch = (1,) * (len(batch) + 2 - a.ndim) + tuple(a.shape[:-2])
    b_batch = (1,) * (len(batch) + 2 - bm.ndim) + tuple(bm.shape[:-2])
    plan = _matvec_plan(dt, m, n, k, ta, tb) if m == 1 or n == 1 else None
    if plan is not None and plan.swap:
        a_batch, b_batch = b_batch, a_batch
    return replace(plan or _block_plan(dt, m, n, k, ta, tb), batch=batch, a_batch=a_batch,
                   b_batch=b_batch)


def _fold_batch(batch, a, bm, m, n, ta, tb):
    """A batch of products that is one 2-d product X @ op(Y) on the same buffers, as (rows,
    columns, trans of Y, whether X is B), or None. The batched operand's matrices must be rows
    of X (contiguous, one after the other) while the other operand is shared by the batch:
    - a batch of vectors times a shared matrix: op(A) b_t = (b_t^T op(A)^T)^T, so C [.., M, 1]
      (laid out as [T, M]) = B [T, K] @ op(A)^T; likewise a_t op(B) = A [T, K] @ op(B);
    - A [.., M, K] (not transposed) times a shared B: A [T*M, K] @ op(B).
    The output's layout is the 2-d product's, so epilogues see the same elements. (A Hessian's
    100 products [32, 10] @ [10, 1] become one [100, 10] @ [10, 32]^T.)"""
    t = math.prod(batch)
    if t <= 1:
        return None
    full_a, full_b = tuple(a.shape[:-2]) == batch, tuple(bm.shape[:-2]) == batch
    if n == 1 and a.ndim == 2 and full_b:
        return t, m, not ta, True
    if m == 1 and bm.ndim == 2 and full_a:
        return t, n, tb, False
    if not ta and bm.ndim == 2 and full_a:
        return t * m, n, tb, False
    return None


def _matvec_plan(dt, m, n, k, ta, tb) -> _Plan:
    """The plan of a product with N == 1 or M == 1, as M' x N' of the swapped operands where
    the matrix is B (see the module docstring). M == N == 1 is a dot product of two vectors."""
    _, vl, es = dtype_info(dt)
    if n == 1 and (not ta or m == 1):      # A [m, k] rows . b
        dot = (m, False)
    elif m == 1 and tb:                    # B [n, k] rows . a
        dot = (n, True)
    else:
        dot = None
    if dot is not None:
        rows, swap = dot
        return _Plan(dt, (), (), (), rows, 1, k, False, "mv_dot", "", vl, 1, vl, es, swap)
    cols, swap = (m, True) if n == 1 else (n, False)   # a @ B [k, n], or b^T @ A [k, m]
    nv = min(4, ceil_div(cols, vl))
    nv = 4 if nv > 2 else nv               # three variants at most: 1, 2 or 4 vectors
    return _Plan(dt, (), (), (), 1, cols, k, False, "mv_axpy", "", 1, nv, vl, es, swap)


def _block_plan(dt, m, n, k, ta, tb) -> _Plan:
    _, vl, es = dtype_info(dt)
    # panels of B^T (see _pack_function) pay once enough row tiles share them
    panel_rows = m >= PACK_MIN_ROWS and n > 1
    # x @ W^T: the dot form pays a fixed cost a tile (its horizontal sums and masked K step:
    # about 45 cycles against K of FMAs), the outer form the transposition of each element of
    # B^T (~1 cycle) once per thread, against M/VL/threads cycles of FMAs on it. The dot form
    # for a short M with a long K (an MLP's first layer at batch 64: K = 784), the outer form
    # otherwise (attention's projections and heads: 20-40% faster there)
    dot_first = not panel_rows or k > DOT_K_PER_ROW * m
    # 24 accumulators (MR x NV vectors) with 32 registers, 12 with 16 (AVX2), leaving room for
    # the NV vectors of B and the broadcast of A
    acc = 24 if vector_registers() >= 32 else 12
    nv_max = acc // 6
    narrow = n <= (nv_max // 2) * vl   # the outer form would take a row block of its own
    # A small x @ W^T with few columns (a classifier's [64, 84] @ [10, 84]^T) takes the dot
    # form's one block too: the outer form's narrow block is a tile function (and a panel
    # function) of its own, ~65 ms of LLVM for a kernel of a few microseconds
    small = narrow and 2 * m * n * k <= SMALL_DOT_FLOPS
    if tb and not ta and k >= 2 * vl and (dot_first or small):
        # A fixed block, so that matmuls of different shapes share one function: 4 x 6 (24
        # accumulators, 10 loads per 24 FMAs). The rows of A stream from L2 (B's stay in L1);
        # six uses per vector of A keep that stream small enough that unaligned A (a numpy array
        # 16 bytes off a cache line) costs 5%, against 20% with 4 x 4.
        # With 16 registers (AVX2) 2 x 6: 12 accumulators, 2 rows of A held and the 6 rows of
        # B loaded one at a time (see _emit_dot's step): 8 loads per 12 FMAs, a third of them
        # from the stream of A's rows through L2, against 7 (4 of A) with 4 x 3. Zen 3, 1
        # thread, kernels alone, minima of alternating runs: x @ W^T [64, 784] @ [256, 784]^T
        # 317 -> 297 us, [64, 256] @ [120, 256]^T 66 -> 54 us. (Loading all rows of B first,
        # as before, spilled accumulators in 2 x 6 and 3 x 4: half the speed.) Matrix-vector
        # shapes keep 3 x 4. The NR sums of a row are transposed into one vector, so NR is at
        # most the vector's lanes.
        mr, nr = (4, 6) if vector_registers() >= 32 else (3, 4) if m == 1 or n == 1 else (2, 6)
        mr, nr = FORCE.get("dot", (mr, nr))
        return _Plan(dt, (), (), (), m, n, k, ta, "dot", "", mr, min(nr, vl), vl, es)
    nv = nv_max if n > (nv_max // 2) * vl else max(1, ceil_div(n, vl))
    mr = 6 if nv == nv_max else min(12, acc // nv)
    if m < SMALL_M:
        mr = _fewest_rows(m, mr)
    mr, nv = FORCE.get("outer", (mr, nv))
    # B^T is packed into panels (the outer form cannot read it in place); B itself is read in
    # place where its rows start on cache lines, else copied into panels ("auto", decided per
    # call of the tile function: see _emit_outer). Packing aligned B measured slower (znver1, 2
    # threads: x [64,784] @ W [784,256] 0.53 vs 0.38 ms; here dy^T @ x [256,784] at K = 64,
    # 1 thread: 156 vs 161 GFLOP/s), misaligned B faster (162 vs 143).
    # FORCE["pack"] = "b" or "" still selects one.
    # With 16 registers (AVX2, Zen 3) B is copied whenever enough row tiles share its panels
    # ("shared"), aligned or not: read in place, the rows of a K block lie N apart, and with N
    # a multiple of 256 bytes they fall into a few of the L1's sets (N = 256 floats: 4 sets,
    # 32 lines for the block's 128) and are read from L2 by every row tile, the lines of A too
    # for x^T @ dy (A's rows are M apart). 1 thread, B aligned / 16 bytes off a line:
    # x @ W [1024, 256] @ [256, 256] 1.82 / 2.01 -> 1.63 / 1.62 ms, x^T @ dy [1024, 256]^T @
    # [1024, 256] 2.28 -> 1.75 ms (16 bytes off), [512, 512]^2 3.90 / 4.47 -> 3.30 / 3.36;
    # shapes without conflicts took the same time either way (x [64, 256] @ [256, 784]).
    pack = FORCE.get("pack", "bt" if tb else "auto" if vector_registers() >= 32 else "shared")
    return _Plan(dt, (), (), (), m, n, k, ta, "outer", pack, mr, nv, vl, es)


def _fewest_rows(m: int, mr: int) -> int:
    """The row block for a short M: `mr` unless its clamped rows are at least SHORT_M_WASTE of
    the rows it computes, else the block in [mr/2, mr] that computes the fewest (the larger on a
    tie). x^T @ g [100, 32, 10] (M = 8) computed 12 rows an entry with MR = 6, and took 40%
    longer than with MR = 4; half the accumulators still hide the FMA latency. A smaller waste
    does not pay for a second tile function: each costs ~0.15-0.25 s of LLVM (LeNet-5's
    [10, 84] weight gradient, a 5 us kernel, took MR = 5 and its whole tile function)."""
    if (ceil_div(m, mr) * mr - m) < SHORT_M_WASTE * ceil_div(m, mr) * mr:
        return mr
    return min(range(mr, (mr + 1) // 2 - 1, -1), key=lambda r: ceil_div(m, r) * r)


def _matmul_scratch(ins, nthreads: int) -> int:
    """One B panel (a K block of at most OUTER_KC rows x a column tile) a thread: a multiple of
    64 bytes, so each region stays aligned."""
    p = _plan(ins)
    rows = min(_outer_kc(), p.k)
    return nthreads * ceil_div(rows * p.tile_cols * p.esize, 64) * 64 if p.pack else 0


def _outer_kc() -> int:
    """The outer form's K block on this target."""
    return OUTER_KC if vector_registers() >= 32 else OUTER_KC_AVX2


def _shared_weights(ins) -> dict:
    """The shared functions the kernel of `ins` calls (see _tiles_function), with their compile
    weights (runtime._balance)."""
    p = _plan(ins)
    out = {("matmul", _TileKey(p.form, p.dtype, p.mr, p.nr)): MATMUL_TILE_WEIGHTS[p.form]}
    if p.form == "outer":
        out["matmul.pack", _PackKey(p.dtype, p.nr)] = MATMUL_TILE_WEIGHTS["pack"]
    return out


def _epilogue_apart(ins) -> bool:
    """Whether an optimizer's update of the parameter whose gradient `ins` makes runs as its
    epilogue applied apart (see _rows), not as a loop of its own after it: only while the product
    takes at most APART_L2_SHARE of the L2. The epilogue's panels are a few row tiles each
    (~32 rows), so each B panel of the outer form serves a few row tiles instead of all of a
    chunk's, and B is read again for every panel; the loop of its own reads the product back
    from L2 or L3 at streaming speed (Zen 3: SGD with momentum over [256, 784], 200k elements,
    ~40 us on 1 thread). Whole training steps x -> tanh(x @ W^T) -> @ v -> MSE at batch 64,
    1 thread, minima of windows, fused and separate alternating in one process, separate / fused:
    W [256, 784] SGD 0.90, Adam 0.94; [512, 512] 0.93; [128, 2048] 0.87; [300, 400] 0.93;
    [256, 384] 0.96 (Adam 0.95); [160, 784] 0.95; [128, 512] 0.95; products of 200 KB and less
    within 5% either way ([64, 784] 1.05, [120, 400] 1.00, [84, 120] 1.02, LeNet-5's whole step
    equal). The MLP's step (W1 [256, 784]) on 2 threads, benchmarks/run.py's paired step / grad,
    alternating processes with the fused update, other processes busy on 1.3-1.7 of the 2
    cores: SGD 1.13-1.15 -> 1.09, Adam 1.19-1.22 -> 1.10-1.16."""
    if "apart" in FORCE:
        return FORCE["apart"]
    _, _, es = dtype_info(ins.out.dtype)
    return math.prod(ins.out.shape) * es <= APART_L2_SHARE * CACHED_BYTES


@register(matmul_p, scratch_bytes=_matmul_scratch, epilogue=True, parallel=True,
          cost=matmul_cost, compile_weight=MATMUL_WEIGHT, shared_weights=_shared_weights,
          epilogue_apart=_epilogue_apart)
def _matmul_lower(module: ir.Module, name: str, ins, epilogue=None) -> None:
    p = _plan(ins)
    kf = kernel_function(module, name, 2, epilogue)
    b = kf.b
    if epilogue is None:
        # The kernel is then control code around calls of the tile function: its share of the
        # work and a loop of calls, a few dozen instructions a call of microseconds. LLVM's
        # optimizer and code generator took 3-5 ms on each and made nothing measurably faster:
        # left unoptimized, as the entry (runtime), it is compiled by the fast instruction
        # selector. (An epilogue is inlined into the kernel (alwaysinline), to be optimized
        # there: its loop must be vectorized.)
        kf.b.function.attributes.add("noinline")
        kf.b.function.attributes.add("optnone")
    nbatch = math.prod(p.batch)
    if p.m == 0 or p.n == 0 or nbatch == 0:
        b.ret_void()
        return
    fn = _tiles_function(module, p)
    # strides of op(A) (the dot form reads A [m, k] only)
    shape = _TileParams(m=p.m, n=p.n, k=p.k, sa_i=1 if p.trans_a else p.k,
                        sa_k=p.m if p.trans_a else 1, pack=PACK_MODES[p.pack])
    if nbatch == 1:
        _lower_one(module, kf, p, fn, shape, ins.out.shape)
    else:
        _lower_batch(module, kf, p, fn, shape, nbatch)
    b.ret_void()


def _lower_one(module, kf: KernelFunction, p: _Plan, fn: SharedFunction, shape: _TileParams,
               out_shape: tuple):
    """One matrix product: chunks split its row tiles (with an epilogue applied apart or over a
    small B: _grid_epilogue), else a grid of its column and row tiles (see below)."""
    b = kf.b
    # the panel buffer is the executing thread's own scratch region (parallel.emit_call)
    a_mat, b_mat = kf.ins[::-1] if p.swap else kf.ins
    extra = [kf.scratch] if p.form == "outer" else []
    mb, nb = ceil_div(p.m, p.mr), ceil_div(p.n, p.tile_cols)
    ptrs = [kf.out, a_mat, b_mat] + extra
    # Rows also where a grid cannot differ (one column tile) or the kernel never runs on the pool
    # (runtime: below PARALLEL_MIN_NS): the columns stay constants, which LLVM folds (a grid's
    # run-time columns cost a lone outer-form kernel ~25 ms more LLVM time)
    serial = 2 * p.m * p.n * p.k / FLOPS_PER_NS < PARALLEL_MIN_NS
    if not _grid_epilogue(kf, p, out_shape) or nb == 1 or serial or FORCE.get("split") == "rows":
        t0, t1 = thread_range(b, mb, kf.tid, kf.nthreads)
        r0, r1 = b.mul(t0, i64(p.mr)), smin(b, b.mul(t1, i64(p.mr)), p.m)
        _rows(kf, p, fn, shape, ptrs, r0, r1, i64(0))
        return
    # The chunks form a grid of column groups (up to one a column tile) by row groups: a chunk
    # of whole columns reads each B panel (packed once, when it is) for all its rows, where a
    # chunk of a few row tiles and all columns re-reads (re-packs) all of B. The pool makes 4
    # chunks a thread: dy^T @ x [256, 784] at K = 64 in 8 chunks, 1 thread, x 16 bytes off a
    # line: 140 -> 160 GFLOP/s; x @ W^T [1024, 256] @ [256, 256]^T (B^T packed, 4 column
    # tiles: 4 x 2 chunks): 154 -> 174. Chunks past the grid get nothing.
    nch = kf.nthreads
    groups = nch if FORCE.get("split") == "cols" else smin(b, nch, nb)
    rgroups = b.udiv(nch, groups, name="matmul.split.rows")
    gc = b.urem(kf.tid, groups, name="matmul.split.col")
    gr = b.udiv(kf.tid, groups, name="matmul.split.row")
    c0, c1 = thread_range(b, nb, gc, groups)
    r0, r1 = thread_range(b, mb, gr, rgroups)
    with b.if_then(b.icmp_unsigned("<", gr, rgroups)):
        r0, r1 = b.mul(r0, i64(p.mr)), smin(b, b.mul(r1, i64(p.mr)), p.m)
        c0, c1 = b.mul(c0, i64(p.tile_cols)), smin(b, b.mul(c1, i64(p.tile_cols)), p.n)
        if kf.epilogue is None:
            fn.call(b, ptrs, replace(shape, r0=r0, r1=r1, c0=c0, c1=c1))
        else:   # the epilogue over each panel of the chunk's block while in cache (see _rows)
            # whole row tiles, at least _rows' panel, at most GRID_PANEL_BYTES of the block
            fit = b.udiv(i64(GRID_PANEL_BYTES // p.esize), smax(b, b.sub(c1, c0), 1))
            step = smax(b, b.mul(b.udiv(fit, i64(p.mr)), i64(p.mr)), _panel_rows(p))
            with carry_loop(b, r0, r1, [], "matmul.block", step=step) as lp:
                end = smin(b, b.add(lp.iv, step), r1)
                fn.call(b, ptrs, replace(shape, r0=lp.iv, r1=end, c0=c0, c1=c1))
                kf.epilogue.call_window(b, kf.out, kf.epi, b.mul(lp.iv, i64(p.n)),
                                        b.mul(b.sub(end, lp.iv), i64(p.n)), c0, c1)


# A product with an epilogue takes the grid only when B is at least this large: a smaller B stays
# in each core's L2 whichever rows a chunk computes, and the grid's run-time columns and the
# epilogue's window function cost LLVM time (LeNet-5's fc1, B 123 KB, in the grid: its first call
# ~7 ms slower to compile, no faster to run)
GRID_EPILOGUE_B_BYTES = 256 * 1024
# A chunk of the grid runs its epilogue after each panel of this many bytes of its block (whole
# row tiles, at least _panel_rows): x @ W^T + b with tanh at batch 64 is one panel a chunk.
GRID_PANEL_BYTES = 64 * 1024


def _grid_epilogue(kf: KernelFunction, p: _Plan, out_shape: tuple) -> bool:
    """Whether the kernel may take the grid of column and row groups (_lower_one): without an
    epilogue, or with one that does not read the product apart, over an output whose last axis
    is the product's columns (a block's columns are a window of each row: call_window). A chunk
    of whole rows reads all of B: x @ W^T + b with tanh (the MLP's first layer, [64, 784] @
    [784, 256]) read all of W on both cores, and the optimizer's update of W that follows wrote
    lines the other core held (SGD with momentum over W [256, 784], 2 threads, Zen 3, TRACEJIT_
    PROFILE: 50 -> 29 us)."""
    e = kf.epilogue
    if e is None:
        return True
    if getattr(e, "apart", False) or p.k * p.n * p.esize < GRID_EPILOGUE_B_BYTES:
        return False
    return not p.swap and out_shape[-1] == p.n and math.prod(out_shape) == p.m * p.n


def _lower_batch(module, kf: KernelFunction, p: _Plan, fn: SharedFunction, shape: _TileParams,
                 nbatch: int):
    """A batch of products: threads split the (entry, row tile) pairs; a thread's pairs are
    consecutive, so it visits each entry once, for a contiguous range of its row tiles."""
    b = kf.b
    ety = llvm_type(p.dtype)
    mb = ceil_div(p.m, p.mr)
    t0, t1 = thread_range(b, nbatch * mb, kf.tid, kf.nthreads)
    first = b.udiv(t0, i64(mb), name="matmul.batch.first")
    last = b.udiv(b.add(t1, i64(mb - 1)), i64(mb), name="matmul.batch.last")
    with carry_loop(b, first, last, [], "matmul.batch") as lb:
        base = b.mul(lb.iv, i64(mb))
        lo, hi = smax(b, b.sub(t0, base), 0), smin(b, b.sub(t1, base), mb)
        r0, r1 = b.mul(lo, i64(p.mr)), smin(b, b.mul(hi, i64(p.mr)), p.m)
        out_off = b.mul(lb.iv, i64(p.m * p.n), name="matmul.batch.out")
        a_in, b_in = kf.ins[::-1] if p.swap else kf.ins
        a_mat = gep(b, a_in, _batch_offset(b, lb.iv, p.batch, p.a_batch, p.m * p.k), ety)
        b_mat = gep(b, b_in, _batch_offset(b, lb.iv, p.batch, p.b_batch, p.k * p.n), ety)
        extra = [kf.scratch] if p.form == "outer" else []
        _rows(kf, p, fn, shape, [gep(b, kf.out, out_off, ety), a_mat, b_mat] + extra, r0, r1,
              out_off)


def _batch_offset(b: ir.IRBuilder, entry, batch: tuple, own: tuple, size: int):
    """Element offset of an operand's matrix (`size` elements each) for batch entry `entry` (flat
    index into `batch`), the operand's batch shape `own` being `batch` with some axes 1 (read
    for every index along that axis)."""
    if own == batch:
        return b.mul(entry, i64(size))
    off, rem, stride = i64(0), entry, size
    for d in reversed(range(len(batch))):
        if own[d] != 1:
            off = b.add(off, b.mul(b.urem(rem, i64(batch[d])), i64(stride)))
            stride *= own[d]
        rem = b.udiv(rem, i64(batch[d]))
    return off


def _rows(kf: KernelFunction, p: _Plan, fn: SharedFunction, shape: _TileParams, ptrs, r0, r1,
          out_off):
    """Rows [r0, r1) (at tile boundaries) of one product, all its columns; with an epilogue, in
    panels followed by the epilogue while they are in cache (`out_off`: the product's offset in
    the kernel's output)."""
    b = kf.b
    if kf.epilogue is None:
        fn.call(b, ptrs, replace(shape, r0=r0, r1=r1, c0=0, c1=p.n))
        return
    # about 32 rows a panel (whole row tiles): their C block (32 x N floats) is still in L1/L2
    # when the epilogue runs over it. A call that packs B's panels packs all of B once per call,
    # so packed products take 128 rows a panel.
    # The epilogue runs after its panel, not interleaved with the next panel's tiles: on znver1
    # an optimizer's update is bound by its own instructions, not by memory (Adam: vsqrtps +
    # vdivps, 16.7 cycles per 8 floats whether p, m, v come from L2 or from memory; SGD: its
    # stores), and every interleaving measured slower than this (x^T @ dy [256, 784] + Adam,
    # 1 thread: 0.97 ms here; a slice after each tile 1.00, after every 16 K steps 1.12, one
    # vector of explicit vector code every 8 K steps 1.30; prefetching p, m, v: no change)
    if p.pack == "shared":
        # B copied into panels pays where many row tiles share them; an epilogue's panels are a
        # few row tiles a call, each of which would copy all of B again: read it in place, as
        # before "shared" (Zen 3, MLP step, dy^T @ x [256, 784] + SGD momentum / Adam, 2
        # threads, alternating processes: step/grad 1.25-1.29 copied, 1.14-1.16 in place)
        p = replace(p, pack="")
        shape = replace(shape, pack=PACK_MODES[""])
    panel = _panel_rows(p)
    ety = llvm_type(p.dtype)
    apart = getattr(kf.epilogue, "apart", False)
    # Only an epilogue applied apart reads the product (schedule._fuse_epilogues_apart), so
    # every panel is written to one panel-sized buffer: it stays in cache instead of all of C
    # going out to memory and being read back (an Adam update over x^T @ dy [256, 784]: 0.97
    # -> 0.93 ms, 1 thread). The buffer is on the executing thread's stack, not the chunk's
    # own first rows of C: the pool hands a thread several chunks (4 a thread), and the C
    # region of each chunk came cold from L3 to be written, and went back (dy^T @ x [256, 784]
    # + SGD momentum in 8 chunks run one after the other on 1 thread: 447-514 -> 414-418 us;
    # + Adam 436-453 -> 433-441; Zen 3, loaded machine, minima of single calls)
    on_stack = apart and _panel_on_stack(p)
    if on_stack:
        c_panel = _entry_alloca(b, ety, panel * p.n)
    # the rows in equal panels of at most `panel` rows: a chunk of 6 row tiles (dy^T @ x
    # [256, 784] in 8 chunks) takes 3 + 3, not 5 + 1, whose one row tile re-reads all of B
    tiles = b.udiv(b.add(b.sub(r1, r0), i64(p.mr - 1)), i64(p.mr))
    count = smax(b, b.udiv(b.add(tiles, i64(panel // p.mr - 1)), i64(panel // p.mr)), 1)
    step = b.mul(b.udiv(b.add(tiles, b.sub(count, i64(1))), count), i64(p.mr),
                 name="matmul.panel.rows")
    with carry_loop(b, r0, r1, [], "matmul.panel", step=step) as lp:
        end = smin(b, b.add(lp.iv, step), r1)
        rows = b.mul(lp.iv, i64(p.n))
        if on_stack:    # row lp.iv of the product (of the kernel's output) at c_panel[0]
            c_out = gep(b, c_panel, b.neg(rows), ety, inbounds=False)
            e_out = gep(b, c_panel, b.neg(b.add(out_off, rows)), ety, inbounds=False)
        elif apart:     # over the first panel of the thread's rows (r0.., its own)
            back = b.mul(b.sub(lp.iv, r0), i64(p.n))
            c_out = gep(b, ptrs[0], b.neg(back), ety)
            e_out = gep(b, kf.out, b.neg(back), ety)
        if apart:
            fn.call(b, [c_out] + ptrs[1:], replace(shape, r0=lp.iv, r1=end, c0=0, c1=p.n))
            kf.epilogue.call(b, e_out, kf.epi, b.add(out_off, rows),
                             b.mul(b.sub(end, lp.iv), i64(p.n)))
        else:
            fn.call(b, ptrs, replace(shape, r0=lp.iv, r1=end, c0=0, c1=p.n))
            kf.epilogue_rows(b.add(out_off, rows), b.mul(b.sub(end, lp.iv), i64(p.n)))


def _panel_rows(p: _Plan) -> int:
    """Rows of C an epilogue follows (whole row tiles; see _rows)."""
    return p.mr * max(1, (PACKED_PANEL_ROWS if p.pack not in ("", "auto", "shared") else 32) // p.mr)


def _panel_on_stack(p: _Plan) -> bool:
    """Whether a panel of the product (an epilogue applied apart) fits the stack buffer."""
    return _panel_rows(p) * p.n * p.esize <= STACK_PANEL_BYTES


def _entry_alloca(b: ir.IRBuilder, ety, count: int):
    """A 64-byte aligned stack array of `count` elements, allocated once in the entry block
    (not in the loop the builder may be in)."""
    here = b.block
    b.position_at_start(b.function.entry_basic_block)
    buf = b.alloca(ety, size=count, name="matmul.c.panel")
    buf.align = 64
    b.position_at_end(here)
    return buf


@params
class _TileParams(Params):
    """C [m, n] = op(A) [m, k] @ B; the tiles of rows [r0, r1) and columns [c0, c1) (at tile
    boundaries); op(A)[i, k] = A[i*sa_i + k*sa_k]; `pack` (outer form): PACK_MODES of B."""
    m: I64Arg
    n: I64Arg
    k: I64Arg
    r0: I64Arg = None
    r1: I64Arg = None
    c0: I64Arg = None
    c1: I64Arg = None
    sa_i: I64Arg
    sa_k: I64Arg
    pack: I64Arg


@record(frozen=True)
class _TileKey:
    """What the shared tile function of a matmul depends on at compile time."""
    form: str
    dtype: str
    mr: int
    nr: int


def _tiles_function(module: ir.Module, p: _Plan) -> SharedFunction:
    """The shared function computing C[r0:r1, c0:c1] (r0, c0 at tile boundaries) for C [m, n]."""
    key = _TileKey(p.form, p.dtype, p.mr, p.nr)
    if p.form != "outer":
        body = {"dot": _emit_dot, "mv_dot": _emit_mv_dot, "mv_axpy": _emit_mv_axpy}[p.form]
        return shared_function(module, "matmul", key, 3, _TileParams, body)
    # the outer form's fourth pointer: the thread's scratch, where B's panels are packed
    return shared_function(module, "matmul", key, 4, _TileParams, _emit_outer)


def _emit_outer(s: Shared, p: _TileKey):
    b = s.b
    _, vl, es = dtype_info(p.dtype)
    tile = p.nr * vl
    # the columns from `split` on are the partial last tile (see _outer_columns). Masks in the
    # K loop cost a compare and a masked load per step and, with 16 vector registers, spill the
    # accumulators' neighbours to the stack: about half the speed when the shapes are run-time
    # values (LLVM cannot prove the masks full then)
    split = b.sub(s.n, b.urem(s.n, i64(tile)), name="matmul.j.full")
    # The packing mode is hidden from LLVM (a constant argument that a branch tests made its
    # function specialization clone this function for every call site: 3.7x the LLVM time of
    # LeNet-5's matmuls), and the loops do not branch on it, so they exist once: B's row kk of
    # the tile is read in place (rows N apart) or in the panel ([k1 - k0, tile]) by a select
    # (see _outer_columns).
    # "auto" (matmul's B read in place): copy B's panels when its rows do not all start on a
    # vector boundary (64-byte loads straddling two lines cost two: a numpy array usually sits
    # 16 bytes off a line) and enough row tiles share each panel to pay for the copy
    b_addr = b.ptrtoint(s.ptrs[2], ir.IntType(64))
    misaligned = b.icmp_signed("!=", b.and_(b.or_(b_addr, b.mul(s.n, i64(es))), i64(vl * es - 1)),
                               i64(0))
    shared = b.icmp_signed(">=", b.sub(s.r1, s.r0), i64(AUTO_PACK_TILES * p.mr))
    # "shared": copy whenever enough row tiles share the panels, aligned or not (AVX2)
    wanted = b.or_(misaligned, b.icmp_signed("==", s.pack, i64(PACK_MODES["shared"])))
    auto = b.select(b.and_(wanted, shared), i64(PACK_MODES["b"]), i64(PACK_MODES[""]))
    s.pack = b.select(b.icmp_signed(">=", s.pack, i64(PACK_MODES["auto"])), auto, s.pack)
    s.pack = opaque(b, s.pack)
    packed = b.icmp_signed("!=", s.pack, i64(0), name="matmul.packed")
    s.is_packed = packed
    # the partial tile's C tile and, unless B^T is packed anyway, its B panel (see
    # _outer_columns), on the stack (convolutions call this function without a panel buffer)
    vty = ir.VectorType(llvm_type(p.dtype), vl)
    s.c_tile = b.alloca(vty, size=p.mr * p.nr, name="matmul.c.tile")   # (vectors)
    s.tail_panel = b.select(packed, s.ptrs[3], b.bitcast(
        b.alloca(vty, size=tile * p.nr, name="matmul.tail.panel"), s.ptrs[3].type))
    _outer_columns(s, p, split)


def _outer_columns(s: Shared, p: _TileKey, split):
    """The outer-product tiles of columns [c0, c1) (tile boundaries), every row tile of
    [r0, r1), in one copy of the loops for whole tiles and the partial last one (columns from
    `split` on: 0 < N - j0 < tile), which small products live in (N = 10 of a classifier or a
    Hessian's hidden layer: 10 of a 16-column tile). The partial tile differs from a whole one
    by run-time values only:
    - its B rows: read in place while they end inside B (lanes past N read the next row:
      computed, never stored), its last rows (all when B^T is packed) from a small panel
      (`tail_panel`, packed as B's or B^T's panel: see _pack_function) whose lanes past N are
      zeros or copies, so the K loop loads plainly. A whole tile reads all its rows in place or
      all from the thread's panel: one K loop reads row kk at `kk < k_split ? in place :
      panel`, k_split set per tile;
    - its C tile: a stack tile (`c_tile`), filled from C (masked) before a K block that adds
      to it, and stored into C by a run-time loop over its rows in plain pieces
      (`_store_lanes`): masked stores are microcoded on znver1 (masking the tile cost the small
      products 2-2.5x their time).
    A second copy of the loops for the partial tile was 45% of this function's IR and LLVM time
    (the 6 x 4 block: ~120k characters, ~30 ms of LLVM), for no run time: the select in the K
    loop is two integer operations beside 24 FMAs."""
    b = s.b
    out, a_mat, b_mat = s.ptrs[:3]
    ety, vl, _ = dtype_info(p.dtype)
    mr, nv = p.mr, p.nr
    tile = nv * vl
    vty = ir.VectorType(ety, vl)
    m1 = b.sub(s.m, i64(1))
    with carry_loop(b, s.c0, s.c1, [], "matmul.j", step=tile) as lj:
        j0 = lj.iv
        partial = b.icmp_signed(">=", j0, split, name="matmul.j.partial")
        # lanes of each vector inside N (0..VL) (all of them in a whole tile)
        lanes = [smax(b, smin(b, b.sub(b.sub(s.n, j0), i64(v * vl)), vl), 0) for v in range(nv)]
        # the partial tile always reads a panel: B's (mode "b") unless B^T's is packed anyway
        mode = b.select(b.and_(partial, b.not_(s.is_packed)), i64(PACK_MODES["b"]), s.pack)
        panel = b.select(partial, s.tail_panel, s.ptrs[3], name="matmul.panel")

        # K in blocks of OUTER_KC: the block's B panel (and, for trans_a, its lines of A) stay in
        # L1 while every row tile of [r0, r1) reads them; the first block starts from zero, the
        # others add to the C tile the block before stored. One block when K <= OUTER_KC (at
        # least one, so that K = 0 stores zeros). Without blocks a weight gradient x^T @ g with K
        # = 3200 re-read its 400 KB of panels from L2/L3 for every row tile: 4x numpy's time.
        kc = _outer_kc()
        with carry_loop(b, 0, smax(b, s.k, 1), [], "matmul.kb", step=kc) as lkb:
            k0 = lkb.iv
            k1 = smin(b, b.add(k0, i64(kc)), s.k)
            first = b.icmp_signed("==", k0, i64(0), name="matmul.kb.first")
            # rows [k0, k_split) of the tile are read in place, the others from the panel
            # (whose row 0 is k_split): a whole tile's all in place, or all from the panel
            # when packed; the partial tile's all from the panel when B^T is packed, else the
            # last rows of B, past whose end the tile's last vector reaches (one row when
            # N >= VL - 1), copied masked (zeros past N)
            k_split = b.select(s.is_packed, k0, b.select(
                partial, _rows_inside(b, j0, tile, s.n, s.k, k0, k1), k1), name="matmul.k.split")
            # (returns at once when B is read in place)
            _pack_function(b.module, p).call(
                b, [panel, b_mat], _PackParams(n=s.n, k=s.k, j0=j0, k0=k_split, k1=k1,
                                               mode=mode))
            b_in = gep(b, b_mat, j0, ety)
            with carry_loop(b, s.r0, s.r1, [], "matmul.i", step=mr) as li:
                rows = [smin(b, b.add(li.iv, i64(r)), m1, name=f"matmul.row{r}")
                        for r in range(mr)]
                # op(A)[i, k] = A[i*sa_i + k*sa_k] for both transposes: one function serves both
                arow = [gep(b, a_mat, b.mul(r, s.sa_i), ety) for r in rows]
                crows = [b.select(partial, gep(b, s.c_tile, i64(r * nv), vty),
                                  gep(b, out, b.add(b.mul(row, s.n), j0), ety))
                         for r, row in enumerate(rows)]

                def old_contents():
                    with b.if_then(partial):   # C's columns inside N into the stack tile
                        with carry_loop(b, 0, mr, [], "matmul.i.load") as lr:
                            row = smin(b, b.add(li.iv, lr.iv), m1)
                            crow = gep(b, out, b.add(b.mul(row, s.n), j0), ety)
                            for v in range(nv):
                                b.store(masked_load(b, crow, i64(v * vl), vty,
                                                    lane_mask(b, lanes[v], vl)),
                                        gep(b, s.c_tile, b.add(b.mul(lr.iv, i64(nv)), i64(v)),
                                            vty))
                    return [vload(b, crows[r], i64(v * vl), vty)
                            for r in range(mr) for v in range(nv)]

                # C's old contents are read only after the first block (a branch, not a select
                # of loads: with a short K these loads were a third of a tile's loads)
                init = _phi_if(b, first, [zero_vector(ety, vl)] * (mr * nv), old_contents)
                with carry_loop(b, k0, k1, init, "matmul.k") as lp:
                    # (a select of two addresses, not a second loop: compile time)
                    brow = b.select(b.icmp_signed("<", lp.iv, k_split),
                                    gep(b, b_in, b.mul(lp.iv, s.n), ety),
                                    gep(b, panel, b.mul(b.sub(lp.iv, k_split), i64(tile)), ety))
                    bv = [vload(b, brow, i64(v * vl), vty) for v in range(nv)]
                    aoff = b.mul(lp.iv, s.sa_k)
                    nxt = []
                    for r in range(mr):
                        av = splat(b, load(b, arow[r], aoff, ety), vl)
                        nxt.extend(fma(b, av, bv[v], lp.vals[r * nv + v]) for v in range(nv))
                    lp.next = nxt
                for r in range(mr):
                    for v in range(nv):
                        vstore(b, lp.out[r * nv + v], crows[r], i64(v * vl))
                with b.if_then(partial):   # the stack tile's columns inside N into C
                    with carry_loop(b, 0, mr, [], "matmul.i.store") as lr:
                        row = smin(b, b.add(li.iv, lr.iv), m1)
                        crow = gep(b, out, b.add(b.mul(row, s.n), j0), ety)
                        for v in range(nv):
                            value = b.load(gep(b, s.c_tile, b.add(b.mul(lr.iv, i64(nv)),
                                                                  i64(v)), vty), typ=vty)
                            _store_lanes(b, value, crow, i64(v * vl), lanes[v])


def _phi_if(b: ir.IRBuilder, pred, then_values, else_values):
    """`then_values` (constants) where `pred` holds, else the values `else_values()` emits
    in a branch of their own."""
    return _branch(b, pred, lambda: then_values, else_values)


def _branch(b: ir.IRBuilder, pred, then_values, else_values):
    """The values `then_values()` emits where `pred` holds, else those of `else_values()`,
    each emitted in a branch of its own (phis of the two)."""
    fn = b.block.function
    sides = []
    blocks = [fn.append_basic_block("matmul.if.then"), fn.append_basic_block("matmul.if.else")]
    done = fn.append_basic_block("matmul.if.done")
    b.cbranch(pred, *blocks)
    for block, emit_values in zip(blocks, (then_values, else_values)):
        b.position_at_end(block)
        values = emit_values()
        sides.append((values, b.block))
        b.branch(done)
    b.position_at_end(done)
    out = []
    for (x, x_end), (y, y_end) in zip(zip(sides[0][0], [sides[0][1]] * len(sides[0][0])),
                                      zip(sides[1][0], [sides[1][1]] * len(sides[1][0]))):
        phi = b.phi(x.type)
        phi.add_incoming(x, x_end)
        phi.add_incoming(y, y_end)
        out.append(phi)
    return out


def _store_lanes(b: ir.IRBuilder, value, ptr, idx, lanes):
    """Store lanes [0, `lanes`) of `value` (lanes: an i64 in 1..VL) at element `idx` of `ptr`:
    the whole vector, or the pieces of the binary digits of `lanes` (halves, quarters, ...:
    plain narrow stores). A masked store of a ymm vector is microcoded on znver1 (~20 cycles
    against ~1 a piece)."""
    vty = value.type
    vl = vty.count
    i32v = ir.IntType(32)
    with b.if_else(b.icmp_signed("==", lanes, i64(vl))) as (whole, pieces):
        with whole:
            vstore(b, value, ptr, idx)
        with pieces:
            off, v, piece = idx, value, vl // 2
            while piece >= 1:
                bit = b.icmp_signed("!=", b.and_(lanes, i64(piece)), i64(0))
                low = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32v, piece),
                                                          list(range(piece))))
                with b.if_then(bit):
                    if piece == 1:
                        b.store(b.extract_element(low, ir.Constant(i32v, 0)),
                                gep(b, ptr, off, vty.element))
                    else:
                        vstore(b, low, ptr, off)
                if piece > 1:
                    # the lanes after the stored piece move down to lane 0
                    shifted = b.shuffle_vector(v, v, ir.Constant(
                        ir.VectorType(i32v, vl), [min(t + piece, vl - 1) for t in range(vl)]))
                    v = b.select(bit, shifted, v)
                    off = b.add(off, b.mul(b.zext(bit, ir.IntType(64)), i64(piece)))
                piece //= 2


@record(frozen=True)
class _PackKey:
    dtype: str
    nr: int   # vectors a panel row


@params
class _PackParams(Params):
    """The panel of op(B) [k, n] for columns [j0, j0 + tile) and rows [k0, k1); `mode`:
    PACK_MODES["b"] (B [k, n]), PACK_MODES["bt"] (B [n, k]) or PACK_MODES[""] (nothing)."""
    n: I64Arg
    k: I64Arg
    j0: I64Arg
    k0: I64Arg
    k1: I64Arg
    mode: I64Arg


def _pack_function(module: ir.Module, p: _TileKey) -> SharedFunction:
    """panel[kk - k0, :] = op(B)[kk, j0:j0 + tile] for kk in [k0, k1): the B panel the row tiles
    of one column tile and K block share, contiguous. Read in place, B's rows lie N elements
    apart: with N a multiple of 256 bytes the panel's 128 lines fall into a few of the L1's 64
    sets and evict each other (the attention block's [1024, 256] @ [256, 256] ran 4-8% slower
    in place). B^T (`trans_b`, B [n, k]) is transposed here, so that x @ W^T runs the outer
    form too: at K = 64-256 the dot form's horizontal sums and masked K step cost it a quarter
    to a third of its time (attention's projections and heads). Columns past N: zero
    (from B, masked loads) or copies of column N-1 (from B^T); their results are never stored.
    One function a module (not inlined into the outer form's two copies of its loops): its
    time is small against the FMAs on the panel, its compile time is not."""
    def body(s, key):
        b = s.b
        panel, b_mat = s.ptrs
        ety, vl, _ = dtype_info(key.dtype)
        tile = key.nr * vl
        vty = ir.VectorType(ety, vl)
        with b.if_then(b.icmp_signed("==", s.mode, i64(PACK_MODES[""]))):
            b.ret_void()
        with b.if_else(b.icmp_signed("==", s.mode, i64(PACK_MODES["b"]))) as (copy, transpose):
            with copy:
                left = b.sub(s.n, s.j0)
                masks = [lane_mask(b, b.sub(left, i64(v * vl)), vl) for v in range(key.nr)]
                with carry_loop(b, s.k0, s.k1, [], "matmul.pack.k") as lk:
                    src = gep(b, b_mat, b.add(b.mul(lk.iv, s.n), s.j0), ety)
                    dst = gep(b, panel, b.mul(b.sub(lk.iv, s.k0), i64(tile)), ety)
                    for v in range(key.nr):
                        vstore(b, masked_load(b, src, i64(v * vl), vty, masks[v]), dst,
                               i64(v * vl))
            with transpose:
                # B^T: the tile's rows of B (clamped to the last), read along K, written as
                # columns, four rows at a time (all 16 unrolled cost 25% more LLVM time, one at
                # a time 5-10% more run time of x @ W^T at K = 64-256)
                n1 = b.sub(s.n, i64(1))
                with carry_loop(b, 0, tile, [], "matmul.packt.c", step=4) as lc:
                    srcs = [gep(b, b_mat, b.mul(smin(b, b.add(s.j0, b.add(lc.iv, i64(c))), n1),
                                                s.k), ety) for c in range(4)]
                    with carry_loop(b, s.k0, s.k1, [], "matmul.packt.k") as lk:
                        dst = gep(b, panel, b.add(b.mul(b.sub(lk.iv, s.k0), i64(tile)), lc.iv),
                                  ety)
                        for c in range(4):
                            store(b, load(b, srcs[c], lk.iv, ety), dst, i64(c), ety)
    return shared_function(module, "matmul.pack", _PackKey(p.dtype, p.nr), 2, _PackParams, body)


def _emit_dot(s: Shared, p: _TileKey):
    b = s.b
    out, a_mat, b_mat = s.ptrs
    ety, vl, es = dtype_info(p.dtype)
    mr, nr = p.mr, p.nr
    vty = ir.VectorType(ety, vl)
    m1, n1 = b.sub(s.m, i64(1)), b.sub(s.n, i64(1))
    align = FORCE.get("dot_align", "b")
    with carry_loop(b, s.c0, s.c1, [], "matmul.j", step=nr) as lj:
        cols = [smin(b, b.add(lj.iv, i64(c)), n1, name=f"matmul.col{c}") for c in range(nr)]
        brow = [gep(b, b_mat, b.mul(c, s.k), ety) for c in cols]
        if align == "b":
            lead = _align_lead(b, brow[0], s.k, vl, es)
        with carry_loop(b, s.r0, s.r1, [], "matmul.i", step=mr) as li:
            rows = [smin(b, b.add(li.iv, i64(r)), m1, name=f"matmul.row{r}") for r in range(mr)]
            arow = [gep(b, a_mat, b.mul(r, s.k), ety) for r in rows]
            if align == "a":
                lead = _align_lead(b, arow[0], s.k, vl, es)
            elif align is None:
                lead = i64(0)
            zero = zero_vector(ety, vl)

            def step(acc, k0, mask):
                def ld(ptr):
                    # (the head step's vector starts before the row: not an inbounds address)
                    return vload(b, ptr, k0, vty) if mask is None \
                        else masked_load(b, ptr, k0, vty, mask, inbounds=False)
                # the rows of the smaller side held, then one row of the other side at a time,
                # its FMAs right after it: 12 accumulators + MR + 1 registers for 2 x 6 (LLVM
                # keeps this order; loading all rows first spilled accumulators in 2 x 6)
                out = list(acc)
                if mr <= nr:
                    av = [ld(pa) for pa in arow]
                    for c in range(nr):
                        bv = ld(brow[c])
                        for r in range(mr):
                            out[r * nr + c] = fma(b, av[r], bv, acc[r * nr + c])
                else:
                    bv = [ld(pb) for pb in brow]
                    for r in range(mr):
                        av = ld(arow[r])
                        for c in range(nr):
                            out[r * nr + c] = fma(b, av, bv[c], acc[r * nr + c])
                return out

            # the K loop's loads start on a cache line of B's first row (a masked head step
            # before it): a 64-byte load that straddles two lines costs two, and a numpy array
            # usually starts 16 bytes off a line (x @ W^T [64, 784] @ [256, 784]^T, 1 thread:
            # 113 GFLOP/s misaligned, 166 aligned or with this head step). With K a multiple of
            # 16 and the operands equally misaligned, A's rows are aligned with B's.
            # The result must not depend on where the operands lie (the same product of copies
            # of the arrays gives the same bits): lane j always holds the k = lead + j (mod VL),
            # the head step's vector too (it ends at `lead`, its lanes before the row masked
            # off), and each lane adds its k in increasing order (head, loop, tail). The lanes
            # are those of lead = 0 rotated by `lead`, and the horizontal sums do not see the
            # rotation: transpose_sums adds lanes t and t + h of a segment of 2h lanes, h = VL/2
            # down to 1, exactly (no reassociation), so a rotation only swaps the two operands
            # of some additions (exact) and moves the partial sums within their segments, and
            # every sum is the one of lead = 0. (Rotating the accumulators back, as before, cost
            # 12 permutes a tile: [64, 256] @ [120, 256]^T, Zen 3, 1 thread, 55 -> 48 us.)
            kend = b.sub(s.k, b.urem(b.sub(s.k, lead), i64(vl)), name="matmul.kend")
            head_mask = b.not_(lane_mask(b, b.sub(i64(vl), lead), vl))

            def loop(vals):
                with carry_loop(b, lead, kend, vals, "matmul.k", step=vl) as lp:
                    lp.next = step(lp.vals, lp.iv, None)
                return lp.out

            def end_step(vals, head):
                # the head [0, lead) (the vector [lead - VL, lead)) or the tail [kend, K), one
                # masked step, skipped when empty
                k0 = b.select(head, b.sub(lead, i64(vl)), kend)
                count = b.select(head, lead, b.sub(s.k, kend))
                mask = b.select(head, head_mask, lane_mask(b, count, vl))
                return _branch(b, b.icmp_signed(">", count, i64(0)),
                               lambda: step(vals, k0, mask), lambda: vals)

            # head, loop, tail as three phases of one loop: one copy of the masked step's code
            # (a second copy cost 30% more LLVM time of the dot form)
            with carry_loop(b, 0, 3, [zero] * (mr * nr), "matmul.k.phase") as ph:
                ph.next = _branch(b, b.icmp_signed("==", ph.iv, i64(1)),
                                  lambda: loop(ph.vals),
                                  lambda: end_step(ph.vals, b.icmp_signed("==", ph.iv, i64(0))))
            accs = ph.out
            # the row's NR sums in the first lanes of one vector, stored with the columns past N
            # masked off
            lanes = smin(b, b.sub(s.n, lj.iv), nr)
            cmask = lane_mask(b, lanes, vl)
            sums = [transpose_sums(b, accs[r * nr:(r + 1) * nr]) for r in range(mr)]
            idx = [b.add(b.mul(rows[r], s.n), lj.iv) for r in range(mr)]
            # With AVX2 a whole tile's row is stored in plain pieces (4 + 2 lanes for NR = 6):
            # a masked store is microcoded there (x @ W^T [64, 256] @ [120, 256]^T, Zen 3, 1
            # thread: 58 -> 51 us); only the last, partial column tile stores masked
            if FORCE.get("dot_store", "masked" if vector_registers() >= 32 else "pieces") \
                    == "pieces":
                with b.if_else(b.icmp_signed("==", lanes, i64(nr))) as (whole, part):
                    with whole:
                        for r in range(mr):
                            _store_first(b, sums[r], out, idx[r], nr)
                    with part:
                        for r in range(mr):
                            masked_store(b, sums[r], out, idx[r], cmask)
            else:
                for r in range(mr):
                    masked_store(b, sums[r], out, idx[r], cmask)


def _store_first(b: ir.IRBuilder, value, ptr, idx, lanes: int):
    """ptr[idx:idx + lanes] = the first `lanes` lanes of `value` (a constant count), in plain
    stores of power-of-two pieces."""
    i32v = ir.IntType(32)
    first = 0
    while first < lanes:
        piece = 1 << ((lanes - first).bit_length() - 1)
        part = b.shuffle_vector(value, value, ir.Constant(ir.VectorType(i32v, piece),
                                                          list(range(first, first + piece))))
        if piece == 1:
            store(b, b.extract_element(part, ir.Constant(i32v, 0)), ptr,
                  b.add(idx, i64(first)), value.type.element)
        else:
            vstore(b, part, ptr, b.add(idx, i64(first)))
        first += piece


def _align_lead(b: ir.IRBuilder, ptr, k, vl: int, es: int):
    """Elements from `ptr` to the next vector boundary (VL * element bytes: a 64-byte cache line
    with AVX-512, half of one with AVX2, so an aligned vector never straddles two lines); at most
    K, and 0 when `ptr` is not element-aligned. Less than VL: the dot form's one head step."""
    addr = b.ptrtoint(ptr, ir.IntType(64))
    off = b.and_(b.sub(i64(0), addr), i64(vl * es - 1))
    lead = b.udiv(off, i64(es))
    exact = b.icmp_signed("==", b.urem(off, i64(es)), i64(0))
    return smin(b, b.select(exact, lead, i64(0)), k, name="matmul.lead")


def _emit_mv_dot(s: Shared, p: _TileKey):
    """C[r0:r1] = Mat[r0:r1, :] @ v (Mat [m, k] row-major, v [k], C [m, 1]): tiles of MR = VL
    rows, each row one vector of partial sums, transposed into a vector of MR results. Whole
    tiles store that vector; the last partial tile clamps its rows and stores masked."""
    b = s.b
    out, mat, v = s.ptrs
    ety, vl, _ = dtype_info(p.dtype)
    mr = p.mr
    vty = ir.VectorType(ety, vl)
    m1 = b.sub(s.m, i64(1))
    kfull = b.sub(s.k, b.urem(s.k, i64(vl)), name="matmul.mv.kfull")
    split = b.sub(s.m, b.urem(s.m, i64(mr)), name="matmul.mv.i.full")
    # The K tail (K % VL elements): v's tail is loaded once a call (zeros past K); a row's tail
    # is read with a plain load, its lanes past K (the next row's) zeroed, while the vector ends
    # inside Mat, and masked only on the last rows. A masked load of every row's tail cost a
    # product of K = 10 (a Hessian's hidden layer) about as much as its whole K loop.
    has_tail = b.icmp_signed("<", kfull, s.k, name="matmul.mv.has.kt")
    tmask = lane_mask(b, b.sub(s.k, kfull), vl)
    zero = zero_vector(ety, vl)
    vt = _branch(b, has_tail, lambda: [masked_load(b, v, kfull, vty, tmask)], lambda: [zero])[0]
    last_inside = b.sub(b.mul(s.m, s.k), b.add(kfull, i64(vl)), name="matmul.mv.kt.inside")

    def rows(r0, r1, masked):
        kind = "tail" if masked else "full"
        with carry_loop(b, r0, r1, [], f"matmul.mv.i.{kind}", step=mr) as li:
            rs = [smin(b, b.add(li.iv, i64(r)), m1) for r in range(mr)] if masked \
                else [b.add(li.iv, i64(r)) for r in range(mr)]
            arow = [gep(b, mat, b.mul(r, s.k), ety) for r in rs]
            with carry_loop(b, 0, kfull, [zero] * mr, f"matmul.mv.k.{kind}", step=vl) as lk:
                x = vload(b, v, lk.iv, vty)
                lk.next = [fma(b, vload(b, pa, lk.iv, vty), x, a) for pa, a in zip(arow, lk.vals)]

            def tail(plain):
                def ld(pa):
                    return b.select(tmask, vload(b, pa, kfull, vty), zero) if plain \
                        else masked_load(b, pa, kfull, vty, tmask)
                return lambda: [fma(b, ld(pa), vt, a) for pa, a in zip(arow, lk.out)]

            # (the tile's rows ascend: its last row's tail ends last)
            inside = b.icmp_signed("<=", b.mul(rs[-1], s.k), last_inside)
            accs = _branch(b, has_tail,
                           lambda: _branch(b, inside, tail(True), tail(False)),
                           lambda: lk.out)
            sums = transpose_sums(b, accs)
            if masked:
                _store_lanes(b, sums, out, li.iv, smin(b, b.sub(s.m, li.iv), vl))
            else:
                vstore(b, sums, out, li.iv)

    rows(s.r0, smin(b, s.r1, split), masked=False)
    rows(smax(b, s.r0, split), s.r1, masked=True)


def _emit_mv_axpy(s: Shared, p: _TileKey):
    """C[r, c0:c1] = v_r @ Mat (v_r = row r of v [m, k], Mat [k, n] row-major; m is 1 as
    planned): NV vectors of columns accumulate v[k] * Mat[k, j:j+VL] over k; whole column tiles
    with plain loads and stores; the partial last one computes only its used vectors, loads
    plainly while inside Mat and masked on its last rows, and stores in plain pieces."""
    b = s.b
    out, v, mat = s.ptrs
    ety, vl, _ = dtype_info(p.dtype)
    vty = ir.VectorType(ety, vl)
    split = b.sub(s.n, b.urem(s.n, i64(p.nr * vl)), name="matmul.mv.j.full")

    def columns(c0, c1, nv, partial):
        kind = "tail" if partial else "full"
        with carry_loop(b, s.r0, s.r1, [], f"matmul.mv.r.{kind}") as lr:
            vrow = gep(b, v, b.mul(lr.iv, s.k), ety)
            crow = gep(b, out, b.mul(lr.iv, s.n), ety)
            with carry_loop(b, c0, c1, [], f"matmul.mv.j.{kind}", step=p.nr * vl) as lj:
                last = b.sub(b.sub(s.n, lj.iv), i64((nv - 1) * vl)) if partial else None
                mask = lane_mask(b, last, vl) if partial else None

                def step(kk, acc, inside):
                    mrow = gep(b, mat, b.add(b.mul(kk, s.n), lj.iv), ety)
                    x = splat(b, load(b, vrow, kk, ety), vl)
                    return [fma(b, x, vload(b, mrow, i64(u * vl), vty)
                                if inside or u < nv - 1
                                else masked_load(b, mrow, i64(u * vl), vty, mask), a)
                            for u, a in enumerate(acc)]

                kin = _rows_inside(b, lj.iv, nv * vl, s.n, s.k, i64(0), s.k) if partial else s.k
                with carry_loop(b, 0, kin, [zero_vector(ety, vl)] * nv,
                                f"matmul.mv.k.{kind}") as lk:
                    lk.next = step(lk.iv, lk.vals, True)
                acc = lk.out
                if partial:
                    with carry_loop(b, kin, s.k, acc, "matmul.mv.k.last") as lt:
                        lt.next = step(lt.iv, lt.vals, False)
                    acc = lt.out
                for u, a in enumerate(acc):
                    if partial and u == nv - 1:
                        _store_lanes(b, a, crow, b.add(lj.iv, i64(u * vl)), last)
                    else:
                        vstore(b, a, crow, b.add(lj.iv, i64(u * vl)))

    columns(s.c0, smin(b, s.c1, split), p.nr, partial=False)
    c0 = smax(b, s.c0, split)
    with b.if_then(b.icmp_signed("<", c0, s.c1)):
        used = b.udiv(b.add(b.sub(s.n, c0), i64(vl - 1)), i64(vl), name="matmul.mv.tail.vectors")
        for nvec in range(1, p.nr + 1):
            with b.if_then(b.icmp_signed("==", used, i64(nvec))):
                columns(c0, s.c1, nvec, partial=True)


def _rows_inside(b: ir.IRBuilder, j0, width, n, k, k0, k1):
    """The end of the rows kk in [k0, k1) of a row-major [k, n] matrix whose `width` elements
    from column j0 (past N: the next rows' elements) still lie inside the matrix: a plain load
    may read them there (the lanes past N compute what is never stored), the rows from the end
    on need masked loads (one row when N >= VL - 1)."""
    over = b.sub(b.add(j0, i64(width)), n)
    past = b.udiv(b.add(over, b.sub(n, i64(1))), n)
    return smax(b, k0, smin(b, k1, b.sub(k, past)), name="matmul.k.inside")


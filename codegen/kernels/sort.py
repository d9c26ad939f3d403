"""The loop nest of argsort (ir/prims/sort.py): a stable bottom-up merge sort of each row's
indices, keyed by the row's values, NaNs last.

Rows are split between threads. Each thread sorts a row by ping-ponging between the row of `out`
and its own n-element i64 region of `scratch`: pass p merges runs of 2**p. The number of passes,
ceil(log2 n), is known when compiling, so the first pass starts in whichever buffer makes the last
one end in `out` (no copy); one loop runs the passes, swapping the two buffers. The merge takes from the right run only when its key is strictly smaller (or
the left key is NaN and the right one is not), which is what makes it stable with NaNs last.
O(n log n) comparisons per row, whatever the data.
"""
from __future__ import annotations

import math

import llvmlite.ir as ir

from ..loops import I64, PTR, VOID, carry_loop, for_range, i64, llvm_type, load, store
from ...ir.prims.sort import argsort_p

from . import POOL_WEIGHT, register
from .toolkit import thread_range


def _passes(n: int) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def _scratch_bytes(ins, nthreads):
    n = ins.inputs[0].shape[-1]
    # one region per thread, 64-byte aligned (the thread pool hands each thread its own)
    return nthreads * (-(-n * 8 // 64) * 64) if _passes(n) else 0


def _cost(ins) -> float:
    n = ins.inputs[0].shape[-1]
    return ins.out.type.size * max(_passes(n), 1) * 2.0   # ~2 ns a compare-and-move


def _before(b, a, c):
    """Key c sorts strictly before key a: c < a, or a is NaN and c is not."""
    return b.or_(b.fcmp_ordered("<", c, a),
                 b.and_(b.fcmp_unordered("uno", a, a), b.fcmp_ordered("ord", c, c)))


def _lower_argsort(module, name, ins):
    x = ins.inputs[0]
    n = x.shape[-1]
    rows = x.type.size // n if n else 0
    ety = llvm_type(x.dtype)
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * 3 + [I64, I64]), name)
    fn.attributes.add("nounwind")
    out, xp, scratch, tid, nthreads = fn.args
    for arg, an in zip(fn.args, ("out", "in0", "scratch", "tid", "nthreads")):
        arg.name = an
    out.add_attribute("noalias")
    xp.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block(f"{name}.entry"))
    passes = _passes(n)
    r0, r1 = thread_range(b, rows, tid, nthreads)
    mine = scratch   # the executing thread's own region (parallel.emit_call)
    with for_range(b, r0, r1, name="sort.row", scalar=True) as r:
        base = b.mul(r, i64(n), name="sort.base")
        row_out = b.gep(out, [base], source_etype=I64, name="sort.out")
        row_x = b.gep(xp, [base], source_etype=ety, name="sort.x")
        # an even number of passes starts in out, an odd one in scratch: the last ends in out
        bufs = [row_out, mine] if passes % 2 == 0 else [mine, row_out]
        with for_range(b, i64(0), i64(n), name="sort.iota") as i:
            store(b, i, bufs[0], i, I64)
        if passes:
            # one loop over the passes, swapping the buffers (compile time independent of n)
            with carry_loop(b, i64(0), i64(passes), bufs, name="sort.pass") as ps:
                src, dst = ps.vals
                _merge_pass(b, row_x, ety, src, dst, n, b.shl(i64(1), ps.iv, name="sort.width"))
                ps.next = [dst, src]
    b.ret_void()


def _merge_pass(b, keys, ety, src, dst, n: int, width):
    """dst[lo:hi] = the stable merge of src[lo:mid] and src[mid:hi] for each pair of runs."""
    with for_range(b, i64(0), i64(n), step=b.shl(width, i64(1)), name="sort.run",
                   scalar=True) as lo:
        mid = _min(b, b.add(lo, width), n)
        hi = _min(b, b.add(mid, width), n)
        with carry_loop(b, lo, hi, [lo, mid], name="sort.k") as st:
            i, j = st.vals
            left_ok = b.icmp_signed("<", i, mid)
            right_ok = b.icmp_signed("<", j, hi)
            # indices clamped into the runs, so the loads stay in bounds when a run is used up
            ii = load(b, src, b.select(left_ok, i, lo), I64)
            jj = load(b, src, b.select(right_ok, j, b.sub(hi, i64(1))), I64)
            right = b.and_(right_ok, b.or_(b.not_(left_ok),
                                           _before(b, load(b, keys, ii, ety),
                                                   load(b, keys, jj, ety))))
            store(b, b.select(right, jj, ii), dst, st.iv, I64)
            step = b.zext(right, I64)
            st.next = [b.add(i, b.sub(i64(1), step)), b.add(j, step)]


def _min(b, v, n: int):
    return b.select(b.icmp_signed("<", v, i64(n)), v, i64(n))


# compare-and-move per element per pass: memory-bound like pooling, a few short loops
register(argsort_p, scratch_bytes=_scratch_bytes, epilogue=False, parallel=True, cost=_cost,
         compile_weight=POOL_WEIGHT)(_lower_argsort)

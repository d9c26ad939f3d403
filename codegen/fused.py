"""Lowering of fused loop groups: elementwise, layout and reduction instructions evaluated per element
inside one loop nest over the group's root value (see codegen/schedule.py).

The kernel has the same contract as the loop-nest kernels (codegen/kernels/__init__.py):
`void name(ptr out, ptr leaf0, ..., ptr scratch, i64 tid, i64 nthreads)`; thread `tid` computes a
contiguous range of the outermost dimension (a reduction: of its first kept dimension; `scratch`
holds the float64 running sums of schedule.reduce_flush). The element expression is scalar code;
LLVM's loop vectorizer turns the innermost loop into vector code (fast-math flags allow
reassociation; NaN and Inf keep numpy semantics).
"""
from __future__ import annotations

import math
from typing import Callable

import llvmlite.ir as ir

from . import record
from ..ir.core import INT_DTYPES, Instr, IRError, Registry, Value
from ..ir.prims.elementwise import (abs_p, add_p, and_p, ceil_p, const_p, convert_p, div_p, eq_p,
                                  floor_p, fmod_p, ge_p, gt_p, integer_pow_p, le_p, lt_p, max_p,
                                  min_p, mul_p, ne_p, neg_p, not_p, or_p, pow_p, rint_p, select_p,
                                  sign_p, stop_gradient_p, sub_p, trunc_p)
from ..ir.prims.reduce import reduce_max_p, reduce_sum_p
from ..ir.prims.structural import (broadcast_in_dim_p, concatenate_p, pad_p, reshape_p, slice_p,
                                 transpose_p)

from . import loops as L
from . import schedule
from .kernels.toolkit import thread_range
from .loops import (F32, F64, FAST, I1, I8, I32, I64, PTR, REDUCE, SHORT_LOOP, VOID, for_range,
                    i64)


def scalar_type(dtype: str) -> ir.Type:
    """LLVM type of an element value in registers (bool is i1; stored as i8)."""
    return {"f32": F32, "f64": F64, "i32": I32, "i64": I64, "u32": I32, "bool": I1}[dtype]


def strides_of(shape):
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return list(reversed(out))


class _Element:
    """Emits the value of one IR value at an index (a list of i64 LLVM values), recursively
    through the non-materialized producers of a fused group."""

    def __init__(self, b: ir.IRBuilder, leaf_ptrs: dict, members: set, flat: bool = False):
        self.b = b
        self.leaf_ptrs = leaf_ptrs    # id(Value) -> LLVM pointer
        self.members = members        # ids of instructions evaluated inside
        self.flat = flat              # one linear index for every non-scalar value (see is_flat)
        self.memo = {}
        # id(LLVM i64 index) -> its static range [lo, hi), where known (a segment of the innermost
        # loop, see _segments): pads and concatenates read inside it decide at compile time
        self.ranges = {}
        # (shape, index, offset): the linear offset of `index` in a value of `shape`, known
        # without recomputing it from the index (an epilogue's row offset, see Epilogue.function)
        self.known_offset = None
        # ids of the LLVM pointers the element's outputs are stored to (see _store_all)
        self.written = set()

    def shifted(self, j, i, by: int):
        """Record index `j` = `i` + `by` as having `i`'s static range shifted; returns j."""
        r = self.ranges.get(id(i))
        if r is not None:
            self.ranges[id(j)] = (r[0] + by, r[1] + by)
        return j

    # --------------------------------------------------------------------------- addressing
    def linear(self, idx, shape):
        b = self.b
        if not shape:
            return i64(0)
        known = self.known_offset
        if known is not None and tuple(shape) == known[0] and len(idx) == len(known[1]) and \
                all(i is k for i, k in zip(idx, known[1])):
            return known[2]
        acc = None
        for i, s in zip(idx, strides_of(shape)):
            if s == 0:
                continue
            term = i if s == 1 else b.mul(i, i64(s))
            acc = term if acc is None else b.add(acc, term)
        return acc if acc is not None else i64(0)

    def load_leaf(self, v: Value, idx):
        b = self.b
        ptr = self.leaf_ptrs[id(v)]
        off = (idx[0] if v.shape else i64(0)) if self.flat else self.linear(idx, v.shape)
        if v.dtype == "bool":
            raw = L.load(b, ptr, off, I8)
            return b.icmp_unsigned("!=", raw, ir.Constant(I8, 0))
        val = L.load(b, ptr, off, scalar_type(v.dtype))
        if id(ptr) in self.written:
            # a read of the element this loop then stores (an epilogue on its kernel's result,
            # an in-place loop): frozen, so that x86's instruction selection does not turn
            # store(select(c, k, load p), p) into a masked store of k (vmaskmovps: one per 12
            # cycles on Zen 3; the ReLU-gradient epilogue of LeNet-5's conv2 input gradient,
            # 6912 vectors, cost 26 us of 274 on one thread)
            val = L.freeze(b, val)
        return val

    # --------------------------------------------------------------------------- values
    def value(self, v: Value, idx):
        key = (id(v), tuple(id(i) for i in idx))
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        if id(v) in self.leaf_ptrs:
            out = self.load_leaf(v, idx)
        else:
            ins = v.instr
            if ins is None or id(ins) not in self.members:
                raise IRError(f"codegen: value {v!r} is neither a buffer nor fused")
            out = self.instr(ins, idx)
        self.memo[key] = out
        return out

    def instr(self, ins: Instr, idx):
        return lowerings[ins.prim].value(self, ins, idx)

    def reshape_index(self, idx, out_shape, in_shape):
        b = self.b
        squeezed_out = [(i, n) for i, n in zip(idx, out_shape) if n != 1]
        in_non1 = [n for n in in_shape if n != 1]
        if [n for _, n in squeezed_out] == in_non1:
            it = iter(i for i, _ in squeezed_out)
            return [i64(0) if n == 1 else next(it) for n in in_shape]
        lin = self.linear(idx, out_shape)
        sub = []
        for s, n in zip(strides_of(in_shape), in_shape):
            q = b.udiv(lin, i64(s)) if s != 1 else lin
            sub.append(b.urem(q, i64(n)) if n != 1 else i64(0))
        return sub


# ------------------------------------------------------------------------------------------------
# the lowering of each primitive inside a fused loop, keyed by the primitive
# ------------------------------------------------------------------------------------------------
@record(frozen=True)
class Elementwise:
    """`emit(b, ins, args) -> value`: the result at an index from its operands' values there
    (a rank-0 operand is read once, at the empty index). `cost`: its instructions per element,
    roughly (1 for arithmetic; a polynomial function such as exp more, see heavy_cost)."""
    emit: Callable
    cost: int = 1

    def value(self, el: _Element, ins: Instr, idx):
        return emit_scalar_op(el.b, ins, [el.value(x, idx if x.shape else []) for x in ins.inputs])


@record(frozen=True)
class IndexMap:
    """`emit(el, ins, idx) -> value`: a layout op, which reads its inputs at remapped indices."""
    emit: Callable

    def value(self, el: _Element, ins: Instr, idx):
        return self.emit(el, ins, idx)


@record(frozen=True)
class Reduction:
    """The root of a reduction loop (see _lower_reduce): `combine(b, acc, v)` folds one element
    into a running value starting at `identity`; a `sum` is accumulated in float64 blocks."""
    identity: float
    combine: Callable
    sum: bool

    def value(self, el: _Element, ins: Instr, idx):
        raise IRError(f"codegen: reduction '{ins.prim.name}' inside a fused loop (reductions "
                      f"are materialized)")


lowerings = Registry("fused lowering")


def register_elementwise(*prims, cost: int = 1):
    """Register the decorated `emit(b, ins, args)` as the fused lowering of `prims` (`cost`: see
    Elementwise)."""
    def deco(emit):
        for p in prims:
            lowerings[p] = Elementwise(emit, cost)
        return emit
    return deco


def register_index_map(prim):
    """Register the decorated `emit(el, ins, idx)` as the fused lowering of layout op `prim`."""
    def deco(emit):
        lowerings[prim] = IndexMap(emit)
        return emit
    return deco


def emit_scalar_op(b: ir.IRBuilder, ins: Instr, args):
    """The elementwise instruction `ins` on its operands' scalar values `args`."""
    if ins.prim is not convert_p and any(v.dtype in INT_DTYPES for v in ins.inputs):
        return int_lowerings[ins.prim](b, ins, args)
    rule = lowerings[ins.prim]
    if not isinstance(rule, Elementwise):
        raise IRError(f"codegen: '{ins.prim.name}' is not elementwise")
    return rule.emit(b, ins, args)


# --------------------------------------------------------------------------- layout ops
@register_index_map(broadcast_in_dim_p)
def _broadcast_in_dim(el, ins, idx):
    x = ins.inputs[0]
    sub = [i64(0) if x.shape[k] == 1 else idx[d] for k, d in enumerate(ins.params["dims"])]
    return el.value(x, sub)


@register_index_map(reshape_p)
def _reshape(el, ins, idx):
    if el.flat:  # a reshape keeps the row-major linear index
        return el.value(ins.inputs[0], idx)
    return el.value(ins.inputs[0], el.reshape_index(idx, ins.out.type.shape, ins.inputs[0].shape))


@register_index_map(transpose_p)
def _transpose(el, ins, idx):
    perm = ins.params["perm"]
    sub = [None] * len(perm)
    for i, p in enumerate(perm):
        sub[p] = idx[i]
    return el.value(ins.inputs[0], sub)


@register_index_map(slice_p)
def _slice(el, ins, idx):
    b = el.b
    sub = []
    for i, s, k in zip(idx, ins.params["start"], ins.params["strides"]):
        if k == 1:
            sub.append(el.shifted(b.add(i, i64(s)), i, s) if s else i)
            continue
        j = b.mul(i, i64(k))
        sub.append(b.add(j, i64(s)) if s else j)
    return el.value(ins.inputs[0], sub)


@register_index_map(pad_p)
def _pad(el, ins, idx):
    b = el.b
    x = ins.inputs[0]
    p = ins.params
    valid = None
    sub = []
    for i, n, lo, hi, step in zip(idx, x.shape, p["lo"], p["hi"],
                                  [k + 1 for k in p["interior"]]):
        if lo == hi == 0 and step == 1:   # not padded along this axis: i is inside
            sub.append(i)
            continue
        j = el.shifted(b.sub(i, i64(lo)), i, -lo) if lo else i
        r = el.ranges.get(id(j))
        if r is not None and step == 1:   # a loop segment: inside or outside, known now
            if 0 <= r[0] and r[1] <= n:
                sub.append(j)
                continue
            if r[1] <= 0 or r[0] >= n:
                return ir.Constant(scalar_type(ins.out.dtype), 0)
        conds = [b.icmp_signed(">=", j, i64(0)), b.icmp_signed("<", j, i64((n - 1) * step + 1))]
        src = j
        if step != 1:
            conds.append(b.icmp_signed("==", b.srem(j, i64(step)), i64(0)))
            src = b.sdiv(j, i64(step))
        ok = conds[0]
        for c in conds[1:]:
            ok = b.and_(ok, c)
        valid = ok if valid is None else b.and_(valid, ok)
        clamped = b.select(ok, src, i64(0))
        sub.append(clamped)
    inner = el.value(x, sub)
    zero = ir.Constant(inner.type, 0)
    return b.select(valid, inner, zero) if valid is not None else inner


@register_index_map(concatenate_p)
def _concatenate(el, ins, idx):
    b = el.b
    axis = ins.params["axis"]
    offset = 0
    pieces = []
    r = el.ranges.get(id(idx[axis]))
    for x in ins.inputs:
        n = x.shape[axis]
        j = el.shifted(b.sub(idx[axis], i64(offset)), idx[axis], -offset) if offset \
            else idx[axis]
        if r is not None and offset <= r[0] and r[1] <= offset + n:  # the segment's piece
            return el.value(x, idx[:axis] + [j] + idx[axis + 1:])
        inside = b.and_(b.icmp_signed(">=", j, i64(0)), b.icmp_signed("<", j, i64(n)))
        sub = list(idx)
        sub[axis] = b.select(inside, j, i64(0))
        pieces.append((inside, el.value(x, sub)))
        offset += n
    result = pieces[-1][1]
    for inside, val in reversed(pieces[:-1]):
        result = b.select(inside, val, result)
    return result


# --------------------------------------------------------------------------- reductions
lowerings[reduce_sum_p] = Reduction(0.0, lambda b, acc, v: b.fadd(acc, v, flags=REDUCE), sum=True)
lowerings[reduce_max_p] = Reduction(-math.inf, lambda b, acc, v: nan_max(b, acc, v, ">"),
                                    sum=False)


# --------------------------------------------------------------------------- elementwise ops
def _intrinsic1(b, name, x):
    f = L.intrinsic(b.module, f"llvm.{name}.{L.type_suffix(x.type)}", x.type, [x.type])
    return b.call(f, [x])


def nan_max(b, a, c, op=">"):
    """numpy's maximum (op ">") / minimum (op "<"): NaN in either operand gives NaN."""
    take_a = b.or_(b.fcmp_ordered(op, a, c), b.fcmp_unordered("uno", a, a))
    return b.select(take_a, a, c)


# exp, log, tanh, sin, cos, logistic and sqrt are registered beside their code in mathfns.py
register_elementwise(const_p)(
    lambda b, ins, args: ir.Constant(scalar_type(ins.out.dtype), ins.params["value"]))
register_elementwise(add_p)(lambda b, ins, args: b.fadd(*args, flags=FAST))
register_elementwise(sub_p)(lambda b, ins, args: b.fsub(*args, flags=FAST))
register_elementwise(mul_p)(lambda b, ins, args: b.fmul(*args, flags=FAST))
register_elementwise(div_p)(lambda b, ins, args: b.fdiv(*args, flags=FAST))
register_elementwise(neg_p)(lambda b, ins, args: b.fneg(args[0], flags=FAST))
register_elementwise(abs_p)(lambda b, ins, args: _intrinsic1(b, "fabs", args[0]))
register_elementwise(stop_gradient_p)(lambda b, ins, args: args[0])
register_elementwise(integer_pow_p)(lambda b, ins, args: _integer_pow(b, args[0], ins.params["y"]))
register_elementwise(max_p)(lambda b, ins, args: nan_max(b, *args, ">"))
register_elementwise(min_p)(lambda b, ins, args: nan_max(b, *args, "<"))
register_elementwise(and_p)(lambda b, ins, args: b.and_(*args))
register_elementwise(or_p)(lambda b, ins, args: b.or_(*args))
register_elementwise(not_p)(lambda b, ins, args: b.xor(args[0], ir.Constant(I1, 1)))
register_elementwise(select_p)(lambda b, ins, args: b.select(*args))
register_elementwise(convert_p)(
    lambda b, ins, args: _convert(b, args[0], ins.inputs[0].dtype, ins.out.dtype))


@register_elementwise(sign_p)
def _sign(b, ins, args):
    x = args[0]
    one = ir.Constant(x.type, 1.0)
    pos = b.select(b.fcmp_ordered(">", x, ir.Constant(x.type, 0.0)), one, x)
    return b.select(b.fcmp_ordered("<", x, ir.Constant(x.type, 0.0)), b.fneg(one), pos)


@register_elementwise(pow_p)
def _pow(b, ins, args):
    ty = args[0].type
    f = L.intrinsic(b.module, f"llvm.pow.{L.type_suffix(ty)}", ty, [ty, ty])
    return b.call(f, args)


# rounding: LLVM intrinsics that vectorize to vroundps/vroundpd (rint: half to even, as numpy)
for _p, _name in ((floor_p, "floor"), (ceil_p, "ceil"), (trunc_p, "trunc"), (rint_p, "rint")):
    register_elementwise(_p)((lambda name: lambda b, ins, args: _intrinsic1(b, name, args[0]))(_name))
# C's fmod, exact (frem is libm's fmod: a scalar call per element, the price of exactness)
register_elementwise(fmod_p)(lambda b, ins, args: b.frem(*args))


def _compare(op: str, unordered: bool = False):
    """A comparison: unsigned on bools, else ordered (false with a NaN operand) unless
    `unordered` (true with a NaN operand: numpy's !=)."""
    def emit(b, ins, args):
        if ins.inputs[0].dtype == "bool":
            return b.icmp_unsigned(op, *args)
        return (b.fcmp_unordered if unordered else b.fcmp_ordered)(op, *args)
    return emit


for _p, _op in ((gt_p, ">"), (ge_p, ">="), (lt_p, "<"), (le_p, "<="), (eq_p, "==")):
    register_elementwise(_p)(_compare(_op))
register_elementwise(ne_p)(_compare("!=", unordered=True))


# Integer operands (labels, indices): wrapping arithmetic as numpy's, signed comparisons.
int_lowerings = Registry("fused lowering of integer operands")
int_lowerings[add_p] = lambda b, ins, args: b.add(*args)
int_lowerings[sub_p] = lambda b, ins, args: b.sub(*args)
int_lowerings[mul_p] = lambda b, ins, args: b.mul(*args)
int_lowerings[neg_p] = lambda b, ins, args: b.neg(args[0])
int_lowerings[max_p] = lambda b, ins, args: b.select(b.icmp_signed(">", *args), *args)
int_lowerings[min_p] = lambda b, ins, args: b.select(b.icmp_signed("<", *args), *args)
int_lowerings[select_p] = lambda b, ins, args: b.select(*args)
int_lowerings[stop_gradient_p] = lambda b, ins, args: args[0]
for _p, _op in ((gt_p, ">"), (ge_p, ">="), (lt_p, "<"), (le_p, "<="), (eq_p, "=="), (ne_p, "!=")):
    int_lowerings[_p] = (lambda op: lambda b, ins, args: b.icmp_signed(op, *args))(_op)



@int_lowerings.register(fmod_p)
def _int_fmod(b, ins, args):
    # srem traps on a zero divisor and on INT_MIN % -1: both give 0 here (numpy: 0 with a
    # warning for the first, 0 for the second), by dividing by 1 instead
    a, d = args
    zero, one = ir.Constant(a.type, 0), ir.Constant(a.type, 1)
    trivial = b.or_(b.icmp_signed("==", d, zero), b.icmp_signed("==", d, ir.Constant(a.type, -1)))
    r = b.srem(a, b.select(trivial, one, d))
    return b.select(trivial, zero, r)

def _integer_pow(b, x, y: int):
    if y == 0:
        return ir.Constant(x.type, 1.0)
    n, result, base = abs(y), None, x
    while n:
        if n & 1:
            result = base if result is None else b.fmul(result, base, flags=FAST)
        n >>= 1
        if n:
            base = b.fmul(base, base, flags=FAST)
    return b.fdiv(ir.Constant(x.type, 1.0), result) if y < 0 else result


def _convert(b, x, src: str, dst: str):
    dty = scalar_type(dst)
    if src == dst:
        return x
    if src == "bool":
        return b.uitofp(x, dty) if dst in ("f32", "f64") else b.zext(x, dty)
    if dst == "bool":
        return b.fcmp_unordered("!=", x, ir.Constant(x.type, 0.0)) if src in ("f32", "f64") \
            else b.icmp_unsigned("!=", x, ir.Constant(x.type, 0))
    if src in ("f32", "f64") and dst in ("f32", "f64"):
        return b.fpext(x, dty) if dst == "f64" else b.fptrunc(x, dty)
    if src in INT_DTYPES and dst in INT_DTYPES:
        return b.sext(x, dty) if dty.width > x.type.width else b.trunc(x, dty)
    if src in INT_DTYPES:
        return b.sitofp(x, dty)
    return b.fptosi(x, dty)


# ------------------------------------------------------------------------------------------------
# the kernel function of a fused group
# ------------------------------------------------------------------------------------------------
def _store_value(b, val, ptr, off, dtype):
    if dtype == "bool":
        val = b.zext(val, I8)
        L.store(b, val, ptr, off, I8)
    else:
        L.store(b, val, ptr, off, scalar_type(dtype))


def lower_group(module: ir.Module, fname: str, group) -> ir.Function:
    """Define `fname` computing the group's root value and its extra outputs (see module
    docstring): `fname(out, extra outputs..., leaves..., scratch, tid, nthreads)`."""
    root = group.root
    leaves = group.leaves
    extras = group.extra_outputs
    n_out = 1 + len(extras)
    fnty = ir.FunctionType(VOID, [PTR] * (n_out + len(leaves)) + [PTR, I64, I64])
    fn = ir.Function(module, fnty, fname)
    fn.linkage = "internal"
    for a in fn.args[:n_out + 1 + len(leaves)]:   # outputs, leaves and scratch
        a.add_attribute("noalias")
    out_ptr = fn.args[0]
    out_ptr.name = "out"
    for k, a in enumerate(fn.args[1:n_out]):
        a.name = f"out{k + 1}"
    for k, a in enumerate(fn.args[n_out:n_out + len(leaves)]):
        a.name = f"in{k}"
    tid, nthreads = fn.args[-2], fn.args[-1]
    tid.name, nthreads.name = "tid", "nthreads"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    members = {id(m) for m in group.members}
    leaf_ptrs = {id(v): a for v, a in zip(leaves, fn.args[n_out:n_out + len(leaves)])}
    for v in group.in_place:   # stored over by the result (schedule._place_donated): one buffer,
        leaf_ptrs[id(v)] = out_ptr   # so one pointer, as `noalias` requires
    out_ptrs = {id(o): a for o, a in zip(extras, fn.args[1:n_out])}
    for v, o in group.extra_in_place:
        leaf_ptrs[id(v)] = out_ptrs[id(o)]
    stores = [(root.out, out_ptr)] + list(zip(extras, fn.args[1:n_out]))
    base = root.prim.name
    if root.prim.kind == "reduce":
        _lower_reduce(b, group, leaf_ptrs, members, out_ptr, fn.args[-3], tid, nthreads, base)
    else:
        _lower_map(b, root, leaf_ptrs, members, stores, tid, nthreads, base, is_flat(group),
                   group.members)
    b.ret_void()
    return fn


def is_flat(group) -> bool:
    """Can the group run as one loop over the flattened root? Yes when it is elementwise up to
    reshapes (which keep the row-major linear index) and every buffer it reads has the root's
    number of elements or is a scalar."""
    return schedule.linear_index(group, group.root.out.type.size, group.members)


# A fused loop that visits at most this many elements in all is left scalar (no vectorizing, no
# unrolling): it runs in well under a microsecond either way, while LLVM spends ~10 ms on each
# loop it vectorizes (a bias gradient's [64, 10] column sum compiled in 38 ms, scalar in 15).
# An element of a loop computing exp or log counts as heavy_cost elements.
TINY_WORK = 1024


def heavy_cost(members) -> int:
    """The instructions per element of the costly members (Elementwise.cost above 1: exp, log,
    tanh...), 0 without any: scalar, such a loop is no longer cheap (a softmax cross-entropy's
    [64, 10] exp loop ran 6 us, 9 ns per element), and a short row of it is worth vectorizing
    with masked iterations (loops.masked_loop_id) rather than running scalar."""
    total = 0
    for m in members:
        rule = lowerings.get(m.prim)   # a dict: layout ops and reductions have no cost
        if isinstance(rule, Elementwise) and rule.cost > 1:
            total += rule.cost
    return total


def _is_tiny(elements: int, heavy: int) -> bool:
    return elements * (1 + heavy) <= TINY_WORK


def _store_all(b, el, stores, idx, off):
    """Evaluate every output at `idx`, then store each at `off`: all loads of an element come
    before any store, so an output stored over a buffer the loop reads (in place) is read first."""
    el.written = {id(ptr) for _, ptr in stores}
    vals = [el.value(v, idx) for v, _ in stores]
    for (v, ptr), val in zip(stores, vals):
        _store_value(b, val, ptr, off, v.dtype)


def _lower_map(b, root, leaf_ptrs, members, stores, tid, nthreads, base, flat=False, instrs=()):
    """The loop over the root's elements; `stores`: (value, pointer) of the root and of every
    extra output, of the root's shape; `instrs` (the group's members) cut the innermost axis into
    segments (see `_segments`)."""
    shape = root.out.shape
    if not shape:
        with L.if_then(b, b.icmp_signed("==", tid, i64(0)), f"{base}.t0"):
            _store_all(b, _Element(b, leaf_ptrs, members), stores, [], i64(0))
        return
    heavy = heavy_cost(instrs)
    if flat:
        total = math.prod(shape)
        lo, hi = thread_range(b, total, tid, nthreads)
        with for_range(b, lo, hi, 1, f"{base}.i", scalar=_is_tiny(total, heavy)) as i:
            _store_all(b, _Element(b, leaf_ptrs, members, flat=True), stores, [i], i)
        return
    # the trailing axes every read is contiguous or constant over run as one loop (a bias
    # added over 8 x 8 planes: rows of 64, vectorized, not of 8, scalar)
    k = collapsed_axes([v for v, _ in stores], instrs) if len(shape) > 1 else 1
    loops = tuple(shape[:len(shape) - k]) + (math.prod(shape[len(shape) - k:]),)
    lo, hi = thread_range(b, loops[0], tid, nthreads)
    segments = _segments(instrs, shape) if k == 1 and len(shape) > 1 else [(0, loops[-1])]

    def body(ranges):
        el = _Element(b, leaf_ptrs, members)
        el.ranges = ranges
        full = collapsed_index(shape, k, idx)
        _store_all(b, el, stores, full, _Element(b, {}, set()).linear(full, shape))
    tiny = _is_tiny(math.prod(shape), heavy)
    with for_range(b, lo, hi, 1, f"{base}.d0", scalar=tiny) as i0:
        idx = [i0]
        _nest(b, loops, 1, idx, base, body, segments, tiny, heavy > 0)


def _segments(instrs, shape, most: int = 8):
    """The innermost axis [0, shape[-1]) cut where a pad or concatenate of the group along that
    axis changes operand: within one segment each of them reads one operand (or is zero), so
    the loop over a segment computes only that operand's expression, with contiguous loads
    (one loop with selects would compute every operand at every element through gathers; the
    adjoint of an LSTM's gate slices adds four pads). At most `most` segments, else one."""
    n, last = shape[-1], len(shape) - 1
    cuts = {0, n}
    for ins in instrs:
        out = ins.out.shape
        if len(out) != len(shape) or out[-1] != n:
            continue
        if ins.prim is pad_p and ins.params["interior"][-1] == 0:
            lo = ins.params["lo"][-1]
            cuts.update((lo, lo + ins.inputs[0].shape[-1]))
        elif ins.prim is concatenate_p and ins.params["axis"] == last:
            offset = 0
            for x in ins.inputs:
                offset += x.shape[-1]
                cuts.add(offset)
    cuts = sorted(c for c in cuts if 0 <= c <= n)
    if len(cuts) - 1 > most:
        return [(0, n)]
    return list(zip(cuts[:-1], cuts[1:]))


def _nest(b, shape, d, idx, base, body, segments, tiny=False, heavy=False):
    """Loops over dimensions d.. of `shape` around `body(ranges)`; the innermost runs one loop
    per segment, `ranges` giving its index's static range. `tiny`: all loops scalar; `heavy`
    (see heavy_cost): a short innermost loop runs masked vector iterations, not scalar."""
    if d == len(shape):
        body({})
        return
    if d < len(shape) - 1:
        with for_range(b, 0, shape[d], 1, f"{base}.d{d}",
                       scalar=tiny or shape[d] < SHORT_LOOP) as i:
            idx.append(i)
            _nest(b, shape, d + 1, idx, base, body, segments, tiny, heavy)
            idx.pop()
        return
    for k, (s0, s1) in enumerate(segments):
        name = f"{base}.d{d}" + (f".s{k}" if len(segments) > 1 else "")
        short = s1 - s0 < SHORT_LOOP
        with for_range(b, s0, s1, 1, name, scalar=tiny or short and not heavy,
                       masked=short and heavy) as i:
            idx.append(i)
            body({id(i): (s0, s1)})
            idx.pop()


def _convert_float(b, v, ty):
    if v.type == ty:
        return v
    return b.fpext(v, ty) if ty == F64 else b.fptrunc(v, ty)


def _lower_reduce(b, group, leaf_ptrs, members, out_ptr, scratch, tid, nthreads, base):
    """Loop over the input in row-major order (see schedule.reduce_loops), combining into the
    output. The innermost reduced loop accumulates in registers; a sum does that in blocks of
    REDUCE_BLOCK elements whose sums are added in float64. A float32 sum that adds into its
    outputs more often than that across outer reduced loops flushes them into float64 sums in
    `scratch` (schedule.reduce_flush) and rounds those once at the end."""
    root = group.root
    x = root.inputs[0]
    dtype = root.out.dtype
    ty = scalar_type(dtype)
    red = lowerings[root.prim]
    ident = ir.Constant(ty, red.identity)
    addr = _Element(b, {}, set())
    xs, axes, flat = schedule.reduce_loops(group)
    out_shape = tuple(n for d, n in enumerate(xs) if d not in axes)
    blocked = red.sum and dtype in ("f32", "f64")   # sums in float64 blocks (see below)
    wide = F64 if blocked else ty      # type of a register reduction's total
    flush_at = schedule.reduce_flush(group)
    heavy = heavy_cost(group.members)
    tiny = _is_tiny(math.prod(xs), heavy)
    # the loops over outputs only (setting, flushing, rounding them) are scalar when the outputs
    # are few: they are a small part of the reduction's work, and each vectorized one costs
    # compile time
    few_outputs = math.prod(out_shape) <= TINY_WORK

    def combine(acc, v):
        v = _convert_float(b, v, acc.type)
        return red.combine(b, acc, v)

    def out_off(idx):
        return addr.linear([i for k, i in enumerate(idx) if k not in axes], out_shape)

    def accumulate(off, v):
        L.store(b, combine(L.load(b, out_ptr, off, ty), v), out_ptr, off, ty)

    # Threads split the first kept dimension (output dimension 0): each owns a block of output
    # rows, so every output element is computed by one thread in a fixed order. Without a kept
    # dimension thread 0 does the whole reduction.
    kept = [d for d in range(len(xs)) if d not in axes]
    sd = kept[0] if kept else 0
    if kept:
        lo, hi = thread_range(b, xs[sd], tid, nthreads)
    else:
        lo, hi = i64(0), b.select(b.icmp_signed("==", tid, i64(0)), i64(xs[0]), i64(0))

    def over_outputs(name, first, stop, body):
        with for_range(b, first, stop, 1, f"{base}.{name}", scalar=few_outputs) as j:
            body(j)

    def over_own_outputs(name, body):
        """Run body(j) for the flat output indices this thread owns."""
        if out_shape:
            n_out_inner = math.prod(out_shape[1:])
            over_outputs(name, b.mul(lo, i64(n_out_inner)), b.mul(hi, i64(n_out_inner)), body)
        else:
            with L.if_then(b, b.icmp_signed("==", tid, i64(0)), f"{base}.{name}"):
                body(i64(0))

    def init(j):
        L.store(b, ident, out_ptr, j, ty)
        if flush_at is not None:
            L.store(b, ir.Constant(F64, 0.0), scratch, j, F64)

    over_own_outputs("init", init)
    last = len(xs) - 1
    with b.goto_entry_block():
        acc_slot = b.alloca(ty, name=f"{base}.acc")
        wide_slot = b.alloca(wide, name=f"{base}.wacc")
    idx = []

    def extent(d):
        return (lo, hi) if d == sd else (i64(0), i64(xs[d]))

    def element():
        if flat:   # one linear index into buffers of x's size
            return _Element(b, leaf_ptrs, members, flat=True).value(x, [addr.linear(idx, xs)])
        return _Element(b, leaf_ptrs, members).value(x, idx)

    def block_end(start, stop, step):
        end = b.add(start, i64(step))
        return b.select(b.icmp_signed("<", end, stop), end, stop)

    def accumulate_loop(start, stop, d, short):
        """acc_slot = the reduction of the elements of dimension d in [start, stop)."""
        b.store(ident, acc_slot)
        with for_range(b, start, stop, 1, f"{base}.d{d}", scalar=tiny or short and not heavy,
                       masked=short and heavy > 0) as i:
            idx.append(i)
            b.store(combine(b.load(acc_slot), element()), acc_slot)
            idx.pop()

    def register_reduction(d):
        """The innermost reduced dimension d, accumulated in registers, added to the output."""
        start, stop = extent(d)
        short = d != sd and xs[d] < SHORT_LOOP
        if not blocked or (d != sd and xs[d] <= schedule.REDUCE_BLOCK):
            accumulate_loop(start, stop, d, short)
            total = b.load(acc_slot)
        else:
            b.store(ir.Constant(wide, 0.0), wide_slot)
            with for_range(b, start, stop, schedule.REDUCE_BLOCK, f"{base}.d{d}.block",
                           scalar=True) as blk:
                accumulate_loop(blk, block_end(blk, stop, schedule.REDUCE_BLOCK), d, short)
                b.store(b.fadd(b.load(wide_slot), _convert_float(b, b.load(acc_slot), wide)),
                        wide_slot)
            total = b.load(wide_slot)
        off = out_off(idx + [i64(0)])
        if kept or d != sd:
            accumulate(off, total)
        else:   # the whole reduction is this one loop: only thread 0 ran it
            with L.if_then(b, b.icmp_signed("==", tid, i64(0)), f"{base}.t0"):
                accumulate(off, total)

    def flush(d):
        """Add the float32 running sums that loop d's body adds to into scratch; zero them."""
        inner_kept = [k for k in kept if k > d]
        if sd in inner_kept:   # this thread's output rows
            n = math.prod(xs[k] for k in inner_kept[1:])
            first, stop = b.mul(lo, i64(n)), b.mul(hi, i64(n))
        else:                  # the outputs at the current indices of the kept loops outside d
            first = out_off(idx + [i64(0)] * (len(xs) - len(idx)))
            stop = b.add(first, i64(math.prod(xs[k] for k in inner_kept)))

        def move(j):
            s = b.fadd(L.load(b, scratch, j, F64), b.fpext(L.load(b, out_ptr, j, ty), F64))
            L.store(b, s, scratch, j, F64)
            L.store(b, ident, out_ptr, j, ty)
        over_outputs(f"d{d}.flush", first, stop, move)

    def loop(d, start, stop):
        short = d != sd and xs[d] < SHORT_LOOP
        short_last = short and d == last
        # a short loop around inner loops stays rolled: fully unrolled (a constant range of 6
        # channels around their planes' sums, when the kernel runs on one thread) it interleaved
        # 6 streams of the input, and LeNet-5's conv1 bias gradient ran 10% slower
        with for_range(b, start, stop, 1, f"{base}.d{d}",
                       scalar=tiny or d != last and xs[d] < SHORT_LOOP
                       or short_last and not heavy,
                       masked=short_last and heavy > 0) as i:
            idx.append(i)
            if d == last:
                accumulate(out_off(idx), element())
            else:
                nest(d + 1)
            idx.pop()

    def nest(d):
        if d == last and d in axes:
            register_reduction(d)
            return
        start, stop = extent(d)
        if flush_at is not None and d == flush_at[0]:
            step = flush_at[1]
            with for_range(b, start, stop, step, f"{base}.d{d}.block", scalar=True) as blk:
                loop(d, blk, block_end(blk, stop, step))
                flush(d)
            return
        loop(d, start, stop)

    nest(0)
    if flush_at is not None:
        over_own_outputs("round", lambda j: L.store(
            b, b.fptrunc(L.load(b, scratch, j, F64), ty), out_ptr, j, ty))


# ------------------------------------------------------------------------------------------------
# epilogues: a fused loop applied in place by a loop-nest kernel to each block it finishes
# ------------------------------------------------------------------------------------------------
def collapsed_axes(outs, members) -> int:
    """How many trailing axes (at least 1) a loop computing the values `outs` (of one shape) from
    `members` can run as one axis: the most such that every value the loop reads is either
    contiguous over them (has them in full as its own trailing axes, row-major) or constant
    over them (broadcast along all of them). The loop then indexes them with collapsed_index."""
    ids = {id(m) for m in members}
    shape = outs[0].shape
    if not math.prod(shape):
        return 1   # no rows to divide into (nor a row length to divide by)
    for k in range(len(shape), 1, -1):
        if all(_reads_rows(v, shape[-k:], ids) for v in outs):
            return k
    return 1


def collapsed_index(shape, k: int, idx):
    """The index into `shape` of `idx`, an index into `shape` with its last `k` axes collapsed
    into one (collapsed_axes): the collapsed index at the last of them of more than one element
    (its stride is 1, so a linear offset comes out right), 0 at the others."""
    if k == 1:
        return idx
    trailing = shape[len(shape) - k:]
    at = max([d for d, n in enumerate(trailing) if n != 1], default=k - 1)
    zero = i64(0)
    return idx[:-1] + [idx[-1] if d == at else zero for d in range(k)]


def _reads_rows(v: Value, trailing, members) -> bool:
    """Is `v`, read at an index collapsed over its trailing axes `trailing` (see
    collapsed_axes), read correctly, through contiguous or constant reads of its operands?"""
    m = len(trailing)
    if tuple(v.shape[-m:]) != tuple(trailing):
        return False
    ins = v.instr
    if ins is None or id(ins) not in members:
        return True   # a buffer: row-major over its trailing axes
    rule = lowerings.get(ins.prim)   # a dict: no error for a primitive it lacks
    if isinstance(rule, Elementwise):
        return all(not x.shape or (x.shape == v.shape and _reads_rows(x, trailing, members))
                   for x in ins.inputs)
    if ins.prim is broadcast_in_dim_p:
        x, dims = ins.inputs[0], tuple(ins.params["dims"])
        rank = len(v.shape)
        along = [k for k, d in enumerate(dims) if d >= rank - m and x.shape[k] != 1]
        if not along:
            return True   # constant over the collapsed axes
        return dims[len(dims) - m:] == tuple(range(rank - m, rank)) and \
            _reads_rows(x, trailing, members)
    if ins.prim is transpose_p:
        perm, rank = tuple(ins.params["perm"]), len(v.shape)
        return perm[rank - m:] == tuple(range(rank - m, rank)) and \
            _reads_rows(ins.inputs[0], trailing, members)
    return False


class Epilogue:
    """The fused loop `group` (whose input `value` is a loop-nest kernel's result) as an epilogue
    of that kernel. The kernel function gets `n_args` extra pointer arguments (the other buffers
    the loop reads), placed right after its inputs, and calls

        epilogue.call(b, out, extra_args, start, count)

    after it has written the elements [start, start + count) of its output (flat indices; start
    and count are i64 values, whole multiples of the output's last dimension). The call rewrites
    those elements in place from the kernel's result to the epilogue's result. Applied `apart`
    (schedule.Group.epilogue_apart), the result stays and the extra arguments start with the
    buffers of the loop's outputs (its root, then its extra outputs), where the call stores
    them; an output stored over a buffer the loop reads (in place) reads it through its own
    pointer, as lower_group does."""

    def __init__(self, group, value: Value, name: str, apart: bool = False):
        self.group = group
        self.value = value
        self.name = name
        self.apart = apart
        self.outputs = [group.root.out] + group.extra_outputs if apart else []
        self.leaves = [v for v in group.leaves if v is not value]
        self.n_args = len(self.outputs) + len(self.leaves)
        self._fns = {}

    def function(self, module: ir.Module, window: bool = False) -> ir.Function:
        """The epilogue over out[start, start + count); with `window`, only the columns
        [col0, col1) of out's last axis in those rows (two more i64 arguments: call_window)."""
        if window in self._fns:
            return self._fns[window]
        extra = [I64, I64] if window else []
        fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * (1 + self.n_args) + [I64, I64]
                                                 + extra),
                         self.name + (".window" if window else ""))
        fn.linkage = "internal"
        fn.attributes.add("alwaysinline")
        out = fn.args[0]
        out.name = "out"
        n_out = len(self.outputs)
        for k, a in enumerate(fn.args[1:1 + self.n_args]):
            a.name = f"epi{k}"
            a.add_attribute("noalias")
        start, count = fn.args[1 + self.n_args], fn.args[2 + self.n_args]
        start.name, count.name = "start", "count"
        cols = None
        if window:
            cols = fn.args[-2:]
            cols[0].name, cols[1].name = "col0", "col1"
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        root = self.group.root
        shape = root.out.shape
        members = {id(m) for m in self.group.members}
        leaf_ptrs = {id(v): a for v, a in zip(self.leaves, fn.args[1 + n_out:1 + self.n_args])}
        leaf_ptrs[id(self.value)] = out
        if self.apart:
            stores = list(zip(self.outputs, fn.args[1:1 + n_out]))
            for v in self.group.in_place:
                leaf_ptrs[id(v)] = stores[0][1]
            by_output = {id(o): a for o, a in stores}
            for v, o in self.group.extra_in_place:
                leaf_ptrs[id(v)] = by_output[id(o)]
        else:
            stores = [(root.out, out)]
        base = fn.name
        if is_flat(self.group):
            def flat(lo, hi):   # out[lo, hi) by flat index
                with for_range(b, lo, hi, 1, f"{base}.i") as i:
                    _store_all(b, _Element(b, leaf_ptrs, members, flat=True), stores, [i], i)
            if window:   # the window's columns of each row of out's last axis
                inner = i64(shape[-1])
                with for_range(b, b.sdiv(start, inner), b.sdiv(b.add(start, count), inner), 1,
                               f"{base}.row") as r:
                    row_off = b.mul(r, inner)
                    flat(b.add(row_off, cols[0]), b.add(row_off, cols[1]))
            else:
                flat(start, b.add(start, count))
        else:
            self._rows(b, start, count, shape, leaf_ptrs, members, stores, base, cols)
        b.ret_void()
        self._fns[window] = fn
        return fn

    def _rows(self, b, start, count, shape, leaf_ptrs, members, stores, base, cols=None):
        """The loop over out[start, start + count) as rows of the trailing axes that collapse
        (see collapsed_axes): rows of 8x8 conv planes are 64 elements long, and vectorize. The
        range is whole rows of out's last axis, not always of the collapsed rows (a matmul
        panel, a pooled block): the first and last collapsed row may be partial. With `cols`
        (col0, col1), the rows are out's last axis uncollapsed, and only those columns of each
        run (a block of a matmul's column grid)."""
        k = 1 if cols else collapsed_axes([v for v, _ in stores], self.group.members)
        outer, trailing = list(shape[:-k]), shape[-k:]
        inner = math.prod(trailing)
        end = b.add(start, count)
        whole = k == 1   # the range is whole rows: the column loop has constant bounds
        r0 = b.sdiv(start, i64(inner), name=f"{base}.row0")
        r1 = b.sdiv(end if whole else b.add(end, i64(inner - 1)), i64(inner), name=f"{base}.row1")
        zero = i64(0)
        with for_range(b, r0, r1, 1, f"{base}.row") as r:
            # the row's index along each outer axis; the outermost is what is left after
            # the others, with no remainder (r < the rows of out): a remainder there hid
            # from LLVM that an epilogue reading the kernel's result reads the element it
            # writes, and its run-time alias check sent every row to the scalar loop
            prefix, rest = [], r
            for n in reversed(outer[1:]):
                prefix.append(b.srem(rest, i64(n)))
                rest = b.sdiv(rest, i64(n))
            if outer:
                prefix.append(rest)
            prefix.reverse()
            row_off = b.mul(r, i64(inner))
            if cols:
                c0, c1 = cols
            elif whole:
                c0, c1 = i64(0), i64(inner)
            else:
                lo, hi = b.sub(start, row_off), b.sub(end, row_off)
                c0 = b.select(b.icmp_signed(">", lo, zero), lo, zero, name=f"{base}.col0")
                c1 = b.select(b.icmp_signed("<", hi, i64(inner)), hi, i64(inner),
                              name=f"{base}.col1")
            with for_range(b, c0, c1, 1, f"{base}.col", scalar=inner < SHORT_LOOP) as j:
                el = _Element(b, leaf_ptrs, members)
                off = b.add(row_off, j)
                idx = collapsed_index(shape, k, prefix + [j])
                # values of out's shape read at the row's offset, not at one recomputed from
                # the index (remainders of 3 or more axes): else LLVM cannot see that the
                # epilogue reads the element it writes, and its alias check runs every row of
                # a conv epilogue in the scalar loop (LeNet's conv1 + bias + relu: +50%)
                el.known_offset = (tuple(shape), idx, off)
                _store_all(b, el, stores, idx, off)

    def call(self, b: ir.IRBuilder, out, extra_args, start, count):
        b.call(self.function(b.module), [out] + list(extra_args) + [start, count])

    def call_window(self, b: ir.IRBuilder, out, extra_args, start, count, col0, col1):
        """`call` over the columns [col0, col1) of out's last axis only (i64 values), in the
        rows of out[start, start + count) (whole rows of that axis)."""
        b.call(self.function(b.module, window=True),
               [out] + list(extra_args) + [start, count, col0, col1])


# The transcendental functions register their lowerings beside their code (mathfns imports this
# module's registry, so it is imported last).
from . import mathfns  # noqa: E402,F401

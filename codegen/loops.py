"""Small helpers for emitting LLVM loop nests with llvmlite, in the manner of Numba's cgutils.

Blocks and values are named after the loop they implement (`conv2d.oh.body`, `conv2d.oh.i`) so the
LLVM dump reads like the loop nest. Float flags (FAST, REDUCE below) allow FMA contraction and the
reassociation of reductions only, so NaN and Inf propagate as in numpy.
"""
from __future__ import annotations

import contextlib

import llvmlite.ir as ir

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()
F64 = ir.DoubleType()
PTR = ir.PointerType()
VOID = ir.VoidType()

# Float flags. Elementwise arithmetic may contract a*b+c into an FMA (one rounding instead of two)
# and nothing else: `arcp` would turn x / c into x * (1 / c), which overflows for subnormal c, and
# `reassoc` with `nsz` lets LLVM factor sum_i x[i] * y into (sum_i x[i]) * y, dropping a 0 * Inf.
# Accumulations into a reduction may also reassociate (REDUCE): that is what lets them vectorize.
FAST = ("contract",)
REDUCE = ("reassoc", "contract")

_LLVM_TYPES = {"f32": F32, "f64": F64, "i32": I32, "i64": I64, "u32": I32, "bool": I8}


def llvm_type(dtype: str) -> ir.Type:
    """Element type of a buffer of IR dtype `dtype` (bool is stored as one byte)."""
    return _LLVM_TYPES[dtype]


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, int(v))


def i32(v: int) -> ir.Constant:
    return ir.Constant(I32, int(v))


def vec(ty: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(ty, n)


# Loops shorter than this stay scalar: a vector body would never run, and vectorizing and
# unrolling them only costs compile time.
SHORT_LOOP = 16


def scalar_loop_id(module: ir.Module):
    """A loop ID (self-referential metadata) that turns off LLVM's vectorizer and unroller."""
    cached = getattr(module, "_tracejit_scalar_loop", None)
    if cached is None:
        opts = [module.add_metadata([ir.MetaDataString(module, "llvm.loop.vectorize.width"),
                                     i32(1)]),
                module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])]
        cached = module.add_metadata(opts)
        cached.operands = (cached,) + tuple(cached.operands)
        module._tracejit_scalar_loop = cached
    return cached


def masked_loop_id(module: ir.Module):
    """A loop ID that makes LLVM's vectorizer run a short loop as masked vector iterations (tail
    folding: a row of 10 is one 16-lane iteration with 6 lanes off) instead of a scalar loop."""
    cached = getattr(module, "_tracejit_masked_loop", None)
    if cached is None:
        true = ir.Constant(ir.IntType(1), 1)
        opts = [module.add_metadata([ir.MetaDataString(module, "llvm.loop.vectorize.enable"),
                                     true]),
                module.add_metadata([ir.MetaDataString(module,
                                                       "llvm.loop.vectorize.predicate.enable"),
                                     true])]
        cached = module.add_metadata(opts)
        cached.operands = (cached,) + tuple(cached.operands)
        module._tracejit_masked_loop = cached
    return cached


class Carry:
    """State of a `carry_loop`: induction variable, loop-carried values; set `next` in the body,
    read `out` (the values after the last iteration) after the loop."""

    def __init__(self, iv, vals):
        self.iv, self.vals, self.next, self.out = iv, vals, None, None


@contextlib.contextmanager
def carry_loop(b: ir.IRBuilder, start, stop, inits, name: str, step=1, scalar: bool = True,
               masked: bool = False):
    """`for iv in range(start, stop, step)` (i64; positive step) carrying `inits` (e.g. vector
    accumulators) through phis. Emits blocks `{name}.cond`, `{name}.body`, `{name}.end`; the
    builder is left at `.end`. With `scalar` (the default here) LLVM neither unrolls nor
    vectorizes it: explicit vector bodies need neither, and unrolled copies cost compile time.
    With `masked` (and not `scalar`) it is vectorized with masked iterations (masked_loop_id)."""
    start = i64(start) if isinstance(start, int) else start
    stop = i64(stop) if isinstance(stop, int) else stop
    step = i64(step) if isinstance(step, int) else step
    pre = b.block
    fn = pre.function
    cond = fn.append_basic_block(f"{name}.cond")
    body = fn.append_basic_block(f"{name}.body")
    end = fn.append_basic_block(f"{name}.end")
    b.branch(cond)
    b.position_at_end(cond)
    iv = b.phi(I64, name=f"{name}.i")
    iv.add_incoming(start, pre)
    phis = []
    for k, v in enumerate(inits):
        p = b.phi(v.type, name=f"{name}.acc{k}")
        p.add_incoming(v, pre)
        phis.append(p)
    b.cbranch(b.icmp_signed("<", iv, stop, name=f"{name}.more"), body, end)
    b.position_at_end(body)
    state = Carry(iv, phis)
    yield state
    latch = b.block
    iv.add_incoming(b.add(iv, step, name=f"{name}.next"), latch)
    for p, v in zip(phis, state.next or []):
        p.add_incoming(v, latch)
    branch = b.branch(cond)
    if scalar:
        branch.set_metadata("llvm.loop", scalar_loop_id(b.module))
    elif masked:
        branch.set_metadata("llvm.loop", masked_loop_id(b.module))
    b.position_at_end(end)
    state.out = phis


@contextlib.contextmanager
def for_range(b: ir.IRBuilder, start, stop, step=1, name: str = "loop", scalar: bool = False,
              masked: bool = False):
    """`for i in range(start, stop, step)`: a `carry_loop` without carried values, left to LLVM's
    vectorizer unless `scalar` (see SHORT_LOOP); `masked`: vectorized with masked iterations.
    Yields the induction variable."""
    with carry_loop(b, start, stop, [], name, step, scalar, masked) as state:
        yield state.iv


@contextlib.contextmanager
def if_then(b: ir.IRBuilder, pred, name: str = "if"):
    """`if pred:`; the builder is left after the conditional."""
    fn = b.block.function
    then = fn.append_basic_block(f"{name}.then")
    end = fn.append_basic_block(f"{name}.end")
    b.cbranch(pred, then, end)
    b.position_at_end(then)
    yield
    b.branch(end)
    b.position_at_end(end)


def gep(b: ir.IRBuilder, ptr, idx, ty: ir.Type, name: str = "", inbounds: bool = True):
    """Element `idx` of `ptr`; `inbounds=False` for an address that may lie outside the array
    (a masked load's vector that starts before it)."""
    return b.gep(ptr, [idx], source_etype=ty, inbounds=inbounds, name=name)


def load(b: ir.IRBuilder, ptr, idx, ty: ir.Type, name: str = ""):
    return b.load(gep(b, ptr, idx, ty), typ=ty, name=name)


def store(b: ir.IRBuilder, value, ptr, idx, ty: ir.Type):
    b.store(value, gep(b, ptr, idx, ty))


def freeze(b: ir.IRBuilder, value, name: str = ""):
    """LLVM's `freeze` of `value` (llvmlite's builder has none): the same value to every
    computation, and an operand instruction selection does not look through."""
    instr = ir.instructions.Instruction(b.block, value.type, "freeze", [value], name=name)
    b._insert(instr)
    return instr


def vload(b: ir.IRBuilder, ptr, idx, vty: ir.VectorType, name: str = ""):
    """Unaligned vector load of `vty` at element `idx` of `ptr` (elements of vty.element)."""
    p = gep(b, ptr, idx, vty.element)
    return b.load(p, typ=vty, align=_elem_align(vty), name=name)


def vstore(b: ir.IRBuilder, value, ptr, idx):
    vty = value.type
    p = gep(b, ptr, idx, vty.element)
    b.store(value, p, align=_elem_align(vty))


def _elem_align(vty: ir.VectorType) -> int:
    """Vector accesses are only element-aligned: buffers come from numpy."""
    return {F64: 8, I64: 8, I8: 1}.get(vty.element, 4)


def splat(b: ir.IRBuilder, scalar, n: int):
    """A vector of `n` copies of `scalar`."""
    vty = ir.VectorType(scalar.type, n)
    if isinstance(scalar, ir.Constant):
        return ir.Constant(vty, [scalar.constant] * n)
    undef = ir.Constant(vty, ir.Undefined)
    v = b.insert_element(undef, scalar, i32(0))
    return b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(I32, n), [0] * n))


def intrinsic(module: ir.Module, name: str, ret: ir.Type, args) -> ir.Function:
    """Declare (once) an LLVM intrinsic by its full mangled name, e.g. "llvm.fma.v16f32"."""
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, list(args)), name)
    return fn


def type_suffix(ty: ir.Type) -> str:
    """Intrinsic name suffix of a scalar or vector float type: f32, f64, v16f32, ..."""
    if isinstance(ty, ir.VectorType):
        return f"v{ty.count}{type_suffix(ty.element)}"
    return {F32: "f32", F64: "f64"}[ty] if ty in (F32, F64) else str(ty)


def fma(b: ir.IRBuilder, a, x, c):
    """a * x + c with one rounding (vector or scalar float)."""
    ty = a.type
    f = intrinsic(b.module, f"llvm.fma.{type_suffix(ty)}", ty, [ty, ty, ty])
    return b.call(f, [a, x, c])


def prefetch(b: ir.IRBuilder, ptr):
    """Hint the cache line at `ptr` into L1 for reading (never faults: any address)."""
    f = intrinsic(b.module, "llvm.prefetch.p0", VOID, [PTR, I32, I32, I32])
    b.call(f, [ptr, i32(0), i32(3), i32(1)])


def masked_load(b: ir.IRBuilder, ptr, idx, vty: ir.VectorType, mask, passthru=None,
                inbounds: bool = True):
    p = gep(b, ptr, idx, vty.element, inbounds=inbounds)
    mty = ir.VectorType(I1, vty.count)
    f = intrinsic(b.module, f"llvm.masked.load.{type_suffix(vty)}.p0", vty, [PTR, I32, mty, vty])
    if passthru is None:
        passthru = ir.Constant(vty, [0.0] * vty.count if vty.element in (F32, F64) else [0] * vty.count)
    return b.call(f, [p, i32(_elem_align(vty)), mask, passthru])


def masked_store(b: ir.IRBuilder, value, ptr, idx, mask):
    vty = value.type
    p = gep(b, ptr, idx, vty.element)
    mty = ir.VectorType(I1, vty.count)
    f = intrinsic(b.module, f"llvm.masked.store.{type_suffix(vty)}.p0", VOID, [vty, PTR, I32, mty])
    b.call(f, [value, p, i32(_elem_align(vty)), mask])

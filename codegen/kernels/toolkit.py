"""The emitting toolkit of the loop-nest kernels (matmul, convolutions, pooling): the kernel
function of the contract (kernels/__init__.py) and its epilogue, the one thread partitioner, the
one tail mask, shape-generic shared functions with typed parameter records, wide (masked) loads
and stores, zeroing, rounding and horizontal sums.

Shared functions: a kernel's loops live in a function `kind(ptr..., i64 params...)` defined once
per LLVM module for its compile-time constants (a frozen dataclass, the "key") and called by every
kernel of the module with an equal key, which passes its shapes as run-time i64 arguments. The
i64 parameters are a `Params` record (a keyword-only frozen dataclass, fields in signature order,
a nested record flattened in place): the same class generates the LLVM signature, the names the
body sees and the argument list of the call, so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import llvmlite.ir as ir

from .. import record
from ..loops import (F32, F64, FAST, I1, I8, I32, I64, PTR, VOID, for_range, i32, i64, intrinsic,
                     llvm_type, masked_store, splat, type_suffix, vec, vload, vstore)
from ..target import vector_width

# An i64 argument of a shared function: a compile-time int or a run-time i64 value.
I64Arg = Union[int, ir.Value, None]


# ------------------------------------------------------------------------------------------------
# the kernel function of the contract
# ------------------------------------------------------------------------------------------------
@record
class KernelFunction:
    """An emitted kernel function: builder, buffer arguments and the thread arguments."""
    b: ir.IRBuilder
    out: ir.Argument
    ins: list
    epi: list       # the epilogue's extra pointers (kernel wrappers only)
    scratch: ir.Argument
    tid: ir.Argument
    nthreads: ir.Argument
    epilogue: object = None   # a codegen.fused.Epilogue or None

    def epilogue_rows(self, start, count):
        """Run the instruction's epilogue (if any) over out[start, start + count) (i64 values),
        a block of out that is final."""
        if self.epilogue is not None:
            self.epilogue.call(self.b, self.out, self.epi, start, count)


def kernel_function(module: ir.Module, name: str, n_inputs: int, epilogue=None) -> KernelFunction:
    """Define the contract's `void name(ptr out, ptr in0.., [ptr epi0..], ptr scratch, i64 tid,
    i64 nthreads)`; the builder is left in the entry block. Buffers never alias: `noalias`."""
    n_epi = epilogue.n_args if epilogue is not None else 0
    n_ptr = 1 + n_inputs + n_epi + 1
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * n_ptr + [I64, I64]), name)
    fn.attributes.add("nounwind")
    names = (["out"] + [f"in{k}" for k in range(n_inputs)] + [f"epi{k}" for k in range(n_epi)]
             + ["scratch", "tid", "nthreads"])
    for arg, an in zip(fn.args, names):
        arg.name = an
    for arg in fn.args[:n_ptr]:
        arg.add_attribute("noalias")
    a = fn.args
    b = ir.IRBuilder(fn.append_basic_block(f"{name}.entry"))
    return KernelFunction(b, a[0], list(a[1:1 + n_inputs]), list(a[1 + n_inputs:n_ptr - 1]),
                          a[n_ptr - 1], a[n_ptr], a[n_ptr + 1], epilogue)


def thread_range(b: ir.IRBuilder, total, tid, nthreads):
    """[t0, t1): share tid's contiguous part of `total` work items, floor(tid * total /
    nthreads) to floor((tid + 1) * total / nthreads): the shares tile the range, and differ in
    size by at most one. The one partitioner of the kernels (0 <= tid < nthreads, unsigned).
    Under the thread pool a share is a chunk (tid = chunk, nthreads = chunks, more than the
    threads: codegen/parallel.py), so a kernel partitioned here is split any way the pool
    chooses; its result must not depend on the split."""
    t = i64(total) if isinstance(total, int) else total
    t0 = b.udiv(b.mul(tid, t), nthreads, name="work.begin")
    t1 = b.udiv(b.mul(b.add(tid, i64(1)), t), nthreads, name="work.end")
    return t0, t1


# ------------------------------------------------------------------------------------------------
# shared functions and their parameter records
# ------------------------------------------------------------------------------------------------
class Params:
    """Base of the parameter records of shared functions: subclass as
    `@dataclass(frozen=True, kw_only=True)`; every field is an i64 argument (an `I64Arg`) or a
    nested record, whose fields take its place in the signature."""

    @classmethod
    def param_names(cls) -> tuple:
        """The flat parameter names, in signature order."""
        out = []
        for f in dataclasses.fields(cls):
            sub = _record_type(f)
            out.extend(sub.param_names() if sub is not None else [f.name])
        return tuple(out)

    @classmethod
    def from_args(cls, args: list):
        """The record whose fields are the given values (in `param_names()` order)."""
        args = iter(args)
        return cls._take(args)

    @classmethod
    def _take(cls, args):
        vals = {}
        for f in dataclasses.fields(cls):
            sub = _record_type(f)
            vals[f.name] = sub._take(args) if sub is not None else next(args)
        return cls(**vals)

    def as_args(self) -> list:
        """The values, in `param_names()` order."""
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Params):
                out.extend(v.as_args())
            elif v is None:
                raise ValueError(f"{type(self).__name__}.{f.name} is not set")
            else:
                out.append(i64(int(v)) if isinstance(v, (int, bool)) else v)
        return out


def _record_type(f: dataclasses.Field):
    """The Params subclass of a nested-record field, else None."""
    t = f.type
    if isinstance(t, str):   # postponed annotations: records name their nested type directly
        t = Params._registry.get(t)
    return t if isinstance(t, type) and issubclass(t, Params) else None


Params._registry = {}


def params(cls):
    """Class decorator: a keyword-only frozen dataclass record of shared-function parameters,
    usable as a nested field type (by name) of other records."""
    cls = record(frozen=True, kw_only=True)(cls)
    clash = [f.name for f in dataclasses.fields(cls) if hasattr(Params, f.name)]
    if clash:
        raise TypeError(f"{cls.__name__}: field {clash[0]!r} would hide a method of Params")
    Params._registry[cls.__name__] = cls
    return cls


class Shared:
    """Arguments of a shared function inside its body: `b`, `ptrs` (list), every flat parameter
    as an attribute, and each nested record as an attribute holding that record of arguments."""

    def __init__(self, b, ptrs, record: Params):
        self.b, self.ptrs = b, ptrs
        self._add(record)

    def _add(self, record: Params):
        for f in dataclasses.fields(record):
            v = getattr(record, f.name)
            if isinstance(v, Params):
                self._add(v)
            assert f.name not in self.__dict__, f"parameter {f.name!r} twice"
            setattr(self, f.name, v)


@record
class SharedFunction:
    """A shared function with its pointer count and parameter record type: `call` checks both."""
    fn: ir.Function
    n_ptrs: int
    params: type

    def call(self, b: ir.IRBuilder, ptrs, args: Params):
        if len(ptrs) != self.n_ptrs or type(args) is not self.params:
            raise TypeError(f"{self.fn.name} takes {self.n_ptrs} pointers and a "
                            f"{self.params.__name__}, got {len(ptrs)} and {type(args).__name__}")
        b.call(self.fn, list(ptrs) + args.as_args())


def shared_function(module: ir.Module, kind: str, static, n_ptrs: int, record: type,
                    body) -> SharedFunction:
    """The function `kind(ptr x n_ptrs, i64 x record.param_names())` for the compile-time
    constants `static` (a frozen dataclass), defined once per module by `body(Shared, static)`:
    loops over run-time shapes that every kernel of the module with equal `static` calls. The
    body sees no other constant, so kernels share a function exactly when their static parts
    are equal.
    `noinline`: inlined into each caller it would be compiled once per caller again."""
    key = f"tracejit.{kind}." + ".".join(
        f"{f.name}{int(v) if isinstance(v, bool) else v}"
        for f, v in ((f, getattr(static, f.name)) for f in dataclasses.fields(static)))
    fn = module.globals.get(key)
    if fn is not None:
        return SharedFunction(fn, n_ptrs, record)
    names = record.param_names()
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR] * n_ptrs + [I64] * len(names)), key)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    fn.attributes.add("nounwind")
    for arg in fn.args[:n_ptrs]:
        arg.add_attribute("noalias")
    for arg, pn in zip(fn.args[n_ptrs:], names):
        arg.name = pn
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    body(Shared(b, list(fn.args[:n_ptrs]), record.from_args(list(fn.args[n_ptrs:]))), static)
    b.ret_void()
    return SharedFunction(fn, n_ptrs, record)


@record(frozen=True)
class DtypeKey:
    """The compile-time key of shared functions that depend on the dtype only."""
    dtype: str


# ------------------------------------------------------------------------------------------------
# scalar and vector helpers
# ------------------------------------------------------------------------------------------------
def smin(b: ir.IRBuilder, v, hi, name: str = ""):
    """min(v, hi) for i64 values (hi an int or a value)."""
    hi = i64(hi) if isinstance(hi, int) else hi
    return b.select(b.icmp_signed("<", v, hi), v, hi, name=name)


def smax(b: ir.IRBuilder, v, lo, name: str = ""):
    lo = i64(lo) if isinstance(lo, int) else lo
    return b.select(b.icmp_signed(">", v, lo), v, lo, name=name)


def opaque(b: ir.IRBuilder, v):
    """`v`, hidden from LLVM's value analysis (an empty inline asm). Used on the offsets of the
    many loads of a loop body: it keeps them out of loop strength reduction (slow on them; x86
    addressing modes do that work anyway) and stops GVN from merging loads of different taps into
    long-lived registers."""
    return b.asm(ir.FunctionType(I64, [I64]), "", "=r,0", [v], False, name="opaque")


def hsum(b: ir.IRBuilder, v):
    """Sum of the lanes of vector `v` (a halving shuffle tree)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n))))
        hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                list(range(n, 2 * n))))
        v = b.fadd(lo, hi, flags=FAST)
    return b.extract_element(v, i32(0))


def lane_mask(b: ir.IRBuilder, remaining, vl: int):
    """<vl x i1> with lanes [0, remaining) set; `remaining` is an i64 value (any value: it is
    clamped to [0, vl] first, then compared in 32-bit lanes, as a <16 x i64> compare would take
    two registers). The one tail mask of the kernels."""
    lanes = ir.Constant(ir.VectorType(ir.IntType(32), vl), list(range(vl)))
    rem = b.trunc(smax(b, smin(b, remaining, vl), 0), ir.IntType(32))
    return b.icmp_signed("<", lanes, splat(b, rem, vl))


def rotate_lanes(b: ir.IRBuilder, v, shift):
    """`v` with its lanes moved up by `shift` (an i64 in [0, lanes)): lane l of the result is
    lane (l - shift) mod lanes of `v`. One variable permute of 32-bit pieces (vpermps; a double
    is two pieces), on a 256- or 512-bit vector."""
    n = v.type.count
    per = 2 if v.type.element == F64 else 1
    w = n * per
    name = {8: "llvm.x86.avx2.permps", 16: "llvm.x86.avx512.permvar.sf.512"}[w]
    fty, ity = ir.VectorType(F32, w), ir.VectorType(I32, w)
    fn = intrinsic(b.module, name, fty, [fty, ity])
    elem = ir.Constant(ity, [p // per for p in range(w)])
    piece = ir.Constant(ity, [p % per for p in range(w)])
    src = b.and_(b.sub(elem, splat(b, b.trunc(shift, I32), w)), splat(b, i32(n - 1), w))
    idx = b.add(b.mul(src, splat(b, i32(per), w)), piece)
    return b.bitcast(b.call(fn, [b.bitcast(v, fty), idx]), v.type)


def zero_vector(ety, vl: int):
    return ir.Constant(ir.VectorType(ety, vl), [0.0] * vl)


def dtype_info(dtype: str):
    """(LLVM element type, vector lanes, element bytes) for a float dtype."""
    bits = {"f32": 32, "f64": 64}[dtype]
    return llvm_type(dtype), vector_width(bits), bits // 8


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """The least multiple of b that is >= a."""
    return ceil_div(a, b) * b


# ------------------------------------------------------------------------------------------------
# zeroing, wide loads and stores
# ------------------------------------------------------------------------------------------------
def memset0(b: ir.IRBuilder, ptr, nbytes):
    """ptr[0:nbytes] = 0 bytes (llvm.memset; nbytes an int or an i64 value): for buffers of
    run-time size."""
    memset = intrinsic(b.module, "llvm.memset.p0.i64", ir.VoidType(),
                       [PTR, I8, I64, ir.IntType(1)])
    nbytes = i64(nbytes) if isinstance(nbytes, int) else nbytes
    b.call(memset, [ptr, ir.Constant(I8, 0), nbytes, ir.Constant(ir.IntType(1), 0)])


def zero_fill(b: ir.IRBuilder, ptr, n: int, ty: ir.Type, V: int, name: str):
    """ptr[0:n] = 0 for a compile-time n: full vector stores of V lanes and one masked tail."""
    zero = ir.Constant(vec(ty, V), [0.0] * V)
    full = n - n % V
    if full:
        with for_range(b, 0, full, V, name=f"{name}.zero") as k:
            vstore(b, zero, ptr, k)
    if n % V:
        masked_store(b, zero, ptr, i64(full), lane_mask(b, i64(n % V), V))


def _align(ty: ir.Type) -> ir.Constant:
    return i32(8 if ty == F64 else 4)


def wide_load(b: ir.IRBuilder, ptr, offset, vty: ir.VectorType, mask, passthru):
    """Masked load of vty at element `offset` of ptr. The address may lie outside the buffer
    (padding): the GEP is not `inbounds`, and masked-off lanes are never accessed. mask None:
    a plain load of all lanes (the caller knows they are inside the buffer): AVX2's masked
    loads (vmaskmovps) cost several plain ones, so loops take them only at borders and tails.

    A vector wider than one register is loaded one register at a time. As one masked load of
    two or more registers, LLVM 22's x86 back end without AVX-512 (vmaskmovps) may fold the
    lanes of a later register into an unmasked memory operand (`vperm2f128 $33, 32(...)`), which
    reads the masked-off lanes: max pooling then saw elements outside its windows."""
    if mask is None:
        return vload(b, ptr, offset, vty)
    lanes = _register_lanes(vty)
    if vty.count <= lanes or vty.count % lanes:
        return _masked_load(b, ptr, offset, vty, mask, passthru)
    out = passthru
    for k in range(0, vty.count, lanes):
        part = _masked_load(b, ptr, b.add(offset, ir.Constant(offset.type, k)),
                            ir.VectorType(vty.element, lanes), _mask_lanes(b, mask, k, lanes),
                            _lanes(b, passthru, k, lanes))
        # widen the part to the whole vector, then take its lanes k .. k+lanes into `out`
        wide = b.shuffle_vector(part, part, ir.Constant(ir.VectorType(I32, vty.count),
                                                        [i % lanes for i in range(vty.count)]))
        take = [vty.count + i if k <= i < k + lanes else i for i in range(vty.count)]
        out = b.shuffle_vector(out, wide, ir.Constant(ir.VectorType(I32, vty.count), take))
    return out


def _register_lanes(vty: ir.VectorType) -> int:
    """Lanes of `vty`'s element type in one vector register of the host."""
    el = vty.element
    return vector_width(el.width if isinstance(el, ir.IntType) else 64 if el == F64 else 32)


def _lanes(b: ir.IRBuilder, v, start: int, n: int):
    """Lanes start .. start+n of vector v."""
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(start, start + n))))


_ICMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def _mask_lanes(b: ir.IRBuilder, mask, start: int, n: int):
    """Lanes start .. start+n of an <N x i1> mask, taken from the operands of the integer
    compares and `and`/`or` it is built of where it can: LLVM's x86 back end turns a shuffle of
    an i1 vector into dozens of pack/unpack instructions, a compare of shuffled i32 lanes into
    one compare."""
    if isinstance(mask, ir.Constant) and isinstance(mask.constant, (list, tuple)):
        return ir.Constant(ir.VectorType(I1, n), [int(c.constant) for c in mask.constant[start:start + n]])
    if isinstance(mask, ir.ICMPInstr):
        x, y = (_lanes(b, o, start, n) for o in mask.operands)
        op = mask.op
        if op in ("eq", "ne"):
            return b.icmp_signed(_ICMP[op], x, y)
        cmp = b.icmp_unsigned if op[0] == "u" else b.icmp_signed
        return cmp(_ICMP[op[1:]], x, y)
    if isinstance(mask, ir.Instruction) and mask.opname in ("and", "or"):
        x, y = (_mask_lanes(b, o, start, n) for o in mask.operands)
        return b.and_(x, y) if mask.opname == "and" else b.or_(x, y)
    return _lanes(b, mask, start, n)


def _masked_load(b: ir.IRBuilder, ptr, offset, vty: ir.VectorType, mask, passthru):
    p = b.gep(ptr, [offset], source_etype=vty.element, inbounds=False)
    mty = ir.VectorType(I1, vty.count)
    f = intrinsic(b.module, f"llvm.masked.load.{type_suffix(vty)}.p0", vty, [PTR, I32, mty, vty])
    return b.call(f, [p, _align(vty.element), mask, passthru])


def wide_store(b: ir.IRBuilder, value, ptr, offset, mask):
    """Masked store of `value` at element `offset` of ptr (see `wide_load`), one register at a
    time like `wide_load`; mask None: a plain store of all lanes."""
    if mask is None:
        vstore(b, value, ptr, offset)
        return
    lanes = _register_lanes(value.type)
    if value.type.count > lanes and value.type.count % lanes == 0:
        for k in range(0, value.type.count, lanes):
            _masked_store(b, _lanes(b, value, k, lanes), ptr,
                          b.add(offset, ir.Constant(offset.type, k)),
                          _mask_lanes(b, mask, k, lanes))
        return
    _masked_store(b, value, ptr, offset, mask)


def _masked_store(b: ir.IRBuilder, value, ptr, offset, mask):
    p = b.gep(ptr, [offset], source_etype=value.type.element, inbounds=False)
    vty = value.type
    mty = ir.VectorType(I1, vty.count)
    f = intrinsic(b.module, f"llvm.masked.store.{type_suffix(vty)}.p0", VOID, [vty, PTR, I32, mty])
    b.call(f, [value, p, _align(vty.element), mask])

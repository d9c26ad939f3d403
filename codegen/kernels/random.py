"""Kernels of the random primitives (see ir/prims/random.py for their meaning, the Threefry-2x32
constants and the numpy reference).

Every element's value depends only on the key and its flat index, so the threads simply share the
flat range (toolkit.thread_range) and any split gives the same bits. A thread computes V elements
at a time (V = the 32-bit lanes of one vector register: 8 with AVX2): the counters of V
consecutive indices are one <V x i32> pair and the 20 Threefry rounds are vector adds, xors and
rotates (shift left | shift right: AVX2 has no vector rotate, LLVM matches the pair). The last
partial vector of a thread's range is computed in full and stored through a lane mask.
random_blocks stores both words of each block, interleaved (row i = (x0, x1) of counter i): its
work items are blocks, two output words each.
"""
from __future__ import annotations

import llvmlite.ir as ir

from ...ir.prims.random import (PARITY, ROTATIONS, ROUNDS, random_bits_p, random_blocks_p,
                             random_uniform_p)

from ..loops import F32, F64, I32, I64, for_range, i64, if_then, load, splat, vec, vstore
from ..target import vector_width
from . import POOL_WEIGHT, register
from .toolkit import kernel_function, lane_mask, thread_range, wide_store


def _const_vec(ty, value, n: int):
    return ir.Constant(vec(ty, n), [value] * n)


def _rotl(b: ir.IRBuilder, x, r: int, V: int):
    left = b.shl(x, _const_vec(I32, r, V))
    return b.or_(left, b.lshr(x, _const_vec(I32, 32 - r, V)), name=f"rotl{r}")


def _threefry(b: ir.IRBuilder, ks, x0, x1, V: int):
    """The block function on vectors: (x0, x1) encrypted under the key schedule `ks` (three
    <V x i32> splats); the same steps as ir.prims.random.threefry2x32."""
    x0 = b.add(x0, ks[0])
    x1 = b.add(x1, ks[1])
    for r in range(ROUNDS):
        x0 = b.add(x0, x1)
        x1 = b.xor(_rotl(b, x1, ROTATIONS[r % 8], V), x0)
        if r % 4 == 3:
            n = r // 4 + 1
            x0 = b.add(x0, ks[n % 3])
            x1 = b.add(b.add(x1, ks[(n + 1) % 3]), _const_vec(I32, n, V), name=f"inject{n}")
    return x0, x1


def _values(b: ir.IRBuilder, ks, start, V: int, form: str):
    """The V results of elements start .. start+V-1 (start an i64 value): u32 bits x0 ^ x1, or
    uniform floats built from the top mantissa bits."""
    idx = b.add(splat(b, start, V), ir.Constant(vec(I64, V), list(range(V))), name="counter")
    lo = b.trunc(idx, vec(I32, V))
    hi = b.trunc(b.lshr(idx, _const_vec(I64, 32, V)), vec(I32, V))
    x0, x1 = _threefry(b, ks, hi, lo, V)
    if form == "pair":
        order = [k // 2 + (k % 2) * V for k in range(2 * V)]
        return b.shuffle_vector(x0, x1, ir.Constant(vec(I32, 2 * V), order), name="blocks")
    if form == "u32":
        return b.xor(x0, x1, name="bits")
    if form == "f32":
        mant = b.or_(b.lshr(b.xor(x0, x1), _const_vec(I32, 9, V)), _const_vec(I32, 0x3F800000, V))
        return b.fsub(b.bitcast(mant, vec(F32, V)), _const_vec(F32, 1.0, V), name="uniform")
    wide = b.or_(b.shl(b.zext(x0, vec(I64, V)), _const_vec(I64, 32, V)), b.zext(x1, vec(I64, V)))
    mant = b.or_(b.lshr(wide, _const_vec(I64, 12, V)), _const_vec(I64, 0x3FF0000000000000, V))
    return b.fsub(b.bitcast(mant, vec(F64, V)), _const_vec(F64, 1.0, V), name="uniform")


def _lower_random(module, name, ins, form: str):
    f = kernel_function(module, name, 1)
    b = f.b
    V = vector_width(32)
    k0 = load(b, f.ins[0], i64(0), I32, name="key0")
    k1 = load(b, f.ins[0], i64(1), I32, name="key1")
    k2 = b.xor(b.xor(k0, k1), ir.Constant(I32, PARITY), name="key.parity")
    ks = [splat(b, k, V) for k in (k0, k1, k2)]
    words = 2 if form == "pair" else 1     # output elements per work item (block)
    begin, end = thread_range(b, ins.out.type.size // words, f.tid, f.nthreads)
    n = b.sub(end, begin)
    full_end = b.sub(end, b.urem(n, i64(V)), name="full.end")
    with for_range(b, begin, full_end, V, name="random", scalar=True) as i:
        vstore(b, _values(b, ks, i, V, form), f.out, b.mul(i, i64(words)))
    with if_then(b, b.icmp_unsigned("<", full_end, end), name="random.tail"):
        vals = _values(b, ks, full_end, V, form)
        rest = b.mul(b.sub(end, full_end), i64(words))
        wide_store(b, vals, f.out, b.mul(full_end, i64(words)), lane_mask(b, rest, words * V))
    b.ret_void()


def _random_cost(ins) -> float:
    """Single-thread nanoseconds: about 6 per element (20 Threefry rounds on 8 lanes)."""
    return 6.0 * ins.out.type.size


# a short loop nest, compiled about as fast as a pooling kernel
@register(random_bits_p, epilogue=False, parallel=True, cost=_random_cost,
          compile_weight=POOL_WEIGHT)
def _random_bits_lower(module, name, ins):
    _lower_random(module, name, ins, "u32")


@register(random_uniform_p, epilogue=False, parallel=True, cost=_random_cost,
          compile_weight=POOL_WEIGHT)
def _random_uniform_lower(module, name, ins):
    _lower_random(module, name, ins, ins.params["dtype"])


@register(random_blocks_p, epilogue=False, parallel=True, cost=_random_cost,
          compile_weight=POOL_WEIGHT)
def _random_blocks_lower(module, name, ins):
    _lower_random(module, name, ins, "pair")

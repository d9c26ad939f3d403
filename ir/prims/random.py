"""Counter-based random numbers: Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror and Shaw,
"Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011; the generator JAX uses).

    random_bits(key: u32[2]) -> u32[shape]                 {shape}
    random_uniform(key: u32[2]) -> f32[shape] | f64[shape]  {shape, dtype}: in [0, 1)
    random_blocks(key: u32[2]) -> u32[n, 2]                 {n}: row i is the block (x0, x1)
        of counter i itself; tracejit.random.split's keys, as JAX's partitionable split

Element i (the flat row-major index) of either result depends only on the key and i: it is made
from the block (x0, x1) = threefry2x32(key, (hi32(i), lo32(i))), as JAX's partitionable
Threefry does (`jax_threefry_partitionable`): 32 bits are x0 ^ x1, 64 bits (x0 << 32) | x1. So the
values do not depend on how the code generator splits the elements among threads or vectors,
and a prefix of a larger draw is not a different draw.

Uniform floats are built from the top mantissa bits exactly, as JAX does: the bits shifted right
by 32 - 23 (f32) or 64 - 52 (f64), or-ed with the bit pattern of 1.0, are a float in [1, 2);
minus 1.0 (exact) gives [0, 1) on a grid of 2**-23 (2**-52). Everything is integer arithmetic and
one exact subtraction, so the native kernel and this numpy reference agree bit for bit.

Neither primitive is differentiable: the only operand is an integer key. The adjoint rules return
None (the adjoint pass never calls them, since no float value flows in; they exist so that the
"every primitive has its rules" property holds).
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..core import FLOAT_DTYPES, ShapeError, TensorType, Value, primitive, shape_rules
from ..interpreter import impls
from ..jvp_rules import jvp_rules

# "nn": each has its own loop nest (codegen/kernels/random.py), not a fused elementwise loop
random_bits_p = primitive("random_bits", "nn")
random_uniform_p = primitive("random_uniform", "nn")
random_blocks_p = primitive("random_blocks", "nn")

# Threefry-2x32 (Salmon et al. 2011, table 4 and section 3.3): the rotation distances of the 8
# rounds of one cycle, and the key-schedule parity constant of Skein (C240).
ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
PARITY = 0x1BD11BDA
ROUNDS = 20
KEY_TYPE = TensorType("u32", (2,))


def key_schedule(k0: int, k1: int):
    """The three key words the rounds inject (Threefish's extended key)."""
    return (k0, k1, (k0 ^ k1 ^ PARITY) & 0xFFFFFFFF)


def threefry2x32(key, x0, x1):
    """numpy reference of the block function: (x0, x1) uint32 arrays encrypted under `key` (two
    uint32 words); returns the pair of uint32 arrays. A key injection follows every 4 rounds:
    after injection n, word 0 gains ks[n % 3] and word 1 gains ks[(n + 1) % 3] + n."""
    ks = [np.uint32(k) for k in key_schedule(int(key[0]), int(key[1]))]
    x0 = np.asarray(x0, dtype=np.uint32) + ks[0]
    x1 = np.asarray(x1, dtype=np.uint32) + ks[1]
    for r in range(ROUNDS):
        rot = ROTATIONS[r % 8]
        x0 = x0 + x1
        x1 = ((x1 << np.uint32(rot)) | (x1 >> np.uint32(32 - rot))) ^ x0
        if r % 4 == 3:
            n = r // 4 + 1
            x0 = x0 + ks[n % 3]
            x1 = x1 + ks[(n + 1) % 3] + np.uint32(n)
    return x0, x1


def _blocks(key, size: int):
    """The Threefry blocks of elements 0 .. size-1 (counter (hi32(i), lo32(i)))."""
    i = np.arange(size, dtype=np.uint64)
    return threefry2x32(key, (i >> np.uint64(32)).astype(np.uint32),
                        (i & np.uint64(0xFFFFFFFF)).astype(np.uint32))


def blocks_reference(key, n: int) -> np.ndarray:
    return np.stack(_blocks(key, n), axis=1)


def bits_reference(key, shape) -> np.ndarray:
    x0, x1 = _blocks(key, int(np.prod(shape, dtype=np.int64)))
    return (x0 ^ x1).reshape(shape)


def uniform_reference(key, shape, dtype: str) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    x0, x1 = _blocks(key, size)
    if dtype == "f32":
        mant = ((x0 ^ x1) >> np.uint32(9)) | np.uint32(0x3F800000)
        out = mant.view(np.float32) - np.float32(1.0)
    else:
        bits = (x0.astype(np.uint64) << np.uint64(32)) | x1.astype(np.uint64)
        mant = (bits >> np.uint64(12)) | np.uint64(0x3FF0000000000000)
        out = mant.view(np.float64) - 1.0
    return out.reshape(shape)


# --------------------------------------------------------------------------- shape rules
def _check_key(what, key: TensorType, shape):
    if key != KEY_TYPE:
        raise ShapeError(f"{what}: the key must be {KEY_TYPE} (tracejit.random.key), got {key}")
    if any(int(d) < 0 for d in shape):
        raise ShapeError(f"{what}: negative dimension in shape {tuple(shape)}")


@shape_rules.register(random_bits_p)
def _random_bits_shape(key, *, shape):
    _check_key("random_bits", key, shape)
    return TensorType("u32", shape)


@shape_rules.register(random_uniform_p)
def _random_uniform_shape(key, *, shape, dtype):
    _check_key("random_uniform", key, shape)
    if dtype not in FLOAT_DTYPES:
        raise ShapeError(f"random_uniform: dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return TensorType(dtype, shape)


@shape_rules.register(random_blocks_p)
def _random_blocks_shape(key, *, n):
    _check_key("random_blocks", key, (n,))
    return TensorType("u32", (n, 2))


# --------------------------------------------------------------------------- numpy reference
impls[random_blocks_p] = lambda key, *, n: blocks_reference(key, n)
impls[random_bits_p] = lambda key, *, shape: bits_reference(key, shape)
impls[random_uniform_p] = lambda key, *, shape, dtype: uniform_reference(key, shape, dtype)


# --------------------------------------------------------------------------- emitters
def random_bits(key: Value, shape) -> Value:
    return emit(random_bits_p, key, shape=tuple(int(d) for d in shape))


def random_uniform(key: Value, shape, dtype: str) -> Value:
    return emit(random_uniform_p, key, shape=tuple(int(d) for d in shape), dtype=dtype)


def random_blocks(key: Value, n: int) -> Value:
    return emit(random_blocks_p, key, n=int(n))


# --------------------------------------------------------------------------- derivative rules
# The key is an integer: no cotangent flows into it and no tangent out of it.
for _p in (random_bits_p, random_uniform_p, random_blocks_p):
    adjoint_rules[_p] = lambda ct, key, **params: (None,)
    jvp_rules[_p] = lambda ts, tans, out, key, **params: None

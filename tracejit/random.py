"""Counter-based random numbers, generated inside the compiled code (tracejit.random).

    key = tracejit.random.key(0)                 # uint32[2]
    k1, k2 = tracejit.random.split(key)          # uint32[2, 2]
    x = tracejit.random.normal(k1, (64, 10))     # float32

The generator is Threefry-2x32 with 20 rounds, JAX's (ir/prims/random.py has the constants and
the paper). A key is a plain uint32 array of shape [2]; passed to a jitted function it is a traced
argument, so a new key never traces again. Element i of a draw depends only on the key and i, so
values are identical in the native code (with any number of threads), the reference interpreter
and eager calls (outside a trace, where these functions return numpy arrays):
- `bits`, `uniform` with the default bounds, `bernoulli` and `split` agree bit for bit;
- `uniform` with other bounds scales in float arithmetic that the native code may contract into
  one fused multiply-add: at most 1 ulp apart;
- `normal` uses log, sqrt and cos (Box-Muller), which the native code evaluates with its own
  vector math functions: a few ulp apart (see tests/test_random.py).

As in JAX, reusing a key gives the same numbers: split it for every independent draw.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .ir import lax
from .ir.core import TensorType

from . import ops
from .ops import op
from .tracer import Tracer
from .values import to_value, wrap

_KEY = TensorType("u32", (2,))


def key(seed) -> np.ndarray:
    """The key of integer `seed`: uint32 [seed >> 32, seed & 0xFFFFFFFF] (seed taken modulo 2**64,
    so -1 is [0xFFFFFFFF, 0xFFFFFFFF]), JAX's `random.PRNGKey` for 64-bit seeds."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"random.key: seed must be a Python or numpy integer, got "
                        f"{type(seed).__name__} {seed!r}")
    s = int(seed) % 2 ** 64
    return np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)


def _key_value(k, what: str):
    """The IR value of key argument `k`, checked: a uint32 array of shape [2], traced or not."""
    if isinstance(k, Tracer):
        t = k.value.type
        if t != _KEY:
            raise TypeError(f"{what}: key must be a uint32 array of shape [2] "
                            f"(tracejit.random.key(seed)), got a traced {t}")
        return to_value(k)
    if not isinstance(k, np.ndarray):
        raise TypeError(f"{what}: key must be a uint32 array of shape [2] "
                        f"(tracejit.random.key(seed)), got {type(k).__name__}")
    if k.dtype != np.uint32:
        raise TypeError(f"{what}: key must be a uint32 array of shape [2] "
                        f"(tracejit.random.key(seed)), got dtype {k.dtype}")
    if k.shape != (2,):
        raise ValueError(f"{what}: key must be a uint32 array of shape [2], got shape "
                         f"{list(k.shape)}")
    return lax.literal(k)


def _shape(shape, what: str) -> tuple:
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        dims = None
    if dims is None or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                               and d >= 0 for d in dims):
        raise ValueError(f"{what}: shape must be a non-negative int or a tuple of non-negative "
                         f"ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def _float_dtype(dtype, what: str) -> str:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt == np.float32:
        return "f32"
    if dt == np.float64:
        return "f64"
    raise TypeError(f"{what}: dtype must be float32 or float64, got {dtype!r}")


def uniform01(k, shape, dt: str, what: str):
    """Uniform [0, 1) of IR dtype `dt` as a Value."""
    return lax.random_uniform(_key_value(k, what), _shape(shape, what), dt)


@op("random.bits")
def bits(key, shape=()):
    """uint32 random bits of `shape`."""
    return wrap(lax.random_bits(_key_value(key, "random.bits"), _shape(shape, "random.bits")))


@op("random.split")
def split(key, num=2):
    """`num` new keys, uint32 [num, 2]: key i is the Threefry block of counter i under `key` (as
    JAX's partitionable split), independent of each other for all practical purposes."""
    if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 1:
        raise ValueError(f"random.split: num must be a positive int, got {num!r}")
    return wrap(lax.random_blocks(_key_value(key, "random.split"), int(num)))


@op("random.uniform")
def uniform(key, shape=(), dtype=np.float32, minval=0.0, maxval=1.0):
    """Uniform floats in [minval, maxval) (from 23 or 52 random mantissa bits; as in JAX,
    rounding may give maxval itself when the bounds are not 0 and 1)."""
    dt = _float_dtype(dtype, "random.uniform")
    u = wrap(uniform01(key, shape, dt, "random.uniform"))
    numbers_only = isinstance(minval, numbers.Real) and isinstance(maxval, numbers.Real)
    if numbers_only and float(minval) == 0.0 and float(maxval) == 1.0:
        return u
    # Python bounds stay weak (the span in double precision); arrays broadcast as in numpy
    span = float(maxval) - float(minval) if numbers_only else ops.subtract(maxval, minval)
    return ops.maximum(ops.add(ops.multiply(u, span), minval), minval)


@op("random.normal")
def normal(key, shape=(), dtype=np.float32):
    """Standard normal floats (Box-Muller: sqrt(-2 log(1 - u1)) * cos(2 pi u2) from two uniform
    draws; 1 - u1 lies in (0, 1], so the log is finite). With float32 the largest magnitude is
    sqrt(2 * 23 * ln 2) ~ 5.6."""
    dt = _float_dtype(dtype, "random.normal")
    shape = _shape(shape, "random.normal")
    u = wrap(uniform01(key, (2,) + shape, dt, "random.normal"))
    u1, u2 = u[0], u[1]
    radius = ops.sqrt(ops.multiply(ops.log(ops.subtract(1.0, u1)), -2.0))
    return ops.multiply(radius, ops.cos(ops.multiply(u2, 2 * math.pi)))


def check_probability(p, what: str, param: str = "p"):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{what}: {param} must be a number in [0, 1], got {p!r}")
    return float(p)


@op("random.bernoulli")
def bernoulli(key, p=0.5, shape=None):
    """bool array of `shape` (default: p's shape), True with probability p: uniform < p."""
    if isinstance(p, Tracer) or isinstance(p, np.ndarray) and p.ndim:
        arr_shape = ops.shape_of(p)
        shape = arr_shape if shape is None else _shape(shape, "random.bernoulli")
        dt = ops.result_dtype(p)
        return ops.less(wrap(uniform01(key, shape, dt, "random.bernoulli")), p)
    p = check_probability(p, "random.bernoulli")
    shape = () if shape is None else shape
    return ops.less(wrap(uniform01(key, shape, "f32", "random.bernoulli")), p)

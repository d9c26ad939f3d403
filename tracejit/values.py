"""Python values to IR values and back: one place for how numbers, arrays and tracers become
operands of the IR and in which float dtype an op computes.

Type rules: traced values and numpy arrays have strong dtypes (float32 with float64 gives float64);
Python numbers are weak and take the other operand's dtype. Inside a trace, numpy constants are weak
too, so a captured float64 table does not turn a float32 model into float64. The rules hold for
every operand of an op, also those given in a list (`stack([x, 0.1])` is float64 for float64 `x`).
Bool operands of arithmetic become 0/1 of the other operand's dtype. A traced bool value that is
the only operand (a reduction of a mask, `(w > 0).sum()`, `mean`, `reshape`, ...) becomes 0/1 of
the float dtype it was computed from: float64 if any float value its comparisons read was float64,
else float32 (also for bool constants, and outside a trace, where numpy bool arrays have no such
origin). Counts are exact up to 2**24 in float32 and 2**53 in float64.
"""
from __future__ import annotations

import builtins
import numbers

import numpy as np

from .ir import builder as irb
from .ir import lax
from .ir.core import Value

from . import captures
from .tracer import Tracer


def to_value(x, like: Value | None = None) -> Value:
    """The IR value for `x` in the current builder: a tracer's value (captured as a parameter when
    it belongs to an enclosing trace), or a constant for numbers and arrays. Constants take `like`'s
    float dtype (they are weakly typed, like Python scalars)."""
    b = irb.current()
    if isinstance(x, Tracer):
        if x.builder is b:
            return x.value
        return capture(b, x)
    from .ir import lax
    captures.note_constant(x)
    arr = np.asarray(x)
    if arr.dtype == object:
        return _object_array_value(arr, like)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"cannot use a {type(x).__name__} ({arr.dtype}) as an array operand")
    if like is not None and like.dtype in ("f32", "f64") and arr.dtype.kind in "fiub":
        arr = arr.astype(like.type.np_dtype)
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.ndim == 0:
        return lax.full(arr.item(), (), "bool" if arr.dtype == np.bool_ else
                        ("f64" if arr.dtype == np.float64 else "f32"))
    return lax.literal(arr)


def _is_object_array(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == object


def _object_array_value(arr: np.ndarray, like: Value | None, dtype: str | None = None) -> Value:
    """An object array of tracers and numbers (what numpy builds from traced elements, e.g.
    `o = np.empty(2, object); o[0] = a`) as one Value: its elements stacked, of shape
    arr.shape + their common (broadcast) shape, in their common float dtype (`dtype` if given)."""
    from .ir import lax
    items = list(arr.flat)
    if not items:
        raise TypeError("cannot use an empty object array as an array operand")
    for t in items:
        if not isinstance(t, (Tracer, numbers.Number, np.generic, np.ndarray)):
            raise TypeError(f"cannot use an object array holding a {type(t).__name__} as an "
                            f"array operand")
    dt = dtype or (like.dtype if like is not None and like.dtype in ("f32", "f64")
                   else result_dtype(*items))
    vals = [as_value(t, dt) for t in items]
    shape = tuple(np.broadcast_shapes(*[v.shape for v in vals]))
    vals = [v if v.shape == shape else lax.broadcast_to(v, shape) for v in vals]
    flat = lax.concatenate([lax.reshape(v, (1,) + shape) for v in vals], 0)
    return lax.reshape(flat, arr.shape + shape)


def capture(b, t: Tracer) -> Value:
    """Closure conversion: a tracer of an enclosing trace becomes a parameter of builder `b`."""
    key = id(t.value)
    hit = b.captured.get(key)
    if hit is None:
        p = b.add_param(t.value.type, f"captured{len(b.captured)}")
        b.captured[key] = (t, p)
        return p
    return hit[1]


def wrap(v: Value) -> Tracer:
    return Tracer(v, irb.current())


def _is_weak(x) -> bool:
    return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, np.ndarray)


def float_dtype(dt) -> str:
    dt = np.dtype(dt)
    return "f64" if dt == np.float64 else "f32"


def _check_no_nested_tracers(x):
    """A list or tuple of traced values is not an array operand (numpy would stack it; np.asarray
    would fail on the tracers with a misleading message)."""
    if isinstance(x, (list, tuple)) and builtins.any(isinstance(v, Tracer) for v in _flat(x)):
        raise TypeError(f"cannot use a {type(x).__name__} of traced values as an array operand; "
                        f"combine them with tracejit.stack or tracejit.concatenate")


def _flat(x):
    for v in x:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def result_dtype(*xs) -> str:
    """The float dtype an op computes in for operands `xs` (the rules of the module docstring)."""
    tracers = [x for x in xs if isinstance(x, Tracer)] + \
        [t for x in xs if _is_object_array(x) for t in x.flat if isinstance(t, Tracer)]
    strong = [x.value.dtype for x in tracers if x.value.dtype in ("f32", "f64")]
    for x in xs:
        _check_no_nested_tracers(x)
    if not tracers:
        strong = [float_dtype(np.asarray(x).dtype) for x in xs
                  if not _is_weak(x) and np.asarray(x).dtype.kind == "f"]
    elif not strong:
        strong = [_bool_origin_dtype(x.value) for x in tracers if x.value.dtype == "bool"]
    if not strong:
        return "f32"
    return "f64" if "f64" in strong else "f32"


def _bool_origin_dtype(v: Value) -> str:
    """The float dtype a traced bool value was computed from: "f64" if any float value read by
    the instructions that produced it (comparisons, logical ops, layout ops on bools) is f64."""
    seen, todo, found = set(), [v], set()
    while todo:
        u = todo.pop()
        if id(u) in seen or u.instr is None:
            continue
        seen.add(id(u))
        for w in u.instr.inputs:
            if w.dtype == "bool":
                todo.append(w)
            else:
                found.add(w.dtype)
    return "f64" if "f64" in found else "f32"


def promote(*xs) -> list[Value]:
    """The operands `xs` (tracers, arrays, numbers) as Values of their common float dtype."""
    dt = result_dtype(*xs)
    return [as_value(x, dt) for x in xs]


def as_value(x, dtype: str) -> Value:
    """`x` as a Value of float dtype `dtype` (bool masks become 0/1)."""
    if isinstance(x, Tracer):
        v = to_value(x)
    else:
        _check_no_nested_tracers(x)
        arr = np.asarray(x)
        if arr.dtype == object:
            return lax.convert(_object_array_value(arr, None, dtype), dtype)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"cannot use a {type(x).__name__} of dtype {arr.dtype} in an array "
                            f"operation")
        v = to_value(arr.astype(np.float64 if dtype == "f64" else np.float32))
    return lax.convert(v, dtype)


def as_bool_value(x) -> Value:
    """`x` as a bool Value (numbers and float values are true where nonzero)."""
    v = to_value(x) if isinstance(x, Tracer) else to_value(np.asarray(x, dtype=bool))
    return v if v.dtype == "bool" else lax.ne(v, 0.0)

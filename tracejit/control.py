"""Structured loops with JAX's semantics: `scan`, `fori_loop` and `while_loop`.

Inside a trace, each traces its body function once into a nested IR function and emits one loop
instruction (ir/prims/control.py), so the compiled code holds one native loop whose size does not
depend on the trip count. Outside a trace (numpy inputs), each runs as a Python loop with the
same results. Carries, xs and ys are pytrees (dicts, lists, tuples) of arrays; Python numbers in a
carry are arrays too (float32 unless the body makes them float64, int32, bool).
"""
from __future__ import annotations

import numbers

import numpy as np

from .ir import builder as irb
from .ir import lax
from .ir.builder import Builder, building
from .ir.core import TensorType, dtype_of_numpy
from .ir.prims import control as _control

from .tracer import Tracer
from .values import as_bool_value, to_value

__all__ = ["scan", "fori_loop", "while_loop"]


# ------------------------------------------------------------------------------------------------
# pytrees of a loop: dicts, lists, tuples; every other value (None included) is a leaf
# ------------------------------------------------------------------------------------------------
def _flatten(tree, path: str):
    """(leaves, paths, rebuild): rebuild(new_leaves) is `tree` with its leaves replaced."""
    leaves, paths = [], []

    def go(o, p):
        if isinstance(o, dict):
            keys = list(o)
            subs = [go(o[k], f"{p}[{k!r}]") for k in keys]
            return lambda it: {k: s(it) for k, s in zip(keys, subs)}
        if isinstance(o, (list, tuple)):
            subs = [go(v, f"{p}[{i}]") for i, v in enumerate(o)]
            kind = type(o) if type(o) in (list, tuple) else (list if isinstance(o, list) else tuple)
            return lambda it: kind(s(it) for s in subs)
        if o is None:
            return lambda it: None
        leaves.append(o)
        paths.append(p)
        return lambda it: next(it)

    build = go(tree, path)
    return leaves, paths, lambda new: build(iter(list(new)))


def _structure(tree) -> str:
    """The containers of `tree` with its leaves as `*` (for messages comparing structures)."""
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {_structure(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (list, tuple)):
        inner = ", ".join(_structure(v) for v in tree)
        if isinstance(tree, list):
            return f"[{inner}]"
        return f"({inner}{',' if len(tree) == 1 else ''})"
    return "None" if tree is None else "*"


def _is_weak(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, np.generic)


def _leaf_value(x, where: str):
    """The IR value of a carry or xs leaf in the current builder (Python numbers: float32, int32,
    bool, as in JAX; numpy arrays keep their dtype)."""
    if isinstance(x, Tracer):
        return to_value(x)
    if isinstance(x, (bool, np.bool_)):
        return lax.full(bool(x), (), "bool")
    if _is_weak(x):
        return lax.full(x, (), "i32" if isinstance(x, numbers.Integral) else "f32")
    arr = np.asarray(x)
    try:
        dtype_of_numpy(arr.dtype)
    except KeyError:
        raise TypeError(f"{where}: a {type(x).__name__} of dtype {arr.dtype} is not an array of a "
                        f"supported dtype (float32/64, int32/64, uint32, bool)") from None
    return lax.literal(arr)


def _trace_body(fn, name: str, param_types, hints, make_args):
    """Trace `fn(*make_args(tracers))` on fresh parameters of `param_types` in a nested builder.
    Returns (builder, the Python result); values of enclosing traces the body reads become extra
    parameters of the builder (`builder.captured`)."""
    b = Builder(name)
    with building(b):
        tracers = [Tracer(b.add_param(t, h), b) for t, h in zip(param_types, hints)]
        result = fn(*make_args(tracers))
    return b, result


def _finish(b: Builder, out_values, origin: str):
    from .ir.core import Function
    return Function(b.name, b.params, b.instrs, out_values, origin=origin)


def _out_value(x, want: TensorType | None, where: str):
    """A body's returned leaf as a value of the body's builder (a constant for a number or an
    array; of the carry's dtype `want` when it is a carry)."""
    if isinstance(x, Tracer):
        return to_value(x)
    if want is not None:
        arr = np.asarray(x)
        if arr.shape != want.shape:
            raise TypeError(f"{where} is a constant of shape {list(arr.shape)}, the carry is "
                            f"{want}")
        return lax.literal(arr.astype(want.np_dtype))
    return _leaf_value(x, where)


def _fn_name(f) -> str:
    return getattr(f, "__name__", "body").replace("<lambda>", "lambda")


def _origin(prim: str) -> str:
    loc = irb.user_location(3)
    return f"{prim} body from {loc}" if loc else f"{prim} body"


def _carry_values(b, new, init, c_types, root: str, who: str, mismatch: str):
    """(values in the body's builder `b`, paths) of the leaves of the carry `new` a body returned,
    each of the type in `c_types` of `init`'s leaf; a structure other than `init`'s raises
    TypeError(mismatch.format(who=who, got=..., want=...))."""
    leaves, paths, _ = _flatten(new, root)
    if len(leaves) != len(c_types) or _structure(new) != _structure(init):
        raise TypeError(mismatch.format(who=who, got=_structure(new), want=_structure(init)))
    with building(b):
        vals = [_out_value(x, t, f"{who}'s {p}") for x, t, p in zip(leaves, c_types, paths)]
    return vals, paths


def _check_carry(what: str, paths, got, want):
    for p, g, w in zip(paths, got, want):
        if g != w:
            raise TypeError(f"{what}: the body returns {p} as {g}, but the carry is {w}: a carry "
                            f"keeps its shape and dtype from step to step")


# ------------------------------------------------------------------------------------------------
# scan
# ------------------------------------------------------------------------------------------------
def scan(f, init, xs=None, length=None, reverse=False, unroll=1):
    """Loop `f(carry, x) -> (carry, y)` over the leading axis of `xs`, as `jax.lax.scan`.

    Returns `(final carry, ys)`, the ys stacked on a new leading axis. `init` and the carry `f`
    returns must have the same structure, shapes and dtypes; `xs` is a pytree of arrays sharing
    their leading dimension (or None with `length`: then `x` is None); with `reverse=True` the
    steps run from the last slice to the first and ys are stored at their slices' positions.
    `unroll` is accepted for JAX compatibility (a positive int or bool) and does not change the
    result. Differentiable in both modes (reverse mode saves what the body's adjoint needs per
    step); compiled, the loop is one native loop whatever its length."""
    if not callable(f):
        raise TypeError(f"scan: f must be a function f(carry, x) -> (carry, y), got "
                        f"{type(f).__name__}")
    if isinstance(unroll, bool):
        unroll = 1
    if not isinstance(unroll, numbers.Integral) or unroll < 1:
        raise ValueError(f"scan: unroll must be a positive int, got {unroll!r}")
    x_leaves, x_paths, x_build = _flatten(xs, "xs")
    length = _scan_length(x_leaves, x_paths, length)
    if irb.current() is None and not any(isinstance(x, Tracer) for x in
                                         _flatten(init, "init")[0] + x_leaves):
        return _scan_eager(f, init, x_leaves, x_build, length, reverse)
    return _scan_traced(f, init, x_leaves, x_paths, x_build, length, reverse)


def _scan_length(x_leaves, x_paths, length):
    if length is not None:
        if isinstance(length, Tracer) or not isinstance(length, numbers.Integral) or length < 0:
            raise TypeError(f"scan: length must be a non-negative Python int (a static number of "
                            f"steps), got {length!r}")
        length = int(length)
    lens = []
    for x, p in zip(x_leaves, x_paths):
        shape = np.shape(x) if not isinstance(x, Tracer) else x.shape
        if not shape:
            raise ValueError(f"scan: {p} is a scalar; every leaf of xs needs a leading axis to "
                             f"scan over")
        lens.append((shape[0], p))
    for n, p in lens:
        if n != lens[0][0]:
            raise ValueError(f"scan: the leaves of xs differ in their leading dimension: "
                             f"{lens[0][1]} has {lens[0][0]}, {p} has {n}")
        if length is not None and n != length:
            raise ValueError(f"scan: length={length} but {p} has leading dimension {n}")
    if length is None:
        if not lens:
            raise ValueError("scan: with xs=None (or no arrays in xs), pass length")
        length = lens[0][0]
    return length


def _split_result(out, who: str):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"scan: {who} must return a pair (carry, y), got "
                        f"{type(out).__name__}")
    return out


def _scan_eager(f, init, x_leaves, x_build, length, reverse):
    if length == 0:   # no step to show the shapes of ys: trace the body and interpret the scan
        return _interpreted(lambda: _scan_traced(f, init, x_leaves,
                                                 [f"xs{k}" for k in range(len(x_leaves))],
                                                 x_build, 0, reverse))
    carry, ys = init, []
    steps = range(length - 1, -1, -1) if reverse else range(length)
    c_leaves, c_paths, _ = _flatten(init, "init")
    for i in steps:
        carry, y = _split_result(f(carry, x_build([np.asarray(x)[i] for x in x_leaves])),
                                 _fn_name(f))
        got = _flatten(carry, "carry")[0]
        if len(got) != len(c_leaves):
            raise TypeError(f"scan: the body returns a carry of structure {_structure(carry)}, "
                            f"init is {_structure(init)}")
        ys.append(y)
    if reverse:
        ys.reverse()
    y_leaves = [_flatten(y, "ys")[0] for y in ys]
    _, _, y_build = _flatten(ys[0], "ys")
    stacked = [np.stack([np.asarray(step[k]) for step in y_leaves])
               for k in range(len(y_leaves[0]))]
    return carry, y_build(stacked)


def _interpreted(traced):
    """Run `traced()` (which emits IR) in a scratch function and return its result pytree with
    the reference interpreter's arrays for its tracers."""
    from .ir.interpreter import interpret
    b = Builder("eager.scan")
    with building(b):
        leaves, _, rebuild = _flatten(traced(), "out")
        vals = [to_value(x) for x in leaves]
    return rebuild([np.array(r) for r in interpret(b.finish(vals), [])])


def _scan_traced(f, init, x_leaves, x_paths, x_build, length, reverse):
    c_leaves, c_paths, c_build = _flatten(init, "init")
    name = _fn_name(f)
    origin = _origin("scan")
    x_vals = [_leaf_value(x, p) for x, p in zip(x_leaves, x_paths)]
    x_types = [TensorType(v.dtype, v.shape[1:]) for v in x_vals]
    c_vals = [_leaf_value(c, p) for c, p in zip(c_leaves, c_paths)]
    weak = [_is_weak(c) and not isinstance(c, (bool, np.bool_)) for c in c_leaves]
    for attempt in range(2):   # again when the body promotes a Python-number carry
        c_types = [v.type for v in c_vals]
        b, out = _trace_body(
            f, name, c_types + x_types,
            [f"carry{k}" for k in range(len(c_types))] + [f"x{k}" for k in range(len(x_types))],
            lambda ts: (c_build(ts[:len(c_types)]), x_build(ts[len(c_types):])))
        new_carry, y = _split_result(out, name)
        nc_vals, nc_paths = _carry_values(
            b, new_carry, init, c_types, "carry", f"scan: {name}",
            "{who} returns a carry of structure {got}, but init is {want}")
        with building(b):
            y_leaves, y_paths, y_build = _flatten(y, "y")
            y_vals = [_out_value(x, None, f"scan: {name}'s {p}") for x, p in zip(y_leaves, y_paths)]
        promoted = [v.type for v in nc_vals]
        retry = [k for k, (w, g, t) in enumerate(zip(weak, promoted, c_types))
                 if w and g != t and g.shape == t.shape]
        if not retry or attempt:
            break
        c_vals = [lax.convert(v, promoted[k].dtype) if k in retry else v
                  for k, v in enumerate(c_vals)]
    _check_carry(f"scan: {name}", nc_paths, [v.type for v in nc_vals], c_types)
    body = _finish(b, nc_vals + y_vals, origin)
    consts = [to_value(t) for t, _ in b.captured.values()]
    res = _control.scan(c_vals, x_vals, consts, body, length, reverse)
    wrap = lambda v: Tracer(v, irb.current())   # noqa: E731
    carry = c_build([wrap(v) for v in res[:len(c_vals)]])
    return carry, y_build([wrap(v) for v in res[len(c_vals):]])


# ------------------------------------------------------------------------------------------------
# fori_loop
# ------------------------------------------------------------------------------------------------
def fori_loop(lower, upper, body_fun, init_val):
    """`val = body_fun(i, val)` for i in range(lower, upper), as `jax.lax.fori_loop` with static
    bounds: a scan underneath, so it is differentiable. `lower` and `upper` must be Python ints;
    `i` is an int32 scalar (traced) or a numpy int32 (outside a trace)."""
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, Tracer) or not isinstance(v, numbers.Integral):
            raise TypeError(f"fori_loop: {name} must be a Python int (a static bound), got "
                            f"{type(v).__name__}; for a bound known only at run time use "
                            f"tracejit.while_loop (not differentiable)")
    lower, upper = int(lower), int(upper)
    if irb.current() is None and not any(isinstance(x, Tracer)
                                         for x in _flatten(init_val, "init_val")[0]):
        val = init_val
        for i in range(lower, upper):
            val = body_fun(np.int32(i), val)
        return val

    def step(carry, _):
        i, val = carry
        return (i + 1, body_fun(i, val)), None
    (_, val), _ = scan(step, (np.int32(lower), init_val), length=max(upper - lower, 0))
    return val


# ------------------------------------------------------------------------------------------------
# while_loop
# ------------------------------------------------------------------------------------------------
def while_loop(cond_fun, body_fun, init_val):
    """`while cond_fun(val): val = body_fun(val)`, as `jax.lax.while_loop`: one loop in the
    compiled code. Forward only: differentiating through it raises an error naming it (its steps
    are not saved); use fori_loop or scan for a differentiable loop."""
    if irb.current() is None and not any(isinstance(x, Tracer)
                                         for x in _flatten(init_val, "init_val")[0]):
        val = init_val
        while bool(np.asarray(cond_fun(val))):
            val = body_fun(val)
        return val
    c_leaves, c_paths, c_build = _flatten(init_val, "init_val")
    c_vals = [_leaf_value(c, p) for c, p in zip(c_leaves, c_paths)]
    c_types = [v.type for v in c_vals]
    hints = [f"carry{k}" for k in range(len(c_types))]
    origin = _origin("while_loop")
    cb, pred = _trace_body(cond_fun, f"{_fn_name(cond_fun)}", c_types, hints,
                           lambda ts: (c_build(ts),))
    with building(cb):
        p = as_bool_value(pred) if isinstance(pred, Tracer) else \
            lax.full(bool(np.asarray(pred)), (), "bool")
    if p.shape != ():
        raise TypeError(f"while_loop: cond_fun must return a scalar bool, got {p.type}")
    bb, new = _trace_body(body_fun, _fn_name(body_fun), c_types, hints, lambda ts: (c_build(ts),))
    n_vals, n_paths = _carry_values(bb, new, init_val, c_types, "val", "while_loop: body_fun",
                                    "{who} returns {got}, but init_val is {want}")
    _check_carry("while_loop: body_fun", n_paths, [v.type for v in n_vals], c_types)
    # both functions take every captured value, in one order
    outer: dict = {}
    for builder in (cb, bb):
        for key, (t, _) in builder.captured.items():
            outer.setdefault(key, t)
    cond = _with_consts(cb, [p], outer, f"while_loop condition from {origin.split(' from ')[-1]}")
    body = _with_consts(bb, n_vals, outer, origin)
    consts = [to_value(t) for t in outer.values()]
    res = _control.results(irb.emit(_control.while_p, *c_vals, *consts, cond=cond, body=body,
                                    num_carry=len(c_vals)))
    return c_build([Tracer(v, irb.current()) for v in res])


def _with_consts(b: Builder, outs, outer: dict, origin: str):
    """The function `b` built, taking the carries and then every value of `outer` (those it did
    not capture as unused parameters)."""
    from .ir.core import Function, Value
    n = len(b.params) - len(b.captured)
    params = list(b.params[:n])
    for key, t in outer.items():
        hit = b.captured.get(key)
        params.append(hit[1] if hit is not None else Value(t.value.type, None, "unused"))
    return Function(b.name, params, b.instrs, list(outs), origin=origin)

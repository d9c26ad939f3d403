"""Structured loops: `scan` and `while`, each one instruction carrying its body as a nested function
(a region, see ir/core.py), and `result`, which projects one of a loop's results.

    scan  operands (carries..., xs..., consts...)
          body: (carries..., x slices..., consts...) -> (new carries..., ys...)
          params length, reverse, num_carry, num_xs
          results: the final carries, then each y stacked on a new leading axis of `length`
    while operands (carries..., consts...)
          cond: (carries..., consts...) -> bool[];  body: (carries..., consts...) -> carries
          params num_carry;  results: the carries once cond is false
    result %loop {index=k}: the k-th result of a loop

A body reads only its parameters: every value of the enclosing function it uses (JAX's "consts")
is an explicit operand, the same in every step. The reference interpreter runs a body as a Python
loop; codegen compiles it once and calls it in one native loop (codegen/runtime.py).

Reverse mode: the adjoint of a scan is a scan running the other way over the adjoint of its body
(`vjp_function` of the body, split in two). The forward part of that adjoint that depends on the
step (on a carry or an x slice) and is read by the backward part is *saved*: the rule extends the
forward scan with those values as extra stacked results (its residuals), so the forward pass
computes them once and the backward scan reads them per step. Values that depend only on consts
are recomputed by the backward body (and hoisted out of its loop by the passes); xs are read in
place. The backward scan carries the carries' cotangents and the sums of the consts' cotangents;
its ys are the cotangents of the xs. Its body is ordinary IR, so the adjoint of the adjoint is
again a scan (gradients of gradients). A `while` loop has no adjoint: its trip count is known only
at run time, so its steps cannot be saved; differentiating through one is an error naming it.
"""
from __future__ import annotations

import numpy as np

from ..adjoint_rules import adjoint_rules
from ..builder import emit
from ..core import (FLOAT_DTYPES, Function, IRError, ShapeError, TensorType, TupleType, Value,
                    primitive, shape_rules)
from ..interpreter import impls, interpret
from ..jvp_rules import jvp_rules

scan_p = primitive("scan", "control")
while_p = primitive("while", "control")
result_p = primitive("result", "other")


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------
@shape_rules.register(result_p)
def _result_shape(loop, *, index):
    if not isinstance(loop, TupleType):
        raise ShapeError(f"result reads a loop's results, got {loop}")
    if not 0 <= index < len(loop.types):
        raise ShapeError(f"result index {index} out of range for {len(loop.types)} results")
    return loop.types[index]


@impls.register(result_p)
def _result_impl(loop, *, index):
    return loop[index]


def results(loop: Value) -> list:
    """A `result` projection of each of a loop's results."""
    return [emit(result_p, loop, index=k) for k in range(len(loop.type.types))]


# ---------------------------------------------------------------------------------------------
# scan
# ---------------------------------------------------------------------------------------------
def _types_equal(what: str, got, want):
    for k, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise ShapeError(f"{what} {k} is {g}, the body expects {w}")


@shape_rules.register(scan_p)
def _scan_shape(*types, body, length, reverse, num_carry, num_xs):
    nc, nx = num_carry, num_xs
    ps, outs = body.in_types, body.out_types
    if len(types) != len(ps):
        raise ShapeError(f"scan has {len(types)} operands, its body {len(ps)} parameters")
    if len(outs) < nc:
        raise ShapeError(f"scan body returns {len(outs)} values for {nc} carries")
    _types_equal("carry", types[:nc], ps[:nc])
    _types_equal("carry output", outs[:nc], ps[:nc])
    _types_equal("x", types[nc:nc + nx],
                 [p.with_shape((length,) + p.shape) for p in ps[nc:nc + nx]])
    _types_equal("const", types[nc + nx:], ps[nc + nx:])
    return TupleType(tuple(outs[:nc]) + tuple(t.with_shape((length,) + t.shape) for t in outs[nc:]))


@impls.register(scan_p)
def _scan_impl(*args, body, length, reverse, num_carry, num_xs):
    nc, nx = num_carry, num_xs
    carry, xs, consts = list(args[:nc]), args[nc:nc + nx], list(args[nc + nx:])
    ys = [np.empty((length,) + t.shape, t.np_dtype) for t in body.out_types[nc:]]
    for i in (range(length - 1, -1, -1) if reverse else range(length)):
        outs = interpret(body, carry + [x[i] for x in xs] + consts)
        carry = outs[:nc]
        for y, o in zip(ys, outs[nc:]):
            y[i] = o
    return tuple(carry + ys)


def scan(carries, xs, consts, body: Function, length: int, reverse: bool = False) -> list:
    """Emit a scan and its result projections; returns (final carries..., stacked ys...)."""
    out = emit(scan_p, *carries, *xs, *consts, body=body, length=int(length),
               reverse=bool(reverse), num_carry=len(carries), num_xs=len(xs))
    return results(out)


@adjoint_rules.register(scan_p)
def _scan_adjoint(cts, out, *primals, wants, body, length, reverse, num_carry, num_xs):
    from ..adjoint import vjp_function
    from ..builder import current
    from ..passes import optimize
    from .elementwise import full
    nc, nx = num_carry, num_xs
    n_body, n_out = len(body.params), len(body.outputs)
    carried = [i for i in range(nc) if body.params[i].dtype in FLOAT_DTYPES]
    xs_wanted = [i for i in range(nc, nc + nx) if wants[i]]
    ks_wanted = [i for i in range(nc + nx, n_body) if wants[i]]
    ys_seeded = [k for k in range(nc, n_out) if cts[k] is not None]
    if not (carried or xs_wanted or ks_wanted):
        return (None,) * len(primals)
    wrt = carried + xs_wanted + ks_wanted
    vjp = optimize(vjp_function(body, wrt, carried + ys_seeded, name=f"{body.name}.vjp"))
    split = _split_adjoint(vjp, n_body, len(wrt), nc, nx)

    # the forward scan saves the residuals as extra results (see the module docstring)
    fwd = out.instr
    saved = split.residuals
    fwd.params["body"] = _forward_body(body, vjp, split, n_out)
    fwd.out.type = shape_rules[scan_p](*[v.type for v in fwd.inputs], **fwd.params)
    b = current()
    # the saved results are forward values, of the forward scan's line
    adj_of, loc, b.adj_of, b.loc_override = b.adj_of, b.loc_override, None, fwd.loc
    try:
        stacks = [emit(result_p, out, index=n_out + k) for k in range(len(saved))]
    finally:
        b.adj_of, b.loc_override = adj_of, loc

    bwd_body = _backward_body(body, vjp, split, n_out, len(carried), len(xs_wanted), ks_wanted,
                              fwd.loc)
    ct_carry = [cts[i] if cts[i] is not None else full(0, body.params[i].shape,
                                                        body.params[i].dtype)
                for i in carried]
    acc = [full(0, primals[i].shape, primals[i].dtype) for i in ks_wanted]
    xs_b = [cts[k] for k in ys_seeded] + stacks + [primals[i] for i in split.xs_used]
    res = scan(ct_carry + acc, xs_b, [primals[i] for i in split.ks_used], bwd_body, length,
               not reverse)
    got = dict(zip(carried + ks_wanted, res[:len(carried) + len(ks_wanted)]))
    got.update(zip(xs_wanted, res[len(carried) + len(ks_wanted):]))
    return tuple(got.get(i) if wants[i] else None for i in range(len(primals)))


class _Split:
    """The instructions of a body's adjoint (`vjp_function`) sorted by what they depend on."""

    def __init__(self):
        self.backward: set = set()    # ids of values depending on a cotangent parameter
        self.varying: set = set()     # ... on a carry or an x slice (and no cotangent)
        self.residuals: list = []     # varying values the backward part reads: saved per step
        self.xs_used: list = []       # operand indices of xs the backward part reads
        self.ks_used: list = []       # ... of consts
        self.invariant: set = set()   # ids of instructions on consts only the backward part needs
        self.recomputed: set = set()  # ids of instructions the backward part recomputes


def _split_adjoint(vjp: Function, n_body: int, n_grads: int, nc: int, nx: int) -> _Split:
    s = _Split()
    params = vjp.params
    s.varying = {id(p) for p in params[:nc + nx]}
    s.backward = {id(p) for p in params[n_body:]}
    for ins in vjp.instrs:
        ids = [id(v) for v in ins.inputs]
        if any(i in s.backward for i in ids):
            s.backward.add(id(ins.out))
        elif any(i in s.varying for i in ids):
            s.varying.add(id(ins.out))
    index = {id(p): k for k, p in enumerate(params[:n_body])}
    needed: dict[int, Value] = {}   # forward values the backward part reads, in order of use
    for ins in vjp.instrs:
        if id(ins.out) in s.backward:
            for v in ins.inputs:
                if id(v) not in s.backward:
                    needed.setdefault(id(v), v)
    for v in vjp.outputs[len(vjp.outputs) - n_grads:]:
        if id(v) not in s.backward:
            needed.setdefault(id(v), v)
    _recompute_cheap(s, needed, index, nc, nx)
    recomputed = [ins for ins in vjp.instrs if id(ins) in s.recomputed]
    # instructions on consts only that the backward part needs are recomputed there
    todo = [v for v in list(needed.values()) + [u for ins in recomputed for u in ins.inputs]
            if id(v) not in s.varying and v.instr is not None]
    while todo:
        v = todo.pop()
        if id(v.instr) in s.invariant:
            continue
        s.invariant.add(id(v.instr))
        todo.extend(u for u in v.instr.inputs if u.instr is not None)
    reads = list(needed.values()) + [u for ins in vjp.instrs
                                     if id(ins) in s.invariant or id(ins) in s.recomputed
                                     for u in ins.inputs]
    for v in reads:
        k = index.get(id(v))
        if k is not None and nc <= k < nc + nx and k not in s.xs_used:
            s.xs_used.append(k)
        elif k is not None and k >= nc + nx and k not in s.ks_used:
            s.ks_used.append(k)
    s.residuals = [v for v in needed.values() if id(v) in s.varying
                   and not (id(v) in index and nc <= index[id(v)] < nc + nx)]
    return s


def _recompute_cheap(s: _Split, needed: dict, index: dict, nc: int, nx: int):
    """Save less: a needed step value computed by a few elementwise instructions from values the
    backward part has anyway (saved ones, x slices, consts) is recomputed there instead of saved
    (sigmoid'(z) = s (1 - s) from s = sigmoid(z), 1 - tanh(c)^2 from tanh(c)): a few flops per
    element against a stacked buffer written and read once per step."""
    def at_hand(u):
        return id(u) not in s.varying or id(u) in needed or \
            (id(u) in index and nc <= index[id(u)] < nc + nx) or \
            (u.instr is not None and id(u.instr) in s.recomputed)

    def chain(v, depth, found, leaves):
        """The instructions computing `v` from values at hand, or None (at most `depth` deep)."""
        ins = v.instr
        if ins is None or not ins.prim.elementwise or depth == 0:
            return None
        for u in ins.inputs:
            if at_hand(u):
                leaves.append(u)
            elif chain(u, depth - 1, found, leaves) is None:
                return None
        found.append(ins)
        return found
    pinned: set = set()   # saved values a recomputation reads: they stay saved
    changed = True
    while changed:
        changed = False
        for key, v in list(needed.items()):
            if id(v) not in s.varying or key in pinned:
                continue
            del needed[key]   # (a value is not at hand for its own recomputation)
            leaves = []
            found = chain(v, 3, [], leaves)
            if found is None:
                needed[key] = v
                continue
            s.recomputed.update(id(ins) for ins in found)
            pinned.update(id(u) for u in leaves if id(u) in needed)
            changed = True


def _forward_body(body: Function, vjp: Function, split: _Split, n_out: int) -> Function:
    """The scan body computing `body`'s outputs and the residuals (the adjoint's forward part)."""
    from ..passes import dce
    instrs = [ins for ins in vjp.instrs if id(ins.out) not in split.backward]
    fn = Function(body.name, vjp.params[:len(body.params)], instrs,
                  vjp.outputs[:n_out] + split.residuals, origin=body.origin)
    return dce(fn)


def _backward_body(body: Function, vjp: Function, split: _Split, n_out: int, n_carried: int,
                   n_xs: int, ks_wanted: list, loc: str | None) -> Function:
    """The body of the backward scan. Parameters: carries (the carries' cotangents, the sums of
    the wanted consts' cotangents), xs (the ys' cotangents, the residuals, the xs read), consts
    (those read); outputs: the carries' cotangents one step back, the sums, the xs'
    cotangents. `vjp`'s cotangent outputs are ordered carries, xs, consts (n_carried, n_xs,
    len(ks_wanted))."""
    from ..builder import Builder, building
    from ..prims.elementwise import add
    b = Builder(f"{body.name}.adj")
    b.loc_override = loc
    vmap: dict[int, Value] = {}
    seeds = vjp.params[len(body.params):]
    for p in seeds[:n_carried]:
        vmap[id(p)] = b.add_param(p.type, p.hint)
    accs = [b.add_param(vjp.params[i].type, f"{vjp.params[i].hint or 'k'}.sum")
            for i in ks_wanted]
    for p in seeds[n_carried:]:
        vmap[id(p)] = b.add_param(p.type, p.hint)
    for v in split.residuals:
        vmap[id(v)] = b.add_param(v.type, "saved")
    for i in split.xs_used + split.ks_used:
        vmap[id(vjp.params[i])] = b.add_param(vjp.params[i].type, vjp.params[i].hint)
    with building(b):
        for ins in vjp.instrs:
            if id(ins.out) in split.backward or id(ins) in split.invariant or \
                    id(ins) in split.recomputed:
                new = b.reemit(ins, [vmap[id(v)] for v in ins.inputs])
                new.hint = ins.out.hint
                vmap[id(ins.out)] = new
        outs = [vmap[id(g)] for g in vjp.outputs[n_out:]]
        sums = [add(a, g) for a, g in zip(accs, outs[n_carried + n_xs:])]
    return Function(b.name, b.params, b.instrs, outs[:n_carried] + sums +
                    outs[n_carried:n_carried + n_xs],
                    origin=f"adjoint of the {body.origin}" if body.origin else None)


@jvp_rules.register(scan_p)
def _scan_jvp(ts, tans, out, *primals, body, length, reverse, num_carry, num_xs):
    """The tangent of a scan is a scan over the tangent of its body (one list per result). With
    a batch of tangents ([B] + shape), the xs' tangents are scanned over their second axis
    (transposed to [T, B, ...]) and the ys' tangents transposed back."""
    from ..jvp import jvp_function
    from .elementwise import full
    from .structural import transpose
    nc, nx = num_carry, num_xs
    n_body = len(body.params)
    carried = [i for i in range(nc) if body.params[i].dtype in FLOAT_DTYPES]
    others = [i for i in range(nc, n_body) if tans[i] is not None]
    jb = jvp_function(body, carried + others, batch=ts.batch, name=f"{body.name}.jvp")
    tparams = dict(zip(carried + others, jb.params[n_body:]))
    n_out = len(body.outputs)
    touts = jb.outputs[n_out:]
    ys_float = [k for k in range(nc, n_out) if body.outputs[k].dtype in FLOAT_DTYPES]

    def group(lo, hi):
        return [jb.params[i] for i in range(lo, hi)] + [tparams[i] for i in range(lo, hi)
                                                        if i in tparams]
    params = group(0, nc) + group(nc, nc + nx) + group(nc + nx, n_body)
    outs = jb.outputs[:nc] + [touts[i] for i in carried] + jb.outputs[nc:n_out] + \
        [touts[k] for k in ys_float]
    fn = Function(jb.name, params, jb.instrs, outs, origin=body.origin)

    def swap(v):   # [B, T, ...] <-> [T, B, ...]
        return transpose(v, (1, 0) + tuple(range(2, v.ndim)))

    def operands(lo, hi, stacked=False):
        tan = []
        for i in range(lo, hi):
            if i not in tparams:
                continue
            t = tans[i]
            if t is None:
                shape = primals[i].shape
                shape = shape[:1] + ts.lead + shape[1:] if stacked else ts.shape(shape)
                t = full(0, shape, primals[i].dtype)
            elif stacked and ts.batch is not None:
                t = swap(t)
            tan.append(t)
        return list(primals[lo:hi]) + tan
    carries, xs = operands(0, nc), operands(nc, nc + nx, stacked=True)
    res = scan(carries, xs, operands(nc + nx, n_body), fn, length, reverse)
    n_c = len(carries)
    tangents = [None] * n_out
    for j, i in enumerate(carried):
        tangents[i] = res[nc + j]
    for j, k in enumerate(ys_float):
        t = res[n_c + (n_out - nc) + j]
        tangents[k] = swap(t) if ts.batch is not None else t
    return tangents


# ---------------------------------------------------------------------------------------------
# while
# ---------------------------------------------------------------------------------------------
@shape_rules.register(while_p)
def _while_shape(*types, cond, body, num_carry):
    nc = num_carry
    if len(types) != len(body.params) or len(types) != len(cond.params):
        raise ShapeError(f"while has {len(types)} operands, its body {len(body.params)} and its "
                         f"condition {len(cond.params)} parameters")
    _types_equal("operand", types, body.in_types)
    _types_equal("operand", types, cond.in_types)
    _types_equal("carry output", body.out_types, body.in_types[:nc])
    if len(body.outputs) != nc:
        raise ShapeError(f"while body returns {len(body.outputs)} values for {nc} carries")
    if cond.out_types != [TensorType("bool", ())]:
        raise ShapeError(f"while condition must return one bool[], got "
                         f"{', '.join(map(str, cond.out_types))}")
    return TupleType(tuple(types[:nc]))


@impls.register(while_p)
def _while_impl(*args, cond, body, num_carry):
    carry, consts = list(args[:num_carry]), list(args[num_carry:])
    while interpret(cond, carry + consts)[0]:
        carry = interpret(body, carry + consts)
    return tuple(carry)


def _while_not_differentiable(out, mode):
    ins = out.instr
    where = f" at {ins.loc}" if ins.loc else ""
    raise IRError(f"cannot differentiate through while_loop{where} in {mode}: its number of steps "
                  f"is known only when it runs, so its steps cannot be saved for the backward "
                  f"pass; use tracejit.fori_loop (static bounds) or tracejit.scan instead")


@adjoint_rules.register(while_p)
def _while_adjoint(cts, out, *primals, wants, **params):
    _while_not_differentiable(out, "reverse mode")


@jvp_rules.register(while_p)
def _while_jvp(ts, tans, out, *primals, **params):
    _while_not_differentiable(out, "forward mode")

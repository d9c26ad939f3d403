"""Reverse mode as an IR -> IR transformation.

`grad_function(fn, wrt)` returns one function that computes `fn`'s outputs and the gradient of its
first output (a scalar) with respect to the parameters `wrt`. The forward instructions are copied,
then the adjoint rules of the active instructions run in reverse order, each emitting ordinary
instructions tagged with the forward instruction they came from. Cotangents of a value used more than
once are summed (`add`). Dead code is removed at the end.

`vjp_function(fn, wrt, seeds)` is the general form: cotangents of several outputs come in as
parameters (structured loops differentiate their bodies with it, see ir/prims/control.py).

A structured loop (an instruction with a tuple-typed value, see ir/core.py) receives the
cotangents its `result` projections collected, one per result (None for a zero one):
`adjoint(cts, out, *primals, wants, **params)`, `wants[i]` saying whether input i's cotangent is
needed; `out` is the loop's value (its rule may extend the forward loop with saved results).
"""
from __future__ import annotations

from typing import Sequence

from .adjoint_rules import adjoint_rules
from .builder import Builder, adjoint_scope, building
from .core import (FLOAT_DTYPES, Function, IRError, TupleType, clone,
                   differentiation_rule)
from . import lax


def _differentiable(v) -> bool:
    """Can `v` carry a cotangent: a float value, or a loop's tuple of results."""
    return v.dtype in FLOAT_DTYPES or isinstance(v.type, TupleType)


def _active(fn: Function, wrt_ids: set[int]) -> set[int]:
    """Ids of values that depend on a parameter in `wrt_ids` through float-valued data flow."""
    active = set(wrt_ids)
    for ins in fn.instrs:
        if _differentiable(ins.out) and any(id(v) in active for v in ins.inputs):
            active.add(id(ins.out))
    return active


def _check_wrt(fn: Function, wrt):
    for i in wrt:
        if fn.params[i].dtype not in FLOAT_DTYPES:
            raise IRError(f"cannot differentiate with respect to {fn.params[i].type} parameter "
                          f"{fn.params[i].hint}")


def _extension(fn: Function, wrt: Sequence[int], name: str):
    """(a clone of `fn`, a builder named `name` holding the clone's parameters and instructions,
    the parameters `wrt`, the ids of the values that depend on them): what an adjoint extends."""
    base = clone(fn)
    b = Builder(name)
    b.params = list(base.params)
    b.instrs = list(base.instrs)
    wrt_vals = [base.params[i] for i in wrt]
    return base, b, wrt_vals, _active(base, {id(v) for v in wrt_vals})


def grad_function(fn: Function, wrt: Sequence[int], name: str | None = None) -> Function:
    """`fn` extended with the gradient of output 0 w.r.t. parameters `wrt` (appended as outputs)."""
    from .passes import dce
    loss = fn.outputs[0]
    if loss.shape != () or loss.dtype not in FLOAT_DTYPES:
        raise IRError(f"the gradient needs a scalar float output; @{fn.name} returns {loss.type}")
    _check_wrt(fn, wrt)
    base, b, wrt_vals, active = _extension(fn, wrt, name or f"{fn.name}.grad")
    loss = base.outputs[0]
    ct: dict[int, object] = {}

    with building(b):
        if id(loss) in active:
            # the seed belongs to the loss's instruction (not to whichever line triggered tracing)
            if loss.instr is not None:
                with adjoint_scope(b, loss.instr):
                    ct[id(loss)] = lax.full(1.0, (), loss.dtype)
            else:
                ct[id(loss)] = lax.full(1.0, (), loss.dtype)
        grads = _backpropagate(b, base, active, ct, wrt_vals)
    return dce(b.finish(list(base.outputs) + grads))


def vjp_function(fn: Function, wrt: Sequence[int], seeds: Sequence[int],
                 name: str | None = None) -> Function:
    """`fn` with a cotangent parameter for each output in `seeds` (appended to its parameters, in
    that order), returning `fn`'s outputs followed by the cotangents of its parameters `wrt` (zeros
    where an output does not depend on one). Dead code is not removed."""
    _check_wrt(fn, wrt)
    for k in seeds:
        if fn.outputs[k].dtype not in FLOAT_DTYPES:
            raise IRError(f"@{fn.name}: output {k} ({fn.outputs[k].type}) has no cotangent")
    base, b, wrt_vals, active = _extension(fn, wrt, name or f"{fn.name}.vjp")
    ct: dict[int, object] = {}
    seed_params = [b.add_param(base.outputs[k].type, f"ct{k}") for k in seeds]
    with building(b):
        for k, seed in zip(seeds, seed_params):
            o = base.outputs[k]
            if id(o) in active:   # the same value returned twice: its cotangents add up
                prev = ct.get(id(o))
                ct[id(o)] = seed if prev is None else lax.add(prev, seed)
        grads = _backpropagate(b, base, active, ct, wrt_vals)
    return Function(b.name, b.params, b.instrs, list(base.outputs) + grads, origin=fn.origin)


def _backpropagate(b: Builder, base: Function, active: set, ct: dict, wrt_vals) -> list:
    """Run the adjoint rules of `base`'s instructions in reverse from the cotangents `ct`; returns
    the cotangents of `wrt_vals` (zeros where none arrived). Runs inside `building(b)`."""
    from .prims.control import result_p
    packed: dict[int, dict] = {}   # id(loop value) -> {result index: cotangent}
    for ins in reversed(base.instrs):
        c = ct.pop(id(ins.out), None)
        if ins.prim is result_p:
            if c is not None:
                packed.setdefault(id(ins.inputs[0]), {})[ins.params["index"]] = c
            continue
        if isinstance(ins.out.type, TupleType):
            got = packed.pop(id(ins.out), None)
            if not got:
                continue
            cts_in = [got.get(k) for k in range(len(ins.out.type.types))]
            wants = tuple(id(v) in active and v.dtype in FLOAT_DTYPES for v in ins.inputs)
            with adjoint_scope(b, ins):
                rule = differentiation_rule(adjoint_rules, ins)
                cts = rule(cts_in, ins.out, *ins.inputs, wants=wants, **ins.params)
                _accumulate(ins, cts, active, ct)
            continue
        if c is None:
            continue
        if c.ct_of is None and c.instr is not None and c.instr.adj_of is not None:
            c.ct_of = ins.out
        with adjoint_scope(b, ins):
            rule = differentiation_rule(adjoint_rules, ins)
            cts = rule(c, *ins.inputs, **ins.params)
            _accumulate(ins, cts, active, ct)
    grads = []
    for p in wrt_vals:
        g = ct.get(id(p))
        if g is None:
            g = lax.zeros(p.shape, p.dtype)
        if g.ct_of is None and g.instr is not None:
            g.ct_of = p
        grads.append(g)
    return grads


def _accumulate(ins, cts, active: set, ct: dict):
    """Add the cotangents `cts` a rule gave for `ins`'s inputs into `ct` (checked)."""
    if len(cts) != len(ins.inputs):
        raise IRError(f"adjoint rule of '{ins.prim.name}' returned {len(cts)} "
                      f"cotangents for {len(ins.inputs)} inputs")
    for v, g in zip(ins.inputs, cts):
        if g is None or id(v) not in active:
            continue
        if g.type != v.type:
            raise IRError(f"adjoint rule of '{ins.prim.name}' gave a cotangent of type "
                          f"{g.type} for an input of type {v.type}")
        prev = ct.get(id(v))
        ct[id(v)] = g if prev is None else lax.add(prev, g)

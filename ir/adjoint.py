"""Reverse mode as an IR -> IR transformation.

`grad_function(fn, wrt)` returns one function that computes `fn`'s outputs and the gradient of its
first output (a scalar) with respect to the parameters `wrt`. The forward instructions are copied,
then the adjoint rules of the active instructions run in reverse order, each emitting ordinary
instructions tagged with the forward instruction they came from. Cotangents of a value used more than
once are summed (`add`). Dead code is removed at the end.
"""
from __future__ import annotations

from typing import Sequence

from .adjoint_rules import adjoint_rules
from .builder import Builder, adjoint_scope, building
from .core import FLOAT_DTYPES, Function, IRError, clone, differentiation_rule
from . import lax


def _active(fn: Function, wrt_ids: set[int]) -> set[int]:
    """Ids of values that depend on a parameter in `wrt_ids` through float-valued data flow."""
    active = set(wrt_ids)
    for ins in fn.instrs:
        if ins.out.dtype in FLOAT_DTYPES and any(id(v) in active for v in ins.inputs):
            active.add(id(ins.out))
    return active


def grad_function(fn: Function, wrt: Sequence[int], name: str | None = None) -> Function:
    """`fn` extended with the gradient of output 0 w.r.t. parameters `wrt` (appended as outputs)."""
    from .passes import dce
    loss = fn.outputs[0]
    if loss.shape != () or loss.dtype not in FLOAT_DTYPES:
        raise IRError(f"the gradient needs a scalar float output; @{fn.name} returns {loss.type}")
    for i in wrt:
        if fn.params[i].dtype not in FLOAT_DTYPES:
            raise IRError(f"cannot differentiate with respect to {fn.params[i].type} parameter "
                          f"{fn.params[i].hint}")
    base = clone(fn)
    b = Builder(name or f"{fn.name}.grad")
    b.params = list(base.params)
    b.instrs = list(base.instrs)
    wrt_vals = [base.params[i] for i in wrt]
    active = _active(base, {id(v) for v in wrt_vals})
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
        for ins in reversed(base.instrs):
            c = ct.pop(id(ins.out), None)
            if c is None:
                continue
            if c.ct_of is None and c.instr is not None and c.instr.adj_of is not None:
                c.ct_of = ins.out
            with adjoint_scope(b, ins):
                rule = differentiation_rule(adjoint_rules, ins)
                cts = rule(c, *ins.inputs, **ins.params)
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
        grads = []
        for p in wrt_vals:
            g = ct.get(id(p))
            if g is None:
                g = lax.zeros(p.shape, p.dtype)
            if g.ct_of is None and g.instr is not None:
                g.ct_of = p
            grads.append(g)
    return dce(b.finish(list(base.outputs) + grads))

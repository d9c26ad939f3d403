"""Forward mode as an IR -> IR transformation.

`jvp_function(fn, wrt)` returns one function that computes `fn`'s outputs and their tangents along
tangent directions of the parameters `wrt`, which it takes as extra parameters (appended after
`fn`'s, in the order of `wrt`, named `%x.tan`). The primal instructions are copied in order; right
after each one whose inputs carry a tangent, its tangent rule (ir.jvp_rules) emits ordinary
instructions tagged with it (`# tan of %n`), defining `%n.tan`. A tangent that is zero (an input
not differentiated, a comparison, a constant) stays symbolic (None) and costs no instruction; only
an output's zero tangent is materialized. Dead code is removed at the end.

With `batch=B`, each tangent parameter and each tangent carries a leading axis of size B: the
function pushes B directions at once (one column of a Jacobian each).
"""
from __future__ import annotations

from typing import Sequence

from .builder import Builder, building, tangent_scope
from .core import (FLOAT_DTYPES, Function, IRError, TensorType, TupleType, Value, clone,
                   differentiation_rule)
from .jvp_rules import TangentSpace, jvp_rules
from . import lax


def jvp_function(fn: Function, wrt: Sequence[int], batch: int | None = None,
                 name: str | None = None) -> Function:
    """`fn` extended with the tangents of all its outputs (appended as outputs) along tangent
    parameters for `fn.params[i]`, i in `wrt` (appended as parameters). Tangents have the primal's
    type, or [batch] + its shape. Non-float outputs get zero tangents of their own type."""
    from .passes import dce
    for i in wrt:
        if fn.params[i].dtype not in FLOAT_DTYPES:
            raise IRError(f"cannot differentiate with respect to {fn.params[i].type} parameter "
                          f"{fn.params[i].hint}")
    if batch is not None and batch < 1:
        raise IRError(f"a batch of tangents needs at least one direction, got batch={batch}")
    ts = TangentSpace(batch)
    base = clone(fn)
    b = Builder(name or f"{fn.name}.jvp")
    b.params = list(base.params)
    tan: dict[int, Value] = {}
    for i in wrt:
        p = base.params[i]
        t = b.add_param(TensorType(p.dtype, ts.shape(p.shape)))
        t.tan_of = p
        tan[id(p)] = t

    from .prims.control import result_p
    packed: dict[int, list] = {}   # id(loop value) -> the tangents of its results
    with building(b):
        for ins in base.instrs:
            b.instrs.append(ins)
            if ins.prim is result_p:
                t = packed.get(id(ins.inputs[0]), {})
                t = t[ins.params["index"]] if t else None
                if t is not None:
                    tan[id(ins.out)] = t
                continue
            tans = [tan.get(id(v)) for v in ins.inputs]
            if all(t is None for t in tans):
                continue
            if isinstance(ins.out.type, TupleType):   # a loop: one tangent per result
                with tangent_scope(b, ins):
                    packed[id(ins.out)] = _apply_rule(ts, ins, tans)
                continue
            if ins.out.dtype not in FLOAT_DTYPES:
                continue
            with tangent_scope(b, ins):
                t = _apply_rule(ts, ins, tans)
            if t is None:
                continue
            want = TensorType(ins.out.dtype, ts.shape(ins.out.shape))
            if t.type != want:
                raise IRError(f"jvp rule of '{ins.prim.name}' gave a tangent of type {t.type} for "
                              f"a result of type {ins.out.type} (expected {want})")
            if t.tan_of is None and t.instr is not None and t.instr.tan_of is ins:
                t.tan_of = ins.out
            tan[id(ins.out)] = t
        outs = []
        for o in base.outputs:
            t = tan.get(id(o))
            if t is None:
                t = lax.zeros(ts.shape(o.shape), o.dtype)
                t.tan_of = o
            outs.append(t)
    return dce(b.finish(list(base.outputs) + outs))


def _apply_rule(ts: TangentSpace, ins, tans):
    rule = differentiation_rule(jvp_rules, ins, " in forward mode")
    return rule(ts, tuple(tans), ins.out, *ins.inputs, **ins.params)

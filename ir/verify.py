"""The IR verifier: SSA form, types re-derived from the shape rules, outputs defined.

Tests run it after every pass (like JAX's check_jaxpr)."""
from __future__ import annotations

from .core import Function, IRError, Namer, instr_text, regions, shape_rules


class VerifyError(IRError):
    pass


def verify(fn: Function) -> Function:
    defined: set[int] = set()
    namer = Namer()
    for p in fn.params:
        if p.instr is not None:
            raise VerifyError(f"@{fn.name}: parameter {p!r} has a defining instruction")
        if id(p) in defined:
            raise VerifyError(f"@{fn.name}: parameter {p!r} listed twice")
        defined.add(id(p))
        namer.define(p)
    for ins in fn.instrs:
        for v in ins.inputs:
            if id(v) not in defined:
                namer.define(ins.out)
                raise VerifyError(f"@{fn.name}: `{instr_text(ins, namer)}` uses a value before its "
                                  f"definition (or one from another function)")
        if ins.out.instr is not ins:
            raise VerifyError(f"@{fn.name}: {ins!r} does not define its result")
        if id(ins.out) in defined:
            raise VerifyError(f"@{fn.name}: value defined twice by {ins!r}")
        expected = shape_rules[ins.prim](*[v.type for v in ins.inputs], **ins.params)
        namer.define(ins.out)
        if expected != ins.out.type:
            raise VerifyError(f"@{fn.name}: `{instr_text(ins, namer)}` has type {ins.out.type}, "
                              f"its shape rule gives {expected}")
        defined.add(id(ins.out))
        for name, body in regions(ins):   # a region reads only its own parameters
            try:
                verify(body)
            except VerifyError as e:
                raise VerifyError(f"@{fn.name}: in the {name} of `{instr_text(ins, namer)}`: {e}") \
                    from None
    for o in fn.outputs:
        if id(o) not in defined:
            raise VerifyError(f"@{fn.name}: an output is not defined in the function")
    return fn

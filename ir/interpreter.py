"""The numpy reference interpreter: the test oracle for the code generator, not the product.

`impls[prim](*arrays, **params) -> ndarray` gives each primitive's meaning on numpy arrays; the
primitive modules in `ir/prims/` register them next to their shape and adjoint rules.
"""
from __future__ import annotations

import numpy as np

from .core import Function, IRError, Registry, TupleType, instr_text, Namer

impls = Registry("interpreter")


def interpret(fn: Function, args) -> list[np.ndarray]:
    """Run `fn` on numpy arrays (one per parameter, of the parameter's dtype); returns its outputs."""
    if len(args) != len(fn.params):
        raise IRError(f"@{fn.name} takes {len(fn.params)} arguments, got {len(args)}")
    env = {}
    for p, a in zip(fn.params, args):
        a = np.asarray(a)
        if a.shape != p.type.shape or a.dtype != p.type.np_dtype:
            raise IRError(f"@{fn.name}: parameter {p.hint or ''} expects {p.type}, got "
                          f"{a.dtype}{list(a.shape)}")
        env[id(p)] = a
    for ins in fn.instrs:
        try:
            out = impls[ins.prim](*[env[id(v)] for v in ins.inputs], **ins.params)
        except IRError as e:
            fields = getattr(e, "fields", None)
            if fields is not None:  # an index out of bounds: name the user's op and line
                from .prims.gather import out_of_bounds_message
                value, axis, size, name = fields
                raise type(e)(out_of_bounds_message(value, axis, size, ins.api or ins.prim.name,
                                                    name, ins.loc), fields) from None
            raise
        except Exception as e:  # name the instruction and the user's line
            namer = Namer()
            for v in list(fn.params) + [i.out for i in fn.instrs]:
                namer.define(v)
            raise IRError(f"interpreting `{instr_text(ins, namer)}`: {type(e).__name__}: {e}") from e
        if isinstance(ins.out.type, TupleType):   # a structured loop's results, checked each
            out = tuple(_checked(o, t, ins) for o, t in zip(out, ins.out.type.types))
            env[id(ins.out)] = out
            continue
        out = _checked(out, ins.out.type, ins)
        env[id(ins.out)] = out
    return [env[id(o)] for o in fn.outputs]


def _checked(out, type, ins):
    out = np.asarray(out, dtype=type.np_dtype)
    if out.shape != type.shape:
        raise IRError(f"interpreter: {ins.prim.name} produced shape {out.shape}, its type says "
                      f"{type}")
    return out

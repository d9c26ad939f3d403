"""Building functions: the builder stack, provenance capture and `emit`.

Everything that creates instructions (the tracer, adjoint rules, passes that rewrite) goes through
`emit(prim, *inputs, **params)` on the innermost active builder, which runs the primitive's shape
rule, records the user's file:line and the adjoint context, and returns the new Value.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np

from .core import Function, Instr, IRError, ShapeError, TensorType, Value, shape_rules

_state = threading.local()

# Frames inside these directories are ours; the first frame outside is the user's line. Installed,
# ir/ and codegen/ are subpackages of tracejit (one directory); in the source tree they are its
# siblings.
_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = ((_PARENT + os.sep,) if os.path.basename(_PARENT) == "tracejit" else
             tuple(os.path.join(_PARENT, d) + os.sep for d in ("ir", "tracejit", "codegen")))
# numpy's own frames are skipped too: a numpy function that reaches a traced value (np.r_[x, y]
# calls np.array inside numpy's package) is reported at the user's line that called it
_SKIPPED_DIRS = _OWN_DIRS + (os.path.dirname(os.path.abspath(np.__file__)) + os.sep,)


def user_location(skip: int = 1) -> str | None:
    """'file:line' of the innermost caller outside tracejit's own packages and numpy's."""
    f = sys._getframe(skip)
    while f is not None:
        fname = f.f_code.co_filename
        if not fname.startswith(_SKIPPED_DIRS) and not fname.startswith("<frozen"):
            return f"{os.path.basename(fname)}:{f.f_lineno}"
        f = f.f_back
    return None


class Builder:
    """Accumulates the instructions of one function under construction."""

    def __init__(self, name: str):
        self.name = name
        self.params: list[Value] = []
        self.instrs: list[Instr] = []
        # While an adjoint rule runs: the forward instruction it differentiates.
        self.adj_of: Instr | None = None
        # While a tangent (JVP) rule runs: the primal instruction it differentiates.
        self.tan_of: Instr | None = None
        # While an op function of the user-facing API runs: its name, for dumps.
        self.api: str | None = None
        # Set while re-emitting existing instructions (inlining, passes): provenance to keep.
        self.loc_override: str | None = None
        # Values of an enclosing builder captured by this one (closure conversion): outer -> param.
        self.captured: dict[int, tuple[Value, Value]] = {}
        self.outer: Builder | None = None

    def add_param(self, type: TensorType, hint: str | None = None) -> Value:
        v = Value(type, None, hint)
        self.params.append(v)
        return v

    def emit(self, prim, inputs, params) -> Value:
        in_types = [v.type for v in inputs]
        loc = self.loc_override
        if loc is None and self.adj_of is not None:
            loc = self.adj_of.loc
        if loc is None and self.tan_of is not None:
            loc = self.tan_of.loc
        if loc is None:
            loc = user_location(2)
        try:
            out_type = shape_rules[prim](*in_types, **params)
        except ShapeError as e:
            where = f" (at {loc})" if loc else ""
            name, msg = self.api or prim.name, str(e)
            if not msg.startswith(f"{name}:"):
                msg = f"{name}: {msg}"
            raise ShapeError(f"{msg}{where}") from None
        ins = Instr(prim, inputs, params, out_type, loc=loc, api=self.api or prim.name,
                    adj_of=self.adj_of, tan_of=self.tan_of)
        self.instrs.append(ins)
        return ins.out

    def reemit(self, ins: Instr, inputs) -> Value:
        """Copy `ins` with new inputs, keeping its provenance (inlining, rewriting passes)."""
        out_type = shape_rules[ins.prim](*[v.type for v in inputs], **ins.params)
        new = Instr(ins.prim, inputs, ins.params, out_type, loc=ins.loc, api=ins.api,
                    adj_of=self.adj_of if self.adj_of is not None else ins.adj_of,
                    tan_of=self.tan_of if self.tan_of is not None else ins.tan_of)
        self.instrs.append(new)
        return new.out

    def finish(self, outputs) -> Function:
        return Function(self.name, self.params, self.instrs, list(outputs))


def current() -> Builder | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def building(builder: Builder):
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    builder.outer = stack[-1] if stack else None
    stack.append(builder)
    try:
        yield builder
    finally:
        stack.pop()


@contextlib.contextmanager
def api_scope(name: str):
    """Mark the instructions emitted inside as coming from user-level op `name` (outermost wins)."""
    b = current()
    if b is None or b.api is not None:
        yield
        return
    b.api = name
    try:
        yield
    finally:
        b.api = None


@contextlib.contextmanager
def _provenance_scope(builder: Builder, attr: str, instr: Instr):
    """Instructions emitted inside carry `instr` as their `attr` ("adj_of" / "tan_of") and no API
    name of their own."""
    prev = getattr(builder, attr), builder.api
    setattr(builder, attr, instr)
    builder.api = None
    try:
        yield
    finally:
        setattr(builder, attr, prev[0])
        builder.api = prev[1]


def adjoint_scope(builder: Builder, fwd: Instr):
    """Instructions emitted inside are the adjoint of forward instruction `fwd`."""
    return _provenance_scope(builder, "adj_of", fwd)


def tangent_scope(builder: Builder, primal: Instr):
    """Instructions emitted inside are the tangent of primal instruction `primal`."""
    return _provenance_scope(builder, "tan_of", primal)


def emit(prim, *inputs, **params) -> Value:
    b = current()
    if b is None:
        raise IRError(f"emit({prim.name}) outside of a builder")
    return b.emit(prim, inputs, params)


def inline(fn: Function, args) -> list[Value]:
    """Re-emit `fn`'s instructions on `args` into the current builder; returns its outputs."""
    b = current()
    env = {id(p): a for p, a in zip(fn.params, args)}
    for ins in fn.instrs:
        env[id(ins.out)] = b.reemit(ins, [env[id(v)] for v in ins.inputs])
    return [env[id(o)] for o in fn.outputs]

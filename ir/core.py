"""The tracejit SSA IR: types, values, instructions, functions, primitives and the printer.

A function is a straight-line list of instructions in SSA form. Every value has a static type (dtype and
shape), is defined exactly once (as a parameter or by one instruction) and is used only after its
definition. Python loops unroll at trace time; structured loops (`scan`, `while`, see
ir/prims/control.py) are one instruction carrying its body as a nested function (a region) that
reads only its own parameters: every value of the enclosing function it uses is an explicit
operand. Such an instruction has several results: its value has a tuple type, and `result {index=k}`
instructions project the k-th one.

Textual grammar (what `print_function` emits; `#` starts a comment that carries provenance):

    function   ::= "func" "@" NAME "(" [param ("," param)*] ")" "->" "(" [type ("," type)*] ")" "{"
                       instr*
                       "return" operand ("," operand)*
                   "}"
    param      ::= VALUE ":" type
    instr      ::= VALUE ":" rtype "=" PRIM [operand ("," operand)*] [attrs] [comment] [region*]
    rtype      ::= type | "(" type ("," type)* ")"    # a tuple: the results of a structured loop
    region     ::= NAME ":" function           # printed indented under its instruction, once
    operand    ::= VALUE | SCALAR            # a rank-0 `const` prints inline as its literal
    attrs      ::= "{" attr ("," attr)* "}"
    attr       ::= NAME                      # a boolean attribute that is true
                 | NAME "=" LITERAL          # ints, floats, tuples
    type       ::= DTYPE "[" [INT ("," INT)*] "]"      # f32[64,784]; f32[] is a scalar
    DTYPE      ::= "f32" | "f64" | "i32" | "i64" | "u32" | "bool"     # u32: random keys and bits
    VALUE      ::= "%" NAME                  # %0, %x, %params.w1, %3.adj (the cotangent of %3),
                                             # %3.tan (the tangent of %3)
    comment    ::= "#" ["adj of" VALUE | "tan of" VALUE] [API] FILE ":" LINE
                 | "#" PRIM "body from" FILE ":" LINE    # a region's provenance

Semantics that the code generator relies on:
- Elementwise instructions take operands of exactly the result shape, or rank-0 scalars. Every other
  broadcast is an explicit `broadcast_in_dim`.
- Parameters are never written to. Outputs may alias parameters only when an instruction is absent
  (a gradient that is the identity of an input is still a separate value).
- `const` is a splat of one Python number to a shape; `literal` holds an array captured at trace time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

DTYPES = {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64), "i32": np.dtype(np.int32),
          "i64": np.dtype(np.int64), "u32": np.dtype(np.uint32), "bool": np.dtype(np.bool_)}
_NP_TO_DTYPE = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("f32", "f64")
# Integer values (labels, indices) carry no gradient: their cotangents are always None.
INT_DTYPES = ("i32", "i64")


def dtype_of_numpy(dt) -> str:
    """The IR dtype name of a numpy dtype; KeyError if there is none."""
    return _NP_TO_DTYPE[np.dtype(dt)]


class IRError(Exception):
    """Base of the IR's errors; messages name the instruction and the user's file:line."""


class ShapeError(IRError, ValueError):
    """Operand shapes or dtypes do not fit an operation (raised at trace time)."""


class MissingRuleError(IRError, NotImplementedError):
    """A pass has no rule for a primitive."""


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ShapeError(f"unknown dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.size * self.np_dtype.itemsize

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self):
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class TupleType:
    """The type of a structured loop's value: its results' types. Only `result` instructions read
    such a value (each projects one result); it has no buffer of its own (size 0)."""
    types: tuple

    dtype = "tuple"
    shape = ()
    ndim = 0
    size = 0
    nbytes = 0

    def __str__(self):
        return "(" + ", ".join(map(str, self.types)) + ")"


class Value:
    """An SSA value. `instr` is its defining instruction (None for parameters); `hint` a preferred
    printed name; `ct_of` the forward value whose cotangent this is (printed as `%name.adj`);
    `tan_of` the primal value whose tangent this is (printed as `%name.tan`)."""
    __slots__ = ("type", "instr", "hint", "ct_of", "tan_of", "__weakref__")

    def __init__(self, type: TensorType, instr: "Instr | None" = None, hint: str | None = None):
        self.type = type
        self.instr = instr
        self.hint = hint
        self.ct_of = None
        self.tan_of = None

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    @property
    def ndim(self):
        return self.type.ndim

    def __repr__(self):
        return f"<Value {self.hint or hex(id(self))}: {self.type}>"


class Instr:
    """One instruction: `out = prim(*inputs, **params)`.

    `loc` is the user's "file:line"; `api` the user-level operation that emitted it (e.g. "relu" for
    the `le`/`select` pair it lowers to); `adj_of` the forward instruction an adjoint instruction
    came from; `tan_of` the primal instruction a tangent instruction came from."""
    __slots__ = ("prim", "inputs", "params", "out", "loc", "api", "adj_of", "tan_of")

    def __init__(self, prim: "Primitive", inputs, params: dict, out_type: TensorType,
                 loc: str | None = None, api: str | None = None, adj_of: "Instr | None" = None,
                 tan_of: "Instr | None" = None):
        self.prim = prim
        self.inputs = tuple(inputs)
        self.params = dict(params)
        self.out = Value(out_type, self)
        self.loc = loc
        self.api = api
        self.adj_of = adj_of
        self.tan_of = tan_of

    def __repr__(self):
        return f"<Instr {self.prim.name} -> {self.out.type}>"


class Primitive:
    """A primitive operation. Its meaning lives in the registries below, filled by `ir/prims/*`."""
    __slots__ = ("name", "kind")

    def __init__(self, name: str, kind: str = "other"):
        self.name = name
        # kind: "unary", "binary", "compare", "select", "reduce", "layout", "nn", "source", "other";
        # codegen's fusion uses it to recognise elementwise ops.
        self.kind = kind

    def __repr__(self):
        return f"{self.name}_p"

    @property
    def elementwise(self) -> bool:
        return self.kind in ("unary", "binary", "compare", "select", "convert")


class Registry(dict):
    """Rules of one pass, keyed by primitive; a missing rule raises an error naming both."""

    def __init__(self, pass_name: str):
        super().__init__()
        self.pass_name = pass_name

    def __missing__(self, prim):
        name = getattr(prim, "name", prim)
        raise MissingRuleError(f"no {self.pass_name} rule for '{name}'")

    def register(self, prim):
        def deco(fn):
            self[prim] = fn
            return fn
        return deco


primitives: dict[str, Primitive] = {}
# shape_rules[prim](*in_types, **params) -> TensorType; raise ShapeError naming both shapes.
shape_rules = Registry("shape")


def differentiation_rule(rules: Registry, ins: "Instr", mode: str = ""):
    """The rule of `ins`'s primitive in `rules` (adjoint or tangent); a missing one raises
    MissingRuleError naming the operation, the mode and the user's line."""
    try:
        return rules[ins.prim]
    except MissingRuleError as e:
        where = f" at {ins.loc}" if ins.loc else ""
        raise MissingRuleError(f"{e}: cannot differentiate `{ins.api or ins.prim.name}`{mode}"
                               f"{where}") from None


def primitive(name: str, kind: str = "other") -> Primitive:
    if name in primitives:
        raise ValueError(f"primitive {name!r} defined twice")
    p = Primitive(name, kind)
    primitives[name] = p
    return p


class Function:
    """A traced function: parameters, instructions in order, outputs."""

    def __init__(self, name: str, params: list[Value], instrs: list[Instr], outputs: list[Value],
                 origin: str | None = None):
        self.name = name
        # a region's provenance, e.g. "scan body from rnn.py:12" (printed after its header)
        self.origin = origin
        self.params = list(params)
        self.instrs = list(instrs)
        self.outputs = list(outputs)

    def __str__(self):
        return print_function(self)

    @property
    def in_types(self):
        return [p.type for p in self.params]

    @property
    def out_types(self):
        return [o.type for o in self.outputs]


def clone(fn: Function, name: str | None = None) -> Function:
    """A copy of `fn` with fresh instructions and values (provenance links remapped)."""
    vmap, imap = {}, {}
    params = []
    for p in fn.params:
        q = Value(p.type, None, p.hint)
        vmap[id(p)] = q
        params.append(q)
    for p, q in zip(fn.params, params):  # a tangent parameter names the primal one it belongs to
        if p.tan_of is not None:
            q.tan_of = vmap.get(id(p.tan_of))
    instrs = []
    for ins in fn.instrs:
        new = Instr(ins.prim, [vmap[id(v)] for v in ins.inputs], ins.params, ins.out.type,
                    loc=ins.loc, api=ins.api, adj_of=imap.get(id(ins.adj_of), ins.adj_of),
                    tan_of=imap.get(id(ins.tan_of), ins.tan_of))
        new.out.hint = ins.out.hint
        new.out.ct_of = vmap.get(id(ins.out.ct_of)) if ins.out.ct_of is not None else None
        new.out.tan_of = vmap.get(id(ins.out.tan_of)) if ins.out.tan_of is not None else None
        vmap[id(ins.out)] = new.out
        imap[id(ins)] = new
        instrs.append(new)
    return Function(name or fn.name, params, instrs, [vmap[id(o)] for o in fn.outputs],
                    origin=fn.origin)


# ----------------------------------------------------------------------------------------------
# Printer
# ----------------------------------------------------------------------------------------------

def format_param(v: Any) -> str:
    if isinstance(v, np.ndarray):
        if v.size <= 8:
            body = ", ".join(_fmt_number(x) for x in v.ravel().tolist())
            return f"dense<{body}>"
        return f"dense<{v.dtype}{list(v.shape)}>"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(format_param(x) for x in v) + "]"
    if isinstance(v, float):
        return _fmt_number(v)
    return str(v)


def _fmt_number(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        if x == float("inf"):
            return "inf"
        if x == float("-inf"):
            return "-inf"
        return repr(x)
    return str(x)


def _is_inline_const(v: Value) -> bool:
    ins = v.instr
    return ins is not None and ins.prim is primitives["const"] and not ins.out.type.shape


class Namer:
    """Assigns printed names deterministically, in order of definition."""

    def __init__(self):
        self.names: dict[int, str] = {}
        self.used: set[str] = set()
        self.counter = 0

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}.{k}"
            k += 1
        self.used.add(name)
        return name

    def define(self, v: Value) -> str:
        if _is_inline_const(v):
            self.names[id(v)] = _fmt_number(v.instr.params["value"])
            return self.names[id(v)]
        if v.ct_of is not None and id(v.ct_of) in self.names:
            base = self.names[id(v.ct_of)] + ".adj"
        elif v.tan_of is not None and id(v.tan_of) in self.names:
            base = self.names[id(v.tan_of)] + ".tan"
        elif v.hint is not None:
            base = v.hint
        else:
            base = str(self.counter)
            self.counter += 1
        name = self._unique(base)
        self.names[id(v)] = name
        return name

    def ref(self, v: Value) -> str:
        if _is_inline_const(v):
            return _fmt_number(v.instr.params["value"])
        try:
            return "%" + self.names[id(v)]
        except KeyError:
            return "%<undefined>"


def regions(ins: Instr) -> list:
    """(name, Function) of each nested function (region) `ins` carries in its parameters."""
    return [(k, v) for k, v in ins.params.items() if isinstance(v, Function)]


def instr_text(ins: Instr, namer: Namer, with_comment: bool = True) -> str:
    args = ", ".join(namer.ref(v) for v in ins.inputs)
    attrs = []
    for k, v in ins.params.items():
        if isinstance(v, Function):   # a region: printed under the instruction
            continue
        if v is True:
            attrs.append(k)
        elif v is False or v is None:
            continue
        else:
            attrs.append(f"{k}={format_param(v)}")
    text = f"%{namer.names[id(ins.out)]}: {ins.out.type} = {ins.prim.name}"
    if args:
        text += " " + args
    if attrs:
        text += " {" + ", ".join(attrs) + "}"
    if with_comment:
        comment = provenance_comment(ins, namer)
        if comment:
            text = f"{text:<60} # {comment}"
    return text


def provenance_comment(ins: Instr, namer: Namer | None = None) -> str:
    parts = []
    if ins.adj_of is not None:
        known = namer is not None and id(ins.adj_of.out) in namer.names
        ref = namer.ref(ins.adj_of.out) if known else ins.adj_of.prim.name
        parts.append(f"adj of {ref}")
    if ins.tan_of is not None:
        known = namer is not None and id(ins.tan_of.out) in namer.names
        parts.append(f"tan of {namer.ref(ins.tan_of.out) if known else ins.tan_of.prim.name}")
    if ins.api and ins.api != ins.prim.name:
        parts.append(ins.api)
    if ins.loc:
        parts.append(ins.loc)
    return "  ".join(parts)


def print_function(fn: Function, annotate: Callable[[Instr], str | None] | None = None) -> str:
    """Deterministic textual form of `fn` (see the grammar in this module's docstring).

    `annotate(instr)` may return a line printed before that instruction, or a pair (that line or
    None, a tag printed in front of the instruction); codegen uses it to show fusion groups. Its
    attribute `region(instr, name)`, if any, gives the annotator of that region's body."""
    namer = Namer()
    params = []
    for p in fn.params:
        namer.define(p)
        params.append(f"%{namer.names[id(p)]}: {p.type}")
    outs = ", ".join(str(o.type) for o in fn.outputs)
    head = f"func @{fn.name}({', '.join(params)}) -> ({outs}) {{"
    if getattr(fn, "origin", None):
        head = f"{head:<60} # {fn.origin}"
    lines = [head]
    for ins in fn.instrs:
        namer.define(ins.out)
        if _is_inline_const(ins.out):
            continue
        text = instr_text(ins, namer)
        if annotate is not None:
            note = annotate(ins)
            header, tag = note if isinstance(note, tuple) else (note, None)
            if header:
                lines.append("  " + header)
            if tag:
                text = f"{tag} {text}"
        lines.append("  " + text)
        for name, body in regions(ins):
            inner = getattr(annotate, "region", None)
            inner = inner(ins, name) if inner is not None else None
            lines.append(f"    {name}:")
            lines.extend("      " + line for line in print_function(body, inner).split("\n"))
    lines.append("  return " + ", ".join(namer.ref(o) for o in fn.outputs))
    lines.append("}")
    return "\n".join(lines)

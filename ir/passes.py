"""IR optimization passes: dead-code elimination, common-subexpression elimination, constant folding
and algebraic simplification. `optimize` runs them to a fixed point on a copy of the function.

Passes work in place on a function they own (see `optimize`) and keep every instruction's provenance.
Simplifications preserve numpy semantics, NaN and Inf included: `x * 0` is not folded.
"""
from __future__ import annotations

import numpy as np

from .adjoint import clone
from .core import FLOAT_DTYPES, Function, Instr, TensorType, Value, primitives
from .interpreter import impls

# Fold constant expressions whose result has at most this many elements into a `literal`.
FOLD_LIMIT = 4096


def _param_key(v):
    if isinstance(v, np.ndarray):
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (tuple, list)):
        return tuple(_param_key(x) for x in v)
    if isinstance(v, float) and v != v:
        return ("nan",)
    return (type(v).__name__, v)


def _key(ins: Instr):
    return (ins.prim.name, tuple(id(v) for v in ins.inputs),
            tuple(sorted((k, _param_key(v)) for k, v in ins.params.items())))


def _transfer_name(old: Value, new: Value):
    if new.ct_of is None and new.hint is None and old.ct_of is not None and \
            new.instr is not None and new.instr.adj_of is not None:
        new.ct_of = old.ct_of


def _remap_adj_of(fn: Function, imap: dict):
    """Point adjoint provenance at the instruction that replaced a removed forward instruction."""
    if not imap:
        return
    for ins in fn.instrs:
        seen = 0
        while ins.adj_of is not None and id(ins.adj_of) in imap and seen < 100:
            ins.adj_of = imap[id(ins.adj_of)]
            seen += 1


def dce(fn: Function) -> Function:
    """Remove instructions whose results no output needs."""
    live = {id(o) for o in fn.outputs}
    kept = []
    for ins in reversed(fn.instrs):
        if id(ins.out) in live:
            kept.append(ins)
            live.update(id(v) for v in ins.inputs)
    kept.reverse()
    fn.instrs = kept
    return fn


def cse(fn: Function) -> Function:
    """Merge instructions with the same primitive, operands and attributes (the first one stays, so
    a forward value recomputed by an adjoint rule keeps its forward provenance)."""
    seen: dict = {}
    repl: dict[int, Value] = {}
    imap: dict = {}
    kept = []
    for ins in fn.instrs:
        if repl:
            ins.inputs = tuple(repl.get(id(v), v) for v in ins.inputs)
        k = _key(ins)
        prev = seen.get(k)
        if prev is not None:
            repl[id(ins.out)] = prev.out
            imap[id(ins)] = prev
            _transfer_name(ins.out, prev.out)
            continue
        seen[k] = ins
        kept.append(ins)
    fn.instrs = kept
    fn.outputs = [repl.get(id(o), o) for o in fn.outputs]
    _remap_adj_of(fn, imap)
    return fn


# ----------------------------------------------------------------------------------------------
# constant folding and algebraic simplification
# ----------------------------------------------------------------------------------------------
def _splat(v: Value):
    """The number a value is filled with, if it is a `const` splat; else None."""
    ins = v.instr
    if ins is not None and ins.prim.name == "const":
        return ins.params["value"]
    return None


def _const_array(v: Value):
    ins = v.instr
    if ins is None:
        return None
    if ins.prim.name == "const":
        return impls[ins.prim](**ins.params)
    if ins.prim.name == "literal":
        return ins.params["value"]
    return None


def _replacement(ins: Instr, prim, inputs, params, out_type=None) -> Instr:
    """A new instruction standing in for `ins`: its provenance and printed name carry over."""
    new = Instr(prim, tuple(inputs), params, out_type or ins.out.type, loc=ins.loc, api=ins.api,
                adj_of=ins.adj_of)
    new.out.hint, new.out.ct_of = ins.out.hint, ins.out.ct_of
    return new


def _new_const(ins: Instr, array: np.ndarray) -> Instr:
    """A const (splat) or literal instruction computing `array`, with `ins`'s provenance."""
    t = ins.out.type
    flat = array.ravel()
    uniform = flat.size and (np.all(flat == flat[0]) or
                             (t.dtype in FLOAT_DTYPES and np.all(np.isnan(flat))))
    if uniform:
        first = flat[0].item()
        value = float(first) if t.dtype in FLOAT_DTYPES else (
            bool(first) if t.dtype == "bool" else int(first))
        return _replacement(ins, primitives["const"], (),
                            dict(value=value, shape=t.shape, dtype=t.dtype))
    arr = np.ascontiguousarray(array, dtype=t.np_dtype)
    arr.setflags(write=False)
    return _replacement(ins, primitives["literal"], (), dict(value=arr))


def _fold(ins: Instr):
    if ins.prim.kind == "source" or not ins.inputs:
        return None
    consts = [_const_array(v) for v in ins.inputs]
    if any(c is None for c in consts):
        return None
    all_splats = all(_splat(v) is not None for v in ins.inputs)
    if not all_splats and ins.out.type.size > FOLD_LIMIT:
        return None
    if all_splats and ins.prim.kind not in ("unary", "binary", "compare", "select", "convert",
                                            "layout", "reduce") and ins.out.type.size > FOLD_LIMIT:
        return None
    with np.errstate(all="ignore"):
        out = np.asarray(impls[ins.prim](*consts, **ins.params), dtype=ins.out.type.np_dtype)
    return _new_const(ins, np.broadcast_to(out, ins.out.type.shape))


def _same(v: Value, out: TensorType) -> bool:
    return v.type == out


def _scalar_const(ins: Instr, value: float) -> Value:
    """A rank-0 constant operand for a rewritten instruction (printed inline; never scheduled)."""
    t = ins.out.type
    c = Instr(primitives["const"], (), dict(value=value, shape=(), dtype=t.dtype),
              TensorType(t.dtype, ()), loc=ins.loc, api=ins.api, adj_of=ins.adj_of)
    return c.out


def _is_t2(v: Value) -> bool:
    """Is `v` a 2-d transpose (perm (1, 0))?"""
    return v.instr is not None and v.instr.prim.name == "transpose" and \
        v.instr.params["perm"] == (1, 0)


def _simplify(ins: Instr, uses: dict):
    """An existing value equal to `ins`'s result, a replacement instruction, or None."""
    name = ins.prim.name
    t = ins.out.type
    ins_ = ins.inputs
    if name == "add" and ins_[0] is ins_[1] and _same(ins_[0], t):
        return _replacement(ins, primitives["mul"], (ins_[0], _scalar_const(ins, 2.0)), {})
    if name in ("add", "sub"):
        a, b = ins_
        if _splat(b) == 0 and _same(a, t):
            return a
        if name == "add" and _splat(a) == 0 and _same(b, t):
            return b
    elif name in ("mul", "div"):
        a, b = ins_
        if _splat(b) == 1 and _same(a, t):
            return a
        if name == "mul" and _splat(a) == 1 and _same(b, t):
            return b
    elif name == "neg":
        (a,) = ins_
        if a.instr is not None and a.instr.prim.name == "neg":
            return a.instr.inputs[0]
    elif name == "integer_pow" and ins.params["y"] == 1:
        return ins_[0]
    elif name == "select":
        p, a, b = ins_
        if a is b and _same(a, t):
            return a
        pv = _splat(p)
        if pv is not None and _same(a, t) and _same(b, t):
            return a if pv else b
    elif name in ("reshape", "broadcast_in_dim", "convert") and _same(ins_[0], t):
        return ins_[0]
    elif name == "reshape":
        a = ins_[0]
        if a.instr is not None and a.instr.prim.name == "reshape":
            return _replacement(ins, ins.prim, a.instr.inputs, ins.params)
    elif name == "matmul":
        # a 2-d transpose feeding a matmul becomes its trans flag: no copy of the operand
        a, b = ins_
        flags = dict(ins.params)
        changed = False
        if _is_t2(a):
            a, flags["trans_a"], changed = a.instr.inputs[0], not flags.get("trans_a"), True
        if _is_t2(b):
            b, flags["trans_b"], changed = b.instr.inputs[0], not flags.get("trans_b"), True
        if changed:
            return _replacement(ins, ins.prim, (a, b), flags)
    elif name == "transpose" and _is_t2(ins.out) and ins_[0].instr is not None and \
            ins_[0].instr.prim.name == "matmul" and uses.get(id(ins_[0]), 0) == 1:
        # (op(A) op(B))^T = op(B)^T op(A)^T: one matmul with swapped operands, no transpose
        mm = ins_[0].instr
        a, b = mm.inputs
        flags = dict(trans_a=not mm.params.get("trans_b"), trans_b=not mm.params.get("trans_a"))
        return _replacement(ins, mm.prim, (b, a), flags)
    elif name == "transpose":
        a = ins_[0]
        if a.instr is not None and a.instr.prim.name == "transpose":
            inner, outer = a.instr.params["perm"], ins.params["perm"]
            perm = tuple(inner[p] for p in outer)
            src = a.instr.inputs[0]
            if perm == tuple(range(len(perm))):
                return src
            return _replacement(ins, ins.prim, (src,), dict(perm=perm))
    return None


def simplify(fn: Function) -> bool:
    """Constant folding and algebraic simplification; returns whether anything changed."""
    changed = False
    repl: dict[int, Value] = {}
    out = []
    imap: dict = {}
    defined = {id(i) for i in fn.instrs}
    uses: dict[int, int] = {}
    for i in fn.instrs:
        for v in i.inputs:
            uses[id(v)] = uses.get(id(v), 0) + 1
    for o in fn.outputs:
        uses[id(o)] = uses.get(id(o), 0) + 1
    for ins in fn.instrs:
        if repl:
            ins.inputs = tuple(repl.get(id(v), v) for v in ins.inputs)
        r = _fold(ins) or _simplify(ins, uses)
        if isinstance(r, Value):
            repl[id(ins.out)] = r
            if r.instr is not None:
                imap[id(ins)] = r.instr
            _transfer_name(ins.out, r)
            changed = True
            continue
        if isinstance(r, Instr):
            repl[id(ins.out)] = r.out
            imap[id(ins)] = r
            # constants a rewrite created (see _scalar_const) are defined right before their use
            out.extend(x.instr for x in r.inputs if x.instr is not None and id(x.instr) not in
                       defined and x.instr.prim.name == "const")
            ins = r
            changed = True
        defined.add(id(ins))
        out.append(ins)
    fn.instrs = out
    fn.outputs = [repl.get(id(o), o) for o in fn.outputs]
    _remap_adj_of(fn, imap)
    return changed


def relu_mask_from_output(fn: Function) -> bool:
    """Where `r = select(le(v, 0), 0, v)` (relu) exists, other uses of the mask `le(v, 0)` (the
    adjoint's) read `le(r, 0)` instead: the same mask (r <= 0 exactly where v <= 0, NaN
    included), but computed from the relu output, which the next layer keeps anyway, so the
    pre-activation `v` has one use and can stay in registers inside the producing kernel."""
    relu_of: dict[int, Instr] = {}   # id(mask) -> relu select
    for ins in fn.instrs:
        if _relu_of(ins.out) is not None and ins.inputs[2].shape == ins.out.shape:
            relu_of.setdefault(id(ins.inputs[0]), ins)
    if not relu_of:
        return False
    out, changed, new_mask = [], False, {}
    for ins in fn.instrs:
        for k, x in enumerate(ins.inputs):
            relu = relu_of.get(id(x))
            if relu is None or ins is relu:
                continue
            mask = new_mask.get(id(x))
            if mask is None:
                m = x.instr
                mask = Instr(m.prim, (relu.out, m.inputs[1]), m.params, m.out.type, loc=m.loc,
                             api=m.api, adj_of=ins.adj_of)
                out.append(mask)
                new_mask[id(x)] = mask
            ins.inputs = ins.inputs[:k] + (mask.out,) + ins.inputs[k + 1:]
            changed = True
        out.append(ins)
    fn.instrs = out
    return changed


def _relu_of(v: Value):
    """If `v = select(le(u, 0), 0, u)` (relu), return u; else None."""
    ins = v.instr
    if ins is None or ins.prim.name != "select":
        return None
    p, a, b = ins.inputs
    m = p.instr
    if m is not None and m.prim.name == "le" and m.inputs[0] is b and _splat(m.inputs[1]) == 0 \
            and _splat(a) == 0:
        return b
    return None


def mask_after_max_pool(fn: Function) -> bool:
    """select(r <= 0, 0, max_pool2d_grad(ct, idx)) with r = relu(u) and idx = argmax of r's
    windows becomes max_pool2d_grad(select(max_pool2d(r) <= 0, 0, ct), idx): the same values (the
    scatter only writes at window maxima, where r equals the pooled value), but the backward pass
    then needs the small pooled output and indices instead of the full activation r."""
    by_key = {}
    for ins in fn.instrs:
        if ins.prim.name == "max_pool2d":
            by_key[(id(ins.inputs[0]), _key(ins)[2])] = ins.out
    out, changed = [], False
    repl: dict[int, Value] = {}
    for ins in fn.instrs:
        if repl:
            ins.inputs = tuple(repl.get(id(v), v) for v in ins.inputs)
        rewrite = None
        if ins.prim.name == "select" and _splat(ins.inputs[1]) == 0:
            p, _, g = ins.inputs
            m = p.instr
            gi = g.instr
            if m is not None and m.prim.name == "le" and _splat(m.inputs[1]) == 0 and \
                    gi is not None and gi.prim.name == "max_pool2d_grad" and \
                    _relu_of(m.inputs[0]) is not None:
                r = m.inputs[0]
                ct, idx = gi.inputs
                am = idx.instr
                if am is not None and am.prim.name == "max_pool2d_argmax" and am.inputs[0] is r:
                    pooled = by_key.get((id(r), _key(am)[2]))
                    if pooled is not None and pooled.shape == ct.shape:
                        rewrite = (pooled, ct, idx, gi, m)
        if rewrite is None:
            out.append(ins)
            continue
        pooled, ct, idx, gi, m = rewrite
        zero = _scalar_const(ins, 0.0)
        mask = Instr(m.prim, (pooled, zero), {}, m.out.type.with_shape(pooled.shape), loc=m.loc,
                     api=m.api, adj_of=ins.adj_of)
        masked = Instr(ins.prim, (mask.out, zero, ct), {}, ct.type, loc=ins.loc, api=ins.api,
                       adj_of=ins.adj_of)
        scatter = Instr(gi.prim, (masked.out, idx), gi.params, ins.out.type, loc=gi.loc,
                        api=gi.api, adj_of=gi.adj_of)
        scatter.out.hint, scatter.out.ct_of = ins.out.hint, ins.out.ct_of
        out.extend([zero.instr, mask, masked, scatter])
        repl[id(ins.out)] = scatter.out
        changed = True
    fn.instrs = out
    fn.outputs = [repl.get(id(o), o) for o in fn.outputs]
    return changed


def optimize(fn: Function, name: str | None = None) -> Function:
    """A simplified copy of `fn` (DCE, CSE, constant folding, algebraic simplification)."""
    fn = clone(fn, name)
    for _ in range(10):
        changed = simplify(fn)
        changed = relu_mask_from_output(fn) or changed
        changed = mask_after_max_pool(fn) or changed
        n = len(fn.instrs)
        cse(fn)
        dce(fn)
        if not changed and len(fn.instrs) == n:
            break
    return fn

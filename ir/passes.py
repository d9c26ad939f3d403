"""IR optimization passes: dead-code elimination, common-subexpression elimination, constant folding
and algebraic simplification. `optimize` runs them to a fixed point on a copy of the function.

Passes work in place on a function they own (see `optimize`) and keep every instruction's provenance.
Simplifications preserve numpy semantics, NaN and Inf included: `x * 0` is not folded.

The algebraic rewrites are one table keyed by primitive (`rewrites`); every instruction a pass
builds gets its type from its primitive's shape rule. Two of the rewrites give one canonical form
to equivalent spellings (a comparison's constant on the right, a select's predicate not negated),
so the patterns that follow (relu, the masks of its adjoint) are each stated once.
"""
from __future__ import annotations

import numpy as np

from .core import FLOAT_DTYPES, Function, Instr, IRError, Value, clone, regions, shape_rules
from .interpreter import impls
from .prims.elementwise import (
    add_p, const_p, convert_p, div_p, eq_p, ge_p, gt_p, integer_pow_p, le_p, literal_p, lt_p,
    max_p, mul_p, ne_p, neg_p, not_p, select_p, sub_p)
from .prims.control import result_p, scan_p
from .prims.linalg import matmul_p
from .prims.nn import max_pool2d_argmax_p, max_pool2d_grad_p, max_pool2d_p
from .prims.reduce import reduce_sum_p
from .prims.structural import broadcast_in_dim_p, reshape_p, slice_p, transpose_p

# Fold constant expressions whose result has at most this many elements into a `literal`.
FOLD_LIMIT = 4096


def _param_key(v):
    if isinstance(v, np.ndarray):
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (tuple, list)):
        return tuple(_param_key(x) for x in v)
    if isinstance(v, float):
        # by bits, not by value: -0.0 == 0.0, but 1 / -0.0 is -inf (and nan != nan)
        return ("float", v.hex())
    return (type(v).__name__, v)


def _key(ins: Instr):
    return (ins.prim, tuple(id(v) for v in ins.inputs),
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
# building replacement instructions
# ----------------------------------------------------------------------------------------------
_LIKE = object()


def _new_instr(prim, inputs, params, like: Instr, adj_of=_LIKE) -> Instr:
    """A new instruction whose type comes from `prim`'s shape rule, with `like`'s location and API
    name and the adjoint provenance `adj_of` (by default `like`'s)."""
    out_type = shape_rules[prim](*[v.type for v in inputs], **params)
    return Instr(prim, tuple(inputs), params, out_type, loc=like.loc, api=like.api,
                 adj_of=like.adj_of if adj_of is _LIKE else adj_of)


def _replacement(ins: Instr, prim, inputs, params, like: Instr | None = None) -> Instr:
    """A new instruction standing in for `ins`: its printed name carries over, and the provenance
    of `like` (by default `ins`'s). A rewrite that would change the result's type is a bug in the
    rewrite: IRError."""
    new = _new_instr(prim, inputs, params, like or ins)
    if new.out.type != ins.out.type:
        raise IRError(f"rewriting {ins.prim.name} -> {ins.out.type} as {prim.name} would give "
                      f"{new.out.type} (at {ins.loc})")
    new.out.hint, new.out.ct_of = ins.out.hint, ins.out.ct_of
    return new


def _scalar_const(ins: Instr, value: float) -> Value:
    """A rank-0 constant operand for a rewritten instruction (printed inline; never scheduled)."""
    return _new_instr(const_p, (), dict(value=value, shape=(), dtype=ins.out.dtype), ins).out


# ----------------------------------------------------------------------------------------------
# constant folding
# ----------------------------------------------------------------------------------------------
def _splat(v: Value):
    """The number a value is filled with, if it is a `const` splat; else None."""
    ins = v.instr
    if ins is not None and ins.prim is const_p:
        return ins.params["value"]
    return None


def _const_array(v: Value):
    ins = v.instr
    if ins is None:
        return None
    if ins.prim is const_p:
        return impls[ins.prim](**ins.params)
    if ins.prim is literal_p:
        return ins.params["value"]
    return None


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
        return _replacement(ins, const_p, (), dict(value=value, shape=t.shape, dtype=t.dtype))
    arr = np.ascontiguousarray(array, dtype=t.np_dtype)
    arr.setflags(write=False)
    return _replacement(ins, literal_p, (), dict(value=arr))


def _fold(ins: Instr):
    if ins.prim.kind in ("source", "control") or not ins.inputs:
        return None
    consts = [_const_array(v) for v in ins.inputs]
    if any(c is None for c in consts):
        return None
    all_splats = all(_splat(v) is not None for v in ins.inputs)
    # a slice or transpose of a literal is no larger than it: folded at any size (jacfwd's basis
    # of unit tangents, sliced per parameter, would otherwise be copied out on every call)
    if not all_splats and ins.out.type.size > FOLD_LIMIT and ins.prim not in (slice_p,
                                                                              transpose_p):
        return None
    if all_splats and ins.prim.kind not in ("unary", "binary", "compare", "select", "convert",
                                            "layout", "reduce") and ins.out.type.size > FOLD_LIMIT:
        return None
    with np.errstate(all="ignore"):
        out = np.asarray(impls[ins.prim](*consts, **ins.params), dtype=ins.out.type.np_dtype)
    return _new_const(ins, np.broadcast_to(out, ins.out.type.shape))


# ----------------------------------------------------------------------------------------------
# algebraic simplification: one table of rewrites keyed by primitive
# ----------------------------------------------------------------------------------------------
class _Rewrites(dict):
    """Rewrite rules keyed by primitive, tried in order of registration (tinygrad's
    PatternMatcher). A rule `rule(ins, uses)` returns an existing value equal to `ins`'s result, a
    replacement instruction, or None when it does not apply; a primitive without rules is left
    alone."""

    def register(self, *prims):
        def deco(rule):
            for p in prims:
                self.setdefault(p, []).append(rule)
            return rule
        return deco

    def apply(self, ins: Instr, uses: dict):
        for rule in self.get(ins.prim, ()):
            r = rule(ins, uses)
            if r is not None:
                return r
        return None


rewrites = _Rewrites()

# Comparisons with their operands swapped: cmp(a, b) == MIRRORED[cmp](b, a) everywhere, NaN
# included (every comparison with NaN is false but `ne`).
MIRRORED = {lt_p: gt_p, gt_p: lt_p, le_p: ge_p, ge_p: le_p, eq_p: eq_p, ne_p: ne_p}


def _defined_by(v: Value, prim) -> Instr | None:
    """`v`'s defining instruction if it is a `prim` instruction; else None."""
    ins = v.instr
    return ins if ins is not None and ins.prim is prim else None


@rewrites.register(*MIRRORED)
def _constant_on_the_right(ins, uses):
    # one canonical form per comparison with a constant, so the patterns below (and CSE) see
    # `0 >= x` as `x <= 0`
    a, b = ins.inputs
    if _splat(a) is not None and _splat(b) is None:
        return _replacement(ins, MIRRORED[ins.prim], (b, a), ins.params)


@rewrites.register(add_p)
def _add_self(ins, uses):
    a, b = ins.inputs
    if a is b and a.type == ins.out.type:
        return _replacement(ins, mul_p, (a, _scalar_const(ins, 2.0)), {})


# x + 0 = x - 0 = x * 1 = x / 1 = x; the commutative ones also with the constant first
_IDENTITY = {add_p: (0, True), sub_p: (0, False), mul_p: (1, True), div_p: (1, False)}


@rewrites.register(*_IDENTITY)
def _identity_operand(ins, uses):
    unit, commutative = _IDENTITY[ins.prim]
    a, b = ins.inputs
    if _splat(b) == unit and a.type == ins.out.type:
        return a
    if commutative and _splat(a) == unit and b.type == ins.out.type:
        return b


@rewrites.register(neg_p)
def _neg_neg(ins, uses):
    inner = _defined_by(ins.inputs[0], neg_p)
    return inner.inputs[0] if inner is not None else None


@rewrites.register(integer_pow_p)
def _pow_one(ins, uses):
    return ins.inputs[0] if ins.params["y"] == 1 else None


@rewrites.register(select_p)
def _select_known(ins, uses):
    p, a, b = ins.inputs
    if a is b and a.type == ins.out.type:
        return a
    pv = _splat(p)
    if pv is not None and a.type == ins.out.type and b.type == ins.out.type:
        return a if pv else b


@rewrites.register(select_p)
def _select_not(ins, uses):
    # select(not p, a, b) = select(p, b, a): one canonical form for the patterns below
    p, a, b = ins.inputs
    n = _defined_by(p, not_p)
    if n is not None:
        return _replacement(ins, select_p, (n.inputs[0], b, a), {})


@rewrites.register(reshape_p, broadcast_in_dim_p, convert_p)
def _same_type(ins, uses):
    x = ins.inputs[0]
    return x if x.type == ins.out.type else None


@rewrites.register(reshape_p)
def _reshape_reshape(ins, uses):
    inner = _defined_by(ins.inputs[0], reshape_p)
    if inner is not None:
        return _replacement(ins, reshape_p, inner.inputs, ins.params)


def _swaps_last_two(v: Value) -> bool:
    """Is `v` a transpose of its last two axes only (a matrix transpose of every batch entry)?"""
    t = _defined_by(v, transpose_p)
    n = v.ndim
    return t is not None and n >= 2 and t.params["perm"] == tuple(range(n - 2)) + (n - 1, n - 2)


@rewrites.register(matmul_p)
def _transpose_into_matmul(ins, uses):
    # a transpose of the last two axes feeding a matmul becomes its trans flag: no copy of the
    # operand
    a, b = ins.inputs
    flags = dict(ins.params)
    changed = False
    if _swaps_last_two(a):
        a, flags["trans_a"], changed = a.instr.inputs[0], not flags.get("trans_a"), True
    if _swaps_last_two(b):
        b, flags["trans_b"], changed = b.instr.inputs[0], not flags.get("trans_b"), True
    if changed:
        return _replacement(ins, matmul_p, (a, b), flags)


@rewrites.register(transpose_p)
def _transpose_of_matmul(ins, uses):
    # (op(A) op(B))^T = op(B)^T op(A)^T: one matmul with swapped operands, no transpose
    mm = _defined_by(ins.inputs[0], matmul_p)
    if _swaps_last_two(ins.out) and mm is not None and uses.get(id(ins.inputs[0]), 0) == 1:
        a, b = mm.inputs
        flags = dict(trans_a=not mm.params.get("trans_b"), trans_b=not mm.params.get("trans_a"))
        return _replacement(ins, matmul_p, (b, a), flags)


@rewrites.register(transpose_p)
def _transpose_transpose(ins, uses):
    inner = _defined_by(ins.inputs[0], transpose_p)
    if inner is not None:
        perm = tuple(inner.params["perm"][p] for p in ins.params["perm"])
        src = inner.inputs[0]
        if perm == tuple(range(len(perm))):
            return src
        return _replacement(ins, transpose_p, (src,), dict(perm=perm))


@rewrites.register(reduce_sum_p)
def _sum_of_max_pool_scatter(ins, uses):
    # A sum over the spatial axes of max_pool2d_grad(ct, idx) is the same sum of ct: the scatter
    # adds each cotangent element at one position of its plane (the first maximum of its window,
    # never in the padding: the shape rule keeps every window on a real element), so both sums
    # add the same terms, in another order. The cotangent is the pooled size (a quarter for 2x2
    # windows) and the kernel that makes it has just written it: LeNet-5's conv1 bias gradient.
    gi = _defined_by(ins.inputs[0], max_pool2d_grad_p)
    if gi is None or not {2, 3} <= set(ins.params["axes"]):
        return None
    ct, idx = gi.inputs
    if _defined_by(idx, max_pool2d_argmax_p) is None:
        return None
    return _replacement(ins, reduce_sum_p, (ct,), ins.params)


def simplify(fn: Function) -> bool:
    """Constant folding and algebraic simplification; returns whether anything changed."""
    changed = False
    repl: dict[int, Value] = {}
    out = []
    imap: dict = {}
    defined = {id(i) for i in fn.instrs}
    uses = _uses(fn)
    for ins in fn.instrs:
        if repl:
            ins.inputs = tuple(repl.get(id(v), v) for v in ins.inputs)
        r = _fold(ins) or rewrites.apply(ins, uses)
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
                       defined and x.instr.prim is const_p)
            ins = r
            changed = True
        defined.add(id(ins))
        out.append(ins)
    fn.instrs = out
    fn.outputs = [repl.get(id(o), o) for o in fn.outputs]
    _remap_adj_of(fn, imap)
    return changed


# ----------------------------------------------------------------------------------------------
# relu patterns
# ----------------------------------------------------------------------------------------------
def _compared_with_zero(v: Value):
    """(cmp, u) if `v = cmp(u, 0)` (the constant on the right, as `simplify` leaves it); else
    None."""
    ins = v.instr
    if ins is not None and ins.prim in MIRRORED and _splat(ins.inputs[1]) == 0:
        return ins.prim, ins.inputs[0]
    return None


def _relu_of(v: Value):
    """If `v` is relu(u) in one of its spellings, (u, the comparisons `cmp` with
    cmp(v, 0) == cmp(u, 0) everywhere); else None.

    Every spelling is u where u > 0 and a zero where u <= 0, so `gt` reads the same on v as on u;
    `le` does too when NaN stays NaN (u on the select's false branch, or maximum), not when NaN
    becomes 0. The spellings, in the canonical forms `simplify` leaves (constant on the right of
    a comparison, predicate not negated):
        select(u <= 0, 0, u), select(u < 0, 0, u)      NaN stays NaN
        select(u > 0, u, 0), select(u >= 0, u, 0)      NaN becomes 0
        max(u, 0), max(0, u)                           NaN stays NaN
    """
    ins = v.instr
    if ins is None:
        return None
    if ins.prim is max_p:
        a, b = ins.inputs
        u = a if _splat(b) == 0 else b if _splat(a) == 0 else None
        return None if u is None else (u, (le_p, gt_p))
    if ins.prim is not select_p:
        return None
    p, a, b = ins.inputs
    cmp = _compared_with_zero(p)
    if cmp is None:
        return None
    cmp, u = cmp
    if cmp in (le_p, lt_p) and _splat(a) == 0 and b is u:
        return u, (le_p, gt_p)
    if cmp in (gt_p, ge_p) and a is u and _splat(b) == 0:
        return u, (gt_p,)
    return None


def relu_mask_from_output(fn: Function) -> bool:
    """Where `r = relu(v)` exists (any spelling `_relu_of` knows), the masks `cmp(v, 0)` that read
    the same on r (the adjoint's) are computed as `cmp(r, 0)` instead, from the relu output, which
    the next layer keeps anyway, so the pre-activation `v` has one use and can stay in registers
    inside the producing kernel."""
    relus: dict[int, tuple] = {}   # id(v) -> (r, the comparisons that read the same on r)
    for ins in fn.instrs:
        m = _relu_of(ins.out)
        if m is not None and m[0].shape == ins.out.shape:
            relus.setdefault(id(m[0]), (ins.out, m[1]))
    if not relus:
        return False
    out, changed, new_mask = [], False, {}
    defined: set[int] = set()
    for ins in fn.instrs:
        for k, x in enumerate(ins.inputs):
            cmp = _compared_with_zero(x)
            found = relus.get(id(cmp[1])) if cmp is not None else None
            if found is None:
                continue
            r, same = found
            # the relu itself keeps its mask; uses before r is defined cannot read it
            if cmp[0] not in same or ins is r.instr or id(r) not in defined:
                continue
            mask = new_mask.get(id(x))
            if mask is None:
                m = x.instr
                mask = _new_instr(m.prim, (r, m.inputs[1]), m.params, m, adj_of=ins.adj_of)
                out.append(mask)
                new_mask[id(x)] = mask
            ins.inputs = ins.inputs[:k] + (mask.out,) + ins.inputs[k + 1:]
            changed = True
        out.append(ins)
        defined.add(id(ins.out))
    fn.instrs = out
    return changed


def mask_after_max_pool(fn: Function) -> bool:
    """select(cmp(r, 0), 0, g) with g = max_pool2d_grad(ct, idx), r = relu(u) and idx = argmax of
    r's windows becomes max_pool2d_grad(select(cmp(max_pool2d(r), 0), 0, ct), idx) (and likewise
    with the select's branches swapped): the same values (the scatter only writes at window
    maxima, where r equals the pooled value), but the backward pass then needs the small pooled
    output and indices instead of the full activation r."""
    by_key = {}
    for ins in fn.instrs:
        if ins.prim is max_pool2d_p:
            by_key[(id(ins.inputs[0]), _key(ins)[2])] = ins.out
    out, changed = [], False
    repl: dict[int, Value] = {}
    for ins in fn.instrs:
        if repl:
            ins.inputs = tuple(repl.get(id(v), v) for v in ins.inputs)
        rewrite = None
        if ins.prim is select_p:
            p, a, b = ins.inputs
            g_at = 2 if _splat(a) == 0 else 1 if _splat(b) == 0 else None
            cmp = _compared_with_zero(p)
            gi = None if g_at is None else _defined_by(ins.inputs[g_at], max_pool2d_grad_p)
            if cmp is not None and gi is not None and _relu_of(cmp[1]) is not None:
                r = cmp[1]
                ct, idx = gi.inputs
                am = _defined_by(idx, max_pool2d_argmax_p)
                if am is not None and am.inputs[0] is r:
                    pooled = by_key.get((id(r), _key(am)[2]))
                    if pooled is not None and pooled.shape == ct.shape:
                        rewrite = (pooled, ct, idx, gi, p.instr, g_at)
        if rewrite is None:
            out.append(ins)
            continue
        pooled, ct, idx, gi, m, g_at = rewrite
        zero = _scalar_const(ins, 0.0)
        mask = _new_instr(m.prim, (pooled, zero), {}, m, adj_of=ins.adj_of)
        branches = (zero, ct) if g_at == 2 else (ct, zero)
        masked = _new_instr(select_p, (mask.out, *branches), {}, ins)
        scatter = _replacement(ins, max_pool2d_grad_p, (masked.out, idx), gi.params, like=gi)
        out.extend([zero.instr, mask, masked, scatter])
        repl[id(ins.out)] = scatter.out
        changed = True
    fn.instrs = out
    fn.outputs = [repl.get(id(o), o) for o in fn.outputs]
    return changed


# ----------------------------------------------------------------------------------------------
# structured loops
# ----------------------------------------------------------------------------------------------
def loops(fn: Function) -> bool:
    """For each scan: drop the stacked results nobody reads, hoist the instructions of its body
    that depend only on its consts (loop-invariant) out of the loop, and drop the operands its
    body no longer reads. Returns whether anything changed."""
    projections: dict[int, list] = {}
    for ins in fn.instrs:
        if ins.prim is result_p:
            projections.setdefault(id(ins.inputs[0]), []).append(ins)
    out, changed = [], False
    repl: dict[int, Value] = {}
    dropped: set = set()
    for ins in fn.instrs:
        if repl:
            ins.inputs = tuple(repl.get(id(v), v) for v in ins.inputs)
        if id(ins) in dropped:
            continue
        after = []
        if ins.prim is scan_p:
            projs = projections.get(id(ins.out), [])
            hoisted = _prune_scan(ins, projs)
            if hoisted is not None:
                out.extend(hoisted)
                changed = True
            if ins.params["length"] > 0:
                batched = _batch_xs_matmuls(ins)
                if batched:
                    out.extend(batched)
                    changed = True
                sums = _batch_sums(ins, projs)
                if sums is not None:
                    after, replaced = sums
                    for r, v in replaced:
                        repl[id(r.out)] = v
                        dropped.add(id(r))
                    changed = True
        out.append(ins)
        out.extend(after)
    fn.instrs = out
    fn.outputs = [repl.get(id(o), o) for o in fn.outputs]
    return changed


def _uses(fn: Function) -> dict:
    """id(value) -> how many times the instructions and the outputs of `fn` read it."""
    uses: dict[int, int] = {}
    for ins in fn.instrs:
        for v in ins.inputs:
            uses[id(v)] = uses.get(id(v), 0) + 1
    for o in fn.outputs:
        uses[id(o)] = uses.get(id(o), 0) + 1
    return uses


def _batch_xs_matmuls(ins: Instr) -> list:
    """`x @ w` in a scan body, with `x` a slice of xs and `w` a const, becomes one matmul over
    all the steps before the loop ([T*B, D] @ w, as cuDNN does for the input projection of an
    RNN), read per step as a new xs. Rewrites `ins` in place; returns the new instructions to
    place before it."""
    p = ins.params
    nc, nx = p["num_carry"], p["num_xs"]
    steps = p["length"]
    body = p["body"]
    params = body.params
    xs_of = {id(q): ins.inputs[nc + j] for j, q in enumerate(params[nc:nc + nx])}
    consts_of = {id(q): ins.inputs[nc + nx + j] for j, q in enumerate(params[nc + nx:])}
    found = [m for m in body.instrs if m.prim is matmul_p and not m.params.get("trans_a")
             and id(m.inputs[0]) in xs_of and id(m.inputs[1]) in consts_of]
    if not found:
        return []
    body = clone(body)
    imap = {id(a): b for a, b in zip(p["body"].instrs, body.instrs)}
    before, new_params, new_xs, repl = [], [], [], {}
    for m in found:
        x, w = m.inputs
        xs = xs_of[id(x)]
        flat = _new_instr(reshape_p, (xs,), dict(shape=(steps * x.shape[0], x.shape[1])), m)
        mm = _new_instr(matmul_p, (flat.out, consts_of[id(w)]), dict(m.params), m)
        stacked = _new_instr(reshape_p, (mm.out,), dict(shape=(steps,) + m.out.shape), m)
        before += [flat, mm, stacked]
        q = Value(m.out.type, None, m.out.hint)
        new_params.append(q)
        new_xs.append(stacked.out)
        repl[id(imap[id(m)].out)] = q
    for b_ins in body.instrs:
        b_ins.inputs = tuple(repl.get(id(v), v) for v in b_ins.inputs)
    body.outputs = [repl.get(id(o), o) for o in body.outputs]
    dce(body)
    body.params = body.params[:nc + nx] + new_params + body.params[nc + nx:]
    ins.inputs = ins.inputs[:nc + nx] + tuple(new_xs) + ins.inputs[nc + nx:]
    p["body"] = body
    p["num_xs"] = nx + len(new_xs)
    ins.out.type = shape_rules[scan_p](*[v.type for v in ins.inputs], **p)
    return before


def _batch_sums(ins: Instr, projections: list):
    """A carry that only accumulates, `acc = acc + v` (acc read nowhere else in the body), is a
    sum over the steps: `v` (or, for `v = a^T b`, its operands; for `v = sum(u)`, `u`) becomes a
    stacked result and the sum one instruction after the loop, so `a^T b` is one matmul over all
    steps ([T*B, m]^T [T*B, n]: the weight gradients of an RNN, as cuDNN computes them) instead of
    one small matmul per step. Rewrites `ins` in place; returns (the instructions to place after
    it, [(projection of the removed carry, the value replacing it)]), or None."""
    p = ins.params
    nc, nx = p["num_carry"], p["num_xs"]
    steps = p["length"]
    body = clone(p["body"])
    uses = _uses(body)
    params = body.params
    xs_params = {id(q): j for j, q in enumerate(params[nc:nc + nx])}
    sums = []   # (carry index, how, values to stack)
    for k in range(nc):
        c, o = params[k], body.outputs[k]
        add = o.instr
        if add is None or add.prim is not add_p or uses.get(id(c), 0) != 1 \
                or uses.get(id(o), 0) != 1 or c.dtype not in FLOAT_DTYPES:
            continue
        a, b = add.inputs
        v = b if a is c else a if b is c else None
        if v is None or v.type != c.type or v is c:
            continue
        m = v.instr
        if m is not None and m.prim is matmul_p and m.params.get("trans_a") \
                and not m.params.get("trans_b") and m.inputs[0] is not m.inputs[1]:
            sums.append((k, "matmul", m.inputs))
        elif m is not None and m.prim is reduce_sum_p:
            sums.append((k, ("sum", m.params["axes"]), (m.inputs[0],)))
        elif v.type.size <= FOLD_LIMIT:
            sums.append((k, ("sum", ()), (v,)))
    # a stacked value must be a step's value: not a const parameter
    consts = {id(q) for q in params[nc + nx:]}
    sums = [s for s in sums if not any(id(v) in consts for v in s[2])]
    if not sums:
        return None
    removed = {k for k, _, _ in sums}
    n_out = len(body.outputs)
    stacked: dict[int, int] = {}   # id(body value) -> index among the new ys
    new_ys = []
    for _, _, vals in sums:
        for v in vals:
            if id(v) not in xs_params and id(v) not in stacked:
                stacked[id(v)] = len(new_ys)
                new_ys.append(v)
    keep = [k for k in range(nc) if k not in removed]
    inits = {k: ins.inputs[k] for k in removed}
    body.params = [params[k] for k in keep] + params[nc:]
    body.outputs = [body.outputs[k] for k in keep] + body.outputs[nc:] + new_ys
    dce(body)
    ins.inputs = tuple(ins.inputs[k] for k in keep) + ins.inputs[nc:]
    p["body"] = body
    p["num_carry"] = len(keep)
    ins.out.type = shape_rules[scan_p](*[v.type for v in ins.inputs], **p)
    # the results: the kept carries, the old ys, the new ys
    renumber = {k: j for j, k in enumerate(keep)}
    renumber.update({k: k - len(removed) for k in range(nc, n_out)})
    after, replaced = [], []
    first_new = n_out - len(removed)
    stacks = {}
    for v_id, j in stacked.items():
        r = _new_instr(result_p, (ins.out,), dict(index=first_new + j), ins)
        after.append(r)
        stacks[v_id] = r.out

    def stack_of(v):
        j = xs_params.get(id(v))
        return ins.inputs[len(keep) + j] if j is not None else stacks[id(v)]
    total: dict[int, Value] = {}
    for k, how, vals in sums:
        if how == "matmul":
            a, b = (stack_of(v) for v in vals)
            fa = _new_instr(reshape_p, (a,), dict(shape=(steps * vals[0].shape[0],
                                                         vals[0].shape[1])), ins)
            fb = _new_instr(reshape_p, (b,), dict(shape=(steps * vals[1].shape[0],
                                                         vals[1].shape[1])), ins)
            s_ins = _new_instr(matmul_p, (fa.out, fb.out), dict(trans_a=True, trans_b=False), ins)
            after += [fa, fb, s_ins]
        else:
            axes = (0,) + tuple(a + 1 for a in how[1])
            s_ins = _new_instr(reduce_sum_p, (stack_of(vals[0]),), dict(axes=axes), ins)
            after.append(s_ins)
        done = _new_instr(add_p, (inits[k], s_ins.out), {}, ins)
        after.append(done)
        total[k] = done.out
    for r in projections:
        k = r.params["index"]
        if k in total:
            replaced.append((r, total[k]))
        else:
            r.params["index"] = renumber[k]
    return after, replaced


# kinds left in a body when loop-invariant: free to recompute (constants, index remaps)
_NOT_HOISTED = ("source", "layout")


def _prune_scan(ins: Instr, projections: list):
    """Rewrite scan `ins` in place (see `loops`); returns the hoisted instructions (to place
    before it), or None when nothing changed."""
    p = ins.params
    nc, nx = p["num_carry"], p["num_xs"]
    body = clone(p["body"])   # bodies are shared between clones of a function: never mutate one
    n_out = len(body.outputs)
    used = {r.params["index"] for r in projections}
    keep_out = list(range(nc)) + [k for k in range(nc, n_out) if k in used]

    # loop-invariant instructions: those reading only consts and constants
    consts = {id(q): v for q, v in zip(body.params[nc + nx:], ins.inputs[nc + nx:])}
    invariant: set = set(consts)
    for b_ins in body.instrs:
        if all(id(v) in invariant for v in b_ins.inputs):
            invariant.add(id(b_ins.out))
    hoist = {id(b.out) for b in body.instrs
             if id(b.out) in invariant and b.prim.kind not in _NOT_HOISTED}
    needed = set()   # hoisted instructions and everything they read
    for b_ins in reversed(body.instrs):
        if id(b_ins.out) in hoist or id(b_ins.out) in needed:
            needed.add(id(b_ins.out))
            needed.update(id(v) for v in b_ins.inputs)
    outside: dict[int, Value] = dict(consts)
    hoisted = []
    for b_ins in body.instrs:
        if id(b_ins.out) in needed:
            new = Instr(b_ins.prim, [outside[id(v)] for v in b_ins.inputs], b_ins.params,
                        b_ins.out.type, loc=b_ins.loc, api=b_ins.api, adj_of=b_ins.adj_of,
                        tan_of=b_ins.tan_of)
            new.out.hint = b_ins.out.hint
            outside[id(b_ins.out)] = new.out
            hoisted.append(new)
    # inside, each hoisted value the rest of the body reads becomes a const parameter
    new_consts: dict[int, Value] = {}
    remaining = [b for b in body.instrs if id(b.out) not in hoist]
    for b_ins in remaining:
        for v in b_ins.inputs:
            if id(v) in hoist and id(v) not in new_consts:
                new_consts[id(v)] = Value(v.type, None, v.hint)
    for o in body.outputs:
        if id(o) in hoist and id(o) not in new_consts:
            new_consts[id(o)] = Value(o.type, None, o.hint)
    for b_ins in remaining:
        if new_consts:
            b_ins.inputs = tuple(new_consts.get(id(v), v) for v in b_ins.inputs)
    body.instrs = remaining
    body.outputs = [new_consts.get(id(o), o) for o in (body.outputs[k] for k in keep_out)]
    dce(body)
    reads = {id(v) for b_ins in body.instrs for v in b_ins.inputs} | \
        {id(o) for o in body.outputs}
    keep_in = list(range(nc)) + [i for i in range(nc, len(body.params))
                                 if id(body.params[i]) in reads]
    hoisted_used = [k for k, q in new_consts.items() if id(q) in reads]
    if len(keep_out) == n_out and len(keep_in) == len(body.params) and not hoisted_used:
        return None
    used_hoisted = [outside[k] for k in hoisted_used]
    body.params = [body.params[i] for i in keep_in] + [new_consts[k] for k in hoisted_used]
    ins.inputs = tuple(ins.inputs[i] for i in keep_in) + tuple(used_hoisted)
    p["body"] = body
    p["num_xs"] = sum(1 for i in keep_in if nc <= i < nc + nx)
    ins.out.type = shape_rules[scan_p](*[v.type for v in ins.inputs], **p)
    renumber = {k: j for j, k in enumerate(keep_out)}
    for r in projections:
        r.params["index"] = renumber[r.params["index"]]
    live = {id(v) for v in used_hoisted}
    for h in reversed(hoisted):   # only what the loop reads
        if id(h.out) in live:
            live.update(id(v) for v in h.inputs)
    return [h for h in hoisted if id(h.out) in live]


def optimize(fn: Function, name: str | None = None) -> Function:
    """A simplified copy of `fn` (DCE, CSE, constant folding, algebraic simplification), bodies
    of structured loops included (see `loops`)."""
    fn = clone(fn, name)
    for ins in fn.instrs:
        for key, body in regions(ins):
            ins.params[key] = optimize(body)
    for _ in range(10):
        changed = simplify(fn)
        changed = loops(fn) or changed
        changed = relu_mask_from_output(fn) or changed
        changed = mask_after_max_pool(fn) or changed
        n = len(fn.instrs)
        cse(fn)
        dce(fn)
        if not changed and len(fn.instrs) == n:
            break
    return fn

"""The schedule: which values get a buffer, which instructions fuse into one loop nest, and where
every buffer lives. Pure Python (no LLVM), so dumps can show it without compiling.

Algorithm (XLA-style loop fusion):
- A value is *materialized* (gets a buffer) when it is a function output, a parameter, a literal,
  the input or result of a loop-nest kernel (matmul, convolution, pooling), the result of a
  reduction, or an elementwise result used more than once or read through an expanding broadcast
  (so it would be recomputed). Splat constants and pure index remaps (broadcast, reshape,
  transpose, slice, pad, concatenate) of materialized or cheap values are never materialized: the
  consumer's loop computes their elements on the fly.
- Every materialized value computed by an elementwise, layout or reduction instruction is the root
  of one fused group: one loop nest over its shape that evaluates the whole tree of
  non-materialized producers per element, with no intermediate buffers.
- A function output computed by one fused loop and read elementwise only by a later one is
  computed and stored by that later loop (multi-output fusion); a loop storing over buffers it
  reads (donated outputs) may run as an epilogue, applied apart, of the loop nest making its
  input (an optimizer's update inside its gradient's matmul).
- A reshape of a materialized value shares its buffer (no copy).
- Intermediate buffers live in one arena; offsets are assigned by liveness (buffers whose lifetimes
  do not overlap share memory).
- A structured loop (scan, while: ir/prims/control.py) is one kernel of kind "control": its
  operands and `result` projections are materialized, and each body gets a plan of its own
  (`Group.bodies`, planned like any function: parameters and outputs are the loop's per-step
  buffers). The loop's scratch (`LoopLayout`) holds the bodies' arena, the carries of the next
  step, the pointer tables a body is called with, and buffers for results nobody reads.
"""
from __future__ import annotations

import math
from dataclasses import field

from . import record
from ..ir.core import Function, Instr, IRError, Value, regions
from ..ir.prims.control import result_p
from ..ir.prims.elementwise import const_p, literal_p, stop_gradient_p
from ..ir.prims.nn import max_pool2d_argmax_p, max_pool2d_p
from ..ir.prims.reduce import reduce_sum_p
from ..ir.prims.structural import (broadcast_in_dim_p, concatenate_p, pad_p, reshape_p, slice_p,
                                 transpose_p)

from . import settings

ALIGN = 64


@record
class Group:
    """One kernel: a loop-nest primitive (`kind="nn"`) or a fused loop (`kind="loop"`)."""
    index: int
    kind: str
    root: Instr
    members: list = field(default_factory=list)   # instructions evaluated inside (loop groups)
    leaves: list = field(default_factory=list)    # materialized values read (in argument order)
    scratch: int = 0                              # arena offset of the kernel's scratch, if any
    scratch_bytes: int = 0
    # A loop-nest kernel may absorb the fused loop that consumes its result (bias, relu, ...):
    # it writes its result into the epilogue's buffer and transforms each finished block in place.
    epilogue: "Group | None" = None
    # max_pool2d computes its argmax (same input and window) in the same pass
    companion: "Instr | None" = None
    kernel_ns: float | None = None   # a loop nest's estimated run time (plan's `cost_ns`)
    # Leaves (a donated parameter, or reshapes of it) whose buffer this loop's result is stored
    # over, element i after reading element i (see `_place_donated`): the lowering reads them
    # through the result's pointer, so that no two `noalias` pointers name one buffer.
    in_place: list = field(default_factory=list)
    # A loop (kind "control"): each body's plan, its results (the `result` projection of each,
    # None where nobody reads it) and where its scratch holds what (LoopLayout)
    bodies: dict = field(default_factory=dict)
    outs: list = field(default_factory=list)
    layout: "LoopLayout | None" = None
    # of kernel names: a body's kernels are named after their loop; a loop's is the prefix of
    # its bodies' names (`k3.body.`), fixed when planned
    prefix: str = ""
    status_code: int = 0   # a checking kernel's code (see runtime._checked_kernels)

    # Function outputs a fused loop stores besides its result, each at the loop's own index (see
    # `_merge_output_loops`), and (leaf, output) pairs: leaves stored over by one of them (as
    # `in_place`, read through that output's pointer).
    extra_outputs: list = field(default_factory=list)
    extra_in_place: list = field(default_factory=list)

    # The epilogue stores its outputs apart from the kernel's result, which keeps a buffer of its
    # own (see `_fuse_epilogues_apart`), instead of rewriting the result in place.
    epilogue_apart: bool = False

    @property
    def result(self) -> Value:
        """The value this kernel leaves in memory (its first pointer argument)."""
        if self.epilogue is not None and not self.epilogue_apart:
            return self.epilogue.root.out
        return self.root.out

    @property
    def epilogue_outputs(self) -> list:
        """The values an epilogue applied apart stores (its root, then its extra outputs)."""
        if self.epilogue is None or not self.epilogue_apart:
            return []
        return [self.epilogue.root.out] + self.epilogue.extra_outputs

    @property
    def made(self) -> list:
        """Every value this kernel leaves in memory: its result, then a max-pool's argmax, a fused
        loop's extra outputs, or the outputs of an epilogue applied apart; a loop's results."""
        if self.kind == "control":
            return [v for v in self.outs if v is not None]
        return [self.result] + ([self.companion.out] if self.companion is not None else []) \
            + self.extra_outputs + self.epilogue_outputs

    @property
    def pointer_values(self) -> list:
        """The buffers of the kernel's pointer arguments, in order (before any status and
        scratch): a fused loop's outputs and then the buffers it reads; a loop nest's result and
        companion, its inputs, then its epilogue's arguments (fused.Epilogue)."""
        if self.kind == "loop":
            return [self.result] + self.extra_outputs + self.leaves
        return [self.result] + ([self.companion.out] if self.companion is not None else []) \
            + self.leaves + self.epilogue_outputs + self.extra_leaves

    @property
    def extra_leaves(self) -> list:
        """Buffers the epilogue reads besides the kernel's own result."""
        if self.epilogue is None:
            return []
        return [v for v in self.epilogue.leaves if v is not self.root.out]

    @property
    def name(self):
        return f"{self.prefix}k{self.index}.{self.root.prim.name}"

    @property
    def cost_ns(self) -> float:
        """Rough single-thread run time on the target, for deciding whether a kernel is worth
        running on several threads: a loop nest's estimate is its kernel's (see codegen/kernels,
        given to `plan`); a fused loop costs its element-ops at kernels.ELEMENT_OPS_PER_NS (one
        per f32 vector lane per ns), or more when its buffers stream from beyond one core's L2
        (kernels.streaming_ns); a reduction over an input that one core's cache holds costs its
        elements at REDUCE_NS_PER_ELEMENT."""
        ins = self.root
        if self.kind == "nn":
            if self.kernel_ns is None:
                raise IRError(f"schedule: no cost estimate for kernel {self.name} "
                              f"(plan was not given `cost_ns`)")
            return self.kernel_ns
        size = max([ins.out.type.size] + [x.type.size for x in ins.inputs])
        if ins.prim.kind == "reduce" and \
                max([ins.out.type.nbytes] + [x.type.nbytes for x in ins.inputs]) <= REDUCE_CACHED:
            return size * max(1, len(self.members)) * REDUCE_NS_PER_ELEMENT
        from .kernels import ELEMENT_OPS_PER_NS, streaming_ns
        return max(size * max(1, len(self.members)) / ELEMENT_OPS_PER_NS,
                   streaming_ns(sum(v.type.nbytes for v in self.made + self.leaves)))


# A reduction's loop streams an input that one core's L2 holds (REDUCE_CACHED bytes) through
# vector adds at 20-25 elements per ns (the sum over N, H, W of LeNet-5's conv1 output gradient,
# 221k floats: 8.5 us on one thread; conv2's, 65k: 2.7 us), not the one element per ns of the
# former fused-loop estimate, which sent both to the thread pool, where they ran slower than on one
# thread (10.3 and 3.9 us: a fork/join, and half of each channel's planes in the other core's
# cache). A larger input streams from L3 or memory, where two cores read about twice as fast
# (ResNet-8's [32, 16, 32, 32] bias gradient, 2 MiB: 35 us on one thread, 15.5 on two): those take
# the fused-loop estimate (33 us for that one, AVX-512) and go parallel.
REDUCE_NS_PER_ELEMENT = 0.05
REDUCE_CACHED = 1 << 20


@record
class Location:
    """Where a materialized value lives: "in" (parameter k), "out" (output k), "arena" (byte
    offset), "global" (an LLVM constant), or "alias" of another value (a reshape)."""
    kind: str
    index: int = 0
    of: Value | None = None


@record
class Plan:
    fn: Function
    materialized: set
    groups: list
    locations: dict          # id(value) -> Location
    arena_bytes: int
    out_copies: list         # (output index, source) the caller fills by copying: ("in", k) etc.
    saved_for_backward: list  # (value, bytes): forward values an adjoint instruction reads
    # Donated parameters (see `_place_donated`): (output index, parameter index, how), how being
    # "in place" (the output's kernel writes the parameter's buffer), "copy" (the output is
    # computed in the arena and copied into the parameter's buffer after the last kernel) or
    # "caller" (the output is a parameter or a literal: the caller copies it).
    donated: list = field(default_factory=list)


@record
class LoopLayout:
    """Byte offsets in a loop kernel's scratch: the bodies' arena at 0 (`arena` bytes, shared:
    bodies run one at a time), the next step's carries (`next`, one per carry), buffers for the
    results without a projection (`unread`, by result index), and the pointer tables of each body
    (`tables`: {body name: (offset of the parameters' table, offset of the outputs' table)}); a
    while loop's condition result at `flag`."""
    arena: int = 0
    next: list = field(default_factory=list)
    unread: dict = field(default_factory=dict)
    tables: dict = field(default_factory=dict)
    flag: int = 0
    size: int = 0


def _loop_layout(ins: Instr, bodies: dict, outs: list) -> LoopLayout:
    at = 0

    def take(nbytes):
        nonlocal at
        offset = at
        at += (max(int(nbytes), 1) + ALIGN - 1) // ALIGN * ALIGN
        return offset
    lay = LoopLayout()
    lay.arena = take(max(p.arena_bytes for p in bodies.values()))
    nc = ins.params["num_carry"]
    lay.next = [take(t.nbytes) for t in ins.out.type.types[:nc]]
    lay.unread = {k: take(t.nbytes) for k, (t, v) in enumerate(zip(ins.out.type.types, outs))
                  if v is None}
    for name, p in bodies.items():
        lay.tables[name] = (take(8 * len(p.fn.params)), take(8 * len(p.fn.outputs)))
    lay.flag = take(1)
    lay.size = at
    return lay


def _is_nn(ins: Instr) -> bool:
    return ins.prim.kind == "nn"


def _expands(consumer: Instr) -> bool:
    return consumer.prim is broadcast_in_dim_p and \
        consumer.out.type.size > consumer.inputs[0].type.size


# Cheap to evaluate anywhere: computed again in every loop that needs them instead of stored.
DUPLICABLE = frozenset([broadcast_in_dim_p, reshape_p, transpose_p, slice_p, pad_p, concatenate_p,
                        const_p, stop_gradient_p])
# Elementwise values this small are recomputed in up to SMALL_GROUPS loops (each at most
# SMALL_LOOP elements) rather than stored: a kernel of their own costs more (in compile time and
# a pass over memory) than recomputing a few thousand elements. Softmax and the loss around it
# become a handful of loops this way.
SMALL_VALUE, SMALL_GROUPS, SMALL_LOOP = 4096, 3, 16384


def materialized_values(fn: Function) -> set:
    """Ids of the values that get a buffer (see the module docstring).

    Forced: parameters, outputs, literals, reductions and the inputs and results of loop-nest
    kernels. Then, walking backwards, every other value joins the loop of its consumers when
    they all belong to one loop and none reads it through an expanding broadcast; otherwise it
    gets a buffer of its own. Duplicable values (constants, index remaps) never get one for
    having several readers: each reader's loop recomputes them."""
    consumers: dict[int, list[Instr]] = {}
    for ins in fn.instrs:
        for v in ins.inputs:
            consumers.setdefault(id(v), []).append(ins)
    mat = {id(p) for p in fn.params} | {id(o) for o in fn.outputs}
    for ins in fn.instrs:
        if _is_nn(ins) or ins.prim.kind == "control":
            mat.add(id(ins.out))
            mat.update(id(x) for x in ins.inputs)
        elif ins.prim is literal_p or ins.prim.kind == "reduce" or ins.prim is result_p:
            mat.add(id(ins.out))
    groups: dict[int, frozenset] = {}   # id(value) -> roots of the loops that evaluate it
    expanded: dict[int, bool] = {}      # read through an expanding broadcast on the way
    root_size: dict[int, int] = {}      # elements of each loop (by its root's id)
    for ins in reversed(fn.instrs):
        v = ins.out
        if id(v) in mat:
            groups[id(v)] = frozenset([id(v)])
            expanded[id(v)] = False
            root_size[id(v)] = v.type.size
            continue
        cs = consumers.get(id(v), [])
        gs = frozenset().union(*[groups.get(id(c.out), frozenset()) for c in cs])
        exp = any(_expands(c) or expanded.get(id(c.out), False) for c in cs)
        small = ins.prim.elementwise and v.type.size <= SMALL_VALUE and \
            len(gs) <= SMALL_GROUPS and all(root_size[g] <= SMALL_LOOP for g in gs)
        if ins.prim in DUPLICABLE or small or len(gs) <= 1 and not exp:
            groups[id(v)], expanded[id(v)] = gs, exp
        else:
            mat.add(id(v))
            groups[id(v)], expanded[id(v)] = frozenset([id(v)]), False
            root_size[id(v)] = v.type.size
    return mat


def plan(fn: Function, scratch_bytes=None, fuses_epilogue=None, cost_ns=None,
         donated=None, prefix: str = "") -> Plan:
    """Group `fn`'s instructions into kernels and place every buffer.

    `scratch_bytes(instr) -> int` gives the scratch a loop-nest kernel needs;
    `fuses_epilogue(instr, apart=False) -> bool` says whether its kernel can absorb an
    elementwise epilogue (`apart`: one applied apart, see `_fuse_epilogues_apart`);
    `cost_ns(instr) -> float` estimates its single-thread run time (Group.cost_ns);
    TRACEJIT_NO_EPILOGUES turns epilogue fusion off (here, so the dumps describe the code).
    `donated`: {output index: parameter index} of outputs to be stored into a parameter's buffer
    (see `_place_donated`). `prefix`: of the kernels' names (a loop body's)."""
    mat = materialized_values(fn)
    producer = {id(i.out): i for i in fn.instrs}
    projections: dict[int, dict] = {}   # id(loop value) -> {result index: first projection}
    locations: dict[int, Location] = {}
    for k, p in enumerate(fn.params):
        locations[id(p)] = Location("in", k)
    out_copies = []
    for k, o in enumerate(fn.outputs):
        if id(o) in locations:  # a parameter, or the same value twice
            out_copies.append((k, o))
            continue
        ins = producer[id(o)]
        if ins.prim is literal_p:
            out_copies.append((k, o))
            continue
        locations[id(o)] = Location("out", k)

    groups: list[Group] = []
    for ins in fn.instrs:
        v = ins.out
        if id(v) not in mat:
            continue
        if ins.prim is literal_p:
            locations.setdefault(id(v), Location("global"))
            continue
        if ins.prim is result_p:   # placed with its loop's results (`_place_arena`)
            seen = projections.setdefault(id(ins.inputs[0]), {})
            first = seen.setdefault(ins.params["index"], v)
            if first is not v and id(v) not in locations:
                locations[id(v)] = Location("alias", of=first)
            continue
        if ins.prim is reshape_p and id(ins.inputs[0]) in mat and id(v) not in locations:
            locations[id(v)] = Location("alias", of=ins.inputs[0])
            continue
        if ins.prim.kind == "control":
            g = Group(len(groups), "control", ins, [ins], list(ins.inputs))
            g.prefix = f"{prefix}k{g.index}."
            g.bodies = {name: plan(body, scratch_bytes, fuses_epilogue, cost_ns,
                                   prefix=f"{g.prefix}{name}.")
                        for name, body in regions(ins)}
        elif _is_nn(ins):
            g = Group(len(groups), "nn", ins, [ins], list(ins.inputs), prefix=prefix)
            if scratch_bytes is not None:
                g.scratch_bytes = int(scratch_bytes(ins))
            if cost_ns is not None:
                g.kernel_ns = cost_ns(ins)
        else:
            members, leaves = _fused_tree(ins, mat, producer)
            g = Group(len(groups), "loop", ins, members, leaves, prefix=prefix)
            if ins.prim.kind == "reduce":
                g.scratch_bytes = reduce_scratch_bytes(g)
        groups.append(g)

    for g in groups:
        if g.kind == "control":
            seen = projections.get(id(g.root.out), {})
            g.outs = [seen.get(k) for k in range(len(g.root.out.type.types))]
            g.layout = _loop_layout(g.root, g.bodies, g.outs)
            g.scratch_bytes = g.layout.size
    groups = _pair_pool_argmax(groups)
    if fuses_epilogue is not None and not settings.no_epilogues():
        groups = _fuse_epilogues(fn, groups, locations, fuses_epilogue)
    groups, donations = _place_donated(fn, groups, locations, out_copies, donated or {})
    if fuses_epilogue is not None and not settings.no_epilogues():
        groups = _fuse_epilogues_apart(fn, groups, locations, fuses_epilogue)
    arena = _place_arena(fn, groups, mat, locations, producer)
    saved = _saved_for_backward(fn, groups, locations)
    return Plan(fn, mat, groups, locations, arena, out_copies, saved, donations)


def _pair_pool_argmax(groups: list) -> list:
    """A max_pool2d_argmax of the same input and window as a max_pool2d runs inside that kernel:
    one pass over the input, and the backward pass keeps the indices instead of the input."""
    pools = {}
    for g in groups:
        if g.root.prim is max_pool2d_p:
            pools.setdefault((id(g.root.inputs[0]), _params_key(g.root)), g)
    kept = []
    for g in groups:
        if g.root.prim is max_pool2d_argmax_p:
            pool = pools.get((id(g.root.inputs[0]), _params_key(g.root)))
            if pool is not None and pool.companion is None:
                pool.companion = g.root
                continue
        kept.append(g)
    for i, g in enumerate(kept):
        g.index = i
    return kept


def _params_key(ins: Instr):
    return tuple(sorted(ins.params.items()))


def _fuse_epilogues(fn: Function, groups: list, locations: dict, fuses_epilogue) -> list:
    """Move each fused loop that is the only reader of a loop-nest kernel's result, reads it
    elementwise at its own index, and has the same shape and dtype, into that kernel as an
    epilogue. Its other buffers must exist before the kernel runs."""
    readers: dict[int, list] = {}
    for g in groups:
        for v in g.leaves:
            readers.setdefault(id(v), []).append(g)
    outputs = {id(o) for o in fn.outputs}
    made_by: dict[int, Group] = {id(g.root.out): g for g in groups}
    order = {id(g): k for k, g in enumerate(groups)}
    absorbed = set()
    for g in groups:
        if g.kind != "loop" or g.root.prim.kind == "reduce":
            continue
        for v in g.leaves:
            k = made_by.get(id(v))
            if k is None or k.kind != "nn" or k.epilogue is not None or id(v) in outputs \
                    or not fuses_epilogue(k.root) or readers.get(id(v)) != [g] \
                    or v.type != g.root.out.type or not _elementwise_path(g, v):
                continue
            others_ready = all(
                (made_by.get(id(x)) is None or order[id(made_by[id(x)])] < order[id(k)])
                for x in g.leaves if x is not v)
            if not others_ready:
                continue
            k.epilogue = g
            absorbed.add(id(g))
            break
    kept = [g for g in groups if id(g) not in absorbed]
    for i, g in enumerate(kept):
        g.index = i
    return kept


def _place_donated(fn: Function, groups: list, locations: dict, out_copies: list,
                   donated: dict):
    """Place each donated output (`donated`: {output index: parameter index}, like JAX's
    donate_argnums: the caller gives the parameter's buffer up to hold the output, of the same
    type). Returns (groups, [(output index, parameter index, how)], see Plan.donated).

    The output's kernel stores it straight into the parameter's buffer ("in place") when that is
    the last thing to touch the parameter: every other kernel reading the parameter runs before
    it, and it does not read the parameter, or is a fused loop reading it only elementwise at the
    loop's own index (element i is read before element i is written). An optimizer's update
    `p - lr * g` is such a loop. A fused loop that became the epilogue of a loop-nest kernel reading the
    parameter is split off again first: the kernel writes its raw result over the output's
    buffer before the epilogue reads the parameter. Otherwise ("copy") the output gets an arena
    buffer and the entry copies it into the parameter's buffer after its last kernel: never a
    wrong answer, one pass over the buffer more. An output that is a parameter or a literal is
    left to the caller ("caller"); one that is the same value as an earlier output is an
    ordinary output copy."""
    if donated:
        groups = _split_donated_epilogues(fn, groups, locations, donated)
    groups = _merge_output_loops(fn, groups)
    if not donated:
        return groups, []
    params = fn.params
    targets = list(donated.values())
    if len(set(targets)) != len(targets):
        raise ValueError(f"donated outputs {donated}: a parameter can hold one output only")
    for k, j in donated.items():
        if fn.outputs[k].type != params[j].type:
            raise ValueError(f"output {k} ({fn.outputs[k].type}) cannot be stored into parameter "
                             f"{j} ({params[j].type})")

    def reads(g: Group, j: int) -> list:
        return [v for v in g.leaves + g.extra_leaves if base_value(v, locations) is params[j]]

    made_by = {id(v): g for g in groups for v in [g.result] + g.extra_outputs}
    result = []
    for k, j in sorted(donated.items()):
        o = fn.outputs[k]
        loc = locations.get(id(o))
        if loc is None or loc.kind != "out" or loc.index != k:
            # a parameter (the same one: nothing to do), a literal, or an output copy
            result.append((k, j, "caller"))
            continue
        g = made_by.get(id(o))   # None: a max-pool's argmax
        mine = reads(g, j) if g is not None else []
        direct = g is not None \
            and (not mine or g.kind == "loop" and g.root.prim.kind != "reduce"
                 and all(v.type.shape == o.type.shape and _elementwise_path(g, v) for v in mine)) \
            and all(h.index < g.index for h in groups if h is not g and reads(h, j))
        if direct:
            locations[id(o)] = Location("in", j)
            if o is g.result:
                g.in_place = mine
            else:
                g.extra_in_place += [(v, o) for v in mine]
            result.append((k, j, "in place"))
        else:
            del locations[id(o)]   # _place_arena gives it a buffer live until the end
            result.append((k, j, "copy"))
    return groups, result


def _split_donated_epilogues(fn: Function, groups: list, locations: dict, donated: dict) -> list:
    """Undo the epilogue fusion of a donated output whose loop-nest kernel reads the parameter
    the output is stored into (see `_place_donated`): the loop runs right after the kernel."""
    targets: dict[int, set] = {}   # id(output value) -> ids of the parameters it goes into
    for k, j in donated.items():
        targets.setdefault(id(fn.outputs[k]), set()).add(id(fn.params[j]))
    kept = []
    for g in groups:
        kept.append(g)
        ps = targets.get(id(g.result), ()) if g.epilogue is not None else ()
        if any(id(base_value(v, locations)) in ps for v in g.leaves + g.extra_leaves):
            kept.append(g.epilogue)
            g.epilogue = None
    for i, g in enumerate(kept):
        g.index = i
    return kept


def _fuse_epilogues_apart(fn: Function, groups: list, locations: dict, fuses_epilogue) -> list:
    """Fuse a fused loop that stores an output over a buffer it reads (an optimizer update
    writing the new parameter and state in place, see `_place_donated`) into the loop-nest
    kernel computing the one buffer it reads elementwise that only it reads (the parameter's
    gradient), as an epilogue applied apart: the kernel writes its result to a buffer of its own
    as usual, and the epilogue reads each finished block while it is in cache and stores the
    loop's outputs where they go. The epilogue is then the result's only reader, so the kernel
    may write its blocks over one another (a matmul reuses each thread's first panel of rows,
    codegen/kernels/matmul.py `_rows`): the result buffer's contents after the kernel are
    unspecified. (An epilogue applied in place cannot: the kernel would write
    its raw result over the parameter before the epilogue reads it.)

    The loop then runs at the kernel's place. Kernels after the loop nest that make other
    buffers the loop reads (an optimizer's scalars of the step count) move before it with their
    own such producers, when no kernel they pass writes what they read or touches what they
    write. The loop nest must not read what the loop stores over, and no kernel it passes may
    read what the loop writes or write what it reads."""
    params = fn.params

    def buffer(v):
        v = base_value(v, locations)
        loc = locations.get(id(v))
        return id(params[loc.index]) if loc is not None and loc.kind == "in" else id(v)

    def reads(g):
        return {buffer(x) for x in g.leaves + g.extra_leaves}

    def writes(g):
        return {buffer(v) for v in g.made}

    changed = True
    while changed:
        changed = False
        made_by = {id(v): g for g in groups for v in g.made}
        readers: dict[int, list] = {}
        for g in groups:
            for v in g.leaves + g.extra_leaves:
                readers.setdefault(id(v), []).append(g)
        for u in groups:
            if u.kind != "loop" or u.root.prim.kind == "reduce" \
                    or not (u.in_place or u.extra_in_place):
                continue
            for v in u.leaves:
                k = made_by.get(id(v))
                if k is None or k.kind != "nn" or k.epilogue is not None \
                        or k.companion is not None or v is not k.root.out or id(v) in locations \
                        or not fuses_epilogue(k.root, apart=True) or readers.get(id(v)) != [u] \
                        or v.type.shape != u.root.out.type.shape or not _elementwise_path(u, v):
                    continue
                moved = _producers_between(u, v, k, made_by)
                if moved is None:
                    continue
                passed = [g for g in groups[k.index:u.index] if g not in moved]   # k included
                ok = not reads(k) & writes(u) and all(
                    not writes(g) & reads(u) and not reads(g) & writes(u) for g in passed[1:])
                ok = ok and all(not writes(g) & (reads(h) | writes(h)) and not reads(g) & writes(h)
                                for h in moved for g in passed if g.index < h.index)
                if not ok:
                    continue
                k.epilogue, k.epilogue_apart = u, True
                groups = groups[:k.index] + sorted(moved, key=lambda g: g.index) + \
                    [g for g in groups[k.index:] if g not in moved and g is not u]
                for i, g in enumerate(groups):
                    g.index = i
                changed = True
                break
            if changed:
                break
    return groups


def _producers_between(u: Group, v: Value, k: Group, made_by: dict):
    """The kernels after `k` making a buffer `u` reads (other than `v`), with their own such
    producers: what must move before `k` for `u` to run at `k`'s place; None if `u` itself is
    among them or one is a loop nest."""
    need = [x for x in u.leaves if x is not v]
    moved = []
    while need:
        h = made_by.get(id(need.pop()))
        if h is None or h.index < k.index or h in moved:
            continue
        if h is u or h is k or h.kind != "loop":
            return None
        moved.append(h)
        need += h.leaves + h.extra_leaves
    return moved


def _merge_output_loops(fn: Function, groups: list) -> list:
    """Multi-output loop fusion: a fused loop computing a function output that only one later
    fused loop reads, elementwise at its own index and of the same shape, is evaluated inside
    that loop, which stores it as an extra output. An optimizer's update is such a chain per
    parameter (the new momentum or moment buffers are outputs the new parameter reads): one
    pass over the gradient, the buffers and the parameter instead of one per buffer. The reader
    takes over the producer's buffers, read at the reader's place in the kernel order."""
    outputs = {id(o) for o in fn.outputs}
    merged = True
    while merged:
        merged = False
        readers: dict[int, list] = {}
        for g in groups:
            for v in g.leaves + g.extra_leaves:
                readers.setdefault(id(v), []).append(g)
        for p in groups:
            v = p.root.out
            rs = readers.get(id(v), [])
            if p.kind != "loop" or p.root.prim.kind == "reduce" or id(v) not in outputs \
                    or len(rs) != 1:
                continue
            c = rs[0]
            if c.kind != "loop" or c.root.prim.kind == "reduce" or c.index < p.index \
                    or v.type.shape != c.root.out.type.shape or not _elementwise_path(c, v):
                continue
            c.members = p.members + c.members
            mine = {id(x) for x in c.leaves}
            c.leaves = [x for x in p.leaves if id(x) not in mine] + \
                [x for x in c.leaves if x is not v]
            c.extra_outputs = [v] + p.extra_outputs + c.extra_outputs
            groups = [g for g in groups if g is not p]
            for i, g in enumerate(groups):
                g.index = i
            merged = True
            break
    return groups


def _elementwise_path(g: Group, v: Value) -> bool:
    """Does every instruction of `g` that depends on `v` compute elementwise (same index)?"""
    depends = {id(v)}
    for m in g.members:
        if any(id(x) in depends for x in m.inputs):
            if not m.prim.elementwise:
                return False
            depends.add(id(m.out))
    return True


def _fused_tree(root: Instr, mat: set, producer: dict):
    """Instructions evaluated inside `root`'s loop (post-order) and the buffers they read."""
    members, leaves, seen, seen_leaf = [], [], set(), set()

    def visit(ins: Instr):
        if id(ins) in seen:
            return
        seen.add(id(ins))
        for x in ins.inputs:
            if id(x) in mat:
                if id(x) not in seen_leaf:
                    seen_leaf.add(id(x))
                    leaves.append(x)
            else:
                visit(producer[id(x)])
        members.append(ins)

    visit(root)
    return members, leaves


def linear_index(group: Group, size: int, members) -> bool:
    """Can `members` of `group` be evaluated at one linear index into buffers of `size` elements?
    Yes when each is elementwise, a constant or a reshape (which keeps the row-major linear
    index), and every buffer the group reads and every member's value has `size` elements or is
    a scalar."""
    return all(m.prim.elementwise or m.prim in (const_p, reshape_p) for m in members) \
        and all(v.type.size == size or not v.shape for v in group.leaves) \
        and all(m.out.type.size == size or not m.out.shape for m in members)


def reduce_loops(group: Group):
    """The loops of a reduction group: (extents, reduced loop indices, flat). When the input is
    elementwise over buffers of its own size (`flat`), adjacent dimensions that are both reduced or
    both kept are merged into one loop over a single linear index (NCHW -> sum over N, HW becomes
    [N, C, H*W])."""
    root = group.root
    x = root.inputs[0]
    flat = linear_index(group, x.type.size, [m for m in group.members if m is not root])
    axes = set(root.params["axes"])
    if not flat:
        return tuple(x.shape), axes, False
    dims = []
    for d, n in enumerate(x.shape):
        if dims and dims[-1][1] == (d in axes):
            dims[-1][0] *= n
        else:
            dims.append([n, d in axes])
    return tuple(n for n, _ in dims), {k for k, (_, r) in enumerate(dims) if r}, True


# The longest run of float32 additions into one running sum of a reduction: the innermost reduced
# loop adds blocks of this many elements in float32 registers and the block sums in float64; a
# float32 output that is added to across outer reduced loops is flushed into float64 sums in
# scratch at least this often. A float32 sum then errs by at most about REDUCE_BLOCK u32 sum|x|
# (less when vectorized: each lane adds REDUCE_BLOCK / lanes terms) whatever its length, plus
# (n / REDUCE_BLOCK) u64 sum|x| from the float64 sums. 2048 is 512 elements per vector register of
# an unrolled AVX2 loop: long enough that the end of a block (a horizontal add and a mispredicted
# loop exit, or a flush pass over the outputs) costs ~1% (1024 cost 5% on an in-cache 2**16 sum).
REDUCE_BLOCK = 2048


def reduce_flush(group: Group):
    """For a float32 sum that adds into each output element more than REDUCE_BLOCK times across
    iterations of reduced loops other than the innermost one (which accumulates in registers):
    `(d, k)`, meaning every k iterations of loop d (see reduce_loops) the float32 running sums
    in the output are added into float64 sums in scratch and reset. Otherwise None."""
    root = group.root
    if root.prim is not reduce_sum_p or root.out.dtype != "f32":
        return None
    shape, axes, _ = reduce_loops(group)
    outer = sorted((d for d in axes if d != len(shape) - 1), reverse=True)
    if math.prod(shape[d] for d in outer) <= REDUCE_BLOCK:
        return None
    # the outermost loop whose body adds at most REDUCE_BLOCK times into an output element
    inner, chosen = 1, None
    for d in outer:
        if inner <= REDUCE_BLOCK:
            chosen = (d, REDUCE_BLOCK // inner)
        inner *= shape[d]
    return chosen


def reduce_scratch_bytes(group: Group) -> int:
    """Scratch of a reduction kernel: the float64 running sums of reduce_flush, one per output
    element."""
    if reduce_flush(group) is None:
        return 0
    return 8 * max(group.root.out.type.size, 1)


def base_value(v: Value, locations) -> Value:
    """The value whose buffer `v` uses (following reshape aliases)."""
    while locations.get(id(v)) is not None and locations[id(v)].kind == "alias":
        v = locations[id(v)].of
    return v


def _place_arena(fn, groups, mat, locations, producer) -> int:
    """Assign arena offsets to intermediate buffers and kernel scratch by liveness."""
    last_use: dict[int, int] = {}
    for g in groups:
        for leaf in g.leaves + g.extra_leaves:
            last_use[id(base_value(leaf, locations))] = g.index
    for o in fn.outputs:
        last_use[id(base_value(o, locations))] = len(groups)
    blocks: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)

    def allocate(size, first, last) -> int:
        size = (max(size, 1) + ALIGN - 1) // ALIGN * ALIGN
        busy = sorted((o, s) for o, s, f, l in blocks if not (l < first or f > last))
        offset = 0
        for o, s in busy:
            if offset + size <= o:
                break
            offset = max(offset, o + s)
        blocks.append((offset, size, first, last))
        return offset

    for g in groups:
        for v in g.made:
            if id(v) not in locations:
                locations[id(v)] = Location("arena", allocate(v.type.nbytes, g.index,
                                                              last_use.get(id(v), g.index)))
        if g.scratch_bytes:
            g.scratch = allocate(g.scratch_bytes, g.index, g.index)
    return max((o + s for o, s, _, _ in blocks), default=0)


def _saved_for_backward(fn: Function, groups: list, locations: dict):
    """Intermediate values made before the backward pass starts (the first kernel computing an
    adjoint instruction) and read after it: the memory the backward pass keeps alive. Parameters
    (the caller's arrays) and constants are not counted."""
    start = next((g.index for g in groups if g.root.adj_of is not None), len(groups))
    made_at = {}
    for g in groups:
        for v in g.made:
            made_at[id(v)] = g.index
    saved, seen = [], set()
    for g in groups[start:]:
        for v in g.leaves + g.extra_leaves:
            base = base_value(v, locations)
            if made_at.get(id(base), start) < start and id(base) not in seen:
                seen.add(id(base))
                saved.append((base, base.type.nbytes))
    return saved


def annotate(p: Plan):
    """A `print_function` hook that prints each kernel's header before its root instruction."""
    by_root = {id(g.root): g for g in p.groups}
    members = {}
    for g in p.groups:
        for m in g.members + (g.epilogue.members if g.epilogue is not None else []) + \
                ([g.companion] if g.companion is not None else []):
            members.setdefault(id(m), g)

    def note(ins: Instr):
        g = members.get(id(ins))
        tag = f"[k{g.index}]" if g is not None else "[  ]"
        g = by_root.get(id(ins))
        if g is None:
            return None, tag
        if g.kind == "control":
            steps = g.root.params.get("length")
            counts = ", ".join(f"{name} {len(p.groups)} kernel{'s' if len(p.groups) != 1 else ''}"
                               for name, p in g.bodies.items())
            return (f"// kernel k{g.index}: one native loop"
                    f"{f' of {steps} steps' if steps is not None else ''} calling its "
                    f"{counts} per step"), tag
        if g.kind == "nn":
            head = f"// kernel k{g.index}: loop nest {g.root.prim.name} -> {g.root.out.type}"
            if g.companion is not None:
                head += f" and its argmax -> {g.companion.out.type}"
            if g.epilogue is not None:
                ops = [m.prim.name for m in g.epilogue.members if m.prim is not const_p]
                where = f"storing {len(g.epilogue_outputs)} outputs apart" if g.epilogue_apart \
                    else "in place"
                head += f", epilogue {', '.join(ops)} applied {where} to each finished block"
            return head, tag
        ops = [m.prim.name for m in g.members if m.prim is not const_p]
        more = f" and {len(g.extra_outputs)} more output{'s' if len(g.extra_outputs) != 1 else ''}" \
            if g.extra_outputs else ""
        return (f"// kernel k{g.index}: one fused loop over {g.root.out.type} computing "
                f"{', '.join(ops)}{more} reading {len(g.leaves)} buffer"
                f"{'s' if len(g.leaves) != 1 else ''}"), tag

    def region(ins: Instr, name: str):
        g = by_root.get(id(ins))
        return annotate(g.bodies[name]) if g is not None and name in g.bodies else None
    note.region = region
    return note


def summary(p: Plan) -> str:
    """Trailing comment lines of the optimized dump: kernel counts, arena, saved activations."""
    from ..ir.core import Namer
    namer = Namer()
    for v in list(p.fn.params) + [i.out for i in p.fn.instrs]:
        namer.define(v)
    lines = [f"// {len(p.groups)} kernels "
             f"({sum(g.kind == 'loop' for g in p.groups)} fused loops, "
             f"{sum(g.kind == 'nn' for g in p.groups)} loop nests); "
             f"intermediate arena {p.arena_bytes} bytes"]
    if p.saved_for_backward:
        total = sum(b for _, b in p.saved_for_backward)
        lines.append(f"// saved for the backward pass: {total} bytes")
        for v, nbytes in p.saved_for_backward:
            lines.append(f"//   {namer.ref(v)}: {v.type}  {nbytes} bytes{_per_step(v)}")
    lines += _donation_summary(p, namer)
    return "\n".join(lines)


def _per_step(v: Value) -> str:
    """For a scan's stacked result (what a scan saves for its adjoint): its bytes per step."""
    ins = v.instr
    if ins is None or ins.prim is not result_p:
        return ""
    loop = ins.inputs[0].instr
    steps = loop.params.get("length")
    if not steps or ins.params["index"] < loop.params["num_carry"]:
        return ""
    return f" ({v.type.nbytes // steps} bytes per step of the scan at {loop.loc})"


def _donation_summary(p: Plan, namer) -> list:
    """One comment line per donated output: where its value goes (see `_place_donated`)."""
    how = {"in place": "written in place into", "copy": "computed in the arena, then copied into",
           "caller": "copied by the caller into"}
    return [f"// donated: output {k} ({namer.ref(p.fn.outputs[k])}) {how[h]} parameter "
            f"{namer.ref(p.fn.params[j])}" for k, j, h in p.donated]

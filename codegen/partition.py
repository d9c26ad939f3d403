"""Splitting one lowered LLVM module into parts that separate processes compile at once.

The function is lowered once, into one llvmlite module, so a function that several kernels share
(a generic loop nest, `kernels.toolkit.shared_function`; a math function) is defined once. Its
functions are then spread over `n` parts, each printed as a module of its own (see
target.compile_objects, which links the object files together):

- the entry, and everything it reaches without passing through a kernel (parallel trampolines,
  loop bodies and their kernels, literal arrays), stays in part 0;
- each top-level kernel takes with it the functions it reaches that no earlier kernel took, so a
  shared function is compiled by exactly one part and called from the others;
- kernels are placed heaviest first on the least loaded part, the weight being an estimate of
  LLVM's work on the functions it brings (see _cost): what it shares with an earlier kernel
  costs nothing again.

A function called from another part than its own is given external linkage there and declared
in the caller's part; everything else keeps its linkage (internal functions stay open to LLVM's
interprocedural passes within their part). Declarations and metadata are printed in every part.
"""
from __future__ import annotations

import llvmlite.ir as ir


def _instructions(fn: ir.Function):
    for block in fn.blocks:
        yield from block.instructions


def _references(fn: ir.Function) -> list:
    """The globals (functions, variables) `fn`'s instructions use, in order of first use."""
    seen = {}
    for ins in _instructions(fn):
        ops = ins.operands if not isinstance(ins, ir.PhiInstr) else \
            [v for v, _ in ins.incomings]
        for op in ops:
            if isinstance(op, ir.GlobalValue):
                seen.setdefault(op.name, op)
    return list(seen.values())


# LLVM's work on a function (optimization and code generation), in ms of this project's
# 2-core machine: fitted by least squares on LeNet-5's gradient, each function compiled alone. The
# loops dominate (LLVM's loop passes; one the vectorizer takes on becomes a vector body, a vector
# epilogue and a scalar remainder), instructions count little, so a 40-instruction elementwise
# loop costs a third of a 400-instruction convolution kernel.
COST_FUNCTION, COST_LOOP, COST_SCALAR_LOOP = 3.4, 8.0, 6.6
COST_CALL, COST_VECTOR, COST_SCALAR = 0.65, 0.08, 0.014


def _cost(fn: ir.Function) -> float:
    """LLVM's work on `fn` (see above)."""
    cost = COST_FUNCTION
    index = {id(block): k for k, block in enumerate(fn.blocks)}
    for k, block in enumerate(fn.blocks):
        for ins in block.instructions:
            if isinstance(ins, ir.CallInstr):
                cost += COST_CALL
            elif isinstance(ins.type, ir.VectorType):
                cost += COST_VECTOR
            else:
                cost += COST_SCALAR
        term = block.terminator
        # a branch back to an earlier block closes a loop (blocks are appended in program
        # order); "llvm.loop" metadata keeps it scalar (loops.scalar_loop_id)
        if isinstance(term, (ir.Branch, ir.ConditionalBranch)) and \
                any(index.get(id(t), k + 1) <= k for t in term.operands if isinstance(t, ir.Block)):
            cost += COST_SCALAR_LOOP if "llvm.loop" in term.metadata else COST_LOOP
    return cost


class Partition:
    """The functions of `module` spread over `n` parts: `entry` (with what it reaches on its own)
    in part 0, each function of `kernels` (the top-level kernels) with what it reaches that no
    other kernel took before it, balanced by LLVM's work (see _cost). `text(k)` prints part k."""

    def __init__(self, module: ir.Module, entry: ir.Function, kernels, n: int):
        self.module, self.n = module, n
        defined = [g for g in module.globals.values()
                   if isinstance(g, ir.Function) and not g.is_declaration]
        self.refs = {f.name: _references(f) for f in defined}
        self.home: dict = {}      # name of a defined function or variable -> part
        self.load = [0] * n       # LLVM's work per part (see _cost)
        roots = {f.name for f in kernels}
        self._claim(entry, 0, roots)
        units = []                # (kernel, what it would take) in plan order
        taken = set(self.home)
        for k in kernels:
            unit = self._reach(k, roots - {k.name}, taken)
            taken.update(f.name for f in unit)
            units.append(unit)
        for unit in sorted(units, key=lambda u: -sum(map(_cost, u))):
            part = self.load.index(min(self.load))
            for f in unit:
                self._place(f, part)
        # what one part uses from another: external there, declared here
        self.imports = [set() for _ in range(n)]
        for name, refs in self.refs.items():
            part = self.home[name]
            for g in refs:
                if g.name in self.home and self.home[g.name] != part:
                    self.imports[part].add(g.name)
                    if g.linkage in ("internal", "private"):
                        g.linkage = ""
        for g in module.globals.values():
            if isinstance(g, ir.GlobalVariable) and g.name not in self.home:
                self.home[g.name] = 0

    def _reach(self, root: ir.Function, stop: set, taken: set) -> list:
        """`root` and the defined functions it reaches through calls (and function pointers),
        not passing through `stop` and leaving out those in `taken`."""
        order, todo, seen = [], [root], {root.name}
        while todo:
            f = todo.pop()
            order.append(f)
            for g in self.refs.get(f.name, ()):
                if isinstance(g, ir.Function) and g.name in self.refs and g.name not in seen \
                        and g.name not in stop and g.name not in taken:
                    seen.add(g.name)
                    todo.append(g)
        return order

    def _claim(self, root: ir.Function, part: int, stop: set):
        for f in self._reach(root, stop, set(self.home)):
            self._place(f, part)

    def _place(self, f: ir.Function, part: int):
        self.home[f.name] = part
        self.load[part] += _cost(f)
        for g in self.refs[f.name]:   # a literal array lives with its first user
            if isinstance(g, ir.GlobalVariable):
                if g.name not in self.home:
                    self.home[g.name] = part
                elif self.home[g.name] != part:
                    raise AssertionError(f"global {g.name} used from two parts")

    def text(self, k: int) -> str:
        """Part k as an LLVM module's text."""
        m = self.module
        lines = [f'; ModuleID = "{m.name}" part {k}', f'target triple = "{m.triple}"',
                 f'target datalayout = "{m.data_layout}"', ""]
        lines += [t.get_declaration() for t in m.get_identified_types().values()]
        imports = self.imports[k]
        for g in m.globals.values():
            home = self.home.get(g.name)
            if home == k or (isinstance(g, ir.Function) and g.is_declaration):
                lines.append(str(g))
            elif g.name in imports:
                lines.append(_declaration(g))
        lines += m._get_metadata_lines()
        return "\n".join(lines)


def _declaration(f: ir.Function) -> str:
    ft = f.function_type
    return f"declare {ft.return_type} {f.get_reference()}({', '.join(map(str, ft.args))})"

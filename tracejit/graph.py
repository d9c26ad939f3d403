"""The IR as a picture: Graphviz DOT text of any stage of a compiled function (`f.graph(...)`).

One node per instruction of the dump (rank-0 constants print inline in the dump and are no nodes
here either), one edge per use of a value (an instruction reading a value twice has two edges),
one node per function output, reached by one edge from the value returned there. Nodes are
labelled like the dump: the value's name, the primitive, the type and the user's file:line.
Roles are drawn apart:

    parameters   blue boxes             forward      white ellipses
    adjoint      orange boxes (`adj of`) tangent      green hexagons (`tan of`)
    outputs      grey double octagons

At the "optimized" stage every kernel of the schedule (codegen.schedule.plan, the one the native
code runs) is a cluster around the instructions it evaluates.

Rendering (`path=`) needs the `graphviz` Python package and the `dot` program:
`pip install 'tracejit[viz]'` and e.g. `apt-get install graphviz`. `import tracejit` never loads
this module's optional dependencies.
"""
from __future__ import annotations

import os

from .ir.core import Function, Namer, _is_inline_const, regions

STYLES = {
    "param": 'shape=box, style=filled, fillcolor="#cfe2ff"',
    "forward": 'shape=ellipse, style=filled, fillcolor="#ffffff"',
    "adjoint": 'shape=box, style="rounded,filled", fillcolor="#ffd8a8"',
    "tangent": 'shape=hexagon, style=filled, fillcolor="#c3f0c8"',
    "output": 'shape=doubleoctagon, style=filled, fillcolor="#dddddd"',
}
RENDER_FORMATS = ("svg", "png", "pdf")
INSTALL_HINT = ("pip install 'tracejit[viz]' (the graphviz Python package) and install the "
                "Graphviz `dot` program (apt-get install graphviz, brew install graphviz)")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def role(ins) -> str:
    """"adjoint", "tangent" or "forward": which part of a transformed function `ins` belongs to."""
    if ins.adj_of is not None:
        return "adjoint"
    if ins.tan_of is not None:
        return "tangent"
    return "forward"


def to_dot(fn: Function, kernels=None) -> str:
    """DOT text of `fn`. `kernels`: optional list of (cluster label, instructions) drawn as
    clusters (an instruction joins the first cluster that lists it)."""
    namer = Namer()
    ids = {}  # id(value) -> node id
    lines = [f"digraph {_quote(fn.name)} {{", "  rankdir=TB;",
             '  node [fontname="monospace", fontsize=10];', '  edge [color="#555555"];']
    for k, p in enumerate(fn.params):
        name = namer.define(p)
        ids[id(p)] = f"p{k}"
        lines.append(f"  p{k} [label={_quote(f'%{name}: {p.type}')}, {STYLES['param']}];")
    node_lines, edges = {}, []
    for k, ins in enumerate(fn.instrs):
        name = namer.define(ins.out)
        if _is_inline_const(ins.out):
            continue
        node = f"n{k}"
        ids[id(ins.out)] = node
        label = f"%{name}\n{ins.prim.name}\n{ins.out.type}"
        for key, body in regions(ins):   # a loop: its body summarized (printed in the IR dump)
            label += f"\n{key} @{body.name}: {len(body.instrs)} instructions"
        if ins.loc:
            label += f"\n{ins.loc}"
        node_lines[id(ins)] = f"{node} [label={_quote(label)}, {STYLES[role(ins)]}];"
        for v in ins.inputs:
            if id(v) in ids:
                edges.append(f"  {ids[id(v)]} -> {node};")
    clustered = set()
    for c, (label, members) in enumerate(kernels or ()):
        inner = [node_lines[id(m)] for m in members
                 if id(m) in node_lines and id(m) not in clustered]
        clustered.update(id(m) for m in members)
        if not inner:
            continue
        lines.append(f"  subgraph cluster_{c} {{")
        lines.append(f"    label={_quote(label)}; style=dashed; color=\"#7777aa\";")
        lines.extend("    " + text for text in inner)
        lines.append("  }")
    lines.extend("  " + text for key, text in node_lines.items() if key not in clustered)
    lines.extend(edges)
    for k, o in enumerate(fn.outputs):
        lines.append(f"  out{k} [label={_quote(f'output {k}: {o.type}')}, {STYLES['output']}];")
        src = ids.get(id(o))
        if src is None:  # a rank-0 constant returned directly
            src = f"c_out{k}"
            lines.append(f"  {src} [label={_quote(namer.ref(o))}, shape=plaintext];")
        lines.append(f"  {src} -> out{k};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def kernel_clusters(fn: Function) -> list:
    """[(label, instructions)] of the kernels the native code runs for optimized `fn`."""
    from .codegen import schedule
    from .codegen.kernels import _load_all, kernels
    _load_all()

    def kernel(ins):
        return kernels.get(ins.prim)

    p = schedule.plan(fn, lambda ins: kernel(ins).scratch_bytes(ins, 1) if kernel(ins) else 0,
                      lambda ins, apart=False: kernel(ins) is not None
                      and kernel(ins).takes_epilogue(ins, apart))
    out = []
    for g in p.groups:
        members = [g.root] + list(g.members)
        if g.epilogue is not None:
            members += [g.epilogue.root] + list(g.epilogue.members)
        if g.companion is not None:
            members.append(g.companion)
        what = {"nn": f"loop nest {g.root.prim.name}", "control": f"native {g.root.prim.name} loop"
                }.get(g.kind, "fused loop")
        if g.epilogue is not None:
            what += " + epilogue"
        out.append((f"k{g.index}: {what}", members))
    return out


def graph_of_entry(entry, stage: str, path=None, transformed_stage: str = "grad") -> str:
    """DOT text of a compiled entry (tracejit.api._Compiled) at `stage`: "forward",
    `transformed_stage` ("grad", "jvp", ...) or "optimized" (with kernel clusters); rendered to
    `path` when given."""
    stages = ("forward", transformed_stage, "optimized")
    if stage not in stages:
        raise ValueError(f"graph stage must be one of {', '.join(stages)}, got {stage!r}")
    if stage == "optimized":
        dot = to_dot(entry.optimized, kernel_clusters(entry.optimized))
    else:
        dot = to_dot(entry.forward if stage == "forward" else entry.transformed)
    if path is not None:
        render(dot, path)
    return dot


def render(dot: str, path) -> str:
    """Write `dot` rendered to `path` (.svg, .png or .pdf, by its extension); returns the path.
    Raises ImportError saying what to install when graphviz or `dot` is missing."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in RENDER_FORMATS:
        raise ValueError(f"graph path must end in .svg, .png or .pdf, got {path!r}")
    try:
        import graphviz
    except ImportError:
        raise ImportError(f"rendering a graph needs graphviz: {INSTALL_HINT}") from None
    try:
        data = graphviz.Source(dot).pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise ImportError(f"rendering a graph needs the Graphviz `dot` program on PATH: "
                          f"{INSTALL_HINT}") from None
    with open(path, "wb") as f:
        f.write(data)
    return path

"""The IR as a Graphviz picture (`f.graph`): a golden DOT file for the quickstart loss, one node per
instruction and one edge per use, roles drawn apart, kernels as clusters, and rendering.

Regenerate the golden file after an intended change with
    TRACEJIT_UPDATE_GOLDEN=1 python -m pytest tests/test_graph.py -k golden

Rendering needs the graphviz package and Graphviz's `dot` (CI installs both): where they are
missing the rendering test fails saying so, rather than skipping."""
import contextlib
import io
import os
import re
import runpy
import shutil
import sys

import numpy as np
import pytest

import tracejit as tj

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "golden", "quickstart_loss.grad.dot")
QUICKSTART = os.path.join(HERE, os.pardir, "examples", "quickstart.py")


@pytest.fixture(scope="module")
def quickstart():
    with contextlib.redirect_stdout(io.StringIO()):
        g = runpy.run_path(QUICKSTART)
    return g["loss"], (g["params"], g["x"], g["t"])


def _nodes_and_edges(dot):
    nodes = dict(re.findall(r'^\s*(\w+) \[label="((?:[^"\\]|\\.)*)"', dot, re.M))
    edges = re.findall(r"^\s*(\w+) -> (\w+);$", dot, re.M)
    return nodes, edges


def test_golden_dot_of_quickstart_loss(quickstart):
    loss, args = quickstart
    dot = loss.graph(*args, stage="grad")
    if os.environ.get("TRACEJIT_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            f.write(dot)
    with open(GOLDEN) as f:
        assert dot == f.read()


def _dump_instructions(dump):
    """(name, operand names) of every instruction line of an IR dump."""
    out = []
    for line in dump.splitlines():
        m = re.match(r"\s*(?:\[\S*\s*\]\s*)?%(\S+): \S+ = \S+(.*)", line)
        if m:
            operands = m.group(2).split("{")[0].split("#")[0]
            out.append((m.group(1), re.findall(r"%([\w.]+)", operands)))
    return out


@pytest.mark.parametrize("stage", ["forward", "grad", "optimized"])
def test_every_instruction_one_node_every_use_one_edge(quickstart, stage):
    loss, args = quickstart
    dot = loss.graph(*args, stage=stage)
    dump = loss.ir(*args, stage=stage)
    nodes, edges = _nodes_and_edges(dot)
    by_name = {label.split("\\n")[0].split(":")[0]: node for node, label in nodes.items()}
    instrs = _dump_instructions(dump)
    params = re.findall(r"%([\w.]+): \w+\[", dump.splitlines()[0])
    returned = dump[dump.rindex("return"):].split("\n")[0]
    n_out = len(re.findall(r"%[\w.]+|-?\d", returned.split("return", 1)[1]))
    assert len(nodes) == len(instrs) + len(params) + n_out
    for name, _ in instrs:
        assert "%" + name in by_name, f"no node for %{name}"
    expected_edges = sorted((by_name["%" + src], by_name["%" + name])
                            for name, operands in instrs for src in operands)
    edges_into_instrs = sorted(e for e in edges if not e[1].startswith("out"))
    assert edges_into_instrs == expected_edges
    assert sum(e[1].startswith("out") for e in edges) == n_out


def test_roles_are_drawn_apart(quickstart):
    loss, args = quickstart
    dot = loss.graph(*args, stage="grad")
    nodes = re.findall(r'label="(%[^"\\]*)[^"]*", (shape=\w+)', dot)
    shapes = {name: shape for name, shape in nodes}
    assert shapes["%x: f32[2,3]"] == "shape=box"
    assert shapes["%0"] == "shape=ellipse"
    assert any(name.endswith(".adj") and shape == "shape=box" for name, shape in nodes)
    assert "doubleoctagon" in dot and "#ffd8a8" in dot  # outputs, adjoint colour

    jvp_dot = tj.jit_jvp(lambda x: tj.tanh(x).sum()).graph((np.ones(3),), (np.ones(3),))
    assert re.search(r'label="%0\.tan\\nmul\\nf64\[3\]\\n[^"]*", shape=hexagon', jvp_dot), jvp_dot
    assert re.search(r'label="%x\.tan: f64\[3\]", shape=box', jvp_dot), jvp_dot


def test_optimized_stage_draws_kernels_as_clusters(quickstart):
    loss, args = quickstart
    dot = loss.graph(*args, stage="optimized")
    dump = loss.ir(*args, stage="optimized")
    n_kernels = len(re.findall(r"// kernel k\d+:", dump))
    clusters = re.findall(r'subgraph cluster_\d+ \{\n\s*label="(k\d+): ([^"]*)"', dot)
    assert n_kernels > 1 and len(clusters) == n_kernels
    assert {c[0] for c in clusters} == set(re.findall(r"// kernel (k\d+):", dump))
    assert any(what.startswith("loop nest matmul") for _, what in clusters)


def test_unknown_stage_and_path(quickstart, tmp_path):
    loss, args = quickstart
    with pytest.raises(ValueError, match="graph stage must be one of forward, grad, optimized"):
        loss.graph(*args, stage="llvm")
    with pytest.raises(ValueError, match=r"\.svg, \.png or \.pdf"):
        loss.graph(*args, path=str(tmp_path / "loss.txt"))


def test_missing_graphviz_says_what_to_install(quickstart, tmp_path, monkeypatch):
    loss, args = quickstart
    monkeypatch.setitem(sys.modules, "graphviz", None)  # `import graphviz` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'tracejit\[viz\]'.*apt-get install "
                                          r"graphviz"):
        loss.graph(*args, path=str(tmp_path / "loss.svg"))


@pytest.mark.parametrize("ext, magic", [("svg", b"<svg"), ("png", b"\x89PNG"), ("pdf", b"%PDF")])
def test_render(quickstart, tmp_path, ext, magic):
    try:
        import graphviz  # noqa: F401
    except ImportError:
        pytest.fail("rendering needs the graphviz package: pip install 'tracejit[viz]'")
    assert shutil.which("dot"), "rendering needs Graphviz's `dot` program: apt-get install graphviz"
    loss, args = quickstart
    path = tmp_path / f"loss.{ext}"
    dot = loss.graph(*args, stage="grad", path=str(path))
    data = path.read_bytes()
    assert magic in data[:400]
    if ext == "svg":  # every instruction is drawn
        assert data.count(b'class="node"') == len(_nodes_and_edges(dot)[0])

"""Kernels whose lowering input is equal (the identical layers of a network, their gradients) are
lowered and compiled once: the others call that function. Compile time then stays flat as a
network deepens, and the shared code must compute what separate code would."""
import numpy as np
import pytest

import tracejit
from tracejit import nn
from tracejit.codegen import runtime

pytestmark = pytest.mark.needs_llvm

DEPTH = 5
RNG = np.random.default_rng(11)
PARAMS = {"w": [(RNG.standard_normal((16, 16)) / 4).astype(np.float32) for _ in range(DEPTH)],
          "b": [(RNG.standard_normal(16) / 4).astype(np.float32) for _ in range(DEPTH)],
          "conv": [(RNG.standard_normal((2, 2, 3, 3)) / 3).astype(np.float32) for _ in range(2)]}
X = RNG.standard_normal((8, 16)).astype(np.float32)
IMG = RNG.standard_normal((2, 2, 6, 6)).astype(np.float32)


def _loss(p, x, img):
    h = x
    for w, b in zip(p["w"], p["b"]):   # DEPTH identical layers
        h = tracejit.tanh(nn.linear(h, w, b))
    g = img
    for w in p["conv"]:                # two identical convolution layers
        g = nn.relu(nn.conv2d(g, w, padding=1))
    return (h * h).mean() + g.sum()


def _run(backend):
    old = tracejit.config.backend, tracejit.config.cache
    tracejit.config.backend, tracejit.config.cache = backend, False
    try:
        f = tracejit.jit_value_and_grad(_loss)
        return f, f(PARAMS, X, IMG)
    finally:
        tracejit.config.backend, tracejit.config.cache = old


def _defined(native):
    """Names of the kernel functions the lowered modules define."""
    names = set()
    for text in native.llvm_sources:
        for line in text.splitlines():
            if line.startswith("define"):
                names.add(line.split("@", 1)[1].split("(", 1)[0].strip('"'))
    return names


def test_identical_layers_share_one_kernel_and_compute_what_the_interpreter_does():
    f, got = _run("llvm")
    _, want = _run("interpreter")
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=1e-6)
    for name in ("w", "b", "conv"):
        for a, b in zip(got[1][name], want[1][name]):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)
    native = next(iter(f._cache.values())).native()
    kernels = [g for g in native.plan.groups if g.kind != "control"]
    defined = {n for n in _defined(native) if n.startswith("k") and "." in n}
    called = {g.name for g in kernels}
    lowered = called & defined
    # the forward layers 2..DEPTH-1, their input gradients and weight gradients, the bias
    # gradients and the second convolution with its gradients are calls of earlier kernels
    assert len(lowered) <= len(kernels) - 3 * (DEPTH - 2), (len(lowered), len(kernels))
    matmuls = [g for g in kernels if g.kind == "nn" and g.root.prim.name == "matmul"]
    assert len(matmuls) >= 3 * DEPTH - 1
    assert len([g for g in matmuls if g.name in defined]) < len(matmuls) - DEPTH


def _kernel_texts(native, monkeypatch):
    """Each kernel's functions (the kernel, its epilogue) as lowered on its own, named apart
    (a kernel called from another module is not `internal`: not a difference of its code)."""
    home, pipelines = runtime._modules(native.plan.groups, {}, processes=1)
    for name, value in (("_same", {}), ("_home", home), ("_pipelines", pipelines),
                        ("n_modules", len(pipelines))):
        monkeypatch.setattr(native, name, value)
    texts = {}
    for text in (str(m) for m in native._build_modules()):
        fn, body = None, []
        for line in text.splitlines() + [""]:
            if line.startswith("define"):
                fn = line.split("@", 1)[1].split("(", 1)[0].strip('"')
                body = [line.replace("define internal ", "define ")]
            elif fn is not None:
                body.append(line)
                if line == "}":
                    texts.setdefault(fn.split(".", 1)[0], []).append("\n".join(body))
                    fn = None
    return texts


def test_kernels_with_equal_keys_lower_to_the_same_code(monkeypatch):
    """The key is the sharing's whole justification: lowered separately, every kernel the key
    merges gives the same LLVM functions as the one it calls, up to their names."""
    f, _ = _run("llvm")
    native = next(iter(f._cache.values())).native()
    same = runtime._same_kernels(native.plan, native.max_threads)
    assert same
    texts = _kernel_texts(native, monkeypatch)
    by_index = {g.index: g for g in native.plan.groups}
    for dup, rep in same.items():
        a = [t.replace(f"k{dup}.", "K.") for t in texts[f"k{dup}"]]
        b = [t.replace(f"k{rep}.", "K.") for t in texts[f"k{rep}"]]
        assert a == b, (by_index[dup].name, by_index[rep].name)
    # and kernels the key keeps apart differ: the first layer's matmul reads x, not h
    firsts = {runtime._kernel_key(g, native.max_threads) for g in native.plan.groups if g.kind != "control"}
    assert len(firsts) == len(native.plan.groups) - len(same)

"""What the first call of a fresh process spends besides LLVM, and how a function split into
several LLVM modules shares its kernels' code: each shared function is compiled by one module."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_MASKED_ARRAY_MODULE = """
import sys
import numpy as np
import tracejit
tracejit.config.backend = "interpreter"
g = tracejit.jit_grad(lambda p, x: ((x @ p["w"]) ** 2).sum())
g({"w": np.ones((3, 2), np.float32)}, np.ones((4, 3), np.float32))
assert "numpy.ma" not in sys.modules, "a first call imported numpy.ma"
"""


def _run(program: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", program], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_flattening_arguments_does_not_import_numpy_ma():
    """numpy imports numpy.ma lazily (0.04 s): the masked-array check of the arguments must not
    be what imports it."""
    _run(NO_MASKED_ARRAY_MODULE)


# ------------------------------------------------------------------------------------------------
# a function split into parts: each function compiled once (codegen/partition.py)
# ------------------------------------------------------------------------------------------------
def _defined(text: str) -> list:
    return re.findall(r'^define[^@\n]*@"?([\w.$-]+)"?\(', text, re.M)


@pytest.mark.needs_llvm
def test_a_function_split_in_two_defines_each_shared_function_once(monkeypatch):
    """The convolution's padding loop and exp are shared by kernels that land in different
    parts: one part compiles each, the other calls it; the result is unchanged."""
    import numpy as np
    import tracejit
    from tracejit.codegen import target
    from test_parallel_compile import ARGS, _loss, _reference
    monkeypatch.setattr(target, "SPLIT_WEIGHT", 0)
    monkeypatch.setenv("TRACEJIT_COMPILE_PROCESSES", "2")
    old, tracejit.config.cache = tracejit.config.cache, False
    try:
        g = tracejit.jit_grad(_loss, argnums=(1, 2))
        result = g(*ARGS)
    finally:
        tracejit.config.cache = old
    parts = next(iter(g._cache.values())).native().llvm_sources
    assert len(parts) == 2
    defined = [_defined(t) for t in parts]
    assert not set(defined[0]) & set(defined[1]), set(defined[0]) & set(defined[1])
    assert any(name.startswith("tracejit.conv.pad") for d in defined for name in d)
    # what a part calls from the other is declared there
    for k, text in enumerate(parts):
        for name in defined[1 - k]:
            if re.search(rf'call [^\n]*@"?{re.escape(name)}"?\(', text):
                assert re.search(rf'^declare [^\n]*@"?{re.escape(name)}"?\(', text, re.M), name
    for got, want in zip(result, _reference()):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def _module_with_a_shared_helper():
    """entry(p) = k1(p) then k2(p); both kernels call the internal helper `twice`; the entry
    reads a literal array."""
    import llvmlite.ir as ir
    f32, ptr, void = ir.FloatType(), ir.PointerType(), ir.VoidType()
    m = ir.Module(name="split")
    twice = ir.Function(m, ir.FunctionType(f32, [f32]), "twice")
    twice.linkage = "internal"
    b = ir.IRBuilder(twice.append_basic_block("entry"))
    b.ret(b.fadd(twice.args[0], twice.args[0]))
    lit = ir.GlobalVariable(m, f32, "lit")
    lit.global_constant, lit.linkage, lit.initializer = True, "private", ir.Constant(f32, 0.5)
    kernels = []
    for name, at in (("k1", 0), ("k2", 1)):
        k = ir.Function(m, ir.FunctionType(void, [ptr]), name)
        b = ir.IRBuilder(k.append_basic_block("entry"))
        slot = b.gep(k.args[0], [ir.Constant(ir.IntType(64), at)], source_etype=f32)
        b.store(b.call(twice, [b.load(slot, typ=f32)]), slot)
        b.ret_void()
        kernels.append(k)
    entry = ir.Function(m, ir.FunctionType(void, [ptr]), "entry")
    b = ir.IRBuilder(entry.append_basic_block("entry"))
    for k in kernels:
        b.call(k, [entry.args[0]])
    slot = b.gep(entry.args[0], [ir.Constant(ir.IntType(64), 2)], source_etype=f32)
    b.store(b.load(lit, typ=f32), slot)
    b.ret_void()
    return m, entry, kernels


@pytest.mark.needs_llvm
def test_partition_compiles_a_shared_helper_in_one_part_and_links():
    import ctypes

    import llvmlite.binding as llvm
    import numpy as np
    from tracejit.codegen import partition, target
    m, entry, kernels = _module_with_a_shared_helper()
    parts = partition.Partition(m, entry, kernels, 2)
    texts = [parts.text(k) for k in range(2)]
    defined = [_defined(t) for t in texts]
    assert "entry" in defined[0]
    assert sorted(defined[0] + defined[1]) == ["entry", "k1", "k2", "twice"]
    # one kernel per part (they weigh the same), the helper with the first that reached it
    assert sorted(parts.home[k.name] for k in kernels) == [0, 1]
    helper_part = parts.home["twice"]
    assert re.search(r'^declare float @"twice"\(float\)', texts[1 - helper_part], re.M)
    assert re.search(r'^define float @"twice"', texts[helper_part], re.M)   # exported
    assert '@"lit" = private' in texts[0] and '"lit"' not in texts[1]
    objects = target.compile_objects(texts)
    jit = target.JITModule.from_object(target.pack_objects(objects), ["entry"])
    data = np.array([1.5, -2.0, 0.0], np.float32)
    target.cfunc(jit.addresses["entry"], [ctypes.c_void_p])(data.ctypes.data)
    np.testing.assert_array_equal(data, [3.0, -4.0, 0.5])


def test_the_benchmark_byte_compiles_the_package_its_workers_import():
    """benchmarks/run.py writes tracejit's .pyc files before timing a first call (as pip does on
    install): the code generator's, which a first call imports, are among them."""
    bench = os.path.join(ROOT, "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import importlib.util

    import run
    import tracejit.codegen.partition as module
    cached = importlib.util.cache_from_source(module.__file__)
    if os.path.exists(cached):
        os.unlink(cached)
    message = run.byte_compile_tracejit()
    assert message.startswith("tracejit: byte-compiled "), message
    assert os.path.exists(cached), (message, cached)

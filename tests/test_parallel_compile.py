"""A big function is lowered into two LLVM modules that two processes compile at once (codegen/
target.py): the result must equal the single-module build, survive the persistent cache, and fall
back to compiling here when a child fails."""
import os

import numpy as np
import pytest

import tracejit
from tracejit.codegen import target
from tracejit import nn

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

RNG = np.random.default_rng(7)
ARGS = (RNG.standard_normal((3, 2, 9, 9)).astype(np.float32),
        (RNG.standard_normal((4, 2, 3, 3)) / 4).astype(np.float32),
        (RNG.standard_normal((5, 64)) / 8).astype(np.float32))


def _loss(x, w, v):
    h = nn.max_pool2d(nn.relu(nn.conv2d(x, w, padding=1)), 2)
    h = nn.relu(h.reshape(3, 64) @ v.T)
    return nn.log_softmax(h).sum() + (h * h).mean()


def _native(processes, monkeypatch):
    monkeypatch.setattr(target, "SPLIT_WEIGHT", 0)   # split even this small function
    monkeypatch.setenv("TRACEJIT_COMPILE_PROCESSES", str(processes))
    g = tracejit.jit_grad(_loss, argnums=(1, 2))
    with _no_cache():
        result = g(*ARGS)
    native = next(iter(g._cache.values())).native()
    return result, native


class _no_cache:
    def __enter__(self):
        self.old, tracejit.config.cache = tracejit.config.cache, False

    def __exit__(self, *exc):
        tracejit.config.cache = self.old


def _reference():
    with _no_cache():
        old, tracejit.config.backend = tracejit.config.backend, "interpreter"
        try:
            return tracejit.jit_grad(_loss, argnums=(1, 2))(*ARGS)
        finally:
            tracejit.config.backend = old


def test_modules_compiled_by_two_processes_from_a_queue(monkeypatch):
    children = []   # (pid, modules whose object file arrived)
    real_collect = target._collect

    def collect(child, *rest):
        objs = real_collect(child, *rest)
        children.append((child[0], sorted(objs)))
        return objs
    monkeypatch.setattr(target, "_collect", collect)
    compiles_here = target.llvm_modules
    result, native = _native(2, monkeypatch)
    n = len(native.llvm_sources)
    assert n >= 3   # the entry's, a kernels' module, fused loops
    assert len(target.unpack_objects(native._jit.object_code)) == n
    # the entry compiled here; each other module by one of the two processes, the child at
    # least one (it starts on the first while this process compiles the entry)
    assert len(children) == 1 and children[0][0] != os.getpid(), children
    taken = children[0][1]
    assert taken and 0 not in taken and set(taken) <= set(range(1, n)), children
    assert target.llvm_modules - compiles_here == n - len(taken)
    # the dumps compile each module again with its own pipeline
    assert "@entry(" in native.llvm_ir and "entry:" in native.asm
    for got, want in zip(result, _reference()):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_a_failing_fork_is_replaced_by_compiles_here(monkeypatch):
    monkeypatch.setattr(target, "_compile_in_child", lambda *args: None)
    result, native = _native(2, monkeypatch)
    assert len(native.llvm_sources) >= 3
    for got, want in zip(result, _reference()):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_modules_a_dying_child_took_are_compiled_here(monkeypatch):
    """A child that fails after taking modules from the queue delivers none of them: this
    process compiles them after all."""
    parent = os.getpid()
    real = target._compile_object

    def compile_object(item, level):
        if os.getpid() != parent:
            raise RuntimeError("a child that fails")
        return real(item, level)
    monkeypatch.setattr(target, "_compile_object", compile_object)
    result, native = _native(2, monkeypatch)
    assert len(target.unpack_objects(native._jit.object_code)) == len(native.llvm_sources)
    for got, want in zip(result, _reference()):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_object_container_round_trip():
    objs = [b"first object", b"", b"third" * 1000]
    assert target.unpack_objects(target.pack_objects(objs)) == objs
    assert target.unpack_objects(target.pack_objects([b"only"])) == [b"only"]
    with pytest.raises(ValueError):
        target.unpack_objects(target.pack_objects(objs)[:-3])


def test_cached_split_code_links_in_a_new_function(monkeypatch, tmp_path):
    monkeypatch.setattr(target, "SPLIT_WEIGHT", 0)
    monkeypatch.setenv("TRACEJIT_COMPILE_PROCESSES", "2")
    compiled = []
    for _ in range(2):   # the second build finds the two-object entry in the cache
        g = tracejit.jit_grad(_loss, argnums=(1, 2))
        old = tracejit.config.cache_dir
        tracejit.config.cache_dir = str(tmp_path)
        try:
            result = g(*ARGS)
        finally:
            tracejit.config.cache_dir = old
        compiled.append((result, next(iter(g._cache.values())).native()))
    (r1, n1), (r2, n2) = compiled
    assert not n1.cache_hit and n2.cache_hit
    for a, b in zip(r1, r2):
        np.testing.assert_array_equal(a, b)



def _groups(prims):
    """Stand-ins for a plan's loop-nest kernels of these primitives (what `_modules` reads)."""
    from types import SimpleNamespace
    return [SimpleNamespace(index=k, kind="nn", root=SimpleNamespace(prim=p))
            for k, p in enumerate(prims)]


def test_kernels_sharing_generic_functions_are_lowered_into_one_module(monkeypatch):
    """Every matmul kernel calls the same generic tile and packing functions: spread over two
    modules, both would compile those again (LeNet-5's gradient did). Only a unit heavier
    than a process's share is split (a deep MLP's matmuls)."""
    from tracejit.codegen import runtime
    from tracejit.codegen.runtime import _modules
    from tracejit.ir.prims.linalg import matmul_p
    # the stand-ins have no operands to plan: every matmul calls one tile function
    monkeypatch.setattr(runtime, "_shared_weights",
                        lambda g: {"tile": 20} if g.root.prim is matmul_p else {})
    from tracejit.ir.prims.nn import conv2d_p
    mixed = _groups([matmul_p] * 9 + [conv2d_p] * 5)
    home, _ = _modules(mixed, processes=2)
    assert len({home[g.index] for g in mixed if g.root.prim is matmul_p}) == 1, home
    assert len(set(home.values())) == 2, home
    mlp = _groups([matmul_p] * 20)
    home, _ = _modules(mlp, processes=2)
    assert sorted(home.values()).count(1) in range(8, 13), home


def test_the_thread_pool_is_built_while_the_child_compiles(monkeypatch):
    """The pool the entry links against costs an LLVM compile of its own: the parent does it
    while the child compiles, right after the entry's module and before it takes modules from
    the queue (which then even out the work), not after."""
    from tracejit.codegen import parallel, threadpool
    if not threadpool.available():
        pytest.skip("no thread pool on this platform")   # (its code is then never linked)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_NS", 0)   # (so the entry calls the pool)
    monkeypatch.setattr(threadpool, "_the_pool", None)
    built = []   # whether the pool was there, when this process took from the queue
    parent, real_take = os.getpid(), target._take

    def take(queue):
        if os.getpid() == parent:
            built.append(threadpool._the_pool is not None)
        return real_take(queue)
    monkeypatch.setattr(target, "_take", take)
    _native(2, monkeypatch)
    assert built and all(built), built


def test_a_failing_compile_here_leaves_no_child_behind(monkeypatch):
    """An error in this process's compile is raised, after the children are stopped and
    reaped."""
    parent = os.getpid()
    real = target._compile_object
    pids = []
    real_fork = target._compile_in_child

    def fork(*args):
        child = real_fork(*args)
        pids.append(child[0])
        return child

    def compile_object(item, level):
        if os.getpid() == parent:
            raise RuntimeError("LLVM failed here")
        return real(item, level)
    monkeypatch.setattr(target, "_compile_in_child", fork)
    monkeypatch.setattr(target, "_compile_object", compile_object)
    with pytest.raises(RuntimeError, match="LLVM failed here"):
        _native(2, monkeypatch)
    assert pids
    for pid in pids:   # reaped: no such child any more
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

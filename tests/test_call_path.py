"""The call path of compiled functions taking pytrees (dicts, lists, tuples of arrays): a call whose
structure, shapes, dtypes and layouts were seen before skips the full Signature (a runner found by
the structure, signature.fast_leaves, and a native check of the leaves, codegen/leafcheck.py, or
their facts), with every guarantee of the full path kept: the same results, retracing on a new
signature, copies of layouts the native code cannot read, inputs never written, lists of numbers
refused where arrays were traced, captured arrays guarded, and safe from many threads."""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tracejit
import tracejit.api
from helpers import use_backend
from tracejit.api import Jitted

pytestmark = pytest.mark.needs_llvm  # the fast path exists for the native backend only


@pytest.fixture(autouse=True)
def native_backend():
    with use_backend("llvm"):
        yield


@pytest.fixture
def signatures(monkeypatch):
    """Counts the Signatures built by calls (one per call on the full path)."""
    counter = {"n": 0}
    real = tracejit.api.Signature

    def counting(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(tracejit.api, "Signature", counting)
    return counter


@contextlib.contextmanager
def signature_path():
    """Runs the block with the pytree fast path off (every call builds a Signature)."""
    Jitted._fast_trees = False
    try:
        yield
    finally:
        Jitted._fast_trees = True


def mlp_loss(p, x, t):
    h = tracejit.tanh(x @ p["w1"] + p["b1"])
    return (((h @ p["w2"] + p["b2"]) - t) ** 2).mean()


def mlp(rng, dtype=np.float64):
    p = {"w1": rng.normal(size=(5, 7)), "b1": rng.normal(size=7),
         "w2": rng.normal(size=(7, 3)), "b2": rng.normal(size=3)}
    return ({k: v.astype(dtype) for k, v in p.items()}, rng.normal(size=(4, 5)).astype(dtype),
            rng.normal(size=(4, 3)).astype(dtype))


def mlp_grad_numpy(p, x, t):
    """The MLP loss's gradient w.r.t. p, by hand (the oracle)."""
    a = x @ p["w1"] + p["b1"]
    h = np.tanh(a)
    r = h @ p["w2"] + p["b2"] - t
    dy = 2 * r / r.size
    dh = dy @ p["w2"].T
    da = dh * (1 - h ** 2)
    return {"w1": x.T @ da, "b1": da.sum(0), "w2": h.T @ dy, "b2": dy.sum(0)}


def assert_trees_equal(a, b):
    """Same structure (types, dict keys in order) and bitwise-equal arrays."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_trees_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_trees_equal(x, y)
    else:
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_a_repeated_dict_call_builds_no_signature(signatures):
    f = tracejit.jit_grad(mlp_loss)
    p, x, t = mlp(np.random.default_rng(0))
    f(p, x, t)
    first = signatures["n"]
    for _ in range(3):
        g = f(p, x, t)
    assert signatures["n"] == first
    want = mlp_grad_numpy(p, x, t)
    for k in want:
        np.testing.assert_allclose(g[k], want[k], rtol=1e-10, atol=1e-12)


def nested_loss(p, x):
    a, (b, c) = p["pair"]
    return (a * x).sum() + (b @ c).sum() * p["s"][0].sum() + (x ** 2).sum()


def nested_args(rng):
    p = {"pair": [rng.normal(size=3), (rng.normal(size=(2, 3)), rng.normal(size=(3, 2)))],
         "s": (rng.normal(size=()),)}
    return p, rng.normal(size=3)


@pytest.mark.parametrize("make", [
    lambda: tracejit.jit_grad(mlp_loss),
    lambda: tracejit.jit_value_and_grad(mlp_loss, argnums=(0, 1)),
    lambda: tracejit.jit_grad(lambda p, x, t: (mlp_loss(p, x, t), {"x": [x * 2.0]}),
                              has_aux=True),
    lambda: tracejit.jit(lambda p, x, t: {"h": [x @ p["w1"], (p["b2"] * 2.0,)], "t": t}),
], ids=["grad", "value_and_grad-argnums", "grad-aux", "jit"])
def test_fast_path_results_equal_the_signature_path(make):
    f = make()
    p, x, t = mlp(np.random.default_rng(1))
    with signature_path():
        slow = f(p, x, t)
    fast = [f(p, x, t) for _ in range(2)]
    assert f._tree_runners, "the second call should have taken the pytree fast path"
    for r in fast:
        assert_trees_equal(r, slow)


def test_nested_containers_on_the_fast_path(signatures):
    f = tracejit.jit_value_and_grad(nested_loss, argnums=(0, 1))
    p, x = nested_args(np.random.default_rng(2))
    with signature_path():
        slow = f(p, x)
    f(p, x)
    n = signatures["n"]
    assert_trees_equal(f(p, x), slow)
    assert signatures["n"] == n
    with use_backend("interpreter"):
        ref = f(p, x)
    np.testing.assert_allclose(slow[0], ref[0], rtol=1e-12)
    np.testing.assert_allclose(slow[1][0]["pair"][1][0], ref[1][0]["pair"][1][0], rtol=1e-12)


def test_new_shapes_dtypes_keys_and_key_order_retrace():
    f = tracejit.jit_grad(mlp_loss)
    rng = np.random.default_rng(3)
    p, x, t = mlp(rng)
    f(p, x, t)
    f(p, x, t)
    assert len(f._cache) == 1
    p32, x32, t32 = mlp(rng, np.float32)
    g = f(p32, x32, t32)                                     # new dtypes
    assert len(f._cache) == 2 and g["w1"].dtype == np.float32
    wide = dict(p, w1=rng.normal(size=(6, 7)))
    f(wide, rng.normal(size=(4, 6)), t)                      # a new shape
    assert len(f._cache) == 3
    reordered = {k: p[k] for k in ["b2", "w2", "b1", "w1"]}
    g = f(reordered, x, t)                                   # dict keys in another order
    assert len(f._cache) == 4 and list(g) == ["b2", "w2", "b1", "w1"]
    np.testing.assert_allclose(g["w1"], mlp_grad_numpy(p, x, t)["w1"], rtol=1e-10)
    with pytest.warns(tracejit.ZeroGradientWarning):
        f(dict(p, extra=np.ones(2)), x, t)                   # an added key
    assert len(f._cache) == 5
    for args in [(p, x, t), (p32, x32, t32), (reordered, x, t)]:  # seen before: no retrace
        f(*args)
    assert len(f._cache) == 5
    with pytest.raises(TypeError, match=r"p\['b1'\].*int8"):  # a bad dtype still names the leaf
        f(dict(p, b1=p["b1"].astype(np.int8)), x, t)


def test_unusual_layouts_are_copied_and_give_equal_results():
    f = tracejit.jit_grad(mlp_loss)
    p, x, t = mlp(np.random.default_rng(4))
    want = f(p, x, t)
    f(p, x, t)
    raw = np.zeros(p["b1"].nbytes + 1, np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=np.float64, count=7, offset=1)
    misaligned[...] = p["b1"]
    read_only = p["b2"].copy()
    read_only.flags.writeable = False
    layouts = {
        "w1": np.asfortranarray(p["w1"]),                      # Fortran order
        "b1": misaligned,                                       # misaligned
        "w2": np.ascontiguousarray(p["w2"].T).T,                # a transposed view
        "b2": read_only,                                        # read-only
    }
    odd = dict(p, **layouts)
    swapped = {k: v.astype(v.dtype.newbyteorder()) for k, v in p.items()}  # byte-swapped
    strided = {k: np.repeat(v, 2, axis=-1)[..., ::2] for k, v in p.items()}  # every other one
    for args in [(odd, x, t), (swapped, x, t), (strided, x, t), (p, x[:, ::-1][:, ::-1], t)]:
        for _ in range(2):
            assert_trees_equal(f(*args), want)
    assert len(f._cache) == 1


def test_inputs_are_never_written():
    f = tracejit.jit_grad(lambda p: sum((v * v).sum() for v in p.values()))
    rng = np.random.default_rng(5)
    p = {"a": rng.normal(size=(3, 4)), "b": np.asfortranarray(rng.normal(size=(4, 3))),
         "c": rng.normal(size=5).astype(">f8")}
    saved = {k: v.copy() for k, v in p.items()}
    for _ in range(3):
        g = f(p)
        for k in p:
            assert g[k] is not p[k]
            np.testing.assert_array_equal(p[k], saved[k])
            np.testing.assert_allclose(g[k], 2 * saved[k], rtol=1e-15)


def test_a_list_of_floats_where_an_array_was_traced_raises():
    f = tracejit.jit_grad(lambda p, x: (p["w"] * x["v"]).sum())
    p, x = {"w": np.ones(3)}, {"v": np.arange(3.0)}
    f(p, x)
    f(p, x)  # the fast path knows this signature
    with pytest.raises(TypeError, match=r"x\['v'\].*expected an array.*f64\[3\]"):
        f(p, {"v": [0.0, 1.0, 2.0]})
    with pytest.raises(TypeError, match=r"p\['w'\].*differentiated"):
        f({"w": [1.0, 1.0, 1.0]}, x)



@pytest.mark.parametrize("value", [[0.0, 1.0, 2.0], np.float64(1.0), 2.0, "w"],
                         ids=["list", "numpy-scalar", "float", "str"])
def test_a_single_dict_with_a_value_not_an_array_leaves_the_fast_path(value):
    # f(params) with one dict goes straight to the last runner for its keys, whose native check
    # must refuse a value that is not an exact ndarray: the full path then explains it
    f = tracejit.jit_grad(lambda p: (p["w"] * p["v"]).sum())
    p = {"w": np.ones(3), "v": np.arange(3.0)}
    for _ in range(3):
        np.testing.assert_array_equal(f(p)["w"], [0.0, 1.0, 2.0])
    assert f._tree_last, "the repeated call should have taken the natively checked fast path"
    with pytest.raises(TypeError, match=r"(argument p|p\['v'\]).*differentiated"):
        f({"w": np.ones(3), "v": value})
    np.testing.assert_array_equal(f(p)["v"], [1.0, 1.0, 1.0])

SCALE = np.array([1.0, 2.0, 3.0])


def scaled_loss(p):
    return (p["w"] * SCALE).sum() + (p["b"] ** 2).sum()


def test_a_rebound_captured_global_retraces_with_dict_params():
    global SCALE
    f = tracejit.jit_grad(scaled_loss)
    p = {"w": np.ones(3), "b": np.ones(2)}
    np.testing.assert_array_equal(f(p)["w"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(f(p)["w"], [1.0, 2.0, 3.0])  # fast path
    old = SCALE
    try:
        SCALE = np.array([5.0, 6.0, 7.0])
        np.testing.assert_array_equal(f(p)["w"], [5.0, 6.0, 7.0])
        SCALE[0] = -1.0  # a small captured array changed in place: retraces too
        np.testing.assert_array_equal(f(p)["w"], [-1.0, 6.0, 7.0])
        np.testing.assert_array_equal(f(p)["w"], [-1.0, 6.0, 7.0])
    finally:
        SCALE = old
    assert f._stale == 2


def test_other_trees_fall_back_and_stay_correct(signatures):
    """Leaves or containers the fast path does not take (dict subclasses, static values, tracers
    inside another trace) go the full path every time and still compute the right thing."""
    from collections import OrderedDict
    f = tracejit.jit_grad(lambda p, n: (p["w"] ** 2).sum() * n)
    od = OrderedDict(w=np.arange(3.0))
    for _ in range(2):
        np.testing.assert_array_equal(f(od, 2.0)["w"], [0.0, 4.0, 8.0])
    assert signatures["n"] == 2 and not f._tree_runners
    outer = tracejit.jit_grad(lambda w: f({"w": w}, 1.0)["w"].sum())
    np.testing.assert_array_equal(outer(np.arange(3.0)), [2.0, 2.0, 2.0])


def test_eight_threads_calling_with_dicts():
    f = tracejit.jit_grad(mlp_loss)
    rng = np.random.default_rng(6)
    batches = [mlp(np.random.default_rng(100 + i)) for i in range(8)]
    f(*mlp(rng))
    barrier = threading.Barrier(8)

    def job(i):
        barrier.wait()
        return [f(*batches[i]) for _ in range(30)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(job, range(8)))
    assert len(f._cache) == 1
    for i, rs in enumerate(results):
        want = mlp_grad_numpy(*batches[i])
        for g in rs:
            for k in want:
                np.testing.assert_allclose(g[k], want[k], rtol=1e-10, atol=1e-12)


def _unaligned(n):
    """A float32 array of n elements whose data is not 4-byte aligned."""
    raw = np.zeros(4 * n + 1, np.uint8)
    x = raw[1:].view(np.float32)
    assert not x.flags.aligned
    return x


def test_leaf_checker_accepts_only_the_leaves_it_was_made_for():
    from tracejit.codegen.leafcheck import leaf_checker
    leaves = [np.full((2, 3), i, np.float32) for i in range(4)] + [np.zeros((), np.float64)]
    check = leaf_checker(leaves)
    assert check is not None and check(tuple(leaves))
    assert check(tuple(np.zeros_like(x) for x in leaves)), "new arrays of the same kind pass"
    readonly = np.zeros((2, 3), np.float32)
    readonly.flags.writeable = False

    class Sub(np.ndarray):
        pass
    others = {
        "fewer": tuple(leaves[:4]), "more": tuple(leaves) + (leaves[0],),
        "shape": (np.zeros((3, 2), np.float32),), "ndim": (np.zeros(6, np.float32),),
        "dtype": (np.zeros((2, 3), np.float64),), "byte order": (np.zeros((2, 3), ">f4"),),
        "strided": (np.zeros((2, 6), np.float32)[:, ::2],),
        "fortran": (np.asfortranarray(np.zeros((2, 3), np.float32) + 1),),
        "unaligned": (_unaligned(6).reshape(2, 3),), "read-only": (readonly,),
        "subclass": (np.zeros((2, 3), np.float32).view(Sub),),
        "masked": (np.ma.zeros((2, 3), np.float32),), "scalar": (np.float32(1),),
        "list": ([[0.0] * 3] * 2,), "int": (3,),
    }
    for why, first in others.items():
        tup = first + tuple(leaves[len(first):]) if why not in ("fewer", "more") else first
        assert not check(tup), why
    assert leaf_checker([readonly]) is None   # the runner copies it: no native check


@pytest.mark.parametrize("make", [
    lambda x: x[:, ::2], lambda x: _unaligned(x.size).reshape(x.shape), lambda x: x.astype(">f4"),
    lambda x: x.astype(np.float64), lambda x: x[:1], lambda x: np.asfortranarray(x),
    lambda x: np.ma.masked_array(x), lambda x: x.reshape(-1),
], ids=["strided", "unaligned", "byteswapped", "float64", "shape", "fortran", "masked", "ndim"])
def test_a_leaf_unlike_the_checked_ones_misses_the_native_check(make):
    # after a call with C-contiguous float32 leaves, a call with one leaf of another layout, dtype,
    # byte order or shape must not reach the native code compiled for the first ones
    f = tracejit.jit_grad(lambda p: sum((v * v).sum() for v in p.values()))
    rng = np.random.default_rng(3)
    p = {k: rng.normal(size=(2, 4)).astype(np.float32) for k in "abc"}
    for _ in range(2):
        g = f(p)
    assert f._tree_last, "the second call should have taken the natively checked fast path"
    for k in p:
        np.testing.assert_allclose(g[k], 2 * p[k], rtol=1e-6)
    q = dict(p)
    q["b"] = make(p["b"].copy())
    if type(q["b"]) is not np.ndarray:   # masked arrays are refused, by name
        with pytest.raises(TypeError, match="mask"):
            f(q)
        return
    for _ in range(2):
        g = f(q)
        for k in q:
            want = 2 * np.asarray(q[k], np.float64)
            assert g[k].shape == q[k].shape
            np.testing.assert_allclose(g[k], want, rtol=1e-6)


def test_fast_path_without_the_native_check(monkeypatch, signatures):
    # where the object layout probe fails there is no native check: calls find their runner by
    # the leaves' facts, and still take the fast path
    from tracejit.codegen import leafcheck
    monkeypatch.setattr(leafcheck, "_state", [None])
    f = tracejit.jit_grad(lambda p: sum((v * v).sum() for v in p.values()))
    p = {k: np.full((2, 2), i + 1.0, np.float32) for i, k in enumerate("xy")}
    for _ in range(3):
        g = f(p)
    assert signatures["n"] == 1 and not f._tree_last
    q = dict(p, y=np.zeros((4, 2), np.float32)[::2])   # a strided leaf: copied, same result
    np.testing.assert_array_equal(f(q)["y"], np.zeros((2, 2), np.float32))
    for k in p:
        np.testing.assert_array_equal(g[k], 2 * p[k])


@pytest.fixture
def fresh_leaf_check(monkeypatch):
    """This process without the native leaf check, its object code or a request for it."""
    from tracejit.codegen import leafcheck
    monkeypatch.setattr(leafcheck, "_state", [])
    monkeypatch.setattr(leafcheck, "_object", [])
    monkeypatch.setattr(leafcheck, "_requested", False)
    return leafcheck


def test_the_leaf_check_compiles_along_with_a_split_compile(monkeypatch, tmp_path,
                                                            fresh_leaf_check):
    # a pytree call whose compile is split over two processes builds the leaf check as one more
    # module of the queue: the second call links it and runs no LLVM; the check still refuses a
    # leaf of another dtype or shape (the full path then names the leaf)
    from tracejit.codegen import target
    monkeypatch.setenv("TRACEJIT_COMPILE_PROCESSES", "2")
    monkeypatch.setattr(target, "SPLIT_WEIGHT", 0)
    monkeypatch.setattr(tracejit.config, "cache_dir", str(tmp_path / "cache"))
    f = tracejit.jit_grad(lambda p: ((p["w"] @ p["x"]).sum() + (p["b"] * p["b"]).sum()))
    rng = np.random.default_rng(5)
    p = {"w": rng.normal(size=(3, 4)).astype(np.float32),
         "x": rng.normal(size=(4, 2)).astype(np.float32), "b": np.ones(3, np.float32)}
    g = f(p)
    assert fresh_leaf_check._object, "the compile should have built the leaf check alongside"
    assert list(tmp_path.joinpath("cache").glob("*.check")), "and stored it in the cache"
    compiles = target.llvm_compiles
    g2 = f(p)
    assert target.llvm_compiles == compiles, "the second call ran LLVM"
    assert f._tree_last, "the second call should have taken the natively checked fast path"
    with use_backend("interpreter"):
        want = tracejit.jit_grad(lambda p: ((p["w"] @ p["x"]).sum()
                                            + (p["b"] * p["b"]).sum()))(p)
    for k in p:
        np.testing.assert_allclose(g[k], want[k], rtol=1e-5)
        np.testing.assert_array_equal(g2[k], g[k])
    with pytest.raises(TypeError, match=r"\['b'\].*int8"):
        f(dict(p, b=np.ones(3, np.int8)))
    wrong = f(dict(p, b=np.ones(5, np.float32)))   # another signature: traced again, right
    np.testing.assert_allclose(wrong["b"], 2 * np.ones(5, np.float32))


def test_the_leaf_check_comes_from_the_compile_cache(monkeypatch, tmp_path, fresh_leaf_check):
    # a process whose compile cache holds the leaf check links it on the second call: no LLVM
    from tracejit.codegen import cache, target
    monkeypatch.setattr(tracejit.config, "cache_dir", str(tmp_path / "cache"))
    monkeypatch.setenv("TRACEJIT_COMPILE_PROCESSES", "1")   # (nothing compiles alongside)
    loss = lambda p: (p["a"] * p["c"]).sum()   # noqa: E731
    p = {"a": np.arange(6, dtype=np.float32), "c": np.full(6, 2.0, np.float32)}
    f0 = tracejit.jit_grad(loss)
    # (the counters are the process's: tests/test_cache.py corrupts entries on purpose)
    corrupt = cache.stats["corrupt"]
    for _ in range(2):
        f0(p)   # the check is compiled on the second call, and stored
    assert fresh_leaf_check._state[0] is not None and f0._tree_last
    assert list(tmp_path.joinpath("cache").glob("*.check"))
    # as in a new process: the check not made, its object code on disk
    monkeypatch.setattr(fresh_leaf_check, "_state", [])
    f = tracejit.jit_grad(loss)
    f(p)
    assert not fresh_leaf_check._state and not fresh_leaf_check._object
    hits, compiles = fresh_leaf_check.stats["hits"], target.llvm_compiles
    g = f(p)
    assert fresh_leaf_check.stats["hits"] == hits + 1 and target.llvm_compiles == compiles
    assert f._tree_last and fresh_leaf_check._state[0] is not None
    np.testing.assert_array_equal(g["a"], p["c"])
    np.testing.assert_array_equal(g["c"], p["a"])
    assert cache.stats["corrupt"] == corrupt


def test_calls_with_plain_arrays_do_not_build_the_leaf_check(monkeypatch, tmp_path,
                                                             fresh_leaf_check):
    # the leaf check serves pytree calls only: a split compile for plain array arguments
    # compiles the function's modules and nothing else
    from tracejit.codegen import target
    monkeypatch.setenv("TRACEJIT_COMPILE_PROCESSES", "2")
    monkeypatch.setattr(target, "SPLIT_WEIGHT", 0)
    monkeypatch.setattr(tracejit.config, "cache_dir", str(tmp_path / "cache"))
    f = tracejit.jit_grad(lambda w, x: (w @ x).sum())
    w, x = np.ones((3, 4), np.float32), np.full((4, 2), 0.5, np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(f(w, x), np.ones((3, 4), np.float32))
    assert not fresh_leaf_check._object and not fresh_leaf_check._state
    assert not list(tmp_path.joinpath("cache").glob("*.check"))

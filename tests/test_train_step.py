"""jit_train_step: one native call computing the loss, its gradient and the optimizer update, which
writes the new parameters and optimizer state into the arrays passed in. Checked against a loop of
jit_grad + optimizer.update on both backends, for the in-place contract (same objects, no
allocation per step, bad arrays refused before anything is written) and for the two ways codegen
stores a donated output: in place, or computed aside and copied in."""
from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

import tracejit
from helpers import rng_for, use_backend
from tracejit import nn, optim
from tracejit.codegen import parallel

BACKENDS = ["llvm", "interpreter"]
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def mlp_loss(p, x, t):
    h = tracejit.tanh(x @ p["w1"] + p["b1"])
    return nn.mse_loss(h @ p["w2"] + p["b2"], t)


def mlp_params(dtype, seed="mlp"):
    rng = rng_for(seed, np.dtype(dtype).name)
    return {"w1": (rng.normal(size=(12, 24)) * 0.4).astype(dtype),
            "b1": (rng.normal(size=24) * 0.1).astype(dtype),
            "w2": (rng.normal(size=(24, 5)) * 0.4).astype(dtype),
            "b2": np.zeros(5, dtype)}


def batch(dtype, n=16, seed="batch"):
    rng = rng_for(seed, n, np.dtype(dtype).name)
    return rng.normal(size=(n, 12)).astype(dtype), rng.normal(size=(n, 5)).astype(dtype)


OPTIMIZERS = {"sgd_momentum": lambda: optim.sgd(0.1, momentum=0.9, weight_decay=1e-3),
              "sgd_nesterov": lambda: optim.sgd(0.05, momentum=0.8, nesterov=True),
              "adam": lambda: optim.adam(1e-2, weight_decay=1e-3)}


def copy_tree(tree):
    return tracejit.tree.map(np.copy, tree)


def assert_trees_close(a, b, tol):
    for x, y in zip(tracejit.tree.leaves(a), tracejit.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def eager_trajectory(loss, opt, params, batches, has_aux=False):
    """(losses, params, state) of a loop of jit_grad + optimizer.update on numpy arrays."""
    vg = tracejit.jit_value_and_grad(loss, has_aux=has_aux)
    params = copy_tree(params)
    state = opt.init(params)
    losses = []
    for b in batches:
        value, g = vg(params, *b)
        losses.append(value)
        params, state = opt.update(g, state, params)
    return losses, params, state


def steps_match_the_eager_loop(loss, opt, init, batches, tol=1e-12):
    """(step, params, state) after a jit_train_step over `batches` from copies of `init`, checked
    against the eager loop."""
    _, want_p, want_s = eager_trajectory(loss, opt, init, batches)
    step = tracejit.jit_train_step(loss, opt)
    params = copy_tree(init)
    state = opt.init(params)
    for b in batches:
        step(params, state, *b)
    assert_trees_close(params, want_p, tol)
    assert_trees_close(state, want_s, tol)
    return step, params, state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("which", sorted(OPTIMIZERS))
def test_trajectory_equals_grad_and_update_loop(which, dtype, backend):
    opt = OPTIMIZERS[which]()
    init = mlp_params(dtype)
    batches = [batch(dtype, seed=f"b{i % 4}") for i in range(20)]
    with use_backend(backend):
        want_losses, want_p, want_s = eager_trajectory(mlp_loss, opt, init, batches)
        step = tracejit.jit_train_step(mlp_loss, opt)
        params = copy_tree(init)
        state = opt.init(params)
        leaves = tracejit.tree.leaves(params) + tracejit.tree.leaves(state)
        for b, want in zip(batches, want_losses):
            loss, p2, s2 = step(params, state, *b)
            assert p2 is params and s2 is state
            np.testing.assert_allclose(loss, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert all(x is y for x, y in zip(leaves, tracejit.tree.leaves(params) +
                                      tracejit.tree.leaves(state)))
    assert_trees_close(params, want_p, TOL[dtype])
    assert_trees_close(state, want_s, TOL[dtype])
    assert float(state["step"]) == 20.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_equals_the_functional_update(backend):
    opt = optim.adam(1e-2)
    params = mlp_params(np.float64)
    state = opt.init(params)
    for _ in range(3):   # a state with nonzero buffers
        params, state = opt.update(tracejit.jit_grad(mlp_loss)(params, *batch(np.float64)),
                                   state, params)
    x, t = batch(np.float64, seed="other")
    want_p, want_s = opt.update(tracejit.jit_grad(mlp_loss)(params, x, t), state, params)
    with use_backend(backend):
        loss, p2, s2 = tracejit.jit_train_step(mlp_loss, opt)(params, state, x, t)
    assert p2 is params and s2 is state
    assert_trees_close(params, want_p, 1e-13)
    assert_trees_close(state, want_s, 1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_has_aux(backend):
    def loss(p, x, t):
        y = x @ p["w1"]
        return (y * y).mean() + (t * t).mean(), {"y_sum": y.sum(), "y": y}

    opt = optim.sgd(0.1, momentum=0.5)
    init = mlp_params(np.float64)
    init = {"w1": init["w1"]}
    batches = [batch(np.float64, seed=f"aux{i}") for i in range(3)]
    with use_backend(backend):
        want, want_p, _ = eager_trajectory(loss, opt, init, batches, has_aux=True)
        step = tracejit.jit_train_step(loss, opt, has_aux=True)
        params = copy_tree(init)
        state = opt.init(params)
        for b, (w_loss, w_aux) in zip(batches, want):
            (l, aux), p2, s2 = step(params, state, *b)
            assert p2 is params and s2 is state
            np.testing.assert_allclose(l, w_loss, rtol=1e-13)
            assert sorted(aux) == ["y", "y_sum"]
            np.testing.assert_allclose(aux["y"], w_aux["y"], rtol=1e-13)
            np.testing.assert_allclose(aux["y_sum"], w_aux["y_sum"], rtol=1e-12)
    assert_trees_close(params, want_p, 1e-12)


def test_a_step_allocates_only_the_loss():
    def loss(p, x, t):
        return nn.mse_loss(tracejit.tanh(x @ p["w1"]) @ p["w2"], t)

    rng = rng_for("alloc")
    params = {"w1": rng.normal(size=(64, 128)) * 0.2, "w2": rng.normal(size=(128, 32)) * 0.2}
    x, t = rng.normal(size=(8, 64)), rng.normal(size=(8, 32))
    opt = optim.adam(1e-3)
    state = opt.init(params)
    step = tracejit.jit_train_step(loss, opt)
    for _ in range(3):   # warm-up: compile, the arena
        step(params, state, x, t)
    smallest = min(a.nbytes for a in tracejit.tree.leaves(params) + tracejit.tree.leaves(state)
                   if a.ndim)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loss_value, _, _ = step(params, state, x, t)
        gc.collect()   # the argument signature's reference cycles (pytree.flatten's closure)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loss_value.shape == ()
    # a copy of any parameter or state buffer (>= 32 KB) would show in the peak; the loss and
    # the call's Python objects (the argument signature, tuples: ~8 KB) are smaller
    assert peak - before < smallest // 2, (peak - before, smallest)
    assert after - before < 512


# ------------------------------------------------------------------------------------------------
# arrays that cannot be updated in place
# ------------------------------------------------------------------------------------------------
def _misaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    m = np.frombuffer(buf.data, a.dtype, count=a.size, offset=1).reshape(a.shape)
    m[...] = a
    return m


def _read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _strided_view(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    v = big[..., ::2]
    v[...] = a
    return v


BAD = {
    "read-only": (_read_only, "read-only"),
    "fortran": (np.asfortranarray, "not C-contiguous"),
    "sliced view": (_strided_view, "not C-contiguous"),
    "misaligned": (_misaligned, "not aligned"),
    "byte-swapped": (lambda a: a.astype(a.dtype.newbyteorder(">")), "byte order"),
    "int dtype": (lambda a: a.astype(np.int64), "int64"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["params", "state"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_array_raises_naming_its_path_and_writes_nothing(bad, where, backend):
    make, words = BAD[bad]
    opt = optim.adam(1e-2)
    x, t = batch(np.float64)
    with use_backend(backend):
        step = tracejit.jit_train_step(mlp_loss, opt)
        params = mlp_params(np.float64)
        state = opt.init(params)
        step(params, state, x, t)    # compiled for these arrays: the check is per call
        if where == "params":
            params["w2"] = make(params["w2"])
            path = "params['w2']"
        else:
            state["exp_avg"]["w2"] = make(state["exp_avg"]["w2"])
            path = "state['exp_avg']['w2']"
        before = copy_tree((params, state))
        with pytest.raises(TypeError) as e:
            step(params, state, x, t)
    assert path in str(e.value) and words in str(e.value), str(e.value)
    for got, want in zip(tracejit.tree.leaves((params, state)), tracejit.tree.leaves(before)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["same object", "overlapping views", "batch view",
                                  "batch view of a parameter"])
def test_aliased_arrays_raise_and_write_nothing(case, backend):
    """Checked on every call: the first call, with arrays that do not alias, compiles and sets up
    the fast path of later calls, which must refuse the aliasing arrays as well."""
    opt = optim.sgd(0.1, momentum=0.9)
    x, t = batch(np.float64)
    params = mlp_params(np.float64)
    if case == "same object":
        params["b2"] = params["b1"][:5].copy()
        params["b1b"] = params["b2"]
        names = ("params['b2']", "params['b1b']")
    elif case == "overlapping views":
        flat = np.zeros(40)
        params["b1"], params["b2"] = flat[:24], flat[20:25]
        names = ("params['b1']", "params['b2']")
    elif case == "batch view":
        buf = np.zeros(300)    # the batch reads the memory the step updates
        x, params["w1"] = buf[:192].reshape(16, 12), buf[:288].reshape(12, 24)
        names = ("x", "params['w1']")
    state = opt.init(params)
    first = copy_tree((params, state, x))

    def loss(p, x, t):
        extra = sum(v.sum() for k, v in p.items() if k not in ("w1", "b1", "w2", "b2"))
        return mlp_loss(p, x, t) + 0.1 * extra

    step = tracejit.jit_train_step(loss, opt)
    with use_backend(backend):
        if case == "batch view of a parameter":
            # the same parameter arrays as the first call, a batch viewing one of them
            step(params, state, x, t)
            x = params["w1"].reshape(-1)[:x.size].reshape(x.shape)
            names = ("x", "params['w1']")
        else:
            step(*first, t)
        before = copy_tree((params, state, x))
        with pytest.raises(TypeError) as e:
            step(params, state, x, t)
    assert all(n in str(e.value) for n in names) and "share memory" in str(e.value), str(e.value)
    for got, want in zip(tracejit.tree.leaves((params, state, x)), tracejit.tree.leaves(before)):
        np.testing.assert_array_equal(got, want)


def test_repeated_calls_skip_the_argument_signature(monkeypatch):
    """After the first call, a call with arrays of the same structure, shapes, dtypes and layout
    (new array objects included) runs without building the argument Signature, and still
    computes the step."""
    import tracejit.train as train
    built = []

    def counting(*args, **kwargs):
        built.append(1)
        return signature(*args, **kwargs)

    signature = train._Signature
    monkeypatch.setattr(train, "_Signature", counting)
    opt = optim.sgd(0.1, momentum=0.9)
    step = tracejit.jit_train_step(mlp_loss, opt)
    params = mlp_params(np.float64)
    state = opt.init(params)
    want_p, want_s = copy_tree(params), copy_tree(state)
    for i in range(4):
        x, t = batch(np.float64, seed=f"b{i}")
        if i == 2:   # new arrays holding the same values
            params, state = copy_tree(params), copy_tree(state)
        step(params, state, x, t)
        want_p, want_s = opt.update(tracejit.jit_grad(mlp_loss)(want_p, x, t), want_s, want_p)
    assert len(built) == 1
    assert_trees_close(params, want_p, 1e-12)
    assert_trees_close(state, want_s, 1e-12)


def test_fast_path_checks_memory_sharing_cheaply_and_still_refuses_it(monkeypatch):
    """After the first calls, the fast path checks that no two updated arrays share memory only
    when the params and state arrays change, and a C-contiguous batch against them by its address
    alone (the full checks run when they find sharing, to name the arrays). A batch viewing a
    parameter and an array flagged read-only in place are still refused."""
    import tracejit.train as train
    calls = []
    for name in ("_check_in_place", "_check_batch"):
        monkeypatch.setattr(train, name, (lambda f, name: lambda *a: calls.append(name) or f(*a))(
            getattr(train, name), name))
    opt = optim.sgd(0.1, momentum=0.9)
    step = tracejit.jit_train_step(mlp_loss, opt)
    params = mlp_params(np.float64)
    state = opt.init(params)
    want_p, want_s = copy_tree(params), copy_tree(state)
    grad = tracejit.jit_grad(mlp_loss)
    seen = []
    for i, change in enumerate(["", "", "batch", "batch", "", "params"]):
        if change == "params":
            params = copy_tree(params)
        x, t = batch(np.float64, seed="first" if change != "batch" else f"b{i}")
        calls.clear()
        step(params, state, x, t)
        seen.append(calls[:])
        want_p, want_s = opt.update(grad(want_p, x, t), want_s, want_p)
    # the first call (the slow path) and the first run of the fast path check everything
    assert seen[2:] == [[], [], [], ["_check_in_place"]], seen
    assert_trees_close(params, want_p, 1e-12)
    assert_trees_close(state, want_s, 1e-12)
    with pytest.raises(TypeError, match=r"x and params\['w1'\] share memory"):
        step(params, state, params["w1"].reshape(-1)[:x.size].reshape(x.shape), t)
    params["w2"].flags.writeable = False
    with pytest.raises(TypeError, match=r"params\['w2'\] cannot be updated in place"):
        step(params, state, x, t)


def test_disjoint_views_of_one_buffer_are_fine():
    flat = np.zeros(24 + 5)
    params = mlp_params(np.float64)
    want = copy_tree(params)
    flat[:24], flat[24:] = params["b1"], params["b2"]
    params["b1"], params["b2"] = flat[:24], flat[24:]
    opt = optim.sgd(0.1)
    x, t = batch(np.float64)
    tracejit.jit_train_step(mlp_loss, opt)(params, opt.init(params), x, t)
    want, _ = opt.update(tracejit.jit_grad(mlp_loss)(want, x, t), opt.init(want), want)
    np.testing.assert_allclose(flat, np.concatenate([want["b1"], want["b2"]]), rtol=1e-13)


class _Custom:
    """An optimizer-like object: `update(grads, state, params)` written in tracejit ops."""

    def __init__(self, update):
        self.update = update

    def init(self, params):
        return {"step": np.zeros((), np.float64)}


def _sq_loss(p, x):
    return ((x @ p["a"]) ** 2).mean() + (p["b"] ** 2).sum()


def _square_params():
    rng = rng_for("square")
    return {"a": rng.normal(size=(6, 6)), "b": rng.normal(size=(6, 6))}


def test_an_update_of_another_dtype_raises_naming_the_parameter():
    opt = _Custom(lambda g, s, p: ({"a": (p["a"] - g["a"]).astype(np.float32),
                                    "b": p["b"] - g["b"]}, {"step": s["step"] + 1}))
    params = _square_params()
    before = copy_tree(params)
    with pytest.raises(TypeError, match=r"params\['a'\].*f32"):
        tracejit.jit_train_step(_sq_loss, opt)(params, opt.init(params), np.eye(6))
    np.testing.assert_array_equal(params["a"], before["a"])


# ------------------------------------------------------------------------------------------------
# how the new values reach the arrays: in place, or copied in at the end
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["sgd_momentum", "adam"])
def test_mlp_step_writes_every_update_in_place(which):
    opt = OPTIMIZERS[which]()
    params = mlp_params(np.float32)
    state = opt.init(params)
    x, t = batch(np.float32)
    step = tracejit.jit_train_step(mlp_loss, opt)
    dump = step.ir(params, state, x, t, stage="optimized")
    n = len(tracejit.tree.leaves(params)) + len(tracejit.tree.leaves(state))
    assert dump.count("written in place into parameter") == n, dump
    assert "copied" not in dump
    for path in ("%params.w1", "%params.b2", "%state.step"):
        assert f"in place into parameter {path}\n" in dump + "\n"
    native = step._jitted._lookup(step._signature(params, state, (x, t))[0]).native()
    assert [how for _, _, how in native.plan.donated] == ["in place"] * n
    assert "llvm.memcpy" not in native.llvm_ir_unoptimized
    # one fused loop per parameter reads the gradient once and stores the parameter and its
    # state buffers (the momentum, or Adam's two moments); for the weights, whose gradients are
    # matmuls, that loop is the matmul's epilogue, run on each block of the gradient it finishes
    groups = native.plan.groups
    merged = [g for g in groups if g.extra_outputs] + [g.epilogue for g in groups
                                                        if g.epilogue_apart]
    assert len(merged) == len(params), dump
    assert all(len(g.extra_outputs) == len(state) - 1 for g in merged), dump
    assert sorted(g.root.out.type.shape for g in groups if g.epilogue_apart) == [(12, 24), (24, 5)]


def test_update_as_a_matmul_epilogue_on_a_thread_team():
    """The weights' update runs as the epilogue of the matmul computing their gradient; here that
    matmul is large enough to run on a thread team (each thread updating the rows it finishes)."""
    def loss(p, x, t):
        return nn.mse_loss(tracejit.tanh(x @ p["w1"]) @ p["w2"], t)

    rng = rng_for("team")
    init = {"w1": rng.normal(size=(64, 128)) * 0.1, "w2": rng.normal(size=(128, 8)) * 0.1}
    batches = [(rng.normal(size=(192, 64)), rng.normal(size=(192, 8))) for _ in range(3)]
    step, params, state = steps_match_the_eager_loop(loss, optim.adam(1e-2), init, batches)
    native = step._jitted._lookup(step._signature(params, state, batches[0])[0]).native()
    apart = [g for g in native.plan.groups if g.epilogue_apart]
    assert [g.root.out.type.shape for g in apart] == [(128, 8), (64, 128)]
    assert apart[1].cost_ns >= parallel.PARALLEL_MIN_NS


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_reading_parameters_transposed_is_copied_in(backend):
    # new a reads a transposed, new b is a matmul reading b: neither kernel can overwrite the
    # parameter it reads, so codegen computes them aside and copies them in at the end
    def update(g, s, p):
        a = p["a"] - 0.1 * g["a"] + 0.01 * tracejit.transpose(p["a"])
        b = p["b"] @ (0.9 * np.eye(6))
        return {"a": a, "b": b}, {"step": s["step"] + 1}

    opt = _Custom(update)
    params = _square_params()
    x = rng_for("xsq").normal(size=(4, 6))
    want = copy_tree(params)
    ws = opt.init(want)
    for _ in range(3):
        want, ws = update(tracejit.jit_grad(_sq_loss)(want, x), ws, want)
    step = tracejit.jit_train_step(_sq_loss, opt)
    state = opt.init(params)
    dump = step.ir(params, state, x, stage="optimized")
    assert "then copied into parameter %params.a" in dump, dump
    assert "then copied into parameter %params.b" in dump, dump
    assert "written in place into parameter %state.step" in dump
    with use_backend(backend):
        for _ in range(3):
            step(params, state, x)
    assert_trees_close(params, want, 1e-13)
    assert float(state["step"]) == 3.0
    if backend == "llvm":
        assert "llvm.memcpy" in step._jitted._lookup(
            step._signature(params, state, (x,))[0]).native().llvm_ir_unoptimized


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_swapping_parameters_reads_both_before_writing(backend):
    # outputs that are parameters themselves: the caller copies them, from values read before
    # the native code overwrites anything
    def update(g, s, p):
        return {"a": p["b"], "b": p["a"]}, {"step": s["step"] + 1}

    opt = _Custom(update)
    params = _square_params()
    a, b = params["a"].copy(), params["b"].copy()
    step = tracejit.jit_train_step(_sq_loss, opt)
    state = opt.init(params)
    assert "copied by the caller into parameter %params.a" in \
        step.ir(params, state, np.eye(6), stage="optimized")
    with use_backend(backend):
        step(params, state, np.eye(6))
    np.testing.assert_array_equal(params["a"], b)
    np.testing.assert_array_equal(params["b"], a)


def test_ir_stages():
    opt = optim.adam(1e-2)
    params = mlp_params(np.float32)
    state = opt.init(params)
    x, t = batch(np.float32)
    step = tracejit.jit_train_step(mlp_loss, opt)
    texts = {s: step.ir(params, state, x, t, stage=s)
             for s in ("forward", "grad", "optimized", "llvm", "llvm-opt", "asm")}
    assert "func @mlp_loss.step(" in texts["forward"]
    assert "adj of" in texts["grad"] and "sqrt" in texts["grad"]   # the adjoint and Adam's update
    assert "donated: output" in texts["optimized"]
    assert "define void @\"entry\"" in texts["llvm"] or "define void @entry" in texts["llvm"]
    assert texts["asm"].strip()
    with pytest.raises(ValueError, match="stage"):
        step.ir(params, state, x, t, stage="nope")


def test_new_batch_shape_retraces():
    opt = optim.sgd(0.1, momentum=0.9)
    init = mlp_params(np.float64)
    batches = [batch(np.float64, n=16), batch(np.float64, n=8), batch(np.float64, n=16, seed="c")]
    step, _, _ = steps_match_the_eager_loop(mlp_loss, opt, init, batches)
    assert step.compile_stats()["signatures"] == 2


def test_called_inside_a_trace_raises():
    opt = optim.sgd(0.1)
    step = tracejit.jit_train_step(mlp_loss, opt)
    params = mlp_params(np.float64)

    @tracejit.jit
    def f(p, x, t):
        return step(p, opt.init(params), x, t)[0]

    with pytest.raises(TypeError, match="inside a trace"):
        f(params, *batch(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_returning_one_value_twice_and_a_constant(backend):
    # outputs the caller fills by copying: the same value as an earlier output, a literal
    ones = np.full((6, 6), 3.0)

    def update(g, s, p):
        v = p["a"] - 0.1 * g["a"]
        return {"a": v, "b": v}, {"step": s["step"] * 0.0 + ones[0, 0]}

    opt = _Custom(update)
    params = _square_params()
    want = update(tracejit.jit_grad(_sq_loss)(params, np.eye(6)), opt.init(params), params)[0]
    state = opt.init(params)
    step = tracejit.jit_train_step(_sq_loss, opt)
    dump = step.ir(params, state, np.eye(6), stage="optimized")
    assert "written in place into parameter %params.a" in dump   # the gradient's epilogue, split
    assert "copied by the caller into parameter %params.b" in dump
    with use_backend(backend):
        step(params, state, np.eye(6))
    np.testing.assert_allclose(params["a"], want["a"], rtol=1e-14)
    np.testing.assert_allclose(params["b"], want["a"], rtol=1e-14)
    assert float(state["step"]) == 3.0


def test_compile_cache_keeps_code_with_donated_outputs_apart(tmp_path):
    from tracejit.codegen import compile_function
    from tracejit.codegen.cache import DiskCache
    opt = optim.sgd(0.1)
    params = mlp_params(np.float64)
    state = opt.init(params)
    x, t = batch(np.float64)
    step = tracejit.jit_train_step(mlp_loss, opt)
    sig, _ = step._signature(params, state, (x, t))
    entry = step._jitted._lookup(sig)
    cache = DiskCache(tmp_path)
    compile_function(entry.optimized, cache=cache)   # the same IR, outputs in new arrays
    native = compile_function(entry.optimized, cache=cache, donate=entry.donate)
    assert not native.cache_hit
    arrays = [v for _, _, v in sig.leaves]
    before = params["w1"].copy()
    outs = native(arrays)
    assert outs[1] is params["w1"] and not np.array_equal(params["w1"], before)
    assert compile_function(entry.optimized, cache=cache, donate=entry.donate).cache_hit

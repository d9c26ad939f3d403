"""A training step's weight update fused into the matmul computing the weight's gradient as an
epilogue applied apart (codegen/kernels/matmul.py `_rows`): the product is computed a panel of rows
at a time into one panel-sized buffer (on the thread's stack up to STACK_PANEL_BYTES, else over
the thread's first rows of the product), and the update runs over each panel. Checked against the
reference interpreter on shapes that are not multiples of the register block, for SGD with
momentum and Adam, on 1 and 2 threads (equal bit for bit: the threads split the rows, never an
element's sum). The update is an epilogue only over products of at most matmul.APART_L2_SHARE of
the L2 (larger ones run it as a loop of its own: `_epilogue_apart`); the panel tests force it
(matmul.FORCE["apart"]), so that they cover the panels whatever the L2."""
from __future__ import annotations

import numpy as np
import pytest

import tracejit
from helpers import rng_for, use_backend
from tracejit import nn, optim
from tracejit.codegen.kernels import matmul

OPTIMIZERS = {"sgd_momentum": lambda: optim.sgd(0.05, momentum=0.9),
              "adam": lambda: optim.adam(1e-2)}


@pytest.fixture
def fused(monkeypatch):
    """Every optimizer update over a matmul is its epilogue applied apart, whatever its size."""
    monkeypatch.setitem(matmul.FORCE, "apart", True)


def loss(p, x, t):
    """x [batch, n_in] @ W^T [n_in, n_out]: W's gradient is dy^T @ x [n_out, n_in], a matmul
    of K = batch whose epilogue is W's update."""
    h = tracejit.tanh(x @ p["w"].T)
    return nn.mse_loss(h @ p["v"], t)


def problem(n_out, n_in, batch, seed, dtype=np.float32):
    rng = rng_for("epilogue-panels", n_out, n_in, batch, seed)
    init = {"w": (rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)).astype(dtype),
            "v": (rng.normal(size=(n_out, 3)) * 0.3).astype(dtype)}
    batches = [(rng.normal(size=(batch, n_in)).astype(dtype),
                rng.normal(size=(batch, 3)).astype(dtype)) for _ in range(3)]
    return init, batches


def run_steps(opt, init, batches, backend, threads=None):
    """(params, state, step) after a jit_train_step over `batches` from copies of `init`."""
    old = tracejit.get_num_threads()
    try:
        with use_backend(backend):
            tracejit.set_num_threads(threads)
            step = tracejit.jit_train_step(loss, opt)
            params = tracejit.tree.map(np.copy, init)
            state = opt.init(params)
            for b in batches:
                step(params, state, *b)
    finally:
        tracejit.set_num_threads(old)
    return params, state, step


def apart_gradient(step, params, state, batch):
    """The native function and the plan group of W's gradient matmul with its update apart."""
    native = step._jitted._lookup(step._signature(params, state, batch)[0]).native()
    groups = [g for g in native.plan.groups if g.epilogue_apart
              and g.root.out.type.shape == params["w"].shape]
    assert len(groups) == 1, [g.root.out.type for g in native.plan.groups]
    return native, groups[0]


def on_stack(n_in, dtype=np.float32):
    """Whether `_rows` keeps the panels of a gradient [*, n_in] at K = 64 on the stack."""
    dt = "f32" if dtype == np.float32 else "f64"
    return matmul._panel_on_stack(matmul._block_plan(dt, 64, n_in, 64, True, False))


# (n_out, n_in, batch): rows and columns off the register block (6 x 16 with 16 registers, 6 x 64
# with 32) and off the 32-row panels; the last gradient's panel is too large for the stack
SHAPES = [(37, 45, 9), (130, 301, 40), (70, 2300, 24)]


# Adam's step is about lr * sign(g) where |g| is tiny: float32 rounding of g moves it by up to lr
TOL = {(np.float64, "sgd_momentum"): (1e-10, 1e-12), (np.float64, "adam"): (1e-10, 1e-12),
       (np.float32, "sgd_momentum"): (2e-5, 2e-6), (np.float32, "adam"): (2e-5, 1e-4)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", sorted(OPTIMIZERS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_update_epilogue_matches_the_interpreter_on_one_and_two_threads(which, shape, dtype,
                                                                        fused):
    init, batches = problem(*shape, which, dtype)
    rtol, atol = TOL[dtype, which]
    want_p, want_s, _ = run_steps(OPTIMIZERS[which](), init, batches, "interpreter")
    got = {}
    for threads in (1, 2):
        params, state, step = run_steps(OPTIMIZERS[which](), init, batches, "llvm", threads)
        for name, (g, w) in {"params": (params, want_p), "state": (state, want_s)}.items():
            for x, y in zip(tracejit.tree.leaves(g), tracejit.tree.leaves(w)):
                np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                           err_msg=f"{name}, {threads} threads")
        got[threads] = tracejit.tree.leaves((params, state))
    for one, two in zip(got[1], got[2]):
        np.testing.assert_array_equal(one, two)
    apart_gradient(step, params, state, batches[0])   # the update is W's gradient's epilogue


def test_the_shapes_cover_both_panel_buffers():
    for dtype in (np.float32, np.float64):
        fits = [on_stack(n_in, dtype) for _, n_in, _ in SHAPES]
        assert fits == [True, True, False], dtype


def test_the_two_thread_run_splits_the_gradient_between_threads(fused):
    """The 2-thread case above runs W's gradient on the pool (else it would not test chunks whose
    panels share one thread's buffer)."""
    from tracejit.codegen import parallel
    init, batches = problem(*SHAPES[1], "pool")
    params, state, step = run_steps(optim.sgd(0.05, momentum=0.9), init, batches, "llvm", 2)
    _, group = apart_gradient(step, params, state, batches[0])
    assert group.cost_ns >= parallel.PARALLEL_MIN_NS


def test_an_update_over_a_product_past_the_l2_share_runs_as_a_loop_of_its_own():
    """W's update is the epilogue of its gradient while the product takes at most APART_L2_SHARE
    of the L2 (kernels.CACHED_BYTES), else a loop of its own after the matmul, which keeps its
    whole-product split (matmul `_lower_one`); the parameters and the state match the
    interpreter's either way."""
    from tracejit.codegen.kernels import CACHED_BYTES
    limit = matmul.APART_L2_SHARE * CACHED_BYTES
    n_out = 40
    small = int(limit // (4 * n_out))          # f32 [40, small]: at the limit
    for n_in, apart in ((small, True), (small + 1, False)):
        assert (n_out * n_in * 4 <= limit) == apart
        init, batches = problem(n_out, n_in, 8, "l2-share")
        want_p, want_s, _ = run_steps(optim.sgd(0.05, momentum=0.9), init, batches,
                                      "interpreter")
        params, state, step = run_steps(optim.sgd(0.05, momentum=0.9), init, batches, "llvm")
        for g, w in zip(tracejit.tree.leaves((params, state)),
                        tracejit.tree.leaves((want_p, want_s))):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
        native = step._jitted._lookup(step._signature(params, state, batches[0])[0]).native()
        grads = [g for g in native.plan.groups if g.kind == "nn"
                 and g.root.out.type.shape == (n_out, n_in)]
        assert len(grads) == 1
        assert grads[0].epilogue_apart == apart
        # the update stores the parameter and its momentum: as the epilogue, or as a loop
        updates = [g for g in native.plan.groups if g.kind == "loop"
                   and g.root.out.type.shape == (n_out, n_in) and g.extra_outputs]
        assert len(updates) == (0 if apart else 1)

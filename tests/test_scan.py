"""Structured loops: tracejit.scan, fori_loop and while_loop, in the IR (one instruction with its
body as a nested function), the interpreter, reverse and forward mode, and native code (one loop
whose code does not grow with the trip count)."""
import re

import numpy as np
import pytest

import helpers
from torch_golden import torch_reference
import tracejit
from tracejit.ir.verify import VerifyError, verify
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType
from tracejit.ir.prims import control
from tracejit.ir import lax

TOL = (1e-10, 1e-10)
sigmoid = tracejit.nn.sigmoid


# ------------------------------------------------------------------------------------------------
# the models: one step each, run by scan or by a Python loop
# ------------------------------------------------------------------------------------------------
def elman_step(p, h, x):
    return tracejit.tanh(x @ p["Wx"] + h @ p["Wh"] + p["b"])


def lstm_step(p, carry, x):
    h, c = carry
    H = h.shape[-1]
    z = x @ p["Wx"] + h @ p["Wh"] + p["b"]          # gates i, f, g, o as torch.nn.LSTM
    i, f = sigmoid(z[:, :H]), sigmoid(z[:, H:2 * H])
    g, o = tracejit.tanh(z[:, 2 * H:3 * H]), sigmoid(z[:, 3 * H:])
    c = f * c + i * g
    return o * tracejit.tanh(c), c


def gru_step(p, h, x):
    H = h.shape[-1]
    gi = x @ p["Wx"] + p["bx"]                       # gates r, z, n as torch.nn.GRU
    gh = h @ p["Wh"] + p["bh"]
    r = sigmoid(gi[:, :H] + gh[:, :H])
    z = sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = tracejit.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    return (1 - z) * n + z * h


STEPS = {"elman": elman_step, "lstm": lstm_step, "gru": gru_step}
T, B, D, H = 5, 2, 3, 4


def _hidden(model, carry):
    return carry[0] if model == "lstm" else carry


def _init(model):
    h = np.zeros((B, H))
    return (h, np.zeros((B, H))) if model == "lstm" else h


def scan_loss(model):
    step = STEPS[model]

    def loss(p, xs, r):
        def body(carry, x):
            carry = step(p, carry, x)
            return carry, _hidden(model, carry)
        carry, hs = tracejit.scan(body, _init(model), xs)
        return (hs * r).sum() + (_hidden(model, carry) ** 2).sum()
    return loss


def unrolled_loss(model):
    step = STEPS[model]

    def loss(p, xs, r):
        carry, total = _init(model), 0.0
        for t in range(xs.shape[0]):
            carry = step(p, carry, xs[t])
            total = total + (_hidden(model, carry) * r[t]).sum()
        return total + (_hidden(model, carry) ** 2).sum()
    return loss


def model_params(model, rng):
    gates = {"elman": 1, "lstm": 4, "gru": 3}[model]
    p = {"Wx": rng.normal(size=(D, gates * H)) * 0.5, "Wh": rng.normal(size=(H, gates * H)) * 0.5}
    if model == "gru":
        p.update(bx=rng.normal(size=gates * H) * 0.1, bh=rng.normal(size=gates * H) * 0.1)
    else:
        p["b"] = rng.normal(size=gates * H) * 0.1
    return p


def torch_loss_and_grads(model, p, xs, r):
    """The same loss with torch.nn.LSTM / nn.GRU holding the same weights (float64), as stored
    (tests/torch_golden.py: torch is not a dependency of the tests)."""
    def compute(torch):
        loss, grads = _torch_loss_and_grads(torch, model, p, xs, r)
        return {"loss": np.array(loss), **grads}
    ref = torch_reference(f"scan-{model}", compute)
    return float(ref.pop("loss")), ref


def _torch_loss_and_grads(torch, model, p, xs, r):
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[model]
    net = cls(D, H).double()
    with torch.no_grad():
        net.weight_ih_l0.copy_(torch.from_numpy(p["Wx"].T))
        net.weight_hh_l0.copy_(torch.from_numpy(p["Wh"].T))
        if model == "gru":
            net.bias_ih_l0.copy_(torch.from_numpy(p["bx"]))
            net.bias_hh_l0.copy_(torch.from_numpy(p["bh"]))
        else:   # one bias in our model: all of it in bias_ih
            net.bias_ih_l0.copy_(torch.from_numpy(p["b"]))
            net.bias_hh_l0.zero_()
    hs, _ = net(torch.from_numpy(xs))
    loss = (hs * torch.from_numpy(r)).sum() + (hs[-1] ** 2).sum()
    loss.backward()
    grads = {"Wx": net.weight_ih_l0.grad.numpy().T, "Wh": net.weight_hh_l0.grad.numpy().T}
    if model == "gru":
        grads.update(bx=net.bias_ih_l0.grad.numpy(), bh=net.bias_hh_l0.grad.numpy())
    else:
        grads["b"] = net.bias_ih_l0.grad.numpy()
    return float(loss.detach()), grads


@pytest.mark.parametrize("model", ["elman", "lstm", "gru"])
def test_rnn_gradients_match_unrolled_and_torch(model):
    rng = helpers.rng_for("scan", model)
    p, xs, r = model_params(model, rng), rng.normal(size=(T, B, D)), rng.normal(size=(T, B, H))
    scanned = tracejit.jit_value_and_grad(scan_loss(model), argnums=(0, 1))
    with helpers.use_backend("interpreter"):   # the oracle: the Python loop, unrolled
        ref_loss, ref = tracejit.jit_value_and_grad(unrolled_loss(model), argnums=(0, 1))(p, xs, r)
        interp_loss, interp = scanned(p, xs, r)
    native_loss, native = scanned(p, xs, r)
    for loss, (gp, gx) in ((interp_loss, interp), (native_loss, native)):
        helpers.assert_close(loss, ref_loss, TOL, f"{model} loss")
        helpers.assert_close(gx, ref[1], TOL, f"{model} d/dxs")
        for k in p:
            helpers.assert_close(gp[k], ref[0][k], TOL, f"{model} d/d{k}")
    if model != "elman":
        t_loss, t_grads = torch_loss_and_grads(model, p, xs, r)
        helpers.assert_close(native_loss, t_loss, TOL, f"{model} loss vs torch")
        for k in p:
            helpers.assert_close(native[0][k], t_grads[k], TOL, f"{model} d/d{k} vs torch")


# ------------------------------------------------------------------------------------------------
# semantics: reverse, pytrees, xs=None, eager
# ------------------------------------------------------------------------------------------------
def _cumulative(reverse):
    def f(w, xs):
        def body(carry, x):
            s = carry["s"] * w + x["a"]
            return {"s": s, "n": (carry["n"][0] + 1.0,)}, (s, x["b"] * s)
        carry, (ys, zs) = tracejit.scan(body, {"s": np.zeros(3), "n": (np.float64(0.0),)},
                                        {"a": xs, "b": xs[:, :1]}, reverse=reverse)
        return carry["s"], carry["n"][0], ys, zs
    return f


def _cumulative_numpy(w, xs, reverse):
    s, ys, zs = np.zeros(3), [None] * len(xs), [None] * len(xs)
    for t in (range(len(xs) - 1, -1, -1) if reverse else range(len(xs))):
        s = s * w + xs[t]
        ys[t], zs[t] = s, xs[t, :1] * s
    return s, float(len(xs)), np.stack(ys), np.stack(zs)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_pytrees_and_reverse_match_a_python_loop(reverse):
    rng = helpers.rng_for("scan-tree", reverse)
    w, xs = rng.normal(size=3), rng.normal(size=(6, 3))
    want = _cumulative_numpy(w, xs, reverse)
    f = _cumulative(reverse)
    results = {"eager": f(w, xs)}
    with helpers.use_backend("interpreter"):
        results["interpreter"] = tracejit.jit(f)(w, xs)
    results["native"] = tracejit.jit(f)(w, xs)
    for name, got in results.items():
        for g, e in zip(got, want):
            helpers.assert_close(g, e, TOL, f"{name}, reverse={reverse}")


def test_scan_gradient_with_reverse_matches_finite_differences():
    rng = helpers.rng_for("scan-reverse-grad")
    w, xs = rng.normal(size=3) * 0.5, rng.normal(size=(4, 3))

    def loss(w, xs):
        s, n, ys, zs = _cumulative(True)(w, xs)
        return (tracejit.tanh(ys) * np.arange(1.0, 4.0)).sum() + (s ** 2).sum() + zs.sum()
    with helpers.use_backend("interpreter"):
        grads = tracejit.jit_grad(loss, argnums=(0, 1))(w, xs)
        fd = helpers.numeric_grad(tracejit.jit(loss), [w, xs], (0, 1))
    helpers.assert_grads_match_fd(grads, fd, "f64", "reverse scan")


def test_scan_without_xs_takes_length():
    def f(a):
        return tracejit.scan(lambda c, x: (c * a, c), np.ones(2), length=4)
    a = np.array([2.0, 0.5])
    for got in (f(a), tracejit.jit(f)(a)):
        helpers.assert_close(got[0], a ** 4, TOL)
        helpers.assert_close(got[1], np.stack([a ** k for k in range(4)]), TOL)
    with pytest.raises(ValueError, match="pass length"):
        tracejit.scan(lambda c, x: (c, c), np.ones(2))
    # no steps: the carry as it was, ys empty but of the body's shape (eager, native)
    empty = lambda a: tracejit.scan(lambda c, x: (c * a, c[:1]), np.ones(2), length=0)  # noqa: E731
    for c, ys in (empty(a), tracejit.jit(empty)(a)):
        helpers.assert_close(c, np.ones(2), TOL)
        assert ys.shape == (0, 1)


def test_scan_errors_name_the_problem():
    xs = np.ones((3, 2))
    with pytest.raises(TypeError, match=r"carry.*f64\[3\].*f64\[2\]"):
        tracejit.jit(lambda xs: tracejit.scan(lambda c, x: (tracejit.concatenate([c, x[:1]]), x),
                                              np.zeros(2), xs))(xs)
    with pytest.raises(ValueError, match="leading dimension"):
        tracejit.scan(lambda c, x: (c, c), 0.0, (np.ones((3, 1)), np.ones((4, 1))))
    with pytest.raises(TypeError, match="pair"):
        tracejit.jit(lambda xs: tracejit.scan(lambda c, x: c, np.zeros(2), xs))(xs)


# ------------------------------------------------------------------------------------------------
# fori_loop, while_loop
# ------------------------------------------------------------------------------------------------
def fixed_point(a):
    # x = cos(a x) by iteration: contracts for |a| < 1
    return tracejit.fori_loop(0, 40, lambda i, x: tracejit.cos(a * x), np.ones(3))


def test_fori_loop_fixed_point_value_and_gradient():
    a = np.array([0.3, 0.5, 0.7])
    x = np.ones(3)
    for _ in range(40):
        x = np.cos(a * x)
    loss = lambda a: (fixed_point(a) * np.array([1.0, 2.0, 3.0])).sum()  # noqa: E731
    helpers.assert_close(fixed_point(a), x, TOL, "eager")
    helpers.assert_close(tracejit.jit(fixed_point)(a), x, TOL, "native")
    g = tracejit.jit_grad(loss)(a)
    with helpers.use_backend("interpreter"):
        helpers.assert_close(tracejit.jit_grad(loss)(a), g, TOL, "interpreter")
        fd = helpers.numeric_grad(tracejit.jit(loss), [a], (0,))
    helpers.assert_grads_match_fd([g], fd, "f64", "fori_loop")
    # the loop index is an int32 scalar
    idx = tracejit.jit(lambda x: tracejit.fori_loop(2, 5, lambda i, v: v + i, x))(np.zeros(2))
    helpers.assert_close(idx, np.full(2, 9.0), TOL, "index")


def newton_sqrt(a):
    # x <- (x + a / x) / 2 while |x^2 - a| > 1e-12
    return tracejit.while_loop(lambda x: tracejit.abs(x * x - a).max() > 1e-12,
                               lambda x: (x + a / x) / 2, np.ones(3))


def test_while_loop_values_and_gradient_error():
    a = np.array([2.0, 9.0, 0.25])
    want = np.sqrt(a)
    helpers.assert_close(newton_sqrt(a), want, (1e-12, 1e-12), "eager")
    with helpers.use_backend("interpreter"):
        helpers.assert_close(tracejit.jit(newton_sqrt)(a), want, (1e-12, 1e-12), "interpreter")
    helpers.assert_close(tracejit.jit(newton_sqrt)(a), want, (1e-12, 1e-12), "native")
    # a loop whose trip count depends on the data: counted in a carry
    count = tracejit.jit(lambda x: tracejit.while_loop(lambda c: c[0] < 100.0,
                                                       lambda c: (c[0] * x, c[1] + 1.0),
                                                       (np.float64(1.0), np.float64(0.0))))
    assert count(np.float64(3.0))[1] == 5.0 and count(np.float64(10.0))[1] == 2.0
    with pytest.raises(tracejit.IRError, match=r"while_loop at test_scan\.py:\d+.*fori_loop"):
        tracejit.jit_grad(lambda a: newton_sqrt(a).sum())(a)


# ------------------------------------------------------------------------------------------------
# derivatives of higher order and forward mode
# ------------------------------------------------------------------------------------------------
def _tanh_rnn_loss(w, xs):
    h, _ = tracejit.scan(lambda h, x: (tracejit.tanh(h * w + x), None), np.zeros(3), xs)
    return (h ** 3).sum()


def test_second_derivative_through_scan_matches_finite_differences():
    rng = helpers.rng_for("scan-second")
    w, xs, v = rng.normal(size=3), rng.normal(size=(4, 3)), rng.normal(size=3)
    inner = tracejit.jit_grad(_tanh_rnn_loss)
    hvp = lambda w, xs: (inner(w, xs) * v).sum()   # noqa: E731
    got = tracejit.jit_grad(hvp)(w, xs)            # native: the adjoint of the adjoint scan
    with helpers.use_backend("interpreter"):
        fd = helpers.numeric_grad(lambda w, xs: float(hvp(w, xs)), [w, xs], (0,))
        helpers.assert_close(tracejit.jit_grad(hvp)(w, xs), got, TOL, "interpreter")
    helpers.assert_grads_match_fd([got], fd, "f64", "second derivative")


def test_forward_mode_through_scan_matches_finite_differences():
    rng = helpers.rng_for("scan-jvp")
    w, xs = rng.normal(size=3), rng.normal(size=(4, 3))
    tw, txs = rng.normal(size=3), rng.normal(size=(4, 3))
    with helpers.use_backend("interpreter"):
        value, tangent = tracejit.jit_jvp(_tanh_rnn_loss)((w, xs), (tw, txs))
        fd = helpers.numeric_jvp(tracejit.jit(_tanh_rnn_loss), [w, xs], [tw, txs])
    helpers.assert_close(tangent, fd, (1e-7, 1e-7), "jvp")


def test_hessian_and_jacfwd_through_scan():
    # batched tangents: the xs' tangents are scanned over their second axis
    rng = helpers.rng_for("scan-hessian")
    w, xs = rng.normal(size=3), rng.normal(size=(4, 3))

    def seq(w, xs):
        return tracejit.scan(lambda h, x: (tracejit.tanh(h * w + x), h * x), np.zeros(3), xs)[1]
    f = lambda w, xs: (seq(w, xs) ** 2).sum()   # noqa: E731
    with helpers.use_backend("interpreter"):
        hess = tracejit.hessian(f)(w, xs)
        g = tracejit.jit_grad(f)
        fd = np.stack([(g(w + 1e-5 * e, xs) - g(w - 1e-5 * e, xs)) / 2e-5 for e in np.eye(3)], 1)
        fwd = tracejit.jacfwd(seq, argnums=1)(w, xs)
        rev = tracejit.jacrev(seq, argnums=1)(w, xs)
    helpers.assert_close(hess, fd, (1e-7, 1e-7), "hessian")
    helpers.assert_close(fwd, rev, TOL, "jacfwd vs jacrev")
    helpers.assert_close(tracejit.hessian(f)(w, xs), hess, TOL, "native hessian")


# ------------------------------------------------------------------------------------------------
# the IR: one instruction, its body printed once, verified, optimized inside
# ------------------------------------------------------------------------------------------------
def test_dump_prints_the_body_once_with_its_provenance():
    rng = helpers.rng_for("scan-dump")
    p, xs, r = model_params("elman", rng), rng.normal(size=(T, B, D)), rng.normal(size=(T, B, H))
    g = tracejit.jit_grad(scan_loss("elman"))
    text = g.ir(p, xs, r, stage="forward")
    assert text.count("func @body(") == 1
    assert re.search(r"func @body\(.*# scan body from test_scan\.py:\d+", text)
    assert len(re.findall(r"= scan ", text)) == 1 and "tanh" in text
    grad = g.ir(p, xs, r, stage="grad")   # forward scan saving residuals, and its reverse scan
    assert len(re.findall(r"= scan ", grad)) == 2 and "reverse" in grad
    assert "adjoint of the scan body from test_scan.py:" in grad
    optimized = g.ir(p, xs, r, stage="optimized")
    assert re.search(r"// saved for the backward pass: \d+ bytes", optimized)
    assert re.search(r"bytes per step of the scan at test_scan\.py:\d+", optimized)


def test_verifier_checks_bodies():
    b = Builder("body")
    c = b.add_param(TensorType("f64", (2,)), "c")
    outer = Builder("outer")
    stray = outer.add_param(TensorType("f64", (2,)), "stray")
    with building(b):
        out = lax.add(c, stray)   # a value of another function: not an explicit operand
    body = b.finish([out])
    with building(outer):
        init = lax.zeros((2,), "f64")
        res = control.scan([init], [], [], body, 3)
    fn = outer.finish(res)
    with pytest.raises(VerifyError, match="in the body of"):
        verify(fn)


def test_passes_hoist_invariants_and_drop_unread_results():
    def f(w, xs):
        def body(h, x):
            m = w.T @ w                      # depends only on w: computed once, before the loop
            h = tracejit.tanh(h @ m + x)
            return h, (h, h * 2.0)
        h, (ys, unread) = tracejit.scan(body, np.zeros((1, 3)), xs)
        return h.sum() + ys.sum()
    w, xs = np.eye(3) * 0.5, np.ones((4, 1, 3))
    text = tracejit.jit(f).ir(w, xs, stage="optimized")
    body = text[text.index("func @body"):text.index("return", text.index("func @body"))]
    assert body.count("= matmul") == 1, body       # w.T @ w left the loop
    scan_line = next(line for line in text.splitlines() if "= scan " in line)
    assert scan_line.count("f64[4,1,3]") == 1, scan_line   # the unread ys are gone
    with helpers.use_backend("interpreter"):
        want = tracejit.jit(f)(w, xs)
    helpers.assert_close(tracejit.jit(f)(w, xs), want, TOL)


# ------------------------------------------------------------------------------------------------
# native code: one loop whatever the trip count
# ------------------------------------------------------------------------------------------------
def test_generated_code_does_not_grow_with_the_trip_count(monkeypatch):
    # one thread: whether a kernel outside the loop is worth a thread team depends on its size
    monkeypatch.setenv("TRACEJIT_NUM_THREADS", "1")
    rng = helpers.rng_for("scan-size")
    p = model_params("elman", rng)

    def loss(p, xs):
        h, _ = tracejit.scan(lambda h, x: (elman_step(p, h, x), None), np.zeros((B, H)), xs)
        return (h ** 2).sum()
    g = tracejit.jit_grad(loss)
    texts = []
    # (kernels outside the loop over all steps at once, e.g. the bias gradient's sum over
    # [steps, B, H], choose their code by size: tiny ones stay scalar. Both trip counts here are
    # past those thresholds, so any difference would be the loop's)
    for steps in (200, 1000):
        xs = rng.normal(size=(steps, B, D))
        with helpers.use_backend("interpreter"):
            want = g(p, xs)
        got = g(p, xs)
        for k in p:
            helpers.assert_close(got[k], want[k], TOL, f"T={steps} d/d{k}")
        texts.append(g.ir(p, xs, stage="llvm"))
    # the same code up to numbers (the trip count, slice offsets): equally many instructions
    norm = [re.sub(r"\d+", "N", t) for t in texts]
    assert len(texts[0].splitlines()) == len(texts[1].splitlines())
    assert norm[0] == norm[1]


def test_input_projection_and_weight_gradients_run_once_over_all_steps():
    # x @ Wx for every step is one matmul before the loop; the accumulated weight gradients
    # h^T dz and x^T dz are one matmul each after the backward loop: per step, only h @ Wh
    # (forward) and dz @ Wh^T (backward) remain
    rng = helpers.rng_for("scan-batch")
    p, xs, r = model_params("elman", rng), rng.normal(size=(T, B, D)), rng.normal(size=(T, B, H))
    text = tracejit.jit_grad(scan_loss("elman")).ir(p, xs, r, stage="optimized")
    bodies = re.findall(r"func @body(?:\.adj)?\(.*?\n\s*return", text, re.S)
    assert len(bodies) == 2
    assert [b.count("= matmul") for b in bodies] == [1, 1], bodies
    assert text.count("= matmul") == 2 + 3   # before the loop: 1; after: 2 (d/dWx, d/dWh)


def test_lstm_saves_only_what_its_adjoint_reads():
    # per step: h and c of the step before, the four gates and tanh(c); the gates' derivatives
    # (s (1 - s), 1 - tanh^2) are recomputed from them in the backward loop, not saved
    rng = helpers.rng_for("scan-saved")
    p, xs, r = model_params("lstm", rng), rng.normal(size=(T, B, D)), rng.normal(size=(T, B, H))
    text = tracejit.jit_grad(scan_loss("lstm")).ir(p, xs, r, stage="optimized")
    per_step = [int(n) for n in re.findall(r"\((\d+) bytes per step of the scan", text)]
    assert per_step and all(n == B * H * 8 for n in per_step), text
    assert len(per_step) <= 7, text


def test_nested_scans_and_checked_indices_inside_a_body():
    rng = helpers.rng_for("scan-nested")
    w, xs = rng.normal(size=3), rng.normal(size=(4, 5, 3))

    def f(w, xs):
        def outer(c, row):
            inner, _ = tracejit.scan(lambda a, x: (tracejit.tanh(a * w + x), None), c, row)
            return inner, inner.sum()
        c, ys = tracejit.scan(outer, np.zeros(3), xs)
        return (c ** 2).sum() + ys.sum()
    g = tracejit.jit_grad(f, argnums=(0, 1))
    with helpers.use_backend("interpreter"):
        want = g(w, xs)
    for got, ref in zip(g(w, xs), want):
        helpers.assert_close(got, ref, TOL, "nested scans")
    # an index read per step is checked in the native loop as everywhere else
    table = rng.normal(size=(5, 2))
    gather = tracejit.jit(lambda t, idx: tracejit.scan(lambda c, i: (c + t[i], c), np.zeros(2),
                                                       idx)[0])
    helpers.assert_close(gather(table, np.array([0, 1, 4])), table[[0, 1, 4]].sum(0), TOL)
    with pytest.raises(IndexError, match="index 7 is out of bounds"):
        gather(table, np.array([0, 7, 4]))


def test_compile_cache_key_covers_the_body():
    from tracejit.codegen.cache import ir_key_text
    xs = np.ones((3, 2))

    def traced(op):
        f = tracejit.jit(lambda xs: tracejit.scan(lambda c, x: (op(c + x), c), np.zeros(2), xs))
        return ir_key_text(f._lookup(tracejit.api.Signature(f.name, f.arg_names, (xs,),
                                                            {})).optimized)
    with helpers.use_backend("interpreter"):
        tanh, sin = traced(tracejit.tanh), traced(tracejit.sin)
    assert tanh != sin and "tanh" in tanh and "sin" in sin


def _llvm_functions(text):
    """{name: body} of the functions defined in an LLVM IR dump."""
    return dict(re.findall(r'define [^\n]*?@"?([\w.]+)"?\((.*?)\n}\n', text, re.S))


def _segment_loops(body):
    return re.findall(r"\n([\w.]+\.s\d+)\.cond:", body)


def test_gate_cotangents_run_one_loop_per_gate():
    # the adjoint of the four gate slices adds four pads: the backward body's fused loop over
    # the gates runs one loop segment per gate, each computing only its gate (no selects
    # between the pads, no gathers), so tanh(c) is evaluated once per gate, not 4 x 4 times
    rng = helpers.rng_for("scan-saved")
    p, xs, r = model_params("lstm", rng), rng.normal(size=(T, B, D)), rng.normal(size=(T, B, H))
    fns = _llvm_functions(tracejit.jit_grad(scan_loss("lstm")).ir(p, xs, r, stage="llvm"))
    gates = [body for body in fns.values() if _segment_loops(body)]
    assert len(gates) == 1, list(fns)
    assert len(_segment_loops(gates[0])) == 4
    assert " select " not in gates[0]
    assert gates[0].count("call double @\"tracejit.tanh.f64\"") == 4


def test_pads_and_concatenates_in_one_fused_loop_match_the_interpreter():
    # segments cut where any pad or concatenate of the loop changes operand, partly overlapping
    # one another (a pad of a slice shifts its index), each resolved at compile time
    rng = helpers.rng_for("scan-segments")
    a, b, c = rng.normal(size=(3, 5)), rng.normal(size=(3, 4)), rng.normal(size=(3, 7))

    def f(a, b, c):
        y = tracejit.pad(tracejit.tanh(a), ((0, 0), (2, 4))) \
            + tracejit.concatenate([tracejit.sin(b), tracejit.exp(c)], axis=1) \
            + tracejit.pad(c[:, 1:5] * 2, ((0, 0), (6, 1)))
        return (y * y).sum()
    g = tracejit.jit_grad(f, argnums=(0, 1, 2))
    with helpers.use_backend("interpreter"):
        want = g(a, b, c)
    for got, ref, name in zip(g(a, b, c), want, "abc"):
        helpers.assert_close(got, ref, TOL, f"d/d{name}")
    fj = tracejit.jit(lambda a, b, c: tracejit.pad(tracejit.tanh(a), ((0, 0), (2, 4)))
                      + tracejit.concatenate([tracejit.sin(b), tracejit.exp(c)], axis=1)
                      + tracejit.pad(c[:, 1:5] * 2, ((0, 0), (6, 1))))
    want = np.pad(np.tanh(a), ((0, 0), (2, 4))) + np.concatenate([np.sin(b), np.exp(c)], 1) \
        + np.pad(c[:, 1:5] * 2, ((0, 0), (6, 1)))
    helpers.assert_close(fj(a, b, c), want, TOL, "value")
    loops = [_segment_loops(body) for body in _llvm_functions(fj.ir(a, b, c, stage="llvm")).values()]
    assert [len(s) for s in loops if s] == [6], loops   # cuts at 2, 4, 6, 7, 10 of 11


def test_a_body_returning_another_carry_structure_is_named():
    x = np.ones(3)
    with pytest.raises(TypeError, match=re.escape(
            "scan: lambda returns a carry of structure (*, *), but init is *")):
        tracejit.jit(lambda x: tracejit.scan(lambda c, x: ((c, c), x), x, x)[0])(x)
    with pytest.raises(TypeError, match=re.escape(
            "while_loop: body_fun returns (*, *), but init_val is *")):
        tracejit.jit(lambda x: tracejit.while_loop(lambda v: v.sum() < 5, lambda v: (v, v), x))(x)

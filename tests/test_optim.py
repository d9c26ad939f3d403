"""tracejit.optim: trajectories of every optimizer and option against an independent numpy
implementation of torch.optim's documented algorithms and against trajectories recorded with torch
itself (tests/golden/optim_torch.*, written by tests/golden/make_optim_golden.py; torch is not
needed here), run eagerly, compiled natively, and in a jit_grad training loop."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

import tracejit
from helpers import use_backend
from tracejit import optim

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
with open(os.path.join(GOLDEN, "optim_torch.json")) as _f:
    META = json.load(_f)
with np.load(os.path.join(GOLDEN, "optim_torch.npz"), allow_pickle=False) as _z:
    DATA = {k: _z[k] for k in _z.files}
CASES = {c["id"]: c for c in META["cases"]}
STEPS = META["steps"]
TOL = {"float64": 1e-10, "float32": 1e-5}


# ------------------------------------------------------------------------------------------------
# the independent reference: torch.optim's documented algorithms in plain numpy, one parameter at
# a time, arrays in the parameter's dtype and scalars as Python floats (torch's single-tensor path)
# ------------------------------------------------------------------------------------------------
def reference_trajectory(kind, kwargs, init, grad_at, lr_at=None, steps=STEPS):
    """The parameters after each of `steps` updates; `grad_at(t, params)` gives step t's gradients
    and `lr_at(t)` the learning rate of update t (0-based; default: kwargs' lr)."""
    defaults = {"SGD": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
                "Adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                             amsgrad=False),
                "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                              amsgrad=False),
                "RMSprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                                centered=False)}
    h = {"maximize": False, **defaults[kind], **kwargs}
    params = {k: v.copy() for k, v in init.items()}
    state = {k: {} for k in params}
    out = []
    for t in range(steps):
        lr = h["lr"] if lr_at is None else lr_at(t)
        grads = grad_at(t, params)
        for k in params:
            p, g, s = params[k], grads[k], state[k]
            if h["maximize"]:
                g = -g
            if kind == "SGD":
                if h["weight_decay"]:
                    g = g + h["weight_decay"] * p
                if h["momentum"]:
                    if "buf" not in s:
                        s["buf"] = g.copy()
                    else:
                        s["buf"] = s["buf"] * h["momentum"] + (1 - h["dampening"]) * g
                    g = g + h["momentum"] * s["buf"] if h["nesterov"] else s["buf"]
                p = p - lr * g
            elif kind in ("Adam", "AdamW"):
                b1, b2 = h["betas"]
                if kind == "AdamW":
                    p = p * (1 - lr * h["weight_decay"])
                elif h["weight_decay"]:
                    g = g + h["weight_decay"] * p
                m = s.get("m", np.zeros_like(p))
                v = s.get("v", np.zeros_like(p))
                s["m"] = m = lerp(m, g, 1 - b1)
                s["v"] = v = v * b2 + (1 - b2) * g * g
                if h["amsgrad"]:
                    s["vmax"] = v = np.maximum(s.get("vmax", np.zeros_like(p)), v)
                n = t + 1
                denom = np.sqrt(v) / math.sqrt(1 - b2 ** n) + h["eps"]
                p = p - (lr / (1 - b1 ** n)) * (m / denom)
            else:  # RMSprop
                if h["weight_decay"]:
                    g = g + h["weight_decay"] * p
                s["sq"] = sq = s.get("sq", np.zeros_like(p)) * h["alpha"] + (1 - h["alpha"]) * g * g
                if h["centered"]:
                    s["ga"] = ga = lerp(s.get("ga", np.zeros_like(p)), g, 1 - h["alpha"])
                    sq = sq - ga * ga
                avg = np.sqrt(sq) + h["eps"]
                if h["momentum"]:
                    s["buf"] = s.get("buf", np.zeros_like(p)) * h["momentum"] + g / avg
                    p = p - lr * s["buf"]
                else:
                    p = p - lr * (g / avg)
            assert p.dtype == init[k].dtype
            params[k] = p
        out.append({k: v.copy() for k, v in params.items()})
    return out


def lerp(start, end, weight):
    """torch's lerp: the formula switches at weight 0.5 (each is exact at its end of [0, 1])."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def torch_lr_at(case):
    """The learning rate torch's scheduler of `case` gives update t (closed forms)."""
    lr = case["kwargs"].get("lr", 1e-3)
    sched = case["scheduler"]
    if sched is None:
        return None
    kw = sched["kwargs"]
    if sched["name"] == "MultiStepLR":
        return lambda t: lr * kw["gamma"] ** sum(t >= m for m in kw["milestones"])
    lo, period = kw["eta_min"], kw["T_max"]
    return lambda t: lo + (lr - lo) * (1 + math.cos(math.pi * t / period)) / 2


def make_optimizer(case):
    """The tracejit optimizer of a golden case (torch class name and kwargs)."""
    kw = dict(case["kwargs"])
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    sched = case["scheduler"]
    if sched is not None:
        lr = kw.get("lr", 1e-3)
        skw = sched["kwargs"]
        kw["lr"] = optim.multistep_lr(lr, skw["milestones"], skw["gamma"]) \
            if sched["name"] == "MultiStepLR" else optim.cosine_lr(lr, skw["T_max"], skw["eta_min"])
    return {"SGD": optim.sgd, "Adam": optim.adam, "AdamW": optim.adamw,
            "RMSprop": optim.rmsprop}[case["torch"]](**kw)


def golden_inputs(dtype):
    init = {k: DATA[f"init/{k}"].astype(dtype) for k in ("w", "b")}
    grads = [{k: DATA[f"grads/{k}"][t].astype(dtype) for k in init} for t in range(STEPS)]
    return init, grads


def run(opt, init, grads, mode, steps=STEPS):
    """The parameters after each update, with `opt.update` eager or compiled."""
    update = opt.update if mode == "eager" else tracejit.jit(opt.update)
    params, state = init, opt.init(init)
    out = []
    for t in range(steps):
        params, state = update(grads[t], state, params)
        out.append(params)
    if mode != "eager":
        assert update.compile_stats()["signatures"] == 1  # the traced step count never retraces
    assert float(state["step"]) == steps
    return out


def assert_trajectory(actual, expected, dtype, what):
    for t, (a, e) in enumerate(zip(actual, expected)):
        for k in e:
            assert a[k].dtype == np.dtype(dtype), f"{what}: step {t} {k} is {a[k].dtype}"
            np.testing.assert_allclose(a[k], e[k], rtol=TOL[dtype], atol=TOL[dtype],
                                       err_msg=f"{what}: step {t + 1}, params[{k!r}]")


# ------------------------------------------------------------------------------------------------
# trajectories
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eager", "native"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case_id", list(CASES))
def test_trajectory_matches_torch_and_reference(case_id, dtype, mode):
    case = CASES[case_id]
    init, grads = golden_inputs(dtype)
    got = run(make_optimizer(case), init, grads, mode)
    torch_traj = [{k: DATA[f"{case_id}/{dtype}/{k}"][t] for k in init} for t in range(STEPS)]
    ref = reference_trajectory(case["torch"], case["kwargs"], init, lambda t, p: grads[t],
                               torch_lr_at(case))
    assert_trajectory(ref, torch_traj, dtype, f"numpy reference vs torch, {case_id}")
    assert_trajectory(got, torch_traj, dtype, f"{mode} {case_id} vs torch")
    assert_trajectory(got, ref, dtype, f"{mode} {case_id} vs numpy reference")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case_id", ["sgd_nesterov_wd", "adam_cosine", "adamw",
                                     "rmsprop_momentum_wd", "sgd_multistep"])
def test_eager_equals_traced(case_id, dtype):
    """Eager updates and the traced update run by the reference interpreter agree bit for bit;
    native code agrees to a few roundings (it may contract a*b+c into one FMA)."""
    init, grads = golden_inputs(dtype)
    opt = make_optimizer(CASES[case_id])
    eager = run(opt, init, grads, "eager", steps=6)
    with use_backend("interpreter"):
        traced = run(opt, init, grads, "interpreter", steps=6)
    native = run(opt, init, grads, "native", steps=6)
    for e, t, n in zip(eager, traced, native):
        for k in e:
            np.testing.assert_array_equal(t[k], e[k])
            scale = max(1.0, float(np.abs(e[k]).max()))
            np.testing.assert_allclose(n[k], e[k], rtol=0, atol=32 * np.finfo(dtype).eps * scale)


def mse_loss(params, x, y):
    r = x @ params["w"] + params["b"] - y
    return tracejit.mean(r * r)


def mse_grad(params, x, y):
    r = x @ params["w"] + params["b"] - y
    gr = 2 * r / r.size
    return {"w": x.T @ gr, "b": gr.sum(0)}


@pytest.mark.parametrize("opt_name,kind,kwargs", [
    ("sgd", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("adam", "Adam", dict(lr=0.05, weight_decay=1e-3)),
    ("adamw", "AdamW", dict(lr=0.05)),
    ("rmsprop", "RMSprop", dict(lr=0.01, momentum=0.5)),
])
def test_jit_grad_training_loop(opt_name, kind, kwargs):
    """Gradients from jit_grad, updates compiled: the loss falls and the parameters follow the
    reference fed with exact gradients of the same loss."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 5))
    y = x @ rng.standard_normal((5, 2)) + 0.5
    init = {"w": 0.1 * rng.standard_normal((5, 2)), "b": np.zeros(2)}
    opt = getattr(optim, opt_name)(**kwargs)
    grad = tracejit.jit_grad(mse_loss)
    update = tracejit.jit(opt.update)
    params, state = init, opt.init(init)
    traj = []
    for _ in range(25):
        params, state = update(grad(params, x, y), state, params)
        traj.append(params)
    ref = reference_trajectory(kind, kwargs, init, lambda t, p: mse_grad(p, x, y), steps=25)
    assert_trajectory(traj, ref, "float64", f"jit_grad loop with {opt_name}")
    assert float(mse_loss(params, x, y)) < 0.5 * float(mse_loss(init, x, y))


def test_update_inside_a_larger_trace():
    """The update composes with other traced work (here the gradient is computed in the same
    compiled function from a traced loss) and fuses into one function."""
    opt = optim.adam(lr=0.1)
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal(4)}
    target = rng.standard_normal(4)

    @tracejit.jit
    def step(params, state, target):
        grads = {"w": 2 * (params["w"] - target)}
        return opt.update(grads, state, params)

    state = opt.init(params)
    ref = reference_trajectory("Adam", dict(lr=0.1), params,
                               lambda t, p: {"w": 2 * (p["w"] - target)}, steps=20)
    for t in range(20):
        params, state = step(params, state, target)
        np.testing.assert_allclose(params["w"], ref[t]["w"], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,expected", [
    (optim.multistep_lr(0.1, [3, 7], gamma=0.5), lambda t: 0.1 * 0.5 ** ((t >= 3) + (t >= 7))),
    (optim.cosine_lr(0.1, 10, eta_min=0.01),
     lambda t: 0.01 + 0.09 * (1 + math.cos(math.pi * t / 10)) / 2),
])
def test_schedules_eager_and_traced(schedule, expected):
    traced = tracejit.jit(schedule)
    for t in range(12):
        step = np.array(float(t))
        for got in (schedule(step), traced(step)):
            assert got.dtype == np.float64 and got.shape == ()
            assert abs(float(got) - expected(t)) <= 1e-15
    assert traced.compile_stats()["signatures"] == 1


def test_schedule_must_return_a_scalar():
    opt = optim.sgd(lr=lambda step: "fast")
    p = {"w": np.ones(2)}
    with pytest.raises(TypeError, match="lr\\(step\\) must return a number"):
        opt.update(p, opt.init(p), p)


@pytest.mark.parametrize("make", [
    lambda: optim.adam(1e-3, weight_decay=1e-2),
    lambda: optim.adamw(optim.cosine_lr(1e-3, 50), amsgrad=True),
    lambda: optim.rmsprop(1e-2, momentum=0.9, centered=True),
    lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
])
def test_update_divides_and_takes_a_square_root_at_most_once_per_element(make):
    """Whatever derives from the step count (bias corrections, step sizes, the learning rate) is
    a scalar computed once per step: per element an update does at most one division and one
    square root, the slowest arithmetic of a loop (it runs as a matmul's epilogue in a training
    step)."""
    opt = make()
    params = {"w": np.ones((3, 4), np.float32)}
    text = tracejit.jit(opt.update).ir(params, opt.init(params), params, stage="optimized")
    per_element = re.findall(r": f32\[3,4\] = (div|sqrt) ", text)
    assert per_element.count("div") <= 1 and per_element.count("sqrt") <= 1, text


# ------------------------------------------------------------------------------------------------
# state, inputs and argument checks
# ------------------------------------------------------------------------------------------------
def test_init_state_layout_and_update_leaves_inputs_alone():
    params = {"w": np.asfortranarray(np.ones((3, 2), np.float32)), "b": [np.ones(2, np.float32)]}
    opt = optim.rmsprop(momentum=0.9)
    state = opt.init(params)
    assert list(state) == ["step", "square_avg", "momentum_buffer"]
    assert state["step"].dtype == np.float64 and state["step"].shape == () and state["step"] == 0
    for name in ("square_avg", "momentum_buffer"):
        for leaf, p in zip(tracejit.tree.leaves(state[name]), tracejit.tree.leaves(params)):
            assert leaf.dtype == p.dtype and leaf.shape == p.shape and not leaf.any()
            assert leaf.flags.c_contiguous and leaf.flags.writeable
    before = [x.copy() for x in tracejit.tree.leaves((params, state))]
    new_params, new_state = opt.update(params, state, params)
    for x, y in zip(tracejit.tree.leaves((params, state)), before):
        np.testing.assert_array_equal(x, y)
    assert tracejit.tree.structure(new_params) == tracejit.tree.structure(params)
    assert float(new_state["step"]) == 1.0
    assert list(optim.sgd(0.1).init(params)) == ["step"]
    assert list(optim.adam().init(params)) == ["step", "exp_avg", "exp_avg_sq"]
    assert list(optim.adamw(amsgrad=True).init(params)) == ["step", "exp_avg", "exp_avg_sq",
                                                            "max_exp_avg_sq"]
    assert list(optim.rmsprop(momentum=0.9, centered=True).init(params)) == \
        ["step", "square_avg", "momentum_buffer", "grad_avg"]


@pytest.mark.parametrize("make,match", [
    (lambda: optim.sgd(-0.1), "sgd: invalid lr: -0.1"),
    (lambda: optim.sgd(0.1, momentum=-1), "invalid momentum"),
    (lambda: optim.sgd(0.1, weight_decay=-1), "invalid weight_decay"),
    (lambda: optim.sgd(0.1, nesterov=True), "nesterov=True requires momentum > 0"),
    (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening = 0"),
    (lambda: optim.adam(lr=-1e-3), "adam: invalid lr"),
    (lambda: optim.adam(betas=(1.0, 0.999)), "betas\\[0\\] = 1.0"),
    (lambda: optim.adam(betas=(0.9, -0.1)), "betas\\[1\\] = -0.1"),
    (lambda: optim.adam(eps=-1e-8), "invalid eps"),
    (lambda: optim.adamw(weight_decay=-0.01), "adamw: invalid weight_decay"),
    (lambda: optim.rmsprop(alpha=-0.5), "rmsprop: invalid alpha"),
    (lambda: optim.rmsprop(momentum=-0.5), "rmsprop: invalid momentum"),
])
def test_bad_arguments_raise_value_error_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_update_inputs_name_the_leaf():
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    opt = optim.adam()
    state = opt.init(params)
    with pytest.raises(ValueError, match="grads does not have the structure of params: params "
                                         "has keys \\['w', 'b'\\] but grads has keys \\['w'\\]"):
        opt.update({"w": np.ones((2, 2))}, state, params)
    with pytest.raises(TypeError, match="grads\\['b'\\] must be an array of the shape \\[2\\] and "
                                        "dtype float64 of params\\['b'\\], got an array of dtype "
                                        "float32"):
        opt.update({"w": np.ones((2, 2)), "b": np.ones(2, np.float32)}, state, params)
    with pytest.raises(ValueError, match="state must be the dict adam.init returns"):
        opt.update(params, optim.sgd(0.1, momentum=0.9).init(params), params)
    with pytest.raises(TypeError, match="params\\['w'\\] is int64"):
        opt.init({"w": np.ones(2, np.int64)})

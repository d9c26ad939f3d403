"""Optimizers with torch.optim's update equations, defaults and argument names.

    opt = tracejit.optim.adam(lr=1e-3)
    state = opt.init(params)
    for x, t in batches:
        grads = loss_grad(params, x, t)
        params, state = opt.update(grads, state, params)

`params` and `grads` are pytrees of float arrays of the same structure (see tracejit.tree). `init`
returns the state as a dict of numpy arrays: the step count `"step"` (a float64 0-d array counting
the updates done, exact up to 2**53) and one buffer tree per torch state entry (`"momentum_buffer"`,
`"exp_avg"`, `"exp_avg_sq"`, `"max_exp_avg_sq"`, `"square_avg"`, `"grad_avg"`), zeros of the parameters' shapes and dtypes.
`update` is written in tracejit ops, so it runs eagerly on numpy arrays and also traces into a
compiled function (`tracejit.jit(opt.update)`, or inside a compiled training step) where it fuses
with the rest. Eager updates and traced ones run by the reference interpreter give identical bits;
native code may contract `a * b + c` into one FMA and so differ in the last bits. `update` returns
new trees and leaves its arguments unchanged.

Arithmetic follows torch's single-tensor CPU implementation: elementwise work in the parameters'
dtype, scalars derived from the step count (bias corrections, step sizes, the learning rate) in
float64 and then rounded to the parameters' dtype, as torch rounds its Python-float scalars.

Learning-rate schedules: `lr` is a number or a function `lr(step)` of the traced step count, the
number of updates done before this one (0 for the first update, as a torch LR scheduler's
`last_epoch` when `scheduler.step()` follows every `optimizer.step()`). `step` is a float64 0-d
array or tracer, so the schedule must be written in tracejit ops, not Python control flow or
`math` functions: see `multistep_lr` and `cosine_lr`.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import ops, tree
from .tracer import Tracer

__all__ = ["Optimizer", "sgd", "adam", "adamw", "rmsprop", "multistep_lr", "cosine_lr"]


class Optimizer:
    """A gradient-based update rule: `init(params) -> state`, `update(grads, state, params) ->
    (new_params, new_state)`. Build one with `sgd`, `adam`, `adamw` or `rmsprop`; `hyperparams`
    holds the arguments it was built with."""

    def __init__(self, name: str, hyperparams: dict, buffers: tuple, leaf_update):
        self.name = name
        self.hyperparams = hyperparams
        self._buffers = buffers
        self._leaf_update = leaf_update

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"tracejit.optim.{self.name}({args})"

    def init(self, params) -> dict:
        """The state before the first update: `{"step": 0.0, <buffer name>: zeros like params}`."""
        self._check_params(params)
        state = {"step": np.zeros((), np.float64)}
        for b in self._buffers:
            state[b] = tree.zeros_like(params)
        return state

    def update(self, grads, state, params):
        """One optimizer step: `(new_params, new_state)` for gradients `grads` at `params`."""
        self._check_params(params)
        self._check_state(state)
        names = ["params", "grads"] + [f"state[{b!r}]" for b in self._buffers]
        trees = [params, grads] + [state[b] for b in self._buffers]
        step = state["step"]
        lr = self.hyperparams["lr"]
        if callable(lr):
            lr = _check_lr_value(lr(step), self.name)
        hyper = dict(self.hyperparams, lr=lr)
        first = ops.equal(step, 0.0)
        t = ops.add(step, 1.0)  # torch increments its step count before using it
        paths, (ps, gs, *buf_lists), struct = tree.flatten_same(trees, names,
                                                                 f"{self.name}.update")
        new_ps, new_bufs = [], {b: [] for b in self._buffers}
        for i, path in enumerate(paths):
            p = ps[i]
            _check_leaf(path, p, "grads", gs[i])
            for b, bl in zip(self._buffers, buf_lists):
                _check_leaf(path, p, f"state[{b!r}]", bl[i])
            bufs = {b: bl[i] for b, bl in zip(self._buffers, buf_lists)}
            # torch negates the gradient first, so weight decay still pulls towards zero
            g = ops.negative(gs[i]) if self.hyperparams.get("maximize") else gs[i]
            new_p, new_b = self._leaf_update(p, g, bufs, hyper, t, first)
            new_ps.append(new_p)
            for b in self._buffers:
                new_bufs[b].append(new_b[b])
        new_state = {"step": t}
        for b in self._buffers:
            new_state[b] = tree.unflatten(struct, new_bufs[b])
        return tree.unflatten(struct, new_ps), new_state

    # ------------------------------------------------------------------------------------------
    def _check_params(self, params):
        paths, (leaves,), _ = tree.flatten_same([params], ["params"], self.name)
        for path, p in zip(paths, leaves):
            if np.dtype(p.dtype) not in (np.float32, np.float64):
                raise TypeError(f"{self.name}: {path} is {np.dtype(p.dtype)}; parameters must be "
                                f"float32 or float64 arrays")

    def _check_state(self, state):
        want = ["step", *self._buffers]
        if not isinstance(state, dict) or list(state.keys()) != want:
            got = list(state.keys()) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{self.name}.update: state must be the dict {self.name}.init "
                             f"returns, with keys {want}; got {got}")
        s = state["step"]
        if not isinstance(s, (np.ndarray, Tracer)) or s.shape != () \
                or np.dtype(s.dtype) != np.float64:
            raise TypeError(f"{self.name}.update: state['step'] must be a float64 0-d array, got "
                            f"{_describe(s)}")


def _describe(x) -> str:
    if isinstance(x, (np.ndarray, Tracer)):
        return f"an array of dtype {np.dtype(x.dtype)} and shape {list(x.shape)}"
    return f"a {type(x).__name__}"


def _check_leaf(path, p, name, x):
    if not isinstance(x, (np.ndarray, Tracer)) or tuple(x.shape) != tuple(p.shape) \
            or np.dtype(x.dtype) != np.dtype(p.dtype):
        where = name + path[len("params"):]
        raise TypeError(f"{where} must be an array of the shape {list(p.shape)} and dtype "
                        f"{np.dtype(p.dtype)} of {path}, got {_describe(x)}")


def _check_lr_value(lr, name):
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        return float(lr)
    if isinstance(lr, (np.ndarray, Tracer)) and lr.shape == () and \
            np.dtype(lr.dtype).kind == "f":
        return lr
    raise TypeError(f"{name}: the learning-rate schedule lr(step) must return a number or a float "
                    f"0-d array or tracer, got {_describe(lr)}")


def _scalar(s, p):
    """Scalar `s` (a Python number, or a float64 0-d array or tracer) as an operand for `p`'s
    dtype: numbers stay weak; arrays are rounded to `p`'s dtype, as torch rounds its double
    scalars to the tensor's dtype."""
    if isinstance(s, numbers.Number):
        return s
    return ops.astype(s, p.dtype)


def _lerp(start, end, weight: float):
    """torch's lerp_(end, weight) with a Python-number weight: the two formulas its CPU kernel
    switches between at 0.5, so each stays exact at its end of [0, 1]."""
    if weight < 0.5:
        return ops.add(start, ops.multiply(weight, ops.subtract(end, start)))
    return ops.subtract(end, ops.multiply(ops.subtract(end, start), 1.0 - weight))


def _negative(s):
    # A Python number stays a Python number: ops.negative would make it a float32 array.
    return -s if isinstance(s, numbers.Number) else ops.negative(s)


# ------------------------------------------------------------------------------------------------
# argument checks (torch's, with the argument named)
# ------------------------------------------------------------------------------------------------
def _check_lr(name, lr):
    if callable(lr):
        return
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool):
        raise TypeError(f"{name}: lr must be a number or a schedule lr(step), got "
                        f"{type(lr).__name__}")
    if not lr >= 0.0:
        raise ValueError(f"{name}: invalid lr: {lr} (expected >= 0)")


def _check_nonneg(name, **kw):
    for k, v in kw.items():
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name}: {k} must be a number, got {type(v).__name__}")
        if not v >= 0.0:
            raise ValueError(f"{name}: invalid {k}: {v} (expected >= 0)")


def _check_betas(name, betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, numbers.Real) or isinstance(b, bool) or not 0.0 <= b < 1.0:
            raise ValueError(f"{name}: invalid beta parameter at index {i}: betas[{i}] = {b!r} "
                             f"(expected 0 <= betas[{i}] < 1)")


# ------------------------------------------------------------------------------------------------
# the optimizers
# ------------------------------------------------------------------------------------------------
def sgd(lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
        maximize=False) -> Optimizer:
    """torch.optim.SGD: with `momentum`, the buffer is the first gradient on the first step and
    `momentum * buf + (1 - dampening) * g` after; `nesterov` uses `g + momentum * buf`;
    `weight_decay` adds `weight_decay * param` to the gradient (L2); `maximize` ascends (the
    gradient is negated before anything else)."""
    _check_lr("sgd", lr)
    _check_nonneg("sgd", momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"sgd: nesterov=True requires momentum > 0 and dampening = 0, got "
                         f"momentum={momentum}, dampening={dampening}")

    def leaf(p, g, bufs, h, t, first):
        if weight_decay != 0:
            g = ops.add(g, ops.multiply(weight_decay, p))
        new = {}
        if momentum != 0:
            later = ops.add(ops.multiply(bufs["momentum_buffer"], momentum),
                            ops.multiply(1.0 - dampening, g))
            buf = ops.where(first, g, later)
            new["momentum_buffer"] = buf
            g = ops.add(g, ops.multiply(momentum, buf)) if nesterov else buf
        return ops.add(p, ops.multiply(_scalar(_negative(h["lr"]), p), g)), new

    return Optimizer("sgd", dict(lr=lr, momentum=momentum, dampening=dampening,
                                 weight_decay=weight_decay, nesterov=nesterov,
                                 maximize=bool(maximize)),
                     ("momentum_buffer",) if momentum != 0 else (), leaf)


def _adam_like(name, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled) -> Optimizer:
    _check_lr(name, lr)
    _check_nonneg(name, eps=eps, weight_decay=weight_decay)
    _check_betas(name, betas)
    beta1, beta2 = float(betas[0]), float(betas[1])

    def leaf(p, g, bufs, h, t, first):
        lr = h["lr"]
        if weight_decay != 0:
            if decoupled:
                shrink = 1.0 - lr * weight_decay if isinstance(lr, numbers.Number) else \
                    ops.subtract(1.0, ops.multiply(lr, weight_decay))
                p = ops.multiply(p, _scalar(shrink, p))
            else:
                g = ops.add(g, ops.multiply(weight_decay, p))
        m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
        m = _lerp(m, g, 1.0 - beta1)
        v = ops.add(ops.multiply(v, beta2), ops.multiply(ops.multiply(1.0 - beta2, g), g))
        new = {"exp_avg": m, "exp_avg_sq": v}
        if amsgrad:
            # the running maximum of the second moment stands in for it in the denominator
            v = new["max_exp_avg_sq"] = ops.maximum(bufs["max_exp_avg_sq"], v)
        # The scalars of the step count, once per step in float64. torch divides sqrt(v) by
        # sqrt(1 - beta2**t) element by element; multiplying by its reciprocal is the same up to
        # rounding and leaves one sqrt and one division per element (both are slow, the
        # division most: the update runs as a matmul's epilogue, see tracejit/train.py).
        bias1 = ops.subtract(1.0, ops.power(beta1, t))
        inv_bias2_sqrt = ops.divide(1.0, ops.sqrt(ops.subtract(1.0, ops.power(beta2, t))))
        step_size = ops.divide(lr, bias1)
        denom = ops.add(ops.multiply(ops.sqrt(v), _scalar(inv_bias2_sqrt, p)), eps)
        new_p = ops.add(p, ops.multiply(_scalar(_negative(step_size), p), ops.divide(m, denom)))
        return new_p, new

    buffers = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
    return Optimizer(name, dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                                amsgrad=bool(amsgrad), maximize=bool(maximize)), buffers, leaf)


def adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
         maximize=False) -> Optimizer:
    """torch.optim.Adam: `weight_decay` adds `weight_decay * param` to the gradient (L2), as torch
    does; `amsgrad` divides by the running maximum of `exp_avg_sq` (kept in the state as
    `"max_exp_avg_sq"`); `maximize` ascends (the gradient is negated before anything else)."""
    return _adam_like("adam", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=False)


def adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
          maximize=False) -> Optimizer:
    """torch.optim.AdamW: decoupled weight decay, `param *= 1 - lr * weight_decay` before the
    Adam step; `amsgrad` and `maximize` as in `adam`."""
    return _adam_like("adamw", lr, betas, eps, weight_decay, amsgrad, maximize, decoupled=True)


def rmsprop(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
            maximize=False) -> Optimizer:
    """torch.optim.RMSprop: `square_avg = alpha * square_avg + (1 - alpha) * g**2`, `avg =
    sqrt(square_avg) + eps`; without momentum `param -= lr * g / avg`, with it `buf = momentum *
    buf + g / avg` (from zeros) and `param -= lr * buf`. `centered` keeps the mean gradient
    `grad_avg` (state `"grad_avg"`, a lerp towards g by 1 - alpha) and uses `avg =
    sqrt(square_avg - grad_avg**2) + eps`. `weight_decay` adds `weight_decay * param` to the
    gradient (L2); `maximize` ascends (the gradient is negated before anything else)."""
    _check_lr("rmsprop", lr)
    _check_nonneg("rmsprop", alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)

    def leaf(p, g, bufs, h, t, first):
        if weight_decay != 0:
            g = ops.add(g, ops.multiply(weight_decay, p))
        sq = ops.add(ops.multiply(bufs["square_avg"], alpha),
                     ops.multiply(ops.multiply(1.0 - alpha, g), g))
        new = {"square_avg": sq}
        if centered:
            mean = new["grad_avg"] = _lerp(bufs["grad_avg"], g, 1.0 - alpha)
            avg = ops.add(ops.sqrt(ops.subtract(sq, ops.multiply(mean, mean))), eps)
        else:
            avg = ops.add(ops.sqrt(sq), eps)
        neg_lr = _scalar(_negative(h["lr"]), p)
        if momentum > 0:
            buf = ops.add(ops.multiply(bufs["momentum_buffer"], momentum), ops.divide(g, avg))
            new["momentum_buffer"] = buf
            return ops.add(p, ops.multiply(neg_lr, buf)), new
        return ops.add(p, ops.multiply(neg_lr, ops.divide(g, avg))), new

    buffers = ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ()) \
        + (("grad_avg",) if centered else ())   # torch's order of its state entries
    return Optimizer("rmsprop", dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                     momentum=momentum, centered=bool(centered),
                                     maximize=bool(maximize)), buffers, leaf)


# ------------------------------------------------------------------------------------------------
# schedules (functions of the traced step count, written in tracejit ops)
# ------------------------------------------------------------------------------------------------
def multistep_lr(lr, milestones, gamma=0.1):
    """torch.optim.lr_scheduler.MultiStepLR as a schedule: `lr * gamma ** (number of milestones
    <= step)`. A step decay every `k` updates is `milestones=range(k, total, k)`."""
    milestones = sorted(float(m) for m in milestones)

    def schedule(step):
        # The count is float64 like `step` (a where of two Python numbers would be float32).
        passed = ops.multiply(step, 0.0)
        for m in milestones:
            passed = ops.add(passed, ops.astype(ops.greater_equal(step, m), np.float64))
        return ops.multiply(lr, ops.power(gamma, passed))

    return schedule


def cosine_lr(lr, T_max, eta_min=0.0):
    """torch.optim.lr_scheduler.CosineAnnealingLR's closed form as a schedule: `eta_min + (lr -
    eta_min) * (1 + cos(pi * step / T_max)) / 2`."""
    def schedule(step):
        c = ops.cos(ops.multiply(math.pi / T_max, step))
        return ops.add(eta_min, ops.multiply((lr - eta_min) / 2, ops.add(1.0, c)))

    return schedule

"""The workloads written for each system: tracejit, PyTorch eager and jax.jit(jax.grad(...)).

`build(system, workload)` returns a `Bench` whose `step()` runs one gradient call to completion (all
gradients w.r.t. all parameters, synchronously) and whose `grads(result)` turns a step's result into
{parameter name: numpy array}. Inputs are converted to each system's arrays once, outside `step`.
The three definitions of each workload compute the same math (see workloads.py for the data).

A training workload (`mlp-sgd`, ...) is the same loss, and `step()` one whole training step that
updates the system's parameters and optimizer state: tracejit.jit_train_step (in place); PyTorch
`zero_grad(set_to_none=True)`, `backward()`, a torch.optim step with foreach=True; JAX one jax.jit
of value_and_grad and the optax update, with the parameters and optimizer state donated and passed
through. Its `grads(result)` gives the *updated parameters* (copies, taken before the next step),
which run.py compares after the first step from the same start. The parameters keep training on
the same batch over the timed calls.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from workloads import (ATTENTION_HEADS, OPTIMIZERS, deep_mlp_loss, make,  # noqa: E402
                       resnet8_loss, split, tracejit_attention_loss, tracejit_lenet_loss,
                       tracejit_resnet8_loss)

SYSTEMS = ("tracejit", "torch", "torch.compile", "jax")
IMPORT_NAMES = {"tracejit": "tracejit", "torch": "torch", "torch.compile": "torch", "jax": "jax"}
# systems measured on a few workloads only (run.py skips the others): torch.compile's first call
# compiles C++ with the system compiler for each graph (tens of seconds here), so it is a peer
# where the issue asks for it, not on every workload
ONLY_WORKLOADS = {"torch.compile": ("resnet8",)}


@dataclass
class Bench:
    step: Callable[[], object]
    grads: Callable[[object], dict]
    fn: object = None  # the system's compiled/jitted function, for introspection


def import_system(system: str, threads: int):
    """Import the system and configure its thread count (before any computation)."""
    if system == "tracejit":
        os.environ["TRACEJIT_NUM_THREADS"] = str(threads)
        import tracejit
        return tracejit
    if system in ("torch", "torch.compile"):
        import torch
        torch.set_num_threads(threads)
        return torch
    if system == "jax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_cpu_multi_thread_eigen=false"
                                       " intra_op_parallelism_threads=1").strip()
        import jax
        return jax
    raise ValueError(f"unknown system {system!r} (one of {', '.join(SYSTEMS)})")


def build(system: str, workload: str) -> Bench:
    params, inputs = make(workload)
    model, optimizer = split(workload)
    if workload not in ONLY_WORKLOADS.get(system, (workload,)):
        raise ValueError(f"{system} is measured on {', '.join(ONLY_WORKLOADS[system])} only")
    return build_model(system, model, params, inputs, optimizer)


def build_model(system: str, model: str, params: dict, inputs: dict, optimizer=None) -> Bench:
    """A model's gradient (training step with `optimizer`) on the given arrays (scaling.py gives
    other sizes than workloads.make)."""
    if system == "torch.compile":
        return _torch(model, optimizer, params, inputs, compiled=True)
    builder = {"tracejit": _tracejit, "torch": _torch, "jax": _jax}[system]
    return builder(model, optimizer, params, inputs)


def _copies(tree: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in tree.items()}


# --------------------------------------------------------------------------------------- tracejit
def _tracejit(model, optimizer, params, inputs):
    import tracejit
    from tracejit import nn

    if model == "mlp":
        def loss(p, x, t):
            h = tracejit.tanh(nn.linear(x, p["fc1_w"], p["fc1_b"]))
            return nn.mse_loss(nn.linear(h, p["fc2_w"], p["fc2_b"]), t)
        batch = (inputs["x"], inputs["t"])
    elif model == "lenet":
        loss = tracejit_lenet_loss
        batch = (inputs["x"], inputs["onehot"])
    elif model == "convblock":
        def loss(p, x):
            y = nn.avg_pool2d(nn.relu(nn.conv2d(x, p["conv_w"], p["conv_b"], padding=1)), 2)
            return (y * y).sum()
        batch = (inputs["x"],)
    elif model == "depthwise":
        def loss(p, x):
            h = nn.relu(nn.conv2d(x, p["dw_w"], p["dw_b"], padding=1, groups=64))
            y = nn.relu(nn.conv2d(h, p["pw_w"], p["pw_b"]))
            return (y * y).sum()
        batch = (inputs["x"],)
    elif model == "attention":
        loss = tracejit_attention_loss
        batch = (inputs["x"], inputs["mask"])
    elif model == "resnet8":
        loss = tracejit_resnet8_loss
        batch = (inputs["x"], inputs["labels"])
    elif model == "deepmlp":
        def loss(p, x, t):
            return deep_mlp_loss(nn.linear, tracejit.tanh, nn.mse_loss, p, x, t)
        batch = (inputs["x"], inputs["t"])
    elif model == "tiny":
        def loss(v):
            return tracejit.norm(v)
        g = tracejit.jit_grad(loss)
        v = params["v"]
        return Bench(lambda: g(v), lambda r: {"v": np.asarray(r)}, g)
    else:
        raise ValueError(model)
    if optimizer is not None:
        torch_name, kwargs = OPTIMIZERS[optimizer]
        opt = {"SGD": tracejit.optim.sgd, "Adam": tracejit.optim.adam}[torch_name](**kwargs)
        train = tracejit.jit_train_step(loss, opt)
        state = opt.init(params)
        # the step writes into `params` and `state` and returns those same objects
        return Bench(lambda: train(params, state, *batch), lambda r: _copies(r[1]), train)
    g = tracejit.jit_grad(loss)
    return Bench(lambda: g(params, *batch), lambda r: {k: np.asarray(a) for k, a in r.items()}, g)


# ------------------------------------------------------------------------------------------ torch
def _torch(model, optimizer, params, inputs, compiled=False):
    """PyTorch eager; with `compiled`, the loss under torch.compile (default inductor backend, its
    backward compiled too by AOTAutograd)."""
    import torch
    import torch.nn.functional as F

    P = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in params.items()}
    names = list(P)
    plist = [P[k] for k in names]
    X = {k: torch.from_numpy(v.copy()) for k, v in inputs.items()}

    if model == "mlp":
        def loss():
            h = torch.tanh(F.linear(X["x"], P["fc1_w"], P["fc1_b"]))
            return F.mse_loss(F.linear(h, P["fc2_w"], P["fc2_b"]), X["t"])
    elif model == "lenet":
        def loss():
            h = F.max_pool2d(F.relu(F.conv2d(X["x"], P["conv1_w"], P["conv1_b"])), 2)
            h = F.max_pool2d(F.relu(F.conv2d(h, P["conv2_w"], P["conv2_b"])), 2)
            h = h.flatten(1)
            h = F.relu(F.linear(h, P["fc1_w"], P["fc1_b"]))
            h = F.relu(F.linear(h, P["fc2_w"], P["fc2_b"]))
            return F.cross_entropy(F.linear(h, P["fc3_w"], P["fc3_b"]), X["labels"])
    elif model == "convblock":
        def loss():
            y = F.avg_pool2d(F.relu(F.conv2d(X["x"], P["conv_w"], P["conv_b"], padding=1)), 2)
            return (y * y).sum()
    elif model == "depthwise":
        def loss():
            h = F.relu(F.conv2d(X["x"], P["dw_w"], P["dw_b"], padding=1, groups=64))
            y = F.relu(F.conv2d(h, P["pw_w"], P["pw_b"]))
            return (y * y).sum()
    elif model == "attention":
        def loss():
            x = X["x"]
            n, t, d = x.shape
            dh = d // ATTENTION_HEADS

            def heads(z):
                return z.reshape(n, t, ATTENTION_HEADS, dh).transpose(1, 2)

            y = F.layer_norm(x, (d,))
            q, k, v = (heads(F.linear(y, P[f"{w}_w"])) for w in "qkv")
            att = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / dh ** 0.5) + X["mask"], -1) @ v
            z = x + F.linear(att.transpose(1, 2).reshape(n, t, d), P["o_w"])
            return (z * z).mean()
    elif model == "tiny":
        def loss():
            return torch.linalg.vector_norm(P["v"])
    elif model == "resnet8":
        def resnet8(P, x, labels):
            return resnet8_loss(
                lambda h, w, b, stride, pad: F.conv2d(h, w, b, stride=stride, padding=pad),
                F.relu, lambda h: h.mean(dim=(2, 3)), F.linear, F.cross_entropy,
                lambda a, b: a + b, P, x, labels)
        if compiled:
            resnet8 = torch.compile(resnet8)

        def loss():
            return resnet8(P, X["x"], X["labels"])
    elif model == "deepmlp":
        def loss():
            return deep_mlp_loss(F.linear, torch.tanh, F.mse_loss, P, X["x"], X["t"])
    else:
        raise ValueError(model)
    if compiled and model != "resnet8":
        raise ValueError(f"torch.compile is not set up for {model}")

    if optimizer is not None:
        torch_name, kwargs = OPTIMIZERS[optimizer]
        opt = getattr(torch.optim, torch_name)(plist, foreach=True, **kwargs)

        def train():
            opt.zero_grad(set_to_none=True)
            out = loss()
            out.backward()
            opt.step()
            return out

        return Bench(train, lambda r: {k: p.detach().numpy().copy() for k, p in P.items()}, opt)

    def step():
        return torch.autograd.grad(loss(), plist)

    return Bench(step, lambda r: {k: g.detach().numpy().copy() for k, g in zip(names, r)})


# -------------------------------------------------------------------------------------------- jax
def _jax(model, optimizer, params, inputs):
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv(x, w, b, pad=0, groups=1):
        y = lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     feature_group_count=groups)
        return y + b[None, :, None, None]

    def max_pool2(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def avg_pool2(x):
        return lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4.0

    def linear(x, w, b):
        return x @ w.T + b

    relu = jax.nn.relu
    if model == "mlp":
        def loss(p, x, t):
            h = jnp.tanh(linear(x, p["fc1_w"], p["fc1_b"]))
            return jnp.mean((linear(h, p["fc2_w"], p["fc2_b"]) - t) ** 2)
        keys = ("x", "t")
    elif model == "lenet":
        def loss(p, x, onehot):
            h = max_pool2(relu(conv(x, p["conv1_w"], p["conv1_b"])))
            h = max_pool2(relu(conv(h, p["conv2_w"], p["conv2_b"])))
            h = h.reshape(h.shape[0], -1)
            h = relu(linear(h, p["fc1_w"], p["fc1_b"]))
            h = relu(linear(h, p["fc2_w"], p["fc2_b"]))
            logp = jax.nn.log_softmax(linear(h, p["fc3_w"], p["fc3_b"]), axis=-1)
            return -jnp.mean(jnp.sum(onehot * logp, axis=-1))
        keys = ("x", "onehot")
    elif model == "convblock":
        def loss(p, x):
            y = avg_pool2(relu(conv(x, p["conv_w"], p["conv_b"], 1)))
            return jnp.sum(y * y)
        keys = ("x",)
    elif model == "depthwise":
        def loss(p, x):
            h = relu(conv(x, p["dw_w"], p["dw_b"], 1, groups=64))
            y = relu(conv(h, p["pw_w"], p["pw_b"]))
            return jnp.sum(y * y)
        keys = ("x",)
    elif model == "attention":
        def loss(p, x, mask):
            n, t, d = x.shape
            dh = d // ATTENTION_HEADS

            def heads(z):
                return z.reshape(n, t, ATTENTION_HEADS, dh).swapaxes(1, 2)

            mu = x.mean(-1, keepdims=True)
            y = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
            q, k, v = (heads(y @ p[f"{w}_w"].T) for w in "qkv")
            att = jax.nn.softmax(q @ k.swapaxes(-1, -2) * (1.0 / dh ** 0.5) + mask, -1) @ v
            z = x + att.swapaxes(1, 2).reshape(n, t, d) @ p["o_w"].T
            return jnp.mean(z * z)
        keys = ("x", "mask")
    elif model == "resnet8":
        def strided_conv(x, w, b, stride, pad):
            y = lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return y + b[None, :, None, None]

        def cross_entropy(logits, labels):
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

        def loss(p, x, labels):
            return resnet8_loss(strided_conv, relu, lambda h: h.mean(axis=(2, 3)), linear,
                                cross_entropy, lambda a, b: a + b, p, x, labels)
        keys = ("x", "labels")
    elif model == "deepmlp":
        def loss(p, x, t):
            return deep_mlp_loss(linear, jnp.tanh, lambda y, t: jnp.mean((y - t) ** 2), p, x, t)
        keys = ("x", "t")
    elif model == "tiny":
        g = jax.jit(jax.grad(jnp.linalg.norm))
        v = jnp.asarray(params["v"])
        return Bench(lambda: jax.block_until_ready(g(v)), lambda r: {"v": np.asarray(r)}, g)
    else:
        raise ValueError(model)
    P = {k: jnp.asarray(v) for k, v in params.items()}
    args = [jnp.asarray(inputs[k]) for k in keys]
    if optimizer is not None:
        return _jax_train(loss, optimizer, P, args)
    g = jax.jit(jax.grad(loss))
    return Bench(lambda: jax.block_until_ready(g(P, *args)),
                 lambda r: {k: np.asarray(a) for k, a in r.items()}, g)


def _jax_train(loss, optimizer, P, args):
    """One jax.jit of value_and_grad and the optax update; the parameters and the optimizer state
    are donated (their buffers reused for the new ones) and passed from one step to the next."""
    import jax
    import optax

    torch_name, kwargs = OPTIMIZERS[optimizer]
    if torch_name == "SGD":  # optax's trace starts at zeros: momentum * 0 + g = torch's first buf
        opt = optax.sgd(kwargs["lr"], momentum=kwargs["momentum"])
    else:  # optax.adam's defaults are torch's (b1 0.9, b2 0.999, eps 1e-8)
        opt = optax.adam(kwargs["lr"])

    def train_step(p, s, *batch):
        value, grads = jax.value_and_grad(loss)(p, *batch)
        updates, s = opt.update(grads, s, p)
        return value, optax.apply_updates(p, updates), s

    f = jax.jit(train_step, donate_argnums=(0, 1))
    carry = [P, opt.init(P)]

    def step():
        value, carry[0], carry[1] = jax.block_until_ready(f(carry[0], carry[1], *args))
        return value

    return Bench(step, lambda r: {k: np.array(a) for k, a in carry[0].items()}, f)

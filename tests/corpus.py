"""The corpus of whole programs, as data: each `Program` is a loss written once against a namespace
of ops, `ns`, so the same text runs traced (`TJ`: tracejit) and as its own independent reference
(`NP`: the numpy references of tests/optable.py).

`helpers.check_program_forward / check_program_grad / check_program_second_order(prog, backend...)`
run one program on one backend (tests/test_corpus.py on the interpreter; native tests with "llvm").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np

import tracejit as tj
from tracejit import nn
from optable import (ref_conv, ref_cross_entropy, ref_layer_norm, ref_linear, ref_mse, ref_norm,
                     ref_pool, ref_relu, ref_softmax)

TJ = SimpleNamespace(tanh=tj.tanh, relu=nn.relu, conv2d=nn.conv2d, max_pool2d=nn.max_pool2d,
                     linear=nn.linear, flatten=nn.flatten, cross_entropy=nn.cross_entropy,
                     mse_loss=nn.mse_loss, norm=tj.norm)
NP = SimpleNamespace(tanh=np.tanh, relu=ref_relu, conv2d=ref_conv,
                     max_pool2d=lambda x, k: ref_pool(x, k, nsp=2, mode="max"),
                     linear=ref_linear, flatten=lambda x: x.reshape(x.shape[0], -1),
                     cross_entropy=ref_cross_entropy, mse_loss=ref_mse, norm=ref_norm)


@dataclass(frozen=True, eq=False)
class Program:
    name: str
    loss: Callable            # loss(ns, *args) -> scalar
    make_args: Callable       # make_args(rng) -> tuple of float64 pytrees (and static values)
    argnums: tuple            # the differentiated arguments
    second_order: bool = True
    fd_coords: int | None = None  # finite differences at this many elements per leaf (None: all)


def traceable(prog: Program):
    """The loss with the tracejit namespace bound, named after the program (for IR dumps)."""
    fun = functools.partial(prog.loss, TJ)
    fun.__name__ = prog.name
    return fun


def program_id(prog: Program) -> str:
    return prog.name


def _dense(rng, n_out, n_in):
    return {"w": rng.normal(size=(n_out, n_in)) / np.sqrt(n_in), "b": rng.normal(size=n_out) * 0.1}


def _conv(rng, n_out, n_in, k):
    return {"w": rng.normal(size=(n_out, n_in, k, k)) / np.sqrt(n_in * k * k),
            "b": rng.normal(size=n_out) * 0.1}


# ------------------------------------------------------------------------------------------------
# an MLP with tanh and MSE; parameters as a dict
# ------------------------------------------------------------------------------------------------
def mlp(ns, params, x, t):
    h = ns.tanh(ns.linear(x, params["w1"], params["b1"]))
    return ns.mse_loss(ns.linear(h, params["w2"], params["b2"]), t)


def mlp_args(rng):
    l1, l2 = _dense(rng, 8, 5), _dense(rng, 3, 8)
    params = {"w1": l1["w"], "b1": l1["b"], "w2": l2["w"], "b2": l2["b"]}
    return params, rng.normal(size=(6, 5)), rng.normal(size=(6, 3))


# ------------------------------------------------------------------------------------------------
# LeNet-5: two conv + relu + max-pool stages, three dense layers, cross-entropy on class labels
# ------------------------------------------------------------------------------------------------
LENET_LABELS = np.array([3, 7])


def lenet5(ns, params, x):
    h = ns.max_pool2d(ns.relu(ns.conv2d(x, params["conv1"]["w"], params["conv1"]["b"],
                                        padding=2)), 2)                       # [N, 6, 14, 14]
    h = ns.max_pool2d(ns.relu(ns.conv2d(h, params["conv2"]["w"], params["conv2"]["b"])), 2)
    h = ns.flatten(h)                                                         # [N, 16*5*5]
    for i, layer in enumerate(params["dense"]):
        h = ns.linear(h, layer["w"], layer["b"])
        if i < len(params["dense"]) - 1:
            h = ns.relu(h)
    return ns.cross_entropy(h, LENET_LABELS)


def lenet5_args(rng):
    params = {"conv1": _conv(rng, 6, 1, 5), "conv2": _conv(rng, 16, 6, 5),
              "dense": [_dense(rng, 120, 400), _dense(rng, 84, 120), _dense(rng, 10, 84)]}
    return params, rng.uniform(0, 1, size=(len(LENET_LABELS), 1, 28, 28))


# ------------------------------------------------------------------------------------------------
# the three-node DAG with w1 used twice: x1 = w1 x0, x2 = x0 + w2 x1, x3 = w1 (x1 + x2), |x3|
# ------------------------------------------------------------------------------------------------
def dag(ns, w1, w2, x0):
    x1 = w1 @ x0
    x2 = x0 + w2 @ x1
    x3 = w1 @ (x1 + x2)
    return ns.norm(x3)


def dag_args(rng):
    return rng.normal(size=(4, 4)), rng.normal(size=(4, 4)), rng.normal(size=4)


# ------------------------------------------------------------------------------------------------
# a Python loop, unrolled by tracing: x = tanh(w[i] @ x) for i < k
# ------------------------------------------------------------------------------------------------
def tanh_chain(ns, w, x, k):
    for i in range(k):
        x = ns.tanh(w[i] @ x)
    return x


def loop_dot(ns, w, x):
    u = tanh_chain(ns, w, x, 1)
    v = tanh_chain(ns, w, x, 3)
    return u.dot(v)


def loop_k(ns, w, x, k):
    """k is a static Python int: each value is its own trace."""
    return tanh_chain(ns, w, x, k).sum()


def loop_args(rng, k=None):
    args = (rng.normal(size=(3, 4, 4)), rng.normal(size=4))
    return args if k is None else args + (k,)


# ------------------------------------------------------------------------------------------------
# a siamese pair: two inputs through one conv tower (shared parameters), squared distance
# ------------------------------------------------------------------------------------------------
def tower(ns, p, x):
    h = ns.max_pool2d(ns.relu(ns.conv2d(x, p["w"], p["b"], padding=1)), 2)  # [N, 4, 3, 3]
    return ns.linear(ns.flatten(h), p["proj"])


def siamese(ns, p, a, b):
    d = tower(ns, p, a) - tower(ns, p, b)
    return (d * d).sum()


def siamese_args(rng):
    conv = _conv(rng, 4, 1, 3)
    p = {"w": conv["w"], "b": conv["b"], "proj": rng.normal(size=(5, 36)) / 6.0}
    return p, rng.normal(size=(2, 1, 6, 6)), rng.normal(size=(2, 1, 6, 6))


# ------------------------------------------------------------------------------------------------
# a depthwise-separable CNN (MobileNet's block): depthwise 3x3 convolutions (groups = channels, one
# strided) and pointwise 1x1 ones, global average pooling, cross-entropy
# ------------------------------------------------------------------------------------------------
from optable import ref_adaptive, ref_conv_options  # noqa: E402

TJ.conv2d_options, NP.conv2d_options = nn.conv2d, ref_conv_options
TJ.adaptive_avg_pool2d = nn.adaptive_avg_pool2d
NP.adaptive_avg_pool2d = lambda x, size: ref_adaptive(x, size, nsp=2, mode="avg")
DWSEP_LABELS = np.array([1, 0])


def dwsep_cnn(ns, p, x):
    h = ns.relu(ns.conv2d(x, p["stem"]["w"], p["stem"]["b"], padding=1))           # [N, 4, 6, 6]
    h = ns.relu(ns.conv2d_options(h, p["dw1"]["w"], p["dw1"]["b"], padding=1, groups=4))
    h = ns.relu(ns.conv2d(h, p["pw1"]["w"], p["pw1"]["b"]))                         # [N, 8, 6, 6]
    h = ns.relu(ns.conv2d_options(h, p["dw2"]["w"], p["dw2"]["b"], stride=2, padding=1,
                                  groups=8))                                        # [N, 8, 3, 3]
    h = ns.flatten(ns.adaptive_avg_pool2d(h, 1))                                    # [N, 8]
    return ns.cross_entropy(ns.linear(h, p["fc"]["w"], p["fc"]["b"]), DWSEP_LABELS)


def dwsep_args(rng):
    dw = lambda c: {"w": rng.normal(size=(c, 1, 3, 3)) / 3.0, "b": rng.normal(size=c) * 0.1}
    p = {"stem": _conv(rng, 4, 3, 3), "dw1": dw(4), "pw1": _conv(rng, 8, 4, 1), "dw2": dw(8),
         "fc": _dense(rng, 3, 8)}
    return p, rng.normal(size=(len(DWSEP_LABELS), 3, 6, 6))


PROGRAMS = [
    Program("mlp_tanh_mse", mlp, mlp_args, argnums=(0,)),
    Program("lenet5", lenet5, lenet5_args, argnums=(0, 1), fd_coords=6),
    Program("dag_shared_w1", dag, dag_args, argnums=(0, 1, 2)),
    Program("loop_k1_dot_k3", loop_dot, loop_args, argnums=(0, 1)),
    Program("loop_k1", loop_k, functools.partial(loop_args, k=1), argnums=(0, 1)),
    Program("loop_k3", loop_k, functools.partial(loop_args, k=3), argnums=(0, 1)),
    Program("siamese_conv", siamese, siamese_args, argnums=(0, 1, 2)),
    Program("depthwise_separable_cnn", dwsep_cnn, dwsep_args, argnums=(0, 1), fd_coords=6),
]


# ------------------------------------------------------------------------------------------------
# a pre-norm transformer block as a PyTorch user writes it: multi-head causal self-attention with
# batched matmuls (x.reshape / swapaxes / @ / softmax), then an MLP, both residual, layer norms
# ------------------------------------------------------------------------------------------------
TJ.softmax, NP.softmax = nn.softmax, ref_softmax
TJ.layer_norm = nn.layer_norm
NP.layer_norm = lambda x, shape, w, b: ref_layer_norm(x, len(shape), w, b)
TJ.where, NP.where = tj.where, np.where
HEADS = 2


def transformer_block(ns, p, x):
    n, t, d = x.shape
    dh = d // HEADS

    def heads(z):   # [n, t, d] -> [n, heads, t, dh]
        return z.reshape(n, t, HEADS, dh).swapaxes(1, 2)

    y = ns.layer_norm(x, (d,), p["ln1_w"], p["ln1_b"])
    q, k, v = (heads(ns.linear(y, p[w])) for w in ("wq", "wk", "wv"))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(dh)
    causal = np.tril(np.ones((t, t), dtype=bool))
    att = ns.softmax(ns.where(causal, scores, -1e9), -1) @ v          # [n, heads, t, dh]
    x = x + ns.linear(att.swapaxes(1, 2).reshape(n, t, d), p["wo"], p["bo"])
    y = ns.layer_norm(x, (d,), p["ln2_w"], p["ln2_b"])
    x = x + ns.linear(ns.tanh(ns.linear(y, p["w1"], p["b1"])), p["w2"], p["b2"])
    return (x * x).mean()


def transformer_args(rng, n=2, t=3, d=4):
    p = {w: rng.normal(size=(d, d)) / np.sqrt(d) for w in ("wq", "wk", "wv", "wo")}
    l1, l2 = _dense(rng, 2 * d, d), _dense(rng, d, 2 * d)
    p.update(bo=rng.normal(size=d) * 0.1, w1=l1["w"], b1=l1["b"], w2=l2["w"], b2=l2["b"],
             ln1_w=1 + 0.1 * rng.normal(size=d), ln1_b=0.1 * rng.normal(size=d),
             ln2_w=1 + 0.1 * rng.normal(size=d), ln2_b=0.1 * rng.normal(size=d))
    return p, rng.normal(size=(n, t, d))


PROGRAMS.append(Program("transformer_block", transformer_block, transformer_args,
                        argnums=(0, 1), fd_coords=4))


# ------------------------------------------------------------------------------------------------
# a residual block (ResNet's basic block without normalisation) between a stem and a classifier:
# 3x3 convolutions of 16 channels (two vectors of float32 lanes with AVX2, one with AVX-512), the
# skip connection, max and global average pooling
# ------------------------------------------------------------------------------------------------
RESNET_LABELS = np.array([2, 0])


def resnet_block(ns, p, x):
    h = ns.relu(ns.conv2d(x, p["stem"]["w"], p["stem"]["b"], padding=1))         # [N, 16, 8, 8]
    r = ns.relu(ns.conv2d(h, p["c1"]["w"], p["c1"]["b"], padding=1))
    h = ns.relu(h + ns.conv2d(r, p["c2"]["w"], p["c2"]["b"], padding=1))
    h = ns.flatten(ns.adaptive_avg_pool2d(ns.max_pool2d(h, 2), 1))                # [N, 16]
    return ns.cross_entropy(ns.linear(h, p["fc"]["w"], p["fc"]["b"]), RESNET_LABELS)


def resnet_args(rng):
    p = {"stem": _conv(rng, 16, 3, 3), "c1": _conv(rng, 16, 16, 3), "c2": _conv(rng, 16, 16, 3),
         "fc": _dense(rng, 4, 16)}
    return p, rng.normal(size=(len(RESNET_LABELS), 3, 8, 8))


PROGRAMS.append(Program("resnet_block", resnet_block, resnet_args, argnums=(0, 1),
                        second_order=False, fd_coords=4))

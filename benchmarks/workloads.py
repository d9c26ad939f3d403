"""The workloads: data, parameters and flop counts (numpy only, shared by all systems).

Every system gets the same float32 arrays, made here from fixed seeds, so each computes the same
math on the same numbers. Parameters are initialised like PyTorch's default `nn.Linear` /
`nn.Conv2d` initialisation: weights and biases uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)]
(fan_in = in_features, or in_channels * kh * kw). Layouts follow PyTorch: linear weights [out, in],
convolution weights [out, in, kh, kw], activations NCHW. Inputs are standard normal.

Flop counts (`flops`, forward + backward, per gradient call) count only the matmuls and
convolutions, analytically: a layer whose forward costs F (2*M*K*N for a matmul,
2*N*Cout*Hout*Wout*Cin*kh*kw for a convolution) costs F for the weight gradient and F for the input
gradient. The first layer's input is data, not a parameter, so its input gradient is not needed:
the first layer counts 2F, every later layer 3F. (The common "3x forward" rule would count 3F for
the first layer too; we count only the work the gradient requires.) Elementwise ops, pooling,
biases and losses are not counted.

Training workloads (`TRAINING`, e.g. `mlp-sgd`) are a whole training step of a gradient workload's
model, on its data: the gradient, then an optimizer update of every parameter in place (`OPTIMIZERS`
gives the hyperparameters, torch.optim's). They count the gradient's flops (the update's
elementwise work is not counted).
"""
from __future__ import annotations

import numpy as np

GRADIENTS = ("mlp", "lenet", "convblock", "tiny", "depthwise", "attention")
# optimizer name -> (torch.optim class name, keyword arguments; the same in every system)
OPTIMIZERS = {"sgd": ("SGD", {"lr": 0.01, "momentum": 0.9}),
              "adam": ("Adam", {"lr": 1e-3})}
TRAINING = tuple(f"{m}-{o}" for m in ("mlp", "lenet") for o in OPTIMIZERS)
WORKLOADS = GRADIENTS + TRAINING  # the timed ones
ALL = WORKLOADS + ("compile",)

DESCRIPTIONS = {
    "mlp": "MLP x[64,784] -> linear 256 -> tanh -> linear 10 -> mean squared error",
    "lenet": "LeNet-5 x[64,1,28,28] conv5x5(6)-relu-maxpool2-conv5x5(16)-relu-maxpool2-"
             "linear120-relu-linear84-relu-linear10, cross-entropy (mean)",
    "convblock": "x[16,64,32,32] -> conv3x3 pad1 (64) -> relu -> avgpool2 -> sum of squares",
    "tiny": "gradient of the norm of a 3-vector (call overhead)",
    "depthwise": "depthwise-separable block x[16,64,56,56] -> depthwise conv3x3 pad1 (groups 64) "
                 "-> relu -> pointwise conv1x1 (128) -> relu -> sum of squares",
    "attention": "causal self-attention block x[8,128,256]: layer_norm -> q, k, v linear -> 4 "
                 "heads of 64 (reshape, swapaxes) -> q @ k^T / 8 + causal mask -> softmax -> @ v "
                 "-> merge heads -> linear (no biases), residual, mean of squares",
    "compile": "first call of the LeNet-5 gradient in a fresh process",
}
for _w in TRAINING:
    _m, _o = _w.split("-")
    DESCRIPTIONS[_w] = (f"training step of {_m}: gradient + torch.optim.{OPTIMIZERS[_o][0]}("
                        + ", ".join(f"{k}={v}" for k, v in OPTIMIZERS[_o][1].items()) + ")")

SEED = 0


def split(name: str):
    """(model, optimizer name or None): `mlp-sgd` -> ("mlp", "sgd"), `mlp` -> ("mlp", None)."""
    model, _, opt = name.partition("-")
    return model, (opt or None)


def _uniform(rng, bound, shape):
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _linear(rng, params, name, fan_in, fan_out):
    bound = 1.0 / np.sqrt(fan_in)
    params[f"{name}_w"] = _uniform(rng, bound, (fan_out, fan_in))
    params[f"{name}_b"] = _uniform(rng, bound, (fan_out,))


def _conv(rng, params, name, cin, cout, k):
    bound = 1.0 / np.sqrt(cin * k * k)
    params[f"{name}_w"] = _uniform(rng, bound, (cout, cin, k, k))
    params[f"{name}_b"] = _uniform(rng, bound, (cout,))


def make(name: str):
    """(params, inputs): dicts of float32 arrays (inputs may hold int64 `labels` for peers that
    take class indices; `onehot` holds the same labels one-hot). A training workload gets its
    model's arrays."""
    if name in TRAINING:
        name = split(name)[0]
    if name not in GRADIENTS:
        raise ValueError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)})")
    rng = np.random.default_rng([SEED, GRADIENTS.index(name)])
    params, inputs = {}, {}
    if name == "mlp":
        _linear(rng, params, "fc1", 784, 256)
        _linear(rng, params, "fc2", 256, 10)
        inputs["x"] = rng.standard_normal((64, 784)).astype(np.float32)
        inputs["t"] = rng.standard_normal((64, 10)).astype(np.float32)
    elif name == "lenet":
        _conv(rng, params, "conv1", 1, 6, 5)
        _conv(rng, params, "conv2", 6, 16, 5)
        _linear(rng, params, "fc1", 16 * 4 * 4, 120)
        _linear(rng, params, "fc2", 120, 84)
        _linear(rng, params, "fc3", 84, 10)
        inputs["x"] = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
        labels = rng.integers(0, 10, 64)
        inputs["labels"] = labels.astype(np.int64)
        inputs["onehot"] = np.eye(10, dtype=np.float32)[labels]
    elif name == "convblock":
        _conv(rng, params, "conv", 64, 64, 3)
        inputs["x"] = rng.standard_normal((16, 64, 32, 32)).astype(np.float32)
    elif name == "depthwise":
        _conv(rng, params, "dw", 1, 64, 3)     # [64, 1, 3, 3]: fan_in = 1 * 3 * 3
        _conv(rng, params, "pw", 64, 128, 1)
        inputs["x"] = rng.standard_normal((16, 64, 56, 56)).astype(np.float32)
    elif name == "attention":
        n, t, d = ATTENTION_SHAPE
        # projections without biases (as in most current transformers): a bias of k shifts every
        # score of a row equally, so its gradient is 0 up to rounding, which no check could compare
        for layer in ("q", "k", "v", "o"):
            params[f"{layer}_w"] = _uniform(rng, 1.0 / np.sqrt(d), (d, d))
        inputs["x"] = rng.standard_normal((n, t, d)).astype(np.float32)
        # the additive causal mask (0 on and below the diagonal), an input of every system
        inputs["mask"] = np.where(np.tril(np.ones((t, t), bool)), 0.0, -1e9).astype(np.float32)
    else:  # tiny
        params["v"] = np.array([1.0, -2.0, 3.0], np.float32)
    return params, inputs


def tracejit_lenet_loss(p, x, onehot):
    """LeNet-5's loss in tracejit (module level: Ray workers import it by name)."""
    from tracejit import nn
    h = nn.max_pool2d(nn.relu(nn.conv2d(x, p["conv1_w"], p["conv1_b"])), 2)
    h = nn.max_pool2d(nn.relu(nn.conv2d(h, p["conv2_w"], p["conv2_b"])), 2)
    h = nn.flatten(h)
    h = nn.relu(nn.linear(h, p["fc1_w"], p["fc1_b"]))
    h = nn.relu(nn.linear(h, p["fc2_w"], p["fc2_b"]))
    return nn.cross_entropy(nn.linear(h, p["fc3_w"], p["fc3_b"]), onehot)


ATTENTION_SHAPE = (8, 128, 256)   # batch, tokens, model width
ATTENTION_HEADS = 4               # of 64


def tracejit_attention_loss(p, x, mask):
    """The attention block's loss in tracejit, written as a PyTorch user would."""
    import tracejit
    from tracejit import nn
    n, t, d = x.shape
    dh = d // ATTENTION_HEADS

    def heads(z):   # [n, t, d] -> [n, heads, t, dh]
        return z.reshape(n, t, ATTENTION_HEADS, dh).swapaxes(1, 2)

    y = nn.layer_norm(x, (d,))
    q, k, v = (heads(nn.linear(y, p[f"{w}_w"])) for w in "qkv")
    att = nn.softmax(q @ k.swapaxes(-1, -2) * (1.0 / np.sqrt(dh)) + mask, -1) @ v
    z = x + nn.linear(att.swapaxes(1, 2).reshape(n, t, d), p["o_w"])
    return tracejit.mean(z * z)


def _conv_flops(n, cin, cout, hout, wout, k):
    return 2 * n * cout * hout * wout * cin * k * k


def _mm_flops(m, k, n):
    return 2 * m * k * n


def layer_flops(name: str):
    """Forward flops of the matmuls/convolutions, in order (the first layer's input is data)."""
    name = split(name)[0]
    if name == "mlp":
        return [_mm_flops(64, 784, 256), _mm_flops(64, 256, 10)]
    if name == "lenet":
        return [_conv_flops(64, 1, 6, 24, 24, 5), _conv_flops(64, 6, 16, 8, 8, 5),
                _mm_flops(64, 256, 120), _mm_flops(64, 120, 84), _mm_flops(64, 84, 10)]
    if name == "convblock":
        return [_conv_flops(16, 64, 64, 32, 32, 3)]
    if name == "depthwise":   # the depthwise layer: one input channel per output channel
        return [_conv_flops(16, 1, 64, 56, 56, 3), _conv_flops(16, 64, 128, 56, 56, 1)]
    return []


def flops(name: str) -> int:
    """Forward + backward flops of one gradient call (see the module docstring); 0 if not counted."""
    if split(name)[0] == "attention":
        # q, k, v read the (parameter-free) layer norm of the data: weight gradients only (2F);
        # both attention products and the output projection: 3F
        n, t, d = ATTENTION_SHAPE
        dh = d // ATTENTION_HEADS
        proj, att = _mm_flops(n * t, d, d), n * ATTENTION_HEADS * _mm_flops(t, dh, t)
        return 3 * 2 * proj + 2 * 3 * att + 3 * proj
    fs = layer_flops(name)
    return sum((2 if i == 0 else 3) * f for i, f in enumerate(fs))

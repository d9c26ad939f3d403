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

GRADIENTS = ("mlp", "lenet", "convblock", "tiny", "depthwise", "attention", "resnet8")
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
    "resnet8": "ResNet-8 x[32,3,32,32] conv3x3(16)-relu, 3 residual blocks (16, 32, 64 channels; "
               "the last two stride 2 with a 1x1 stride-2 shortcut), global average pool, "
               "linear10, cross-entropy (integer labels); no batch norm",
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
    elif name == "resnet8":
        _conv(rng, params, "conv0", 3, 16, 3)
        for name_, cin, cout in RESNET8_BLOCKS:
            _conv(rng, params, f"{name_}a", cin, cout, 3)
            _conv(rng, params, f"{name_}b", cout, cout, 3)
            if cin != cout:
                _conv(rng, params, f"{name_}s", cin, cout, 1)
        _linear(rng, params, "fc", 64, 10)
        inputs["x"] = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
        labels = rng.integers(0, 10, 32)
        inputs["labels"] = labels.astype(np.int64)
        inputs["onehot"] = np.eye(10, dtype=np.float32)[labels]
    else:  # tiny
        params["v"] = np.array([1.0, -2.0, 3.0], np.float32)
    return params, inputs


# benchmarks/scaling.py's series: name -> (model, what grows, default points, --quick points)
SCALING = {
    "lenet-batch": ("lenet", "batch", (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), (1, 8, 64)),
    "mlp-depth": ("deepmlp", "depth", (1, 2, 4, 8, 16, 32, 64), (1, 4, 16)),
    "conv-size": ("convblock", "image size", (8, 16, 32, 64, 128), (8, 16, 32)),
}


def make_scaled(series: str, x: int):
    """(model, params, inputs) of one point of a scaling series (see SCALING): LeNet-5 at batch x;
    the MLP of `lenet`'s sizes with x hidden layers of 256 (x[64,784] -> x times (linear 256 ->
    tanh) -> linear 10 -> mean squared error; depth 1 is `mlp`); the conv block at batch 16 and
    image size x (even). Seeded by series and point, like make."""
    if series not in SCALING:
        raise ValueError(f"unknown scaling series {series!r} (one of {', '.join(SCALING)})")
    model = SCALING[series][0]
    x = int(x)
    if x < 1 or (model == "convblock" and x % 2):
        raise ValueError(f"{series}: point {x} must be a positive"
                         + (" even image size" if model == "convblock" else " integer"))
    rng = np.random.default_rng([SEED, len(GRADIENTS) + list(SCALING).index(series), x])
    params, inputs = {}, {}
    if model == "lenet":
        params = make("lenet")[0]
        inputs["x"] = rng.standard_normal((x, 1, 28, 28)).astype(np.float32)
        labels = rng.integers(0, 10, x)
        inputs["labels"] = labels.astype(np.int64)
        inputs["onehot"] = np.eye(10, dtype=np.float32)[labels]
    elif model == "deepmlp":
        for i in range(1, x + 2):
            _linear(rng, params, f"fc{i}", 784 if i == 1 else 256, 10 if i == x + 1 else 256)
        inputs["x"] = rng.standard_normal((64, 784)).astype(np.float32)
        inputs["t"] = rng.standard_normal((64, 10)).astype(np.float32)
    else:
        params = make("convblock")[0]
        inputs["x"] = rng.standard_normal((16, 64, x, x)).astype(np.float32)
    return model, params, inputs


def deep_mlp_loss(linear, tanh, mse, p, x, t):
    """The `deepmlp` model's loss over a system's ops (its depth is read from the parameters)."""
    depth = len(p) // 2 - 1
    h = x
    for i in range(1, depth + 1):
        h = tanh(linear(h, p[f"fc{i}_w"], p[f"fc{i}_b"]))
    return mse(linear(h, p[f"fc{depth + 1}_w"], p[f"fc{depth + 1}_b"]), t)


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
# ResNet-8's residual blocks: (parameter prefix, in channels, out channels). A block whose channels
# change downsamples: its first conv has stride 2 and its shortcut is a 1x1 stride-2 conv (`<b>s`);
# otherwise the shortcut is the identity. Convs `<b>a` and `<b>b` are 3x3 with padding 1.
RESNET8_BLOCKS = (("block1", 16, 16), ("block2", 16, 32), ("block3", 32, 64))


def resnet8_loss(conv2d, relu, global_avg_pool, linear, cross_entropy, add, p, x, labels):
    """ResNet-8's loss written once over a system's ops (module level: every system calls it with
    its own functions, so the three definitions cannot drift apart). conv2d(x, w, b, stride,
    padding); add(a, b) the residual sum."""
    h = relu(conv2d(x, p["conv0_w"], p["conv0_b"], 1, 1))
    for b, cin, cout in RESNET8_BLOCKS:
        stride = 1 if cin == cout else 2
        y = relu(conv2d(h, p[f"{b}a_w"], p[f"{b}a_b"], stride, 1))
        y = conv2d(y, p[f"{b}b_w"], p[f"{b}b_b"], 1, 1)
        short = h if cin == cout else conv2d(h, p[f"{b}s_w"], p[f"{b}s_b"], 2, 0)
        h = relu(add(y, short))
    return cross_entropy(linear(global_avg_pool(h), p["fc_w"], p["fc_b"]), labels)


def tracejit_resnet8_loss(p, x, labels):
    """ResNet-8's loss in tracejit (module level, like tracejit_lenet_loss; tests call it too)."""
    from tracejit import nn
    return resnet8_loss(lambda h, w, b, stride, pad: nn.conv2d(h, w, b, stride=stride, padding=pad),
                        nn.relu, lambda h: h.mean(axis=(2, 3)), nn.linear, nn.cross_entropy,
                        lambda a, b: a + b, p, x, labels)


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
    if name == "resnet8":
        n, size, out = 32, 32, [_conv_flops(32, 3, 16, 32, 32, 3)]
        for _b, cin, cout in RESNET8_BLOCKS:
            if cin != cout:
                size //= 2
                out += [_conv_flops(n, cin, cout, size, size, 3),
                        _conv_flops(n, cout, cout, size, size, 3),
                        _conv_flops(n, cin, cout, size, size, 1)]
            else:
                out += [_conv_flops(n, cin, cout, size, size, 3)] * 2
        return out + [_mm_flops(n, 64, 10)]
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

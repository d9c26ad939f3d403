"""Train a small CNN on scikit-learn's bundled 8x8 handwritten digits with tracejit and Adam.

    pip install -e '.[examples]' && python examples/train_digits.py

Model: conv 3x3 -> batch norm -> relu -> max-pool 2x2 -> conv 3x3 -> relu -> max-pool 2x2 ->
dropout -> linear, trained with softmax cross-entropy on integer class labels. The parameters are
a dict pytree of float32 arrays. Each training step is one native call (tracejit.jit_train_step):
the forward pass, its gradient and Adam's update, which writes the new parameters and optimizer
state into the arrays passed in. The labels (int64) and the dropout key (uint32, a new one every
step) are traced arguments, so neither retraces. Batch norm's running statistics come back from
the step as its aux output (tracejit returns updated statistics rather than mutating them) and
are passed in again at the next step; evaluation uses them in eval mode. The parameters, the
optimizer state and the statistics are saved to a checkpoint and loaded back at the end. The backend is tracejit's default (set
TRACEJIT_BACKEND=interpreter to force the numpy reference interpreter).
"""
import os
import tempfile
import time

import numpy as np
from sklearn.datasets import load_digits

import tracejit
from tracejit import nn

SEED = 0
C1, C2 = 16, 32  # channels of the two convolutions
BATCH = 32
EPOCHS = 12
LR = 1e-2  # Adam's learning rate at the start; it decays along a cosine to 0 at the end
DROPOUT = 0.2
HELD_OUT = 0.2  # fraction of the 1797 digits kept for measuring accuracy


def load_data(rng):
    """(x_train, y_train, x_test, y_test): images as f32[N, 1, 8, 8] in [0, 1], int labels."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # NCHW with one channel
    y = digits.target
    order = rng.permutation(len(x))
    n_test = int(len(x) * HELD_OUT)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def init_params(rng):
    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1": {"w": he((C1, 1, 3, 3), 1 * 9), "b": np.zeros(C1, np.float32)},
        "conv2": {"w": he((C2, C1, 3, 3), C1 * 9), "b": np.zeros(C2, np.float32)},
        "fc": {"w": he((10, C2 * 2 * 2), C2 * 2 * 2), "b": np.zeros(10, np.float32)},
    }


def init_stats():
    """Batch norm's running statistics of the first convolution's C1 channels."""
    return {"mean": np.zeros(C1, np.float32), "var": np.ones(C1, np.float32)}


def forward(params, stats, x, key=None):
    """(logits f32[N, 10], updated running statistics) for images x f32[N, 1, 8, 8]: training
    mode (batch statistics, dropout) with a dropout `key`, eval mode without one."""
    c1, c2, fc = params["conv1"], params["conv2"], params["fc"]
    training = key is not None
    h = nn.conv2d(x, c1["w"], c1["b"], padding=1)
    if training:
        h, mean, var = nn.batch_norm(h, stats["mean"], stats["var"], training=True)
        stats = {"mean": mean, "var": var}
    else:
        h = nn.batch_norm(h, stats["mean"], stats["var"])
    h = nn.max_pool2d(nn.relu(h), 2)                                          # [N, C1, 4, 4]
    h = nn.max_pool2d(nn.relu(nn.conv2d(h, c2["w"], c2["b"], padding=1)), 2)  # [N, C2, 2, 2]
    h = nn.dropout(h.reshape(h.shape[0], C2 * 2 * 2), DROPOUT, training=training, key=key)
    return nn.linear(h, fc["w"], fc["b"]), stats


def loss(params, stats, x, labels, key):
    logits, new_stats = forward(params, stats, x, key)
    return nn.cross_entropy(logits, labels), new_stats


predict = tracejit.jit(lambda params, stats, x: forward(params, stats, x)[0])


def accuracy(params, stats, x, y):
    return float((predict(params, stats, x).argmax(axis=1) == y).mean())


def main():
    start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    x_train, y_train, x_test, y_test = load_data(rng)
    params, stats = init_params(rng), init_stats()
    steps = len(x_train) // BATCH
    # The schedule is a function of the step count the optimizer keeps in its state, so it is
    # computed inside the compiled step too.
    opt = tracejit.optim.adam(lr=tracejit.optim.cosine_lr(LR, T_max=EPOCHS * steps))
    state = opt.init(params)
    step = tracejit.jit_train_step(loss, opt, has_aux=True)
    print(f"tracejit backend: {tracejit.config.backend}; {len(x_train)} training and "
          f"{len(x_test)} held-out digits; batch {BATCH}; Adam, lr {LR} on a cosine schedule")

    # The whole step as one IR function: the traced forward pass, the adjoint instructions ("adj
    # of %n" names the forward instruction each comes from) and Adam's update. stage="optimized"
    # adds the IR passes, the kernel plan and, at the end, which outputs are written in place into
    # the parameters and the optimizer state. One compiled signature serves the whole run: the
    # last partial batch of each epoch is dropped, so every batch has the same shape and nothing
    # is traced again.
    key = tracejit.random.key(SEED)
    print(step.ir(params, state, stats, x_train[:BATCH], y_train[:BATCH], key, stage="grad"))

    for epoch in range(1, EPOCHS + 1):
        order = rng.permutation(len(x_train))
        total = 0.0
        for i in range(steps):
            idx = order[i * BATCH:(i + 1) * BATCH]
            key = tracejit.random.key(SEED + epoch * steps + i)   # a new dropout mask
            (value, stats), params, state = step(params, state, stats, x_train[idx],
                                                 y_train[idx], key)
            total += float(value)
            if (i + 1) % (steps // 4) == 0:
                print(f"  epoch {epoch:2d}  step {i + 1:3d}/{steps}  loss {float(value):.4f}",
                      flush=True)
        acc = accuracy(params, stats, x_test, y_test)
        print(f"epoch {epoch:2d}  mean loss {total / steps:.4f}  held-out accuracy {acc:.2%}",
              flush=True)
    print(f"total time {time.perf_counter() - start:.1f} s")

    # A checkpoint: parameters and optimizer state in one file (written atomically), loaded back.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "digits.npz")
        tracejit.save(path, {"params": params, "opt_state": state, "bn_stats": stats,
                             "epoch": EPOCHS})
        ckpt = tracejit.load(path)
    restored = accuracy(ckpt["params"], ckpt["bn_stats"], x_test, y_test)
    print(f"checkpoint of epoch {ckpt['epoch']} ({int(ckpt['opt_state']['step'])} Adam steps) "
          f"loaded: held-out accuracy {restored:.2%}")
    if restored != acc:
        raise SystemExit("the parameters loaded from the checkpoint differ from the saved ones")
    if acc < 0.97:  # the example doubles as an end-to-end check of the gradients
        raise SystemExit(f"held-out accuracy {acc:.2%} is below 97%: the gradients are suspect")


if __name__ == "__main__":
    main()

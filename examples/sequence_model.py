"""A recurrent sequence model trained with tracejit.scan: a GRU reads sine waves of random
frequency and phase and learns to predict each next value.

    python examples/sequence_model.py

The recurrence is one `tracejit.scan`, so the training step compiles once into one native loop
(forward) and one reverse loop (backward) whatever the sequence length; the whole step (loss,
gradient, Adam update) is one native call made by `tracejit.jit_train_step`.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tracejit  # noqa: E402

HIDDEN, BATCH, STEPS = 32, 16, 60


def init_params(rng):
    def u(*shape, fan_in):
        k = 1 / np.sqrt(fan_in)
        return rng.uniform(-k, k, size=shape).astype(np.float32)
    return {"Wx": u(1, 3 * HIDDEN, fan_in=HIDDEN), "Wh": u(HIDDEN, 3 * HIDDEN, fan_in=HIDDEN),
            "bx": u(3 * HIDDEN, fan_in=HIDDEN), "bh": u(3 * HIDDEN, fan_in=HIDDEN),
            "Wo": u(HIDDEN, 1, fan_in=HIDDEN), "bo": np.zeros(1, np.float32)}


def gru_step(p, h, x):
    """One GRU step (gates r, z, n as torch.nn.GRU) and the prediction of the next value."""
    H = h.shape[-1]
    gi = x @ p["Wx"] + p["bx"]
    gh = h @ p["Wh"] + p["bh"]
    r = tracejit.nn.sigmoid(gi[:, :H] + gh[:, :H])
    z = tracejit.nn.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    n = tracejit.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
    h = (1 - z) * n + z * h
    return h, h @ p["Wo"] + p["bo"]


def loss(p, xs, targets):
    """Mean squared error of the next-value predictions over every step: xs, targets [T, B, 1]."""
    h0 = np.zeros((xs.shape[1], HIDDEN), np.float32)
    _, preds = tracejit.scan(lambda h, x: gru_step(p, h, x), h0, xs)
    return tracejit.mean((preds - targets) ** 2)


def batch(rng):
    """Sine waves of random frequency and phase: inputs x_0..x_{T-1}, targets x_1..x_T."""
    freq = rng.uniform(0.1, 0.3, size=(1, BATCH, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(1, BATCH, 1))
    t = np.arange(STEPS + 1).reshape(-1, 1, 1)
    wave = np.sin(freq * t + phase).astype(np.float32)
    return wave[:-1], wave[1:]


def main():
    rng = np.random.default_rng(0)
    params = init_params(rng)
    opt = tracejit.optim.adam(lr=1e-2)
    state = opt.init(params)
    step = tracejit.jit_train_step(loss, opt)
    t0 = time.perf_counter()
    for it in range(301):
        xs, targets = batch(rng)
        value, params, state = step(params, state, xs, targets)
        if it == 0:
            print(f"compiled the training step ({STEPS}-step sequences) in "
                  f"{time.perf_counter() - t0:.1f} s")
        if it % 50 == 0:
            print(f"step {it:4d}  loss {float(value):.5f}")
    xs, targets = batch(rng)
    held_out = tracejit.jit(loss)(params, xs, targets)
    print(f"held-out mean squared error of the next value: {float(held_out):.5f} "
          f"(predicting the last value instead: {float(np.mean((xs - targets) ** 2)):.5f})")


if __name__ == "__main__":
    main()

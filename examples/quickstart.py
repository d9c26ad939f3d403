"""A first look at tracejit: the gradient of a two-layer MLP's loss, and the IR that computes it.

    python examples/quickstart.py
"""
import numpy as np

import tracejit
from tracejit import nn


@tracejit.jit_grad
def loss(params, x, t):
    h = tracejit.tanh(x @ params["w1"] + params["b1"])
    return nn.mse_loss(h @ params["w2"], t)


rng = np.random.default_rng(0)
params = {"w1": rng.standard_normal((3, 4)).astype(np.float32),
          "b1": np.zeros(4, np.float32),
          "w2": rng.standard_normal((4, 1)).astype(np.float32)}
x = rng.standard_normal((2, 3)).astype(np.float32)
t = np.ones((2, 1), np.float32)

grads = loss(params, x, t)  # a dict shaped like params
for name, g in grads.items():
    print(name, g.shape, g.dtype)
print(loss.ir(params, x, t, stage="grad"))       # after the adjoint transformation
print(loss.ir(params, x, t, stage="optimized"))  # after the IR passes: what runs

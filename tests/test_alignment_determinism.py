"""The same inputs give the same bits wherever numpy put them. Kernels choose code paths from
the operands' addresses at run time (the dot form's K loop starts on a cache line of B, the outer
form packs B's panels when its rows are off cache lines): those choices may change the speed,
never the summation order. (A fresh process, whose arrays sit at other offsets, once got a
different last bit of a gradient than the process that compiled it.)"""
import numpy as np
import pytest

import tracejit
from tracejit import nn

pytestmark = pytest.mark.needs_llvm

OFFSETS = (0, 4, 8, 16, 28, 32, 48, 60)   # bytes past a 64-byte line


def at(a, offset):
    """A copy of `a` whose data starts `offset` bytes past a 64-byte boundary."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _same_bits_at_every_offset(f, arrays):
    ref = f(*[at(a, 0) for a in arrays])
    for off in OFFSETS[1:]:
        if any(off % a.itemsize for a in arrays):
            continue
        got = f(*[at(a, off) for a in arrays])
        for g, r in zip(tracejit.tree.leaves(got), tracejit.tree.leaves(ref)):
            assert np.asarray(g).tobytes() == np.asarray(r).tobytes(), off
    return ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n,k", [(64, 256, 784), (8, 30, 100), (32, 128, 576), (4, 6, 40),
                                   (24, 24, 13)])
def test_matmul_with_transposed_b(m, n, k, dtype):
    rng = np.random.default_rng(m + n + k)
    x, w = (rng.standard_normal(s).astype(dtype) for s in ((m, k), (n, k)))
    ref = _same_bits_at_every_offset(tracejit.jit(lambda a, b: a @ b.T), [x, w])
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(ref, x.astype(np.float64) @ w.T.astype(np.float64), rtol=tol,
                               atol=tol * np.sqrt(k))


@pytest.mark.parametrize("shapes,trans_a", [(((96, 200), (200, 70)), False),
                                            (((200, 96), (200, 70)), True),
                                            (((1, 300), (300, 40)), False),
                                            (((300, 40), (40, 1)), False)])
def test_other_matmul_forms(shapes, trans_a):
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    f = tracejit.jit(lambda a, b: a.T @ b) if trans_a else tracejit.jit(lambda a, b: a @ b)
    ref = _same_bits_at_every_offset(f, [a, b])
    want = (a.T if trans_a else a).astype(np.float64) @ b
    np.testing.assert_allclose(ref, want, rtol=1e-4, atol=1e-3)


def test_a_small_cnn_gradient():
    def loss(w1, w2, v, x, t):
        y = nn.max_pool2d(nn.relu(nn.conv2d(x, w1, padding=2)), 2)
        y = nn.avg_pool2d(tracejit.tanh(nn.conv2d(y, w2, padding=1)), 2)
        h = nn.linear(y.reshape(x.shape[0], -1), v)
        return ((h - t) ** 2).mean()
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(np.float32) * sc for s, sc in (
        ((8, 3, 5, 5), 0.2), ((16, 8, 3, 3), 0.2), ((10, 144), 0.05), ((16, 3, 12, 12), 1.0),
        ((16, 10), 1.0))]
    _same_bits_at_every_offset(tracejit.jit_value_and_grad(loss, argnums=(0, 1, 2)), args)

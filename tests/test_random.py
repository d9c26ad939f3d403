"""tracejit.random and nn.dropout: the Threefry-2x32 generator against its published known answers,
bit-identical values in native code (any thread count), the interpreter and eager calls, the
statistics of the draws, dropout's mask and gradient, keys as traced arguments, and bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tracejit
from tracejit.ir.prims import random as prims_random
from helpers import use_backend
from optable import ref_threefry2x32, ref_uniform_f32
from tracejit import nn
from tracejit import random as jr

M32 = 0xFFFFFFFF
# Random123's kat_vectors for threefry2x32_20 (also in JAX's random_test.py): (key, counter, out)
KAT = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
       ((M32, M32), (M32, M32), (0x1CB996FC, 0xBB002BE7)),
       ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]


# ------------------------------------------------------------------------------------------------
# the generator
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,counter,expected", KAT)
def test_threefry_known_answers(key, counter, expected):
    assert ref_threefry2x32(key, counter) == expected
    x0, x1 = prims_random.threefry2x32(np.array(key, np.uint32), [counter[0]], [counter[1]])
    assert (int(x0[0]), int(x1[0])) == expected


def test_split_of_a_key_is_the_block_of_each_counter_native():
    """Key i of split(k) is the Threefry block of counter (0, i), in native code: for key (0, 0)
    key 0 is Random123's known answer for counter (0, 0)."""
    f = tracejit.jit(lambda k: jr.split(k, 5))
    for key in [(0, 0), (M32, M32), KAT[2][0]]:
        got = f(np.array(key, np.uint32))
        assert got.dtype == np.uint32 and got.shape == (5, 2)
        assert [tuple(map(int, r)) for r in got] == [ref_threefry2x32(key, (0, i))
                                                    for i in range(5)]
    assert tuple(f(np.zeros(2, np.uint32))[0]) == KAT[0][2]


def test_bits_and_uniform_follow_the_independent_reference():
    key = (0x13198A2E, 0x03707344)
    k = np.array(key, np.uint32)
    bits = tracejit.jit(lambda k: jr.bits(k, (3, 7)))(k)
    want = [ref_threefry2x32(key, (0, i)) for i in range(21)]
    assert bits.ravel().tolist() == [a ^ b for a, b in want]
    u = tracejit.jit(lambda k: jr.uniform(k, (21,)))(k)
    assert u.dtype == np.float32
    np.testing.assert_array_equal(u, ref_uniform_f32(key, (21,)).astype(np.float32))
    u64 = tracejit.jit(lambda k: jr.uniform(k, (21,), np.float64))(k)
    want64 = [(((a << 32) | b) >> 12) * 2.0 ** -52 for a, b in want]
    np.testing.assert_array_equal(u64, want64)


def test_key_from_seed():
    assert jr.key(0).tolist() == [0, 0] and jr.key(0).dtype == np.uint32
    assert jr.key(42).tolist() == [0, 42]
    assert jr.key((5 << 32) | 7).tolist() == [5, 7]
    assert jr.key(-1).tolist() == [M32, M32]
    assert jr.key(np.int64(3)).tolist() == [0, 3]


# ------------------------------------------------------------------------------------------------
# native == interpreter == eager, any thread count
# ------------------------------------------------------------------------------------------------
def _draws(k, n):
    return (jr.bits(k, (n,)), jr.uniform(k, (n,)), jr.uniform(k, (n,), np.float64),
            jr.split(k, n), jr.bernoulli(k, 0.3, (n,)))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 13, 1003, 300_001])
def test_native_interpreter_and_eager_are_bit_identical(n):
    """300_001 elements are above the parallel threshold: the kernels run on two threads."""
    k = jr.key(n * 7919)
    eager = _draws(k, n)
    with use_backend("interpreter"):
        interp = tracejit.jit(lambda k: _draws(k, n))(k)
    native_fn = tracejit.jit(lambda k: _draws(k, n))
    try:
        tracejit.set_num_threads(1)
        one = native_fn(k)
        tracejit.set_num_threads(2)
        two = native_fn(k)
    finally:
        tracejit.set_num_threads(None)
    for name, e, i, a, b in zip(("bits", "uniform32", "uniform64", "split", "bernoulli"),
                                eager, interp, one, two):
        assert e.dtype == i.dtype == a.dtype == b.dtype, name
        for other in (i, a, b):
            np.testing.assert_array_equal(other, e, err_msg=name)


def test_parallel_threads_are_used_above_the_threshold():
    """The bit-identity test above means something for threads only if the kernel splits."""
    from tracejit.codegen import parallel
    from tracejit.codegen.runtime import plan_for
    from tracejit.ir.builder import Builder, building
    b = Builder("probe")
    with building(b):
        p = b.add_param(prims_random.KEY_TYPE, "k")
        out = prims_random.random_uniform(p, (300_001,), "f32")
    plan = plan_for(b.finish([out]), 2)
    (g,) = plan.groups
    assert g.cost_ns >= parallel.PARALLEL_MIN_NS


def test_normal_native_matches_interpreter_within_a_few_ulp():
    """Box-Muller's log, sqrt and cos are evaluated by the native vector math functions: not bit
    for bit, but within a few ulp of numpy."""
    k = jr.key(11)
    for dt in (np.float32, np.float64):
        native = tracejit.jit(lambda k: jr.normal(k, (5001,), dt))(k)
        eager = jr.normal(k, (5001,), dt)
        assert native.dtype == eager.dtype == dt
        eps = np.finfo(dt).eps
        np.testing.assert_allclose(native, eager, rtol=8 * eps, atol=8 * eps)


def test_uniform_bounds_native_close_to_eager():
    k = jr.key(5)
    f = tracejit.jit(lambda k: jr.uniform(k, (4001,), np.float32, -2.0, 3.0))
    native, eager = f(k), jr.uniform(k, (4001,), np.float32, -2.0, 3.0)
    np.testing.assert_allclose(native, eager, rtol=2 * np.finfo(np.float32).eps, atol=1e-6)
    assert native.min() >= -2.0 and native.max() <= 3.0
    assert native.min() < -1.99 and native.max() > 2.99


def test_split_keys_unpacked_inside_a_trace():
    """Unpacking split keys indexes a traced uint32 array (a fused layout loop on u32)."""
    def f(k):
        k1, k2 = jr.split(k)
        return jr.uniform(k1, (10,)), jr.uniform(k2, (10,))
    k = jr.key(3)
    native = tracejit.jit(f)(k)
    eager = f(k)
    for a, b in zip(native, eager):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(native[0], native[1])


def test_zero_size_draw():
    f = tracejit.jit(lambda k: jr.uniform(k, (0, 3)))
    assert f(jr.key(0)).shape == (0, 3)
    assert jr.bits(jr.key(0), 0).shape == (0,)


# ------------------------------------------------------------------------------------------------
# statistics (10**6 samples, 4 sigma)
# ------------------------------------------------------------------------------------------------
N = 10 ** 6


def test_uniform_statistics():
    for dt in (np.float32, np.float64):
        u = tracejit.jit(lambda k: jr.uniform(k, (N,), dt))(jr.key(2024)).astype(np.float64)
        assert u.min() >= 0.0 and u.max() < 1.0
        assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / N)
        assert abs(u.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / N)
        counts = np.bincount((u * 10).astype(int), minlength=10)
        chi2 = ((counts - N / 10) ** 2 / (N / 10)).sum()
        assert chi2 < 40, chi2   # 9 degrees of freedom: P(chi2 > 40) < 1e-5


def test_normal_statistics():
    z = tracejit.jit(lambda k: jr.normal(k, (N,)))(jr.key(7)).astype(np.float64)
    assert abs(z.mean()) < 4 / np.sqrt(N)
    assert abs(z.var() - 1) < 4 * np.sqrt(2 / N)
    assert abs(np.mean(z ** 3)) < 4 * np.sqrt(15 / N)           # symmetric
    assert abs(np.mean(z ** 4) - 3) < 4 * np.sqrt(96 / N)       # normal tails
    assert abs(np.mean(np.abs(z) < 1) - 0.6826894921) < 4 * np.sqrt(0.25 / N)


def test_bernoulli_statistics_and_array_p():
    b = tracejit.jit(lambda k: jr.bernoulli(k, 0.3, (N,)))(jr.key(1))
    assert b.dtype == np.bool_
    assert abs(b.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / N)
    p = np.array([0.0, 1.0, 0.5], np.float32)
    r = tracejit.jit(lambda k, p: jr.bernoulli(k, p))(jr.key(1), p)
    assert r.shape == (3,) and not r[0] and r[1]


def test_split_keys_are_independent():
    k1, k2 = jr.split(jr.key(0))
    f = tracejit.jit(lambda k: jr.uniform(k, (N,)))
    a, b, parent = f(k1), f(k2), f(jr.key(0))
    for x, y in ((a, b), (a, parent), (b, parent)):
        r = np.corrcoef(x, y)[0, 1]
        assert abs(r) < 4 / np.sqrt(N), r
    assert not np.array_equal(k1, k2)


def test_different_keys_differ_and_a_key_repeats():
    f = tracejit.jit(lambda k: jr.bits(k, (1000,)))
    a, b, again = f(jr.key(1)), f(jr.key(2)), f(jr.key(1))
    np.testing.assert_array_equal(a, again)
    assert np.mean(a == b) < 0.01


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------
def test_dropout_keeps_fraction_within_4_sigma_and_scales():
    x = np.random.default_rng(0).uniform(1, 2, N).astype(np.float32)
    for p in (0.1, 0.5, 0.8):
        y = tracejit.jit(lambda x, k: nn.dropout(x, p, key=k))(x, jr.key(9))
        dropped = y == 0
        assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / N), (p, dropped.mean())
        np.testing.assert_allclose(y[~dropped], x[~dropped] / np.float32(1 - p), rtol=1e-6)


def test_dropout_same_key_same_mask_and_dtypes_agree():
    x = np.random.default_rng(1).uniform(1, 2, (64, 33))
    f = tracejit.jit(lambda x, k: nn.dropout(x, 0.4, key=k))
    m1 = f(x, jr.key(4)) == 0
    m2 = f(x, jr.key(4)) == 0
    m32 = f(x.astype(np.float32), jr.key(4)) == 0
    other = f(x, jr.key(5)) == 0
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(m1, m32)
    np.testing.assert_array_equal(m1, nn.dropout(x, 0.4, key=jr.key(4)) == 0)   # eager
    assert (m1 != other).mean() > 0.3


def test_dropout_edge_values_of_p_and_eval_mode():
    x = np.array([1.0, -2.0, np.inf], np.float32)
    k = jr.key(0)
    f = tracejit.jit(lambda x, k, p, t: nn.dropout(x, p, t, key=k))
    np.testing.assert_array_equal(f(x, k, 0.0, True), x)
    np.testing.assert_array_equal(f(x, k, 0.7, False), x)
    y = f(x, k, 1.0, True)   # input * 0, as PyTorch: NaN for infinite input
    np.testing.assert_array_equal(y[:2], [0, 0])
    assert np.isnan(y[2])
    np.testing.assert_array_equal(nn.dropout(x, 0.5, training=False), x)   # no key needed


def test_dropout_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(7, 9)), rng.normal(size=(7, 9))
    k = jr.key(123)

    def loss(x):
        return (tracejit.tanh(nn.dropout(x, 0.35, key=k)) * w).sum()

    g = tracejit.jit_grad(loss)(x)
    f = tracejit.jit(loss)
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = 1e-6
        fd[i] = (f(x + e) - f(x - e)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    mask = nn.dropout(np.ones_like(x), 0.35, key=k) != 0
    assert np.all(g[~mask] == 0) and np.all(g[mask] != 0)


# ------------------------------------------------------------------------------------------------
# keys as traced arguments, laziness, bad input
# ------------------------------------------------------------------------------------------------
def test_a_new_key_does_not_retrace():
    traces = []

    def f(x, k):
        traces.append(1)
        return nn.dropout(x, 0.5, key=k)

    jf = tracejit.jit(f)
    x = np.ones(100, np.float32)
    a = jf(x, jr.key(0))
    b = jf(x, jr.key(1))
    assert len(traces) == 1
    assert not np.array_equal(a, b)


def test_differentiating_a_key_is_an_error():
    with pytest.raises(Exception, match="k"):
        tracejit.jit_grad(lambda k: jr.uniform(k, (3,)).sum())(jr.key(0))


def test_import_tracejit_does_not_load_random():
    code = ("import sys, tracejit; assert 'tracejit.random' not in sys.modules; "
            "tracejit.random.key(0); assert 'tracejit.random' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bad,exc,words", [
    (np.array([0, 1], np.int64), TypeError, "uint32"),
    (np.array([0.0, 1.0]), TypeError, "float64"),
    (np.zeros(3, np.uint32), ValueError, "shape"),
    ([0, 1], TypeError, "list"),
])
def test_bad_keys_name_the_argument(bad, exc, words):
    for call in (lambda: jr.uniform(bad, (3,)), lambda: nn.dropout(np.ones(3), key=bad),
                 lambda: jr.split(bad)):
        with pytest.raises(exc, match="key") as info:
            call()
        assert words in str(info.value)


def test_bad_traced_key_names_the_argument():
    with pytest.raises(TypeError, match=r"key must be a uint32 array of shape \[2\].*u32\[3\]"):
        tracejit.jit(lambda k: jr.uniform(k, (3,)))(np.zeros(3, np.uint32))


@pytest.mark.parametrize("p", [-0.1, 1.5, np.nan, "0.5", True])
def test_probability_outside_0_1_is_an_error(p):
    with pytest.raises(ValueError, match=r"dropout: p must be a number in \[0, 1\]"):
        nn.dropout(np.ones(3), p, key=jr.key(0))
    with pytest.raises(ValueError, match=r"bernoulli: p must be a number in \[0, 1\]"):
        jr.bernoulli(jr.key(0), p, (3,))


def test_other_bad_arguments():
    with pytest.raises(TypeError, match="dropout: key is required"):
        nn.dropout(np.ones(3), 0.5)
    with pytest.raises(TypeError, match="training must be a bool"):
        nn.dropout(np.ones(3), 0.5, "yes", key=jr.key(0))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        jr.uniform(jr.key(0), (3,), np.int32)
    with pytest.raises(ValueError, match="shape must be"):
        jr.normal(jr.key(0), (3, -1))
    with pytest.raises(ValueError, match="num must be a positive int"):
        jr.split(jr.key(0), 0)
    with pytest.raises(TypeError, match="seed must be"):
        jr.key(1.5)

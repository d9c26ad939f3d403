"""Integer arrays (int32, int64: class labels, token ids) as traced arguments: a new batch of labels
runs the same compiled code, integers support what labels need (comparisons, arithmetic with
Python ints, astype) without carrying gradients, differentiating w.r.t. one is a TypeError naming
it, and nn.cross_entropy / nll_loss take traced class indices (2-d and N-d input, ignore_index,
label_smoothing, weight), raising IndexError natively for labels out of range."""
from __future__ import annotations

import numpy as np
import pytest

import tracejit as tj
from tracejit import nn
from helpers import use_backend
from optable import ref_log_softmax, ref_nll

BACKENDS = ["interpreter", "llvm"]
RNG = np.random.default_rng(11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_batches_of_labels_never_retrace(backend):
    x = RNG.standard_normal((8, 5))
    step = tj.jit_value_and_grad(lambda x, labels: nn.cross_entropy(x, labels))
    with use_backend(backend):
        for _ in range(4):
            labels = RNG.integers(0, 5, size=8)
            loss, g = step(x, labels)
            np.testing.assert_allclose(loss, ref_nll(ref_log_softmax(x, 1), labels), rtol=1e-12)
    assert step.compile_stats()["signatures"] == 1
    with use_backend(backend):
        step(x, labels.astype(np.int32))      # another dtype is another signature
    assert step.compile_stats()["signatures"] == 2


@pytest.mark.parametrize("argnums", [1, (0, 1)])
def test_gradient_wrt_an_integer_argument_is_a_type_error_naming_it(argnums):
    f = tj.jit_grad(lambda x, labels: (x * labels.astype(np.float64)).sum(), argnums=argnums)
    with pytest.raises(TypeError, match=r"labels, an integer array \(i64\[3\]\)"):
        f(np.ones(3), np.arange(3))


def test_gradient_wrt_a_pytree_holding_labels_names_the_leaf():
    f = tj.jit_grad(lambda batch: (batch["x"] * batch["labels"]).sum())
    with pytest.raises(TypeError, match=r"batch\['labels'\], an integer array"):
        f({"x": np.ones(3), "labels": np.arange(3, dtype=np.int32)})


def test_unsupported_integer_dtypes_raise_naming_the_traced_ones():
    with pytest.raises(TypeError, match=r"float32 or float64 array \(integer data: int32, "
                                        r"int64 or uint32\), got an array of dtype uint8"):
        tj.jit(lambda x: x)(np.zeros(3, np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_ops_for_labels(backend, dtype):
    labels = np.array([3, -1, 0, 7, 3], dtype=dtype)

    def f(l):
        return (l == 3, l != 0, l < 1, l >= 3, l + 1, 2 * l - 4, tj.maximum(l, 0),
                tj.where(l < 0, 0, l), l.astype(np.float32), l.astype(np.float64),
                l.reshape(5, 1)[1:, 0])

    with use_backend(backend):
        out = tj.jit(f)(labels)
    ref = (labels == 3, labels != 0, labels < 1, labels >= 3, labels + 1, 2 * labels - 4,
           np.maximum(labels, 0), np.where(labels < 0, 0, labels), labels.astype(np.float32),
           labels.astype(np.float64), labels[1:])
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype, (o.dtype, r.dtype)
        np.testing.assert_array_equal(o, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_do_not_flow_through_integers(backend):
    x = RNG.standard_normal(4)
    labels = np.array([2, 0, 1, 1])
    g = tj.jit_grad(lambda x, l: (x * (l * 2 + 1).astype(np.float64) * x).sum())
    with use_backend(backend):
        np.testing.assert_allclose(g(x, labels), 2 * x * (labels * 2 + 1), rtol=1e-12)


# ---------------------------------------------------------------------------------- losses
LOSS_CASES = {
    "2d": ((6, 5), np.array([0, 4, -100, 2, 2, 1])),
    "4d": ((2, 3, 4, 5), np.where(RNG.random((2, 4, 5)) < 0.2, -100,
                                  RNG.integers(0, 3, size=(2, 4, 5)))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LOSS_CASES))
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2}, {"weight": True},
                                {"weight": True, "label_smoothing": 0.3, "reduction": "sum"},
                                {"ignore_index": 1, "reduction": "none"}],
                         ids=["plain", "smoothing", "weight", "weight-smoothing-sum",
                              "ignore1-none"])
def test_cross_entropy_with_traced_labels(backend, case, kw):
    shape, labels = LOSS_CASES[case]
    labels = np.where(labels == -100, kw.get("ignore_index", -100), labels)
    x = RNG.standard_normal(shape)
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = RNG.uniform(0.5, 2.0, shape[1])
    ref = ref_nll(ref_log_softmax(x, 1), labels, **kw)
    traced = tj.jit_value_and_grad(lambda x, t: nn.cross_entropy(x, t, **kw).sum())
    constant = tj.jit_grad(lambda x: nn.cross_entropy(x, labels, **kw).sum())
    with use_backend(backend):
        np.testing.assert_allclose(tj.jit(lambda x, t: nn.cross_entropy(x, t, **kw))(x, labels),
                                   ref, rtol=1e-12, atol=1e-14)
        loss, g = traced(x, labels)
        # the gradient equals that of the constant-label path (itself FD-checked in the table)
        np.testing.assert_allclose(g, constant(x), rtol=1e-10, atol=1e-13)
        logp = tj.jit(lambda x: nn.log_softmax(x, 1))(x)
        np.testing.assert_allclose(tj.jit(lambda p, t: nn.nll_loss(p, t, kw.get("weight"),
                                                                    kw.get("ignore_index", -100),
                                                                    kw.get("reduction", "mean")))(
            logp, labels), ref_nll(logp, labels, kw.get("weight"), kw.get("ignore_index", -100),
                                   kw.get("reduction", "mean")), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loss, np.sum(ref), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [5, -1, -101])
def test_cross_entropy_label_out_of_range_raises_index_error(backend, bad):
    x = RNG.standard_normal((4, 5))
    step = tj.jit_grad(lambda x, labels: nn.cross_entropy(x, labels, label_smoothing=0.1))
    with use_backend(backend):
        with pytest.raises(IndexError, match=rf"index {bad} is out of bounds for axis 0 with "
                                             rf"size 5 in cross_entropy\(labels\) at "
                                             rf"test_int_args.py:\d+"):
            step(x, np.array([0, bad, 1, 2]))
        step(x, np.array([0, -100, 1, 2]))   # the ignored index is never checked

"""Linear algebra beyond the op table: the batched matmul kernel on every transpose and broadcast
pattern and thread split, numpy's broadcasting corners of `@` with their gradients, the lowering
of einsum to matmuls without copies for transposes, and the errors that name shapes."""
import numpy as np
import pytest

import helpers
import tracejit as tj
from helpers import use_backend
from test_kernels_dense import check_all


# ------------------------------------------------------------------------------------------------
# the native kernel: batch entries x row tiles split between threads
# ------------------------------------------------------------------------------------------------
def _operands(batch_a, batch_b, m, n, k, ta, tb):
    return [tuple(batch_a) + ((k, m) if ta else (m, k)), tuple(batch_b) + ((n, k) if tb else (k, n))]


BATCHED = [  # (batch of A, batch of B, M, N, K)
    ((3,), (3,), 5, 7, 9),            # odd sizes, edge tiles in both directions
    ((2, 3), (2, 3), 13, 4, 20),      # two batch axes; dot form for trans_b (K >= 2 vectors)
    ((), (4,), 7, 3, 5),              # an unbatched A shared by every entry
    ((2, 1), (3,), 4, 17, 3),         # both broadcast: [2, 1] x [3] -> [2, 3]; short K
    ((5,), (1,), 1, 9, 33),           # one row per entry: more entries than row tiles per thread
    ((2, 1), (3,), 26, 19, 37),       # packed B panels per entry, broadcast, a partial column tile
]


@pytest.mark.needs_llvm
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_batched_kernel_every_transpose_and_broadcast(dtype):
    """Every (entry, row tile) is written exactly once, for 1, 2 and 3 threads in both orders
    (NaN-filled output), packed B^T included (trans_a with trans_b, and short K)."""
    specs = [("matmul", _operands(ba, bb, m, n, k, ta, tb), dict(trans_a=ta, trans_b=tb))
             for ba, bb, m, n, k in BATCHED for ta in (False, True) for tb in (False, True)]
    check_all(specs, dtype)


@pytest.mark.needs_llvm
def test_batched_kernel_epilogue_and_threads():
    """A batched matmul followed by elementwise work (the schedule may fuse it as the kernel's
    epilogue, run per panel of rows of each entry), on the default threads, against numpy."""
    rng = helpers.rng_for("batched-epilogue")
    a, b, c = rng.normal(size=(6, 37, 16)), rng.normal(size=(6, 16, 9)), rng.normal(size=9)
    with use_backend("llvm"):
        got = tj.jit(lambda a, b, c: tj.tanh(a @ b + c))(a, b, c)
    np.testing.assert_allclose(got, np.tanh(a @ b + c), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# numpy's broadcasting corners of `@`, values and gradients on both backends
# ------------------------------------------------------------------------------------------------
CORNERS = [((4,), (2, 4, 3)), ((2, 3, 4), (4,)), ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (2, 4, 5)),
           ((2, 5, 3, 4), (5, 4, 2)), ((1, 3, 4), (2, 4, 2))]


@pytest.mark.parametrize("backend", ["interpreter", pytest.param("llvm", marks=pytest.mark.needs_llvm)])
@pytest.mark.parametrize("shapes", CORNERS, ids=lambda s: "@".join("x".join(map(str, x)) for x in s))
def test_matmul_broadcast_corners(shapes, backend):
    rng = helpers.rng_for("corner", str(shapes))
    a, b = (rng.normal(size=s) for s in shapes)
    w = rng.normal(size=np.matmul(a, b).shape)

    def loss(a, b):
        return ((a @ b) * w).sum()

    with use_backend(backend):
        val, grads = tj.jit_value_and_grad(loss, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(val, loss(a, b), rtol=1e-12)
    fd = helpers.numeric_grad(loss, (a, b), (0, 1))
    helpers.assert_grads_match_fd(grads, fd, "f64", str(shapes))
    for g, x in zip(grads, (a, b)):
        assert g.shape == x.shape


def test_jacfwd_through_a_batched_matmul():
    """The tangent rule with a batch of tangent directions (jacfwd) on both operands."""
    rng = helpers.rng_for("jacfwd-batched")
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3, 2))
    with use_backend("interpreter"):
        ja, jb = tj.jacfwd(lambda a, b: a @ b, argnums=(0, 1))(a, b)
    out = a @ b   # linear in each operand: column j of the Jacobian is f(basis vector j)
    want_a = np.stack([e.reshape(a.shape) @ b for e in np.eye(a.size)], -1)
    want_b = np.stack([a @ e.reshape(b.shape) for e in np.eye(b.size)], -1)
    np.testing.assert_allclose(ja, want_a.reshape(out.shape + a.shape), atol=1e-12)
    np.testing.assert_allclose(jb, want_b.reshape(out.shape + b.shape), atol=1e-12)


# ------------------------------------------------------------------------------------------------
# lowering: transposes are trans flags, einsum is matmuls
# ------------------------------------------------------------------------------------------------
def _optimized(fn, *args):
    with use_backend("interpreter"):
        return tj.jit_grad(fn, argnums=tuple(range(len(args)))).ir(*args, stage="optimized")


def test_attention_scores_and_their_gradient_copy_no_operand():
    q, k = np.ones((2, 3, 4, 5)), np.ones((2, 3, 6, 5))
    text = _optimized(lambda q, k: (q @ k.swapaxes(-1, -2)).sum(), q, k)
    assert "= transpose" not in text, text
    assert text.count("= matmul") == 3, text


@pytest.mark.parametrize("subscripts, shapes, matmuls", [
    ("bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)], 1),
    ("ji,jk->ik", [(4, 3), (4, 5)], 1),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], 2),
])
def test_einsum_is_matmuls_without_transposes(subscripts, shapes, matmuls):
    xs = [np.ones(s) for s in shapes]
    with use_backend("interpreter"):
        text = tj.jit(lambda *xs: tj.einsum(subscripts, *xs)).ir(*xs, stage="optimized")
    assert "= transpose" not in text, text
    assert text.count("= matmul") == matmuls, text


def test_dot_of_nd_operands_is_numpys_not_matmuls():
    a, b = np.arange(24.0).reshape(2, 3, 4), np.arange(24.0).reshape(2, 4, 3)
    with use_backend("interpreter"):
        got = tj.jit(tj.dot)(a, b)
    assert got.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(got, np.dot(a, b))


# ------------------------------------------------------------------------------------------------
# errors name the shapes (or the order) at fault
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, shapes, error, match", [
    (lambda a, b: a @ b, [(2, 3, 4), (3, 4, 5)], tj.ShapeError, r"\[2\] and \[3\].*\[2,3,4\]"),
    (lambda a, b: a @ b, [(2, 3, 4), (2, 5, 6)], tj.ShapeError, r"inner dimensions.*4 != 5"),
    (lambda a, b: a @ b, [(4,), (2, 3, 5)], tj.ShapeError, r"inner dimensions"),
    (lambda a, b: tj.einsum("ij,jk->ik", a, b), [(2, 3), (4, 5)], tj.ShapeError,
     r"label 'j' has size 3 .* and 4"),
    (lambda a: tj.einsum("ij,jk->ik", a), [(2, 3)], ValueError, r"2 operand\(s\), got 1"),
    (lambda a: tj.einsum("ijk->i", a), [(2, 3)], ValueError, r"shape \[2, 3\]"),
    (lambda a: tj.einsum("ij->ik", a), [(2, 3)], ValueError, r"output label 'k'"),
    (lambda a, b: tj.tensordot(a, b, 1), [(2, 3), (4, 5)], tj.ShapeError, r"\[2, 3\].*\[4, 5\]"),
    (lambda a, b: tj.cross(a, b), [(4,), (3,)], ValueError, r"2 or 3 components"),
    (lambda a: tj.norm(a, 2), [(3, 4)], NotImplementedError, r"ord=2 of a matrix"),
    (lambda a: tj.norm(a, -2), [(3, 4)], NotImplementedError, r"ord=-2 of a matrix"),
    (lambda a: tj.norm(a, "nuc"), [(3, 4)], NotImplementedError, r"ord='nuc' of a matrix"),
    (lambda a: tj.norm(a, 3), [(3, 4)], ValueError, r"invalid order 3 for matrices"),
    (lambda a: tj.norm(a, "fro", axis=0), [(3, 4)], ValueError, r"invalid order 'fro' for vectors"),
], ids=["batch", "inner", "vector-inner", "einsum-size", "einsum-count", "einsum-rank",
        "einsum-output", "tensordot", "cross", "norm2", "norm-2", "nuc", "matrix-ord", "vector-ord"])
def test_errors_name_the_shapes(fn, shapes, error, match):
    with use_backend("interpreter"), pytest.raises(error, match=match):
        tj.jit(fn)(*[np.ones(s) for s in shapes])

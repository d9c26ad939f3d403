"""Forward mode (jit_jvp), Jacobians (jacfwd, jacrev) and Hessians.

Oracles: float64 central differences of the op table's numpy references, the existing adjoint
(the transpose identity <u, J v> = <J^T u, v>), nested jit_grad for Hessian-vector products, and
finite differences of whole models for Jacobians and Hessians."""
from unittest import mock

import numpy as np
import pytest

import helpers
import optable
import tracejit as tj
from tracejit import nn
from tracejit.signature import Signature
from helpers import assert_close, case_functions, case_inputs, numeric_jvp, rng_for, use_backend

TOL = (1e-6, 1e-7)
# a representative subset for native code (each case compiles several functions)
NATIVE_OPS = ("tanh", "exp", "log", "sqrt", "operator.*", "operator./", "operator.**", "maximum",
              "where", "sum", "max", "matmul", "nn.conv2d", "nn.max_pool2d", "nn.avg_pool2d",
              "concatenate", "nn.relu", "nn.cross_entropy")
NATIVE_CASES = [c for c in optable.GRAD_CASES if c.op in NATIVE_OPS]


@pytest.fixture
def backend():
    return "interpreter"


def _tangents(case):
    rng = rng_for(case.id, "jvp")
    return [rng.normal(size=x.shape) for x in case_inputs(case)]


def _jvp_of(case):
    if not hasattr(case, "_jvp"):
        object.__setattr__(case, "_jvp", tj.jit_jvp(case.fn))
    return case._jvp


def check_jvp(case, backend):
    """The tangent of every table op against central differences of its numpy reference, and
    against the adjoint: <ct, J v> from forward mode equals <J^T ct, v> from reverse mode."""
    xs, vs = case_inputs(case), _tangents(case)
    with use_backend(backend):
        y, jv = _jvp_of(case)(tuple(xs), tuple(vs))
        grads = case_functions(case)["grad"](*xs)
    assert_close(y, case.ref(*xs), helpers.FORWARD_TOL["f64"], f"{case.id}: primal output")
    assert_close(jv, numeric_jvp(case.ref, xs, vs), TOL, f"{case.id}: tangent vs differences")
    ct = case_functions(case)["ct"]
    lhs = float(np.vdot(ct, jv))
    rhs = sum(float(np.vdot(g, v)) for g, v in zip(grads, vs))
    assert abs(lhs - rhs) <= 1e-9 * (1 + np.sum(np.abs(ct * jv))), \
        f"{case.id}: <u, J v> = {lhs!r} but <J^T u, v> = {rhs!r}"


@pytest.mark.parametrize("case", optable.GRAD_CASES, ids=optable.case_id)
def test_jvp_rule(case, backend):
    check_jvp(case, backend)


@pytest.mark.parametrize("case", NATIVE_CASES, ids=optable.case_id)
def test_jvp_rule_native(case):
    check_jvp(case, "llvm")


@pytest.mark.parametrize("case", optable.GRAD_CASES, ids=optable.case_id)
def test_batched_tangent_rule(case, backend):
    """jacfwd pushes every basis direction through one batched tangent pass: contracted with v,
    its Jacobian equals the unbatched tangent J v (every rule, in its batched form)."""
    xs, vs = case_inputs(case), _tangents(case)
    argnums = tuple(range(len(xs)))
    with use_backend(backend):
        jac = tj.jacfwd(case.fn, argnums=argnums)(*xs)
        _, jv = _jvp_of(case)(tuple(xs), tuple(vs))
    out_ndim = np.ndim(jv)
    got = sum(np.tensordot(j, v, axes=v.ndim) if v.ndim else j * v for j, v in zip(jac, vs))
    assert np.shape(jac[0])[:out_ndim] == np.shape(jv)
    assert_close(got, jv, (1e-10, 1e-12), f"{case.id}: batched tangents")


@pytest.mark.parametrize("case", [c for c in NATIVE_CASES if c.second_order and c.op in (
    "matmul", "nn.conv2d", "nn.max_pool2d", "nn.avg_pool2d")], ids=optable.case_id)
def test_jvp_of_grad_is_hvp_native(case):
    """The loop-nest kernels' backward ops (conv2d_input_grad, max_pool2d_grad, ...) under
    forward mode, natively."""
    test_jvp_of_grad_is_hvp(case, "llvm")


@pytest.mark.parametrize("case", optable.SECOND_ORDER_CASES, ids=optable.case_id)
def test_jvp_of_grad_is_hvp(case, backend):
    """jit_jvp of a jit_grad is a Hessian-vector product: it runs the tangent rules of every
    adjoint instruction (conv2d_input_grad, max_pool2d_grad, ...); nested jit_grad is the oracle."""
    xs = case_inputs(case)
    fns = case_functions(case)
    with use_backend(backend):
        _, hv = tj.jit_jvp(fns["grad2"])(tuple(xs), tuple(fns["rs"]))
        expected = fns["hvp"](*xs)
    for i, (a, e) in enumerate(zip(hv, expected)):
        assert_close(a, e, (1e-9, 1e-11), f"{case.id}: H r, input {i}")


@pytest.mark.parametrize("case", optable.SECOND_ORDER_CASES, ids=optable.case_id)
def test_third_order(case, backend):
    """jit_jvp of a nested jit_grad (the Hessian-vector product): the tangent rules of the
    adjoint-of-adjoint instructions, against central differences of that product."""
    xs = case_inputs(case)
    fns = case_functions(case)
    ss = _tangents(case)
    with use_backend(backend):
        _, got = tj.jit_jvp(fns["hvp"])(tuple(xs), tuple(ss))
        expected = numeric_jvp(lambda *a: fns["hvp"](*a), xs, ss)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, (1e-5, 1e-6), f"{case.id}: third derivative, input {i}")


# ------------------------------------------------------------------------------------------------
# the notes' example, the dump
# ------------------------------------------------------------------------------------------------
def notes_example(a, b):
    c = a + b
    d = b + 1
    e = c * d
    return e, c, d


def test_notes_example_forward_from_b(backend):
    """e = (a + b)(b + 1) at a=2, b=1: forward mode from b gives de/db = 5, c.tan = d.tan = 1."""
    f = tj.jit_jvp(notes_example)
    primals = (np.array(2.0), np.array(1.0))
    tangents = (np.array(0.0), np.array(1.0))
    with use_backend(backend):
        (e, c, d), (e_tan, c_tan, d_tan) = f(primals, tangents)
    assert (float(e), float(c), float(d)) == (6.0, 3.0, 2.0)
    assert (float(e_tan), float(c_tan), float(d_tan)) == (5.0, 1.0, 1.0)
    dump = f.ir(primals, tangents, stage="jvp")
    lines = dump.splitlines()
    assert lines[0] == ("func @notes_example.jvp(%a: f64[], %b: f64[], %a.tan: f64[], "
                        "%b.tan: f64[]) -> (f64[], f64[], f64[], f64[], f64[], f64[]) {")
    # c.tan = a.tan + b.tan (= 0 + 1); d = b + 1 has b's tangent itself, returned as d's tangent
    assert any(line.startswith("  %0.tan: f64[] = add %a.tan, %b.tan") and "# tan of %0" in line
               for line in lines), dump
    assert any(line.startswith("  %2.tan: f64[] = add") and "# tan of %2  test_jvp.py:" in line
               for line in lines), dump
    assert lines[-2] == "  return %2, %0, %1, %2.tan, %0.tan, %b.tan"


def test_zero_tangents_stay_symbolic():
    """Values that do not depend on the tangents (and comparisons) get no tangent instructions."""
    def f(x, y):
        return tj.tanh(y) * 2.0 + tj.where(x > 0, x, 0.0) * tj.exp(y).sum()
    x, y = np.ones(3), np.ones(3)
    dump = tj.jit_jvp(f).ir((x, y), (x, y))
    tangent_lines = [line for line in dump.splitlines() if "# tan of" in line]
    assert not any(" gt " in line or "const" in line for line in tangent_lines), dump
    assert sum("exp" in line for line in dump.splitlines()) == 1, dump


# ------------------------------------------------------------------------------------------------
# API: errors, pytrees, composition
# ------------------------------------------------------------------------------------------------
def test_jvp_pytrees_and_static_leaves(backend):
    def f(p, x, scale):
        return {"y": tj.tanh(x @ p["w"]) * scale, "s": (p["b"] ** 2).sum()}
    rng = rng_for("pytree")
    p = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    x = rng.normal(size=(5, 3))
    tp = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    tx = rng.normal(size=(5, 3))
    with use_backend(backend):
        out, tan = tj.jit_jvp(f)((p, x, 2.0), (tp, tx, None))
    assert set(out) == set(tan) == {"y", "s"}

    def ref(w, b, x):
        return np.tanh(x @ w) * 2.0, np.sum(b ** 2)
    fd = numeric_jvp(ref, [p["w"], p["b"], x], [tp["w"], tp["b"], tx])
    assert_close(tan["y"], fd[0], TOL, "y")
    assert_close(tan["s"], fd[1], TOL, "s")


@pytest.mark.parametrize("tangents, message", [
    ((np.ones((2, 3)),), "2 primals but 1 tangents"),
    ((np.ones((3, 2)), np.ones(3)), r"argument x must have its primal's type f64\[2,3\], got "
                                    r"float64\[3, 2\]"),
    ((np.ones((2, 3), np.float32), np.ones(3)), r"argument x must have its primal's type f64"),
    (([np.ones((2, 3))], np.ones(3)), "the tangent of argument x has the structure"),
])
def test_jvp_tangent_errors(tangents, message):
    def f(x, y):
        return (x * y).sum()
    with pytest.raises(TypeError, match=message):
        tj.jit_jvp(f)((np.ones((2, 3)), np.ones(3)), tangents)


def test_missing_jvp_rule_names_primitive_and_pass():
    from tracejit.ir.core import MissingRuleError
    from tracejit.ir.jvp_rules import jvp_rules
    from tracejit.ir.prims.elementwise import tanh_p
    rule = jvp_rules.pop(tanh_p)
    try:
        with pytest.raises(MissingRuleError, match="no jvp rule for 'tanh'.*forward mode"):
            tj.jit_jvp(lambda x: tj.tanh(x))((np.ones(2),), (np.ones(2),))
    finally:
        jvp_rules[tanh_p] = rule


def test_grad_of_function_calling_jvp_and_third_order(backend):
    """jit_grad through an inlined jit_jvp of a jit_grad: the gradient of <H(x) v, w>, a third
    derivative, against central differences of the compiled second-order function."""
    def f(x):
        return (tj.sin(x) ** 3).sum() + (x @ x) * tj.tanh(x).sum()
    rng = rng_for("third")
    x, v, w = rng.normal(size=4), rng.normal(size=4), rng.normal(size=4)
    hvp = tj.jit_jvp(tj.jit_grad(f))

    def h(x):
        return (hvp((x,), (v,))[1] * w).sum()
    with use_backend(backend):
        third = tj.jit_grad(h)(x)
        fd = np.array([numeric_jvp(tj.jit(h), [x], [e]) for e in np.eye(4)])
        # forward over forward over reverse: d/dx [H(x) v] along w is the same T[v, w, .]
        _, t3 = tj.jit_jvp(lambda x: tj.jit_jvp(tj.jit_grad(f))((x,), (v,))[1])((x,), (w,))
    assert_close(third, fd, (1e-6, 1e-7), "third derivative vs differences")
    assert_close(t3, third, (1e-10, 1e-12), "forward-over-forward-over-reverse")


# ------------------------------------------------------------------------------------------------
# Jacobians and Hessians of models
# ------------------------------------------------------------------------------------------------
def mlp(x, w1, b1, w2):
    return tj.tanh(x @ w1 + b1) @ w2


def small_cnn(x, w, w_out):
    h = nn.max_pool2d(nn.relu(nn.conv2d(x, w, padding=1)), 2)
    return h.reshape((x.shape[0], -1)) @ w_out


def _fd_jacobian(f, x):
    cols = [numeric_jvp(f, [x], [e.reshape(x.shape)]) for e in np.eye(x.size)]
    return np.stack(cols, axis=-1).reshape(np.shape(cols[0]) + x.shape)


@pytest.mark.parametrize("backend_name", ["interpreter", "llvm"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_jacfwd_equals_jacrev_equals_fd(model, backend_name):
    rng = rng_for("jac", model)
    if model == "mlp":
        x = rng.normal(size=(2, 3))
        params = (rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=(4, 2)))
        fun = mlp
    else:
        x = rng.normal(size=(1, 1, 4, 4))
        params = (rng.normal(size=(2, 1, 3, 3)), rng.normal(size=(8, 3)))
        fun = small_cnn
    with use_backend(backend_name):
        jf = tj.jacfwd(fun)(x, *params)
        jr = tj.jacrev(fun)(x, *params)
        fd = _fd_jacobian(lambda x: tj.jit(fun)(x, *params), x)
    y_shape = (2, 2) if model == "mlp" else (1, 3)
    assert jf.shape == jr.shape == y_shape + x.shape
    assert_close(jf, fd, TOL, "jacfwd vs differences")
    assert_close(jr, jf, (1e-10, 1e-12), "jacrev vs jacfwd")


def test_jacobian_argnums_tuple_and_pytree_outputs(backend):
    def f(a, b):
        return {"p": a * b, "s": (a ** 2).sum()}
    a, b = np.arange(1.0, 4.0), np.arange(2.0, 5.0)
    with use_backend(backend):
        jf = tj.jacfwd(f, argnums=(0, 1))(a, b)
        jr = tj.jacrev(f, argnums=(0, 1))(a, b)
    for j in (jf, jr):
        assert set(j) == {"p", "s"}
        np.testing.assert_allclose(j["p"][0], np.diag(b))
        np.testing.assert_allclose(j["p"][1], np.diag(a))
        np.testing.assert_allclose(j["s"][0], 2 * a)
        np.testing.assert_allclose(j["s"][1], np.zeros(3))


def test_jacobian_repeated_call_takes_the_fast_path():
    """A second call with the same shapes runs the registered runner (no Signature is built)
    and returns the same structure: plain arrays and a pytree argument."""
    def f(p, x):
        return {"y": tj.tanh(x @ p["w"]) * p["s"]}
    p, x = {"s": np.arange(1.0, 3.0), "w": np.ones((3, 2))}, np.arange(3.0).reshape(1, 3)
    jac = tj.jacfwd(f)
    first = jac(p, x)
    with mock.patch.object(Signature, "__init__", side_effect=AssertionError("slow path")):
        again = jac(p, x)
    assert set(again) == {"y"} and set(again["y"]) == {"s", "w"}
    for k in ("s", "w"):
        np.testing.assert_array_equal(again["y"][k], first["y"][k])
    h = tj.hessian(lambda v: (v ** 3).sum())
    v = np.arange(3.0)
    h(v)
    with mock.patch.object(Signature, "__init__", side_effect=AssertionError("slow path")):
        np.testing.assert_allclose(h(v), np.diag(6 * v))


def test_jacrev_of_one_element_is_the_gradient():
    """A function of one output of one element: jacrev is the plain adjoint (no batch-1 axis on
    its values, which a Hessian would carry through its tangent pass), shaped out + in."""
    rng = rng_for("jacrev-scalar")
    w, x = rng.normal(size=(3, 2)), rng.normal(size=(4, 3))
    dump = tj.jacrev(lambda w, x: tj.tanh(x @ w).sum()).ir(w, x)
    assert "[1," not in dump and "[1]" not in dump
    got = tj.jacrev(lambda w, x: tj.tanh(x @ w).sum().reshape(1, 1))(w, x)
    assert got.shape == (1, 1, 3, 2)
    np.testing.assert_allclose(got[0, 0], tj.jit_grad(lambda w, x: tj.tanh(x @ w).sum())(w, x),
                               rtol=1e-12)


def test_batched_tangent_of_a_weight_times_transposed_is_one_2d_product(backend):
    """jacfwd w.r.t. W of x @ W^T (nn.linear): the batch of tangents joins the rows of one 2-d
    product (dW_t x^T), read transposed, instead of a batched product of one per direction."""
    rng = rng_for("linear-jacfwd")
    x, w = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    jac = tj.jacfwd(lambda w, x: tj.tanh(nn.linear(x, w)))
    matmuls = [ln for ln in jac.ir(w, x).splitlines() if "= matmul" in ln]
    ranks = [ln.split("[", 1)[1].split("]", 1)[0].count(",") + 1 for ln in matmuls]
    assert ranks and all(r == 2 for r in ranks), matmuls
    with use_backend(backend):
        got = jac(w, x)
    d = 1 - np.tanh(x @ w.T) ** 2                       # [4, 5]
    want = np.einsum("ij,jk,il->ijkl", d, np.eye(5), x)  # d y_ij / d w_kl
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["jacfwd", "jacrev"])
def test_jacobian_is_one_batched_pass(mode):
    """The transformed IR does not grow with the number of directions: jacfwd pushes all input
    directions, jacrev pulls all output cotangents, through one batched pass."""
    def counts(n):
        w = np.ones((3, n))
        jac = getattr(tj, mode)(lambda x, w: tj.tanh(x @ w) @ w.T)
        dump = jac.ir(np.ones((n, 3)), w)
        return dump.count(" = "), dump.count("= matmul")
    assert counts(2) == counts(7)


def test_jacobian_of_mixed_dtype_outputs(backend):
    """jacrev sums <f(x), u> over the outputs: an f32 and an f64 output are summed in f64. As in
    JAX, a forward-mode block has the output's dtype, a reverse-mode block the input's."""
    def f(x):
        return x * 2.0, (x.astype(np.float32) ** 2).sum()
    x = np.arange(3.0)
    with use_backend(backend):
        jr = tj.jacrev(f)(x)
        jf = tj.jacfwd(f)(x)
    assert jf[1].dtype == np.float32 and jr[1].dtype == np.float64
    for j in (jr, jf):
        np.testing.assert_allclose(j[0], 2 * np.eye(3))
        np.testing.assert_allclose(j[1], 2 * x)


@pytest.mark.parametrize("backend_name", ["interpreter", "llvm"])
def test_hessian_of_mlp_loss(backend_name):
    rng = rng_for("hessian")
    x, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    shapes = [(3, 4), (4,), (4, 2)]
    sizes = [int(np.prod(s)) for s in shapes]

    def loss(theta, x, t):
        parts, off = [], 0
        for s, n in zip(shapes, sizes):
            parts.append(theta[off:off + n].reshape(s))
            off += n
        return nn.mse_loss(mlp(x, *parts), t)
    theta = rng.normal(size=sum(sizes)) * 0.5
    with use_backend(backend_name):
        h = tj.hessian(loss)(theta, x, t)
        grad = tj.jit_grad(loss)
        fd = np.stack([numeric_jvp(lambda th: grad(th, x, t), [theta], [e])
                       for e in np.eye(theta.size)], axis=1)
    assert h.shape == (theta.size, theta.size)
    assert_close(h, h.T, (1e-12, 1e-13), "symmetry")
    assert_close(h, fd, (1e-6, 1e-7), "Hessian vs differences of the gradient")

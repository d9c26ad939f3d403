"""The public API on the reference interpreter: decorator forms, pytrees, argnums, has_aux,
value_and_grad, jit, static arguments, the compile cache, nested jit_grad, eager evaluation on numpy
arrays, the numpy protocols and output dtypes."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tracejit
from tracejit import jit, jit_grad, jit_value_and_grad, nn

pytestmark = pytest.mark.usefixtures("interpreter_backend")

X = np.array([0.5, -1.0, 2.0])
Y = np.array([1.5, 0.25, -0.5])


class Counter:
    """Wraps a Python function and counts how often it is traced."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# decorator forms, argnums, value_and_grad, has_aux
# ------------------------------------------------------------------------------------------------
def test_bare_and_parametrized_decorators():
    @jit_grad
    def f(x, y):
        return (x * x * y).sum()

    @jit_grad(argnums=(0, 1))
    def g(x, y):
        return (x * x * y).sum()

    np.testing.assert_allclose(f(X, Y), 2 * X * Y)
    gx, gy = g(X, Y)
    np.testing.assert_allclose(gx, 2 * X * Y)
    np.testing.assert_allclose(gy, X * X)
    assert f.__name__ == "f" and f.__doc__ is None


@pytest.mark.parametrize("argnums, expected", [
    (0, "x"), (1, "y"), (-1, "z"), ((2, 0), ("z", "x")), ((1,), ("y",)),
], ids=["0", "1", "-1", "(2,0)", "(1,)"])
def test_argnums(argnums, expected):
    x, y, z = X, Y, np.array([3.0, 1.0, -2.0])
    grads = {"x": y * z, "y": x * z, "z": x * y}
    g = jit_grad(lambda x, y, z: (x * y * z).sum(), argnums=argnums)(x, y, z)
    if isinstance(expected, str):
        np.testing.assert_allclose(g, grads[expected])
    else:
        assert isinstance(g, tuple) and len(g) == len(expected)
        for gi, name in zip(g, expected):
            np.testing.assert_allclose(gi, grads[name])


def test_argnums_out_of_range():
    with pytest.raises(ValueError, match="argnums 2"):
        jit_grad(lambda x, y: (x * y).sum(), argnums=2)(X, Y)


def test_unused_argument_gets_zero_gradient():
    with pytest.warns(tracejit.ZeroGradientWarning, match=r"on y, so its gradient"):
        gx, gy = jit_grad(lambda x, y: x.sum() * 2.0, argnums=(0, 1))(X, Y[:2])
    np.testing.assert_array_equal(gx, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(gy, [0.0, 0.0])


def test_value_and_grad():
    value, g = jit_value_and_grad(lambda x: (x ** 3).sum())(X)
    assert value.shape == () and value.dtype == np.float64
    np.testing.assert_allclose(value, (X ** 3).sum())
    np.testing.assert_allclose(g, 3 * X ** 2)
    value, (gx, gy) = jit_value_and_grad(lambda x, y: x.dot(y), argnums=(0, 1))(X, Y)
    np.testing.assert_allclose(value, X.dot(Y))
    np.testing.assert_allclose(gx, Y)
    np.testing.assert_allclose(gy, X)


def test_has_aux():
    def loss(w, x):
        pred = tracejit.tanh(x @ w)
        return (pred ** 2).mean(), {"pred": pred, "n": x.sum()}

    w, x = np.array([0.5, -0.25]), np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    pred = np.tanh(x @ w)
    expected_grad = x.T @ (2 * pred * (1 - pred ** 2) / 3)
    g, aux = jit_grad(loss, has_aux=True)(w, x)
    np.testing.assert_allclose(g, expected_grad)
    assert set(aux) == {"pred", "n"}
    np.testing.assert_allclose(aux["pred"], pred)
    np.testing.assert_allclose(aux["n"], x.sum())
    (value, aux2), g2 = jit_value_and_grad(loss, has_aux=True)(w, x)
    np.testing.assert_allclose(value, (pred ** 2).mean())
    np.testing.assert_allclose(g2, expected_grad)
    np.testing.assert_allclose(aux2["pred"], pred)


def test_has_aux_requires_a_pair():
    with pytest.raises(TypeError, match=r"\(loss, aux\)"):
        jit_grad(lambda x: x.sum(), has_aux=True)(X)


# ------------------------------------------------------------------------------------------------
# pytrees
# ------------------------------------------------------------------------------------------------
def test_pytree_parameters_keep_their_structure():
    params = {"layers": [{"w": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([0.5, -0.5])},
                         {"w": np.array([[0.5, -1.0]]), "b": np.array([0.25])}],
              "scale": (np.array(2.0), np.array([1.0, 3.0]))}

    def loss(params, x):
        h = x
        for layer in params["layers"]:
            h = h @ layer["w"].T + layer["b"]
        s, v = params["scale"]
        return (h * s).sum() + (v * v).sum()

    x = np.array([[1.0, -1.0]])
    g = jit_grad(loss)(params, x)
    assert list(g) == ["layers", "scale"]
    assert isinstance(g["layers"], list) and isinstance(g["scale"], tuple)
    assert list(g["layers"][0]) == ["w", "b"]
    # h1 = x W0^T + b0 = [-1+0.5, -1-0.5] = [-0.5, -1.5]; out = h1 W1^T + b1; loss = 2 out + |v|^2
    h1 = x @ params["layers"][0]["w"].T + params["layers"][0]["b"]
    out = h1 @ params["layers"][1]["w"].T + params["layers"][1]["b"]
    w1 = params["layers"][1]["w"]
    np.testing.assert_allclose(g["layers"][1]["w"], 2.0 * h1)
    np.testing.assert_allclose(g["layers"][1]["b"], [2.0])
    np.testing.assert_allclose(g["layers"][0]["b"], 2.0 * w1[0])
    np.testing.assert_allclose(g["layers"][0]["w"], 2.0 * np.outer(w1[0], x[0]))
    np.testing.assert_allclose(g["scale"][0], out.sum())
    np.testing.assert_allclose(g["scale"][1], [2.0, 6.0])


def test_pytree_of_two_arguments_with_argnums_tuple():
    g_a, g_b = jit_grad(lambda a, b: (a["u"] * b[0]).sum() + b[1].sum(), argnums=(0, 1))(
        {"u": X}, [Y, np.zeros(2)])
    assert list(g_a) == ["u"] and isinstance(g_b, list) and len(g_b) == 2
    np.testing.assert_allclose(g_a["u"], Y)
    np.testing.assert_allclose(g_b[0], X)
    np.testing.assert_allclose(g_b[1], [1.0, 1.0])


def test_keyword_array_arguments_are_traced():
    f = Counter(lambda x, *, y: (x * y).sum())
    g = jit_grad(f)
    np.testing.assert_allclose(g(X, y=Y), Y)
    np.testing.assert_allclose(g(X, y=2 * Y), 2 * Y)
    assert f.calls == 1


def test_jit_outputs_any_pytree():
    f = jit(lambda x, y: {"sum": x + y, "parts": (x * y, [tracejit.tanh(x)])})
    out = f(X, Y)
    assert list(out) == ["sum", "parts"]
    np.testing.assert_allclose(out["sum"], X + Y)
    np.testing.assert_allclose(out["parts"][0], X * Y)
    assert isinstance(out["parts"][1], list)
    np.testing.assert_allclose(out["parts"][1][0], np.tanh(X))


# ------------------------------------------------------------------------------------------------
# static arguments and the compile cache
# ------------------------------------------------------------------------------------------------
def test_static_python_values_are_part_of_the_key():
    def loss(x, scale, mode, extra, shape):
        y = x.reshape(shape) * scale
        if mode == "sum":           # Python control flow on a static value is fine
            out = y.sum()
        else:
            out = (y * y).sum()
        return out if extra is None else out + extra[0]

    f = Counter(loss)
    g = jit_value_and_grad(f)
    v, gr = g(X, 2.0, "sum", None, (3, 1))
    np.testing.assert_allclose(v, 2 * X.sum())
    np.testing.assert_allclose(gr, [2.0, 2.0, 2.0])
    v, gr = g(X, 3.0, "square", (1.5,), (1, 3))
    np.testing.assert_allclose(v, 9 * (X ** 2).sum() + 1.5)
    np.testing.assert_allclose(gr, 18 * X)
    assert f.calls == 2
    g(X, 2.0, "sum", None, (3, 1))
    g(X + 1.0, 3.0, "square", (1.5,), (1, 3))
    assert f.calls == 2


@pytest.mark.parametrize("change", ["shape", "dtype", "structure", "static", "kwarg-name"])
def test_a_new_signature_retraces_and_the_same_does_not(change):
    f = Counter(lambda x, *rest, **kw: sum(tracejit.sum(v) for v in [x, *rest, *kw.values()]
                                           if not isinstance(v, (int, float))))
    g = jit_grad(f)
    first = dict(args=(X,), kwargs={})
    second = {
        "shape": dict(args=(np.ones((2, 2)),), kwargs={}),
        "dtype": dict(args=(X.astype(np.float32),), kwargs={}),
        "structure": dict(args=(X, Y), kwargs={}),
        "static": dict(args=(X, 1), kwargs={}),
        "kwarg-name": dict(args=(X,), kwargs={"y": Y}),
    }[change]
    for call in (first, first, second, second, first):
        out = g(*call["args"], **call["kwargs"])
        np.testing.assert_array_equal(out, np.ones_like(call["args"][0]))
    assert f.calls == 2


def test_ir_uses_the_same_cache_entry():
    f = Counter(lambda x: (x * x).sum())
    g = jit_grad(f)
    g(X)
    text = g.ir(X, stage="grad")
    assert g.ir(X, stage="grad") == text
    assert f.calls == 1


# ------------------------------------------------------------------------------------------------
# composition: nested jit_grad, jit inside a trace, closures over outer tracers
# ------------------------------------------------------------------------------------------------
def test_second_derivative_by_nesting():
    d_sin = jit_grad(lambda x: tracejit.sin(x).sum())
    d2_sin = jit_grad(lambda x: d_sin(x).sum())
    np.testing.assert_allclose(d_sin(X), np.cos(X))
    np.testing.assert_allclose(d2_sin(X), -np.sin(X))


def test_third_derivative_by_nesting():
    d1 = jit_grad(lambda x: (x ** 4).sum())
    d2 = jit_grad(lambda x: d1(x).sum())
    d3 = jit_grad(lambda x: d2(x).sum())
    np.testing.assert_allclose(d3(X), 24 * X)


def test_nested_grad_closing_over_an_outer_tracer():
    # inner: grad_x sum(x * y * y) = y * y, with y captured from the outer trace; outer: 2 y
    def outer(y):
        inner = jit_grad(lambda x: (x * y * y).sum())
        return inner(np.ones(3)).sum()

    np.testing.assert_allclose(jit_grad(outer)(Y), 2 * Y)


def test_value_and_grad_inside_a_trace():
    vg = jit_value_and_grad(lambda x: (x ** 3).sum())

    def f(x):
        v, g = vg(x)
        return v + g.sum()

    np.testing.assert_allclose(jit_grad(f)(X), 3 * X ** 2 + 6 * X)


def test_jit_inside_a_trace_is_inlined():
    inner = Counter(lambda x: tracejit.exp(x) * 2.0)
    jitted = jit(inner)
    g = jit_grad(lambda x: jitted(x).sum())
    np.testing.assert_allclose(g(X), 2 * np.exp(X))
    np.testing.assert_allclose(jitted(X), 2 * np.exp(X))
    assert "exp" in g.ir(X, stage="forward")


# ------------------------------------------------------------------------------------------------
# eager evaluation and the numpy protocols
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fn, ref", [
    ("tanh", lambda: tracejit.tanh(X), lambda: np.tanh(X)),
    ("sum-axis", lambda: tracejit.sum(np.outer(X, Y), axis=0), lambda: np.outer(X, Y).sum(0)),
    ("maximum", lambda: tracejit.maximum(X, 0.0), lambda: np.maximum(X, 0.0)),
    ("where", lambda: tracejit.where(X > 0, X, Y), lambda: np.where(X > 0, X, Y)),
    ("matmul", lambda: tracejit.matmul(np.outer(X, Y), Y), lambda: np.outer(X, Y) @ Y),
    ("norm", lambda: tracejit.norm(X), lambda: np.linalg.norm(X)),
    ("concatenate", lambda: tracejit.concatenate([X, Y]), lambda: np.concatenate([X, Y])),
    ("relu", lambda: nn.relu(X), lambda: np.maximum(X, 0.0)),
    ("softmax", lambda: nn.softmax(X), lambda: np.exp(X) / np.exp(X).sum()),
    ("max_pool1d", lambda: nn.max_pool1d(X.reshape(1, 1, 3), 2, 1),
     lambda: np.array([[[0.5, 2.0]]])),
    ("f32-stays-f32", lambda: tracejit.exp(X.astype(np.float32)),
     lambda: np.exp(X).astype(np.float32)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_eager_evaluation_on_numpy_arrays(name, fn, ref):
    out, expected = fn(), ref()
    assert isinstance(out, np.ndarray)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("name, fn, grad", [
    ("np.tanh", lambda x: np.tanh(x).sum(), lambda x: 1 - np.tanh(x) ** 2),
    ("np.exp", lambda x: np.sum(np.exp(x)), np.exp),
    ("np.maximum", lambda x: np.maximum(x, 0.0).sum(), lambda x: (x > 0) * 1.0),
    ("np.dot", lambda x: np.dot(x, x), lambda x: 2 * x),
    ("np.matmul", lambda x: np.matmul(np.outer(Y, Y), x).sum(), lambda x: Y * Y.sum()),
    ("np.where", lambda x: np.where(x > 0, x, -x).sum(), np.sign),
    ("np.concatenate", lambda x: np.concatenate([x, x * x]).sum(), lambda x: 1 + 2 * x),
    ("np.mean", lambda x: np.mean(x * x), lambda x: 2 * x / 3),
    ("array-times-tracer", lambda x: (Y * x).sum(), lambda x: Y),
    ("array-matmul-tracer", lambda x: (np.outer(Y, Y) @ x).sum(), lambda x: Y * Y.sum()),
], ids=lambda v: v if isinstance(v, str) else "")
def test_numpy_protocols_on_tracers(name, fn, grad):
    np.testing.assert_allclose(jit_grad(fn)(X), grad(X), rtol=1e-12)


def test_tracer_metadata():
    seen = {}

    def f(x):
        seen.update(shape=x.shape, ndim=x.ndim, dtype=x.dtype, T=x.T.shape, len=len(x))
        return x.sum()

    jit_grad(f)(np.ones((2, 3), dtype=np.float32))
    assert seen == dict(shape=(2, 3), ndim=2, dtype=np.float32, T=(3, 2), len=2)


# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------
def test_float32_in_float32_out():
    x = X.astype(np.float32)
    value, g = jit_value_and_grad(lambda x: (tracejit.tanh(x * 0.5) + 1).sum())(x)
    assert value.dtype == np.float32 and g.dtype == np.float32
    np.testing.assert_allclose(g, 0.5 * (1 - np.tanh(X * 0.5) ** 2), rtol=1e-6)
    assert jit(lambda x: x * 2)(x).dtype == np.float32


def test_mixed_precision_promotes_and_grads_keep_their_dtype():
    x32 = X.astype(np.float32)
    out = jit(lambda a, b: a * b)(x32, Y)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, x32.astype(np.float64) * Y)
    g32, g64 = jit_grad(lambda a, b: (a * b).sum(), argnums=(0, 1))(x32, Y)
    assert g32.dtype == np.float32 and g64.dtype == np.float64
    np.testing.assert_allclose(g32, Y.astype(np.float32))
    np.testing.assert_allclose(g64, x32)


def test_astype():
    f = jit_value_and_grad(lambda x: (x.astype(np.float64) * 3).sum())
    value, g = f(X.astype(np.float32))
    assert value.dtype == np.float64 and g.dtype == np.float32
    np.testing.assert_allclose(g, [3, 3, 3])


# ------------------------------------------------------------------------------------------------
# IR dumps
# ------------------------------------------------------------------------------------------------
def test_ir_stages():
    # (stage="optimized" annotates the dump with codegen's kernels; tests/test_ir.py checks the
    # optimized IR through ir.optimize, so these no-LLVM tests never import codegen)
    g = jit_grad(lambda x: tracejit.tanh(x).sum())
    forward, grad = g.ir(X, stage="forward"), g.ir(X, stage="grad")
    assert forward.startswith("func @lambda(%x: f64[3]) -> (f64[])")
    assert "tanh %x" in forward and ".adj" not in forward
    assert grad.startswith("func @lambda.grad(%x: f64[3]) -> (f64[], f64[3])")
    assert "%x.adj" in grad and "adj of" in grad
    assert g.ir(X) == grad
    with pytest.raises(ValueError, match="stage must be one of"):
        g.ir(X, stage="assembly")


NO_LLVM_PROGRAM = """
import sys
import numpy as np
import tracejit
from tracejit import nn
tracejit.config.backend = "interpreter"
g = tracejit.jit_grad(lambda w, x: nn.cross_entropy(nn.relu(nn.conv2d(x, w)).sum((2, 3)),
                                                     np.array([1])))
g(np.ones((3, 1, 2, 2)), np.ones((1, 1, 4, 4)))
g.ir(np.ones((3, 1, 2, 2)), np.ones((1, 1, 4, 4)), stage="grad")
tracejit.tanh(np.ones(3))
# codegen.settings (the environment variables, standard library only) is read by tracejit.config
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] == "llvmlite" or m.startswith("tracejit.codegen")
                and m not in ("tracejit.codegen", "tracejit.codegen.settings"))
assert not loaded, loaded
"""


def test_the_interpreter_path_needs_no_llvm():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", NO_LLVM_PROGRAM], env=env, cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

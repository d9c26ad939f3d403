"""The call boundary with native code: what a call may pass, how arrays of any layout reach the
native code, and what comes back.

- argument checks name the argument path, the expected and the actual type, on the first call and
  on the fast path (positional plain arrays seen before);
- non-contiguous, Fortran-ordered, read-only, misaligned, byte-swapped, broadcast (stride 0) and
  negatively strided arrays give the results of their C-contiguous copies, and the caller's
  arrays are never written to;
- lists of Python numbers are static values, refused where an array is expected (see
  `tracejit.signature.Signature`);
- NaN and Inf propagate as in numpy; zero-size dimensions work, or raise a ShapeError at trace time.

The hostile-argument fuzz test is tests/test_fuzz_boundary.py.
"""
import warnings

import numpy as np
import pytest

import helpers
import tracejit
from tracejit import jit, jit_grad, jit_value_and_grad, nn

pytestmark = [pytest.mark.needs_llvm, pytest.mark.usefixtures("native_backend")]

RNG = helpers.rng_for("test_boundary")
X = RNG.normal(size=(5, 7))


@pytest.fixture
def native_backend():
    with helpers.use_backend("llvm"):
        yield


def loss(x):
    return (tracejit.tanh(x) * x).sum() + (x * x).mean()


def loss_grad(x):
    x = np.asarray(x, np.float64)
    t = np.tanh(x)
    return t + x * (1 - t * t) + 2 * x / x.size


# ------------------------------------------------------------------------------------------------
# layouts: every kind of array the native code cannot read as it is
# ------------------------------------------------------------------------------------------------
def misaligned(a):
    """A C-contiguous copy of `a` at an odd byte offset (not aligned to its element size)."""
    buf = bytearray(a.nbytes + 1)
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


LAYOUTS = {
    "c": lambda a: a.copy(),
    "fortran": np.asfortranarray,
    "transposed-view": lambda a: np.ascontiguousarray(a.T).T,
    "strided": lambda a: np.repeat(a, 2, axis=1)[:, ::2],
    "negative-strides": lambda a: a[::-1, ::-1].copy()[::-1, ::-1],
    "read-only": read_only,
    "misaligned": misaligned,
    "misaligned-read-only": lambda a: read_only(misaligned(a)),
    "byte-swapped": lambda a: a.astype(a.dtype.newbyteorder(">" if a.dtype.isnative else "<")),
    "broadcast": lambda a: np.broadcast_to(a[:1], a.shape) if a.shape[0] else a,
}


def _snapshot(*arrays):
    return [(a.tobytes(), a.strides, a.flags.writeable) for a in arrays]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_give_the_results_of_a_c_contiguous_copy(layout, dtype):
    a = LAYOUTS[layout](X.astype(dtype))
    expected_value = float(loss(np.ascontiguousarray(a, np.float64)))
    f = jit_value_and_grad(loss)
    for call in range(2):  # the first call traces; the second takes the fast path
        before = _snapshot(a)
        value, g = f(a)
        assert _snapshot(a) == before, f"call {call} wrote to the argument"
        assert g.dtype == np.dtype(dtype) and g.shape == a.shape and g.flags.c_contiguous
        tol = helpers.FORWARD_TOL["f64" if dtype == np.float64 else "f32"]
        helpers.assert_close(value, expected_value, tol, f"{layout}: value, call {call}")
        helpers.assert_close(g, loss_grad(a), tol, f"{layout}: gradient, call {call}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_in_pytrees_and_keywords(layout):
    a = LAYOUTS[layout](X)
    b = LAYOUTS[layout](X[:, :3] * 0.5)

    def f(params, *, scale):
        return loss(params["w"][0]) + (params["w"][1] * scale).sum()

    g = jit_grad(f)
    for _ in range(2):
        before = _snapshot(a, b)
        out = g({"w": [a, b]}, scale=b)
        assert _snapshot(a, b) == before
        np.testing.assert_allclose(out["w"][0], loss_grad(a), rtol=1e-12)
        np.testing.assert_allclose(out["w"][1], np.ascontiguousarray(b), rtol=1e-12)


def test_a_layout_change_between_calls_keeps_the_results_right():
    """The fast path is keyed by shape and dtype only: the same key sees every layout."""
    f = jit(lambda x, y: tracejit.exp(x) * y)
    y = X[:, :1].copy()
    y = np.broadcast_to(y, X.shape).copy()
    for layout in list(LAYOUTS) * 2:
        a, b = LAYOUTS[layout](X), LAYOUTS[layout](y)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_allclose(f(a, b), np.exp(a.astype(np.float64)) * b, rtol=1e-13,
                                       err_msg=layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_what_reaches_the_native_code(layout):
    """C-contiguous, aligned, native byte order; no copy when the array already is."""
    from tracejit.signature import c_contiguous
    a = LAYOUTS[layout](X.astype(np.float32))
    out = c_contiguous(a)
    assert out.flags.c_contiguous and out.flags.aligned and out.dtype.isnative
    assert out.dtype.itemsize == 4 and out.shape == a.shape
    np.testing.assert_array_equal(out, a)
    readable = a.flags.c_contiguous and a.flags.aligned and a.dtype.isnative
    assert (out is a) == readable


def test_outputs_never_share_memory_with_the_arguments():
    x = read_only(X)
    outs = [jit(lambda x: x)(x), jit(lambda x: x.reshape(-1))(x), jit(lambda x: x.T)(x),
            jit(lambda x: (x, x[1:]))(x)[1], jit_value_and_grad(lambda x: x.sum())(x)[1]]
    for out in outs:
        assert not np.shares_memory(out, x)
        assert out.flags.writeable


def test_the_same_array_passed_twice():
    x = X.copy()
    before = _snapshot(x)
    gx, gy = jit_grad(lambda a, b: (a * b).sum(), argnums=(0, 1))(x, x)
    np.testing.assert_array_equal(gx, X)
    np.testing.assert_array_equal(gy, X)
    assert _snapshot(x) == before


@pytest.mark.parametrize("shape", [(), (1,), (3, 1, 2), (1,) * 24, (2,) * 9],
                         ids=["0-d", "1", "3x1x2", "rank-24", "rank-9"])
def test_ranks(shape):
    x = RNG.normal(size=shape)
    v, g = jit_value_and_grad(loss)(x)
    np.testing.assert_allclose(g, loss_grad(x), rtol=1e-12)
    np.testing.assert_allclose(v, loss(x) if shape == () else float(loss(x)), rtol=1e-12)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_subclasses_and_array_likes():
    class ArrayLike:
        """An array of another library: only __array__."""

        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.a, dtype=dtype)

    counter = []
    f = jit_grad(lambda x: (counter.append(1), loss(x))[1])
    np.testing.assert_allclose(f(ArrayLike(X)), loss_grad(X), rtol=1e-12)
    np.testing.assert_allclose(f(ArrayLike(X + 1)), loss_grad(X + 1), rtol=1e-12)
    assert len(counter) == 1, "an array-like must be traced, not a static value"
    g = f(np.asmatrix(X))
    assert type(g) is np.ndarray
    np.testing.assert_allclose(g, loss_grad(X), rtol=1e-12)


def test_masked_arrays_are_refused():
    with pytest.raises(TypeError, match=r"argument x: a masked array .* mask would be ignored"):
        jit_grad(loss)(np.ma.array(X, mask=X > 0))


# ------------------------------------------------------------------------------------------------
# argument checks: path, expected and actual, on first calls and on the fast path
# ------------------------------------------------------------------------------------------------
# int32/int64 arrays are traced (integer data: tests/test_int_args.py)
BAD_DTYPES = [np.uint8, np.int16, np.bool_, np.complex64, np.complex128, np.float16,
              np.longdouble, object, "U3", "S2", "M8[s]", [("a", "f8"), ("b", "f8")]]


def _bad_array(dtype, shape=(5, 7)):
    return np.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).str)
def test_bad_dtypes_name_the_path_expected_and_actual(dtype):
    bad = _bad_array(dtype)

    def f(params, x):
        return loss(params["conv1"]) + loss(x)

    g = jit_grad(f, argnums=(0, 1))
    g({"conv1": X}, X)  # a signature exists; the bad call differs only in one leaf's dtype
    with pytest.raises(TypeError) as info:
        g({"conv1": bad}, X)
    msg = str(info.value)
    assert "argument params['conv1']" in msg and "float32 or float64" in msg
    assert str(np.dtype(dtype)) in msg and "[5, 7]" in msg
    with pytest.raises(TypeError, match=r"argument x: expected a float32 or float64"):
        g({"conv1": X}, bad)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).str)
def test_bad_dtypes_on_the_fast_path(dtype):
    f = jit(lambda x, y: x * y)
    f(X, X)
    f(X, X)  # the fast path now knows (f64[5,7], f64[5,7])
    with pytest.raises(TypeError, match=r"argument y: expected a float32 or float64 array"):
        f(X, _bad_array(dtype))


def test_a_leaked_tracer_as_an_argument():
    leaked = []
    jit_grad(lambda x: (leaked.append(x), x.sum())[1])(X)
    for f in (jit_grad(loss), jit(lambda x: x * 2)):
        with pytest.raises(TypeError, match=r"argument x is a traced value from a trace that has "
                                            r"ended \(a leaked tracer\)"):
            f(leaked[0])
        with pytest.raises(TypeError, match="leaked tracer"):  # inside another trace too
            jit_grad(lambda y: tracejit.sum(f(leaked[0])) * y.sum())(X)


def test_unhashable_and_self_referencing_arguments():
    with pytest.raises(TypeError, match=r"argument opts\['s'\]: a set is neither"):
        jit(lambda x, opts: x * 2)(X, {"s": {1, 2}})
    cycle = []
    cycle.append(cycle)
    with pytest.raises(TypeError, match="contain itself"):
        jit(lambda x, c: x * 2)(X, cycle)


# ------------------------------------------------------------------------------------------------
# lists of numbers are static values (the policy in Signature's docstring)
# ------------------------------------------------------------------------------------------------
def test_a_list_of_numbers_where_an_array_was_traced_is_an_error():
    f = jit(lambda x, scale: tracejit.tanh(x) * scale)
    f(np.array([0.5, 1.0]), 2.0)
    with pytest.raises(TypeError) as info:
        f([0.5, 1.0], 2.0)
    msg = str(info.value)
    assert "argument x: expected an array (an earlier call traced f64[2] here)" in msg
    assert "a list of 2 Python numbers" in msg and "np.asarray(x)" in msg
    # inside a pytree, and nested
    g = jit(lambda p: tracejit.tanh(p["w"]).sum())
    g({"w": np.ones((2, 3))})
    with pytest.raises(TypeError, match=r"argument p\['w'\]: expected an array .*f64\[2,3\].*"
                                        r"nested list of Python numbers of shape \[2, 3\]"):
        g({"w": [[1.0] * 3] * 2})


def test_a_list_of_numbers_in_a_differentiated_argument_is_an_error():
    g = jit_grad(lambda x: (x * x).sum())  # a list would fail in `x * x` with Python's message
    with pytest.raises(TypeError, match=r"argument x is differentiated \(argnums=0\) but is a "
                                        r"list of 3 Python numbers.*np\.asarray\(x\)"):
        g([1.0, 2.0, 3.0])
    h = jit_grad(lambda p, n: (p["b"] * n).sum(), argnums=(1, 0))
    with pytest.raises(TypeError, match=r"argument p\['b'\] is differentiated \(argnums=0\)"):
        h({"b": (1.0, 2.0)}, 1.0)


def test_other_static_values_in_a_differentiated_argument_name_it_before_tracing():
    for bad in (None, "abc", 2.0):
        with pytest.raises(TypeError, match="argument x is differentiated"):
            jit_grad(lambda x: (x * x).sum())(bad)


def test_lists_of_numbers_are_static_elsewhere():
    traces = []

    def f(x, shape, weights):
        traces.append(1)
        return sum(w * tracejit.sum(x.reshape(shape) ** (i + 1)) for i, w in enumerate(weights))

    g = jit_grad(f)
    np.testing.assert_allclose(g(X, (7, 5), [1.0, 0.5]), 1 + X, rtol=1e-12)
    np.testing.assert_allclose(g(X, (7, 5), [1.0, 0.5]), 1 + X, rtol=1e-12)
    np.testing.assert_allclose(g(X, [35], [2.0]), np.full_like(X, 2.0))
    assert len(traces) == 2
    # never traced as an array: a list is a static constant (numpy semantics)
    np.testing.assert_allclose(jit(lambda v: tracejit.tanh(v))([0.5, 1.0]), np.tanh([0.5, 1.0]))


# ------------------------------------------------------------------------------------------------
# pytrees with other keys, and what a gradient's function must return
# ------------------------------------------------------------------------------------------------
def test_a_dict_with_other_keys_traces_again():
    traces = []

    def f(params):
        traces.append(sorted(params))
        return sum(loss(v) for v in params.values())

    g = jit_grad(f)
    a = g({"conv1": X, "fc": X[0]})
    b = g({"conv_1": X, "fc": X[0]})
    assert list(a) == ["conv1", "fc"] and list(b) == ["conv_1", "fc"]
    np.testing.assert_allclose(b["conv_1"], loss_grad(X), rtol=1e-12)
    g({"conv1": X, "fc": X[0]})
    assert traces == [["conv1", "fc"], ["conv_1", "fc"]]
    # a missing key is the function's own KeyError, naming the key
    with pytest.raises(KeyError, match="conv1"):
        jit_grad(lambda p: loss(p["conv1"]))({"conv_1": X})


@pytest.mark.parametrize("out, pattern", [
    (lambda x: None, "returned None"),
    (lambda x: (x.sum(), x.sum()), r"returned a tuple \(to return more than the loss, pass "
                                   r"has_aux=True"),
    (lambda x: {"loss": x.sum()}, "returned a dict"),
    (lambda x: "loss", "returned a str"),
    (lambda x: x * 2, r"returned f64\[5,7\]"),
    (lambda x: x.sum(keepdims=True), r"returned f64\[1,1\]"),
], ids=["None", "tuple", "dict", "str", "array", "keepdims"])
def test_the_scalar_output_expectation(out, pattern):
    for transform in (jit_grad, jit_value_and_grad):
        with pytest.raises(TypeError, match="needs a function returning a scalar; it " + pattern):
            transform(out)(X)


def test_has_aux_with_a_non_scalar_loss():
    with pytest.raises(TypeError, match=r"returning a scalar; it returned f64\[5,7\]"):
        jit_grad(lambda x: (x * 2, {"n": x.sum()}), has_aux=True)(X)


# ------------------------------------------------------------------------------------------------
# NaN and Inf
# ------------------------------------------------------------------------------------------------
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.5, 1e5, -1e5, 1e-310, 700.0,
                    -700.0, 80.0, -80.0])

ELEMENTWISE = [
    ("tanh", tracejit.tanh, np.tanh), ("exp", tracejit.exp, np.exp),
    ("log", tracejit.log, np.log), ("sqrt", tracejit.sqrt, np.sqrt),
    ("abs", tracejit.abs, np.abs), ("sin", tracejit.sin, np.sin), ("cos", tracejit.cos, np.cos),
    ("sign", tracejit.sign, np.sign), ("square", tracejit.square, np.square),
    ("sigmoid", nn.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    ("reciprocal", lambda x: 1.0 / x, lambda x: 1.0 / x),
    ("pow-2.5", lambda x: x ** 2.5, lambda x: x ** 2.5),
    ("maximum-0", lambda x: tracejit.maximum(x, 0.0), lambda x: np.maximum(x, 0.0)),
    ("minimum-nan", lambda x: tracejit.minimum(x, np.nan), lambda x: np.minimum(x, np.nan)),
    ("clip", lambda x: tracejit.clip(x, -1.0, 1.0), lambda x: np.clip(x, -1.0, 1.0)),
    ("where", lambda x: tracejit.where(x > 0, x, -x), lambda x: np.where(x > 0, x, -x)),
    # relu is select(x <= 0, 0, x) (tracejit/nn.py): relu(NaN) = NaN, like np.maximum(x, 0)
    ("relu", nn.relu, lambda x: np.maximum(x, 0.0)),
]


def _assert_same_specials(got, expected, what):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, what
    same_class = (np.isnan(got) == np.isnan(expected)) & (np.isinf(got) == np.isinf(expected))
    assert same_class.all(), f"{what}: {got} != {expected}"
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=2e-6, atol=1e-300, err_msg=what)
    np.testing.assert_array_equal(np.sign(got[~finite]), np.sign(expected[~finite]), err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name, fn, ref", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_nan_and_inf_propagate_through_elementwise_ops(name, fn, ref, dtype):
    x = SPECIAL.astype(dtype)
    with np.errstate(all="ignore"):
        expected = ref(x).astype(dtype)
    _assert_same_specials(jit(fn)(x), expected, name)


REDUCTIONS = [
    ("sum", lambda x: x.sum(1), lambda x: x.sum(1)),
    ("mean", lambda x: x.mean(0), lambda x: x.mean(0)),
    ("max", lambda x: x.max(1), lambda x: x.max(1)),
    ("min", lambda x: x.min(0), lambda x: x.min(0)),
    ("matmul", lambda x: x @ x.T, lambda x: x @ x.T),
    ("max_pool", lambda x: nn.max_pool2d(x.reshape(1, 1, 4, 4), 2),
     lambda x: x.reshape(2, 2, 2, 2).max(axis=(1, 3)).reshape(1, 1, 2, 2)),
    ("avg_pool", lambda x: nn.avg_pool2d(x.reshape(1, 1, 4, 4), 2),
     lambda x: x.reshape(2, 2, 2, 2).mean(axis=(1, 3)).reshape(1, 1, 2, 2)),
    ("conv2d", lambda x: nn.conv2d(x.reshape(1, 1, 4, 4), np.ones((1, 1, 2, 2))),
     lambda x: np.lib.stride_tricks.sliding_window_view(x, (2, 2)).sum(axis=(2, 3))[None, None]),
]


@pytest.mark.parametrize("name, fn, ref", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
def test_nan_and_inf_propagate_through_reductions(name, fn, ref):
    for special in (np.nan, np.inf, -np.inf):
        x = np.arange(16.0).reshape(4, 4) / 7
        x[1, 2] = special
        with np.errstate(all="ignore"):
            _assert_same_specials(jit(fn)(x), ref(x), f"{name} with {special}")


def test_nan_and_minus_inf_through_softmax():
    """(+inf makes the max-shifted softmax inf - inf = NaN; implementations differ there.)"""
    x = np.arange(16.0).reshape(4, 4) / 7
    x[1, 2], x[3, 0], x[2, 1] = np.nan, -np.inf, -np.inf
    with np.errstate(all="ignore"):
        expected = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
        expected_log = np.log(expected)
    _assert_same_specials(jit(nn.softmax)(x), expected, "softmax")
    _assert_same_specials(jit(nn.log_softmax)(x), expected_log, "log_softmax")


@pytest.mark.xfail(strict=True, reason="codegen/mathfns.py: sin/cos range reduction breaks down "
                   "for |x| > ~4e15 (f64) and ~4e6 (f32): inf/NaN/garbage where numpy is exact")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_sin_cos_of_large_arguments(dtype):
    x = np.array([1e7, -3e7, 1e16, -1e30, 3e38] + ([1e300] if dtype == np.float64 else []), dtype)
    for fn, ref in ((tracejit.sin, np.sin), (tracejit.cos, np.cos)):
        np.testing.assert_allclose(jit(fn)(x), ref(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight", [
    "constant",
    pytest.param("argument", marks=pytest.mark.xfail(
        strict=True, reason="codegen/kernels/conv2d.py: with the weight a parameter, "
        "conv2d_input_grad multiplies Inf weights by zeros outside the real (output, tap) pairs: "
        "NaN where the gradient is finite (the interpreter gives it)")),
])
def test_conv2d_input_gradient_with_an_inf_weight(weight):
    """Only real (output, tap) pairs contribute: no 0 * Inf from the padding or the stride gaps."""
    cases = [  # x shape, w row, stride, padding, expected gradient of x[0, 0]
        # x[0, 0, 0, 0] meets the taps 1 and 2 only; row 1 of x meets no output (stride 2)
        ((1, 1, 2, 4), [1.0, np.inf, 2.0], 2, 2, [[3.0, np.inf, 3.0, np.inf], [0.0] * 4]),
        ((1, 1, 2, 3), [2.0, -np.inf, 3.0], 1, 0, [[2.0, -np.inf, 3.0]] * 2),
    ]
    for shape, row, stride, padding, expected in cases:
        x, w = np.ones(shape), np.array(row).reshape(1, 1, 1, 3)
        if weight == "constant":
            gx = jit_grad(lambda x: nn.conv2d(x, w, stride=stride, padding=padding).sum())(x)
        else:
            gx, _ = jit_grad(lambda x, w: nn.conv2d(x, w, stride=stride, padding=padding).sum(),
                             argnums=(0, 1))(x, w)
        np.testing.assert_array_equal(gx[0, 0], expected)


def test_sum_of_products_with_zero_times_inf():
    """Reductions may reassociate, but LLVM must not factor sum_i x[i,j] * y[j] into
    (sum_i x[i,j]) * y[j], which would drop 0 * Inf = NaN (codegen/loops.py REDUCE has no nsz)."""
    x = np.zeros((5, 7))
    x[4, 6] = 1.0
    y = np.zeros(7)
    y[6] = -np.inf
    with np.errstate(invalid="ignore"):
        expected = np.sum(x * y)   # NaN: 0 * -inf in column 6
    _assert_same_specials(jit(lambda x, y: tracejit.sum(x * y))(x, y), expected, "sum(x * y)")


def test_division_by_a_subnormal_constant():
    """No `arcp`: x / c must not become x * (1 / c), which overflows for a subnormal c."""
    a = np.full(8, 1e-300)
    np.testing.assert_allclose(jit(lambda a: a / 1e-310)(a), a / 1e-310, rtol=1e-15)


def test_logsumexp_of_infinities():
    for x in ([np.inf, 1.0, 2.0], [-np.inf, -np.inf], [np.nan, 1.0], [np.inf, -np.inf]):
        x = np.array(x)
        with np.errstate(all="ignore"):
            expected = np.log(np.sum(np.exp(x)))
        _assert_same_specials(jit(tracejit.logsumexp)(x), expected, f"logsumexp {x}")


def test_nan_in_a_gradient():
    g = jit_grad(lambda x: (x * x).sum())(np.array([np.nan, 1.0, np.inf]))
    _assert_same_specials(g, [np.nan, 2.0, np.inf], "gradient")


# ------------------------------------------------------------------------------------------------
# zero-size dimensions
# ------------------------------------------------------------------------------------------------
ZERO_SIZE = [
    ("elementwise", lambda x, y: tracejit.tanh(x) * 2 + 1, (0, 3), (3,)),
    ("broadcast", lambda x, y: x * y, (0, 1), (1, 4)),
    ("sum-all", lambda x, y: x.sum() + y.sum(), (0, 3), (3, 0)),
    ("sum-empty-axis", lambda x, y: x.sum(0) * y, (0, 3), (3,)),
    ("sum-other-axis", lambda x, y: x.sum(1), (0, 3), (3,)),
    ("mean-empty-axis", lambda x, y: x.mean(0), (0, 3), (3,)),
    ("max-other-axis", lambda x, y: x.max(1), (0, 3), (3,)),
    ("matmul-k0", lambda x, y: x @ y, (3, 0), (0, 4)),
    ("matmul-m0", lambda x, y: x @ y, (0, 3), (3, 4)),
    ("matmul-n0", lambda x, y: x @ y, (4, 3), (3, 0)),
    ("dot-0", lambda x, y: tracejit.dot(x, y), (0,), (0,)),
    ("reshape-transpose", lambda x, y: x.reshape(3, 0).T * 2, (0, 3), (3,)),
    ("concatenate", lambda x, y: tracejit.concatenate([x, y[None]]), (0, 3), (3,)),
    ("empty-slice", lambda x, y: y[2:2] * 3, (0, 3), (3,)),
    ("linear-empty-batch", lambda x, y: nn.linear(x, y[None]), (0, 3), (3,)),
    ("softmax-rows", lambda x, y: nn.softmax(x), (0, 3), (3,)),
]


@pytest.mark.parametrize("name, fn, sx, sy", ZERO_SIZE, ids=[z[0] for z in ZERO_SIZE])
def test_zero_size_dimensions_work(name, fn, sx, sy):
    x, y = RNG.normal(size=sx), RNG.normal(size=sy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = jit(fn)(x, y)
        with helpers.use_backend("interpreter"):
            expected = jit(fn)(x, y)
        gx, gy = jit_grad(lambda x, y: (fn(x, y) * 1.5).sum(), argnums=(0, 1))(x, y)
        with helpers.use_backend("interpreter"):
            ex, ey = jit_grad(lambda x, y: (fn(x, y) * 1.5).sum(), argnums=(0, 1))(x, y)
    np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(gx, ex, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(gy, ey, rtol=1e-12, err_msg=name)
    assert gx.shape == sx and gy.shape == sy


@pytest.mark.parametrize("name, fn, shapes", [
    ("max-empty-axis", lambda x: x.max(0), [(0, 3)]),
    ("logsumexp-empty-axis", lambda x: tracejit.logsumexp(x, 0), [(0, 3)]),
    ("conv2d-empty-batch", lambda x, w: nn.conv2d(x, w), [(0, 2, 5, 5), (3, 2, 3, 3)]),
    ("conv2d-no-channels", lambda x, w: nn.conv2d(x, w), [(1, 0, 5, 5), (3, 0, 3, 3)]),
    ("conv2d-no-filters", lambda x, w: nn.conv2d(x, w), [(1, 2, 5, 5), (0, 2, 3, 3)]),
    ("conv1d-empty-batch", lambda x, w: nn.conv1d(x, w), [(0, 2, 5), (3, 2, 3)]),
    ("max_pool2d-empty-batch", lambda x: nn.max_pool2d(x, 2), [(0, 2, 4, 4)]),
    ("avg_pool2d-no-channels", lambda x: nn.avg_pool2d(x, 2), [(1, 0, 4, 4)]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_zero_size_dimensions_raise_at_trace_time(name, fn, shapes):
    args = [np.zeros(s) for s in shapes]
    for transform in (jit, jit_grad):
        with pytest.raises(tracejit.ShapeError, match=r"empty axis|zero-size operand"):
            transform(lambda *a: fn(*a).sum())(*args)


def test_a_list_of_traced_values_as_an_operand():
    """numpy would stack it; tracejit says how (np.asarray on the tracers blamed control flow)."""
    for fn in (lambda x: tracejit.tanh([x, x]), lambda x: x * [x, 1.0],
               lambda x: tracejit.sum([[x], [x]])):
        with pytest.raises(TypeError, match="list of traced values.*tracejit.stack"):
            jit_grad(lambda x: tracejit.sum(fn(x)))(X)


def test_relu_propagates_nan():
    """relu(NaN) = NaN like numpy's maximum(x, 0) and PyTorch; the gradient passes through."""
    x = np.array([np.nan, -1.0, 0.0, 2.0])
    np.testing.assert_array_equal(jit(nn.relu)(x), [np.nan, 0.0, 0.0, 2.0])
    g = jit_grad(lambda x: (nn.relu(x) * np.array([1.0, 2.0, 3.0, 4.0])).sum())(x)
    np.testing.assert_array_equal(g, [1.0, 0.0, 0.0, 4.0])


def test_norm_gradient_at_zero_is_zero():
    """A subgradient (PyTorch's choice), not 0/0 = NaN; second derivatives stay finite too."""
    z = np.zeros(3)
    np.testing.assert_array_equal(jit_grad(lambda x: x.norm())(z), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(jit(lambda x: x.norm())(z), 0.0)
    hvp = jit_grad(lambda x: jit_grad(lambda y: y.norm())(x).sum())(z)
    assert np.isfinite(hvp).all()

"""codegen.mathfns against numpy: ulp error over large random samples spanning each function's
range, exact special values, vectorization of the loops that use them, and the vector-typed API.

Needs LLVM. References are numpy evaluated in higher precision (float64 for float32 results,
np.longdouble for float64 results) and rounded, so the ulp figures measure mathfns, not numpy.
`python tests/test_mathfns.py` prints the error table and a throughput comparison with numpy.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import time

import llvmlite.ir as ir
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tracejit.codegen import loops as L  # noqa: E402
from tracejit.codegen.mathfns import UNARY, emit_unary  # noqa: E402
from tracejit.codegen.target import JITModule, cfunc, host_info  # noqa: E402

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

DTYPES = {"f32": (np.float32, L.F32), "f64": (np.float64, L.F64)}
VEC_BITS = 512 if host_info()["avx512"] else 256
N = 1 << 20

# max ulp error allowed, and for sin/cos the absolute error allowed near their zeros away from 0:
# within NEAR_PI_2 of a nonzero multiple of pi/2 (where the reduced argument x - k pi/2 carries the
# absolute rounding error of k pi/2; around 0 there is no reduction, and the ulp bound holds)
ULP_BOUND = 4
ABS_NEAR_ZERO = {"f32": 1e-7, "f64": 1e-16}
NEAR_PI_2 = 1e-2


# ------------------------------------------------------------------------------------------------
# kernels: y[i] = f(x[i]) as a scalar loop (left to the loop vectorizer), and the same through the
# vector-typed API (explicit <W x T> loads and stores; n must be a multiple of W)
# ------------------------------------------------------------------------------------------------
def _scalar_kernel(mod, fname, ty, kname):
    fn = ir.Function(mod, ir.FunctionType(L.VOID, [L.PTR, L.PTR, L.I64]), kname)
    x, y, n = fn.args
    x.add_attribute("noalias")
    y.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with L.for_range(b, 0, n, name=kname) as i:
        L.store(b, emit_unary(b, fname, L.load(b, x, i, ty)), y, i, ty)
    b.ret_void()


def _vector_kernel(mod, fname, ty, kname):
    width = VEC_BITS // (64 if ty == L.F64 else 32)
    vty = ir.VectorType(ty, width)
    fn = ir.Function(mod, ir.FunctionType(L.VOID, [L.PTR, L.PTR, L.I64]), kname)
    x, y, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with L.for_range(b, 0, n, width, name=kname) as i:
        L.vstore(b, emit_unary(b, fname, L.vload(b, x, i, vty)), y, i)
    b.ret_void()


@functools.lru_cache(maxsize=None)
def _compiled():
    """One module with every kernel (one compile keeps the test fast)."""
    mod = ir.Module("test_mathfns")
    names = []
    for fname in UNARY:
        for tag, (_, ty) in DTYPES.items():
            _scalar_kernel(mod, fname, ty, f"k_{fname}_{tag}")
            _vector_kernel(mod, fname, ty, f"kv_{fname}_{tag}")
            names += [f"k_{fname}_{tag}", f"kv_{fname}_{tag}"]
    return JITModule(str(mod), names)


def run(fname, x, vector_api=False):
    jm = _compiled()
    tag = "f32" if x.dtype == np.float32 else "f64"
    kname = f"{'kv' if vector_api else 'k'}_{fname}_{tag}"
    f = cfunc(jm.addresses[kname], [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64])
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    if vector_api:
        assert len(x) % (VEC_BITS // (8 * x.itemsize)) == 0
    f(x.ctypes.data, y.ctypes.data, len(x))
    return y


# ------------------------------------------------------------------------------------------------
# references and error measures
# ------------------------------------------------------------------------------------------------
def _logistic_ref(x):
    return 1 / (1 + np.exp(-x))


REF = {"exp": np.exp, "log": np.log, "tanh": np.tanh, "sin": np.sin, "cos": np.cos,
       "logistic": _logistic_ref, "sqrt": np.sqrt, "atan": np.arctan}


def reference(fname, x):
    """numpy in higher precision, rounded to x.dtype (sqrt: numpy's, correctly rounded)."""
    wide = np.float64 if x.dtype == np.float32 else np.longdouble
    if fname == "sqrt":
        wide = x.dtype
    with np.errstate(all="ignore"):
        return REF[fname](x.astype(wide)).astype(x.dtype)


def ulp_distance(a, b):
    """Number of representable values between a and b (int64; +0 and -0 are the same point;
    two nans are 0 apart, a nan and a number are 2**62 apart)."""
    itype = np.int32 if a.dtype == np.float32 else np.int64
    mask = np.iinfo(itype).max

    def ordered(v):
        i = v.view(itype).astype(np.int64)
        return np.where(i < 0, -(i & mask), i)

    with np.errstate(over="ignore"):
        d = np.abs(ordered(a) - ordered(b))
    na, nb = np.isnan(a), np.isnan(b)
    d = np.where(na & nb, 0, d)
    return np.where(na != nb, 1 << 62, d)


def _loguniform(rng, lo, hi, n, dtype):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(dtype)


def _random_positive_bits(rng, n, dtype):
    """Uniform over the bit patterns of positive finite numbers: every binade equally, subnormals
    included."""
    if dtype == np.float32:
        return rng.integers(1, 0x7F800000, n, dtype=np.int32).view(np.float32)
    return rng.integers(1, 0x7FF0000000000000, n, dtype=np.int64).view(np.float64)


def samples(fname, dtype, n=N, seed=0):
    """Random inputs over the whole useful range of `fname` in `dtype`."""
    rng = np.random.default_rng(seed)
    f64 = dtype == np.float64
    sign = rng.choice([-1.0, 1.0], n)
    k = n // 4
    if fname == "exp":
        lim = (-760, 720) if f64 else (-110, 95)
        parts = [rng.uniform(*lim, 2 * k), rng.uniform(-2, 2, k),
                 sign[:k] * _loguniform(rng, 1e-30, 1, k, np.float64)]
    elif fname == "log" or fname == "sqrt":
        parts = [_random_positive_bits(rng, 2 * k, dtype), rng.uniform(0.5, 2, k),
                 1 + sign[:k] * _loguniform(rng, 1e-15 if f64 else 1e-7, 1e-1, k, np.float64)]
    elif fname == "tanh":
        parts = [sign[:2 * k] * _loguniform(rng, 1e-30, 40, 2 * k, np.float64),
                 rng.uniform(-3, 3, 2 * k)]
    elif fname == "logistic":
        lim = 800 if f64 else 120
        parts = [rng.uniform(-lim, lim, 2 * k), rng.uniform(-5, 5, k),
                 sign[:k] * _loguniform(rng, 1e-30, lim, k, np.float64)]
    elif fname == "atan":   # every binade (subnormals to the largest), and around the reductions
        parts = [sign[:2 * k] * _random_positive_bits(rng, 2 * k, dtype), rng.uniform(-3, 3, 2 * k)]
    else:  # sin, cos
        lim = 1e6 if f64 else 1e4
        parts = [rng.uniform(-lim, lim, 2 * k), rng.uniform(-10, 10, k),
                 sign[:k] * _loguniform(rng, 1e-30, lim, k, np.float64)]
    x = np.concatenate([np.asarray(p, dtype=dtype) for p in parts])
    return x[:n]


def near_nonzero_multiple_of_pi_2(x):
    """Where x lies within NEAR_PI_2 of k pi/2 for an integer k != 0 (computed in long double)."""
    wide = x.astype(np.longdouble)
    half_pi = np.longdouble(np.pi) / 2   # a few ulp off pi/2 in long double: far below NEAR_PI_2
    k = np.round(wide / half_pi)
    return (k != 0) & (np.abs(wide - k * half_pi) <= NEAR_PI_2)


def accepted(fname, x, y, ref):
    """Per sample: within ULP_BOUND ulp of the reference, or (sin/cos only) within the absolute
    allowance close to a nonzero multiple of pi/2."""
    ok = ulp_distance(y, ref) <= ULP_BOUND
    if fname in ("sin", "cos"):
        tag = "f32" if x.dtype == np.float32 else "f64"
        abs_ok = np.abs(y.astype(np.float64) - ref) <= ABS_NEAR_ZERO[tag]
        ok |= abs_ok & near_nonzero_multiple_of_pi_2(x)
    return ok


def errors(fname, x):
    """(max ulp error, max ulp error over the samples `accepted` does not excuse by the absolute
    allowance)."""
    y = run(fname, x)
    ref = reference(fname, x)
    d = ulp_distance(y, ref)
    excused = accepted(fname, x, y, ref) & (d > ULP_BOUND)
    return int(d.max()), int(np.where(excused, 0, d).max())


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", DTYPES)
@pytest.mark.parametrize("fname", UNARY)
def test_ulp_error_random(fname, tag):
    x = samples(fname, DTYPES[tag][0])
    worst, worst_beyond_abs = errors(fname, x)
    assert worst_beyond_abs <= ULP_BOUND, (fname, tag, worst)
    if fname not in ("sin", "cos"):
        assert worst <= ULP_BOUND


@pytest.mark.parametrize("tag", DTYPES)
@pytest.mark.parametrize("fname", ["sin", "cos"])
def test_sincos_near_multiples_of_pi_over_2(fname, tag):
    """Close to the zeros the error is absolute (Cody-Waite without extra precision in r)."""
    dtype = DTYPES[tag][0]
    k = np.arange(-5000 if tag == "f32" else -600000, 5000 if tag == "f32" else 600000, 7)
    x = (k * (np.pi / 2)).astype(dtype)
    x = np.concatenate([x, np.nextafter(x, dtype(np.inf)), np.nextafter(x, dtype(-np.inf))])
    ok = accepted(fname, x, run(fname, x), reference(fname, x))
    assert ok.all(), x[~ok][:5]


@pytest.mark.parametrize("tag", DTYPES)
def test_the_sincos_check_rejects_a_sin_flushed_near_zero(tag, monkeypatch):
    """The absolute allowance must not excuse a wrong result where the ulp bound is the right
    measure: a sin that returns 0 for |x| < 1e-7 fails; near pi/2 the allowance still holds."""
    dtype = DTYPES[tag][0]
    x = samples("sin", dtype, 1 << 14, seed=7)
    assert (np.abs(x) < 1e-7).sum() > 100

    def flushed_sin(fname, x, vector_api=False):
        y = reference(fname, x)
        return np.where(np.abs(x) < 1e-7, dtype(0), y).astype(dtype)
    monkeypatch.setattr(sys.modules[__name__], "run", flushed_sin)
    assert errors("sin", x)[1] > ULP_BOUND
    x1 = np.full(4, np.pi / 2, dtype)
    ref1 = reference("cos", x1)
    assert accepted("cos", x1, ref1 + dtype(ABS_NEAR_ZERO[tag] * 0.5), ref1).all()


SPECIAL = {
    "exp": [(0.0, 1.0), (-0.0, 1.0), (np.inf, np.inf), (-np.inf, 0.0), (np.nan, np.nan),
            (1000.0, np.inf), (-1000.0, 0.0), (1.0, np.e)],
    "log": [(0.0, -np.inf), (-0.0, -np.inf), (-1.0, np.nan), (-np.inf, np.nan), (np.inf, np.inf),
            (np.nan, np.nan), (1.0, 0.0), (-1e-30, np.nan)],
    "tanh": [(0.0, 0.0), (-0.0, -0.0), (np.inf, 1.0), (-np.inf, -1.0), (np.nan, np.nan),
             (30.0, 1.0), (-30.0, -1.0), (1000.0, 1.0), (-1000.0, -1.0)],
    "logistic": [(0.0, 0.5), (np.inf, 1.0), (-np.inf, 0.0), (np.nan, np.nan), (1000.0, 1.0),
                 (-1000.0, 0.0)],
    "sin": [(0.0, 0.0), (-0.0, -0.0), (np.inf, np.nan), (-np.inf, np.nan), (np.nan, np.nan)],
    "cos": [(0.0, 1.0), (-0.0, 1.0), (np.inf, np.nan), (-np.inf, np.nan), (np.nan, np.nan)],
    "sqrt": [(0.0, 0.0), (-0.0, -0.0), (-1.0, np.nan), (np.inf, np.inf), (np.nan, np.nan),
             (4.0, 2.0)],
    "atan": [(0.0, 0.0), (-0.0, -0.0), (np.inf, np.pi / 2), (-np.inf, -np.pi / 2),
             (np.nan, np.nan), (1.0, np.pi / 4), (-1e-30, -1e-30)],
}


@pytest.mark.parametrize("tag", DTYPES)
@pytest.mark.parametrize("fname", UNARY)
def test_special_values(fname, tag):
    dtype = DTYPES[tag][0]
    x = np.array([p for p, _ in SPECIAL[fname]], dtype=dtype)
    want = np.array([v for _, v in SPECIAL[fname]], dtype=dtype)
    got = run(fname, x)
    same = (got == want) & (np.signbit(got) == np.signbit(want)) | np.isnan(got) & np.isnan(want)
    close = ulp_distance(got, want) <= 1  # e.g. exp(1) vs np.e rounded
    assert (same | close & np.isfinite(want) & (want != 0)).all(), list(zip(x, got, want))


@pytest.mark.parametrize("tag", DTYPES)
def test_extreme_ranges(tag):
    dtype = DTYPES[tag][0]
    fi = np.finfo(dtype)
    tiny_sub = fi.smallest_subnormal
    # log of subnormals and of the extremes
    x = np.array([tiny_sub, 2 * tiny_sub, 3 * tiny_sub, fi.smallest_normal / 3,
                  fi.smallest_normal, fi.max, fi.eps, 1 - fi.epsneg, 1 + fi.eps], dtype=dtype)
    assert ulp_distance(run("log", x), reference("log", x)).max() <= ULP_BOUND
    # exp around the overflow and underflow thresholds (subnormal results)
    lo, hi = np.log(fi.smallest_subnormal), np.log(fi.max)
    x = np.concatenate([np.linspace(hi - 1, hi + 1, 4001), np.linspace(lo - 2, lo + 40, 4001),
                        [hi, np.nextafter(hi, np.inf)]]).astype(dtype)
    y, ref = run("exp", x), reference("exp", x)
    assert ulp_distance(y, ref).max() <= ULP_BOUND
    assert np.isinf(y[x > hi * (1 + 4 * fi.eps)]).all()
    # tanh near 0: relative accuracy, odd
    x = np.concatenate([_loguniform(np.random.default_rng(1), tiny_sub, 1e-2, 4096, np.float64),
                        [tiny_sub, fi.smallest_normal]]).astype(dtype)
    assert ulp_distance(run("tanh", x), reference("tanh", x)).max() <= ULP_BOUND
    assert (run("tanh", -x) == -run("tanh", x)).all()


@pytest.mark.parametrize("tag", DTYPES)
def test_logistic_matches_numpy_formula(tag):
    """Against numpy's `1/(1+np.exp(-x))` in the same precision: equal within a few ulp where that
    is representable; where numpy's exp(-x) overflows (f32, x < -88.7) numpy gives 0 and we give
    the tiny true value. Never nan for finite x."""
    dtype = DTYPES[tag][0]
    x = samples("logistic", dtype, 1 << 16, seed=3)
    x = np.concatenate([x, np.array([-100, -88, -87, -50, 50, 100], dtype)])
    y = run("logistic", x)
    with np.errstate(over="ignore"):
        naive = (1 / (1 + np.exp(-x))).astype(dtype)
    assert not np.isnan(y).any()
    assert ((y >= 0) & (y <= 1)).all()
    tol = 4 * np.finfo(dtype).eps
    assert np.allclose(y, naive, rtol=tol, atol=np.finfo(dtype).smallest_normal)
    assert y[x == -100][0] > 0 and np.isclose(y[x == -100][0], 3.720076e-44, rtol=0.05)


@pytest.mark.parametrize("tag", DTYPES)
@pytest.mark.parametrize("fname", UNARY)
def test_vector_api_matches_scalar(fname, tag):
    x = samples(fname, DTYPES[tag][0], 1 << 14, seed=5)
    assert (ulp_distance(run(fname, x, vector_api=True), run(fname, x)) == 0).all()


def _asm_of(name):
    asm = _compiled().asm
    start = asm.index(f"{name}:")
    return asm[start:asm.index(".Lfunc_end", start)]


@pytest.mark.parametrize("fname", ["exp", "log", "tanh", "logistic", "sin", "cos", "atan"])
def test_scalar_loop_vectorizes(fname):
    body = _asm_of(f"k_{fname}_f32")
    reg = "zmm" if VEC_BITS == 512 else "ymm"
    assert reg in body
    assert "call" not in body  # no libm
    assert any("vfmadd" in line and reg in line for line in body.splitlines())


def test_each_function_is_emitted_once_per_module_and_type():
    mod = ir.Module("once")
    fn = ir.Function(mod, ir.FunctionType(L.F32, [L.F32]), "f")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    v = emit_unary(b, "exp", emit_unary(b, "exp", fn.args[0]))
    v = emit_unary(b, "logistic", v)
    b.ret(v)
    text = str(mod)
    assert text.count('define internal float @"tracejit.exp.f32"') == 1
    assert text.count('define internal float @"tracejit.logistic.f32"') == 1
    assert "alwaysinline" in text


def test_unknown_function_and_type_errors():
    mod = ir.Module("errors")
    fn = ir.Function(mod, ir.FunctionType(L.VOID, [L.F32, L.I32]), "f")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with pytest.raises(NotImplementedError, match="erf"):
        emit_unary(b, "erf", fn.args[0])
    with pytest.raises(TypeError, match="i32"):
        emit_unary(b, "exp", fn.args[1])


# ------------------------------------------------------------------------------------------------
# report: `python tests/test_mathfns.py`
# ------------------------------------------------------------------------------------------------
def _report():
    print(f"{'fn':9} {'dtype':5} {'max ulp':>8} {'max ulp beyond abs tol':>24}")
    for fname in UNARY:
        for tag, (dtype, _) in DTYPES.items():
            worst, beyond = errors(fname, samples(fname, dtype, 1 << 22, seed=11))
            print(f"{fname:9} {tag:5} {worst:8d} {beyond:24d}")
    x = np.random.default_rng(0).uniform(-80, 80, 1 << 20).astype(np.float32)
    y = np.empty_like(x)
    jm = _compiled()
    for fname, npf in [("exp", np.exp), ("log", np.log), ("tanh", np.tanh), ("sin", np.sin),
                       ("logistic", None)]:
        xi = np.abs(x) + 1e-3 if fname == "log" else x
        k = cfunc(jm.addresses[f"k_{fname}_f32"], [ctypes.c_void_p] * 2 + [ctypes.c_int64])
        ours = _best(lambda: k(xi.ctypes.data, y.ctypes.data, len(xi)))
        if npf is None:
            theirs = _best(lambda: np.divide(1, 1 + np.exp(-xi)))
        else:
            theirs = _best(lambda: npf(xi, out=y))
        print(f"{fname:9} f32 1M: tracejit {len(x) / ours * 1e-9:6.2f} elem/ns, "
              f"numpy {len(x) / theirs * 1e-9:6.2f} elem/ns")


def _best(fn, reps=50):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    _report()

"""Checking logic shared by the no-LLVM tests and the native-code tests.

Every `check_*` function takes the backend name ("interpreter" or "llvm") and sets
`tracejit.config.backend` while it runs, so a native test module can run the same op table
(`optable.CASES`) and corpus (`corpus.PROGRAMS`) with `backend="llvm"`:

    @pytest.mark.parametrize("case", optable.GRAD_CASES, ids=optable.case_id)
    def test_grad_native(case):
        helpers.check_grad(case, "llvm", "f64")

Oracles, never the system under test:
- forward values: the independent numpy references written in `optable` (not the IR interpreter);
- gradients: float64 central finite differences of those references;
- the inner-product test <ct, J t> = <J^T ct, t>: J t by central differences of the compiled
  forward function, J^T ct from the compiled gradient;
- second derivatives: the gradient of <grad f(x), r> (a Hessian-vector product, by nested
  `jit_grad`) against central differences of the compiled first-order gradient along r.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import zlib

import numpy as np

import corpus
import tracejit

NP_DTYPES = {"f64": np.float64, "f32": np.float32}

# Tolerances: (rtol, atol relative to the largest magnitude of the expected values, at least 1).
FORWARD_TOL = {"f64": (1e-9, 1e-11), "f32": (2e-5, 2e-5)}
GRAD_TOL = {"f64": (1e-6, 1e-7), "f32": (1e-4, 1e-4)}
HVP_TOL = (1e-5, 1e-6)
FD_EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# basics
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def use_backend(backend: str):
    """Run the block with `tracejit.config.backend = backend` (restored afterwards)."""
    if backend not in ("interpreter", "llvm"):
        raise ValueError(f"unknown backend {backend!r}")
    old = tracejit.config.backend
    tracejit.config.backend = backend
    try:
        yield
    finally:
        tracejit.config.backend = old


def rng_for(*keys) -> np.random.Generator:
    """A generator seeded by the given strings, so every test draws the same numbers every run."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, keys)).encode()))


def assert_close(actual, expected, tol, what=""):
    """allclose with `atol` scaled by the magnitude of `expected`; reports the worst element."""
    rtol, atol = tol
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=atol * scale,
                               err_msg=what)


NATIVE_TOL = {"f64": (1e-9, 1e-10), "f32": (1e-4, 1e-5)}   # native code against the interpreter


def check_native_matches_interpreter(fn, args, what, argnums=None, threads=(1,), tol=NATIVE_TOL):
    """`tracejit.jit(fn)` (argnums None) or `tracejit.jit_grad(fn, argnums)`, compiled afresh for
    each thread count (a Jitted object keeps the code of its first compile, whatever the target
    or thread count later), against the reference interpreter: every output leaf within `tol`
    of its dtype."""
    def make():
        return tracejit.jit(fn) if argnums is None else tracejit.jit_grad(fn, argnums=argnums)

    with use_backend("interpreter"):
        want = tree_leaves(make()(*args))
    assert want, f"{what}: no array outputs"
    old = tracejit.get_num_threads()
    try:
        with use_backend("llvm"):
            for nt in threads:
                tracejit.set_num_threads(nt)
                got = tree_leaves(make()(*args))
                assert len(got) == len(want), f"{what}: {len(got)} outputs, not {len(want)}"
                for i, (g, w) in enumerate(zip(got, want)):
                    assert g.dtype == w.dtype, f"{what}: output {i} is {g.dtype}, not {w.dtype}"
                    dt = "f32" if w.dtype == np.float32 else "f64"
                    assert_close(g, w, tol[dt], f"{what} threads={nt} output {i}")
    finally:
        tracejit.set_num_threads(old)


# ------------------------------------------------------------------------------------------------
# pytrees of numpy arrays (the corpus passes dicts and lists of parameters)
# ------------------------------------------------------------------------------------------------
def tree_leaves(tree) -> list:
    """The array (or tracer) leaves of a nest of dicts, lists and tuples; static values such as
    ints are not leaves."""
    if isinstance(tree, dict):
        return [leaf for k in tree for leaf in tree_leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for t in tree for leaf in tree_leaves(t)]
    return [tree] if isinstance(tree, (np.ndarray, tracejit.Tracer)) else []


def tree_map(fn, tree, *rest):
    """`fn` applied to the array leaves (static values are kept)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, tree[k], *[r[k] for r in rest]) for k in tree}
    if isinstance(tree, (list, tuple)):
        out = [tree_map(fn, t, *[r[i] for r in rest]) for i, t in enumerate(tree)]
        return out if isinstance(tree, list) else tuple(out)
    return fn(tree, *rest) if isinstance(tree, np.ndarray) else tree


def tree_astype(tree, dtype):
    return tree_map(lambda x: np.asarray(x, dtype=NP_DTYPES.get(dtype, dtype)), tree)


# ------------------------------------------------------------------------------------------------
# finite differences (float64)
# ------------------------------------------------------------------------------------------------
def numeric_grad(f, args, argnums, eps=FD_EPS, max_coords=None, rng=None):
    """Central differences of the scalar `f(*args)` w.r.t. every array leaf of `args[i]`,
    i in `argnums`. Returns {(argnum, leaf_index): (flat_indices, derivatives)}.

    With `max_coords`, only that many randomly chosen elements per leaf are perturbed."""
    args = [tree_map(lambda x: np.array(x, dtype=np.float64), a) for a in args]
    out = {}
    for i in argnums:
        for j, leaf in enumerate(tree_leaves(args[i])):
            flat = leaf.reshape(-1)  # a view: writing it perturbs the argument in place
            idx = np.arange(flat.size)
            if max_coords is not None and flat.size > max_coords:
                idx = np.sort(rng.choice(flat.size, max_coords, replace=False))
            ders = np.empty(idx.size)
            for n, k in enumerate(idx):
                old = flat[k]
                flat[k] = old + eps
                plus = float(f(*args))
                flat[k] = old - eps
                minus = float(f(*args))
                flat[k] = old
                ders[n] = (plus - minus) / (2 * eps)
            out[i, j] = (idx, ders)
    return out


def numeric_jvp(f, args, tangents, eps=FD_EPS):
    """(f(args + eps t) - f(args - eps t)) / 2 eps for array-valued `f` of array arguments."""
    # np.asarray: a 0-d array plus a number is a numpy scalar, which tracejit treats as static
    plus = f(*[np.asarray(a + eps * t) for a, t in zip(args, tangents)])
    minus = f(*[np.asarray(a - eps * t) for a, t in zip(args, tangents)])
    if isinstance(plus, (tuple, list)):
        return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
    return (np.asarray(plus, np.float64) - np.asarray(minus, np.float64)) / (2 * eps)


def assert_grads_match_fd(grads, fd, dtype, what):
    """`grads[i]` (a pytree per differentiated argument) against `numeric_grad` output."""
    for (i, j), (idx, ders) in fd.items():
        leaf = tree_leaves(grads[i])[j]
        assert leaf.dtype == NP_DTYPES[dtype], f"{what}: gradient {i}.{j} has dtype {leaf.dtype}"
        assert_close(leaf.reshape(-1)[idx], ders, GRAD_TOL[dtype], f"{what}: gradient {i}.{j}")


# ------------------------------------------------------------------------------------------------
# the op table (see optable.OpCase)
# ------------------------------------------------------------------------------------------------
def case_inputs(case, dtype="f64") -> list[np.ndarray]:
    """The case's array arguments, the same numbers every run (float64 rounded to `dtype`)."""
    return [x.astype(NP_DTYPES[dtype]) for x in case.make_inputs(rng_for(case.id))]


def case_cotangent(case) -> np.ndarray:
    shape = np.shape(case.ref(*case_inputs(case)))
    return rng_for(case.id, "ct").normal(size=shape)


def _directions(case, key):
    rng = rng_for(case.id, key)
    return [rng.normal(size=x.shape) for x in case_inputs(case)]


@functools.lru_cache(maxsize=None)
def case_functions(case):
    """The compiled functions of one case, built once (each keeps its own compile cache):
    forward; grad, the gradient of <f(x), ct> w.r.t. every input; grad2, the gradient of
    <f(x), ct> + |f(x)|^2 / 2; and hvp, the gradient of <grad2, r>.

    The square term makes the cotangent reaching f depend on x, so the second derivative runs
    the adjoint of every adjoint rule even for piecewise-linear ops (relu, max pooling), whose
    own second derivative is zero."""
    ct = case_cotangent(case)
    rs = _directions(case, "r")
    argnums = tuple(range(len(case.inputs)))

    def loss(*xs):
        return (case.fn(*xs) * ct).sum()

    def loss2(*xs):
        y = case.fn(*xs)
        return (y * ct).sum() + (y * y).sum() * 0.5

    grad2 = tracejit.jit_grad(loss2, argnums=argnums)

    def grad2_dot_r(*xs):
        return sum((g * r).sum() for g, r in zip(grad2(*xs), rs))

    return dict(forward=tracejit.jit(case.fn), grad=tracejit.jit_grad(loss, argnums=argnums),
                grad2=grad2, hvp=tracejit.jit_grad(grad2_dot_r, argnums=argnums), ct=ct, rs=rs)


def check_forward(case, backend, dtype):
    """The compiled forward function against the numpy reference; the output keeps the dtype."""
    xs = case_inputs(case, dtype)
    expected = np.asarray(case.ref(*[x.astype(np.float64) for x in xs]))
    with use_backend(backend):
        got = case_functions(case)["forward"](*xs)
    assert isinstance(got, np.ndarray), f"{case.id}: forward returned {type(got).__name__}"
    want_dtype = np.bool_ if expected.dtype == np.bool_ else NP_DTYPES[dtype]
    assert got.dtype == want_dtype, f"{case.id}: output dtype {got.dtype}, expected {want_dtype}"
    if expected.dtype == np.bool_:
        np.testing.assert_array_equal(got, expected, err_msg=case.id)
    else:
        assert_close(got, expected, FORWARD_TOL[dtype], f"{case.id}: forward")


def check_grad(case, backend, dtype):
    """The gradient of <f(x), ct> against float64 central differences of the numpy reference."""
    xs = case_inputs(case)
    ct = case_cotangent(case)
    fd = numeric_grad(lambda *a: np.sum(case.ref(*a) * ct), xs, range(len(xs)))
    with use_backend(backend):
        grads = case_functions(case)["grad"](*[x.astype(NP_DTYPES[dtype]) for x in xs])
    assert len(grads) == len(xs)
    for g, x in zip(grads, xs):
        assert isinstance(g, np.ndarray), f"{case.id}: gradient is a {type(g).__name__}"
        assert g.shape == x.shape, f"{case.id}: gradient shape {g.shape} != input shape {x.shape}"
    assert_grads_match_fd(grads, fd, dtype, case.id)


def check_inner_product(case, backend):
    """<ct, J t> == <J^T ct, t>: J t by central differences of the compiled forward function."""
    xs = case_inputs(case)
    fns = case_functions(case)
    ts = _directions(case, "t")
    with use_backend(backend):
        jt = numeric_jvp(fns["forward"], xs, ts)
        grads = fns["grad"](*xs)
    lhs = float(np.vdot(fns["ct"], jt))
    rhs = sum(float(np.vdot(g, t)) for g, t in zip(grads, ts))
    scale = 1.0 + float(np.sum(np.abs(fns["ct"] * jt)))
    assert abs(lhs - rhs) <= 1e-6 * scale, \
        f"{case.id}: <ct, J t> = {lhs!r} but <J^T ct, t> = {rhs!r}"


def check_second_order(case, backend):
    """H r (nested jit_grad) against central differences of the compiled gradient along r, for
    the loss <f(x), ct> + |f(x)|^2 / 2 (see `case_functions`)."""
    xs = case_inputs(case)
    fns = case_functions(case)
    with use_backend(backend):
        got = fns["hvp"](*xs)
        expected = numeric_jvp(lambda *a: fns["grad2"](*a), xs, fns["rs"])
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, HVP_TOL, f"{case.id}: second derivative, input {i}")


def check_op(case, backend, dtype):
    """Every check of the op table that applies to `case` in `dtype`."""
    check_forward(case, backend, dtype)
    if not case.grad:
        return
    check_grad(case, backend, dtype)
    if dtype == "f64":
        check_inner_product(case, backend)
        if case.second_order:
            check_second_order(case, backend)


def check_kink(kink, backend, dtype):
    """The gradient at a kink (optable.KINKS) is the documented one, exactly."""
    x = np.array(kink.x, dtype=NP_DTYPES[dtype])
    with use_backend(backend):
        g = tracejit.jit_grad(kink.fn)(x)
    assert g.dtype == x.dtype
    np.testing.assert_array_equal(g, np.array(kink.grad, dtype=x.dtype), err_msg=kink.id)


# ------------------------------------------------------------------------------------------------
# the corpus (see corpus.Program)
# ------------------------------------------------------------------------------------------------
def program_args(prog, dtype="f64"):
    return tree_astype(prog.make_args(rng_for(prog.name)), dtype)


@functools.lru_cache(maxsize=None)
def program_functions(prog):
    """forward, value_and_grad and hvp (gradient of <grad, r> with r drawn per program)."""
    fun = corpus.traceable(prog)
    vg = tracejit.jit_value_and_grad(fun, argnums=prog.argnums)
    rng = rng_for(prog.name, "r")
    rs = [tree_map(lambda x: rng.normal(size=np.shape(x)), program_args(prog)[i])
          for i in prog.argnums]

    def grad_dot_r(*args):
        _, grads = vg(*args)
        return sum(tree_vdot_traced(g, r) for g, r in zip(grads, rs))

    hvp = tracejit.jit_grad(grad_dot_r, argnums=prog.argnums)
    return dict(forward=tracejit.jit(fun), value_and_grad=vg, hvp=hvp, rs=rs)


def tree_vdot_traced(a, b):
    """<a, b> for a pytree of tracers `a` and one of numpy arrays `b`."""
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def _ref_loss(prog):
    return lambda *args: prog.loss(corpus.NP, *args)


def check_program_forward(prog, backend, dtype):
    """jit and jit_value_and_grad values against the program run on the numpy references."""
    args = program_args(prog, dtype)
    expected = _ref_loss(prog)(*tree_astype(args, "f64"))
    fns = program_functions(prog)
    with use_backend(backend):
        value = fns["forward"](*args)
        value2, _ = fns["value_and_grad"](*args)
    for v in (value, value2):
        assert v.dtype == NP_DTYPES[dtype] and v.shape == ()
        assert_close(v, expected, FORWARD_TOL[dtype], f"{prog.name}: loss")


def check_program_grad(prog, backend, dtype):
    """Gradients (same pytree structure as the arguments) against central differences of the
    numpy-reference program; large leaves are checked at `prog.fd_coords` random elements."""
    args = program_args(prog)
    fd = numeric_grad(_ref_loss(prog), args, prog.argnums, max_coords=prog.fd_coords,
                      rng=rng_for(prog.name, "coords"))
    with use_backend(backend):
        _, grads = program_functions(prog)["value_and_grad"](*tree_astype(args, dtype))
    for i, g in zip(prog.argnums, grads):
        assert_same_structure(g, args[i], f"{prog.name}: gradient of argument {i}")
    assert_grads_match_fd(dict(zip(prog.argnums, grads)), fd, dtype, prog.name)


def assert_same_structure(a, b, what):
    if isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), f"{what}: {type(a).__name__} keys"
        for k in b:
            assert_same_structure(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{what}: {type(a).__name__}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{what}[{i}]")
    else:
        assert isinstance(a, np.ndarray) and a.shape == np.shape(b), f"{what}: {a!r}"


def check_program_second_order(prog, backend):
    """H r by nested jit_grad against central differences of the compiled gradient along r."""
    args = program_args(prog)
    fns = program_functions(prog)

    def grads_at(*wrt):
        full = list(args)
        for i, a in zip(prog.argnums, wrt):
            full[i] = a
        return [tree_leaves(g) for g in fns["value_and_grad"](*full)[1]]

    wrt = [args[i] for i in prog.argnums]
    eps = FD_EPS
    with use_backend(backend):
        got = fns["hvp"](*args)
        plus = grads_at(*[tree_map(lambda x, r: np.asarray(x + eps * r), a, r)
                          for a, r in zip(wrt, fns["rs"])])
        minus = grads_at(*[tree_map(lambda x, r: np.asarray(x - eps * r), a, r)
                           for a, r in zip(wrt, fns["rs"])])
    for n, g in enumerate(got):
        for j, leaf in enumerate(tree_leaves(g)):
            expected = (plus[n][j] - minus[n][j]) / (2 * eps)
            assert_close(leaf, expected, HVP_TOL, f"{prog.name}: second derivative {n}.{j}")


def run_case_worker(script: str, seed: int, count: int, tmp_path, what: str, **env):
    """Run `python script SEED COUNT PROGRESS` in a subprocess, so that a native crash fails the
    test naming the case it was in (the worker writes each case to PROGRESS before running it);
    returns (the JSON summary on its last line of output, its seconds)."""
    here = os.path.dirname(os.path.abspath(script))
    root = os.path.dirname(here)
    progress = tmp_path / "progress.txt"
    path = os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(script), str(seed), str(count),
                           str(progress)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=path, **env), timeout=600)
    seconds = time.perf_counter() - start
    last = progress.read_text().splitlines()[-1:] if progress.exists() else []
    if proc.returncode != 0:
        raise AssertionError(
            f"the {what} worker died (exit code {proc.returncode}) in case {last}; rerun it with\n"
            f"  PYTHONPATH={root}:{here} python {script} {seed} {count} /tmp/progress.txt\n"
            f"stderr:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds

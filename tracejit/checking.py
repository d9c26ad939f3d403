"""check_grads: test the compiled gradient of a function against central finite differences.

    tracejit.check_grads(loss, (params, x, t), argnums=0, order=2)

For use in the tests of code built on tracejit, like `torch.autograd.gradcheck` and
`jax.test_util.check_grads`: it raises AssertionError naming the argument path and element
(`params['w1'][3, 2]`), the compiled value and the finite-difference value when they disagree,
and returns None when they agree.
"""
from __future__ import annotations

import inspect

import numpy as np

from . import pytree
from .api import jit, jit_grad

# Defaults by the least precise differentiated argument: (eps, rtol, atol). "f32-in-f64": float32
# gradients against differences evaluated in float64; "f32": the function would not run in float64,
# so the differences are taken in float32 with a step near the cube root of float32's epsilon.
_DEFAULTS = {"f64": (1e-6, 1e-5, 1e-6), "f32-in-f64": (1e-6, 2e-3, 2e-4), "f32": (4e-3, 2e-2, 2e-2)}


def check_grads(fun, args, *, argnums=0, order=1, eps=None, rtol=None, atol=None,
                max_coords=256, seed=0):
    """Check the compiled gradient of scalar-valued `fun(*args)` w.r.t. `args[argnums]`.

    - `args`: a tuple of the positional arguments (pytrees of float arrays and static values, as
      `jit_grad` takes them); `argnums`: an int or a tuple of ints.
    - order 1: `jit_grad(fun)` against central differences of `fun` (compiled with `jit`) at every
      element of each differentiated array, or at `max_coords` randomly chosen elements of a larger
      one, plus the inner-product test: <gradient, t> against the central difference of `fun`
      along a random direction t of all differentiated arguments, which covers every element
      (`max_coords=0` leaves only this test, for large arguments).
    - order 2 (checks order 1 first): the Hessian-vector product H v, computed as the compiled
      gradient of <gradient, v> for a random direction v, against central differences of the
      compiled gradient along v, at every element.
    - Precision: the differences are taken in float64. float32 arrays (differentiated or not) are
      cast to float64 for them when `fun` runs in float64 and returns a float64 value; otherwise
      they are taken in float32 with a larger step and looser tolerances. The gradients checked
      are those of the arguments as given (float32 gradients for float32 arguments).
    - An element passes when |compiled - differences| <= atol * scale + rtol * |differences|,
      where scale is max(1, largest |difference| of that array). The defaults depend on the
      dtype: float64 eps=1e-6, rtol=1e-5, atol=1e-6; float32 (differences in float64) rtol=2e-3,
      atol=2e-4; float32 (differences in float32) eps=4e-3, rtol=atol=2e-2.
    - Points where `fun` has a kink (relu at 0, ties of max) make finite differences meaningless:
      check at points away from them. The random directions and sampled elements come from `seed`.

    Raises TypeError for arguments that cannot be checked (args not a tuple, a differentiated
    argument without float arrays) and AssertionError when a check fails.
    """
    check = _GradCheck(fun, args, argnums, order)
    check.choose_precision(eps, rtol, atol)
    check.elements(max_coords, np.random.default_rng(seed))
    check.inner_product(np.random.default_rng([seed, 1]))
    if order == 2:
        check.hessian_vector_product(np.random.default_rng([seed, 2]))


class _GradCheck:
    """The state of one check_grads call: the differentiated leaves, the compiled functions and
    the arguments (float64 when possible) at which differences are taken."""

    def __init__(self, fun, args, argnums, order):
        self.name = name = getattr(fun, "__name__", "fun").replace("<lambda>", "lambda")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"check_grads: args must be a tuple of the positional arguments of "
                            f"{name}, got a {type(args).__name__} (write (x,) for one argument)")
        if order not in (1, 2):
            raise ValueError(f"check_grads: order must be 1 or 2, got {order!r}")
        self.args = args = tuple(args)
        self.nums = nums = _normalize_argnums(argnums, len(args))
        self.names = names = _arg_names(fun, len(args))
        self.fun = fun
        # the differentiated array leaves, per argnum: (treedef, number of leaves)
        self.defs, self.paths, self.xs = [], [], []
        for a in nums:
            leaves, treedef = pytree.flatten(args[a], names[a], names[a])
            if not leaves:
                raise TypeError(f"check_grads: argument {names[a]} is differentiated (argnums) "
                                f"but holds no arrays")
            for path, _, x in leaves:
                if not (isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float64)):
                    raise TypeError(f"check_grads: argument {path}: expected a float32 or "
                                    f"float64 array, got {_describe(x)}")
                self.paths.append(path)
                self.xs.append(x)
            self.defs.append((treedef, len(leaves)))
        self.grad_fn = jit_grad(fun, argnums=nums)
        self.value_fn = jit(fun)
        self.grads = self.flat_grads(args)
        for p, x, g in zip(self.paths, self.xs, self.grads):
            if not isinstance(g, np.ndarray) or g.shape != x.shape or g.dtype != x.dtype:
                raise AssertionError(f"check_grads({name}): the gradient w.r.t. {p} is "
                                     f"{_describe(g)}, expected an array like the argument, "
                                     f"{_describe(x)}")

    def with_leaves(self, base, values):
        """`base` (a tuple of arguments) with the differentiated leaves replaced by `values`."""
        new, it = list(base), iter(values)
        for a, (treedef, n) in zip(self.nums, self.defs):
            new[a] = pytree.unflatten(treedef, [next(it) for _ in range(n)])
        return new

    def flat_grads(self, call_args):
        return [leaf for g in self.grad_fn(*call_args) for leaf in _leaves(g)]

    def value(self, leaves) -> float:
        return float(self.value_fn(*self.with_leaves(self.fd_args, leaves)))

    def choose_precision(self, eps, rtol, atol):
        """Where differences are taken (float64 arguments if fun allows) and the tolerances."""
        kind = "f64" if all(x.dtype == np.float64 for x in self.xs) else "f32"
        self.fd_args, self.fd_xs = self.args, [x.copy() for x in self.xs]
        if kind == "f32":
            wide = tuple(_to_float64(a) for a in self.args)
            try:
                ok = np.asarray(self.value_fn(*wide)).dtype == np.float64
            except Exception:  # noqa: BLE001 - any failure means: stay in float32
                ok = False
            if ok:
                kind = "f32-in-f64"
                self.fd_xs = [x.astype(np.float64) for x in self.xs]
                self.fd_args = tuple(self.with_leaves(wide, self.fd_xs))
        d_eps, d_rtol, d_atol = _DEFAULTS[kind]
        self.eps = d_eps if eps is None else eps
        self.rtol = d_rtol if rtol is None else rtol
        self.atol = d_atol if atol is None else atol
        self.how = (f"{'float64' if kind == 'f64' else 'float32'} gradient, central differences "
                    f"in {'float32' if kind == 'f32' else 'float64'} with eps={self.eps:g}")

    def elements(self, max_coords, rng):
        """The gradient element by element (a random sample of large arrays)."""
        eps, work = self.eps, [x.copy() for x in self.fd_xs]
        for p, w, g in zip(self.paths, work, self.grads):
            flat = w.reshape(-1)  # a view: writing it perturbs the argument
            idx = np.arange(flat.size)
            if flat.size > max_coords:
                idx = np.sort(rng.choice(flat.size, max_coords, replace=False))
            fd = np.empty(idx.size)
            for n, k in enumerate(idx):
                old = flat[k]
                flat[k] = old + eps
                plus = self.value(work)
                flat[k] = old - eps
                minus = self.value(work)
                flat[k] = old
                fd[n] = (plus - minus) / (2 * eps)
            self.compare(g.reshape(-1)[idx].astype(np.float64), fd, idx, g.shape, p,
                         "the gradient w.r.t.", "central differences give",
                         f"checked elements of {p}")

    def inner_product(self, rng):
        """<gradient, t> against the central difference of fun along t: every element counts."""
        eps = self.eps
        ts = [rng.standard_normal(x.shape) for x in self.xs]
        # np.asarray: a 0-d array plus a 0-d array is a numpy scalar, which jit reads as a weak
        # (float32) constant, and the differences would be taken in float32
        directional = (self.value([np.asarray(x + eps * t) for x, t in zip(self.fd_xs, ts)])
                       - self.value([np.asarray(x - eps * t) for x, t in zip(self.fd_xs, ts)])
                       ) / (2 * eps)
        products = [g.astype(np.float64) * t for g, t in zip(self.grads, ts)]
        inner = sum(float(np.sum(q)) for q in products)
        scale = max(1.0, sum(float(np.sum(np.abs(q))) for q in products))
        if not abs(inner - directional) <= self.atol * scale + self.rtol * abs(directional):
            raise AssertionError(
                f"check_grads({self.name}): along a random direction t of "
                f"{', '.join(self.names[a] for a in self.nums)}, <gradient, t> = {inner!r} but "
                f"central differences of {self.name} give {directional!r} (difference "
                f"{abs(inner - directional):.3g}; {self.how}); an element not among the "
                f"sampled ones is wrong")

    def hessian_vector_product(self, rng):
        """H v by the gradient of <gradient, v> against central differences of the gradient."""
        eps, grad_fn = self.eps, self.grad_fn
        vs = [rng.standard_normal(x.shape).astype(x.dtype) for x in self.xs]

        def grad_dot_v(*a):
            leaves = [g for gs in grad_fn(*a) for g in _leaves(gs)]
            return sum((g * v).sum() for g, v in zip(leaves, vs))

        grad_dot_v.__name__ = f"{self.name}_grad_dot_v"
        hv = [leaf for g in jit_grad(grad_dot_v, argnums=self.nums)(*self.args)
              for leaf in _leaves(g)]
        plus = self.flat_grads(self.with_leaves(
            self.fd_args, [np.asarray(x + eps * v) for x, v in zip(self.fd_xs, vs)]))
        minus = self.flat_grads(self.with_leaves(
            self.fd_args, [np.asarray(x - eps * v) for x, v in zip(self.fd_xs, vs)]))
        for p, h, gp, gm in zip(self.paths, hv, plus, minus):
            fd = ((gp.astype(np.float64) - gm.astype(np.float64)) / (2 * eps)).reshape(-1)
            self.compare(np.asarray(h, np.float64).reshape(-1), fd, np.arange(fd.size),
                         np.shape(h), p, "the second derivative along a random direction v "
                         "(H v) w.r.t.", "central differences of the gradient along v give",
                         f"elements of (H v) w.r.t. {p}")

    def compare(self, got, fd, idx, shape, path, head, oracle, what):
        """Raise AssertionError naming the worst element when `got` and `fd` disagree."""
        scale = max(1.0, float(np.max(np.abs(fd), initial=0.0)))
        err = np.abs(got - fd)
        tol = self.atol * scale + self.rtol * np.abs(fd)
        bad = ~(err <= tol)  # NaN fails
        if not bad.any():
            return
        with np.errstate(divide="ignore", invalid="ignore"):  # tol may be 0
            excess = np.where(np.isnan(err) | (tol == 0), np.inf, err / tol)
        worst = int(np.argmax(np.where(bad, excess, -1.0)))
        at = _index_text(int(idx[worst]), shape)
        raise AssertionError(
            f"check_grads({self.name}): {head} {path}{at} is {float(got[worst])!r} but {oracle} "
            f"{float(fd[worst])!r} (difference {float(err[worst]):.3g}, tolerance "
            f"{float(tol[worst]):.3g}; {int(bad.sum())} of {bad.size} {what} disagree; "
            f"{self.how})")


def _leaves(tree) -> list:
    return [x for _, _, x in pytree.flatten(tree, "g", "g")[0]]


def _index_text(k: int, shape) -> str:
    if not shape:
        return ""
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(k, shape)) + "]"


def _normalize_argnums(argnums, n_args) -> tuple:
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if not isinstance(nums, tuple) or not nums or \
            not all(isinstance(a, int) and not isinstance(a, bool) for a in nums):
        raise TypeError(f"check_grads: argnums must be an int or a non-empty tuple of ints, got "
                        f"{argnums!r}")
    out = []
    for a in nums:
        if not -n_args <= a < n_args:
            raise ValueError(f"check_grads: argnums {a} is out of range for {n_args} arguments")
        if a % n_args in out:
            raise ValueError(f"check_grads: argnums {argnums!r} names argument {a % n_args} twice")
        out.append(a % n_args)
    return tuple(out)


def _arg_names(fun, n) -> list[str]:
    try:
        params = inspect.signature(fun).parameters.values()
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return [names[i] if i < len(names) else f"args[{i}]" for i in range(n)]


def _to_float64(tree):
    """`tree` with its float32 array leaves cast to float64."""
    leaves, treedef = pytree.flatten(tree, "a", "a")
    return pytree.unflatten(treedef, [x.astype(np.float64) if isinstance(x, np.ndarray)
                                      and x.dtype == np.float32 else x for _, _, x in leaves])


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype}{list(x.shape)}"
    return type(x).__name__

"""Random programs from the op set (hypothesis): compiled value and gradient against the reference
interpreter and float64 central differences of a numpy reference, and the second derivative (a
Hessian-vector product by nested jit_grad) against central differences of the compiled gradient.

A program is a random DAG over its inputs: elementwise unary and binary ops with numpy
broadcasting, reductions over random axes (keepdims or not), matmul (with transposes), conv2d and
max/avg pooling with random kernels, strides and padding, reshapes, transposes, slices and
concatenation. Any value may feed several later steps (fan-out); the loss is
sum_k <sink_k, C_k> over the values no step reads, with fixed random C_k.

Inputs are drawn away from kinks: the numpy reference measures, for every relu/abs/clip/maximum/
minimum/where/max/min/max-pooling step, how far its operands are from the kink or tie, and an
example closer than KINK_MARGIN (or with huge or non-finite values) is rejected, so finite
differences and second derivatives are defined at every example checked.

Random draws leave some ops out, so a sweep also checks, for every op of the set, a program that
starts with it (then a few random steps), and fails if no such program passed the checks.

CI runs TRACEJIT_HYPOTHESIS_EXAMPLES (default 15) derandomized random programs plus the sweep (one
program per op, N // 25 when set higher); set it higher for a longer, randomized search. The test
prints how many programs it tried.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import helpers
import optable
import tracejit as tj
from tracejit import nn

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

N_EXAMPLES = int(os.environ.get("TRACEJIT_HYPOTHESIS_EXAMPLES", "15"))
N_SWEEP_EXAMPLES = max(1, N_EXAMPLES // 25)   # programs per op in the sweep over the op set
KINK_MARGIN = 1e-3
MAX_ABS = 1e4          # reject programs whose values grow beyond this
FD_COORDS = 6          # finite differences at this many elements per input
MATCH_TOL = (1e-9, 1e-10)   # compiled against the interpreter (same IR, other summation order)
GRAD_TOL = (1e-5, 1e-6)     # against central differences
HVP_TOL = (1e-5, 1e-6)


# ------------------------------------------------------------------------------------------------
# the op set: (tracejit function, numpy reference, kink margin or None), all taking
# (*operands, **params)
# ------------------------------------------------------------------------------------------------
def _abs_margin(*points):
    return lambda x, **_: min((float(np.min(np.abs(x - p), initial=np.inf)) for p in points))


def _diff_margin(a, b, **_):
    return float(np.min(np.abs(np.asarray(a) - np.asarray(b)), initial=np.inf))


def _moved(x, axis):
    """x with the reduced axes last, flattened into one."""
    axes = tuple(range(x.ndim)) if axis is None else \
        tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    rest = [a for a in range(x.ndim) if a not in axes]
    y = np.transpose(x, rest + list(axes))
    return y.reshape(y.shape[:len(rest)] + (-1,))


def _top2_gap(groups):
    """Smallest gap between the largest and second-largest entry of each group (last axis)."""
    if groups.shape[-1] < 2:
        return np.inf
    s = np.sort(groups, axis=-1)
    gaps = s[..., -1] - s[..., -2]
    return float(np.min(np.where(np.isneginf(s[..., -2]), np.inf, gaps), initial=np.inf))


def _reduce_margin(kind):
    def margin(x, axis=None, keepdims=False):
        g = _moved(np.asarray(x), axis)
        return _top2_gap(g if kind == "max" else -g)
    return margin


def _pool_margin(x, kernel, stride, padding):
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding], constant_values=-np.inf)
    win = sliding_window_view(xp, kernel, axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    oh = (x.shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    win = win[:, :, :oh, :ow]
    return _top2_gap(win.reshape(win.shape[:4] + (-1,)))


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_logsumexp(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


UNARY = {
    "tanh": (tj.tanh, np.tanh, None),
    "sigmoid": (nn.sigmoid, lambda x: 1 / (1 + np.exp(-x)), None),
    "sin": (tj.sin, np.sin, None),
    "cos": (tj.cos, np.cos, None),
    "exp": (tj.exp, np.exp, None),
    "log1p_sq": (lambda x: tj.log(x * x + 1.0), lambda x: np.log(x * x + 1.0), None),
    "sqrt_sq": (lambda x: tj.sqrt(x * x + 0.5), lambda x: np.sqrt(x * x + 0.5), None),
    "square": (tj.square, np.square, None),
    "neg": (lambda x: -x, np.negative, None),
    "pow3": (lambda x: x ** 3, lambda x: x ** 3, None),
    "scale": (lambda x, c: x * c, lambda x, c: x * c, None),
    "relu": (nn.relu, lambda x: np.where(x > 0, x, 0.0), _abs_margin(0.0)),
    "abs": (tj.abs, np.abs, _abs_margin(0.0)),
    "clip": (lambda x: tj.clip(x, -0.5, 0.8), lambda x: np.clip(x, -0.5, 0.8),
             _abs_margin(-0.5, 0.8)),
    "softmax": (nn.softmax, _np_softmax, None),
    "log_softmax": (nn.log_softmax, lambda x: np.log(_np_softmax(x)), None),
}

BINARY = {
    "add": (tj.add, np.add, None),
    "sub": (lambda a, b: a - b, np.subtract, None),
    "mul": (lambda a, b: a * b, np.multiply, None),
    "div": (lambda a, b: a / (b * b + 1.0), lambda a, b: a / (b * b + 1.0), None),
    "maximum": (tj.maximum, np.maximum, _diff_margin),
    "minimum": (tj.minimum, np.minimum, _diff_margin),
    "where": (lambda a, b: tj.where(a > b, a, b * 0.5), lambda a, b: np.where(a > b, a, b * 0.5),
              _diff_margin),
}

REDUCE = {
    "sum": (tj.sum, np.sum, None),
    "mean": (tj.mean, np.mean, None),
    "max": (tj.max, np.max, _reduce_margin("max")),
    "min": (tj.min, np.min, _reduce_margin("min")),
    "logsumexp": (tj.logsumexp, _np_logsumexp, None),
    "var": (tj.var, np.var, None),
}

OTHER = {
    "matmul": (tj.matmul, np.matmul, None),
    "matmul_t": (lambda a, b: a @ b.T, lambda a, b: a @ b.T, None),
    "conv2d": (lambda x, w, stride, padding: nn.conv2d(x, w, stride=stride, padding=padding),
               lambda x, w, stride, padding: optable.ref_conv(x, w, stride=stride,
                                                              padding=padding), None),
    "conv2d_bias": (lambda x, w, b, stride, padding: nn.conv2d(x, w, b, stride, padding),
                    lambda x, w, b, stride, padding: optable.ref_conv(x, w, b, stride, padding),
                    None),
    "max_pool2d": (lambda x, kernel, stride, padding: nn.max_pool2d(x, kernel, stride, padding),
                   lambda x, kernel, stride, padding: optable.ref_pool(x, kernel, stride, padding,
                                                                       mode="max"),
                   _pool_margin),
    "avg_pool2d": (lambda x, kernel, stride, padding: nn.avg_pool2d(x, kernel, stride, padding),
                   lambda x, kernel, stride, padding: optable.ref_pool(x, kernel, stride, padding,
                                                                       mode="avg"), None),
    "reshape": (lambda x, shape: x.reshape(shape), lambda x, shape: x.reshape(shape), None),
    "transpose": (lambda x, axes: x.transpose(axes), lambda x, axes: x.transpose(axes), None),
    "slice": (lambda x, index: x[index], lambda x, index: x[index], None),
    "concatenate": (lambda a, b, axis: tj.concatenate([a, b], axis),
                    lambda a, b, axis: np.concatenate([a, b], axis), None),
}

OPS = {**UNARY, **BINARY, **REDUCE, **OTHER}


# ------------------------------------------------------------------------------------------------
# programs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """`v<n> = op(v<i>, ..., **params)`, or a new input when op == "input" (params: shape)."""
    op: str
    inputs: tuple = ()
    params: tuple = ()   # (name, value) pairs

    def kwargs(self):
        return dict(self.params)


@dataclass
class Program:
    steps: list = field(default_factory=list)
    shapes: list = field(default_factory=list)   # of every value
    seed: int = 0

    @property
    def n_inputs(self):
        return sum(s.op == "input" for s in self.steps)

    def sinks(self):
        used = {i for s in self.steps for i in s.inputs}
        return [i for i in range(len(self.steps)) if i not in used]

    def __str__(self):
        lines = []
        for n, s in enumerate(self.steps):
            if s.op == "input":
                lines.append(f"v{n} = input {list(s.kwargs()['shape'])}")
            else:
                args = [f"v{i}" for i in s.inputs] + [f"{k}={v!r}" for k, v in s.params]
                lines.append(f"v{n} = {s.op}({', '.join(args)})    # {list(self.shapes[n])}")
        lines.append(f"loss = sum of <v, C> over v in {[f'v{i}' for i in self.sinks()]}")
        return "\n".join(lines)


def run(prog: Program, inputs, impl: int, record=None):
    """The values of every step; impl 0 = tracejit, 1 = numpy. `record(step, operands, params)`
    sees the numpy operands of every step (kink margins)."""
    vals, it = [], iter(inputs)
    for s in prog.steps:
        if s.op == "input":
            vals.append(next(it))
            continue
        operands = [vals[i] for i in s.inputs]
        if record is not None:
            record(s, operands)
        vals.append(OPS[s.op][impl](*operands, **s.kwargs()))
    return vals


def loss_constants(prog: Program):
    rng = np.random.default_rng(prog.seed + 1)
    return {i: rng.normal(size=prog.shapes[i]) for i in prog.sinks()}


def make_loss(prog: Program, impl: int):
    consts = loss_constants(prog)
    total = tj.sum if impl == 0 else np.sum

    def loss(*xs):
        vals = run(prog, xs, impl)
        return sum(total(vals[i] * c) for i, c in consts.items())
    return loss


def make_sinks(prog: Program):
    return lambda *xs: [v for i, v in enumerate(run(prog, xs, 0)) if i in set(prog.sinks())]


def _shape_of(prog: Program, step: Step):
    """Output shape of `step` (numpy reference on zeros)."""
    zeros = [np.zeros(prog.shapes[i]) for i in step.inputs]
    with np.errstate(all="ignore"):
        return np.shape(OPS[step.op][1](*zeros, **step.kwargs()))


def _broadcastable(a, b):
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


NN_OPS = ("conv2d", "conv2d_bias", "max_pool2d", "avg_pool2d")
LAYOUT_OPS = ("reshape", "transpose", "slice", "concatenate")
KIND_OF = {**{n: "unary" for n in UNARY}, **{n: "binary" for n in BINARY},
           **{n: "reduce" for n in REDUCE}, "matmul": "matmul", "matmul_t": "matmul",
           **{n: "nn" for n in NN_OPS}, **{n: "layout" for n in LAYOUT_OPS}}
assert set(KIND_OF) == set(OPS)


@st.composite
def programs(draw, must=None):
    """A random program; with `must` (an op name) its first step after the inputs is that op, on
    a 2-d input (and an image batch for the nn ops), followed by up to 3 random steps."""
    prog = Program(seed=draw(st.integers(0, 2 ** 31 - 1)))

    def add(step, shape=None):
        prog.steps.append(step)
        prog.shapes.append(tuple(shape) if shape is not None else _shape_of(prog, step))
        return len(prog.steps) - 1

    def new_input(shape):
        return add(Step("input", (), (("shape", tuple(shape)),)), shape)

    dims = st.integers(1, 4)
    if must is not None:  # an operand every op of the set accepts
        new_input(draw(st.lists(dims, min_size=2, max_size=2)))
    for _ in range(draw(st.integers(0 if must else 1, 3))):
        new_input(draw(st.lists(dims, min_size=0, max_size=3)))
    if KIND_OF.get(must) == "nn" or draw(st.booleans()):  # an image batch: convolutions, pooling
        new_input((draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(3, 7)),
                   draw(st.integers(3, 7))))

    def pick(pred=lambda s: True):
        """A value whose shape satisfies `pred`, biased towards recent ones; None if none."""
        ok = [i for i, s in enumerate(prog.shapes) if pred(s)]
        if not ok:
            return None
        recent = ok[-4:]
        return draw(st.sampled_from(recent)) if draw(st.booleans()) else draw(st.sampled_from(ok))

    def axis_param(ndim):
        kind = draw(st.sampled_from(["none", "int", "pair"] if ndim >= 2 else ["none", "int"]))
        if kind == "none":
            return None
        if kind == "int":
            a = draw(st.integers(0, ndim - 1))
            return a - ndim if draw(st.booleans()) else a
        return tuple(sorted(draw(st.lists(st.integers(0, ndim - 1), min_size=2, max_size=2,
                                          unique=True))))

    steps = draw(st.integers(1, 4)) if must else draw(st.integers(2, 9))
    for n_step in range(steps):
        forced = must if n_step == 0 else None
        kind = KIND_OF[forced] if forced else draw(st.sampled_from(
            ["unary", "binary", "binary", "reduce", "matmul", "nn", "layout"]))
        if kind == "unary":
            x = pick(lambda s: len(s) >= 1) if forced else pick()
            name = forced or draw(st.sampled_from(sorted(UNARY)))
            params = ()
            if name == "scale":
                params = (("c", draw(st.sampled_from([-1.5, 0.5, 2.0]))),)
            if name in ("softmax", "log_softmax") and not prog.shapes[x]:
                name = "tanh"
            add(Step(name, (x,), params))
        elif kind == "binary":
            a = pick()
            partners = [i for i, s in enumerate(prog.shapes) if _broadcastable(prog.shapes[a], s)]
            if draw(st.booleans()) and prog.shapes[a]:
                # a broadcasting partner: reduce `a` (or another value) with keepdims
                ax = draw(st.integers(0, len(prog.shapes[a]) - 1))
                b = add(Step("sum", (a,), (("axis", ax), ("keepdims", True))))
            else:
                b = draw(st.sampled_from(partners))  # may be `a` itself (x * x)
            pair = (a, b) if draw(st.booleans()) else (b, a)
            add(Step(forced or draw(st.sampled_from(sorted(BINARY))), pair))
        elif kind == "reduce":
            x = pick(lambda s: len(s) >= 1)
            if x is None:
                continue
            name = forced or draw(st.sampled_from(sorted(REDUCE)))
            axis = axis_param(len(prog.shapes[x]))
            add(Step(name, (x,), (("axis", axis), ("keepdims", draw(st.booleans())))))
        elif kind == "matmul":
            a = pick(lambda s: len(s) == 2) if forced else pick(lambda s: len(s) in (1, 2))
            if a is None:
                continue
            sa = prog.shapes[a]
            k = sa[-1]
            rights = [i for i, s in enumerate(prog.shapes) if s and s[0] == k
                      and (len(s) == 2 or (len(s) == 1 and len(sa) == 2))]
            rights_t = [i for i, s in enumerate(prog.shapes) if len(s) == 2 and s[1] == k]
            # (a 2-d `a` is in rights_t itself: a @ a.T)
            if forced == "matmul_t" or (len(sa) == 2 and rights_t and forced is None
                                        and draw(st.booleans())):
                add(Step("matmul_t", (a, draw(st.sampled_from(rights_t)))))  # a @ b.T, a @ a.T
            elif rights and draw(st.booleans()):
                add(Step("matmul", (a, draw(st.sampled_from(rights)))))
            else:  # a new weight input of a fitting shape
                w = new_input((k, draw(dims)))
                add(Step("matmul", (a, w)))
        elif kind == "nn":
            x = pick(lambda s: len(s) == 4)
            if x is None:
                continue
            n, c, h, w = prog.shapes[x]
            name = forced or draw(st.sampled_from(NN_OPS))
            pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
            kh = draw(st.integers(1, min(3, h + 2 * pad[0])))
            kw = draw(st.integers(1, min(3, w + 2 * pad[1])))
            stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            if name.startswith("conv"):
                weight = new_input((draw(st.integers(1, 3)), c, kh, kw))
                ins = (x, weight)
                if name == "conv2d_bias":
                    ins += (new_input((prog.shapes[weight][0],)),)
                add(Step(name, ins, (("stride", stride), ("padding", pad))))
            else:
                pad = (min(pad[0], kh // 2), min(pad[1], kw // 2))
                add(Step(name, (x,), (("kernel", (kh, kw)), ("stride", stride),
                                      ("padding", pad))))
        else:  # layout
            x = pick(lambda s: len(s) >= 1) if forced else pick()
            s = prog.shapes[x]
            name = forced or draw(st.sampled_from(LAYOUT_OPS))
            if name == "reshape" or not s:
                size = int(np.prod(s, dtype=np.int64))
                divisors = [d for d in range(1, size + 1) if size % d == 0]
                d = draw(st.sampled_from(divisors))
                shape = draw(st.sampled_from([(size,), (d, size // d), (size // d, 1, d), (-1,)]))
                add(Step("reshape", (x,), (("shape", shape),)))
            elif name == "transpose":
                axes = tuple(draw(st.permutations(range(len(s)))))
                add(Step("transpose", (x,), (("axes", axes),)))
            elif name == "slice":
                ax = draw(st.integers(0, len(s) - 1))
                start = draw(st.integers(0, s[ax] - 1))
                step = draw(st.integers(1, 2))
                stop = draw(st.integers(start + 1, s[ax]))
                index = (slice(None),) * ax + (slice(start, stop, step),)
                if draw(st.integers(0, 3)) == 0:
                    index = (slice(None),) * ax + (start,)   # an int index drops the axis
                add(Step("slice", (x,), (("index", index),)))
            else:
                ax = draw(st.integers(0, len(s) - 1))
                others = [i for i, t in enumerate(prog.shapes)
                          if len(t) == len(s) and all(a == b for j, (a, b) in enumerate(zip(s, t))
                                                      if j != ax)]
                add(Step("concatenate", (x, draw(st.sampled_from(others))), (("axis", ax),)))
    return prog


def draw_inputs(prog: Program):
    rng = np.random.default_rng(prog.seed)
    # np.asarray: a 0-d draw is a numpy scalar, which tracejit treats as a static value
    return [np.asarray(rng.normal(size=s.kwargs()["shape"])) for s in prog.steps if s.op == "input"]


def reference_is_well_behaved(prog: Program, xs) -> tuple[bool, str]:
    """Whether the numpy reference is finite, bounded and KINK_MARGIN away from every kink."""
    margins = []

    def record(step, operands):
        margin = OPS[step.op][2]
        if margin is not None:
            margins.append((margin(*operands, **step.kwargs()), step.op))

    with np.errstate(all="ignore"):
        vals = run(prog, xs, 1, record)
        loss = make_loss(prog, 1)(*xs)
    if not np.isfinite(loss):
        return False, "non-finite"
    big = max(float(np.max(np.abs(v), initial=0.0)) for v in vals)
    if not big < MAX_ABS:
        return False, "huge values"
    near = [op for m, op in margins if m < KINK_MARGIN]
    if near:
        return False, "near a kink"
    return True, ""


# ------------------------------------------------------------------------------------------------
# the property
# ------------------------------------------------------------------------------------------------
STATS = {"tried": 0, "checked": 0, "rejected": {}, "ops": collections.Counter(), "steps": 0}
_derandomize = "TRACEJIT_HYPOTHESIS_EXAMPLES" not in os.environ


def _settings(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=_derandomize,
                    database=None if _derandomize else settings.default.database,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


def check_program(prog):
    STATS["tried"] += 1
    note(str(prog))
    xs = draw_inputs(prog)
    ok, why = reference_is_well_behaved(prog, xs)
    if not ok:
        STATS["rejected"][why] = STATS["rejected"].get(why, 0) + 1
    assume(ok)
    STATS["checked"] += 1
    STATS["ops"].update(s.op for s in prog.steps if s.op != "input")
    STATS["steps"] += len(prog.steps)
    argnums = tuple(range(len(xs)))
    ref_loss = make_loss(prog, 1)
    sinks = tj.jit(make_sinks(prog))
    vg = tj.jit_value_and_grad(make_loss(prog, 0), argnums=argnums)
    rs = [np.random.default_rng(prog.seed + 2 + i).normal(size=x.shape) for i, x in enumerate(xs)]

    def grad_dot_r(*a):
        return sum(tj.sum(g * r) for g, r in zip(vg(*a)[1], rs))
    hvp = tj.jit_grad(grad_dot_r, argnums=argnums)

    results = {}
    for backend in ("llvm", "interpreter"):
        with helpers.use_backend(backend):
            results[backend] = (sinks(*xs), vg(*xs), hvp(*xs))
    (s_n, (v_n, g_n), h_n), (s_i, (v_i, g_i), h_i) = results["llvm"], results["interpreter"]

    # compiled against the interpreter: forward values of every sink, loss, gradients, H r
    for a, b, what in ([(x, y, f"sink {k}") for k, (x, y) in enumerate(zip(s_n, s_i))]
                       + [(v_n, v_i, "loss")]
                       + [(x, y, f"gradient {k}") for k, (x, y) in enumerate(zip(g_n, g_i))]
                       + [(x, y, f"H r {k}") for k, (x, y) in enumerate(zip(h_n, h_i))]):
        helpers.assert_close(a, b, MATCH_TOL, f"compiled vs interpreter: {what}")

    # forward values against the numpy reference
    with np.errstate(all="ignore"):
        ref_vals = run(prog, xs, 1)
    for k, (got, i) in enumerate(zip(s_n, prog.sinks())):
        helpers.assert_close(got, ref_vals[i], MATCH_TOL, f"sink v{i} against numpy")
    helpers.assert_close(v_n, ref_loss(*xs), MATCH_TOL, "loss against numpy")

    # gradients against central differences of the numpy reference
    fd = helpers.numeric_grad(ref_loss, xs, argnums, max_coords=FD_COORDS,
                              rng=np.random.default_rng(prog.seed + 3))
    for (i, _), (idx, ders) in fd.items():
        helpers.assert_close(g_n[i].reshape(-1)[idx], ders, GRAD_TOL, f"gradient {i} against FD")

    # H r against central differences of the compiled gradient along r
    eps = helpers.FD_EPS
    with helpers.use_backend("llvm"):
        plus = vg(*[np.asarray(x + eps * r) for x, r in zip(xs, rs)])[1]
        minus = vg(*[np.asarray(x - eps * r) for x, r in zip(xs, rs)])[1]
    for i, (h, p, m) in enumerate(zip(h_n, plus, minus)):
        helpers.assert_close(h, (p - m) / (2 * eps), HVP_TOL, f"H r {i} against FD of the gradient")


check_random_program = _settings(N_EXAMPLES)(given(programs())(check_program))


def test_random_programs(capsys):
    check_random_program()
    rejected = ", ".join(f"{n} {why}" for why, n in sorted(STATS["rejected"].items())) or "none"
    with capsys.disabled():
        print(f"\nhypothesis: {STATS['tried']} random programs tried, {STATS['checked']} checked "
              f"(rejected: {rejected}); {STATS['steps']} steps, {len(STATS['ops'])} of {len(OPS)} "
              f"ops used")
    assert STATS["checked"] > 0


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_in_a_checked_program(op):
    """Every op of the set in at least one program that passes every check (random draws alone
    leave some ops out): a program starting with `op`, then a few random steps."""
    before = STATS["ops"][op]
    _settings(N_SWEEP_EXAMPLES)(given(programs(must=op))(check_program))()
    assert STATS["ops"][op] > before, f"no program with {op} was checked"

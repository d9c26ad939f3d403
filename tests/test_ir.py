"""The IR: golden dumps, printer determinism and grammar, provenance, the verifier (run after every
pass), and the passes (dead code, common subexpressions, constant folding, algebraic
simplification). No codegen: the optimized IR comes from ir.optimize directly.

Regenerate the golden files after an intended change of the printed IR with
    TRACEJIT_UPDATE_GOLDEN=1 python -m pytest tests/test_ir.py -k golden
and review the diff.
"""
import inspect
import itertools
import os
import re

import numpy as np
import pytest

import corpus
import helpers
import optable
import tracejit
from tracejit.ir import lax, passes
from tracejit.ir.adjoint import grad_function
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType, dtype_of_numpy, print_function
from tracejit.ir.interpreter import interpret
from tracejit.ir.passes import optimize
from tracejit.ir.verify import VerifyError, verify
from tracejit import Tracer, nn
from tracejit.values import to_value

pytestmark = pytest.mark.usefixtures("interpreter_backend")


# ------------------------------------------------------------------------------------------------
# the golden functions: keep them first in this file, their line numbers are in the dumps
# ------------------------------------------------------------------------------------------------
def mlp_loss(w, b, x, t):
    h = tracejit.tanh(x @ w + b)
    return nn.mse_loss(h, t)


def shared_weight(w1, w2, x0):
    x1 = w1 @ x0
    x2 = x0 + w2 @ x1
    return tracejit.norm(w1 @ (x1 + x2))


GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
GOLDEN_ARGS = {
    mlp_loss: (np.ones((4, 3), np.float32), np.ones(3, np.float32), np.ones((2, 4), np.float32),
               np.ones((2, 3), np.float32)),
    shared_weight: (np.ones((2, 2)), np.ones((2, 2)), np.ones(2)),
}
GOLDEN = [(mlp_loss, (0, 1), "forward"), (mlp_loss, (0, 1), "grad"),
          (mlp_loss, (0, 1), "optimized"), (shared_weight, (0, 1), "grad"),
          (shared_weight, (0, 1), "optimized")]


def golden_text(fn, argnums, stage):
    args = GOLDEN_ARGS[fn]
    if stage == "optimized":
        # what .ir(stage="optimized") shows, without codegen's kernel annotations
        return str(optimize(trace_ir(fn, args, argnums)[1]))
    return tracejit.jit_grad(fn, argnums=argnums).ir(*args, stage=stage)


@pytest.mark.parametrize("fn, argnums, stage", GOLDEN,
                         ids=lambda v: v.__name__ if callable(v) else v if isinstance(v, str)
                         else None)
def test_golden_dump(fn, argnums, stage):
    path = os.path.join(GOLDEN_DIR, f"{fn.__name__}.{stage}.txt")
    text = golden_text(fn, argnums, stage) + "\n"
    if os.environ.get("TRACEJIT_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"the {stage} dump of {fn.__name__} differs from {path}"


# ------------------------------------------------------------------------------------------------
# tracing at the IR level (what tracejit.api does, for any pytree of arguments)
# ------------------------------------------------------------------------------------------------
def trace_ir(fun, args, argnums=(0,)):
    """(forward, grad) ir.Functions of `fun(*args)`: the gradient is taken w.r.t. every array leaf
    of args[i], i in argnums; the parameters are all array leaves, in order."""
    b = Builder(getattr(fun, "__name__", "f").replace("<lambda>", "lambda"))
    names = [p.name for p in inspect.signature(fun).parameters.values()]
    wrt = []
    with building(b):
        traced = []
        for i, a in enumerate(args):
            count = itertools.count()
            name = names[i] if i < len(names) else f"a{i}"

            def param(x, i=i, name=name):
                if i in argnums:
                    wrt.append(len(b.params))
                t = TensorType(dtype_of_numpy(x.dtype), x.shape)
                hint = name if isinstance(a, np.ndarray) else f"{name}.{next(count)}"
                return Tracer(b.add_param(t, hint), b)
            traced.append(helpers.tree_map(param, a))
        out = fun(*traced)
        fwd = verify(b.finish([to_value(out)]))
    return fwd, verify(grad_function(fwd, wrt))


def leaves(args):
    return [x for a in args for x in helpers.tree_leaves(a)]


def test_trace_ir_matches_what_jit_grad_prints():
    args = GOLDEN_ARGS[shared_weight]
    fwd, grad = trace_ir(shared_weight, args, (0, 1))
    dump = tracejit.jit_grad(shared_weight, argnums=(0, 1)).ir(*args)
    assert str(grad) == dump


# ------------------------------------------------------------------------------------------------
# functions to run the passes on: the corpus and a sample of the op table, forward and grad
# ------------------------------------------------------------------------------------------------
def _program_functions():
    out = []
    for prog in corpus.PROGRAMS:
        args = helpers.program_args(prog)
        out.append((prog.name, args, trace_ir(corpus.traceable(prog), args, prog.argnums)))
    return out


def _case_functions():
    out = []
    for case in optable.GRAD_CASES[::7]:
        xs = helpers.case_inputs(case)
        ct = helpers.case_cotangent(case)
        loss = lambda *a, case=case, ct=ct: (case.fn(*a) * ct).sum()  # noqa: E731
        out.append((case.id, xs, trace_ir(loss, xs, tuple(range(len(xs))))))
    return out


FUNCTIONS = None


def functions():
    global FUNCTIONS
    if FUNCTIONS is None:
        FUNCTIONS = _program_functions() + _case_functions()
    return FUNCTIONS


def pass_functions():
    """Every pass of ir.passes: its functions taking an ir.Function first, except `optimize`."""
    out = {}
    for name, obj in vars(passes).items():
        if inspect.isfunction(obj) and obj.__module__ == passes.__name__ and \
                not name.startswith("_") and name != "optimize":
            params = list(inspect.signature(obj).parameters.values())
            if params and params[0].annotation in ("Function", "ir.core.Function"):
                out[name] = obj
    return out


def test_the_passes_include_dce_cse_and_simplification():
    assert {"dce", "cse", "simplify"} <= set(pass_functions())


@pytest.fixture
def verified_passes(monkeypatch):
    """Run the verifier after every pass that `optimize` calls; yields the names of those run."""
    ran = []
    for name, fn in pass_functions().items():
        def checked(f, *a, name=name, fn=fn, **k):
            out = fn(f, *a, **k)
            try:
                verify(f)
            except VerifyError as e:
                raise AssertionError(f"the IR is invalid after pass {name}: {e}") from e
            ran.append(name)
            return out
        monkeypatch.setattr(passes, name, checked)
    return ran


@pytest.mark.parametrize("stage", ["forward", "grad"])
def test_verifier_after_every_pass_and_same_results(stage, verified_passes):
    for name, args, (fwd, grad) in functions():
        fn = fwd if stage == "forward" else grad
        expected = interpret(fn, leaves(args))
        opt = verify(optimize(fn))
        assert len(opt.instrs) <= len(fn.instrs), name
        for got, want in zip(interpret(opt, leaves(args)), expected):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=name)
        # optimize works on a copy
        verify(fn)
        np.testing.assert_array_equal(interpret(fn, leaves(args))[0], expected[0])
    assert {"dce", "cse", "simplify"} <= set(verified_passes)


# ------------------------------------------------------------------------------------------------
# printer
# ------------------------------------------------------------------------------------------------
INSTR_LINE = re.compile(
    r"^  %[\w.]+: (f32|f64|i32|i64|u32|bool)\[[\d,]*\] = \w+"          # value: type = prim
    r"( (%[\w.]+|-?[\d.e+-]+|inf|-inf|true|false)(, (%[\w.]+|-?[\d.e+-]+|inf|-inf|true|false))*)?"
    r"( \{[^}]*\})?"                                          # attributes
    r"( +# .*)?$")                                           # provenance


def test_dumps_follow_the_grammar():
    for name, args, (fwd, grad) in functions():
        for fn in (fwd, grad, optimize(grad)):
            lines = str(fn).splitlines()
            assert re.match(r"^func @[\w.]+\((%[\w.]+: \w+\[[\d,]*\](, )?)*\) -> \(.*\) \{$",
                            lines[0]), lines[0]
            assert lines[-1] == "}" and lines[-2].startswith("  return %")
            for line in lines[1:-2]:
                assert INSTR_LINE.match(line), f"{name}: {line!r}"


def test_printing_is_deterministic():
    for name, args, (fwd, grad) in functions()[:4]:
        assert str(grad) == str(grad) == print_function(grad)
        again = trace_ir(corpus.traceable(next(p for p in corpus.PROGRAMS if p.name == name)),
                         args, next(p for p in corpus.PROGRAMS if p.name == name).argnums)
        assert str(again[0]) == str(fwd) and str(again[1]) == str(grad)
        assert str(optimize(again[1])) == str(optimize(grad))


def test_names_follow_definition_order_and_arguments():
    g = tracejit.jit_grad(lambda params, x: tracejit.tanh(x @ params["w"]).sum())
    text = g.ir({"w": np.ones((3, 2))}, np.ones((4, 3)))
    assert text.startswith("func @lambda.grad(%params.w: f64[3,2], %x: f64[4,3]) -> "
                           "(f64[], f64[3,2]) {")
    numbered = [int(n) for n in re.findall(r"^  %(\d+):", text, re.M)]
    assert numbered == list(range(len(numbered)))
    assert re.search(r"^  %params\.w\.adj: f64\[3,2\] = ", text, re.M)
    assert text.splitlines()[-2].endswith(", %params.w.adj")


def test_scalar_constants_print_inline():
    text = tracejit.jit_grad(lambda x: (x * 2.5 + 1.0).sum()).ir(np.ones(2), stage="forward")
    assert "mul %x, 2.5" in text and "add %0, 1.0" in text
    assert "const" not in text


# ------------------------------------------------------------------------------------------------
# provenance
# ------------------------------------------------------------------------------------------------
def test_every_instruction_carries_the_users_line():
    _, grad = trace_ir(mlp_loss, GOLDEN_ARGS[mlp_loss], (0, 1))
    first = inspect.getsourcelines(mlp_loss)[1]
    lines = {f"test_ir.py:{first + 1}", f"test_ir.py:{first + 2}"}
    for ins in grad.instrs:
        assert ins.loc in lines, (ins, ins.loc)


def test_adjoint_instructions_name_their_forward_instruction():
    fwd, grad = trace_ir(shared_weight, GOLDEN_ARGS[shared_weight], (0, 1))
    n_fwd = len(fwd.instrs)
    forward_part, adjoint_part = grad.instrs[:n_fwd], grad.instrs[n_fwd:]
    assert [i.prim.name for i in forward_part] == [i.prim.name for i in fwd.instrs]
    assert adjoint_part and all(i.adj_of in forward_part for i in adjoint_part)
    assert all(i.adj_of is None for i in forward_part)
    text = str(grad)
    for line in text.splitlines()[1 + n_fwd:-2]:
        assert re.search(r"# adj of %\w+", line), line


def test_shared_weight_cotangents_are_accumulated():
    # w1 is used twice: its cotangent is the sum of both uses' contributions
    text = tracejit.jit_grad(shared_weight, argnums=(0, 1)).ir(*GOLDEN_ARGS[shared_weight])
    (w1_adj,) = [line for line in text.splitlines() if line.startswith("  %w1.adj:")]
    assert " = add " in w1_adj
    (w2_adj,) = [line for line in text.splitlines() if line.startswith("  %w2.adj:")]
    assert " = add " not in w2_adj


# ------------------------------------------------------------------------------------------------
# the verifier rejects broken IR
# ------------------------------------------------------------------------------------------------
def small_grad():
    return trace_ir(lambda x: (tracejit.exp(x) * x).sum(), [np.ones(3)])[1]


def test_verifier_rejects_use_before_definition():
    fn = small_grad()
    fn.instrs = fn.instrs[1:] + fn.instrs[:1]
    with pytest.raises(VerifyError, match="before its definition"):
        verify(fn)


def test_verifier_rejects_a_wrong_type():
    fn = small_grad()
    victim = next(i for i in fn.instrs if i.prim.name == "exp")
    victim.out.type = TensorType("f64", (4,))
    with pytest.raises(VerifyError, match=r"has type f64\[4\], its shape rule gives f64\[3\]"):
        verify(fn)


def test_verifier_rejects_an_undefined_output():
    fn = small_grad()
    fn.outputs = fn.outputs + [small_grad().outputs[1]]
    with pytest.raises(VerifyError, match="not defined"):
        verify(fn)


def test_verifier_rejects_a_value_defined_twice():
    fn = small_grad()
    fn.instrs = fn.instrs + fn.instrs[-1:]
    with pytest.raises(VerifyError, match="defined twice"):
        verify(fn)


# ------------------------------------------------------------------------------------------------
# the passes, on hand-built functions
# ------------------------------------------------------------------------------------------------
F64_3 = TensorType("f64", (3,))


def build(body, n_params=1, type=F64_3):
    """A function of `n_params` parameters of `type` returning body(*params) (a Value or a list)."""
    b = Builder("f")
    with building(b):
        params = [b.add_param(type, f"x{i}") for i in range(n_params)]
        out = body(*params)
    return verify(b.finish(out if isinstance(out, list) else [out]))


def prims(fn):
    return [i.prim.name for i in fn.instrs]


def test_dce_removes_what_no_output_needs():
    def body(x):
        lax.exp(lax.tanh(x))            # dead chain
        y = lax.mul(x, x)
        lax.add(y, 1.0)                 # dead user of a live value
        return lax.sin(y)

    fn = build(body)
    assert prims(fn).count("exp") == 1
    verify(passes.dce(fn))
    assert prims(fn) == ["mul", "sin"]


def test_cse_merges_equal_instructions_only():
    def body(x):
        a, b = lax.tanh(x), lax.tanh(x)
        p2, p3 = lax.integer_pow(x, 2), lax.integer_pow(x, 3)
        m = lax.reshape(x, (3, 1))
        s0, s1 = lax.reduce_sum(m, (0,)), lax.reduce_sum(m, (1,))
        return [lax.add(a, b), lax.add(p2, p3), s0, s1]

    fn = build(body)
    first_tanh = fn.instrs[0]
    verify(passes.dce(passes.cse(fn)))
    assert prims(fn).count("tanh") == 1 and fn.instrs[0] is first_tanh
    assert prims(fn).count("integer_pow") == 2 and prims(fn).count("reduce_sum") == 2
    add = fn.outputs[0].instr
    assert add.inputs[0] is add.inputs[1] is first_tanh.out


def test_constant_folding():
    def body(x):
        c = lax.mul(lax.full(2.0, (3,), "f64"), lax.full(3.0, (3,), "f64"))
        e = lax.exp(lax.literal(np.array([0.0, 1.0, 2.0])))
        return lax.add(lax.add(x, c), e)

    fn = optimize(build(body))
    assert "exp" not in prims(fn) and prims(fn).count("add") == 2
    x = np.array([1.0, -1.0, 0.5])
    np.testing.assert_allclose(interpret(fn, [x])[0], x + 6 + np.exp([0.0, 1.0, 2.0]))
    (splat,) = [i for i in fn.instrs if i.prim.name == "const"]
    assert splat.params["value"] == 6.0


def test_slices_of_a_large_literal_fold():
    """A slice or transpose of a literal above the fold limit is folded (it is no larger than the
    literal), so no kernel copies it out on every call; an elementwise op of one is not."""
    from tracejit.ir.passes import FOLD_LIMIT
    n = int(FOLD_LIMIT ** 0.5) + 2
    eye = np.eye(n)

    def body(x):
        part = lax.transpose(lax.slice_(lax.literal(eye), (0, 0), (n, n - 1)), (1, 0))
        rows = lax.slice_(lax.exp(lax.literal(eye)), (0, 0), (n - 1, n))
        return lax.add(x, lax.add(part, rows))

    fn = optimize(build(body, 1, TensorType("f64", (n - 1, n))))
    assert "slice" in prims(fn) and prims(fn).count("transpose") == 0 and "exp" in prims(fn)
    x = np.ones((n - 1, n))
    np.testing.assert_allclose(interpret(fn, [x])[0], x + eye[:, :n - 1].T + np.exp(eye)[:n - 1])


@pytest.mark.parametrize("rewrite", [
    lambda x: lax.mul(x, 1.0), lambda x: lax.mul(1.0, x), lambda x: lax.div(x, 1.0),
    lambda x: lax.add(x, 0.0), lambda x: lax.add(0.0, x), lambda x: lax.sub(x, 0.0),
    lambda x: lax.add(x, lax.zeros((3,), "f64")),
    lambda x: lax.neg(lax.neg(x)), lambda x: lax.integer_pow(x, 1),
    lambda x: lax.select(lax.full(True, (), "bool"), x, lax.exp(x)),
    lambda x: lax.reshape(lax.reshape(x, (1, 3)), (3,)),
    lambda x: lax.reshape(lax.transpose(lax.transpose(lax.reshape(x, (1, 3)), (1, 0)), (1, 0)),
                          (3,)),
    lambda x: lax.mul(lax.add(x, 0.0), 1.0),
], ids=["x*1", "1*x", "x/1", "x+0", "0+x", "x-0", "x+zeros", "--x", "x**1", "select-true",
        "reshape-reshape", "transpose-transpose", "(x+0)*1"])
def test_simplification_to_the_identity(rewrite):
    fn = optimize(build(rewrite))
    assert fn.instrs == [] and fn.outputs[0] is fn.params[0], str(fn)


@pytest.mark.parametrize("body", [
    lambda x: lax.add(x, lax.broadcast_in_dim(lax.reduce_sum(lax.zeros((4, 3), "f64"), (0, 1)),
                                              (3,), ())),
    lambda x: lax.add(x, lax.reduce_sum(lax.zeros((4, 3), "f64"), (0,))),
], ids=["sum-of-zeros-broadcast", "sum-of-zeros"])
def test_sums_of_zeros_disappear(body):
    fn = optimize(build(body))
    assert fn.outputs[0] is fn.params[0] and fn.instrs == []


def test_multiplication_by_zero_is_kept_for_nan_and_inf():
    fn = optimize(build(lambda x: lax.mul(x, 0.0)))
    assert [p for p in prims(fn) if p != "const"] == ["mul"]
    with np.errstate(invalid="ignore"):
        out = interpret(fn, [np.array([np.nan, np.inf, 2.0])])[0]
    np.testing.assert_array_equal(np.isnan(out), [True, True, False])


def test_zero_cotangents_leave_no_trace_in_the_optimized_gradient():
    # the gradient of sum(x * 1 + 0) is a constant: no instruction computes anything from x
    _, grad = trace_ir(lambda x: (x * 1.0 + 0.0).sum(), [np.ones(3)])
    opt = optimize(grad)
    assert prims(opt) == ["reduce_sum", "const"]
    value, dx = interpret(opt, [np.array([1.0, 2.0, 4.0])])
    assert value == 7.0
    np.testing.assert_array_equal(dx, [1.0, 1.0, 1.0])


def test_optimize_keeps_provenance():
    fwd, grad = trace_ir(mlp_loss, GOLDEN_ARGS[mlp_loss], (0, 1))
    opt = optimize(grad)
    locs = {i.loc for i in grad.instrs}
    assert all(i.loc in locs for i in opt.instrs)
    assert any(i.adj_of is not None for i in opt.instrs)
    assert all(i.adj_of is None or i.adj_of in opt.instrs or i.adj_of in grad.instrs
               for i in opt.instrs)


def test_grad_stage_has_no_dead_or_inactive_code():
    def f(x, y):
        tracejit.exp(x)                       # dead: nothing uses it
        return (x * tracejit.sin(y)).sum()    # sin(y) needs no cotangent: y is not differentiated

    g = tracejit.jit_grad(f)
    args = (np.ones(2), np.ones(2))
    assert "exp %x" in g.ir(*args, stage="forward")
    grad = g.ir(*args, stage="grad")
    assert "exp" not in grad and "%y.adj" not in grad and "cos" not in grad
    assert [line.split(" = ")[1].split()[0] for line in grad.splitlines() if "adj of" in line] == \
        ["broadcast_in_dim", "mul"]

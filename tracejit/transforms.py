"""Forward mode and Jacobians: jit_jvp, jacfwd, jacrev, hessian.

Each traces the Python function once per signature (like jit), transforms the traced IR (the
tangent transformation of ir.jvp, the adjoint of ir.adjoint, or both) into one function and
compiles that: one native call per use. Called with tracers inside another trace, they inline
their transformed IR into that trace, so they compose with jit_grad and with each other
(`jit_jvp(jit_grad(f))` is a Hessian-vector product, `hessian = jacfwd(jacrev(f))`).
"""
from __future__ import annotations

import time

import numpy as np

from .ir import lax
from .ir.adjoint import grad_function
from .ir.builder import Builder, building, current, inline
from .ir.core import FLOAT_DTYPES, Function
from .ir.jvp import jvp_function
from .ir.verify import verify

from . import pytree
from .api import Jitted, _Compiled
from .signature import Signature, c_contiguous, check_tracers_alive
from .tracer import Tracer
from .values import to_value, wrap

_NATIVE_STAGES = ("llvm", "llvm-opt", "asm")


class _Transformed(Jitted):
    """A compiled function whose IR is a transformation of the traced function's IR.

    Subclasses define `stage` (the dump stage of the transformed IR) and `_transform(fwd, sig)`."""
    stage = "transformed"

    def __init__(self, fun, argnums=0):
        super().__init__(fun, "jit", argnums)

    def _transform(self, fwd: Function, sig: Signature) -> Function:
        raise NotImplementedError

    def _compile(self, sig: Signature) -> _Compiled:
        t0 = time.perf_counter()
        b = Builder(self.name)
        with building(b):
            outs, out_def, n_value = self._trace(sig, b)
        if b.captured:
            raise TypeError(f"{self.name}: the function uses a traced value from a trace that has "
                            f"ended (a leaked tracer); pass it as an argument instead")
        fwd = verify(b.finish(outs))
        t1 = time.perf_counter()
        transformed = verify(self._transform(fwd, sig))
        return _Compiled(fwd, transformed, out_def, n_value,
                         {"trace": t1 - t0, "passes": time.perf_counter() - t1})

    def _run(self, sig: Signature, extra_leaves=()):
        """(flat results, out_treedef, n_value): the transformed function run on the signature's
        array leaves followed by `extra_leaves`, natively, or inlined into the current trace."""
        if current() is not None or any(isinstance(x, Tracer) for _, _, x in sig.leaves) \
                or any(isinstance(x, Tracer) for x in extra_leaves):
            check_tracers_alive(self.name, sig)
            sub = Builder(self.name)
            with building(sub):
                outs, out_def, n_value = self._trace(sig, sub)
            fwd = sub.finish(outs)
            captured = [t for t, _ in sub.captured.values()]
            transformed = self._transform(fwd, sig)
            inputs = [to_value(x) for _, _, x in sig.leaves] + [to_value(t) for t in captured] + \
                [to_value(x) for x in extra_leaves]
            return [wrap(v) for v in inline(transformed, inputs)], out_def, n_value
        entry = self._lookup(sig)
        arrays = tuple(c_contiguous(x) for _, _, x in sig.leaves) + \
            tuple(c_contiguous(x) for x in extra_leaves)
        return list(entry.executable()(arrays)), entry.out_treedef, entry.n_value_outputs

    def _entry(self, args, kwargs):
        return self._lookup(Signature(self.name, self.arg_names, args, kwargs))

    def _dump(self, entry, stage: str) -> str:
        stages = ("forward", self.stage, "optimized") + _NATIVE_STAGES
        if stage not in stages:
            raise ValueError(f"stage must be one of {', '.join(stages)}, got {stage!r}")
        if stage == "forward":
            return str(entry.forward)
        if stage == self.stage:
            return str(entry.transformed)
        if stage == "optimized":
            from .codegen import describe
            return describe(entry.optimized)
        native = entry.native()
        return {"llvm": native.llvm_ir_unoptimized, "llvm-opt": native.llvm_ir,
                "asm": native.asm}[stage]

    def _graph(self, entry, stage, path):
        from .graph import graph_of_entry
        return graph_of_entry(entry, stage, path, transformed_stage=self.stage)


# ------------------------------------------------------------------------------------------------
# jit_jvp
# ------------------------------------------------------------------------------------------------
class JvpJitted(_Transformed):
    """`jvp_fun(primals, tangents) -> (primals_out, tangents_out)` (see `jit_jvp`)."""
    stage = "jvp"

    def _transform(self, fwd, sig):
        return jvp_function(fwd, range(len(sig.leaves)), name=f"{self.name}.jvp")

    def _split(self, primals, tangents):
        """The primals' signature and the tangents' leaves, checked against each other."""
        for what, v in (("primals", primals), ("tangents", tangents)):
            if not isinstance(v, (tuple, list)):
                raise TypeError(f"{self.name}: jit_jvp expects {what} as a tuple of the function's "
                                f"arguments, got {type(v).__name__}")
        if len(primals) != len(tangents):
            raise TypeError(f"{self.name}: {len(primals)} primals but {len(tangents)} tangents; "
                            f"pass one tangent per argument")
        sig = Signature(self.name, self.arg_names, tuple(primals), {})
        leaves = []
        for i, t in enumerate(tangents):
            name = self._arg_name(i)
            try:
                lv, d = pytree.flatten(t, name, name)
            except TypeError as e:
                raise TypeError(f"{self.name}: tangent {e}") from None
            # tangents need not repeat the primals' static values
            if d.without_static_values() != sig.treedef[i].without_static_values():
                raise TypeError(f"{self.name}: the tangent of argument {name} has the structure "
                                f"{d.describe()}, its primal {sig.treedef[i].describe()}")
            leaves.extend(lv)
        for (path, _, t), ty in zip(leaves, sig.types):
            if isinstance(t, Tracer):
                got = t.value.type
                ok = got == ty
            else:
                ok = t.shape == ty.shape and t.dtype == ty.np_dtype
                got = f"{t.dtype}{list(t.shape)}"
            if not ok:
                raise TypeError(f"{self.name}: the tangent of argument {path} must have its "
                                f"primal's type {ty}, got {got}")
        return sig, [t for _, _, t in leaves]

    def __call__(self, primals, tangents):
        sig, tan_leaves = self._split(primals, tangents)
        results, out_def, n = self._run(sig, tan_leaves)
        return pytree.unflatten(out_def, results[:n]), pytree.unflatten(out_def, results[n:])

    def ir(self, primals, tangents, stage: str = "jvp") -> str:
        """The IR dump at `stage`: "forward", "jvp" (tangents named `%v.tan`), "optimized",
        "llvm", "llvm-opt" or "asm"."""
        return self._dump(self._lookup(self._split(primals, tangents)[0]), stage)

    def graph(self, primals, tangents, stage: str = "jvp", path=None) -> str:
        """The IR at `stage` as Graphviz DOT text (see tracejit.graph)."""
        return self._graph(self._lookup(self._split(primals, tangents)[0]), stage, path)


def jit_jvp(fun):
    """Forward mode: `jvp_fun(primals, tangents) -> (primals_out, tangents_out)`, as jax.jvp.

    `primals` and `tangents` are tuples of the function's positional arguments (pytrees of float
    arrays; static leaves of the primals are matched by any static value, e.g. None); every
    tangent has its primal's shape and dtype. Outputs and their tangents share one structure."""
    return JvpJitted(fun)


# ------------------------------------------------------------------------------------------------
# Jacobians
# ------------------------------------------------------------------------------------------------
class JacobianJitted(_Transformed):
    """The Jacobian of `fun` w.r.t. the arguments `argnums`, by forward ("jacfwd") or reverse
    ("jacrev") mode, compiled into one function. Output: for every output leaf (shape O), the
    arguments' structure (a tuple of them for a tuple `argnums`) with blocks of shape O + I."""

    def __init__(self, fun, mode: str, argnums=0):
        super().__init__(fun, argnums)
        self.stage = mode

    def _check_outputs(self, fwd):
        for o in fwd.outputs:
            if o.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{self.name}: {self.stage} needs float outputs, the function "
                                f"returns {o.type}")

    def _transform(self, fwd, sig):
        self._check_outputs(fwd)
        wrt = self._wrt(sig)
        b = Builder(f"{self.name}.{self.stage}")
        params = [b.add_param(p.type, p.hint) for p in fwd.params]
        with building(b):
            blocks_of = _jacfwd_blocks if self.stage == "jacfwd" else _jacrev_blocks
            blocks = blocks_of(fwd, wrt, params)
        return b.finish(blocks)

    def __call__(self, *args, **kwargs):
        # Jitted's call path: the signature checks, the lookup and, for the next calls with the
        # same shapes, its fast path (a runner that skips the Signature), with `_assembler` below
        # turning the flat blocks into the Jacobian's structure
        self._check_argnums(len(args))
        return super().__call__(*args, **kwargs)

    def _inline(self, sig, args, kwargs):
        results, out_def, n = self._run(sig)
        return self._assembler(sig, out_def, n)(results)

    def _assembler(self, sig, out_def, n_value):
        """Flat results -> for every output leaf, the differentiated arguments' structure of
        Jacobian blocks (a tuple of them for a tuple `argnums`), in the outputs' structure."""
        builders = [sig.treedef[a % sig.n_args].builder() for a in self.argnums]
        single = self.single
        build_out = out_def.builder()

        def assemble(results):
            blocks, out_leaves = iter(results), []
            for _ in range(n_value):
                parts = [b(blocks) for b in builders]
                out_leaves.append(parts[0] if single else tuple(parts))
            return build_out(iter(out_leaves))
        return assemble

    def ir(self, *args, stage: str | None = None, **kwargs) -> str:
        """The IR dump at `stage`: "forward", "jacfwd"/"jacrev" (the default), "optimized",
        "llvm", "llvm-opt" or "asm"."""
        return self._dump(self._entry(args, kwargs), stage or self.stage)

    def graph(self, *args, stage: str | None = None, path=None, **kwargs) -> str:
        return self._graph(self._entry(args, kwargs), stage or self.stage, path)


def _jac_block(t, out_shape, in_shape, offset):
    """Rows offset..offset+size(in) of a [n_in] + out_shape stack of tangents (or gradients laid
    out the same way), as the block out_shape + in_shape of the Jacobian."""
    size = int(np.prod(in_shape, dtype=np.int64))
    rows = lax.slice_(t, (offset,) + (0,) * len(out_shape), (offset + size,) + tuple(out_shape))
    rows = lax.reshape(rows, tuple(in_shape) + tuple(out_shape))
    k = len(in_shape)
    return lax.transpose(rows, tuple(range(k, k + len(out_shape))) + tuple(range(k)))


def _jacfwd_blocks(fwd, wrt, params):
    """All basis tangents in one batched tangent pass: column j of the Jacobian is the tangent
    along unit vector e_j, so the batch of tangents is the identity, split among the inputs."""
    n_in = sum(fwd.params[i].type.size for i in wrt)
    jv = jvp_function(fwd, wrt, batch=n_in)
    basis, offsets, offset = [], [], 0
    for i in wrt:
        p = fwd.params[i]
        eye = np.eye(n_in, p.type.size, k=-offset, dtype=p.type.np_dtype)
        basis.append(lax.reshape(lax.literal(eye), (n_in,) + p.shape))
        offsets.append(offset)
        offset += p.type.size
    outs = inline(jv, list(params) + basis)
    n_out = len(fwd.outputs)
    return [_jac_block(t, o.shape, fwd.params[i].shape, off)
            for o, t in zip(fwd.outputs, outs[n_out:])
            for i, off in zip(wrt, offsets)]


def _jacrev_blocks(fwd, wrt, params):
    """All rows of the Jacobian in one batched reverse pass. The gradient of L(x, u) = <f(x), u>
    is J(x)^T u, linear in the cotangent u; its tangent along u = e_k is row k. So the adjoint
    function, built once with u as a parameter, is pushed through one batched tangent pass along
    all basis cotangents: every adjoint instruction runs once on a [n_out] batch of cotangents,
    and the primal part of that pass (the adjoint at u = 0) is dead code. A function of one
    output of one element (a loss) has one row, its gradient: see `_gradient_blocks`."""
    if len(fwd.outputs) == 1 and fwd.outputs[0].type.size == 1:
        return _gradient_blocks(fwd, wrt, params)
    b = Builder(f"{fwd.name}.vjp")
    xs = [b.add_param(p.type, p.hint) for p in fwd.params]
    us = [b.add_param(o.type, f"ct{k}") for k, o in enumerate(fwd.outputs)]
    with building(b):
        ys = inline(fwd, xs)
        terms = [lax.reduce_sum(lax.mul(y, u)) for y, u in zip(ys, us)]
        if len({t.dtype for t in terms}) > 1:  # f32 and f64 outputs: sum in f64
            terms = [lax.convert(t, "f64") for t in terms]
        loss = terms[0]
        for t in terms[1:]:
            loss = lax.add(loss, t)
    vjp = grad_function(b.finish([loss]), wrt)
    n_out = sum(o.type.size for o in fwd.outputs)
    u_params = range(len(xs), len(xs) + len(us))
    pulled = jvp_function(vjp, u_params, batch=n_out)
    basis, offsets, offset = [], [], 0
    for o in fwd.outputs:
        eye = np.eye(n_out, o.type.size, k=-offset, dtype=o.type.np_dtype)
        basis.append(lax.reshape(lax.literal(eye), (n_out,) + o.shape))
        offsets.append(offset)
        offset += o.type.size
    zeros = [lax.zeros(o.shape, o.dtype) for o in fwd.outputs]
    outs = inline(pulled, list(params) + zeros + basis)
    rows = outs[len(vjp.outputs) + 1:]  # the tangents of the gradients, [n_out] + input shape
    blocks = []
    for o, off in zip(fwd.outputs, offsets):
        for i, r in zip(wrt, rows):
            shape = fwd.params[i].shape
            part = lax.slice_(r, (off,) + (0,) * len(shape), (off + o.type.size,) + shape)
            blocks.append(lax.reshape(part, o.shape + shape))
    return blocks


def _gradient_blocks(fwd, wrt, params):
    """The Jacobian of a function with one output of one element: the plain adjoint, its blocks
    shaped out_shape + in_shape. (A batched pass of batch 1 gives the same numbers with a size-1
    axis on every adjoint value, which a Hessian's tangent pass then carries through each of its
    kernels as one more batch axis.)"""
    b = Builder(f"{fwd.name}.vjp")
    xs = [b.add_param(p.type, p.hint) for p in fwd.params]
    with building(b):
        (y,) = inline(fwd, xs)
        loss = lax.reshape(y, ()) if y.shape else y
    outs = inline(grad_function(b.finish([loss]), wrt), list(params))
    out_shape = fwd.outputs[0].shape
    return [lax.reshape(g, out_shape + fwd.params[i].shape) for i, g in zip(wrt, outs[1:])]


def jacfwd(fun, argnums=0):
    """The Jacobian of `fun` w.r.t. argument(s) `argnums` by forward mode (jax.jacfwd): every
    basis tangent in one batched tangent pass, compiled into one function."""
    return JacobianJitted(fun, "jacfwd", argnums)


def jacrev(fun, argnums=0):
    """The Jacobian of `fun` w.r.t. argument(s) `argnums` by reverse mode (jax.jacrev): all basis
    cotangents pulled back through one batched adjoint pass, compiled into one function."""
    return JacobianJitted(fun, "jacrev", argnums)


def hessian(fun, argnums=0):
    """The Hessian of scalar `fun` (jax.hessian): forward over reverse, jacfwd(jacrev(fun))."""
    return jacfwd(jacrev(fun, argnums), argnums)

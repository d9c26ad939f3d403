"""Batched and small matmuls: every broadcast pattern of the batch axes (an operand without batch
axes, size-1 axes on either side) with every transpose combination, on shapes whose columns end
inside a vector (N = 10 of a Hessian's hidden layer, N < VL - 1, a full tile plus a tail) and a K
past one block, against the interpreter's numpy reference (output NaN-filled, every thread
count: see test_kernels_dense.check_all)."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tracejit
from test_kernels_dense import NP, Kernels, reference
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType
from tracejit.ir.builder import emit
from tracejit.ir.prims.linalg import matmul_p

pytestmark = pytest.mark.needs_llvm

# (M, N, K); N == 1 or M == 1: the matrix-vector kernels, with a K (or N) tail
SHAPES = [(13, 10, 8), (5, 2, 3), (7, 19, 130), (6, 5, 1), (29, 1, 10), (1, 10, 7), (11, 1, 3)]
BATCHES = [((4,), ()), ((), (4,)), ((2, 1), (3,)), ((3,), (3,))]   # (A's, B's batch axes)


def _instrs(dtype):
    """One matmul_p instruction per spec (emitted as is: lax.matmul would fold a batch of A
    over an unbatched B into a 2-d product)."""
    return [_matmul_instr(dtype, a, b, **params) for a, b, params in _specs()]


def _matmul_instr(dtype, a_shape, b_shape, **params):
    with building(Builder("t")) as bld:
        pa, pb = (bld.add_param(TensorType(dtype, s)) for s in (a_shape, b_shape))
        return emit(matmul_p, pa, pb, **params).instr


def _specs():
    specs = []
    for i, (ta, tb) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
        for j, (ba, bb) in enumerate(BATCHES):
            for shift in (0, 3):   # each shape meets each pattern and most transposes
                m, n, k = SHAPES[(i + j + shift) % len(SHAPES)]
                a = ba + ((k, m) if ta else (m, k))
                b = bb + ((n, k) if tb else (k, n))
                specs.append((a, b, dict(trans_a=ta, trans_b=tb)))
    # batches of vectors times a shared matrix, over two batch axes (one 2-d product each)
    for ta, tb in [(False, False), (True, True), (True, False), (False, True)]:
        specs.append(((9, 5) if ta else (5, 9), (2, 3) + ((1, 9) if tb else (9, 1)),
                      dict(trans_a=ta, trans_b=tb)))
        specs.append(((2, 3) + ((9, 1) if ta else (1, 9)), (6, 9) if tb else (9, 6),
                      dict(trans_a=ta, trans_b=tb)))
    return specs


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_batched_matmul_broadcast_and_transposes(dtype):
    instrs = _instrs(dtype)
    ks = Kernels(instrs)
    rng = np.random.default_rng(0)
    for i, ins in enumerate(instrs):
        arrays = [rng.standard_normal(v.shape).astype(NP[dtype]) for v in ins.inputs]
        ref, tol = reference(ins, arrays)
        for nt, order in [(1, [0]), (2, [0, 1]), (2, [1, 0]), (3, [2, 0, 1])]:
            got = ks.call(i, arrays, nt, order)
            bad = ~(np.abs(got - ref) <= tol)
            assert not bad.any(), (f"{[v.shape for v in ins.inputs]} {ins.params} {dtype} "
                                   f"threads {order}: {bad.sum()} of {bad.size} wrong")


def _function_body(text: str, prefix: str) -> str:
    start = re.search(r"define [^\n]*@\"?" + re.escape(prefix), text)
    assert start, f"no function {prefix}* in the LLVM IR"
    return text[start.start():text.index("\n}", start.start())]


def test_partial_column_tile_has_no_masked_stores_or_loads_in_its_k_loop():
    """x [32, 8] @ W [100, 8, 10] (a Hessian's tangent of a hidden layer) and w [1, 32] @ A [32,
    10]: their 10 columns are one partial tile of the outer form and of the matrix-vector axpy
    kernel. The tile's stores are plain narrow stores (a masked store is microcoded on AVX2
    machines such as znver1) and its K loop loads rows without masks. The outer form's partial
    tile runs the whole tiles' K loop (the last rows of B, which may end B's buffer, are copied
    masked into a small panel: compile time); the axpy kernel loads its last row masked in a
    loop of its own. The dot kernel's partial tile stores plainly too."""
    x, w = np.ones((32, 8), np.float32), np.ones((100, 8, 10), np.float32)
    v, a, m = np.ones((1, 32), np.float32), np.ones((32, 10), np.float32), np.ones((29, 8))
    text = tracejit.jit(lambda x, w, v, a, m: (x @ w, v @ a, m @ m[0])).ir(
        x, w, v, a, m.astype(np.float32), stage="llvm")
    for form, tail, last in [("outer", "matmul.k.body", None),
                             ("mv_axpy", "matmul.mv.k.tail.body", "matmul.mv.k.last.body")]:
        body = _function_body(text, f"tracejit.matmul.form{form}")
        assert "llvm.masked.store" not in body, form
        blocks = re.split(r"\n(?=[\w.\"]+:)", body)
        k_tail = [blk for blk in blocks if blk.lstrip('"').startswith(tail)]
        assert k_tail and not any("llvm.masked.load" in blk for blk in k_tail), form
        if last is None:   # one K loop, for the whole tiles and the partial tile alike
            k_loops = {blk.lstrip('"').split(":")[0] for blk in blocks
                       if re.match(r'"?matmul\.k(\.\w+)?\.body', blk)}
            assert k_loops == {"matmul.k.body"}, k_loops
        else:
            assert any("llvm.masked.load" in blk for blk in blocks
                       if blk.lstrip('"').startswith(last)), form
    assert "llvm.masked.store" not in _function_body(text, "tracejit.matmul.formmv_dot")


def test_short_m_takes_its_own_row_block_only_when_clamped_rows_waste_a_quarter():
    """A short M whose full row block computes a quarter or more of clamped rows (a Hessian's
    x^T @ g: M = 8, MR = 6 computed 12 rows for 8) is cut into row blocks that add none; a
    smaller waste (M = 10: 12 rows, M = 32: 36) keeps the full block, whose tile function the
    module compiles anyway (another block's costs ~0.2 s of LLVM); a long M keeps it too."""
    from tracejit.codegen.kernels.matmul import _plan
    from tracejit.codegen.target import vector_registers
    plans = [_plan(_matmul_instr("f32", (100, 32, m), (100, 32, 10), trans_a=True))
             for m in (8, 10, 32)]
    assert all(p.form == "outer" for p in plans)
    # the machine's full block for N = 10 (one vector of columns on AVX-512, two on AVX2):
    # 12 rows (24 accumulators) or 6 (12)
    full = _plan(_matmul_instr("f32", (256, 64), (64, 10))).mr
    assert full == (12 if vector_registers() >= 32 else 6), full
    short = plans[0].mr
    assert short < full and 8 % short == 0, [p.mr for p in plans]   # M = 8: no clamped rows
    assert [p.mr for p in plans[1:]] == [full, full], [p.mr for p in plans]


def test_batch_of_vectors_times_a_shared_matrix_is_one_product():
    """op(A) b_t over a batch of vectors b_t (a Hessian's [32, 10] @ [100, 10, 1]) and a_t op(B)
    run as one 2-d product on the same buffers, not as 100 matrix-vector products."""
    from tracejit.codegen.kernels.matmul import _plan
    for a, b, params in [((32, 10), (100, 10, 1), {}), ((32, 10), (100, 32, 1), dict(trans_a=True)),
                         ((100, 1, 10), (32, 10), dict(trans_b=True))]:
        p = _plan(_matmul_instr("f32", a, b, **params))
        assert p.batch == () and p.m == 100 and p.n in (10, 32), (a, b, p)

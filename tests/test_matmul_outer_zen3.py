"""The outer form's choices for 16 vector registers (AVX2: Zen 3 and the like): B's panels
copied whenever enough row tiles share them (pack mode "shared", decided per call of the tile
function from the rows it computes) and K blocks of OUTER_KC_AVX2 rows. Compiled for the AVX2
level whatever the host (the `avx2_target` fixture), checked against numpy in float64 on 1-3
threads (tids in both orders), at the edges: rows just below and at the copy threshold, partial
column tiles, K blocks with a partial last one, transposed A, batches and epilogues; and the
same bits wherever the operands lie or however many threads share the work."""
import numpy as np
import pytest

import helpers
import tracejit
from test_alignment_determinism import _same_bits_at_every_offset
from test_kernels_dense import check_all, make_instr
from tracejit.codegen import target
from tracejit.codegen.kernels import matmul

pytestmark = [pytest.mark.needs_llvm, pytest.mark.usefixtures("avx2_target")]


@pytest.fixture(autouse=True)
def _is_avx2(avx2_target):
    assert target.vector_registers() == 16


def _threshold_rows():
    """The fewest rows of C a call copies B's panels for (the 6 x 2 block's row tiles)."""
    return matmul.AUTO_PACK_TILES * 6


def test_plan_copies_b_when_rows_share_it_and_blocks_k_by_256():
    p = matmul._plan(make_instr("matmul", [(1024, 256), (256, 256)], "f32"))
    assert (p.form, p.pack, p.mr, p.nr) == ("outer", "shared", 6, 2)
    p = matmul._plan(make_instr("matmul", [(1024, 256), (1024, 256)], "f32", trans_a=True))
    assert (p.form, p.pack) == ("outer", "shared")
    assert matmul._outer_kc() == matmul.OUTER_KC_AVX2 == 256
    # one panel of 256 rows x 16 floats a thread (K = 1024), rounded to lines
    ins = make_instr("matmul", [(1024, 256), (1024, 256)], "f32", trans_a=True)
    assert matmul._matmul_scratch(ins, 2) == 2 * 256 * 16 * 4
    # a K shorter than the block takes a panel of K rows
    ins = make_instr("matmul", [(64, 100), (100, 40)], "f32")
    assert matmul._matmul_scratch(ins, 1) == -(-100 * 16 * 4 // 64) * 64


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_copied_panels_at_the_edges(dtype):
    t = _threshold_rows()
    specs = [
        ("matmul", [(t - 1, 40), (40, 37)], {}),        # one row short of copying: in place
        ("matmul", [(t, 40), (40, 37)], {}),            # the first that copies, partial tile
        ("matmul", [(t + 5, 257), (257, 16)], {}),      # a K block of one row after 256
        ("matmul", [(50, 513), (513, 33)], {}),         # three K blocks, the last of one row
        ("matmul", [(300, 70), (300, 45)], dict(trans_a=True)),   # x^T @ dy, K > 256
        ("matmul", [(520, 61), (520, 24)], dict(trans_a=True)),   # partial blocks both ways
        ("matmul", [(3, 40, 30), (3, 30, 19)], {}),    # batched: 40 rows an entry
        ("matmul", [(2, 45, 300), (2, 300, 7)], {}),   # batched, N < VL, K blocks
        ("matmul", [(64, 256), (256, 256)], {}),       # whole tiles only
    ]
    ks = check_all(specs, dtype)
    assert {matmul._plan(ins).pack for ins in ks.instrs} == {"shared"}


def test_copied_panels_on_the_pool_grid():
    """Big enough for the pool's grid of column and row groups: each chunk decides from its
    own rows whether it copies (fewer than the threshold in some chunks of 7)."""
    specs = [("matmul", [(130, 300), (300, 100)], {}),
             ("matmul", [(400, 130), (400, 90)], dict(trans_a=True))]
    check_all(specs, "f32", thread_counts=(2, 5, 7))


def test_same_bits_wherever_the_operands_lie_and_on_any_thread_count():
    rng = np.random.default_rng(3)
    x, dy, w = (rng.standard_normal(s).astype(np.float32)
                for s in ((600, 136), (600, 72), (136, 72)))
    wgrad = tracejit.jit(lambda a, b: a.T @ b)
    proj = tracejit.jit(lambda a, b: a @ b)
    ref_w = _same_bits_at_every_offset(wgrad, [x, dy])
    ref_p = _same_bits_at_every_offset(proj, [x, w])
    np.testing.assert_allclose(ref_w, x.astype(np.float64).T @ dy, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ref_p, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-3)
    old = tracejit.get_num_threads()
    try:
        for nt in (1, 2):
            tracejit.set_num_threads(nt)
            assert np.asarray(tracejit.jit(lambda a, b: a.T @ b)(x, dy)).tobytes() \
                == np.asarray(ref_w).tobytes(), nt
            assert np.asarray(tracejit.jit(lambda a, b: a @ b)(x, w)).tobytes() \
                == np.asarray(ref_p).tobytes(), nt
    finally:
        tracejit.set_num_threads(old)


def test_attention_block_gradient_matches_the_interpreter():
    """Products of attention's shapes, scaled down (the projections' x @ W, the weight
    gradients x^T @ dy and the heads' batches), in a gradient with an epilogue."""
    def loss(w, x):
        h = tracejit.tanh(x @ w)
        q = h.reshape(4, 40, 128)
        s = q @ q.transpose(0, 2, 1)
        return (s * s).sum()

    rng = np.random.default_rng(5)
    args = [rng.standard_normal((64, 128)).astype(np.float32) * 0.1,
            rng.standard_normal((160, 64)).astype(np.float32)]
    helpers.check_native_matches_interpreter(loss, args, "attention-like", argnums=(0, 1),
                                             threads=(1, 2))

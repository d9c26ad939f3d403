"""The kernels' AVX2 choices (16 vector registers, 256-bit vectors: register blocks, lanes,
passes), whatever the host: CI runs the suite once, on its own machine's target, and an AVX-512
host would otherwise never run the blocks tuned for AVX2 machines. Compiled for the x86-64-v3
level (the `avx2_target` fixture, which an AVX-512 host runs too), against the reference
interpreter: the differential kernel fuzz's programs (tests/test_fuzz_kernels.py) at seeds that
take the AVX2 blocks, the guard-page fuzz of the dense kernels (tests/test_fuzz_guard_pages.py: a
read or write past a buffer faults), and whole models' gradients (tests/corpus.py: an MLP,
LeNet-5, a depthwise-separable CNN, a residual block; convolutions, max and average pooling) in
float32 and float64. (Each check compiles afresh: a jitted function keeps the code of its first
compile, whatever TRACEJIT_TARGET says later.)"""
import re

import pytest

import corpus
import helpers
import test_fuzz_guard_pages as guard
import test_fuzz_kernels as fuzz
import tracejit
from tracejit.codegen import target

pytestmark = [pytest.mark.needs_llvm, pytest.mark.usefixtures("avx2_target")]

MODELS = ["mlp_tanh_mse", "lenet5", "depthwise_separable_cnn", "resnet_block"]


@pytest.fixture(autouse=True)
def _is_avx2(avx2_target):
    assert target.vector_registers() == 16 and target.vector_width(32) == 8


# test_fuzz_kernels' CI seeds, then products whose M and N span several of AVX2's 4x3 register
# blocks with partial ones (f32 and f64, transposes, broadcast batches, epilogues)
@pytest.mark.parametrize("seed", [1, 9, 12, 68, 124, 210, 218, 255])
def test_matmul_programs(seed):
    fuzz.check("matmul", seed)


# CI's seeds; seed 247's input gradient in both forms (their code once shared a cache entry and
# overran the core's scratch: test_cache); 4 output channels with 3x3-5x5 kernels
@pytest.mark.parametrize("seed,force", [(4, True), (21, False), (247, True), (247, False),
                                        (124, True), (138, False), (249, False)])
def test_conv_programs(seed, force):
    fuzz.check("conv", seed, force)


def test_kernels_never_touch_past_their_buffers(tmp_path):
    guard.test_kernels_never_touch_past_their_buffers(tmp_path)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("name", MODELS)
def test_model_gradients(name, dtype):
    prog = next(p for p in corpus.PROGRAMS if p.name == name)
    helpers.check_native_matches_interpreter(
        corpus.traceable(prog), helpers.program_args(prog, dtype), f"{name} {dtype}",
        argnums=prog.argnums, threads=(1, 2))


def test_the_code_is_avx2_code():
    prog = next(p for p in corpus.PROGRAMS if p.name == "resnet_block")
    args = helpers.program_args(prog, "f32")
    asm = tracejit.jit_grad(corpus.traceable(prog), argnums=prog.argnums).ir(*args, stage="asm")
    assert re.search(r"%ymm\d+", asm) and not re.search(r"%zmm\d+", asm)

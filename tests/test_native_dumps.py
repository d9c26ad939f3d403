"""The generated code, read back: vector FMAs in the convolution and matmul kernels, loop-named
LLVM blocks, the kernels and saved buffers in the optimized dump, and fusion (no intermediate
buffers for an elementwise chain; bias + relu inside the matmul/conv kernel)."""
import re

import numpy as np
import pytest

import tracejit
from tracejit.codegen.target import host_info
from tracejit import nn

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

RNG = np.random.default_rng(0)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _conv_loss(x, w, b):
    return nn.relu(nn.conv2d(x, w, b, padding=1)).sum()


def _dense_loss(x, w, b):
    return nn.relu(nn.linear(x, w, b)).sum()


CONV_ARGS = (_f32(4, 16, 12, 12), _f32(32, 16, 3, 3), _f32(32))
# outputs above schedule.SMALL_VALUE elements, which small-value recomputation would otherwise
# spread over several loops instead of one epilogue
DENSE_ARGS = (_f32(64, 96), _f32(80, 96), _f32(80))
VECTOR_FMA = re.compile(r"\bvfmadd\w*ps\s+.*%(zmm|ymm)\d+")
# the widest vector registers of the host, as LLVM sees its features (what the code is built for)
WIDE_REG = "zmm" if host_info()["avx512"] else "ymm"


@pytest.mark.parametrize("fun,args", [(_conv_loss, CONV_ARGS), (_dense_loss, DENSE_ARGS)],
                         ids=["conv2d", "matmul"])
def test_assembly_has_vector_fma(fun, args):
    asm = tracejit.jit_grad(fun, argnums=(1, 2)).ir(*args, stage="asm")
    fmas = [line for line in asm.splitlines() if VECTOR_FMA.search(line)]
    assert len(fmas) >= 8, "expected vector FMA instructions in the kernels"
    assert any(f"%{WIDE_REG}" in line for line in fmas), f"expected FMAs on {WIDE_REG} registers"
    if WIDE_REG == "ymm":  # no AVX-512: 512-bit registers would not run here
        assert "%zmm" not in asm


def test_llvm_blocks_are_named_after_loops():
    llvm_ir = tracejit.jit_grad(lambda x: (tracejit.tanh(x) * x).sum()).ir(_f32(5, 7),
                                                                          stage="llvm")
    assert re.search(r"^entry:", llvm_ir, re.M)
    # a fused loop over the flattened elements (add.i), the reduction's loops (reduce_sum.d0)
    assert re.search(r'^"?\w+\.i\.body"?:', llvm_ir, re.M), llvm_ir[:3000]
    assert re.search(r'^"?reduce_sum\.d0\.body"?:', llvm_ir, re.M), llvm_ir[:3000]


def test_optimized_dump_lists_kernels_and_saved_buffers():
    dump = tracejit.jit_grad(_dense_loss, argnums=(1, 2)).ir(*DENSE_ARGS, stage="optimized")
    assert re.search(r"// kernel k0: loop nest matmul", dump)
    assert re.search(r"// \d+ kernels \(\d+ fused loops, \d+ loop nests\)", dump)
    m = re.search(r"// saved for the backward pass: (\d+) bytes", dump)
    assert m and int(m.group(1)) > 0
    for line in dump.splitlines():
        if line.strip().startswith("%") or line.strip().startswith("["):
            assert re.match(r"\s*\[(k\d+| +)\] %", line), line


def test_elementwise_chain_is_one_loop():
    def chain(x, y):
        return (tracejit.exp(-x * x) * tracejit.tanh(y) + nn.sigmoid(x * y) - 1.0) ** 2

    f = tracejit.jit(chain)
    x, y = _f32(33, 17), _f32(33, 17)
    dump = f.ir(x, y, stage="optimized")
    assert "// 1 kernels (1 fused loops, 0 loop nests); intermediate arena 0 bytes" in dump
    np.testing.assert_allclose(f(x, y), chain(x.astype(np.float64), y.astype(np.float64)),
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("fun,args,nn_prim", [(_conv_loss, CONV_ARGS, "conv2d"),
                                               (_dense_loss, DENSE_ARGS, "matmul")],
                         ids=["conv2d", "matmul"])
def test_bias_relu_fused_into_producer(fun, args, nn_prim):
    dump = tracejit.jit_grad(fun, argnums=(1, 2)).ir(*args, stage="optimized")
    head = next(line for line in dump.splitlines() if f"loop nest {nn_prim}" in line)
    assert "epilogue" in head and "add" in head and "select" in head, head


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_optimized_dump_shows_the_plan_that_runs(threads, monkeypatch):
    """The "optimized" dump's kernels and arena are those of the compiled code, for the thread
    count in force (each thread's scratch is part of the arena)."""
    from tracejit.codegen import schedule
    monkeypatch.setenv("TRACEJIT_NUM_THREADS", threads)
    f = tracejit.jit_grad(lambda w, x: nn.max_pool2d(nn.relu(nn.conv2d(x, w, padding=1)), 2).sum())
    w = np.ones((4, 2, 3, 3), np.float32)
    x = np.ones((2, 2, 8, 8), np.float32)
    dump = f.ir(w, x, stage="optimized")
    native = f._lookup(tracejit.signature.Signature(f.name, f.arg_names, (w, x), {})).native()
    assert native.max_threads == int(threads)
    assert dump.endswith(schedule.summary(native.plan)), (dump, schedule.summary(native.plan))


def test_tiny_fused_loops_stay_scalar():
    """A fused loop over a few hundred elements (a bias gradient's column sum, an elementwise map)
    is left scalar: vectorizing it costs LLVM ~10 ms a loop and saves nanoseconds. A larger one
    is still vectorized."""
    def f(x, y, z):
        return x.sum(0), tracejit.exp(y) * 2.0, z.sum(0)
    args = (_f32(64, 10), _f32(8, 10), _f32(64, 40))
    jf = tracejit.jit(f)
    funcs = dict(re.findall(r'define [^@]*@"?([\w.]+)"?\((.*?\n)}', jf.ir(*args, stage="llvm-opt"),
                            re.S))
    vectors = {name.split(".")[0]: len(re.findall(r"<\d+ x float>", body))
               for name, body in funcs.items() if name.startswith("k")}
    assert vectors["k0"] == 0 and vectors["k1"] == 0, vectors
    assert vectors["k2"] > 0, vectors
    for got, want in zip(jf(*args), (args[0].sum(0), np.exp(args[1]) * 2.0, args[2].sum(0))):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

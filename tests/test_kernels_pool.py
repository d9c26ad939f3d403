"""The pooling kernels (codegen/kernels/pool.py), compiled standalone through JITModule and called
with numpy buffers, against the reference interpreter (ir/prims/nn.py).

Indices must agree bit for bit, values up to float rounding. Inputs are small integers, so windows
hold ties, plus NaNs and infinities. Outputs start as NaN (or a sentinel index) and two threads
each run their share, so an element no thread writes shows up.
"""
from __future__ import annotations

import ctypes
import re
import zlib

import llvmlite.ir as llir
import numpy as np
import pytest

import tracejit
from tracejit.codegen.kernels import _load_all, kernels
from tracejit.codegen.kernels.pool import lower_max_pool2d_with_argmax
from tracejit.codegen.target import JITModule, host_info
from tracejit.ir import lax
from tracejit.ir.builder import Builder, building
from tracejit.ir.core import TensorType
from tracejit.ir.interpreter import impls
from tracejit import nn

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

_load_all()

PRIMS = ("max_pool2d", "max_pool2d_argmax", "avg_pool2d", "max_pool2d_grad", "max_pool2d_gather",
         "avg_pool2d_grad")

# (x shape, kernel, stride, padding)
CONFIGS = [
    ((3, 2, 24, 24), 2, 2, 0),                # LeNet's first pooling: one output row per vector
    ((2, 3, 8, 8), 2, 2, 0),                  # LeNet's second: four output rows per vector
    ((1, 1, 1, 1), 1, 1, 0),                  # 1-element everything
    ((1, 1, 1, 5), (1, 2), (1, 2), (0, 1)),
    ((1, 2, 5, 5), 5, 1, 2),                  # padding = kernel // 2, stride 1
    ((3, 1, 7, 9), 3, 2, 1),                  # overlapping windows with padding
    ((2, 2, 11, 13), (3, 2), (1, 3), (1, 1)),
    ((1, 3, 6, 40), 2, 2, 0),                 # two column chunks and a tail
    ((1, 2, 9, 35), 3, 3, 1),
    ((2, 1, 13, 4), 4, 2, 2),
    ((1, 1, 2, 2), 2, 1, 1),                  # more outputs than inputs
    ((1, 4, 10, 10), 2, 3, 0),                # stride > kernel: inputs no window reads
    ((1, 2, 12, 12), 3, 3, 0),                # blocks of 3x3, rows packed
    ((1, 1, 17, 33), 5, 3, 2),
    ((2, 3, 7, 7), 2, 2, 0),                  # odd size: the last row/column is dropped
    ((1, 2, 9, 6), 3, 2, 0),                  # packed rows that overlap
    ((2, 2, 10, 8), 2, 2, 0),                 # packed rows, the last group short
    ((1, 2, 5, 30), 3, 1, 1),                 # stride 1 with padding: plain loads inside, masks at the edges
    ((1, 1, 6, 45), 3, 2, 1),                 # strided rows with padding, interior chunks and a tail
]


def _random_configs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        k = tuple(int(v) for v in rng.integers(1, 6, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        p = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
        hw = tuple(int(rng.integers(max(1, kk - 2 * pp), 21)) for kk, pp in zip(k, p))
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 4))) + hw
        out.append((shape, k, s, p))
    return out


CONFIGS += _random_configs(10)


def _trace(prim, shape, dtype, kernel, stride, padding):
    """The instruction of `prim` for pooling x[shape]; its inputs are parameters."""
    with building(Builder("t")) as b:
        x = b.add_param(TensorType(dtype, shape))
        if prim in ("max_pool2d", "max_pool2d_argmax", "avg_pool2d"):
            return getattr(lax, prim)(x, kernel, stride, padding).instr
        idx = lax.max_pool2d_argmax(x, kernel, stride, padding)
        ct = b.add_param(TensorType(dtype, idx.type.shape))
        if prim == "max_pool2d_grad":
            return lax.max_pool2d_grad(ct, idx, shape[2:]).instr
        if prim == "max_pool2d_gather":
            return lax.max_pool2d_gather(x, idx).instr
        return lax.avg_pool2d_grad(ct, shape[2:], kernel, stride, padding).instr


class _Kernels:
    """Several kernels compiled in one module; call(name, out, *inputs, nthreads)."""

    def __init__(self, lowerings):
        mod = llir.Module()
        for name, lower in lowerings.items():
            lower(mod, name)
        self.jit = JITModule(str(mod), list(lowerings))
        self._fns = {}

    def call(self, name, out, *inputs, nthreads=2):
        n_ptrs = 1 + len(inputs) + 1
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * n_ptrs, ctypes.c_int64,
                                                    ctypes.c_int64)(self.jit.addresses[name])
        for a in (out,) + inputs:
            assert a.flags.c_contiguous
        for tid in range(nthreads):
            fn(out.ctypes.data, *[a.ctypes.data for a in inputs], None, tid, nthreads)
        return out


def _compile(instrs):
    return _Kernels({name: (lambda mod, nm, ins=ins: kernels[ins.prim].lower(mod, nm, ins))
                     for name, ins in instrs.items()})


def _empty(ins):
    t = ins.out.type
    return np.full(t.shape, -12345 if t.dtype == "i32" else np.nan, dtype=t.np_dtype)


def _inputs(rng, shape, dtype, specials):
    """Small integers (ties in every window), with NaN and +-inf sprinkled in if asked."""
    x = rng.integers(-2, 3, size=shape).astype(dtype)
    if specials:
        flat = x.reshape(-1)
        pick = rng.random(flat.size)
        flat[pick < 0.05] = np.nan
        if specials == "inf":
            flat[(pick >= 0.05) & (pick < 0.08)] = np.inf
            flat[(pick >= 0.08) & (pick < 0.11)] = -np.inf
    return x


def _check(out, ref, dtype):
    if out.dtype == np.int32:
        np.testing.assert_array_equal(out, ref)
    else:
        rtol = 1e-5 if dtype == "f32" else 1e-12
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value")   # inf - inf in the reference's sums
@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c[0])) +
                         f"-k{c[1]}-s{c[2]}-p{c[3]}")
def test_pool_kernels_match_interpreter(config, dtype):
    shape, kernel, stride, padding = config
    instrs = {prim: _trace(prim, shape, dtype, kernel, stride, padding) for prim in PRIMS}
    ks = _compile(instrs)
    rng = np.random.default_rng(zlib.crc32(repr(config + (dtype,)).encode()))
    npdt = np.dtype("float32" if dtype == "f32" else "float64")
    no_padding = all(p == 0 for p in np.broadcast_to(padding, 2))
    for specials in (None, "inf" if no_padding else "nan"):
        x = _inputs(rng, shape, npdt, specials)
        for prim in ("max_pool2d", "max_pool2d_argmax", "avg_pool2d"):
            ins = instrs[prim]
            _check(ks.call(prim, _empty(ins), x), impls[ins.prim](x, **ins.params), dtype)
        # the backward kernels, with the indices of x (first maxima among ties)
        argmax = instrs["max_pool2d_argmax"]
        idx = impls[argmax.prim](x, **argmax.params)
        ct = rng.standard_normal(idx.shape).astype(npdt)
        g = rng.standard_normal(shape).astype(npdt)
        for prim, args in (("max_pool2d_grad", (ct, idx)), ("max_pool2d_gather", (g, idx)),
                           ("avg_pool2d_grad", (ct,))):
            ins = instrs[prim]
            _check(ks.call(prim, _empty(ins), *args), impls[ins.prim](*args, **ins.params), dtype)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[5], CONFIGS[3]],
                         ids=["rows", "packed", "overlap", "thin"])
def test_indices_anywhere_in_the_plane(config):
    """max_pool2d_grad/_gather take any indices, not only those in the output's own window:
    repeated ones accumulate, ones outside the plane are skipped (grad) or read as 0 (gather)."""
    shape, kernel, stride, padding = config
    instrs = {p: _trace(p, shape, "f64", kernel, stride, padding)
              for p in ("max_pool2d_grad", "max_pool2d_gather")}
    ks = _compile(instrs)
    rng = np.random.default_rng(1)
    hw = shape[2] * shape[3]
    oshape = instrs["max_pool2d_grad"].inputs[0].type.shape
    for bad in (False, True):
        idx = rng.integers(0, hw, size=oshape).astype(np.int32)
        if bad:
            flat = idx.reshape(-1)
            flat[::3] = -1
            flat[1::7] = hw
        ok = (idx >= 0) & (idx < hw)
        ct = rng.standard_normal(oshape)
        g = rng.standard_normal(shape)
        grad = instrs["max_pool2d_grad"]
        ref = impls[grad.prim](np.where(ok, ct, 0.0), np.where(ok, idx, 0).astype(np.int32),
                               **grad.params)
        _check(ks.call("max_pool2d_grad", _empty(grad), ct, idx), ref, "f64")
        gather = instrs["max_pool2d_gather"]
        ref = np.where(ok, impls[gather.prim](g, np.where(ok, idx, 0).astype(np.int32)), 0.0)
        _check(ks.call("max_pool2d_gather", _empty(gather), g, idx), ref, "f64")


def test_padding_never_wins():
    """A window whose real elements are all -inf: max -inf, argmax its first real element (the
    numpy reference would name the padding in front of it)."""
    shape = (1, 2, 5, 6)
    instrs = {p: _trace(p, shape, "f32", 3, 2, 1) for p in ("max_pool2d", "max_pool2d_argmax")}
    ks = _compile(instrs)
    x = np.full(shape, -np.inf, np.float32)
    np.testing.assert_array_equal(ks.call("max_pool2d", _empty(instrs["max_pool2d"]), x), -np.inf)
    idx = ks.call("max_pool2d_argmax", _empty(instrs["max_pool2d_argmax"]), x)
    rows = np.maximum(np.arange(3) * 2 - 1, 0)[:, None]
    cols = np.maximum(np.arange(3) * 2 - 1, 0)[None, :]
    np.testing.assert_array_equal(idx, np.broadcast_to(rows * 6 + cols, idx.shape))


def test_nan_is_the_max_and_its_first_position_the_argmax():
    shape = (1, 1, 4, 4)
    instrs = {p: _trace(p, shape, "f64", 2, 2, 0) for p in ("max_pool2d", "max_pool2d_argmax")}
    ks = _compile(instrs)
    x = np.zeros(shape)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan      # two NaNs: the first (row-major) is the argmax
    x[0, 0, 0, 0] = 5.0                         # ... even after a larger number
    x[0, 0, 3, 3] = np.nan                      # a NaN last in its window
    x[0, 0, 2, 2] = np.inf
    out = ks.call("max_pool2d", _empty(instrs["max_pool2d"]), x)
    assert np.isnan(out[0, 0, 0, 0]) and np.isnan(out[0, 0, 1, 1])
    idx = ks.call("max_pool2d_argmax", _empty(instrs["max_pool2d_argmax"]), x)
    assert idx[0, 0, 0, 0] == 1 and idx[0, 0, 1, 1] == 15


@pytest.mark.parametrize("nthreads", [1, 3, 5])
def test_thread_counts(nthreads):
    """Any number of threads, also more than there are planes (3 here)."""
    shape = (1, 3, 9, 9)
    instrs = {p: _trace(p, shape, "f32", 3, 2, 1) for p in PRIMS}
    ks = _compile(instrs)
    rng = np.random.default_rng(2)
    x = _inputs(rng, shape, np.float32, "nan")
    idx = impls[instrs["max_pool2d_argmax"].prim](x, **instrs["max_pool2d_argmax"].params)
    ct = rng.standard_normal(idx.shape).astype(np.float32)
    for prim in PRIMS:
        ins = instrs[prim]
        args = {"max_pool2d_grad": (ct, idx), "max_pool2d_gather": (x, idx),
                "avg_pool2d_grad": (ct,)}.get(prim, (x,))
        out = ks.call(prim, _empty(ins), *args, nthreads=nthreads)
        _check(out, impls[ins.prim](*args, **ins.params), "f32")


def test_fused_max_and_argmax():
    shape = (2, 3, 24, 24)
    ins = _trace("max_pool2d", shape, "f32", 2, 2, 0)
    ks = _Kernels({"both": lambda mod, nm: lower_max_pool2d_with_argmax(mod, nm, ins)})
    x = _inputs(np.random.default_rng(3), shape, np.float32, "nan")
    idx = np.full(ins.out.type.shape, -1, np.int32)
    out = ks.call("both", _empty(ins), idx, x)
    params = ins.params
    _check(out, impls[ins.prim](x, **params), "f32")
    _check(idx, impls[_trace("max_pool2d_argmax", shape, "f32", 2, 2, 0).prim](x, **params), "f32")


def _pool_program(x, w):
    a = nn.max_pool2d(x * x, 2)                                # grad: max_pool2d_grad, then * 2x
    b = nn.avg_pool2d(x * w, 3, stride=2, padding=1) * 2.0      # * 2.0: avg_pool2d's epilogue
    c = nn.max_pool2d(tracejit.exp(x), 3, stride=1, padding=1)  # stride 1: the plain scatter
    return (a * w[:, :, :5, :5]).sum() + (b * b).sum() + tracejit.tanh(c).sum()


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_kernels_in_compiled_gradients(dtype):
    """Through the runtime: the kernels with elementwise epilogues fused in, against the
    interpreter."""
    rng = np.random.default_rng(4)
    args = [rng.standard_normal((2, 3, 10, 10)).astype(dtype.replace("f", "float"))
            for _ in range(2)]
    old = tracejit.config.backend
    try:
        results = []
        for backend in ("llvm", "interpreter"):
            tracejit.config.backend = backend
            grad = tracejit.jit_grad(_pool_program, argnums=(0, 1))
            results.append(grad(*args))
            if backend == "llvm":
                dump = grad.ir(*args, stage="optimized")
    finally:
        tracejit.config.backend = old
    assert any("pool" in line and "epilogue" in line for line in dump.splitlines())
    for native, ref in zip(*results):
        _check(np.asarray(native), np.asarray(ref), dtype)


def test_2x2_pooling_is_vectorized():
    """LeNet's pooling: vector code of the host's widest registers with shuffles, no gathers and no scalar arithmetic
    (max_pool2d_grad/_gather keep a scalar path for indices outside their window)."""
    shape = (64, 6, 24, 24)
    instrs = {p: _trace(p, shape, "f32", 2, 2, 0) for p in PRIMS}
    asm = _compile(instrs).jit.asm
    wide = "zmm" if host_info()["avx512"] else "ymm"   # as LLVM sees the host's features
    for prim in ("max_pool2d", "max_pool2d_argmax", "avg_pool2d", "avg_pool2d_grad"):
        body = asm.split(f"\n{prim}:")[1].split(".Lfunc_end")[0]
        ops = {line.split()[0] for line in body.splitlines()
               if line.startswith("\t") and not line.startswith("\t.")}
        assert any(f"%{wide}" in line for line in body.splitlines()), prim
        if wide == "ymm":
            assert "%zmm" not in body, prim
        assert any(op.startswith("vperm") for op in ops), prim
        assert not any("gather" in op for op in ops), prim
        assert not ops & {"vmaxss", "vucomiss", "vaddss", "vmovss"}, prim


_MASKED = re.compile(r"\tv(p)?maskmov")
_SPILL = re.compile(r"\tvmov\w+\s+%[yz]mm\d+, -?\d*\(%rsp\)")


def _function_asm(asm, name):
    return asm.split(f"\n{name}:")[1].split(".Lfunc_end")[0]


def test_lenet_pooling_takes_no_masked_loads(avx2_target):
    """LeNet's poolings (24x24 and 8x8 planes): every vector is whole (a row's partial last chunk
    is moved back to end at the row's end), so no masked load or store (vmaskmov costs several
    plain loads on AVX2) in any of the kernels, and no vector spill in the one-row-per-vector
    loops of the 24x24 planes (the 8x8 planes' packed rows keep a constant or two on the stack,
    read as memory operands). Compiled for AVX2, where the masks cost (AVX-512 masks are cheap)."""
    for shape in ((64, 6, 24, 24), (64, 16, 8, 8)):
        instrs = {p: _trace(p, shape, "f32", 2, 2, 0) for p in PRIMS}
        asm = _compile(instrs).jit.asm
        for prim in PRIMS:
            body = _function_asm(asm, prim)
            assert not _MASKED.findall(body), f"{prim} {shape}: masked loads/stores"
            if shape[2] == 24:
                assert not _SPILL.findall(body), f"{prim} {shape}: vector spills"


def _blocks_with_fma(body):
    """The basic blocks (split at labels) of a function's asm that hold vector FMAs."""
    blocks = re.split(r"\n\.?\w+:", body)
    return [blk for blk in blocks if "vfmadd" in blk]


def test_depthwise_interior_is_plain_loads_and_fmas(avx2_target):
    """A depthwise 3x3 convolution with padding (MobileNet's): the rows inside the plane are
    FMAs on plain loads (nine per vector; the columns of the padding shuffled in), with no
    masked load - in the forward pass and both gradients; masked loads stay in the rows of the
    padding. No spill store there in the passes with one accumulator; the weight gradient's
    nine accumulators, its cotangent and the constants leave at most one on the stack.
    Compiled for AVX2 (its vmaskmov is what costs)."""
    x, w = (2, 8, 56, 56), (8, 1, 3, 3)
    p = dict(stride=(1, 1), padding=(1, 1), groups=8)
    with building(Builder("t")) as b:
        xv, wv, ctv = (b.add_param(TensorType("f32", s)) for s in (x, w, x))
        instrs = {"conv2d": lax.conv2d(xv, wv, **p).instr,
                  "conv2d_input_grad": lax.conv2d_input_grad(ctv, wv, x[2:], **p).instr,
                  "conv2d_weight_grad": lax.conv2d_weight_grad(ctv, xv, w[2:], **p).instr}
    asm = _compile(instrs).jit.asm
    for prim in instrs:
        blocks = _blocks_with_fma(_function_asm(asm, prim))
        plain = [blk for blk in blocks if len(re.findall(r"vfmadd\w*\s[^\n]*%ymm", blk)) >= 9
                 and not _MASKED.search(blk)
                 and len(_SPILL.findall(blk)) <= (1 if prim == "conv2d_weight_grad" else 0)]
        assert plain, f"{prim}: no block of 9 FMAs on plain loads in\n" + "\n----\n".join(blocks)

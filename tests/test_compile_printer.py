"""codegen.target.module_text prints an llvmlite module faster than `str(module)` and must give
the same text, byte for byte: for the modules the code generator builds (loop nests, fused loops,
native loops, checked gathers, sorting, pooling) and for the corner cases of llvmlite's printer
(quoted names, signed zeros, NaNs, booleans, metadata, inline assembly, calls with attributes)."""
import math

import llvmlite.ir as ir
import numpy as np
import pytest

import tracejit
from tracejit import nn
from tracejit.codegen.target import module_text

RNG = np.random.default_rng(3)


def _net(p, x, idx):
    h = nn.max_pool2d(nn.relu(nn.conv2d(x, p["w"], padding=1)), 2)
    h = h.reshape(2, -1)
    g = tracejit.take(h, idx, axis=1)                 # a gather that checks its indices
    s = tracejit.sort(g, axis=1)

    def step(c, row):
        return tracejit.tanh(c * row + 1.0), c.sum()
    c, ys = tracejit.scan(step, s[0], s)              # a native loop
    return (c * c).mean() + ys.sum() + (h @ p["v"]).astype(np.float64).sum()


def _count(v):
    return tracejit.while_loop(lambda u: u.sum() < 30.0, lambda u: u * 1.5 + 0.5, v)


@pytest.mark.needs_llvm
def test_the_code_generators_modules_print_as_llvmlite_prints_them():
    p = {"w": RNG.standard_normal((3, 2, 3, 3)).astype(np.float32),
         "v": RNG.standard_normal((48, 5)).astype(np.float32)}
    x = RNG.standard_normal((2, 2, 8, 8)).astype(np.float32)
    idx = np.array([0, 5, 7, 2], np.int32)
    old = tracejit.config.cache
    tracejit.config.cache = False
    try:
        f, g = tracejit.jit_grad(_net), tracejit.jit(_count)
        f(p, x, idx)
        g(x[0, 0])
    finally:
        tracejit.config.cache = old
    modules = [m for h in (f, g) for m in next(iter(h._cache.values())).native()._build_modules()]
    texts = [module_text(m) for m in modules]
    assert texts == [str(m) for m in modules]
    assert sum(t.count("\n") for t in texts) > 500


def test_corner_cases_of_the_printer():
    m = ir.Module(name='odd "name"')
    f64, i64, i1 = ir.DoubleType(), ir.IntType(64), ir.IntType(1)
    vec = ir.VectorType(f64, 4)
    fn = ir.Function(m, ir.FunctionType(f64, [ir.PointerType(), i64]), 'we"ird\\name')
    fn.args[0].name = 'p"q'
    fn.args[0].add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry block"))
    pz, nz = ir.Constant(f64, 0.0), ir.Constant(f64, -0.0)
    a = b.fadd(pz, nz, name="sum")
    a = b.fadd(a, ir.Constant(f64, math.nan), name="nan")
    a = b.fadd(a, ir.Constant(f64, -0.0), name="again")
    c = b.icmp_signed("<", fn.args[1], ir.Constant(i64, 5))
    flag = b.select(c, ir.Constant(i1, True), ir.Constant(i1, 0))
    flag.set_metadata("note", m.add_metadata([ir.MetaDataString(m, "why")]))
    v = b.insert_element(ir.Constant(vec, [0.0, -0.0, 1.5, 0.0]), a, ir.Constant(ir.IntType(32), 1))
    v = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), 4), [3, 2, 1, 0]))
    e = b.extract_element(v, ir.Constant(ir.IntType(32), 0))
    slot = b.alloca(f64, size=ir.Constant(i64, 2), name="slot")
    slot.align = 16
    st = b.store(e, slot)
    st.align = 8
    ld = b.load(slot, typ=f64, name="back")
    ld.align = 8
    fma = m.declare_intrinsic("llvm.fma", [f64])
    call = b.call(fma, [ld, ld, ld], name="fused", fastmath=("fast",))
    call.attributes.add("nounwind")
    printf = ir.Function(m, ir.FunctionType(ir.IntType(32), [ir.PointerType()], var_arg=True),
                         "printf")
    b.call(printf, [fn.args[0], call])
    asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "nop", "")
    b.call(asm, [])
    w = b.fcmp_ordered("<", call, ld, name="less", flags=("nnan",))
    nxt = fn.append_basic_block("next")
    b.cbranch(w, nxt, nxt)
    b.position_at_end(nxt)
    phi = b.phi(f64, name="merged")
    phi.add_incoming(call, b.function.blocks[0])
    r = b.fptosi(phi, i64)
    b.ret(b.sitofp(b.add(r, fn.args[1], flags=("nsw",)), f64))
    g = ir.GlobalVariable(m, ir.ArrayType(f64, 3), name="lit")
    g.initializer = ir.Constant(ir.ArrayType(f64, 3), [1.0, -0.0, 2.5])
    assert module_text(m) == str(m)

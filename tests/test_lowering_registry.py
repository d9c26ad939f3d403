"""The code generator finds each primitive's lowering and scheduling facts in registries keyed by
the primitive object: every primitive has its entry, and a missing entry or fact is an error that
names the primitive."""
import pytest

from tracejit.ir.core import MissingRuleError, Primitive, primitives
from tracejit.codegen.fused import Elementwise, IndexMap, Reduction, lowerings
from tracejit.codegen.kernels import _load_all, kernels, register

pytestmark = pytest.mark.needs_llvm  # the native backend (`-m 'not needs_llvm'` skips it)

_load_all()


def test_every_fusable_primitive_has_a_fused_lowering():
    expected = {"layout": IndexMap, "reduce": Reduction}
    # tracejit's own primitives: other test modules define rule-less ones (test_errors) on import
    for p in primitives.values():
        if p.name.startswith("test_"):
            continue
        if p.elementwise or p.kind in expected or p.name == "const":
            assert isinstance(lowerings[p], expected.get(p.kind, Elementwise)), p.name


def test_every_loop_nest_primitive_declares_its_scheduling_facts():
    for p in primitives.values():
        if p.kind == "nn":
            k = kernels[p]
            assert isinstance(k.epilogue, bool) and isinstance(k.parallel, bool), p.name
            assert k.compile_weight > 0 and callable(k.cost), p.name


def test_missing_fused_lowering_names_the_primitive_and_the_pass():
    with pytest.raises(MissingRuleError, match="no fused lowering rule for 'erf'"):
        lowerings[Primitive("erf", "unary")]


def test_kernel_registered_without_a_fact_is_an_error():
    prim = Primitive("conv3d", "nn")
    with pytest.raises(TypeError, match="kernel for 'conv3d': missing cost, compile_weight"):
        register(prim, epilogue=True, parallel=True)
    with pytest.raises(TypeError, match="expected a primitive object"):
        register("conv3d", epilogue=True, parallel=True, cost=len, compile_weight=1)
    assert prim not in kernels

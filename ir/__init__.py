"""tracejit's SSA IR: types and printer (core), builders, primitives with their shape, reference,
adjoint and tangent rules (prims), the reference interpreter, the verifier, the adjoint and tangent
transformations and the optimization passes. This package never imports tracejit or codegen."""
from . import prims  # noqa: F401  (registers every primitive)
from .core import (Function, Instr, IRError, MissingRuleError, Primitive, ShapeError,  # noqa: F401
                   TensorType, Value, print_function, primitives)
from .interpreter import interpret  # noqa: F401
from .verify import verify  # noqa: F401
from .adjoint import grad_function  # noqa: F401
from .jvp import jvp_function  # noqa: F401
from .passes import optimize  # noqa: F401

"""IR-level operations for adjoint rules, passes and the tracer: thin emitters over the primitives.

Operands are Values of the current builder (Python numbers become rank-0 constants of the other
operand's dtype). No numpy-style broadcasting or type promotion happens here; tracejit.ops does that.
"""
from .prims.elementwise import (  # noqa: F401
    abs_, add, as_value, convert, cos, div, eq, exp, full, ge, gt, integer_pow, le, literal, log,
    logical_and, logical_not, logical_or, logistic, lt, maximum, minimum, mul, ne, neg, pow_,
    scalar, select, sign, sin, sqrt, stop_gradient, sub, tanh)
from .prims.structural import (  # noqa: F401
    broadcast_in_dim, broadcast_to, concatenate, pad, reshape, slice_, transpose)
from .prims.reduce import reduce_max, reduce_sum  # noqa: F401
from .prims.linalg import matmul  # noqa: F401
from .prims.gather import gather, scatter_add  # noqa: F401
from .prims.nn import (  # noqa: F401
    avg_pool2d, avg_pool2d_grad, conv2d, conv2d_input_grad, conv2d_weight_grad, max_pool2d,
    max_pool2d_argmax, max_pool2d_gather, max_pool2d_grad)
from .prims.random import random_bits, random_blocks, random_uniform  # noqa: F401


def zeros(shape, dtype):
    return full(0, tuple(shape), dtype)

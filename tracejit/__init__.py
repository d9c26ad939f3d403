"""tracejit: a JIT compiler for gradients of numpy-style Python functions.

    @tracejit.jit_grad
    def loss(w, x, t):
        return tracejit.nn.mse_loss(tracejit.tanh(x @ w), t)

    g = loss(w, x, t)            # gradient w.r.t. w, computed by compiled code
    print(loss.ir(w, x, t))      # what was computed
"""
import os as _os

# tracejit.ir and tracejit.codegen live in the repository's top-level ir/ and codegen/ folders
# (pyproject.toml maps them into this package when it is installed): run from a source tree,
# this package finds them beside it.
_source_tree = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "ir")) and \
        _os.path.isfile(_os.path.join(_source_tree, "ir", "core.py")):
    __path__.append(_source_tree)

from . import nn  # noqa: E402,F401
from .api import jit, jit_grad, jit_value_and_grad  # noqa: F401
from .checking import check_grads  # noqa: F401
from .config import config, get_num_threads, set_num_threads  # noqa: F401
from .errors import (  # noqa: F401
    CaptureWarning, IRError, MissingRuleError, ShapeError, TracejitWarning, TracerError,
    UnsupportedError, ZeroGradientWarning)
from .ops import (  # noqa: F401
    abs, add, array_split, atleast_1d, atleast_2d, atleast_3d, clip, column_stack, concatenate,
    cos, cosh, cumprod, cumsum, deg2rad, diag, diagonal, diff, divide, dot, dstack, equal, exp,
    exp2, expand_dims, expm1, eye, fabs, flip, fliplr, flipud, fmax, fmin, full_like, greater,
    greater_equal, hstack, hypot, less, less_equal, log, log10, log1p, log2, logaddexp,
    logaddexp2, logical_and, logical_not, logical_or, logsumexp, matmul, max, maximum, mean,
    min, minimum, mm, moveaxis, multiply, mv, negative, norm, not_equal, ones_like, outer, pad,
    power, prod, rad2deg, ravel, reciprocal, repeat, reshape, roll, sign, sin, sinh, split,
    sqrt, square, squeeze, stack, std, stop_gradient, subtract, sum, swapaxes, take_along_axis,
    tan, tanh, tile, trace, transpose, tril, triu, var, vstack, where, zeros_like)
from .ops import (  # noqa: F401
    arccos, arccosh, arcsin, arcsinh, arctan, arctan2, arctanh, argmax, argmin, argsort, around,
    ceil, conj, conjugate, floor, fmod, imag, mod, nan_to_num, real, remainder, rint, round,
    select, sort, trunc)
from .ops import append, dsplit, hsplit, rollaxis, rot90, vsplit  # noqa: F401
from .ops import cross, einsum, inner, kron, tensordot, vdot  # noqa: F401,E402
from .ops import (  # noqa: F401,E402
    all, any, broadcast_to, cbrt, cumulative_prod, cumulative_sum, fix, float_power, isfinite,
    isinf, isnan, logical_xor, matrix_norm, matrix_transpose, multi_dot, positive, ptp, take,
    vecdot, vector_norm)
from .ops import (  # noqa: F401,E402
    allclose, average, convolve, copysign, corrcoef, correlate, count_nonzero, cov, floor_divide,
    heaviside, interp, isclose, median, meshgrid, percentile, quantile, signbit, sinc)
from .nn import erf  # noqa: F401  (tracejit.erf: a composite that lives beside gelu)
from .tracer import Tracer  # noqa: F401
from .transforms import hessian, jacfwd, jacrev, jit_jvp  # noqa: F401

__version__ = "0.1.0"

# Training helpers load on first use, so `import tracejit` does not pay for them.
_LAZY = {"tree": ("tree", None), "optim": ("optim", None), "random": ("random", None),
         "save": ("io", "save"), "load": ("io", "load"),
         "jit_train_step": ("train", "jit_train_step"), "distributed": ("distributed", None),
         "scan": ("control", "scan"), "fori_loop": ("control", "fori_loop"),
         "while_loop": ("control", "while_loop")}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tracejit' has no attribute {name!r}")
    import importlib
    module, attr = _LAZY[name]
    mod = importlib.import_module(f".{module}", __name__)
    return mod if attr is None else getattr(mod, attr)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

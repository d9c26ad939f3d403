"""The adjoint-rule registry (filled by `ir/prims/*`).

Signature of every rule: `adjoint(ct, *primals, **params) -> tuple[Value | None, ...]`, one entry per
primal input; None is a zero cotangent. Rules emit ordinary IR through `ir.lax`, so their output is
printed, verified, optimized, lowered and differentiated again like any other IR. A rule may recompute
a forward value (e.g. `tanh(x)`): common-subexpression elimination merges it with the forward one.
"""
from .core import Registry

adjoint_rules = Registry("adjoint")

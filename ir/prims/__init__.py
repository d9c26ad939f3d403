"""Primitive definitions: each module registers a primitive's shape rule, numpy reference and
adjoint rule together."""
from . import elementwise, structural, reduce, linalg, nn, random, gather, control  # noqa: F401  (registration)

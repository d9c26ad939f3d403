"""Exceptions users see. Every message names the argument or the user's line and says what to do."""
from ir.builder import user_location
from ir.core import IRError, MissingRuleError, ShapeError  # noqa: F401  (re-exported)


class TracerError(Exception):
    """Python control flow or a conversion that needs a concrete value met a traced value."""


def concretization_error(what: str, tracer) -> TracerError:
    loc = user_location(3)
    where = f" at {loc}" if loc else ""
    return TracerError(
        f"{what} of a traced value {tracer.value.type}{where}: the result depends on a traced value; "
        f"use tracejit.where (or tracejit.maximum/minimum) instead of Python control flow, or pass "
        f"it as a static Python value")

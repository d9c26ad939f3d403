"""Exceptions users see. Every message names the argument or the user's line and says what to do."""
from .ir.builder import user_location
from .ir.core import IRError, MissingRuleError, ShapeError  # noqa: F401  (re-exported)


class TracerError(Exception):
    """Python control flow or a conversion that needs a concrete value met a traced value."""


def concretization_error(what: str, tracer) -> TracerError:
    loc = user_location(3)
    where = f" at {loc}" if loc else ""
    return TracerError(
        f"{what} of a traced value {tracer.value.type}{where}: the result depends on a traced value; "
        f"use tracejit.where (or tracejit.maximum/minimum) instead of Python control flow, or pass "
        f"it as a static Python value")


class UnsupportedError(TypeError):
    """A numpy function, ufunc method or operation that tracejit does not implement on traced
    values (np.einsum, np.average, item assignment, ...). A TypeError, as numpy's own refusal is."""


class TracejitWarning(UserWarning):
    """Base class of tracejit's warnings."""


# tracejit warnings issued in this process (a trace that warned is not kept in the trace cache,
# tracejit/trace_cache.py: a hit would not warn again)
warnings_issued = 0


def warn(message: str, category: type[TracejitWarning]) -> None:
    """warnings.warn attributed to the user's innermost frame outside tracejit (so the default
    filter shows it once per line of the user's code that caused it)."""
    import sys
    import warnings

    global warnings_issued
    warnings_issued += 1

    from .ir.builder import _OWN_DIRS
    level, f = 1, sys._getframe(1)
    while f is not None and (f.f_code.co_filename.startswith(_OWN_DIRS)
                             or f.f_code.co_filename.startswith("<frozen")):
        level, f = level + 1, f.f_back
    warnings.warn(message, category, stacklevel=level + 1)


class CaptureWarning(TracejitWarning):
    """A captured array is frozen into compiled code and too large to be checked on every call."""


class ZeroGradientWarning(TracejitWarning):
    """A differentiated argument cannot influence the output: its gradient is identically zero."""


# Spellings of common numpy functions that tracejit lacks, in terms of what it has.
_HINTS = {
    "empty_like": "x * 0",
    "argmax": "nothing differentiable; compute indices outside the traced function",
    "argmin": "nothing differentiable; compute indices outside the traced function",
    "copy": "x itself (traced values are never modified in place)",
    "average": "tracejit.mean, or (x * w).sum() / w.sum()",
    "absolute": "tracejit.abs",
}


def unsupported_error(what: str, name: str, known) -> UnsupportedError:
    """The error for numpy function `name` (spelled `what` in the message) used on a traced value:
    the user's line and the nearest spelling tracejit supports (from `_HINTS`, else the closest of
    the names `known`)."""
    import difflib
    loc = user_location(3)
    where = f" at {loc}" if loc else ""
    hint = _HINTS.get(name)
    if hint is not None:
        fix = f"; use {hint} instead"
    elif name in known:
        fix = f"; use tracejit.{name} instead"
    else:  # only a similar name: offer it without claiming it computes the same thing
        close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.6)
        fix = "; the closest names tracejit supports are " + ", ".join(
            f"tracejit.{c}" for c in close) if close else \
            "; see tracejit's public functions for what is supported"
    return UnsupportedError(f"{what} is not supported on traced values{where}{fix}")

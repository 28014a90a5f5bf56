"""The error a user's input raises, and the "did you mean" every name check shares."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config value, option or name is unknown, mistyped or impossible; the message names the key."""


class ModelCapabilityError(TypeError):
    """A model does not provide what a diagnostic or estimator asks of it (a user's own model,
    an adapter); the message names the model and the method it lacks."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss, else `` (known: a, b, c)``."""
    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"

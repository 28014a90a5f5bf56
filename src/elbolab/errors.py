"""The error a user's input raises, and the "did you mean" every name check shares."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable

#: the longest error message, in characters: one that echoes a config's content (a value or a key
#: of megabytes, an alias bomb) keeps its head and tail, so the line stays one readable line
MAX_MESSAGE = 1000

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 6, 6, 6
_REPR.maxstring, _REPR.maxother = 80, 80


def shown(value: object) -> str:
    """``repr(value)`` shortened for an error message: nested and long containers elided with ``...``."""
    return _REPR.repr(value)


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut to ``limit`` characters, its head and tail kept around `` ... ``."""
    if len(message) <= limit:
        return message
    half = (limit - 5) // 2
    return f"{message[:half]} ... {message[len(message) - half:]}"


class ConfigError(ValueError):
    """A config value, option or name is unknown, mistyped or impossible; the message names the key
    (and is at most :data:`MAX_MESSAGE` characters, whatever the input it echoes)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(clip(a) if isinstance(a, str) else a for a in args))


class ModelCapabilityError(TypeError):
    """A model does not provide what a diagnostic or estimator asks of it (a user's own model,
    an adapter); the message names the model and the method it lacks."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss, else `` (known: a, b, c)``."""
    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"

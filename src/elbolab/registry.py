"""One registry per concept: a name -> builder mapping that checks names the same way everywhere.

A registry is created next to the code it registers (``PRIORS`` in priors.py, ``MODELS`` in
models/base.py ...) and indexed here by its concept, so that config validation, the
CLI's ``choices`` and error messages read the same names without importing the modules
that define them (config sits below them). The package's ``__init__`` imports every
registering module, so the index is complete whenever elbolab is imported.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")

#: concept ("prior", "model", ...) -> its registry
INDEX: dict[str, Registry] = {}


class Registry(dict[str, T], Generic[T]):
    """A dict of name -> value that also knows its concept, its aliases and how to refuse a name."""

    def __init__(self, concept: str, entries: dict[str, T] | None = None, aliases: dict[str, str] | None = None
                 ) -> None:
        super().__init__(entries or {})
        self.concept = concept
        #: short name -> registered name
        self.aliases: dict[str, str] = dict(aliases or {})
        INDEX[concept] = self

    def register(self, name: str, value: T) -> T:
        self[name] = value
        return value

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (itself, or what an alias stands for)."""
        return self.aliases.get(name, name)

    def knows(self, name: str) -> bool:
        return self.canonical(name) in self

    def names(self) -> list[str]:
        """Registered names in registration order (aliases not included)."""
        return list(self)

    def check(self, name: str, key: str) -> str:
        """The canonical name, or a :class:`ConfigError` naming ``key`` with a "did you mean"."""
        if not self.knows(name):
            raise ConfigError(f"{key}: unknown {self.concept} {name!r}{did_you_mean(name, [*self, *self.aliases])}")
        return self.canonical(name)

    def get_checked(self, name: str, key: str) -> T:
        """``self[name]`` (aliases resolved), or a :class:`ConfigError` naming ``key``."""
        return self[self.check(name, key)]


def check_name(concept: str, name: str, key: str) -> None:
    """Refuse ``name`` if the registry of ``concept`` is loaded and does not know it."""
    registry = INDEX.get(concept)
    if registry is not None:
        registry.check(name, key)

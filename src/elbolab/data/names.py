"""Dataset name shorthands, with no heavy imports so that config.py can use them.

``mnist-dynamic`` means dataset ``mnist`` with ``data.binarization=dynamic``: the
binarization stays a transform, the suffix only picks it. ``omniglot`` is an alias of
our own 28x28 build, ``omniglot-28-elbolab`` (the canonical name appears in reports,
so no one mistakes it for Burda et al.'s file).
"""

from __future__ import annotations

#: name suffix -> the ``data.binarization`` it selects
BINARIZATION_SUFFIXES: dict[str, str] = {"-dynamic": "dynamic", "-static": "static", "-grey": "none"}

#: short name -> registered name
ALIASES: dict[str, str] = {"omniglot": "omniglot-28-elbolab", "frey": "freyfaces", "caltech": "caltech101-silhouettes"}


def split_binarization_suffix(name: str) -> tuple[str, str | None]:
    """``"mnist-dynamic"`` -> ``("mnist", "dynamic")``; a name without a suffix -> ``(name, None)``."""
    for suffix, binarization in BINARIZATION_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], binarization
    return name, None


def canonical_name(name: str) -> str:
    """The registered name behind an alias (suffix already removed)."""
    return ALIASES.get(name, name)

"""The package version, in a module of its own so that every layer can read it."""

__version__ = "0.1.0"


def same_major(version: object) -> bool:
    """Whether files written by elbolab ``version`` can be read by this one (same major version)."""
    return str(version).split(".")[0] == __version__.split(".")[0]

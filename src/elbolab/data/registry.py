"""Dataset names -> loaders, and where data files are looked for."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .dataset import DataError, ImageDataset

ENV_VAR = "ELBOLAB_DATA"


def default_data_dir() -> Path:
    """$ELBOLAB_DATA, else $XDG_CACHE_HOME/elbolab, else ~/.cache/elbolab."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "elbolab"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The --data-dir option wins, then $ELBOLAB_DATA, then the user cache."""
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    loader: Callable[[Path], ImageDataset]
    #: files the loader reads, relative to the data directory (for messages and listings)
    files: tuple[str, ...] = ()
    #: True for datasets packaged with elbolab (no data directory needed)
    embedded: bool = False


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def load(name: str, data_dir: str | Path | None = None) -> ImageDataset:
    """Load a dataset by name, e.g. ``load("binarized-mnist")``."""
    import difflib

    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    return spec.loader(resolve_data_dir(data_dir))

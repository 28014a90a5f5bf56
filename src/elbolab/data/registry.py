"""Dataset names -> loaders, and where data files are looked for."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .dataset import DataError, ImageDataset
from .names import ALIASES, BINARIZATION_SUFFIXES, canonical_name, split_binarization_suffix

ENV_VAR = "ELBOLAB_DATA"

#: (mean, std) of the VampPrior's normal pseudo-input init in Tomczak & Welling's code
#: (utils/load_data.py) for MNIST and OMNIGLOT; also the value for datasets they did not use
PSEUDO_INPUTS_DEFAULT: tuple[float, float] = (0.05, 0.01)


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
    #: (height, width) of one image
    image_shape: tuple[int, ...] = (28, 28)
    #: (split, number of images) as the loader returns them
    split_sizes: tuple[tuple[str, int], ...] = ()
    #: True for {0, 1} pixels, False for grey levels 0..255
    binary: bool = True
    #: (mean, std) of the normal pseudo-input init the VampPrior code uses for this dataset
    #: (``model.prior.pseudo_inputs_mean`` / ``_std`` left unset take these)
    pseudo_inputs: tuple[float, float] = PSEUDO_INPUTS_DEFAULT


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def resolve_name(name: str) -> tuple[DatasetSpec, str | None]:
    """A registered spec and the binarization a name suffix selects (``mnist-dynamic``)."""
    import difflib

    base, binarization = (name, None) if name in DATASETS else split_binarization_suffix(name)
    base = canonical_name(base)
    if base not in DATASETS:
        known = sorted(DATASETS) + sorted(ALIASES)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        suffixes = "/".join(BINARIZATION_SUFFIXES)
        raise DataError(
            f"unknown dataset {name!r}{hint}; known: {', '.join(known)} (each optionally + {suffixes})"
        )
    return DATASETS[base], binarization


def pseudo_input_init(name: str) -> tuple[float, float]:
    """(mean, std) of the VampPrior's normal pseudo-input init for dataset ``name``."""
    return resolve_name(name)[0].pseudo_inputs


def load(name: str, data_dir: str | Path | None = None, validation: int = 0) -> ImageDataset:
    """Load a dataset by name, e.g. ``load("binarized-mnist")`` or ``load("mnist-dynamic")``.

    ``validation`` > 0 holds out the last that many training images as the ``valid``
    split (for datasets without one; ``data.validation`` in a run config).
    """
    spec, binarization = resolve_name(name)
    dataset = spec.loader(resolve_data_dir(data_dir))
    if binarization is not None:
        dataset = replace(dataset, default_binarization=binarization)
    return dataset.with_validation(validation)

"""Dataset names -> loaders, and where data files are looked for."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import BINARIZATION_SUFFIXES, split_binarization_suffix
from ..errors import did_you_mean
from ..registry import Registry
from .dataset import DataError, ImageDataset

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


#: ``data.name`` -> its spec. ``omniglot`` is short for our own 28x28 build,
#: ``omniglot-28-elbolab`` (the canonical name appears in reports, so no one mistakes it
#: for Burda et al.'s file).
DATASETS: Registry[DatasetSpec] = Registry("dataset", aliases={
    "omniglot": "omniglot-28-elbolab", "frey": "freyfaces", "caltech": "caltech101-silhouettes",
})


def register(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name, spec)


def resolve_name(name: str) -> tuple[DatasetSpec, str | None]:
    """A registered spec and the binarization a name suffix selects (``mnist-dynamic``)."""
    base, binarization = (name, None) if DATASETS.knows(name) else split_binarization_suffix(name)
    if not DATASETS.knows(base):
        known = [*DATASETS, *DATASETS.aliases]
        suffixes = "/".join(BINARIZATION_SUFFIXES)
        raise DataError(f"unknown dataset {name!r}{did_you_mean(name, known)} (each name optionally + {suffixes})")
    return DATASETS[DATASETS.canonical(base)], binarization


def pseudo_input_init(name: str) -> tuple[float, float]:
    """(mean, std) of the VampPrior's normal pseudo-input init for dataset ``name``."""
    return resolve_name(name)[0].pseudo_inputs


def load(name: str, data_dir: str | Path | None = None, validation: int = 0) -> ImageDataset:
    """Load a dataset by name, e.g. ``load("binarized-mnist")`` or ``load("mnist-dynamic")``.

    ``validation`` > 0 holds out the last that many training images as the ``valid``
    split (for datasets without one; ``data.validation`` in a run config).
    """
    spec, binarization = resolve_name(name)
    folder = resolve_data_dir(data_dir)
    dataset = spec.loader(folder)
    origin = {"kind": "registered", "name": spec.name, "data_dir": None if spec.embedded else str(folder)}
    dataset = replace(dataset, origin=origin)
    if binarization is not None:
        dataset = replace(dataset, default_binarization=binarization)
    return dataset.with_validation(validation)

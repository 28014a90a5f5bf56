"""Datasets by name: ``load("binarized-mnist-embedded")``; one compact tensor per split."""

from . import embedded  # noqa: F401  (registers the packaged dataset)
from .dataset import Batcher, DataError, ImageDataset, to_unit_float
from .registry import DATASETS, ENV_VAR, DatasetSpec, load, register, resolve_data_dir

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "Batcher",
    "DataError",
    "DatasetSpec",
    "ImageDataset",
    "load",
    "register",
    "resolve_data_dir",
    "to_unit_float",
]

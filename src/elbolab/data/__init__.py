"""Datasets by name: ``load("mnist-dynamic")``, ``load("omniglot-28-elbolab")``; one compact tensor per split."""

from . import embedded, standard  # noqa: F401  (register the packaged and the standard datasets)
from .dataset import Batcher, DataError, ImageDataset, evaluation_images, to_unit_float
from .registry import DATASETS, ENV_VAR, DatasetSpec, load, register, resolve_data_dir, resolve_name
from .user import USER, as_dataset, data_source

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "Batcher",
    "DataError",
    "DatasetSpec",
    "ImageDataset",
    "USER",
    "as_dataset",
    "data_source",
    "evaluation_images",
    "load",
    "register",
    "resolve_data_dir",
    "resolve_name",
    "to_unit_float",
]

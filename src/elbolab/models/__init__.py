"""Models, registered by the name a config uses (``model.name``).

Each model's module registers its builder (:func:`~.base.register_model`) and, where it has
one, its config section (:func:`elbolab.config.model_section`) beside its code; importing
this package imports every module in it, so adding a model is adding one file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Sequence

from torch import Tensor

from ..config import ModelConfig
from ..data.registry import PSEUDO_INPUTS_DEFAULT, pseudo_input_init, resolve_name
from .base import MODELS, HasLogWeights, LatentVariableModel, LogWeightTerms, register_model
from .conv_hierarchical import ConvHierarchicalVAE
from .hierarchical import HierarchicalVAE
from .one_layer import OneLayerVAE
from .pixel_hierarchical import PixelHierarchicalVAE
from .two_layer import TwoLayerVAE
from .vampprior_vae import GatedOneLayerVAE

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ConvHierarchicalVAE",
    "GatedOneLayerVAE",
    "HasLogWeights",
    "HierarchicalVAE",
    "LatentVariableModel",
    "LogWeightTerms",
    "MODELS",
    "OneLayerVAE",
    "PixelHierarchicalVAE",
    "TwoLayerVAE",
    "build_model",
    "register_model",
]


def with_image_shape(cfg: ModelConfig, shape: Sequence[int]) -> ModelConfig:
    """``cfg`` with every model section's unset ``image_shape`` (the convolutional models') set to ``shape``."""
    for key, section in cfg.sections:
        if getattr(section, "image_shape", ()) is None:
            cfg = cfg.with_section(key, dataclasses.replace(section, image_shape=tuple(shape)))
    return cfg


def build_model(cfg: ModelConfig, data_dim: int, train_data: Tensor | None = None, dataset: str | None = None,
                image_shape: Sequence[int] | None = None) -> LatentVariableModel:
    """Build the model a config names; ``train_data`` (float, [N, D]) sets the output bias
    to the data's mean image and provides images for data-initialized priors; ``dataset``
    (a ``data.name``) supplies what the config leaves to the dataset (the VampPrior's
    pseudo-input init, set per dataset in its authors' code, and the image shape of the
    convolutional models); ``image_shape`` (height, width) overrides the dataset's."""
    init = pseudo_input_init(dataset) if dataset else PSEUDO_INPUTS_DEFAULT
    cfg = dataclasses.replace(cfg, prior=cfg.prior.with_pseudo_input_init(init))
    if image_shape is None and dataset:
        image_shape = resolve_name(dataset)[0].image_shape
    if image_shape is not None:
        cfg = with_image_shape(cfg, image_shape)
    model = MODELS.get_checked(cfg.name, "model.name")(cfg, data_dim, train_data)
    if train_data is not None:
        model.likelihood.init_output_bias(train_data.float().mean(0))
    return model

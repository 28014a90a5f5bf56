"""Models, registered by the name a config uses (``model.name``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor

from ..config import ModelConfig
from ..data.registry import PSEUDO_INPUTS_DEFAULT, pseudo_input_init
from ..priors import make_prior
from ..registry import Registry
from .base import HasLogWeights, LatentVariableModel, LogWeightTerms
from .hierarchical import HierarchicalVAE
from .one_layer import OneLayerVAE
from .two_layer import TwoLayerVAE

__all__ = [
    "HasLogWeights",
    "HierarchicalVAE",
    "LatentVariableModel",
    "LogWeightTerms",
    "MODELS",
    "OneLayerVAE",
    "TwoLayerVAE",
    "build_model",
]


def _one_layer(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> LatentVariableModel:
    return OneLayerVAE(
        data_dim=data_dim,
        latent_dim=cfg.latent_dim,
        hidden=cfg.hidden,
        activation=cfg.activation,
        likelihood=cfg.likelihood,
        prior=make_prior(cfg.prior, cfg.latent_dim, data_dim, train_data),
        posterior=cfg.posterior,
    )


def _two_layer(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> LatentVariableModel:
    sizes = cfg.two_layer
    return TwoLayerVAE(
        data_dim=data_dim,
        latent_dims=sizes.latent_dims,
        hidden1=sizes.hidden1,
        hidden2=sizes.hidden2,
        activation=cfg.activation,
        likelihood=cfg.likelihood,
        prior=make_prior(cfg.prior, sizes.latent_dims[1], data_dim, train_data),
        posterior=cfg.posterior,
    )


def _hierarchical(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> LatentVariableModel:
    sizes = cfg.hierarchical
    return HierarchicalVAE(
        data_dim=data_dim,
        latent_dims=sizes.latent_dims,
        width=sizes.width,
        log_var_range=sizes.log_var_range,
        likelihood=cfg.likelihood,
        prior=make_prior(cfg.prior, sizes.latent_dims[1], data_dim, train_data),
        posterior=cfg.posterior,
    )


#: ``model.name`` -> builder(model config, data dimension, float training data [N, D] or None)
MODELS: Registry[Callable[[ModelConfig, int, Tensor | None], LatentVariableModel]] = Registry("model", {
    "one-layer": _one_layer,
    "two-layer": _two_layer,
    "hierarchical": _hierarchical,
})


def build_model(cfg: ModelConfig, data_dim: int, train_data: Tensor | None = None, dataset: str | None = None
                ) -> LatentVariableModel:
    """Build the model a config names; ``train_data`` (float, [N, D]) sets the output bias
    to the data's mean image and provides images for data-initialized priors; ``dataset``
    (a ``data.name``) supplies what the config leaves to the dataset (the VampPrior's
    pseudo-input init, set per dataset in its authors' code)."""
    init = pseudo_input_init(dataset) if dataset else PSEUDO_INPUTS_DEFAULT
    cfg = dataclasses.replace(cfg, prior=cfg.prior.with_pseudo_input_init(init))
    model = MODELS.get_checked(cfg.name, "model.name")(cfg, data_dim, train_data)
    if train_data is not None:
        model.likelihood.init_output_bias(train_data.float().mean(0))
    return model

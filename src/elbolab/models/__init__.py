"""Models, registered by the name a config uses."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..config import ModelConfig
from ..likelihoods import make_likelihood
from ..priors import make_prior
from .base import HasLogWeights, LatentVariableModel, LogWeightTerms
from .one_layer import OneLayerVAE

__all__ = ["HasLogWeights", "LatentVariableModel", "LogWeightTerms", "OneLayerVAE", "build_model", "MODELS"]


def _one_layer(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> LatentVariableModel:
    return OneLayerVAE(
        data_dim=data_dim,
        latent_dim=cfg.latent_dim,
        hidden=cfg.hidden,
        activation=cfg.activation,
        likelihood=make_likelihood(cfg.likelihood),
        prior=make_prior(cfg.prior, cfg.latent_dim, data_dim, train_data),
    )


#: name -> builder(model config, data dimension, float training data [N, D] or None)
MODELS: dict[str, Callable[[ModelConfig, int, Tensor | None], LatentVariableModel]] = {
    "one-layer": _one_layer,
}


def build_model(cfg: ModelConfig, data_dim: int, train_data: Tensor | None = None) -> LatentVariableModel:
    """Build the model a config names; ``train_data`` (float, [N, D]) sets the output bias
    to the data's mean image and provides images for data-initialized priors."""
    model = MODELS[cfg.name](cfg, data_dim, train_data)
    if train_data is not None and hasattr(model, "init_output_bias"):
        model.init_output_bias(train_data.float().mean(0))
    return model

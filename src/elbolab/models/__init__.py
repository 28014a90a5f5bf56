"""Models, registered by the name a config uses (``model.name``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from torch import Tensor

from ..config import ModelConfig
from ..data.registry import PSEUDO_INPUTS_DEFAULT, pseudo_input_init, resolve_name
from ..priors import make_prior
from ..registry import Registry
from .base import HasLogWeights, LatentVariableModel, LogWeightTerms
from .conv_hierarchical import ConvHierarchicalVAE
from .hierarchical import HierarchicalVAE
from .one_layer import OneLayerVAE
from .pixel_hierarchical import PixelHierarchicalVAE
from .two_layer import TwoLayerVAE
from .vampprior_vae import GatedOneLayerVAE

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


def _gated_one_layer(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> LatentVariableModel:
    # the VampPrior paper's clamp of the log-variance, shared with its hierarchical model's section
    return GatedOneLayerVAE(data_dim, cfg.latent_dim, cfg.hidden, cfg.likelihood,
                            make_prior(cfg.prior, cfg.latent_dim, data_dim, train_data),
                            cfg.hierarchical.log_var_range, cfg.posterior)


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


def _image_shape(shape: Sequence[int] | None, data_dim: int, key: str) -> tuple[int, int]:
    """The configured (height, width), else the square image of ``data_dim`` pixels."""
    if shape is None:
        side = math.isqrt(data_dim)
        if side * side != data_dim:
            raise ValueError(f"{key}: {data_dim} pixels are not a square image; set [height, width]")
        shape = (side, side)
    if len(shape) != 2 or shape[0] * shape[1] != data_dim:
        raise ValueError(f"{key}: {list(shape)} does not hold the data's {data_dim} pixels")
    return int(shape[0]), int(shape[1])


def _conv_hierarchical(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> LatentVariableModel:
    s = cfg.conv_hierarchical
    return ConvHierarchicalVAE(
        _image_shape(s.image_shape, data_dim, "model.conv_hierarchical.image_shape"), s.latent_dims, cfg.likelihood,
        make_prior(cfg.prior, s.latent_dims[1], data_dim, train_data), s.encoder_channels, s.encoder_out_channels,
        s.width, s.decoder_channels, s.decoder_layers, s.log_var_range,
    )


def _pixel_hierarchical(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> LatentVariableModel:
    s = cfg.pixel_hierarchical
    return PixelHierarchicalVAE(
        _image_shape(s.image_shape, data_dim, "model.pixel_hierarchical.image_shape"), s.latent_dims, cfg.likelihood,
        make_prior(cfg.prior, s.latent_dims[1], data_dim, train_data), s.encoder_channels, s.encoder_out_channels,
        s.width, s.decoder_channels, s.decoder_layers, s.log_var_range, s.batch_norm,
    )


#: ``model.name`` -> builder(model config, data dimension, float training data [N, D] or None)
MODELS: Registry[Callable[[ModelConfig, int, Tensor | None], LatentVariableModel]] = Registry("model", {
    "one-layer": _one_layer,
    "gated-one-layer": _gated_one_layer,
    "two-layer": _two_layer,
    "hierarchical": _hierarchical,
    "conv-hierarchical": _conv_hierarchical,
    "pixel-hierarchical": _pixel_hierarchical,
})


def with_image_shape(cfg: ModelConfig, shape: Sequence[int]) -> ModelConfig:
    """``cfg`` with the convolutional models' unset ``image_shape`` set to ``shape``."""
    sections = {}
    for name in ("conv_hierarchical", "pixel_hierarchical"):
        section = getattr(cfg, name)
        if section.image_shape is None:
            sections[name] = dataclasses.replace(section, image_shape=tuple(shape))
    return dataclasses.replace(cfg, **sections)


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

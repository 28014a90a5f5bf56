"""The VampPrior paper's convolutional two-level VAE, "ConvHVAE (L=2)" (Tomczak & Welling 2018).

    q(z2 | x) q(z1 | x, z2),    p(z2) p(z1 | z2) p(x | z1, z2)

As in the authors' models/convHVAE_2level.py, with 40 + 40 latents (MNIST, 28 x 28):

- q(z2 | x): five gated convolutions, 1 -> 32 (7x7) -> 32 (3x3, stride 2) -> 64 (5x5) ->
  64 (3x3, stride 2) -> 6 (3x3), flattened (6 * 7 * 7 = 294) into a linear Gaussian head;
- q(z1 | x, z2): the same stack with 3x3 kernels on x, a gated dense layer from z2 to as
  many units (294), one gated dense layer of 300 on their concatenation, a Gaussian head;
- p(z1 | z2): two gated dense layers of 300, a Gaussian head;
- p(x | z1, z2): a gated dense layer of 300 on each latent, one from their concatenation
  to an image-sized map, four gated 3x3 convolutions of 64 channels, a 1x1 convolution
  to the likelihood's parameter maps (Bernoulli logits; discretized logistic: location
  and log-scale, squashed by the likelihood as their code does).

Log-variances pass through hardtanh(-6, 2); linear layers start He-normal, convolutions
at PyTorch's default, as in their code. Not the Hamiltonian VAE, also abbreviated HVAE.
With a flow posterior (elbolab.flows) each of q's Gaussians is pushed through its own flow,
conditioned on the features its head reads, as in :mod:`.hierarchical`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ModelConfig, PosteriorConfig, model_section, require
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import common_options, register_model
from .conv_layers import ConvFeatures, GatedConv2d
from .layers import GatedDense, GaussianHead, GaussianNet, TwoInput, gated_gaussian, he_init_
from .two_level import TwoLevelVAE


@model_section("conv_hierarchical", "sizes of model \"conv-hierarchical\" (the VampPrior paper's ConvHVAE)")
@dataclass(frozen=True)
class ConvHierarchicalConfig:
    """Sizes of the VampPrior paper's convolutional two-level model (their convHVAE_2level.py)."""

    #: units of z1 (bottom) and z2 (top)
    latent_dims: tuple[int, int] = (40, 40)
    #: channels of the encoders' gated convolutions: the first two layers, the next two (their 32, 64)
    encoder_channels: tuple[int, int] = (32, 64)
    #: channels of the encoders' last gated convolution, flattened into dense layers (their 6)
    encoder_out_channels: int = 6
    #: width of the gated dense layers of q(z1|x,z2), p(z1|z2) and the decoder's latent inputs (their 300)
    width: int = 300
    #: channels of the decoder's 3x3 convolutions (their 64)
    decoder_channels: int = 64
    #: number of the decoder's gated 3x3 convolutions (their 4)
    decoder_layers: int = 4
    #: hardtanh range of the Gaussian log-variances (their code: [-6, 2])
    log_var_range: tuple[float, float] = (-6.0, 2.0)
    #: (height, width) of the images; null: the dataset's
    image_shape: tuple[int, int] | None = None

    def validate(self, key: str) -> None:
        require(all(d >= 1 for d in self.latent_dims), f"{key}.latent_dims", "sizes must be >= 1")
        for name in ("encoder_channels", "image_shape"):
            v = getattr(self, name)
            require(v is None or all(c >= 1 for c in v), f"{key}.{name}", f"sizes must be >= 1, got {v}")
        for name in ("encoder_out_channels", "width", "decoder_channels", "decoder_layers"):
            v = getattr(self, name)
            require(v >= 1, f"{key}.{name}", f"must be >= 1, got {v}")
        lo, hi = self.log_var_range
        require(lo < hi, f"{key}.log_var_range", f"needs min < max, got [{lo}, {hi}]")



def q_z2_layers(channels: tuple[int, int], out: int) -> list[tuple[int, int, int]]:
    """(out channels, kernel, stride) of q(z2 | x)'s gated convolutions."""
    c1, c2 = channels
    return [(c1, 7, 1), (c1, 3, 2), (c2, 5, 1), (c2, 3, 2), (out, 3, 1)]


def q_z1_x_layers(channels: tuple[int, int], out: int) -> list[tuple[int, int, int]]:
    """(out channels, kernel, stride) of q(z1 | x, z2)'s gated convolutions on x."""
    c1, c2 = channels
    return [(c1, 3, 1), (c1, 3, 2), (c2, 3, 1), (c2, 3, 2), (out, 3, 1)]


class ConvDecoder(nn.Module):
    """p(x | z1, z2): gated dense per latent -> gated dense to an image map -> gated 3x3
    convolutions -> 1x1 convolution to ``params`` maps, returned flat as ``[..., P * D]``
    (P blocks of D, the likelihood's layout)."""

    def __init__(self, image_shape: tuple[int, int], z_dims: Sequence[int], width: int, channels: int, layers: int,
                 params: int) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        d = self.image_shape[0] * self.image_shape[1]
        self.z1 = GatedDense(z_dims[0], width)
        self.z2 = GatedDense(z_dims[1], width)
        self.joint = GatedDense(2 * width, d)
        self.convs = nn.Sequential(*(GatedConv2d(1 if i == 0 else channels, channels, 3, 1, 1) for i in range(layers)))
        self.out = nn.Conv2d(channels, params, 1)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        h = self.joint(torch.cat([self.z1(z1), self.z2(z2)], dim=-1))
        lead = h.shape[:-1]
        maps = self.out(self.convs(h.reshape(-1, 1, *self.image_shape)))
        return maps.reshape(*lead, -1)


class ConvHierarchicalVAE(TwoLevelVAE):
    """ConvHVAE (L=2). Subclasses replace the decoder (:class:`~.pixel_hierarchical.PixelHierarchicalVAE`)."""

    first_log_q_last = True

    def __init__(
        self,
        image_shape: tuple[int, int],
        latent_dims: Sequence[int],
        likelihood: str,
        prior: Prior,
        *,
        encoder_channels: tuple[int, int] = (32, 64),
        encoder_out_channels: int = 6,
        width: int = 300,
        decoder_channels: int = 64,
        decoder_layers: int = 4,
        log_var_range: tuple[float, float] = (-6.0, 2.0),
        posterior: PosteriorConfig | None = None,
        **decoder_options: object,
    ) -> None:
        super().__init__()
        if len(image_shape) != 2:
            raise ValueError(f"image_shape must be (height, width) of one-channel images, got {list(image_shape)}")
        d1, d2 = latent_dims
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.data_dim = self.image_shape[0] * self.image_shape[1]
        self.latent_dims = [d1, d2]
        # the decoder emits the likelihood's parameters itself: an identity head
        self.likelihood = make_likelihood(likelihood, self.data_dim)
        x_features = ConvFeatures(self.image_shape, q_z2_layers(encoder_channels, encoder_out_channels))
        self.q_z2 = GaussianNet(x_features, GaussianHead(x_features.out_features, d2, log_var_range))
        # q(z1 | x, z2): conv features of x (once per image) ++ gated(z2) -> gated -> Gaussian head
        x_features = ConvFeatures(self.image_shape, q_z1_x_layers(encoder_channels, encoder_out_channels))
        n = x_features.out_features
        self.q_z1 = GaussianNet(TwoInput(x_features, GatedDense(d2, n), GatedDense(2 * n, width)),
                                GaussianHead(width, d1, log_var_range))
        self.p_z1 = gated_gaussian(d2, width, 2, d1, log_var_range)
        self.p_x = self.make_decoder(width, decoder_channels, decoder_layers, **decoder_options)
        he_init_(self)
        self.make_flows(posterior, {"z2": self.q_z2.body.out_features, "z1": width})
        self.attach(prior, posterior)

    def legacy_keys(self) -> dict[str, str]:
        return {"q_z2.features.": "q_z2.body.", "q_z1.x_features.": "q_z1.body.a.", "q_z1.z_features.": "q_z1.body.b.",
                "q_z1.joint.": "q_z1.body.joint."}

    def make_decoder(self, width: int, channels: int, layers: int) -> nn.Module:
        """p(x | z1, z2)'s network; called once the likelihood and the sizes are set."""
        return ConvDecoder(self.image_shape, self.latent_dims, width, channels, layers,
                           self.likelihood.params_per_pixel)

    def decoder_features(self, z1: Tensor, z2: Tensor, x: Tensor | None = None) -> Tensor:
        """The likelihood's parameters (its head is the identity), ``[..., B, P * D]``."""
        return self.p_x(z1, z2)


def image_shape(shape: Sequence[int] | None, data_dim: int, key: str) -> tuple[int, int]:
    """The configured (height, width), else the square image of ``data_dim`` pixels."""
    if shape is None:
        side = math.isqrt(data_dim)
        if side * side != data_dim:
            raise ValueError(f"{key}: {data_dim} pixels are not a square image; set [height, width]")
        shape = (side, side)
    if len(shape) != 2 or shape[0] * shape[1] != data_dim:
        raise ValueError(f"{key}: {list(shape)} does not hold the data's {data_dim} pixels")
    return int(shape[0]), int(shape[1])


def conv_options(cfg: ModelConfig, key: str, data_dim: int, train_data: Tensor | None) -> dict[str, object]:
    """The keyword arguments of a convolutional two-level model from section ``model.<key>``."""
    s = getattr(cfg, key)
    options = common_options(cfg, data_dim, train_data, s.latent_dims[1], s)
    return {**options, "image_shape": image_shape(s.image_shape, data_dim, f"model.{key}.image_shape")}


@register_model("conv-hierarchical")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> ConvHierarchicalVAE:
    return ConvHierarchicalVAE(**conv_options(cfg, "conv_hierarchical", data_dim, train_data))

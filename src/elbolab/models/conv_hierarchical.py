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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..distributions import DiagonalGaussian
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import LatentVariableModel, LogWeightTerms
from .conv_layers import ConvFeatures, GatedConv2d
from .hierarchical import GatedGaussian
from .layers import GatedDense, GaussianHead, draw, he_init_, with_detached_params


def q_z2_layers(channels: tuple[int, int], out: int) -> list[tuple[int, int, int]]:
    """(out channels, kernel, stride) of q(z2 | x)'s gated convolutions."""
    c1, c2 = channels
    return [(c1, 7, 1), (c1, 3, 2), (c2, 5, 1), (c2, 3, 2), (out, 3, 1)]


def q_z1_x_layers(channels: tuple[int, int], out: int) -> list[tuple[int, int, int]]:
    """(out channels, kernel, stride) of q(z1 | x, z2)'s gated convolutions on x."""
    c1, c2 = channels
    return [(c1, 3, 1), (c1, 3, 2), (c2, 3, 1), (c2, 3, 2), (out, 3, 1)]


class ConvGaussian(nn.Module):
    """q(z2 | x): gated convolutions on the image -> (mean, clamped log-variance)."""

    def __init__(self, features: ConvFeatures, out_dim: int, log_var_range: tuple[float, float]) -> None:
        super().__init__()
        self.features = features
        self.head = GaussianHead(features.out_features, out_dim, log_var_range)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.features(x))


class ConvConditionalGaussian(nn.Module):
    """q(z1 | x, z2): conv features of x (once per image) ++ gated(z2) -> gated -> Gaussian head."""

    def __init__(self, features: ConvFeatures, z_dim: int, width: int, out_dim: int,
                 log_var_range: tuple[float, float]) -> None:
        super().__init__()
        self.x_features = features
        self.z_features = GatedDense(z_dim, features.out_features)
        self.joint = GatedDense(2 * features.out_features, width)
        self.head = GaussianHead(width, out_dim, log_var_range)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, D]``, ``z`` ``[..., B, D2]`` -> parameters ``[..., B, D1]``."""
        hz = self.z_features(z)
        hx = self.x_features(x).expand(*hz.shape[:-1], hz.shape[-1])
        return self.head(self.joint(torch.cat([hx, hz], dim=-1)))


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


class ConvHierarchicalVAE(LatentVariableModel):
    """ConvHVAE (L=2). Subclasses replace the decoder (:class:`~.pixel_hierarchical.PixelHierarchicalVAE`)."""

    prior_layer = "z2"

    def __init__(
        self,
        image_shape: tuple[int, int],
        latent_dims: Sequence[int],
        likelihood: str,
        prior: Prior,
        encoder_channels: tuple[int, int] = (32, 64),
        encoder_out_channels: int = 6,
        width: int = 300,
        decoder_channels: int = 64,
        decoder_layers: int = 4,
        log_var_range: tuple[float, float] = (-6.0, 2.0),
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
        self.q_z2 = ConvGaussian(ConvFeatures(self.image_shape, q_z2_layers(encoder_channels, encoder_out_channels)),
                                 d2, log_var_range)
        self.q_z1 = ConvConditionalGaussian(
            ConvFeatures(self.image_shape, q_z1_x_layers(encoder_channels, encoder_out_channels)),
            d2, width, d1, log_var_range)
        self.p_z1 = GatedGaussian(d2, width, 2, d1, log_var_range)
        self.p_x = self.make_decoder(width, decoder_channels, decoder_layers, **decoder_options)
        he_init_(self)
        self.prior = prior
        prior.attach(self)

    def make_decoder(self, width: int, channels: int, layers: int) -> nn.Module:
        """p(x | z1, z2)'s network; called once the likelihood and the sizes are set."""
        return ConvDecoder(self.image_shape, self.latent_dims, width, channels, layers,
                           self.likelihood.params_per_pixel)

    def decode(self, x: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        """Likelihood parameters of p(x | z1, z2), ``[..., B, P * D]``; ``x`` ``[B, D]`` is
        not read here (a PixelCNN decoder reads it)."""
        return self.p_x(z1, z2)

    # --- the protocol -------------------------------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z2 | x), the first-sampled (and top) layer; ``x`` ``[B, D]`` flat images."""
        return DiagonalGaussian(*self.q_z2(x))

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        q2 = self.posterior(x)
        z2 = q2.rsample(k)  # [K, B, D2]
        m1, lv1 = self.q_z1(x, z2)
        z1 = draw(m1, lv1)  # [K, B, D1]
        if stop_posterior_grad:
            q2 = q2.detach()
            m1, lv1 = with_detached_params(self.q_z1, x, z2)
        log_q2 = q2.log_prob(z2)
        log_q1 = DiagonalGaussian(m1, lv1).log_prob(z1)
        log_p2 = self.prior.log_prob(z2)
        log_p1 = DiagonalGaussian(*self.p_z1(z2)).log_prob(z1)
        log_px = self.likelihood.log_prob(x, self.decode(x, z1, z2))
        return LogWeightTerms(log_px, {"z1": log_p1, "z2": log_p2}, {"z1": log_q1, "z2": log_q2}, {"z1": z1, "z2": z2})

    def conditional_means(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """[mu1(x, z2) at k draws z2 ~ q(z2|x) ``[K, B, D1]``, E_q[z2|x] ``[B, D2]``]."""
        q2 = self.posterior(x)
        return [self.q_z1(x, q2.rsample(k, generator))[0], q2.mean]

    def latents_given_top(self, z_top: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z1 ~ p(z1 | z2); the decoder reads both, returned as ``[..., D1 + D2]``."""
        z1 = draw(*self.p_z1(z_top), generator=generator)
        return torch.cat([z1, z_top], dim=-1)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.latents_given_top(self.prior.sample(n, generator), generator)

    def decode_mean(self, z: Tensor) -> Tensor:
        """E[x | z1, z2] for ``z`` ``[..., D1 + D2]`` (z1 then z2), as :meth:`sample_latents` returns."""
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.likelihood.mean(self.p_x(z1, z2))

    @torch.no_grad()
    def decode_sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x ~ p(x | z1, z2), ``[..., D]``."""
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.likelihood.sample(self.p_x(z1, z2), generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        m2 = self.posterior(x).mean
        m1 = self.q_z1(x, m2)[0]
        return self.decode_mean(torch.cat([m1, m2], dim=-1))

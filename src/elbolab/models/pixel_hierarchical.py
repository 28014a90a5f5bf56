"""The VampPrior paper's two-level VAE with a PixelCNN decoder, "PixelHVAE (L=2)".

The encoders and p(z1 | z2) are ConvHVAE's (:mod:`.conv_hierarchical`); the decoder is
the authors' models/PixelHVAE_2level.py:

    z1 -> gated dense -> one H x W map,   z2 -> gated dense -> one H x W map
    [x, map(z1), map(z2)] -> masked 3x3 conv type A (64 channels) -> 7 x masked 3x3 conv
    type B (64), each followed by batch normalization and a ReLU -> 1x1 conv to the
    likelihood's parameter maps (with a bias for Bernoulli, without for grey levels).

p(x | z1, z2) = prod_i p(x_i | x_<i, z1, z2) in raster order, so ``log_prob`` reads every
pixel's conditional from ONE pass over the observed image (teacher forcing); the masks
(tests/test_conv_models.py checks them with gradients) keep pixel i from seeing pixels
>= i. As in their code the type-A mask hides the latent maps at and after pixel i too.

**Batch normalization** (their choice, ``batch_norm: true``): in training mode it
normalizes with the statistics of the whole batch, every pixel position included, so a
training log weight depends slightly on the rest of the batch; in eval mode (the
IS log-likelihood, validation, sampling) it is a fixed per-channel affine map and
p(x | z) is an exact normalized density. ``batch_norm: false`` uses biases instead.

Sampling is autoregressive, pixel by pixel in raster order, batched over images, in
eval mode. Each step runs the PixelCNN on the window of rows i - L .. i and columns
j - L .. j + L around pixel (i, j) only (L masked layers, each reaching one pixel): the
pixel's receptive field, so the result is the full pass's, at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ModelConfig, model_section
from ..likelihoods import Likelihood
from ..priors import Prior
from .base import register_model
from .conv_hierarchical import ConvHierarchicalConfig, ConvHierarchicalVAE, conv_options
from .conv_layers import MaskedConv2d
from .layers import GatedDense


@model_section("pixel_hierarchical", "sizes of model \"pixel-hierarchical\" (the VampPrior paper's PixelHVAE)")
@dataclass(frozen=True)
class PixelHierarchicalConfig(ConvHierarchicalConfig):
    """The same encoders with a PixelCNN decoder (their PixelHVAE_2level.py); ``width`` sizes
    q(z1|x,z2) and p(z1|z2) only (each latent maps straight to one image-sized map)."""

    #: masked 3x3 convolutions of the PixelCNN: one of type A, then type B (their 8)
    decoder_layers: int = 8
    #: batch normalization after each masked convolution, as in their code (false: biases)
    batch_norm: bool = True


class PixelCNNDecoder(nn.Module):
    """p(x | z1, z2) as a PixelCNN conditioned on one latent map per latent; parameters ``[..., P * D]``.

    ``z_dims`` holds one size (one latent z1, z2 None: VLAE's decoder) or two. The output at
    pixel (i, j) reads rows i - L .. i and columns j - L .. j + L only (L = ``reach``, one
    pixel per 3x3 masked layer), and of those only the pixels before (i, j) in raster order."""

    def __init__(self, image_shape: tuple[int, int], z_dims: Sequence[int], channels: int, layers: int, params: int,
                 batch_norm: bool, out_bias: bool) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        d = self.image_shape[0] * self.image_shape[1]
        self.z1 = GatedDense(z_dims[0], d)
        self.z2 = GatedDense(z_dims[1], d) if len(z_dims) > 1 else None
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks.append(MaskedConv2d("A" if i == 0 else "B", 1 + len(z_dims) if i == 0 else channels, channels, 3, 1,
                                       bias=not batch_norm))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(channels))
            blocks.append(nn.ReLU())
        self.net = nn.Sequential(*blocks)
        self.out = nn.Conv2d(channels, params, 1, bias=out_bias)
        self.params = params
        #: how far (in pixels) the output at one pixel reaches back: one per 3x3 masked layer
        self.reach = layers

    def latent_maps(self, z1: Tensor, z2: Tensor | None = None) -> Tensor:
        """``[..., D1]`` (and ``[..., D2]``) -> ``[N, M, H, W]``, one map per latent (N: the leading dims)."""
        maps = [self.z1(z1)] if self.z2 is None else [self.z1(z1), self.z2(z2)]
        return torch.stack(maps, dim=-2).reshape(-1, len(maps), *self.image_shape)

    def param_maps(self, x: Tensor, maps: Tensor) -> Tensor:
        """``x`` ``[N, 1, h, w]``, ``maps`` ``[N, M, h, w]`` -> ``[N, P, h, w]`` (any window h x w)."""
        return self.out(self.net(torch.cat([x, maps], dim=1)))

    def forward(self, x: Tensor, z1: Tensor, z2: Tensor | None = None) -> Tensor:
        """``x`` ``[B, D]`` (broadcast over the sample axis), ``z`` ``[..., B, D_l]`` -> ``[..., B, P * D]``."""
        lead = z1.shape[:-1]
        maps = self.latent_maps(z1, z2)
        images = x.expand(*lead, x.shape[-1]).reshape(-1, 1, *self.image_shape)
        return self.param_maps(images, maps).reshape(*lead, -1)

    @torch.no_grad()
    def sample(self, z1: Tensor, z2: Tensor | None, likelihood: Likelihood, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]:
        """Autoregressive draws x ~ p(x | z1, z2) for ``z`` ``[n, D_l]``: (x ``[n, D]``, the
        parameters of every pixel's conditional given the pixels drawn before it ``[n, P * D]``).

        Batch normalization uses its running statistics (eval mode) for the whole loop.
        """
        was_training = self.training
        self.eval()
        try:
            return self._sample(z1, z2, likelihood, generator)
        finally:
            self.train(was_training)

    def _sample(self, z1: Tensor, z2: Tensor | None, likelihood: Likelihood, generator: torch.Generator | None
                ) -> tuple[Tensor, Tensor]:
        h, w = self.image_shape
        maps = self.latent_maps(z1, z2)
        n, r = maps.shape[0], self.reach
        x = maps.new_zeros(n, 1, h, w)
        params = maps.new_zeros(n, self.params, h, w)
        for i in range(h):
            top = max(0, i - r)
            for j in range(w):
                left, right = max(0, j - r), min(w, j + r + 1)
                window = self.param_maps(x[:, :, top:i + 1, left:right], maps[:, :, top:i + 1, left:right])
                params[:, :, i, j] = window[:, :, i - top, j - left]
                # the likelihood draws every pixel from the current parameters; only (i, j) is kept
                draw = likelihood.sample(params.reshape(n, -1), generator).reshape(n, h, w)
                x[:, 0, i, j] = draw[:, i, j]
        return x.reshape(n, h * w), params.reshape(n, -1)


class PixelHierarchicalVAE(ConvHierarchicalVAE):
    """PixelHVAE (L=2): ConvHVAE's encoders and p(z1 | z2), a PixelCNN p(x | z1, z2).

    ``decode_mean`` has no closed form (E[x | z] sums over every image the PixelCNN can
    draw). It returns, like the authors' generate_x, the mean of each pixel's conditional
    p(x_i | x_<i, z) along ONE autoregressive sample x ~ p(x | z): a random image (fixed by
    the generator of :meth:`decode_sample_and_mean`, else torch's global stream), not E[x | z].
    """

    exact_decode_mean = False

    def __init__(self, image_shape: tuple[int, int], latent_dims: Sequence[int], likelihood: str, prior: Prior, *,
                 decoder_layers: int = 8, batch_norm: bool = True, **options: object) -> None:
        super().__init__(image_shape, latent_dims, likelihood, prior, decoder_layers=decoder_layers,
                         batch_norm=batch_norm, **options)

    def make_decoder(self, width: int, channels: int, layers: int, batch_norm: bool = True) -> nn.Module:
        return PixelCNNDecoder(self.image_shape, self.latent_dims, channels, layers, self.likelihood.params_per_pixel,
                               batch_norm, out_bias=self.likelihood.binary)

    def decoder_features(self, z1: Tensor, z2: Tensor, x: Tensor | None = None) -> Tensor:
        """Parameters of every pixel's conditional p(x_i | x_<i, z1, z2) at the image ``x``
        ``[B, D]``, in one pass: ``[..., B, P * D]`` (the likelihood's head is the identity)."""
        if x is None:
            raise ValueError("a PixelCNN decoder reads the image x (teacher forcing); to draw x use decode_sample")
        return self.p_x(x, z1, z2)

    @torch.no_grad()
    def decode_sample_and_mean(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """For ``z`` ``[n, D1 + D2]``: an autoregressive sample x ~ p(x | z) ``[n, D]`` and the
        mean of each pixel's conditional along it ``[n, D]``."""
        z1, z2 = z.split(self.latent_dims, dim=-1)
        x, params = self.p_x.sample(z1, z2, self.likelihood, generator)
        return x, self.likelihood.mean(params)

    def decode_mean(self, z: Tensor) -> Tensor:
        """Conditional means along one autoregressive sample (see the class docstring)."""
        return self.decode_sample_and_mean(z)[1]

    def decode_sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x ~ p(x | z1, z2), drawn pixel by pixel, ``[n, D]``."""
        return self.decode_sample_and_mean(z, generator)[0]


@register_model("pixel-hierarchical")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> PixelHierarchicalVAE:
    return PixelHierarchicalVAE(**conv_options(cfg, "pixel_hierarchical", data_dim, train_data))

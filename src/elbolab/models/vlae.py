"""VLAE, the variational lossy autoencoder (Chen et al. 2016, arXiv:1611.02731).

    q(z | x),    p(z) p(x | z),    p(x | z) = prod_i p(x_i | x_<i, z) by a LOCAL PixelCNN

The decoder is PixelHVAE's PixelCNN (:class:`~.pixel_hierarchical.PixelCNNDecoder`) with one
latent map: ``decoder_layers`` masked 3x3 convolutions, so the output at pixel (i, j) reads
only the pixels before it inside rows i - L .. i, columns j - L .. j + L (L = decoder_layers).
A window that small cannot draw a digit's global shape, so the latent must carry it (the
paper's point: the code is lossy about local texture). The prior is meant to be the
autoregressive-flow prior ``model.prior.name: af`` (:class:`~elbolab.priors.AutoregressiveFlowPrior`);
any prior works, which gives the paper's ablation against a Gaussian prior.

q(z | x) is ConvHVAE's q(z2 | x) (five gated convolutions and a Gaussian head, hardtanh on
the log-variance), optionally pushed through a flow (``model.posterior``). Every size where
the paper was not checked is stated in docs/priors.md.

**Free bits** (Kingma et al. 2016; ``free_bits`` nats per group of ``free_bits_groups``
consecutive units): the training objective is E[log p(x|z)] - sum_g max(lambda, KL_g) with
KL_g the group's KL averaged over the batch and the draws. The log weights stay the one
``[K, B]`` tensor: each unit's single-sample KL term (log q per unit minus the prior's
per-unit term, :meth:`~elbolab.priors.Prior.log_prob_dims`) is summed by group, and
``LogWeightTerms.free_bits`` adds, for the groups under the floor, a term of value 0 whose
gradient cancels theirs. Every bound and the IS log-likelihood are unchanged (the term is
0 and only present in training mode with gradients on); for the single-sample ELBO the
gradient is exactly the free-bits objective's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig, PosteriorConfig, model_section, require
from ..distributions import LOG_2PI, DiagonalGaussian
from ..errors import ModelCapabilityError
from ..flows import log_prob_fixed, make_flow, push_forward
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import LatentVariableModel, LogWeightTerms, common_options, register_model
from .conv_hierarchical import image_shape, q_z2_layers
from .conv_layers import ConvFeatures
from .layers import GaussianHead, GaussianNet, he_init_
from .pixel_hierarchical import PixelCNNDecoder


@model_section("vlae", "sizes of model \"vlae\" (Chen et al. 2016's variational lossy autoencoder)")
@dataclass(frozen=True)
class VLAEConfig:
    """Sizes of VLAE: one latent, a conv encoder, a local PixelCNN decoder (docs/priors.md)."""

    #: units of z
    latent_dim: int = 32
    #: channels of the encoder's gated convolutions: the first two layers, the next two (ConvHVAE's)
    encoder_channels: tuple[int, int] = (32, 64)
    #: channels of the encoder's last gated convolution, flattened into the Gaussian head
    encoder_out_channels: int = 6
    #: channels of the PixelCNN's masked convolutions
    decoder_channels: int = 64
    #: masked 3x3 convolutions of the PixelCNN (type A, then B): also its reach L in pixels
    decoder_layers: int = 4
    #: batch normalization after each masked convolution (false: biases; exact densities in training too)
    batch_norm: bool = False
    #: hardtanh range of q's log-variance
    log_var_range: tuple[float, float] = (-6.0, 2.0)
    #: free bits: the KL floor lambda in nats per group of units (0: the plain bound)
    free_bits: float = 0.0
    #: free bits: groups of consecutive latent units (must divide latent_dim when free_bits > 0)
    free_bits_groups: int = 8
    #: (height, width) of the images; null: the dataset's
    image_shape: tuple[int, int] | None = None

    def validate(self, key: str) -> None:
        for name in ("latent_dim", "encoder_out_channels", "decoder_channels", "decoder_layers", "free_bits_groups"):
            v = getattr(self, name)
            require(v >= 1, f"{key}.{name}", f"must be >= 1, got {v}")
        for name in ("encoder_channels", "image_shape"):
            v = getattr(self, name)
            require(v is None or all(c >= 1 for c in v), f"{key}.{name}", f"sizes must be >= 1, got {v}")
        lo, hi = self.log_var_range
        require(lo < hi, f"{key}.log_var_range", f"needs min < max, got [{lo}, {hi}]")
        require(math.isfinite(self.free_bits) and self.free_bits >= 0, f"{key}.free_bits",
                f"must be a finite number >= 0, got {self.free_bits}")
        require(self.free_bits == 0 or self.latent_dim % self.free_bits_groups == 0, f"{key}.free_bits_groups",
                f"{self.free_bits_groups} groups do not divide latent_dim {self.latent_dim}")


def log_normal_dims(z: Tensor, q: DiagonalGaussian) -> Tensor:
    """log N(z; mean, diag exp(log_var)) per unit, ``[..., D]`` (summing to ``q.log_prob(z)``)."""
    return -0.5 * (LOG_2PI + q.log_var + (z - q.mean).pow(2) * torch.exp(-q.log_var))


class VLAE(LatentVariableModel):
    """A conv encoder, any prior (the AF prior for VLAE proper), a local PixelCNN p(x | z)."""

    encoder_prefixes = ("q_",)
    exact_decode_mean = False

    def __init__(self, image_shape: tuple[int, int], latent_dim: int, likelihood: str, prior: Prior, *,
                 encoder_channels: tuple[int, int] = (32, 64), encoder_out_channels: int = 6,
                 decoder_channels: int = 64, decoder_layers: int = 4, batch_norm: bool = False,
                 log_var_range: tuple[float, float] = (-6.0, 2.0), free_bits: float = 0.0, free_bits_groups: int = 8,
                 posterior: PosteriorConfig | None = None) -> None:
        super().__init__()
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.data_dim = self.image_shape[0] * self.image_shape[1]
        self.latent_dims = [latent_dim]
        self.likelihood = make_likelihood(likelihood, self.data_dim)
        features = ConvFeatures(self.image_shape, q_z2_layers(encoder_channels, encoder_out_channels))
        self.q_z = GaussianNet(features, GaussianHead(features.out_features, latent_dim, log_var_range))
        self.p_x = PixelCNNDecoder(self.image_shape, [latent_dim], decoder_channels, decoder_layers,
                                   self.likelihood.params_per_pixel, batch_norm, out_bias=self.likelihood.binary)
        he_init_(self)
        self.q_flow = make_flow(posterior, latent_dim, features.out_features)
        self.free_bits = float(free_bits)
        self.free_bits_groups = int(free_bits_groups)
        if self.free_bits > 0:
            if self.q_flow is not None:
                raise ValueError("model.vlae.free_bits: a flow posterior gives no log q per latent unit; "
                                 "set free_bits 0 or model.posterior.flow none")
            try:
                prior.log_prob_dims(torch.zeros(1, latent_dim))
            except ModelCapabilityError as e:
                raise ValueError(f"model.vlae.free_bits: {e}") from None
        self.attach_prior(prior, posterior, self.q_flow)

    # --- q ----------------------------------------------------------------------------------

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x), or with a flow the Gaussian q0 before it."""
        return DiagonalGaussian(*self.q_z(x))

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        h = self.q_z.body(x)
        q = DiagonalGaussian(*self.q_z.head(h))
        z0 = q.rsample(k, generator)
        z, log_q = push_forward(q, z0, self.q_flow, h)
        if stop_posterior_grad:  # x carries no gradient, so detached outputs are detached weights
            log_q = log_prob_fixed(q.detach(), z0, z, self.q_flow, h.detach())
        return {"z": z}, {"z": log_q}

    # --- p ----------------------------------------------------------------------------------

    def log_p_z(self, z: Tensor) -> Tensor:
        return self.prior.log_prob(z)

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) from one teacher-forced PixelCNN pass over ``x`` ``[B, D]``; ``z`` ``[..., B, D_z]``."""
        return self.likelihood.log_prob(x, self.p_x(x, z))

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        h = self.q_z.body(x)
        q = DiagonalGaussian(*self.q_z.head(h))
        z0 = q.rsample(k)
        z, log_q = push_forward(q, z0, self.q_flow, h)
        if stop_posterior_grad:
            q = q.detach()
            log_q = log_prob_fixed(q, z0, z, self.q_flow, h.detach())
        terms = LogWeightTerms(self.log_p_x_given_z(x, z), {"z": self.prior.log_prob(z)}, {"z": log_q}, {"z": z})
        if self.free_bits > 0 and self.training and torch.is_grad_enabled():
            terms.free_bits = self.free_bits_term(z, q)
        return terms

    def free_bits_term(self, z: Tensor, q: DiagonalGaussian) -> Tensor:
        """``[K, B]``, value 0: its gradient cancels the KL gradient of every group of units whose KL,
        averaged over the draws and the batch, is under ``free_bits`` (see the module docstring)."""
        kl = log_normal_dims(z, q) - self.prior.log_prob_dims(z)  # [K, B, D]
        kl = kl.unflatten(-1, (self.free_bits_groups, -1)).sum(-1)  # [K, B, G]
        floor = (kl.detach().mean((0, 1)) < self.free_bits).to(kl.dtype)  # [G]
        held = (kl * floor).sum(-1)
        return held - held.detach()

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    @torch.no_grad()
    def decode_sample_and_mean(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """For ``z`` ``[n, D_z]``: x ~ p(x | z) drawn pixel by pixel ``[n, D]`` and the mean of each
        pixel's conditional along that draw ``[n, D]`` (E[x | z] has no closed form)."""
        x, params = self.p_x.sample(z, None, self.likelihood, generator)
        return x, self.likelihood.mean(params)

    def decode_mean(self, z: Tensor) -> Tensor:
        """Conditional means along one autoregressive sample (not E[x | z]; see ``exact_decode_mean``)."""
        return self.decode_sample_and_mean(z)[1]

    def decode_sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.decode_sample_and_mean(z, generator)[0]

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.decode_sample(z, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Conditional means along one autoregressive draw given q0's mean pushed through the flow."""
        h = self.q_z.body(x)
        z = self.q_z.head(h)[0]
        if self.q_flow is not None:
            z = self.q_flow(z, h)[0]
        return self.decode_mean(z)


@register_model("vlae")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> VLAE:
    s = cfg.vlae
    options = common_options(cfg, data_dim, train_data, s.latent_dim, s)
    return VLAE(**{**options, "image_shape": image_shape(s.image_shape, data_dim, "model.vlae.image_shape")})

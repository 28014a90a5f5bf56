"""One stochastic layer: the IWAE paper's 784-200-200-50 model (and any MLP sizes).

q(z|x) = N(mu(x), diag sigma^2(x)); p(z) = any prior; p(x|z) from the decoder through a
likelihood (Bernoulli on logits by default), which owns the decoder's output layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..distributions import DiagonalGaussian
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import LatentVariableModel, LogWeightTerms
from .layers import GaussianHead, mlp


class OneLayerVAE(LatentVariableModel):
    #: q(z|x) is the MLP ``encoder`` and its ``encoder_head``; the decoder and prior are p
    encoder_prefixes = ("encoder", "encoder_head")

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: Sequence[int],
        activation: str,
        likelihood: str,
        prior: Prior,
    ) -> None:
        super().__init__()
        self.data_dim = data_dim
        self.latent_dims = [latent_dim]
        body, width = mlp(data_dim, hidden, activation)
        self.encoder = body
        self.encoder_head = GaussianHead(width, latent_dim)
        self.decoder, dec_width = mlp(latent_dim, list(reversed(hidden)), activation)
        self.likelihood = make_likelihood(likelihood, data_dim, dec_width)
        self.prior = prior
        prior.attach(self)

    def legacy_keys(self) -> dict[str, str]:
        # the output layer was the decoder's last module
        return {f"decoder.{len(self.decoder)}.": "likelihood.head."}

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        mean, log_var = self.encoder_head(self.encoder(x))
        return DiagonalGaussian(mean, log_var)

    def log_p_z(self, z: Tensor) -> Tensor:
        return self.prior.log_prob(z)

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        return self.likelihood.log_prob_from_features(x, self.decoder(z))

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.likelihood.sample(self.decode(z), generator)

    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters for z of shape ``[..., D]``: ``[..., P * data_dim]``."""
        return self.likelihood.head(self.decoder(z))

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        q = self.posterior(x)
        z = q.rsample(k)  # [K, B, D]
        log_q = (q.detach() if stop_posterior_grad else q).log_prob(z)
        log_pz = self.prior.log_prob(z)
        log_px = self.likelihood.log_prob_from_features(x, self.decoder(z))
        return LogWeightTerms(log_px, {"z": log_pz}, {"z": log_q}, {"z": z})

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    def decode_mean(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.decode(z))

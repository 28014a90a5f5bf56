"""One stochastic layer: the IWAE paper's 784-200-200-50 model (and any MLP sizes).

q(z|x) = N(mu(x), diag sigma^2(x)), optionally pushed through a normalizing flow conditioned
on the encoder's last layer (elbolab.flows); p(z) = any prior; p(x|z) from the decoder through a
likelihood (Bernoulli on logits by default), which owns the decoder's output layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..config import ModelConfig, PosteriorConfig
from ..distributions import DiagonalGaussian
from ..flows import log_prob_fixed, make_flow, push_forward
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import LatentVariableModel, LogWeightTerms, common_options, register_model
from .layers import GaussianHead, check_flow_prior, mlp


class OneLayerVAE(LatentVariableModel):
    #: q(z|x) is the MLP ``encoder``, its ``encoder_head`` and ``encoder_flow``; the decoder and prior are p
    encoder_prefixes = ("encoder", "encoder_head", "encoder_flow")

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: Sequence[int],
        activation: str,
        likelihood: str,
        prior: Prior,
        posterior: PosteriorConfig | None = None,
    ) -> None:
        super().__init__()
        self.data_dim = data_dim
        self.latent_dims = [latent_dim]
        body, width = mlp(data_dim, hidden, activation)
        self.encoder = body
        self.encoder_head = GaussianHead(width, latent_dim)
        self.decoder, dec_width = mlp(latent_dim, list(reversed(hidden)), activation)
        self.likelihood = make_likelihood(likelihood, data_dim, dec_width)
        self.encoder_flow = make_flow(posterior, latent_dim, width)
        if self.encoder_flow is not None:
            self.posterior_flow = posterior.flow
        check_flow_prior(self.encoder_flow, prior)
        self.prior = prior
        prior.attach(self)

    def legacy_keys(self) -> dict[str, str]:
        # the output layer was the decoder's last module
        return {f"decoder.{len(self.decoder)}.": "likelihood.head."}

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x), or with a flow the Gaussian q0 before it."""
        mean, log_var = self.encoder_head(self.encoder(x))
        return DiagonalGaussian(mean, log_var)

    def log_p_z(self, z: Tensor) -> Tensor:
        return self.prior.log_prob(z)

    def local_posterior(self, x: Tensor) -> dict[str, Tensor]:
        """q(z|x)'s per-point outputs as free parameters: the Gaussian's mean and log-variance and,
        with a flow, what its steps read (``flow``: Flow.condition of the features), so that q*
        is sought in the flow posterior's own family (the flow's weights stay shared)."""
        if self.encoder_flow is None:
            return super().local_posterior(x)
        h = self.encoder(x)
        mean, log_var = self.encoder_head(h)
        return {"mean": mean, "log_var": log_var, "flow": self.encoder_flow.condition(h)}

    def log_weights_local(self, x: Tensor, k: int, params: dict[str, Tensor]) -> Tensor:
        if self.encoder_flow is None:
            return super().log_weights_local(x, k, params)
        q0 = DiagonalGaussian(params["mean"], params["log_var"])
        z0 = q0.rsample(k)
        z, log_det = self.encoder_flow.transform(z0, params["flow"])
        return self.log_joint(x, z) - (q0.log_prob(z0) - log_det)

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        return self.likelihood.log_prob_from_features(x, self.decoder(z))

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.likelihood.sample(self.decode(z), generator)

    def decode(self, z: Tensor) -> Tensor:
        """Likelihood parameters for z of shape ``[..., D]``: ``[..., P * data_dim]``."""
        return self.likelihood.head(self.decoder(z))

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        h = self.encoder(x)
        q = DiagonalGaussian(*self.encoder_head(h))
        z0 = q.rsample(k, generator)  # [K, B, D]
        z, log_q = push_forward(q, z0, self.encoder_flow, h)
        if stop_posterior_grad:  # x carries no gradient, so detached outputs are detached weights
            log_q = log_prob_fixed(q.detach(), z0, z, self.encoder_flow, h.detach())
        return {"z": z}, {"z": log_q}

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        zs, log_qs = self.sample_posterior(x, k, stop_posterior_grad=stop_posterior_grad)
        z = zs["z"]
        log_pz = self.prior.log_prob(z)
        log_px = self.likelihood.log_prob_from_features(x, self.decoder(z))
        return LogWeightTerms(log_px, {"z": log_pz}, log_qs, zs)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    def decode_mean(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean image decoded from q0's mean pushed through the flow, if any (no sampling)."""
        h = self.encoder(x)
        z = self.encoder_head(h)[0]
        if self.encoder_flow is not None:
            z = self.encoder_flow(z, h)[0]
        return self.decode_mean(z)


@register_model("one-layer")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> OneLayerVAE:
    options = common_options(cfg, data_dim, train_data, cfg.latent_dim)
    return OneLayerVAE(data_dim, cfg.latent_dim, cfg.hidden, cfg.activation, **options)

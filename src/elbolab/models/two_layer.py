"""The IWAE paper's two-stochastic-layer model (Burda et al. 2016, section 5).

    q(z1 | x) q(z2 | z1),    p(z2) p(z1 | z2) p(x | z1)

with z1 of 100 units and z2 of 50. Between x and z1 sit two deterministic tanh
layers of 200 units, between z1 and z2 two of 100; the generative networks mirror the
recognition ones (z2 -> 100 -> 100 -> z1, z1 -> 200 -> 200 -> x), as in the authors'
experiments.py. The sizes are config keys (``model.two_layer``). Every Gaussian is
diagonal, its mean and log-variance a linear map of the last deterministic layer.
The prior p(z2) is any prior of elbolab.priors (standard in the paper). With a flow
posterior (elbolab.flows) each of q's Gaussians is pushed through its own flow,
conditioned on the features its head reads: q(z1 | x) on those of x, q(z2 | z1) on those
of the flowed z1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import PosteriorConfig
from ..distributions import DiagonalGaussian
from ..flows import log_prob_fixed, make_flow, push_forward
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import LatentVariableModel, LogWeightTerms
from .layers import GaussianHead, check_flow_prior, draw, mlp, with_detached_params


class GaussianMLP(nn.Module):
    """input -> tanh MLP -> (mean, log-variance) of a diagonal Gaussian."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, act: str) -> None:
        super().__init__()
        body, width = mlp(in_dim, hidden, act)
        self.body = body
        self.head = GaussianHead(width, out_dim)
        self.width = width

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(h))


class TwoLayerVAE(LatentVariableModel):
    prior_layer = "z2"

    def __init__(
        self,
        data_dim: int,
        latent_dims: Sequence[int],
        hidden1: Sequence[int],
        hidden2: Sequence[int],
        activation: str,
        likelihood: str,
        prior: Prior,
        posterior: PosteriorConfig | None = None,
    ) -> None:
        super().__init__()
        d1, d2 = latent_dims
        self.data_dim = data_dim
        self.latent_dims = [d1, d2]
        self.q_z1 = GaussianMLP(data_dim, hidden1, d1, activation)
        self.q_z2 = GaussianMLP(d1, hidden2, d2, activation)
        self.p_z1 = GaussianMLP(d2, list(reversed(hidden2)), d1, activation)
        self.p_x, width = mlp(d1, list(reversed(hidden1)), activation)
        self.likelihood = make_likelihood(likelihood, data_dim, width)
        self.q_flow1 = make_flow(posterior, d1, self.q_z1.width)
        self.q_flow2 = make_flow(posterior, d2, self.q_z2.width)
        if self.q_flow1 is not None:
            self.posterior_flow = posterior.flow
        check_flow_prior(self.q_flow1, prior)
        self.prior = prior
        prior.attach(self)

    def legacy_keys(self) -> dict[str, str]:
        # the output layer was p_x's last module
        return {f"p_x.{len(self.p_x)}.": "likelihood.head."}

    # --- the protocol -------------------------------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z1 | x), the first-sampled layer (with a flow: the Gaussian before it)."""
        return DiagonalGaussian(*self.q_z1(x))

    def top_posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z2 | z1 = E_q[z1 | x]): q(z2 | x) itself is a continuous mixture with no
        closed form, so a VampPrior on z2 mixes these Gaussians at its pseudo-inputs."""
        return DiagonalGaussian(*self.q_z2(self.posterior(x).mean))

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        h1 = self.q_z1.body(x)
        q1 = DiagonalGaussian(*self.q_z1.head(h1))
        z1_0 = q1.rsample(k, generator)  # [K, B, D1]
        z1, log_q1 = push_forward(q1, z1_0, self.q_flow1, h1)
        h2 = self.q_z2.body(z1)
        q2 = DiagonalGaussian(*self.q_z2.head(h2))
        z2_0 = draw(q2.mean, q2.log_var, generator)  # [K, B, D2]
        z2, log_q2 = push_forward(q2, z2_0, self.q_flow2, h2)
        if stop_posterior_grad:
            log_q1 = log_prob_fixed(q1.detach(), z1_0, z1, self.q_flow1, h1.detach())
            h2 = with_detached_params(self.q_z2.body, z1)
            q2 = DiagonalGaussian(*with_detached_params(self.q_z2.head, h2))
            log_q2 = log_prob_fixed(q2, z2_0, z2, self.q_flow2, h2)
        return {"z1": z1, "z2": z2}, {"z1": log_q1, "z2": log_q2}

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        z, log_q = self.sample_posterior(x, k, stop_posterior_grad=stop_posterior_grad)
        z1, z2 = z["z1"], z["z2"]
        log_p2 = self.prior.log_prob(z2)
        log_p1 = DiagonalGaussian(*self.p_z1(z2)).log_prob(z1)
        log_px = self.likelihood.log_prob_from_features(x, self.p_x(z1))
        return LogWeightTerms(log_px, {"z1": log_p1, "z2": log_p2}, log_q, z)

    # --- the flat latent [z1, z2] -----------------------------------------------------
    def log_p_z(self, z: Tensor) -> Tensor:
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.prior.log_prob(z2) + DiagonalGaussian(*self.p_z1(z2)).log_prob(z1)

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        return self.likelihood.log_prob_from_features(x, self.p_x(z[..., : self.latent_dims[0]]))

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z2 = self.prior.sample(n, generator)
        return torch.cat([self.latents_given_top(z2, generator), z2], dim=-1)

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        features = self.p_x(z[..., : self.latent_dims[0]])
        return self.likelihood.sample(self.likelihood.head(features), generator)

    def local_posterior(self, x: Tensor) -> dict[str, Tensor]:
        """q(z1|x)'s mean and log-variance, and per-point shifts (zero: the encoder) of the
        mean and log-variance that q(z2|z1) computes; its dependence on z1 stays."""
        self.refuse_flow_local()
        q1 = self.posterior(x)
        zeros = q1.mean.new_zeros(*q1.mean.shape[:-1], self.latent_dims[1])
        return {"mean": q1.mean, "log_var": q1.log_var, "z2.mean_shift": zeros, "z2.log_var_shift": zeros.clone()}

    def log_weights_local(self, x: Tensor, k: int, params: dict[str, Tensor]) -> Tensor:
        q1 = DiagonalGaussian(params["mean"], params["log_var"])
        z1 = q1.rsample(k)  # [K, B, D1]
        m2, lv2 = self.q_z2(z1)
        q2 = DiagonalGaussian(m2 + params["z2.mean_shift"], lv2 + params["z2.log_var_shift"])
        z2 = draw(q2.mean, q2.log_var)
        return self.log_joint(x, torch.cat([z1, z2], dim=-1)) - q1.log_prob(z1) - q2.log_prob(z2)

    def conditional_means(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """[E_q[z1|x] ``[B, D1]``, mu2(z1) at k draws z1 ~ q(z1|x) ``[K, B, D2]``]: E_q[z2|x] is
        the average of mu2 over q(z1|x), with no closed form. With a flow: draws of both layers."""
        if self.posterior_flow != "none":
            return self.sampled_means(x, k, generator)
        q1 = self.posterior(x)
        return [q1.mean, self.q_z2(q1.rsample(k, generator))[0]]

    def latents_given_top(self, z_top: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z1 ~ p(z1 | z2): the decoder reads z1 only."""
        return draw(*self.p_z1(z_top), generator=generator)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.latents_given_top(self.prior.sample(n, generator), generator)

    def decode_mean(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.likelihood.head(self.p_x(z)))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean image decoded from q(z1|x)'s Gaussian mean pushed through its flow, if any."""
        h1 = self.q_z1.body(x)
        z1 = self.q_z1.head(h1)[0]
        if self.q_flow1 is not None:
            z1 = self.q_flow1(z1, h1)[0]
        return self.decode_mean(z1)

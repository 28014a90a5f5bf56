"""The VampPrior paper's two-level hierarchical VAE (Tomczak & Welling 2018, section 3.2).

    q(z2 | x) q(z1 | x, z2),    p(z2) p(z1 | z2) p(x | z1, z2)

Both levels have 40 units. Every deterministic layer is a gated dense layer of 300
units (h(x) * sigmoid(g(x))); branches that read two inputs run one gated layer on
each and one on their concatenation, as in the authors' code. Gaussian
log-variances pass through hardtanh(-6, 2) and weights start He-normal, also as in
their code. The prior (a VampPrior in the paper) is on z2. Not to be confused with the
Hamiltonian VAE, which is also abbreviated HVAE. With a flow posterior (elbolab.flows)
each of q's Gaussians is pushed through its own flow, conditioned on the features its
head reads: q(z2 | x) on those of x, q(z1 | x, z2) on those of x and the flowed z2.
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
from .layers import GatedDense, GaussianHead, check_flow_prior, draw, he_init_, with_detached_params


class GatedGaussian(nn.Module):
    """input -> gated dense layers -> (mean, clamped log-variance)."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int, log_var_range: tuple[float, float]) -> None:
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.body = nn.Sequential(*(GatedDense(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)))
        self.head = GaussianHead(width, out_dim, log_var_range)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(h))


class TwoInputGated(nn.Module):
    """(a, b) -> gated(a) ++ gated(b) -> gated -> features; a broadcasts against b's sample axis."""

    def __init__(self, a_dim: int, b_dim: int, width: int) -> None:
        super().__init__()
        self.a = GatedDense(a_dim, width)
        self.b = GatedDense(b_dim, width)
        self.joint = GatedDense(2 * width, width)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ha, hb = self.a(a), self.b(b)
        ha = ha.expand(*hb.shape[:-1], ha.shape[-1])
        return self.joint(torch.cat([ha, hb], dim=-1))


class ConditionalGaussian(nn.Module):
    """q(z1 | x, z2): two-input gated features -> (mean, clamped log-variance)."""

    def __init__(self, a_dim: int, b_dim: int, width: int, out_dim: int, log_var_range: tuple[float, float]) -> None:
        super().__init__()
        self.features = TwoInputGated(a_dim, b_dim, width)
        self.head = GaussianHead(width, out_dim, log_var_range)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.features(a, b))


class HierarchicalVAE(LatentVariableModel):
    prior_layer = "z2"

    def __init__(
        self,
        data_dim: int,
        latent_dims: Sequence[int],
        width: int,
        log_var_range: tuple[float, float],
        likelihood: str,
        prior: Prior,
        posterior: PosteriorConfig | None = None,
    ) -> None:
        super().__init__()
        d1, d2 = latent_dims
        self.data_dim = data_dim
        self.latent_dims = [d1, d2]
        self.q_z2 = GatedGaussian(data_dim, width, 2, d2, log_var_range)
        self.q_z1 = ConditionalGaussian(data_dim, d2, width, d1, log_var_range)
        self.p_z1 = GatedGaussian(d2, width, 2, d1, log_var_range)
        self.p_x_features = TwoInputGated(d1, d2, width)
        self.likelihood = make_likelihood(likelihood, data_dim, width)
        he_init_(self)
        # after he_init_: the flows keep their own initialization (the IAF gate's bias)
        self.q_flow2 = make_flow(posterior, d2, width)
        self.q_flow1 = make_flow(posterior, d1, width)
        if self.q_flow2 is not None:
            self.posterior_flow = posterior.flow
        check_flow_prior(self.q_flow2, prior)
        self.prior = prior
        prior.attach(self)

    def legacy_keys(self) -> dict[str, str]:
        return {"p_x_out.": "likelihood.head."}

    def decode(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Likelihood parameters of p(x | z1, z2), ``[..., P * data_dim]``."""
        return self.likelihood.head(self.p_x_features(z1, z2))

    # --- the protocol -------------------------------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z2 | x), the first-sampled (and top) layer (with a flow: the Gaussian before it)."""
        return DiagonalGaussian(*self.q_z2(x))

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        h2 = self.q_z2.body(x)
        q2 = DiagonalGaussian(*self.q_z2.head(h2))
        z2_0 = q2.rsample(k, generator)  # [K, B, D2]
        z2, log_q2 = push_forward(q2, z2_0, self.q_flow2, h2)
        h1 = self.q_z1.features(x, z2)
        q1 = DiagonalGaussian(*self.q_z1.head(h1))
        z1_0 = draw(q1.mean, q1.log_var, generator)  # [K, B, D1]
        z1, log_q1 = push_forward(q1, z1_0, self.q_flow1, h1)
        if stop_posterior_grad:
            log_q2 = log_prob_fixed(q2.detach(), z2_0, z2, self.q_flow2, h2.detach())
            h1 = with_detached_params(self.q_z1.features, x, z2)
            q1 = DiagonalGaussian(*with_detached_params(self.q_z1.head, h1))
            log_q1 = log_prob_fixed(q1, z1_0, z1, self.q_flow1, h1)
        return {"z1": z1, "z2": z2}, {"z1": log_q1, "z2": log_q2}

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        z, log_q = self.sample_posterior(x, k, stop_posterior_grad=stop_posterior_grad)
        z1, z2 = z["z1"], z["z2"]
        log_p2 = self.prior.log_prob(z2)
        log_p1 = DiagonalGaussian(*self.p_z1(z2)).log_prob(z1)
        log_px = self.likelihood.log_prob_from_features(x, self.p_x_features(z1, z2))
        return LogWeightTerms(log_px, {"z1": log_p1, "z2": log_p2}, {"z1": log_q["z1"], "z2": log_q["z2"]},
                              {"z1": z1, "z2": z2})

    # --- the flat latent [z1, z2] -----------------------------------------------------
    def log_p_z(self, z: Tensor) -> Tensor:
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.prior.log_prob(z2) + DiagonalGaussian(*self.p_z1(z2)).log_prob(z1)

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.likelihood.log_prob_from_features(x, self.p_x_features(z1, z2))

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_latents(n, generator)

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.likelihood.sample(self.decode(*z.split(self.latent_dims, dim=-1)), generator)

    def local_posterior(self, x: Tensor) -> dict[str, Tensor]:
        """q(z2|x)'s mean and log-variance, and per-point shifts (zero: the encoder) of the
        mean and log-variance that q(z1|x, z2) computes; its dependence on z2 stays."""
        self.refuse_flow_local()
        q2 = self.posterior(x)
        zeros = q2.mean.new_zeros(*q2.mean.shape[:-1], self.latent_dims[0])
        return {"mean": q2.mean, "log_var": q2.log_var, "z1.mean_shift": zeros, "z1.log_var_shift": zeros.clone()}

    def log_weights_local(self, x: Tensor, k: int, params: dict[str, Tensor]) -> Tensor:
        q2 = DiagonalGaussian(params["mean"], params["log_var"])
        z2 = q2.rsample(k)  # [K, B, D2]
        m1, lv1 = self.q_z1(x, z2)
        q1 = DiagonalGaussian(m1 + params["z1.mean_shift"], lv1 + params["z1.log_var_shift"])
        z1 = draw(q1.mean, q1.log_var)
        return self.log_joint(x, torch.cat([z1, z2], dim=-1)) - q1.log_prob(z1) - q2.log_prob(z2)

    def conditional_means(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """[mu1(x, z2) at k draws z2 ~ q(z2|x) ``[K, B, D1]``, E_q[z2|x] ``[B, D2]``]: E_q[z1|x]
        is the average of mu1 over q(z2|x), with no closed form. With a flow: draws of both layers."""
        if self.posterior_flow != "none":
            return self.sampled_means(x, k, generator)
        q2 = self.posterior(x)
        return [self.q_z1(x, q2.rsample(k, generator))[0], q2.mean]

    def latents_given_top(self, z_top: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z1 ~ p(z1 | z2); the decoder reads both, returned as ``[..., D1 + D2]``."""
        z1 = draw(*self.p_z1(z_top), generator=generator)
        return torch.cat([z1, z_top], dim=-1)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.latents_given_top(self.prior.sample(n, generator), generator)

    def decode_mean(self, z: Tensor) -> Tensor:
        """``z`` is ``[..., D1 + D2]`` (z1 then z2), as :meth:`sample_latents` returns."""
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.likelihood.mean(self.decode(z1, z2))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoded from q's Gaussian means, each pushed through its layer's flow, if any."""
        h2 = self.q_z2.body(x)
        m2 = self.q_z2.head(h2)[0]
        if self.q_flow2 is not None:
            m2 = self.q_flow2(m2, h2)[0]
        h1 = self.q_z1.features(x, m2)
        m1 = self.q_z1.head(h1)[0]
        if self.q_flow1 is not None:
            m1 = self.q_flow1(m1, h1)[0]
        return self.likelihood.mean(self.decode(m1, m2))

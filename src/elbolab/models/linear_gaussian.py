"""A linear-Gaussian latent variable model with closed-form log p(x), posterior and ELBO.

p(z) = N(0, I_d), p(x|z) = N(W z + b, s^2 I_D), q(z|x) = N(A x + c, diag exp(log_var)).

It runs through the same ``log_weights`` protocol as every other model, so it is the
yardstick for bounds, importance sampling, q_EW and gradient estimators: anything
they estimate, this model knows exactly. ``posterior`` pushes q through a normalizing
flow conditioned on x (elbolab.flows): log p(x) stays exact, so flow posteriors are
checked against it too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import PosteriorConfig
from ..distributions import LOG_2PI, DiagonalGaussian, log_normal_diag, log_standard_normal
from ..flows import log_prob_fixed, make_flow, push_forward
from ..priors import StandardNormal
from .base import LatentVariableModel, LogWeightTerms


class LinearGaussian(LatentVariableModel):
    #: q(z|x) = N(A x + c, diag exp(q_log_var)) and its flow; W, b and log_noise_var are p(x|z)
    encoder_prefixes = ("A", "c", "q_log_var", "q_flow")

    def __init__(self, data_dim: int, latent_dim: int, noise_std: float = 1.0, seed: int = 0,
                 dtype: torch.dtype = torch.float64, posterior: PosteriorConfig | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.data_dim = data_dim
        self.latent_dims = [latent_dim]
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.randn(data_dim, generator=g, dtype=dtype))
        self.log_noise_var = nn.Parameter(torch.full((), 2 * math.log(noise_std), dtype=dtype))
        self.A = nn.Parameter(0.1 * torch.randn(latent_dim, data_dim, generator=g, dtype=dtype))
        self.c = nn.Parameter(torch.zeros(latent_dim, dtype=dtype))
        self.q_log_var = nn.Parameter(torch.zeros(latent_dim, dtype=dtype))
        self.prior = StandardNormal(latent_dim).to(dtype)
        with torch.random.fork_rng():  # the flow's init depends on the seed only
            torch.manual_seed(seed)
            flow = make_flow(posterior, latent_dim, data_dim)
        self.q_flow = None if flow is None else flow.to(dtype)
        if self.q_flow is not None:
            self.posterior_flow = posterior.flow

    # --- closed forms ------------------------------------------------------------
    def marginal_cov(self) -> Tensor:
        eye = torch.eye(self.data_dim, dtype=self.W.dtype, device=self.W.device)
        return self.W @ self.W.T + torch.exp(self.log_noise_var) * eye

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x) = log N(x; b, W W^T + s^2 I), ``[B]``."""
        dist = torch.distributions.MultivariateNormal(self.b, covariance_matrix=self.marginal_cov())
        return dist.log_prob(x.to(self.W.dtype))

    def optimal_diagonal_posterior(self, x: Tensor) -> DiagonalGaussian:
        """argmax of the ELBO over diagonal Gaussians, per row of x: the posterior mean and
        variances 1 / diag(posterior precision) (KL(q || p) is minimized by matching the
        precision's diagonal, not the covariance's)."""
        mean, cov = self.exact_posterior(x)
        precision = torch.linalg.inv(cov)
        log_var = -torch.log(torch.diagonal(precision)).expand_as(mean)
        return DiagonalGaussian(mean, log_var)

    def exact_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[B, d]`` and covariance ``[d, d]`` of p(z | x)."""
        s2 = torch.exp(self.log_noise_var)
        eye = torch.eye(self.latent_dims[0], dtype=self.W.dtype, device=self.W.device)
        cov = torch.linalg.inv(eye + self.W.T @ self.W / s2)
        mean = (x.to(self.W.dtype) - self.b) @ self.W @ cov / s2
        return mean, cov

    def set_exact_posterior(self) -> None:
        """Make q the exact posterior; possible when W^T W is diagonal (orthogonal columns)."""
        wtw = (self.W.T @ self.W).detach()
        if not torch.allclose(wtw, torch.diag(torch.diagonal(wtw)), atol=1e-10 * float(wtw.abs().max())):
            raise ValueError("the exact posterior is diagonal only when W has orthogonal columns")
        s2 = torch.exp(self.log_noise_var)
        eye = torch.eye(self.latent_dims[0], dtype=self.W.dtype, device=self.W.device)
        cov = torch.linalg.inv(eye + wtw / s2)
        with torch.no_grad():
            self.A.copy_(cov @ self.W.T / s2)
            self.c.copy_(-(cov @ self.W.T @ self.b) / s2)
            self.q_log_var.copy_(torch.log(torch.diagonal(cov)))

    def elbo_closed_form(self, x: Tensor, q: DiagonalGaussian | None = None) -> Tensor:
        """E_q[log p(x, z) - log q(z)] exactly, ``[B]``, for q(z|x) (the encoder's, Gaussian only)
        or any diagonal Gaussian ``q`` with ``[B, d]`` parameters."""
        if q is None and self.q_flow is not None:
            raise ValueError("the closed-form ELBO needs a Gaussian q; this model has a flow posterior")
        x = x.to(self.W.dtype)
        q = self.posterior(x) if q is None else q
        var = torch.exp(q.log_var)
        s2 = torch.exp(self.log_noise_var)
        resid = x - q.mean @ self.W.T - self.b
        trace = (self.W.pow(2) * var.unsqueeze(-2)).sum((-1, -2))  # tr(W S W^T)
        e_log_px = -0.5 * self.data_dim * (LOG_2PI + self.log_noise_var) - (resid.pow(2).sum(-1) + trace) / (2 * s2)
        e_log_pz = -0.5 * self.latent_dims[0] * LOG_2PI - 0.5 * (q.mean.pow(2).sum(-1) + var.sum(-1))
        entropy = 0.5 * self.latent_dims[0] * (1 + LOG_2PI) + 0.5 * q.log_var.sum(-1)
        return e_log_px + e_log_pz + entropy

    # --- the protocol -------------------------------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        mean = x.to(self.W.dtype) @ self.A.T + self.c
        return DiagonalGaussian(mean, self.q_log_var.expand_as(mean))

    def log_p_z(self, z: Tensor) -> Tensor:
        return log_standard_normal(z.to(self.W.dtype))

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        x, z = x.to(self.W.dtype), z.to(self.W.dtype)
        return log_normal_diag(x, z @ self.W.T + self.b, self.log_noise_var.expand(self.data_dim))

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_latents(n, generator)

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(*z.shape[:-1], self.data_dim, generator=generator, dtype=z.dtype, device=z.device)
        return self.decode_mean(z) + torch.exp(0.5 * self.log_noise_var) * noise

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        x = x.to(self.W.dtype)
        q = self.posterior(x)
        z0 = q.rsample(k, generator)
        z, log_q = push_forward(q, z0, self.q_flow, x)
        if stop_posterior_grad:
            log_q = log_prob_fixed(q.detach(), z0, z, self.q_flow, x)
        return {"z": z}, {"z": log_q}

    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        x = x.to(self.W.dtype)
        zs, log_qs = self.sample_posterior(x, k, stop_posterior_grad=stop_posterior_grad)
        z, log_q = zs["z"], log_qs["z"]
        log_pz = log_standard_normal(z)
        log_px = log_normal_diag(x, z @ self.W.T + self.b, self.log_noise_var.expand(self.data_dim))
        return LogWeightTerms(log_px, {"z": log_pz}, {"z": log_q}, {"z": z})

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dims[0], generator=generator, dtype=self.W.dtype, device=self.W.device)

    def decode_mean(self, z: Tensor) -> Tensor:
        return z @ self.W.T + self.b

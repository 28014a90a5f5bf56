"""Adversarial Variational Bayes with adaptive contrast (Mescheder et al. 2017, arXiv:1701.04722).

The encoder is implicit: noise is injected as in the authors' ``conv0_ac`` model,

    z = z0(x) + sum_i a_i(x) * v_i(eps_i),   eps_i ~ N(0, I),

so q(z|x) has no density, but its mean and variance are known given the moments of the
x-free noise networks v_i: E[z|x] = z0 + sum_i a_i E[v_i], Var[z|x] = sum_i a_i^2 Var[v_i].

Adaptive contrast: the adversary T(x, u) sees u = (z - mu) / sigma, the sample in the
coordinates of r(z|x) = N(mu, sigma^2) (the encoder's moments), and learns to tell it from
u ~ N(0, I); at its optimum T = log q~(u|x) - log N(u; 0, I), which is log q(z|x) - log r(z|x).
So log q(z|x) is estimated by T(x, u) + log r(z|x), and the KL of the ELBO by that minus
log p(z). The moments are not differentiated: with mu and sigma held fixed, the path gradient
through z is the reparameterized gradient of log q - log p with q's density held fixed, whose
expectation is the gradient of the KL (the score term has mean zero).

T is the authors' form: an inner product <theta(x), s(u)> plus terms Tx(x) and Tz(u) of one
input each. The adversary's step and the VAE's step alternate (training.step.AdversarialStep).
There is no log q(z|x), so no importance-sampled bound: :meth:`log_weights` refuses, and the
log-likelihood is estimated by AIS started from r(z|x) (:meth:`posterior`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, model_section
from ..config.schema import require
from ..distributions import DiagonalGaussian, log_standard_normal, standard_normal
from ..errors import ModelCapabilityError
from ..likelihoods import make_likelihood
from ..priors import Prior, StandardNormal
from .base import LatentVariableModel, LogWeightTerms, common_options, register_model
from .layers import mlp

#: added to the variance before normalizing, as the authors' code does (z_std = sqrt(var + 1e-4))
VAR_FLOOR = 1e-4


@model_section("avb", "sizes of model \"avb\" (Adversarial Variational Bayes with adaptive contrast)")
@dataclass(frozen=True)
class AVBConfig:
    """The implicit encoder's noise, the adversary's sizes and its learning rate.

    The x-networks are MLPs of ``model.hidden`` (the authors' are convolutional: elbolab's
    choice, for a CPU). The authors' MNIST run (experiments/avb_mnist_32_ac): 32 latents,
    ``eps_dim`` 64, ``eps_nbasis`` 32, noise MLPs 128-128-128, adversary theta/s of 8192
    features with s an MLP of four 1024-unit layers, lr 1e-4 (VAE) and 2e-4 (adversary),
    Adam beta1 0.5, batch 64.
    """

    #: size of each noise vector eps_i
    eps_dim: int = 64
    #: number of noise bases i (the authors' eps_nbasis)
    eps_nbasis: int = 32
    #: hidden widths of each noise network v_i (ELU)
    noise_hidden: tuple[int, ...] = (128, 128, 128)
    #: hidden widths of the adversary's x-networks theta(x), Tx(x) (leaky ReLU)
    adversary_x_hidden: tuple[int, ...] = (512, 512)
    #: hidden widths of the adversary's z-networks s(u), Tz(u) (leaky ReLU)
    adversary_z_hidden: tuple[int, ...] = (512, 512)
    #: length of theta(x) and s(u), whose inner product is T's interaction term
    adversary_features: int = 512
    #: the adversary's learning rate over the VAE's (train.lr and its schedule); the authors': 2
    adversary_lr_ratio: float = 2.0
    #: noise draws that estimate E[v_i] and Var[v_i] for r(z|x) outside training (AIS start)
    moment_draws: int = 4096
    #: AIS evaluation of the log-likelihood: intermediate distributions (small, so `elbolab
    #: train`'s test evaluation stays affordable on a CPU; the reproduction row sets the paper's 1000)
    ais_steps: int = 100
    #: AIS: independent chains per test image (the reproduction row: 5)
    ais_chains: int = 4
    #: AIS: leapfrog steps per HMC transition (the reproduction row: 10)
    ais_leapfrog: int = 5

    def validate(self, key: str) -> None:
        for name in ("eps_dim", "eps_nbasis", "adversary_features", "moment_draws", "ais_steps", "ais_chains",
                     "ais_leapfrog"):
            v = getattr(self, name)
            require(v >= 1, f"{key}.{name}", f"must be >= 1, got {v}")
        for name in ("noise_hidden", "adversary_x_hidden", "adversary_z_hidden"):
            v = getattr(self, name)
            require(all(w >= 1 for w in v), f"{key}.{name}", f"sizes must be >= 1, got {v}")
        require(0 < self.adversary_lr_ratio < math.inf, f"{key}.adversary_lr_ratio",
                f"must be a finite number > 0, got {self.adversary_lr_ratio}")


class GroupedMLP(nn.Module):
    """``groups`` independent MLPs of the same sizes, run as batched matrix products:
    ``[G, N, in]`` -> ``[G, N, out]`` (ELU between layers, none after the last)."""

    def __init__(self, groups: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default initialization, per group
            self.weights.append(nn.Parameter(torch.empty(groups, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(groups, 1, b).uniform_(-bound, bound)))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = F.elu(x)
        return x


def leaky_mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.LeakyReLU(0.2)]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class Adversary(nn.Module):
    """T(x, u) = <theta(x), s(u)> + Tx(x) + Tz(u): the authors' inner-product form and its extra terms."""

    def __init__(self, data_dim: int, latent_dim: int, x_hidden: Sequence[int], z_hidden: Sequence[int],
                 features: int) -> None:
        super().__init__()
        self.theta = leaky_mlp(data_dim, x_hidden, features)
        self.s = leaky_mlp(latent_dim, z_hidden, features)
        self.t_x = leaky_mlp(data_dim, x_hidden, 1)
        self.t_z = leaky_mlp(latent_dim, z_hidden, 1)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """``x`` ``[B, Dx]``, ``u`` ``[..., B, D]`` -> ``[..., B]``."""
        theta = F.elu(self.theta(2 * x - 1))  # x centred at 0, as the authors' networks take it
        return (theta * self.s(u)).sum(-1) + self.t_x(2 * x - 1).squeeze(-1) + self.t_z(u).squeeze(-1)


class AVBModel(LatentVariableModel):
    """One stochastic layer with an implicit, noise-injected q(z|x) (``model.name: avb``)."""

    encoder_prefixes = ("encoder",)
    #: q(z|x) has samples and moments but no density (diagnostics that need log q refuse)
    implicit_posterior = True

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int], activation: str, likelihood: str,
                 prior: Prior, eps_dim: int, eps_nbasis: int, noise_hidden: Sequence[int],
                 adversary_x_hidden: Sequence[int], adversary_z_hidden: Sequence[int], adversary_features: int,
                 adversary_lr_ratio: float, moment_draws: int, ais_steps: int = 100, ais_chains: int = 4,
                 ais_leapfrog: int = 5, posterior: object = None) -> None:
        super().__init__()
        if not isinstance(prior, StandardNormal):
            raise ValueError(f"model avb takes model.prior.name: standard (got {type(prior).__name__}); "
                             "a prior built from q(z|x) needs a density the implicit encoder does not have")
        if getattr(posterior, "flow", "none") != "none":
            raise ValueError("model avb: its encoder is implicit already; model.posterior.flow must be none")
        self.data_dim = data_dim
        self.latent_dims = [latent_dim]
        self.eps_dim, self.eps_nbasis, self.moment_draws = eps_dim, eps_nbasis, moment_draws
        self.adversary_lr_ratio = adversary_lr_ratio
        #: the AIS that estimates its log-likelihood (diagnostics.ais.implicit_log_likelihood)
        self.ais_settings = {"steps": ais_steps, "chains": ais_chains, "leapfrog": ais_leapfrog}
        self.encoder, width = mlp(data_dim, hidden, activation)
        self.encoder_z0 = nn.Linear(width, latent_dim)
        nn.init.normal_(self.encoder_z0.weight, std=1e-5)  # the authors' z0 starts near 0
        self.encoder_a = nn.Linear(width, eps_nbasis * latent_dim)
        #: (weights' key, E[v_i], Var[v_i]) last computed by noise_moments
        self._moments: tuple[tuple, Tensor, Tensor] | None = None
        self.encoder_noise = GroupedMLP(eps_nbasis, [eps_dim, *noise_hidden, latent_dim])
        self.decoder, dec_width = mlp(latent_dim, list(reversed(hidden)), activation)
        self.likelihood = make_likelihood(likelihood, data_dim, dec_width)
        self.adversary = Adversary(data_dim, latent_dim, adversary_x_hidden, adversary_z_hidden, adversary_features)
        self.prior = prior
        prior.attach(self)

    # --- the implicit encoder -----------------------------------------------------------
    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z0(x) ``[B, D]`` and a_i(x) ``[G, B, D]`` (positive: elu(. - 5) + 1, as the authors')."""
        h = self.encoder(x)
        a = F.elu(self.encoder_a(h) - 5.0) + 1.0
        return self.encoder_z0(h), a.reshape(x.shape[0], self.eps_nbasis, -1).movedim(1, 0)

    def noise(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """v_i(eps_i) for ``n`` draws of each basis: ``[G, n, D]``."""
        eps = standard_normal((self.eps_nbasis, n, self.eps_dim), like, generator)
        return self.encoder_noise(eps)

    @staticmethod
    def combine(z0: Tensor, a: Tensor, v: Tensor) -> Tensor:
        """z = z0 + sum_i a_i * v_i: ``z0`` ``[B, D]``, ``a`` ``[G, B, D]``, ``v`` ``[G, K, B, D]`` -> ``[K, B, D]``."""
        return z0 + (a.unsqueeze(1) * v).sum(0)

    @staticmethod
    def moments(z0: Tensor, a: Tensor, v_mean: Tensor, v_var: Tensor) -> tuple[Tensor, Tensor]:
        """E[z|x] and Var[z|x] ``[B, D]`` from the noise networks' moments ``[G, D]``."""
        return z0 + (a * v_mean.unsqueeze(1)).sum(0), (a.pow(2) * v_var.unsqueeze(1)).sum(0)

    def noise_moments(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """E[v_i] and Var[v_i] ``[G, D]`` from ``moment_draws`` noise draws of a fixed stream (the
        same r(z|x) at every call, and the caller's random streams untouched), detached (the
        contrast's moments are not differentiated). Kept until the noise networks' weights change
        (their in-place version counters), as every batch of an evaluation asks for them."""
        params = list(self.encoder_noise.parameters())
        key = (like.device, like.dtype, *(id(p) for p in params), *(p._version for p in params))
        if self._moments is not None and self._moments[0] == key:
            return self._moments[1], self._moments[2]
        g = torch.Generator(device=like.device).manual_seed(0)
        with torch.no_grad():
            v = self.noise(self.moment_draws, like, g)
            mean, var = v.mean(1), v.var(1, unbiased=False)
        self._moments = (key, mean, var)
        return mean, var

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        raise ModelCapabilityError("AVBModel: its implicit q(z|x) has samples but no log q(z|x); "
                                   "use sample_implicit")

    def sample_implicit(self, x: Tensor, k: int, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """k draws z ``[K, B, D]`` of q(z|x) and the adaptive contrast's moments ``[B, D]``
        (mean, variance), estimated from these same draws' noise and detached."""
        z0, a = self.coefficients(x)
        v = self.noise(k * x.shape[0], x, generator).reshape(self.eps_nbasis, k, x.shape[0], -1)
        z = self.combine(z0, a, v)
        flat = v.detach().flatten(1, 2)
        mean, var = self.moments(z0.detach(), a.detach(), flat.mean(1), flat.var(1, unbiased=False))
        return z, mean, var

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """r(z|x): the Gaussian with the implicit encoder's mean and variance (the adaptive
        contrast, AIS's start). Not q(z|x) itself, whose density is unknown."""
        z0, a = self.coefficients(x)
        mean, var = self.moments(z0, a, *self.noise_moments(x))
        return DiagonalGaussian(mean, torch.log(var + VAR_FLOOR))

    def conditional_means(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """E_q[z|x] in closed form given the noise moments (active units read it)."""
        return [self.posterior(x).mean]

    # --- the adversary's view -----------------------------------------------------------
    @staticmethod
    def contrast_coordinates(z: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """u = (z - mu) / sigma: the sample as the adaptive contrast's standard normal sees it."""
        return (z - mean) / torch.sqrt(var + VAR_FLOOR)

    def log_q_estimate(self, x: Tensor, z: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """T(x, u) + log r(z|x): the adversary's estimate of log q(z|x), ``[K, B]``."""
        u = self.contrast_coordinates(z, mean, var)
        log_r = log_standard_normal(u) - 0.5 * torch.log(var + VAR_FLOOR).sum(-1)
        return self.adversary(x, u) + log_r

    def adversary_loss(self, x: Tensor) -> Tensor:
        """The adversary's logistic loss: u of q(z|x) labelled 1, u ~ N(0, I) labelled 0 (the
        encoder held fixed). Minimized, T approaches log q~(u|x) - log N(u; 0, I)."""
        with torch.no_grad():
            z, mean, var = self.sample_implicit(x, 1)
            u_q = self.contrast_coordinates(z, mean, var)[0]
            u_r = standard_normal(tuple(u_q.shape), u_q)
        t_q, t_r = self.adversary(x, u_q), self.adversary(x, u_r)
        return F.softplus(-t_q).mean() + F.softplus(t_r).mean()

    # --- the generative model -----------------------------------------------------------
    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        """Training's terms: log q(z|x) is the adversary's estimate (:meth:`log_q_estimate`),
        so log p(x|z) + log p(z) - log q is an estimate of the ELBO's integrand, not a log weight."""
        if stop_posterior_grad:
            raise ModelCapabilityError("AVBModel: no log q(z|x) to evaluate with detached parameters "
                                       "(STL / DReG estimators do not apply)")
        z, mean, var = self.sample_implicit(x, k)
        log_q = self.log_q_estimate(x, z, mean, var)
        log_px = self.likelihood.log_prob_from_features(x, self.decoder(z))
        return LogWeightTerms(log_px, {"z": self.prior.log_prob(z)}, {"z": log_q}, {"z": z})

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        raise ModelCapabilityError(
            "model avb: its implicit q(z|x) has no density, so there are no importance weights (no IS "
            "bound or IS log-likelihood); its log-likelihood is estimated by AIS from r(z|x) "
            "(elbolab evaluate, reproduce)")

    def estimated_elbo(self, x: Tensor) -> Tensor:
        """``[B]`` the ELBO with the KL estimated by the adversary (one draw per image)."""
        return self.log_weight_terms(x, 1).log_weights()[0]

    def log_p_z(self, z: Tensor) -> Tensor:
        return self.prior.log_prob(z)

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        return self.likelihood.log_prob_from_features(x, self.decoder(z))

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.likelihood.sample(self.likelihood.head(self.decoder(z)), generator)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)

    def decode_mean(self, z: Tensor) -> Tensor:
        return self.likelihood.mean(self.likelihood.head(self.decoder(z)))

    def local_posterior(self, x: Tensor) -> dict[str, Tensor]:
        raise ModelCapabilityError("model avb: q* in the implicit encoder's family has no density to optimize")

    def vae_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder and likelihood: what the VAE's optimizer steps (not the adversary)."""
        return [p for n, p in self.named_parameters() if not n.startswith("adversary.")]

    def adversary_parameters(self) -> list[nn.Parameter]:
        return list(self.adversary.parameters())


@register_model("avb")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> AVBModel:
    options = common_options(cfg, data_dim, train_data, cfg.latent_dim, cfg.avb)
    return AVBModel(data_dim, cfg.latent_dim, cfg.hidden, cfg.activation, **options)

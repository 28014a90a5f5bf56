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
from dataclasses import dataclass

from torch import Tensor

from ..config import ModelConfig, PosteriorConfig, check_sizes, model_section
from ..distributions import DiagonalGaussian
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import common_options, register_model
from .layers import GaussianHead, GaussianNet, mlp
from .two_level import TwoLevelVAE


@model_section("two_layer", 'sizes of model "two-layer"')
@dataclass(frozen=True)
class TwoLayerConfig:
    """Sizes of the IWAE paper's two-stochastic-layer model (its section 5; the authors'
    experiments.py: hidden_units_q [[200, 200], [100, 100]], latent_units [100, 50])."""

    #: units of z1 (bottom) and z2 (top)
    latent_dims: tuple[int, int] = (100, 50)
    #: deterministic tanh layers between x and z1 (the decoder mirrors them: z1 -> 200 -> 200 -> x)
    hidden1: tuple[int, ...] = (200, 200)
    #: deterministic tanh layers between z1 and z2 (mirrored: z2 -> 100 -> 100 -> z1)
    hidden2: tuple[int, ...] = (100, 100)

    def validate(self, key: str) -> None:
        check_sizes(self.latent_dims, f"{key}.latent_dims")
        for name in ("hidden1", "hidden2"):
            check_sizes(getattr(self, name), f"{key}.{name}")




def gaussian_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, act: str) -> tuple[GaussianNet, int]:
    """input -> tanh MLP -> (mean, log-variance) of a diagonal Gaussian, and the MLP's output width."""
    body, width = mlp(in_dim, hidden, act)
    return GaussianNet(body, GaussianHead(width, out_dim)), width


class TwoLayerVAE(TwoLevelVAE):
    first = "z1"
    second_reads_x = False
    decoder_reads_z2 = False

    def __init__(self, data_dim: int, latent_dims: Sequence[int], hidden1: Sequence[int], hidden2: Sequence[int],
                 activation: str, likelihood: str, prior: Prior, posterior: PosteriorConfig | None = None) -> None:
        super().__init__()
        d1, d2 = latent_dims
        self.data_dim = data_dim
        self.latent_dims = [d1, d2]
        self.q_z1, width1 = gaussian_mlp(data_dim, hidden1, d1, activation)
        self.q_z2, width2 = gaussian_mlp(d1, hidden2, d2, activation)
        self.p_z1, _ = gaussian_mlp(d2, list(reversed(hidden2)), d1, activation)
        self.p_x, width = mlp(d1, list(reversed(hidden1)), activation)
        self.likelihood = make_likelihood(likelihood, data_dim, width)
        self.make_flows(posterior, {"z1": width1, "z2": width2})
        self.attach(prior, posterior)

    def legacy_keys(self) -> dict[str, str]:
        # the output layer was p_x's last module
        return {f"p_x.{len(self.p_x)}.": "likelihood.head."}

    def decoder_features(self, z1: Tensor, z2: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        return self.p_x(z1)

    def top_posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z2 | z1 = E_q[z1 | x]): q(z2 | x) itself is a continuous mixture with no
        closed form, so a VampPrior on z2 mixes these Gaussians at its pseudo-inputs."""
        return DiagonalGaussian(*self.q_z2(self.posterior(x).mean))


@register_model("two-layer")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> TwoLayerVAE:
    s = cfg.two_layer
    options = common_options(cfg, data_dim, train_data, s.latent_dims[1], s)
    return TwoLayerVAE(data_dim, activation=cfg.activation, **options)

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
from dataclasses import dataclass

from torch import Tensor

from ..config import MAX_WIDTH, ModelConfig, PosteriorConfig, check_sizes, in_range, model_section, require
from ..likelihoods import make_likelihood
from ..priors import Prior
from .base import common_options, register_model
from .layers import GaussianHead, GaussianNet, gated_gaussian, gated_pair, he_init_
from .two_level import TwoLevelVAE


@model_section("hierarchical", 'sizes of model "hierarchical"')
@dataclass(frozen=True)
class HierarchicalConfig:
    """Sizes of the VampPrior paper's two-level model (their code's defaults)."""

    #: units of z1 (bottom) and z2 (top)
    latent_dims: tuple[int, int] = (40, 40)
    #: width of every gated dense layer
    width: int = 300
    #: hardtanh range of the Gaussian log-variances (their code: [-6, 2])
    log_var_range: tuple[float, float] = (-6.0, 2.0)

    def validate(self, key: str) -> None:
        check_sizes(self.latent_dims, f"{key}.latent_dims")
        in_range(self.width, 1, MAX_WIDTH, f"{key}.width")
        lo, hi = self.log_var_range
        require(lo < hi, f"{key}.log_var_range", f"needs min < max, got [{lo}, {hi}]")



class HierarchicalVAE(TwoLevelVAE):
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
        self.q_z2 = gated_gaussian(data_dim, width, 2, d2, log_var_range)
        self.q_z1 = GaussianNet(gated_pair(data_dim, d2, width), GaussianHead(width, d1, log_var_range))
        self.p_z1 = gated_gaussian(d2, width, 2, d1, log_var_range)
        self.p_x_features = gated_pair(d1, d2, width)
        self.likelihood = make_likelihood(likelihood, data_dim, width)
        he_init_(self)
        # after he_init_: the flows keep their own initialization (the IAF gate's bias)
        self.make_flows(posterior, {"z2": width, "z1": width})
        self.attach(prior, posterior)

    def legacy_keys(self) -> dict[str, str]:
        return {"p_x_out.": "likelihood.head.", "q_z1.features.": "q_z1.body."}

    def decoder_features(self, z1: Tensor, z2: Tensor, x: Tensor | None = None) -> Tensor:
        return self.p_x_features(z1, z2)


@register_model("hierarchical")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> HierarchicalVAE:
    s = cfg.hierarchical
    return HierarchicalVAE(data_dim, **common_options(cfg, data_dim, train_data, s.latent_dims[1], s))

"""The VampPrior paper's one-layer VAE (Tomczak & Welling 2018; the authors' models/VAE.py).

The one-layer model of OneLayerVAE with the authors' blocks: gated dense layers
(h(x) * sigmoid(g(x))) of ``hidden`` widths (theirs: 300-300) in the encoder and, reversed, in
the decoder, the encoder's log-variance through hardtanh (theirs: -6, 2), and every linear
layer He-normal. Flows (elbolab.flows) keep their own initialization, as in HierarchicalVAE.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..config import ModelConfig, PosteriorConfig
from ..flows import make_flow
from ..priors import Prior
from .base import common_options, register_model
from .layers import GatedDense, GaussianHead, check_flow_prior, he_init_
from .one_layer import OneLayerVAE


def gated_stack(in_dim: int, widths: Sequence[int]) -> nn.Sequential:
    dims = [in_dim, *widths]
    return nn.Sequential(*(GatedDense(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)))


class GatedOneLayerVAE(OneLayerVAE):
    """One stochastic layer, the VampPrior paper's gated MLP (``model.name: gated-one-layer``)."""

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: Sequence[int],
        likelihood: str,
        prior: Prior,
        log_var_range: tuple[float, float],
        posterior: PosteriorConfig | None = None,
    ) -> None:
        # the plain MLP's layers are built by the parent and replaced here: the same module
        # names (encoder, encoder_head, decoder, likelihood), so every OneLayerVAE method applies
        super().__init__(data_dim, latent_dim, hidden, "tanh", likelihood, prior, None)
        self.encoder = gated_stack(data_dim, hidden)
        self.encoder_head = GaussianHead(hidden[-1], latent_dim, log_var_range)
        self.decoder = gated_stack(latent_dim, list(reversed(hidden)))
        he_init_(self)
        self.encoder_flow = make_flow(posterior, latent_dim, hidden[-1])
        if self.encoder_flow is not None:
            self.posterior_flow = posterior.flow
        check_flow_prior(self.encoder_flow, prior)

    def legacy_keys(self) -> dict[str, str]:
        return {}


@register_model("gated-one-layer")
def build(cfg: ModelConfig, data_dim: int, train_data: Tensor | None) -> GatedOneLayerVAE:
    # the VampPrior paper's clamp of the log-variance, shared with its hierarchical model's section
    options = common_options(cfg, data_dim, train_data, cfg.latent_dim)
    return GatedOneLayerVAE(data_dim, cfg.latent_dim, cfg.hidden, log_var_range=cfg.hierarchical.log_var_range,
                            **options)

"""pythae 0.1.2 models as elbolab models: ``from_pythae(model)``.

pythae's VAE family shares one generative story: q(z|x) = N(embedding, diag
exp(log_covariance)) from its encoder, p(z) = N(0, I) (VAMP: the VampPrior, its encoder
at C learned pseudo-inputs), and p(x|z) read from the decoder's ``reconstruction``:
Bernoulli with those probabilities for ``reconstruction_loss="bce"`` (with torch's
binary_cross_entropy clamp of log at -100, as pythae trains it), N(reconstruction, I) for
``"mse"``. The adapter scores exactly that model, with every constant (pythae's own
``mse`` loss drops -D/2 log 2 pi; its ``get_nll`` puts it back).

The adapter shares the pythae model's encoder and decoder (same parameters), so
training through elbolab trains the pythae model too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributions import LOG_2PI, DiagonalGaussian
from ..models.base import LatentVariableModel, LogWeightTerms
from ..priors import Prior, StandardNormal, VampPriorBase

EXTRA = "pip install 'elbolab[pythae]' (with -c benchmarks/constraints.txt, so torch stays at 2.13.0)"
#: pythae model classes whose density is the one described above: Gaussian encoder, N(0, I) prior
STANDARD_PRIOR = ("VAE", "BetaVAE", "IWAE", "MIWAE", "PIWAE", "CIWAE")
VAMP = "VAMP"


def require_pythae() -> Any:
    """pythae.models, or a one-line ImportError naming the extra."""
    try:
        import pythae.models
    except ImportError as e:
        raise ImportError(f"elbolab.adapters.pythae needs pythae ({e}): {EXTRA}") from None
    return pythae.models


class PythaeVampPrior(VampPriorBase):
    """pythae's VAMP prior: (1/C) sum_c q(z | u_c), u = hardtanh_[0,1](Linear(e_c)) (its ``pseudo_inputs``)."""

    def __init__(self, pseudo_inputs: nn.Module, components: int, latent_dim: int, data_dim: int) -> None:
        super().__init__(latent_dim, data_dim)
        self.pseudo_input_net = pseudo_inputs
        self.register_buffer("one_hot", torch.eye(components), persistent=False)

    def pseudo_inputs(self) -> Tensor:
        """``[C, data_dim]``, as pythae's ``_log_p_z`` builds them."""
        return self.pseudo_input_net(self.one_hot).reshape(self.one_hot.shape[0], -1)


class PythaeModel(LatentVariableModel):
    """A pythae VAE-family model behind ``log_weight_terms``; x is flat ``[B, D]`` here and is
    reshaped to pythae's ``input_dim`` for its encoder."""

    encoder_prefixes = ("encoder",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        kind = getattr(model, "model_name", type(model).__name__)
        if kind not in (*STANDARD_PRIOR, VAMP):
            raise TypeError(f"{kind}: elbolab reads pythae's {', '.join(STANDARD_PRIOR)} and {VAMP} (a Gaussian "
                            "encoder with an N(0, I) or VampPrior prior); its other models have other densities")
        cfg = model.model_config
        if cfg.input_dim is None:
            raise ValueError(f"{kind}: model_config.input_dim is unset; elbolab needs the data shape")
        if cfg.reconstruction_loss not in ("bce", "mse"):
            raise ValueError(f"{kind}: reconstruction_loss {cfg.reconstruction_loss!r} has no density here "
                             "(bce or mse)")
        self.input_dim = tuple(int(s) for s in cfg.input_dim)
        self.data_dim = math.prod(self.input_dim)
        self.latent_dims = [int(cfg.latent_dim)]
        self.reconstruction_loss = cfg.reconstruction_loss
        self.encoder = model.encoder
        self.decoder = model.decoder
        latent = self.latent_dims[0]
        self.prior: Prior = (
            PythaeVampPrior(model.pseudo_inputs, model.number_components, latent, self.data_dim)
            if kind == VAMP else StandardNormal(latent)
        )
        self.prior.attach(self)
        #: names the report prints
        self.model_name = f"pythae {kind} ({self.reconstruction_loss})"
        self.prior_name = "vampprior (pythae)" if kind == VAMP else "standard"
        #: for figures: one channel drops out, as elbolab stores grey images
        self.image_shape = self.input_dim[1:] if len(self.input_dim) == 3 and self.input_dim[0] == 1 else self.input_dim
        to = next(iter(model.parameters()))
        self.prior.to(device=to.device, dtype=to.dtype)

    # --- pythae's networks on elbolab's shapes ---------------------------------------
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        out = self.encoder(x.reshape(-1, *self.input_dim))
        return DiagonalGaussian(out.embedding, out.log_covariance)

    def decode_mean(self, z: Tensor) -> Tensor:
        """The decoder's ``reconstruction`` for z ``[..., d]``: ``[..., D]``."""
        recon = self.decoder(z.reshape(-1, z.shape[-1]))["reconstruction"]
        return recon.reshape(*z.shape[:-1], self.data_dim)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) for x ``[B, D]``, z ``[..., B, d]``: ``[..., B]``."""
        recon = self.decode_mean(z)
        target = x.to(recon.dtype).expand_as(recon)
        if self.reconstruction_loss == "bce":
            return -F.binary_cross_entropy(recon, target, reduction="none").sum(-1)
        return -0.5 * (recon - target).pow(2).sum(-1) - 0.5 * self.data_dim * LOG_2PI

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) at given z ``[..., B, d]``: ``[..., B]`` (q_EW densities read it)."""
        return self.prior.log_prob(z) + self.log_likelihood(x, z)

    # --- the protocol -----------------------------------------------------------------
    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        q = self.posterior(x)
        z = q.rsample(k)  # [K, B, d]
        log_q = (q.detach() if stop_posterior_grad else q).log_prob(z)
        return LogWeightTerms(self.log_likelihood(x, z), {"z": self.prior.log_prob(z)}, {"z": log_q}, {"z": z})

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator)


def from_pythae(model: nn.Module) -> PythaeModel:
    """Wrap a pythae VAE / BetaVAE / IWAE / MIWAE / PIWAE / CIWAE / VAMP for elbolab's
    evaluate, diagnose, bounds and estimators (it shares the model's parameters)."""
    models = require_pythae()
    if not isinstance(model, models.BaseAE):
        raise TypeError(f"from_pythae: expected a pythae model, got {type(model).__name__}")
    return PythaeModel(model)

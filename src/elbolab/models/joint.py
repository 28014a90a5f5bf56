"""The joint density over every latent of a model, for MCMC and per-point optimization.

AIS, HMC, BDMC and the optimal local posterior q* work on one flat vector holding every
stochastic layer (in ``latent_layout`` order), so they never need to know how many layers a
model has or how they connect. :class:`~.base.LatentVariableModel` carries this mixin; a model
overrides the methods it can give (a two-level one gets them all from :mod:`.two_level`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributions import DiagonalGaussian
from ..errors import ModelCapabilityError


class FlatLatent:
    """log p(z), log p(x | z), their samplers and the per-point posterior, on one flat latent."""

    #: one entry per stochastic layer, bottom first; ``posterior(x)`` comes with the model
    latent_dims: list[int]


    def latent_layout(self) -> dict[str, int]:
        """Name -> size of each stochastic layer, in the order they sit in a flat latent."""
        if len(self.latent_dims) == 1:
            return {"z": self.latent_dims[0]}
        return {f"z{i + 1}": d for i, d in enumerate(self.latent_dims)}

    def split_latents(self, z: Tensor) -> dict[str, Tensor]:
        """A flat latent ``[..., D_total]`` -> layer name -> ``[..., D_l]``."""
        layout = self.latent_layout()
        return dict(zip(layout, z.split(list(layout.values()), dim=-1), strict=True))

    def flatten_latents(self, z: dict[str, Tensor]) -> Tensor:
        """Layer name -> ``[..., D_l]`` -> one flat ``[..., D_total]`` in layout order."""
        return torch.cat([z[name] for name in self.latent_layout()], dim=-1)

    def log_p_z(self, z: Tensor) -> Tensor:
        """log p(z) of the whole latent (every layer), flat ``[..., B, D_total]`` -> ``[..., B]``."""
        raise ModelCapabilityError(f"{type(self).__name__} does not expose log p(z) (log_p_z)")

    def log_p_x_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z), ``x`` ``[B, Dx]``, flat ``z`` ``[..., B, D_total]`` -> ``[..., B]``."""
        raise ModelCapabilityError(f"{type(self).__name__} does not expose log p(x | z) (log_p_x_given_z)")

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) at a given flat latent ``[..., B, D_total]``: ``[..., B]``."""
        return self.log_p_z(z) + self.log_p_x_given_z(x, z)

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` flat latents drawn from the prior over every layer, ``[n, D_total]``."""
        raise ModelCapabilityError(f"{type(self).__name__} cannot sample its flat latent (sample_z)")

    def sample_x_given_z(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One observation x ~ p(x | z) per flat latent ``[n, D_total]``: ``[n, Dx]``."""
        raise ModelCapabilityError(f"{type(self).__name__} cannot sample p(x | z) (sample_x_given_z)")

    def local_posterior(self, x: Tensor) -> dict[str, Tensor]:
        """The encoder's output for ``x`` as free per-point parameters, name -> ``[B, ...]``.

        Setting them back into :meth:`log_weights_local` gives q_phi(z|x) exactly; optimizing
        them per point gives q*, the best member of the encoder's family for that x
        (Cremer et al. 2018). One stochastic layer: its Gaussian's mean and log-variance.
        """
        self.refuse_flow_local()
        if len(self.latent_dims) != 1:
            raise ModelCapabilityError(f"{type(self).__name__}: a multi-layer model defines local_posterior")
        q = self.posterior(x)
        return {"mean": q.mean, "log_var": q.log_var}

    def refuse_flow_local(self) -> None:
        """A model whose local posterior would drop its flow refuses, rather than compare ELBO(q*)
        of a Gaussian with ELBO(q_phi) of the flow (an amortization gap across two families)."""
        if self.posterior_flow != "none":
            raise ModelCapabilityError(
                f"{type(self).__name__} with a {self.posterior_flow} flow posterior: q* in the flow's family "
                "(local_posterior) is defined for one-layer models only; the encoder's Gaussian without the "
                "flow would be another family")

    def log_weights_local(self, x: Tensor, k: int, params: dict[str, Tensor]) -> Tensor:
        """``[K, B]`` log weights log p(x, z) - log q(z) with q given by :meth:`local_posterior`'s
        parameters instead of the encoder's output; reparameterized in ``params``."""
        if len(self.latent_dims) != 1:
            raise ModelCapabilityError(f"{type(self).__name__}: a multi-layer model defines log_weights_local")
        q = DiagonalGaussian(params["mean"], params["log_var"])
        z = q.rsample(k)
        return self.log_joint(x, z) - q.log_prob(z)

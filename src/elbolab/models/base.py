"""The model protocol: anything with ``log_weights(x, k) -> [K, B]`` is a model here.

:class:`LatentVariableModel` adds the named terms behind the log weights, so that
KL warm-up, gradient estimators and NaN reports can address them, plus the encoder
and prior that density-based diagnostics need. A user's own model only needs
``log_weights`` to use the bounds and the importance-sampled likelihood.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..config import ModelConfig, PosteriorConfig
from ..distributions import DiagonalGaussian
from ..errors import ModelCapabilityError
from ..flows import Flow
from ..priors import Prior, make_prior
from ..registry import Registry
from .joint import FlatLatent
from .layers import check_flow_prior


class NoPosterior(ModelCapabilityError):
    """The model's q(z|x) is not one diagonal Gaussian (e.g. a Pyro guide of another family):
    the diagnostics that read its density (active units, ELBO surgery) do not apply."""


@runtime_checkable
class HasLogWeights(Protocol):
    def log_weights(self, x: Tensor, k: int) -> Tensor: ...


@dataclass
class LogWeightTerms:
    """The pieces of ``log w = log p(x|z) + sum log p(z_l|.) - sum log q(z_l|.)``, each ``[K, B]``.

    ``log_prior`` and ``log_posterior`` are keyed by stochastic layer ("z", or "z1", "z2").
    ``z`` holds the samples, ``[K, B, D_l]``.
    """

    log_likelihood: Tensor
    log_prior: dict[str, Tensor]
    log_posterior: dict[str, Tensor]
    z: dict[str, Tensor] = field(default_factory=dict)
    #: ``[K, B]`` of value 0 whose gradient cancels the KL gradient of latent groups under their
    #: free-bits floor (models/vlae.py), scaled like the KL by ``kl_weight``; None: none
    free_bits: Tensor | None = None

    def kl(self) -> Tensor:
        """Single-sample KL estimate log q(z|x) - log p(z), summed over layers: ``[K, B]``."""
        return sum(self.log_posterior.values()) - sum(self.log_prior.values())

    def log_weights(self, kl_weight: float | Tensor = 1.0) -> Tensor:
        """``log p(x|z) - kl_weight * (log q - log p(z))``; kl_weight < 1 is KL warm-up
        (a 0-dim tensor under torch.compile, where a branch on its value would break the graph)."""
        if isinstance(kl_weight, float | int) and kl_weight == 1.0:
            log_w = self.log_likelihood + sum(self.log_prior.values()) - sum(self.log_posterior.values())
            return log_w if self.free_bits is None else log_w + self.free_bits
        log_w = self.log_likelihood - kl_weight * self.kl()
        return log_w if self.free_bits is None else log_w + kl_weight * self.free_bits


def model_input(x: Tensor, data_dim: int | None = None, model: nn.Module | None = None) -> Tensor:
    """Images as every model takes them, float ``[B, D]``, from what elbolab's data hands out
    (``dataset.split(...)`` is uint8) or a user holds: bool or integer 0/1 (binary) and uint8
    0..255 (grey, scaled to [0, 1]) become floats of the model's dtype; ``[B, H, W]`` and
    ``[B, C, H, W]`` are flattened when they hold ``data_dim`` values. Anything else is
    refused in one line naming the shape and dtype expected. Float ``[B, D]`` passes as is."""
    name = type(model).__name__ if model is not None else "model"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected the images as a torch.Tensor [B, D], got {type(x).__name__}")
    if data_dim and x.dim() >= 2 and math.prod(x.shape[1:]) == data_dim and x.dim() > 2:
        x = x.reshape(x.shape[0], data_dim)
    if data_dim and (x.dim() != 2 or x.shape[1] != data_dim):
        raise ValueError(f"{name}: expected images [B, {data_dim}] (or [B, H, W] / [B, C, H, W] holding "
                         f"{data_dim} values), float in [0, 1] or uint8; got {str(x.dtype)[6:]} {list(x.shape)}")
    if x.is_floating_point():
        return x
    param = next(iter(model.parameters()), None) if model is not None else None
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    if x.dtype == torch.bool or bool(((x == 0) | (x == 1)).all()):
        return x.to(dtype)
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255.0
    raise ValueError(f"{name}: integer images must be 0/1 (binary) or uint8 0..255 (grey); got {str(x.dtype)[6:]} "
                     f"values {int(x.min())}..{int(x.max())}; pass floats in [0, 1]")


class LatentVariableModel(FlatLatent, nn.Module, ABC):
    """Base class of elbolab's models.

    Subclasses set ``data_dim`` and ``latent_dims`` (one entry per stochastic layer,
    bottom layer first) and implement :meth:`log_weight_terms`, :meth:`posterior`,
    :meth:`decode_mean` and :meth:`sample_latents`.
    """

    data_dim: int
    latent_dims: list[int]
    #: the stochastic layer whose distribution is ``self.prior`` (the top one), as keyed in
    #: ``LogWeightTerms``; multi-layer DReG evaluates the prior again at that sample
    prior_layer: str = "z"

    #: Top-level attribute names (or name prefixes) of the modules and parameters that
    #: make up q(z|x). A parameter belongs to the encoder when the first component of its
    #: dotted name starts with one of these; everything else (decoder, prior, likelihood)
    #: is the generative model. The default covers models whose inference modules are
    #: called ``encoder``, ``encoder_head``, ``encoders``, ``q_...``; a model that names
    #: them otherwise sets this class attribute. Estimators that treat the two sides
    #: differently (DReG, PIWAE) and the gradient SNR diagnostic read this split.
    encoder_prefixes: tuple[str, ...] = ("encoder", "q_")
    #: the normalizing flow after each Gaussian layer of q (elbolab.flows): "none" when q is
    #: the Gaussians themselves. With a flow, :meth:`posterior` gives the Gaussian q0 before the
    #: flow, and log q is known only at q's own samples (docs/flows.md)
    posterior_flow: str = "none"
    #: whether :meth:`decode_mean` is E[x | z]; False where it has no closed form (a PixelCNN
    #: decoder), so figures show drawn images (:meth:`decode_sample`) instead
    exact_decode_mean: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def attach_prior(self, prior: Prior, posterior: PosteriorConfig | None, *flows: Flow | None) -> None:
        """Take ``prior`` (it may read the model's encoder, so last) and note q's flows, if any;
        a VampPrior is refused with a flow (:func:`~.layers.check_flow_prior`)."""
        for flow in flows:
            check_flow_prior(flow, prior)
        if posterior is not None and any(flow is not None for flow in flows):
            self.posterior_flow = posterior.flow
        self.prior = prior
        prior.attach(self)

    def legacy_keys(self) -> dict[str, str]:
        """Old state-dict key prefix -> new one, so weights saved by earlier versions still load."""
        return {}

    @abstractmethod
    def log_weight_terms(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False) -> LogWeightTerms:
        """Draw k reparameterized samples per data point and return every log-density term.

        With ``stop_posterior_grad`` the q densities are evaluated with their parameters
        detached (the samples still carry the reparameterization gradient): the
        "sticking the landing" form used by the STL and DReG estimators. For a
        hierarchical q, "detached" must mean the encoder's *weights* are held fixed while
        log q(z_2 | z_1) still depends on the sample z_1 (evaluate the layer with detached
        weights, not by detaching its output mean and variance), or the estimators lose
        the path through z_1 and become biased.
        """

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """``[K, B]`` log importance weights; the one quantity every bound reads. ``x``: images
        ``[B, D]`` (or ``[B, H, W]``, ``[B, C, H, W]``), float in [0, 1] or as elbolab's data
        stores them (uint8 0/1 or 0..255): see :func:`model_input`."""
        return self.log_weight_terms(model_input(x, self.data_dim, self), k).log_weights()

    @property
    def layer_names(self) -> list[str]:
        """Stochastic layers as keyed in :class:`LogWeightTerms`, bottom first: "z", or "z1", "z2", ..."""
        n = len(self.latent_dims)
        return ["z"] if n == 1 else [f"z{i}" for i in range(1, n + 1)]

    def sample_posterior(self, x: Tensor, k: int, *, stop_posterior_grad: bool = False,
                         generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """k reparameterized draws of every layer of q given x and their log q, keyed by layer:
        ``[K, B, D_l]`` and ``[K, B]`` (``stop_posterior_grad`` as in :meth:`log_weight_terms`)."""
        raise ModelCapabilityError(f"{type(self).__name__} does not sample its posterior on its own")

    def is_encoder_parameter(self, name: str) -> bool:
        """Whether the parameter called ``name`` (as in ``named_parameters``) belongs to q(z|x)."""
        return name.split(".", 1)[0].startswith(self.encoder_prefixes)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of q(z|x) (the inference network), in ``named_parameters`` order."""
        return [p for n, p in self.named_parameters() if self.is_encoder_parameter(n)]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: decoder, likelihood and prior (the generative model p(x, z))."""
        return [p for n, p in self.named_parameters() if not self.is_encoder_parameter(n)]

    @abstractmethod
    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """q(z|x) of the first-sampled stochastic layer, ``[B, D]`` parameters."""

    def top_posterior(self, x: Tensor) -> DiagonalGaussian:
        """The Gaussian over the prior's layer given an input, ``[B, D_top]`` parameters.

        A VampPrior mixes these at its pseudo-inputs. For one stochastic layer it is
        q(z|x); multi-layer models say how they reach their top layer.
        """
        return self.posterior(x)

    def latents_given_top(self, z_top: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral samples of the decoder's input given the prior's layer, ``[n, ...]``."""
        return z_top

    def conditional_means(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """Per stochastic layer (bottom first), its mean under q given x and k draws of the
        first-sampled layer: ``[K, B, D_l]``, or ``[B, D_l]`` where the mean is exact (it
        does not depend on the draws, as for the first-sampled layer itself).

        Each of the K rows is an unbiased estimate of E_q[z_l | x], which active units
        need; a plug-in such as mu2(E_q[z1 | x]) is not one through a nonlinear network.
        """
        if self.posterior_flow != "none":
            return self.sampled_means(x, k, generator)
        return [self.posterior(x).mean]

    def sampled_means(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """k draws of every layer of q, ``[K, B, D_l]`` each: unbiased estimates of E_q[z_l | x]
        for any q, used where no mean is known in closed form (a flow posterior's)."""
        z, _ = self.sample_posterior(x, k, generator=generator)
        return [z[name] for name in self.layer_names]

    @abstractmethod
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral samples of the latent(s) that the decoder reads, ``[n, ...]``."""

    @abstractmethod
    def decode_mean(self, z: Tensor) -> Tensor:
        """The expected image E[x | z] in [0, 1] for decoder input z (see ``exact_decode_mean``)."""

    def decode_sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A draw x ~ p(x | z), ``[n, data_dim]``, for decoder input z as :meth:`sample_latents` returns it."""
        raise ModelCapabilityError(f"{type(self).__name__} does not draw images x ~ p(x | z)")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, data_dim]`` mean images of ancestral samples from the model."""
        return self.decode_mean(self.sample_latents(n, generator))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean image decoded from the posterior mean (one forward pass, no sampling)."""
        return self.decode_mean(self.posterior(x).mean)


def _rename_legacy_keys(module: LatentVariableModel, state_dict: dict, prefix: str, *args: object) -> None:
    """A load_state_dict pre-hook: rename keys saved under an older layout, in place."""
    for old, new in module.legacy_keys().items():
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


#: builds a model from (the model config, the data dimension, float training data [N, D] or None)
Builder = Callable[[ModelConfig, int, Tensor | None], LatentVariableModel]

#: ``model.name`` -> its builder; each model registers its own beside its code (:func:`register_model`)
MODELS: Registry[Builder] = Registry("model")


def common_options(cfg: ModelConfig, data_dim: int, train_data: Tensor | None, top_dim: int, section: object = None
                   ) -> dict[str, object]:
    """The keyword arguments a builder passes every model: the likelihood, the prior on the top
    layer (``top_dim`` units), the posterior's form, and each field of the model's own config
    ``section`` (a dataclass whose fields are the model's keyword arguments)."""
    fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)} if section is not None else {}
    prior = make_prior(cfg.prior, top_dim, data_dim, train_data)
    return {**fields, "likelihood": cfg.likelihood, "prior": prior, "posterior": cfg.posterior}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Function decorator: the builder of model ``name`` (``model.name`` in a config)."""

    def register(build: Builder) -> Builder:
        return MODELS.register(name, build)

    return register

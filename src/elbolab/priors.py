"""Priors p(z): each has ``log_prob(z [..., D]) -> [...]`` and ``sample(n) -> [n, D]``.

Priors are modules so that learnable ones (mixtures, VampPrior) train with the model.
Priors that depend on the model's own encoder (VampPrior) receive it through
:meth:`Prior.attach`, called once when the model is built. In a model with several
stochastic layers the prior is the distribution of the top layer (the one nothing
else generates); see ``LatentVariableModel.prior_layer``.

Names (``model.prior.name``): ``standard``, ``mog``, ``vampprior``, ``vampprior-data``, ``af``
(an autoregressive-flow prior, Chen et al. 2016's VLAE).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.registry import PSEUDO_INPUTS_DEFAULT
from .distributions import LOG_2PI, DiagonalGaussian, log_normal_diag_mixture, log_standard_normal
from .errors import ModelCapabilityError
from .flows import IAFStep
from .registry import Registry


class Prior(nn.Module, ABC):
    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    @abstractmethod
    def log_prob(self, z: Tensor) -> Tensor: ...

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def attach(self, model: nn.Module) -> None:
        """Hook for priors that use the model (e.g. its encoder); default: nothing."""

    def log_prob_dims(self, z: Tensor) -> Tensor:
        """``[..., D]`` terms, one per latent unit, that sum to :meth:`log_prob` (free bits split
        the KL over groups of units with them); priors that do not factor that way refuse."""
        raise ModelCapabilityError(f"the {type(self).__name__} prior does not split log p(z) over latent units "
                                   "(free bits need it): use model.prior.name standard or af")

    @property
    def has_analytic_kl(self) -> bool:
        """True when KL(N(m, s) || p) has a closed form used by diagnostics."""
        return False


class StandardNormal(Prior):
    """p(z) = N(0, I)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def log_prob_dims(self, z: Tensor) -> Tensor:
        return -0.5 * (LOG_2PI + z * z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        a = self._anchor
        return torch.randn(n, self.latent_dim, generator=generator, dtype=a.dtype, device=a.device)

    @property
    def has_analytic_kl(self) -> bool:
        return True


class GaussianMixturePrior(Prior, ABC):
    """A prior whose density is a mixture of C diagonal Gaussians (given by :meth:`components`)."""

    @abstractmethod
    def components(self) -> tuple[DiagonalGaussian, Tensor]:
        """The C components ``[C, D]`` and the log mixing weights ``[C]``."""

    @property
    def num_components(self) -> int:
        return self.components()[1].shape[0]

    #: components held fixed by :meth:`frozen_components`, else None
    _fixed: tuple[DiagonalGaussian, Tensor] | None = None

    @contextlib.contextmanager
    def frozen_components(self) -> Iterator[None]:
        """Compute the components once and reuse them inside the block: for evaluations with
        fixed weights that call ``log_prob`` thousands of times (AIS, q*), where a VampPrior
        would otherwise run its encoder over every pseudo-input at each call."""
        with torch.no_grad():
            comp, log_mix = self.components()
        self._fixed = (comp.detach(), log_mix.detach())
        try:
            yield
        finally:
            self._fixed = None

    def _components(self) -> tuple[DiagonalGaussian, Tensor]:
        return self._fixed if self._fixed is not None else self.components()

    def log_prob(self, z: Tensor) -> Tensor:
        """``[..., D] -> [...]``: two GEMMs and a logsumexp over C (float64 inside)."""
        comp, log_mix = self._components()
        return log_normal_diag_mixture(z, comp.mean, comp.log_var, log_mix)

    def sample_components(self, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw from each listed component: ``index`` ``[n]`` -> ``[n, D]``."""
        comp, _ = self._components()
        mean, std = comp.mean[index], comp.std[index]
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + std * eps

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        _, log_mix = self.components()
        probs = torch.exp(log_mix.detach().float()).cpu()
        index = torch.multinomial(probs, n, replacement=True, generator=_cpu(generator))
        return self.sample_components(index.to(log_mix.device), generator)


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """torch.multinomial on CPU probabilities needs a CPU generator (or none)."""
    return generator if generator is None or generator.device.type == "cpu" else None


class MixtureOfGaussians(GaussianMixturePrior):
    """p(z) = sum_c pi_c N(z; m_c, diag exp(lv_c)) with learnable means and log-variances.

    Means start as draws from N(0, I) and variances at 1; mixing weights are uniform,
    or learnable through a softmax over logits (``learn_weights``).
    """

    def __init__(self, latent_dim: int, components: int, learn_weights: bool = False) -> None:
        super().__init__(latent_dim)
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.log_vars = nn.Parameter(torch.zeros(components, latent_dim))
        logits = torch.zeros(components)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def components(self) -> tuple[DiagonalGaussian, Tensor]:
        return DiagonalGaussian(self.means, self.log_vars), F.log_softmax(self.logits, dim=0)


#: the model hook a VampPrior calls: inputs [C, data_dim] -> q(z_top | u) with [C, D] parameters
TopPosterior = Callable[[Tensor], DiagonalGaussian]


class VampPriorBase(GaussianMixturePrior, ABC):
    """p(z) = (1/C) sum_c q(z | u_c): the model's own encoder evaluated at C pseudo-inputs.

    The encoder is reached through ``model.top_posterior`` (set by :meth:`attach`), which
    gives the Gaussian over the prior's latent for an input; for a two-level model that
    is the top layer (Tomczak & Welling 2018, section 3.2).
    """

    def __init__(self, latent_dim: int, data_dim: int) -> None:
        super().__init__(latent_dim)
        self.data_dim = data_dim
        self._top_posterior: TopPosterior | None = None

    @abstractmethod
    def pseudo_inputs(self) -> Tensor:
        """``[C, data_dim]`` pseudo-inputs in the data range."""

    def attach(self, model: nn.Module) -> None:
        # a plain attribute (a bound method), not a submodule: the model owns the prior,
        # so registering the model here would make the module tree cyclic
        self._top_posterior = model.top_posterior

    def components(self) -> tuple[DiagonalGaussian, Tensor]:
        if self._top_posterior is None:
            raise RuntimeError("VampPrior is not attached to a model; call prior.attach(model) first")
        u = self.pseudo_inputs()
        q = self._top_posterior(u)
        c = u.shape[0]
        return q, torch.full((c,), -math.log(c), dtype=q.mean.dtype, device=q.mean.device)


class VampPrior(VampPriorBase):
    """Learned pseudo-inputs, parameterized as in Tomczak & Welling's code.

    Their pseudo-inputs are ``hardtanh_[0,1](W e_c)``: a bias-free linear map of C
    units applied to the fixed one-hot input e_c, squashed to the data range. As
    ``W e_c`` is column c of W, we store those columns directly (``pre_activation``,
    ``[C, data_dim]``), the same function and the same Adam updates without the C x C
    identity GEMM. Initialization: N(mean, std), or C random training images (their
    ``--use_training_data_init``).

    Their utils/load_data.py sets the mean and std per dataset, overriding the -0.05 of
    experiment.py's flag: 0.05 and 0.01 for MNIST and OMNIGLOT, 0.5 and 0.02 for
    Caltech-101 and Frey Faces. A config that leaves them unset gets the dataset's values
    (``models.build_model(..., dataset=...)``); a mean near -0.05 would start every pre-activation where
    hardtanh has zero gradient, so the pseudo-inputs could never leave the black image.
    """

    def __init__(
        self,
        latent_dim: int,
        data_dim: int,
        components: int,
        init_mean: float = PSEUDO_INPUTS_DEFAULT[0],
        init_std: float = PSEUDO_INPUTS_DEFAULT[1],
        init_images: Tensor | None = None,
    ) -> None:
        super().__init__(latent_dim, data_dim)
        if init_images is not None:
            pre = init_images.detach().float().clone()
        else:
            pre = torch.randn(components, data_dim) * init_std + init_mean
        self.pre_activation = nn.Parameter(pre)

    def pseudo_inputs(self) -> Tensor:
        return F.hardtanh(self.pre_activation, 0.0, 1.0)


class VampPriorData(VampPriorBase):
    """The VampPrior's "data" variant: C fixed training images as pseudo-inputs (buffers).

    Without training data (rebuilding a saved run) the buffer starts at zeros and the
    saved images arrive with the state dict.
    """

    def __init__(self, latent_dim: int, data_dim: int, components: int, images: Tensor | None = None) -> None:
        super().__init__(latent_dim, data_dim)
        fixed = images.detach().float().clone() if images is not None else torch.zeros(components, data_dim)
        self.register_buffer("images", fixed)

    def pseudo_inputs(self) -> Tensor:
        return self.images


class AutoregressiveFlowPrior(Prior):
    """p(z) through an autoregressive flow whose networks read z itself (Chen et al. 2016's AF prior).

        eps = g_T(...g_1(z)),   eps ~ N(0, I),   log p(z) = log N(eps) + sum_t log |det dg_t/dy|

    Each step is the inverse of an IAF step (:class:`~elbolab.flows.IAFStep`, no context):
    [m, s] = MADE(y), sigma = sigmoid(s), g(y) = (y - (1 - sigma) m) / sigma, so output i
    reads y_j only for j before i in the step's order and dg/dy is triangular with diagonal
    1 / sigma: the density is ONE pass per step. Sampling inverts each step unit by unit,
    y_i = sigma_i eps_i + (1 - sigma_i) m_i with the MADE rerun on the units already drawn:
    D passes per step. Steps alternate between the natural and the reversed order.
    """

    def __init__(self, latent_dim: int, steps: int, width: int) -> None:
        super().__init__(latent_dim)
        self.layers = nn.ModuleList(IAFStep(latent_dim, width, reverse=t % 2 == 1, context=False)
                                    for t in range(steps))

    def to_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, log |d eps / dz|)`` per unit: ``[..., D]`` and ``[..., D]`` (summed over steps)."""
        log_det = torch.zeros_like(z)
        for step in self.layers:
            m, s = step.made(z)
            z = (z - (1.0 - torch.sigmoid(s)) * m) * torch.exp(-F.logsigmoid(s))
            log_det = log_det - F.logsigmoid(s)
        return z, log_det

    def log_prob_dims(self, z: Tensor) -> Tensor:
        eps, log_det = self.to_noise(z)
        return -0.5 * (LOG_2PI + eps * eps) + log_det

    def log_prob(self, z: Tensor) -> Tensor:
        return self.log_prob_dims(z).sum(-1)

    def from_noise(self, eps: Tensor) -> Tensor:
        """The flow's inverse, ``[..., D]`` -> ``[..., D]``: D MADE passes per step."""
        y = eps
        for step in reversed(self.layers):
            out = torch.zeros_like(y)
            for i in step.order.tolist():
                m, s = step.made(out)
                sigma = torch.sigmoid(s[..., i])
                out = out.clone()
                out[..., i] = sigma * y[..., i] + (1.0 - sigma) * m[..., i]
            y = out
        return y

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        w = self.layers[0].out.weight if len(self.layers) else torch.zeros(())
        eps = torch.randn(n, self.latent_dim, generator=generator, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            return self.from_noise(eps)


def random_images(train_data: Tensor | None, count: int, seed: int, key: str) -> Tensor | None:
    """``count`` distinct training images chosen with ``seed`` (None without data)."""
    if train_data is None:
        return None
    n = train_data.shape[0]
    if count > n:
        raise ValueError(f"{key}: asks for {count} training images but the training set has {n}")
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    return train_data[index].float()


def _standard(cfg, latent_dim: int, data_dim: int, train_data: Tensor | None) -> Prior:
    return StandardNormal(latent_dim)


def _mog(cfg, latent_dim: int, data_dim: int, train_data: Tensor | None) -> Prior:
    return MixtureOfGaussians(latent_dim, cfg.components, cfg.learn_weights)


def _vampprior(cfg, latent_dim: int, data_dim: int, train_data: Tensor | None) -> Prior:
    images = None
    if cfg.pseudo_inputs_init == "data":
        images = random_images(train_data, cfg.components, cfg.data_seed, "model.prior.components")
    # unset: a model built without its dataset (e.g. to load weights), whose init does not matter
    mean, std = cfg.with_pseudo_input_init(PSEUDO_INPUTS_DEFAULT).pseudo_input_params()
    return VampPrior(latent_dim, data_dim, cfg.components, mean, std, images)


def _vampprior_data(cfg, latent_dim: int, data_dim: int, train_data: Tensor | None) -> Prior:
    images = random_images(train_data, cfg.components, cfg.data_seed, "model.prior.components")
    return VampPriorData(latent_dim, data_dim, cfg.components, images)


def _af(cfg, latent_dim: int, data_dim: int, train_data: Tensor | None) -> Prior:
    return AutoregressiveFlowPrior(latent_dim, cfg.flow_steps, cfg.flow_width)


#: ``model.prior.name`` -> builder(prior config, latent dim of the prior's layer, data dim,
#: float train data [N, D] or None)
PRIORS: Registry[Callable[..., Prior]] = Registry("prior", {
    "standard": _standard,
    "mog": _mog,
    "vampprior": _vampprior,
    "vampprior-data": _vampprior_data,
    "af": _af,
})


def make_prior(cfg, latent_dim: int, data_dim: int, train_data: Tensor | None = None) -> Prior:
    """Build the prior a :class:`~elbolab.config.PriorConfig` names."""
    return PRIORS.get_checked(cfg.name, "model.prior.name")(cfg, latent_dim, data_dim, train_data)

"""Observation models p(x | z): the decoder's output layer and the density it parameterizes.

A likelihood owns the decoder's last layer (``head``: features ``[..., H]`` -> parameters
``[..., P*D]``), laid out as ``params_per_pixel`` (P) consecutive blocks of D (block 0:
the location, block 1: the log-scale or log-variance), so it can choose how to evaluate
the pair (:meth:`Likelihood.log_prob_from_features`). Registered by name so a config line
picks one (``model.likelihood``).

Grey-level data enters as floats in [0, 1] (``data.binarization: none``), level
``i`` of 256 being ``i / 255``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributions import log_bernoulli_logits, log_discretized_logistic, log_normal_diag
from .errors import ModelCapabilityError
from .fastpaths import bernoulli_log_prob
from .registry import Registry


class Likelihood(nn.Module, ABC):
    """Base class: ``log_prob(x [B, D], params [..., B, P*D]) -> [..., B]``.

    With ``in_features`` the likelihood owns the decoder's output layer ``head`` (a Linear
    map to the P*D parameters); without, the decoder emits the parameters itself and
    ``head`` is the identity.
    """

    params_per_pixel: int = 1
    #: whether the data must be binary ({0, 1}) for this likelihood to be a density
    binary: bool = False

    def __init__(self, data_dim: int, in_features: int | None = None) -> None:
        super().__init__()
        self.data_dim = data_dim
        self.head: nn.Module = (
            nn.Linear(in_features, data_dim * self.params_per_pixel) if in_features is not None else nn.Identity()
        )

    @abstractmethod
    def log_prob(self, x: Tensor, params: Tensor) -> Tensor: ...

    @abstractmethod
    def mean(self, params: Tensor) -> Tensor:
        """Expected image in [0, 1] (for reconstructions and sample grids)."""

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A draw x ~ p(x | params): ``[..., P*D] -> [..., D]``, valued as the data are."""
        raise ModelCapabilityError(f"{type(self).__name__} cannot draw images")

    def log_prob_from_features(self, x: Tensor, features: Tensor) -> Tensor:
        """``log_prob(x, head(features))``: ``x`` [B, D], ``features`` [..., B, H] -> [..., B].

        A likelihood may use its head's algebra to skip ``[K, B, P*D]`` temporaries when no
        gradient is needed (the importance-sampled log-likelihood); the value is the same up
        to float rounding.
        """
        return self.log_prob(x, self.head(features))

    def init_output_bias(self, pixel_mean: Tensor) -> None:
        """Start the decoder at the data's average image, as the IWAE paper does."""
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self._init_bias(self.head.bias, pixel_mean)

    def _init_bias(self, bias: Tensor, pixel_mean: Tensor) -> None:
        """Set the output layer's ``bias`` [P*D] so that the mean image is ``pixel_mean`` [D]."""

    def split(self, params: Tensor) -> list[Tensor]:
        """``[..., P*D]`` -> P tensors ``[..., D]``."""
        return list(params.chunk(self.params_per_pixel, dim=-1))


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-3, 1 - 1e-3)
    return torch.log(p) - torch.log1p(-p)


class BernoulliLikelihood(Likelihood):
    """Bernoulli on logits: exact for any logit, never log(sigmoid)."""

    params_per_pixel = 1
    binary = True

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return log_bernoulli_logits(x, params)

    def log_prob_from_features(self, x: Tensor, features: Tensor) -> Tensor:
        if isinstance(self.head, nn.Linear):
            return bernoulli_log_prob(x, features, self.head)
        return self.log_prob(x, features)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)

    def _init_bias(self, bias: Tensor, pixel_mean: Tensor) -> None:
        bias.copy_(_logit(pixel_mean))


class DiscretizedLogisticLikelihood(Likelihood):
    """256 grey levels: a logistic(loc, s) per pixel, discretized into bins (VampPrior paper).

    As in Tomczak & Welling's code, ``loc = sigmoid(a)`` clamped to [1/512, 1 - 1/512]
    and ``log s = hardtanh(b, -4.5, 0)``. The bins differ from their code in two
    documented ways (see :func:`~elbolab.distributions.log_discretized_logistic`):
    bins are centred on the levels i/255 rather than [i/256, (i+1)/256), and the edge
    bins reach to -inf / +inf, so the 256 probabilities sum to exactly one (theirs
    leave the tails' mass out, a sub-probability). Values are log-probabilities in
    nats of the discrete image, comparable to any other 256-level model.
    """

    params_per_pixel = 2
    levels = 256
    log_scale_range = (-4.5, 0.0)
    #: initial log-scale (inside the hardtanh range so its gradient flows): s ~ 0.14
    init_log_scale = -2.0

    def _params(self, params: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.split(params)
        loc = torch.sigmoid(a).clamp(1.0 / 512, 1.0 - 1.0 / 512)
        return loc, F.hardtanh(b, *self.log_scale_range)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        loc, log_scale = self._params(params)
        return log_discretized_logistic(x, loc, log_scale, self.levels)

    def mean(self, params: Tensor) -> Tensor:
        """The location (the logistic's mean before discretization)."""
        return self._params(params)[0]

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A logistic draw rounded to the nearest level: the bins of :meth:`log_prob`."""
        loc, log_scale = self._params(params)
        u = torch.rand(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
        y = loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))  # u = 0 gives -inf: level 0
        top = self.levels - 1
        return torch.round(y * top).clamp(0, top) / top

    def _init_bias(self, bias: Tensor, pixel_mean: Tensor) -> None:
        d = pixel_mean.numel()
        bias[:d].copy_(_logit(pixel_mean))
        bias[d:].fill_(self.init_log_scale)


#: floor of Gaussian log-variances: without one, pixels that are constant in the data
#: (MNIST's black border) drive the variance to 0 and the density to +inf
GAUSSIAN_MIN_LOG_VAR = math.log(1e-4)


def _floored_log_var(raw: Tensor) -> Tensor:
    """A smooth floor: ``min + softplus(raw - min)`` is ~raw above the floor, never below."""
    return GAUSSIAN_MIN_LOG_VAR + F.softplus(raw - GAUSSIAN_MIN_LOG_VAR)


class GaussianLikelihood(Likelihood):
    """N(x; mu(z), diag sigma^2(z)): the decoder outputs a mean and a log-variance per pixel.

    A density on R^D, not a probability of 256 levels: its values are not comparable
    with the Bernoulli's or the discretized logistic's. The log-variance is floored at
    log 1e-4 (smoothly) so constant pixels cannot make it unbounded.
    """

    params_per_pixel = 2
    init_log_var = math.log(0.1)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        mean, raw = self.split(params)
        return log_normal_diag(x, mean, _floored_log_var(raw))

    def mean(self, params: Tensor) -> Tensor:
        return self.split(params)[0].clamp(0.0, 1.0)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, raw = self.split(params)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * _floored_log_var(raw)) * eps

    def _init_bias(self, bias: Tensor, pixel_mean: Tensor) -> None:
        d = pixel_mean.numel()
        bias[:d].copy_(pixel_mean)
        bias[d:].fill_(self.init_log_var)


class GaussianPixelVarianceLikelihood(Likelihood):
    """N(x; mu(z), diag sigma^2): one learned log-variance per pixel, shared by all z.

    The decoder outputs only the mean; the variance is a parameter of the likelihood
    (floored like :class:`GaussianLikelihood`). A density, as for ``gaussian``.
    """

    params_per_pixel = 1

    def __init__(self, data_dim: int, in_features: int | None = None) -> None:
        super().__init__(data_dim, in_features)
        self.raw_log_var = nn.Parameter(torch.full((data_dim,), GaussianLikelihood.init_log_var))

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return log_normal_diag(x, params, _floored_log_var(self.raw_log_var))

    def mean(self, params: Tensor) -> Tensor:
        return params.clamp(0.0, 1.0)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(params.shape, generator=generator, dtype=params.dtype, device=params.device)
        return params + torch.exp(0.5 * _floored_log_var(self.raw_log_var)) * eps

    def _init_bias(self, bias: Tensor, pixel_mean: Tensor) -> None:
        bias.copy_(pixel_mean)


#: ``model.likelihood`` -> its class, built as ``cls(data_dim, in_features)``
LIKELIHOODS: Registry[Callable[[int, int | None], Likelihood]] = Registry("likelihood", {
    "bernoulli": BernoulliLikelihood,
    "discretized-logistic": DiscretizedLogisticLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian-pixel-var": GaussianPixelVarianceLikelihood,
})


def make_likelihood(name: str, data_dim: int, in_features: int | None = None) -> Likelihood:
    """The likelihood ``name`` over ``data_dim`` pixels, owning an output layer from ``in_features``."""
    return LIKELIHOODS.get_checked(name, "model.likelihood")(data_dim, in_features)

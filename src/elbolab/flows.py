"""Normalizing-flow posteriors: a diagonal Gaussian q0 pushed through T invertible steps.

    z_0 ~ q0 = N(mu, diag sigma^2),   z_t = f_t(z_{t-1}; h),
    log q(z_T | .) = log q0(z_0) - sum_t log |det df_t / dz_{t-1}|

Every step is conditioned on ``h``, the features the layer's Gaussian head reads (the
encoder's last deterministic layer), so one mechanism serves every Gaussian layer of every
model: a model keeps its Gaussian and adds a :class:`Flow` after it.

- ``planar`` (Rezende & Mohamed 2015): f(z) = z + u_hat tanh(w.z + b). u, w, b are
  amortized, a linear map of h per step (van den Berg et al. 2018 do the same), and
  u_hat = u + (m(w.u) - w.u) w / |w|^2 with m(a) = -1 + softplus(a) keeps w.u_hat > -1,
  which makes each step invertible (its determinant 1 + (1 - tanh^2) w.u_hat > 0).
- ``iaf`` (Kingma et al. 2016): the encoder emits a context c = W h; each step runs a
  MADE network (masked, so output i reads z_j for j < i only, and c) on (z, c), giving m and s,
  and updates z = sigma z + (1 - sigma) m with sigma = sigmoid(s) (their numerically
  stable form), log |det| = sum log sigma. Steps alternate between the natural and the
  reversed variable order.

The log-density is only known at the flow's own samples. :func:`log_prob_fixed` gives
what the STL and DReG estimators need, log q at a sample with q's weights held fixed as a
function of the sample (and of q's inputs), from the score d log q / dz_T; planar steps
give it in closed form (Sherman-Morrison), IAF steps would need D sequential passes each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PosteriorConfig
from .distributions import DiagonalGaussian
from .errors import ConfigError
from .registry import Registry

__all__ = ["FLOWS", "Flow", "FlowError", "IAFFlow", "PlanarFlow", "log_prob_fixed", "make_flow", "push_forward"]


class FlowError(ConfigError):
    """A flow posterior was asked for what it cannot give (a density it has no way to evaluate)."""


class Flow(nn.Module, ABC):
    """``length`` steps on z ``[..., D]`` conditioned on features h ``[..., F]`` (broadcast against z)."""

    #: why the STL / DReG estimators cannot use this flow (None: they can, see :meth:`score`)
    stl_refusal: str | None = None

    def __init__(self, length: int, latent_dim: int) -> None:
        super().__init__()
        self.length = length
        self.latent_dim = latent_dim

    @abstractmethod
    def condition(self, h: Tensor) -> Tensor:
        """The per-point quantities the steps read, computed from the features ``[..., C]``: the
        encoder's per-point outputs for this flow, which the optimal local posterior q* frees
        (diagnostics/local_opt.py) as it frees the Gaussian's mean and log-variance."""

    @abstractmethod
    def transform(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_T, sum_t log |det df_t/dz|)`` for the steps set by ``c`` (:meth:`condition`)."""

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_T, sum_t log |det df_t/dz|)``: ``[..., D]`` and ``[...]``."""
        return self.transform(z, self.condition(h))

    def score(self, z0: Tensor, h: Tensor, base: DiagonalGaussian) -> Tensor:
        """d log q(z_T) / d z_T at z_T = f(z0) ``[..., D]``, for q = base pushed through the flow."""
        raise FlowError(f"STL and DReG need log q(z|x) at a sample with q's weights held fixed, and {self.stl_refusal}")


# --- planar -------------------------------------------------------------------------------


def planar_constrain(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``(u_hat, 1 + w.u_hat)``: u_hat = u + (m(w.u) - w.u) w / |w|^2, m(a) = -1 + softplus(a), so
    1 + w.u_hat = softplus(w.u) > 0. That term is returned as softplus(w.u) itself: as a dot
    product it cancels (-1 + tiny, from terms of size |w.u|) when w.u is very negative."""
    wu = (w * u).sum(-1, keepdim=True)
    sp = F.softplus(wu)
    return u + (sp - 1.0 - wu) * w / (w * w).sum(-1, keepdim=True), sp


def _planar_det(t: Tensor, s: Tensor, wu1: Tensor) -> Tensor:
    """1 + s w.u_hat with s = 1 - t^2 and wu1 = 1 + w.u_hat, as t^2 + s wu1: two terms >= 0, so
    it keeps its relative precision where wu1 is tiny and t is near 0 (close to the hyperplane)."""
    return t * t + s * wu1


def _wu1(u_hat: Tensor, w: Tensor, wu1: Tensor | None) -> Tensor:
    return 1.0 + (w * u_hat).sum(-1, keepdim=True) if wu1 is None else wu1


def planar_step(z: Tensor, u_hat: Tensor, w: Tensor, b: Tensor, wu1: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """f(z) = z + u_hat tanh(w.z + b) and log |det df/dz| = log(1 + (1 - tanh^2) w.u_hat).
    ``wu1``: 1 + w.u_hat from :func:`planar_constrain` (else from the dot product)."""
    t = torch.tanh((z * w).sum(-1, keepdim=True) + b)
    return z + u_hat * t, torch.log(_planar_det(t, 1.0 - t * t, _wu1(u_hat, w, wu1))).squeeze(-1)


def planar_score_step(g: Tensor, z: Tensor, u_hat: Tensor, w: Tensor, b: Tensor, wu1: Tensor | None = None
                      ) -> Tensor:
    """The score after one step from the score before it: ``(g - d log|det|/dz) J^{-1}`` at z.

    J = I + u_hat psi^T with psi = (1 - tanh^2) w, so a row vector y gives
    y J^{-1} = y - (y.u_hat) psi / (1 + psi.u_hat) (Sherman-Morrison): O(D), no inverse map.
    """
    t = torch.tanh((z * w).sum(-1, keepdim=True) + b)
    s = 1.0 - t * t
    wu1 = _wu1(u_hat, w, wu1)
    det = _planar_det(t, s, wu1)
    y = g + (2.0 * t * s * (wu1 - 1.0) / det) * w  # minus d/dz log(1 + s w.u_hat); ds/dz = -2 t s w
    return y - ((y * u_hat).sum(-1, keepdim=True) / det) * (s * w)


class PlanarFlow(Flow):
    """Planar steps whose u, w, b are one linear map of the features (amortized)."""

    def __init__(self, length: int, latent_dim: int, feature_dim: int, width: int = 0) -> None:
        super().__init__(length, latent_dim)
        self.conditioner = nn.Linear(feature_dim, length * (2 * latent_dim + 1))

    def condition(self, h: Tensor) -> Tensor:
        """Every step's raw (u, w, b), ``[..., length * (2 D + 1)]``."""
        return self.conditioner(h)

    def steps(self, h: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per step (u_hat, w, b, 1 + w.u_hat): ``[..., D]``, ``[..., D]``, ``[..., 1]``, ``[..., 1]``."""
        return self.steps_from(self.condition(h))

    def steps_from(self, c: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`steps` from the conditioned parameters ``c`` (:meth:`condition`)."""
        d = self.latent_dim
        u, w, b = c.unflatten(-1, (self.length, 2 * d + 1)).split([d, d, 1], dim=-1)
        u_hat, wu1 = planar_constrain(u, w)
        return [(u_hat[..., t, :], w[..., t, :], b[..., t, :], wu1[..., t, :]) for t in range(self.length)]

    def transform(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for u_hat, w, b, wu1 in self.steps_from(c):
            z, ld = planar_step(z, u_hat, w, b, wu1)
            log_det = log_det + ld
        return z, log_det

    def score(self, z0: Tensor, h: Tensor, base: DiagonalGaussian) -> Tensor:
        g = -(z0 - base.mean) * torch.exp(-base.log_var)  # d log q0 / dz0
        z = z0
        for u_hat, w, b, wu1 in self.steps(h):
            g = planar_score_step(g, z, u_hat, w, b, wu1)
            z = planar_step(z, u_hat, w, b, wu1)[0]
        return g


# --- inverse autoregressive ----------------------------------------------------------------


class MaskedLinear(nn.Linear):
    """A Linear layer whose weight is multiplied by a fixed 0/1 mask ``[out, in]``."""

    def __init__(self, in_dim: int, out_dim: int, mask: Tensor) -> None:
        super().__init__(in_dim, out_dim)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


#: the sigmoid gate's initial bias: sigma = sigmoid(2) = 0.88, so each step starts near the
#: identity (Kingma et al. 2016 start sigma close to 1)
IAF_GATE_BIAS = 2.0


class IAFStep(nn.Module):
    """[m, s] = MADE(z, c); sigma = sigmoid(s); z' = sigma z + (1 - sigma) m; log|det| = sum log sigma.

    MADE (Germain et al. 2015) with two hidden layers of ``width`` units: variable i (in this
    step's order) has degree i, hidden units degrees in 0..D-1, and a connection exists only
    from lower-or-equal degree to hidden and strictly lower degree to output, so m_i and s_i
    read z_j for j before i only. The context enters the first hidden layer unmasked; units of
    degree 0 read it alone, which carries it to every output, the first variable's included.
    """

    def __init__(self, latent_dim: int, width: int, reverse: bool, context: bool = True) -> None:
        super().__init__()
        d = latent_dim
        order = torch.arange(d - 1, -1, -1) if reverse else torch.arange(d)
        degree_in = torch.empty(d, dtype=torch.long)
        degree_in[order] = torch.arange(1, d + 1)
        degree_h = torch.arange(width) % d
        self.reverse = reverse
        #: the variables in the order this step's MADE reads them
        self.register_buffer("order", order, persistent=False)
        self.inp = MaskedLinear(d, width, degree_h[:, None] >= degree_in[None, :])
        # without a context (the autoregressive-flow prior), degree-0 units read the biases alone
        self.ctx = nn.Linear(width, width) if context else None
        self.hidden = MaskedLinear(width, width, degree_h[:, None] >= degree_h[None, :])
        out_mask = degree_in[:, None] > degree_h[None, :]
        self.out = MaskedLinear(width, 2 * d, torch.cat([out_mask, out_mask]))
        with torch.no_grad():
            self.out.bias[d:].fill_(IAF_GATE_BIAS)

    def made(self, z: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(m, s)``, ``[..., D]`` each: output i reads z_j only for j before i in this step's order."""
        a = self.inp(z) if self.ctx is None else self.inp(z) + self.ctx(c)
        m, s = self.out(F.elu(self.hidden(F.elu(a)))).chunk(2, dim=-1)
        return m, s

    def forward(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        m, s = self.made(z, c)
        sigma = torch.sigmoid(s)
        return sigma * z + (1.0 - sigma) * m, F.logsigmoid(s).sum(-1)


class IAFFlow(Flow):
    """IAF steps sharing one context c = W h (the encoder's extra output, ``width`` units)."""

    stl_refusal = ("the score of an IAF density needs the inverse of each step's triangular Jacobian, "
                   "D sequential passes per step")

    def __init__(self, length: int, latent_dim: int, feature_dim: int, width: int) -> None:
        super().__init__(length, latent_dim)
        self.context = nn.Linear(feature_dim, width)
        self.layers = nn.ModuleList(IAFStep(latent_dim, width, reverse=t % 2 == 1) for t in range(length))

    def condition(self, h: Tensor) -> Tensor:
        """The context c = W h that every step reads, ``[..., width]``."""
        return self.context(h)

    def transform(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for step in self.layers:
            z, ld = step(z, c)
            log_det = log_det + ld
        return z, log_det


#: ``model.posterior.flow`` -> the flow class (None: the Gaussian itself)
FLOWS: Registry[type[Flow] | None] = Registry("flow", {"none": None, "planar": PlanarFlow, "iaf": IAFFlow})


def make_flow(cfg: PosteriorConfig | None, latent_dim: int, feature_dim: int) -> Flow | None:
    """The flow a posterior config names for one layer, or None (no flow, or length 0)."""
    if cfg is None or cfg.length == 0:
        return None
    cls = FLOWS.get_checked(cfg.flow, "model.posterior.flow")
    return None if cls is None else cls(cfg.length, latent_dim, feature_dim, cfg.width)


# --- densities ------------------------------------------------------------------------------


def push_forward(base: DiagonalGaussian, z0: Tensor, flow: Flow | None, h: Tensor) -> tuple[Tensor, Tensor]:
    """``(z_T, log q(z_T))`` for draws z0 ``[K, B, D]`` of ``base`` through ``flow`` (None: z0 itself)."""
    log_q0 = base.log_prob(z0)
    if flow is None:
        return z0, log_q0
    z, log_det = flow(z0, h)
    return z, log_q0 - log_det


def log_prob_fixed(base: DiagonalGaussian, z0: Tensor, z: Tensor, flow: Flow | None, h: Tensor) -> Tensor:
    """log q(z_T) with q's weights held fixed: gradients reach only the sample z_T and q's inputs.

    ``base`` and ``h`` must already be computed with detached weights (they may still depend
    on an upper layer's sample). Writing A(z0, theta) = log q0(z0) - sum log|det| and
    z_T = F(z0, theta) with theta the flow's conditioned parameters, the density at a fixed
    z_T moves with theta as A's partial minus v . dF/dtheta, v = d log q / d z_T (the score).
    The value returned is A; ``v . (z_T - F(z0, theta))`` adds the gradient with value 0.
    Without a flow it is ``base.log_prob(z)``.
    """
    if flow is None:
        return base.log_prob(z)
    z0 = z0.detach()
    weights = {name: p.detach() for name, p in flow.named_parameters()}
    z_again, log_det = torch.func.functional_call(flow, weights, (z0, h))
    with torch.no_grad():
        v = flow.score(z0, h, DiagonalGaussian(base.mean.detach(), base.log_var.detach()))
    r = (v * (z - z_again)).sum(-1)
    return base.log_prob(z0) - log_det + (r - r.detach())

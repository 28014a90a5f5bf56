"""Deterministic building blocks shared by the models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributions import standard_normal
from ..fastpaths import Tanh
from ..flows import Flow
from ..priors import Prior, VampPriorBase
from ..registry import Registry

#: ``model.activation`` -> its module class (tanh: torch's, faster without gradients)
ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation", {
    "tanh": Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
})


def activation(name: str) -> nn.Module:
    return ACTIVATIONS.get_checked(name, "model.activation")()


def mlp(in_dim: int, hidden: Sequence[int], act: str) -> tuple[nn.Sequential, int]:
    """Linear + activation per hidden size; returns the stack and its output width."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), activation(act)]
        d = h
    return nn.Sequential(*layers), d


def draw(mean: Tensor, log_var: Tensor, generator=None) -> Tensor:
    """One reparameterized draw per parameter row (the sample axis is already in ``mean``)."""
    eps = standard_normal(tuple(mean.shape), mean, generator)
    return mean + torch.exp(0.5 * log_var) * eps


def with_detached_params(module: nn.Module, *inputs: Tensor):
    """``module(*inputs)`` with its own parameters cut from the graph but not its inputs.

    "Sticking the landing" for a conditional q(z2 | z1): the density's parameters must
    not carry the score gradient, while the path through the sampled z1 must stay.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, inputs)


def check_flow_prior(flow: Flow | None, prior: Prior) -> None:
    """Refuse a VampPrior with a flow posterior: its components would be the flow's q(z|u_k),
    whose density at other points' z the flow cannot give (docs/flows.md)."""
    if flow is not None and isinstance(prior, VampPriorBase):
        raise ValueError(f"a VampPrior needs q(z|u_k) at any z, which a {type(flow).__name__} posterior cannot give")


class GaussianHead(nn.Module):
    """Maps features to (mean, log-variance) of a diagonal Gaussian with one GEMM.

    ``log_var_range`` clamps the log-variance with a hardtanh, as the VampPrior code does.
    """

    def __init__(self, in_dim: int, out_dim: int, log_var_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.log_var_range = log_var_range
        self.linear = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_var = self.linear(h).split(self.out_dim, dim=-1)
        if self.log_var_range is not None:
            log_var = F.hardtanh(log_var, *self.log_var_range)
        return mean, log_var


class GatedDense(nn.Module):
    """h(x) * sigmoid(g(x)) with two linear maps (Dauphin et al. 2017; the VampPrior models)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.h = nn.Linear(in_dim, out_dim)
        self.g = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * self.g(x).sigmoid()


class GaussianNet(nn.Module):
    """inputs -> ``body`` -> features -> ``head`` (mean, log-variance) of a diagonal Gaussian.

    The two halves are called apart where a flow posterior reads the features.
    """

    def __init__(self, body: nn.Module, head: GaussianHead) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(*inputs))


class TwoInput(nn.Module):
    """(a, b) -> ``a``(a) ++ ``b``(b) -> ``joint`` -> features; a's features broadcast against b's
    sample axis (a is the data ``[B, .]``, b a latent ``[K, B, .]``), so a's network runs once."""

    def __init__(self, a: nn.Module, b: nn.Module, joint: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.joint = joint

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ha, hb = self.a(a), self.b(b)
        ha = ha.expand(*hb.shape[:-1], ha.shape[-1])
        return self.joint(torch.cat([ha, hb], dim=-1))


def gated_gaussian(in_dim: int, width: int, depth: int, out_dim: int, log_var_range: tuple[float, float]
                   ) -> GaussianNet:
    """input -> ``depth`` gated dense layers of ``width`` -> (mean, clamped log-variance)."""
    dims = [in_dim] + [width] * depth
    body = nn.Sequential(*(GatedDense(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)))
    return GaussianNet(body, GaussianHead(width, out_dim, log_var_range))


def gated_pair(a_dim: int, b_dim: int, width: int) -> TwoInput:
    """One gated dense layer on each input and one on their concatenation (the VampPrior code's)."""
    return TwoInput(GatedDense(a_dim, width), GatedDense(b_dim, width), GatedDense(2 * width, width))


def he_init_(module: nn.Module) -> None:
    """Weights of every Linear ~ N(0, 2 / fan_in), as the VampPrior code initializes."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_features))

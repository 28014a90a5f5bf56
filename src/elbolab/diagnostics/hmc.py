"""Hamiltonian Monte Carlo on a batch of independent chains (Neal 2011), one step size per chain.

Every chain is a row of a ``[*N, D]`` tensor (for AIS: chains x data points), so one call
of the target evaluates all chains as one batch through the model. The target returns a
:class:`Point`: the position, log f and its gradient, plus any ``extras`` it computed
there (AIS keeps the two halves of its annealed density, so a new temperature needs no new
network pass); the kernel carries them along with accepted positions.

Step sizes adapt per chain towards a target acceptance rate (Wu et al. 2017 and Cremer et
al. 2018 use 0.65): multiplied by ``1 + rate`` while the chain's running acceptance is
above the target and divided by it while below. A kernel with any fixed step size leaves
the target invariant; the adaptation only picks which one is used next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class Point:
    """Chains at positions ``z`` ``[*N, D]``: ``log_f`` ``[*N]``, ``grad`` = d log f / dz ``[*N, D]``."""

    z: Tensor
    log_f: Tensor
    grad: Tensor
    #: anything else the target computed at z, each ``[*N, ...]``
    extras: tuple[Tensor, ...] = ()

    def where(self, mask: Tensor, other: Point) -> Point:
        """Rows of ``self`` where ``mask`` ``[*N]`` is true, else of ``other``."""

        def pick(a: Tensor, b: Tensor) -> Tensor:
            m = mask.reshape(*mask.shape, *([1] * (a.dim() - mask.dim())))
            return torch.where(m, a, b)

        return Point(pick(self.z, other.z), pick(self.log_f, other.log_f), pick(self.grad, other.grad),
                     tuple(pick(a, b) for a, b in zip(self.extras, other.extras, strict=True)))


#: position ``[*N, D]`` -> the target evaluated there
Target = Callable[[Tensor], Point]


@dataclass
class StepSizes:
    """Per-chain leapfrog step sizes ``[*N]`` and the state of their adaptation."""

    size: Tensor
    #: running mean of each chain's acceptance probability (starts at the target)
    acceptance: Tensor
    target_acceptance: float = 0.65
    #: multiplicative change per transition
    rate: float = 0.02
    #: weight of the newest transition in the running acceptance
    smoothing: float = 0.1
    bounds: tuple[float, float] = (1e-4, 1.0)
    adapt: bool = True
    #: transitions made, and their summed acceptance probabilities (per chain)
    count: int = 0
    accepted: Tensor = field(default_factory=lambda: torch.zeros(()))

    @staticmethod
    def constant(shape: tuple[int, ...], size: float, dtype: torch.dtype, device: torch.device | str = "cpu",
                 **kwargs) -> StepSizes:
        t = kwargs.get("target_acceptance", 0.65)
        return StepSizes(torch.full(shape, size, dtype=dtype, device=device),
                         torch.full(shape, t, dtype=torch.float64, device=device),
                         accepted=torch.zeros(shape, dtype=torch.float64, device=device), **kwargs)

    def update(self, accept_prob: Tensor) -> StepSizes:
        """The sizes for the next transition, given this one's acceptance probabilities ``[*N]``."""
        a = accept_prob.double()
        acc = (1 - self.smoothing) * self.acceptance + self.smoothing * a
        size = self.size
        if self.adapt:
            up = (acc > self.target_acceptance).to(size.dtype)
            size = (size * (1 + self.rate) ** (2 * up - 1)).clamp(*self.bounds)
        return replace(self, size=size, acceptance=acc, count=self.count + 1, accepted=self.accepted + a)

    def mean_acceptance(self) -> Tensor:
        """Average acceptance probability per chain over the transitions made, ``[*N]``."""
        return self.accepted / max(self.count, 1)


def hmc_step(point: Point, target: Target, steps: StepSizes, leapfrog: int,
             generator: torch.Generator | None = None) -> tuple[Point, StepSizes]:
    """One HMC transition per chain: fresh N(0, I) momenta, ``leapfrog`` steps, then a
    Metropolis accept/reject on the Hamiltonian. Costs ``leapfrog`` target evaluations.

    A proposal whose log density or gradient is not finite is rejected (the leapfrog
    left the region where the model is evaluable), which keeps the kernel valid.
    """
    if leapfrog < 1:
        raise ValueError(f"leapfrog must be >= 1, got {leapfrog}")
    eps = steps.size.unsqueeze(-1).to(point.z.dtype)
    v0 = torch.randn(point.z.shape, generator=generator, dtype=point.z.dtype, device=point.z.device)
    v = v0 + 0.5 * eps * point.grad
    new = point
    for i in range(leapfrog):
        z = new.z + eps * v
        new = target(z)
        v = v + (eps if i < leapfrog - 1 else 0.5 * eps) * new.grad
    h0 = -point.log_f.double() + 0.5 * v0.double().pow(2).sum(-1)
    h1 = -new.log_f.double() + 0.5 * v.double().pow(2).sum(-1)
    log_accept = (h0 - h1).clamp(max=0.0)
    finite = torch.isfinite(h1) & torch.isfinite(new.grad).all(-1)
    log_accept = torch.where(finite, log_accept, torch.full_like(log_accept, -torch.inf))
    u = torch.rand(log_accept.shape, generator=generator, dtype=torch.float64, device=log_accept.device)
    accept = torch.log(u) < log_accept
    return new.where(accept, point), steps.update(log_accept.exp())

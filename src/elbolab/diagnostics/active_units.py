"""Active units (Burda et al. 2016): A_u = Cov_x(E_q(u|x)[u]) > threshold (0.01)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ActiveUnits:
    #: per stochastic layer (bottom first): [D_l] variance over x of the posterior mean
    activity: list[Tensor]
    threshold: float

    @property
    def counts(self) -> list[int]:
        return [int((a > self.threshold).sum()) for a in self.activity]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __str__(self) -> str:
        """Like the IWAE paper: "19" or "26+7"."""
        return "+".join(str(c) for c in self.counts)

    def to_dict(self) -> dict:
        return {
            "counts": self.counts,
            "total": self.total,
            "threshold": self.threshold,
            "activity": [a.tolist() for a in self.activity],
        }


@torch.no_grad()
def active_units(model, data: Tensor, threshold: float = 0.01, batch_size: int = 1000) -> ActiveUnits:
    """Variance over the data set of E_q[z_l | x], per latent dimension and layer.

    Uses the model's ``posterior_means`` (exact Gaussian means, no sampling). The
    variance is accumulated in float64 with a two-pass-free sum of squares.
    """
    device = next(iter(model.parameters())).device
    sums: list[Tensor] | None = None
    sq: list[Tensor] = []
    n = 0
    for start in range(0, data.shape[0], batch_size):
        means = [m.double() for m in model.posterior_means(data[start : start + batch_size].to(device))]
        if sums is None:
            sums = [torch.zeros(m.shape[-1], dtype=torch.float64, device=device) for m in means]
            sq = [torch.zeros_like(s) for s in sums]
        for i, m in enumerate(means):
            sums[i] += m.sum(0)
            sq[i] += m.pow(2).sum(0)
        n += means[0].shape[0]
    assert sums is not None
    activity = [((q - s * s / n) / max(n - 1, 1)).clamp_min(0).cpu() for s, q in zip(sums, sq, strict=True)]
    return ActiveUnits(activity, threshold)

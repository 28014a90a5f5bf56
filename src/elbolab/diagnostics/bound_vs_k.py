"""L_k against k from one set of importance samples (how fast the bound closes on log p(x)).

For each point, ``k_max`` log weights are drawn once; for each k they are split into
``k_max // k`` disjoint groups of k. Each group's log-mean-exp is an unbiased estimate of
E[L_k], so their average is too, with a Monte Carlo variance read off the spread
between groups. With one set of samples the curve is paired: every L_k comes from the
same draws, so differences between k are far more precise than each value alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..evaluation import (
    LikelihoodResult,
    batches,
    check_inputs,
    eval_mode,
    log_weight_chunks,
    model_device,
    progress_bar,
    seeded,
)
from ..models.base import HasLogWeights

#: the IWAE paper's k grid, extended to the usual 5000-sample log-likelihood
DEFAULT_KS: tuple[int, ...] = (1, 2, 5, 10, 50, 100, 500, 1000, 5000)


@dataclass
class BoundVsK:
    ks: tuple[int, ...]
    #: [N, len(ks)] float64: per point, the average of L_k over its groups (nats)
    per_point: Tensor
    #: [N, len(ks)] float64: per point, Monte Carlo variance of that average (nan with one group)
    mc_var: Tensor
    #: groups per k (k_max // k)
    groups: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.per_point.shape[0]

    def mean(self) -> list[float]:
        """Mean L_k over the points, nats."""
        return self.per_point.mean(0).tolist()

    def stderr(self) -> list[float]:
        """Standard error of the mean over points (test-set sampling plus Monte Carlo)."""
        if self.n < 2:
            return [math.nan] * len(self.ks)
        return (self.per_point.std(0, unbiased=True) / math.sqrt(self.n)).tolist()

    def mc_stderr(self) -> list[float]:
        """Monte Carlo part alone: sqrt(sum_n var_n) / N; nan where k has one group."""
        return (self.mc_var.sum(0).sqrt() / self.n).tolist()

    def gap_to_largest(self) -> tuple[list[float], list[float]]:
        """L_k - L_kmax and its paired standard error over points, nats."""
        diff = self.per_point - self.per_point[:, -1:]
        se = diff.std(0, unbiased=True) / math.sqrt(self.n) if self.n > 1 else torch.full_like(diff[0], math.nan)
        return diff.mean(0).tolist(), se.tolist()

    def log_likelihood(self) -> LikelihoodResult:
        """The k_max column as an importance-sampled log-likelihood (it used all k_max samples)."""
        return LikelihoodResult(self.per_point[:, -1].clone(), self.ks[-1])

    def to_dict(self) -> dict:
        gap, gap_se = self.gap_to_largest()
        return {
            "n": self.n,
            "k": list(self.ks),
            "groups": list(self.groups),
            "mean": self.mean(),
            "stderr": self.stderr(),
            "mc_stderr": self.mc_stderr(),
            "gap_to_largest": gap,
            "gap_stderr": gap_se,
        }

    def table(self) -> str:
        """Markdown table, nats."""
        d = self.to_dict()
        rows = [f"| k | groups | L_k (nats) | ± stderr | ± MC stderr | L_k − L_{self.ks[-1]} (nats) |",
                "|---:|---:|---:|---:|---:|---:|"]
        for i, k in enumerate(self.ks):
            mc = d["mc_stderr"][i]
            rows.append(
                f"| {k} | {d['groups'][i]} | {d['mean'][i]:.2f} | {d['stderr'][i]:.2f} | "
                f"{'—' if math.isnan(mc) else f'{mc:.3f}'} | {d['gap_to_largest'][i]:.2f} ± {d['gap_stderr'][i]:.2f} |"
            )
        return "\n".join(rows)


def group_bounds(log_w: Tensor, k: int) -> Tensor:
    """``[K, B] -> [K // k, B]``: L_k of each disjoint group of k consecutive samples."""
    g = log_w.shape[0] // k
    if g < 1:
        raise ValueError(f"k={k} needs at least k samples, got {log_w.shape[0]}")
    return torch.logsumexp(log_w[: g * k].reshape(g, k, -1), dim=1) - math.log(k)


@torch.inference_mode()
def bound_vs_k(
    model: HasLogWeights,
    data: Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    batch_size: int = 100,
    chunk_size: int = 500,
    seed: int | None = 0,
    progress: str | None = None,
) -> BoundVsK:
    """L_k for every k in ``ks`` from one draw of ``max(ks)`` samples per point.

    Memory: the model's activations for ``batch_size * chunk_size`` samples (as in
    :func:`log_likelihood`) plus ``batch_size * max(ks)`` float64 log weights (4 MB at
    100 x 5000). Costs the same as one ``log_likelihood`` at k = max(ks).
    """
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    k_max = ks[-1]
    check_inputs(data, k_max, batch_size, chunk_size)
    device = model_device(model)
    n = data.shape[0]
    per_point = torch.empty(n, len(ks), dtype=torch.float64)
    mc_var = torch.empty(n, len(ks), dtype=torch.float64)
    with seeded(seed, device), eval_mode(model), progress_bar(n, progress) as bar:
        for sl in batches(n, batch_size):
            x = data[sl].to(device)
            log_w = torch.cat(list(log_weight_chunks(model, x, k_max, chunk_size)))  # [k_max, B]
            for i, k in enumerate(ks):
                g = group_bounds(log_w, k)  # [G, B]
                per_point[sl, i] = g.mean(0).cpu()
                mc_var[sl, i] = (g.var(0, unbiased=True) / g.shape[0]).cpu() if g.shape[0] > 1 else math.nan
            bar.update(x.shape[0])
    return BoundVsK(ks, per_point, mc_var, tuple(k_max // k for k in ks))

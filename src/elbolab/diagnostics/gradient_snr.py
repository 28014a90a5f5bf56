"""Gradient signal-to-noise ratio: |E[g]| / std[g] per parameter over repeated draws.

Rainforth et al. (2018) show that the encoder's SNR under the standard IWAE gradient
falls like 1/sqrt(k) as the bound tightens; DReG (Tucker et al. 2018) does not. This
module measures it on a fixed batch: the same data, fresh samples z for every draw,
the gradient of the objective's loss (a batch mean) taken each time. Parameters are
split by the model's :meth:`~elbolab.models.base.LatentVariableModel.encoder_parameters`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import ObjectiveConfig
from ..evaluation import model_device, seeded
from ..models.base import LatentVariableModel
from ..objectives import make_objective
from ..progress import Progress

GROUPS = ("encoder", "decoder")


@dataclass
class GradientSNR:
    objective: str
    estimator: str
    k: int
    n_draws: int
    #: group -> [P] mean of each gradient element over the draws (float64)
    mean: dict[str, Tensor]
    #: group -> [P] standard deviation over the draws (unbiased, float64)
    std: dict[str, Tensor]

    def snr(self, group: str) -> Tensor:
        """[P] |mean| / std per element: inf where std is 0 and the mean is not, nan where both are."""
        return self.mean[group].abs() / self.std[group]

    def summary(self, group: str) -> float:
        """Mean over elements of the per-element SNR, leaving out elements whose gradient is
        identically zero (no signal, no noise); nan when every element is such."""
        s = self.snr(group)
        s = s[~torch.isnan(s)]
        return float(s.mean()) if s.numel() else math.nan

    def group_snr(self, group: str) -> float:
        """One number for the whole group: ||E[g]|| / sqrt(E||g - E[g]||^2).

        ||mean||^2 is corrected for its sampling bias (trace of the covariance / n_draws),
        so elements with no signal do not add a noise floor of ~1/sqrt(n_draws) as they
        do to the per-element :meth:`summary`.
        """
        var = self.std[group].pow(2).sum()
        signal = self.mean[group].pow(2).sum() - var / self.n_draws
        if var == 0:
            return math.inf if float(signal) > 0 else math.nan
        return float(signal.clamp_min(0).sqrt() / var.sqrt())

    def max_std(self, group: str) -> float:
        return float(self.std[group].max()) if self.std[group].numel() else 0.0

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "estimator": self.estimator,
            "k": self.k,
            "n_draws": self.n_draws,
            "snr": {g: self.summary(g) for g in self.mean},
            "group_snr": {g: self.group_snr(g) for g in self.mean},
            "max_std": {g: self.max_std(g) for g in self.mean},
        }


def _flat_grads(params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double() for p in params
    ]) if params else torch.zeros(0, dtype=torch.float64)


def gradient_snr(
    model: LatentVariableModel,
    data: Tensor,
    k: int,
    estimator: str = "standard",
    n_draws: int = 100,
    objective: str = "iwae",
    m: int = 1,
    beta: float = 0.5,
    seed: int | None = 0,
    bar: Progress | None = None,
) -> GradientSNR:
    """Per-group gradient SNR of ``objective`` (a name from OBJECTIVES) at k on the batch ``data``.

    Each of the ``n_draws`` draws takes fresh samples on the same batch; mean and variance
    are accumulated (Welford, float64), so memory is two parameter vectors per group.
    The model's gradients are left cleared; the caller's RNG stream is not disturbed.
    ``bar`` counts the samples drawn (k per draw).
    """
    if n_draws < 2:
        raise ValueError(f"n_draws must be >= 2 to estimate a standard deviation, got {n_draws}")
    cfg = ObjectiveConfig(name=objective, k=k, estimator=estimator, m=m, beta=beta)
    cfg.validate("objective")
    step = make_objective(cfg)
    params = {"encoder": model.encoder_parameters(), "decoder": model.decoder_parameters()}
    device = model_device(model)
    x = data.to(device)
    mean = {g: torch.zeros(0, dtype=torch.float64) for g in GROUPS}
    m2 = dict(mean)
    with seeded(seed, device):
        for i in range(n_draws):
            model.zero_grad(set_to_none=True)
            step(model, x, 1.0).loss.backward()
            for g in GROUPS:
                flat = _flat_grads(params[g]).cpu()
                if i == 0:
                    mean[g], m2[g] = flat.clone(), torch.zeros_like(flat)
                    continue
                delta = flat - mean[g]
                mean[g] += delta / (i + 1)
                m2[g] += delta * (flat - mean[g])
            if bar is not None:
                bar.update(k)
    model.zero_grad(set_to_none=True)
    std = {g: (m2[g] / (n_draws - 1)).sqrt() for g in GROUPS}
    return GradientSNR(objective, estimator, k, n_draws, mean, std)


def snr_sweep(
    model: LatentVariableModel,
    data: Tensor,
    ks: Sequence[int],
    estimators: Sequence[str] = ("standard", "stl", "dreg"),
    n_draws: int = 100,
    objective: str = "iwae",
    seed: int | None = 0,
    progress: bool = True,
) -> list[GradientSNR]:
    """:func:`gradient_snr` for every (estimator, k); ``progress`` counts the samples drawn
    (:class:`~elbolab.progress.Progress`: a bar, or a line every few seconds in a log)."""
    total = len(estimators) * sum(ks) * n_draws
    with Progress(total, "gradient SNR", "samples", enabled=progress) as bar:
        out = []
        for est in estimators:
            for k in ks:
                bar.set_postfix(estimator=est, k=k)
                out.append(gradient_snr(model, data, k, est, n_draws, objective, seed=seed, bar=bar))
        return out


def log_log_slope(results: Sequence[GradientSNR], group: str = "encoder", whole_group: bool = False) -> float:
    """Least-squares slope of log SNR against log k (one estimator's results): -0.5 is 1/sqrt(k).

    Fits the mean per-element SNR, or :meth:`GradientSNR.group_snr` with ``whole_group``.
    """
    ks = np.array([r.k for r in results], dtype=float)
    snr = np.array([r.group_snr(group) if whole_group else r.summary(group) for r in results], dtype=float)
    if len(ks) < 2 or not np.all(np.isfinite(snr) & (snr > 0)):
        raise ValueError(f"need at least two finite, positive SNR values to fit a slope, got {snr.tolist()}")
    return float(np.polyfit(np.log(ks), np.log(snr), 1)[0])


def format_snr_table(results: Sequence[GradientSNR], batch: int) -> str:
    """One aligned line per (estimator, k): SNR as the mean over elements and for the whole group."""
    if not results:
        return "no results"
    r0 = results[0]
    head = ("estimator", "k", "encoder SNR", "encoder group SNR", "decoder SNR", "decoder group SNR")
    rows = [head] + [(r.estimator, str(r.k), *(f"{v:.3f}" for g in GROUPS for v in (r.summary(g), r.group_snr(g))))
                     for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"gradient SNR of the {r0.objective} objective on a fixed batch of {batch} images, {r0.n_draws} draws "
             "each (SNR: |mean| / std of each gradient element, averaged; group: ||mean|| / sqrt(total variance))"]
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                 strict=True))))
        if n == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    return "\n".join(lines)


#: estimators that differ only in the encoder's gradient: from the same draws their decoder
#: gradients are equal, so their decoder lines are drawn over each other
SAME_DECODER_GRADIENT = {"standard", "stl", "dreg"}
DECODER_NOTE = "standard, stl and dreg give the same decoder gradient:\ntheir lines coincide (drawn over each other)"


def snr_figure(results: Sequence[GradientSNR], title: str | None = None):
    """Log-log SNR against k, one colour per estimator, one panel per parameter group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    estimators = list(dict.fromkeys(r.estimator for r in results))
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(5 * len(GROUPS), 4.0), squeeze=False)
    for ax, group in zip(axes[0], GROUPS, strict=True):
        for i, est in enumerate(estimators):
            rows = sorted((r for r in results if r.estimator == est), key=lambda r: r.k)
            ks = [r.k for r in rows]
            ax.plot(ks, [r.summary(group) for r in rows], marker="o", color=f"C{i}", label=est)
            ax.plot(ks, [r.group_snr(group) for r in rows], marker="s", ls="--", color=f"C{i}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (samples per data point)")
        ax.set_ylabel("gradient SNR")
        ax.set_title(f"{group} parameters")
        ax.grid(True, which="both", alpha=0.3)
        styles = [Line2D([], [], color="grey", marker="o", label="mean over elements"),
                  Line2D([], [], color="grey", marker="s", ls="--", label="whole group")]
        handles = [Line2D([], [], color=f"C{i}", label=est) for i, est in enumerate(estimators)] + styles
        ax.legend(handles=handles, fontsize=8, title="estimator / SNR", title_fontsize=8)
        if group == "decoder" and len(set(estimators) & SAME_DECODER_GRADIENT) > 1:
            ax.text(0.02, 0.02, DECODER_NOTE, transform=ax.transAxes, fontsize=7, va="bottom", ha="left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_snr_vs_k(results: Sequence[GradientSNR], path: str | Path, title: str | None = None) -> Path:
    """:func:`snr_figure` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = snr_figure(results, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

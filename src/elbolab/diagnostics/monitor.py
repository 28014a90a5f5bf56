"""Live collapse monitoring: per-unit KL, active units and I(x; z) on a fixed subsample.

Posterior collapse shows as units whose q(z_u|x) no longer depends on x: their KL to the
prior falls to ~0, their activity Cov_x(E_q[z_u|x]) falls below the threshold, and the
mutual information between the data index and z falls. The trainer (training/, a layer
below) calls a :class:`CollapseMonitor` every ``train.monitor_every`` epochs and adds its
numbers to that epoch's row of metrics.jsonl (and TensorBoard / W&B); the entry points
build it with :meth:`CollapseMonitor.for_run`. Every estimator here runs seeded and in
eval mode, restoring the caller's RNG and the model's mode, so training is unchanged.

The numbers refer to the stochastic layer that q(z|x) samples first when that layer
carries the prior (one-layer models, the VampPrior paper's hierarchical model); for a
model whose first-sampled layer has a conditional prior (the IWAE paper's two-layer
model) only active units per layer are logged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import RunConfig
from ..data import ImageDataset, evaluation_images
from ..devices import resolve_device
from ..evaluation import batches, eval_mode, model_device, seeded
from ..models.base import LatentVariableModel, NoPosterior
from ..priors import GaussianMixturePrior, StandardNormal
from .active_units import active_units
from .surgery import mutual_information_terms

log = logging.getLogger("elbolab")

#: draws z ~ q(z|x) per point for I(x; z) (each scored against all N posteriors: cheap)
MI_SAMPLES = 4
#: draws per point for the per-unit KL under a mixture prior (each against every component:
#: the costly term, so one; averaged over the N points)
KL_SAMPLES = 1
#: draws of the first-sampled layer per point for the active units of the layers above it
#: (diagnostics.active_units uses 64; the estimate stays unbiased, its MC error is in the doc)
AU_SAMPLES = 16


def carries_prior(model: Any) -> bool:
    """Whether ``model.posterior(x)`` is the Gaussian of the layer the prior is on: one
    stochastic layer, or a model whose first-sampled layer is its top one (it does not
    override :meth:`~elbolab.models.base.LatentVariableModel.top_posterior`)."""
    dims = getattr(model, "latent_dims", None)
    if dims is None or not hasattr(model, "posterior") or not hasattr(model, "prior"):
        return False
    if getattr(model, "implicit_posterior", False):  # posterior(x) stands in for q's moments only (models.avb)
        return False
    if len(dims) == 1:
        return True
    return isinstance(model, LatentVariableModel) and type(model).top_posterior is LatentVariableModel.top_posterior


def _encode(model: Any, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Posterior means and log-variances of every row of ``x``, ``[N, D]`` float64 each."""
    means, log_vars = [], []
    for sl in batches(x.shape[0], batch_size):
        q = model.posterior(x[sl])
        means.append(q.mean.double())
        log_vars.append(q.log_var.double())
    return torch.cat(means), torch.cat(log_vars)


@torch.no_grad()
def per_unit_kl(prior: Any, mean: Tensor, log_var: Tensor, samples: int = KL_SAMPLES) -> Tensor | None:
    """``[D]``: the average over points of KL(q(z_u|x) || p(z_u)), p(z_u) the prior's marginal of unit u.

    ``mean``, ``log_var``: ``[N, D]`` posterior parameters. Closed form under a standard
    normal prior (the units' KLs then sum to the KL); Monte Carlo with ``samples`` draws per
    point under a mixture of diagonal Gaussians (MoG, VampPrior), whose marginal per unit is
    a 1-D mixture (the units' KLs then need not sum to the KL). None for other priors.
    """
    if isinstance(prior, StandardNormal):
        return (0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var)).mean(0)
    if not isinstance(prior, GaussianMixturePrior):
        return None
    comp, log_w = prior.components()
    c_mean, c_log_var, log_w = comp.mean.double(), comp.log_var.double(), log_w.double()  # [C, D], [C]
    total = torch.zeros(mean.shape[1], dtype=torch.float64, device=mean.device)
    for sl in batches(mean.shape[0], max(1, (1 << 22) // (samples * c_mean.numel()))):
        m, lv = mean[sl], log_var[sl]
        z = m + (0.5 * lv).exp() * torch.randn((samples, *m.shape), dtype=m.dtype, device=m.device)  # [S, B, D]
        log_q = -0.5 * (math.log(2 * math.pi) + lv + (z - m).pow(2) / lv.exp())
        zc = z.unsqueeze(-2)  # [S, B, 1, D] against [C, D]
        log_pc = -0.5 * (math.log(2 * math.pi) + c_log_var + (zc - c_mean).pow(2) / c_log_var.exp())
        log_p = torch.logsumexp(log_pc + log_w[:, None], dim=-2)  # [S, B, D]
        total += (log_q - log_p).sum((0, 1)) / samples
    return total / mean.shape[0]


@torch.no_grad()
def mutual_information(mean: Tensor, log_var: Tensor, samples: int = MI_SAMPLES) -> tuple[float, float]:
    """I[i; z] of ELBO surgery over the N points (diagnostics.surgery), and its standard error.

    ``samples`` draws z ~ q(z|x_i) per point, each scored against all N components of the
    aggregate posterior; 0 <= I <= log N.
    """
    z = mean + (0.5 * log_var).exp() * torch.randn((samples, *mean.shape), dtype=mean.dtype, device=mean.device)
    log_q_cond, log_q_agg = mutual_information_terms(z, mean, log_var)
    terms = (log_q_cond - log_q_agg).reshape(-1)
    se = float(terms.std(unbiased=True) / math.sqrt(terms.numel())) if terms.numel() > 1 else math.nan
    return float(terms.mean()), se


@torch.no_grad()  # not inference_mode: a tensor a module caches here may meet autograd in training
def collapse_metrics(model: Any, x: Tensor, threshold: float = 0.01, batch_size: int = 100,
                     seed: int | None = 0) -> dict[str, Any]:
    """Active units, per-unit KL and I(x; z) of ``model`` on ``x`` ``[N, D]`` (see the module doc).

    Keys: ``active_units`` (total), ``active_units_per_layer`` (bottom first) and, where the
    first-sampled layer carries the prior, ``kl_per_unit`` ``[D]`` (nats, rounded to 1e-6; None under a prior
    with no per-unit marginal), ``mutual_information`` and its ``_stderr`` (nats), ``monitor_points``.
    """
    device = model_device(model)
    x = x.to(device)
    out: dict[str, Any] = {"monitor_points": int(x.shape[0])}
    try:
        au = active_units(model, x, threshold=threshold, batch_size=batch_size, samples=AU_SAMPLES, seed=seed)
    except NoPosterior:
        return out
    out["active_units"] = au.total
    out["active_units_per_layer"] = au.counts
    if not carries_prior(model):
        return out
    with seeded(seed, device), eval_mode(model):
        mean, log_var = _encode(model, x, batch_size)
        kl = per_unit_kl(model.prior, mean, log_var)
        mi, mi_se = mutual_information(mean, log_var)
    out["kl_per_unit"] = None if kl is None else [round(v, 6) for v in kl.tolist()]
    out["mutual_information"] = mi
    out["mutual_information_stderr"] = mi_se
    return out


@dataclass
class CollapseMonitor:
    """What the trainer calls every ``every`` epochs (training.EpochMonitor)."""

    #: ``[N, D]`` the fixed subsample, on the model's device
    x: Tensor
    every: int
    threshold: float = 0.01
    seed: int = 1
    #: the split the subsample comes from
    split: str = "valid"
    #: the images' shape, for the figures a sink shows (:meth:`images`); None: no image figures
    image_shape: tuple[int, ...] | None = None

    @classmethod
    def for_run(cls, cfg: RunConfig, dataset: ImageDataset, device: torch.device | str = "cpu"
                ) -> CollapseMonitor | None:
        """``train.monitor_points`` images drawn once (seeded) from the validation split, else
        the training split, binarized as evaluation binarizes them; None when monitoring is off."""
        t = cfg.train
        if not t.monitor_every:
            return None
        split = "valid" if "valid" in dataset.splits else "train"
        x = evaluation_images(dataset, split, cfg.data.binarization, cfg.data.binarization_seed)
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg.eval.seed))
        x = x[keep[: t.monitor_points].sort().values]
        return cls(x.to(device), t.monitor_every, cfg.eval.active_unit_threshold, cfg.eval.seed, split,
                   tuple(dataset.image_shape))

    def __call__(self, model: LatentVariableModel) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = collapse_metrics(model, self.x, self.threshold, seed=self.seed)
        row["monitor_seconds"] = round(time.perf_counter() - t0, 3)
        return row


    def images(self, model: LatentVariableModel, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """The figures ``elbolab diagnose`` draws, as ``[H, W, 3]`` RGB arrays in [0, 1] for an image
        sink (TensorBoard): samples, reconstructions of the subsample, the monitor's numbers so far
        (``rows``: metrics.jsonl's, this epoch's last) and a mixture prior's components (VampPrior:
        the pseudo-inputs). Seeded, and every RNG is left as it was (see training.EpochMonitor)."""
        out: dict[str, np.ndarray] = {}
        try:
            self._draw(model, rows, out)
        except Exception as e:  # noqa: BLE001 - a figure must not cost the run (metrics.jsonl has the numbers)
            log.warning("monitor figures for TensorBoard failed (%s: %s); left out this epoch", type(e).__name__,
                        str(e)[:200])
        return out

    def _draw(self, model: LatentVariableModel, rows: list[dict[str, Any]], out: dict[str, np.ndarray]) -> None:
        import tempfile

        import matplotlib.image

        from . import plots
        from .prior_figures import component_grid

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            files: dict[str, Path | None] = {"monitor": plots.plot_monitor(rows, folder / "monitor.png")}
            shape = self.image_shape
            # a PixelCNN decoder draws autoregressively: too slow to repeat every monitored epoch
            exact = getattr(model, "exact_decode_mean", True)
            if shape and math.prod(shape) == self.x.shape[1] and hasattr(model, "sample") and exact:
                device = model_device(model)
                with torch.no_grad(), seeded(self.seed, device), eval_mode(model):
                    files["samples"] = plots.plot_images(model.sample(20).cpu(), shape, folder / "samples.png",
                                                         "samples from the model, z ~ p(z)")
                    x = self.x[:: max(1, self.x.shape[0] // 10)][:10]
                    files["reconstructions"] = plots.plot_reconstructions(
                        x.cpu(), model.reconstruct(x).cpu(), shape, folder / "reconstructions.png")
                    if isinstance(getattr(model, "prior", None), GaussianMixturePrior) and len(shape) == 2:
                        # a row per most-used component: its pseudo-input (VampPrior), then images drawn
                        # from it; tiled with numpy, as a grid of 100 matplotlib axes takes seconds
                        grid = component_grid(model, 10, 8, self.seed, "most-used", data=self.x)
                        tiles = plots.image_grid(grid.reshape(-1, grid.shape[-1]), shape, grid.shape[1])
                        out["prior_components"] = np.repeat(tiles[..., None], 3, axis=-1)
            for name, path in files.items():
                if path is not None:
                    out[name] = matplotlib.image.imread(str(path))[..., :3]


def run_monitor(cfg: RunConfig, dataset: ImageDataset) -> CollapseMonitor | None:
    """The monitor a run of ``cfg`` trains with, on its own device (None when monitoring is off)."""
    return CollapseMonitor.for_run(cfg, dataset, resolve_device(cfg.train.device))

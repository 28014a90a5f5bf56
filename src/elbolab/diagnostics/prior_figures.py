"""Figures of a mixture prior: each VampPrior pseudo-input beside images generated from it.

Row c shows pseudo-input u_c (VampPrior only, after its hardtanh), then images generated
from that component: z_top ~ q(z_top | u_c) (or the c-th Gaussian of a mixture of
Gaussians), the lower layers given z_top, then either the decoder's mean E[x | z]
(``images="mean"``) or a drawn image x ~ p(x | z) (``images="sample"``; autoregressive for a
PixelCNN decoder, whose mean has no closed form). Components are the first n, listed
indices, or the n "most used" by the data. Drawn with matplotlib's Agg backend, so it
works without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributions import log_normal_diag
from ..priors import GaussianMixturePrior, VampPriorBase

#: what a row of the grid shows after its pseudo-input
IMAGES = ("mean", "sample")
#: named ways to pick the components (besides a list of indices)
COMPONENTS = ("first", "most-used")


def _mixture(model) -> GaussianMixturePrior:
    prior = model.prior
    if not isinstance(prior, GaussianMixturePrior):
        raise ValueError(f"component figures need a mixture prior (mog, vampprior, vampprior-data), "
                         f"got {type(prior).__name__}")
    return prior


@torch.no_grad()
def component_usage(model, data: Tensor, batch_size: int = 500) -> Tensor:
    """``[C]``: each component's average responsibility for the data's posterior means
    E_q[z_top | x] (``model.top_posterior``), so it sums to one over the components."""
    prior = _mixture(model)
    comp, log_mix = prior.components()
    total = torch.zeros(log_mix.shape[0], dtype=torch.float64, device=log_mix.device)
    for start in range(0, data.shape[0], batch_size):
        z = model.top_posterior(data[start:start + batch_size]).mean  # [B, D]
        log_joint = log_mix + log_normal_diag(z.unsqueeze(1).double(), comp.mean.double(), comp.log_var.double())
        total += F.softmax(log_joint, dim=1).sum(0)
    return total / data.shape[0]


def choose_components(model, n: int, components: str | Sequence[int] = "first", data: Tensor | None = None
                      ) -> list[int]:
    """Indices of the components to draw: the first ``n``, the ``n`` most used by ``data``
    (:func:`component_usage`, most used first), or the listed ones."""
    c = _mixture(model).num_components
    if not isinstance(components, str):
        index = [int(i) for i in components]
        bad = [i for i in index if not 0 <= i < c]
        if bad:
            raise ValueError(f"components {bad} out of range: the prior has {c}")
        return index
    if components == "first":
        return list(range(min(n, c)))
    if components == "most-used":
        if data is None:
            raise ValueError("components='most-used' needs data to measure usage on")
        return component_usage(model, data).argsort(descending=True)[: min(n, c)].tolist()
    raise ValueError(f"components must be one of {', '.join(COMPONENTS)} or a list of indices, got {components!r}")


@torch.no_grad()
def component_grid(
    model,
    n_components: int = 10,
    samples_per: int = 8,
    seed: int = 0,
    components: str | Sequence[int] = "first",
    images: str = "mean",
    data: Tensor | None = None,
) -> Tensor:
    """``[n, columns, data_dim]`` images in [0, 1]: for each chosen component, its pseudo-input
    (VampPrior only) followed by ``samples_per`` generated images (see the module docstring)."""
    prior = _mixture(model)
    if images not in IMAGES:
        raise ValueError(f"images must be one of {', '.join(IMAGES)}, got {images!r}")
    index_list = choose_components(model, n_components, components, data)
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters())).device
        gen = torch.Generator(device=device).manual_seed(seed)
        index = torch.tensor(index_list, device=device, dtype=torch.long)
        z = model.latents_given_top(prior.sample_components(index.repeat_interleave(samples_per), gen), gen)
        drawn = model.decode_mean(z) if images == "mean" else model.decode_sample(z, gen)
        grid = drawn.reshape(len(index_list), samples_per, -1)
        if isinstance(prior, VampPriorBase):
            grid = torch.cat([prior.pseudo_inputs()[index].unsqueeze(1).to(grid.dtype), grid], dim=1)
        return grid.clamp(0, 1).cpu()
    finally:
        model.train(was_training)


def plot_components(
    model,
    image_shape: tuple[int, int],
    path: str | Path,
    n_components: int = 10,
    samples_per: int = 8,
    seed: int = 0,
    components: str | Sequence[int] = "first",
    images: str = "mean",
    data: Tensor | None = None,
) -> Path:
    """Save :func:`component_grid` as a PNG (one row per component, labelled with its index)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = choose_components(model, n_components, components, data)
    grid = component_grid(model, n_components, samples_per, seed, index, images)
    rows, cols = grid.shape[:2]
    has_pseudo = isinstance(model.prior, VampPriorBase)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(grid[r, c].reshape(image_shape).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(index[r]), fontsize=7)
            if has_pseudo and c == 0:
                for side in ax.spines.values():
                    side.set_edgecolor("tab:red")
                    side.set_linewidth(2)
    shown = "drawn images x ~ p(x | z)" if images == "sample" else "decoder means E[x | z]"
    if images == "mean" and not getattr(model, "exact_decode_mean", True):
        shown = "conditional means along autoregressive samples"
    chosen = {"first": "the first components", "most-used": "the components most used by the data"}.get(
        components, "chosen components") if isinstance(components, str) else "chosen components"
    title = (f"pseudo-inputs (red) and {shown}, z_top ~ q(z_top | u)" if has_pseudo
             else f"{shown} from each mixture component")
    fig.suptitle(f"{title}; {chosen} (index at left)", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path

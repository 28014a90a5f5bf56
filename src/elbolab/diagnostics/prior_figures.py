"""Figures of a mixture prior: each VampPrior pseudo-input beside images generated from it.

Row c shows pseudo-input u_c (VampPrior only), then decoder means of ancestral samples
that start from that component: z_top ~ q(z_top | u_c) (or the c-th Gaussian of a
mixture of Gaussians), then the lower layers given z_top. Drawn with matplotlib's Agg
backend, so it works without a display.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..priors import GaussianMixturePrior, VampPriorBase


@torch.no_grad()
def component_grid(model, n_components: int = 10, samples_per: int = 8, seed: int = 0) -> Tensor:
    """``[n, columns, data_dim]`` images in [0, 1]: for each of the first ``n`` components,
    its pseudo-input (VampPrior only) followed by ``samples_per`` generated mean images."""
    prior = model.prior
    if not isinstance(prior, GaussianMixturePrior):
        raise ValueError(f"component figures need a mixture prior (mog, vampprior, vampprior-data), "
                         f"got {type(prior).__name__}")
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters())).device
        gen = torch.Generator(device=device).manual_seed(seed)
        n = min(n_components, prior.num_components)
        index = torch.arange(n, device=device).repeat_interleave(samples_per)
        z_top = prior.sample_components(index, gen)
        images = model.decode_mean(model.latents_given_top(z_top, gen)).reshape(n, samples_per, -1)
        if isinstance(prior, VampPriorBase):
            images = torch.cat([prior.pseudo_inputs()[:n].unsqueeze(1).to(images.dtype), images], dim=1)
        return images.clamp(0, 1).cpu()
    finally:
        model.train(was_training)


def plot_components(
    model,
    image_shape: tuple[int, int],
    path: str | Path,
    n_components: int = 10,
    samples_per: int = 8,
    seed: int = 0,
) -> Path:
    """Save :func:`component_grid` as a PNG (one row per component); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = component_grid(model, n_components, samples_per, seed)
    rows, cols = grid.shape[:2]
    has_pseudo = isinstance(model.prior, VampPriorBase)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(grid[r, c].reshape(image_shape).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if has_pseudo and c == 0:
                for side in ax.spines.values():
                    side.set_edgecolor("tab:red")
                    side.set_linewidth(2)
    title = "pseudo-inputs (red) and samples from each" if has_pseudo else "samples from each mixture component"
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path

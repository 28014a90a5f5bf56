"""Extra figures of a reproduction: a row's or a table's ``figures`` in papers.yaml.

A row figure is drawn from the row's trained model after its evaluation and saved beside
the table as ``<row id>-<figure>.png``, so it is committed with table.md (the row folders
are not): ``fn(model, dataset, config, path) -> path``. A table figure is drawn from
several finished rows at the end of ``reproduce`` (``--table-only`` too) and saved as
``<figure>.png``: ``fn({row id: (model, dataset, config) or a reason it is missing}, path)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import RunConfig
from ..data import evaluation_images
from ..diagnostics.prior_figures import component_usage, plot_components
from ..evaluation import random_subset
from ..priors import VampPriorBase

#: components (rows) and images per component of the pseudo-input figure
PSEUDO_INPUT_ROWS, PSEUDO_INPUT_SAMPLES = 8, 8
#: test images whose posterior means rank the components by use
USAGE_IMAGES = 2000


def usage_images(model, dataset, cfg: RunConfig) -> Tensor:
    """The images that rank a model's components by use: ``USAGE_IMAGES`` test images chosen at
    random (seed 0), binarized as the row scores its test set, on the model's device."""
    x = evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed)
    return random_subset(x, USAGE_IMAGES).to(next(model.parameters()).device)


def pseudo_input_samples(model, dataset, cfg: RunConfig, path: Path) -> Path:
    """The VampPrior paper's figure for PixelHVAE: the most-used pseudo-inputs (after their
    hardtanh), each beside images drawn from its component, z2 ~ q(z2 | u) and then down
    the model (autoregressive samples for a PixelCNN decoder, else decoder means)."""
    x = usage_images(model, dataset, cfg)
    images = "mean" if getattr(model, "exact_decode_mean", True) else "sample"
    return plot_components(model, dataset.image_shape, path, PSEUDO_INPUT_ROWS, PSEUDO_INPUT_SAMPLES,
                           seed=cfg.eval.seed, components="most-used", images=images, data=x)


#: figure name (papers.yaml) -> fn(model, dataset, config, path) -> the PNG written
ROW_FIGURES: dict[str, Callable[[Any, Any, RunConfig, Path], Path]] = {
    "pseudo-input-samples": pseudo_input_samples,
}


# --- table figures: drawn from several finished rows ---------------------------------------

#: pseudo-inputs shown per dataset in the across-datasets figure
PSEUDO_INPUTS_PER_ROW = 10


@dataclass
class PseudoInputRow:
    """One line of the across-datasets figure: a row's most-used pseudo-inputs, or why it has none."""

    row: str
    dataset: str = ""
    image_shape: tuple[int, ...] = ()
    #: component indices, most used first, and each one's average responsibility
    components: list[int] | None = None
    usage: list[float] | None = None
    #: ``[n, *image_shape]`` pseudo-inputs in [0, 1] (after their hardtanh)
    images: Tensor | None = None
    #: why the row is not drawn (not finished, no VampPrior...); None when it is
    missing: str | None = None


@torch.no_grad()
def most_used_pseudo_inputs(model, data: Tensor, n: int) -> tuple[list[int], list[float], Tensor]:
    """The ``n`` pseudo-inputs of highest average responsibility for ``data``'s posterior means
    (:func:`component_usage`), most used first: (indices, usages, ``[n, data_dim]`` images)."""
    prior = model.prior
    if not isinstance(prior, VampPriorBase):
        raise ValueError(f"pseudo-inputs need a VampPrior, got {type(prior).__name__}")
    usage = component_usage(model, data)
    index = usage.argsort(descending=True)[: min(n, usage.shape[0])]
    images = prior.pseudo_inputs()[index].clamp(0, 1).float().cpu()
    return index.tolist(), usage[index].tolist(), images


def pseudo_input_rows(rows: dict[str, tuple[Any, Any, RunConfig] | str], n: int = PSEUDO_INPUTS_PER_ROW
                      ) -> list[PseudoInputRow]:
    """One :class:`PseudoInputRow` per listed row, in order: ranked on :func:`usage_images` (test
    images) and shaped as the row's dataset (Frey Faces 28 x 20); a row given as a string is
    missing for that reason."""
    out = []
    for row_id, loaded in rows.items():
        if isinstance(loaded, str):
            out.append(PseudoInputRow(row_id, missing=loaded))
            continue
        model, dataset, cfg = loaded
        if not isinstance(getattr(model, "prior", None), VampPriorBase):
            out.append(PseudoInputRow(row_id, dataset.name, missing="its prior has no pseudo-inputs"))
            continue
        index, usage, images = most_used_pseudo_inputs(model, usage_images(model, dataset, cfg), n)
        shape = tuple(dataset.image_shape)
        out.append(PseudoInputRow(row_id, dataset.name, shape, index, usage, images.reshape(len(index), *shape)))
    return out


def plot_pseudo_input_rows(lines: list[PseudoInputRow], path: Path) -> Path:
    """One line of images per row (its most-used pseudo-inputs, usage under each), a line of
    text for a missing row; each dataset at its own image shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max([len(r.components) for r in lines if r.components] or [1])
    fig, axes = plt.subplots(len(lines), cols, figsize=(cols * 0.95, len(lines) * 1.25 + 0.6), squeeze=False)
    for ax_row, line in zip(axes, lines, strict=True):
        for ax in ax_row:
            ax.axis("off")
        if line.images is None:
            ax_row[0].text(0.0, 0.5, f"{line.row}: {line.missing}", fontsize=8, va="center",
                           transform=ax_row[0].transAxes)
            continue
        for c, ax in enumerate(ax_row[: len(line.components or [])]):
            ax.imshow(line.images[c].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{100 * (line.usage or [])[c]:.1f}%", fontsize=6)
        ax_row[0].text(-0.1, 0.5, line.dataset, fontsize=7, rotation=90, ha="right", va="center",
                       transform=ax_row[0].transAxes)
    fig.suptitle(f"VampPrior: the {cols} most-used trained pseudo-inputs per dataset (most used first; "
                 f"above each: its average responsibility for the posterior means of {USAGE_IMAGES:,} test images, "
                 "or all when fewer)",
                 fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def pseudo_inputs_across_datasets(rows: dict[str, tuple[Any, Any, RunConfig] | str], path: Path) -> Path:
    """The VampPrior paper's "trained pseudo-inputs for different datasets", from finished rows."""
    return plot_pseudo_input_rows(pseudo_input_rows(rows), path)


#: table figure name (papers.yaml, a table's ``figures``: name -> row ids) -> fn(rows, path)
TABLE_FIGURES: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "pseudo-inputs": pseudo_inputs_across_datasets,
}

"""Extra figures a reproduction row can ask for: a row's ``figures`` in papers.yaml.

Each is drawn from the row's trained model after its evaluation and saved beside the
table as ``<row id>-<figure>.png``, so it is committed with table.md (the row folders are
not). A figure is ``fn(model, dataset, config, path) -> path``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..data import evaluation_images
from ..diagnostics.prior_figures import plot_components
from ..evaluation import random_subset

#: components (rows) and images per component of the pseudo-input figure
PSEUDO_INPUT_ROWS, PSEUDO_INPUT_SAMPLES = 8, 8
#: test images whose posterior means rank the components by use
USAGE_IMAGES = 2000


def pseudo_input_samples(model, dataset, cfg: RunConfig, path: Path) -> Path:
    """The VampPrior paper's figure for PixelHVAE: the most-used pseudo-inputs (after their
    hardtanh), each beside images drawn from its component, z2 ~ q(z2 | u) and then down
    the model (autoregressive samples for a PixelCNN decoder, else decoder means)."""
    x = evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed)
    x = random_subset(x, USAGE_IMAGES).to(next(model.parameters()).device)
    images = "mean" if getattr(model, "exact_decode_mean", True) else "sample"
    return plot_components(model, dataset.image_shape, path, PSEUDO_INPUT_ROWS, PSEUDO_INPUT_SAMPLES,
                           seed=cfg.eval.seed, components="most-used", images=images, data=x)


#: figure name (papers.yaml) -> fn(model, dataset, config, path) -> the PNG written
ROW_FIGURES: dict[str, Callable[[Any, Any, RunConfig, Path], Path]] = {
    "pseudo-input-samples": pseudo_input_samples,
}

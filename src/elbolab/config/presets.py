"""Named bundles of config overrides: the papers' setups (``--preset NAME``)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, did_you_mean
from .schema import RunConfig

#: Burda et al. (2016), section 5: MNIST binarized afresh each time an image is used, Adam
#: eps 1e-4, batch 20, 3^i-epoch passes with lr 1e-3 * 10^(-i/7)
_IWAE_PAPER: dict[str, Any] = {
    "train.batch_size": 20,
    "train.adam_eps": 1e-4,
    "train.adam_betas": [0.9, 0.999],
    "train.lr": 1e-3,
    "train.schedule": "iwae",
    "train.epochs": 3280,
    "data.name": "mnist",
    "data.binarization": "dynamic",
    # the batch-20 step without autograd's per-op overhead (elbolab.fused; docs/bench.md)
    "train.fused": "auto",
}

#: Named bundles of overrides. A paper's preset trains on the paper's dataset (its files
#: in --data-dir, `elbolab data download NAME`), never silently on the embedded subset.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "iwae-paper": _IWAE_PAPER,
    # the IWAE paper's second architecture: x -> 200-200 tanh -> z1 (100) -> 100-100 tanh -> z2 (50)
    "iwae-paper-two-layer": {
        **_IWAE_PAPER,
        "model.name": "two-layer",
        "model.two_layer.latent_dims": [100, 50],
        "model.two_layer.hidden1": [200, 200],
        "model.two_layer.hidden2": [100, 100],
    },
    # Tomczak & Welling (2018), section 5 and their code's defaults: static MNIST, the two-level
    # hierarchical VAE with a 500-pseudo-input VampPrior on z2, single-sample ELBO,
    # AdamNormGrad (their experiment.py; betas and eps left at Adam's defaults) lr 5e-4,
    # batch 100, KL warm-up over 100 epochs, early stopping after 50 epochs without a
    # better validation bound (not counted during warm-up), at most 2,000 epochs,
    # 5,000 importance samples
    "vampprior-paper": {
        "data.name": "binarized-mnist",
        "train.optimizer": "adamnormgrad",
        "train.adam_eps": 1e-8,
        "train.adam_betas": [0.9, 0.999],
        "train.lr": 5e-4,
        "train.batch_size": 100,
        "train.epochs": 2000,
        "train.early_stopping_patience": 50,
        "objective.name": "vae",
        "objective.k": 1,
        "objective.warmup_epochs": 100,
        "model.name": "hierarchical",
        "model.prior.name": "vampprior",
        "model.prior.components": 500,
        "eval.k_importance": 5000,
    },
}

#: VLAE (Chen et al. 2016; docs/priors.md): the vampprior-paper protocol with model vlae and its
#: autoregressive-flow prior, small evaluation chunks (a PixelCNN per importance sample)
PRESETS["vlae"] = {**PRESETS["vampprior-paper"], "model.name": "vlae", "model.prior.name": "af",
                   "eval.chunk_size": 20, "eval.gpu_chunk_size": 50}



def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}{did_you_mean(name, sorted(PRESETS))}")
    return RunConfig().with_overrides(dict(PRESETS[name]))

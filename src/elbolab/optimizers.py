"""The optimizer a training config asks for."""

from __future__ import annotations

import torch

from .config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the config's lr, betas and eps over every parameter of ``model``.

    Fused (one kernel for all parameters) where torch has it; the benchmark measures it.
    """
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            fused=torch.device(device).type in ("cpu", "cuda"))

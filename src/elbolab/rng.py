"""Every random stream a training run draws from, captured and restored as plain tensors.

A checkpoint holds these so that a resumed run continues the very same batches and
samples: torch's global generator (and CUDA's), the batch shuffler and the
dynamic-binarization generator. Training draws nothing from numpy's or Python's global
generators, so they are not stored: their state, seeded by no one, would only make two
identical runs' checkpoints differ.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("elbolab")


def capture(binarizer: torch.Generator, shuffle: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The state of every stream, as tensors and plain containers (``weights_only``-loadable)."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "batcher": binarizer.get_state(),
        # the binarization generator lives on the training device; its state fits only that kind
        "batcher_device": binarizer.device.type,
        "shuffle": shuffle.get_state(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore(rng: dict[str, Any], binarizer: torch.Generator, shuffle: torch.Generator, device: torch.device) -> None:
    """Put every stream back as :func:`capture` saw it.

    A binarization stream saved on another kind of device (a run moved between CPU and
    GPU) cannot continue here: it restarts from its seed, with a warning, and the run is
    then no longer bit-identical to an uninterrupted one.
    """
    torch.set_rng_state(rng["torch"])
    here = binarizer.device.type
    saved = rng.get("batcher_device")  # absent from checkpoints written before it was recorded
    refused = f"it was saved on {saved}" if saved not in (None, here) else None
    if refused is None:
        try:
            binarizer.set_state(rng["batcher"])
        except RuntimeError as e:  # an untagged state of the other device's size
            refused = " ".join(str(e).split())[:90]
    if refused:
        log.warning("the checkpoint's binarization stream cannot continue on %s (%s); it restarts from its "
                    "seed, so this run is no longer bit-identical to an uninterrupted one", here, refused)
    shuffle.set_state(rng["shuffle"])
    # numpy's and Python's states in older checkpoints are left alone: training draws from neither
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)

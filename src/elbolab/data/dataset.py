"""An image dataset held as one compact tensor per split, and the binarization transforms.

Images are stored flat, ``[N, D]`` uint8: 0/1 for binary data, 0..255 for grey levels
(or, for a model with its own likelihood trained by elbolab.train_model, the real values given).
Batches are slices of that tensor, so drawing a batch costs one index operation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class DataError(ValueError):
    """A dataset file is missing, corrupt or not what its format promises; names the file."""


@dataclass
class ImageDataset:
    name: str
    #: split name -> uint8 [N, D] (floats: real-valued data used as given, see :func:`to_unit_float`)
    splits: dict[str, Tensor]
    image_shape: tuple[int, ...]
    #: True when pixels are already {0, 1}; False for grey levels 0..255
    binary: bool
    labels: dict[str, Tensor] = field(default_factory=dict)
    #: where the data came from (files, checksums, notes)
    source: str = ""
    #: binarization picked by the name it was loaded under (``mnist-dynamic``); "none" otherwise
    default_binarization: str = "none"
    #: where the data came from, as run.json records it (``data.user.data_source``): a
    #: registered name, files with their SHA-256, or in-memory arrays with a checksum
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dim(self) -> int:
        n = 1
        for s in self.image_shape:
            n *= s
        return n

    def split(self, name: str) -> Tensor:
        if name not in self.splits:
            raise DataError(f"{self.name}: no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def counts(self) -> dict[str, int]:
        return {name: int(x.shape[0]) for name, x in self.splits.items()}

    def with_validation(self, n: int) -> ImageDataset:
        """The last ``n`` training images become the ``valid`` split (MNIST: 50,000 / 10,000,
        as in the VampPrior code); ``n = 0`` returns the dataset unchanged."""
        if n == 0:
            return self
        if "valid" in self.splits:
            raise DataError(f"{self.name}: has its own validation split; data.validation must be 0, got {n}")
        train = self.split("train")
        if not 0 < n < train.shape[0]:
            raise DataError(f"{self.name}: data.validation={n} must be between 1 and {train.shape[0] - 1}")
        splits = dict(self.splits, train=train[:-n], valid=train[-n:])
        labels = dict(self.labels)
        if "train" in labels:
            labels["train"], labels["valid"] = labels["train"][:-n], labels["train"][-n:]
        return replace(self, splits=splits, labels=labels)

    def as_float(self, name: str, binarization: str = "none", seed: int = 0) -> Tensor:
        """Float images in [0, 1] for evaluation; binary data is returned as is.

        Grey data with ``binarization`` static or dynamic gets one seeded Bernoulli draw
        (for evaluation a dynamic model is scored on a fixed draw, as in the IWAE paper).
        """
        x = to_unit_float(self.split(name), self.binary)
        if self.binary or binarization == "none":
            return x
        g = torch.Generator().manual_seed(seed)
        return torch.bernoulli(x, generator=g)


#: offset added to data.binarization_seed for the one fixed draw of each split that is scored
#: (grey-level data only): every command scores the same images, so their numbers compare
EVAL_DRAW_OFFSET = {"valid": 2, "test": 3, "train": 4}


def evaluation_images(dataset: ImageDataset, split: str, binarization: str, binarization_seed: int) -> Tensor:
    """The float images of ``split`` that training, evaluate, diagnose and reproduce all score.

    Under static binarization the training split is the one draw the model trained on (the
    Batcher's, seeded by ``binarization_seed``): a statically binarized training set is that
    draw, and scoring another would read a static model's fit to its own data as worse."""
    if binarization == "static" and split == "train":
        return dataset.as_float(split, binarization, binarization_seed)
    return dataset.as_float(split, binarization, binarization_seed + EVAL_DRAW_OFFSET.get(split, 3))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_unit_float(x: Tensor, binary: bool) -> Tensor:
    """Stored images as floats in [0, 1]. A split stored as floats already (the real-valued data
    elbolab.train_model takes, in its own dtype) is used as it is."""
    if x.is_floating_point():
        return x
    return x.float() if binary else x.float() / 255.0


class Batcher:
    """Turns stored uint8 images into float training batches.

    ``dynamic`` draws a fresh Bernoulli sample of the grey levels each time an image is
    used (with its own generator, so a resumed run draws the same bits); ``static`` uses
    one seeded draw made once; ``none`` feeds grey levels in [0, 1].
    """

    def __init__(self, data: Tensor, binary: bool, binarization: str, seed: int, device: torch.device) -> None:
        self.binary = binary
        self.binarization = "none" if binary or data.is_floating_point() else binarization
        self.device = device
        x = to_unit_float(data, binary)
        if self.binarization == "static":
            x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
        # keep uint8 on the device for dynamic (4x less memory), float otherwise
        self.data = (data if self.binarization == "dynamic" else x).to(device)
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)

    def __len__(self) -> int:
        return self.data.shape[0]

    def batch(self, index: Tensor) -> Tensor:
        x = self.data[index]
        if self.binarization == "dynamic":
            # Bernoulli(g / 255) as U < g / 255: the same law as torch.bernoulli, and faster on a CPU
            u = torch.rand(x.shape, generator=self.generator, device=x.device)
            return (u < x.float() / 255.0).float()
        return x

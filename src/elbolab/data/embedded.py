"""The dataset that ships inside the package, so the main job runs offline.

A random subset (fixed seed, never the head of a file) of Larochelle's statically
binarized MNIST: 10,000 train / 1,000 validation / 2,000 test, bit-packed. It is
rebuilt byte-for-byte by ``scripts/build_embedded_data.py``; MANIFEST.json records
the source files' SHA-256, the seed and each file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .dataset import DataError, ImageDataset
from .registry import DatasetSpec, register

EMBEDDED_DIR = Path(__file__).parent / "embedded"
SPLIT_SIZES = {"train": 10_000, "valid": 1_000, "test": 2_000}
SEED = 20_160_204  # Burda et al.'s IWAE appeared on arXiv in early February 2016


def pack(images: np.ndarray) -> np.ndarray:
    """[N, 784] 0/1 -> [N, 98] uint8 bits."""
    return np.packbits(images.astype(np.uint8), axis=1)


def unpack(packed: np.ndarray, width: int = 784) -> np.ndarray:
    return np.unpackbits(packed, axis=1)[:, :width]


def load_embedded(_data_dir: Path | None = None) -> ImageDataset:
    manifest_path = EMBEDDED_DIR / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{manifest_path}: embedded data manifest unreadable ({e}); reinstall elbolab") from None
    splits = {}
    for split, info in manifest["files"].items():
        path = EMBEDDED_DIR / info["file"]
        try:
            raw = path.read_bytes()
        except OSError:
            raise DataError(f"{path}: embedded data file missing; reinstall elbolab") from None
        digest = hashlib.sha256(raw).hexdigest()
        if digest != info["sha256"]:
            raise DataError(f"{path}: SHA-256 {digest[:12]}... does not match the manifest's {info['sha256'][:12]}...")
        arr = np.load(path, allow_pickle=False)
        splits[split] = torch.from_numpy(unpack(arr))
    return ImageDataset(
        name="binarized-mnist-embedded",
        splits=splits,
        image_shape=(28, 28),
        binary=True,
        source=f"subset of Larochelle's binarized MNIST, seed {manifest['seed']}; see {manifest_path}",
    )


register(
    DatasetSpec(
        name="binarized-mnist-embedded",
        description="10k/1k/2k random subset of static binarized MNIST, shipped in the package",
        loader=load_embedded,
        embedded=True,
        split_sizes=tuple(SPLIT_SIZES.items()),
    )
)

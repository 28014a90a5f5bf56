"""OMNIGLOT at 28x28: our own build from the raw 105x105 images, and Burda et al.'s chardata.mat.

``omniglot-28-elbolab`` (not the IWAE paper's file, whose downsampling is undocumented):

1. ink: the raw arrays are True for background, so strokes = ``~images`` (1 = ink);
2. downsample 105 -> 28 by exact area (box) averaging: output pixel i covers input
   rows [3.75 i, 3.75 (i + 1)), so each input pixel contributes the fraction of its area
   inside. With weights in quarters of a pixel every sum is an integer ``a`` in
   0..225 (``grey = a / 225``), exact in float32; stored as ``round(255 a / 225)``, so
   the usual dynamic binarization draws each pixel with probability = its ink fraction;
3. split by drawer slot: the 20 samples ``XXXX_YY.png`` of every character were drawn by
   20 different people; slots YY = 1..15 go to train and 16..20 to test, so both sets
   hold every character of all 50 alphabets (1,623 characters): 24,345 train and 8,115
   test images. Each split is ordered slot-major (all characters of slot 1, then of
   slot 2, ...), so ``data.validation=1623`` holds out one whole drawer slot.

Labels are the character index 0..1622 (background characters first, as in the files).
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import DataError
from .formats import mat_variable

RAW_SIDE, SIDE = 105, 28
N_SLOTS, TRAIN_SLOTS = 20, 15
#: bump when the build changes, so old caches are rebuilt
BUILD_VERSION = 1


def area_weights(n_in: int = RAW_SIDE, n_out: int = SIDE) -> np.ndarray:
    """[n_out, n_in] integer weights: 4 x the overlap of output cell i with input pixel j,
    in units where an output cell is ``n_in / n_out`` input pixels wide (needs 4 n_in / n_out integer)."""
    scale = 4 * n_in
    if scale % n_out:
        raise ValueError(f"{n_in} -> {n_out}: cell edges are not on quarter pixels")
    w = np.zeros((n_out, n_in), dtype=np.int64)
    edges = [i * scale // n_out for i in range(n_out + 1)]  # cell edges in quarter pixels
    for i in range(n_out):
        for j in range(n_in):
            w[i, j] = max(0, min(edges[i + 1], 4 * (j + 1)) - max(edges[i], 4 * j))
    return w


def downsample_ink_area(ink: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """bool [N, 105, 105] -> int32 [N, 28, 28] ink area in 1/16 pixel units, 0..225.

    ``W ink W^T`` with W = :func:`area_weights`. W is block diagonal (every 4 output
    cells span exactly 15 input pixels), so the product is done per 15x15 block with the
    4x15 block P: 7x fewer operations. All values are integers below 2^24, so the
    float32 products are exact and the result does not depend on the BLAS.
    """
    block = torch.from_numpy(area_weights(15, 4).astype(np.float32)).T  # [15, 4]
    n = ink.shape[0]
    out = np.empty((n, SIDE, SIDE), dtype=np.int32)
    for start in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(ink[start:start + chunk]).view(np.uint8)).to(torch.float32)
        b = x.shape[0]
        t = x.reshape(b, 7, 15, 7, 15) @ block  # [b, m, p, n, j]: columns reduced
        t = t.permute(0, 1, 3, 4, 2) @ block  # [b, m, n, j, i]: rows reduced
        out[start:start + chunk] = t.permute(0, 1, 4, 2, 3).reshape(b, SIDE, SIDE).round().to(torch.int32).numpy()
    return out


def area_to_grey(area: np.ndarray) -> np.ndarray:
    """Ink area 0..225 -> uint8 0..255, rounding half up exactly in integers."""
    return ((area.astype(np.int64) * 255 * 2 + 225) // (2 * 225)).astype(np.uint8)


def check_raw(images: np.ndarray, labels: np.ndarray, path) -> None:
    if images.dtype != np.bool_ or images.ndim != 4 or images.shape[1:] != (N_SLOTS, RAW_SIDE, RAW_SIDE):
        raise DataError(
            f"{path}: 'images' is {images.dtype} {images.shape}, expected bool (characters, 20, 105, 105)"
        )
    if labels.shape != images.shape[:2]:
        raise DataError(f"{path}: 'labels' is {labels.shape}, expected {images.shape[:2]}")


def build_omniglot_28(background: np.ndarray, evaluation: np.ndarray) -> dict[str, np.ndarray]:
    """Raw bool [C, 20, 105, 105] arrays (True = background) -> the splits, flat uint8 [N, 784]."""
    raw = np.concatenate([background, evaluation])  # [1623, 20, 105, 105]
    n_chars = raw.shape[0]
    grey = area_to_grey(downsample_ink_area(~raw.reshape(-1, RAW_SIDE, RAW_SIDE)))
    grey = grey.reshape(n_chars, N_SLOTS, SIDE * SIDE)
    chars = np.arange(n_chars, dtype=np.int64)
    out = {}
    for split, slots in (("train", range(TRAIN_SLOTS)), ("test", range(TRAIN_SLOTS, N_SLOTS))):
        out[split] = np.ascontiguousarray(grey[:, list(slots)].transpose(1, 0, 2).reshape(-1, SIDE * SIDE))
        out[f"{split}_labels"] = np.tile(chars, len(slots))
    return out


def chardata_images(mat: dict[str, np.ndarray], path, name: str) -> np.ndarray:
    """A chardata.mat variable [784, N] float in [0, 1], column-major 28x28 images -> uint8 [N, 784] row-major.

    Grey levels are stored as ``round(255 x)`` (the uint8 convention of every dataset here).
    """
    v = mat_variable(mat, path, name, (SIDE * SIDE, None), "fu")
    x = np.asarray(v, dtype=np.float64)
    if x.size and (x.min() < 0 or x.max() > (255 if v.dtype.kind == "u" else 1)):
        raise DataError(f"{path}: {name!r} values span [{x.min()}, {x.max()}], expected grey levels in [0, 1]")
    if v.dtype.kind == "f":
        x = np.rint(x * 255)
    # column j is one image whose 784 values run down the columns (MATLAB order)
    imgs = x.T.reshape(-1, SIDE, SIDE).transpose(0, 2, 1)
    return np.ascontiguousarray(imgs.reshape(-1, SIDE * SIDE).astype(np.uint8))


def chardata_labels(mat: dict[str, np.ndarray], name: str, n: int) -> np.ndarray | None:
    """Alphabet index from a one-hot [50, N] ``target`` variable, when present."""
    t = mat.get(name)
    if t is None or t.ndim != 2 or t.shape[1] != n:
        return None
    return np.argmax(t, axis=0).astype(np.int64)

"""Your own data: arrays, tensors, a ``torch.utils.data.Dataset`` or .npy/.npz files, as an ImageDataset.

Such data trains under the registered name ``user`` (``data.name: user`` in config.yaml),
and the run records where it came from (``run.json``'s ``data_source``):

- ``files``: the paths and SHA-256 of the .npy/.npz files; evaluate and diagnose reload
  them and refuse a file whose bytes changed;
- ``in-memory``: a SHA-256 per split of the stored images, "not reloadable: pass it
  again"; a later command given other data is told so.

Pixels are stored as elbolab stores every dataset, ``[N, D]`` uint8: 0/1 when every
value is 0 or 1, else grey levels 0..255 (floats in [0, 1] are rounded to the nearest
1/255, and the largest change is logged).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .dataset import DataError, ImageDataset, file_sha256
from .formats import IMAGE_KINDS, read_user_npy, read_user_npz
from .registry import DatasetSpec, register, resolve_name
from .sources import locate, path_problem

log = logging.getLogger("elbolab")

#: the dataset name of data passed in from Python (``data.name`` of such a run)
USER = "user"
SPLITS = ("train", "valid", "test")
#: file suffixes elbolab reads a user's arrays from (never pickles)
FILE_SUFFIXES = (".npy", ".npz")


def _not_reloadable(_data_dir: Path) -> ImageDataset:
    raise DataError("data.name=user: your own data is passed in, not loaded by name: "
                    "elbolab.train(data, ...), elbolab.evaluate(run, data) or --data-file FILE.npy")


register(DatasetSpec(
    USER, "your own data, passed in: arrays, tensors, a torch Dataset or .npy/.npz files "
    "(elbolab.train(data, ...); run.json records the files' SHA-256 or the arrays' checksum)",
    _not_reloadable, image_shape=(), binary=True))


# --- arrays to stored images -----------------------------------------------------------


def _as_tensor(data: Any, what: str) -> tuple[Tensor, Tensor | None]:
    """A tensor of images (and labels, when a torch Dataset yields (image, label) pairs)."""
    if isinstance(data, Tensor):
        return data.detach().cpu(), None
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject or data.dtype.kind not in IMAGE_KINDS or data.dtype.fields is not None:
            raise DataError(f"{what}: a numpy array of {data.dtype}; pass numbers ([N, D] or [N, H, W]): "
                            "bool, integers or floats")
        if data.dtype.kind == "u" and data.dtype.itemsize > 1:  # torch has few ops on uint16/32/64
            if data.size and int(data.max()) > 255:
                raise DataError(f"{what}: integer pixels must be 0..255 (or 0/1), found values up to {data.max()}")
            data = data.astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(data)), None
    if isinstance(data, torch.utils.data.Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(f"{what}: a torch Dataset without len(); pass a map-style Dataset or a tensor") from None
        if n == 0:
            raise DataError(f"{what}: the Dataset is empty")
        items = [data[i] for i in range(n)]
        pairs = isinstance(items[0], tuple | list)
        images = [torch.as_tensor(it[0] if pairs else it) for it in items]
        labels = torch.as_tensor([int(it[1]) for it in items]) if pairs and len(items[0]) > 1 else None
        return torch.stack(images).cpu(), labels
    raise DataError(f"{what}: expected a tensor, numpy array, torch Dataset or .npy/.npz path, "
                    f"got {type(data).__name__}")


_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def to_stored(x: Tensor, what: str) -> tuple[Tensor, tuple[int, ...], bool]:
    """Images ``[N, ...]`` -> (uint8 ``[N, D]``, image shape, binary).

    0/1 values are binary; integers 0..255 grey levels; floats in [0, 1] grey levels
    rounded to k/255. Anything else is refused, naming the range found.
    """
    if x.dim() < 2 or x.numel() == 0:
        raise DataError(f"{what}: expected [N, D], [N, H, W] or [N, C, H, W] images with at least one pixel, "
                        f"got shape {tuple(x.shape)}")
    if x.is_complex() or not (x.is_floating_point() or x.dtype in _INTEGER_DTYPES):
        raise DataError(f"{what}: a tensor of {x.dtype}; pass bool, integers 0..255 or floats in [0, 1]")
    image_shape = tuple(int(s) for s in x.shape[1:])
    if x.dim() == 4 and image_shape[0] == 1:
        image_shape = image_shape[1:]  # one channel: plots and pythae's input_dim read (H, W)
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype == torch.bool:
        return flat.to(torch.uint8), image_shape, True
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        raise DataError(f"{what}: holds NaN or infinite values")
    lo, hi = float(flat.min()), float(flat.max())
    if bool(((flat == 0) | (flat == 1)).all()):
        return flat.to(torch.uint8), image_shape, True
    if not flat.is_floating_point():
        if lo < 0 or hi > 255:
            raise DataError(f"{what}: integer pixels must be 0..255 (or 0/1), found {lo:g}..{hi:g}")
        return flat.to(torch.uint8), image_shape, False
    if lo < 0 or hi > 1:
        raise DataError(f"{what}: float pixels must lie in [0, 1] (grey) or be 0/1 (binary), found "
                        f"{lo:g}..{hi:g}; rescale them, or pass uint8 0..255")
    scaled = flat.double() * 255.0
    stored = scaled.round()
    change = float((scaled - stored).abs().max()) / 255.0
    if change > 1e-6:
        log.warning("%s: grey levels rounded to the nearest 1/255 (largest change %.2g)", what, change)
    return stored.to(torch.uint8), image_shape, False


def checksum(x: Tensor) -> str:
    """SHA-256 of a stored split: its shape, then its bytes (uint8 [N, D])."""
    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()


# --- files -----------------------------------------------------------------------------


def _file(path: str | Path) -> Path:
    """``path`` resolved, or one line saying why it is not a file (a symlink loop, a folder ...)."""
    path = Path(path).expanduser()
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: elbolab reads your data from .npy or .npz files (numpy.save / numpy.savez)")
    problem = path_problem(path)
    if problem:
        raise DataError(f"{path}: {'no such file' if problem == 'file not found' else problem}")
    return path.resolve()


def read_array_file(path: str | Path, split: str | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy array, or a .npz's arrays (all of them, or the one named ``split``); no pickles, and
    every header checked before an array is allocated (formats.npy_header)."""
    path = _file(path)
    if path.suffix == ".npy":
        return read_user_npy(path)
    arrays = read_user_npz(path)
    if split is None:
        return arrays
    if split not in arrays:
        raise DataError(f"{path}: no array {split!r} (it holds {sorted(arrays)})")
    return arrays[split]


def _file_splits(path: Path, require_train: bool = True) -> dict[str, np.ndarray]:
    """A .npy is the training split; a .npz holds arrays named train / valid / test."""
    found = read_array_file(path)
    if isinstance(found, np.ndarray):
        return {"train": found}
    unknown = sorted(set(found) - set(SPLITS) - {f"{s}_labels" for s in SPLITS})
    if (require_train and "train" not in found) or unknown or not set(found) & set(SPLITS):
        raise DataError(f"{path}: a .npz needs an array 'train' (and optionally 'valid', 'test', "
                        f"'<split>_labels'); it holds {sorted(found)}")
    return found


# --- the dataset ----------------------------------------------------------------------


def as_dataset(data: Any, valid: Any = None, test: Any = None, require_train: bool = True) -> ImageDataset:
    """Your data as an :class:`ImageDataset` named ``user``, with its origin recorded.

    ``data``: images ``[N, ...]`` (tensor, numpy array or torch Dataset) for training; a
    mapping of split name (train / valid / test) -> images; or a path to a .npy (the
    training images) or .npz (arrays train / valid / test). ``valid`` and ``test`` add
    splits (images or .npy paths). ``require_train=False`` (data to score, not to train
    on) accepts a mapping or .npz without a train split.
    """
    files: dict[str, dict[str, str]] = {}
    raw: dict[str, Any] = {}
    #: split -> what an error names: the file (and its array) it came from, else the split
    whats: dict[str, str] = {}
    labels: dict[str, Tensor] = {}
    if isinstance(data, str | Path):
        path = _file(data)
        arrays = _file_splits(path, require_train)
        for name, a in arrays.items():
            if name.endswith("_labels"):
                labels[name[: -len("_labels")]] = torch.from_numpy(a.astype(np.int64))
            else:
                raw[name] = a
                whats[name] = str(path) if path.suffix == ".npy" else f"{path}: array {name!r}"
                files[name] = {"path": str(path), "sha256": file_sha256(path)}
    elif isinstance(data, Mapping):
        unknown = sorted(set(data) - set(SPLITS))
        if (require_train and "train" not in data) or unknown or not data:
            raise DataError(f"data: a mapping needs 'train' (and optionally 'valid', 'test'); got {sorted(data)}")
        raw.update(data)
    else:
        raw["train"] = data
    for name, extra in (("valid", valid), ("test", test)):
        if extra is None:
            continue
        if name in raw:
            raise DataError(f"{name}: given twice (in data and as {name}=)")
        if isinstance(extra, str | Path):
            path = _file(extra)
            extra = read_array_file(path, name if path.suffix == ".npz" else None)
            whats[name] = str(path) if path.suffix == ".npy" else f"{path}: array {name!r}"
            files[name] = {"path": str(path), "sha256": file_sha256(path)}
        raw[name] = extra
    splits: dict[str, Tensor] = {}
    shapes, kinds = {}, {}
    for name in SPLITS:
        if name not in raw:
            continue
        what = whats.get(name, f"data {name!r}")
        x, y = _as_tensor(raw[name], what)
        splits[name], shapes[name], kinds[name] = to_stored(x, what)
        if y is not None:
            labels[name] = y
    if len(set(shapes.values())) > 1:
        raise DataError(f"data: the splits' image shapes differ: {shapes}")
    binary = all(kinds.values())
    if not binary and any(kinds.values()):
        log.info("data: some splits are 0/1 and some grey; all are treated as grey levels 0..255")
        splits = {n: (x * 255 if kinds[n] else x) for n, x in splits.items()}
    dataset = ImageDataset(USER, splits, next(iter(shapes.values())), binary, labels, source="your data, passed in")
    if files and set(files) == set(splits):
        dataset.origin = {"kind": "files", "name": USER, "binary": binary, "splits": files}
    # else in-memory: its checksums are taken when a run records it, after data.validation splits it
    return dataset


def in_memory_origin(dataset: ImageDataset) -> dict[str, Any]:
    """What a run records about data it cannot reload: a checksum and the counts per split."""
    return {
        "kind": "in-memory",
        "name": dataset.name,
        "note": "not reloadable: pass it again",
        "binary": dataset.binary,
        "splits": {n: {"n": int(x.shape[0]), "sha256": checksum(x)} for n, x in dataset.splits.items()},
    }


def data_source(dataset: ImageDataset) -> dict[str, Any]:
    """Where ``dataset`` came from, as run.json records it; computed once and kept in ``origin``.

    Registered datasets get the SHA-256 of the files they were read from; a dataset
    without an origin (built in memory) gets a checksum of each split.
    """
    origin = dataset.origin
    if not origin:
        dataset.origin = origin = in_memory_origin(dataset)
    elif origin.get("kind") == "registered" and "files" not in origin:
        spec, _ = resolve_name(origin["name"])
        if spec.embedded:
            origin["files"] = "packaged with elbolab (data/embedded/MANIFEST.json holds their SHA-256)"
        else:
            found = [locate(Path(origin["data_dir"]), f) for f in spec.files]
            origin["files"] = {str(p): file_sha256(p) for p in found if p is not None}
    return origin


def reload_files(source: dict[str, Any], where: str) -> ImageDataset:
    """Read the files a run recorded again, refusing any whose SHA-256 changed."""
    for split, f in source["splits"].items():
        path = Path(f["path"])
        if not path.is_file():
            raise DataError(f"{path}: the {split} data of {where} is gone; pass the data again")
        found = file_sha256(path)
        if found != f["sha256"]:
            raise DataError(f"{path}: changed since {where} was trained (SHA-256 {found[:12]}..., recorded "
                            f"{f['sha256'][:12]}...); pass the data explicitly to score it anyway")
    paths = {split: f["path"] for split, f in source["splits"].items()}
    if len(set(paths.values())) == 1:
        return as_dataset(next(iter(paths.values())))
    return as_dataset(paths["train"], valid=paths.get("valid"), test=paths.get("test"))


def matches(x: Tensor, recorded: dict[str, Any] | None) -> bool | None:
    """Whether stored images equal a recorded split (None when nothing was recorded)."""
    if not recorded or "sha256" not in recorded:
        return None
    return checksum(x) == recorded["sha256"]

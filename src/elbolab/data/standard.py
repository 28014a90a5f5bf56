"""Loaders for the datasets of the three papers, from their standard distributed files.

Each loader reads the files (see ``sources.PINS`` for names and checksums), checks what
the format promises, verifies the checksums and returns one uint8 tensor per split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .cache import cached_arrays
from .dataset import DataError, ImageDataset
from .formats import mat_variable, parse_amat, parse_idx, parse_mat, parse_npz, parse_numpy_pickle
from .omniglot import BUILD_VERSION, build_omniglot_28, chardata_images, chardata_labels, check_raw
from .registry import DatasetSpec, register
from .sources import check, read_source


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor owning writable memory (arrays decoded straight from bytes are read-only)."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _source_note(statuses: dict[Path, str]) -> str:
    return "; ".join(f"{p} ({s})" for p, s in statuses.items())


# --- MNIST and Fashion-MNIST (IDX) ---------------------------------------------------

IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000)}


def _load_idx_dataset(data_dir: Path, folder: str, name: str) -> ImageDataset:
    splits, labels, statuses = {}, {}, {}
    for split, (images_file, labels_file, n) in IDX_FILES.items():
        parts = ((f"{folder}/{images_file}", 2051, (28, 28)), (f"{folder}/{labels_file}", 2049, ()))
        for relpath, magic, shape in parts:
            # the length an IDX header for these dimensions fixes: a larger file is refused before it is read
            size = 4 + 4 * (1 + len(shape)) + n * int(np.prod(shape, dtype=np.int64))
            src = read_source(data_dir, relpath, name, max_bytes=size)
            array = parse_idx(src.content, src.path, magic, n, shape)
            statuses[src.path] = check(relpath, src.path, src.raw, src.content)
            if magic == 2051:
                splits[split] = _tensor(array.reshape(n, -1))
            else:
                if array.max() > 9:
                    raise DataError(f"{src.path}: labels must be 0..9, found {int(array.max())}")
                labels[split] = _tensor(array.astype(np.int64))
    return ImageDataset(name=name, splits=splits, image_shape=(28, 28), binary=False, labels=labels,
                        source=_source_note(statuses))


def load_mnist(data_dir: Path) -> ImageDataset:
    return _load_idx_dataset(data_dir, "mnist", "mnist")


def load_fashion_mnist(data_dir: Path) -> ImageDataset:
    return _load_idx_dataset(data_dir, "fashion_mnist", "fashion-mnist")


# --- Larochelle's static binarized MNIST --------------------------------------------

AMAT_SPLITS = {"train": 50_000, "valid": 10_000, "test": 10_000}


def load_binarized_mnist(data_dir: Path) -> ImageDataset:
    splits, statuses = {}, {}
    for split, n in AMAT_SPLITS.items():
        relpath = f"binarized_mnist/binarized_mnist_{split}.amat"
        src = read_source(data_dir, relpath, "binarized-mnist")
        x = parse_amat(src.content, src.path)
        if x.shape != (n, 784):
            raise DataError(f"{src.path}: {x.shape[0]} images of {x.shape[1]} pixels, expected {n} of 784")
        statuses[src.path] = check(relpath, src.path, src.raw, src.content)
        splits[split] = _tensor(x)
    return ImageDataset(name="binarized-mnist", splits=splits, image_shape=(28, 28), binary=True,
                        source=_source_note(statuses))


# --- Caltech-101 Silhouettes ----------------------------------------------------------

CALTECH_FILE = "caltech101_silhouettes/caltech101_silhouettes_28_split1.mat"
CALTECH_SPLITS = {"train": 4_100, "valid": 2_264, "test": 2_307}


def load_caltech(data_dir: Path) -> ImageDataset:
    """Marlin's split1. The file stores each image column-major with 0 = object; we
    transpose to row-major and flip, so images are upright with 1 = object (the
    VampPrior code's ``1 - data`` in Fortran order). Labels 0..100 (the file's 1..101)."""
    src = read_source(data_dir, CALTECH_FILE, "caltech101-silhouettes")
    mat = parse_mat(src.content, src.path)
    splits, labels = {}, {}
    for split, n in CALTECH_SPLITS.items():
        key = "val" if split == "valid" else split
        x = mat_variable(mat, src.path, f"{key}_data", (n, 784), "u")
        y = mat_variable(mat, src.path, f"{key}_labels", (n, 1), "ui")
        if x.max() > 1:
            raise DataError(f"{src.path}: {key}_data must be 0/1, found {int(x.max())}")
        if y.min() < 1 or y.max() > 101:
            raise DataError(f"{src.path}: {key}_labels must be 1..101, found {int(y.min())}..{int(y.max())}")
        upright = x.reshape(n, 28, 28).transpose(0, 2, 1).reshape(n, 784)
        splits[split] = _tensor((1 - upright).astype(np.uint8))
        labels[split] = _tensor(y[:, 0].astype(np.int64) - 1)
    status = check(CALTECH_FILE, src.path, src.raw, src.content)
    return ImageDataset(name="caltech101-silhouettes", splits=splits, image_shape=(28, 28), binary=True,
                        labels=labels, source=f"{src.path} ({status})")


# --- Frey Faces -------------------------------------------------------------------------

FREY_FILE = "freyfaces/freyfaces.pkl"
FREY_SPLITS = {"train": 1_565, "valid": 200, "test": 200}
#: the VampPrior code shuffles with an unseeded np.random.shuffle (its seed flag, 14, only
#: seeds torch), so its split cannot be reproduced; we use the same sizes and a fixed permutation
FREY_SPLIT_SEED = 14


def load_freyfaces(data_dir: Path) -> ImageDataset:
    src = read_source(data_dir, FREY_FILE, "freyfaces")
    # the checksum first: a pickle is not unpickled before its bytes are known to be the pinned file
    status = check(FREY_FILE, src.path, src.raw, src.content)
    obj = parse_numpy_pickle(src.content, src.path)
    faces = obj[0] if isinstance(obj, list | tuple) and obj else obj
    if not isinstance(faces, np.ndarray) or faces.dtype != np.uint8 or faces.shape != (1965, 560):
        found = f"{faces.dtype} {faces.shape}" if isinstance(faces, np.ndarray) else type(faces).__name__
        raise DataError(f"{src.path}: expected a list holding uint8 (1965, 560) faces, found {found}")
    order = np.random.default_rng(FREY_SPLIT_SEED).permutation(faces.shape[0])
    splits, start = {}, 0
    for split, n in FREY_SPLITS.items():
        splits[split] = _tensor(faces[order[start:start + n]])
        start += n
    return ImageDataset(name="freyfaces", splits=splits, image_shape=(28, 20), binary=False,
                        source=f"{src.path} ({status}); split 1565/200/200 by default_rng({FREY_SPLIT_SEED})")


# --- OMNIGLOT ----------------------------------------------------------------------------

OMNIGLOT_FILES = ("omniglot/images_background.npz", "omniglot/images_evaluation.npz")
CHARDATA_FILE = "omniglot/chardata.mat"


def load_omniglot_28(data_dir: Path) -> ImageDataset:
    """Our 28x28 OMNIGLOT (see omniglot.py), built once from the raw images and cached."""
    sources = [read_source(data_dir, relpath, "omniglot-28-elbolab") for relpath in OMNIGLOT_FILES]
    raws: list[dict[str, np.ndarray]] = []

    def decode() -> list[dict[str, np.ndarray]]:
        if not raws:
            for src in sources:
                arrays = parse_npz(src.content, src.path)
                for key in ("images", "labels"):
                    if key not in arrays:
                        raise DataError(f"{src.path}: no array {key!r} (found {sorted(arrays)}); wrong file?")
                check_raw(arrays["images"], arrays["labels"], src.path)
                raws.append(arrays)
        return raws

    statuses = {}
    for relpath, src in zip(OMNIGLOT_FILES, sources, strict=True):
        try:
            statuses[src.path] = check(relpath, src.path, src.raw, src.content)
        except DataError:
            decode()  # a wrong format explains a checksum mismatch better; raises if so
            raise
    key = f"v{BUILD_VERSION}:" + ",".join(hashlib.sha256(s.raw).hexdigest() for s in sources)

    def build() -> dict[str, np.ndarray]:
        background, evaluation = (r["images"] for r in decode())
        return build_omniglot_28(background, evaluation)

    arrays = cached_arrays("omniglot-28-elbolab", key, build)
    return ImageDataset(
        name="omniglot-28-elbolab",
        splits={s: _tensor(arrays[s]) for s in ("train", "test")},
        image_shape=(28, 28), binary=False,
        labels={s: _tensor(arrays[f"{s}_labels"]) for s in ("train", "test")},
        source=_source_note(statuses) + "; area-downsampled to 28x28, split by drawer slot 1-15 / 16-20",
    )


def load_omniglot_chardata(data_dir: Path) -> ImageDataset:
    """Burda et al.'s chardata.mat (user-supplied): ``data`` [784, N] and ``testdata`` [784, M]."""
    src = read_source(data_dir, CHARDATA_FILE, "omniglot-chardata")
    mat = parse_mat(src.content, src.path)
    splits, labels = {}, {}
    for split, (images_var, target_var) in {"train": ("data", "target"), "test": ("testdata", "testtarget")}.items():
        x = chardata_images(mat, src.path, images_var)
        splits[split] = _tensor(x)
        y = chardata_labels(mat, target_var, x.shape[0])
        if y is not None:
            labels[split] = _tensor(y)
    status = check(CHARDATA_FILE, src.path, src.raw, src.content)
    return ImageDataset(name="omniglot-chardata", splits=splits, image_shape=(28, 28), binary=False,
                        labels=labels, source=f"{src.path} ({status}); grey levels rounded to 1/255")


#: the VampPrior code's pseudo-input init (mean, std) for Caltech-101 Silhouettes and Frey
#: Faces (for MNIST and OMNIGLOT it uses the registry default, 0.05 and 0.01)
VAMPPRIOR_GREY_PSEUDO_INPUTS = (0.5, 0.02)

register(DatasetSpec(
    "mnist", "MNIST grey levels 0..255 with labels (LeCun IDX .gz); data.validation=10000 gives 50k/10k",
    load_mnist, files=tuple(f"mnist/{f}" for t in IDX_FILES.values() for f in t[:2]),
    split_sizes=(("train", 60_000), ("test", 10_000)), binary=False))
register(DatasetSpec(
    "binarized-mnist", "Larochelle's statically binarized MNIST (.amat or .amat.gz)",
    load_binarized_mnist, files=tuple(f"binarized_mnist/binarized_mnist_{s}.amat" for s in AMAT_SPLITS),
    split_sizes=tuple(AMAT_SPLITS.items()), binary=True))
register(DatasetSpec(
    "fashion-mnist", "Fashion-MNIST grey levels 0..255 with labels (Zalando IDX .gz)",
    load_fashion_mnist, files=tuple(f"fashion_mnist/{f}" for t in IDX_FILES.values() for f in t[:2]),
    split_sizes=(("train", 60_000), ("test", 10_000)), binary=False))
register(DatasetSpec(
    "omniglot-28-elbolab", "OMNIGLOT raw 105x105 area-downsampled to 28x28 by elbolab, drawer split "
    "(NOT Burda et al.'s file)", load_omniglot_28, files=OMNIGLOT_FILES,
    split_sizes=(("train", 24_345), ("test", 8_115)), binary=False))
register(DatasetSpec(
    "omniglot-chardata", "Burda et al.'s 28x28 OMNIGLOT chardata.mat (user-supplied)",
    load_omniglot_chardata, files=(CHARDATA_FILE,),
    split_sizes=(("train", 24_345), ("test", 8_070)), binary=False))
register(DatasetSpec(
    "caltech101-silhouettes", "Caltech-101 Silhouettes 28x28, Marlin's split1, 1 = object, labels 0..100",
    load_caltech, files=(CALTECH_FILE,), split_sizes=tuple(CALTECH_SPLITS.items()), binary=True,
    pseudo_inputs=VAMPPRIOR_GREY_PSEUDO_INPUTS))
register(DatasetSpec(
    "freyfaces", "Frey Faces 28x20 grey levels, 1565/200/200 as in the VampPrior code (fixed permutation)",
    load_freyfaces, files=(FREY_FILE,), image_shape=(28, 20), split_sizes=tuple(FREY_SPLITS.items()),
    binary=False, pseudo_inputs=VAMPPRIOR_GREY_PSEUDO_INPUTS))

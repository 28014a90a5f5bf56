"""Readers for the standard distributed file formats; each failure names the file.

Readers take the file's (decompressed) bytes, return numpy arrays, check what the
format promises (magic numbers, shapes, dtypes) and never execute code from a file.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from .dataset import DataError
from .sources import decompress, path_problem


def read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped when it ends in .gz."""
    problem = path_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return decompress(path, raw)


# --- IDX (MNIST, Fashion-MNIST) --------------------------------------------------

#: magic number -> what the file holds; the third byte 0x08 means unsigned bytes
IDX_MAGIC = {2051: "images", 2049: "labels"}


def parse_idx(content: bytes, path: Path, magic: int, count: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """An IDX ubyte file -> uint8 ``[count, *item_shape]``; checks magic, dims and length."""
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    if len(content) < 4:
        raise DataError(f"{path}: {len(content)} bytes is too short for an IDX file; fetch it again")
    found = int.from_bytes(content[:4], "big")
    if found != magic:
        what = IDX_MAGIC.get(found, "not an IDX ubyte file")
        raise DataError(
            f"{path}: IDX magic number is {found} ({what}), expected {magic} ({IDX_MAGIC[magic]}); "
            "the file is corrupt or the images/labels files are swapped"
        )
    if len(content) < header:
        raise DataError(f"{path}: IDX header cut short ({len(content)} bytes); fetch the file again")
    dims = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims != (count, *item_shape):
        raise DataError(f"{path}: IDX dimensions are {dims}, expected {(count, *item_shape)}; wrong or corrupt file")
    expected = header + int(np.prod(dims))
    if len(content) != expected:
        raise DataError(
            f"{path}: {len(content)} bytes uncompressed, expected {expected} for dimensions {dims}; "
            "the file is truncated or corrupt, fetch it again"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


# --- Larochelle .amat (static binarized MNIST) ------------------------------------


def parse_amat(content: bytes, path: Path, width: int = 784) -> np.ndarray:
    """Larochelle's .amat text: one image per line, ``width`` values 0/1 separated by spaces.

    Fast path: each line is exactly ``2 * width`` bytes (digit, separator), so the whole
    file is one strided view; anything else falls back to a general parser.
    """
    line = 2 * width
    buf = np.frombuffer(content, dtype=np.uint8)
    if buf.size and buf.size % line == 0:
        rows = buf.reshape(-1, line)
        digits = rows[:, ::2] - ord("0")
        seps = rows[:, 1::2]
        if digits.max(initial=0) <= 1 and (seps[:, :-1] == ord(" ")).all() and (seps[:, -1] == ord("\n")).all():
            return np.ascontiguousarray(digits, dtype=np.uint8)
    try:
        values = np.array(content.split(), dtype=np.float32)
    except ValueError:
        raise DataError(f"{path}: not an .amat file (found non-numeric text)") from None
    if values.size == 0 or values.size % width:
        raise DataError(f"{path}: expected rows of {width} values, found {values.size} values in all")
    out = values.reshape(-1, width)
    if not np.isin(out, (0.0, 1.0)).all():
        raise DataError(f"{path}: expected binary 0/1 pixels, found other values")
    return out.astype(np.uint8)


def read_amat(path: Path, width: int = 784) -> np.ndarray:
    """An .amat or .amat.gz file -> uint8 ``[N, width]``."""
    return parse_amat(read_bytes(path), path, width)


# --- MATLAB .mat (Caltech-101 Silhouettes, OMNIGLOT chardata) ----------------------


def parse_mat(content: bytes, path: Path) -> dict[str, np.ndarray]:
    """The variables of a MATLAB v5 .mat file (scipy.io; v7.3/HDF5 files are refused)."""
    import scipy.io

    if not content:
        raise DataError(f"{path}: empty file (0 bytes); fetch it again")
    try:
        mat = scipy.io.loadmat(io.BytesIO(content))
    # scipy reports a v7.3 (HDF5) file with NotImplementedError, and a file that is not a .mat at all
    # (a zip, random bytes) with whatever its parser trips on (IndexError, struct.error, ...)
    except Exception as e:  # noqa: BLE001 - any failure to parse means an unusable file
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise DataError(f"{path}: not a readable MATLAB v5 .mat file ({why}); fetch it again") from None
    if not isinstance(mat, dict):
        raise DataError(f"{path}: not a readable MATLAB v5 .mat file; fetch it again")
    return {k: v for k, v in mat.items() if not k.startswith("__")}


def mat_variable(
    mat: dict[str, np.ndarray], path: Path, name: str, shape: tuple[int | None, ...], kinds: str
) -> np.ndarray:
    """Variable ``name`` with the given shape (``None``: any size) and dtype kind (e.g. ``"u"``, ``"uif"``)."""
    if name not in mat:
        raise DataError(f"{path}: no variable {name!r} in the .mat file (found {sorted(mat)}); wrong file?")
    v = mat[name]
    ok_shape = v.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, v.shape, strict=True))
    if not ok_shape or v.dtype.kind not in kinds:
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise DataError(
            f"{path}: variable {name!r} is {v.dtype} {'x'.join(map(str, v.shape))}, expected {want} of dtype kind "
            f"{kinds!r}; the file is not the expected version, fetch it again"
        )
    return v


# --- Frey Faces pickle ------------------------------------------------------------


def _empty_reconstruct(subtype: type, shape: object, dtype: object) -> np.ndarray:
    """numpy's ``_reconstruct`` as a pickled array calls it: an empty array (shape (0,)), which
    ``__setstate__`` then fills from the pickle's own bytes. Any other shape would allocate
    what the file asks for before a byte of data is read (terabytes), so it is refused."""
    if subtype is not np.ndarray or shape not in ((0,), [0], 0):
        raise pickle.UnpicklingError(f"an array reconstructed as {getattr(subtype, '__name__', subtype)} of shape "
                                     f"{shape!r}; numpy pickles arrays as ndarray of shape (0,)")
    return np.ndarray((0,), np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs (ndarray, dtype, an empty
    ``_reconstruct``); anything else is refused before it is looked up, so a malicious pickle
    can neither run code nor make numpy allocate more than the file holds."""

    def find_class(self, module: str, name: str):
        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _empty_reconstruct
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def parse_numpy_pickle(content: bytes, path: Path) -> object:
    """A (Python 2) pickle of numpy arrays, read without executing arbitrary code."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(content), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refused to unpickle ({e}); only numpy arrays are accepted") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise DataError(f"{path}: not a readable pickle of numpy arrays ({type(e).__name__}: {e})") from None


# --- NumPy .npz (raw OMNIGLOT) -----------------------------------------------------


def parse_npz(content: bytes, path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz (no pickled objects allowed)."""
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, IndexError) as e:
        why = " ".join(str(e).split())[:200]
        raise DataError(f"{path}: not a readable .npz file ({why}); fetch it again") from None
    except AttributeError:  # np.load returned a bare array (a .npy), not an archive
        raise DataError(f"{path}: a .npy array, not an .npz archive; fetch it again") from None


# --- a user's .npy / .npz (numpy.save / numpy.savez) ----------------------------------

#: dtype kinds an image array may hold: bool, unsigned and signed integers, floats
IMAGE_KINDS = "buif"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def npy_header(fp: IO[bytes], nbytes: int, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy stream's header declares, checked before any array is allocated:
    numbers only (no objects, strings, complex), and no more data than the ``nbytes`` the stream
    holds (header included) or this machine's memory."""
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fp)
        start = fp.tell()
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, zlib.error, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: not a .npy array written by numpy.save ({' '.join(str(e).split())[:160]})") from None
    if dtype.hasobject or dtype.kind not in IMAGE_KINDS or dtype.fields is not None:
        raise DataError(f"{where}: holds {dtype} values; images need numbers (bool, integers or floats)")
    need = math.prod(shape) * dtype.itemsize
    if start + need > nbytes:
        raise DataError(f"{where}: the header declares {dtype} of shape {shape} ({need:,} bytes) but the file holds "
                        f"{max(nbytes - start, 0):,} bytes of data; it is truncated or not written by numpy.save")
    memory = _physical_memory()
    if memory is not None and need > memory:
        raise DataError(f"{where}: shape {shape} of {dtype} is {need:,} bytes, more than this machine's memory")
    return tuple(shape), dtype


def read_user_npy(path: Path) -> np.ndarray:
    """A user's .npy: header checked first (:func:`npy_header`), then loaded without pickles."""
    problem = path_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        with open(path, "rb") as f:
            npy_header(f, os.fstat(f.fileno()).st_size, str(path))
        return np.load(path, allow_pickle=False)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable as .npy ({' '.join(str(e).split())[:160]})") from None


def read_user_npz(path: Path) -> dict[str, np.ndarray]:
    """A user's .npz: a zip of .npy arrays, each header checked (:func:`npy_header`) before any is loaded."""
    problem = path_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        with zipfile.ZipFile(path) as z:
            arrays: dict[str, np.ndarray] = {}
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{path}: holds {info.filename!r}, not a .npy array; write it with numpy.savez")
                name = info.filename[: -len(".npy")]
                with z.open(info) as f:
                    npy_header(f, info.file_size, f"{path}: array {name!r}")
                with z.open(info) as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
            return arrays
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, zlib.error, NotImplementedError) as e:
        raise DataError(f"{path}: not a readable .npz archive ({' '.join(str(e).split())[:160]}); "
                        "write it with numpy.savez") from None

"""Readers for the standard distributed file formats; each failure names the file.

Readers return numpy arrays and never execute code from a file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .dataset import DataError


def read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped when it ends in .gz."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt, fetch it again") from None


def read_amat(path: Path, width: int = 784) -> np.ndarray:
    """Larochelle's .amat text: one image per line, ``width`` values 0/1 separated by spaces.

    Fast path: each line is exactly ``2 * width`` bytes (digit, separator), so the whole
    file is one strided view; anything else falls back to a general parser.
    """
    raw = read_bytes(path)
    line = 2 * width
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size and buf.size % line == 0:
        rows = buf.reshape(-1, line)
        digits = rows[:, ::2] - ord("0")
        seps = rows[:, 1::2]
        if digits.max(initial=0) <= 1 and (seps[:, :-1] == ord(" ")).all() and (seps[:, -1] == ord("\n")).all():
            return np.ascontiguousarray(digits, dtype=np.uint8)
    try:
        values = np.array(raw.split(), dtype=np.float32)
    except ValueError:
        raise DataError(f"{path}: not an .amat file (found non-numeric text)") from None
    if values.size == 0 or values.size % width:
        raise DataError(f"{path}: expected rows of {width} values, found {values.size} values in all")
    out = values.reshape(-1, width)
    if not np.isin(out, (0.0, 1.0)).all():
        raise DataError(f"{path}: expected binary 0/1 pixels, found other values")
    return out.astype(np.uint8)

"""A verified cache of arrays derived from source files (e.g. OMNIGLOT downsampled to 28x28).

One ``.npz`` (uncompressed, no pickles) per entry plus a JSON manifest recording the
SHA-256 of the sources it was built from and of the ``.npz`` itself. Both are written
atomically (temp file + rename), the manifest last, so a crash never leaves a cache
that is trusted; any mismatch rebuilds the entry. An unwritable cache folder only
costs the rebuild next time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..files import OutputError, atomic_write_bytes, atomic_write_text

CACHE_ENV_VAR = "ELBOLAB_CACHE"
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$ELBOLAB_CACHE, else $XDG_CACHE_HOME/elbolab/derived, else ~/.cache/elbolab/derived."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "elbolab" / "derived"


def _load(npz: Path, manifest: Path, key: str) -> dict[str, np.ndarray] | None:
    try:
        meta = json.loads(manifest.read_bytes())
        raw = npz.read_bytes()
    except (OSError, ValueError):  # missing, a folder, not JSON, not UTF-8
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("sha256") != hashlib.sha256(raw).hexdigest():
        log.info("cache %s is stale or damaged; rebuilding", npz)
        return None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, AttributeError):
        log.info("cache %s is unreadable; rebuilding", npz)
        return None


def cached_arrays(name: str, key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from the cache when its entry was made with the same ``key``.

    ``key`` must change whenever the result would (source checksums, method version).
    """
    folder = cache_dir()
    npz, manifest = folder / f"{name}.npz", folder / f"{name}.json"
    hit = _load(npz, manifest, key)
    if hit is not None:
        return hit
    arrays = build()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)  # never a manifest vouching for a half-replaced .npz
        atomic_write_bytes(npz, data)
        atomic_write_text(manifest, json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest()}))
    except (OSError, OutputError) as e:
        log.warning("cannot write the cache %s (%s); it will be rebuilt next time", npz, e)
    return arrays

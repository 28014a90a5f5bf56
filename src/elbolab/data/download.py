"""Fetch a dataset's standard files into the data directory: verified, then renamed into place."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write_bytes
from .dataset import DataError
from .registry import DatasetSpec
from .sources import PINS, check, locate


@dataclass(frozen=True)
class FileState:
    relpath: str
    #: the file found (maybe the .gz/plain twin of ``relpath``), or None
    path: Path | None
    #: verified | not pinned | missing | MISMATCH: ... | corrupt: ...
    state: str


def file_state(data_dir: Path, relpath: str) -> FileState:
    """Found or not, and whether its checksum is the pinned one (hashes the file, no decoding)."""
    path = locate(data_dir, relpath)
    if path is None:
        return FileState(relpath, None, "missing")
    try:
        return FileState(relpath, path, check(relpath, path, path.read_bytes()))
    except DataError as e:
        reason = "MISMATCH" if "checksum mismatch" in str(e) else "corrupt"
        return FileState(relpath, path, reason)
    except OSError as e:
        return FileState(relpath, path, f"unreadable ({e.strerror})")


def fetch_url(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (pinned https/http URLs)
        return response.read()


def manual_instructions(spec: DatasetSpec, data_dir: Path) -> str:
    lines = [f"put these files in {data_dir} (or point --data-dir / $ELBOLAB_DATA at a folder holding them):"]
    for relpath in spec.files:
        url = PINS[relpath].url if relpath in PINS else ""
        lines.append(f"  {relpath}" + (f"   <- {url}" if url else ""))
    return "\n".join(lines)


def download(
    spec: DatasetSpec, data_dir: Path, fetch: Callable[[str], bytes] = fetch_url, log: Callable[[str], None] = print
) -> list[FileState]:
    """Download every file of ``spec`` that is missing or damaged; returns the final states.

    A file is written only after its checksum matched (temp file + rename), so an
    interrupted or corrupted download never leaves a file behind.
    """
    if spec.embedded:
        log(f"{spec.name}: ships inside elbolab; nothing to download")
        return []
    states = []
    for relpath in spec.files:
        state = file_state(data_dir, relpath)
        if state.state in ("verified", "not pinned"):
            log(f"{relpath}: already present ({state.state})")
            states.append(state)
            continue
        pin = PINS.get(relpath)
        if pin is None or not pin.url:
            raise DataError(f"{data_dir / relpath}: no download address known; {manual_instructions(spec, data_dir)}")
        log(f"{relpath}: downloading {pin.url}")
        try:
            data = fetch(pin.url)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DataError(
                f"cannot download {pin.url} ({reason}); {manual_instructions(spec, data_dir)}"
            ) from None
        target = data_dir / relpath
        status = check(relpath, target, data)  # raises on a mismatch, before anything is written
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        log(f"{relpath}: {len(data):,} bytes, {status}")
        states.append(FileState(relpath, target, status))
    return states

"""Atomic file writes: a reader sees the old file or the new one, never half of either.

A write that fails (full disk, read-only folder) raises :class:`OutputError` naming the
file, and leaves the previous version of that file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import signal
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

#: fault-injection hook for the crash tests: "NAME#N" stops this process (SIGSTOP)
#: the N-th time :func:`fault_point` is reached with NAME, so a test can kill it there
TEST_STOP_ENV = "ELBOLAB_TEST_STOP"
_stop_counts: Counter[str] = Counter()
#: mode for new files: what a plain open() would give under the process umask (mkstemp gives 0600)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def fault_point(name: str) -> None:
    """Freeze the process here when $ELBOLAB_TEST_STOP asks for it (tests only; a no-op otherwise)."""
    want = os.environ.get(TEST_STOP_ENV)
    if not want:
        return
    _stop_counts[name] += 1
    if want == f"{name}#{_stop_counts[name]}":
        os.kill(os.getpid(), signal.SIGSTOP)


class OutputError(RuntimeError):
    """A file could not be written (disk full, read-only, not a folder); names the file."""


def _output_error(path: Path, e: OSError) -> OutputError:
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    why = e.strerror or str(e)
    return OutputError(f"cannot write {path}: {why}{f' ({code})' if code else ''}; the previous file is unchanged")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, flush and fsync, then rename over ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            fault_point(f"write:{path.name}")  # a crash test kills the process here
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _output_error(path, e) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a log row) and fsync it; a torn last line is tolerated by readers."""
    path = Path(path)
    try:
        with path.open("a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _output_error(path, e) from None


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temp files left by writes that were killed half-way (their targets are intact)."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for p in stale:
        with contextlib.suppress(OSError):  # a read-only folder fails on the next real write instead
            p.unlink(missing_ok=True)
    return stale


def try_lock(path: str | Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): its file descriptor, or None when
    another open file holds it. The OS drops the lock when the process dies, however it dies,
    so a killed holder never blocks the next one. Close the descriptor to release it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        try:  # a read-only folder holding the file: flock needs no write access
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            raise _output_error(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def check_writable_folder(path: str | Path, what: str = "folder") -> None:
    """Create ``path`` if needed and prove a file can be written in it, or raise :class:`OutputError`
    naming it (a command that writes at its end checks this at its start)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: the {what} is a file, not a folder")
    make_dir(path)
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write in {path}: {e.strerror or e}; choose another {what}") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def make_dir(path: str | Path) -> None:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {path}: {e.strerror or e}") from None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically; only tensors and plain containers, so that
    ``torch.load(weights_only=True)`` can read it back without unpickling code."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())

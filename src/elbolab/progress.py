"""Progress that moves on a terminal and in a log file, and the one switch that silences it.

Every long stage (evaluation, active units, bound vs k, gradient SNR, q*, AIS) counts its
work through :class:`Progress`: a tqdm bar when stderr is a terminal; otherwise (nohup, a
cluster log, a captured stream) a plain line on the ``elbolab`` logger every
:func:`line_seconds` seconds, as tqdm's carriage returns make no readable log.

Whether anything shows is the ``elbolab`` logger's level: INFO by default, so the Python
API reports progress as the CLI does; :func:`set_verbosity` ("warning") silences bars and
lines alike. Without a logging setup of the application's own, :class:`_Fallback` writes
elbolab's lines to stderr; once the root logger has handlers it leaves them to those.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any

from tqdm.auto import tqdm

log = logging.getLogger("elbolab")

#: seconds between plain progress lines when stderr is not a terminal (default 15)
LINE_SECONDS_ENV = "ELBOLAB_PROGRESS_SECONDS"

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def set_verbosity(level: str | int = "info") -> None:
    """How much elbolab reports: "info" (the default: epoch lines, progress bars on a terminal,
    progress lines in a log), "debug" (also every metric), "warning" (silent but for warnings).
    It is the level of the ``elbolab`` logger, so ``logging`` configuration does the same."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"set_verbosity: level must be one of {', '.join(LEVELS)}, got {level!r}")
        level = LEVELS[level.lower()]
    log.setLevel(level)


def shows_progress() -> bool:
    return log.isEnabledFor(logging.INFO)


def line_seconds() -> float:
    """Seconds between progress lines off a terminal: $ELBOLAB_PROGRESS_SECONDS, else 15."""
    try:
        return max(0.0, float(os.environ.get(LINE_SECONDS_ENV, "15")))
    except ValueError:
        return 15.0


class _Fallback(logging.Handler):
    """elbolab's INFO lines on stderr while nothing else is set up to show them (no root handlers):
    what :data:`logging.lastResort` does for warnings, one level lower."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the application (or the CLI) configured logging: its handlers show the record
        try:
            stream = sys.stderr
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                text = f"elbolab: {record.levelname.lower()}: {text}"
            tqdm.write(text, file=stream)
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


def install_fallback() -> None:
    """Show elbolab's progress from Python by default (idempotent)."""
    if not any(isinstance(h, _Fallback) for h in log.handlers):
        log.addHandler(_Fallback())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A progress count over ``total`` units with tqdm's interface (update, set_postfix, close,
    ``with``): a bar on a terminal, else a plain line every ``seconds`` (and a last one at the
    end of a stage that printed any). ``enabled=False`` or a silenced logger shows nothing."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 stream: IO[str] | None = None, seconds: float | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.postfix = ""
        self.enabled = enabled and shows_progress()
        self.stream = stream if stream is not None else sys.stderr
        self.seconds = line_seconds() if seconds is None else seconds
        self._bar: Any = None
        self._start = self._last = time.monotonic()
        self._lines = 0
        if self.enabled and _is_terminal(self.stream):
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif n:
            self._maybe_line()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        if self._bar is not None:
            self._bar.set_postfix(**kwargs)
        else:
            self._maybe_line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._lines:
            self._line(done=True)
        self.enabled = False

    def line(self, done: bool = False) -> str:
        """The plain progress line: what, how far, how long, and how long still to go."""
        elapsed = time.monotonic() - self._start
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {_fmt_seconds(elapsed)} elapsed"
        if done:
            text += ", done"
        elif self.total and self.n:
            text += f", ~{_fmt_seconds(elapsed * (self.total - self.n) / self.n)} left"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _maybe_line(self) -> None:
        if self.enabled and time.monotonic() - self._last >= self.seconds:
            self._line()

    def _line(self, done: bool = False) -> None:
        self._last = time.monotonic()
        self._lines += 1
        log.info("%s", self.line(done))


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False

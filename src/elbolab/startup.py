"""The ``elbolab`` command's very first lines, before torch is imported (seconds): Ctrl-C or
SIGTERM then ends it with one line and exit code 130, as it does once a command runs.

Standard library only, and called first by the package's ``__init__``, since the console
script imports ``elbolab.cli`` and so the whole package before any of the CLI's own code.
It acts only in the ``elbolab`` command's process (its script is named ``elbolab``, or
``python -m elbolab.cli``), never
when a program imports elbolab as a library: there Ctrl-C stays the program's.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

#: the console script's name (pyproject's [project.scripts])
COMMAND = "elbolab"
EXIT_INTERRUPTED = 130


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write(f"elbolab: interrupted ({signal.Signals(signum).name}) while starting; nothing was done\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_INTERRUPTED)


def is_command() -> bool:
    """True in the process the ``elbolab`` console script (or ``python -m elbolab.cli``) started."""
    name = Path(sys.argv[0] if sys.argv else "").name
    if name.removesuffix(".exe").removesuffix("-script.py") == COMMAND:
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b in ("elbolab", "elbolab.cli") for a, b in zip(argv, argv[1:], strict=False))


def guard_startup() -> None:
    """In the ``elbolab`` command, SIGINT and SIGTERM end the process with one line and exit code
    130 until the CLI's ``main`` installs its own handlers (cli/__init__.py)."""
    if is_command() and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _stop)

"""The ``elbolab`` command: thin, it parses, validates and calls the library.

One module per command group (train, evaluate, gaps, data, reproduce, bench), each adding its
subcommands with ``add_commands``. Process-wide settings are made here, once.

Exit codes: 0 ok; 1 unexpected error; 2 bad input (usage, config, data, run folder,
an output folder that cannot be written, a run that cannot fit in memory); 3 numerical
fault (non-finite loss, gradient or evaluation result); 130 interrupted (Ctrl-C or
SIGTERM, any command; a training run writes a checkpoint first) (cli/common.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

from tqdm.auto import tqdm

from ..config import ConfigError
from ..data import DataError
from ..errors import ModelCapabilityError
from ..fastpaths import retain_freed_memory
from ..files import OutputError
from ..runs import RunError
from ..training import NonFiniteError
from ..version import __version__
from . import bench, config, data, evaluate, gaps, reproduce, train
from .common import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NUMERICAL, EXIT_OK

__all__ = ["EXIT_BAD_INPUT", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NUMERICAL", "EXIT_OK", "build_parser", "main"]

#: the command groups, in the order ``elbolab --help`` lists them
GROUPS = (train, evaluate, gaps, data, reproduce, bench, config)

VERBOSE_HELP = "also log debug detail (every metric of every epoch), with timestamps"


class _Lines(logging.Formatter):
    """Progress lines as they are; warnings and errors prefixed so they stand out; timestamps with -v."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"elbolab: {record.levelname.lower()}: {text}"
        return f"{self.formatTime(record, '%H:%M:%S')} {text}" if self.verbose else text


class _AboveBars(logging.StreamHandler):
    """Writes through tqdm, so a line lands above a progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


def setup_logging(verbose: bool, machine_output: bool = False) -> None:
    """elbolab's progress lines (one per epoch, stages) at INFO by default, DEBUG with -v, on
    stdout with what the commands print (on stderr when stdout carries JSON, ``machine_output``);
    warnings and errors on stderr, where an error stays one line. Other libraries' loggers stay
    at WARNING. A root logger that already has handlers (a test harness, an application) is left
    as it is."""
    root = logging.getLogger()
    if not root.handlers:
        progress = _AboveBars(sys.stderr if machine_output else sys.stdout)
        progress.addFilter(lambda record: record.levelno < logging.WARNING)
        problems = _AboveBars(sys.stderr)
        problems.setLevel(logging.WARNING)
        for handler in (progress, problems):
            handler.setFormatter(_Lines(verbose))
            root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("elbolab").setLevel(logging.DEBUG if verbose else logging.INFO)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """-v after any subcommand too (``elbolab train -v``); SUPPRESS keeps the top-level value."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elbolab", description="Train and diagnose variational autoencoders.")
    parser.add_argument("--version", action="version", version=f"elbolab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    for command in sub.choices.values():
        _add_verbose(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the main job: `elbolab` alone trains the embedded default
    args = parser.parse_args(argv)
    setup_logging(args.verbose, machine_output=bool(getattr(args, "json", False)))
    retain_freed_memory()  # every command makes big CPU temporaries (fastpaths.py)
    with _sigterm_as_interrupt():
        return _run(args)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a preemption notice, ``kill``) stops a command like Ctrl-C: cleanly, with exit code 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (ConfigError, DataError, RunError, OutputError, ModelCapabilityError) as e:
        print(f"elbolab: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"elbolab: numerical fault: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_NUMERICAL
    except KeyboardInterrupt:
        print("elbolab: interrupted; the last checkpoint is kept: rerun the same command (or train --resume RUN) "
              "to continue", file=sys.stderr)
        return EXIT_INTERRUPTED

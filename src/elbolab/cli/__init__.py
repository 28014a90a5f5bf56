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

from ..config import ConfigError
from ..data import DataError
from ..errors import ModelCapabilityError
from ..fastpaths import retain_freed_memory
from ..files import OutputError
from ..runs import RunError
from ..training import NonFiniteError
from ..version import __version__
from . import bench, data, evaluate, gaps, reproduce, train
from .common import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NUMERICAL, EXIT_OK

__all__ = ["EXIT_BAD_INPUT", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_NUMERICAL", "EXIT_OK", "build_parser", "main"]

#: the command groups, in the order ``elbolab --help`` lists them
GROUPS = (train, evaluate, gaps, data, reproduce, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elbolab", description="Train and diagnose variational autoencoders.")
    parser.add_argument("--version", action="version", version=f"elbolab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the main job: `elbolab` alone trains the embedded default
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
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

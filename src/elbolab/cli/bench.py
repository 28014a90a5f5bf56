"""``elbolab bench``: time training and evaluation against pythae and the machine's FLOP peak.

``python benchmarks/run.py`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..config import ConfigError
from ..speed import DEFAULT_OUT, run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute (checks the harness)")
    p.add_argument("--name", help="results file name (default: quick or full, plus the device)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default: {DEFAULT_OUT})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: the number of CPU cores)")
    p.add_argument("--only", action="append", metavar="TEXT",
                   help="run only rows whose name contains TEXT (repeatable); curves run with 'curves'")
    p.add_argument("--no-pythae", action="store_true", help="time elbolab alone")
    p.add_argument("--compile", action="store_true",
                   help="also time training steps as train.compile=true runs them (CUDA graphs on a GPU; "
                        "on a CPU each row compiles for 10-30 s)")
    p.add_argument("--bf16", action="store_true",
                   help="also time training steps at k >= 5 as train.precision=bf16 runs them (fast only on "
                        "hardware with native bf16 products)")
    p.add_argument("--seconds", type=float, metavar="S",
                   help="seconds of work per timed repeat (default: 0.12 quick, 1.0 full; a GPU needs less)")
    p.add_argument("--repeats", type=int, metavar="N", help="interleaved repeats per row (default: 3 quick, 5 full)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or process CPU time for a busy shared machine (use with --threads 1)")


def cmd_bench(args: argparse.Namespace) -> int:
    run(args)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time training and evaluation against pythae and the machine's FLOP peak")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def run_script(script_main: Callable[[], int]) -> None:
    """``sys.exit(script_main())`` for the scripts in benchmarks/: a bad option is one line, exit 2."""
    try:
        code = script_main()
    except ConfigError as e:
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)

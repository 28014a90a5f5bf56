"""Benchmarks of elbolab against pythae and this machine's FLOP peak (the same as ``elbolab bench``).

    python benchmarks/run.py --quick      # about a minute: checks the harness
    python benchmarks/run.py              # the full table for the README
"""

import sys

from elbolab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

"""Every limit on a number a user gives, in one place: the config's checks, the CLI's options and
the Python API (evaluate, diagnose, gaps, snr) all read these, so one value is refused the same
way, with the same message, wherever it comes in.

The caps sit far above any sensible run and below what breaks an int64 product or an
allocation: a value past them is a typo (an extra zero or three), refused naming the key.
"""

from __future__ import annotations

import math
import numbers
import os

from .errors import ConfigError

#: largest seed: torch, numpy and Python all take it (seeds derived from it add small offsets)
MAX_SEED = 2**63 - 1
#: samples per data point of a training objective (objective.k, m x k), and per q* step
MAX_SAMPLES = 10**6
#: samples per data point of an evaluation (eval.k_importance, bound_ks, IS K, AIS chains)
MAX_EVAL_SAMPLES = 10 * MAX_SAMPLES
MAX_BATCH = 10**7
MAX_WIDTH = 10**6
#: epochs, and the steps of any iterative procedure (q* optimization, AIS distributions)
MAX_EPOCHS = 10**8
#: torch intra-op threads (train.threads, gaps --threads, bench --threads)
MAX_THREADS = 4096


def in_range(value: int | float, lo: int | float, hi: int | float, key: str) -> None:
    """Refuse ``value`` outside [lo, hi], naming ``key``."""
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: must be between {lo:,} and {hi:,}, got {value:,}")


def count(value: object, key: str, hi: int, lo: int = 1) -> int:
    """``value`` as an int in [lo, hi], else a :class:`ConfigError` naming ``key`` (the CLI's option
    or the Python argument): below ``lo`` says ``must be >= lo``, above ``hi`` gives the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{key}: must be a whole number, got {value!r}")
    if value < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {value}")
    in_range(value, lo, hi, key)
    return int(value)


def optional_count(value: object, key: str, hi: int, lo: int = 1) -> int | None:
    """:func:`count`, with None meaning "the default"."""
    return None if value is None else count(value, key, hi, lo)


def seed(value: object, key: str) -> int:
    return count(value, key, MAX_SEED, lo=0)


def threads(value: object, key: str) -> int:
    """A torch thread count (0: torch's default), capped as train.threads is: at most
    :data:`MAX_THREADS`, and at most this machine's CPU cores (preflight's check of train.threads)."""
    n = count(value, key, MAX_THREADS, lo=0)
    cpus = os.cpu_count() or 1
    if n > cpus:
        raise ConfigError(f"{key}: {n} but this machine has {cpus} CPU cores; set at most {cpus} (0: torch's default)")
    return n


def positive_number(value: object, key: str) -> float:
    """A finite real number > 0 (a learning rate, a step size), else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise ConfigError(f"{key}: must be a finite number > 0, got {value!r}")
    return float(value)

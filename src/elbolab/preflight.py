"""Checks a run must pass before anything is read, built or written.

Names are checked when a config is built (each registry's names, config.py); what is
left needs the machine: the device, and the tools an option relies on.
"""

from __future__ import annotations

import os
import shutil

from .config import ConfigError, RunConfig
from .devices import resolve_device


def preflight(cfg: RunConfig) -> None:
    """Refuse, with a one-line :class:`ConfigError` naming the option, what this machine cannot run."""
    cfg.validate()  # a config built field by field has not been checked yet
    device = resolve_device(cfg.train.device)
    if cfg.train.compile and device.type != "cuda":
        compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise ConfigError("train.compile: torch.compile on a CPU needs a C++ compiler and none is on PATH "
                              "(c++, g++, clang++ or $CXX); install one or set train.compile=false")

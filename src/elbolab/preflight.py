"""Checks a run must pass before anything is read, built or written.

Names are checked when a config is built (each registry's names, config.py); what is
left needs the machine: the device, and the tools and optional packages an option relies on.
"""

from __future__ import annotations

import os
import shutil
from importlib.util import find_spec

from .config import ConfigError, RunConfig
from .devices import resolve_device

#: config switch -> (the package it imports, the extra that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "train.tensorboard": ("tensorboard", "tensorboard"),
    "train.wandb": ("wandb", "wandb"),
}


def missing_package(module: str) -> bool:
    """Whether ``module`` cannot be imported here (found without importing it)."""
    try:
        return find_spec(module) is None
    except (ImportError, ValueError):
        return True


def check_optional_packages(cfg: RunConfig) -> None:
    """One line naming the extra to install for each switched-on option whose package is missing."""
    for key, (module, extra) in OPTIONAL_PACKAGES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) and missing_package(module):
            raise ConfigError(f"{key}=true needs the {module} package, which is not installed: "
                              f"pip install 'elbolab[{extra}]' (or set {key}=false)")


def preflight(cfg: RunConfig) -> None:
    """Refuse, with a one-line :class:`ConfigError` naming the option, what this machine cannot run."""
    cfg.validate()  # a config built field by field has not been checked yet
    check_optional_packages(cfg)
    device = resolve_device(cfg.train.device)
    if cfg.train.compile and device.type != "cuda":
        compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise ConfigError("train.compile: torch.compile on a CPU needs a C++ compiler and none is on PATH "
                              "(c++, g++, clang++ or $CXX); install one or set train.compile=false")

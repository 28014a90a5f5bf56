"""Which device a config or option names, refused early when this machine lacks it."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The device ``name`` (cpu, cuda, cuda:N, mps or auto), or a :class:`ConfigError`
    naming ``key`` when this machine does not have it (before anything is built or written)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key}: {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: no data lives there to compute on
        raise ConfigError(f"{key}: {name!r} is a {device.type} device, which elbolab cannot compute on; "
                          "use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {name!r} but CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: {name!r} but MPS is not available on this machine; use cpu")
    return device


def use_threads(threads: int) -> None:
    """torch's intra-op threads for a run (``train.threads``; 0 keeps torch's default, one per
    core): its training and its scoring alike, so a scoring in a later process gives the same
    numbers and does not oversubscribe a CPU shared with other runs."""
    if threads:
        torch.set_num_threads(threads)

# ruff: noqa: E402 - the startup guard must run before the (slow) imports below
"""elbolab: train and diagnose variational autoencoders.

The heart is one tensor: ``model.log_weights(x, k)`` of shape [K, B]. Every bound
(:mod:`elbolab.bounds`), the importance-sampled likelihood and the diagnostics read it.
"""

from .startup import guard_startup

guard_startup()  # before torch: Ctrl-C while the command starts is one line, exit 130 (startup.py)

from . import bounds
from .api import diagnose, evaluate, snr, train, train_model
from .config import RunConfig

# every module that owns a registry, so that config validation knows all their names
from .data import DATASETS  # noqa: F401
from .flows import FLOWS  # noqa: F401
from .models import MODELS  # noqa: F401
from .objectives import ESTIMATORS, OBJECTIVES  # noqa: F401
from .optimizers import OPTIMIZERS  # noqa: F401
from .progress import install_fallback, set_verbosity
from .runs import Run, load_run
from .schedules import SCHEDULES  # noqa: F401
from .version import __version__

install_fallback()  # progress from Python by default; set_verbosity("warning") silences it

__all__ = ["Run", "RunConfig", "__version__", "bounds", "diagnose", "evaluate", "load_run", "set_verbosity", "snr",
           "train", "train_model"]

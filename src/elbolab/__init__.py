"""elbolab: train and diagnose variational autoencoders.

The heart is one tensor: ``model.log_weights(x, k)`` of shape [K, B]. Every bound
(:mod:`elbolab.bounds`), the importance-sampled likelihood and the diagnostics read it.
"""

__version__ = "0.1.0"

from . import bounds  # noqa: E402
from .config import RunConfig  # noqa: E402


def load_run(path, device: str = "cpu", weights: str = "final"):
    """Reload a saved run folder (config, model, metrics) in one call."""
    from .runs import load_run as _load_run

    return _load_run(path, device=device, weights=weights)


__all__ = ["RunConfig", "__version__", "bounds", "load_run"]

"""Diagnostics: how loose is the bound, which latents are alive, what the prior costs,
and what distribution importance weighting really fits."""

from ..evaluation import LikelihoodResult, evaluate_bounds, log_likelihood
from .active_units import ActiveUnits, active_units
from .bound_vs_k import DEFAULT_KS, BoundVsK, bound_vs_k
from .q_ew import QEWEstimate, QEWGrid, elbo_q_ew_nested, q_ew_on_grid, sample_q_ew
from .surgery import Surgery, SurgeryError, elbo_surgery

__all__ = [
    "DEFAULT_KS",
    "ActiveUnits",
    "BoundVsK",
    "LikelihoodResult",
    "QEWEstimate",
    "QEWGrid",
    "Surgery",
    "SurgeryError",
    "active_units",
    "bound_vs_k",
    "elbo_q_ew_nested",
    "elbo_surgery",
    "evaluate_bounds",
    "log_likelihood",
    "q_ew_on_grid",
    "sample_q_ew",
]

"""Diagnostics: how loose is the bound, which latents are alive, what the prior costs."""

from .active_units import ActiveUnits, active_units
from .likelihood import LikelihoodResult, evaluate_bounds, log_likelihood

__all__ = ["ActiveUnits", "LikelihoodResult", "active_units", "evaluate_bounds", "log_likelihood"]

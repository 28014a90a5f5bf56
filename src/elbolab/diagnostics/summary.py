"""The short evaluation printed after training and by ``elbolab evaluate``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..evaluation import evaluate_bounds, log_likelihood
from ..models.base import NoPosterior
from .active_units import active_units


def summarize(
    model,
    x_test: Tensor,
    k_train: int,
    k_importance: int = 1000,
    batch_size: int = 100,
    chunk_size: int = 50,
    threshold: float = 0.01,
    seed: int = 1,
) -> dict[str, Any]:
    """Test L_1 (ELBO), L_k at the training k, IS log-likelihood at K, active units."""
    out: dict[str, Any] = {"n_test": int(x_test.shape[0])}
    b = evaluate_bounds(model, x_test, k=max(k_train, 1), batch_size=batch_size, seed=seed)
    out["elbo"] = b["elbo"]
    out["iwae_k"] = k_train
    out[f"iwae_{k_train}"] = b[f"iwae_{k_train}"]
    ll = log_likelihood(model, x_test, k=k_importance, batch_size=batch_size, chunk_size=chunk_size, seed=seed)
    out["log_likelihood"] = ll.to_dict()
    try:
        au = active_units(model, x_test, threshold=threshold, batch_size=batch_size, seed=seed)
    except NoPosterior as e:  # a model whose q(z|x) is not a diagonal Gaussian
        out["active_units"] = {"skipped": str(e), "threshold": threshold, "label": "n/a (no Gaussian posterior)"}
        return out
    out["active_units"] = {"counts": au.counts, "total": au.total, "threshold": threshold,
                           "label": str(au)}
    return out


def format_summary(s: dict[str, Any]) -> str:
    k = s["iwae_k"]
    ll = s["log_likelihood"]
    lines = [
        f"test points              {s['n_test']}",
        f"test ELBO (L_1)          {s['elbo']:.2f} nats",
        f"test L_{k:<17} {s[f'iwae_{k}']:.2f} nats",
        f"test log p(x), IS K={ll['k']:<4} {ll['mean']:.2f} +- {ll['stderr']:.2f} nats",
        f"active units             {s['active_units']['label']} (threshold {s['active_units']['threshold']})",
    ]
    return "\n".join(lines)

"""The short evaluation printed after training and by ``elbolab evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..evaluation import batches, eval_mode, evaluate_bounds, log_likelihood, model_device, seeded
from ..models.base import NoPosterior
from .active_units import active_units
from .ais import implicit_log_likelihood


def summarize(
    model,
    x_test: Tensor,
    k_train: int,
    k_importance: int = 1000,
    batch_size: int = 100,
    chunk_size: int = 50,
    threshold: float = 0.01,
    seed: int = 1,
    progress: bool = False,
    partial_file: Path | None = None,
) -> dict[str, Any]:
    """Test L_1 (ELBO), L_k at the training k, IS log-likelihood at K, active units
    (``progress``: a progress bar on the long stages; ``partial_file``: where the IS scoring
    keeps its finished points, so a killed evaluation continues from them)."""
    out: dict[str, Any] = {"n_test": int(x_test.shape[0])}
    if getattr(model, "implicit_posterior", False):
        return _summarize_implicit(model, x_test, batch_size, threshold, seed, progress, out)
    b = evaluate_bounds(model, x_test, k=max(k_train, 1), batch_size=batch_size, seed=seed)
    out["elbo"] = b["elbo"]
    out["iwae_k"] = k_train
    out[f"iwae_{k_train}"] = b[f"iwae_{k_train}"]
    ll = log_likelihood(model, x_test, k=k_importance, batch_size=batch_size, chunk_size=chunk_size, seed=seed,
                        progress=f"test log p(x), IS K={k_importance}" if progress else None,
                        partial_file=partial_file)
    out["log_likelihood"] = ll.to_dict()
    try:
        au = active_units(model, x_test, threshold=threshold, batch_size=batch_size, seed=seed,
                          progress="active units" if progress else None)
    except NoPosterior as e:  # a model whose q(z|x) is not a diagonal Gaussian
        out["active_units"] = {"skipped": str(e), "threshold": threshold, "label": "n/a (no Gaussian posterior)"}
        return out
    out["active_units"] = {"counts": au.counts, "total": au.total, "threshold": threshold,
                           "label": str(au)}
    return out


def earlier_seconds(report: dict[str, Any]) -> float:
    """Seconds that earlier sittings of a killed evaluation spent on its IS scoring (0 when none)."""
    ll = report.get("log_likelihood")
    return float(ll.get("earlier_seconds", 0.0)) if isinstance(ll, dict) else 0.0


def _summarize_implicit(model, x_test: Tensor, batch_size: int, threshold: float, seed: int, progress: bool,
                        out: dict[str, Any]) -> dict[str, Any]:
    """No log q(z|x) (models.avb): the ELBO with the adversary's KL estimate, log p(x) by AIS from
    the adaptive-contrast Gaussian, active units from E_q[z|x] (known in closed form)."""
    with seeded(seed, model_device(model)), eval_mode(model), torch.no_grad():
        elbo = torch.cat([model.estimated_elbo(x_test[sl]) for sl in batches(x_test.shape[0], batch_size)])
    out["elbo"] = float(elbo.mean())
    out["elbo_estimated_by"] = "the adversary's KL estimate"
    out["iwae_k"] = 1
    out["iwae_1"] = out["elbo"]
    res = implicit_log_likelihood(model, x_test, seed=seed, progress=progress, batch_size=batch_size).to_dict()
    res["k"] = None
    res["label"] = f"AIS T={res['steps']}, {res['chains']} chains, {res['leapfrog']} leapfrog"
    out["log_likelihood"] = res
    au = active_units(model, x_test, threshold=threshold, batch_size=batch_size, seed=seed)
    out["active_units"] = {"counts": au.counts, "total": au.total, "threshold": threshold, "label": str(au)}
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The report as aligned lines; L_k is left out at k = 1, where it is the ELBO."""
    k = s["iwae_k"]
    ll = s["log_likelihood"]
    elbo = "test ELBO (KL by the adversary)" if s.get("elbo_estimated_by") else "test ELBO (L_1)"
    rows = [("test points", f"{s['n_test']}"), (elbo, f"{s['elbo']:.2f} nats")]
    if k > 1:
        rows.append((f"test L_{k}", f"{s[f'iwae_{k}']:.2f} nats"))
    how = ll.get("label") or f"IS K={ll['k']}"
    rows += [(f"test log p(x), {how}", f"{ll['mean']:.2f} +- {ll['stderr']:.2f} nats"),
             ("active units", f"{s['active_units']['label']} (threshold {s['active_units']['threshold']})")]
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)

"""Where the gap comes from: the inference gap log p(x) - ELBO(q_phi) split as in Cremer, Li &
Duvenaud (2018, table 1) into

    approximation gap  log p(x) - ELBO(q*)          (the family cannot match p(z|x))
    amortization gap   ELBO(q*) - ELBO(q_phi)       (the encoder misses the family's best)

where q* is the best member of the family for that one x (:mod:`.local_opt`). log p(x) is
the best estimate measured: AIS (:mod:`.ais`) when it was run and its mean is the higher,
else the importance-sampled L_K; both are stochastic lower bounds, so the higher mean is
the tighter one, and the split says which it used. Gaps are paired per point, and means
carry standard errors over points.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import limits
from ..errors import ConfigError
from ..evaluation import LikelihoodResult, eval_mode, log_likelihood, model_device, model_dtype, seeded
from .ais import AISResult, AISSettings, ais
from .local_opt import FAMILIES, LocalOptResult, LocalOptSettings, elbo_estimate, optimize_local


def mean_stderr(t: Tensor) -> dict[str, float]:
    """Mean over points and its standard error (sample std / sqrt n)."""
    n = t.numel()
    return {"mean": float(t.mean()), "stderr": float(t.std() / math.sqrt(n)) if n > 1 else float("nan")}


@dataclass
class GapSettings:
    family: str = "encoder"
    #: importance samples of L_K
    is_k: int = 5000
    #: samples of the amortized ELBO estimate
    elbo_samples: int = 1000
    local: LocalOptSettings = field(default_factory=LocalOptSettings)
    #: None: no AIS (log p(x) is then L_K)
    ais: AISSettings | None = field(default_factory=AISSettings)
    seed: int = 0

    def check(self) -> None:
        """Every setting within the project's limits (limits.py): a :class:`ConfigError` naming
        it, before any of the (long) computation starts."""
        FAMILIES.check(self.family, "q* family")
        limits.count(self.is_k, "is_k", limits.MAX_EVAL_SAMPLES)
        limits.count(self.elbo_samples, "elbo_samples", limits.MAX_EVAL_SAMPLES)
        limits.seed(self.seed, "seed")
        self.local.check()
        if self.ais is not None:
            self.ais.check()


@dataclass
class GapSplit:
    #: [N] ELBO(q_phi) per point and its Monte Carlo standard error
    elbo_amortized: Tensor
    elbo_amortized_mc: Tensor
    local: LocalOptResult
    is_estimate: LikelihoodResult
    ais: AISResult | None
    settings: GapSettings
    #: stage -> wall seconds (amortized ELBO, q*, IS, AIS)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def log_px_source(self) -> str:
        """"ais" or "is": the estimate of log p(x) with the higher mean (both are lower bounds)."""
        if self.ais is not None and float(self.ais.per_point.mean()) >= self.is_estimate.mean:
            return "ais"
        return "is"

    @property
    def log_px(self) -> Tensor:
        return self.ais.per_point if self.log_px_source == "ais" else self.is_estimate.per_point

    @property
    def elbo_optimal(self) -> Tensor:
        return self.local.elbo

    def approximation_gap(self) -> Tensor:
        return self.log_px - self.elbo_optimal

    def amortization_gap(self) -> Tensor:
        return self.elbo_optimal - self.elbo_amortized

    def inference_gap(self) -> Tensor:
        return self.log_px - self.elbo_amortized

    def summary(self) -> dict:
        out = {
            "points": self.elbo_amortized.numel(),
            "family": self.settings.family,
            "log_px_source": "AIS" if self.log_px_source == "ais" else f"IS (L_K, K={self.is_estimate.k})",
            "elbo_amortized": mean_stderr(self.elbo_amortized),
            "elbo_optimal": mean_stderr(self.elbo_optimal),
            f"is_k{self.is_estimate.k}": mean_stderr(self.is_estimate.per_point),
            "log_px": mean_stderr(self.log_px),
            "approximation_gap": mean_stderr(self.approximation_gap()),
            "amortization_gap": mean_stderr(self.amortization_gap()),
            "inference_gap": mean_stderr(self.inference_gap()),
            "q_star_steps_mean": float(self.local.steps.double().mean()),
            "q_star_converged": int(self.local.converged.sum()),
            "q_star_worse_than_encoder": int((self.amortization_gap() < 0).sum()),
            "elbo_mc_stderr_max": float(torch.maximum(self.elbo_amortized_mc, self.local.elbo_mc_stderr).max()),
        }
        if self.ais is not None:
            out["ais"] = self.ais.to_dict()
            out["ais_minus_is"] = mean_stderr(self.ais.per_point - self.is_estimate.per_point)
        return out

    def to_dict(self) -> dict:
        per_point = {
            "elbo_amortized": self.elbo_amortized.tolist(),
            "elbo_optimal": self.elbo_optimal.tolist(),
            f"is_k{self.is_estimate.k}": self.is_estimate.per_point.tolist(),
            "q_star_steps": self.local.steps.tolist(),
        }
        if self.ais is not None:
            per_point["ais"] = self.ais.per_point.tolist()
        settings = {"family": self.settings.family, "is_k": self.settings.is_k,
                    "elbo_samples": self.settings.elbo_samples, "seed": self.settings.seed,
                    "local": self.local.settings.to_dict(),
                    "ais": self.ais.settings.to_dict() if self.ais is not None else None}
        return {"summary": self.summary(), "settings": settings, "seconds": self.seconds, "per_point": per_point}


def amortized_elbo(model, data: Tensor, k: int, batch_size: int = 100, seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """ELBO(q_phi) per row of ``data`` from ``k`` encoder samples, and its Monte Carlo standard error."""
    device = model_device(model)
    dtype = model_dtype(model) or data.dtype
    means, ses = [], []
    with seeded(seed, device), eval_mode(model):
        for start in range(0, data.shape[0], batch_size):
            x = data[start:start + batch_size].to(device, dtype)
            m, se = elbo_estimate(lambda c, x=x: model.log_weights(x, c), k)
            means.append(m.cpu())
            ses.append(se.cpu())
    return torch.cat(means), torch.cat(ses)


def gap_split(model, data: Tensor, settings: GapSettings | None = None, progress: bool = False) -> GapSplit:
    """ELBO(q_phi), ELBO(q*), L_K and AIS for every row of ``data`` ``[N, Dx]``, and the split."""
    s = settings or GapSettings()
    s.check()
    flow = getattr(model, "posterior_flow", "none")
    if flow != "none" and s.family != "encoder":
        raise ConfigError(f"q* family {s.family!r}: this model's posterior is a {flow} flow, so the amortization gap "
                          "ELBO(q*) - ELBO(q_phi) would compare two families; use the family 'encoder' (the flow's)")
    seconds: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - t0, 2)
        return out

    elbo_amortized, elbo_mc = timed("elbo_amortized", lambda: amortized_elbo(
        model, data, s.elbo_samples, s.local.batch_size, s.seed))
    local = timed("q_star", lambda: optimize_local(model, data, s.family, s.local, seed=s.seed + 1, progress=progress))
    is_estimate = timed("is", lambda: log_likelihood(model, data, k=s.is_k, batch_size=s.local.batch_size,
                                                     seed=s.seed + 2))
    ais_result = timed("ais", lambda: ais(model, data, s.ais, seed=s.seed + 3, progress=progress)) \
        if s.ais is not None else None
    return GapSplit(elbo_amortized, elbo_mc, local, is_estimate, ais_result, s, seconds)

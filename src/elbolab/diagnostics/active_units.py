"""Active units (Burda et al. 2016): unit u is active when A_u = Cov_x(E_q(u|x)[u]) > 0.01.

E_q[u|x] is exact for the first-sampled layer (a Gaussian mean). A layer sampled after it
has the mean E_q(s|x)[mu(x, s)] over the first layer's draw s, with no closed form; a
plug-in mu(x, E_q[s|x]) is not it through a nonlinear network. It is estimated from draws
of s, split into two independent halves a(x), b(x): the covariance over x of noisy
per-point means would be inflated by their Monte Carlo variance, while Cov_x(a, b) is
unbiased (the halves' noise is independent, so it cancels in expectation). A flow
posterior's mean has no closed form in any layer: every layer is then estimated from
draws of z itself (``LatentVariableModel.sampled_means``), the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..evaluation import eval_mode, model_device, seeded

#: draws of the first-sampled layer per point (two halves of 32); one-layer models draw none
DEFAULT_SAMPLES = 64
#: "definition": the unbiased two-half estimate above; "iwae-code": the IWAE authors' code,
#: the upper layer's mean at ONE draw of the lower layer, variance over x dividing by N
METHODS = ("definition", "iwae-code")


@dataclass
class ActiveUnits:
    #: per stochastic layer (bottom first): [D_l] covariance over x of the posterior mean
    activity: list[Tensor]
    threshold: float
    #: per layer [D_l]: Monte Carlo standard error of ``activity`` (0 where it is exact);
    #: None where it cannot be estimated (one draw per half, or method "iwae-code")
    mc_stderr: list[Tensor] | None = None
    #: draws of the first-sampled layer per point (0 when every layer's mean is exact)
    samples: int = 0
    method: str = "definition"

    @property
    def counts(self) -> list[int]:
        return [int((a > self.threshold).sum()) for a in self.activity]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __str__(self) -> str:
        """Like the IWAE paper: "19" or "26+7"."""
        return "+".join(str(c) for c in self.counts)

    def to_dict(self) -> dict:
        return {
            "counts": self.counts,
            "total": self.total,
            "threshold": self.threshold,
            "method": self.method,
            "samples": self.samples,
            "activity": [a.tolist() for a in self.activity],
            "mc_stderr": None if self.mc_stderr is None else [s.tolist() for s in self.mc_stderr],
        }


class _Moments:
    """Running float64 sums over points of one layer's per-point estimates a, b ``[B, D]``
    and their Monte Carlo variances va, vb, enough for Cov_x(a, b) and its MC error."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, Tensor] = {}

    def add(self, a: Tensor, b: Tensor, va: Tensor | None, vb: Tensor | None) -> None:
        terms = {"a": a, "b": b, "ab": a * b}
        if va is not None and vb is not None:
            terms.update({"va": va, "vb": vb, "vavb": va * vb, "bva": b * va, "bbva": b * b * va,
                          "avb": a * vb, "aavb": a * a * vb})
        for key, t in terms.items():
            s = t.sum(0)
            self.sums[key] = self.sums[key] + s if key in self.sums else s
        self.n += a.shape[0]

    def covariance(self, ddof: int) -> Tensor:
        s, n = self.sums, self.n
        return ((s["ab"] - s["a"] * s["b"] / n) / max(n - ddof, 1)).clamp_min(0)

    def mc_stderr(self) -> Tensor | None:
        """sqrt of sum_i [(m_i - m̄)^2 (va_i + vb_i) + va_i vb_i] / (n - 1)^2, the MC variance of
        the covariance given the points, with (b_i - b̄)^2 va_i - va_i vb_i standing in for
        (m_i - m̄)^2 va_i (unbiased: b and va come from different halves)."""
        s, n = self.sums, self.n
        if "va" not in s:
            return None
        abar, bbar = s["a"] / n, s["b"] / n
        b_part = s["bbva"] - 2 * bbar * s["bva"] + bbar * bbar * s["va"]
        a_part = s["aavb"] - 2 * abar * s["avb"] + abar * abar * s["vb"]
        return ((b_part + a_part - s["vavb"]).clamp_min(0) / max(n - 1, 1) ** 2).sqrt()


def _half(model, x: Tensor, draws: int, chunk_size: int) -> list[tuple[Tensor, Tensor | None, bool]]:
    """Per layer: the per-point mean ``[B, D]`` of ``draws`` conditional means, the MC
    variance of that mean (zeros when exact, None from one draw), and whether it is exact.
    Exact layers (no sample axis) are read from the first call only."""
    sums: list[Tensor] = []
    squares: list[Tensor] = []
    exact: list[Tensor | None] = []
    done = 0
    while True:
        k = min(chunk_size, draws - done)
        means = model.conditional_means(x, k)
        if not sums:
            exact = [m.double() if m.dim() == 2 else None for m in means]
            sums = [torch.zeros(m.shape[-2:], dtype=torch.float64, device=m.device) for m in means]
            squares = [torch.zeros_like(s) for s in sums]
        for i, m in enumerate(means):
            if exact[i] is None:
                if m.dim() != 3 or m.shape[0] != k:
                    raise ValueError(f"conditional_means: layer {i + 1} gave shape {tuple(m.shape)} for {k} draws")
                m = m.double()
                sums[i] += m.sum(0)
                squares[i] += m.pow(2).sum(0)
        done += k
        if done >= draws or all(e is not None for e in exact):
            break
    out: list[tuple[Tensor, Tensor | None, bool]] = []
    for i, e in enumerate(exact):
        if e is not None:
            out.append((e, torch.zeros_like(e), True))
        else:
            mean = sums[i] / draws
            var = (squares[i] - sums[i] * mean) / ((draws - 1) * draws) if draws > 1 else None
            out.append((mean, var, False))
    return out


@torch.no_grad()
def active_units(
    model,
    data: Tensor,
    threshold: float = 0.01,
    batch_size: int = 100,
    samples: int = DEFAULT_SAMPLES,
    chunk_size: int = 32,
    method: str = "definition",
    seed: int | None = 0,
) -> ActiveUnits:
    """A_u = Cov_x(E_q[u | x]) per unit and stochastic layer over the rows of ``data`` ``[N, D]``.

    Reads ``model.conditional_means(x, k)``: a layer with an exact mean is used as it is,
    so one-layer models draw nothing and their result is exact. For the others ``samples``
    draws of the first-sampled layer per point form two halves a, b and
    A_u = sum_x (a - ā)(b - b̄) / (N - 1), unbiased whatever ``samples``; ``mc_stderr``
    estimates its Monte Carlo error. Memory holds the model's activations for
    ``batch_size * chunk_size`` draws. ``method="iwae-code"`` is the IWAE authors' statistic
    instead: one draw, the variance over x dividing by N (docs/diagnostics.md).
    ``seed`` makes it reproducible and leaves the caller's RNG stream alone.
    """
    if method not in METHODS:
        raise ValueError(f"active_units: method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "definition" and (samples < 2 or samples % 2):
        raise ValueError(f"active_units: samples must be an even number >= 2, got {samples}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"active_units: batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    if data.shape[0] < 1:
        raise ValueError("active_units: no data points")
    device = model_device(model)
    draws = samples // 2 if method == "definition" else 1
    moments: list[_Moments] = []
    exact: list[bool] = []
    with seeded(seed, device), eval_mode(model):
        for start in range(0, data.shape[0], batch_size):
            x = data[start : start + batch_size].to(device)
            half_a = _half(model, x, draws, chunk_size)
            fresh = method == "definition" and not all(ex for _, _, ex in half_a)
            half_b = _half(model, x, draws, chunk_size) if fresh else half_a
            if not moments:
                moments = [_Moments() for _ in half_a]
                exact = [ex for _, _, ex in half_a]
            for mom, (a, va, _), (b, vb, _) in zip(moments, half_a, half_b, strict=True):
                mom.add(a, b, va, vb)
    activity = [m.covariance(ddof=1 if method == "definition" else 0).cpu() for m in moments]
    errors = [m.mc_stderr() for m in moments] if method == "definition" else [None]
    stderr = None if any(e is None for e in errors) else [e.cpu() for e in errors if e is not None]
    draws_used = 0 if all(exact) else (samples if method == "definition" else 1)
    return ActiveUnits(activity, threshold, stderr, draws_used, method)

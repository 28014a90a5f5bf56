"""ELBO surgery (Hoffman and Johnson, 2016): where the KL term of the ELBO goes.

For N data points with encoder q(z|x_i) and the aggregate posterior
q(z) = (1/N) sum_j q(z|x_j)::

    ELBO            = reconstruction - average KL
    average KL      = (1/N) sum_i KL(q(z|x_i) || p(z))
                    = I[i; z] + KL(q(z) || p(z))
    I[i; z] (MI)    = E_i E_{q(z|x_i)} [log q(z|x_i) - log q(z)]        0 <= MI <= log N
    marginal KL     = E_{q(z)} [log q(z) - log p(z)]

MI and marginal KL are estimated directly from S draws z ~ q(z|x_i) for every i
(a stratified sample of the aggregate posterior) with log q(z) summed over all N
components, never a sub-sample, so the only error is Monte Carlo over z.

``average KL - (MI + marginal KL)`` is an independent check only when the average KL
is analytic (a prior in ``ANALYTIC_KL``, e.g. the standard normal): then it is zero up
to Monte Carlo error. Otherwise the average KL is Monte Carlo from the same draws, and
log q(z|x) - log p(z) = [log q(z|x) - log q(z)] + [log q(z) - log p(z)] draw by draw,
so the difference is zero by construction and checks nothing: ``identity_is_check``
is False, the table says so and ``to_dict`` gives no number for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..distributions import DiagonalGaussian, log_normal_diag, log_normal_diag_mixture
from ..evaluation import batches, eval_mode, model_device, seeded
from ..priors import Prior, StandardNormal

#: prior class -> closed-form KL(q || prior) per point, ``[B]``; looked up along the MRO
ANALYTIC_KL: dict[type, Callable[[Prior, DiagonalGaussian], Tensor]] = {
    StandardNormal: lambda prior, q: q.kl_standard(),
}


class SurgeryError(ValueError):
    """The model does not have what ELBO surgery needs (one Gaussian stochastic layer)."""


def analytic_kl(prior: Prior, q: DiagonalGaussian) -> Tensor | None:
    """KL(q(z|x) || p(z)) in closed form, ``[B]``, or None when the prior has none."""
    if not getattr(prior, "has_analytic_kl", False):
        return None
    for cls in type(prior).__mro__:
        if cls in ANALYTIC_KL:
            return ANALYTIC_KL[cls](prior, q)
    return None


def aggregate_log_density(
    z: Tensor, mean: Tensor, log_var: Tensor, max_elements: int = 1 << 24
) -> Tensor:
    """log q(z) = log (1/N) sum_j N(z; m_j, diag v_j) for z ``[M, D]``, components ``[N, D]``: ``[M]``.

    The aggregate posterior is a uniform mixture of the N posteriors, so this is the
    mixture density of :func:`~elbolab.distributions.log_normal_diag_mixture`: the
    ``[M, N]`` table as two float64 GEMMs in bounded row chunks (N = 10,000 costs ~1e10
    flops), centred for accuracy.
    """
    log_mix = torch.full((mean.shape[0],), -math.log(mean.shape[0]), dtype=torch.float64, device=mean.device)
    return log_normal_diag_mixture(z.double(), mean, log_var, log_mix, max_elements)


def mutual_information_terms(z: Tensor, mean: Tensor, log_var: Tensor) -> tuple[Tensor, Tensor]:
    """For z ``[S, N, D]`` drawn from q(z|x_i) (column i from component i):
    ``log q(z|x_i)`` and ``log q(z)``, both ``[S, N]`` float64."""
    s, n, d = z.shape
    log_q_cond = log_normal_diag(z.double(), mean.double(), log_var.double())
    log_q_agg = aggregate_log_density(z.reshape(s * n, d), mean, log_var).reshape(s, n)
    return log_q_cond, log_q_agg


@dataclass
class Surgery:
    """All values are per-data-point averages in nats.

    ``*_stderr`` is the standard error of the mean of the N * S per-draw terms. The
    quantities are defined on this fixed data set, so their only randomness is over z;
    this standard error also contains the spread between points, so it bounds the
    Monte Carlo error from above (conservative, exact when S is large).
    """

    n: int
    samples_per_point: int
    elbo: float
    reconstruction: float
    reconstruction_stderr: float
    average_kl: float
    average_kl_analytic: bool
    average_kl_stderr: float
    mutual_information: float
    mutual_information_stderr: float
    marginal_kl: float
    marginal_kl_stderr: float
    log_n: float

    @property
    def identity_is_check(self) -> bool:
        """Whether ``identity_error`` tests anything: only with an analytic average KL."""
        return self.average_kl_analytic

    @property
    def identity_error(self) -> float:
        """average KL - (MI + marginal KL): zero up to Monte Carlo error when ``identity_is_check``,
        zero to rounding by construction otherwise."""
        return self.average_kl - self.mutual_information - self.marginal_kl

    @property
    def identity_stderr(self) -> float:
        return math.sqrt(self.average_kl_stderr**2 + self.mutual_information_stderr**2 + self.marginal_kl_stderr**2)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["identity_is_check"] = self.identity_is_check
        d["identity_error"] = self.identity_error if self.identity_is_check else None
        d["identity_stderr"] = self.identity_stderr if self.identity_is_check else None
        return d

    def table(self) -> str:
        kl_how = "analytic" if self.average_kl_analytic else "Monte Carlo"
        rows = [
            "| term | nats | ± stderr (conservative) |",
            "|---|---:|---:|",
            f"| ELBO = reconstruction − average KL | {self.elbo:.2f} | {self.reconstruction_stderr:.2f} |",
            f"| reconstruction E_q[log p(x\\|z)] | {self.reconstruction:.2f} | {self.reconstruction_stderr:.2f} |",
            f"| average KL ({kl_how}) | {self.average_kl:.3f} | {self.average_kl_stderr:.3f} |",
            f"| mutual information I[i; z] | {self.mutual_information:.3f} | {self.mutual_information_stderr:.3f} |",
            f"| (upper bound log N, N = {self.n}) | {self.log_n:.3f} | |",
            f"| marginal KL(q(z) \\|\\| p(z)) | {self.marginal_kl:.3f} | {self.marginal_kl_stderr:.3f} |",
        ]
        if self.identity_is_check:
            rows.append(f"| check: average KL − (MI + marginal KL), 0 up to MC error | {self.identity_error:.3f} | "
                        f"{self.identity_stderr:.3f} |")
        else:
            rows.append("| average KL − (MI + marginal KL): no check, 0 by construction "
                        "(Monte Carlo KL from the same draws) | — | |")
        return "\n".join(rows)


def _mean_and_stderr(t: Tensor) -> tuple[float, float]:
    t = t.reshape(-1)
    se = float(t.std(unbiased=True) / math.sqrt(t.numel())) if t.numel() > 1 else math.nan
    return float(t.mean()), se


def _single_layer(model) -> None:
    dims = getattr(model, "latent_dims", None)
    if dims is None or not hasattr(model, "posterior") or not hasattr(model, "prior"):
        raise SurgeryError(f"{type(model).__name__}: ELBO surgery needs posterior(x), prior and latent_dims")
    if getattr(model, "implicit_posterior", False):
        raise SurgeryError(f"{type(model).__name__}: ELBO surgery needs log q(z|x) at every point's z, and an "
                           "implicit q(z|x) (AVB) has no density")
    flow = getattr(model, "posterior_flow", "none")
    if flow != "none":
        raise SurgeryError(
            f"ELBO surgery needs q(z|x_j) at every other point's z (the aggregate posterior), which a flow "
            f"posterior ({flow}) gives only at its own samples"
        )
    if len(dims) != 1:
        raise SurgeryError(
            f"{type(model).__name__}: ELBO surgery needs one stochastic layer (q(z|x) Gaussian, p(z) the prior); "
            f"this model has {len(dims)}"
        )


@torch.inference_mode()
def elbo_surgery(model, data: Tensor, samples: int = 1, batch_size: int = 100, seed: int | None = 0) -> Surgery:
    """ELBO surgery of a one-stochastic-layer model on all N rows of ``data``.

    ``samples`` draws z ~ q(z|x_i) per point; each is scored against all N
    components of the aggregate posterior. Memory: the N encoder outputs (float64) and
    one ``[rows, N]`` chunk of the density table (128 MB); time ~ 4 N^2 D S flops.
    """
    _single_layer(model)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = model_device(model)
    n = data.shape[0]
    means, log_vars, zs, log_prior, recon, kl = [], [], [], [], [], []
    analytic = True
    with seeded(seed, device), eval_mode(model):
        for sl in batches(n, batch_size):
            x = data[sl].to(device)
            q = model.posterior(x)
            terms = model.log_weight_terms(x, samples)
            (z,) = terms.z.values()  # [S, B, D]
            means.append(q.mean.double())
            log_vars.append(q.log_var.double())
            zs.append(z)
            log_prior.append(model.prior.log_prob(z).double())
            recon.append(terms.log_likelihood.double())  # [S, B]
            closed = analytic_kl(model.prior, q)
            analytic = analytic and closed is not None
            kl.append(closed.double().expand(samples, -1) if closed is not None else terms.kl().double())
        mean, log_var = torch.cat(means), torch.cat(log_vars)
        z = torch.cat(zs, dim=1)
        log_q_cond, log_q_agg = mutual_information_terms(z, mean, log_var)
    log_p = torch.cat(log_prior, dim=1)
    rec, rec_se = _mean_and_stderr(torch.cat(recon, dim=1))
    kl_all = torch.cat(kl, dim=1)
    avg_kl, avg_kl_se = _mean_and_stderr(kl_all[0] if analytic else kl_all)
    if analytic:
        avg_kl_se = 0.0
    mi, mi_se = _mean_and_stderr(log_q_cond - log_q_agg)
    mkl, mkl_se = _mean_and_stderr(log_q_agg - log_p)
    return Surgery(
        n=n, samples_per_point=samples, elbo=rec - avg_kl, reconstruction=rec, reconstruction_stderr=rec_se,
        average_kl=avg_kl, average_kl_analytic=analytic, average_kl_stderr=avg_kl_se,
        mutual_information=mi, mutual_information_stderr=mi_se, marginal_kl=mkl, marginal_kl_stderr=mkl_se,
        log_n=math.log(n),
    )

"""The implicit posterior q_EW of importance weighting (Cremer, Morris and Duvenaud, 2017).

Draw z_1..z_K ~ q(z|x) and keep z_i with probability w_i / sum_j w_j, w = p(x, z) / q(z|x).
The kept z has density

    q_EW(z|x) = q(z|x) * r_K(z),   r_K(z) = E_{z_2..z_K ~ q} [ K w(z) / (w(z) + sum_{j>=2} w(z_j)) ],

which is q at K = 1 and tends to p(z|x) as K grows; L_K <= ELBO(q_EW) <= log p(x).
Sampling by resampling is exact for every K. The density needs r_K, an expectation over
K - 1 draws, estimated two ways:

* **Numerical integration** (latents of dimension 1 or 2, models with ``log_joint``): with
  1/(a + S) = int_0^inf exp(-t (a + S)) dt and S a sum of K - 1 i.i.d. weights,
  r_K(z) = K w(z) int_0^inf exp(-t w(z)) phi(t)^(K-1) dt, phi(t) = E_q[exp(-t w)].
  phi is a quadrature over a grid of z, the t-integral a trapezoid rule in log t; every
  step is in log space. Deterministic; its accuracy shows in how close the grid
  integral of q_EW is to one (``normalization``).
* **Nested Monte Carlo** (any dimension): r_K(z) ~ (1/M) sum_m K w(z) / (w(z) + S_m) with M
  fresh sets of K - 1 draws. log of an unbiased estimate underestimates log r_K (Jensen),
  so ELBO(q_EW) = E_{q_EW}[log w(z) - log r_K(z)] is *over*-estimated, by about
  Var(r_hat) / (2 r^2) = O(1/M); ``bias_estimate`` reports that delta-method value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..evaluation import batches, eval_mode, model_device, seeded


def resample(log_w: Tensor, z: Tensor) -> Tensor:
    """Pick one of K draws per row with probability proportional to its weight.

    ``log_w`` ``[n, K, B]`` and ``z`` ``[n, K, B, D]`` -> ``[n, B, D]``.
    """
    index = torch.distributions.Categorical(logits=log_w.movedim(1, -1)).sample()  # [n, B]
    gather = index[:, None, :, None].expand(-1, 1, -1, z.shape[-1])
    return z.gather(1, gather).squeeze(1)


@torch.inference_mode()
def sample_q_ew(model, x: Tensor, k: int, n: int, seed: int | None = 0, max_samples: int = 1 << 20
                ) -> dict[str, Tensor]:
    """``n`` exact draws from q_EW(z|x) per row of ``x`` ``[B, Dx]``: layer name -> ``[n, B, D_l]``.

    Each draw uses K fresh samples from q; draws are made in chunks of at most
    ``max_samples`` samples in all.
    """
    if k < 1 or n < 1:
        raise ValueError(f"k and n must be >= 1, got k={k}, n={n}")
    device = model_device(model)
    x = x.to(device)
    per_call = max(1, max_samples // (k * x.shape[0]))
    out: dict[str, list[Tensor]] = {}
    with seeded(seed, device), eval_mode(model):
        for sl in batches(n, per_call):
            c = sl.stop - sl.start
            terms = model.log_weight_terms(x, c * k)
            log_w = terms.log_weights().reshape(c, k, -1)
            for name, z in terms.z.items():
                out.setdefault(name, []).append(resample(log_w, z.reshape(c, k, *z.shape[1:])))
    return {name: torch.cat(v) for name, v in out.items()}


# --- numerical integration on a grid (latent dimension <= 2) ----------------------


def log_ratio_by_integration(log_w_hat: Tensor, log_pi: Tensor, k: int, du: float = 0.2,
                             chunk: int = 1 << 22) -> Tensor:
    """log r_K at every grid point, ``[G]`` float64.

    ``log_w_hat`` ``[G]``: log weights on the grid, shifted by any constant (r_K is
    invariant to scaling all weights); ``log_pi`` ``[G]``: log q-probability of each
    grid cell (summing to one), so phi(t) = sum_g pi_g exp(-t w_g).
    With t = e^u / K the integral runs over u in [u_lo, u_hi] with trapezoid steps of
    ``du`` (at most 4000 nodes; the integrand is smooth and decays doubly exponentially
    in u, so 0.2 gives ~1e-12 relative accuracy on the tests' models). Below
    u_lo = log(K / w_max) - 30 the integrand is 1 to within e^-30, so that head is added
    exactly as e^u_lo; above u_hi, phi^(K-1) < e^-60 (or exp(-t w_min) is).
    """
    if k == 1:
        return torch.zeros_like(log_w_hat)
    lw = log_w_hat.double()
    log_pi = log_pi.double()
    log_k = math.log(k)
    # phi only needs the cells with q-mass (those below e^-50 of the largest change it by < e^-40)
    keep = log_pi > log_pi.max() - 50.0
    lw_phi, log_pi_phi = lw[keep], log_pi[keep]
    u_lo = log_k - float(lw.max()) - 30.0

    def log_phi(u: Tensor) -> Tensor:  # [J] -> [J]: log E_q exp(-e^u w / K)
        out = torch.empty_like(u)
        rows = max(1, chunk // lw_phi.numel())
        for sl in batches(u.numel(), rows):
            out[sl] = torch.logsumexp(log_pi_phi - torch.exp(u[sl, None] + lw_phi - log_k), dim=-1)
        return out

    # upper end: where phi^(K-1) has decayed below e^-60, else where exp(-t w_min) has
    # scanned in blocks from u_lo, stopping at the first block where it has decayed
    coarse = torch.arange(u_lo, log_k - float(lw_phi.min()) + 5.0, 0.5, dtype=torch.float64)
    u_hi = float(coarse[-1])
    for sl in batches(coarse.numel(), 32):
        decayed = ((k - 1) * log_phi(coarse[sl]) < -60.0).nonzero()
        if decayed.numel():
            u_hi = float(coarse[sl][decayed[0, 0]])
            break
    nodes = min(4000, max(100, math.ceil((u_hi - u_lo) / du) + 1))
    u = torch.linspace(u_lo, u_hi, nodes, dtype=torch.float64)
    du = (u_hi - u_lo) / (nodes - 1)
    base = (k - 1) * log_phi(u) + u  # [J]
    out = torch.empty_like(lw)
    rows = max(1, chunk // nodes)
    for sl in batches(lw.numel(), rows):
        integrand = base[:, None] - torch.exp(u[:, None] + lw[None, sl] - log_k)  # [J, g]
        body = torch.logsumexp(integrand, dim=0) + math.log(du)
        out[sl] = lw[sl] + torch.logaddexp(body, torch.full_like(body, u_lo))
    return out


@dataclass
class QEWGrid:
    """q, the true posterior and q_EW for several K on a regular grid, for one data point."""

    #: per latent dimension, the grid coordinates ``[n_d]``
    axes: list[Tensor]
    log_cell: float
    #: ``[G]`` float64 over the flattened grid (first axis slowest)
    log_q: Tensor
    log_joint: Tensor
    #: K -> ``[G]`` log q_EW
    log_q_ew: dict[int, Tensor] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.numel() for a in self.axes)

    @property
    def log_marginal(self) -> float:
        """log p(x) by quadrature of p(x, z) over the grid."""
        return float(torch.logsumexp(self.log_joint + self.log_cell, 0))

    @property
    def log_posterior(self) -> Tensor:
        return self.log_joint - self.log_marginal

    def normalization(self, k: int) -> float:
        """Grid integral of q_EW; one up to quadrature error."""
        return float(torch.exp(torch.logsumexp(self.log_q_ew[k] + self.log_cell, 0)))

    def elbo(self, k: int) -> float:
        """ELBO(q_EW) = int q_EW (log p(x, z) - log q_EW) dz, nats (K = 1: the ELBO of q)."""
        lq = self.log_q_ew[k]
        return float((torch.exp(lq + self.log_cell) * (self.log_joint - lq)).sum())

    def density(self, log_density: Tensor) -> Tensor:
        """Reshape a ``[G]`` log-density to the grid and exponentiate."""
        return torch.exp(log_density).reshape(self.shape)


@torch.inference_mode()
def q_ew_on_grid(model, x: Tensor, ks: tuple[int, ...] = (1, 10, 100), points_per_dim: int | None = None,
                 width: float = 8.0, seed: int | None = 0) -> QEWGrid:
    """q_EW(z|x) for each K in ``ks`` by numerical integration, for one point ``x`` ``[Dx]``.

    The grid spans ``width`` standard deviations around both q(z|x) and an importance-
    sampled estimate of p(z|x) in each dimension (q_EW <= K q, so q's box holds it).
    Needs ``model.log_joint(x, z)`` and a latent of dimension 1 or 2.
    """
    if not hasattr(model, "log_joint"):
        raise ValueError(f"{type(model).__name__}: q_EW densities need model.log_joint(x, z)")
    if (flow := getattr(model, "posterior_flow", "none")) != "none":
        raise ValueError(f"q_EW on a grid needs log q(z|x) at grid points, which a flow posterior ({flow}) "
                         "gives only at its own samples (sample_q_ew and elbo_q_ew_nested work)")
    device = model_device(model)
    x = x.reshape(1, -1).to(device)
    with seeded(seed, device), eval_mode(model):
        q = model.posterior(x)
        d = q.mean.shape[-1]
        if d > 2:
            raise ValueError(f"numerical integration of q_EW needs a latent of dimension <= 2, got {d}")
        points_per_dim = points_per_dim or (2001 if d == 1 else 201)
        terms = model.log_weight_terms(x, 4000)
        (z,) = terms.z.values()
        w = torch.softmax(terms.log_weights().double()[:, 0], 0)[:, None]  # [S, 1]
        zs = z[:, 0].double()
        post_mean = (w * zs).sum(0)
        post_std = ((w * (zs - post_mean) ** 2).sum(0)).sqrt().clamp_min(1e-6)
        qm, qs = q.mean[0].double(), q.std[0].double()
        lo = torch.minimum(qm - width * qs, post_mean - width * post_std)
        hi = torch.maximum(qm + width * qs, post_mean + width * post_std)
        axes = [torch.linspace(float(lo[i]), float(hi[i]), points_per_dim, dtype=torch.float64) for i in range(d)]
        log_cell = sum(math.log(float(a[1] - a[0])) for a in axes)
        grid = torch.cartesian_prod(*axes).reshape(-1, d) if d > 1 else axes[0][:, None]  # [G, d]
        dtype = q.mean.dtype
        log_q = torch.cat([q.log_prob(g[:, None, :].to(device, dtype)).double()[:, 0].cpu()
                           for g in grid.split(50_000)])
        log_joint = torch.cat([model.log_joint(x, g[:, None, :].to(device, dtype)).double()[:, 0].cpu()
                               for g in grid.split(50_000)])
    log_pi = log_q + log_cell
    log_pi = log_pi - torch.logsumexp(log_pi, 0)
    log_w = log_joint - log_q
    log_w_hat = log_w - torch.logsumexp(log_pi + log_w, 0)
    out = QEWGrid(axes, log_cell, log_q, log_joint)
    for k in ks:
        out.log_q_ew[k] = log_q + log_ratio_by_integration(log_w_hat, log_pi, k)
    return out


# --- nested Monte Carlo (any latent dimension) ------------------------------------


@dataclass
class QEWEstimate:
    k: int
    #: ``[B]`` ELBO(q_EW) per point, nats (over-estimated by about ``bias``)
    elbo: Tensor
    #: ``[B]`` Monte Carlo standard error over the resampled draws
    stderr: Tensor
    #: ``[B]`` delta-method estimate of the upward bias from log of the inner average
    bias_estimate: Tensor
    draws: int
    inner: int


@torch.inference_mode()
def elbo_q_ew_nested(model, x: Tensor, k: int, draws: int = 100, inner: int = 50, seed: int | None = 0,
                     max_samples: int = 1 << 20) -> QEWEstimate:
    """ELBO(q_EW) for every row of ``x`` ``[B, Dx]`` by nested Monte Carlo.

    ``draws`` exact q_EW samples z* (resampling), each keeping its log w(z*); for each,
    ``inner`` fresh sets of K - 1 log weights give
    r_hat = (1/M) sum_m K w* / (w* + S_m), and the integrand is log w(z*) - log r_hat.
    Cost: draws * (inner + 1) * K samples per point.
    """
    if k < 1 or draws < 2 or inner < 1:
        raise ValueError(f"need k >= 1, draws >= 2, inner >= 1; got k={k}, draws={draws}, inner={inner}")
    device = model_device(model)
    x = x.to(device)
    b = x.shape[0]
    per_call = max(1, max_samples // (max(k, 1) * (inner + 1) * b))
    vals, bias = [], []
    with seeded(seed, device), eval_mode(model):
        for sl in batches(draws, per_call):
            c = sl.stop - sl.start
            lw = model.log_weights(x, c * k).double().reshape(c, k, b)
            pick = torch.distributions.Categorical(logits=lw.movedim(1, -1)).sample()  # [c, B]
            lw_star = lw.gather(1, pick[:, None, :]).squeeze(1)  # [c, B]
            if k == 1:
                log_r = torch.zeros_like(lw_star)
                var_rel = torch.zeros_like(lw_star)
            else:
                inner_lw = model.log_weights(x, c * inner * (k - 1)).double().reshape(c, inner, k - 1, b)
                log_s = torch.logsumexp(inner_lw, dim=2)  # [c, M, B]
                log_rm = math.log(k) + lw_star[:, None] - torch.logaddexp(lw_star[:, None], log_s)  # [c, M, B]
                log_r = torch.logsumexp(log_rm, 1) - math.log(inner)
                rel = torch.exp(log_rm - log_r[:, None])  # r_m / r_hat
                var_rel = rel.var(1, unbiased=True) / inner if inner > 1 else torch.zeros_like(log_r)
            vals.append(lw_star - log_r)
            bias.append(0.5 * var_rel)
    v = torch.cat(vals)  # [draws, B]
    return QEWEstimate(k, v.mean(0).cpu(), (v.std(0, unbiased=True) / math.sqrt(draws)).cpu(),
                       torch.cat(bias).mean(0).cpu(), draws, inner)

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
  phi is a quadrature over a grid of z (as one minus the missed mass, so that
  phi^(K-1) keeps its digits at large K), the t-integral a rectangle rule in log t
  summed in log space. Deterministic. The grid integral of q_EW equals that of q
  by construction, so it says nothing about resolution; instead the grid is made
  twice as dense until log p(x) and every ELBO(q_EW) move by less than a tolerance,
  and that change is reported (``QEWGrid.accuracy``).
* **Nested Monte Carlo** (any dimension): r_K(z) ~ (1/M) sum_m K w(z) / (w(z) + S_m) with M
  fresh sets of K - 1 draws. log of an unbiased estimate underestimates log r_K (Jensen),
  so ELBO(q_EW) = E_{q_EW}[log w(z) - log r_K(z)] is *over*-estimated, by about
  Var(r_hat) / (2 r^2) = O(1/M); ``bias_estimate`` reports that delta-method value.
"""

from __future__ import annotations

import math
import warnings
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


#: the factor exp(-t w) is 1 to within e^-30 for t w < e^-HEAD and below e^-90 for t w > e^TAIL
HEAD, TAIL = 30.0, 4.5


def log_ratio_by_integration(log_w_hat: Tensor, log_pi: Tensor, k: int, du: float = 0.2,
                             max_nodes: int = 10_000_000, chunk: int = 1 << 20) -> Tensor:
    """log r_K at every grid point, ``[G]`` float64.

    ``log_w_hat`` ``[G]``: log weights on the grid, shifted by any constant (r_K is
    invariant to scaling all weights); ``log_pi`` ``[G]``: log q-probability of each
    grid cell (summing to one), so phi(t) = sum_g pi_g exp(-t w_g).
    With t = e^u / K, r_K(z) = w(z) int e^u phi(e^u / K)^(K-1) exp(-e^u w(z) / K) du, a
    rectangle rule in u with step ``du``. The integrand is analytic in a strip of
    half-width pi/2 about the real axis and decays at both ends, so the rule's relative
    error falls like e^(-pi^2 / du), negligible at 0.2. Below u_lo = log(K / w_max) - HEAD
    the integrand is e^u to within e^-30, added exactly as e^u_lo; above
    log(K / w_min) + TAIL every factor exp(-t w) is below e^-90, so phi is.
    For each weight the factor exp(-t w) only differs from 0 and 1 over HEAD + TAIL nats
    of u, so both phi at every node and r_K at every grid point are a prefix sum plus a
    window of (HEAD + TAIL) / du nodes: time ~ G (HEAD + TAIL) / du, whatever the span of
    log w; memory O(G + nodes) plus ``chunk`` window entries at a time.
    """
    if k == 1:
        return torch.zeros_like(log_w_hat)
    lw = log_w_hat.double()
    log_pi = log_pi.double()
    log_k = math.log(k)
    # phi only needs the cells with q-mass (those below e^-50 of the largest change it by < e^-40)
    keep = log_pi > log_pi.max() - 50.0
    lw_phi, pi_phi = lw[keep], torch.exp(log_pi[keep])
    u_lo = log_k - float(lw.max()) - HEAD
    nodes = math.ceil((log_k - float(lw_phi.min()) + TAIL - u_lo) / du) + 1
    if nodes > max_nodes:
        raise ValueError(f"q_EW t-integral: log w spans {float(lw.max() - lw_phi.min()):.0f} nats over q's "
                         f"mass, {nodes} nodes at du={du:g} > max_nodes={max_nodes}")
    span = math.ceil((HEAD + TAIL) / du) + 1

    def first(lw_g: Tensor) -> Tensor:  # first node where t w >= e^-HEAD: the window's start
        return torch.ceil((log_k - HEAD - lw_g - u_lo) / du).clamp(0, nodes).long()

    # phi = 1 - miss at every node: cells before their window count fully in phi, after it in miss
    a_phi = first(lw_phi)
    phi = torch.zeros(nodes + span + 1, dtype=torch.float64)
    miss = torch.zeros_like(phi)
    phi.index_add_(0, a_phi, pi_phi)
    phi = phi.flip(0).cumsum(0).flip(0)[1:]  # phi[i] = sum of pi over cells with a > i
    miss.index_add_(0, a_phi + span, pi_phi)
    miss = miss.cumsum(0)[:-1]
    offsets = torch.arange(span)[:, None]  # [span, 1]
    for sl in batches(lw_phi.numel(), max(1, chunk // span)):
        idx = a_phi[sl] + offsets  # [span, g]
        tw = torch.exp(u_lo + idx.double() * du + (lw_phi[sl] - log_k))
        phi.index_add_(0, idx.reshape(-1), (pi_phi[sl] * torch.exp(-tw)).reshape(-1))
        miss.index_add_(0, idx.reshape(-1), (pi_phi[sl] * -torch.expm1(-tw)).reshape(-1))
    phi, miss = phi[:nodes], miss[:nodes]
    # log(1 - miss) keeps (K - 1) log phi accurate for large K, where phi is 1 to many digits
    log_phi = torch.where(miss < 0.5, torch.log1p(-miss.clamp(max=0.5)), torch.log(phi))
    u = u_lo + du * torch.arange(nodes, dtype=torch.float64)
    base = u + (k - 1) * log_phi  # [nodes] log of the integrand without exp(-t w)
    prefix = torch.cat([torch.full((1,), -math.inf, dtype=torch.float64), torch.logcumsumexp(base, 0)])
    base = torch.cat([base, torch.full((span,), -math.inf, dtype=torch.float64)])

    a = first(lw)
    body = torch.empty_like(lw)
    for sl in batches(lw.numel(), max(1, chunk // span)):
        idx = a[sl] + offsets  # [span, g]
        window = torch.logsumexp(base[idx] - torch.exp(u_lo + idx.double() * du + (lw[sl] - log_k)), 0)
        body[sl] = torch.logaddexp(prefix[a[sl]], window) + math.log(du)
    return lw + torch.logaddexp(body, torch.full_like(body, u_lo))


#: node spacing near centre m_j is sqrt(s_j^2 + (z - m_j)^2 / GRADING^2) / points_per_sd,
#: growing linearly away from it; the map's branch points lie GRADING s_j off the real
#: axis, ~ GRADING points_per_sd nodes, whatever the ratio of the scales
GRADING = 4.0


def _node_count(z: Tensor, centres: Tensor, scales: Tensor, per_sd: float) -> Tensor:
    """F(z) = int rho, the number of grid nodes below z (up to a constant), ``[n]`` float64.

    rho(z) = per_sd sum_j 1 / sqrt(s_j^2 + (z - m_j)^2 / GRADING^2): ``per_sd`` nodes per
    s_j at m_j, spacing growing linearly away from it. rho is analytic off the branch
    points m_j +- i GRADING s_j, so the trapezoid rule in F keeps spectral accuracy.
    """
    t = (z[:, None] - centres) / (GRADING * scales)  # [n, J]
    return per_sd * GRADING * torch.asinh(t).sum(1)


def _axis(centres: Tensor, scales: Tensor, per_sd: float, width: float) -> tuple[Tensor, Tensor]:
    """Nodes ``[n]`` of one axis spanning +- ``width`` s_j about every m_j, and their log weights ``[n]``.

    The nodes are z_i = F^-1(u_i) for u_i spaced by one (F as in ``_node_count``), so
    int f dz = int f(z(u)) / rho(z(u)) du is a trapezoid rule in u with weights 1 / rho(z_i).
    """
    lo = float((centres - width * scales).min())
    hi = float((centres + width * scales).max())
    ends = _node_count(torch.tensor([lo, hi], dtype=torch.float64), centres, scales, per_sd)
    n = math.ceil(float(ends[1] - ends[0])) + 1
    u = torch.linspace(float(ends[0]), float(ends[1]), n, dtype=torch.float64)
    a, b = torch.full_like(u, lo), torch.full_like(u, hi)
    for _ in range(60):  # bisection: F is increasing; 60 halvings reach float64 resolution of [lo, hi]
        mid = 0.5 * (a + b)
        below = _node_count(mid, centres, scales, per_sd) < u
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    z = 0.5 * (a + b)
    z[0], z[-1] = lo, hi
    rho = per_sd * (1 / torch.sqrt(scales**2 + ((z[:, None] - centres) / GRADING) ** 2)).sum(1)
    log_weight = math.log(float(u[1] - u[0])) - torch.log(rho)
    log_weight[[0, -1]] -= math.log(2.0)
    return z, log_weight


def _axis_size(centres: Tensor, scales: Tensor, per_sd: float, width: float) -> int:
    lo, hi = (centres - width * scales).min(), (centres + width * scales).max()
    ends = _node_count(torch.stack([lo, hi]).double(), centres, scales, per_sd)
    return math.ceil(float(ends[1] - ends[0])) + 1


@dataclass
class QEWGrid:
    """q, the true posterior and q_EW for several K on a tensor grid, for one data point.

    Each axis is graded (``_axis``): ``points_per_sd`` nodes per SD at the centres of q
    and of the posterior, coarser away from them. ``accuracy`` is the change from the
    previous grid, half as dense. The grid integral of q_EW equals that of q (r_K
    averages to one under the grid's q), so it checks only the box: ``q_mass``.
    """

    #: per latent dimension, the grid coordinates ``[n_d]`` (increasing, not equally spaced)
    axes: list[Tensor]
    #: ``[G]`` log quadrature weight of each grid point (log of its cell volume)
    log_cell: Tensor
    #: ``[G]`` float64 over the flattened grid (first axis slowest)
    log_q: Tensor
    log_joint: Tensor
    #: K -> ``[G]`` log q_EW
    log_q_ew: dict[int, Tensor] = field(default_factory=dict)
    #: nodes per standard deviation at the centres of q and of the posterior
    points_per_sd: float = math.nan
    #: quantity ("log_p", or K for ELBO(q_EW)) -> its change from the previous, half as
    #: dense grid, nats; the coarser grid's error, an upper estimate of this grid's
    changes: dict[str | int, float] = field(default_factory=dict)
    #: the requested accuracy, nats
    tol: float = math.nan

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.numel() for a in self.axes)

    @property
    def accuracy(self) -> float:
        """Largest change of log p(x) or any ELBO(q_EW) between the last two resolutions, nats."""
        return max((abs(v) for v in self.changes.values()), default=math.inf)

    @property
    def converged(self) -> bool:
        return self.accuracy <= self.tol

    @property
    def q_mass(self) -> float:
        """Grid integral of q: one up to the truncation of q's tails by the box."""
        return float(torch.exp(torch.logsumexp(self.log_q + self.log_cell, 0)))

    @property
    def log_marginal(self) -> float:
        """log p(x) by quadrature of p(x, z) over the grid."""
        return float(torch.logsumexp(self.log_joint + self.log_cell, 0))

    @property
    def log_posterior(self) -> Tensor:
        return self.log_joint - self.log_marginal

    def elbo(self, k: int) -> float:
        """ELBO(q_EW) = int q_EW (log p(x, z) - log q_EW) dz, nats (K = 1: the ELBO of q)."""
        lq = self.log_q_ew[k]
        return float((torch.exp(lq + self.log_cell) * (self.log_joint - lq)).sum())

    def values(self) -> dict[str | int, float]:
        """The quantities whose convergence is checked: log p(x) and ELBO(q_EW) per K."""
        return {"log_p": self.log_marginal, **{k: self.elbo(k) for k in self.log_q_ew}}

    def posterior_moments(self) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation ``[d]`` of p(z|x) per axis, by quadrature on the grid."""
        p = torch.exp(self.log_posterior + self.log_cell)
        z = self._points()
        mean = (p[:, None] * z).sum(0)
        return mean, (p[:, None] * (z - mean) ** 2).sum(0).sqrt()

    def density(self, log_density: Tensor) -> Tensor:
        """Reshape a ``[G]`` log-density to the grid and exponentiate."""
        return torch.exp(log_density).reshape(self.shape)

    def _points(self) -> Tensor:
        return torch.cartesian_prod(*self.axes) if len(self.axes) > 1 else self.axes[0][:, None]  # [G, d]


def _grid_at(model, x: Tensor, q, centres: Tensor, scales: Tensor, ks: tuple[int, ...], per_sd: float,
             width: float) -> QEWGrid:
    """Evaluate q, p(x, z) and q_EW for each K on the grid for ``centres``/``scales`` ``[d, J]``."""
    device = model_device(model)
    axes, weights = zip(*(_axis(centres[i], scales[i], per_sd, width) for i in range(centres.shape[0])),
                        strict=True)
    if len(axes) > 1:
        grid = torch.cartesian_prod(*axes)
        log_cell = (weights[0][:, None] + weights[1][None, :]).reshape(-1)
    else:
        grid, log_cell = axes[0][:, None], weights[0]
    dtype = q.mean.dtype
    log_q = torch.cat([q.log_prob(g[:, None, :].to(device, dtype)).double()[:, 0].cpu()
                       for g in grid.split(50_000)])
    log_joint = torch.cat([model.log_joint(x, g[:, None, :].to(device, dtype)).double()[:, 0].cpu()
                           for g in grid.split(50_000)])
    log_pi = log_q + log_cell
    log_pi = log_pi - torch.logsumexp(log_pi, 0)
    log_w = log_joint - log_q
    log_w_hat = log_w - torch.logsumexp(log_pi + log_w, 0)
    out = QEWGrid(list(axes), log_cell, log_q, log_joint, points_per_sd=per_sd)
    for k in ks:
        out.log_q_ew[k] = log_q + log_ratio_by_integration(log_w_hat, log_pi, k)
    return out


@torch.inference_mode()
def q_ew_on_grid(model, x: Tensor, ks: tuple[int, ...] = (1, 10, 100), tol: float = 1e-3,
                 width: float = 8.0, points_per_sd: float = 2.0, max_points: int = 1 << 20,
                 seed: int | None = 0, strict: bool = True) -> QEWGrid:
    """q_EW(z|x) for each K in ``ks`` by numerical integration, for one point ``x`` ``[Dx]``.

    Each axis spans +- ``width`` SDs of q(z|x) and of p(z|x) (q_EW <= K q, so q's box
    holds it; at large K it is the posterior's), with ``points_per_sd`` nodes per SD at
    both centres, so the narrower scale is resolved whatever the ratio. The posterior's
    location and scale come from importance sampling at first, then from the previous
    grid. The node density is doubled until log p(x) and every ELBO(q_EW) change by at
    most ``tol`` nats (``QEWGrid.changes``), within ``max_points`` grid points: memory
    ~ 8 (len(ks) + 20) bytes a point, time ~ points (HEAD + TAIL) / du per K.
    If the tolerance is not met: ValueError, or with ``strict=False`` a RuntimeWarning
    and the densest grid (``converged`` False).
    Needs ``model.log_joint(x, z)`` and a latent of dimension 1 or 2.
    """
    if not hasattr(model, "log_joint"):
        raise ValueError(f"{type(model).__name__}: q_EW densities need model.log_joint(x, z)")
    if not (tol > 0 and width > 0 and points_per_sd > 0):
        raise ValueError(f"tol, width and points_per_sd must be > 0, got {tol}, {width}, {points_per_sd}")
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
        terms = model.log_weight_terms(x, 4000)
        (z,) = terms.z.values()
        w = torch.softmax(terms.log_weights().double()[:, 0], 0)[:, None].cpu()  # [S, 1]
        zs = z[:, 0].double().cpu()
        post_mean = (w * zs).sum(0)
        post_std = (w * (zs - post_mean) ** 2).sum(0).sqrt()
        qm, qs = q.mean[0].double().cpu(), q.std[0].double().cpu()
        grid, before, per_sd = None, None, points_per_sd
        while True:
            post_std = torch.maximum(post_std, 1e-6 * qs)  # an importance sample can rest on one draw
            centres, scales = torch.stack([qm, post_mean], 1), torch.stack([qs, post_std], 1)  # [d, 2]
            if math.prod(_axis_size(centres[i], scales[i], per_sd, width) for i in range(d)) > max_points:
                break
            grid = _grid_at(model, x, q, centres, scales, ks, per_sd, width)
            grid.tol = tol
            now = grid.values()
            if before is not None:
                grid.changes = {key: now[key] - before[key] for key in now}
                if grid.converged:
                    return grid
            before = now
            post_mean, post_std = grid.posterior_moments()
            per_sd *= 2
    if grid is None or not grid.changes:
        reason = f"q_ew_on_grid: two resolutions need more than max_points={max_points} grid points"
    else:
        reason = (f"q_ew_on_grid: the last two resolutions differ by {grid.accuracy:.3g} nats > tol={tol:g} "
                  f"within max_points={max_points}")
    if strict or grid is None:
        raise ValueError(reason + "; raise max_points or tol")
    warnings.warn(reason + "; this grid is not converged", RuntimeWarning, stacklevel=2)
    return grid


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

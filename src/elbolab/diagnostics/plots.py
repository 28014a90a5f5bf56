"""Report figures, drawn with Matplotlib's non-interactive Agg backend; bounds in nats."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from ..files import OutputError  # noqa: E402
from .active_units import ActiveUnits  # noqa: E402
from .bound_vs_k import BoundVsK  # noqa: E402
from .q_ew import QEWGrid  # noqa: E402
from .surgery import Surgery  # noqa: E402


def _save(fig, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path


def plot_bound_vs_k(res: BoundVsK, path: Path, elbo: float | None = None) -> Path:
    """L_k against k (error bars: standard error over points), and the paired gap to the largest k."""
    ks = np.array(res.ks)
    mean, se = np.array(res.mean()), np.array(res.stderr())
    gap, gap_se = (np.array(v) for v in res.gap_to_largest())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.errorbar(ks, mean, yerr=se, marker="o", capsize=3, label="L_k (± stderr over points)")
    if elbo is not None:
        a.axhline(elbo, color="grey", ls=":", label="ELBO (L_1)")
    a.set_xscale("log")
    a.set_xlabel("k (importance samples)")
    a.set_ylabel("mean bound L_k (nats)")
    a.set_title(f"Bound versus k ({res.n} points)")
    a.legend(loc="lower right")
    b.errorbar(ks, gap, yerr=gap_se, marker="o", capsize=3, color="C1")
    b.axhline(0.0, color="grey", lw=0.8)
    b.set_xscale("log")
    b.set_xlabel("k (importance samples)")
    b.set_ylabel(f"L_k − L_{res.ks[-1]} (nats)")
    b.set_title("Gap to the largest k (paired: same samples)")
    fig.tight_layout()
    return _save(fig, path)


def plot_active_units(au: ActiveUnits, path: Path) -> Path:
    """Per layer: Cov_x(E_q[z_u]) per dimension on a log scale, the threshold drawn."""
    return _save(active_units_figure(au), path)


def active_units_figure(au: ActiveUnits):
    """The figure of :func:`plot_active_units`: whole-numbered unit ticks, the legend beside the bars."""
    layers = len(au.activity)
    fig, axes = plt.subplots(1, layers, figsize=(max(6, 0.12 * sum(a.numel() for a in au.activity) + 3), 3.8),
                             squeeze=False)
    for i, (ax, act) in enumerate(zip(axes[0], au.activity, strict=True)):
        v = act.numpy()
        floor = max(float(v[v > 0].min()) if (v > 0).any() else 1e-8, 1e-12) / 2
        colors = np.where(v > au.threshold, "C0", "C3")
        ax.bar(np.arange(v.size), np.maximum(v, floor), color=colors, width=0.8)
        ax.axhline(au.threshold, color="k", ls="--", lw=1, label=f"threshold {au.threshold:g}")
        ax.set_yscale("log")
        ax.set_xlabel(f"latent dimension (layer {i + 1})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.6, v.size - 0.4)
        ax.set_ylabel("Cov_x(E_q[z_u]) (latent units²)")
        ax.set_title(f"layer {i + 1}: {au.counts[i]} of {v.size} active")
    # outside the axes, so it never hides a bar
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle(f"Active units: {au} (IWAE paper's statistic)")
    fig.tight_layout()
    return fig


def monitored_rows(metrics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metrics.jsonl rows that hold the collapse monitor's numbers (train.monitor_every)."""
    return [r for r in metrics if "active_units" in r]


def plot_monitor(metrics: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Active units, I(x; z) and per-unit KL against the epoch, from metrics.jsonl's monitored
    rows (diagnostics.monitor); None when there are none."""
    rows = monitored_rows(metrics)
    if not rows:
        return None
    epochs = np.array([r["epoch"] for r in rows])
    kl_rows = [r for r in rows if r.get("kl_per_unit")]
    mi_rows = [r for r in rows if r.get("mutual_information") is not None]
    panels = 2 + bool(kl_rows)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    a, b = axes[0, 0], axes[0, 1]
    per_layer = np.array([r.get("active_units_per_layer", [r["active_units"]]) for r in rows])
    if per_layer.shape[1] > 1:
        for layer in range(per_layer.shape[1]):
            a.plot(epochs, per_layer[:, layer], marker="o", ms=5, label=f"layer {layer + 1}")
        a.legend(fontsize=8)
    a.plot(epochs, [r["active_units"] for r in rows], marker="o", ms=5, color="k", label="all layers")
    a.yaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_xlabel("epoch")
    a.set_ylabel("active units")
    a.set_title("Active units (Cov_x(E_q[z_u]) > threshold)")
    if mi_rows:
        e = np.array([r["epoch"] for r in mi_rows])
        mi = np.array([r["mutual_information"] for r in mi_rows])
        se = np.array([r.get("mutual_information_stderr") or 0.0 for r in mi_rows])
        b.plot(e, mi, marker="o", ms=5, color="C4", label="I(x; z), ± 2 stderr")
        b.fill_between(e, mi - 2 * se, mi + 2 * se, color="C4", alpha=0.25, lw=0)
        n = mi_rows[-1].get("monitor_points")
        if n:
            b.axhline(math.log(n), color="k", ls="--", lw=1, label=f"log N = {math.log(n):.2f} (the most)")
        b.legend(fontsize=8, loc="lower right")
        b.set_title(f"Mutual information I(x; z) on {n} images")
    else:
        b.text(0.5, 0.5, "I(x; z) not logged for this model", ha="center", va="center", transform=b.transAxes)
        b.set_title("Mutual information I(x; z)")
    b.set_xlabel("epoch")
    b.set_ylabel("nats")
    if kl_rows:
        c = axes[0, 2]
        kl = np.array([r["kl_per_unit"] for r in kl_rows]).T  # [units, epochs]
        floor = 1e-4
        e = [r["epoch"] for r in kl_rows]
        extent = (e[0] - 0.5, e[-1] + 0.5, kl.shape[0] - 0.5, -0.5)
        im = c.imshow(np.maximum(kl, floor), aspect="auto", interpolation="nearest", extent=extent,
                      norm=LogNorm(vmin=floor, vmax=max(float(kl.max()), 10 * floor)), cmap="viridis")
        fig.colorbar(im, ax=c, label="KL(q(z_u|x) || p(z_u)) (nats)")
        c.yaxis.set_major_locator(MaxNLocator(integer=True))
        c.xaxis.set_major_locator(MaxNLocator(integer=True))
        c.set_xlabel("epoch")
        c.set_ylabel("latent unit")
        c.set_title("KL per unit (dark: collapsed)")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    one = f"; one monitored epoch ({rows[0]['epoch']}): one point per panel" if len(rows) == 1 else ""
    if one:  # the locator would label fractions of an epoch around the one point
        for ax in axes[0]:
            ax.set_xticks([rows[0]["epoch"]])
        a.set_ylim(rows[0]["active_units"] - 1, rows[0]["active_units"] + 1)
    fig.suptitle(f"Collapse during training (train.monitor_every){one}")
    fig.tight_layout()
    return _save(fig, path)


def plot_surgery(s: Surgery, path: Path) -> Path:
    """Left: ELBO = reconstruction − average KL. Right: average KL against MI + marginal KL, log N drawn."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    vals = [s.reconstruction, -s.average_kl, s.elbo]
    names = [f"{n}\n{v:.2f}" for n, v in zip(["reconstruction", "− average KL", "ELBO"], vals, strict=True)]
    a.barh(names, vals, color=["C0", "C3", "C2"])
    a.axvline(0, color="k", lw=0.8)
    a.set_xlabel("nats per data point")
    a.set_title("ELBO = reconstruction − average KL")
    a.invert_yaxis()
    kl_label = "average KL (analytic)" if s.average_kl_analytic else "average KL (Monte Carlo)"
    b.barh([kl_label], [s.average_kl], color="C3", xerr=[s.average_kl_stderr] if s.average_kl_stderr else None)
    b.barh(["MI + marginal KL"], [s.mutual_information], color="C4", label="mutual information I[i; z]",
           xerr=[s.mutual_information_stderr])
    b.barh(["MI + marginal KL"], [s.marginal_kl], left=[s.mutual_information], color="C1",
           label="marginal KL(q(z) || p(z))", xerr=[s.marginal_kl_stderr])
    b.axvline(s.log_n, color="k", ls="--", lw=1, label=f"log N = {s.log_n:.2f} (MI ≤ log N)")
    b.set_xlabel("nats per data point")
    check = (f"difference {s.identity_error:+.3f} nats" if s.identity_is_check
             else "equal by construction: Monte Carlo KL")
    b.set_title(f"Where the KL goes (N = {s.n}; {check})")
    b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    b.invert_yaxis()
    fig.tight_layout()
    return _save(fig, path)


def image_grid(images: Tensor, image_shape: Sequence[int], cols: int) -> np.ndarray:
    """``[n, D]`` images in [0, 1] -> one ``[rows * h, cols * w]`` array with 1-pixel gaps
    (flat vectors are one row of pixels; channels are stacked vertically)."""
    h, w = math.prod(image_shape[:-1]), image_shape[-1]
    n = images.shape[0]
    rows = math.ceil(n / cols)
    out = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1))
    imgs = images.detach().float().cpu().numpy().reshape(n, h, w)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = imgs[i]
    return out


def plot_images(images: Tensor, image_shape: Sequence[int], path: Path, title: str, cols: int = 10) -> Path:
    fig, ax = plt.subplots(figsize=(cols * 0.6, math.ceil(images.shape[0] / cols) * 0.6 + 0.4))
    ax.imshow(image_grid(images, image_shape, cols), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")
    return _save(fig, path)


def plot_reconstructions(x: Tensor, recon: Tensor, image_shape: Sequence[int], path: Path,
                         what: str = "E[x | z = E_q[z|x]]") -> Path:
    """Row pairs: data (top) and the mean image decoded from the posterior mean (bottom)."""
    cols = x.shape[0]
    fig, ax = plt.subplots(figsize=(cols * 0.6, 1.6))
    top, bottom = image_grid(x, image_shape, cols), image_grid(recon, image_shape, cols)
    both = np.concatenate([top, np.ones((1, top.shape[1])), bottom])
    ax.imshow(both, cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"data (top) and reconstructions {what} (bottom)")
    ax.axis("off")
    return _save(fig, path)


def plot_latent_space(means: Tensor, path: Path, color: Tensor | None = None, color_label: str = "") -> Path:
    """Posterior means of a 2-D latent, coloured by a per-point value (labels or log p(x) in nats)."""
    m = means.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    sc = ax.scatter(m[:, 0], m[:, 1], s=4, c=None if color is None else color.cpu().numpy(), cmap="viridis")
    if color is not None:
        fig.colorbar(sc, ax=ax, label=color_label)
    ax.set_xlabel("z_1 (latent units)")
    ax.set_ylabel("z_2 (latent units)")
    ax.set_title("Posterior means E_q[z|x]")
    ax.set_aspect("equal", adjustable="datalim")
    return _save(fig, path)


def plot_q_ew(grids: Sequence[QEWGrid], ks: Sequence[int], path: Path, elbos: Sequence[dict] | None = None) -> Path:
    """Per data point (rows): the true posterior, then q_EW for each K (K = 1 is q) over it, as contours."""
    cols = 1 + len(ks)
    fig, axes = plt.subplots(len(grids), cols, figsize=(3.1 * cols, 3.0 * len(grids)), squeeze=False)
    for r, g in enumerate(grids):
        z1, z2 = (a.numpy() for a in g.axes)
        post = g.density(g.log_posterior).numpy().T  # [n2, n1] for contour
        axes[r, 0].contour(z1, z2, post, levels=6, cmap="Greys")
        title = "true posterior p(z|x)"
        if elbos:
            title += f"\nlog p(x) = {elbos[r]['log_p']:.2f} nats"
        axes[r, 0].set_title(title, fontsize=9)
        for c, k in enumerate(ks, start=1):
            ax = axes[r, c]
            ax.contour(z1, z2, post, levels=6, cmap="Greys", alpha=0.35)
            ax.contour(z1, z2, g.density(g.log_q_ew[k]).numpy().T, levels=6, cmap="viridis")
            name = "q(z|x) = q_EW, K = 1" if k == 1 else f"q_EW, K = {k}"
            if elbos:
                name += f"\nELBO(q_EW) = {elbos[r][k]:.2f} nats"
            ax.set_title(name, fontsize=9)
        # zoom on where the posterior or q has mass
        q = g.density(g.log_q).numpy().T
        mass = np.maximum(post / post.max(), q / q.max()) > 1e-4
        cols_on, rows_on = mass.any(0).nonzero()[0], mass.any(1).nonzero()[0]
        for ax in axes[r]:
            ax.set_xlim(z1[cols_on[0]], z1[cols_on[-1]])
            ax.set_ylim(z2[rows_on[0]], z2[rows_on[-1]])
            ax.set_xlabel("z_1 (latent units)")
            ax.set_ylabel("z_2 (latent units)")
    fig.suptitle("The implicit posterior q_EW of importance weighting (grey: true posterior)")
    fig.tight_layout()
    return _save(fig, path)


def plot_gaps(summaries: dict[str, dict], path: Path) -> Path:
    """One stacked bar per model: amortization gap (bottom) + approximation gap (top) = the
    inference gap log p(x) - ELBO(q_phi); error bars: standard errors over points."""
    names = list(summaries)
    amort = np.array([summaries[n]["amortization_gap"]["mean"] for n in names])
    approx = np.array([summaries[n]["approximation_gap"]["mean"] for n in names])
    amort_se = np.array([summaries[n]["amortization_gap"]["stderr"] for n in names])
    approx_se = np.array([summaries[n]["approximation_gap"]["stderr"] for n in names])
    total = amort + approx
    scale = max(1.0, float(np.max(np.abs(total))))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.9 * len(names) + 1.5), 4.4))
    pos = np.arange(len(names))
    ax.bar(pos, amort, 0.6, color="C1", label="amortization gap  ELBO(q*) − ELBO(q_φ)")
    ax.bar(pos, approx, 0.6, bottom=amort, color="C0", label="approximation gap  log p(x) − ELBO(q*)")
    ax.errorbar(pos - 0.12, amort, yerr=amort_se, fmt="none", ecolor="k", capsize=3)
    ax.errorbar(pos + 0.12, total, yerr=approx_se, fmt="none", ecolor="k", capsize=3)
    for i, n in enumerate(names):
        top = max(total[i], amort[i]) + max(amort_se[i], approx_se[i])
        ax.text(i, top + 0.03 * scale, f"total {summaries[n]['inference_gap']['mean']:.2f}", ha="center",
                va="bottom", fontsize=9)
        for bottom, h in ((0.0, amort[i]), (amort[i], approx[i])):
            if abs(h) > 0.08 * scale:
                ax.text(i + 0.22, bottom + h / 2, f"{h:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(min(0.0, float(np.min(amort)) - 0.1 * scale), float(np.max(total + approx_se)) + 0.2 * scale)
    ax.set_xticks(pos, [f"{n}\n(log p(x): {summaries[n]['log_px_source'].split(' ')[0]}, {summaries[n]['points']} pts)"
                        for n in names], fontsize=8)
    ax.set_ylabel("nats per data point")
    ax.set_title("Inference gap split (Cremer et al. 2018)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)

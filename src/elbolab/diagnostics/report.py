"""``elbolab diagnose RUN``: every diagnostic of a trained run, as Markdown, JSON and PNG figures.

Writes ``diagnostics.md``, ``diagnostics.json`` and ``diag-*.png`` into the run folder
(``report.json`` stays the short evaluation written by ``elbolab train``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..evaluation import progress_bar, seeded
from ..files import atomic_write_text, check_writable_folder
from ..priors import GaussianMixturePrior
from ..runs import write_json
from . import plots
from .active_units import active_units
from .bound_vs_k import bound_vs_k
from .prior_figures import plot_components
from .q_ew import q_ew_on_grid
from .surgery import SurgeryError, elbo_surgery

REPORT_MD, REPORT_JSON = "diagnostics.md", "diagnostics.json"


def _ks_up_to(ks: tuple[int, ...], k: int) -> tuple[int, ...]:
    return tuple(sorted({q for q in ks if q < k} | {k}))


def diagnose(
    run,
    x: Tensor,
    image_shape: tuple[int, ...],
    out_dir: Path,
    k: int | None = None,
    split: str = "test",
    labels: Tensor | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every diagnostic on ``x`` ``[N, D]`` (already on the model's device) and write the report
    (``progress``: a progress bar on each long stage, on a terminal)."""
    cfg, model = run.config, run.model
    e = cfg.eval
    k = k or max(e.bound_ks)
    out_dir = Path(out_dir)
    check_writable_folder(out_dir, "report folder (--out)")  # before minutes of computing, not after
    report: dict[str, Any] = {"run": str(run.path), "split": split, "n": int(x.shape[0]), "k": k,
                              # a model elbolab did not build (an adapter) names itself
                              "model": getattr(model, "model_name", cfg.model.name),
                              "prior": getattr(model, "prior_name", cfg.model.prior.name),
                              "posterior_flow": getattr(model, "posterior_flow", "none"),
                              "latent_dims": list(model.latent_dims), "seconds": {}, "figures": {}}
    figures = report["figures"]

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        report["seconds"][name] = round(time.perf_counter() - t, 2)
        log(f"  {name:<18} {report['seconds'][name]:7.1f} s")
        return value

    log(f"elbolab diagnose: {x.shape[0]} {split} points, K = {k} -> {out_dir}")

    def bar(what: str) -> str | None:
        return what if progress else None

    bvk = timed("bound_vs_k", lambda: bound_vs_k(model, x, _ks_up_to(e.bound_ks, k), e.batch_size,
                                                 e.chunk_for(x.device), e.seed,
                                                 progress=bar(f"bound vs k, k <= {k}")))
    ll = bvk.log_likelihood()
    report["log_likelihood"] = ll.to_dict()
    report["bound_vs_k"] = bvk.to_dict()
    figures["bound_vs_k"] = plots.plot_bound_vs_k(bvk, out_dir / "diag-bound-vs-k.png", bvk.mean()[0]).name

    au = timed("active_units", lambda: active_units(model, x, e.active_unit_threshold, e.batch_size, seed=e.seed,
                                                    progress=bar("active units")))
    report["active_units"] = {**au.to_dict(), "label": str(au)}
    figures["active_units"] = plots.plot_active_units(au, out_dir / "diag-active-units.png").name

    try:
        surgery = timed("surgery", lambda: elbo_surgery(model, x, e.surgery_samples, e.batch_size, e.seed))
        report["surgery"] = surgery.to_dict()
        figures["surgery"] = plots.plot_surgery(surgery, out_dir / "diag-surgery.png").name
    except SurgeryError as err:
        surgery = None
        report["surgery"] = {"skipped": str(err)}

    def pictures() -> None:
        # a PixelCNN decoder's mean has no closed form: its figures show autoregressive draws
        exact = getattr(model, "exact_decode_mean", True)
        with torch.no_grad(), seeded(e.seed, x.device):
            what = "E[x | z]" if exact else "conditional means along autoregressive samples of p(x | z)"
            figures["samples"] = plots.plot_images(model.sample(50), image_shape, out_dir / "diag-samples.png",
                                                   f"samples from the model: {what}, z ~ p(z)").name
            spread = x[:: max(1, x.shape[0] // 10)][:10]  # across the split (it may be sorted by class)
            figures["reconstructions"] = plots.plot_reconstructions(
                spread, model.reconstruct(spread), image_shape, out_dir / "diag-reconstructions.png",
                **({} if exact else {"what": "(conditional means along a sample at z = E_q[z|x])"})).name
            if isinstance(model.prior, GaussianMixturePrior) and len(image_shape) == 2:
                figures["prior_components"] = plot_components(
                    model, image_shape, out_dir / "diag-prior-components.png", seed=e.seed,
                    components="most-used", data=x, images="mean" if exact else "sample").name

    timed("images", pictures)

    report["monitor"] = _monitor_section(getattr(run, "metrics", None) or [], out_dir, figures)

    flow = getattr(model, "posterior_flow", "none")
    if flow != "none":
        report["q_ew"] = {"skipped": f"q_EW panels need log q(z|x) on a grid, which a flow posterior ({flow}) "
                                     "gives only at its own samples"}
    elif model.latent_dims == [2] and hasattr(model, "log_joint"):
        q_ew = timed("q_ew", lambda: _q_ew_section(model, x, bvk, e.q_ew_ks, e.seed, labels, ll.per_point,
                                                   out_dir, figures, log, bar("q_EW on a grid")))
        report["q_ew"] = q_ew
    else:
        report["q_ew"] = {"skipped": "q_EW panels and the latent-space plot are drawn for 2-D latents"}

    write_json(out_dir / REPORT_JSON, report)
    atomic_write_text(out_dir / REPORT_MD, format_markdown(report, bvk.table(), surgery.table() if surgery else None))
    return report


def _q_ew_section(model, x, bvk, ks, seed, labels, log_p, out_dir: Path, figures: dict,
                  log: Callable[[str], None] = print, progress: str | None = None) -> dict[str, Any]:
    with torch.no_grad():
        means = model.posterior(x).mean
    color, label = (labels, "label") if labels is not None else (log_p, "log p(x), IS estimate (nats)")
    figures["latent_space"] = plots.plot_latent_space(means, out_dir / "diag-latent-space.png", color, label).name
    points, grids, titles = [], [], []
    n_points = min(3, x.shape[0])
    bar = progress_bar(n_points, progress, unit="point")
    for i in range(n_points):
        bar.update(1)
        try:
            with warnings.catch_warnings():  # not converged: said below, once, through log
                warnings.simplefilter("ignore", RuntimeWarning)
                g = q_ew_on_grid(model, x[i], ks=tuple(ks), seed=seed, strict=False)
        except ValueError as err:
            log(f"  q_EW point {i}: skipped: {err}")
            points.append({"index": i, "skipped": str(err)})
            continue
        if not g.converged:
            log(f"  q_EW point {i}: WARNING quadrature not converged: accuracy {g.accuracy:.3g} nats > tol {g.tol:g}")
        grids.append(g)
        titles.append({"log_p": g.log_marginal, **{kk: g.elbo(kk) for kk in ks}})
        points.append({
            "index": i,
            "log_p": g.log_marginal,
            "elbo_q_ew": {str(kk): g.elbo(kk) for kk in ks},
            # largest change of log p(x) or any ELBO(q_EW) from the grid half as dense
            "accuracy": g.accuracy,
            "tol": g.tol,
            "converged": g.converged,
            "changes": {str(kk): v for kk, v in g.changes.items()},
            "grid_shape": list(g.shape),
            "l_k": {str(kk): float(bvk.per_point[i, bvk.ks.index(kk)]) for kk in ks if kk in bvk.ks},
        })
    bar.close()
    if grids:
        figures["q_ew"] = plots.plot_q_ew(grids, ks, out_dir / "diag-q-ew.png", titles).name
    return {"ks": list(ks), "method": "numerical integration on a grid", "points": points}


def _monitor_section(metrics: list[dict[str, Any]], out_dir: Path, figures: dict) -> dict[str, Any]:
    """The collapse monitor's numbers over training (metrics.jsonl), plotted against the epoch."""
    rows = plots.monitored_rows(metrics)
    if not rows:
        return {"skipped": "no monitored epochs in metrics.jsonl (train.monitor_every=0, or not an elbolab run)"}
    figures["monitor"] = plots.plot_monitor(rows, out_dir / "diag-monitor.png").name
    last = rows[-1]
    return {"epochs": [r["epoch"] for r in rows], "points": last.get("monitor_points"),
            "active_units": [r["active_units"] for r in rows],
            "mutual_information": [r.get("mutual_information") for r in rows],
            "last": {k: last[k] for k in ("epoch", "active_units", "mutual_information", "mutual_information_stderr")
                     if k in last}}


def _flow_note(r: dict[str, Any]) -> str:
    flow = r.get("posterior_flow", "none")
    return "" if flow == "none" else f", q a Gaussian pushed through a flow ({flow}; docs/flows.md)"


def _au_method(au: dict[str, Any], flow: str = "none") -> str:
    """How the layers' posterior means were estimated, if they had to be."""
    if not au.get("samples"):
        return ""
    if flow != "none":
        return f"; every layer's mean from {au['samples']} draws of q per point (no closed form with a flow)"
    return f"; upper-layer means from {au['samples']} draws of the first-sampled layer per point"


def monitor_sentence(m: dict[str, Any]) -> str:
    """diagnostics.md's line on the collapse monitor (``m``: :func:`_monitor_section`'s dict)."""
    last, n = m["last"], len(m["epochs"])
    mi = (f", I(x; z) = {last['mutual_information']:.2f} ± {last['mutual_information_stderr']:.2f} nats"
          if last.get("mutual_information") is not None else "")
    return (f"Logged during training on a fixed subsample of {m['points']} images, {n} epoch{'s' * (n != 1)}; "
            f"at epoch {last['epoch']}: {last['active_units']} active units{mi}.")


def format_markdown(r: dict[str, Any], bound_table: str, surgery_table: str | None) -> str:
    ll, au = r["log_likelihood"], r["active_units"]
    lines = [
        f"# Diagnostics of `{r['run']}`",
        "",
        f"{r['n']} {r['split']} points; model {r['model']} (latent {'+'.join(map(str, r['latent_dims']))}), "
        f"prior {r['prior']}{_flow_note(r)}. All bounds in nats per data point.",
        "",
        f"- **log p(x)** (importance sampled, K = {ll['k']}): **{ll['mean']:.2f} ± {ll['stderr']:.2f}** nats",
        f"- **ELBO** (L_1): {r['bound_vs_k']['mean'][0]:.2f} nats; gap to log p(x): "
        f"{-r['bound_vs_k']['gap_to_largest'][0]:.2f} ± {r['bound_vs_k']['gap_stderr'][0]:.2f} nats",
        f"- **active units**: {au['label']} of {'+'.join(str(len(a)) for a in au['activity'])} "
        f"(threshold {au['threshold']:g}{_au_method(au, r.get('posterior_flow', 'none'))})",
    ]
    s = r["surgery"]
    if "skipped" not in s:
        lines.append(f"- **mutual information** I[i; z] = {s['mutual_information']:.2f} nats (≤ log N = "
                     f"{s['log_n']:.2f}); **marginal KL** = {s['marginal_kl']:.2f} nats")
    lines += ["", f"## Bound versus k\n\nOne set of {r['k']} samples per point, split into groups of k "
              "(each L_k an unbiased group average). stderr: over points; MC stderr: Monte Carlo alone; "
              "the last column is paired.", "", bound_table, "", "![bound versus k](diag-bound-vs-k.png)", "",
              "## Active units", "", "![active units](diag-active-units.png)", "", "## ELBO surgery", ""]
    if surgery_table:
        lines += ["Hoffman & Johnson (2016): average KL = I[i; z] + KL(q(z) || p(z)), with the aggregate "
                  f"posterior over all N = {r['n']} points.", "", surgery_table, "", "![surgery](diag-surgery.png)"]
    else:
        lines.append(f"Skipped: {s['skipped']}")
    lines += ["", "## Collapse during training", ""]
    m = r.get("monitor", {"skipped": "not recorded"})
    if "skipped" in m:
        lines.append(f"Skipped: {m['skipped']}")
    else:
        lines += [monitor_sentence(m), "", "![collapse during training](diag-monitor.png)"]
    lines += ["", "## Samples and reconstructions", "", "![samples](diag-samples.png)", "",
              "![reconstructions](diag-reconstructions.png)", ""]
    if "prior_components" in r.get("figures", {}):
        lines += ["The prior components most used by these points' posterior means (VampPrior: each pseudo-input, "
                  "framed in red) and images generated from them:",
                  "", "![prior components](diag-prior-components.png)", ""]
    lines += ["## The implicit posterior q_EW", ""]
    q = r["q_ew"]
    if "skipped" in q:
        lines.append(f"Skipped: {q['skipped']}")
    else:
        ks = q["ks"]
        lines += [f"Densities by {q['method']}. L_K ≤ ELBO(q_EW) ≤ log p(x) (Cremer et al., 2017). "
                  "Quadrature accuracy: the largest change of log p(x) or any ELBO(q_EW) when the grid was "
                  "made twice as dense.", "",
                  "| point | " + " | ".join(f"L_{k} / ELBO(q_EW), K={k}" for k in ks) + " | log p(x) | accuracy |",
                  "|---:|" + "---:|" * (len(ks) + 2)]
        for p in q["points"]:
            if "skipped" in p:
                lines.append(f"| {p['index']} | skipped: {p['skipped']} |")
                continue
            cells = [f"{p['l_k'].get(str(k), math.nan):.2f} / {p['elbo_q_ew'][str(k)]:.2f}" for k in ks]
            acc = f"{p['accuracy']:.1e}" + ("" if p["converged"] else f" > tol {p['tol']:g}: NOT converged")
            lines.append(f"| {p['index']} | " + " | ".join(cells) + f" | {p['log_p']:.2f} | {acc} |")
        lines += ["", "![latent space](diag-latent-space.png)", ""]
        if "q_ew" in r.get("figures", {}):
            lines.append("![q_EW](diag-q-ew.png)")
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
    lines += ["", f"_Time: {secs}._", ""]
    return "\n".join(lines)

"""Active units of a trained run three ways: the definition (default), the plug-in upper
mean mu(E_q[first layer]) and the IWAE authors' one-draw statistic, on the run's test split.

    python scripts/active_units_methods.py RUN [--samples 64] [--seeds 5]

Prints per layer the counts, the activity ratio plug-in / definition over the units the
definition calls active, the definition's largest MC standard error, its spread over seeds
and how many units lie within 3 MC standard errors of the threshold.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from elbolab.data import evaluation_images, load
from elbolab.diagnostics.active_units import active_units
from elbolab.models import HierarchicalVAE, TwoLayerVAE
from elbolab.runs import load_run


@torch.no_grad()
def plug_in(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, Var_x of the posterior mean with the upper layer taken at the lower one's mean."""
    if isinstance(model, TwoLayerVAE):
        m1 = model.posterior(x).mean
        means = [m1, model.q_z2(m1)[0]]
    elif isinstance(model, HierarchicalVAE):
        m2 = model.posterior(x).mean
        means = [model.q_z1(x, m2)[0], m2]
    else:
        sys.exit(f"error: {type(model).__name__} has one stochastic layer; nothing to compare")
    return [m.double().var(0) for m in means]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    run = load_run(args.run)
    cfg, model = run.config, run.model
    dataset = load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
    x = evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed)
    t = cfg.eval.active_unit_threshold
    start = time.perf_counter()
    runs = [active_units(model, x, t, samples=args.samples, seed=s) for s in range(args.seeds)]
    seconds = (time.perf_counter() - start) / args.seeds
    iwae = active_units(model, x, t, method="iwae-code", seed=0)
    plug = plug_in(model, x)
    print(f"{x.shape[0]} test points, threshold {t}, {args.samples} draws per point, {seconds:.1f} s per call")
    near = [(a - t).abs() < 3 * e for a, e in zip(runs[0].activity, runs[0].mc_stderr, strict=True)]
    for layer, size in enumerate(model.latent_dims):
        acts = torch.stack([r.activity[layer] for r in runs])
        counts = sorted({int((a > t).sum()) for a in acts})
        alive = acts[0] > t
        ratio = (plug[layer][alive] / acts[0][alive]) if alive.any() else torch.ones(1)
        print(f"layer {layer + 1} ({size} units): definition {counts} over {args.seeds} seeds, "
              f"plug-in {int((plug[layer] > t).sum())}, iwae-code {iwae.counts[layer]}; "
              f"plug-in / definition {float(ratio.min()):.2f}-{float(ratio.max()):.2f} "
              f"(median {float(ratio.median()):.2f}); MC stderr max {float(runs[0].mc_stderr[layer].max()):.2e}, "
              f"spread over seeds max {float(acts.std(0).max()):.2e}; "
              f"within 3 MC stderr of the threshold: {int(near[layer].sum())}")


if __name__ == "__main__":
    main()

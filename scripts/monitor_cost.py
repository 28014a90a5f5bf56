"""What the collapse monitor costs against a training epoch (the default train.monitor_every).

    OMP_NUM_THREADS=1 python scripts/monitor_cost.py [--points 1000] [--steps 20]

For the one-layer, two-layer and hierarchical VampPrior models (IWAE k = 5, the default
objective), on the embedded data: CPU seconds (one thread, process time, so a busy machine does not inflate them) of one
monitor call on ``--points`` validation images, and of an epoch of the embedded data (100 steps
of batch 100, timed over ``--steps`` steps). Prints one line per model.
"""

from __future__ import annotations

import argparse
import time

import torch

from elbolab.config import RunConfig
from elbolab.data import load
from elbolab.diagnostics.monitor import CollapseMonitor
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.optimizers import make_optimizer
from elbolab.training import take_step

MODELS = {
    "one-layer": {},
    "two-layer": {"model.name": "two-layer"},
    "hierarchical VampPrior": {"model.name": "hierarchical", "model.prior.name": "vampprior"},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=RunConfig().train.monitor_points)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    dataset = load("binarized-mnist-embedded")
    x = dataset.as_float("train")
    steps_per_epoch = x.shape[0] // 100
    for name, overrides in MODELS.items():
        cfg = RunConfig().with_overrides({**overrides, "train.monitor_points": args.points})
        torch.manual_seed(0)
        model = build_model(cfg.model, dataset.data_dim, x)
        objective, opt = make_objective(cfg.objective), make_optimizer(model, cfg.train, torch.device("cpu"))
        take_step(model, opt, objective, x[:100])
        t = time.process_time()
        for i in range(args.steps):
            take_step(model, opt, objective, x[i * 100:(i + 1) * 100])
        epoch = (time.process_time() - t) / args.steps * steps_per_epoch
        monitor = CollapseMonitor.for_run(cfg, dataset)
        monitor(model)  # first call builds caches
        t = time.process_time()
        row = monitor(model)
        cost = time.process_time() - t
        print(f"{name:24s} monitor on {monitor.x.shape[0]} {monitor.split} images: {cost:.3f} s; "
              f"epoch ({steps_per_epoch} steps): {epoch:.2f} s; {100 * cost / epoch:.1f}% of an epoch, "
              f"{100 * cost / epoch / cfg.train.monitor_every:.1f}% at monitor_every={cfg.train.monitor_every} "
              f"(active units {row['active_units']}, I(x;z) {row.get('mutual_information', float('nan')):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

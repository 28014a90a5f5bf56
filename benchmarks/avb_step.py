"""Seconds per paired AVB step (adversary, then VAE) of the vampprior-table row mnist-avb-ac, one thread.

    PYTHONPATH=src python benchmarks/avb_step.py --steps 200 [--device cuda]

Prints seconds per step and per epoch of 60,000 images (batch 64), and the hours the row's
paper budget (2,500,000 steps) would take at that speed. Random binary images stand in for
MNIST: the cost does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import time

import torch

from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.optimizers import make_optimizer
from elbolab.reproduce.tables import get_table, row_config
from elbolab.training.step import StepRun, make_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = get_table("vampprior-table")
    cfg = row_config(table, table.row("mnist-avb-ac"), "quick").config
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg.model, 784).to(device)
    vae = make_optimizer(model, cfg.train, device, model.vae_parameters())
    adv = make_optimizer(model, cfg.train, device, model.adversary_parameters())

    run = StepRun.plain(model, vae, make_objective(cfg.objective), cfg.objective)
    run.adversary_optimizer = adv
    step = make_step([run])
    b = cfg.train.batch_size
    x = (torch.rand(args.steps + 10, 1, b, 784, device=device) > 0.5).float()
    for i in range(10):  # warm-up
        step.step(x[i], [1.0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step.step(x[10 + i], [1.0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / args.steps
    cpu = (time.process_time() - c0) / args.steps
    per_epoch = per_step * 60_000 / b
    print(f"{per_step * 1000:.1f} ms per paired step ({cpu * 1000:.1f} ms of CPU time; batch {b}, "
          f"{args.threads} thread(s), {args.device}); "
          f"{per_epoch / 60:.1f} min per epoch of 60,000; paper budget 2,500,000 steps: "
          f"{per_step * 2_500_000 / 3600:.0f} h")

if __name__ == "__main__":
    main()

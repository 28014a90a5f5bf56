"""Cost of the `reproduce vampprior-table` row mnist-vlae: its training step and its IS evaluation.

    python benchmarks/vlae_step.py                       # 200 steps on one CPU thread (a few minutes)
    python benchmarks/vlae_step.py --steps 300 --device cuda

Builds the row's model from its table plan (the quick budget's config: the model is the same at
every budget), trains it ``--steps`` steps of the row's optimizer (AdamNormGrad) at batch 100 on
the embedded binarized MNIST (28 x 28, as the row's data) after 5 unmeasured ones, and times one
IS pass of K = 100 over two test images. CPU: process time of one thread (waiting on a shared machine is not counted);
CUDA: wall time with synchronization. Prints the per-step cost, the epoch (50,000 / 100 = 500
steps, plus validation not counted), and the paper budget of the table (at most 2,000 epochs).
"""

from __future__ import annotations

import argparse
import time

import torch

from elbolab.data import load
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.optimizers import make_optimizer
from elbolab.reproduce.tables import get_table, plan_rows

#: training steps in one epoch of static MNIST's 50,000 training images at batch 100
EPOCH_STEPS = 50_000 // 100
#: the table's paper budget: at most this many epochs (early stopping may end it sooner)
PAPER_EPOCHS = 2000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    (plan,) = plan_rows(get_table("vampprior-table"), "quick", only=["mnist-vlae"])
    cfg = plan.config
    data = load("binarized-mnist-embedded")
    train, test = data.as_float("train"), data.as_float("test")[:2].to(device)
    torch.manual_seed(0)
    model = build_model(cfg.model, 784, train, dataset="binarized-mnist-embedded").to(device)
    opt = make_optimizer(model, cfg.train, device)
    objective = make_objective(cfg.objective)
    g = torch.Generator().manual_seed(0)
    batch = cfg.train.batch_size

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def step() -> float:
        x = train[torch.randint(0, len(train), (batch,), generator=g)].to(device)
        opt.zero_grad()
        result = objective(model, x, 1.0)
        result.loss.backward()
        opt.step()
        return float(result.bound.mean())

    for _ in range(5):
        step()
    start = clock()
    for _ in range(args.steps):
        bound = step()
    per_step = (clock() - start) / args.steps
    model.eval()
    with torch.no_grad():
        start = clock()
        model.log_weights(test, 100)
        per_1000 = (clock() - start) / 2 * 10
    epoch_h = per_step * EPOCH_STEPS / 3600
    print(f"mnist-vlae on {args.device}: {per_step:.3f} s/step (batch {batch}, {args.steps} steps, last bound "
          f"{bound:.1f}); epoch {epoch_h * 60:.1f} min; paper budget ({PAPER_EPOCHS} epochs) "
          f"{epoch_h * PAPER_EPOCHS:.0f} h; IS {per_1000:.2f} s per test image per 1,000 samples")


if __name__ == "__main__":
    main()

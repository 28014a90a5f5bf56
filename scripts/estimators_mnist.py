"""Gradient SNR against k for standard / STL / DReG, and DReG vs standard IWAE training, on MNIST.

    python scripts/estimators_mnist.py snr   [--out docs/figures] [--threads 1]
    python scripts/estimators_mnist.py train [--out docs/figures] [--epochs 3] [--threads 1]

Both use the packaged embedded binarized-MNIST subset (10,000 train / 2,000 test) and the
one-layer 784-200-200-50 model. ``snr`` first trains a standard IWAE (k=5) for
``--warm-epochs`` epochs (a lightly trained model: SNR at initialization says little),
then measures per-group gradient SNR on a fixed batch of test images. ``train`` trains
one-layer IWAE k=50 with each estimator for the same number of epochs, same seed, and
reports the test IS log-likelihood and active units. Results go to JSON beside the figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from elbolab.config import RunConfig
from elbolab.data import load
from elbolab.diagnostics.active_units import active_units
from elbolab.diagnostics.gradient_snr import log_log_slope, plot_snr_vs_k, snr_sweep
from elbolab.evaluation import evaluate_bounds, log_likelihood
from elbolab.training import RunState, train_runs

ESTIMATORS = ("standard", "stl", "dreg")


def _train(overrides: dict, out: Path):
    cfg = RunConfig().with_overrides({"train.progress": False, "train.eval_every": 0, **overrides})
    t0 = time.perf_counter()
    trainer = RunState(cfg, out)
    train_runs([trainer], skip_finished=False)
    return trainer, time.perf_counter() - t0


def cmd_snr(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, secs = _train({"objective.k": 5, "train.epochs": args.warm_epochs}, Path(tmp) / "warm")
    model = trainer.model
    x = trainer.dataset.as_float("test")[: args.batch]
    ks = tuple(args.ks)
    t0 = time.perf_counter()
    results = snr_sweep(model, x, ks, ESTIMATORS, n_draws=args.draws, seed=0)
    snr_secs = time.perf_counter() - t0
    title = (f"one-layer IWAE on embedded MNIST after {args.warm_epochs} epochs of IWAE k=5; "
             f"batch {args.batch}, {args.draws} draws")
    fig = plot_snr_vs_k(results, args.out / "snr_vs_k_mnist.png", title=title)
    slopes = {
        est: {f"{g}{'_group' if whole else ''}": log_log_slope([r for r in results if r.estimator == est], g, whole)
              for g in ("encoder", "decoder") for whole in (False, True)}
        for est in ESTIMATORS
    }
    report = {"warm_train_seconds": round(secs, 1), "snr_seconds": round(snr_secs, 1),
              "warm_epochs": args.warm_epochs, "batch": args.batch, "draws": args.draws, "ks": list(ks),
              "slopes": slopes, "results": [r.to_dict() for r in results]}
    (args.out / "snr_vs_k_mnist.json").write_text(json.dumps(report, indent=2))
    for est in ESTIMATORS:
        rows = [r for r in results if r.estimator == est]
        print(est, "encoder", [f"{r.summary('encoder'):.3g}" for r in rows],
              [f"{r.group_snr('encoder'):.3g}" for r in rows],
              "decoder", [f"{r.summary('decoder'):.3g}" for r in rows],
              [f"{r.group_snr('decoder'):.3g}" for r in rows], "slopes", slopes[est])
    print(f"figure: {fig}")


def cmd_train(args) -> None:
    path = args.out / "dreg_vs_standard_mnist.json"
    rows = {}
    dataset = load("binarized-mnist-embedded")
    x_test = dataset.as_float("test")[: args.n_test]
    per_point = {}
    for seed, est in [(seed, est) for seed in args.seeds for est in args.estimators]:
        with tempfile.TemporaryDirectory() as tmp:
            trainer, secs = _train({"objective.k": 50, "objective.estimator": est, "train.epochs": args.epochs,
                                    "train.seed": seed}, Path(tmp) / est)
        model = trainer.model.eval()
        ll = log_likelihood(model, x_test, k=args.k_importance, batch_size=100, chunk_size=500, seed=1)
        b = evaluate_bounds(model, x_test, k=50, batch_size=100, seed=1)
        au = active_units(model, x_test)
        name = f"{est}-seed{seed}"
        per_point[(est, seed)] = ll.per_point
        rows[name] = {"train_seconds": round(secs, 1), "test_log_likelihood": ll.to_dict(),
                      "test_elbo": b["elbo"], "test_iwae_50": b["iwae_50"], "active_units": au.total}
        print(name, json.dumps(rows[name]), flush=True)
    paired = {}
    for seed in args.seeds:  # same test points, same IS seed: a paired difference
        if ("dreg", seed) in per_point and ("standard", seed) in per_point:
            d = per_point[("dreg", seed)] - per_point[("standard", seed)]
            paired[f"seed{seed}"] = {"mean": float(d.mean()), "stderr": float(d.std() / len(d) ** 0.5)}
    print("dreg - standard test log-likelihood (paired over test points):", paired)
    report = {"epochs": args.epochs, "batch_size": 100, "train_points": 10000, "k": 50, "lr": 1e-3,
              "n_test": int(x_test.shape[0]), "k_importance": args.k_importance, "runs": rows,
              "dreg_minus_standard_log_likelihood": paired}
    path.write_text(json.dumps(report, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["snr", "train"])
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warm-epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 25, 125])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--k-importance", type=int, default=1000)
    p.add_argument("--estimators", nargs="+", default=["standard", "dreg"], choices=list(ESTIMATORS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    {"snr": cmd_snr, "train": cmd_train}[args.what](args)


if __name__ == "__main__":
    main()

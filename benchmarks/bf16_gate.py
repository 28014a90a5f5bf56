"""The accuracy gate of train.precision=bf16: the demo budget trained in bf16 and in fp32 from
the same seed, both scored by the same fp32 importance-sampled log-likelihood.

    python benchmarks/bf16_gate.py train --precision fp32 --seed 0   # one run: train + evaluate
    python benchmarks/bf16_gate.py train --precision bf16 --seed 0
    python benchmarks/bf16_gate.py train --precision fp32 --seed 1   # seed-to-seed spread, for scale
    python benchmarks/bf16_gate.py gate                                # the table, and the JSON

The budget is ``elbolab train``'s default (one-layer IWAE k = 5 on the embedded data, 80
epochs, batch 100); the score is log p(x) at K = 5000 on every embedded test image with the
evaluation seed, in float32 whatever the training precision. Each ``train`` writes
``benchmarks/results/bf16-gate/<precision>-seed<seed>.json`` (its per-image estimates too);
``gate`` compares bf16 with fp32 at the same seed, image by image, and writes
``benchmarks/results/bf16-gate.json``. The gate: mean difference under 0.2 nats.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from elbolab.cli.bench import run_script
from elbolab.config import RunConfig
from elbolab.data import evaluation_images, load
from elbolab.evaluation import log_likelihood
from elbolab.fastpaths import native_bf16, retain_freed_memory
from elbolab.training import RunState, train_runs

OUT = Path("benchmarks") / "results"
GATE_NATS = 0.2
K = 5000


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def train_one(precision: str, seed: int, runs: Path, epochs: int) -> dict:
    retain_freed_memory()
    cfg = RunConfig().with_overrides({"train.precision": precision, "train.seed": seed, "train.threads": 1,
                                      "train.progress": False, "train.epochs": epochs})
    data = load(cfg.data.name)
    run_dir = runs / f"{precision}-seed{seed}"
    load_start = loadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = RunState(cfg, run_dir, data)
    train_runs([trainer], skip_finished=False)
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    x = evaluation_images(data, "test", cfg.data.binarization, cfg.data.binarization_seed)
    t1 = time.perf_counter()
    ll = log_likelihood(trainer.model, x, k=K, batch_size=cfg.eval.batch_size, chunk_size=cfg.eval.chunk_size,
                        seed=cfg.eval.seed)
    return {
        "precision": precision, "seed": seed, "epochs": epochs, "k_importance": K, "n_test": int(x.shape[0]),
        "log_likelihood": ll.mean, "stderr": ll.stderr, "per_image": ll.per_point.tolist(),
        "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
        "eval_wall_s": round(time.perf_counter() - t1, 1), "native_bf16": native_bf16("cpu"),
        "loadavg_start": load_start, "loadavg_end": loadavg(), "torch": torch.__version__, "run_dir": str(run_dir),
    }


def gate(parts: Path, seed: int) -> dict:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}
    a, b = runs[f"fp32-seed{seed}"], runs[f"bf16-seed{seed}"]
    diff = torch.tensor(b["per_image"], dtype=torch.float64) - torch.tensor(a["per_image"], dtype=torch.float64)
    out = {
        "gate_nats": GATE_NATS, "k_importance": K, "seed": seed, "n_test": a["n_test"],
        "fp32": a["log_likelihood"], "bf16": b["log_likelihood"],
        "difference_bf16_minus_fp32": float(diff.mean()),
        "difference_stderr": float(diff.std() / math.sqrt(diff.numel())),
        "passes": abs(float(diff.mean())) < GATE_NATS,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "per_image"} for k, v in runs.items()},
    }
    others = [v for k, v in runs.items() if k.startswith("fp32-") and v["seed"] != seed]
    if others:
        spread = torch.tensor(others[0]["per_image"], dtype=torch.float64) - torch.tensor(a["per_image"],
                                                                                           dtype=torch.float64)
        out["fp32_other_seed_minus_fp32"] = float(spread.mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--precision", choices=("fp32", "bf16"), required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=RunConfig().train.epochs)
    t.add_argument("--runs", default="/tmp/elbolab-bf16-gate", help="where the run folders go")
    g = sub.add_parser("gate")
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    parts = OUT / "bf16-gate"
    if args.what == "train":
        parts.mkdir(parents=True, exist_ok=True)
        result = train_one(args.precision, args.seed, Path(args.runs), args.epochs)
        (parts / f"{args.precision}-seed{args.seed}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{args.precision} seed {args.seed}: log p(x) {result['log_likelihood']:.3f} +- {result['stderr']:.3f}"
              f" (train {result['train_cpu_s']:.0f} s CPU, load {result['loadavg_end']})")
        return 0
    result = gate(parts, args.seed)
    (OUT / "bf16-gate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    run_script(main)

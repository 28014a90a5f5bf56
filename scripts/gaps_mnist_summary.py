"""Combine the three MNIST gap splits of docs/gaps.md into one figure and one summary.

    python scripts/gaps_mnist_summary.py [results/gaps/mnist]

Reads ``<dir>/{vae,iwae50,hier}/gaps.json`` (each written by ``elbolab gaps``, commands in
docs/gaps.md), writes ``<dir>/gaps.png`` (one stacked bar per model) and ``<dir>/summary.json``:
each model's summary on its own points, and all three on the points they share (the
hierarchical model's 30 are the first 30 of the same seeded permutation as the others' 50).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from elbolab.diagnostics.plots import plot_gaps
from elbolab.files import atomic_write_text

MODELS = {"vae": "VAE (k=1)", "iwae50": "IWAE (k=50)", "hier": "HVAE + VampPrior"}
TEST_POINTS = 10_000


def chosen(points: int, seed: int = 0) -> list[int]:
    """The test indices ``elbolab gaps --points N --seed S`` evaluates, in order."""
    perm = torch.randperm(TEST_POINTS, generator=torch.Generator().manual_seed(seed))[:points]
    return perm.sort().values.tolist()


def mean_se(v: list[float]) -> dict[str, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return {"mean": float(t.mean()), "stderr": float(t.std() / math.sqrt(t.numel()))}


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/gaps/mnist")
    entries = {}
    for folder, label in MODELS.items():
        (entry,) = json.loads((root / folder / "gaps.json").read_text())["models"].values()
        entries[label] = entry
    common = set.intersection(*(set(chosen(e["summary"]["points"], e["settings"]["seed"])) for e in entries.values()))
    shared = {}
    for label, e in entries.items():
        idx = chosen(e["summary"]["points"], e["settings"]["seed"])
        keep = [i for i, j in enumerate(idx) if j in common]
        pp = e["per_point"]
        log_px = pp["ais"] if e["summary"]["log_px_source"] == "AIS" else pp[f"is_k{e['settings']['is_k']}"]
        pick = [(log_px[i], pp["elbo_optimal"][i], pp["elbo_amortized"][i]) for i in keep]
        shared[label] = {
            "points": len(keep),
            "log_px": mean_se([a for a, _, _ in pick]),
            "elbo_optimal": mean_se([b for _, b, _ in pick]),
            "elbo_amortized": mean_se([c for _, _, c in pick]),
            "approximation_gap": mean_se([a - b for a, b, _ in pick]),
            "amortization_gap": mean_se([b - c for _, b, c in pick]),
            "inference_gap": mean_se([a - c for a, _, c in pick]),
        }
    plot_gaps({label: e["summary"] for label, e in entries.items()}, root / "gaps.png")
    out = {"models": {label: {"run": e["run"], "summary": e["summary"], "seconds": e["seconds"],
                              "bdmc": {k: e["bdmc"][k] for k in ("n", "gap_mean", "gap_stderr", "seconds")}
                              | {"lower": e["bdmc"]["lower"]["mean"], "upper": e["bdmc"]["upper"]["mean"]}}
                      for label, e in entries.items()},
           "on_shared_points": shared}
    atomic_write_text(root / "summary.json", json.dumps(out, indent=2) + "\n")
    for label, s in shared.items():
        print(f"{label:<18} {s['points']} points: log p(x) {s['log_px']['mean']:.2f}, approximation "
              f"{s['approximation_gap']['mean']:.2f} ± {s['approximation_gap']['stderr']:.2f}, amortization "
              f"{s['amortization_gap']['mean']:.2f} ± {s['amortization_gap']['stderr']:.2f}")


if __name__ == "__main__":
    main()

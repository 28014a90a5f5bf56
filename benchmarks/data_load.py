"""Time loading every dataset from its standard files and drawing dynamically binarized batches.

    python benchmarks/data_load.py [--data-dir ../shared/data]

Each load is timed cold (first call in a fresh cache folder, OMNIGLOT built from the
raw images) and warm (second call, OMNIGLOT from the verified cache).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    os.environ["ELBOLAB_CACHE"] = tempfile.mkdtemp(prefix="elbolab-bench-cache-")
    from elbolab.data import DATASETS, Batcher, load

    print(f"{'dataset':<26} {'cold s':>7} {'warm s':>7}  counts")
    for name in sorted(DATASETS):
        if name == "omniglot-chardata" and not (Path(args.data_dir) / "omniglot" / "chardata.mat").exists():
            continue
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            d = load(name, args.data_dir)
            times.append(time.perf_counter() - t0)
        print(f"{name:<26} {times[0]:7.2f} {times[1]:7.2f}  {d.counts()}")
    d = load("mnist", args.data_dir)
    batcher = Batcher(d.split("train"), d.binary, "dynamic", seed=0, device=torch.device("cpu"))
    order = torch.randperm(len(batcher))
    t0 = time.perf_counter()
    for start in range(0, len(batcher), 100):
        batcher.batch(order[start:start + 100])
    dt = time.perf_counter() - t0
    print(f"one epoch of dynamically binarized MNIST batches of 100: {dt:.2f} s ({len(batcher) / dt:,.0f} images/s)")


if __name__ == "__main__":
    main()

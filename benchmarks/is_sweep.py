"""How fast is the importance-sampled log-likelihood for each batch and chunk size on this device?

    python benchmarks/is_sweep.py --device cuda                      # 10,000 images at K = 5000
    python benchmarks/is_sweep.py --images 200 --k 1000 --batch 100 --chunk 20,50,500

Each (batch, chunk) pair runs ``log_likelihood`` over the whole set once, after a warm-up
on a few images: ``batch x chunk`` decoder rows go through the model per pass. A CPU wants
the rows of a pass to stay in its cache (``eval.chunk_size`` defaults to 50); a GPU wants
enough rows to fill it. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from elbolab.cli.bench import run_script
from elbolab.config import RunConfig
from elbolab.data import load
from elbolab.devices import resolve_device
from elbolab.diagnostics import log_likelihood
from elbolab.models import build_model
from elbolab.speed.measure import PeakMemory, machine_info, synchronize
from elbolab.speed.report import write_json


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--batch", type=_ints, default=[100, 500], help="comma-separated batch sizes")
    p.add_argument("--chunk", type=_ints, default=[50, 200, 1000, 5000], help="comma-separated chunk sizes")
    p.add_argument("--out", type=Path, help="JSON file to write")
    args = p.parse_args(argv)
    device = resolve_device(args.device, "--device")
    data = load("binarized-mnist-embedded")
    test = data.as_float("test")
    x = test.repeat(-(-args.images // test.shape[0]), 1)[: args.images].to(device)
    torch.manual_seed(0)
    model = build_model(RunConfig().model, data.data_dim, data.as_float("train")).to(device).eval()
    info = machine_info(device)
    print(f"{info.get('gpu', info['cpu'])}, torch {torch.__version__}: {args.images} images, K = {args.k}")
    print(f"{'batch':>6} {'chunk':>6} {'rows/pass':>10} {'seconds':>8} {'img/s':>9} {'peak MB':>8}")
    rows = []
    for b in args.batch:
        for c in args.chunk:
            if c > args.k:
                continue
            log_likelihood(model, x[: min(b, args.images)], k=min(args.k, 2 * c), batch_size=b, chunk_size=c)
            with PeakMemory(device) as mem:
                synchronize(device)
                t0 = time.perf_counter()
                est = log_likelihood(model, x, k=args.k, batch_size=b, chunk_size=c)
                synchronize(device)
                dt = time.perf_counter() - t0
            row = {"batch": b, "chunk": c, "rows_per_pass": b * c, "seconds": dt, "images_per_s": args.images / dt,
                   "peak_mb": mem.peak_bytes / 2**20, "mean_log_p": est.mean}
            rows.append(row)
            print(f"{b:>6} {c:>6} {b * c:>10,} {dt:>8.2f} {args.images / dt:>9,.0f} {row['peak_mb']:>8.0f}",
                  flush=True)
    if args.out:
        write_json({"machine": info, "images": args.images, "k": args.k, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    run_script(main)

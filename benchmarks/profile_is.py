"""Where one pass of the IS log-likelihood goes: 100 test images x 50 samples (the CPU chunk).

    python benchmarks/profile_is.py                 # one thread, CPU time, best of 7
    python benchmarks/profile_is.py --threads 2 --clock wall

Times each piece of ``log_weights`` on the one-layer model (784-200-200-50) as evaluation
runs it (no gradients, the Bernoulli fast path), and the whole pass, and prints the
float32 GEMM rate of the 200 -> 784 logits product against a large square product's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from elbolab.cli.bench import run_script
from elbolab.config import RunConfig
from elbolab.data import load
from elbolab.fastpaths import log_bernoulli_linear_, retain_freed_memory
from elbolab.models import build_model


def best(fn, clock, repeats: int = 7, calls: int = 5) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        out = min(out, (clock() - t0) / calls)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    data = load("binarized-mnist-embedded")
    torch.manual_seed(0)
    model = build_model(RunConfig().model, 784, data.as_float("train")).eval()
    x = data.as_float("test")[:100]
    chunk = RunConfig().eval.chunk_size
    head = model.likelihood.head
    with torch.inference_mode():
        q = model.posterior(x)
        z = q.rsample(chunk)
        h = model.decoder(z)
        rows = z.shape[0] * z.shape[1]
        parts = {
            "encoder (x -> q)": lambda: model.posterior(x),
            "draws z ~ q": lambda: q.rsample(chunk),
            "log q + log p(z)": lambda: q.log_prob(z) + model.prior.log_prob(z),
            "decoder hidden layers (GEMMs + tanh)": lambda: model.decoder(z),
            "logits GEMM 200 -> 784 (+ bias)": lambda: F.linear(h, head.weight, head.bias),
            "log p(x|z) from features (logits GEMM included)": lambda: log_bernoulli_linear_(x, h, head.weight,
                                                                                             head.bias),
            "whole pass: log_weights": lambda: model.log_weights(x, chunk),
        }
        times = {name: best(fn, clock) for name, fn in parts.items()}
        a = torch.randn(2048, 2048)
        square = best(lambda: a @ a, clock, repeats=3, calls=1)
    logits_flops = 2 * rows * 200 * 784
    print(f"one pass: 100 images x {chunk} samples = {rows} decoder rows; {args.threads} thread(s), "
          f"{args.clock} clock, load average {[round(v, 2) for v in os.getloadavg()]}")
    whole = times["whole pass: log_weights"]
    for name, t in times.items():
        print(f"  {name:52s} {t * 1e3:7.2f} ms  {100 * t / whole:5.1f}%")
    print(f"  logits GEMM: {logits_flops / times['logits GEMM 200 -> 784 (+ bias)'] / 1e9:.0f} GFLOP/s; "
          f"2048 x 2048 x 2048 product: {2 * 2048**3 / square / 1e9:.0f} GFLOP/s")
    print(f"  10,000 images at K = 5000 = {10_000 * 5000 // rows} passes: {10_000 * 5000 / rows * whole:.0f} s "
          f"at this rate")
    return 0


if __name__ == "__main__":
    run_script(main)

"""Training steps eager, compiled, and compiled with CUDA graphs, timed side by side.

    python benchmarks/compile_modes.py --device cuda

On a GPU the one-layer model's step is a few hundred small kernels: launch overhead, not
arithmetic, sets its speed. ``torch.compile`` fuses the elementwise ones; its
``reduce-overhead`` mode also replays the step's kernels as one CUDA graph. Each step is
the trainer's (objective, backward, one read-back of the bound and a finiteness probe,
fused Adam); the
first calls pay the compilation, which is reported apart. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from elbolab.cli.bench import run_script
from elbolab.config import ConfigError, ObjectiveConfig, RunConfig
from elbolab.data import load
from elbolab.devices import resolve_device
from elbolab.fastpaths import compile_objective
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.speed.measure import compare, machine_info
from elbolab.speed.report import write_json
from elbolab.speed.suite import trainer_step

MODES = ("eager", "default", "reduce-overhead")
CASES = {"iwae-k50-b100": ("iwae", 50, 100), "iwae-k5-b20": ("iwae", 5, 20), "vae-k1-b20": ("vae", 1, 20)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--modes", default="eager,default,reduce-overhead")
    p.add_argument("--seconds", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = resolve_device(args.device, "--device")
    data = load("binarized-mnist-embedded")
    train = data.as_float("train")
    results = {}
    cases, modes = args.cases.split(","), args.modes.split(",")
    unknown = [c for c in cases if c not in CASES] + [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--cases/--modes: unknown {unknown}; cases: {', '.join(CASES)}; modes: {', '.join(MODES)}")
    for case in cases:
        name, k, batch = CASES[case]
        x = train[:batch].to(device)
        steps, compile_s = {}, {}
        for mode in modes:
            torch.manual_seed(0)
            model = build_model(RunConfig().model, data.data_dim, train).to(device).train()
            objective = make_objective(ObjectiveConfig(name=name, k=k))
            if mode != "eager":
                objective = compile_objective(objective, mode=None if mode == "default" else mode)
            step = trainer_step(objective, model, x)
            t0 = time.perf_counter()
            for _ in range(3):  # compilation (and, for CUDA graphs, recording) happens here
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_s[mode] = time.perf_counter() - t0
            steps[mode] = (step, batch)
        res = compare(steps, device, args.repeats, args.seconds, warmup=1)
        base = res["eager"][0].best if "eager" in res else None
        results[case] = {mode: {"images_per_s": tp.best, "median": tp.median, "first_steps_s": compile_s[mode],
                                "vs_eager": tp.best / base if base else None}
                         for mode, (tp, _) in res.items()}
        for mode, r in results[case].items():
            ratio = f"{r['vs_eager']:.2f}x" if r["vs_eager"] else "-"
            print(f"{case:>14} {mode:>16} {r['images_per_s']:>11,.0f} img/s {ratio:>7}  "
                  f"(first 3 steps {r['first_steps_s']:.1f} s)", flush=True)
    if args.out:
        write_json({"machine": machine_info(device), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    run_script(main)

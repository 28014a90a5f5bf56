"""Two builds of the compiled fused step against each other, interleaved in one process (one thread, CPU clock).

    git show REV:src/elbolab/fused_step.cpp > /tmp/a.cpp
    python benchmarks/fused_ab.py /tmp/a.cpp                 # A: that source, B: this checkout's
    python benchmarks/fused_ab.py /tmp/a.cpp --b /tmp/b.cpp  # B: another source

Both builds are driven by this checkout's elbolab.fused (so they must take its calls: the same
``Step`` constructor, ``run`` and ``set_adam``); a source given is built under its own module name
in its own folder. For each row, both steps train their own copy of one model from one seed on one batch, their
timed repeats alternating; prints the medians and B / A.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from elbolab import fused_cpp
from elbolab.cli.bench import run_script
from elbolab.config import RunConfig, TrainConfig
from elbolab.data import load
from elbolab.errors import ConfigError
from elbolab.fused import FusedStep
from elbolab.models import build_model
from elbolab.optimizers import make_optimizer

ROWS = [(m, o, k) for m in ("one-layer", "two-layer") for o, k in (("iwae", 1), ("vae", 1), ("iwae", 5))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="the A build's fused_step.cpp")
    p.add_argument("--b", type=Path, default=None, help="the B build's fused_step.cpp (default: this checkout's)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seconds", type=float, default=0.15, help="seconds per timed repeat")
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/elbolab-fused-ab"))
    args = p.parse_args(argv)
    for src in (args.source, args.b):
        if src is not None and not src.is_file():
            raise ConfigError(f"source: no such file {src}")
    from torch.utils import cpp_extension

    def build(name: str, src: Path):
        folder = args.build_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(name=f"elbolab_fused_step_{name}", sources=[str(src)],
                                  extra_cflags=["-O3", "-fno-math-errno"], build_directory=str(folder))

    torch.set_num_threads(1)
    b_mod = fused_cpp.load() if args.b is None else build("b", args.b)
    if b_mod is None:
        raise ConfigError("this checkout's compiled fused step does not build here")
    a_mod = build("a", args.source)
    data = load("binarized-mnist-embedded")
    train = data.as_float("train")
    x = train[:20].contiguous()
    for mname, obj, k in ROWS:
        over = [] if mname == "one-layer" else ["model.name=two-layer"]
        cfg = RunConfig().with_overrides([*over, f"objective.name={obj}", f"objective.k={k}"])
        steps = {}
        for name, mod in (("A", a_mod), ("B", b_mod)):
            torch.manual_seed(0)
            model = build_model(cfg.model, data.data_dim, train).train()
            step = FusedStep(model, make_optimizer(model, TrainConfig(lr=1e-4), "cpu"), obj, k, backend="cpp")
            step.compiled = mod
            step._bind()
            for _ in range(3):  # Adam's state exists
                step.step(x)
            steps[name] = step
        ms: dict[str, list[float]] = {n: [] for n in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                t0, n = time.process_time(), 0
                while time.process_time() - t0 < args.seconds:
                    step.step(x)
                    n += 1
                ms[name].append((time.process_time() - t0) / n * 1e3)
        a, b = statistics.median(ms["A"]), statistics.median(ms["B"])
        print(f"{mname} {obj.upper()} k={k}: A {a:.3f} ms, B {b:.3f} ms, B / A {b / a:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    run_script(main)

"""Points per second of the gap split (ELBO(q_phi), q*, IS) and of AIS, on a trained run.

    python benchmarks/gaps_speed.py RUN --data-dir ../shared/data [--points 20] [--threads 2]

Times ``elbolab.diagnostics.gaps.gap_split`` without AIS (the q* optimizer at its defaults,
IS at K = 5000, 1,000-sample ELBO estimates) and ``ais`` at 1,000 intermediate
distributions, 16 chains, 10 leapfrog steps (the CLI's defaults), each on the same
``--points`` test points; prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from elbolab.cli.common import open_run
from elbolab.diagnostics.ais import AISSettings, ais
from elbolab.diagnostics.gaps import GapSettings, gap_split
from elbolab.files import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--ais-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gaps-cpu.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    o = open_run(argparse.Namespace(run=args.run, weights="final", data_dir=args.data_dir, device=args.device,
                                    split="test"))
    keep = torch.randperm(o.x.shape[0], generator=torch.Generator().manual_seed(0))[: args.points]
    x = o.x[keep.sort().values.to(o.x.device)]
    rows = []

    def timed(stage: str, fn) -> dict:
        # wall time, and this process's CPU time (steadier on a shared machine: with one
        # thread, CPU seconds are what the work would take on an idle core)
        w0, c0 = time.perf_counter(), time.process_time()
        extra = fn() or {}
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        return {"stage": stage, "points": x.shape[0], "wall_s": wall, "cpu_s": cpu,
                "points_per_wall_s": x.shape[0] / wall, "points_per_cpu_s": x.shape[0] / cpu, **extra}

    def split() -> dict:
        s = gap_split(o.run.model, x, GapSettings(ais=None))
        return {"stages_wall_s": s.seconds, "q_star_steps_mean": float(s.local.steps.double().mean())}

    settings = AISSettings(steps=args.ais_steps)
    rows.append(timed("gap split (ELBO(q_phi) + q* + IS K=5000)", split))
    rows.append(timed(f"AIS ({settings.steps} distributions, {settings.chains} chains, {settings.leapfrog} leapfrog)",
                      lambda: ais(o.run.model, x, settings) and None))
    print(f"{'stage':<62} {'points':>6} {'wall s':>8} {'CPU s':>8} {'pts/s wall':>10} {'pts/s CPU':>10}")
    for r in rows:
        print(f"{r['stage']:<62} {r['points']:>6} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
              f"{r['points_per_wall_s']:>10.3f} {r['points_per_cpu_s']:>10.3f}")
    env = {"command": "python benchmarks/gaps_speed.py " + " ".join(sys.argv[1:]), "device": args.device,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(), "run": args.run}
    atomic_write_text(args.out, json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

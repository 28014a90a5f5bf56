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

    t0 = time.perf_counter()
    split = gap_split(o.run.model, x, GapSettings(ais=None))
    seconds = time.perf_counter() - t0
    rows.append({"stage": "gap split (ELBO(q_phi) + q* + IS K=5000)", "points": x.shape[0], "seconds": seconds,
                 "points_per_s": x.shape[0] / seconds, "stages_s": split.seconds,
                 "q_star_steps_mean": float(split.local.steps.double().mean())})
    settings = AISSettings(steps=args.ais_steps)
    t0 = time.perf_counter()
    ais(o.run.model, x, settings)
    seconds = time.perf_counter() - t0
    rows.append({"stage": f"AIS ({settings.steps} distributions, {settings.chains} chains, "
                          f"{settings.leapfrog} leapfrog)", "points": x.shape[0], "seconds": seconds,
                 "points_per_s": x.shape[0] / seconds})
    print(f"{'stage':<62} {'points':>6} {'seconds':>9} {'points/s':>9}")
    for r in rows:
        print(f"{r['stage']:<62} {r['points']:>6} {r['seconds']:>9.1f} {r['points_per_s']:>9.3f}")
    env = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg(), "run": args.run}
    atomic_write_text(args.out, json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

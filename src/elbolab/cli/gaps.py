"""``elbolab gaps``: where each run's gap comes from (approximation vs amortization), with log p(x)
from AIS or IS, and optionally the BDMC sandwich on data simulated from the model."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .. import limits
from ..config import ConfigError
from ..diagnostics.ais import SCHEDULES, STARTS, AISSettings, bdmc
from ..diagnostics.gaps import GapSettings, gap_split
from ..diagnostics.local_opt import FAMILIES, LocalOptSettings
from ..diagnostics.plots import plot_gaps
from ..files import atomic_write_text, make_dir
from .common import add_run_options, open_run

GAPS_JSON, GAPS_PNG = "gaps.json", "gaps.png"


#: each count option and its cap (limits.py: the config's caps, the Python API's too)
_COUNTS = {"points": limits.MAX_BATCH, "is_k": limits.MAX_EVAL_SAMPLES, "elbo_samples": limits.MAX_EVAL_SAMPLES,
           "samples": limits.MAX_SAMPLES, "max_steps": limits.MAX_EPOCHS, "ais_steps": limits.MAX_EPOCHS,
           "ais_chains": limits.MAX_EVAL_SAMPLES, "leapfrog": limits.MAX_EPOCHS, "batch": limits.MAX_BATCH}


def _settings(args: argparse.Namespace) -> GapSettings:
    """Every option checked against the shared limits before anything is read or computed."""
    for option, cap in _COUNTS.items():
        limits.count(getattr(args, option), "--" + option.replace("_", "-"), cap)
    limits.count(args.bdmc, "--bdmc", limits.MAX_BATCH, lo=0)
    limits.seed(args.seed, "--seed")
    limits.threads(args.threads, "--threads")
    limits.positive_number(args.lr, "--lr")
    local = LocalOptSettings(samples=args.samples, lr=args.lr, max_steps=args.max_steps,
                             eval_samples=args.elbo_samples, batch_size=args.batch)
    if args.lr < local.min_lr:
        raise ConfigError(f"--lr: must be >= the q* optimizer's smallest rate {local.min_lr:g}, got {args.lr:g}")
    ais = None if args.no_ais else AISSettings(steps=args.ais_steps, chains=args.ais_chains, leapfrog=args.leapfrog,
                                               start=args.ais_start, schedule=args.schedule, batch_size=args.batch)
    settings = GapSettings(family=args.family, is_k=args.is_k, elbo_samples=args.elbo_samples, local=local, ais=ais,
                           seed=args.seed)
    settings.check()
    return settings


def _row(name: str, s: dict) -> str:
    def f(key: str) -> str:
        v = s.get(key)
        return f"{v['mean']:9.2f} ± {v['stderr']:.2f}" if v else " " * 16

    ais = s.get("ais")
    ais_text = f"{ais['mean']:9.2f} ± {ais['stderr']:.2f}" if ais else "        -       "
    is_key = next(k for k in s if k.startswith("is_k"))
    return (f"{name:<18} {f('elbo_amortized')} {f('elbo_optimal')} {f(is_key)} {ais_text} "
            f"{f('approximation_gap')} {f('amortization_gap')}")


def cmd_gaps(args: argparse.Namespace) -> int:
    settings = _settings(args)
    names = args.names or [Path(r).name for r in args.runs]
    if len(names) != len(args.runs):
        raise ConfigError(f"--names: give one name per run ({len(args.runs)}), got {len(names)}")
    if args.out is None and len(args.runs) > 1:
        raise ConfigError("--out: several runs need one output folder")
    out = Path(args.out) if args.out else Path(args.runs[0])
    make_dir(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    models: dict[str, dict] = {}
    for name, run in zip(names, args.runs, strict=True):
        o = open_run(args, run)
        x = o.x
        if args.points < x.shape[0]:  # a seeded random subset: stored splits may be sorted by class
            keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.points]
            x = x[keep.sort().values.to(x.device)]
        print(f"elbolab: gaps of {run} on {x.shape[0]} {args.split} points "
              f"(q* family {settings.family}, IS K={settings.is_k}, "
              f"{'no AIS' if settings.ais is None else f'AIS {settings.ais.steps} distributions'})",
              file=sys.stderr, flush=True)
        split = gap_split(o.run.model, x, settings, progress=not args.no_progress)
        entry = {"run": str(run), "split": args.split, "weights": args.weights, **split.to_dict()}
        if args.bdmc:
            t0 = time.perf_counter()
            sandwich = bdmc(o.run.model, args.bdmc, settings.ais or AISSettings(batch_size=args.batch),
                            seed=args.seed, progress=not args.no_progress)
            entry["bdmc"] = {**sandwich.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}
        models[name] = entry
    result = {"torch_threads": torch.get_num_threads(), "models": models}
    atomic_write_text(out / GAPS_JSON, json.dumps(result, indent=2) + "\n")
    plot_gaps({n: m["summary"] for n, m in models.items()}, out / GAPS_PNG)
    if args.json:
        print(json.dumps({n: m["summary"] for n, m in models.items()}, indent=2))
    else:
        print(f"{'model':<18} {'ELBO(q_phi)':>16} {'ELBO(q*)':>16} {'IS L_K':>16} {'AIS':>16} "
              f"{'approximation':>16} {'amortization':>16}")
        for n, m in models.items():
            print(_row(n, m["summary"]))
        for n, m in models.items():
            print(f"{n}: log p(x) from {m['summary']['log_px_source']}")
            if "bdmc" in m:
                b = m["bdmc"]
                print(f"{n}: BDMC on {b['n']} simulated points: {b['lower']['mean']:.2f} <= log p(x) <= "
                      f"{b['upper']['mean']:.2f} (gap {b['gap_mean']:.3f} ± {b['gap_stderr']:.3f})")
    # with --json, stdout is exactly the JSON
    print(f"report: {out / GAPS_JSON}, figure: {out / GAPS_PNG}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gaps", help="split the inference gap into approximation and amortization gaps "
                                    "(q* per point, log p(x) by AIS / IS), optionally the BDMC sandwich")
    add_run_options(p, runs=True)
    p.add_argument("--names", nargs="+", help="a label per run (default: the folder names)")
    p.add_argument("--points", type=int, default=100, help="a seeded random subset of N points of the split")
    p.add_argument("--family", default="encoder", choices=FAMILIES.names(), help="the family q* is sought in")
    p.add_argument("--is-k", type=int, default=5000, help="importance samples of L_K")
    p.add_argument("--elbo-samples", type=int, default=1000, help="samples of each final ELBO estimate")
    p.add_argument("--samples", type=int, default=20, help="samples per q* optimization step")
    p.add_argument("--lr", type=float, default=1e-2, help="initial learning rate of the q* optimizer")
    p.add_argument("--max-steps", type=int, default=10_000, help="q* optimization steps at most")
    p.add_argument("--no-ais", action="store_true", help="skip AIS (log p(x) is then L_K)")
    p.add_argument("--ais-steps", type=int, default=1000, help="AIS intermediate distributions")
    p.add_argument("--ais-chains", type=int, default=16, help="AIS chains per point")
    p.add_argument("--leapfrog", type=int, default=10, help="leapfrog steps per HMC transition")
    p.add_argument("--ais-start", default="encoder", choices=STARTS, help="AIS's initial distribution")
    p.add_argument("--schedule", default="sigmoid", choices=SCHEDULES.names(), help="AIS temperature schedule")
    p.add_argument("--bdmc", type=int, default=0, metavar="N",
                   help="also sandwich log p(x) by BDMC on N points simulated from each model")
    p.add_argument("--batch", type=int, default=100, help="points per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help=f"torch threads (0: torch's default; at most {limits.MAX_THREADS:,}, as train.threads)")
    p.add_argument("--out", help="folder for gaps.json and gaps.png (default: the run folder)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_gaps)

"""``elbolab evaluate``, ``diagnose`` and ``snr``: read a trained run and measure it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import limits
from ..api import check_snr_counts
from ..config import ConfigError, flow_stl_refusal
from ..diagnostics.gradient_snr import format_snr_table, plot_snr_vs_k, snr_sweep
from ..diagnostics.report import REPORT_MD, diagnose
from ..diagnostics.summary import format_summary, summarize
from ..objectives import ESTIMATORS
from .common import EXIT_NUMERICAL, add_run_options, open_run, positive, strict_json


def cmd_evaluate(args: argparse.Namespace) -> int:
    positive(args.k, "--k", limits.MAX_EVAL_SAMPLES)
    o = open_run(args)
    e = o.run.config.eval
    report = summarize(o.run.model, o.x, o.run.config.objective.k, args.k or e.k_importance, e.batch_size,
                       e.chunk_for(o.device), e.active_unit_threshold, e.seed, progress=True)
    report["split"] = args.split
    text, bad = strict_json(report, indent=2)
    print(text if args.json else format_summary(report))
    if bad:
        print(f"elbolab: numerical fault: {', '.join(bad[:5])} {'is' if len(bad) == 1 else 'are'} not finite"
              f"{' (printed as null)' if args.json else ''}; the weights give no usable bound", file=sys.stderr)
        return EXIT_NUMERICAL
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    positive(args.k, "--k", limits.MAX_EVAL_SAMPLES)
    positive(args.points, "--points")
    o = open_run(args)
    x = o.x
    labels = o.dataset.labels.get(args.split)
    if args.points:  # a seeded random subset: stored splits may be sorted by class
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: args.points].sort().values
        x = x[keep.to(x.device)]
        labels = labels[keep] if labels is not None else None
    out = Path(args.out) if args.out else o.run.path
    diagnose(o.run, x, o.dataset.image_shape, out, k=args.k, split=args.split, labels=labels)
    print(f"report: {out / REPORT_MD}")
    return 0


def cmd_snr(args: argparse.Namespace) -> int:
    check_snr_counts(args.k, args.draws, args.batch, args.seed, ("--k", "--draws", "--batch", "--seed"))
    o = open_run(args)
    post = o.run.config.model.posterior
    refused = [e for e in args.estimators if e != "standard"] if post.active and flow_stl_refusal(post.flow) else []
    if refused:
        raise ConfigError(f"--estimators: {', '.join(refused)} cannot run with this run's {post.flow} posterior: "
                          f"{flow_stl_refusal(post.flow)}; pass --estimators standard")
    x = o.x[: args.batch]
    results = snr_sweep(o.run.model, x, args.k, args.estimators, n_draws=args.draws, seed=args.seed)
    if args.json:
        for r in results:
            print(strict_json(r.to_dict())[0])
    else:
        print(format_snr_table(results, x.shape[0]))
    if args.plot:
        print(f"figure: {plot_snr_vs_k(results, args.plot, title=f'{args.run}: batch {x.shape[0]}')}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test bounds, IS log-likelihood and active units of a run")
    add_run_options(p)
    p.add_argument("--k", type=int, help="importance samples for log p(x) (default: the run's eval.k_importance)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("diagnose", help="IS log-likelihood, bound vs k, active units, ELBO surgery, q_EW; "
                                        "writes diagnostics.md/.json and PNG figures")
    add_run_options(p, split_flag="--data")
    p.add_argument("--k", type=int, help="importance samples for log p(x), the largest k of the curve "
                                         "(default: the largest of eval.bound_ks, 5000)")
    p.add_argument("--points", type=int, help="use a random subset of N points of the split (seeded)")
    p.add_argument("--out", help="folder for the report (default: the run folder)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("snr", help="gradient signal-to-noise ratio against k for each gradient estimator")
    add_run_options(p)
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 25, 125], help="samples per data point")
    p.add_argument("--estimators", nargs="+", default=ESTIMATORS.names(), choices=ESTIMATORS.names())
    p.add_argument("--draws", type=int, default=100, help="gradient draws per (estimator, k)")
    p.add_argument("--batch", type=int, default=20, help="fixed batch: the first N images of --split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write the SNR-vs-k figure (PNG) here")
    p.add_argument("--json", action="store_true", help="print one JSON object per (estimator, k) instead of a table")
    p.set_defaults(func=cmd_snr)

"""The ``elbolab`` command: thin, it parses, validates and calls the library.

Exit codes: 0 ok; 1 unexpected error; 2 bad input (usage, config, data, run folder,
an output folder that cannot be written); 3 numerical fault (non-finite loss or
gradient); 130 interrupted (Ctrl-C or SIGTERM; a checkpoint is written first).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NUMERICAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _config_from_args(args: argparse.Namespace):
    from .config import RunConfig, load_config, preset

    if args.config and args.preset:
        from .config import ConfigError

        raise ConfigError("--config and --preset: give one of them, not both")
    cfg = load_config(args.config) if args.config else (preset(args.preset) if args.preset else RunConfig())
    overrides = list(args.set or []) + _placement(args)
    return cfg.with_overrides(overrides) if overrides else cfg


def _placement(args: argparse.Namespace) -> list[str]:
    """Overrides for where a run reads its data and trains (--data-dir, --device): the only ones a
    resumed run accepts, so a run killed on a GPU machine can continue on a CPU one."""
    return ([f"data.data_dir={args.data_dir}"] if args.data_dir else []) + (
        [f"train.device={args.device}"] if args.device else [])


def _default_out(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.name}-{cfg.model.name}-{cfg.objective.name}{cfg.objective.k}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    from .data import evaluation_images, load
    from .diagnostics.summary import format_summary, summarize
    from .runs import write_json
    from .training import Trainer, preflight

    if args.resume:
        from .config import ConfigError, load_config

        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise ConfigError(f"--resume {run_dir} and --out {args.out}: a resumed run stays in its own folder")
        cfg = load_config(run_dir / "config.yaml")
        if args.set or args.config or args.preset:
            cfg_new = _config_from_args(args)
            if cfg_new != cfg:
                raise ConfigError(f"--resume {run_dir}: the run has its own config; drop --config/--set/--preset")
        if _placement(args):
            cfg = cfg.with_overrides(_placement(args))
    else:
        cfg = _config_from_args(args)
        run_dir = Path(args.out) if args.out else _default_out(cfg)
    preflight(cfg)  # unknown names, a device this machine lacks: refused before the data is read
    dataset = load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
    print(f"elbolab: training {cfg.model.name} ({cfg.objective.name}, k={cfg.objective.k}) on {dataset.name} "
          f"for {cfg.train.epochs} epochs -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, dataset)
    # without --resume, an unfinished run of the same config in --out is continued
    trainer.fit(resume=True if args.resume else None)
    train_seconds = time.perf_counter() - t0
    if args.no_eval:
        print(f"trained in {train_seconds:.0f} s; run folder: {run_dir}")
        return EXIT_OK
    x_test = evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed)
    e = cfg.eval
    t1 = time.perf_counter()
    report = summarize(trainer.model, x_test.to(trainer.device), cfg.objective.k, e.k_importance, e.batch_size,
                       e.chunk_for(trainer.device), e.active_unit_threshold, e.seed)
    report["train_seconds"] = round(train_seconds, 1)
    report["eval_seconds"] = round(time.perf_counter() - t1, 1)
    write_json(run_dir / "report.json", report)
    print(format_summary(report))
    print(f"trained in {train_seconds:.0f} s, evaluated in {report['eval_seconds']:.0f} s")
    print(f"run folder: {run_dir}  (reload with elbolab.load_run('{run_dir}'))")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import evaluation_images, load
    from .diagnostics.summary import format_summary, summarize
    from .runs import load_run
    from .training import resolve_device

    device = resolve_device(args.device or "cpu", "--device")
    run = load_run(args.run, device=str(device), weights=args.weights)
    cfg = run.config
    data_dir = args.data_dir or cfg.data.data_dir
    dataset = load(cfg.data.name, data_dir, validation=cfg.data.validation)
    x = evaluation_images(dataset, args.split, cfg.data.binarization, cfg.data.binarization_seed)
    e = cfg.eval
    report = summarize(run.model, x.to(device), cfg.objective.k, args.k or e.k_importance, e.batch_size,
                       e.chunk_for(device), e.active_unit_threshold, e.seed)
    report["split"] = args.split
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
    return EXIT_OK


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: one-layer IWAE, k=5, on the embedded data)")
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", help="named config: demo, iwae-paper, iwae-paper-two-layer, vampprior-paper")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    p.add_argument("--data-dir", help="folder with the dataset files (else $ELBOLAB_DATA, else the user cache)")
    p.add_argument("--out", help="run folder to create, or an unfinished run of the same config to continue "
                   "(default: runs/<dataset>-<model>-<objective>-<time>)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test bounds, IS log-likelihood and active units of a run")
    p.add_argument("run", help="run folder")
    p.add_argument("--k", type=int, help="importance samples for log p(x) (default: the run's eval.k_importance)")
    p.add_argument("--split", default="test", help="data split to evaluate (default: test)")
    p.add_argument("--weights", default="final", choices=["final", "best", "last"])
    p.add_argument("--data-dir", help="folder with the dataset files")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .data import evaluation_images, load
    from .diagnostics.report import REPORT_MD, diagnose
    from .runs import load_run
    from .training import resolve_device

    device = resolve_device(args.device or "cpu", "--device")
    run = load_run(args.run, device=str(device), weights=args.weights)
    cfg = run.config
    dataset = load(cfg.data.name, args.data_dir or cfg.data.data_dir)
    x = evaluation_images(dataset, args.data, cfg.data.binarization, cfg.data.binarization_seed)
    labels = dataset.labels.get(args.data)
    if args.points:  # a seeded random subset: stored splits may be sorted by class
        import torch

        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: args.points].sort().values
        x = x[keep]
        labels = labels[keep] if labels is not None else None
    if args.k is not None and args.k < 1:
        from .config import ConfigError

        raise ConfigError(f"--k: must be >= 1, got {args.k}")
    out = Path(args.out) if args.out else run.path
    diagnose(run, x.to(device), dataset.image_shape, out, k=args.k, split=args.data, labels=labels)
    print(f"report: {out / REPORT_MD}")
    return EXIT_OK


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="IS log-likelihood, bound vs k, active units, ELBO surgery, q_EW; "
                                        "writes diagnostics.md/.json and PNG figures")
    p.add_argument("run", help="run folder")
    p.add_argument("--k", type=int, help="importance samples for log p(x), the largest k of the curve "
                                         "(default: the largest of eval.bound_ks, 5000)")
    p.add_argument("--data", default="test", help="data split to diagnose (default: test)")
    p.add_argument("--points", type=int, help="use a random subset of N points of the split (seeded)")
    p.add_argument("--out", help="folder for the report (default: the run folder)")
    p.add_argument("--weights", default="final", choices=["final", "best", "last"])
    p.add_argument("--data-dir", help="folder with the dataset files")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=cmd_diagnose)


#: each entry adds one subcommand; other modules' commands are appended here
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_evaluate, _add_diagnose]


def _add_data(sub: argparse._SubParsersAction) -> None:
    from .data.commands import add_data_command

    add_data_command(sub)


COMMANDS.append(_add_data)


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from .reproduce.command import _add_reproduce as add

    add(sub)


COMMANDS.append(_add_reproduce)


def cmd_snr(args: argparse.Namespace) -> int:
    from .diagnostics.gradient_snr import cmd_snr as run_snr

    return run_snr(args)


def _add_snr(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snr", help="gradient signal-to-noise ratio against k for each gradient estimator")
    p.add_argument("run", help="run folder")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 25, 125], help="samples per data point")
    p.add_argument("--estimators", nargs="+", default=["standard", "stl", "dreg"],
                   choices=["standard", "stl", "dreg"])
    p.add_argument("--draws", type=int, default=100, help="gradient draws per (estimator, k)")
    p.add_argument("--batch", type=int, default=20, help="fixed batch: the first N images of --split")
    p.add_argument("--split", default="test")
    p.add_argument("--weights", default="final", choices=["final", "best", "last"])
    p.add_argument("--data-dir", help="folder with the dataset files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--plot", help="write the SNR-vs-k figure (PNG) here")
    p.set_defaults(func=cmd_snr)


COMMANDS.append(_add_snr)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import add_bench_command

    add_bench_command(sub)


COMMANDS.append(_add_bench)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="elbolab", description="Train and diagnose variational autoencoders.")
    parser.add_argument("--version", action="version", version=f"elbolab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the main job: `elbolab` alone trains the embedded default
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from .allocator import retain_freed_memory
    from .config import ConfigError
    from .data import DataError
    from .files import OutputError
    from .runs import RunError
    from .training import NonFiniteError

    retain_freed_memory()  # every command makes big CPU temporaries (allocator.py)
    try:
        return args.func(args)
    except (ConfigError, DataError, RunError, OutputError) as e:
        print(f"elbolab: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"elbolab: numerical fault: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_NUMERICAL
    except KeyboardInterrupt:
        print("elbolab: interrupted; the last checkpoint is kept (resume with --resume RUN)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

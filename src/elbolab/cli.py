"""The ``elbolab`` command: thin, it parses, validates and calls the library.

Exit codes: 0 ok; 1 unexpected error; 2 bad input (usage, config, data, run folder);
3 numerical fault (non-finite loss); 130 interrupted (Ctrl-C; a checkpoint is kept).
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
    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    return cfg.with_overrides(overrides) if overrides else cfg


def _default_out(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.name}-{cfg.model.name}-{cfg.objective.name}{cfg.objective.k}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    from .data import load
    from .diagnostics.summary import format_summary, summarize
    from .runs import write_json
    from .training import Trainer

    if args.resume:
        from .config import load_config

        run_dir = Path(args.resume)
        cfg = load_config(run_dir / "config.yaml")
        if args.set or args.config or args.preset:
            cfg_new = _config_from_args(args)
            if cfg_new != cfg:
                from .config import ConfigError

                raise ConfigError(f"--resume {run_dir}: the run has its own config; drop --config/--set/--preset")
    else:
        cfg = _config_from_args(args)
        run_dir = Path(args.out) if args.out else _default_out(cfg)
    dataset = load(cfg.data.name, cfg.data.data_dir)
    print(f"elbolab: training {cfg.model.name} ({cfg.objective.name}, k={cfg.objective.k}) on {dataset.name} "
          f"for {cfg.train.epochs} epochs -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, dataset)
    trainer.fit(resume=bool(args.resume))
    train_seconds = time.perf_counter() - t0
    if args.no_eval:
        print(f"trained in {train_seconds:.0f} s; run folder: {run_dir}")
        return EXIT_OK
    x_test = dataset.as_float("test", cfg.data.binarization, cfg.data.binarization_seed + 3)
    e = cfg.eval
    t1 = time.perf_counter()
    report = summarize(trainer.model, x_test.to(trainer.device), cfg.objective.k, e.k_importance, e.batch_size,
                       e.chunk_size, e.active_unit_threshold, e.seed)
    report["train_seconds"] = round(train_seconds, 1)
    report["eval_seconds"] = round(time.perf_counter() - t1, 1)
    write_json(run_dir / "report.json", report)
    print(format_summary(report))
    print(f"trained in {train_seconds:.0f} s, evaluated in {report['eval_seconds']:.0f} s")
    print(f"run folder: {run_dir}  (reload with elbolab.load_run('{run_dir}'))")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load
    from .diagnostics.summary import format_summary, summarize
    from .runs import load_run
    from .training import resolve_device

    device = resolve_device(args.device or "cpu")
    run = load_run(args.run, device=str(device), weights=args.weights)
    cfg = run.config
    data_dir = args.data_dir or cfg.data.data_dir
    dataset = load(cfg.data.name, data_dir)
    x = dataset.as_float(args.split, cfg.data.binarization, cfg.data.binarization_seed + 3)
    e = cfg.eval
    report = summarize(run.model, x.to(device), cfg.objective.k, args.k or e.k_importance, e.batch_size,
                       e.chunk_size, e.active_unit_threshold, e.seed)
    report["split"] = args.split
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
    return EXIT_OK


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: one-layer IWAE, k=5, on the embedded data)")
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", help="named config: demo, iwae-paper")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    p.add_argument("--data-dir", help="folder with the dataset files (else $ELBOLAB_DATA, else the user cache)")
    p.add_argument("--out", help="run folder to create (default: runs/<dataset>-<model>-<objective>-<time>)")
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


#: each entry adds one subcommand; other modules' commands are appended here
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_evaluate]


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
    from .config import ConfigError
    from .data import DataError
    from .runs import RunError
    from .training import NonFiniteError

    try:
        return args.func(args)
    except (ConfigError, DataError, RunError) as e:
        print(f"elbolab: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"elbolab: numerical fault: {e}", file=sys.stderr)
        return EXIT_NUMERICAL
    except KeyboardInterrupt:
        print("elbolab: interrupted; the last checkpoint is kept (resume with --resume RUN)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

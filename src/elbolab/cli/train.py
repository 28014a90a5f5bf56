"""``elbolab train``: train a model (the embedded default, a preset, a config file) and report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import PRESETS, ConfigError, RunConfig, load_config, preset
from ..data import evaluation_images, load
from ..diagnostics.summary import format_summary, summarize
from ..preflight import preflight
from ..runs import CONFIG, REPORT, write_json
from ..training import Trainer
from .common import add_data_dir, add_device
from .sweep import cmd_sweep, wants_sweep


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.config and args.preset:
        raise ConfigError("--config and --preset: give one of them, not both")
    cfg = load_config(args.config) if args.config else (preset(args.preset) if args.preset else RunConfig())
    overrides = list(args.set or []) + _placement(args)
    return cfg.with_overrides(overrides) if overrides else cfg


def _placement(args: argparse.Namespace) -> list[str]:
    """Overrides for where a run reads its data and trains (--data-dir, --device): the only ones a
    resumed run accepts, so a run killed on a GPU machine can continue on a CPU one."""
    return ([f"data.data_dir={args.data_dir}"] if args.data_dir else []) + (
        [f"train.device={args.device}"] if args.device else [])


def _default_out(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.name}-{cfg.model.name}-{cfg.objective.name}{cfg.objective.k}-{stamp}"


def cmd_train(args: argparse.Namespace) -> int:
    if wants_sweep(args):
        return cmd_sweep(args)
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise ConfigError(f"--resume {run_dir} and --out {args.out}: a resumed run stays in its own folder")
        cfg = load_config(run_dir / CONFIG)
        if args.set or args.config or args.preset:
            cfg_new = _config_from_args(args)
            if cfg_new != cfg:
                raise ConfigError(f"--resume {run_dir}: the run has its own config; drop --config/--set/--preset")
        if _placement(args):
            cfg = cfg.with_overrides(_placement(args))
    else:
        cfg = _config_from_args(args)
        run_dir = Path(args.out) if args.out else _default_out(cfg)
    preflight(cfg)  # a device this machine lacks, a missing compiler: refused before the data is read
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
        return 0
    x_test = evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed)
    e = cfg.eval
    t1 = time.perf_counter()
    report = summarize(trainer.model, x_test.to(trainer.device), cfg.objective.k, e.k_importance, e.batch_size,
                       e.chunk_for(trainer.device), e.active_unit_threshold, e.seed)
    report["train_seconds"] = round(train_seconds, 1)
    report["eval_seconds"] = round(time.perf_counter() - t1, 1)
    write_json(run_dir / REPORT, report)
    print(format_summary(report))
    print(f"trained in {train_seconds:.0f} s, evaluated in {report['eval_seconds']:.0f} s")
    print(f"run folder: {run_dir}  (reload with elbolab.load_run('{run_dir}'))")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: one-layer IWAE, k=5, on the embedded data)")
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    add_data_dir(p)
    p.add_argument("--out", help="run folder to create, or an unfinished run of the same config to continue "
                   "(default: runs/<dataset>-<model>-<objective>-<time>)")
    add_device(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (or sweep) from its last checkpoint")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="train one run per value (repeat for a grid); runs of one shape train as one stacked "
                        "model, each in its own folder under --out")
    p.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    p.set_defaults(func=cmd_train)

"""``elbolab train``: train a model (the embedded default, a preset, a config file) and report."""

from __future__ import annotations

import argparse
import secrets
import shlex
import time
from pathlib import Path

from ..config import PRESETS, ConfigError, RunConfig, load_config, preset
from ..data import evaluation_images, load
from ..devices import resolve_device, use_threads
from ..diagnostics.monitor import CollapseMonitor
from ..diagnostics.summary import earlier_seconds, format_summary, summarize
from ..evaluation import random_subset
from ..files import fault_point
from ..preflight import preflight
from ..runs import (
    CONFIG,
    METRICS,
    PARTIAL_SCORES,
    REPORT,
    RunError,
    config_differences,
    describe_differences,
    holds_run,
    load_run,
    lock_run,
    read_metrics,
    run_status,
    write_json,
)
from ..training import RunState, train_runs
from .common import add_data_dir, add_device, warn_if_data_dir_unused
from .sweep import cmd_sweep, wants_sweep


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.config and args.preset:
        raise ConfigError("--config and --preset: give one of them, not both")
    cfg = load_config(args.config) if args.config else (preset(args.preset) if args.preset else RunConfig())
    overrides = list(args.set or []) + _placement(args)
    return cfg.with_overrides(overrides) if overrides else cfg


def _placement(args: argparse.Namespace) -> list[str]:
    """Overrides for where a run reads its data and trains (--data-dir, --device): resume-free,
    so a run killed on a GPU machine can continue on a CPU one."""
    return ([f"data.data_dir={args.data_dir}"] if args.data_dir else []) + (
        [f"train.device={args.device}"] if args.device else [])


def _default_out(cfg: RunConfig) -> Path:
    """runs/<dataset>-<model>-<objective><k>-<time>-<random>: unique even for runs started in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.data.name}-{cfg.model.name}-{cfg.objective.name}{cfg.objective.k}-{stamp}-{secrets.token_hex(3)}"
    return Path("runs") / name


def _resume_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """The run's own config, with the overrides that leave its result unchanged (progress, device,
    data folder, compile, evaluation settings); any other change is refused, naming the keys."""
    if not holds_run(run_dir):
        raise RunError(f"{run_dir}: no run to resume here (run.json missing)")
    saved = load_config(run_dir / CONFIG)
    base = load_config(args.config) if args.config else (preset(args.preset) if args.preset else saved)
    overrides = list(args.set or []) + _placement(args)
    cfg = base.with_overrides(overrides) if overrides else base
    diff = config_differences(saved, cfg)
    if diff:
        raise ConfigError(f"--resume {run_dir}: would change what the run trains ({describe_differences(diff)}); "
                          "a resumed run keeps its config, only progress, device, threads, data folder, compile and "
                          "eval settings (but eval.seed) may change")
    return cfg


def _finished_unevaluated(run_dir: Path, cfg: RunConfig, args: argparse.Namespace) -> bool:
    """Whether ``run_dir`` holds this config's run, trained to the end but without its report (an
    interrupted final evaluation): then it is evaluated, not refused."""
    if run_status(run_dir) != "finished" or config_differences(load_config(run_dir / CONFIG), cfg):
        return False  # the trainer continues it, or refuses it naming the differences
    if args.no_eval or (run_dir / REPORT).exists():
        raise RunError(f"{run_dir}: already holds a finished{'' if args.no_eval else ' and evaluated'} run of this "
                       "config; nothing to resume (choose another --out for a new run)")
    return True


def header(cfg: RunConfig, data_name: str, run_dir: Path) -> str:
    """The first line of ``elbolab train``: what trains on what, and where."""
    o, epochs = cfg.objective, cfg.train.epochs
    return (f"elbolab: training {cfg.model.name} ({o.name}, k={o.k}, {o.estimator} gradient estimator) on "
            f"{data_name} for {epochs} epoch{'s' if epochs != 1 else ''} -> {run_dir}")


def cmd_train(args: argparse.Namespace) -> int:
    if wants_sweep(args):
        return cmd_sweep(args)
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise ConfigError(f"--resume {run_dir} and --out {args.out}: a resumed run stays in its own folder")
        cfg = _resume_config(args, run_dir)
        resume: bool | None = True
    else:
        cfg = _config_from_args(args)
        run_dir = Path(args.out) if args.out else _default_out(cfg)
        # a default folder is always new; an --out holding an unfinished run of the same config is continued
        resume = None if args.out else False
    preflight(cfg)  # a device this machine lacks, a missing compiler: refused before the data is read
    warn_if_data_dir_unused(args.data_dir, cfg.data.name)
    finished = _finished_unevaluated(run_dir, cfg, args) if (args.resume or args.out) else False
    dataset = load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
    if finished:
        print(f"elbolab: {run_dir} finished training but its evaluation did not; evaluating it", flush=True)
        lock = lock_run(run_dir)
        try:
            use_threads(cfg.train.threads)  # as training set them: the numbers of an uninterrupted run
            device = resolve_device(cfg.train.device)
            model = load_run(run_dir, device=str(device)).model
            _report(model, device, dataset, cfg, run_dir, trained_seconds(run_dir, 0.0))
        except KeyboardInterrupt:
            args.to_continue = continue_line(run_dir, args.no_eval)
            raise
        finally:
            lock.release()
        return 0
    t0 = time.perf_counter()
    monitor = CollapseMonitor.for_run(cfg, dataset, resolve_device(cfg.train.device))
    state = RunState(cfg, run_dir, dataset, monitor)  # refuses, before anything is written, a run that cannot fit
    print(header(cfg, dataset.name, run_dir), flush=True)
    try:
        # held through the evaluation: one owner at a time
        train_runs([state], resume=resume, keep_lock=True, skip_finished=False)
        session = time.perf_counter() - t0
        train_seconds = trained_seconds(run_dir, session)
        if args.no_eval:
            print(f"{_trained_in(train_seconds, session)}; run folder: {run_dir}")
            return 0
        _report(state.model, state.device, dataset, cfg, run_dir, train_seconds, session)
    except KeyboardInterrupt:
        if holds_run(run_dir):
            args.to_continue = continue_line(run_dir, args.no_eval)
        raise
    finally:
        state.release()
    return 0


def trained_seconds(run_dir: Path, session: float) -> float:
    """The run's training time over all its sessions: metrics.jsonl's epoch (and monitor) times
    summed, or this process's wall clock where that is more (it also counts setup and checkpoints)."""
    rows = read_metrics(run_dir / METRICS)
    logged = sum(float(r.get("seconds") or 0.0) + float(r.get("monitor_seconds") or 0.0) for r in rows)
    return max(session, logged)


def _trained_in(total: float, session: float | None) -> str:
    if session is not None and total > session + 1:  # resumed: say both
        return f"trained in {total:.0f} s over all its sessions ({session:.0f} s in this one)"
    return f"trained in {total:.0f} s"


def continue_line(run_dir: Path, no_eval: bool = False) -> str:
    """What the interrupt message prints: the exact command that continues ``run_dir`` (a new
    command without --out would start another run in a new folder)."""
    return (f"the last checkpoint is kept; continue with: elbolab train --resume {shlex.quote(str(run_dir))}"
            + (" --no-eval" if no_eval else ""))


def _report(model, device, dataset, cfg: RunConfig, run_dir: Path, train_seconds: float,
            session: float | None = None) -> None:
    """Evaluate on the test split, write report.json, print the summary."""
    e = cfg.eval
    x_test = random_subset(evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed),
                           e.test_images)
    t1 = time.perf_counter()
    report = summarize(model, x_test.to(device), cfg.objective.k, e.k_importance, e.batch_size,
                       e.chunk_for(device), e.active_unit_threshold, e.seed, progress=True,
                       partial_file=run_dir / PARTIAL_SCORES)
    report["train_seconds"] = round(train_seconds, 1)
    report["eval_seconds"] = round(time.perf_counter() - t1 + earlier_seconds(report), 1)
    fault_point("report")
    write_json(run_dir / REPORT, report)
    print(format_summary(report))
    print(f"{_trained_in(train_seconds, session)}, evaluated in {report['eval_seconds']:.0f} s")
    print(f"run folder: {run_dir}  (reload with elbolab.load_run('{run_dir}'))")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: one-layer IWAE, k=5, on the embedded data)")
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    add_data_dir(p)
    p.add_argument("--out", help="run folder to create, or an unfinished run of the same config to continue "
                   "(default: a new runs/<dataset>-<model>-<objective>-<time>-<random>)")
    add_device(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run or sweep from its last checkpoint "
                   "(or evaluate a finished run whose evaluation was interrupted); --set may change only what "
                   "leaves the result unchanged: train.progress, train.device, train.threads, train.compile, "
                   "data.data_dir, eval.* (but eval.seed)")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="train one run per value (repeat for a grid); runs of one shape train as one stacked "
                        "model, each in its own folder under --out")
    p.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    p.set_defaults(func=cmd_train)

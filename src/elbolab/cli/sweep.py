"""``elbolab train --sweep KEY=V1,V2,...``: several runs of one config, trained stacked where they share a shape."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config, preset
from ..data import evaluation_images, load
from ..devices import resolve_device
from ..diagnostics.monitor import run_monitor
from ..diagnostics.summary import summarize
from ..evaluation import random_subset
from ..preflight import preflight
from ..runs import (
    CONFIG,
    REPORT,
    config_differences,
    describe_differences,
    load_run,
    lock_run,
    read_json_object,
    write_json,
)
from ..sweep import (
    SWEEP_FILE,
    expand,
    is_sweep_folder,
    load_config_with_sweep,
    parse_sweep,
    read_sweep_file,
    write_sweep_file,
)
from ..training import NonFiniteError, pack, train_runs


def wants_sweep(args: argparse.Namespace) -> bool:
    """Whether ``train`` was asked for a sweep: --sweep, a config with a sweep section, or --resume of one."""
    if args.sweep or is_sweep_folder(args.resume):
        return True
    return bool(args.config) and bool(load_config_with_sweep(args.config)[1])


def _placement(args: argparse.Namespace) -> dict[str, str]:
    return {**({"data.data_dir": args.data_dir} if args.data_dir else {}),
            **({"train.device": args.device} if args.device else {})}


def _planned(args: argparse.Namespace) -> tuple[Path, list[tuple[str, RunConfig]]]:
    """The sweep's folder and its runs (name, config), from the options or the folder to resume."""
    if args.resume:
        folder = Path(args.resume)
        if args.sweep or args.config or args.preset:
            raise ConfigError(f"--resume {folder}: a sweep's runs keep their configs; drop --config/--preset/--sweep")
        names = read_sweep_file(folder)
        runs = [(n, load_config(folder / n / CONFIG)) for n in names if (folder / n / CONFIG).exists()]
        if len(runs) != len(names):
            missing = next(n for n in names if not (folder / n / CONFIG).exists())
            raise ConfigError(f"{folder / missing}: listed in {SWEEP_FILE} but holds no run config")
        overrides = list(args.set or []) + [f"{k}={v}" for k, v in _placement(args).items()]
        resumed = []
        for name, saved in runs:
            cfg = saved.with_overrides(overrides) if overrides else saved
            diff = config_differences(saved, cfg)
            if diff:  # as train --resume of one run: only what leaves the result unchanged may change
                raise ConfigError(f"--resume {folder}: would change what run {name} trains "
                                  f"({describe_differences(diff)}); only progress, device, threads, data folder, "
                                  "compile and eval settings (but eval.seed) may change")
            resumed.append((name, cfg))
        return folder, resumed
    if args.config and args.preset:
        raise ConfigError("--config and --preset: give one of them, not both")
    sweep = {}
    if args.config:
        cfg, sweep = load_config_with_sweep(args.config)
    else:
        cfg = preset(args.preset) if args.preset else RunConfig()
    overrides = list(args.set or []) + [f"{k}={v}" for k, v in _placement(args).items()]
    if overrides:
        cfg = cfg.with_overrides(overrides)
    for key, values in parse_sweep(args.sweep or []).items():
        sweep[key] = values  # the command line's list replaces the file's
    runs = expand(cfg, sweep)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(args.out) if args.out else Path("runs") / f"{cfg.data.name}-{cfg.model.name}-sweep-{stamp}"
    if (folder / SWEEP_FILE).exists() and read_sweep_file(folder) != [n for n, _ in runs]:
        raise ConfigError(f"{folder}: holds another sweep ({folder / SWEEP_FILE}); resume it or choose another --out")
    write_sweep_file(folder, runs, sweep)
    return folder, runs


def cmd_sweep(args: argparse.Namespace) -> int:
    folder, runs = _planned(args)
    for _, cfg in runs:
        preflight(cfg)
    configs = [c for _, c in runs]
    groups = pack(configs)
    print(f"elbolab: sweep of {len(runs)} runs -> {folder} ({len(groups)} stack{'s' * (len(groups) != 1)}: "
          f"{', '.join(str(len(g)) for g in groups)} runs)", flush=True)
    d = configs[0].data
    dataset = None
    if all((c.data.name, c.data.data_dir, c.data.validation) == (d.name, d.data_dir, d.validation) for c in configs):
        dataset = load(d.name, d.data_dir, validation=d.validation)
    t0 = time.perf_counter()
    outcomes = train_runs([(c, folder / n) for n, c in runs], resume=True if args.resume else None,
                             dataset=dataset, monitors=run_monitor)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    failed = [(n, o) for (n, _), o in zip(runs, outcomes, strict=True) if o.status != "finished"]
    for (name, cfg), o in zip(runs, outcomes, strict=True):
        line = f"  {name}: {o.status}"
        if o.status == "finished" and not args.no_eval:
            line += ", " + _evaluate(folder / name, cfg, dataset)
        print(line + (f" ({o.error})" if o.error else ""), flush=True)
    print(f"run folders in {folder} (reload one with elbolab.load_run('{folder / runs[0][0]}'))")
    if failed:
        raise NonFiniteError(f"{len(failed)} of {len(runs)} runs stopped: " + "; ".join(
            f"{n}: {' '.join(str(o.error).split())[:200]}" for n, o in failed))
    return 0


def _evaluate(run_dir: Path, cfg: RunConfig, dataset) -> str:
    """report.json for a finished run (as ``train`` writes it after one run); one line to print."""
    if (run_dir / REPORT).exists():
        report = read_json_object(run_dir / REPORT, "a run report")
    else:
        if dataset is None:
            dataset = load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
        lock = lock_run(run_dir)  # one owner at a time, as train holds a run through its evaluation
        try:
            device = resolve_device(cfg.train.device)
            model = load_run(run_dir, device=str(device)).model
            e = cfg.eval
            x = random_subset(evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed),
                              e.test_images).to(device)
            t1 = time.perf_counter()
            report = summarize(model, x, cfg.objective.k, e.k_importance, e.batch_size, e.chunk_for(device),
                               e.active_unit_threshold, e.seed)
            report["eval_seconds"] = round(time.perf_counter() - t1, 1)
            write_json(run_dir / REPORT, report)
        finally:
            lock.release()
    ll = report["log_likelihood"]
    return f"test log p(x) {ll['mean']:.2f} +- {ll['stderr']:.2f} nats (IS K={ll['k']})"


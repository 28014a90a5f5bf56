"""``elbolab train --sweep KEY=V1,V2,...``: several runs of one config, trained stacked where they share a shape."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import time
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config, preset
from ..data import ImageDataset, evaluation_images, load
from ..devices import resolve_device, use_threads
from ..diagnostics.monitor import run_monitor
from ..diagnostics.summary import earlier_seconds, summarize
from ..evaluation import random_subset
from ..files import OutputError, check_writable_folder
from ..models import build_model
from ..preflight import check_memory, preflight
from ..runs import (
    CONFIG,
    INFO,
    LOCK,
    PARTIAL_SCORES,
    REPORT,
    RunError,
    RunLock,
    check_no_links,
    config_differences,
    describe_differences,
    load_run,
    lock_run,
    read_json_object,
    remove_owned_temp_files,
    write_json,
)
from ..sweep import (
    SWEEP_FILE,
    expand,
    is_sweep_folder,
    load_config_with_sweep,
    parse_sweep,
    read_sweep_configs,
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


def _recorded(folder: Path, names: list[str]) -> dict[str, RunConfig]:
    """Each run's config as the sweep recorded it: its run folder's config.yaml, else sweep.json's."""
    out = read_sweep_configs(folder)
    for n in names:
        path = folder / n / CONFIG
        if path.exists():
            try:
                out[n] = load_config(path)
            except ConfigError as e:
                raise RunError(str(e)) from None
    return out


def _check_out(folder: Path) -> None:
    """Refuse, before anything is written, an --out that cannot hold this sweep: a file, a single
    run's folder, or a folder of other files (a sweep's own folder, or an empty one, is fine)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: the sweep folder (--out) is a file, not a folder; choose another --out")
    if not folder.is_dir() or is_sweep_folder(folder):
        return
    if (folder / INFO).exists():
        raise RunError(f"{folder}: holds a single run ({INFO}), not a sweep; nothing was changed. A sweep needs a "
                       "folder of its own: choose another --out")
    # a sweep killed before its sweep.json was written leaves at most its lock and temp files
    others = sorted(p.name for p in folder.iterdir() if p.name != LOCK and not _temp_file(p.name))
    if others:
        raise RunError(f"{folder}: exists and is neither empty nor an elbolab sweep (holds {others[0]!r}); "
                       "choose another --out")


def _temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _unfinished(run_dir: Path) -> bool:
    with contextlib.suppress(RunError):
        return read_json_object(run_dir / INFO).get("status") != "finished"
    return True


def _planned(args: argparse.Namespace) -> tuple[Path, list[tuple[str, RunConfig]], dict[str, list]]:
    """The sweep's folder, its runs (name, config) and its swept values, from the options or the
    folder to resume. Reads only: nothing is written before the runs pass preflight."""
    if args.resume:
        folder = Path(args.resume)
        if args.sweep or args.config or args.preset:
            raise ConfigError(f"--resume {folder}: a sweep's runs keep their configs; drop --config/--preset/--sweep")
        names = read_sweep_file(folder)
        recorded = _recorded(folder, names)
        missing = [n for n in names if n not in recorded]
        if missing:  # a sweep.json of an older elbolab, which did not record the configs
            raise ConfigError(f"{folder / missing[0]}: listed in {SWEEP_FILE} but holds no run config; rerun the "
                              "command that started the sweep")
        overrides = list(args.set or []) + [f"{k}={v}" for k, v in _placement(args).items()]
        resumed = []
        for name in names:
            saved = recorded[name]
            cfg = saved.with_overrides(overrides) if overrides else saved
            diff = config_differences(saved, cfg)
            if diff:  # as train --resume of one run: only what leaves the result unchanged may change
                raise ConfigError(f"--resume {folder}: would change what run {name} trains "
                                  f"({describe_differences(diff)}); only progress, device, threads, data folder, "
                                  "compile and eval settings (but eval.seed) may change")
            resumed.append((name, cfg))
        return folder, resumed, {}
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
    _check_out(folder)
    if is_sweep_folder(folder):
        names = [n for n, _ in runs]
        if read_sweep_file(folder) != names:
            raise ConfigError(f"{folder}: holds another sweep ({folder / SWEEP_FILE}); resume it or choose "
                              "another --out")
        recorded = _recorded(folder, names)
        for name, run_cfg in runs:  # as a single run's --out: the same config continues, another is refused
            diff = config_differences(recorded[name], run_cfg) if name in recorded else []
            if diff:
                raise RunError(f"{folder}: holds a sweep of another config (run {name}: {describe_differences(diff)})"
                               f"; nothing was changed. Continue it with --resume {folder}, or choose another --out")
    return folder, runs, sweep


def _check_stack_memory(group: list[RunConfig], dataset: ImageDataset | None) -> None:
    """Refuse a stack whose step cannot fit, before anything is written: its peak grows with the
    number of runs stepping together (preflight.estimate_memory with ``runs``)."""
    cfg = group[0]
    d = cfg.data
    ds = dataset if dataset is not None else load(d.name, d.data_dir, validation=d.validation)
    device = resolve_device(cfg.train.device)
    train_float = ds.as_float("train", "none")
    try:
        model = build_model(cfg.model, ds.data_dim, train_float, dataset=d.name, image_shape=ds.image_shape)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model: cannot build {cfg.model.name!r} with this config: {e}") from None
    n_valid = ds.split("valid").shape[0] if "valid" in ds.splits else 0
    check_memory(cfg, model.to(device), ds.data_dim, n_valid, runs=len(group))


def _open_folder(folder: Path, runs: list[tuple[str, RunConfig]], sweep: dict[str, list]) -> RunLock:
    """Create the sweep's folder and hold its lock (one sweep process per folder); the owner removes
    temp files killed writes left and records the runs in sweep.json when it does not yet."""
    check_writable_folder(folder, "sweep folder (--out)")
    check_no_links(folder, (SWEEP_FILE, LOCK))
    lock = lock_run(folder)
    try:
        remove_owned_temp_files(folder, (SWEEP_FILE,))
        if not is_sweep_folder(folder) or not read_sweep_configs(folder):
            write_sweep_file(folder, runs, sweep)
    except BaseException:
        lock.release()
        raise
    return lock


def cmd_sweep(args: argparse.Namespace) -> int:
    folder, runs, sweep = _planned(args)
    for _, cfg in runs:
        preflight(cfg)
    configs = [c for _, c in runs]
    groups = pack(configs)
    d = configs[0].data
    dataset = None
    if all((c.data.name, c.data.data_dir, c.data.validation) == (d.name, d.data_dir, d.validation) for c in configs):
        dataset = load(d.name, d.data_dir, validation=d.validation)
    for group in groups:  # the runs of a stack that still train step together
        training = [configs[i] for i in group if _unfinished(folder / runs[i][0])]
        if training:
            _check_stack_memory(training, dataset)
    lock = _open_folder(folder, runs, sweep)
    try:
        return _train_sweep(args, folder, runs, groups, dataset)
    finally:
        lock.release()


def _train_sweep(args: argparse.Namespace, folder: Path, runs: list[tuple[str, RunConfig]], groups: list[list[int]],
                 dataset: ImageDataset | None) -> int:
    print(f"elbolab: sweep of {len(runs)} runs -> {folder} ({len(groups)} stack{'s' * (len(groups) != 1)}: "
          f"{', '.join(str(len(g)) for g in groups)} runs)", flush=True)
    t0 = time.perf_counter()
    args.to_continue = ("every run's last checkpoint is kept; continue with: elbolab train --resume "
                        f"{shlex.quote(str(folder))}" + (" --no-eval" if args.no_eval else ""))
    # a run whose folder a kill came before starts; the others continue (resume=None, as the first command)
    outcomes = train_runs([(c, folder / n) for n, c in runs], resume=None, dataset=dataset, monitors=run_monitor)
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
            use_threads(cfg.train.threads)  # as the run's training set them: an uninterrupted sweep's numbers
            device = resolve_device(cfg.train.device)
            model = load_run(run_dir, device=str(device)).model
            e = cfg.eval
            x = random_subset(evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed),
                              e.test_images).to(device)
            t1 = time.perf_counter()
            report = summarize(model, x, cfg.objective.k, e.k_importance, e.batch_size, e.chunk_for(device),
                               e.active_unit_threshold, e.seed, progress=True,
                               partial_file=run_dir / PARTIAL_SCORES)
            report["eval_seconds"] = round(time.perf_counter() - t1 + earlier_seconds(report), 1)
            write_json(run_dir / REPORT, report)
        finally:
            lock.release()
    ll = report["log_likelihood"]
    return f"test log p(x) {ll['mean']:.2f} +- {ll['stderr']:.2f} nats (IS K={ll['k']})"


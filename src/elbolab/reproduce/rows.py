"""One row of a reproduction: train (or resume), evaluate the paper's way, write result.json.

A row lives in ``<table folder>/rows/<row id>-<config hash>/``: ``run/`` is an ordinary
run folder, ``result.json`` is written last and atomically, so its presence means the
row is finished. A killed row resumes from its run folder's checkpoint. Rows of one shape
can train as one stacked model (:class:`PackTask`, elbolab.training) and are then evaluated
one by one; each row's folder is the same as if it had trained alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..data import evaluation_images, load
from ..data.dataset import file_sha256
from ..devices import resolve_device, use_threads
from ..diagnostics import active_units
from ..diagnostics.ais import implicit_log_likelihood
from ..diagnostics.monitor import run_monitor
from ..diagnostics.surgery import elbo_surgery
from ..evaluation import log_likelihood, random_subset
from ..fastpaths import retain_freed_memory
from ..runs import (
    NO_RUN,
    PARTIAL_SCORES,
    WEIGHTS,
    RunError,
    environment_info,
    load_run,
    read_json_object,
    read_metrics,
    run_status,
    write_json,
)
from ..training import train_runs
from .figures import ROW_FIGURES, TABLE_FIGURES
from .tables import config_key

RESULT_FILE = "result.json"

log = logging.getLogger("elbolab")


@dataclass(frozen=True)
class RowTask:
    """Everything a worker process needs, as plain picklable data."""

    table: str
    row_id: str
    config: dict[str, Any]
    row_dir: str
    evaluation: str
    data_label: str
    #: extra figures (figures.ROW_FIGURES names) and the folder they are saved in
    figures: tuple[str, ...] = ()
    figure_dir: str | None = None


# --- evaluations: run folder + data -> the paper's metrics ---------------------------

#: the metric an evaluator may add for the seconds a killed scoring spent before this sitting; not
#: kept among the metrics, but added to the row's eval_seconds
EARLIER_SECONDS = "earlier_seconds"


def evaluate_likelihood(model, dataset, cfg: RunConfig, device, partial_file: Path | None = None) -> dict[str, Any]:
    """IS log-likelihood (K = eval.k_importance) and active units on the test set (or the
    random subset of eval.test_images of it); a killed scoring continues from ``partial_file``."""
    e = cfg.eval
    x = evaluation_images(dataset, "test", cfg.data.binarization, cfg.data.binarization_seed)
    x = random_subset(x, e.test_images).to(device)
    if getattr(model, "implicit_posterior", False):  # no log q(z|x) (models.avb): AIS from r(z|x)
        res = implicit_log_likelihood(model, x, seed=e.seed, progress=cfg.train.progress)
        au = active_units(model, x, threshold=e.active_unit_threshold, batch_size=e.batch_size, seed=e.seed)
        return {
            "log_likelihood": res.per_point.mean().item(), "log_likelihood_stderr": res.to_dict()["stderr"],
            "nll": -res.per_point.mean().item(), "nll_stderr": res.to_dict()["stderr"], "n_test": int(x.shape[0]),
            "ais_steps": res.settings.steps, "ais_chains": res.settings.chains, "ais_leapfrog": res.settings.leapfrog,
            "ais_acceptance": float(res.acceptance.mean()),
            "active_units": str(au), "active_units_counts": au.counts,
        }
    ll = log_likelihood(model, x, k=e.k_importance, batch_size=e.batch_size, chunk_size=e.chunk_for(device),
                        seed=e.seed, progress=f"test log p(x), IS K={e.k_importance}" if cfg.train.progress else None,
                        partial_file=partial_file)
    au = active_units(model, x, threshold=e.active_unit_threshold, batch_size=e.batch_size, seed=e.seed)
    return {
        "log_likelihood": ll.mean, "log_likelihood_stderr": ll.stderr,
        "nll": -ll.mean, "nll_stderr": ll.stderr, "k_importance": e.k_importance, "n_test": int(x.shape[0]),
        "active_units": str(au), "active_units_counts": au.counts, EARLIER_SECONDS: ll.earlier_seconds,
    }


def evaluate_surgery(model, dataset, cfg: RunConfig, device, partial_file: Path | None = None) -> dict[str, Any]:
    """ELBO surgery over the whole training split (N = 60,000 for MNIST: log N = 11.0021)."""
    x = evaluation_images(dataset, "train", cfg.data.binarization, cfg.data.binarization_seed).to(device)
    s = elbo_surgery(model, x, seed=cfg.eval.seed)
    out = s.to_dict()
    out["n_surgery"] = out.pop("n")
    return out


#: evaluation name -> fn(model, dataset, config, device, partial_file) -> metrics
EVALUATORS: dict[str, Callable[..., dict[str, Any]]] = {
    "likelihood": evaluate_likelihood,
    "surgery": evaluate_surgery,
}


def hardware() -> str:
    """One line: the GPU if training used one, else the CPU and core count."""
    info = environment_info()
    if info.get("gpu"):
        return str(info["gpu"])
    return f"{info['processor'] or 'cpu'}, {info['cpu_count']} cores"


def _weights(cfg: RunConfig) -> str:
    """Early-stopped protocols (VampPrior) report the weights best on validation."""
    return "best" if cfg.train.early_stopping_patience > 0 else "final"


def _finished(run_dir: Path) -> tuple[bool, bool]:
    """(finished, started) for a row's run folder: trained to the end, or begun (a killed one,
    before its first checkpoint or after, is continued by the trainer from where it was)."""
    status = run_status(run_dir)
    return status == "finished", status != NO_RUN


def _trained_model(cfg: RunConfig, run_dir: Path):
    device = str(resolve_device(cfg.train.device))
    return load_run(run_dir, device=device, weights=_weights(cfg)).model


def _train(cfg: RunConfig, run_dir: Path, dataset):
    """Train, resuming an interrupted run (one killed before its first checkpoint starts from its
    seed); returns the model to evaluate, in eval mode. A finished run is not trained again."""
    finished, started = _finished(run_dir)
    if not finished and started and read_json_object(run_dir / "run.json").get("status") == "finished":
        raise RunError(f"{_weights_file(cfg, run_dir)}: missing from a finished row; delete {run_dir.parent} "
                       "to train the row again")
    if not finished:
        (outcome,) = train_runs([(cfg, run_dir)], resume=started, dataset=dataset, monitors=run_monitor,
                                skip_finished=False)
        outcome.raise_if_failed()
    return _trained_model(cfg, run_dir)


def _weights_file(cfg: RunConfig, run_dir: Path) -> Path:
    return run_dir / WEIGHTS[_weights(cfg)]


def result_checksum(result: dict[str, Any], weights_sha256: str) -> str:
    """SHA-256 tying a row's result to its config (inside the result) and to the bytes of the
    weights it was computed from: an edited number, config or weights file no longer matches."""
    body = json.dumps({k: v for k, v in result.items() if k not in ("checksum", "cached")}, sort_keys=True)
    return hashlib.sha256(f"{body}\n{weights_sha256}".encode()).hexdigest()


#: result.json key -> the types it must hold (what _evaluate_row writes)
_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "metrics": (dict,), "epochs": (int,), "train_seconds": (int, float), "eval_seconds": (int, float),
    "hardware": (str,), "config": (dict,),
}


def read_result(path: Path) -> dict[str, Any]:
    """A row's result.json, checked for the shape this module writes; anything else is refused
    in one line naming the file (a ConfigError: exit 2), never a traceback."""
    try:
        result = read_json_object(path, "a row result")
    except RunError as e:
        raise ConfigError(f"{e}; delete it to recompute the row") from None
    for key, types in _RESULT_FIELDS.items():
        if not isinstance(result.get(key), types) or isinstance(result.get(key), bool):
            raise ConfigError(f"{path}: not a row result ({key} is {type(result.get(key)).__name__}, "
                              f"expected {' or '.join(t.__name__ for t in types)}); delete it to recompute the row")
    return result


def trusted_result(task: RowTask) -> dict[str, Any] | None:
    """The row's result.json when it can stand for this row: computed under this row's config
    (training and evaluation), from the weights in the run folder as they are now (its
    checksum); None when the row is to be evaluated (or trained) again."""
    row_dir = Path(task.row_dir)
    path = row_dir / RESULT_FILE
    if not path.exists():
        return None
    result = read_result(path)
    cfg = RunConfig.from_dict(task.config)
    try:
        same = config_key(RunConfig.from_dict(result["config"])) == config_key(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: its config is not valid ({e}); delete it to recompute the row") from None
    if not same:
        log.info("%s: computed under another evaluation config; evaluating the row again", path)
        return None
    weights = _weights_file(cfg, row_dir / "run")
    if not weights.exists():
        log.warning("%s: its weights %s are missing; not used", path, weights)
        return None
    if result.get("checksum") != result_checksum(result, file_sha256(weights)):
        log.warning("%s: its checksum does not match its contents and %s; not used", path, weights.name)
        return None
    return result


def run_row(task: RowTask) -> dict[str, Any]:
    """Train and evaluate one row, or evaluate its trained weights again (a new evaluation
    config, or a result.json that cannot be trusted), or return its trusted cached result."""
    retain_freed_memory()  # a worker process's entry point, like the CLI's
    row_dir = Path(task.row_dir)
    cached = trusted_result(task)
    if cached is not None:
        return {**cached, "cached": True}
    cfg = RunConfig.from_dict(task.config)
    use_threads(cfg.train.threads)  # a row trained earlier is only scored: no trainer sets them
    row_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
    log.info("%s %s: training %s on %s, at most %d epochs -> %s", task.table, task.row_id, cfg.model.name,
             task.data_label, cfg.train.epochs, row_dir / "run")
    model = _train(cfg, row_dir / "run", dataset)
    return _evaluate_row(task, cfg, model, dataset, t0)


def binarization_label(cfg: RunConfig, dataset) -> str:
    """How the row's images were binarized, as the table states it."""
    if dataset.binary:
        return "static (Larochelle)" if dataset.name.startswith("binarized-mnist") else "binary as distributed"
    return {"dynamic": "dynamic", "static": "static (one seeded draw)"}.get(cfg.data.binarization, "grey levels")


def split_label(dataset) -> str:
    """Train / validation / test images, as the table states them."""
    n = dataset.counts()
    return " / ".join(f"{n[s]:,}" if s in n else "–" for s in ("train", "valid", "test"))


def curve_points(metrics_rows: list[dict[str, Any]]) -> list[list[float | None]]:
    """[epoch, training bound, validation bound or None] per epoch: the learning curve."""
    out = []
    for r in metrics_rows:
        valid = next((v for k, v in r.items() if k.startswith("valid_iwae_")), None)
        out.append([r.get("epoch"), r.get("train_bound"), valid])
    return out


def _evaluate_row(task: RowTask, cfg: RunConfig, model, dataset, t0: float) -> dict[str, Any]:
    """Evaluate a trained row the paper's way and write its result.json."""
    row_dir = Path(task.row_dir)
    run_dir = row_dir / "run"
    device = next(model.parameters()).device
    log.info("%s %s: evaluating (%s)", task.table, task.row_id, task.evaluation)
    t1 = time.perf_counter()
    with torch.no_grad():
        metrics = EVALUATORS[task.evaluation](model, dataset, cfg, device, run_dir / PARTIAL_SCORES)
    earlier = metrics.pop(EARLIER_SECONDS, 0.0)
    figures = {}
    for name in task.figures:
        path = Path(task.figure_dir or row_dir) / f"{task.row_id}-{name}.png"
        figures[name] = ROW_FIGURES[name](model, dataset, cfg, path).name
    metrics_rows = read_metrics(run_dir / "metrics.jsonl")
    result: dict[str, Any] = {
        "table": task.table,
        "row": task.row_id,
        "data": task.data_label,
        "dataset_source": dataset.source,
        "binarization": binarization_label(cfg, dataset),
        "split": split_label(dataset),
        "metrics": metrics,
        "epochs": len(metrics_rows),
        "epochs_planned": cfg.train.epochs,
        "weights": _weights(cfg),
        # summed over every epoch actually run, so a resumed row counts its earlier runs too
        "train_seconds": round(sum(float(r.get("seconds", 0.0)) for r in metrics_rows), 1),
        "eval_seconds": round(time.perf_counter() - t1 + earlier, 1),
        "session_seconds": round(time.perf_counter() - t0, 1),
        "hardware": hardware(),
        "figures": figures,
        "curve": curve_points(metrics_rows),
        "config": task.config,
    }
    result["checksum"] = result_checksum(result, file_sha256(_weights_file(cfg, run_dir)))
    write_json(row_dir / RESULT_FILE, result)
    return {**result, "cached": False}


@dataclass(frozen=True)
class PackTask:
    """Rows of one shape (elbolab.training.stack_key) trained as one stacked model, then evaluated
    one by one. Plain picklable data, like a RowTask, for any executor."""

    tasks: tuple[RowTask, ...]

    @property
    def config(self) -> dict[str, Any]:
        """The first row's config (executors read its device)."""
        return self.tasks[0].config


def run_pack(pack: PackTask) -> dict[str, Any]:
    """Train the pack's unfinished rows stacked, evaluate each: ``{"rows": {row id: result or
    {"error": message}}}``; a row that fails leaves the others' results intact."""
    retain_freed_memory()
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    todo: list[tuple[RowTask, RunConfig]] = []
    for task in pack.tasks:
        cached = trusted_result(task)
        if cached is not None:
            out[task.row_id] = {**cached, "cached": True}
        else:
            Path(task.row_dir).mkdir(parents=True, exist_ok=True)
            todo.append((task, RunConfig.from_dict(task.config)))
    if not todo:
        return {"rows": out}
    use_threads(todo[0][1].train.threads)
    d = todo[0][1].data
    dataset = load(d.name, d.data_dir, validation=d.validation)
    train_now = [(task, cfg) for task, cfg in todo if not _finished(Path(task.row_dir) / "run")[0]]
    status = {task.row_id: None for task, _ in todo}
    if train_now:
        outcomes = train_runs([(cfg, Path(task.row_dir) / "run") for task, cfg in train_now], dataset=dataset,
                              monitors=run_monitor)
        for (task, _), o in zip(train_now, outcomes, strict=True):
            status[task.row_id] = o.error if o.status != "finished" else None
    for task, cfg in todo:
        if status[task.row_id] is not None:
            out[task.row_id] = {"error": status[task.row_id]}
            continue
        try:
            out[task.row_id] = _evaluate_row(task, cfg, _trained_model(cfg, Path(task.row_dir) / "run"), dataset, t0)
        except Exception as e:  # noqa: BLE001 - one row's evaluation failing is that row's result
            out[task.row_id] = {"error": f"{type(e).__name__}: {e}"}
    return {"rows": out}


def run_unit(unit: RowTask | PackTask) -> dict[str, Any]:
    """What an executor runs: one row, or a pack of rows trained stacked."""
    return run_pack(unit) if isinstance(unit, PackTask) else run_row(unit)



# --- table figures: drawn from the finished rows -------------------------------------------

#: what a table figure says of a row whose trained model it cannot read, by the row's status
_MISSING = {"not run": "not run yet", "failed": "failed", None: "not selected and not in the table"}


def finished_row(row_dir: str | None, data_dir: str | None = None) -> tuple[Any, Any, RunConfig] | str:
    """(model on the CPU, dataset, config) of a finished row folder, or a one-line reason it
    cannot be read here (no folder on this machine, weights or data missing)."""
    if not row_dir or not (Path(row_dir) / RESULT_FILE).exists():
        return "not finished here (no row folder with a result)"
    try:
        cfg = RunConfig.from_dict(read_result(Path(row_dir) / RESULT_FILE)["config"])
        model = load_run(Path(row_dir) / "run", device="cpu", weights=_weights(cfg)).model
        dataset = load(cfg.data.name, data_dir or cfg.data.data_dir, validation=cfg.data.validation)
    except (ConfigError, RunError, OSError) as e:
        return f"not readable here ({e})"
    return model, dataset, cfg


def draw_table_figures(figures: dict[str, tuple[str, ...]], entries: list[Any], out_dir: Path,
                       data_dir: str | None = None) -> dict[str, Path]:
    """Each table figure (``TableSpec.figures``) drawn from its rows as ``<out_dir>/<name>.png``; a row
    that is not finished here is a line saying so. With none of its rows finished here (a fresh
    clone, ``--table-only``) the PNG already there is kept as it is. Returns the figures there."""
    by_row = {e.row: e for e in entries}
    out: dict[str, Path] = {}
    for name, row_ids in figures.items():
        path = out_dir / f"{name}.png"
        rows: dict[str, Any] = {}
        for row_id in row_ids:
            e = by_row.get(row_id)
            status = e.status if e is not None else None
            rows[row_id] = (finished_row(e.row_dir, data_dir) if status in ("trained", "cached", "committed")
                            else _MISSING.get(status, status))
        if any(not isinstance(v, str) for v in rows.values()):
            log.info("drawing %s from %d finished rows", path, sum(not isinstance(v, str) for v in rows.values()))
            TABLE_FIGURES[name](rows, path)
        if path.exists():
            out[name] = path
    return out

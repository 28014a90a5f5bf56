"""Rerun the IWAE, ELBO-surgery and VampPrior tables and print ours beside the papers'.

    from elbolab.reproduce import reproduce
    reproduce("iwae-table", budget="quick", only=["mnist-1layer-iwae-k5"])

Rows are planned from papers.yaml and tables.PROTOCOLS, checked for missing pieces
before anything trains, run by an executor, cached in the results folder (a finished
row is never retrained; an interrupted one resumes), and written as a table. Rows that
share a shape (elbolab.training.stack_key: same model, data, batch and draws per point)
train as one stacked model, a pack being one task for the executor; each row's folder
and numbers are those it gets trained alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, load_config, parse_overrides
from ..preflight import preflight
from ..runs import CONFIG
from ..training import pack
from .executors import EXECUTORS, make_executor
from .output import Entry, make_entry, read_committed, read_peer, write_outputs
from .rows import RESULT_FILE, PackTask, RowTask, draw_table_figures, run_row, run_unit, trusted_result
from .tables import BUDGETS, get_table, load_tables, plan_rows, result_overrides, row_config, train_key

__all__ = ["BUDGETS", "EXECUTORS", "Reproduction", "get_table", "load_tables", "reproduce"]


@dataclass
class Reproduction:
    table: str
    budget: str
    entries: list[Entry]
    outputs: dict[str, Path]
    #: row ids trained in this call / answered from the cache / failed
    trained: list[str]
    cached: list[str]
    failed: list[str]
    #: row ids printed from the table.json the folder already held (not rerun, no cache)
    committed: list[str] = field(default_factory=list)
    #: of those, the rows whose config differs from the current protocol's (marked ‡)
    stale: list[str] = field(default_factory=list)


def table_dir(results: str | Path, table: str, budget: str) -> Path:
    return Path(results) / table / budget


def row_dir_for(rows: Path, row_id: str, key: str, claimed: dict[str, Path]) -> Path:
    """Where a row trains: its own folder ``<row>-<key>``, unless a row with the same
    config key (the k = 1 VAE and IWAE rows) has finished, or is planned in this call,
    in another folder: then it shares that one and the training happens once."""
    own = rows / f"{row_id}-{key}"
    if (own / RESULT_FILE).exists():
        return own
    twins = sorted(d for d in rows.glob(f"*-{key}") if (d / RESULT_FILE).exists())
    if twins:
        return twins[0]
    if key in claimed:
        return claimed[key]
    return _same_config_under_another_key(rows, row_id, key) or own


def _same_config_under_another_key(rows: Path, row_id: str, key: str) -> Path | None:
    """A folder of this row whose saved config, read by this version of elbolab, trains as this
    row does: written before a config key was added (its default then fills it in) or named by
    the whole config's hash as older versions did, so its name carries another hash. A
    finished one first, else one to resume."""
    found = []
    for d in sorted(rows.glob(f"{row_id}-*")):
        try:
            if train_key(load_config(d / "run" / CONFIG)) == key:
                found.append(d)
        except (ConfigError, OSError):
            continue
    found.sort(key=lambda d: not (d / RESULT_FILE).exists())
    return found[0] if found else None


def reproduce(
    table: str,
    budget: str = "quick",
    only: list[str] | None = None,
    executor: str = "local",
    workers: int = 1,
    results: str | Path = "results",
    data_dir: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    on_row: Callable[[Entry], None] | None = None,
    run_fn: Callable[[RowTask], dict[str, Any]] = run_row,
    train: bool = True,
    stack: bool = True,
) -> Reproduction:
    """Run the selected rows of ``table`` at ``budget`` and write table.md/.json (+ curve and the
    table's figures, drawn from its finished rows).

    ``train=False`` writes the table from the rows already finished in ``results`` and
    trains nothing: a table while a reproduction runs elsewhere, or from a results folder
    copied off a cluster. A row with no cache that is not trained here (``train=False``,
    a row left out by ``only``, a failed row) keeps the value of the table.json already in
    the folder, marked as such, so a partial rerun never replaces a result with less; rows
    found nowhere print as "not run". ``stack``: rows of one shape train as one stacked
    model (with the default ``run_fn``).
    """
    spec = get_table(table)
    results = Path(results)
    _check_results_folder(results, spec.name, budget)
    plans = plan_rows(spec, budget, only, data_dir, overrides)
    if train and executor == "local":
        for p in plans:  # a device this machine lacks fails here once, not in every row (Ray nodes may have it)
            preflight(p.config)
    out = table_dir(results, spec.name, budget)
    override_notes = ([f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict)
                      else list(overrides or []))
    committed, committed_notes = read_committed(out / "table.json", spec, budget, result_overrides(override_notes))
    if spec.protocol.evaluation == "likelihood":
        _fill_k(spec, budget, committed, data_dir, overrides)
    _mark_stale(spec, budget, committed, data_dir, overrides)
    peer = read_peer(out, spec)
    for row_id, entry in committed.items():  # the peer's file, as it is now
        entry.peer = peer.get(row_id)
    threads = max(1, (os.cpu_count() or 1) // workers)
    tasks, by_row, claimed = [], {}, {}
    # rows in parallel report when they finish (their progress bars would interleave); one row at a
    # time in this process shows its bars and epoch lines as `elbolab train` does
    in_process = executor == "local" and workers == 1
    for p in plans:
        cfg = p.config if in_process else p.config.with_overrides({"train.progress": False})
        if cfg.train.threads == 0:  # share the cores between the workers
            cfg = cfg.with_overrides({"train.threads": threads})
        row_dir = row_dir_for(out / "rows", p.row.id, p.key, claimed)
        claimed.setdefault(p.key, row_dir)
        task = RowTask(table=spec.name, row_id=p.row.id, config=cfg.to_dict(), row_dir=str(row_dir),
                       evaluation=spec.protocol.evaluation, data_label=p.data_label, figures=p.row.figures,
                       figure_dir=str(out))
        tasks.append(task)
        by_row[p.row.id] = (p, row_dir)
    cached_tasks = [t for t in tasks if trusted_result(t) is not None]
    todo = [t for t in tasks if t not in cached_tasks]
    # one training per folder: a row sharing another's folder takes that row's result
    first = {t.row_dir: t for t in reversed(todo)}
    to_run = [t for t in todo if first[t.row_dir] is t]
    results_by_row: dict[str, Entry] = {}
    trained, cached, failed = [], [], []

    def record(task: RowTask, result: dict[str, Any] | None, error: BaseException | None) -> None:
        entry = make_entry(spec, task.row_id, task.data_label, result, error, task.row_dir, peer.get(task.row_id))
        {"trained": trained, "cached": cached, "failed": failed}[entry.status].append(task.row_id)
        if entry.status == "failed" and task.row_id in committed:
            entry = replace(committed[task.row_id], error=entry.error)
        results_by_row[task.row_id] = entry
        if on_row is not None:
            on_row(entry)
        # rewrite the table after every row, so a long reproduction shows progress
        write_outputs(spec, budget, _ordered(spec, plans, results_by_row, by_row, committed, peer), out,
                      override_notes)

    for t in cached_tasks:
        record(t, run_row(t), None)
    if train:
        units: list[RowTask | PackTask] = list(to_run)
        fn: Callable[[Any], dict[str, Any]] = run_fn
        if stack and run_fn is run_row:
            groups = pack([RunConfig.from_dict(t.config) for t in to_run])
            units = [to_run[g[0]] if len(g) == 1 else PackTask(tuple(to_run[i] for i in g)) for g in groups]
            fn = run_unit
        for unit, result, error in make_executor(executor, workers).run(units, fn):
            for t, res, err in _unpack(unit, result, error):
                for twin in (u for u in todo if u.row_dir == t.row_dir):
                    shared = res if twin is t or res is None else {**res, "cached": True}
                    record(twin, shared, err)
    entries = _ordered(spec, plans, results_by_row, by_row, committed, peer)
    # nothing computed in this call: the table keeps the overrides it was made with (so a table
    # rewritten from itself, e.g. --table-only in a fresh clone, stays byte for byte the same)
    if not results_by_row and committed:
        override_notes = committed_notes
    draw_table_figures(spec.figures, entries, out, data_dir)  # before table.md, which links them
    outputs = write_outputs(spec, budget, entries, out, override_notes)
    kept = [e.row for e in entries if e.from_table]
    stale = [e.row for e in entries if e.from_table and e.status == "committed"]
    return Reproduction(spec.name, budget, entries, outputs, trained, cached, failed, kept, stale)


def _check_results_folder(results: Path, table: str, budget: str) -> None:
    """--results and the folders under it must be folders (or not exist yet): one line, exit 2."""
    for p in (results, results / table, results / table / budget, results / table / budget / "rows"):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--results {results}: {p} is not a folder")


def _mark_stale(spec, budget: str, committed: dict[str, Entry], data_dir: str | None, overrides) -> None:
    """A committed row made under another config than the one this budget and these overrides
    give it now (or recorded before rows carried their config key) is marked stale (‡); the
    others keep the status they were written with."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for row_id, entry in committed.items():
        try:
            key = row_config(spec, spec.row(row_id), budget, data_dir, overrides).result_key
        except ConfigError:
            key = None
        if entry.key is None:
            entry.key = _key_from_folder(entry.row_dir)
        if entry.key is None or entry.key != key:
            entry.status = "committed"
        elif entry.status == "committed":  # marked stale by an earlier protocol, current again
            entry.status = "cached"


def _key_from_folder(row_dir: str | None) -> str | None:
    """The config key a row recorded before table.json held it: older versions named the row's
    folder ``<row>-<config_key>`` (a key added since makes it differ: the row reads as stale)."""
    tail = Path(row_dir).name.rsplit("-", 1)[-1] if row_dir else ""
    return tail if len(tail) == 10 and all(c in "0123456789abcdef" for c in tail) else None


def _unpack(unit: RowTask | PackTask, result: dict[str, Any] | None, error: BaseException | None
            ) -> list[tuple[RowTask, dict[str, Any] | None, BaseException | None]]:
    """A unit's outcome as each row's: a pack reports every row's result or error."""
    if not isinstance(unit, PackTask):
        return [(unit, result, error)]
    out = []
    for t in unit.tasks:
        r = (result or {}).get("rows", {}).get(t.row_id)
        if error is not None or r is None:
            out.append((t, None, error or RuntimeError("the stacked pack returned no result for this row")))
        elif "error" in r:
            out.append((t, None, RuntimeError(r["error"])))
        else:
            out.append((t, r, None))
    return out


def _fill_k(spec, budget: str, committed: dict[str, Entry], data_dir: str | None, overrides) -> None:
    """K of committed rows whose table.json predates the K field: the one the protocol sets
    for this budget and these overrides, which that table was made with (a row that recorded
    no K, scored by AIS, keeps none)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for row_id, entry in committed.items():
        if entry.k_importance is None and not entry.k_recorded:
            with contextlib.suppress(ConfigError):
                plan = row_config(spec, spec.row(row_id), budget, data_dir, overrides)
                entry.k_importance = plan.config.eval.k_importance


def _ordered(spec, plans, done: dict[str, Entry], by_row, committed: dict[str, Entry],
             peer: dict[str, dict[str, Any]]) -> list[Entry]:
    """Entries in table order: this call's rows, else the committed ones; selected rows
    found nowhere appear as 'not run'; rows neither selected nor committed are left out."""
    planned = {p.row.id: p for p in plans}
    entries = []
    for row in spec.rows:
        if row.id in done:
            entries.append(done[row.id])
        elif row.id in committed:
            entries.append(committed[row.id])
        elif row.id in planned:
            p = planned[row.id]
            entry = make_entry(spec, row.id, p.data_label, None, None, str(by_row[row.id][1]), peer.get(row.id))
            if spec.protocol.evaluation == "likelihood":
                entry.k_importance = p.config.eval.k_importance  # the K it will be scored with
            entries.append(entry)
    return entries

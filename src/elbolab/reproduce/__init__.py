"""Rerun the IWAE, ELBO-surgery and VampPrior tables and print ours beside the papers'.

    from elbolab.reproduce import reproduce
    reproduce("iwae-table", budget="quick", only=["mnist-1layer-iwae-k5"])

Rows are planned from papers.yaml and tables.PROTOCOLS, checked for missing pieces
before anything trains, run by an executor, cached in the results folder (a finished
row is never retrained; an interrupted one resumes), and written as a table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..preflight import preflight
from .executors import EXECUTORS, make_executor
from .output import Entry, make_entry, write_outputs
from .rows import RESULT_FILE, RowTask, run_row
from .tables import BUDGETS, get_table, load_tables, plan_rows

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


def table_dir(results: str | Path, table: str, budget: str) -> Path:
    return Path(results) / table / budget


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
) -> Reproduction:
    """Run the selected rows of ``table`` at ``budget`` and write table.md/.json (+ curve).

    ``train=False`` writes the table from the rows already finished in ``results`` and
    trains nothing (the others print as "not run"): a table while a reproduction runs
    elsewhere, or from a results folder copied off a cluster.
    """
    spec = get_table(table)
    plans = plan_rows(spec, budget, only, data_dir, overrides)
    if train and executor == "local":
        for p in plans:  # a device this machine lacks fails here once, not in every row (Ray nodes may have it)
            preflight(p.config)
    out = table_dir(results, spec.name, budget)
    override_notes = ([f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict)
                      else list(overrides or []))
    threads = max(1, (os.cpu_count() or 1) // workers)
    tasks, by_row = [], {}
    for p in plans:
        # rows report when they finish; per-batch progress bars of parallel rows would interleave
        cfg = p.config.with_overrides({"train.progress": False})
        if cfg.train.threads == 0:  # share the cores between the workers
            cfg = cfg.with_overrides({"train.threads": threads})
        row_dir = out / "rows" / f"{p.row.id}-{p.key}"
        task = RowTask(table=spec.name, row_id=p.row.id, config=cfg.to_dict(), row_dir=str(row_dir),
                       evaluation=spec.protocol.evaluation, data_label=p.data_label)
        tasks.append(task)
        by_row[p.row.id] = (p, row_dir)
    cached_tasks = [t for t in tasks if (Path(t.row_dir) / RESULT_FILE).exists()]
    todo = [t for t in tasks if t not in cached_tasks]
    results_by_row: dict[str, Entry] = {}
    trained, cached, failed = [], [], []

    def record(task: RowTask, result: dict[str, Any] | None, error: BaseException | None) -> None:
        entry = make_entry(spec, task.row_id, task.data_label, result, error, task.row_dir)
        results_by_row[task.row_id] = entry
        {"trained": trained, "cached": cached, "failed": failed}[entry.status].append(task.row_id)
        if on_row is not None:
            on_row(entry)
        # rewrite the table after every row, so a long reproduction shows progress
        write_outputs(spec, budget, _ordered(spec, plans, results_by_row, by_row), out, override_notes)

    for t in cached_tasks:
        record(t, run_row(t), None)
    if train:
        for t, result, error in make_executor(executor, workers).run(todo, run_fn):
            record(t, result, error)
    entries = _ordered(spec, plans, results_by_row, by_row)
    outputs = write_outputs(spec, budget, entries, out, override_notes)
    return Reproduction(spec.name, budget, entries, outputs, trained, cached, failed)


def _ordered(spec, plans, done: dict[str, Entry], by_row) -> list[Entry]:
    """Entries in table order; rows not finished yet appear as 'not run'."""
    return [
        done[p.row.id] if p.row.id in done
        else make_entry(spec, p.row.id, p.data_label, None, None, str(by_row[p.row.id][1]))
        for p in plans
    ]

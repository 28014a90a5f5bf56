"""The reproduction table: paper value, ours, difference, epochs, wall time, hardware.

Written as markdown (to read) and JSON (to compare runs), plus for likelihood tables a
curve of the training bound against epochs with the paper's value drawn across, so a
reader can see how far a larger budget would take each row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from ..runs import read_metrics
from .tables import Metric, PaperValue, TableSpec, result_overrides

DAGGER = "†"
#: marks a row read from the table.json already in the folder (not rerun, no row cache here)
KEPT = "‡"


@dataclass
class Cell:
    paper: float | str | None
    paper_verified: bool
    ours: float | str | None
    ours_stderr: float | None
    difference: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Entry:
    row: str
    data: str
    #: trained | cached | committed (read from the table.json already there) | failed | not run
    status: str
    cells: dict[str, Cell] = field(default_factory=dict)
    epochs: int | None = None
    wall_seconds: float | None = None
    hardware: str | None = None
    error: str | None = None
    row_dir: str | None = None
    #: importance samples of the test log-likelihood (likelihood tables)
    k_importance: int | None = None
    #: extra figures of the row: name -> PNG file beside the table
    figures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["cells"] = {k: c.to_dict() for k, c in self.cells.items()}
        return d


def _units_total(label: str) -> int:
    return sum(int(p) for p in str(label).split("+"))


def make_cell(metric: Metric, paper: PaperValue | None, metrics: dict[str, Any] | None) -> Cell:
    """Ours beside the paper's; difference = ours - paper (active units: total units)."""
    pv = paper.value if paper else None
    verified = bool(paper and paper.verified)
    ours = se = diff = None
    if metrics is not None and metric.name in metrics:
        ours = metrics[metric.name]
        se = metrics.get(f"{metric.name}_stderr")
        if pv is not None:
            if metric.kind == "active_units":
                diff = float(_units_total(ours) - _units_total(pv))
            else:
                diff = float(ours) - float(pv)
    return Cell(paper=pv, paper_verified=verified, ours=ours, ours_stderr=se, difference=diff)


def make_entry(table: TableSpec, row_id: str, data: str, result: dict[str, Any] | None,
               error: BaseException | None, row_dir: str | None) -> Entry:
    row = table.row(row_id)
    if result is None:
        status = "failed" if error is not None else "not run"
        entry = Entry(row=row_id, data=data, status=status, row_dir=row_dir,
                      error=f"{type(error).__name__}: {error}" if error is not None else None)
        entry.cells = {m.name: make_cell(m, row.values.get(m.name), None) for m in table.metrics}
        return entry
    metrics = result["metrics"]
    return Entry(
        row=row_id, data=data, status="cached" if result.get("cached") else "trained",
        cells={m.name: make_cell(m, row.values.get(m.name), metrics) for m in table.metrics},
        epochs=result["epochs"], wall_seconds=result["train_seconds"] + result["eval_seconds"],
        hardware=result["hardware"], row_dir=row_dir, k_importance=metrics.get("k_importance"),
        figures=dict(result.get("figures") or {}),
    )


def read_committed(path: Path, table: TableSpec, budget: str, overrides: list[str]) -> dict[str, Entry]:
    """The finished rows of the table.json already at ``path``, as "committed" entries.

    They stand in for rows that have no cache here and are not trained in this call, so
    a rerun of some rows (or ``--table-only`` in a fresh clone) never replaces a committed
    result with "not run". Only a table of the same table and budget whose overrides
    change the results in the same way (``overrides``, already filtered) is read; its
    paper values are refreshed from papers.yaml, ours are kept as written.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (not isinstance(doc, dict) or doc.get("table") != table.name or doc.get("budget") != budget
            or result_overrides(doc.get("overrides") or []) != overrides):
        return {}
    known = {r.id for r in table.rows}
    out: dict[str, Entry] = {}
    for r in doc.get("rows") or []:
        cells = r.get("cells") or {}
        if r.get("row") not in known or r.get("status") not in ("trained", "cached", "committed"):
            continue
        metrics: dict[str, Any] = {}
        for name, c in cells.items():
            if c.get("ours") is not None:
                metrics[name] = c["ours"]
                metrics[f"{name}_stderr"] = c.get("ours_stderr")
        if not metrics:
            continue
        row = table.row(r["row"])
        out[row.id] = Entry(
            row=row.id, data=str(r.get("data", "")), status="committed",
            cells={m.name: make_cell(m, row.values.get(m.name), metrics) for m in table.metrics},
            epochs=r.get("epochs"), wall_seconds=r.get("wall_seconds"), hardware=r.get("hardware"),
            row_dir=r.get("row_dir"), k_importance=r.get("k_importance"), figures=dict(r.get("figures") or {}),
        )
    return out


# --- markdown ---------------------------------------------------------------------


def _num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _digits(metric: Metric) -> int:
    return 4 if metric.name == "log_n" else 2


def to_markdown(table: TableSpec, budget: str, entries: list[Entry], overrides: list[str] | None = None) -> str:
    with_k = table.protocol.evaluation == "likelihood"
    head = ["row", "data", *(["IS samples K"] if with_k else [])]
    for m in table.metrics:
        head += [f"{m.label} paper", "ours", "Δ"]
    head += ["epochs", "wall time", "hardware"]
    lines = [
        f"# {table.title}",
        "",
        f"Source: {table.citation}, {table.table}.  ",
        f"Budget: **{budget}**: {table.protocol.budget_notes.get(budget, '')}.  ",
        *(f"Row {row}: {note}.  " for row, note in table.protocol.notes_for(budget).items()
          if any(e.row == row for e in entries)),
        *([f"Overrides in every row (--set): {', '.join(overrides)}.  "] if overrides else []),
        "Δ = ours − paper (NLL: positive is worse than the paper; log-likelihood and ELBO: negative is worse; "
        "active units: difference in total units). Ours ± one Monte Carlo standard error where one exists.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    unverified = False
    for e in entries:
        cells = [e.row + (f" {KEPT}" if e.status == "committed" else ""), e.data]
        if with_k:
            cells.append(str(e.k_importance) if e.k_importance is not None else "")
        for m in table.metrics:
            c = e.cells[m.name]
            paper = _num(c.paper, _digits(m))
            if c.paper is not None and not c.paper_verified:
                paper += DAGGER
                unverified = True
            ours = _num(c.ours, _digits(m))
            if c.ours_stderr is not None and c.ours is not None and not isinstance(c.ours, str):
                ours += f" ± {c.ours_stderr:.2f}"
            digits = 0 if m.kind == "active_units" else _digits(m)
            diff = "" if c.difference is None else f"{c.difference:+.{digits}f}"
            cells += [paper, ours if e.status in ("trained", "cached", "committed") else e.status, diff]
        cells += [str(e.epochs) if e.epochs is not None else "", _duration(e.wall_seconds), e.hardware or ""]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [e for e in entries if e.error]
    if unverified:
        lines += ["", f"{DAGGER} paper value not verified against a copy of the paper (see papers.yaml)."]
    if any(e.status == "committed" for e in entries):
        lines += ["", f"{KEPT} not rerun here: read from the table.json this folder held before (no row cache for "
                      "it here); its config may predate the current protocol (see docs/reproduce.md)."]
    for e in entries:
        lines += [f"\n{e.row}, {name}:\n\n![{e.row} {name}]({file})" for name, file in e.figures.items()]
    if failed:
        lines += ["", "Rows that failed:"] + [
            f"- {e.row}: {e.error}" + (" (the committed value is kept)" if e.status == "committed" else "")
            for e in failed]
    return "\n".join(lines) + "\n"


def write_outputs(table: TableSpec, budget: str, entries: list[Entry], out_dir: Path,
                  overrides: list[str] | None = None) -> dict[str, Path]:
    """table.md, table.json and (for likelihood tables with trained rows) curve.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "table.md", "json": out_dir / "table.json"}
    atomic_write_text(paths["markdown"], to_markdown(table, budget, entries, overrides))
    doc = {
        "table": table.name, "title": table.title, "source": table.citation, "paper_table": table.table,
        "budget": budget, "budget_note": table.protocol.budget_notes.get(budget, ""),
        "row_budget_notes": table.protocol.notes_for(budget), "overrides": overrides or [],
        "rows": [e.to_dict() for e in entries],
    }
    atomic_write_text(paths["json"], json.dumps(doc, indent=2) + "\n")
    curve = plot_curves(table, entries, out_dir / "curve.png")
    if curve is not None:
        paths["curve"] = curve
    return paths


# --- the curve ---------------------------------------------------------------------


def curve_series(table: TableSpec, entries: list[Entry]) -> list[tuple[Entry, list[dict]]]:
    """(entry, per-epoch metrics) of the finished rows to draw: the protocol's
    ``curve_rows`` when any of them has metrics, else every row that has."""
    series = []
    for e in entries:
        if e.row_dir is None or e.status not in ("trained", "cached"):
            continue
        rows = read_metrics(Path(e.row_dir) / "run" / "metrics.jsonl")
        if rows:
            series.append((e, rows))
    picked = [(e, rows) for e, rows in series if e.row.endswith(table.protocol.curve_rows or ("",))]
    return picked or series


def plot_curves(table: TableSpec, entries: list[Entry], path: Path) -> Path | None:
    """-(training bound) per epoch for every finished row, the paper's NLL dashed."""
    nll_metric = next((m for m in table.metrics if m.kind == "nll"), None)
    series = curve_series(table, entries)
    if not series or nll_metric is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (e, rows) in enumerate(series):
        color = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [-r["train_bound"] for r in rows], color=color, label=f"{e.row} (−training bound)")
        valid = [(r["epoch"], -v) for r in rows for k, v in r.items() if k.startswith("valid_iwae_")]
        if valid:
            ax.plot(*zip(*valid, strict=True), color=color, linestyle=":", label=f"{e.row} (−validation bound)")
        cell = e.cells[nll_metric.name]
        if isinstance(cell.ours, float):
            ax.plot([epochs[-1]], [cell.ours], marker="o", color=color)
        if isinstance(cell.paper, float | int):
            ax.axhline(float(cell.paper), color=color, linestyle="--", linewidth=0.8)
    paper_epochs = table.protocol.budgets.get("paper", {}).get("train.epochs")
    if paper_epochs:
        ax.axvline(paper_epochs, color="grey", linewidth=0.8)
        ax.annotate("paper's budget", (paper_epochs, 0.5), xycoords=("data", "axes fraction"),
                    rotation=90, fontsize=7, ha="right", va="center")
    ax.set_xscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats (lower is better)")
    ax.set_title(f"{table.title}\n−bound per epoch; dot: our test NLL; dashed: the paper's NLL", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""The reproduction table: paper value, ours, an equal-budget peer's, difference, epochs,
wall time, hardware, and how each row's data was binarized and split.

Written as markdown (to read) and JSON (to compare runs; it holds every row's per-epoch
curve, so the table and its figure can be rebuilt from it alone), plus curve.png: each
row's validation bound (training bound where there is no validation split) against
epochs with the paper's value drawn across, so a reader sees where each row is heading.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..files import atomic_write_text
from .tables import Metric, PaperValue, TableSpec, config_key, result_overrides

DAGGER = "†"
#: marks a row read from the table.json already in the folder whose config is not the one the
#: current protocol gives it (made under an earlier protocol, or before rows recorded their config)
KEPT = "‡"
#: marks a row whose architecture differs from the paper's (papers.yaml ``stand_in``)
STAND_IN = "§"
#: the equal-budget peer's results beside a table (benchmarks/peer/)
PEER_FILE = "peer.json"
#: marks a peer value more than 3 standard errors from ours
PEER_GAP = "‼"


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
    #: config_key of the config the numbers were computed under (None: not recorded)
    key: str | None = None
    #: how the images were binarized, and train / validation / test sizes
    binarization: str | None = None
    split: str | None = None
    #: [epoch, training bound, validation bound or None] per epoch
    curve: list[list[float | None]] = field(default_factory=list)
    #: an independent implementation's value at the same budget (benchmarks/peer/), or None
    peer: dict[str, Any] | None = None
    #: read from the table.json already in the folder (not computed in this call); not saved
    from_table: bool = False
    #: that table.json had the K field (an AIS-scored row records none); not saved
    k_recorded: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("from_table")
        d.pop("k_recorded")
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
               error: BaseException | None, row_dir: str | None, peer: dict[str, Any] | None = None) -> Entry:
    row = table.row(row_id)
    if result is None:
        status = "failed" if error is not None else "not run"
        entry = Entry(row=row_id, data=data, status=status, row_dir=row_dir, peer=peer,
                      error=f"{type(error).__name__}: {error}" if error is not None else None)
        entry.cells = {m.name: make_cell(m, row.values.get(m.name), None) for m in table.metrics}
        return entry
    metrics = result["metrics"]
    return Entry(
        row=row_id, data=data, status="cached" if result.get("cached") else "trained",
        cells={m.name: make_cell(m, row.values.get(m.name), metrics) for m in table.metrics},
        epochs=result["epochs"], wall_seconds=result["train_seconds"] + result["eval_seconds"],
        hardware=result["hardware"], row_dir=row_dir, k_importance=metrics.get("k_importance"),
        figures=dict(result.get("figures") or {}), key=config_key(RunConfig.from_dict(result["config"])),
        binarization=result.get("binarization"), split=result.get("split"), curve=list(result.get("curve") or []),
        peer=peer,
    )


def _bad(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}: not a reproduction table ({what}); restore it from git or delete it")


def read_committed(path: Path, table: TableSpec, budget: str, overrides: list[str]
                   ) -> tuple[dict[str, Entry], list[str]]:
    """The finished rows of the table.json already at ``path``, and the overrides it lists.

    They stand in for rows that have no cache here and are not computed in this call, so a
    rerun of some rows (or ``--table-only`` in a fresh clone) never replaces a committed
    result with "not run". Only a table of the same table and budget whose overrides change
    the results in the same way (``overrides``, already filtered) is read; its paper values
    are refreshed from papers.yaml, the rest is kept as written. A file that is not such a
    table is refused in one line (ConfigError), never half read.
    """
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError) as e:
        raise _bad(path, f"unreadable: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise _bad(path, "no list of rows")
    if (doc.get("table") != table.name or doc.get("budget") != budget
            or result_overrides(doc.get("overrides") or []) != overrides):
        return {}, []
    known = {r.id for r in table.rows}
    out: dict[str, Entry] = {}
    for r in doc["rows"]:
        if not isinstance(r, dict) or not isinstance(r.get("cells") or {}, dict) or not all(
                isinstance(c, dict) for c in (r.get("cells") or {}).values()):
            raise _bad(path, f"row {r.get('row') if isinstance(r, dict) else r!r} is malformed")
        if r.get("row") not in known or r.get("status") not in ("trained", "cached", "committed"):
            continue
        metrics: dict[str, Any] = {}
        for name, c in r["cells"].items():
            if c.get("ours") is not None:
                metrics[name] = c["ours"]
                metrics[f"{name}_stderr"] = c.get("ours_stderr")
        if not metrics:
            continue
        row = table.row(r["row"])
        out[row.id] = Entry(
            row=row.id, data=str(r.get("data", "")), status=r["status"],
            cells={m.name: make_cell(m, row.values.get(m.name), metrics) for m in table.metrics},
            epochs=r.get("epochs"), wall_seconds=r.get("wall_seconds"), hardware=r.get("hardware"),
            row_dir=r.get("row_dir"), k_importance=r.get("k_importance"), figures=dict(r.get("figures") or {}),
            key=r.get("key"), binarization=r.get("binarization"), split=r.get("split"),
            curve=list(r.get("curve") or []), peer=r.get("peer"), from_table=True,
            k_recorded="k_importance" in r,
        )
    return out, [str(n) for n in doc.get("overrides") or []]


def read_peer(out_dir: Path, table: TableSpec) -> dict[str, dict[str, Any]]:
    """Row id -> the equal-budget peer's result (``peer.json`` beside the table, written by
    benchmarks/peer/): ``{"value", "stderr", "epochs", "command"}``, or {} when there is none."""
    path = out_dir / PEER_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    known = {r.id for r in table.rows}
    if not isinstance(rows, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("value"), int | float) for v in rows.values()):
        raise ConfigError(f"{path}: not a peer results file (rows: {{row id: {{value, stderr, ...}}}})")
    return {k: v for k, v in rows.items() if k in known}


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


#: how table.md introduces each table figure (figures.TABLE_FIGURES)
TABLE_FIGURE_CAPTIONS = {
    "pseudo-inputs": "Trained pseudo-inputs across datasets (each row's most used, ranked by their average "
                     "responsibility for the posterior means of 2,000 test images, or all when fewer; a row "
                     "not finished here is a line saying so)",
}


def to_markdown(table: TableSpec, budget: str, entries: list[Entry], overrides: list[str] | None = None,
                table_figures: list[str] | tuple[str, ...] = ()) -> str:
    """The table as markdown; ``table_figures``: the table figures drawn beside it, linked at the end."""
    with_k = table.protocol.evaluation == "likelihood"
    with_peer = any(e.peer for e in entries)
    head = ["row", "data", "binarization", "train / valid / test", *(["IS samples K"] if with_k else [])]
    for i, m in enumerate(table.metrics):
        head += [f"{m.label} paper", "ours", *(["peer"] if with_peer and i == 0 else []), "Δ"]
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
        *(["peer: the same architecture and schedule trained by an independent plain-PyTorch implementation "
           "(benchmarks/peer/), scored by the same estimator on the same images; \"n seeds, sd\": the mean of n "
           "runs and the standard deviation of one run's value over seeds."] if with_peer else []),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|",
    ]
    unverified = False
    stand_ins = {r.id: r.stand_in for r in table.rows if r.stand_in}
    for e in entries:
        mark = (f" {STAND_IN}" if e.row in stand_ins else "") + (f" {KEPT}" if e.status == "committed" else "")
        cells = [e.row + mark, e.data, e.binarization or "", e.split or ""]
        if with_k:
            cells.append(str(e.k_importance) if e.k_importance is not None else "")
        for i, m in enumerate(table.metrics):
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
            cells += [paper, ours if e.status in ("trained", "cached", "committed") else e.status]
            if with_peer and i == 0:
                cells.append(_peer_cell(e.peer) + (f" {PEER_GAP}" if _peer_gap(c, e.peer) else ""))
            cells.append(diff)
        cells += [str(e.epochs) if e.epochs is not None else "", _duration(e.wall_seconds), e.hardware or ""]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [e for e in entries if e.error]
    if unverified:
        lines += ["", f"{DAGGER} paper value not verified against a copy of the paper (see papers.yaml)."]
    if with_peer and any(_peer_gap(e.cells[table.metrics[0].name], e.peer) for e in entries):
        lines += ["", f"{PEER_GAP} ours and the peer differ by more than 3 standard errors of the difference: a "
                      "defect to find before the row is read; where the peer ran one seed, the spread of "
                      "training is not in that error yet (run the peer with --seeds)."]
    shown = [r for r in stand_ins if any(e.row == r for e in entries)]
    if shown:
        lines += [""] + [f"{STAND_IN} {r}: stand-in architecture: {stand_ins[r]}.  " for r in shown]
    if any(e.status == "committed" for e in entries):
        lines += ["", f"{KEPT} not rerun under the current protocol: read from the table.json this folder held "
                      "before, made under another config than the one `reproduce` gives this row now (see "
                      "docs/reproduce.md); rerun it with --only."]
    if any(e.curve for e in entries):
        lines += ["", "Learning curves: [curve.png](curve.png)."]
    for e in entries:
        lines += [f"\n{e.row}, {name}:\n\n![{e.row} {name}]({file})" for name, file in e.figures.items()]
    for name in table_figures:
        lines += [f"\n{TABLE_FIGURE_CAPTIONS.get(name, name)}:\n\n![{name}]({name}.png)"]
    if failed:
        lines += ["", "Rows that failed:"] + [
            f"- {e.row}: {e.error}" + (" (the committed value is kept)" if e.from_table else "")
            for e in failed]
    return "\n".join(lines) + "\n"


def peer_gap_stderr(cell: Cell, peer: dict[str, Any]) -> float:
    """The standard error of ours minus the peer's: both values' Monte Carlo errors and, where the
    peer ran several seeds (``seeds``, ``seed_sd``), the spread of training itself: ours is one run,
    which spreads as one peer run does (the same model and schedule), the peer's value a mean of n."""
    se2 = (cell.ours_stderr or 0.0) ** 2 + (peer.get("stderr") or 0.0) ** 2
    sd, seeds = peer.get("seed_sd"), peer.get("seeds")
    if isinstance(sd, int | float) and isinstance(seeds, dict) and len(seeds) > 1:
        se2 += sd**2 * (1.0 + 1.0 / len(seeds))
    return math.sqrt(se2)


def _peer_gap(cell: Cell, peer: dict[str, Any] | None) -> bool:
    """Ours and the peer's further apart than 3 standard errors of their difference."""
    if not peer or not isinstance(cell.ours, int | float) or not isinstance(peer.get("value"), int | float):
        return False
    return abs(cell.ours - peer["value"]) > 3 * peer_gap_stderr(cell, peer)


def _peer_cell(peer: dict[str, Any] | None) -> str:
    if not peer:
        return ""
    se = peer.get("stderr")
    cell = f"{peer['value']:.2f}" + (f" ± {se:.2f}" if isinstance(se, int | float) else "")
    seeds, sd = peer.get("seeds"), peer.get("seed_sd")
    if isinstance(seeds, dict) and len(seeds) > 1 and isinstance(sd, int | float):
        cell += f" ({len(seeds)} seeds, sd {sd:.2f})"
    return cell


def write_outputs(table: TableSpec, budget: str, entries: list[Entry], out_dir: Path,
                  overrides: list[str] | None = None) -> dict[str, Path]:
    """table.md, table.json and (when any row has a curve) curve.png; table.md links the table
    figures already drawn beside it (rows.draw_table_figures). Files whose contents would not
    change are not rewritten (the curve is redrawn only when table.json changes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "table.md", "json": out_dir / "table.json"}
    drawn = [name for name in table.figures if (out_dir / f"{name}.png").exists()]
    paths.update({name: out_dir / f"{name}.png" for name in drawn})
    doc = {
        "table": table.name, "title": table.title, "source": table.citation, "paper_table": table.table,
        "budget": budget, "budget_note": table.protocol.budget_notes.get(budget, ""),
        "row_budget_notes": table.protocol.notes_for(budget), "overrides": overrides or [],
        "rows": [e.to_dict() for e in entries],
    }
    text = json.dumps(doc, indent=2) + "\n"
    unchanged = _holds(paths["json"], text)
    if not unchanged:
        atomic_write_text(paths["json"], text)
    md = to_markdown(table, budget, entries, overrides, drawn)
    if not _holds(paths["markdown"], md):
        atomic_write_text(paths["markdown"], md)
    curve = out_dir / "curve.png"
    if not (unchanged and curve.exists()):
        curve = plot_curves(table, entries, curve)
    if curve is not None and curve.exists():
        paths["curve"] = curve
    return paths


def _holds(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


# --- the learning curves -----------------------------------------------------------


def curve_series(entries: list[Entry]) -> list[tuple[list[Entry], list[list[float | None]]]]:
    """(rows, per-epoch points) of every row with a curve; rows sharing one training (the k = 1
    VAE and IWAE pair) are drawn once."""
    series: list[tuple[list[Entry], list[list[float | None]]]] = []
    for e in entries:
        if not e.curve:
            continue
        for rows, pts in series:
            if pts == e.curve and rows[0].data == e.data:
                rows.append(e)
                break
        else:
            series.append(([e], e.curve))
    return series


def plot_curves(table: TableSpec, entries: list[Entry], path: Path) -> Path | None:
    """One figure per table: each row's validation bound per epoch (its training bound where the
    protocol has no validation split), a panel per dataset, the paper's value dashed in the row's
    colour, our final value as a dot. NLL tables draw −bound (lower is better)."""
    metric = table.metrics[0]
    series = curve_series(entries)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sign = -1.0 if metric.kind == "nll" else 1.0
    datasets = list(dict.fromkeys(rows[0].data for rows, _ in series))
    from matplotlib.ticker import LogFormatter

    # constrained layout keeps the two-line title clear of the first panel's
    fig, axes = plt.subplots(len(datasets), 1, figsize=(8, 4.2 * len(datasets)), squeeze=False, layout="constrained")
    paper_epochs = table.protocol.budgets.get("paper", {}).get("train.epochs")
    for ax, data in zip(axes[:, 0], datasets, strict=True):
        drawn = [(rows, pts) for rows, pts in series if rows[0].data == data]
        for i, (rows, pts) in enumerate(drawn):
            color = f"C{i % 10}"
            valid = [(p[0], sign * p[2]) for p in pts if p[2] is not None]
            train = [(p[0], sign * p[1]) for p in pts if p[1] is not None]
            use, what = (valid, "validation") if valid else (train, "training")
            if not use:
                continue
            label = " = ".join(e.row for e in rows) + f" ({what} bound)"
            ax.plot(*zip(*use, strict=True), color=color, label=label, marker="." if len(use) < 30 else None)
            cell = rows[0].cells[metric.name]
            if isinstance(cell.ours, int | float):
                ax.plot([use[-1][0]], [cell.ours], marker="o", color=color)
            if isinstance(cell.paper, int | float):
                ax.axhline(float(cell.paper), color=color, linestyle="--", linewidth=0.8)
        if paper_epochs:
            ax.axvline(paper_epochs, color="grey", linewidth=0.8)
            ax.annotate("paper's budget", (paper_epochs, 0.5), xycoords=("data", "axes fraction"),
                        rotation=90, fontsize=7, ha="right", va="center")
        ax.set_xscale("log")
        # epochs as plain numbers ("3", not "3 x 10^0") on a panel spanning under a decade
        ax.xaxis.set_major_formatter(LogFormatter())
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
        ax.set_xlabel("epoch")
        ax.set_ylabel("−bound, nats (lower is better)" if sign < 0 else "bound, nats (higher is better)")
        ax.set_title(data, fontsize=8)
        ax.legend(fontsize=6)
    ours = "our test NLL" if metric.kind == "nll" else f"our {metric.label}"
    fig.suptitle(f"{table.title}\nper epoch; dot: {ours}; dashed: the paper's value", fontsize=9)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path

"""The benchmark's outputs: a plain-text table, a JSON file and a PNG of the scaling curves."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text

COLUMNS = ("row", "library", "img/s", "median", "peak MB", "vs pythae", "GFLOP/img", "of peak", "note")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _rate(v: float | None) -> str:
    """Images/s: whole numbers, or two significant digits below 10 (a costly model's 0.016)."""
    return _fmt(v, ",.0f" if v is None or v >= 10 else ".2g")


def format_table(rows: list[dict]) -> str:
    """Rows (``Row.to_dict()``) as an aligned text table, one line per (row, library)."""
    lines = [COLUMNS]
    for r in rows:
        lines.append((
            r["name"], r["library"], _rate(r["images_per_s"]), _rate(r["images_per_s_median"]),
            _fmt(r["peak_mb"], ".0f"), _fmt(r["vs_pythae"], ".2f") + ("x" if r["vs_pythae"] else ""),
            _fmt(r["flops_per_image"] and r["flops_per_image"] / 1e9, ".4f"),
            _fmt(r["of_peak"] and 100 * r["of_peak"], ".0f") + ("%" if r["of_peak"] else ""), r["note"],
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS) - 1)]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=False))]
        out.append("  ".join(cells) + "  " + line[-1])
        if n == 0:
            out.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(line.rstrip() for line in out)


def markdown_table(rows: list[dict]) -> str:
    """Rows (``Row.to_dict()``) as a Markdown table, the columns of :func:`format_table`."""
    head = ("row", "library", "img/s", "median", "peak MB", "vs pythae", "GFLOP/img", "of peak", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * 6 + "---|"]
    for r in rows:
        cells = (r["name"], r["library"], _fmt(r["images_per_s"], ",.0f"), _fmt(r["images_per_s_median"], ",.0f"),
                 _fmt(r["peak_mb"], ".0f"), _fmt(r["vs_pythae"], ".2f") + ("x" if r["vs_pythae"] else ""),
                 _fmt(r["flops_per_image"] and r["flops_per_image"] / 1e9, ".4f"),
                 _fmt(r["of_peak"] and 100 * r["of_peak"], ".0f") + ("%" if r["of_peak"] else ""),
                 r["note"].replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def plot_curves(curves: dict, path: Path, title: str) -> None:
    """Images/s against K (evaluation) and against the batch size (training), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("k_curve", "k", "importance samples K (IS log-likelihood)"),
              ("batch_curve", "batch", "batch size (training)"),
              ("chunk_curve", "rows_per_pass", "decoder rows per pass (IS log-likelihood, batch x chunk)")]
    for ax, (key, xkey, label) in zip(axes, panels, strict=True):
        c = curves.get(key)
        if not c:
            ax.set_visible(False)
            continue
        for lib, style in (("elbolab", "o-"), ("elbolab+compile", "^-"), ("pythae", "s--")):
            if c.get(lib):
                ax.plot(c[xkey], c[lib], style, label=lib)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("images / s")
        if key == "batch_curve":
            ax.set_title(f"{c['objective'].upper()} k={c['k']}, one-layer MLP")
        if key == "chunk_curve":
            ax.set_title(f"K={c['k']}, batch {c['batch']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

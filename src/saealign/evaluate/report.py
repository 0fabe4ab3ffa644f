"""Results people read: a :class:`Table` per experiment, written as Markdown, CSV, JSON and PNG side by side."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saealign.cache import atomic_write_bytes
from saealign.jsonio import standard


@dataclass
class Table:
    """What an experiment returns: its rows, how to show them, and its plots (nothing is written yet)."""

    name: str
    """File stem: ``NAME.md``, ``NAME.json``, ``NAME.csv``."""
    title: str
    rows: list[dict[str, Any]]
    """The raw rows (JSON and CSV)."""
    columns: list[str]
    """Columns of the Markdown table of ``rows``."""
    note: str = ""
    """A paragraph between the title and the table."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More JSON next to the rows (reference figures, set-up, timings)."""
    before: list[tuple[list[dict[str, Any]], list[str]]] = field(default_factory=list)
    """Tables shown above the rows' table (e.g. a summary), as ``(rows, columns)``."""
    plots: dict[str, Callable[[Path], object]] = field(default_factory=dict)
    """PNG file name -> a function writing it at the given path."""

    def markdown(self) -> str:
        head = f"# {self.title}\n\n" + (self.note + "\n\n" if self.note else "")
        return head + "\n".join(markdown_table(r, c) for r, c in [*self.before, (self.rows, self.columns)])


def write_table(out: Path, table: Table) -> str:
    """Write ``table`` into the folder ``out`` (Markdown, JSON, CSV, plots); returns the Markdown."""
    write_rows(out, table.name, table.rows, table.extra)
    md = table.markdown()
    (out / f"{table.name}.md").write_text(md)
    for name, plot in table.plots.items():
        plot(out / name)
    return md


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub Markdown table of ``columns``; ``x`` with ``x_std`` beside it prints as ``x ± std``."""

    def cell(row: dict[str, Any], col: str) -> str:
        v = row.get(col, "")
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            text = f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
            std = row.get(f"{col}_std")
            return f"{text} ± {std:.{digits}f}" if isinstance(std, float) and std > 0 else text
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_rows(out: Path, name: str, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """``name.json`` (rows + extra) and ``name.csv`` (rows) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{name}.json", (standard({"rows": list(rows), **(extra or {})}, indent=2) + "\n").encode())
    if rows:
        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out / f"{name}.csv", buf.getvalue().encode())


def scatter_plot(path: Path, rows: Sequence[dict[str, Any]], x: str, y: str, label: str, title: str,
                 hline: float | None = None, hline_label: str = "", vline: float | None = None,
                 vline_label: str = "") -> bool:
    """A labelled scatter (with error bars from ``x_std``/``y_std``) as PNG, ``x`` on a log scale with plain tick
    labels; ``hline``/``vline`` draw a reference level (a peer's score, a bound). False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        ax.errorbar(r[x], r[y], xerr=r.get(f"{x}_std", 0), yerr=r.get(f"{y}_std", 0), fmt="o", capsize=3)
        ax.annotate(str(r[label]), (r[x], r[y]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if hline is not None:
        ax.axhline(hline, linestyle="--", color="grey")
        ax.annotate(hline_label, (ax.get_xlim()[0], hline), fontsize=8, xytext=(4, 4), textcoords="offset points")
    if vline is not None:
        ax.axvline(vline, linestyle=":", color="grey")
        ax.annotate(vline_label, (vline, ax.get_ylim()[0]), fontsize=8, rotation=90, xytext=(-10, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.95, not 9.5 × 10^-1
    low, high = ax.get_xlim()
    if high < 10 * low:  # under a decade only minor ticks are labelled: plainly too (wider, they stay unlabelled)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def line_plot(path: Path, series: dict[str, Sequence[tuple[float, float, float, float]]], xlabel: str, ylabel: str,
              title: str, logx: bool = False) -> bool:
    """Lines with min/max bars: ``series`` maps a name to ``(x, y, y_low, y_high)`` points. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs, ys, lo, hi = (list(v) for v in zip(*points, strict=True)) if points else ([], [], [], [])
        ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)], [b - y for y, b in zip(ys, hi, strict=True)]],
                    marker="o", capsize=3, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

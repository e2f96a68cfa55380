"""The HTML report: one self-contained page (inline CSS, SVG figures and script) that answers a grid at a glance."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bdbench.report.page import render, write_page


def write_report(rows: pd.DataFrame, path: str | Path) -> Path:
    """Write the report of `rows` (as from `bdbench.load_results`) to `path` and return the path."""
    return write_page(rows, path)


def report_from_out(out: str | Path = "bdbench-out", path: str | Path | None = None) -> Path:
    """Load an output folder's results and write its report (default OUT/report.html)."""
    from bdbench.store import load_results, no_rows_error

    rows = load_results(out)
    if rows.empty:
        raise no_rows_error(out)
    return write_report(rows, Path(out) / "report.html" if path is None else path)


__all__ = ["render", "report_from_out", "write_report"]

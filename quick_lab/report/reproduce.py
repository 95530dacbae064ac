"""``quick-lab reproduce`` without the command line: every figure and ``REPORT.md`` from one results
directory (``quick_lab.cli`` finds the directory, optionally measures first, and calls :func:`reproduce`).
"""
from __future__ import annotations

from pathlib import Path

from quick_lab.report.figures import draw_all
from quick_lab.report.text import write_report


def reproduce(results_dir, out_dir=None) -> list[Path]:
    """Draws every available figure (PNG + SVG) into ``results_dir/figures`` (or ``out_dir``) and writes
    ``results_dir/REPORT.md``; returns the paths written (the report last)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {results_dir} does not exist")
    figures = draw_all(results_dir, out_dir)
    paths = [p for png in figures.values() for p in (png, png.with_suffix(".svg"))]
    return paths + [write_report(results_dir, figures)]


__all__ = ["reproduce"]

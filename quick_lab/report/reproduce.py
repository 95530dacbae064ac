"""``quick-lab reproduce`` without the command line: every figure and ``REPORT.md`` from one results
directory (:func:`reproduce`), or from every GPU directory under the results root plus ``COMPARISON.md``
and its figure (:func:`reproduce_all`). ``quick_lab.cli`` picks which, optionally measures first, and calls them.
"""
from __future__ import annotations

from pathlib import Path

from quick_lab.build import paths as build_paths
from quick_lab.report.comparison import kernel_comparison, write_comparison
from quick_lab.report.figures import draw_all, draw_comparison
from quick_lab.report.results import CSV_STEMS, FIGURES, find_gpu_dir, gpu_dirs
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


def reproduce_all(results_root=None, gpu: str | None = None) -> list[Path]:
    """Every GPU directory under ``results_root`` (default :func:`quick_lab.build.paths.results_root`):
    :func:`reproduce` of each, then ``results_root/COMPARISON.md`` and, with two GPUs or more,
    ``results_root/figures/comparison_quick_over_cublas`` (PNG + SVG). ``gpu`` (a directory name or a GPU
    name) draws that GPU's directory only, and no comparison; one not present is a ValueError listing the
    GPUs that are. Returns the paths written (COMPARISON.md last)."""
    root = Path(results_root) if results_root is not None else build_paths.results_root()
    if gpu is not None:
        return reproduce(find_gpu_dir(gpu, root))
    dirs = gpu_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"no GPU results under {root}: no directory there holds any of "
                                f"{', '.join(s + '.csv' for s in CSV_STEMS)}; measure on a GPU (quick-lab bench) "
                                f"or pass --results DIR")
    written = [p for d in dirs for p in reproduce(d)]
    figures = draw_comparison(kernel_comparison(dirs)[0], root / FIGURES)
    written += [p for png in figures.values() for p in (png, png.with_suffix(".svg"))]
    return written + [write_comparison(dirs, root, figures)]


__all__ = ["reproduce", "reproduce_all"]

"""``<results root>/COMPARISON.md``: every GPU directory under the results root side by side.

What it holds, all read from the CSVs when it is written (never typed in):

* each GPU's provenance per measurement: the GPU its metadata names, driver, CUDA runtime, date and
  commit of every ``<stem>.csv`` (:data:`quick_lab.report.results.CSV_STEMS`), or ``missing``;
* the kernel: for the (shape, batch) cases every GPU with a ``throughput.csv`` measured, the
  dispatched QUICK path's time / cuBLAS fp16 time of the same run and its % of the DRAM floor, per GPU,
  with the figure ``figures/comparison_quick_over_cublas`` when two GPUs or more have one;
* end to end: for the (model, context, layers, batch) cases every GPU with an ``e2e.csv`` measured,
  QUICK's decode tokens/s and QUICK / fp16, per GPU.

A GPU without a CSV is named as missing that measurement and left out of its table; a case only some
GPUs measured is left out (and counted). With one GPU present it says so and draws no figure.

Why one file beside the GPU directories rather than a section in each ``REPORT.md``: a GPU's
``REPORT.md`` stays a function of its own directory, so committing a second GPU's measurements rewrites
no other GPU's report (each diff stays with the data that caused it), and the side-by-side tables exist
once instead of once per GPU.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from quick_lab.build.device import gpu_slug
from quick_lab.report.results import (COMPARISON, CSV_STEMS, FIGURES, REPORT, e2e_quick, load_csv, load_meta,
                                      quick_vs_cublas, shared_cases)
from quick_lab.report.style import LARGE_BATCH, SMALL_BATCH

KERNEL_KEYS = ("K", "N", "M")
E2E_KEYS = ("model", "context", "layers", "batch")


def _md_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(str(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _num(v, fmt: str) -> str:
    return "n/a" if v is None or pd.isna(v) else format(v, fmt)


def _cuda_version(v) -> str:
    """cudaRuntimeGetVersion / cudaDriverGetVersion's 1000 * major + 10 * minor -> 'major.minor'."""
    return f"{int(v) // 1000}.{int(v) % 1000 // 10}" if isinstance(v, (int, float)) and not math.isnan(v) else ""


def _meta_text(v) -> str:
    """A metadata value as table text; a merged sweep's list (one value per run) as its distinct values."""
    if isinstance(v, (list, tuple)):
        return ", ".join(dict.fromkeys(str(x) for x in v))
    return "" if v is None else str(v)


def _per_gpu(dirs, stem: str, table_fn) -> tuple[dict, list[str]]:
    """({gpu directory name: table_fn(its <stem>.csv)}, [GPUs without that CSV])."""
    tables, missing = {}, []
    for d in dirs:
        df = load_csv(d, stem, quiet=True)
        if df is None:
            missing.append(Path(d).name)
        else:
            tables[Path(d).name] = table_fn(df)
    return tables, missing


def kernel_comparison(dirs) -> tuple[pd.DataFrame, int, list[str]]:
    """(:func:`quick_vs_cublas` of every GPU's ``throughput.csv`` over the cases all of them measured, long
    with a ``gpu`` column; cases left out; GPUs without ``throughput.csv``)."""
    tables, missing = _per_gpu(dirs, "throughput", quick_vs_cublas)
    shared, left_out = shared_cases(tables, KERNEL_KEYS)
    return shared, left_out, missing


def e2e_comparison(dirs) -> tuple[pd.DataFrame, int, list[str]]:
    """(:func:`e2e_quick` of every GPU's ``e2e.csv`` over the cases all of them measured, long with a
    ``gpu`` column; cases left out; GPUs without ``e2e.csv``)."""
    tables, missing = _per_gpu(dirs, "e2e", e2e_quick)
    shared, left_out = shared_cases(tables, E2E_KEYS)
    return shared, left_out, missing


def _provenance(dirs) -> list[str]:
    rows, mismatched = [], []
    for d in dirs:
        d = Path(d)
        for stem in CSV_STEMS:
            df = load_csv(d, stem, quiet=True)
            if df is None:
                rows.append([d.name, f"{stem}.csv", "missing", "", "", "", "", ""])
                continue
            m = load_meta(d, stem)
            driver = _meta_text(m.get("driver_version"))
            if _cuda_version(m.get("driver")):
                driver = f"{driver} (CUDA {_cuda_version(m['driver'])})".strip()
            rows.append([d.name, f"{stem}.csv", f"{len(df)} rows", _meta_text(m.get("gpu")) or "not recorded",
                         driver, _cuda_version(m.get("runtime")), _meta_text(m.get("date")),
                         _meta_text(m.get("git_commit"))])
            if m.get("gpu") and gpu_slug(m["gpu"]) != d.name:
                mismatched.append(f"- `{d.name}/{stem}.meta.json` names {m['gpu']}, whose directory is "
                                  f"`{gpu_slug(m['gpu'])}`, not `{d.name}`.")
    table = pd.DataFrame(rows, columns=["GPU directory", "measurement", "rows", "GPU (metadata)", "driver",
                                        "CUDA runtime", "measured", "commit"])
    out = ["## GPUs and their measurements", "", _md_table(table), ""]
    if mismatched:
        out += ["**Metadata naming another GPU than its directory:**", "", *mismatched, ""]
    return out


def _wide(shared: pd.DataFrame, keys, columns: dict, gpus: list[str]) -> pd.DataFrame:
    """One row per case, ``<gpu> <label>`` columns per GPU (in ``gpus`` order) from the long table."""
    index = shared[shared.gpu == gpus[0]][list(keys)].reset_index(drop=True)
    out = index.copy()
    for gpu in gpus:
        g = shared[shared.gpu == gpu].set_index(list(keys)).loc[list(map(tuple, index.values))]
        for col, (label, fmt) in columns.items():
            out[f"{gpu} {label}"] = [_num(v, fmt) for v in g[col]]
    return out


def _left_out(n: int, what: str) -> str:
    return f" {n} {what} measured on only some of the GPUs are left out." if n else ""


def _missing(missing: list[str], stem: str) -> list[str]:
    return [f"Missing `{stem}.csv` (not in this comparison): {', '.join(f'`{g}`' for g in missing)}.", ""] \
        if missing else []


def _kernel_section(dirs, figures: dict) -> list[str]:
    shared, left_out, missing = kernel_comparison(dirs)
    out = _missing(missing, "throughput")
    if shared.empty:
        return out + ["_No (shape, batch) case measured in `throughput.csv` by every GPU that has one._", ""]
    gpus = list(dict.fromkeys(shared.gpu))
    out += [f"QUICK is the dispatched path (`quick` in `throughput.csv`, fastest row per case); QUICK/cuBLAS is "
            f"its time over cuBLAS fp16's in the same run (below 1: QUICK faster); % of floor is the DRAM floor "
            f"(minimum bytes / that GPU's measured copy bandwidth) over QUICK's time. "
            f"{shared[shared.gpu == gpus[0]].shape[0]} cases measured on every GPU with a `throughput.csv`."
            + _left_out(left_out, "cases"), ""]
    name = "comparison_quick_over_cublas"
    if figures.get(name):
        out += [f"![{name}]({FIGURES}/{Path(figures[name]).name})", ""]
    rows = []
    for gpu in gpus:
        g = shared[shared.gpu == gpu]
        small, large = g[g.M <= SMALL_BATCH], g[g.M >= LARGE_BATCH]
        rows.append([gpu, f"{_num(small.ratio.min(), '.2f')}-{_num(small.ratio.max(), '.2f')}",
                     f"{_num(small.pct_of_floor.max(), '.0f')}%",
                     f"{_num(large.ratio.min(), '.2f')}-{_num(large.ratio.max(), '.2f')}"])
    out += [_md_table(pd.DataFrame(rows, columns=["GPU", f"QUICK/cuBLAS, M <= {SMALL_BATCH}",
                                                  f"best % of floor, M <= {SMALL_BATCH}",
                                                  f"QUICK/cuBLAS, M >= {LARGE_BATCH}"])), ""]
    wide = _wide(shared, KERNEL_KEYS, {"ratio": ("QUICK/cuBLAS", ".2f"), "pct_of_floor": ("% of floor", ".0f")},
                 gpus)
    wide.insert(0, "K x N", [f"{k} x {n}" for k, n in zip(wide.pop("K"), wide.pop("N"))])
    return out + [_md_table(wide), ""]


def _e2e_section(dirs) -> list[str]:
    shared, left_out, missing = e2e_comparison(dirs)
    out = _missing(missing, "e2e")
    if shared.empty:
        return out + ["_No (model, context, layers, batch) case measured in `e2e.csv` by every GPU that has one._",
                      ""]
    gpus = list(dict.fromkeys(shared.gpu))
    out += [f"QUICK's decode tokens/s on the layers built (`layers`; see each `e2e.meta.json`) and QUICK / fp16 "
            f"tokens/s of the same run. {shared[shared.gpu == gpus[0]].shape[0]} cases measured on every GPU with "
            f"an `e2e.csv`." + _left_out(left_out, "cases"), ""]
    wide = _wide(shared, E2E_KEYS, {"quick_tokens_per_s": ("QUICK tokens/s", ".0f"),
                                    "quick/fp16": ("QUICK/fp16", ".2f")}, gpus)
    return out + [_md_table(wide), ""]


def write_comparison(dirs, results_root, figures: dict) -> Path:
    """``results_root/COMPARISON.md`` from the GPU directories ``dirs`` (``figures``: {name: PNG path} of
    :func:`quick_lab.report.figures.draw_comparison`, linked when present); returns its path."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("dirs must name at least one GPU results directory")
    names = ", ".join(f"`{d.name}`" for d in dirs)
    lines = ["# QUICK across GPUs", "",
             f"Generated by `quick-lab reproduce` (quick_lab/report/comparison.py) from the CSVs of every GPU "
             f"directory here: {names}. Every number is computed from those CSVs when this file is written; each "
             f"GPU's own figures and numbers are in `<gpu>/{REPORT}`.", ""]
    if len(dirs) == 1:
        lines += [f"Only one GPU is present ({names}): nothing to set side by side yet, and no comparison figure. "
                  f"The tables below hold its numbers alone; measure on another GPU (`quick-lab bench`, "
                  f"`quick-lab e2e`) and run `quick-lab reproduce` again.", ""]
    lines += _provenance(dirs)
    for title, section in (("Kernel: QUICK against cuBLAS fp16", lambda: _kernel_section(dirs, figures)),
                           ("End to end: decode tokens/s", lambda: _e2e_section(dirs))):
        lines += [f"## {title}", ""]
        try:
            lines += section()
        except Exception as exc:  # a malformed CSV must not cost the rest of the comparison
            lines += [f"_Could not compute this section: {type(exc).__name__}: {exc}_", ""]
    path = Path(results_root) / COMPARISON
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


__all__ = ["E2E_KEYS", "KERNEL_KEYS", "e2e_comparison", "kernel_comparison", "write_comparison"]

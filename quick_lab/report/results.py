"""Finding and loading measured results, and the tidy tables the figures and ``REPORT.md`` are drawn from.

A results directory is ``<results root>/<gpu-slug>/`` (the root is
:func:`quick_lab.build.paths.results_root`, the slug :func:`quick_lab.build.device.gpu_slug`) holding
``<stem>.csv`` and ``<stem>.meta.json`` per sweep, ``figures/`` and ``REPORT.md``. Everything here
returns data (paths, DataFrames); nothing draws or writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from quick_lab.build import paths
from quick_lab.build.device import cuda_device_status, gpu_slug
from quick_lab.core import configs
from quick_lab.lab import bank_model
from quick_lab.model.breakdown import OP_CLASSES
from quick_lab.model.decoder import GEMM_OPS

RESULTS_ENV = "QUICK_LAB_RESULTS"  # overrides default_results_dir() (notebooks, tests)
FIGURES = "figures"
REPORT = "REPORT.md"
COMPARISON = "COMPARISON.md"  # <results root>/COMPARISON.md: every GPU directory side by side
CSV_STEMS = ("throughput", "tiles", "conflicts", "e2e", "e2e_breakdown", "sanitizer")
E2E_CONTEXT = 128  # the paper's end-to-end setting: a 128-token prompt, then 128 decode steps


# ---------------------------------------------------------------- finding and loading results


def gpu_results_dir(results_root=None) -> Path:
    """``<results root>/<slug of the current GPU>`` (``no-gpu`` without one); the root defaults to
    :func:`quick_lab.build.paths.results_root`."""
    from quick_lab.lab.metadata import gpu_info

    root = Path(results_root) if results_root is not None else paths.results_root()
    return root / gpu_slug(gpu_info().get("gpu"))


def default_results_dir(results_root=None, strict: bool = True) -> Path | None:
    """The results directory to draw from.

    ``$QUICK_LAB_RESULTS`` when set; on a GPU ``results/<gpu-slug>``; without one the single
    ``results/*`` directory holding a ``throughput.csv``. ``strict=True`` raises (FileNotFoundError
    when there is none, ValueError when several qualify); ``strict=False`` returns None when there is
    none and the first (by name, with a printed note) when several qualify.
    """
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    root = Path(results_root) if results_root is not None else paths.results_root()
    if cuda_device_status()[0]:
        return gpu_results_dir(root)
    found = sorted(p.parent for p in root.glob("*/throughput.csv")) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        if strict:
            raise FileNotFoundError(f"no GPU and no {root}/*/throughput.csv to draw from: measure on a GPU "
                                    f"(quick-lab bench) or pass --results DIR")
        return None
    names = ", ".join(p.name for p in found)
    if strict:
        raise ValueError(f"no GPU and several results directories under {root} ({names}): pick one with --results")
    print(f"several results directories ({names}); using {found[0].name} (set ${RESULTS_ENV} to choose)")
    return found[0]


def gpu_dirs(results_root=None) -> list[Path]:
    """Every GPU's results directory under the results root (default :func:`quick_lab.build.paths.results_root`),
    by name: a subdirectory holding at least one sweep CSV (``<stem>.csv`` of :data:`CSV_STEMS`)."""
    root = Path(results_root) if results_root is not None else paths.results_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / f"{s}.csv").is_file() for s in CSV_STEMS))


def find_gpu_dir(gpu: str, results_root=None) -> Path:
    """The results directory of ``gpu`` under the results root: ``gpu`` is a directory name
    (``"h100-80gb-hbm3"``) or a GPU name (``"NVIDIA H100 80GB HBM3"``, turned into its slug). A GPU
    without one is a ValueError listing the GPUs present."""
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be a str (a results directory name or a GPU name), got {type(gpu).__name__}")
    if not gpu.strip():
        raise ValueError("gpu must not be empty (a results directory name or a GPU name)")
    root = Path(results_root) if results_root is not None else paths.results_root()
    present = gpu_dirs(root)
    for name in (gpu.strip(), gpu_slug(gpu)):
        for d in present:
            if d.name == name:
                return d
    have = ", ".join(d.name for d in present) or "none"
    raise ValueError(f"gpu {gpu!r}: no results directory {gpu_slug(gpu)!r} with measurements under {root}; "
                     f"GPUs present: {have}")


def load_csv(results_dir, stem: str, quiet: bool = False) -> pd.DataFrame | None:
    """``results_dir/<stem>.csv`` as a DataFrame, or None (with a printed note) when it is missing."""
    if results_dir is None:
        if not quiet:
            print(f"note: no results directory: {stem}.csv not available")
        return None
    path = Path(results_dir) / f"{stem}.csv"
    if not path.is_file():
        if not quiet:
            print(f"note: {path} is missing: skipping what needs it")
        return None
    df = pd.read_csv(path)
    if df.empty:
        if not quiet:
            print(f"note: {path} has no rows: skipping what needs it")
        return None
    return df


def load_meta(results_dir, stem: str) -> dict:
    """``results_dir/<stem>.meta.json`` as a dict; empty when missing or unreadable."""
    path = Path(results_dir) / f"{stem}.meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- derived tables


def best_times(df: pd.DataFrame) -> pd.DataFrame:
    """Fastest row per (kernel, K, N, M) (a sweep may hold several configs / splits per kernel)."""
    rows = df.dropna(subset=["time_us"]).reset_index(drop=True)
    return rows.loc[rows.groupby(["kernel", "K", "N", "M"]).time_us.idxmin()].reset_index(drop=True)


def speedups(df: pd.DataFrame, baseline: str = "awq", kernels=("quick", "quick-paper")) -> pd.DataFrame:
    """Long table K, N, M, kernel, speedup = time(baseline) / time(kernel), best row of each kernel."""
    best = best_times(df)
    t = best.pivot_table(index=["K", "N", "M"], columns="kernel", values="time_us")
    out = []
    if baseline in t:
        for k in kernels:
            if k in t:
                s = (t[baseline] / t[k]).dropna().rename("speedup").reset_index()
                s.insert(3, "kernel", k)
                out.append(s)
    if not out:
        return pd.DataFrame(columns=["K", "N", "M", "kernel", "speedup"])
    return pd.concat(out, ignore_index=True)


def compute_path_traffic(awq_cfg=None, quick_cfg=None) -> pd.DataFrame:
    """:func:`bank_model.tile_traffic` of both kernels (one block, one k-tile), long form with a
    ``kernel`` and ``class`` column; instruction classes neither kernel issues are dropped."""
    awq_cfg = awq_cfg or configs.AWQ_DEFAULT
    quick_cfg = quick_cfg or configs.QUICK_DEFAULT
    parts = []
    for kind, cfg in (("awq", awq_cfg), ("quick", quick_cfg)):
        t = bank_model.tile_traffic(kind, cfg)
        t.insert(0, "config", cfg.name)
        t.insert(0, "kernel", kind)
        parts.append(t)
    df = pd.concat(parts, ignore_index=True)
    df["class"] = df.op + " " + df.operand
    used = df.groupby("class").instructions.transform("sum") > 0
    return df[used].reset_index(drop=True)


# (label, column of conflicts.csv): the four shared-memory counts shown per case
CONFLICT_METRICS = (
    ("st wavefronts", bank_model.ST_WAVEFRONTS),
    ("ld wavefronts", bank_model.LD_WAVEFRONTS),
    ("st conflicts", bank_model.ST_CONFLICTS),
    ("ld conflicts", bank_model.LD_CONFLICTS),
)


def model_conflicts() -> pd.DataFrame:
    """The bank model's prediction for the cases ``quick-lab conflicts`` profiles by default, in the
    column layout of ``conflicts.csv`` (model columns only)."""
    from quick_lab.lab import conflicts

    try:
        cases = conflicts.profile_cases(conflicts.default_kind_cfgs(), conflicts.DEFAULT_SHAPES,
                                        conflicts.DEFAULT_BATCHES)
    except Exception:  # the dispatcher's default config unavailable: the two paper configs only
        cases = conflicts.profile_cases([("awq", configs.AWQ_DEFAULT), ("quick", configs.QUICK_DEFAULT)],
                                        conflicts.DEFAULT_SHAPES, conflicts.DEFAULT_BATCHES)
    rows = []
    for kind, name, K, N, M in cases:
        pred = bank_model.predict_counts(kind, name, M, K, N, conflicts.SPLIT_K)
        row = dict(kind=kind, config=name, K=K, N=N, M=M, split_k=conflicts.SPLIT_K)
        row.update({f"model:{m}": pred[m] for _, m in CONFLICT_METRICS})
        rows.append(row)
    return pd.DataFrame(rows)


def conflicts_long(df: pd.DataFrame) -> pd.DataFrame:
    """conflicts.csv (or :func:`model_conflicts`) -> long: K, N, M, case, metric, source, value."""
    rows = []
    for r in df.to_dict("records"):
        tile, rest = (str(r["config"]).split("_", 1) + [""])[:2]
        case = f"{r['kind']}\n{tile}\n{rest}"
        for label, m in CONFLICT_METRICS:
            for source, col in (("ncu measured", m), ("model", f"model:{m}")):
                v = r.get(col)
                if v is not None and not pd.isna(v):
                    rows.append(dict(K=int(r["K"]), N=int(r["N"]), M=int(r["M"]), kind=r["kind"],
                                     config=r["config"], case=case, metric=label, source=source, value=float(v)))
    return pd.DataFrame(rows)


def tile_table(tiles: pd.DataFrame, K: int, N: int, kernel: str) -> pd.DataFrame:
    """Best (over split-K) ratio_to_fp16 per config (rows) and M (columns) of one shape and kernel."""
    sub = tiles[(tiles.K == K) & (tiles.N == N) & (tiles.kernel == kernel)]
    return sub.pivot_table(index="config", columns="M", values="ratio_to_fp16", aggfunc="min")


def e2e_rows(e2e: pd.DataFrame) -> pd.DataFrame:
    """The measured rows of an ``e2e.csv`` (failed cases, e.g. out of memory, dropped) in the current
    layout whatever the file's age: ``context`` (missing: the ``prefill``, else :data:`E2E_CONTEXT`),
    ``full_layers`` (missing: ``layers``), ``full_depth_tokens_per_s`` (``full_depth_tokens_per_s_estimate``;
    missing: ``tokens_per_s``) and ``estimate``: True where the row was measured on fewer layers than
    the model has (``layers < full_layers``), so its full-depth number is scaled, not measured."""
    if "tokens_per_s" not in e2e:
        return e2e.iloc[0:0].assign(context=[], full_layers=[], full_depth_tokens_per_s=[], estimate=[])
    df = e2e.dropna(subset=["tokens_per_s"]).copy()
    if "context" not in df:
        df["context"] = df["prefill"] if "prefill" in df else E2E_CONTEXT
    df["context"] = df["context"].fillna(df["prefill"] if "prefill" in df else E2E_CONTEXT).astype(int)
    if "full_layers" not in df:
        df["full_layers"] = df["layers"]
    df["full_depth_tokens_per_s"] = (df["full_depth_tokens_per_s_estimate"].fillna(df["tokens_per_s"])
                                     if "full_depth_tokens_per_s_estimate" in df else df["tokens_per_s"])
    df["estimate"] = df["layers"].astype(int) < df["full_layers"].astype(int)
    return df.reset_index(drop=True)


def _in_order(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows by model (in order of appearance), context, batch: the order of the tables built from them."""
    first = {m: i for i, m in enumerate(dict.fromkeys(rows["model"]))}
    return rows.sort_values(["context", "batch"], kind="stable").sort_values(
        "model", key=lambda m: m.map(first), kind="stable")


def _with_ratios(t: pd.DataFrame) -> pd.DataFrame:
    if {"awq", "quick"} <= set(t.columns):
        t["quick/awq"] = t["quick"] / t["awq"]
    if {"fp16", "quick"} <= set(t.columns):
        t["quick/fp16"] = t["quick"] / t["fp16"]
    return t


def e2e_table(e2e: pd.DataFrame) -> pd.DataFrame:
    """Full-depth decode tokens/s (measured at full depth, scaled from fewer layers where the model did
    not fit: :func:`e2e_estimates` says where) per (model, context, batch) x backend, plus the
    quick/awq and quick/fp16 ratios. Backends of one model may have been built at different depths
    (70B fp16 on an 80 GB GPU): the full-depth number is the one they share."""
    t = _in_order(e2e_rows(e2e)).pivot_table(index=["model", "context", "batch"], columns="backend",
                                              values="full_depth_tokens_per_s", sort=False)
    return _with_ratios(t)


def e2e_estimates(e2e: pd.DataFrame) -> pd.DataFrame:
    """True per (model, context, batch) x backend of :func:`e2e_table` where that number is an estimate
    (measured on ``layers < full_layers`` and scaled to the full depth)."""
    t = _in_order(e2e_rows(e2e)).pivot_table(index=["model", "context", "batch"], columns="backend",
                                              values="estimate", aggfunc="max", sort=False)
    return t.astype(bool)


def breakdown_table(breakdown: pd.DataFrame) -> pd.DataFrame:
    """``e2e_breakdown.csv`` wide: µs per layer per (model, layers, backend, batch, context) x op: the op
    classes of one decode step (:data:`quick_lab.model.breakdown.OP_CLASSES`), then ``layer`` (the whole
    step per layer), ``gemm`` (the GEMM classes) and ``other`` (``layer - gemm``: the non-GEMM time as it
    shows in the step, launch gaps included) as the CSV has them; computed from the classes and ``layer``
    only where the CSV lacks them."""
    keys = ["model", "layers", "backend", "batch", "context"]
    t = breakdown.pivot_table(index=keys, columns="op", values="us_per_layer", sort=False)
    if "gemm" not in t:
        t["gemm"] = t[[c for c in GEMM_OPS if c in t]].sum(axis=1)
    if "other" not in t and "layer" in t:
        t["other"] = t["layer"] - t["gemm"]
    ops = [c for c in OP_CLASSES if c in t] + [c for c in ("layer", "gemm", "other") if c in t]
    return t[ops + [c for c in t.columns if c not in ops]]


# ---------------------------------------------------------------- across GPUs


def quick_vs_cublas(throughput: pd.DataFrame) -> pd.DataFrame:
    """K, N, M, quick_us, fp16_us, ratio (QUICK time / cuBLAS fp16 time: below 1 QUICK is faster) and
    pct_of_floor (QUICK's % of the DRAM floor) from one ``throughput.csv``: the dispatched QUICK kernel's
    fastest row of each case against cuBLAS fp16 of the same run."""
    best = best_times(throughput).set_index(["K", "N", "M"])
    quick, fp16 = best[best.kernel == "quick"], best[best.kernel == "fp16"]
    out = pd.DataFrame({"quick_us": quick.time_us,
                        "pct_of_floor": quick.pct_of_floor if "pct_of_floor" in quick else float("nan")})
    out = out.join(fp16.time_us.rename("fp16_us"), how="inner")
    out["ratio"] = out.quick_us / out.fp16_us
    return out.reset_index()[["K", "N", "M", "quick_us", "fp16_us", "ratio", "pct_of_floor"]]


def e2e_quick(e2e: pd.DataFrame) -> pd.DataFrame:
    """model, context, layers, batch, quick_tokens_per_s and quick/fp16 (tokens/s ratio) from one
    ``e2e.csv``, as measured on the layers built (cases that failed, e.g. out of memory, dropped)."""
    t = _with_ratios(_in_order(e2e_rows(e2e)).pivot_table(index=["model", "context", "layers", "batch"],
                                                          columns="backend", values="tokens_per_s", sort=False))
    if "quick" not in t:
        return pd.DataFrame(columns=["model", "context", "layers", "batch", "quick_tokens_per_s", "quick/fp16"])
    out = pd.DataFrame({"quick_tokens_per_s": t["quick"],
                        "quick/fp16": t["quick/fp16"] if "quick/fp16" in t else float("nan")})
    return out.dropna(subset=["quick_tokens_per_s"]).reset_index()


def shared_cases(tables: dict, keys) -> tuple[pd.DataFrame, int]:
    """``{gpu: table}`` -> (one long table with a ``gpu`` column holding only the ``keys`` every GPU
    measured, the number of cases left out because only some GPUs measured them)."""
    if not tables:
        return pd.DataFrame(columns=["gpu", *keys]), 0
    indexed = {gpu: t.set_index(list(keys)) for gpu, t in tables.items()}
    every = set.union(*(set(t.index) for t in indexed.values()))
    shared = set.intersection(*(set(t.index) for t in indexed.values()))
    parts = [t.loc[sorted(shared)].reset_index().assign(gpu=gpu) for gpu, t in indexed.items()]
    out = pd.concat(parts, ignore_index=True) if shared else pd.DataFrame(columns=["gpu", *keys])
    return out[["gpu", *[c for c in out.columns if c != "gpu"]]], len(every - shared)


__all__ = ["COMPARISON", "CONFLICT_METRICS", "CSV_STEMS", "E2E_CONTEXT", "FIGURES", "REPORT", "RESULTS_ENV",
           "best_times", "breakdown_table", "compute_path_traffic", "conflicts_long", "default_results_dir",
           "e2e_estimates", "e2e_quick", "e2e_rows", "e2e_table", "find_gpu_dir", "gpu_dirs", "gpu_results_dir",
           "load_csv", "load_meta", "model_conflicts", "quick_vs_cublas", "shared_cases", "speedups", "tile_table"]

"""The paper's figures, drawn from the measured CSVs in ``results/<gpu>/`` (never from typed numbers),
and ``REPORT.md``, which puts each figure beside the paper's claim and our number computed from the
same CSVs at generation time.

Figures (seaborn / matplotlib, PNG + SVG into ``results/<gpu>/figures/``):

* ``fig1_compute_paths``   per-k-tile shared-memory traffic of the two compute paths
  (:func:`quick_lab.lab.bank_model.tile_traffic` for ``AWQ_DEFAULT`` and ``QUICK_DEFAULT``).
* ``fig2_bank_conflicts``  Nsight Compute vs the bank model (``conflicts.csv``; model only without it).
* ``fig3_tflops_vs_batch`` kernel TFLOPS vs batch on M x 8192 x 8192 (``throughput.csv``).
* ``fig3b_speedup_all_shapes`` time / cuBLAS fp16 vs batch for every measured shape.
* ``fig4_e2e``             decode tokens/s vs batch per model (``e2e.csv``).
* ``fig5_tiles_<K>x<N>``   tile-size heatmaps (``tiles.csv``).

``quick-lab reproduce`` (:func:`add_parser`) draws them all; ``--measure`` re-runs the sweeps first
on a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from quick_lab.lab import bank_model
from quick_lab.core import configs
from quick_lab.lab.metadata import RESULTS

RESULTS_ENV = "QUICK_LAB_RESULTS"  # overrides default_results_dir() (notebooks, tests)
FIGURES = "figures"
REPORT = "REPORT.md"
CSV_STEMS = ("throughput", "tiles", "conflicts", "e2e", "sanitizer")

# Order, labels and colours shared by every figure.
KERNELS = ("fp16", "awq", "quick-paper", "quick", "fallback")
KERNEL_LABELS = {
    "fp16": "fp16 cuBLAS",
    "awq": "AutoAWQ-style (awq)",
    "quick-paper": "QUICK, paper tile (quick-paper)",
    "quick": "QUICK, dispatched (quick)",
    "fallback": "dequant + cuBLAS (fallback)",
}
# In tiles.csv 'awq' / 'quick' are the two kernels at every registered config (not the dispatcher).
TILE_KERNEL_LABELS = {"awq": "AutoAWQ-style kernel (awq)", "quick": "QUICK kernel (quick)",
                      "fallback": "dequant + cuBLAS (fallback)"}
# e2e.csv backends (each linear layer through quick_lab.core.ops with quick_lab.model.e2e's launch choice).
E2E_LABELS = {"fp16": "fp16 cuBLAS", "awq": "AutoAWQ-style (awq)", "quick": "QUICK (quick)"}
PALETTE = {"fp16": "#4d4d4d", "awq": "#d62728", "quick-paper": "#17becf", "quick": "#1f77b4",
           "fallback": "#9467bd"}
LARGE_BATCH = 128   # "larger batches" of the paper's kernel claim: M >= 128
SMALL_BATCH = 16    # memory-bound decode batches: M <= 16
FIG3_SHAPE = (8192, 8192)
FIG3_MAX_BATCH = 256

# The paper's claims (arXiv 2402.10076, abstract and Sec. 4; see MISSION.md). These are the paper's
# words, not our measurements: every number of ours in REPORT.md is computed from the CSVs.
PAPER = {
    "fig1": "AutoAWQ dequantizes weights in registers, writes them back to shared memory and re-reads them "
            "with `ldmatrix`; QUICK interleaves the weights offline so the dequantized registers are already "
            "the `mma` B fragments: no weight write-back, no weight `ldmatrix`.",
    "fig2": "The write-back of dequantized weights is full of shared-memory bank conflicts; QUICK removes it.",
    "fig3": "Up to 1.91x kernel speedup over the AutoAWQ kernel at larger batches; the gain grows with batch size.",
    "fig3b": "At very large batches fp16 cuBLAS is faster again.",
    "fig4": "Up to 1.94x end-to-end token throughput over AutoAWQ (7B-70B models, prefill 128, decode 128).",
    "fig5": "The shared memory QUICK frees allows larger tiles, which re-read activations from DRAM less often.",
}


# ---------------------------------------------------------------- finding and loading results


def _has_gpu() -> bool:
    from quick_lab.build.device import cuda_device_status

    return cuda_device_status()[0]


def _gpu_results_dir(root: Path) -> Path:
    from quick_lab.lab.metadata import gpu_info, gpu_slug

    return root / gpu_slug(gpu_info().get("gpu"))  # root may differ from RESULTS (tests)


def default_results_dir(results_root=None, strict: bool = True) -> Path | None:
    """The results directory to draw from.

    ``$QUICK_LAB_RESULTS`` when set; on a GPU ``results/<gpu-slug>``; without one the single
    ``results/*`` directory holding a ``throughput.csv``. ``strict=True`` raises (FileNotFoundError
    when there is none, ValueError when several qualify); ``strict=False`` returns None when there is
    none and the first (by name, with a printed note) when several qualify.
    """
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    root = Path(results_root) if results_root is not None else RESULTS
    if _has_gpu():
        return _gpu_results_dir(root)
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
    path = Path(results_dir) / f"{stem}.meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- derived tables


def _ordered(kernels) -> list[str]:
    present = list(dict.fromkeys(kernels))
    return [k for k in KERNELS if k in present] + [k for k in present if k not in KERNELS]


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


_CONFLICT_METRICS = (
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
        row.update({f"model:{m}": pred[m] for _, m in _CONFLICT_METRICS})
        rows.append(row)
    return pd.DataFrame(rows)


def conflicts_long(df: pd.DataFrame) -> pd.DataFrame:
    """conflicts.csv (or :func:`model_conflicts`) -> long: K, N, M, case, metric, source, value."""
    rows = []
    for r in df.to_dict("records"):
        tile, rest = (str(r["config"]).split("_", 1) + [""])[:2]
        case = f"{r['kind']}\n{tile}\n{rest}"
        for label, m in _CONFLICT_METRICS:
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


def e2e_table(e2e: pd.DataFrame) -> pd.DataFrame:
    """tokens/s per (model, layers, batch) x backend plus quick/awq and quick/fp16 ratios."""
    ok = e2e.dropna(subset=["tokens_per_s"]) if "tokens_per_s" in e2e else e2e.iloc[0:0]
    index = [c for c in ("model", "layers", "batch") if c in ok]
    t = ok.pivot_table(index=index, columns="backend", values="tokens_per_s")
    if {"awq", "quick"} <= set(t.columns):
        t["quick/awq"] = t["quick"] / t["awq"]
    if {"fp16", "quick"} <= set(t.columns):
        t["quick/fp16"] = t["quick"] / t["fp16"]
    return t


# ---------------------------------------------------------------- drawing helpers


def _plt():
    import matplotlib

    if "ipykernel" not in sys.modules and matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")  # files only (CLI, tests); notebooks keep their inline backend
    import matplotlib.pyplot as plt

    return plt


def _style():
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    return sns


def _log2_batch_axis(ax, batches):
    batches = sorted({int(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()


def _log_y_ticks(ax, values):
    """Readable ticks on a log y axis: 1, 2, 5 x powers of ten spanning ``values``."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    v = np.asarray([x for x in values if np.isfinite(x) and x > 0])
    if not v.size:
        return
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in (1, 2, 5)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_ylim(v.min() / 1.25, v.max() * 1.25)


def _count_axis(ax):
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _human(y)))


def _human(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def save(fig, out_dir, stem: str) -> list[Path]:
    """Writes ``stem.png`` and ``stem.svg`` (reproducible: no date, fixed SVG ids) and closes ``fig``."""
    import matplotlib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    with matplotlib.rc_context({"svg.hashsalt": "quick_lab", "svg.fonttype": "none"}):
        fig.savefig(paths[0], dpi=130, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    _plt().close(fig)
    return paths


# ---------------------------------------------------------------- the figures


def fig1_compute_paths(awq_cfg=None, quick_cfg=None):
    """Per block and k-tile shared-memory bytes and wavefronts by instruction class of both kernels."""
    plt, sns = _plt(), _style()
    df = compute_path_traffic(awq_cfg, quick_cfg)
    df["kernel label"] = df.kernel.map({"awq": "AutoAWQ-style", "quick": "QUICK"}) + " " + df.config
    classes = list(dict.fromkeys(df["class"]))
    palette = {lbl: PALETTE[k] for k, lbl in zip(df.kernel, df["kernel label"])}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1, 1]})
    for ax, (col, title, unit) in zip(axes, (("bytes", "shared-memory bytes", "bytes / block / k-tile"),
                                             ("wavefronts", "shared-memory wavefronts",
                                              "wavefronts / block / k-tile"),
                                             ("conflicts", "bank conflicts (wavefronts - ideal)",
                                              "extra wavefronts / block / k-tile"))):
        sns.barplot(df, x="class", y=col, hue="kernel label", order=classes, palette=palette, ax=ax)
        for c in ax.containers:
            ax.bar_label(c, fmt="%d", fontsize=8, padding=1)
        totals = df.groupby("kernel")[col].sum()
        ax.set_title(f"{title}\ntotal: awq {int(totals.get('awq', 0))}, quick {int(totals.get('quick', 0))}")
        ax.set_xlabel("instruction class (op, operand: A activations, B weights)")
        ax.set_ylabel(unit)
        handles, labels = ax.get_legend_handles_labels()
        ax.get_legend().remove()
        ax.tick_params(axis="x", rotation=30)
    # The two data paths of the weights (operand B), read off the same table.
    paths = []
    for kind, name in (("awq", "AutoAWQ"), ("quick", "QUICK")):
        b = df[(df.kernel == kind) & (df.operand.isin(["B", "SZ"])) & (df.instructions > 0)]
        steps = [f"{op.upper()} {operand}" for op, operand in zip(b.op, b.operand)]
        paths.append(f"{name}: DRAM int4 -> registers -> dequant (lop3) -> "
                     + (" -> ".join(steps) + " -> " if steps else "") + "mma.m16n8k16")
    fig.suptitle("Fig. 1: the two compute paths, shared-memory traffic per block per k-tile "
                 "(bank model, quick_lab.lab.bank_model.tile_traffic)\n" + "\n".join(paths), fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.06), fontsize=9)
    fig.tight_layout()
    return fig


def fig2_bank_conflicts(conflicts: pd.DataFrame | None):
    """Measured (ncu) vs model shared-memory wavefronts and conflicts per kernel, one row per (shape, M);
    the model alone (labelled so) when ``conflicts`` is None."""
    plt, sns = _plt(), _style()
    measured = conflicts is not None
    long = conflicts_long(conflicts if measured else model_conflicts())
    groups = list(long.groupby(["K", "N", "M"]).groups)
    metrics = [m for m, _ in _CONFLICT_METRICS]
    cases = list(dict.fromkeys(long.case))
    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(4.4 * len(metrics), 3.9 * len(groups)),
                             squeeze=False)
    palette = {"ncu measured": "#2ca02c", "model": "#7f7f7f"}
    for i, (K, N, M) in enumerate(groups):
        for j, metric in enumerate(metrics):
            ax = axes[i, j]
            sub = long[(long.K == K) & (long.N == N) & (long.M == M) & (long.metric == metric)]
            order = [c for c in cases if c in set(sub.case)]
            sns.barplot(sub, x="case", y="value", hue="source", order=order, palette=palette, ax=ax,
                        hue_order=[s for s in ("ncu measured", "model") if s in set(long.source)])
            for c in ax.containers:
                ax.bar_label(c, labels=[_human(v) for v in c.datavalues], fontsize=7, padding=1)
            ax.set_title(f"{metric}: {M} x {K} x {N}")
            ax.set_xlabel("")
            ax.set_ylabel(f"{metric.split()[-1]} per launch (count)")
            ax.set_ylim(0, max(1.0, float(sub.value.max()) * 1.15) if len(sub) else 1.0)
            _count_axis(ax)
            ax.tick_params(axis="x", labelsize=7)
            if ax.get_legend() is not None:
                if i == 0 and j == 0:
                    ax.legend(fontsize=8, title=None)
                else:
                    ax.get_legend().remove()
    title = ("Fig. 2: shared-memory wavefronts and bank conflicts, Nsight Compute vs bank model (split-K 1)"
             if measured else "Fig. 2: shared-memory wavefronts and bank conflicts (model only: no conflicts.csv)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def fig3_tflops_vs_batch(throughput: pd.DataFrame, shape=FIG3_SHAPE, max_batch: int = FIG3_MAX_BATCH):
    """TFLOPS vs batch (p10-p90 band) of every kernel on M x K x N (default 8192 x 8192, M <= 256),
    and the QUICK / AWQ speedup below. Falls back to the largest measured shape when absent."""
    plt = _plt()
    _style()
    shapes = sorted({(int(k), int(n)) for k, n in zip(throughput.K, throughput.N)}, key=lambda s: s[0] * s[1])
    K, N = tuple(shape) if tuple(shape) in shapes else shapes[-1]
    df = best_times(throughput[(throughput.K == K) & (throughput.N == N) & (throughput.M <= max_batch)])
    if df.empty:  # only batches above max_batch measured
        df = best_times(throughput[(throughput.K == K) & (throughput.N == N)])
    flop = 2.0 * df.M * K * N
    df = df.assign(lo=flop / (df.p90_us * 1e-6) / 1e12, hi=flop / (df.p10_us * 1e-6) / 1e12)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    for k in _ordered(df.kernel):
        d = df[df.kernel == k].sort_values("M")
        ax.plot(d.M, d.tflops, marker="o", color=PALETTE.get(k), label=KERNEL_LABELS.get(k, k))
        ax.fill_between(d.M, d.lo, d.hi, color=PALETTE.get(k), alpha=0.2, linewidth=0)
    ax.set_ylabel("throughput (TFLOPS, 2·M·K·N / time)")
    ax.set_title(f"Fig. 3: W4A16 GEMM throughput vs batch, M x {K} x {N} (band: p10-p90)")
    ax.legend(fontsize=8)
    sp = speedups(df)
    for k in _ordered(sp.kernel):
        d = sp[sp.kernel == k].sort_values("M")
        ax2.plot(d.M, d.speedup, marker="o", color=PALETTE.get(k), label=f"{k} / awq")
        for m, s in zip(d.M, d.speedup):
            ax2.annotate(f"{s:.2f}", (m, s), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax2.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax2.set_ylabel("speedup over awq (x)")
    ax2.set_xlabel("batch M (tokens)")
    if len(sp):
        ax2.legend(fontsize=8)
    _log2_batch_axis(ax2, df.M)
    fig.tight_layout()
    return fig


def fig3b_speedup_all_shapes(throughput: pd.DataFrame):
    """time / cuBLAS fp16 vs batch for every shape (log y; below 1.0 beats fp16)."""
    sns = _style()
    _plt()
    df = best_times(throughput[throughput.kernel != "fp16"])
    df = df.assign(shape=[f"K={k} N={n}" for k, n in zip(df.K, df.N)])
    order = [f"K={k} N={n}" for k, n in sorted({(int(k), int(n)) for k, n in zip(df.K, df.N)})]
    kernels = _ordered(df.kernel)
    g = sns.relplot(df, x="M", y="ratio_to_fp16", hue="kernel", hue_order=kernels, col="shape", col_order=order,
                    col_wrap=min(3, len(order)), kind="line", marker="o", palette=PALETTE,
                    height=3.3, aspect=1.25, facet_kws={"sharey": True, "sharex": False})
    for ax in g.axes.flat:
        ax.set_yscale("log")
        _log_y_ticks(ax, list(df.ratio_to_fp16) + [1.0])
        ax.grid(True, axis="y", which="major")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.text(0.02, 1.0, "cuBLAS fp16", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7)
        shape = ax.get_title().split("= ", 1)[-1]
        _log2_batch_axis(ax, df[df["shape"] == shape].M if shape in order else df.M)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    g.set_titles("{col_name}")
    g.set_axis_labels("batch M (tokens)", "kernel time / cuBLAS fp16 time")
    g.legend.set_title("kernel")
    for t, k in zip(g.legend.texts, kernels):
        t.set_text(KERNEL_LABELS.get(k, k))
    sns.move_legend(g, "upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(kernels), title=None, frameon=False)
    g.figure.suptitle("Fig. 3b: every shape, time relative to cuBLAS fp16 (lower is better; < 1 beats fp16)",
                      y=1.02)
    return g.figure


def fig4_e2e(e2e: pd.DataFrame):
    """Decode tokens/s vs batch per model (top) and QUICK / AWQ, QUICK / fp16 (bottom)."""
    plt = _plt()
    _style()
    ok = e2e.dropna(subset=["tokens_per_s"])
    models = list(dict.fromkeys(ok.model))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    for j, model in enumerate(models):
        d = ok[ok.model == model]
        ax, ax2 = axes[0, j], axes[1, j]
        for b in _ordered(d.backend):
            s = d[d.backend == b].sort_values("batch")
            ax.plot(s.batch, s.tokens_per_s, marker="o", color=PALETTE.get(b), label=E2E_LABELS.get(b, b))
        layers = sorted(set(d.layers)) if "layers" in d else []
        full = sorted(set(d.full_layers)) if "full_layers" in d else []
        depth = f" ({'/'.join(map(str, layers))} of {'/'.join(map(str, full))} layers)" if layers and full else ""
        ax.set_title(f"{model}{depth}")
        ax.set_yscale("log")
        _log_y_ticks(ax, d.tokens_per_s)
        ax.set_ylabel("decode throughput (tokens/s)")
        _log2_batch_axis(ax, d.batch)
        ax.legend(fontsize=8)
        t = e2e_table(d).reset_index()
        for col, color in (("quick/awq", PALETTE["quick"]), ("quick/fp16", PALETTE["fp16"])):
            if col in t:
                s = t.groupby("batch")[col].mean()
                ax2.plot(s.index, s.values, marker="o", color=color, label=col)
                for b, v in s.items():
                    ax2.annotate(f"{v:.2f}", (b, v), textcoords="offset points", xytext=(0, 5), ha="center",
                                 fontsize=7)
        ax2.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax2.set_ylabel("tokens/s ratio (x)")
        ax2.set_xlabel("batch (sequences)")
        _log2_batch_axis(ax2, d.batch)
        if ax2.lines[:-1]:
            ax2.legend(fontsize=8)
    fig.suptitle("Fig. 4: end-to-end decode throughput vs batch (same int4 weights per backend)", fontsize=11)
    fig.tight_layout()
    return fig


def fig5_tiles(tiles: pd.DataFrame, K: int, N: int):
    """Heatmaps of the best (over split-K) time / cuBLAS fp16 per tile config (rows) and batch (columns)
    for each kernel on one shape; the fastest config of each column is boxed. The dequant + cuBLAS
    fallback, when measured, is the last row of the QUICK panel (it is QUICK's large-batch path)."""
    plt, sns = _plt(), _style()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    kernels = [k for k in ("awq", "quick") if ((tiles.kernel == k) & (tiles.K == K) & (tiles.N == N)).any()]
    fallback = tile_table(tiles, K, N, "fallback")
    tables = {}
    for k in kernels:
        t = tile_table(tiles, K, N, k)
        t = t.loc[sorted(t.index, key=configs.TileConfig.parse)]
        if k == "quick" and not fallback.empty:
            t = pd.concat([t, fallback.rename(index=lambda _: "fallback: dequant+cuBLAS")])
        tables[k] = t
    if not tables and not fallback.empty:
        tables["fallback"] = fallback
    vals = np.concatenate([t.values[np.isfinite(t.values)] for t in tables.values()])
    span = max(float(np.max(np.abs(np.log10(vals)))), 0.05) if vals.size else 1.0
    norm = LogNorm(vmin=10 ** -span, vmax=10 ** span)
    heights = [len(t) for t in tables.values()]
    fig, axes = plt.subplots(1, len(tables), figsize=(1 + 7.5 * len(tables), 1.8 + 0.34 * max(heights)),
                             squeeze=False)
    for ax, (k, t) in zip(axes[0], tables.items()):
        cticks = [m * 10.0 ** e for e in range(-3, 4) for m in (1, 2, 5) if norm.vmin <= m * 10.0 ** e <= norm.vmax]
        sns.heatmap(t, ax=ax, annot=True, fmt=".2f", cmap="RdYlGn_r", norm=norm, annot_kws={"fontsize": 7},
                    linewidths=0.4, cbar_kws={"label": "best time / cuBLAS fp16 (log scale)", "ticks": cticks,
                                              "format": "%g"})
        ax.collections[0].colorbar.ax.minorticks_off()
        for j, col in enumerate(t.columns):
            if t[col].notna().any():
                i = list(t.index).index(t[col].idxmin())
                ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="black", linewidth=2))
        ax.set_title(f"{TILE_KERNEL_LABELS.get(k, k)}: M x {K} x {N}")
        ax.set_xlabel("batch M (tokens)")
        ax.set_ylabel("tile config (tile_m x tile_n x tile_k _ warps _ stages)")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"Fig. 5: tile-size study, K={K} N={N}: time / cuBLAS fp16 at the best split-K "
                 "(box: fastest config per batch)", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- REPORT.md


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def _x(v) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{v:.2f}x"


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{v:.{digits}f}"


def _image(name: str, figures: dict) -> list[str]:
    path = figures.get(name)
    return [f"![{name}]({FIGURES}/{path.name})", ""] if path else []


def _report_fig1() -> list[str]:
    df = compute_path_traffic()
    out = [f"**Paper.** {PAPER['fig1']}", ""]
    t = df.pivot_table(index="class", columns="kernel", values=["instructions", "wavefronts", "bytes"],
                       aggfunc="sum", sort=False)
    tot = df.groupby("kernel")[["instructions", "wavefronts", "bytes"]].sum()
    wb = df[df.operand == "B"].groupby("kernel")[["instructions", "bytes"]].sum()
    awq_b = wb.loc["awq"] if "awq" in wb.index else pd.Series({"instructions": 0, "bytes": 0})
    q_b = wb.loc["quick"] if "quick" in wb.index else pd.Series({"instructions": 0, "bytes": 0})
    out += [f"**Ours** (bank model of our kernels, `{configs.AWQ_DEFAULT.name}` vs `{configs.QUICK_DEFAULT.name}`, "
            f"one block, one k-tile): the baseline moves {int(awq_b['bytes'])} bytes of weights through shared "
            f"memory in {int(awq_b['instructions'])} warp instructions, QUICK {int(q_b['bytes'])} bytes in "
            f"{int(q_b['instructions'])}; all shared-memory wavefronts: {int(tot.loc['awq', 'wavefronts'])} vs "
            f"{int(tot.loc['quick', 'wavefronts'])} "
            f"({_x(tot.loc['awq', 'wavefronts'] / max(1, tot.loc['quick', 'wavefronts']))} fewer).", ""]
    rows = []
    for cls in t.index:
        rows.append([cls] + [int(t.loc[cls, (m, k)]) if (m, k) in t.columns else 0
                             for m in ("instructions", "wavefronts", "bytes") for k in ("awq", "quick")])
    out += [_md_table(pd.DataFrame(rows, columns=["class", "awq instr", "quick instr", "awq wavefronts",
                                                  "quick wavefronts", "awq bytes", "quick bytes"])), ""]
    return out


def _report_fig2(conflicts: pd.DataFrame | None) -> list[str]:
    out = [f"**Paper.** {PAPER['fig2']}", ""]
    df = conflicts if conflicts is not None else model_conflicts()
    src = "Nsight Compute (`conflicts.csv`), model in brackets" if conflicts is not None else \
        "model only (no `conflicts.csv`)"
    rows = []
    for r in df.to_dict("records"):
        row = [f"{r['M']} x {r['K']} x {r['N']}", r["kind"], r["config"]]
        for _, m in _CONFLICT_METRICS:
            model = r.get(f"model:{m}")
            meas = r.get(m)
            if conflicts is not None and meas is not None and not pd.isna(meas):
                row.append(f"{int(meas):,} ({int(model):,})" if model is not None and not pd.isna(model)
                           else f"{int(meas):,}")
            else:
                row.append(f"{int(model):,}" if model is not None and not pd.isna(model) else "n/a")
        rows.append(row)
    out += [f"**Ours**, {src}:", "",
            _md_table(pd.DataFrame(rows, columns=["M x K x N", "kernel", "config"] + [m for m, _ in _CONFLICT_METRICS])),
            ""]
    # store wavefronts of the baseline over QUICK's paper config, per shape and M
    col = bank_model.ST_WAVEFRONTS if conflicts is not None else f"model:{bank_model.ST_WAVEFRONTS}"
    paper_cfg = {"awq": configs.AWQ_DEFAULT.name, "quick": configs.QUICK_DEFAULT.name}
    for (K, N, M), g in df.groupby(["K", "N", "M"]):
        a = g[(g.kind == "awq") & (g.config == paper_cfg["awq"])][col]
        q = g[(g.kind == "quick") & (g.config == paper_cfg["quick"])][col]
        if len(a) and len(q) and not pd.isna(a.iloc[0]) and not pd.isna(q.iloc[0]):
            ratio = f"{a.iloc[0] / q.iloc[0]:.1f}x fewer" if q.iloc[0] > 0 else "none at all"
            out.append(f"- {M} x {K} x {N}: shared-memory store wavefronts {int(a.iloc[0]):,} (awq) vs "
                       f"{int(q.iloc[0]):,} (quick, same tile): {ratio} in QUICK.")
    return out + [""]


def _report_fig3(throughput: pd.DataFrame) -> list[str]:
    out = [f"**Paper.** {PAPER['fig3']}", ""]
    sp = speedups(throughput)
    if sp.empty:
        return out + ["**Ours**: no awq and quick rows to compare in `throughput.csv`.", ""]
    large = sp[sp.M >= LARGE_BATCH]
    for k in _ordered(sp.kernel):
        d = large[large.kernel == k]
        if d.empty:
            continue
        best = d.loc[d.speedup.idxmax()]
        out.append(f"**Ours** ({k} over awq, M >= {LARGE_BATCH}): up to **{_x(best.speedup)}** "
                   f"({int(best.M)} x {int(best.K)} x {int(best.N)}); lowest {_x(d.speedup.min())}.")
    out.append("")
    rows = []
    for (K, N, k), d in sp.groupby(["K", "N", "kernel"]):
        d = d.sort_values("M")
        lg = d[d.M >= LARGE_BATCH]
        best = lg.loc[lg.speedup.idxmax()] if len(lg) else None
        grows = d.speedup.iloc[-1] > d.speedup.iloc[0] if len(d) > 1 else None
        rows.append([f"{K} x {N}", k, _x(best.speedup) if best is not None else "n/a",
                     int(best.M) if best is not None else "n/a", f"{_x(d.speedup.iloc[0])} (M={int(d.M.iloc[0])})",
                     f"{_x(d.speedup.iloc[-1])} (M={int(d.M.iloc[-1])})",
                     "n/a" if grows is None else ("yes" if grows else "no")])
    out += [_md_table(pd.DataFrame(rows, columns=["K x N", "kernel", f"max speedup over awq, M >= {LARGE_BATCH}",
                                                  "at M", "smallest M", "largest M",
                                                  "grows with batch (largest M > smallest M)"])), ""]
    K, N = FIG3_SHAPE
    d = sp[(sp.K == K) & (sp.N == N)]
    if len(d):
        t = d.pivot_table(index="kernel", columns="M", values="speedup").map(lambda v: f"{v:.2f}")
        out += [f"Speedup over awq on M x {K} x {N}, every measured M:", "",
                _md_table(t.reset_index().rename(columns=lambda c: f"M={c}" if c != "kernel" else c)), ""]
    return out


def _report_fig3b(throughput: pd.DataFrame) -> list[str]:
    out = [f"**Paper.** {PAPER['fig3b']}", ""]
    best = best_times(throughput[throughput.kernel != "fp16"])
    rows = []
    for (K, N), d in best.groupby(["K", "N"]):
        top = d[d.M == d.M.max()]
        small = d[d.M <= SMALL_BATCH]
        for k in _ordered(d.kernel):
            tk, sk = top[top.kernel == k], small[small.kernel == k]
            r_top = tk.ratio_to_fp16.iloc[0] if len(tk) else math.nan
            rows.append([f"{K} x {N}", k,
                         f"{_f(sk.ratio_to_fp16.min())}-{_f(sk.ratio_to_fp16.max())}" if len(sk) else "n/a",
                         f"{_f(sk.pct_of_floor.max(), 0)}%" if len(sk) and "pct_of_floor" in sk else "n/a",
                         f"{_f(r_top)} (M={int(d.M.max())})",
                         "n/a" if pd.isna(r_top) else ("yes" if r_top > 1 else "no")])
    out += [f"**Ours**: time / cuBLAS fp16 (below 1 beats fp16); % of the DRAM floor = minimum bytes / measured "
            f"copy bandwidth / time, best over M <= {SMALL_BATCH}:", "",
            _md_table(pd.DataFrame(rows, columns=["K x N", "kernel", f"ratio to fp16, M <= {SMALL_BATCH}",
                                                  f"best % of DRAM floor, M <= {SMALL_BATCH}",
                                                  "ratio to fp16 at largest M", "fp16 faster at largest M"])), ""]
    return out


def _report_fig4(e2e: pd.DataFrame) -> list[str]:
    out = [f"**Paper.** {PAPER['fig4']}", ""]
    t = e2e_table(e2e)
    if "quick/awq" not in t:
        return out + ["**Ours**: `e2e.csv` has no awq and quick rows to compare.", ""]
    t = t.reset_index()
    rows = []
    for model, d in t.groupby("model", sort=False):
        best = d.loc[d["quick/awq"].idxmax()]
        layers = f"{int(best.layers)}" if "layers" in d else "n/a"
        rows.append([model, layers, _x(best["quick/awq"]), int(best.batch),
                     _x(best["quick/fp16"]) if "quick/fp16" in d else "n/a",
                     _x(d["quick/awq"].iloc[0]) + f" (batch {int(d.batch.iloc[0])})"])
    overall = t.loc[t["quick/awq"].idxmax()]
    out += [f"**Ours**: up to **{_x(overall['quick/awq'])}** decode tokens/s over awq ({overall.model}, batch "
            f"{int(overall.batch)}); tokens/s measured on the layers built (see `e2e.meta.json`).", "",
            _md_table(pd.DataFrame(rows, columns=["model", "layers measured", "max quick/awq", "at batch",
                                                  "quick/fp16 there", "quick/awq at smallest batch"])), ""]
    return out


def _report_fig5(tiles: pd.DataFrame) -> list[str]:
    out = [f"**Paper.** {PAPER['fig5']}", ""]
    rows = []
    tiles = tiles.reset_index(drop=True)
    for (K, N), d in tiles[tiles.kernel != "fp16"].groupby(["K", "N"]):
        for M, dm in d.groupby("M"):
            best = dm.loc[dm.time_us.idxmin()]
            paper = dm[(dm.kernel == "quick") & (dm.config == configs.QUICK_DEFAULT.name)]
            gain = paper.time_us.min() / best.time_us if len(paper) else math.nan
            rows.append([f"{K} x {N}", int(M), best.kernel, best.config, int(best.split_k),
                         _f(best.ratio_to_fp16), _x(gain)])
    out += ["**Ours**: the fastest measured variant per shape and batch (over every config and split-K):", "",
            _md_table(pd.DataFrame(rows, columns=["K x N", "M", "kernel", "config", "split-K", "ratio to fp16",
                                                  f"speedup over QUICK {configs.QUICK_DEFAULT.name}"])), ""]
    out += _kernel_speedups(tiles)
    q = tiles[tiles.kernel == "quick"]
    if len(q):
        tm = q.assign(tile_m=[configs.TileConfig.parse(c).tile_m for c in q.config])
        b = tm.loc[tm.groupby(["K", "N", "M"]).time_us.idxmin()]
        larger = int((b.tile_m > configs.QUICK_DEFAULT.tile_m).sum())
        out += [f"Best QUICK tile_m above the paper tile's {configs.QUICK_DEFAULT.tile_m} in {larger} of {len(b)} "
                f"(shape, M) cases.", ""]
    return out


def _kernel_speedups(tiles: pd.DataFrame) -> list[str]:
    """The paper's kernel-to-kernel claim from the tile sweep: the fastest QUICK kernel tile (the
    paper's register weight path, and any path) over the baseline in AutoAWQ's own configuration.
    No dequantize + cuBLAS here: kernel against kernel."""
    awq_cfg, awq_split = configs.AWQ_DEFAULT.name, configs.AWQ_DEFAULT_SPLIT_K
    base = tiles[(tiles.kernel == "awq") & (tiles.config == awq_cfg) & (tiles.split_k == awq_split)]
    quick = tiles[tiles.kernel == "quick"]
    if base.empty or quick.empty:
        return []
    staged = quick.config.str.endswith("_cp")
    rows = []
    for (K, N, M), b in base.groupby(["K", "N", "M"]):
        here = (quick.K == K) & (quick.N == N) & (quick.M == M)
        t = b.time_us.iloc[0]
        rows.append((f"{K} x {N}", int(M), t / quick[here & ~staged].time_us.min(), t / quick[here].time_us.min()))
    table = pd.DataFrame(rows, columns=["K x N", "M", "QUICK (register weight path)", "QUICK (any weight path)"])
    big = table[table.M >= 128]["QUICK (register weight path)"]
    shown = table.assign(**{c: table[c].map(_x) for c in table.columns[2:]})
    return [f"**Kernel against kernel** (the paper's Fig. 3 claim without the dequantize + cuBLAS path): "
            f"fastest QUICK tile over the baseline in AutoAWQ's configuration ({awq_cfg}, split-K {awq_split}); "
            f"at M >= 128 the register path ranges {big.min():.2f}x to {big.max():.2f}x.", "",
            _md_table(shown), ""]


def _report_sanitizer(san: pd.DataFrame) -> list[str]:
    if not {"tool", "findings"} <= set(san.columns):
        return ["`sanitizer.csv` has no tool / findings columns.", ""]
    t = san.groupby("tool").agg(findings=("findings", "sum"), rows=("findings", "size")).reset_index()
    if "status" in san:
        t["status"] = san.groupby("tool").status.agg(lambda s: ", ".join(sorted(set(map(str, s))))).values
    return [_md_table(t), ""]


def write_report(results_dir, figures: dict) -> Path:
    """``results_dir/REPORT.md``: each figure (relative link) beside the paper's claim and our numbers."""
    results_dir = Path(results_dir)
    data = {stem: load_csv(results_dir, stem, quiet=True) for stem in CSV_STEMS}
    meta = next((m for m in (load_meta(results_dir, s) for s in CSV_STEMS) if m), {})
    lines = [f"# Reproducing QUICK (arXiv 2402.10076) on {meta.get('gpu') or results_dir.name}", "",
             "Generated by `quick-lab reproduce` (quick_lab/figures.py). Every number under **Ours** is computed "
             "from the CSVs in this directory when the report is generated; **Paper** quotes the paper's claims.",
             ""]
    prov = []
    for stem in CSV_STEMS:
        if data[stem] is None:
            prov.append([f"{stem}.csv", "missing", "", ""])
        else:
            m = load_meta(results_dir, stem)
            prov.append([f"{stem}.csv", f"{len(data[stem])} rows", m.get("date", ""), m.get("git_commit", "")])
    lines += [_md_table(pd.DataFrame(prov, columns=["data", "rows", "measured", "commit"])), ""]

    sections = [
        ("Fig. 1: the two compute paths", ["fig1_compute_paths"], None, lambda: _report_fig1()),
        ("Fig. 2: shared-memory bank conflicts", ["fig2_bank_conflicts"], None,
         lambda: _report_fig2(data["conflicts"])),
        ("Fig. 3: kernel throughput vs batch", ["fig3_tflops_vs_batch"], "throughput",
         lambda: _report_fig3(data["throughput"])),
        ("Fig. 3b: every shape against cuBLAS fp16", ["fig3b_speedup_all_shapes"], "throughput",
         lambda: _report_fig3b(data["throughput"])),
        ("Fig. 4: end-to-end decode throughput", ["fig4_e2e"], "e2e", lambda: _report_fig4(data["e2e"])),
        ("Fig. 5: tile sizes", [n for n in figures if n.startswith("fig5_")], "tiles",
         lambda: _report_fig5(data["tiles"])),
    ]
    for title, names, stem, body in sections:
        lines += [f"## {title}", ""]
        for n in names:
            lines += _image(n, figures)
        if stem is not None and data[stem] is None:
            lines += [f"_Not drawn: `{stem}.csv` is missing._", ""]
            continue
        try:
            lines += body()
        except Exception as exc:  # a malformed CSV must not cost the rest of the report
            lines += [f"_Could not compute this section: {type(exc).__name__}: {exc}_", ""]
    lines += ["## compute-sanitizer", ""]
    lines += _report_sanitizer(data["sanitizer"]) if data["sanitizer"] is not None else \
        ["_`sanitizer.csv` is missing._", ""]
    path = results_dir / REPORT
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


# ---------------------------------------------------------------- everything


def draw_all(results_dir, out_dir=None) -> dict:
    """Draws every figure whose data exists; returns {figure name: PNG path} (SVG beside it)."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir / FIGURES
    data = {stem: load_csv(results_dir, stem, quiet=True) for stem in ("throughput", "tiles", "conflicts", "e2e")}
    jobs = [("fig1_compute_paths", lambda: fig1_compute_paths()),
            ("fig2_bank_conflicts", lambda: fig2_bank_conflicts(data["conflicts"]))]
    if data["conflicts"] is None:
        print("note: conflicts.csv missing: fig2_bank_conflicts shows the bank model only")
    if data["throughput"] is not None:
        jobs += [("fig3_tflops_vs_batch", lambda: fig3_tflops_vs_batch(data["throughput"])),
                 ("fig3b_speedup_all_shapes", lambda: fig3b_speedup_all_shapes(data["throughput"]))]
    else:
        print("note: throughput.csv missing: skipping fig3_tflops_vs_batch and fig3b_speedup_all_shapes")
    if data["e2e"] is not None and data["e2e"].get("tokens_per_s", pd.Series(dtype=float)).notna().any():
        jobs.append(("fig4_e2e", lambda: fig4_e2e(data["e2e"])))
    else:
        print("note: no e2e.csv measurements: skipping fig4_e2e")
    if data["tiles"] is not None:
        for K, N in sorted({(int(k), int(n)) for k, n in zip(data["tiles"].K, data["tiles"].N)}):
            jobs.append((f"fig5_tiles_{K}x{N}", lambda K=K, N=N: fig5_tiles(data["tiles"], K, N)))
    else:
        print("note: tiles.csv missing: skipping fig5_tiles")
    out = {}
    for name, draw in jobs:
        out[name] = save(draw(), out_dir, name)[0]
    return out


def reproduce(results_dir, out_dir=None) -> list[Path]:
    """Draws every available figure (PNG + SVG) into ``results_dir/figures`` (or ``out_dir``) and writes
    ``results_dir/REPORT.md``; returns the paths written (the report last)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {results_dir} does not exist")
    figures = draw_all(results_dir, out_dir)
    paths = [p for png in figures.values() for p in (png, png.with_suffix(".svg"))]
    return paths + [write_report(results_dir, figures)]


# ---------------------------------------------------------------- command line


def _measure(results_dir: Path) -> int:
    """Re-runs the sweeps into ``results_dir`` through the CLI; returns the first non-zero exit code."""
    from quick_lab import cli

    rc = 0
    for command in ("bench", "tiles", "conflicts", "e2e"):
        print(f"quick-lab reproduce: measuring: quick-lab {command} --out {results_dir}", flush=True)
        try:
            code = cli.main([command, "--out", str(results_dir)])
        except SystemExit as exc:  # argparse: the subcommand is not registered in this build
            code = exc.code if isinstance(exc.code, int) else 2
        if code:
            print(f"quick-lab reproduce: `{command}` exited with {code}; drawing what exists", file=sys.stderr)
            rc = rc or code
    return rc


def cmd_reproduce(args) -> int:
    rc = 0
    if args.measure:
        if _has_gpu():
            results_dir = Path(args.results) if args.results else _gpu_results_dir(RESULTS)
            rc = _measure(results_dir)
        else:
            print("no GPU: drawing from the committed data")
    try:
        results_dir = Path(args.results) if args.results else default_results_dir()
    except (FileNotFoundError, ValueError) as exc:
        print(f"quick-lab reproduce: {exc}", file=sys.stderr)
        return 2
    if not results_dir.is_dir():
        print(f"quick-lab reproduce: results directory {results_dir} does not exist "
              f"(measure with --measure on a GPU, or pass --results DIR)", file=sys.stderr)
        return 2
    for path in reproduce(results_dir):
        print(f"wrote {path}")
    return rc


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``quick-lab reproduce``."""
    p = subparsers.add_parser("reproduce", help="draw the paper's figures and REPORT.md from results/<gpu>/")
    p.add_argument("--results", metavar="DIR",
                   help="results directory (default results/<gpu-slug>; without a GPU the single results/* "
                        "directory holding a throughput.csv)")
    p.add_argument("--measure", action="store_true",
                   help="on a GPU, first re-run bench, tiles, conflicts and e2e into the results directory")
    p.set_defaults(func=cmd_reproduce)
    return p


__all__ = ["KERNEL_LABELS", "PALETTE", "PAPER", "add_parser", "best_times", "cmd_reproduce", "compute_path_traffic",
           "conflicts_long", "default_results_dir", "draw_all", "e2e_table", "fig1_compute_paths",
           "fig2_bank_conflicts", "fig3_tflops_vs_batch", "fig3b_speedup_all_shapes", "fig4_e2e", "fig5_tiles",
           "load_csv", "load_meta", "model_conflicts", "reproduce", "save", "speedups", "tile_table",
           "write_report"]

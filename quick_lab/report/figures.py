"""The paper's figures, drawn from the measured CSVs of a results directory (never from typed numbers).

Figures (seaborn / matplotlib; :func:`save` writes PNG + SVG, :func:`draw_all` every one whose data
exists into ``results/<gpu>/figures/``):

* ``fig1_compute_paths``   per-k-tile shared-memory traffic of the two compute paths
  (:func:`quick_lab.lab.bank_model.tile_traffic` for ``AWQ_DEFAULT`` and ``QUICK_DEFAULT``).
* ``fig2_bank_conflicts``  Nsight Compute vs the bank model (``conflicts.csv``; model only without it).
* ``fig3_tflops_vs_batch`` kernel TFLOPS vs batch on M x 8192 x 8192 (``throughput.csv``).
* ``fig3b_speedup_all_shapes`` time / cuBLAS fp16 vs batch for every measured shape.
* ``fig4_e2e``             decode tokens/s vs batch per model at context 128, long contexts beside
  (``e2e.csv``; estimates from fewer layers drawn hollow).
* ``fig_e2e_breakdown``    one decode step by op class, µs per layer (``e2e_breakdown.csv``).
* ``fig5_tiles_<K>x<N>``   tile-size heatmaps (``tiles.csv``).
* ``comparison_quick_over_cublas`` across GPUs (``<results root>/figures/``, :func:`draw_comparison`):
  cuBLAS fp16 time / QUICK time vs batch per shape, one line style per GPU (every ``throughput.csv``).

The tables behind them come from :mod:`quick_lab.report.results`, labels and colours from
:mod:`quick_lab.report.style`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from quick_lab.core import configs
from quick_lab.model.breakdown import OP_CLASSES
from quick_lab.model.decoder import GEMM_OPS
from quick_lab.report.results import (CONFLICT_METRICS, E2E_CONTEXT, FIGURES, best_times, breakdown_table,
                                      compute_path_traffic, conflicts_long, e2e_estimates, e2e_rows, e2e_table,
                                      load_csv, model_conflicts, speedups, tile_table)
from quick_lab.report.style import (E2E_LABELS, FIG3_MAX_BATCH, FIG3_SHAPE, KERNEL_LABELS, PALETTE,
                                    TILE_KERNEL_LABELS, count_axis, human, log2_batch_axis, log_y_ticks, ordered,
                                    pyplot, theme)


def save(fig, out_dir, stem: str) -> list[Path]:
    """Writes ``stem.png`` and ``stem.svg`` (reproducible: no date, fixed SVG ids) and closes ``fig``."""
    import matplotlib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    with matplotlib.rc_context({"svg.hashsalt": "quick_lab", "svg.fonttype": "none"}):
        fig.savefig(paths[0], dpi=130, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    pyplot().close(fig)
    return paths


# ---------------------------------------------------------------- the figures


def fig1_compute_paths(awq_cfg=None, quick_cfg=None):
    """Per block and k-tile shared-memory bytes and wavefronts by instruction class of both kernels."""
    plt, sns = pyplot(), theme()
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
    plt, sns = pyplot(), theme()
    measured = conflicts is not None
    long = conflicts_long(conflicts if measured else model_conflicts())
    groups = list(long.groupby(["K", "N", "M"]).groups)
    metrics = [m for m, _ in CONFLICT_METRICS]
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
                ax.bar_label(c, labels=[human(v) for v in c.datavalues], fontsize=7, padding=1)
            ax.set_title(f"{metric}: {M} x {K} x {N}")
            ax.set_xlabel("")
            ax.set_ylabel(f"{metric.split()[-1]} per launch (count)")
            ax.set_ylim(0, max(1.0, float(sub.value.max()) * 1.15) if len(sub) else 1.0)
            count_axis(ax)
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
    plt = pyplot()
    theme()
    shapes = sorted({(int(k), int(n)) for k, n in zip(throughput.K, throughput.N)}, key=lambda s: s[0] * s[1])
    K, N = tuple(shape) if tuple(shape) in shapes else shapes[-1]
    df = best_times(throughput[(throughput.K == K) & (throughput.N == N) & (throughput.M <= max_batch)])
    if df.empty:  # only batches above max_batch measured
        df = best_times(throughput[(throughput.K == K) & (throughput.N == N)])
    flop = 2.0 * df.M * K * N
    df = df.assign(lo=flop / (df.p90_us * 1e-6) / 1e12, hi=flop / (df.p10_us * 1e-6) / 1e12)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    for k in ordered(df.kernel):
        d = df[df.kernel == k].sort_values("M")
        ax.plot(d.M, d.tflops, marker="o", color=PALETTE.get(k), label=KERNEL_LABELS.get(k, k))
        ax.fill_between(d.M, d.lo, d.hi, color=PALETTE.get(k), alpha=0.2, linewidth=0)
    ax.set_ylabel("throughput (TFLOPS, 2·M·K·N / time)")
    ax.set_title(f"Fig. 3: W4A16 GEMM throughput vs batch, M x {K} x {N} (band: p10-p90)")
    ax.legend(fontsize=8)
    sp = speedups(df)
    for k in ordered(sp.kernel):
        d = sp[sp.kernel == k].sort_values("M")
        ax2.plot(d.M, d.speedup, marker="o", color=PALETTE.get(k), label=f"{k} / awq")
        for m, s in zip(d.M, d.speedup):
            ax2.annotate(f"{s:.2f}", (m, s), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax2.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax2.set_ylabel("speedup over awq (x)")
    ax2.set_xlabel("batch M (tokens)")
    if len(sp):
        ax2.legend(fontsize=8)
    log2_batch_axis(ax2, df.M)
    fig.tight_layout()
    return fig


def fig3b_speedup_all_shapes(throughput: pd.DataFrame):
    """time / cuBLAS fp16 vs batch for every shape (log y; below 1.0 beats fp16)."""
    sns = theme()
    pyplot()
    df = best_times(throughput[throughput.kernel != "fp16"])
    df = df.assign(shape=[f"K={k} N={n}" for k, n in zip(df.K, df.N)])
    order = [f"K={k} N={n}" for k, n in sorted({(int(k), int(n)) for k, n in zip(df.K, df.N)})]
    kernels = ordered(df.kernel)
    g = sns.relplot(df, x="M", y="ratio_to_fp16", hue="kernel", hue_order=kernels, col="shape", col_order=order,
                    col_wrap=min(3, len(order)), kind="line", marker="o", palette=PALETTE,
                    height=3.3, aspect=1.25, facet_kws={"sharey": True, "sharex": False})
    for ax in g.axes.flat:
        ax.set_yscale("log")
        log_y_ticks(ax, list(df.ratio_to_fp16) + [1.0])
        ax.grid(True, axis="y", which="major")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.text(0.02, 1.0, "cuBLAS fp16", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7)
        shape = ax.get_title().split("= ", 1)[-1]
        log2_batch_axis(ax, df[df["shape"] == shape].M if shape in order else df.M)
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


ESTIMATE_LABEL = "hollow / hatched: estimate (measured on fewer layers, scaled to full depth)"


def _estimated_depths(rows: pd.DataFrame) -> str:
    """'fp16 from 20 layers' per backend of ``rows`` (one model) measured below full depth; '' when none."""
    est = rows[rows.estimate]
    return ", ".join(f"{b} from {'/'.join(str(int(n)) for n in sorted(set(est[est.backend == b].layers)))} layers"
                     for b in ordered(est.backend))


def _long_context_bars(ax, rows: pd.DataFrame):
    """Grouped bars of full-depth tokens/s per (context, batch) and backend; hatched where estimated."""
    cases = sorted({(int(c), int(b)) for c, b in zip(rows.context, rows.batch)})
    backends = ordered(rows.backend)
    width = 0.8 / len(backends)
    for j, b in enumerate(backends):
        for i, (c, m) in enumerate(cases):
            r = rows[(rows.backend == b) & (rows.context == c) & (rows.batch == m)]
            if r.empty:
                continue
            v, est = float(r.full_depth_tokens_per_s.iloc[0]), bool(r.estimate.iloc[0])
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, v, width, color="white" if est else PALETTE.get(b), edgecolor=PALETTE.get(b),
                   hatch="//" if est else None, linewidth=1.2)
            ax.annotate(f"{v:.0f}", (x, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"context {c}\nbatch {m}" for c, m in cases], fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("long context: cache filled, decode only", fontsize=9)


def fig4_e2e(e2e: pd.DataFrame):
    """Decode tokens/s vs batch per model and backend at the paper's context (:data:`E2E_CONTEXT`: a
    128-token prompt, 128 decode steps; top), QUICK / AWQ and QUICK / fp16 (middle) and, when the CSV
    has rows at other contexts, their tokens/s as bars (bottom). Every number is the full-depth one
    (``full_depth_tokens_per_s_estimate``; ``tokens_per_s`` in files without it): a point measured on
    fewer layers than the model has (``layers < full_layers``) is drawn hollow (a bar hatched) and the
    legend says it is an estimate. An old ``e2e.csv`` without ``context`` / ``full_layers`` draws as
    context = its prefill and full depth = the layers built (:func:`quick_lab.report.results.e2e_rows`)."""
    plt = pyplot()
    theme()
    from matplotlib.lines import Line2D

    rows = e2e_rows(e2e)
    models = list(dict.fromkeys(rows.model))
    paper, long = rows[rows.context == E2E_CONTEXT], rows[rows.context != E2E_CONTEXT]
    n_rows = 3 if len(long) else 2
    fig, axes = plt.subplots(n_rows, len(models), figsize=(5 * len(models), 7 + 2.8 * (n_rows - 2)), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1, 1.3][:n_rows]})
    any_estimate = bool(rows.estimate.any())
    for j, model in enumerate(models):
        d, ax, ax2 = paper[paper.model == model], axes[0, j], axes[1, j]
        full = "/".join(str(int(n)) for n in sorted(set(rows[rows.model == model].full_layers)))
        depths = _estimated_depths(rows[rows.model == model])
        ax.set_title(f"{model} ({full} layers)" + (f"\nestimates: {depths}" if depths else ""), fontsize=10)
        if d.empty:
            ax.text(0.5, 0.5, f"no context-{E2E_CONTEXT} rows", transform=ax.transAxes, ha="center")
            ax2.set_visible(False)
        else:
            for b in ordered(d.backend):
                s = d[d.backend == b].sort_values("batch")
                ax.plot(s.batch, s.full_depth_tokens_per_s, color=PALETTE.get(b), label=E2E_LABELS.get(b, b))
                for est, marker_face in ((False, PALETTE.get(b)), (True, "white")):
                    m = s[s.estimate == est]
                    ax.plot(m.batch, m.full_depth_tokens_per_s, linestyle="", marker="o", markersize=6,
                            markerfacecolor=marker_face, markeredgecolor=PALETTE.get(b), markeredgewidth=1.4)
            ax.set_yscale("log")
            log_y_ticks(ax, d.full_depth_tokens_per_s)
            log2_batch_axis(ax, d.batch)
            handles, labels = ax.get_legend_handles_labels()
            if d.estimate.any():
                handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="white",
                                      markeredgecolor="black", markeredgewidth=1.4))
                labels.append("hollow: estimate (scaled to full depth)")
            ax.legend(handles, labels, fontsize=8)
            t = e2e_table(d).reset_index()
            est = e2e_estimates(d).reset_index()
            for col, color in (("quick/awq", PALETTE["quick"]), ("quick/fp16", PALETTE["fp16"])):
                if col not in t:
                    continue
                other = col.split("/")[1]
                hollow = est["quick"] | est[other]
                ax2.plot(t.batch, t[col], color=color, label=col)
                for face, sel in ((color, ~hollow), ("white", hollow)):
                    ax2.plot(t.batch[sel], t[col][sel], linestyle="", marker="o", markerfacecolor=face,
                             markeredgecolor=color, markeredgewidth=1.4)
                for b, v in zip(t.batch, t[col]):
                    if pd.notna(v):
                        ax2.annotate(f"{v:.2f}", (b, v), textcoords="offset points", xytext=(0, 5), ha="center",
                                     fontsize=7)
            ax2.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
            ax2.set_ylabel("tokens/s ratio (x)")
            ax2.set_xlabel("batch (sequences)")
            log2_batch_axis(ax2, d.batch)
            if ax2.get_legend_handles_labels()[0]:
                ax2.legend(fontsize=8)
        ax.set_ylabel("decode throughput (tokens/s)")
        if n_rows == 3:
            lm = long[long.model == model]
            if lm.empty:
                axes[2, j].set_visible(False)
            else:
                _long_context_bars(axes[2, j], lm)
    if n_rows == 3:  # one legend for the bar panels: backends, and the hatch meaning when used
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=PALETTE.get(b), label=E2E_LABELS.get(b, b)) for b in ordered(long.backend)]
        if long.estimate.any():
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="hatched: estimate"))
        visible = [ax for ax in axes[2] if ax.get_visible()]
        visible[0].legend(handles=handles, fontsize=7)
    steps = "/".join(str(int(v)) for v in sorted(set(paper.decode))) if "decode" in paper and len(paper) else "?"
    fig.suptitle(f"Fig. 4: end-to-end decode throughput vs batch at context {E2E_CONTEXT} (prompt {E2E_CONTEXT}, "
                 f"{steps} decode steps; same int4 weights per backend), full-depth tokens/s"
                 + (f"\n{ESTIMATE_LABEL}" if any_estimate else ""), fontsize=11)
    fig.tight_layout()
    return fig


def fig_e2e_breakdown(breakdown: pd.DataFrame):
    """One decode step by op class (``e2e_breakdown.csv``): per model, stacked bars of µs per layer for
    each (backend, batch, context): the GEMM classes (blues) at the bottom, then the rest (oranges);
    the whole step per layer (``layer``) marked by a black bar across each stack (above the stack: time
    the classes alone do not account for, e.g. launch gaps)."""
    plt, sns = pyplot(), theme()
    t = breakdown_table(breakdown).reset_index()
    models = list(dict.fromkeys(t.model))
    gemm = [c for c in GEMM_OPS if c in t]
    rest = [c for c in OP_CLASSES if c in t and c not in GEMM_OPS]
    colors = dict(zip(gemm, sns.color_palette("Blues", len(gemm) + 1)[1:]))
    colors.update(zip(rest, sns.color_palette("Oranges", len(rest) + 1)[1:]))
    widest = max(len(t[t.model == m]) for m in models)
    fig, axes = plt.subplots(len(models), 1, figsize=(max(7.0, 3 + 0.55 * widest * 1.3), 4.2 * len(models)),
                             squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        d = t[t.model == model]
        groups = sorted({(int(c), int(b)) for c, b in zip(d.context, d.batch)})
        backends = ordered(d.backend)
        xs, labels = [], []
        for gi, (c, m) in enumerate(groups):
            for bj, b in enumerate(backends):
                r = d[(d.context == c) & (d.batch == m) & (d.backend == b)]
                if r.empty:
                    continue
                r = r.iloc[0]
                x = gi * (len(backends) + 1) + bj
                bottom = 0.0
                for op in gemm + rest:
                    v = float(r[op]) if pd.notna(r[op]) else 0.0
                    ax.bar(x, v, 0.8, bottom=bottom, color=colors[op], label=op if not xs else None)
                    bottom += v
                if "layer" in r and pd.notna(r["layer"]):
                    ax.hlines(r["layer"], x - 0.45, x + 0.45, color="black", linewidth=2.2,
                              label="whole layer (one step)" if not xs else None)
                    ax.annotate(f"{r['layer']:.0f}", (x, max(r["layer"], bottom)), textcoords="offset points",
                                xytext=(0, 3), ha="center", fontsize=7)
                xs.append(x)
                labels.append(f"{b}\nM={m}\nctx {c}")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        layers = "/".join(str(int(n)) for n in sorted(set(d.layers)))
        ax.set_title(f"{model}: one decode step per layer by op class ({layers} layers built)", fontsize=10)
        ax.set_ylabel("µs per layer")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("End-to-end decode step by op class (GEMM classes blue, the rest orange; black: whole layer)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def fig5_tiles(tiles: pd.DataFrame, K: int, N: int):
    """Heatmaps of the best (over split-K) time / cuBLAS fp16 per tile config (rows) and batch (columns)
    for each kernel on one shape; the fastest config of each column is boxed. The dequant + cuBLAS
    fallback, when measured, is the last row of the QUICK panel (it is QUICK's large-batch path)."""
    plt, sns = pyplot(), theme()
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


def fig_gpu_comparison(kernels: pd.DataFrame):
    """QUICK (dispatched) speedup over cuBLAS fp16 (cuBLAS time / QUICK time) vs batch, one panel per
    shape and one line style per GPU, from :func:`quick_lab.report.results.shared_cases` of
    :func:`quick_lab.report.results.quick_vs_cublas` (columns gpu, K, N, M, quick_us, fp16_us)."""
    plt, sns = pyplot(), theme()
    df = kernels.assign(speedup=kernels.fp16_us / kernels.quick_us)
    shapes = sorted({(int(k), int(n)) for k, n in zip(df.K, df.N)})
    gpus = list(dict.fromkeys(df.gpu))
    cols = min(3, len(shapes))
    rows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    colors = dict(zip(gpus, sns.color_palette("colorblind", len(gpus))))
    styles = dict(zip(gpus, [(ls, mk) for ls, mk in zip(["-", "--", ":", "-."] * 4, "osD^v<>ph*" * 2)]))
    for ax, (K, N) in zip(axes.flat, shapes):
        d = df[(df.K == K) & (df.N == N)]
        for gpu in gpus:
            g = d[d.gpu == gpu].sort_values("M")
            ls, mk = styles[gpu]
            ax.plot(g.M, g.speedup, linestyle=ls, marker=mk, color=colors[gpu], label=gpu)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, max(1.2, float(d.speedup.max()) * 1.1))
        log2_batch_axis(ax, d.M)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        ax.set_title(f"M x {K} x {N}")
        ax.set_xlabel("batch M (tokens)")
        ax.set_ylabel("cuBLAS fp16 time / QUICK time")
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(gpus), bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle("QUICK (dispatched) speedup over cuBLAS fp16 vs batch, per GPU (above 1: QUICK faster)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


# ---------------------------------------------------------------- every figure


def draw_all(results_dir, out_dir=None) -> dict:
    """Draws every figure whose data exists; returns {figure name: PNG path} (SVG beside it)."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir / FIGURES
    data = {stem: load_csv(results_dir, stem, quiet=True)
            for stem in ("throughput", "tiles", "conflicts", "e2e", "e2e_breakdown")}
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
    if data["e2e_breakdown"] is not None:
        jobs.append(("fig_e2e_breakdown", lambda: fig_e2e_breakdown(data["e2e_breakdown"])))
    else:
        print("note: e2e_breakdown.csv missing: skipping fig_e2e_breakdown")
    if data["tiles"] is not None:
        for K, N in sorted({(int(k), int(n)) for k, n in zip(data["tiles"].K, data["tiles"].N)}):
            jobs.append((f"fig5_tiles_{K}x{N}", lambda K=K, N=N: fig5_tiles(data["tiles"], K, N)))
    else:
        print("note: tiles.csv missing: skipping fig5_tiles")
    out = {}
    for name, draw in jobs:
        out[name] = save(draw(), out_dir, name)[0]
    return out


def draw_comparison(kernels: pd.DataFrame, out_dir) -> dict:
    """``comparison_quick_over_cublas`` into ``out_dir`` when ``kernels`` (the shared cases of
    :func:`quick_lab.report.results.quick_vs_cublas`) holds two GPUs or more; {} (nothing drawn) with
    fewer. Returns {figure name: PNG path} (SVG beside it)."""
    if kernels.empty or kernels.gpu.nunique() < 2:
        return {}
    name = "comparison_quick_over_cublas"
    return {name: save(fig_gpu_comparison(kernels), out_dir, name)[0]}



__all__ = ["draw_all", "draw_comparison", "fig1_compute_paths", "fig2_bank_conflicts", "fig3_tflops_vs_batch",
           "fig3b_speedup_all_shapes", "fig4_e2e", "fig5_tiles", "fig_e2e_breakdown", "fig_gpu_comparison", "save"]

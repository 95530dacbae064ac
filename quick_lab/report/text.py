"""``REPORT.md``: each figure of :mod:`quick_lab.report.figures` beside the paper's claim
(:data:`quick_lab.report.style.PAPER`) and our numbers, computed from the CSVs of the results
directory when the report is written (never typed in).

:func:`write_report` assembles it: a provenance table (rows, date and commit of each CSV), one
section per figure (``_report_fig1`` .. ``_report_fig5``, and ``_report_e2e_breakdown`` after Fig. 4; a
section whose CSV is missing says so, one that cannot be computed says why without costing the rest) and
the compute-sanitizer summary.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from quick_lab.core import configs
from quick_lab.lab import bank_model
from quick_lab.model.decoder import GEMM_OPS
from quick_lab.report.results import (CONFLICT_METRICS, CSV_STEMS, E2E_CONTEXT, FIGURES, REPORT, best_times,
                                      breakdown_table, compute_path_traffic, e2e_estimates, e2e_rows, e2e_table,
                                      load_csv, load_meta, model_conflicts, speedups)
from quick_lab.report.style import FIG3_SHAPE, LARGE_BATCH, PAPER, SMALL_BATCH, ordered


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
        for _, m in CONFLICT_METRICS:
            model = r.get(f"model:{m}")
            meas = r.get(m)
            if conflicts is not None and meas is not None and not pd.isna(meas):
                row.append(f"{int(meas):,} ({int(model):,})" if model is not None and not pd.isna(model)
                           else f"{int(meas):,}")
            else:
                row.append(f"{int(model):,}" if model is not None and not pd.isna(model) else "n/a")
        rows.append(row)
    out += [f"**Ours**, {src}:", "",
            _md_table(pd.DataFrame(rows, columns=["M x K x N", "kernel", "config"] + [m for m, _ in CONFLICT_METRICS])),
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
    for k in ordered(sp.kernel):
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
        for k in ordered(d.kernel):
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


ESTIMATE_MARK = "est."  # beside a full-depth number scaled from fewer layers (layers < full_layers)


def _e2e_cases_table(rows: pd.DataFrame, with_context: bool) -> pd.DataFrame:
    """One markdown row per (model[, context], batch): full-depth tokens/s per backend and the QUICK
    ratios, each marked :data:`ESTIMATE_MARK` where it rests on a row measured below full depth."""
    t, est = e2e_table(rows), e2e_estimates(rows)
    backends = ordered(est.columns)
    ratios = [r for r in ("quick/awq", "quick/fp16") if r in t]
    out = []
    for key in t.index:
        model, context, batch = key
        cells = [model] + ([int(context)] if with_context else []) + [int(batch)]
        for b in backends:
            v = t.loc[key, b]
            cells.append("n/a" if pd.isna(v) else f"{v:.0f}" + (f" {ESTIMATE_MARK}" if est.loc[key, b] else ""))
        for ratio in ratios:
            v, other = t.loc[key, ratio], ratio.split("/")[1]
            marked = pd.notna(v) and bool(est.loc[key, "quick"] or est.loc[key, other])
            cells.append(_x(v) + (f" {ESTIMATE_MARK}" if marked else ""))
        out.append(cells)
    columns = ["model"] + (["context"] if with_context else []) + ["batch"] + [f"{b} tokens/s" for b in backends]
    return pd.DataFrame(out, columns=columns + ratios)


def _report_fig4(e2e: pd.DataFrame) -> list[str]:
    out = [f"**Paper.** {PAPER['fig4']}", ""]
    rows = e2e_rows(e2e)
    paper, long = rows[rows.context == E2E_CONTEXT], rows[rows.context != E2E_CONTEXT]
    t = e2e_table(paper)
    if "quick/awq" in t and t["quick/awq"].notna().any():
        est = e2e_estimates(paper)
        d = t.reset_index()
        overall = d.loc[d["quick/awq"].idxmax()]
        key = (overall.model, overall.context, overall.batch)
        scaled = bool(est.loc[key, "quick"] or est.loc[key, "awq"])
        out += [f"**Ours**: up to **{_x(overall['quick/awq'])}** decode tokens/s over awq ({overall.model}, batch "
                f"{int(overall.batch)}, context {E2E_CONTEXT}{', an estimate' if scaled else ''}); full-depth "
                f"tokens/s (`full_depth_tokens_per_s_estimate`; see `e2e.meta.json`).", ""]
        summary = []
        for model, m in d.groupby("model", sort=False):
            best = m.loc[m["quick/awq"].idxmax()]
            mr = paper[paper.model == model]
            depth = ", ".join(f"{b} {'/'.join(str(int(n)) for n in sorted(set(mr[mr.backend == b].layers)))}"
                              for b in ordered(mr.backend))
            summary.append([model, int(mr.full_layers.max()), depth, _x(best["quick/awq"]), int(best.batch),
                            _x(best["quick/fp16"]) if "quick/fp16" in m else "n/a",
                            _x(m["quick/awq"].iloc[0]) + f" (batch {int(m.batch.iloc[0])})"])
        out += [_md_table(pd.DataFrame(summary, columns=["model", "layers", "layers measured per backend",
                                                         "max quick/awq", "at batch", "quick/fp16 there",
                                                         "quick/awq at smallest batch"])), ""]
    elif paper.empty:
        out += [f"**Ours**: `e2e.csv` has no rows at context {E2E_CONTEXT}.", ""]
    else:
        out += ["**Ours**: `e2e.csv` has no awq and quick rows to compare.", ""]
    note = (f"`{ESTIMATE_MARK}`: that backend was built with fewer layers than the model has (`layers < "
            f"full_layers`: the model did not fit the GPU at full depth, or the sweep capped the depth) and its "
            f"decode time per layer scaled to the full depth, "
            f"(decode - lm_head) x full_layers / layers + lm_head; a ratio is marked when either side is.")
    if len(paper):
        out += [f"Decode tokens/s at context {E2E_CONTEXT} (prompt {E2E_CONTEXT}, then the decode steps), full depth. "
                + (note if paper.estimate.any() else "Every number measured at full depth."), "",
                _md_table(_e2e_cases_table(paper, with_context=False)), ""]
    if len(long):
        out += ["Decode tokens/s at longer contexts (the KV cache filled with random K/V up to the context, then "
                "the decode steps; prefill not timed), full depth."
                + (" " + note if long.estimate.any() and not paper.estimate.any() else ""), "",
                _md_table(_e2e_cases_table(long, with_context=True)), ""]
    return out


def _report_e2e_breakdown(breakdown: pd.DataFrame) -> list[str]:
    t = breakdown_table(breakdown)
    wide = t.reset_index()
    ops = ["layer", "gemm", "other"] + [c for c in t.columns if c not in ("layer", "gemm", "other")]
    ops = [c for c in ops if c in wide]
    out = [f"One decode step by op class, µs per layer (`e2e_breakdown.csv`, `quick-lab e2e --breakdown`): each "
           f"class's ops of every layer back to back in one CUDA graph, divided by the layers built; `layer` is "
           f"the whole step, `gemm` = {' + '.join(GEMM_OPS)}, `other` = layer - gemm (the non-GEMM time as it "
           f"shows in the step, launch gaps included)."
           + (" RoPE and the KV-cache write run inside the attention launch in a decode step: `rope_kv` is 0."
              if "rope_kv" in wide and (wide.rope_kv == 0).all() else "")
           + (" On the quick backend SiLU x up runs in the decode GEMM's writer (`silu_mul` 0, inside `gate_up`),"
              " and where the decode GEMMs leave their split-K slices to their readers (the attention after"
              " `qkv`, the norms after `o` and `down`) the sums are in `attention` and `norm`."
              if "silu_mul" in wide and (wide[wide.backend == "quick"].silu_mul == 0).any() else ""), ""]
    lines = []
    for model, m in wide.groupby("model", sort=False):
        parts = []
        for b in ordered(m.backend):
            at = []
            for batch in (1, SMALL_BATCH):
                r = m[(m.backend == b) & (m.batch == batch) & (m.context == E2E_CONTEXT)]
                if r.empty:
                    at.append(f"not measured at batch {batch}")
                else:
                    r = r.iloc[0]
                    share = f" ({100 * r.other / r.layer:.0f}% of the layer)" if r.layer > 0 else ""
                    at.append(f"{r.other:.1f} µs at batch {batch}{share}")
            parts.append(f"{b} " + ", ".join(at))
        lines.append(f"- {model}: " + "; ".join(parts) + ".")
    out += [f"**Non-GEMM time per layer** (`other`), context {E2E_CONTEXT}:", "", *lines, ""]
    shown = wide[["model", "backend", "batch", "context", "layers"] + ops]
    shown = shown.assign(**{c: shown[c].map(lambda v: _f(v, 1)) for c in ops})
    return out + [_md_table(shown), ""]


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
             "Generated by `quick-lab reproduce` (quick_lab/report/text.py). Every number under **Ours** is computed "
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
        ("End to end: one decode step by op class", ["fig_e2e_breakdown"], "e2e_breakdown",
         lambda: _report_e2e_breakdown(data["e2e_breakdown"])),
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


__all__ = ["write_report"]

"""The end-to-end part of ``REPORT.md`` and its figures (CPU only): ``fig4_e2e`` and the Fig. 4 tables from
``e2e.csv`` in the current layout (``context``, ``full_layers``, full-depth estimates), older layouts, and
``fig_e2e_breakdown`` with its section from ``e2e_breakdown.csv``.

The CSVs are synthetic (random timings in the exact columns ``quick_lab.model.sweep`` and
``quick_lab.model.breakdown`` write), in a temporary results root ($QUICK_LAB_RESULTS_ROOT); the
committed H100 ``e2e.csv`` (the oldest layout still committed) is copied there for the old-format check.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from markdown_tables import md_tables
from quick_lab import cli
from quick_lab.build import paths
from quick_lab.model.breakdown import OP_CLASSES
from quick_lab.model.decoder import GEMM_OPS
from quick_lab.report import figures, results, style, text
from quick_lab.report.reproduce import reproduce

REPO = Path(__file__).resolve().parents[1]
# An e2e.csv in the layout written before context and full depth (no context column, 4 of full_layers
# layers built): the H100's, as committed at 1a85724, kept as a fixture once results/ moved on.
OLD_LAYOUT_E2E = REPO / "tests" / "data" / "e2e_old_layout.csv"
GPU = "synthetic-gpu"
BACKENDS = ("fp16", "awq", "quick")
BATCHES = (1, 16, 64)
LONG_CONTEXT, LONG_BATCHES = 4096, (1, 16)
E2E_COLUMNS = ["model", "layers", "full_layers", "batch", "backend", "prefill", "decode", "context", "prefill_timed",
               "cuda_graph", "lm_head", "prefill_ms", "decode_ms", "lm_head_ms", "tokens_per_s",
               "full_depth_tokens_per_s_estimate", "error"]
# (model, full depth, {(backend, batch or None for every batch): layers built}) -- where a backend did not fit
DEPTHS = (("mistral-7b", 32, {}),
          ("llama2-13b", 40, {("fp16", 64): 36}),
          ("llama2-70b", 80, {("fp16", None): 20}))


def e2e_frame(seed: int = 0) -> pd.DataFrame:
    """e2e.csv as ``quick-lab e2e --long-context 4096`` writes it: random timings, full depth except where
    DEPTHS says, tokens/s and the full-depth estimate derived as decode_throughput derives them; one
    failed (out of memory) case."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, full, cut in DEPTHS:
        cases = [(b, 128, False) for b in BATCHES] + [(b, LONG_CONTEXT, True) for b in LONG_BATCHES]
        for batch, context, fill in cases:
            for backend in BACKENDS:
                layers = cut.get((backend, batch), cut.get((backend, None), full))
                head_ms = rng.uniform(5, 20)
                decode_ms = head_ms + layers * rng.uniform(2, 40)
                full_ms = (decode_ms - head_ms) * full / layers + head_ms
                rows.append(dict(model=model, layers=layers, full_layers=full, batch=batch, backend=backend,
                                 prefill=context, decode=128, context=context, prefill_timed=not fill,
                                 cuda_graph=True, lm_head=True,
                                 prefill_ms=np.nan if fill else rng.uniform(1, 50), decode_ms=decode_ms,
                                 lm_head_ms=head_ms, tokens_per_s=batch * 128 / (decode_ms * 1e-3),
                                 full_depth_tokens_per_s_estimate=batch * 128 / (full_ms * 1e-3), error=np.nan))
    rows.append(dict(model="llama2-70b", layers=20, full_layers=80, batch=256, backend="fp16", prefill=128,
                     decode=128, context=128, error="Out of memory allocating 1 bytes"))
    return pd.DataFrame(rows, columns=E2E_COLUMNS)


def breakdown_frame(seed: int = 0, rope_kv_zero: bool = True) -> pd.DataFrame:
    """e2e_breakdown.csv as ``quick-lab e2e --breakdown`` writes it: random µs per op class, ``layer`` the
    classes' sum plus a random gap (launch gaps), ``gemm`` the GEMM classes' sum, ``other`` = layer - gemm."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, layers in (("mistral-7b", 32), ("llama2-13b", 40)):
        for backend in BACKENDS:
            for batch, context in [(b, 128) for b in (1, 16)] + [(1, LONG_CONTEXT)]:
                us = {op: rng.uniform(1, 90) for op in OP_CLASSES}
                if rope_kv_zero:
                    us["rope_kv"] = 0.0
                us["layer"] = sum(us.values()) + rng.uniform(0, 15)
                us["gemm"] = sum(us[op] for op in GEMM_OPS)
                us["other"] = us["layer"] - us["gemm"]
                rows += [dict(model=model, layers=layers, backend=backend, batch=batch, context=context, op=op,
                              us_per_layer=v) for op, v in us.items()]
    return pd.DataFrame(rows)


def write_gpu_dir(root: Path, frames: dict) -> Path:
    d = root / GPU
    d.mkdir(parents=True, exist_ok=True)
    for stem, df in frames.items():
        df.to_csv(d / f"{stem}.csv", index=False)
        (d / f"{stem}.meta.json").write_text(json.dumps({"gpu": "Synthetic GPU", "date": "2000-01-01",
                                                         "git_commit": "synthetic"}))
    return d


def reproduce_root(root: Path, monkeypatch) -> str:
    """``quick-lab reproduce`` over the results root ``root``; returns its stdout."""
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(root))
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["reproduce"]) == 0
    return out.getvalue()


def section(report: str, title: str) -> str:
    start = report.index(f"## {title}")
    end = report.find("\n## ", start + 1)
    return report[start:end if end >= 0 else None]


@pytest.fixture(scope="module")
def new_format(tmp_path_factory):
    """reproduce over one GPU directory with the new e2e.csv and e2e_breakdown.csv: (dir, stdout, e2e, breakdown)."""
    root = tmp_path_factory.mktemp("results")
    e2e, bd = e2e_frame(), breakdown_frame()
    d = write_gpu_dir(root, {"e2e": e2e, "e2e_breakdown": bd})
    with pytest.MonkeyPatch.context() as mp:
        out = reproduce_root(root, mp)
    return d, out, e2e, bd


# ---------------------------------------------------------------- Fig. 4 tables in REPORT.md


def test_e2e_tables_mark_estimates_exactly_where_layers_below_full_depth(new_format):
    d, _, e2e, _ = new_format
    report = (d / "REPORT.md").read_text()
    fig4 = section(report, "Fig. 4")
    assert "Could not compute" not in report
    ok = e2e.dropna(subset=["tokens_per_s"]).set_index(["model", "context", "batch", "backend"])
    tables = [t for t in md_tables(fig4) if "quick tokens/s" in t.columns]
    paper = next(t for t in tables if "context" not in t.columns)
    long = next(t for t in tables if "context" in t.columns)
    assert len(paper) == len(DEPTHS) * len(BATCHES)  # context 128 only: the long rows are not mixed in
    assert len(long) == len(DEPTHS) * len(LONG_BATCHES) and set(long.context) == {str(LONG_CONTEXT)}
    marks = 0
    for table, fixed_context in ((paper, 128), (long, None)):
        for row in table.to_dict("records"):
            context = fixed_context or int(row["context"])
            key = (row["model"], context, int(row["batch"]))
            est = {}
            for b in BACKENDS:
                r = ok.loc[key + (b,)]
                est[b] = bool(r.layers < r.full_layers)
                assert row[f"{b} tokens/s"] == f"{r.full_depth_tokens_per_s_estimate:.0f}" + (" est." if est[b] else "")
                marks += est[b]
            for other in ("awq", "fp16"):
                ratio = ok.loc[key + ("quick",)].full_depth_tokens_per_s_estimate / \
                    ok.loc[key + (other,)].full_depth_tokens_per_s_estimate
                marked = est["quick"] or est[other]
                assert row[f"quick/{other}"] == f"{ratio:.2f}x" + (" est." if marked else "")
    # 70B fp16 at every batch and context (5 cases), 13B fp16 at batch 64: the only cut rows
    assert marks == 6 == int((ok.layers < ok.full_layers).sum())


def test_e2e_headline_is_the_largest_full_depth_ratio(new_format):
    d, _, e2e, _ = new_format
    ok = e2e.dropna(subset=["tokens_per_s"])
    t = ok[ok.context == 128].pivot_table(index=["model", "batch"], columns="backend",
                                          values="full_depth_tokens_per_s_estimate")
    best = (t.quick / t.awq).max()
    assert f"up to **{best:.2f}x** decode tokens/s over awq" in (d / "REPORT.md").read_text()


def test_old_layout_without_full_layers_has_no_estimates(tmp_path):
    """The oldest layout (no context, full_layers or full-depth column): context = prefill, measured depth."""
    old = e2e_frame().drop(columns=["context", "full_layers", "full_depth_tokens_per_s_estimate", "prefill_timed"])
    rows = results.e2e_rows(old)
    assert not rows.estimate.any()
    assert (rows.full_depth_tokens_per_s == rows.tokens_per_s).all()
    assert set(rows.context) == {128, LONG_CONTEXT}
    report = "\n".join(text._report_fig4(old))
    assert "est." not in report


# ---------------------------------------------------------------- fig4_e2e


def _marker_points(ax, hollow: bool) -> set:
    pts = set()
    for line in ax.lines:
        if line.get_linestyle() != "None" or line.get_marker() in (None, "None", ""):
            continue
        if (line.get_markerfacecolor() == "white") == hollow:
            pts |= {(int(x), round(float(y), 6)) for x, y in zip(line.get_xdata(), line.get_ydata())}
    return pts


def test_fig4_draws_estimates_hollow_and_keeps_long_context_apart():
    e2e = e2e_frame()
    fig = figures.fig4_e2e(e2e)
    ok = e2e.dropna(subset=["tokens_per_s"])
    models = list(dict.fromkeys(ok.model))
    axes = np.array(fig.axes).reshape(3, len(models))  # batch curves, ratios, long-context bars
    for j, model in enumerate(models):
        top = axes[0, j]
        m = ok[(ok.model == model) & (ok.context == 128)]
        want = {est: {(int(b), round(float(v), 6)) for b, v in zip(g.batch, g.full_depth_tokens_per_s_estimate)}
                for est, g in m.groupby(m.layers < m.full_layers)}
        assert _marker_points(top, hollow=True) == want.get(True, set())
        assert _marker_points(top, hollow=False) == want.get(False, set())
        legend = [t.get_text() for t in top.get_legend().get_texts()]
        assert any("estimate" in t for t in legend) == (model != "mistral-7b")
        assert ("estimates:" in top.get_title()) == (model != "mistral-7b")
        long = ok[(ok.model == model) & (ok.context != 128)]
        bars = [p for p in axes[2, j].patches if p.get_height() > 0]
        assert len(bars) == len(long)
        assert sorted(round(p.get_height(), 6) for p in bars) == \
            sorted(round(v, 6) for v in long.full_depth_tokens_per_s_estimate)
        assert sum(p.get_hatch() == "//" for p in bars) == int((long.layers < long.full_layers).sum())
    assert "estimate" in fig._suptitle.get_text()
    style.pyplot().close(fig)


def test_fig4_without_long_context_has_two_rows():
    e2e = e2e_frame()
    fig = figures.fig4_e2e(e2e[e2e.context == 128])
    assert len(fig.axes) == 2 * len(DEPTHS)
    style.pyplot().close(fig)


def test_old_layout_e2e_csv_still_draws_and_reports(tmp_path, monkeypatch):
    """An e2e.csv of the old layout (no context column, 4 of full_layers layers built) through quick-lab
    reproduce: fig4 drawn, every number marked an estimate, no breakdown (with a note)."""
    d = tmp_path / "results" / "h100-80gb-hbm3"
    d.mkdir(parents=True)
    shutil.copy(OLD_LAYOUT_E2E, d / "e2e.csv")
    old = pd.read_csv(OLD_LAYOUT_E2E)
    assert "context" not in old and (old.layers < old.full_layers).all()  # what this test is about
    out = reproduce_root(tmp_path / "results", monkeypatch)
    for ext in ("png", "svg"):
        f = d / "figures" / f"fig4_e2e.{ext}"
        assert f.is_file() and f.stat().st_size > 10_000
    assert not (d / "figures" / "fig_e2e_breakdown.png").exists()
    assert "e2e_breakdown.csv missing: skipping fig_e2e_breakdown" in out
    report = (d / "REPORT.md").read_text()
    assert "Could not compute" not in report
    paper = next(t for t in md_tables(section(report, "Fig. 4")) if "quick tokens/s" in t.columns)
    assert len(paper) == old.dropna(subset=["tokens_per_s"]).groupby(["model", "batch"]).ngroups
    assert paper["quick tokens/s"].str.endswith(" est.").all()
    assert "_Not drawn: `e2e_breakdown.csv` is missing._" in section(report, "End to end: one decode step")


# ---------------------------------------------------------------- the decode-step breakdown


def test_breakdown_table_other_is_layer_minus_gemm_of_the_csv(new_format):
    d, _, _, bd = new_format
    csv = bd.pivot_table(index=["model", "backend", "batch", "context"], columns="op", values="us_per_layer")
    report = (d / "REPORT.md").read_text()
    sec = section(report, "End to end: one decode step by op class")
    assert "](figures/fig_e2e_breakdown.png)" in sec
    table = next(t for t in md_tables(sec) if "other" in t.columns)
    assert len(table) == len(csv)
    assert list(table.columns[:8]) == ["model", "backend", "batch", "context", "layers", "layer", "gemm", "other"]
    for row in table.to_dict("records"):
        r = csv.loc[(row["model"], row["backend"], int(row["batch"]), int(row["context"]))]
        assert row["other"] == f"{r.layer - r.gemm:.1f}"
        for op in ("layer", "gemm", *OP_CLASSES):
            assert row[op] == f"{r[op]:.1f}", op
    wide = results.breakdown_table(bd)
    assert np.allclose(wide.other, wide.layer - wide.gemm)
    assert np.allclose(wide.gemm, wide[list(GEMM_OPS)].sum(axis=1))


def test_breakdown_sentence_states_non_gemm_time_at_batch_1_and_16(new_format):
    d, _, _, bd = new_format
    sec = section((d / "REPORT.md").read_text(), "End to end: one decode step by op class")
    other = bd[(bd.op == "other") & (bd.context == 128)].set_index(["model", "backend", "batch"]).us_per_layer
    layer = bd[(bd.op == "layer") & (bd.context == 128)].set_index(["model", "backend", "batch"]).us_per_layer
    for model in dict.fromkeys(bd.model):
        line = next(ln for ln in sec.splitlines() if ln.startswith(f"- {model}:"))
        for b in BACKENDS:
            part = next(p for p in line.split(";") if p.strip(" -").split(": ")[-1].startswith(b))
            for batch in (1, 16):
                v, share = other[(model, b, batch)], 100 * other[(model, b, batch)] / layer[(model, b, batch)]
                assert f"{v:.1f} µs at batch {batch} ({share:.0f}% of the layer)" in part
    assert "`rope_kv` is 0" in sec  # the fixture's rope_kv is 0 everywhere


def test_breakdown_rope_kv_sentence_follows_the_data():
    assert "`rope_kv` is 0" not in "\n".join(text._report_e2e_breakdown(breakdown_frame(rope_kv_zero=False)))


def test_breakdown_table_computes_gemm_and_other_when_missing():
    bd = breakdown_frame(seed=3)
    full = results.breakdown_table(bd)
    derived = results.breakdown_table(bd[~bd.op.isin(["gemm", "other"])])
    assert np.allclose(derived.gemm, full.gemm) and np.allclose(derived.other, full.other)


def test_breakdown_figure_stacks_classes_and_marks_the_layer(new_format):
    d, _, _, bd = new_format
    for ext in ("png", "svg"):
        f = d / "figures" / f"fig_e2e_breakdown.{ext}"
        assert f.is_file() and f.stat().st_size > 10_000
    fig = figures.fig_e2e_breakdown(bd)
    wide = results.breakdown_table(bd).reset_index()
    from matplotlib.colors import to_rgb

    for ax, model in zip(fig.axes, dict.fromkeys(bd.model)):
        w = wide[wide.model == model]
        assert len(ax.patches) == len(w) * len(OP_CLASSES)  # one segment per class per case
        handles, labels = ax.get_legend_handles_labels()
        colour = {lbl: to_rgb(h.patches[0].get_facecolor() if hasattr(h, "patches") else h.get_color())
                  for h, lbl in zip(handles, labels) if lbl in OP_CLASSES}
        for op, (r, _, b) in colour.items():
            assert (b > r) == (op in GEMM_OPS), op  # GEMMs blue, the rest orange
        # the stacks: each case's tallest segment top is the sum of its classes
        tops = sorted(round(p.get_y() + p.get_height(), 6) for p in ax.patches)
        for s in w[list(OP_CLASSES)].sum(axis=1):
            assert round(s, 6) in tops
        marked = sorted(round(float(seg[0][1]), 6) for c in ax.collections for seg in c.get_segments())
        assert marked == sorted(round(v, 6) for v in w.layer)
    style.pyplot().close(fig)


def test_missing_breakdown_csv_skips_the_figure_with_a_note(tmp_path, capsys):
    d = write_gpu_dir(tmp_path, {"e2e": e2e_frame()})
    written = {p.name for p in reproduce(d)}
    assert "fig4_e2e.png" in written and not any("breakdown" in n for n in written)
    assert "e2e_breakdown.csv missing: skipping fig_e2e_breakdown" in capsys.readouterr().out
    report = (d / "REPORT.md").read_text()
    assert "_Not drawn: `e2e_breakdown.csv` is missing._" in report
    assert "| e2e_breakdown.csv | missing |" in report


# ---------------------------------------------------------------- across GPUs


def test_comparison_keeps_contexts_apart():
    e2e = e2e_frame()
    q = results.e2e_quick(e2e)
    ok = e2e.dropna(subset=["tokens_per_s"])
    quick = ok[ok.backend == "quick"]
    assert len(q) == len(quick)  # one row per (model, context, layers, batch): nothing averaged together
    got = q.set_index(["model", "context", "batch"]).quick_tokens_per_s
    for r in quick.itertuples():
        assert got[(r.model, r.context, r.batch)] == pytest.approx(r.tokens_per_s)

"""quick_lab.report (results, figures, text, reproduce) and ``quick-lab reproduce`` on synthetic CSVs in the
exact schemas of the sweeps (CPU only).

``write_synthetic_results`` is also used by tests/test_notebooks.py to run the notebooks with data.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from quick_lab import cli
from quick_lab.build import paths
from quick_lab.core import configs
from quick_lab.lab import bank_model
from quick_lab.lab.conflicts import ALL_METRICS, LDGSTS_METRICS
from quick_lab.report import figures, results, style, text
from quick_lab.report.reproduce import reproduce

THROUGHPUT_COLUMNS = ["kernel", "config", "split_k", "K", "N", "M", "group_size", "time_us", "p10_us", "p90_us",
                      "tflops", "gbps", "dram_floor_us", "pct_of_floor", "ratio_to_fp16"]
BANDWIDTH = 3e12
G = 128


def _bytes(M, K, N):
    return K * N // 2 + (K // G) * N * 2 + (K // G) * N // 2 + M * K * 2 + M * N * 2


def sweep_frame(cases) -> pd.DataFrame:
    """Rows of throughput.csv / tiles.csv from (kernel, config, split_k, K, N, M, time_us); fp16 first per
    (K, N, M) as bench.measure_problem writes them, derived columns computed the same way."""
    rows = []
    for kernel, config, split, K, N, M, t in cases:
        floor = _bytes(M, K, N) / BANDWIDTH * 1e6
        rows.append(dict(kernel=kernel, config=config, split_k=split, K=K, N=N, M=M, group_size=G, time_us=t,
                         p10_us=0.95 * t, p90_us=1.05 * t, tflops=2 * M * K * N / (t * 1e-6) / 1e12,
                         gbps=_bytes(M, K, N) / (t * 1e-6) / 1e9, dram_floor_us=floor,
                         pct_of_floor=100 * floor / t))
    df = pd.DataFrame(rows, columns=THROUGHPUT_COLUMNS[:-1])
    fp16 = df[df.kernel == "fp16"].set_index(["K", "N", "M"]).time_us
    df["ratio_to_fp16"] = [t / fp16[(k, n, m)] for t, k, n, m in zip(df.time_us, df.K, df.N, df.M)]
    return df[THROUGHPUT_COLUMNS]


def throughput_frame(speedup: float = 2.0, paper_speedup: float = 1.6) -> pd.DataFrame:
    """awq takes exactly ``speedup`` x the time of quick and ``paper_speedup`` x that of quick-paper."""
    cases = []
    for K, N in ((4096, 4096), (8192, 8192)):
        for M in (1, 16, 128, 256, 1024):
            quick = 10.0 + 0.2 * M
            cases += [("fp16", "cublas", 1, K, N, M, 12.0 + 0.05 * M),
                      ("awq", configs.AWQ_DEFAULT.name, 8, K, N, M, speedup * quick),
                      ("quick-paper", configs.QUICK_DEFAULT.name, 8, K, N, M, speedup * quick / paper_speedup),
                      ("quick", "64x128x64_w1x2_s3", 2, K, N, M, quick)]
    return sweep_frame(cases)


def tiles_frame() -> pd.DataFrame:
    cases = []
    K, N = 4096, 4096
    for M in (1, 16, 256):
        cases.append(("fp16", "cublas", 1, K, N, M, 20.0 + 0.1 * M))
        for split in (1, 8):
            cases.append(("awq", configs.AWQ_DEFAULT.name, split, K, N, M, (40.0 + M) / split ** 0.5))
            cases.append(("quick", configs.QUICK_DEFAULT.name, split, K, N, M, (30.0 + 0.5 * M) / split ** 0.5))
            cases.append(("quick", "64x128x64_w1x2_s3", split, K, N, M, (45.0 + 0.2 * M) / split ** 0.5))
        cases.append(("fallback", "dequant+cublas", 1, K, N, M, 60.0 + 0.1 * M))
    return sweep_frame(cases)


def conflicts_frame(excess: float = 1.25) -> pd.DataFrame:
    """conflicts.compare_with_model's layout; measured = ``excess`` x model for every metric."""
    rows = []
    K, N = 4096, 4096
    for M in (16, 256):
        for kind, cfg in (("awq", configs.AWQ_DEFAULT), ("quick", configs.QUICK_DEFAULT)):
            pred = bank_model.predict_counts(kind, cfg, M, K, N, 1)
            r = dict(kind=kind, config=cfg.name, K=K, N=N, M=M, split_k=1, kernel=f"{kind}_gemm", blocks=pred["blocks"])
            for m in ALL_METRICS:
                model = pred[LDGSTS_METRICS.get(m, m)]
                r[m] = round(excess * model)
                r[f"model:{m}"] = model
                r[f"ratio:{m}"] = r[m] / model if model else 1.0
            rows.append(r)
    return pd.DataFrame(rows)


def e2e_frame(ratio: float = 1.5) -> pd.DataFrame:
    """quick decodes exactly ``ratio`` x the tokens/s of awq; one out-of-memory row (NaN)."""
    rows = []
    for model, full in (("llama-2-13b", 40), ("mistral-7b", 32)):
        for batch in (1, 16, 64):
            base = 100.0 * batch
            for backend, tps in (("fp16", 1.2 * base), ("awq", base), ("quick", ratio * base)):
                decode_ms = batch * 128 / tps * 1e3
                rows.append(dict(model=model, layers=4, full_layers=full, batch=batch, backend=backend, prefill=128,
                                 decode=128, cuda_graph=True, lm_head=True, prefill_ms=1.0, decode_ms=decode_ms,
                                 lm_head_ms=0.1, tokens_per_s=tps, full_depth_tokens_per_s_estimate=tps / 8,
                                 error=np.nan))
    rows.append(dict(model="llama-2-13b", layers=4, full_layers=40, batch=256, backend="fp16", prefill=128,
                     decode=128, error="Out of memory allocating 1 bytes"))
    return pd.DataFrame(rows)


def sanitizer_frame() -> pd.DataFrame:
    return pd.DataFrame([dict(tool=t, kernel="awq_gemm<16,128,32,1,2>", findings=0, status="clean", seconds=1.0)
                         for t in ("memcheck", "racecheck")])


def write_synthetic_results(path, speedup: float = 2.0, stems=("throughput", "tiles", "conflicts", "e2e",
                                                                 "e2e_breakdown", "sanitizer")):
    """A results/<gpu>/ directory of synthetic CSVs (with .meta.json) under ``path``; returns it."""
    from test_e2e_report import breakdown_frame

    path.mkdir(parents=True, exist_ok=True)
    frames = {"throughput": lambda: throughput_frame(speedup), "tiles": tiles_frame, "conflicts": conflicts_frame,
              "e2e": e2e_frame, "e2e_breakdown": breakdown_frame, "sanitizer": sanitizer_frame}
    for stem in stems:
        frames[stem]().to_csv(path / f"{stem}.csv", index=False)
        (path / f"{stem}.meta.json").write_text(json.dumps({"gpu": "Synthetic GPU", "date": "2000-01-01",
                                                            "git_commit": "synthetic"}))
    return path


ALL_FIGURES = ("fig1_compute_paths", "fig2_bank_conflicts", "fig3_tflops_vs_batch", "fig3b_speedup_all_shapes",
               "fig4_e2e", "fig_e2e_breakdown", "fig5_tiles_4096x4096")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    res_dir = write_synthetic_results(tmp_path_factory.mktemp("results") / "synthetic-gpu")
    return res_dir, reproduce(res_dir)


def test_every_figure_is_written_as_png_and_svg(full_run):
    res_dir, paths = full_run
    fig_dir = res_dir / "figures"
    for name in ALL_FIGURES:
        for ext in ("png", "svg"):
            p = fig_dir / f"{name}.{ext}"
            assert p.is_file() and p.stat().st_size > 1000, p
            assert p in paths
    assert (fig_dir / "fig1_compute_paths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[-1] == res_dir / "REPORT.md"
    assert len(paths) == 2 * len(ALL_FIGURES) + 1


def test_report_links_every_figure_and_computes_numbers(full_run):
    res_dir, _ = full_run
    report = (res_dir / "REPORT.md").read_text()
    assert "Synthetic GPU" in report
    for name in ALL_FIGURES:
        assert f"](figures/{name}.png)" in report
        assert (res_dir / "figures" / f"{name}.png").is_file()
    assert "up to **2.00x**" in report              # quick / awq, constructed as exactly 2
    assert "1.60x" in report                        # quick-paper / awq, exactly 1.6
    assert "up to **1.50x** decode tokens/s" in report  # e2e quick / awq, exactly 1.5
    assert "Could not compute" not in report and "Not drawn" not in report
    # ncu measured (1.25 x model) beside the model in brackets: awq st wavefronts at M = 16
    pred = bank_model.predict_counts("awq", configs.AWQ_DEFAULT, 16, 4096, 4096, 1)[bank_model.ST_WAVEFRONTS]
    assert f"{round(1.25 * pred):,} ({pred:,})" in report
    # ratio to fp16 at the largest M, computed from the synthetic times
    t = throughput_frame()
    r = t[(t.kernel == "quick") & (t.K == 8192) & (t.M == 1024)].ratio_to_fp16.iloc[0]
    assert f"{r:.2f} (M=1024)" in report
    assert "| memcheck | 0 |" in report


@pytest.mark.parametrize("speedup", [1.25, 3.0])
def test_report_follows_the_data(tmp_path, speedup):
    res_dir = write_synthetic_results(tmp_path / "gpu", speedup=speedup, stems=("throughput",))
    report = text.write_report(res_dir, {}).read_text()
    assert f"up to **{speedup:.2f}x**" in report
    assert "_Not drawn: `e2e.csv` is missing._" in report


def test_speedups_are_time_ratios_of_the_best_rows():
    df = throughput_frame(speedup=2.0, paper_speedup=1.6)
    extra = df[df.kernel == "awq"].assign(time_us=lambda d: d.time_us * 10, config="slow")
    sp = results.speedups(pd.concat([df, extra]))  # a slower awq row must not count
    assert set(sp.kernel) == {"quick", "quick-paper"}
    assert np.allclose(sp[sp.kernel == "quick"].speedup, 2.0)
    assert np.allclose(sp[sp.kernel == "quick-paper"].speedup, 1.6)


def test_missing_csvs_are_skipped(tmp_path, capsys):
    res_dir = tmp_path / "empty-gpu"
    res_dir.mkdir()
    paths = reproduce(res_dir)
    names = {p.name for p in paths}
    assert names == {"fig1_compute_paths.png", "fig1_compute_paths.svg", "fig2_bank_conflicts.png",
                     "fig2_bank_conflicts.svg", "REPORT.md"}
    out = capsys.readouterr().out
    assert "throughput.csv missing" in out and "tiles.csv missing" in out and "e2e" in out
    report = (res_dir / "REPORT.md").read_text()
    for stem in ("throughput", "e2e", "tiles"):
        assert f"_Not drawn: `{stem}.csv` is missing._" in report
    assert "model only" in report


def test_fig2_without_measurements_is_labelled_model():
    fig = figures.fig2_bank_conflicts(None)
    assert "model only" in fig._suptitle.get_text()
    assert all(t.get_text() != "ncu measured" for ax in fig.axes for t in
               (ax.get_legend().get_texts() if ax.get_legend() else []))
    fig_m = figures.fig2_bank_conflicts(conflicts_frame())
    assert "Nsight Compute vs bank model" in fig_m._suptitle.get_text()
    style.pyplot().close("all")


def test_fig1_reads_the_bank_model():
    df = results.compute_path_traffic()
    awq_b = df[(df.kernel == "awq") & (df.operand == "B")]
    quick_b = df[(df.kernel == "quick") & (df.operand == "B")]
    assert awq_b.bytes.sum() > 0 and quick_b.bytes.sum() == 0  # QUICK: no weight traffic in shared memory
    expected = bank_model.tile_traffic("awq", configs.AWQ_DEFAULT)
    assert awq_b.bytes.sum() == expected[expected.operand == "B"].bytes.sum()


def test_fig5_shapes_follow_tiles_csv(tmp_path):
    res_dir = write_synthetic_results(tmp_path / "gpu", stems=("tiles",))
    t = results.tile_table(tiles_frame(), 4096, 4096, "quick")
    assert list(t.columns) == [1, 16, 256] and len(t) == 2
    assert t.loc[configs.QUICK_DEFAULT.name, 1] == pytest.approx(30.5 / 8 ** 0.5 / 20.1)  # best split
    written = {p.name for p in reproduce(res_dir)}
    assert {"fig5_tiles_4096x4096.png", "fig5_tiles_4096x4096.svg"} <= written
    assert "fig3_tflops_vs_batch.png" not in written


def test_svg_output_is_reproducible(tmp_path):
    a = figures.save(figures.fig1_compute_paths(), tmp_path / "a", "f")[1].read_bytes()
    b = figures.save(figures.fig1_compute_paths(), tmp_path / "b", "f")[1].read_bytes()
    assert a == b


# ---------------------------------------------------------------- finding the results directory


@pytest.fixture
def no_gpu(monkeypatch):
    """No GPU for results and cli alike, and no $QUICK_LAB_RESULTS override."""
    monkeypatch.setattr(results, "cuda_device_status", lambda: (False, "test: no GPU"))
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (False, "test: no GPU"))
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)


def test_default_results_dir(tmp_path, monkeypatch, no_gpu):
    root = tmp_path / "results"
    with pytest.raises(FileNotFoundError, match="no GPU"):
        results.default_results_dir(root)
    assert results.default_results_dir(root, strict=False) is None
    write_synthetic_results(root / "gpu-a", stems=("throughput",))
    (root / "no-data").mkdir()
    assert results.default_results_dir(root) == root / "gpu-a"
    write_synthetic_results(root / "gpu-b", stems=("throughput",))
    with pytest.raises(ValueError, match="gpu-a, gpu-b"):
        results.default_results_dir(root)
    assert results.default_results_dir(root, strict=False) == root / "gpu-a"
    monkeypatch.setenv(results.RESULTS_ENV, str(root / "gpu-b"))
    assert results.default_results_dir(root) == root / "gpu-b"


def test_default_results_dir_reads_the_results_root(tmp_path, monkeypatch, no_gpu):
    root = tmp_path / "elsewhere"
    write_synthetic_results(root / "gpu-a", stems=("throughput",))
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(root))
    assert results.default_results_dir() == root / "gpu-a"


def _fake_gpu(monkeypatch, name="NVIDIA H100 80GB HBM3"):
    from quick_lab.lab import metadata

    monkeypatch.setattr(metadata, "gpu_info", lambda: {"gpu": name})
    monkeypatch.setattr(results, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (True, ""))
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)


def test_gpu_results_dir_is_the_root_and_the_gpu_slug(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(tmp_path))
    assert results.gpu_results_dir() == tmp_path / "h100-80gb-hbm3"
    assert results.gpu_results_dir(tmp_path / "r") == tmp_path / "r" / "h100-80gb-hbm3"
    assert results.default_results_dir() == tmp_path / "h100-80gb-hbm3"  # on a GPU: whether or not it exists


def test_load_csv_missing_prints_a_note(tmp_path, capsys):
    assert results.load_csv(tmp_path, "e2e") is None
    assert "e2e.csv is missing" in capsys.readouterr().out
    assert results.load_csv(None, "e2e", quiet=True) is None


# ---------------------------------------------------------------- quick-lab reproduce (quick_lab.cli)


def test_cli_reproduce_draws_from_results(tmp_path, capsys):
    res_dir = write_synthetic_results(tmp_path / "gpu", stems=("throughput",))
    assert cli.main(["reproduce", "--results", str(res_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (res_dir / "figures" / "fig3_tflops_vs_batch.png").is_file()
    assert (res_dir / "REPORT.md").is_file()


def test_cli_measure_without_gpu_draws_committed_data(tmp_path, monkeypatch, capsys, no_gpu):
    root = tmp_path / "results"
    write_synthetic_results(root / "gpu", stems=("throughput",))
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(root))
    assert cli.main(["reproduce", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "no GPU: drawing from the committed data" in out
    assert (root / "gpu" / "REPORT.md").is_file()


def test_cli_without_any_results_fails_clearly(tmp_path, monkeypatch, capsys, no_gpu):
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(tmp_path / "results"))
    assert cli.main(["reproduce"]) == 2
    assert "throughput.csv" in capsys.readouterr().err
    assert cli.main(["reproduce", "--results", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _record_sweeps(monkeypatch, res_dir, fail=None):
    """Replaces cli.main (what cli._measure calls per sweep) with a recorder; bench writes throughput.csv
    into ``res_dir``, ``fail`` raises SystemExit(2) like argparse. Returns (the real main, the calls)."""
    real_main, calls = cli.main, []

    def fake_main(argv):
        calls.append(list(argv))
        if argv[0] == fail:
            raise SystemExit(2)
        if argv[0] == "bench":
            write_synthetic_results(res_dir, stems=("throughput",))
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    return real_main, calls


def test_cli_measure_on_gpu_runs_every_sweep_first(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch)
    res_dir = tmp_path / "gpu"
    real_main, calls = _record_sweeps(monkeypatch, res_dir)
    assert real_main(["reproduce", "--measure", "--results", str(res_dir)]) == 0
    assert [c[0] for c in calls] == ["bench", "tiles", "conflicts", "e2e"]
    assert all(c[1:] == ["--out", str(res_dir)] for c in calls)
    assert (res_dir / "figures" / "fig3_tflops_vs_batch.png").is_file()


def test_cli_measure_on_gpu_defaults_to_the_gpu_results_dir(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch)
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(tmp_path))
    res_dir = tmp_path / "h100-80gb-hbm3"
    real_main, calls = _record_sweeps(monkeypatch, res_dir)
    assert real_main(["reproduce", "--measure"]) == 0
    assert all(c[1:] == ["--out", str(res_dir)] for c in calls)
    assert (res_dir / "REPORT.md").is_file()


def test_cli_measure_reports_a_failed_sweep(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch)
    res_dir = write_synthetic_results(tmp_path / "gpu", stems=("throughput",))
    real_main, calls = _record_sweeps(monkeypatch, res_dir, fail="conflicts")
    assert real_main(["reproduce", "--measure", "--results", str(res_dir)]) == 2
    assert [c[0] for c in calls] == ["bench", "tiles", "conflicts", "e2e"]  # a failed sweep stops none after it
    assert (res_dir / "REPORT.md").is_file()


def test_kernel_speedups_compare_kernels_only_against_the_autoawq_configuration():
    base = dict(K=8192, N=8192, M=256, group_size=128, ratio_to_fp16=1.0)
    tiles = pd.DataFrame([
        dict(base, kernel="awq", config=configs.AWQ_DEFAULT.name, split_k=8, time_us=300.0),
        dict(base, kernel="awq", config="64x128x32_w2x2_s1", split_k=1, time_us=10.0),  # not the AutoAWQ config
        dict(base, kernel="quick", config="64x128x64_w1x2_s3", split_k=1, time_us=150.0),
        dict(base, kernel="quick", config="64x256x64_w1x4_s4_cp", split_k=2, time_us=100.0),
        dict(base, kernel="fallback", config="dequant+cublas", split_k=1, time_us=1.0),  # never counted
    ])
    report = "\n".join(text._kernel_speedups(tiles))
    assert "| 8192 x 8192 | 256 | 2.00x | 3.00x |" in report
    assert "ranges 2.00x to 2.00x" in report

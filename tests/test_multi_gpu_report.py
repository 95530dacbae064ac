"""Per-GPU results side by side (CPU only): every measuring command writes under ``results/<gpu>/``,
``quick-lab reproduce`` draws every GPU directory and writes ``COMPARISON.md``.

The data are the committed H100 CSVs copied into a temporary results root ($QUICK_LAB_RESULTS_ROOT)
beside a synthetic second GPU, ``h200-141gb-hbm3e``: the H100's CSVs with QUICK's times scaled by
QUICK_SCALE and every other time by OTHER_SCALE, its metadata saying so. It exists only inside these
tests (never under results/). ``tiles.csv`` (3.9 MB, six heatmaps) is not copied: the comparison
reads ``throughput.csv`` and ``e2e.csv``, and the provenance table lists ``tiles.csv`` as missing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from markdown_tables import md_tables
from quick_lab import cli
from quick_lab.build import paths
from quick_lab.build.device import gpu_slug
from quick_lab.report import comparison, results
from quick_lab.report import reproduce as rep

REPO = Path(__file__).resolve().parents[1]
H100_DIR = REPO / "results" / "h100-80gb-hbm3"
H100 = "h100-80gb-hbm3"
H200 = "h200-141gb-hbm3e"
H200_NAME = "NVIDIA H200 141GB HBM3e"
COPIED = ("throughput", "conflicts", "e2e", "sanitizer")
QUICK_SCALE, OTHER_SCALE = 0.7, 0.9
FIGURE = "comparison_quick_over_cublas"


# ---------------------------------------------------------------- fixtures: the H100 and a synthetic H200


def copy_h100(root: Path, stems=COPIED) -> Path:
    dst = root / H100
    dst.mkdir(parents=True)
    for stem in stems:
        shutil.copy(H100_DIR / f"{stem}.csv", dst / f"{stem}.csv")
        shutil.copy(H100_DIR / f"{stem}.meta.json", dst / f"{stem}.meta.json")
    return dst


def _scale_throughput(df: pd.DataFrame) -> pd.DataFrame:
    s = df.kernel.str.startswith("quick").map({True: QUICK_SCALE, False: OTHER_SCALE})
    df = df.copy()
    for col in ("time_us", "p10_us", "p90_us"):
        df[col] = df[col] * s
    df["tflops"], df["gbps"] = df.tflops / s, df.gbps / s
    df["pct_of_floor"] = 100 * df.dram_floor_us / df.time_us
    fp16 = df[df.kernel == "fp16"].set_index(["K", "N", "M"]).time_us
    df["ratio_to_fp16"] = [t / fp16[(k, n, m)] for t, k, n, m in zip(df.time_us, df.K, df.N, df.M)]
    return df


def _scale_e2e(df: pd.DataFrame) -> pd.DataFrame:
    s = (df.backend == "quick").map({True: QUICK_SCALE, False: OTHER_SCALE})
    df = df.copy()
    for col in ("prefill_ms", "decode_ms", "lm_head_ms"):
        df[col] = df[col] * s
    for col in ("tokens_per_s", "full_depth_tokens_per_s_estimate"):
        df[col] = df[col] / s
    return df


def write_synthetic_h200(root: Path, stems=COPIED) -> Path:
    """The H100's CSVs under ``root/h200-141gb-hbm3e`` with times scaled (a test fixture, not a measurement)."""
    dst = root / H200
    dst.mkdir(parents=True)
    scale = {"throughput": _scale_throughput, "e2e": _scale_e2e}
    for stem in stems:
        df = pd.read_csv(H100_DIR / f"{stem}.csv")
        scale.get(stem, lambda d: d)(df).to_csv(dst / f"{stem}.csv", index=False)
        meta = json.loads((H100_DIR / f"{stem}.meta.json").read_text())
        meta.update(gpu=H200_NAME, gpu_slug=H200, driver_version="999.1.1", git_commit="synthetic",
                    synthetic=f"test fixture: the H100's {stem}.csv with QUICK times x{QUICK_SCALE} and other "
                              f"times x{OTHER_SCALE}; not a measurement")
        (dst / f"{stem}.meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    """``quick-lab reproduce`` (no GPU argument) over the H100 and the synthetic H200: (root, stdout)."""
    root = tmp_path_factory.mktemp("results")
    copy_h100(root)
    write_synthetic_h200(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(paths.RESULTS_ROOT_ENV, str(root))
        mp.delenv(results.RESULTS_ENV, raising=False)
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["reproduce"]) == 0
    return root, out.getvalue()


# ---------------------------------------------------------------- reading COMPARISON.md back


def table_with(text: str, column: str) -> pd.DataFrame:
    found = [t for t in md_tables(text) if column in t.columns]
    assert len(found) == 1, f"{len(found)} tables with a {column!r} column"
    return found[0]


def recomputed_kernel(path: Path) -> pd.DataFrame:
    """QUICK time / cuBLAS fp16 time and QUICK's % of the DRAM floor per (K, N, M), straight from the CSV."""
    df = pd.read_csv(path)
    quick = df[df.kernel == "quick"].sort_values("time_us").groupby(["K", "N", "M"]).first()
    fp16 = df[df.kernel == "fp16"].groupby(["K", "N", "M"]).time_us.min()
    return pd.DataFrame({"ratio": quick.time_us / fp16, "pct": 100 * quick.dram_floor_us / quick.time_us})


# ---------------------------------------------------------------- two GPUs


def test_reproduce_draws_every_gpu_and_the_comparison(two_gpus):
    root, out = two_gpus
    for gpu in (H100, H200):
        assert f"wrote {root / gpu / 'REPORT.md'}" in out
        png = root / gpu / "figures" / "fig3_tflops_vs_batch.png"
        assert png.is_file() and png.stat().st_size > 1000
    report = (root / H200 / "REPORT.md").read_text()
    assert f"on {H200_NAME}" in report  # each GPU's report is its own
    assert out.rstrip().endswith(f"wrote {root / results.COMPARISON}")


def test_comparison_holds_each_gpus_own_kernel_numbers(two_gpus):
    root, _ = two_gpus
    table = table_with((root / results.COMPARISON).read_text(), f"{H200} QUICK/cuBLAS")
    expected = {gpu: recomputed_kernel(root / gpu / "throughput.csv") for gpu in (H100, H200)}
    cases = pd.read_csv(root / H100 / "throughput.csv").groupby(["K", "N", "M"]).ngroups
    assert len(table) == len(expected[H100]) == cases >= 78  # every committed case, both GPUs measured them all
    differ = 0
    for row in table.to_dict("records"):
        K, N = (int(v) for v in row["K x N"].split(" x "))
        key = (K, N, int(row["M"]))
        for gpu in (H100, H200):
            assert row[f"{gpu} QUICK/cuBLAS"] == f"{expected[gpu].ratio[key]:.2f}", (gpu, key)
            assert row[f"{gpu} % of floor"] == f"{expected[gpu].pct[key]:.0f}", (gpu, key)
        differ += row[f"{H100} QUICK/cuBLAS"] != row[f"{H200} QUICK/cuBLAS"]
        # the fixture's construction: the H200's ratio is the H100's x QUICK_SCALE / OTHER_SCALE
        assert expected[H200].ratio[key] == pytest.approx(expected[H100].ratio[key] * QUICK_SCALE / OTHER_SCALE)
    assert differ > len(table) // 2  # the columns are the two GPUs', not one GPU's twice


def test_comparison_holds_each_gpus_e2e_tokens_per_s(two_gpus):
    root, _ = two_gpus
    table = table_with((root / results.COMPARISON).read_text(), f"{H100} QUICK tokens/s")
    for gpu in (H100, H200):
        e2e = pd.read_csv(root / gpu / "e2e.csv")
        keys = ["model", "layers", "batch"] + (["context"] if "context" in e2e else [])
        t = e2e.pivot_table(index=keys, columns="backend", values="tokens_per_s")
        assert len(table) == len(t.dropna(subset=["quick"]))
        for row in table.to_dict("records"):
            key = tuple(row[k] if k == "model" else int(row[k]) for k in keys)
            assert row[f"{gpu} QUICK tokens/s"] == f"{t.loc[key, 'quick']:.0f}"
            fp16 = t.loc[key, "fp16"] if "fp16" in t else float("nan")
            want = "n/a" if pd.isna(fp16) else f"{t.loc[key, 'quick'] / fp16:.2f}"  # fp16 at another depth
            assert row[f"{gpu} QUICK/fp16"] == want


def _listed(value) -> str:
    """A metadata field as the comparison shows it: a merged file's per-run list, distinct values in order."""
    if not isinstance(value, list):
        return value
    return ", ".join(dict.fromkeys(str(v) for v in value))


def test_comparison_names_each_gpus_metadata(two_gpus):
    root, _ = two_gpus
    text = (root / results.COMPARISON).read_text()
    prov = table_with(text, "GPU directory")
    for gpu in (H100, H200):
        for stem in COPIED:
            row = prov[(prov["GPU directory"] == gpu) & (prov.measurement == f"{stem}.csv")].iloc[0]
            meta = json.loads((root / gpu / f"{stem}.meta.json").read_text())
            assert row["GPU (metadata)"] == meta["gpu"] and row.measured == _listed(meta["date"])
            assert row.commit == _listed(meta["git_commit"]) and row.driver.startswith(meta["driver_version"])
            assert row["CUDA runtime"] == f"{meta['runtime'] // 1000}.{meta['runtime'] % 1000 // 10}"
        tiles = prov[(prov["GPU directory"] == gpu) & (prov.measurement == "tiles.csv")].iloc[0]
        assert tiles.rows == "missing"  # not copied: listed, not invented
    h200 = prov[(prov["GPU directory"] == H200) & (prov.rows != "missing")]
    assert len(h200) == len(COPIED) and (h200["GPU (metadata)"] == H200_NAME).all()
    assert "Only one GPU" not in text and "Could not compute" not in text
    assert "Metadata naming another GPU" not in text


def test_comparison_figure_is_drawn_and_linked(two_gpus):
    root, _ = two_gpus
    png, svg = root / "figures" / f"{FIGURE}.png", root / "figures" / f"{FIGURE}.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    drawn = svg.read_text()
    assert H100 in drawn and H200 in drawn  # one legend entry per GPU (SVG keeps text as text)
    assert f"](figures/{FIGURE}.png)" in (root / results.COMPARISON).read_text()


# ---------------------------------------------------------------- missing data, one GPU, bad input


def test_a_gpu_missing_a_csv_is_listed_and_left_out(tmp_path):
    copy_h100(tmp_path)
    h200 = write_synthetic_h200(tmp_path, stems=("throughput",))  # no e2e.csv
    tp = pd.read_csv(h200 / "throughput.csv")
    tp[tp.M != 4096].to_csv(h200 / "throughput.csv", index=False)  # the M = 4096 cases only the H100 measured
    shapes = tp.groupby(["K", "N"]).ngroups
    text = comparison.write_comparison(results.gpu_dirs(tmp_path), tmp_path, {}).read_text()
    assert f"Missing `e2e.csv` (not in this comparison): `{H200}`." in text
    prov = table_with(text, "GPU directory")
    assert prov[(prov["GPU directory"] == H200) & (prov.measurement == "e2e.csv")].rows.iloc[0] == "missing"
    e2e = table_with(text, f"{H100} QUICK tokens/s")
    assert not any(c.startswith(H200) for c in e2e.columns)
    kernels = table_with(text, f"{H200} QUICK/cuBLAS")
    assert len(kernels) == tp[tp.M != 4096].groupby(["K", "N", "M"]).ngroups and "4096" not in set(kernels.M)
    assert f"{shapes} cases measured on only some of the GPUs are left out." in text


def test_metadata_naming_another_gpu_is_flagged(tmp_path):
    copy_h100(tmp_path, stems=("throughput",))
    h200 = write_synthetic_h200(tmp_path, stems=("throughput",))
    meta = json.loads((h200 / "throughput.meta.json").read_text())
    (h200 / "throughput.meta.json").write_text(json.dumps({**meta, "gpu": "NVIDIA H100 80GB HBM3"}))
    text = comparison.write_comparison(results.gpu_dirs(tmp_path), tmp_path, {}).read_text()
    assert f"`{H200}/throughput.meta.json` names NVIDIA H100 80GB HBM3, whose directory is `{H100}`" in text


def test_one_gpu_writes_no_comparison_figure(tmp_path):
    copy_h100(tmp_path, stems=("throughput", "e2e"))
    written = rep.reproduce_all(tmp_path)
    assert written[-1] == tmp_path / results.COMPARISON
    assert not list(tmp_path.glob(f"**/{FIGURE}.*")) and not (tmp_path / "figures").exists()
    text = written[-1].read_text()
    assert f"Only one GPU is present (`{H100}`)" in text and "![" not in text
    assert (tmp_path / H100 / "REPORT.md") in written
    assert f"{H100} QUICK/cuBLAS" in table_with(text, f"{H100} QUICK/cuBLAS").columns


def test_unknown_gpu_is_a_clear_error_listing_the_gpus_present(two_gpus, monkeypatch, capsys):
    root, _ = two_gpus
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(root))
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    assert cli.main(["reproduce", "--gpu", "NVIDIA A100-SXM4-80GB"]) == 2
    err = capsys.readouterr().err
    assert f"'{gpu_slug('NVIDIA A100-SXM4-80GB')}'" in err and f"GPUs present: {H100}, {H200}" in err
    with pytest.raises(ValueError, match=f"GPUs present: {H100}, {H200}"):
        rep.reproduce_all(root, gpu="l40s")
    with pytest.raises(TypeError, match="gpu must be a str"):
        results.find_gpu_dir(3, root)
    with pytest.raises(ValueError, match="must not be empty"):
        results.find_gpu_dir(" ", root)
    with pytest.raises(SystemExit):  # one directory, named two ways
        cli.main(["reproduce", "--gpu", H100, "--results", str(root / H100)])


def test_gpu_option_picks_one_directory_by_slug_or_name(two_gpus, monkeypatch):
    root, _ = two_gpus
    drawn = []
    monkeypatch.setattr(rep, "reproduce", lambda d: drawn.append(Path(d)) or [])
    monkeypatch.setattr(rep, "write_comparison", lambda *a: pytest.fail("--gpu writes no COMPARISON.md"))
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(root))
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    assert cli.main(["reproduce", "--gpu", H200_NAME]) == 0
    assert cli.main(["reproduce", "--gpu", H100]) == 0
    assert drawn == [root / H200, root / H100]


def test_no_results_at_all_is_a_clear_error(tmp_path):
    (tmp_path / "figures").mkdir()  # a directory without CSVs is no GPU
    assert results.gpu_dirs(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="throughput.csv"):
        rep.reproduce_all(tmp_path)


# ---------------------------------------------------------------- measuring commands


def test_every_measuring_command_writes_under_the_gpu_it_ran_on(tmp_path, monkeypatch):
    """bench, tiles, e2e, conflicts and check, their measurements replaced by the committed H100 rows:
    each writes into results/<slug of the GPU at hand>/ with metadata naming that GPU."""
    from quick_lab.lab import bench, conflicts, metadata, sanitizer
    from quick_lab.model import sweep

    monkeypatch.setattr(metadata, "gpu_info", lambda: {"gpu": H200_NAME})
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setenv(paths.RESULTS_ROOT_ENV, str(tmp_path))
    throughput = pd.read_csv(H100_DIR / "throughput.csv")

    def fake_sweep(shapes, batches, plan_fn=None, reps=50, progress=None, group_sizes=(128,)):
        df = throughput[throughput.kernel.isin(["fp16", "awq"])].copy()  # no quick rows: no dispatch.json
        df.attrs["copy_bandwidth_Bps"] = 3e12
        return df

    monkeypatch.setattr(bench, "sweep", fake_sweep)
    monkeypatch.setattr(sweep, "e2e_sweep", lambda *a, **k: pd.read_csv(H100_DIR / "e2e.csv"))
    monkeypatch.setattr(conflicts, "check_environment", lambda ncu: "/fake/ncu")
    monkeypatch.setattr(conflicts, "ncu_version", lambda ncu: "fake")
    monkeypatch.setattr(conflicts, "measure", lambda *a, **k: (pd.read_csv(H100_DIR / "conflicts.csv"), "raw\n"))
    checked = []
    monkeypatch.setattr(sanitizer, "sanitizer_path", lambda: "/fake/compute-sanitizer")
    monkeypatch.setattr(sanitizer, "check", lambda out_dir, **k: checked.append(Path(out_dir)) or 0)

    for argv in (["bench"], ["tiles"], ["e2e"], ["conflicts"], ["check"]):
        assert cli.main(argv) == 0, argv
    gpu_dir = tmp_path / H200
    assert results.gpu_dirs(tmp_path) == [gpu_dir] and checked == [gpu_dir]
    for stem in ("throughput", "tiles", "e2e", "conflicts"):
        assert (gpu_dir / f"{stem}.csv").is_file(), stem
        meta = json.loads((gpu_dir / f"{stem}.meta.json").read_text())
        assert meta["gpu"] == H200_NAME and meta["gpu_slug"] == H200, stem

"""CPU tests of the Nsight Compute runner (quick_lab.lab.conflicts): CSV parsing, the target module
(quick_lab.lab.conflicts_target) and its case list, ``quick-lab conflicts`` through the CLI and the
no-ncu / no-GPU paths. No GPU and no ncu are needed."""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import textwrap
import types

import pytest

from quick_lab import cli
from quick_lab.build.device import cuda_device_status
from quick_lab.core import configs, dispatch, registry
from quick_lab.lab import bank_model as bm
from quick_lab.lab import conflicts, conflicts_target
from quick_lab.lab.timing import range_name

AWQ = configs.AWQ_DEFAULT
QUICK = configs.QUICK_DEFAULT
HEADER = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
          "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]


# The two columns ncu 2025.3.1 adds with --nvtx (seen on an H100), after "Host Name".
NVTX_COLUMNS = ["thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg",
                "Id:Domain:Start/Stop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg"]


def ncu_csv(launches, nvtx: bool = True, units=None) -> str:
    """ncu --csv long format as ncu 2025.3.1 prints it: ==WARNING== / ==PROF== preamble, then one row
    per (launch, metric) with thousands separators; with ``nvtx`` the NVTX columns ncu adds."""
    header = list(HEADER)
    if nvtx:
        header[4:4] = NVTX_COLUMNS
    lines = ["==WARNING== Note: Running with unmodified GPU clocks. If not controlled otherwise, profiling "
             "results may be inconsistent.",
             "==PROF== Connected to process 4242 (/opt/torch/.venv/bin/python3.12)",
             '==PROF== Profiling "awq_gemm" - 0: 0%....50%....100% - 9 passes',
             '==PROF== Profiling "quick_gemm" - 1: 0%....50%....100% - 9 passes',
             ",".join(f'"{h}"' for h in header)]
    for i, (rng, kernel, metrics) in enumerate(launches):
        for name, value in metrics.items():
            unit = (units or {}).get(name, "inst" if "inst_executed" in name else "")
            cells = [str(i), "4242", "python3.12", "127.0.0.1", kernel, "1", "7", "(64, 1, 1)", "(1, 32, 1)",
                     "0", "9.0", "Command line profiler metrics", name, unit, f"{value:,}"]
            if nvtx:  # the cell quotes the range itself: 4242  "<default domain>:<range>:none:..."
                cells[4:4] = [f'4242  ""<default domain>:{rng}:none:none:none:none:none:none"" ', ""]
            lines.append(",".join(f'"{c}"' for c in cells))
        if i == 0:
            lines.append("quick_lab.lab.conflicts target: something the app printed")
    lines.append("==PROF== Disconnected from process 4242")
    return "\n".join(lines) + "\n"


def kernel_name(kind, cfg):
    args = ", ".join(str(a) for a in registry.template_name(kind, cfg).split("<")[1].rstrip(">").split(","))
    return f"void {kind}_gemm<{args}>(const unsigned short *, const unsigned int *, int, int, int, int, int)"


# ---------------------------------------------------------------- parsing


def test_parse_long_csv_with_nvtx_column():
    text = ncu_csv([
        (range_name("awq", AWQ.name, 4096, 4096, 16), kernel_name("awq", AWQ),
         {bm.ST_WAVEFRONTS: 262144, bm.ST_INSTRUCTIONS: 65536, bm.LD_CONFLICTS: 0}),
        (range_name("quick", QUICK.name, 4096, 4096, 256), kernel_name("quick", QUICK),
         {bm.ST_WAVEFRONTS: 0, bm.ST_INSTRUCTIONS: 0, bm.LD_CONFLICTS: 1234567}),
    ])
    df = conflicts.parse_ncu_csv(text)
    assert len(df) == 2
    assert df.kind.tolist() == ["awq", "quick"]
    assert df.config.tolist() == [AWQ.name, QUICK.name]
    assert df.M.tolist() == [16, 256] and df.K.tolist() == [4096, 4096] and df.N.tolist() == [4096, 4096]
    assert df.range_source.tolist() == ["csv", "csv"]
    assert df[bm.ST_WAVEFRONTS].tolist() == [262144, 0]
    assert df[bm.LD_CONFLICTS].tolist() == [0, 1234567]
    assert df.kernel[0].startswith("void awq_gemm<16, 128, 32, 1, 2>")
    assert df[bm.ST_INSTRUCTIONS].dtype.kind == "i"


def test_parse_without_nvtx_column_falls_back_to_launch_order():
    ranges = [range_name("awq", AWQ.name, 4096, 4096, 16), range_name("quick", QUICK.name, 4096, 4096, 16)]
    text = ncu_csv([(r, "awq_gemm", {bm.LD_WAVEFRONTS: 5_242_880, bm.LDSM_INSTRUCTIONS: 81920}) for r in ranges],
                   nvtx=False)
    df = conflicts.parse_ncu_csv(text)
    assert df.kind.isna().all()  # no range anywhere in the CSV, none expected
    df = conflicts.parse_ncu_csv(text, expected_ranges=ranges)
    assert df.range.tolist() == ranges and df.range_source.tolist() == ["order", "order"]
    assert df[bm.LD_WAVEFRONTS].tolist() == [5242880, 5242880]
    with pytest.raises(ValueError):
        conflicts.parse_ncu_csv("==PROF== nothing profiled\n")


def test_parse_finds_range_in_renamed_kernel_and_scales_units():
    rng = range_name("quick", "128x128x64_w2x2_s4_cp", 8192, 28672, 256)
    text = ncu_csv([(rng, rng, {bm.ST_INSTRUCTIONS: 12, bm.LD_WAVEFRONTS: 3})], nvtx=False,
                   units={bm.ST_INSTRUCTIONS: "Kinst", bm.LD_WAVEFRONTS: ""})
    df = conflicts.parse_ncu_csv(text)
    assert df.config[0] == "128x128x64_w2x2_s4_cp" and df.N[0] == 28672
    assert df[bm.ST_INSTRUCTIONS][0] == 12000 and df[bm.LD_WAVEFRONTS][0] == 3


def test_range_regex_matches_every_range_name():
    for kind in configs.KINDS:
        for cfg in registry.variants(kind):
            name = range_name(kind, cfg.name, 11008, 4096, 1)
            assert conflicts.RANGE_RE.fullmatch(name)
            # what ncu's include expression (without 'regex:' and the nesting '/') selects
            assert re.match(conflicts.NVTX_INCLUDE[len("regex:"):-1], name)
    assert not conflicts.RANGE_RE.search("fp16:cublas:K4096:N4096:M16")


# ---------------------------------------------------------------- model comparison


def measured_rows(cases):
    rows = []
    for kind, name, K, N, M in cases:
        pred = bm.predict_counts(kind, configs.TileConfig.parse(name), M, K, N, 1)
        metrics = {m: pred[conflicts.LDGSTS_METRICS.get(m, m)] for m in conflicts.ALL_METRICS}
        rows.append((range_name(kind, name, K, N, M), f"{kind}_gemm", metrics))
    return rows


def test_compare_with_model_ratios():
    cases = [("awq", AWQ.name, 4096, 4096, 16), ("quick", QUICK.name, 4096, 4096, 256)]
    df = conflicts.parse_ncu_csv(ncu_csv(measured_rows(cases)))
    df.loc[0, bm.ST_WAVEFRONTS] = 2 * df.loc[0, bm.ST_WAVEFRONTS]
    df.loc[1, bm.ST_CONFLICTS] = 5  # model says 0
    out = conflicts.compare_with_model(df)
    assert len(out) == 2 and out.split_k.tolist() == [1, 1]
    assert out[f"ratio:{bm.ST_WAVEFRONTS}"][0] == 2.0
    assert out[f"ratio:{bm.LD_WAVEFRONTS}"].tolist() == [1.0, 1.0]
    assert out[f"ratio:{bm.ST_INSTRUCTIONS}"][1] == 1.0  # 0 measured, 0 predicted
    assert math.isinf(out[f"ratio:{bm.ST_CONFLICTS}"][1])
    assert out[f"model:{bm.LDSM_INSTRUCTIONS}"][0] == 81920
    ldgsts = "smsp__sass_l1tex_data_pipe_lsu_wavefronts_mem_shared_op_ldgsts.sum"
    assert out[f"model:{ldgsts}"][1] == bm.predict_counts("quick", QUICK, 256, 4096, 4096)[bm.LDGSTS_WAVEFRONTS]
    assert out[f"ratio:{ldgsts}"].tolist() == [1.0, 1.0]
    # a metric ncu did not report: measured and ratio NaN, the model still there
    out = conflicts.compare_with_model(df.drop(columns=[bm.LDSM_INSTRUCTIONS]))
    assert out[bm.LDSM_INSTRUCTIONS].isna().all() and out[f"ratio:{bm.LDSM_INSTRUCTIONS}"].isna().all()
    assert out[f"model:{bm.LDSM_INSTRUCTIONS}"][0] == 81920


# ---------------------------------------------------------------- target script and command


def test_profile_cases_resolve_defaults_and_skip_misfits():
    cases = conflicts.profile_cases(conflicts.default_kind_cfgs(), [(4096, 4096)], [16, 256])
    q16 = dispatch.default_config("quick", 16, 4096, 128).name
    q256 = dispatch.default_config("quick", 256, 4096, 128).name
    expected = []
    for M, q in ((16, q16), (256, q256)):
        for case in (("awq", AWQ.name, 4096, 4096, M), ("quick", QUICK.name, 4096, 4096, M), ("quick", q, 4096, 4096, M)):
            if case not in expected:
                expected.append(case)
    assert cases == expected
    # N = 4160 is no multiple of tile_n = 128: those configs are skipped, the 64-wide one is kept
    assert conflicts.profile_cases([("awq", AWQ), ("awq", "16x64x32_w1x1_s1")], [(4096, 4160)], [16]) == [
        ("awq", "16x64x32_w1x1_s1", 4096, 4160, 16)]


def test_case_list_round_trips(tmp_path):
    kind_cfgs = conflicts.default_kind_cfgs()
    cases = conflicts.profile_cases(kind_cfgs, [(4096, 4096)], [16, 256])
    path = conflicts.cases_file(kind_cfgs, [(4096, 4096)], [16, 256], path=tmp_path / "cases.json")
    assert conflicts_target.read_cases(path) == (cases, conflicts.SPLIT_K, conflicts.GROUP_SIZE) == (cases, 1, 128)
    assert ("awq", AWQ.name, 4096, 4096, 256) in cases
    tmp = conflicts.cases_file([("quick", QUICK)], [(4096, 4096)], [1])
    try:
        assert tmp.suffix == ".json"
        assert conflicts_target.read_cases(tmp) == ([("quick", QUICK.name, 4096, 4096, 1)], 1, 128)
    finally:
        tmp.unlink()


def test_write_cases_rejects_what_the_target_cannot_run(tmp_path):
    for bad in (("fp16", AWQ.name, 4096, 4096, 1), ("awq", "16x128x32/w1x2_s1", 4096, 4096, 1),
                ("awq", AWQ.name, 4096, 4096), ("awq", "16x128x32_w1x2_s4", 4096, 4096, 1)):
        with pytest.raises(ValueError):
            conflicts.write_cases([bad], tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps([["awq", AWQ.name, 4096, 4096, 1]]))
    with pytest.raises(ValueError, match="split_k"):
        conflicts_target.read_cases(tmp_path / "c.json")


def test_target_command_runs_this_module():
    assert conflicts_target.command("c.json", "python3") == ["python3", "-m", "quick_lab.lab.conflicts_target",
                                                             "c.json"]
    assert importlib.import_module(conflicts_target.MODULE) is conflicts_target
    env = conflicts_target.environment({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(conflicts_target.Path(cli.__file__).resolve().parents[1]),
                                                   "/elsewhere"]


def _run_target(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", conflicts_target.MODULE, *map(str, args)], cwd=tmp_path,
                          env=conflicts_target.environment(), capture_output=True, text=True, timeout=300)


def test_target_usage_errors(tmp_path):
    proc = _run_target(tmp_path)
    assert proc.returncode == 2 and "usage: python -m quick_lab.lab.conflicts_target CASES.json" in proc.stderr
    proc = _run_target(tmp_path, tmp_path / "missing.json")
    assert proc.returncode == 2 and "cannot read the case list" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(cuda_device_status()[0], reason="tests the target without a GPU")
def test_target_without_gpu_fails_at_the_first_cuda_call(tmp_path):
    """As the generated script did: the weight upload fails (a CUDA error, exit code 1); nothing is ranged."""
    path = conflicts.write_cases([("awq", AWQ.name, 256, 128, 1)], tmp_path / "cases.json")
    proc = _run_target(tmp_path, path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ranged launches" not in proc.stderr


def test_target_ranges_exactly_one_launch_per_case(tmp_path, monkeypatch, capsys):
    """The target's NVTX ranges: range_name(kind, config, K, N, M) in case order, one ranged launch
    each (after an unranged warm-up), split_k pinned; one weight per (K, N)."""
    events, active = [], []
    device = types.SimpleNamespace(synchronize=lambda: None)
    fake_cupy = types.SimpleNamespace(asarray=lambda a: a, cuda=types.SimpleNamespace(Device=lambda: device))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)

    @contextlib.contextmanager
    def nvtx_range(name):
        assert "/" not in name
        active.append(name)
        yield
        active.pop()

    def planner(kind):
        def plan(x, weight, *, config, split_k):
            assert weight == f"{kind}-weight" and split_k == conflicts.SPLIT_K
            return types.SimpleNamespace(run=lambda: events.append((kind, config.name, x.shape, tuple(active))))
        return plan

    problems = []

    def random_problem(K, N, G):
        problems.append((K, N, G))
        return types.SimpleNamespace(K=K, N=N, awq="awq-weight", quick="quick-weight")

    monkeypatch.setattr(conflicts_target, "nvtx_range", nvtx_range)
    monkeypatch.setattr(conflicts_target.Problem, "random", staticmethod(random_problem))
    monkeypatch.setattr(conflicts_target.ops, "plan_awq_gemm", planner("awq"))
    monkeypatch.setattr(conflicts_target.ops, "plan_quick_gemm", planner("quick"))
    cases = conflicts.profile_cases(conflicts.default_kind_cfgs(), [(4096, 4096), (4096, 11008)], [16, 256])
    path = conflicts.write_cases(cases, tmp_path / "cases.json")
    assert conflicts_target.main([str(path)]) == 0
    assert problems == [(4096, 4096, 128), (4096, 11008, 128)]
    expected = []
    for kind, name, K, N, M in cases:
        expected += [(kind, name, (M, K), ()), (kind, name, (M, K), (range_name(kind, name, K, N, M),))]
    assert events == expected
    assert all(conflicts.RANGE_RE.fullmatch(r[0]) for *_, r in events[1::2])
    assert f"{len(cases)} ranged launches" in capsys.readouterr().err


def test_ncu_command():
    cmd = conflicts.ncu_command("c.json", "ncu", "python3")
    assert cmd[0] == "ncu" and cmd[-4:] == ["python3", "-m", "quick_lab.lab.conflicts_target", "c.json"]
    assert conflicts.ncu_command("c.json")[-4] == sys.executable
    assert cmd[cmd.index("--nvtx-include") + 1] == "regex:(awq|quick):.*/"
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:(awq_gemm|quick_gemm|quick_wgmma|quick_decode)" == conflicts.KERNEL_FILTER
    assert cmd[cmd.index("--clock-control") + 1] == "none"
    assert "--nvtx" in cmd and "--csv" in cmd
    metrics = cmd[cmd.index("--metrics") + 1].split(",")
    assert metrics == conflicts.ALL_METRICS and metrics[:7] == conflicts.NCU_METRICS == list(bm.NCU_METRICS)
    assert "--print-units" in cmd and cmd[cmd.index("--print-units") + 1] == "base"


def test_kernel_filter_selects_only_the_gemm_kernels():
    pattern = re.compile(conflicts.KERNEL_FILTER[len("regex:"):])
    for fam in registry.FAMILIES:
        assert pattern.search(fam.name)
    for other in ("dequantize_awq", "dequantize_quick_t", "splitk_reduce"):
        assert not pattern.search(other)


def _no_subprocess(*args, **kwargs):
    raise AssertionError("ncu must not be started")


def test_run_ncu_without_ncu(monkeypatch):
    monkeypatch.setattr(conflicts.shutil, "which", lambda name: None)
    monkeypatch.setattr(conflicts, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(conflicts.subprocess, "run", _no_subprocess)
    with pytest.raises(RuntimeError, match="not on PATH"):
        conflicts.run_ncu()


def test_run_ncu_without_gpu(monkeypatch):
    monkeypatch.setattr(conflicts.shutil, "which", lambda name: "/usr/local/cuda/bin/ncu")
    monkeypatch.setattr(conflicts, "cuda_device_status", lambda: (False, "no usable CUDA device: testing"))
    monkeypatch.setattr(conflicts.subprocess, "run", _no_subprocess)
    with pytest.raises(conflicts.NcuUnavailable, match="no usable CUDA device: testing"):
        conflicts.run_ncu()


def test_summary_table():
    cases = [("awq", AWQ.name, 4096, 4096, 16), ("quick", QUICK.name, 4096, 4096, 256)]
    df = conflicts.compare_with_model(conflicts.parse_ncu_csv(ncu_csv(measured_rows(cases))))
    df.loc[1, bm.LD_CONFLICTS] = math.nan  # not measured
    table = conflicts.summary_table(df)
    assert list(table.columns) == ["kind", "config", "M"] + [label for label, _ in conflicts.SUMMARY]
    assert table.kind.tolist() == ["awq", "quick"] and table.M.tolist() == [16, 256]
    model = int(df.loc[0, f"model:{bm.ST_WAVEFRONTS}"])
    assert table.loc[0, "st wf"] == f"{model:,} / {model:,}"
    assert table.loc[1, "ld conf"] == f"n/a / {int(df.loc[1, f'model:{bm.LD_CONFLICTS}']):,}"


def test_cli_defaults_and_exit_code_2(monkeypatch, capsys, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["conflicts", "--out", str(tmp_path)])
    assert args.shapes == conflicts.DEFAULT_SHAPES == ((4096, 4096),) and args.batches == (16, 256)
    assert args.timeout == conflicts.DEFAULT_TIMEOUT_S and args.func is cli.cmd_conflicts
    assert parser.parse_args(["conflicts", "--shapes", "8192x8192", "--batches", "1,16"]).shapes == ((8192, 8192),)
    monkeypatch.setattr(conflicts.shutil, "which", lambda name: None)
    monkeypatch.setattr(conflicts, "cuda_device_status", lambda: (False, "no usable CUDA device: testing"))
    monkeypatch.setattr(conflicts.subprocess, "run", _no_subprocess)
    assert cli.main(["conflicts", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not on PATH" in err and "no usable CUDA device: testing" in err
    assert not list(tmp_path.iterdir())


def test_cli_end_to_end_with_fake_ncu(monkeypatch, tmp_path, capsys):
    """A stand-in ncu prints a canned CSV (measured = model): the command writes conflicts.csv
    with unit ratios and the metadata file, and ncu receives the documented arguments."""
    cases = conflicts.profile_cases(conflicts.default_kind_cfgs(), [(4096, 4096)], [16, 256])
    (tmp_path / "canned.csv").write_text(ncu_csv(measured_rows(cases), nvtx=False))
    fake = tmp_path / "ncu"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "Version 2099.1.0 (fake)"; exit 0; fi
        printf '%s\\n' "$@" > {tmp_path / 'args.txt'}
        for a; do last=$a; done; cp "$last" {tmp_path / 'cases.json'}
        pwd > {tmp_path / 'cwd.txt'}
        cat {tmp_path / 'canned.csv'}
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(conflicts, "cuda_device_status", lambda: (True, ""))
    out = tmp_path / "results"
    assert cli.main(["conflicts", "--ncu", str(fake), "--out", str(out)]) == 0
    import pandas as pd

    df = pd.read_csv(out / "conflicts.csv")
    assert len(df) == len(cases)
    for m in conflicts.ALL_METRICS:
        assert (df[f"ratio:{m}"] == 1.0).all()
    meta = json.loads((out / "conflicts.meta.json").read_text())
    assert meta["split_k"] == 1 and meta["ncu_version"] == "Version 2099.1.0 (fake)"
    assert meta["group_size"] == 128 and meta["metrics"] == conflicts.ALL_METRICS
    assert " python3 -m quick_lab.lab.conflicts_target " in meta["ncu_command"]
    assert (out / "conflicts.ncu.csv").read_text().startswith("==WARNING==")  # raw output kept verbatim
    argv = (tmp_path / "args.txt").read_text().splitlines()
    assert argv[argv.index("--nvtx-include") + 1] == "regex:(awq|quick):.*/"
    assert argv[-4:-1] == [sys.executable, "-m", "quick_lab.lab.conflicts_target"]
    assert argv[-1].endswith(".json") and not os.path.exists(argv[-1])  # temp case list removed afterwards
    assert conflicts_target.read_cases(tmp_path / "cases.json") == (cases, 1, 128)
    cwd = (tmp_path / "cwd.txt").read_text().strip()
    assert os.path.dirname(argv[-1]) == cwd and not os.path.exists(cwd)  # ncu ran in the temp dir
    printed = capsys.readouterr().out
    assert "measured / model per launch" in printed and conflicts.summary_table(df).to_string(index=False) in printed

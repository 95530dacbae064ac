"""CPU tests of the Nsight Compute runner (quick_lab.lab.conflicts): CSV parsing, the target script,
the command line and the no-ncu / no-GPU paths. No GPU and no ncu are needed."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import textwrap

import pytest

from quick_lab.lab import bank_model as bm
from quick_lab.lab import conflicts
from quick_lab.core import configs, ops
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
    args = ", ".join(str(a) for a in configs.template_name(kind, cfg).split("<")[1].rstrip(">").split(","))
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
        for cfg in configs.variants(kind):
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
    q16 = ops.default_config("quick", 16, 4096, 128).name
    q256 = ops.default_config("quick", 256, 4096, 128).name
    expected = []
    for M, q in ((16, q16), (256, q256)):
        for case in (("awq", AWQ.name, 4096, 4096, M), ("quick", QUICK.name, 4096, 4096, M), ("quick", q, 4096, 4096, M)):
            if case not in expected:
                expected.append(case)
    assert cases == expected
    # N = 4160 is no multiple of tile_n = 128: those configs are skipped, the 64-wide one is kept
    assert conflicts.profile_cases([("awq", AWQ), ("awq", "16x64x32_w1x1_s1")], [(4096, 4160)], [16]) == [
        ("awq", "16x64x32_w1x1_s1", 4096, 4160, 16)]


def test_profile_script_is_valid_python(tmp_path):
    path = conflicts.profile_script(conflicts.default_kind_cfgs(), [(4096, 4096)], [16, 256],
                                    path=tmp_path / "target.py")
    source = path.read_text()
    compile(source, str(path), "exec")
    assert "nvtx_range(range_name(kind, name, K, N, M))" in source
    assert "SPLIT_K = 1" in source
    assert repr(("awq", AWQ.name, 4096, 4096, 256)) in source
    tmp = conflicts.profile_script([("quick", QUICK)], [(4096, 4096)], [1])
    try:
        compile(tmp.read_text(), str(tmp), "exec")
        assert tmp.suffix == ".py"
    finally:
        tmp.unlink()


def test_ncu_command():
    cmd = conflicts.ncu_command("t.py", "ncu", "python3")
    assert cmd[0] == "ncu" and cmd[-2:] == ["python3", "t.py"]
    assert cmd[cmd.index("--nvtx-include") + 1] == "regex:(awq|quick):.*/"
    assert cmd[cmd.index("--kernel-name") + 1] == "regex:(awq|quick)_gemm"
    assert cmd[cmd.index("--clock-control") + 1] == "none"
    assert "--nvtx" in cmd and "--csv" in cmd
    metrics = cmd[cmd.index("--metrics") + 1].split(",")
    assert metrics == conflicts.ALL_METRICS and metrics[:7] == conflicts.NCU_METRICS == list(bm.NCU_METRICS)
    assert "--print-units" in cmd and cmd[cmd.index("--print-units") + 1] == "base"


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


def parser():
    p = argparse.ArgumentParser()
    conflicts.add_parser(p.add_subparsers(dest="command"))
    return p


def test_cli_defaults_and_exit_code_2(monkeypatch, capsys, tmp_path):
    args = parser().parse_args(["conflicts", "--out", str(tmp_path)])
    assert args.shapes == ((4096, 4096),) and args.batches == (16, 256)
    assert parser().parse_args(["conflicts", "--shapes", "8192x8192", "--batches", "1,16"]).shapes == ((8192, 8192),)
    monkeypatch.setattr(conflicts.shutil, "which", lambda name: None)
    monkeypatch.setattr(conflicts, "cuda_device_status", lambda: (False, "no usable CUDA device: testing"))
    monkeypatch.setattr(conflicts.subprocess, "run", _no_subprocess)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "not on PATH" in err and "no usable CUDA device: testing" in err
    assert not list(tmp_path.iterdir())


def test_cli_end_to_end_with_fake_ncu(monkeypatch, tmp_path):
    """A stand-in ncu prints a canned CSV (measured = model): the command writes conflicts.csv
    with unit ratios and the metadata file, and ncu receives the documented arguments."""
    cases = conflicts.profile_cases(conflicts.default_kind_cfgs(), [(4096, 4096)], [16, 256])
    (tmp_path / "canned.csv").write_text(ncu_csv(measured_rows(cases), nvtx=False))
    fake = tmp_path / "ncu"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "Version 2099.1.0 (fake)"; exit 0; fi
        printf '%s\\n' "$@" > {tmp_path / 'args.txt'}
        cat {tmp_path / 'canned.csv'}
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(conflicts, "cuda_device_status", lambda: (True, ""))
    out = tmp_path / "results"
    args = parser().parse_args(["conflicts", "--ncu", str(fake), "--out", str(out)])
    assert args.func(args) == 0
    import pandas as pd

    df = pd.read_csv(out / "conflicts.csv")
    assert len(df) == len(cases)
    for m in conflicts.ALL_METRICS:
        assert (df[f"ratio:{m}"] == 1.0).all()
    meta = json.loads((out / "conflicts.meta.json").read_text())
    assert meta["split_k"] == 1 and meta["ncu_version"] == "Version 2099.1.0 (fake)"
    assert (out / "conflicts.ncu.csv").read_text().startswith("==WARNING==")  # raw output kept verbatim
    argv = (tmp_path / "args.txt").read_text().splitlines()
    assert argv[argv.index("--nvtx-include") + 1] == "regex:(awq|quick):.*/"
    assert argv[-1].endswith(".py") and not os.path.exists(argv[-1])  # temp script removed afterwards

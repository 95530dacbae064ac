"""quick_lab.lab.sanitizer: summary parsing and report attribution on real compute-sanitizer output, the
target module (quick_lab.lab.sanitizer_target) and its case list, ``quick-lab check`` through the CLI
(CPU, with a fake compute-sanitizer), and on a GPU the check itself: memcheck must catch a planted
out-of-bounds write and pass our kernels."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import quick_lab
from quick_lab import cli
from quick_lab.build.device import cuda_device_status
from quick_lab.core import configs, registry, validation
from quick_lab.core.configs import STREAM_K
from quick_lab.core.format import random_awq, reference_gemm
from quick_lab.lab import sanitizer, sanitizer_target

# ---------------------------------------------------------------- real output (compute-sanitizer 2025.3.1, H100)

MEMCHECK_OOB = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at void awq_gemm<(int)16, (int)128, (int)32, (int)1, (int)2>(const unsigned short *, const unsigned int *, const unsigned int *, const unsigned short *, unsigned short *, float *, int *, int, int, int, int, int)+0x1f30
=========     by thread (0,0,0) in block (0,0,0)
=========     Access to 0x7f3d7a804000 is out of bounds
=========     and is 15,361 bytes after the nearest allocation at 0x7f3d7a800000 of size 1,024 bytes
=========
========= Invalid __global__ write of size 4 bytes
=========     at void oob<(int)4096>(float *, int)+0xa0
=========     by thread (1,0,0) in block (0,0,0)
=========     Access to 0x7f3d7a804004 is out of bounds
=========     and is 15,365 bytes after the nearest allocation at 0x7f3d7a800000 of size 1,024 bytes
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: _PyObject_MakeTpCall [0x14907d] in python3
=========         Host Frame: <module> in probe.py:14
=========
========= Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" on CUDA API call to cuMemcpyDtoH_v2.
=========     Saved host backtrace up to driver entry point at error
=========         Host Frame: _PyObject_MakeTpCall [0x14907d] in python3
=========
========= Target application returned an error
========= ERROR SUMMARY: 3 errors
"""

MEMCHECK_CLEAN = """\
========= COMPUTE-SANITIZER
QL-CASE 0 awq:16x64x32_w1x1_s1:split1:M1:K64:N64:G32
QL-DONE 1 cases, 0 mismatches
========= ERROR SUMMARY: 0 errors
"""

RACECHECK_HAZARDS = """\
========= COMPUTE-SANITIZER
========= Error: Potential WAW hazard detected at __shared__ 0x403 in block (0,0,0) :
=========     Write Thread (32,0,0) at racy+0xa0
=========     Write Thread (0,0,0) at racy+0xa0
=========     Current Value : 66, Incoming Value : 0
=========
========= Warning: Potential RAW hazard detected at __shared__ 0x40 in block (1,0,0) :
=========     Write Thread (3,0,0) at void quick_gemm<(int)16, (int)128, (int)32, (int)1, (int)2, (int)2, (int)0>(const unsigned short *, const uint4 *, const unsigned int *, const uint4 *, unsigned short *, float *, int *, int, int, int, int, int)+0x990
=========     Read Thread (40,0,0) at void quick_gemm<(int)16, (int)128, (int)32, (int)1, (int)2, (int)2, (int)0>(const unsigned short *, const uint4 *, const unsigned int *, const uint4 *, unsigned short *, float *, int *, int, int, int, int, int)+0xa10
=========
========= Error: Race reported between Write access at racy+0xa0
=========     and Write access at racy+0xa0 [64 hazards]
=========
========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warning)
"""

RACECHECK_CLEAN = """\
========= COMPUTE-SANITIZER
QL-DONE 44 cases, 0 mismatches
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""

INITCHECK_UNINIT = """\
========= COMPUTE-SANITIZER
========= Uninitialized __global__ memory read of size 4 bytes
=========     at uninit+0x60
=========     by thread (0,0,0) in block (0,0,0)
=========     Address 0x7fc4da800000
=========
========= Uninitialized __global__ memory read of size 4 bytes
=========     at dequantize_awq+0x60
=========     by thread (1,0,0) in block (0,0,0)
=========     Address 0x7fc4da800004
=========
========= ERROR SUMMARY: 1,024 errors
"""

SYNCCHECK_BARRIER = """\
========= COMPUTE-SANITIZER
========= Barrier error detected. Divergent thread(s) in warp.
=========     at badsync+0x70
=========     by thread (0,0,0) in block (0,0,0)
=========
========= ERROR SUMMARY: 1 error
"""

NO_SUMMARY = """\
========= COMPUTE-SANITIZER
========= Error: Device not supported
"""


@pytest.mark.parametrize("log, findings", [
    (MEMCHECK_OOB, 3), (MEMCHECK_CLEAN, 0), (RACECHECK_HAZARDS, 3), (RACECHECK_CLEAN, 0),
    (INITCHECK_UNINIT, 1024), (SYNCCHECK_BARRIER, 1), (NO_SUMMARY, None), ("", None),
])
def test_parse_summary(log, findings):
    assert sanitizer.parse_summary(log) == findings


def test_parse_summary_ignores_the_print_limit_line():
    log = ("========= ERROR SUMMARY: 396 errors\n"
           "========= ERROR SUMMARY: 196 errors were not printed. Use --print-limit option to adjust the "
           "number of printed errors\n")
    assert sanitizer.parse_summary(log) == 396


def test_parse_summary_takes_the_larger_of_both_racecheck_lines():
    log = RACECHECK_HAZARDS + "========= ERROR SUMMARY: 5 errors\n"
    assert sanitizer.parse_summary(log) == 5
    assert sanitizer.parse_summary("========= RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)") == 1


def test_attribution_maps_gemm_templates_to_variants():
    awq = sanitizer.attribute_reports(MEMCHECK_OOB)
    assert awq == {"awq:16x128x32_w1x2_s1": 1, "oob<4096>": 1, "(host)": 1}
    race = sanitizer.attribute_reports(RACECHECK_HAZARDS)
    quick = f"quick:{configs.TileConfig(16, 128, 32, 1, 2, 2).name}"
    if "quick_gemm<16,128,32,1,2,2,0>" not in sanitizer.variant_labels():  # template without ASYNC_W
        quick = "quick_gemm<16,128,32,1,2,2,0>"
    assert race == {"racy": 2, quick: 1}
    assert sanitizer.attribute_reports(INITCHECK_UNINIT) == {"uninit": 1, "dequantize_awq": 1}
    assert sanitizer.attribute_reports(SYNCCHECK_BARRIER) == {"badsync": 1}
    assert not sanitizer.attribute_reports(MEMCHECK_CLEAN) and not sanitizer.attribute_reports(RACECHECK_CLEAN)


def test_normalize_kernel():
    assert sanitizer.normalize_kernel("awq_gemm", "<(int)16, (int)128, (int)32, (int)1, (int)2>") == \
        "awq_gemm<16,128,32,1,2>"
    assert sanitizer.normalize_kernel("k", "<(unsigned int)4, (bool)1>") == "k<4,1>"
    assert sanitizer.normalize_kernel("racy", None) == "racy"


def test_every_variant_has_a_label():
    """Reports are attributed to variants of every family, Hopper's wgmma included."""
    labels = sanitizer.variant_labels()
    assert len(registry.FAMILIES) == 4
    for fam in registry.FAMILIES:
        assert fam.variants
        for cfg in fam.variants:
            assert labels[fam.template_name(cfg).replace(" ", "")] == f"{fam.kind}:{cfg.name}"
            assert labels[registry.template_name(fam.kind, cfg)] == f"{fam.kind}:{cfg.name}"
    dc = registry.QUICK_DECODE.variants[0]  # the SiLU x up writer is its own instantiation, its own row
    assert labels[registry.QUICK_DECODE.template_name(dc, "silu_mul")] == f"quick:{dc.name}:silu_mul"
    assert labels[registry.QUICK_DECODE.template_name(dc, "partials")] == f"quick:{dc.name}:partials"
    rows = sanitizer._rows_of(sanitizer.decode_cases())
    assert {f"quick:{dc.name}", f"quick:{dc.name}:silu_mul", f"quick:{dc.name}:partials"} <= set(rows)
    wg = registry.QUICK_WGMMA.variants[0]
    log = f"========= Invalid __shared__ read of size 16 bytes\n=========     at void " \
          f"{registry.QUICK_WGMMA.template_name(wg)}(const unsigned short *)+0x10\n========= ERROR SUMMARY: 1 error\n"
    assert sanitizer.attribute_reports(log) == {f"quick:{wg.name}": 1}


def test_our_kernels_come_from_the_registry():
    assert sanitizer.OUR_KERNELS == tuple(f.name for f in registry.FAMILIES) + ("dequantize", "interleave_awq")
    assert "quick_wgmma" in sanitizer.OUR_KERNELS


# ---------------------------------------------------------------- the case list and the target module


def test_case_list_round_trips_and_covers_every_variant(tmp_path):
    path = sanitizer.write_cases(None, tmp_path / "cases.json")
    cases = sanitizer_target.read_cases(path)
    assert cases == sanitizer.case_records(sanitizer.all_cases())
    assert [c["label"] for c in cases] == [c.label for c in sanitizer.all_cases()]
    for kind in configs.KINDS:
        for cfg in registry.variants(kind):
            mine = [c for c in cases if c["op"] == "gemm" and c["kind"] == kind and c["config"] == cfg.name]
            assert {c["split_k"] for c in mine} == set(sanitizer.SPLITS), (kind, cfg.name)
            assert {c["G"] for c in mine} == {G for G in (32, 64, 128) if registry.fits(cfg, cfg.tile_n, G)}, \
                (kind, cfg.name)
            assert all(registry.fits(cfg, c["N"], c["G"], K=c["K"], M=c["M"]) for c in mine), (kind, cfg.name)
            assert {c["N"] for c in mine} <= {cfg.tile_n, 2 * cfg.tile_n}
    ops = {(c["op"], c["kind"]) for c in cases}
    assert {("dequantize", "awq"), ("dequantize_quick_t", "quick"), ("interleave", "awq"), ("empty", "awq"),
            ("empty", "quick"), ("default", "awq"), ("default", "quick"), ("fallback", "quick")} <= ops
    gemm = [c for c in cases if c["op"] == "gemm"]
    assert {c["M"] for c in gemm} == set(sanitizer.ODD_M)
    assert {c["N"] == configs.TileConfig.parse(c["config"]).tile_n for c in gemm} == {True, False}


def test_wgmma_cases_cover_every_hopper_variant_with_stream_k():
    cases = sanitizer.wgmma_cases()
    hopper = [c for f in registry.FAMILIES if f not in registry.families(hopper=False) for c in f.variants]
    assert hopper and {c.config for c in cases} == {c.name for c in hopper}
    assert {c.op for c in cases} == {"gemm"} and {c.kind for c in cases} == {"quick"}
    for cfg in hopper:
        assert {c.split_k for c in cases if c.config == cfg.name} == {STREAM_K, *sanitizer.SPLITS}
    # stream-K only where the family has it
    assert all(c.split_k != STREAM_K for c in sanitizer.all_cases())
    assert sanitizer.splits_for(registry.QUICK_MMA, (STREAM_K, 1)) == (1,)
    assert sanitizer.splits_for(registry.QUICK_WGMMA, (1, 3)) == (STREAM_K, 1, 3)


def test_decode_cases_cover_every_decode_variant_split_and_group_size_within_its_rows():
    cases = sanitizer.decode_cases()
    assert {c.config for c in cases} == {c.name for c in configs.QUICK_DECODE_VARIANTS}
    for cfg in configs.QUICK_DECODE_VARIANTS:
        mine = [c for c in cases if c.config == cfg.name]
        assert {c.split_k for c in mine} == set(sanitizer.SPLITS) and {c.G for c in mine} == {32, 64, 128}
        assert all(1 <= c.M <= cfg.tile_m and c.K % cfg.tile_k == 0 for c in mine)
        # the SiLU x up writer: every split of every variant, on whole (gate, up) pairs
        silu = [c for c in mine if c.op == "gemm_silu_mul"]
        assert {c.split_k for c in silu} == set(sanitizer.SPLITS) and all(c.N % 64 == 0 for c in silu)
        # the writer that leaves the split slices to their reader: every split of every variant
        assert {c.split_k for c in mine if c.op == "gemm_partials"} == set(sanitizer.SPLITS)
    assert len({c.M for c in cases}) > 2  # odd batches rotate
    assert {c.op for c in cases} == {"gemm", "gemm_silu_mul", "gemm_partials"}
    assert set(sanitizer.WRITER_OPS.values()) == set(registry.EPILOGUES) - {"store"}
    assert all(c.op in sanitizer_target.OPS for c in cases)


@pytest.mark.parametrize("flags", [["--wgmma", "--decode"], ["--decode", "--decoder"], ["--wgmma", "--decoder"]])
def test_check_takes_one_variant_subset_at_a_time(flags, capsys):
    with pytest.raises(SystemExit):
        cli.main(["check", *flags])
    assert "not allowed with argument" in capsys.readouterr().err


def test_read_cases_rejects_what_is_not_a_case_list(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cases": []}))
    with pytest.raises(ValueError, match="JSON list"):
        sanitizer_target.read_cases(bad)
    record = sanitizer.case_records(sanitizer.support_cases()[:1])[0]
    bad.write_text(json.dumps([{k: v for k, v in record.items() if k != "label"}]))
    with pytest.raises(ValueError, match="lacks"):
        sanitizer_target.read_cases(bad)
    bad.write_text(json.dumps([{**record, "op": "transpose"}]))
    with pytest.raises(ValueError, match="unknown op"):
        sanitizer_target.read_cases(bad)


def test_target_command_runs_this_module():
    assert sanitizer.target_command("c.json", "py") == ["py", "-m", "quick_lab.lab.sanitizer_target", "c.json"]
    assert sanitizer.target_command("c.json")[0] == sys.executable
    assert importlib.import_module(sanitizer_target.MODULE) is sanitizer_target


def test_target_environment_imports_this_quick_lab(tmp_path):
    """From any working directory and whatever PYTHONPATH the caller had, the child imports the
    quick_lab the parent runs (its parent directory leads PYTHONPATH)."""
    decoy, work = tmp_path / "decoy", tmp_path / "work"
    (decoy / "quick_lab").mkdir(parents=True)  # a decoy package on the caller's PYTHONPATH
    (decoy / "quick_lab" / "__init__.py").write_text("raise ImportError('decoy')\n")
    work.mkdir()
    env = sanitizer_target.environment({"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(decoy)})
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == str(decoy) and env["PYTHONUNBUFFERED"] == "1"
    out = subprocess.run([sys.executable, "-c", "import quick_lab; print(quick_lab.__file__)"], cwd=work,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == quick_lab.__file__


def _run_target(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", sanitizer_target.MODULE, *map(str, args)], cwd=tmp_path,
                          env=sanitizer_target.environment(), capture_output=True, text=True, timeout=300)


def test_target_usage_errors(tmp_path):
    proc = _run_target(tmp_path)
    assert proc.returncode == sanitizer_target.USAGE_EXIT and "usage: python -m quick_lab.lab.sanitizer_target" \
        in proc.stderr
    (tmp_path / "c.json").write_text("not json")
    proc = _run_target(tmp_path, tmp_path / "c.json")
    assert proc.returncode == sanitizer_target.USAGE_EXIT and "cannot read the case list" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(cuda_device_status()[0], reason="tests the target without a GPU")
def test_target_without_gpu_fails_like_the_generated_script(tmp_path):
    """As the generated target script did: the first case's CUDA call fails (traceback, exit code 1),
    which the check reports as "the target failed" (never as a numeric mismatch)."""
    code, output = sanitizer.run_target_plain(sanitizer.support_cases()[:1], timeout=300)
    assert code == 1 and code != sanitizer.TARGET_MISMATCH_EXIT, output
    assert output.startswith("QL-CASE 0 default:awq:") and "Traceback" in output and "QL-DONE" not in output


def _fake_cupy(calls):
    device = types.SimpleNamespace(synchronize=lambda: calls.append("sync"))
    cuda = types.SimpleNamespace(set_allocator=lambda a: calls.append(("set_allocator", a)), Device=lambda: device)
    return types.SimpleNamespace(cuda=cuda, asnumpy=np.asarray)


def test_target_main_disables_the_pool_and_exits_3_on_a_mismatch(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls))
    cases = sanitizer.support_cases()[:3]
    path = sanitizer.write_cases(cases, tmp_path / "cases.json")
    verdicts = {cases[1].label: f"{cases[1].label}: relative error 1.00e+00"}

    def run(case):
        calls.append(case["label"])
        return verdicts.get(case["label"])

    monkeypatch.setattr(sanitizer_target, "run", run)
    assert sanitizer_target.main([str(path)]) == sanitizer_target.TARGET_MISMATCH_EXIT == sanitizer.TARGET_MISMATCH_EXIT
    assert calls[0] == ("set_allocator", None)  # before the first case touches the GPU
    assert calls[1:] == [x for c in cases for x in (c.label, "sync")]
    out = capsys.readouterr().out.splitlines()
    assert out == [f"QL-CASE 0 {cases[0].label}", f"QL-CASE 1 {cases[1].label}",
                   f"QL-MISMATCH {verdicts[cases[1].label]}", f"QL-CASE 2 {cases[2].label}",
                   "QL-DONE 3 cases, 1 mismatches"]
    verdicts.clear()
    assert sanitizer_target.main([str(path)]) == 0


def test_importing_the_target_leaves_the_allocator_alone():
    code = ("import cupy; cupy.cuda.set_allocator = lambda a: (_ for _ in ()).throw(AssertionError('set')); "
            "import quick_lab.lab.sanitizer_target, quick_lab.lab.sanitizer")
    subprocess.run([sys.executable, "-c", code], env=sanitizer_target.environment(), check=True, timeout=120)


def test_target_checks_against_the_float64_reference(monkeypatch):
    """The target's verdict on a GEMM result: finite and within REL_TOL of the float64 reference."""
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([]))
    host = random_awq(128, 64, 32, seed=1)
    x = np.random.default_rng(0).standard_normal((7, 128)).astype(np.float16)
    ref = reference_gemm(x, host)
    assert sanitizer_target.check_gemm(ref.astype(np.float16), x, host, "c") is None
    poisoned = ref.astype(np.float16)
    poisoned[3, 5] = np.nan  # an element the op left as the NaN the output was filled with
    assert sanitizer_target.check_gemm(poisoned, x, host, "c") == "c: NaN/Inf in the output"
    assert sanitizer_target.check_gemm((ref * 1.01).astype(np.float16), x, host, "c").startswith("c: relative error")
    assert sanitizer.REL_TOL == sanitizer_target.REL_TOL == 2e-3


def test_launch_budget():
    cases = sanitizer.all_cases()
    assert sanitizer.launch_count(cases) < 400  # compute-sanitizer costs ~100x per launch
    smoke = sanitizer.all_cases(*sanitizer.smoke_variants())
    assert sanitizer.launch_count(smoke) < 60


def test_every_gemm_case_passes_validation():
    for c in sanitizer.all_cases() + sanitizer.wgmma_cases():
        if c.op != "gemm":
            continue
        cfg = configs.TileConfig.parse(c.config)
        validation.check_problem(c.kind, cfg, c.M, c.K, c.N, c.G, c.split_k)  # raises if a case is invalid
        assert c.K % c.G == 0 and c.K % 16 == 0 and c.N % 64 == 0 and c.M % 2 == 1


def test_uneven_split_with_an_empty_slice_is_covered():
    # k_tiles = 4 split 3 ways: slices of 2, 2 and 0 k-tiles.
    def empty_slice(c):
        k_tiles = c.K // configs.TileConfig.parse(c.config).tile_k
        per = -(-k_tiles // c.split_k)
        return per * (c.split_k - 1) >= k_tiles

    assert any(empty_slice(c) for c in sanitizer.all_cases() if c.op == "gemm" and c.split_k > 1)


# ---------------------------------------------------------------- command line and plumbing (CPU)


def test_sanitizer_command_flags():
    cmd = sanitizer.sanitizer_command("racecheck", "c.json", python="py")
    assert cmd[1:3] == ["--tool", "racecheck"] and "--racecheck-report" in cmd
    assert cmd[cmd.index("--error-exitcode") + 1] == "1"
    assert "--kernel-name" not in cmd and "--padding" not in cmd  # every kernel instrumented by default
    assert cmd[-4:] == ["py", "-m", "quick_lab.lab.sanitizer_target", "c.json"]
    mem = sanitizer.sanitizer_command("memcheck", "c.json", kernel_names=sanitizer.OUR_KERNELS)
    assert "--padding" in mem and "--racecheck-report" not in mem
    assert mem[mem.index("--padding") + 1] == str(sanitizer.MEMCHECK_PADDING)
    assert [mem[i + 1] for i, a in enumerate(mem) if a == "--kernel-name"] == [f"kns={k}" for k in sanitizer.OUR_KERNELS]
    assert mem[-4:] == [sys.executable, "-m", "quick_lab.lab.sanitizer_target", "c.json"]
    assert sanitizer.sanitizer_command("synccheck", target=["py", "probe.py"])[-2:] == ["py", "probe.py"]
    with pytest.raises(ValueError, match="tool must be one of"):
        sanitizer.sanitizer_command("leakcheck", "c.json")


def test_cli_registers_check():
    parser = cli.build_parser()
    args = parser.parse_args(["check"])
    assert args.tools == sanitizer.TOOLS and args.out is None and args.func is cli.cmd_check
    assert args.timeout == sanitizer.DEFAULT_TIMEOUT_S and not args.smoke and not args.wgmma
    args = parser.parse_args(["check", "--tools", "memcheck,synccheck", "--out", "x", "--smoke"])
    assert args.tools == ("memcheck", "synccheck") and args.out == "x" and args.smoke
    with pytest.raises(SystemExit):
        parser.parse_args(["check", "--tools", "memcheck,leakcheck"])


def _no_check(*args, **kwargs):
    raise AssertionError("nothing may run")


def test_check_exits_2_without_compute_sanitizer(monkeypatch, capsys):
    monkeypatch.setattr(sanitizer, "sanitizer_path", lambda: None)
    monkeypatch.setattr(sanitizer, "check", _no_check)
    assert cli.main(["check"]) == 2
    assert "compute-sanitizer is not on PATH" in capsys.readouterr().err
    with pytest.raises(sanitizer.SanitizerError, match="not on PATH"):
        sanitizer.run_sanitizer("memcheck", script="print(1)")


def test_check_exits_2_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(sanitizer, "sanitizer_path", lambda: "/usr/bin/true")
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (False, "no usable CUDA device: test"))
    monkeypatch.setattr(sanitizer, "check", _no_check)
    assert cli.main(["check"]) == 2
    assert "none is usable: no usable CUDA device: test" in capsys.readouterr().err


def _fake_sanitizer(tmp_path, monkeypatch, output: str, code: int):
    """A stand-in compute-sanitizer on PATH that prints ``output`` and exits with ``code`` (a version
    line for ``--version``); it keeps its arguments in bin/args.txt and a copy of its last argument
    (the case list) in bin/last."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "compute-sanitizer"
    (bindir / "out.txt").write_text(output)
    exe.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'Version 2099.1.0 (fake)'; exit 0; fi\n"
                   f"printf '%s\\n' \"$@\" > '{bindir / 'args.txt'}'\n"
                   f"for a; do last=$a; done; cp \"$last\" '{bindir / 'last'}'\n"
                   f"cat '{bindir / 'out.txt'}'\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("compute-sanitizer") == str(exe)
    return bindir


def test_run_sanitizer_reports_findings(tmp_path, monkeypatch):
    _fake_sanitizer(tmp_path, monkeypatch, MEMCHECK_OOB, 1)
    findings, tail = sanitizer.run_sanitizer("memcheck", script="print('target')")
    assert findings == 3 and "ERROR SUMMARY: 3 errors" in tail


def test_run_sanitizer_runs_the_target_module_on_the_case_list(tmp_path, monkeypatch):
    bindir = _fake_sanitizer(tmp_path, monkeypatch, RACECHECK_CLEAN, 0)
    cases = sanitizer.support_cases()
    assert sanitizer.run_sanitizer("racecheck", cases)[0] == 0
    argv = (bindir / "args.txt").read_text().splitlines()
    assert argv[:2] == ["--tool", "racecheck"]
    assert argv[-4:-1] == [sys.executable, "-m", "quick_lab.lab.sanitizer_target"]
    assert argv[-1].endswith("cases.json") and not os.path.exists(argv[-1])  # temp dir removed afterwards
    assert sanitizer_target.read_cases(bindir / "last") == sanitizer.case_records(cases)
    with pytest.raises(TypeError, match="script="):
        sanitizer.run_sanitizer("racecheck", "print('target')")


def test_run_sanitizer_clean(tmp_path, monkeypatch):
    _fake_sanitizer(tmp_path, monkeypatch, RACECHECK_CLEAN, 0)
    assert sanitizer.run_sanitizer("racecheck", script="print('target')")[0] == 0


@pytest.mark.parametrize("output, code, words", [
    (NO_SUMMARY, 1, "no summary line"),
    (MEMCHECK_CLEAN, sanitizer.TARGET_MISMATCH_EXIT, "did not match the reference"),
    (MEMCHECK_CLEAN, 1, "the target failed"),
])
def test_run_sanitizer_without_a_verdict_raises(tmp_path, monkeypatch, output, code, words):
    _fake_sanitizer(tmp_path, monkeypatch, output, code)
    with pytest.raises(sanitizer.SanitizerError, match=words):
        sanitizer.run_sanitizer("memcheck", script="print('target')")


def _plain_ok(seen):
    def plain(cases, timeout, module=None):
        seen.append(list(cases))
        return 0, "QL-DONE"
    return plain


def test_check_command_end_to_end_with_fake_sanitizer(tmp_path, monkeypatch, capsys):
    bindir = _fake_sanitizer(tmp_path, monkeypatch, MEMCHECK_OOB, 1)
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (True, ""))
    seen = []
    monkeypatch.setattr(sanitizer, "run_target_plain", _plain_ok(seen))
    out = tmp_path / "res"
    argv = ["check", "--tools", "memcheck", "--out", str(out), "--smoke"]
    monkeypatch.setattr(sys, "argv", ["quick-lab", *argv])
    code = cli.main(argv)
    assert code == 1
    table = capsys.readouterr().out
    assert "awq:16x128x32_w1x2_s1" in table and "TOTAL (tool summary)" in table
    smoke = sanitizer.all_cases(*sanitizer.smoke_variants())
    assert seen == [smoke]
    assert sanitizer_target.read_cases(bindir / "last") == sanitizer.case_records(smoke)
    tool_argv = (bindir / "args.txt").read_text().splitlines()
    assert tool_argv[tool_argv.index("--padding") + 1] == "256"
    assert tool_argv[-3:-1] == ["-m", "quick_lab.lab.sanitizer_target"]
    rows = (out / "sanitizer.csv").read_text().splitlines()
    assert rows[0] == "tool,kernel,findings,status,seconds"
    assert any(r.startswith("memcheck,TOTAL,3,summary") for r in rows)
    assert "memcheck,awq:16x128x32_w1x2_s1,1,attributed," in rows
    assert "memcheck,dequantize_awq,0,attributed," in rows and "memcheck,(host),1,attributed," in rows
    meta = json.loads((out / "sanitizer.meta.json").read_text())
    assert meta["tools"] == ["memcheck"] and meta["smoke"] is True and meta["cases"] == len(smoke)
    assert meta["memcheck_padding_bytes"] == 256 and meta["kernel_filter"] == "none (every kernel instrumented)"
    assert meta["compute_sanitizer"] == "Version 2099.1.0 (fake)" and meta["command"] == " ".join(argv)
    assert (out / "sanitizer.memcheck.log").read_text() == MEMCHECK_OOB


def test_check_command_clean_run_exits_0(tmp_path, monkeypatch):
    _fake_sanitizer(tmp_path, monkeypatch, RACECHECK_CLEAN, 0)
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(sanitizer, "run_target_plain", _plain_ok([]))
    assert cli.main(["check", "--tools", "racecheck,synccheck", "--out", str(tmp_path / "r"), "--smoke"]) == 0
    rows = (tmp_path / "r" / "sanitizer.csv").read_text().splitlines()
    assert "racecheck,TOTAL,0,summary" in "\n".join(rows) and "synccheck,TOTAL,0,summary" in "\n".join(rows)


def test_check_wgmma_writes_its_own_files(tmp_path, monkeypatch, capsys):
    bindir = _fake_sanitizer(tmp_path, monkeypatch, MEMCHECK_CLEAN, 0)
    monkeypatch.setattr(cli, "cuda_device_status", lambda: (True, ""))
    seen = []
    monkeypatch.setattr(sanitizer, "run_target_plain", _plain_ok(seen))
    out = tmp_path / "w"
    assert cli.main(["check", "--wgmma", "--tools", "memcheck", "--out", str(out)]) == 0
    assert seen == [sanitizer.wgmma_cases()]
    assert sanitizer_target.read_cases(bindir / "last") == sanitizer.case_records(sanitizer.wgmma_cases())
    assert (out / "sanitizer_wgmma.csv").is_file() and (out / "sanitizer_wgmma.memcheck.log").is_file()
    assert not (out / "sanitizer.csv").exists()
    wg = registry.QUICK_WGMMA.variants[0]
    assert f"memcheck,quick:{wg.name},0,attributed," in (out / "sanitizer_wgmma.csv").read_text().splitlines()


def test_check_stops_when_the_plain_run_fails(tmp_path, monkeypatch, capsys):
    _fake_sanitizer(tmp_path, monkeypatch, MEMCHECK_CLEAN, 0)
    monkeypatch.setattr(sanitizer, "run_target_plain", lambda cases, timeout, module=None: (3, "QL-MISMATCH x\nQL-DONE"))
    monkeypatch.setattr(sanitizer, "run_sanitizer_full", _no_check)
    assert sanitizer.check(tmp_path / "p", tools=("memcheck",), smoke=True) == 1
    assert "the target failed without a sanitizer" in capsys.readouterr().err


# ---------------------------------------------------------------- on a GPU: the check can fail, and passes

needs_sanitizer = pytest.mark.skipif(shutil.which("compute-sanitizer") is None,
                                     reason="compute-sanitizer is not on PATH")

# A deliberately broken kernel and its correct twin. Their names contain "quick_gemm" so that the
# optional kernel filter (sanitizer.OUR_KERNELS) selects them too.
PROBE_CUDA = r"""
extern "C" __global__ void quick_gemm_oob_probe(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n + 32) out[i] = 1.0f;  // BUG: 32 elements past the end of the array
}
extern "C" __global__ void quick_gemm_inbounds_probe(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 1.0f;
}
"""


def _probe_script(kernel: str) -> str:
    return textwrap.dedent(f"""\
        import numpy as np
        import cupy
        cupy.cuda.set_allocator(None)
        kernel = cupy.RawKernel({PROBE_CUDA!r}, {kernel!r})
        n = 1000
        out = cupy.zeros(n, dtype=cupy.float32)
        kernel((8,), (128,), (out, np.int32(n)))
        cupy.cuda.Device().synchronize()
        assert float(out.sum()) == n
        print("probe done", flush=True)
        """)


@pytest.mark.gpu
@needs_sanitizer
def test_memcheck_catches_an_out_of_bounds_write():
    run = sanitizer.run_sanitizer_full("memcheck", script=_probe_script("quick_gemm_oob_probe"), timeout=300)
    assert run.findings > 0, run.tail()
    assert run.reports.get("quick_gemm_oob_probe", 0) > 0, run.tail()


@pytest.mark.gpu
@needs_sanitizer
def test_kernel_filter_instruments_the_named_kernels():
    run = sanitizer.run_sanitizer_full("memcheck", script=_probe_script("quick_gemm_oob_probe"), timeout=300,
                                       kernel_names=sanitizer.OUR_KERNELS)
    assert run.findings > 0, run.tail()


@pytest.mark.gpu
@needs_sanitizer
def test_memcheck_passes_the_correct_twin():
    findings, tail = sanitizer.run_sanitizer("memcheck", script=_probe_script("quick_gemm_inbounds_probe"),
                                             timeout=300)
    assert findings == 0, tail


@pytest.mark.gpu
@needs_sanitizer
@pytest.mark.parametrize("tool", sanitizer.TOOLS)
def test_reduced_variant_set_is_clean(tool):
    run = sanitizer.run_sanitizer_full(tool, sanitizer.all_cases(*sanitizer.smoke_variants()), timeout=600)
    assert run.findings == 0, f"{dict(run.reports)}\n{run.tail()}"
    assert "QL-DONE" in run.log and " 0 mismatches" in run.log

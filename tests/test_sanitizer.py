"""quick_lab.lab.sanitizer: summary parsing and report attribution on real compute-sanitizer output, the
generated target program, the command's plumbing (CPU, with a fake compute-sanitizer), and on a GPU
the check itself: memcheck must catch a planted out-of-bounds write and pass our kernels."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import textwrap

import pytest

from quick_lab.core import configs, validation
from quick_lab.lab import sanitizer

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
    labels = sanitizer.variant_labels()
    for kind in configs.KINDS:
        for cfg in configs.variants(kind):
            assert labels[configs.template_name(kind, cfg).replace(" ", "")] == f"{kind}:{cfg.name}"


# ---------------------------------------------------------------- the target program


def _cases_of(source: str) -> list[dict]:
    match = re.search(r"CASES = json\.loads\((.*)\)\n", source)
    assert match, "the target embeds its case list"
    return json.loads(eval(match.group(1)))  # a str literal written with repr()


def test_target_script_compiles_and_covers_every_variant():
    source = sanitizer.target_script()
    compile(source, "quick_lab_sanitizer_target.py", "exec")
    cases = _cases_of(source)
    assert [c["label"] for c in cases] == [c.label for c in sanitizer.all_cases()]
    for kind in configs.KINDS:
        for cfg in configs.variants(kind):
            mine = [c for c in cases if c["op"] == "gemm" and c["kind"] == kind and c["config"] == cfg.name]
            assert {c["split_k"] for c in mine} == set(sanitizer.SPLITS), (kind, cfg.name)
            assert {c["G"] for c in mine} == {G for G in (32, 64, 128) if G % cfg.tile_k == 0}, (kind, cfg.name)
            assert {c["N"] for c in mine} <= {cfg.tile_n, 2 * cfg.tile_n}
    ops = {(c["op"], c["kind"]) for c in cases}
    assert {("dequantize", "awq"), ("dequantize_quick_t", "quick"), ("empty", "awq"), ("empty", "quick"),
            ("default", "awq"), ("default", "quick"), ("fallback", "quick")} <= ops
    gemm = [c for c in cases if c["op"] == "gemm"]
    assert {c["M"] for c in gemm} == set(sanitizer.ODD_M)
    assert {c["N"] == configs.TileConfig.parse(c["config"]).tile_n for c in gemm} == {True, False}


def test_launch_budget():
    cases = sanitizer.all_cases()
    assert sanitizer.launch_count(cases) < 400  # compute-sanitizer costs ~100x per launch
    smoke = sanitizer.all_cases(*sanitizer.smoke_variants())
    assert sanitizer.launch_count(smoke) < 60


def test_every_gemm_case_passes_validation():
    for c in sanitizer.all_cases():
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
    cmd = sanitizer.sanitizer_command("racecheck", "t.py", python="py")
    assert cmd[1:3] == ["--tool", "racecheck"] and "--racecheck-report" in cmd
    assert cmd[cmd.index("--error-exitcode") + 1] == "1"
    assert "--kernel-name" not in cmd and "--padding" not in cmd  # every kernel instrumented by default
    assert cmd[-2:] == ["py", "t.py"]
    mem = sanitizer.sanitizer_command("memcheck", "t.py", kernel_names=sanitizer.OUR_KERNELS)
    assert "--padding" in mem and "--racecheck-report" not in mem
    assert [mem[i + 1] for i, a in enumerate(mem) if a == "--kernel-name"] == [f"kns={k}" for k in sanitizer.OUR_KERNELS]
    with pytest.raises(ValueError, match="tool must be one of"):
        sanitizer.sanitizer_command("leakcheck", "t.py")


def _parser():
    parser = argparse.ArgumentParser(prog="quick-lab")
    sanitizer.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_add_parser_registers_check():
    args = _parser().parse_args(["check"])
    assert args.tools == sanitizer.TOOLS and args.out is None and args.func is sanitizer.cmd_check
    args = _parser().parse_args(["check", "--tools", "memcheck,synccheck", "--out", "x", "--smoke"])
    assert args.tools == ("memcheck", "synccheck") and args.out == "x" and args.smoke
    with pytest.raises(SystemExit):
        _parser().parse_args(["check", "--tools", "memcheck,leakcheck"])


def test_check_exits_2_without_compute_sanitizer(monkeypatch, capsys):
    monkeypatch.setattr(sanitizer, "sanitizer_path", lambda: None)
    assert sanitizer.cmd_check(_parser().parse_args(["check"])) == 2
    assert "compute-sanitizer is not on PATH" in capsys.readouterr().err
    with pytest.raises(sanitizer.SanitizerError, match="not on PATH"):
        sanitizer.run_sanitizer("memcheck", "print(1)")


def test_check_exits_2_without_gpu(monkeypatch, capsys):
    import quick_lab.build.device

    monkeypatch.setattr(sanitizer, "sanitizer_path", lambda: "/usr/bin/true")
    monkeypatch.setattr(quick_lab.build.device, "cuda_device_status", lambda: (False, "no usable CUDA device: test"))
    assert sanitizer.cmd_check(_parser().parse_args(["check"])) == 2
    assert "none is usable: no usable CUDA device: test" in capsys.readouterr().err


def _fake_sanitizer(tmp_path, monkeypatch, output: str, code: int):
    """A stand-in compute-sanitizer on PATH that prints ``output`` and exits with ``code``."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "compute-sanitizer"
    (bindir / "out.txt").write_text(output)
    exe.write_text(f"#!/bin/sh\ncat '{bindir / 'out.txt'}'\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("compute-sanitizer") == str(exe)


def test_run_sanitizer_reports_findings(tmp_path, monkeypatch):
    _fake_sanitizer(tmp_path, monkeypatch, MEMCHECK_OOB, 1)
    findings, tail = sanitizer.run_sanitizer("memcheck", "print('target')")
    assert findings == 3 and "ERROR SUMMARY: 3 errors" in tail


def test_run_sanitizer_clean(tmp_path, monkeypatch):
    _fake_sanitizer(tmp_path, monkeypatch, RACECHECK_CLEAN, 0)
    assert sanitizer.run_sanitizer("racecheck", "print('target')")[0] == 0


@pytest.mark.parametrize("output, code, words", [
    (NO_SUMMARY, 1, "no summary line"),
    (MEMCHECK_CLEAN, sanitizer.TARGET_MISMATCH_EXIT, "did not match the reference"),
    (MEMCHECK_CLEAN, 1, "the target failed"),
])
def test_run_sanitizer_without_a_verdict_raises(tmp_path, monkeypatch, output, code, words):
    _fake_sanitizer(tmp_path, monkeypatch, output, code)
    with pytest.raises(sanitizer.SanitizerError, match=words):
        sanitizer.run_sanitizer("memcheck", "print('target')")


def test_check_command_end_to_end_with_fake_sanitizer(tmp_path, monkeypatch, capsys):
    import quick_lab.build.device

    _fake_sanitizer(tmp_path, monkeypatch, MEMCHECK_OOB, 1)
    monkeypatch.setattr(quick_lab.build.device, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(sanitizer, "run_target_plain", lambda script, timeout: (0, "QL-DONE"))
    out = tmp_path / "res"
    code = sanitizer.cmd_check(_parser().parse_args(["check", "--tools", "memcheck", "--out", str(out), "--smoke"]))
    assert code == 1
    table = capsys.readouterr().out
    assert "awq:16x128x32_w1x2_s1" in table and "TOTAL (tool summary)" in table
    rows = (out / "sanitizer.csv").read_text().splitlines()
    assert rows[0] == "tool,kernel,findings,status,seconds"
    assert any(r.startswith("memcheck,TOTAL,3,summary") for r in rows)
    assert "memcheck,awq:16x128x32_w1x2_s1,1,attributed," in rows
    assert "memcheck,dequantize_awq,0,attributed," in rows and "memcheck,(host),1,attributed," in rows
    meta = json.loads((out / "sanitizer.meta.json").read_text())
    assert meta["tools"] == ["memcheck"] and meta["smoke"] is True
    assert (out / "sanitizer.memcheck.log").read_text() == MEMCHECK_OOB


def test_check_command_clean_run_exits_0(tmp_path, monkeypatch):
    import quick_lab.build.device

    _fake_sanitizer(tmp_path, monkeypatch, RACECHECK_CLEAN, 0)
    monkeypatch.setattr(quick_lab.build.device, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(sanitizer, "run_target_plain", lambda script, timeout: (0, "QL-DONE"))
    args = _parser().parse_args(["check", "--tools", "racecheck,synccheck", "--out", str(tmp_path / "r"), "--smoke"])
    assert sanitizer.cmd_check(args) == 0


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
    run = sanitizer.run_sanitizer_full("memcheck", _probe_script("quick_gemm_oob_probe"), timeout=300)
    assert run.findings > 0, run.tail()
    assert run.reports.get("quick_gemm_oob_probe", 0) > 0, run.tail()


@pytest.mark.gpu
@needs_sanitizer
def test_kernel_filter_instruments_the_named_kernels():
    run = sanitizer.run_sanitizer_full("memcheck", _probe_script("quick_gemm_oob_probe"), timeout=300,
                                       kernel_names=sanitizer.OUR_KERNELS)
    assert run.findings > 0, run.tail()


@pytest.mark.gpu
@needs_sanitizer
def test_memcheck_passes_the_correct_twin():
    findings, tail = sanitizer.run_sanitizer("memcheck", _probe_script("quick_gemm_inbounds_probe"), timeout=300)
    assert findings == 0, tail


@pytest.mark.gpu
@needs_sanitizer
@pytest.mark.parametrize("tool", sanitizer.TOOLS)
def test_reduced_variant_set_is_clean(tool):
    script = sanitizer.target_script(sanitizer.all_cases(*sanitizer.smoke_variants()))
    run = sanitizer.run_sanitizer_full(tool, script, timeout=600)
    assert run.findings == 0, f"{dict(run.reports)}\n{run.tail()}"
    assert "QL-DONE" in run.log and " 0 mismatches" in run.log

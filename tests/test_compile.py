"""Every kernel variant compiles through NVRTC for sm_80 and sm_90 without a GPU, with no spills."""
from __future__ import annotations

import pytest

from quick_lab.core import configs, registry, variants
from quick_lab.build import nvrtc
from quick_lab.cli import main
from quick_lab.build.sources import assemble


@pytest.fixture(scope="module")
def reports():
    return variants.compile_all(("sm_80", "sm_90"))


def test_every_variant_of_both_kernels_compiles_for_both_archs(reports):
    for arch in ("sm_80", "sm_90"):
        built = {(r.kind, r.config) for r in reports if r.arch == arch}
        for kind in configs.KINDS:
            assert {(kind, c.name) for c in registry.variants(kind)} <= built


def test_no_variant_spills_or_uses_a_stack(reports):
    bad = [f"{r.kernel} {r.arch}: {r.spill_store_bytes}/{r.spill_load_bytes} B spills, {r.stack_bytes} B stack"
           for r in reports if r.spills or r.stack_bytes]
    assert not bad, bad


def test_resources_are_reported(reports):
    for r in reports:
        assert 16 <= r.registers <= 255, r
    quick = {r.config: r for r in reports if r.kind == "quick" and r.arch == "sm_90"}
    cfg = configs.QUICK_DEFAULT
    assert quick[cfg.name].dynamic_smem_bytes == registry.shared_bytes("quick", cfg)


def test_ptxas_log_parser_reads_registers_and_spills():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]"""
    assert nvrtc.parse_ptxas_log(log) == {"_Z3fooPf": {"registers": 168, "stack": 8, "spill_st": 12,
                                                        "spill_ld": 16, "smem": 2048}}


def test_assembled_source_splices_the_header_once_with_line_markers():
    text = assemble("quick_gemm.cu")
    assert '#include "common.cuh"' not in text
    assert text.count('#line 1 "common.cuh"') == 1
    assert '#line 1 "common.cuh"' in text and '#line 1 "quick_gemm.cu"' in text


def test_compile_command_prints_a_row_per_variant(capsys):
    assert main(["compile", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "no spills" in out
    assert out.count("quick_gemm<") == len(configs.QUICK_VARIANTS)


def test_compile_command_rejects_unknown_arch(capsys):
    assert main(["compile", "--arch", "sm_70"]) == 1
    assert "sm_70" in capsys.readouterr().err

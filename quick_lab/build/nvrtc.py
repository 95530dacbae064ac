"""Offline compilation through NVRTC: builds every kernel variant for any arch without a GPU.

Uses the NVRTC library of the pip wheel ``nvidia-cuda-nvrtc`` through CuPy's thin binding
(``cupy_backends.cuda.libs.nvrtc``), which needs no driver. ``-Xptxas=-v`` makes ptxas report,
per kernel, registers, stack frame and spill traffic; these reports feed ``quick-lab compile``
(``quick_lab.core.variants.compile_all``) and the tile study.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from quick_lab.build.sources import COMPILE_OPTIONS, SUPPORT_KERNELS, SUPPORT_TEMPLATES, assemble

DEFAULT_ARCHS = ("sm_80", "sm_90")
KNOWN_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


@dataclass(frozen=True)
class CompileReport:
    kernel: str            # name expression, e.g. quick_gemm<16,128,32,1,2,2>
    kind: str              # awq / quick / support
    config: str            # TileConfig name, "" for support kernels
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_smem_bytes: int
    dynamic_smem_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


class NvrtcError(RuntimeError):
    """NVRTC is missing or a compilation failed (the message carries the log)."""


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the shared library not found
        raise NvrtcError(
            "NVRTC is not available: install the CUDA extra, e.g. pip install -e '.[cuda13]' "
            f"(provides cupy-cuda13x and nvidia-cuda-nvrtc). Cause: {exc}") from exc
    return nvrtc


def nvrtc_version() -> str:
    major, minor = _nvrtc().getVersion()
    return f"{major}.{minor}"


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, stack, spill stores/loads, static smem, from ``-Xptxas=-v``."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = out.setdefault(m.group(1), {"registers": 0, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0})
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


_nonce = itertools.count()


def compile_source(filename: str, name_expressions: tuple[str, ...], arch: str) -> tuple[dict[str, str], str]:
    """Compile kernels/<filename> for ``arch``; returns ({name expression or C name: mangled}, log)."""
    lowered, log, _ = compile_cubin(filename, name_expressions, arch)
    return lowered, log


def compile_cubin(filename: str, name_expressions: tuple[str, ...], arch: str,
                  report: bool = True) -> tuple[dict[str, str], str, bytes]:
    """Like :func:`compile_source`, also returning the cubin (loaded by quick_lab.build.loader for sm_90a,
    an arch CuPy's own NVRTC call cannot target). ``report=False``: no ptxas report is wanted, so the
    program is compiled exactly as assembled (the same text always gives the same cubin)."""
    nvrtc = _nvrtc()
    # A never-repeated device symbol: on an H100 machine's NVRTC a second in-process compile of the
    # same program came back with an empty ptxas log (served from a cache keyed on the generated
    # code, so a -D macro did not help), and the report needs the log.
    source = assemble(filename)
    if report:
        source += f'extern "C" __device__ int quick_lab_report_build_{next(_nonce)} = 0;\n'
    program = nvrtc.createProgram(source, filename, [], [])
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(program, expr)
        options = [f"-arch={arch}", *COMPILE_OPTIONS] + (["-Xptxas=-v"] if report else [])
        try:
            nvrtc.compileProgram(program, options)
        except Exception as exc:
            raise NvrtcError(f"compiling {', '.join(name_expressions) or filename} for {arch} failed:\n"
                             f"{nvrtc.getProgramLog(program)}") from exc
        log = nvrtc.getProgramLog(program)
        lowered = {expr: nvrtc.getLoweredName(program, expr) for expr in name_expressions}
        cubin = nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    return lowered, log, cubin


def compile_support(arch: str) -> list[CompileReport]:
    reports = []
    for filename in sorted(set(SUPPORT_KERNELS.values()) | set(SUPPORT_TEMPLATES)):
        _, log = compile_source(filename, SUPPORT_TEMPLATES.get(filename, ()), arch)
        for name, u in parse_ptxas_log(log).items():
            reports.append(CompileReport(name, "support", "", arch, u["registers"], u["stack"], u["spill_st"],
                                         u["spill_ld"], u["smem"], 0))
    return reports


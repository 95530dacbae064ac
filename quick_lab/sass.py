"""Instruction counts from the SASS of a kernel variant (cuobjdump), to show where shared memory is
used: the QUICK kernel must have no STS for weights and LDSM only for activations."""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import configs
from .nvrtc import _nvrtc
from .sources import COMPILE_OPTIONS, GEMM_SOURCES, assemble

OPCODES = ("LDG", "STS", "LDS", "LDSM", "LDGSTS", "HMMA", "LOP3", "HFMA2", "HADD2", "HMUL2", "PRMT", "BAR", "STG")
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def cubin(kind: str, cfg: configs.TileConfig, arch: str = "sm_90") -> bytes:
    nvrtc = _nvrtc()
    name = configs.template_name(kind, cfg)
    program = nvrtc.createProgram(assemble(GEMM_SOURCES[kind]), GEMM_SOURCES[kind], [], [])
    try:
        nvrtc.addNameExpression(program, name)
        nvrtc.compileProgram(program, [f"-arch={arch}", *COMPILE_OPTIONS])
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def count_opcodes(sass_text: str) -> collections.Counter:
    """Counts static SASS instructions by base opcode (``LDSM.16.MT88.4`` counts as LDSM)."""
    counts = collections.Counter()
    for m in _OPCODE.finditer(sass_text):
        counts[m.group(1).split(".")[0]] += 1
    return counts


def disassemble(binary: bytes) -> str:
    """SASS text of a cubin, through cuobjdump or nvdisasm (both ship with the CUDA toolkit)."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(binary)
        for tool, args in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
            exe = shutil.which(tool)
            if exe is None:
                errors.append(f"{tool}: not on PATH")
                continue
            run = subprocess.run([exe, *args, str(path)], capture_output=True, text=True)
            if run.returncode == 0 and run.stdout.strip():
                return run.stdout
            errors.append(f"{tool}: exit {run.returncode}: {run.stderr.strip()[:300]}")
    raise RuntimeError("could not disassemble: " + "; ".join(errors))


def sass_counts(kind: str, cfg: configs.TileConfig, arch: str = "sm_90") -> dict[str, int]:
    counts = count_opcodes(disassemble(cubin(kind, cfg, arch)))
    return {op: counts.get(op, 0) for op in OPCODES}

"""Which instructions a kernel variant is made of: the evidence that QUICK's weights never touch
shared memory as fp16. PTX comes from NVRTC on any machine (no GPU needed); SASS needs a disassembler
that reads NVRTC's cubins (cuobjdump / nvdisasm of the same CUDA release)."""
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

# PTX opcodes that touch shared memory or the tensor cores, by what they do in these kernels.
PTX_CLASSES = {
    "st.shared.v4": "STS.128: 16-byte shared store (the baseline's fp16 weight write-back)",
    "st.shared": "STS: any plain shared store (the split-K epilogue's one-word flag included)",
    "ld.shared": "LDS: plain shared load (staged QUICK: packed weights, scales, zeros)",
    "ldmatrix": "LDSM: ldmatrix (A fragments; B fragments in the baseline)",
    "cp.async": "LDGSTS: asynchronous global -> shared copy",
    "mma.sync": "HMMA: tensor-core mma.sync",
    "lop3.b32": "LOP3: the int4 -> fp16 dequantizer",
}


def _program(kind: str, cfg: configs.TileConfig, arch: str):
    nvrtc = _nvrtc()
    name = configs.template_name(kind, cfg)
    program = nvrtc.createProgram(assemble(GEMM_SOURCES[kind]), GEMM_SOURCES[kind], [], [])
    nvrtc.addNameExpression(program, name)
    nvrtc.compileProgram(program, [f"-arch={arch}", *COMPILE_OPTIONS])
    return nvrtc, program


def ptx(kind: str, cfg: configs.TileConfig, arch: str = "sm_90") -> str:
    nvrtc, program = _program(kind, cfg, arch)
    try:
        text = nvrtc.getPTX(program)
        return text.decode() if isinstance(text, bytes) else text
    finally:
        nvrtc.destroyProgram(program)


def cubin(kind: str, cfg: configs.TileConfig, arch: str = "sm_90") -> bytes:
    nvrtc, program = _program(kind, cfg, arch)
    try:
        return nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)


def ptx_counts(kind: str, cfg: configs.TileConfig, arch: str = "sm_90") -> dict[str, int]:
    """Static PTX instruction counts per class of :data:`PTX_CLASSES` (after full unrolling)."""
    counts = collections.Counter()
    for line in ptx(kind, cfg, arch).splitlines():
        op = line.strip().split(" ")[0].split("\t")[0]
        for cls in PTX_CLASSES:
            if op.startswith(cls):
                counts[cls] += 1
    return {cls: counts.get(cls, 0) for cls in PTX_CLASSES}


SASS_OPCODES = ("STS", "LDS", "LDSM", "LDGSTS", "HMMA", "LOP3", "LDG")
_SASS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_counts(kind: str, cfg: configs.TileConfig, arch: str = "sm_90") -> dict[str, int]:
    """Static SASS instruction counts by base opcode; raises RuntimeError naming each disassembler's
    complaint when none can read the cubin."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin(kind, cfg, arch))
        for tool, args in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
            exe = shutil.which(tool)
            if exe is None:
                errors.append(f"{tool}: not on PATH")
                continue
            run = subprocess.run([exe, *args, str(path)], capture_output=True, text=True)
            if run.returncode == 0 and run.stdout.strip():
                counts = collections.Counter(m.group(1).split(".")[0] for m in _SASS.finditer(run.stdout))
                return {op: counts.get(op, 0) for op in SASS_OPCODES}
            errors.append(f"{tool}: exit {run.returncode}: {(run.stderr or run.stdout).strip()[:200]}")
    raise RuntimeError("could not disassemble: " + "; ".join(errors))

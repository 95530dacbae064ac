"""Which instructions a kernel variant is made of: the evidence that QUICK's weights never touch
shared memory as fp16, read from the PTX NVRTC emits on any machine (no GPU needed). (SASS would be
better evidence, but the H100 machine's cuobjdump and nvdisasm both rejected NVRTC's cubins: "does not
contain device code" / "invalid ELF file".)"""
from __future__ import annotations

import collections

from quick_lab.build.nvrtc import _nvrtc
from quick_lab.build.sources import COMPILE_OPTIONS, assemble

# PTX opcodes that touch shared memory or the tensor cores, by what they do in these kernels.
PTX_CLASSES = {
    "st.shared.v4": "STS.128: 16-byte shared store (the baseline's fp16 weight write-back)",
    "st.shared": "STS: any plain shared store (the split-K epilogue's one-word flag included)",
    "ld.shared": "LDS: plain shared load (staged QUICK: packed weights, scales, zeros)",
    "ldmatrix": "LDSM: ldmatrix (A fragments; B fragments in the baseline)",
    "cp.async": "LDGSTS: asynchronous global -> shared copy",
    "mma.sync": "HMMA: tensor-core mma.sync",
    "wgmma.mma_async": "HGMMA: Hopper warpgroup MMA (the wgmma mainloop)",
    "lop3.b32": "LOP3: the int4 -> fp16 dequantizer",
}


def ptx(filename: str, name: str, arch: str) -> str:
    """The PTX of one name expression of ``kernels/<filename>`` compiled for ``arch``."""
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(assemble(filename), filename, [], [])
    try:
        nvrtc.addNameExpression(program, name)
        nvrtc.compileProgram(program, [f"-arch={arch}", *COMPILE_OPTIONS])
        text = nvrtc.getPTX(program)
        return text.decode() if isinstance(text, bytes) else text
    finally:
        nvrtc.destroyProgram(program)


def count_classes(ptx_text: str) -> dict[str, int]:
    """Static PTX instruction counts per class of :data:`PTX_CLASSES` (after full unrolling)."""
    counts = collections.Counter()
    for line in ptx_text.splitlines():
        op = line.strip().split(" ")[0].split("\t")[0]
        for cls in PTX_CLASSES:
            if op.startswith(cls):
                counts[cls] += 1
    return {cls: counts.get(cls, 0) for cls in PTX_CLASSES}

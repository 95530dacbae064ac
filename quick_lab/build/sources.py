"""CUDA sources of quick_lab: where they live and how a translation unit is assembled.

Kernels ``#include "common.cuh"``; the include is spliced in here (with ``#line`` markers so compiler
messages keep the right file and line) so that the compiled text is complete in itself. CuPy keys its
on-disk kernel cache on the source text, so a header edit always triggers a rebuild.
"""
from __future__ import annotations

import re

from quick_lab.build.paths import KERNEL_DIR

COMPILE_OPTIONS = ("-std=c++17",)

SUPPORT_KERNELS = {"dequantize_awq": "dequant.cu", "dequantize_quick_t": "dequant.cu",
                   "interleave_awq": "interleave.cu",
                   "add_rms_norm": "decoder.cu", "rope_kv": "decoder.cu", "silu_mul": "decoder.cu"}

# Templated support kernels: file -> the instantiations `quick-lab compile` (and so the CPU CI) builds,
# the ones the model presets launch (head dim 128; decode rows = query heads per KV head 1, 4, 8;
# prefill rows 16). Other instantiations compile on first use.
SUPPORT_TEMPLATES = {"decoder.cu": ("attention<128, 1>", "attention<128, 4>", "attention<128, 8>",
                                    "attention<128, 16>")}

_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def assemble(filename: str, _spliced: set[str] | None = None) -> str:
    """The source of ``kernels/<filename>`` with every local ``#include "..."`` spliced in, each header
    once per translation unit (a header reached a second time, through another header, is skipped,
    as ``#pragma once`` would do for a file the preprocessor opens itself)."""
    spliced = {filename} if _spliced is None else _spliced
    path = KERNEL_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found (the package was built without its kernels/)")
    out = [f'#line 1 "{filename}"']
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _INCLUDE.match(line)
        if match:
            header = match.group(1)
            if header not in spliced:
                spliced.add(header)
                out.append(assemble(header, spliced))
            out.append(f'#line {number + 1} "{filename}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"

"""Runtime kernel loader: compiles a kernels/ source through NVRTC and returns launchable functions.

Knows files and C++ name expressions, not tile configs (``quick_lab.core.variants`` maps a config to a
name). Each GEMM variant is its own module (one template instantiation through ``name_expressions``),
so a sweep compiles only what it launches. Later processes start without compiling: CuPy keeps its
own disk cache for what it compiles, and the sm_90a cubins this module builds through NVRTC are kept
in the user cache directory (:func:`cached_cubin`).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from quick_lab.build import paths
from quick_lab.build.sources import COMPILE_OPTIONS, SUPPORT_KERNELS, assemble


class KernelCompileError(RuntimeError):
    """A kernel failed to compile; the message names the kernel and carries the compiler log."""


def _compile(filename: str, name_expressions: tuple[str, ...], label: str):
    import cupy

    try:
        module = cupy.RawModule(code=assemble(filename), options=COMPILE_OPTIONS,
                                name_expressions=name_expressions or None)
        module.compile()
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(f"compiling {label} from kernels/{filename} failed:\n{exc.get_message()}") from exc
    return module


def cached_cubin(filename: str, name: str, arch: str) -> tuple[str, Path]:
    """(lowered name, cubin path) of one kernel for an arch-specific target, compiled once per
    (source text, name, arch, options, NVRTC version) and kept in ``paths.cache_dir()/cubins``: a later
    process loads the file instead of compiling again. Concurrent compiles of the same kernel are safe
    (each writes whole files and renames; both results are the same bytes)."""
    from quick_lab.build import nvrtc

    key_text = "\0".join([assemble(filename), name, arch, *COMPILE_OPTIONS, nvrtc.nvrtc_version()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    folder = paths.cache_dir() / "cubins"
    cubin, meta = folder / f"{key}.cubin", folder / f"{key}.json"
    if cubin.is_file() and meta.is_file():
        return json.loads(meta.read_text())["lowered"], cubin
    try:
        lowered, _, data = nvrtc.compile_cubin(filename, (name,), arch, report=False)
    except nvrtc.NvrtcError as exc:
        raise KernelCompileError(f"compiling {name} from kernels/{filename} failed:\n{exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    paths.atomic_write(meta, json.dumps({"name": name, "lowered": lowered[name], "arch": arch, "source": filename}))
    paths.atomic_write(cubin, data)
    return lowered[name], cubin


def _load_arch_specific(filename: str, name: str, arch: str):
    """Compile for an arch-specific target such as sm_90a (wgmma exists only there, and CuPy's
    RawModule cannot request it) through quick_lab.build.nvrtc, or take it from the disk cache, and
    load the cubin with RawModule(path=...)."""
    import cupy

    lowered, path = cached_cubin(filename, name, arch)
    return cupy.RawModule(path=str(path)).get_function(lowered)


def load_function(filename: str, name: str, *, arch: str | None = None, dynamic_smem: int = 0):
    """The compiled kernel ``name`` (a C++ name expression) of ``kernels/<filename>``; ``arch`` an
    arch-specific NVRTC target (None: the current GPU's, through CuPy). A block whose static plus
    dynamic shared memory passes 48 KB must opt in to the dynamic part (CUDA C++ Programming Guide,
    shared memory)."""
    if arch is not None:
        function = _load_arch_specific(filename, name, arch)
    else:
        function = _compile(filename, (name,), name).get_function(name)
    if dynamic_smem and dynamic_smem + function.shared_size_bytes > 48 * 1024:
        function.max_dynamic_shared_size_bytes = dynamic_smem
    return function


@functools.lru_cache(maxsize=None)
def support_kernel(name: str):
    """A non-GEMM kernel by name (``dequantize_awq``, ``dequantize_quick_t``, ``interleave_awq``)."""
    if name not in SUPPORT_KERNELS:
        raise ValueError(f"unknown support kernel {name!r}; have {sorted(SUPPORT_KERNELS)}")
    return _compile(SUPPORT_KERNELS[name], (), name).get_function(name)

"""Runtime kernel loader: compiles a kernels/ source through NVRTC and returns launchable functions.

Knows files and C++ name expressions, not tile configs (``quick_lab.core.variants`` maps a config to a
name). Each GEMM variant is its own module (one template instantiation through ``name_expressions``),
so a sweep compiles only what it launches; CuPy's disk cache makes later processes start instantly.
"""
from __future__ import annotations

import functools

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


def _load_arch_specific(filename: str, name: str, arch: str):
    """Compile for an arch-specific target such as sm_90a (wgmma exists only there, and CuPy's
    RawModule cannot request it) through quick_lab.build.nvrtc, and load the cubin with
    RawModule(path=...)."""
    import hashlib
    import tempfile
    from pathlib import Path

    import cupy

    from quick_lab.build import nvrtc

    try:
        lowered, _, cubin = nvrtc.compile_cubin(filename, (name,), arch)
    except nvrtc.NvrtcError as exc:
        raise KernelCompileError(f"compiling {name} from kernels/{filename} failed:\n{exc}") from exc
    cache = Path(tempfile.gettempdir()) / "quick_lab_cubins"
    cache.mkdir(exist_ok=True)
    path = cache / f"{hashlib.sha256(cubin).hexdigest()[:24]}.cubin"
    if not path.exists():
        path.write_bytes(cubin)
    return cupy.RawModule(path=str(path)).get_function(lowered[name])


def load_function(filename: str, name: str, *, arch: str | None = None, dynamic_smem: int = 0):
    """The compiled kernel ``name`` (a C++ name expression) of ``kernels/<filename>``; ``arch`` an
    arch-specific NVRTC target (None: the current GPU's, through CuPy). A block that needs more than
    48 KB of dynamic shared memory must opt in (CUDA C++ Programming Guide, shared memory)."""
    if arch is not None:
        function = _load_arch_specific(filename, name, arch)
    else:
        function = _compile(filename, (name,), name).get_function(name)
    if dynamic_smem > 48 * 1024:
        function.max_dynamic_shared_size_bytes = dynamic_smem
    return function


@functools.lru_cache(maxsize=None)
def support_kernel(name: str):
    """A non-GEMM kernel by name (``dequantize_awq``, ``dequantize_quick_t``)."""
    if name not in SUPPORT_KERNELS:
        raise ValueError(f"unknown support kernel {name!r}; have {sorted(SUPPORT_KERNELS)}")
    return _compile(SUPPORT_KERNELS[name], (), name).get_function(name)

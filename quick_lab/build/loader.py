"""Runtime kernel loader: compiles kernels/ through ``cupy.RawModule`` (NVRTC) and caches them.

Each GEMM variant is its own module (one template instantiation through ``name_expressions``), so a
sweep compiles only what it launches; CuPy's disk cache makes later processes start instantly.
"""
from __future__ import annotations

import functools

from quick_lab.core import configs
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


def _load_sm90a(filename: str, name: str):
    """Compile for sm_90a (wgmma exists only in the arch-specific target, which CuPy's RawModule cannot
    request) through quick_lab.build.nvrtc, and load the cubin with RawModule(path=...)."""
    import hashlib
    import tempfile
    from pathlib import Path

    import cupy

    from quick_lab.build import nvrtc

    if cupy.cuda.Device().compute_capability != "90":
        raise ValueError(f"{name} uses Hopper wgmma: it needs a compute capability 9.0 GPU, "
                         f"this one is {cupy.cuda.Device().compute_capability}")
    try:
        lowered, _, cubin = nvrtc.compile_cubin(filename, (name,), "sm_90a")
    except nvrtc.NvrtcError as exc:
        raise KernelCompileError(f"compiling {name} from kernels/{filename} failed:\n{exc}") from exc
    cache = Path(tempfile.gettempdir()) / "quick_lab_cubins"
    cache.mkdir(exist_ok=True)
    path = cache / f"{hashlib.sha256(cubin).hexdigest()[:24]}.cubin"
    if not path.exists():
        path.write_bytes(cubin)
    return cupy.RawModule(path=str(path)).get_function(lowered[name])


@functools.lru_cache(maxsize=None)
def gemm_kernel(kind: str, cfg: configs.TileConfig):
    """The compiled GEMM variant, its dynamic shared-memory limit raised to what the tile needs."""
    configs.check(kind, cfg)
    name = configs.template_name(kind, cfg)
    if cfg.wgmma:
        function = _load_sm90a(configs.source_file(kind, cfg), name)
    else:
        function = _compile(configs.source_file(kind, cfg), (name,), name).get_function(name)
    smem = configs.shared_bytes(kind, cfg)
    if smem > 48 * 1024:  # above 48 KB a block must opt in (CUDA C++ Guide, shared memory)
        function.max_dynamic_shared_size_bytes = smem
    return function


@functools.lru_cache(maxsize=None)
def support_kernel(name: str):
    """A non-GEMM kernel by name (``dequantize_awq``, ``dequantize_quick_t``)."""
    if name not in SUPPORT_KERNELS:
        raise ValueError(f"unknown support kernel {name!r}; have {sorted(SUPPORT_KERNELS)}")
    return _compile(SUPPORT_KERNELS[name], (), name).get_function(name)

"""Kernel launches, plain or as programmatic dependents of the kernel before them on the stream.

A *programmatic dependent launch* (CUDA C++ Programming Guide; compute capability 9.0) lets a kernel's
blocks be placed while the kernel before it on the stream still runs: they run a prologue that reads
only what no earlier kernel writes (weights, a past KV cache), then wait in ``griddepcontrol.wait``
for the previous grid to complete (``kernels/common.cuh``: ``wait_for_prior_grid``). In a decode
step that hides the gap between two kernels and the next one's start (its launch, the decode GEMM's
first weight loads, the attention's KV prefetch) under the kernel before. The attribute is a driver launch attribute that
CuPy's kernel call does not expose, so such launches go through ``cuLaunchKernelEx`` here (ctypes,
like the cuBLAS binding of the model); stream capture records them as programmatic graph edges.

Only kernels that wait before they read or write anything an earlier kernel touches may be launched
this way (a launch names that with ``waits_on_prior_grid=True``); every other launch, and every launch
outside :func:`dependent_launches`, is CuPy's plain call.

A launch may also name a *thread block cluster* shape (``cluster=(x, y, z)``, compute capability 9.0):
the blocks of a cluster run at once on one GPC and read each other's shared memory (the decode GEMM
reduces its split-K slices that way). It is a launch attribute too, so it takes the same path; on an
older GPU, or inside ``cluster_launches(False)``, the grid launches without clusters and the kernel
sees clusters of one block (it must work both ways).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import numpy as np

__all__ = ["cluster_launches", "cluster_launches_active", "dependent_launches", "dependent_launches_active",
           "dependent_launches_supported", "kernel_arguments", "launch"]

# cuda.h CUlaunchAttributeID
_CLUSTER_DIMENSION = 4
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    """cuda.h ``CUlaunchAttribute``: a 4-byte id, padding to 8, a 64-byte value union (as 16 unsigned
    ints: ``programmaticStreamSerializationAllowed`` is the first, ``clusterDim`` the first three)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):
    """cuda.h ``CUlaunchConfig``."""
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_state = threading.local()


@contextlib.contextmanager
def dependent_launches(enabled: bool = True):
    """Within this block (this thread), kernels that wait on their prior grid launch as programmatic
    dependents (on a GPU of compute capability 9.0 or later; elsewhere nothing changes)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    before = getattr(_state, "enabled", False)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = before


@contextlib.contextmanager
def cluster_launches(enabled: bool = True):
    """Within this block (this thread), launches that name a cluster shape use it (the default, on a GPU
    of compute capability 9.0 or later); ``False`` launches them without clusters (their other path)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    before = getattr(_state, "clusters", True)
    _state.clusters = enabled
    try:
        yield
    finally:
        _state.clusters = before


def cluster_launches_active() -> bool:
    """Whether a launch naming a cluster shape here would launch with it."""
    return getattr(_state, "clusters", True) and dependent_launches_supported()


def dependent_launches_active() -> bool:
    """Whether a launch with ``waits_on_prior_grid=True`` here would be a programmatic dependent."""
    return getattr(_state, "enabled", False) and dependent_launches_supported()


def dependent_launches_supported() -> bool:
    """Whether the current GPU runs programmatic dependent launches and thread block clusters (compute
    capability 9.0 or later)."""
    from quick_lab.build import device

    return int(device.compute_capability(device.current_device())) >= 90


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    return lib


def kernel_arguments(args) -> list:
    """ctypes values of a kernel's arguments, as CuPy would pass them: a device array by its pointer, None
    as a null pointer, a NumPy scalar by its own type (the kernels' int, float and pointer parameters)."""
    import cupy

    out = []
    for i, arg in enumerate(args):
        if isinstance(arg, cupy.ndarray):
            out.append(ctypes.c_void_p(arg.data.ptr))
        elif arg is None:  # a null pointer (an unused workspace), as CuPy passes None
            out.append(ctypes.c_void_p(None))
        elif isinstance(arg, np.int32):
            out.append(ctypes.c_int32(int(arg)))
        elif isinstance(arg, np.uint64):
            out.append(ctypes.c_uint64(int(arg)))
        elif isinstance(arg, np.float32):
            out.append(ctypes.c_float(float(arg)))
        else:
            raise TypeError(f"kernel argument {i} must be a cupy.ndarray, None, numpy.int32, numpy.uint64 "
                            f"or numpy.float32, got {type(arg).__name__}")
    return out


def launch(function, grid, block, args, shared_mem: int = 0, *, waits_on_prior_grid: bool = False,
           cluster: tuple[int, int, int] | None = None) -> None:
    """Launch ``function`` (a CuPy kernel function) on the current stream; as a programmatic dependent
    when ``waits_on_prior_grid`` and :func:`dependent_launches` is active, in clusters of shape
    ``cluster`` (each grid dimension a multiple of it) when :func:`cluster_launches_active`; else
    through CuPy."""
    attributes = []
    if waits_on_prior_grid and dependent_launches_active():
        attributes.append(_LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION))
        attributes[-1].value[0] = 1
    if cluster is not None and cluster_launches_active():
        attributes.append(_LaunchAttribute(id=_CLUSTER_DIMENSION))
        attributes[-1].value[0], attributes[-1].value[1], attributes[-1].value[2] = (tuple(cluster) + (1, 1))[:3]
    if not attributes:
        function(grid, block, args, shared_mem=shared_mem)
        return
    import cupy

    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    values = kernel_arguments(args)
    pointers = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
    attribute_array = (_LaunchAttribute * len(attributes))(*attributes)
    config = _LaunchConfig(*grid, *block, shared_mem, cupy.cuda.get_current_stream().ptr,
                           ctypes.cast(attribute_array, ctypes.POINTER(_LaunchAttribute)), len(attributes))
    handle = function.kernel.ptr  # a cupy.RawKernel: its loaded CUfunction
    status = _driver().cuLaunchKernelEx(ctypes.byref(config), handle, pointers, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA driver error {status}")

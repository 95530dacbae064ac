"""Kernel launches, plain or as programmatic dependents of the kernel before them on the stream.

A *programmatic dependent launch* (CUDA C++ Programming Guide; compute capability 9.0) lets a kernel's
blocks be placed while the kernel before it on the stream still runs: they run a prologue that reads
only what no earlier kernel writes (weights, a past KV cache), then wait in ``griddepcontrol.wait``
for the previous grid to complete (``kernels/common.cuh``: ``wait_for_prior_grid``). In a decode
step that hides the gap between two kernels and the next one's start (its launch, the decode GEMM's
first weight loads, the attention's first key and value tiles) under the kernel before. The attribute
is a driver launch attribute that CuPy's kernel call does not expose, so such launches go through
``cuLaunchKernelEx`` here (ctypes, like the cuBLAS binding of the model); stream capture records
them as programmatic graph edges.

Only kernels that wait before they read or write anything an earlier kernel touches may be launched
this way (a launch names that with ``waits_on_prior_grid=True``); every other launch, and every launch
outside :func:`dependent_launches`, is CuPy's plain call.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import numpy as np

__all__ = ["dependent_launches", "dependent_launches_active", "dependent_launches_supported", "kernel_arguments",
           "launch"]

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):
    """cuda.h ``CUlaunchAttribute``: a 4-byte id, padding to 8, a 64-byte value union (its first int is
    ``programmaticStreamSerializationAllowed``)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_pad", ctypes.c_char * 60)]


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


def dependent_launches_active() -> bool:
    """Whether a launch with ``waits_on_prior_grid=True`` here would be a programmatic dependent."""
    return getattr(_state, "enabled", False) and dependent_launches_supported()


def dependent_launches_supported() -> bool:
    """Whether the current GPU runs programmatic dependent launches (compute capability 9.0 or later)."""
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


def launch(function, grid, block, args, shared_mem: int = 0, *, waits_on_prior_grid: bool = False) -> None:
    """Launch ``function`` (a CuPy kernel function) on the current stream; as a programmatic dependent
    when ``waits_on_prior_grid`` and :func:`dependent_launches` is active, else through CuPy."""
    if not (waits_on_prior_grid and dependent_launches_active()):
        function(grid, block, args, shared_mem=shared_mem)
        return
    import cupy

    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    values = kernel_arguments(args)
    pointers = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig(*grid, *block, shared_mem, cupy.cuda.get_current_stream().ptr,
                           ctypes.pointer(attribute), 1)
    handle = function.kernel.ptr  # a cupy.RawKernel: its loaded CUfunction
    status = _driver().cuLaunchKernelEx(ctypes.byref(config), handle, pointers, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA driver error {status}")

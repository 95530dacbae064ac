"""cuBLAS through ctypes: ``matmul``, an fp16 GEMM (fp32 accumulate) that can be captured in a CUDA graph.

CuPy refuses any cuBLAS call while a stream is being captured, so the model's matmuls go through a small
ctypes binding of the same cuBLAS routine ``cupy.matmul`` uses (``cublasGemmEx``, fp16 in, fp32
accumulate); cuBLAS itself supports capture.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os

import numpy as np

__all__ = ["matmul"]

_CUDA_R_16F, _CUDA_R_32F, _COMPUTE_32F, _GEMM_DEFAULT = 2, 0, 68, -1
_OP_N, _OP_T = 0, 1
_WORKSPACE_BYTES = 32 << 20  # cuBLAS's own default on Hopper; a user workspace keeps capture allocation-free


def _cublas_library() -> ctypes.CDLL:
    import cupy

    cupy.cuda.device.get_cublas_handle()  # makes CuPy load libcublas; use that very file
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcublas.so"):
                    return ctypes.CDLL(path)
    except OSError:
        pass
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("cannot find libcublas")


class _Cublas:
    """One cuBLAS handle with a fixed workspace, bound to the current CuPy stream at each call."""

    def __init__(self):
        import cupy

        self.lib = lib = _cublas_library()
        p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll,
                                                   i, i, i]
        self.handle = ctypes.c_void_p()
        self._check(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        self.workspace = cupy.cuda.memory.Memory(_WORKSPACE_BYTES)  # outside any (graph-private) pool
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.stream = None

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _bind(self) -> None:
        import cupy

        ptr = cupy.cuda.get_current_stream().ptr
        if ptr != self.stream:  # setting the stream resets the workspace, so set both
            self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(ptr)), "cublasSetStream")
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, ctypes.c_void_p(self.workspace.ptr),
                                                       ctypes.c_size_t(_WORKSPACE_BYTES)), "cublasSetWorkspace")
            self.stream = ptr

    def gemm(self, op_b, m, n, k, b, ldb, stride_b, a, lda, stride_a, c, c_type, stride_c, batch):
        """Row-major ``C[m, n] = A[m, k] @ B`` (B stored [k, n], or [n, k] with op_b = T), as the
        column-major ``C^T = B^T A^T`` cuBLAS computes."""
        self._bind()
        one, zero = ctypes.addressof(self.one), ctypes.addressof(self.zero)
        if batch == 1:
            status = self.lib.cublasGemmEx(self.handle, op_b, _OP_N, n, m, k, one, b, _CUDA_R_16F, ldb, a,
                                           _CUDA_R_16F, lda, zero, c, c_type, n, _COMPUTE_32F, _GEMM_DEFAULT)
        else:
            status = self.lib.cublasGemmStridedBatchedEx(
                self.handle, op_b, _OP_N, n, m, k, one, b, _CUDA_R_16F, ldb, stride_b, a, _CUDA_R_16F, lda,
                stride_a, zero, c, c_type, n, stride_c, batch, _COMPUTE_32F, _GEMM_DEFAULT)
        self._check(status, "cublasGemmEx")


@functools.cache
def _cublas(device_id: int) -> _Cublas:
    return _Cublas()


def _matrices(x):
    """(pointer, leading dimension, batch stride, batch count, array) for the matrices ``x[..., r, c]``:
    read in place when columns are unit-stride and the batch dimensions merge into one stride, else
    from a contiguous copy (the returned array, to be kept alive until the call)."""
    import cupy

    item = x.itemsize
    *batch, rows, cols = x.shape
    count = math.prod(batch)
    dims = [(n, st // item) for n, st in zip(x.shape[:-2], x.strides[:-2]) if n > 1]
    mergeable = all(dims[j][1] == dims[j + 1][1] * dims[j + 1][0] for j in range(len(dims) - 1))
    if x.strides[-1] != item or (rows > 1 and x.strides[-2] < cols * item) or not mergeable:
        x = cupy.ascontiguousarray(x)
        return _matrices(x)
    ld = x.strides[-2] // item if rows > 1 else cols
    return x.data.ptr, ld, dims[-1][1] if dims else rows * ld, count, x


def matmul(a, b, transpose_b: bool = False, out_dtype=np.float16):
    """``a @ b`` (``a @ b^T`` with ``transpose_b``) on fp16 operands with fp32 accumulation, through
    cuBLAS, capturable in a CUDA graph. Shapes ``[..., m, k]`` and ``[..., k, n]`` (or ``[..., n, k]``)
    with equal batch dimensions; strided views such as KV-cache slices are read in place."""
    import cupy

    m, k = a.shape[-2:]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    if a.shape[:-2] != b.shape[:-2] or (b.shape[-1] if transpose_b else b.shape[-2]) != k:
        raise ValueError(f"matmul shapes do not match: {a.shape} @ {b.shape} (transpose_b={transpose_b})")
    if a.dtype != np.float16 or b.dtype != np.float16:
        raise TypeError(f"matmul takes fp16 operands, got {a.dtype} and {b.dtype}")
    c = cupy.empty((*a.shape[:-2], m, n), dtype=out_dtype)
    if c.size == 0:
        return c
    a_ptr, lda, stride_a, batch, a = _matrices(a)
    b_ptr, ldb, stride_b, _, b = _matrices(b)
    c_type = _CUDA_R_16F if c.dtype == np.float16 else _CUDA_R_32F
    _cublas(cupy.cuda.Device().id).gemm(_OP_T if transpose_b else _OP_N, m, n, k, b_ptr, ldb, stride_b,
                                        a_ptr, lda, stride_a, c.data.ptr, c_type, m * n, batch)
    return c

"""CUDA device detection that never imports cupy at module import time."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def cuda_device_status() -> tuple[bool, str]:
    """Return ``(usable, reason)``: whether cupy imports and sees at least one CUDA device,
    with a one-line reason (empty when usable)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return False, _one_line(f"cupy not importable: {type(exc).__name__}: {exc}")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # e.g. CUDARuntimeError: cudaErrorInsufficientDriver
        return False, _one_line(f"no usable CUDA device: {type(exc).__name__}: {exc}")
    if count < 1:
        return False, "no usable CUDA device: getDeviceCount() returned 0"
    return True, ""


def _one_line(text: str) -> str:
    return " ".join(text.split())

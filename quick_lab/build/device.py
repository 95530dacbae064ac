"""The GPU at hand: whether one is usable, its name, slug, SM count, compute capability and the
driver's CUDA version. Never imports cupy at module import time, so every CPU-only path works without
a driver."""

from __future__ import annotations

from functools import lru_cache

NUM_SMS_FALLBACK = 132  # an H100 SXM


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


def current_device() -> int:
    import cupy

    return cupy.cuda.Device().id


@lru_cache(maxsize=None)
def gpu_name(device: int) -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(device)["name"]
    return name.decode() if isinstance(name, bytes) else name


@lru_cache(maxsize=None)
def num_sms(device: int) -> int:
    import cupy

    try:  # Device.attributes queries every attribute (~1 ms): once per device
        return cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device)
    except Exception:
        return NUM_SMS_FALLBACK


@lru_cache(maxsize=None)
def compute_capability(device: int) -> str:
    """'90' for an H100 (major and minor digits, as CuPy writes it)."""
    import cupy

    return cupy.cuda.Device(device).compute_capability


@lru_cache(maxsize=1)
def driver_version() -> int:
    """The CUDA driver's API version, e.g. 13000 (cudaDriverGetVersion)."""
    import cupy

    return int(cupy.cuda.runtime.driverGetVersion())


def stream_is_capturing() -> bool:
    """Whether the current stream is being captured into a CUDA graph (nothing may synchronize then)."""
    import cupy

    try:
        return bool(cupy.cuda.get_current_stream().is_capturing())
    except Exception:  # cupy.cuda.runtime.CUDARuntimeError: a capture in an invalidated state
        return True


def gpu_slug(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (results/<slug>/)."""
    if not name:
        return "no-gpu"
    words = name.lower().replace("nvidia", "").split()
    return "-".join("".join(ch for ch in w if ch.isalnum()) for w in words if w) or "gpu"

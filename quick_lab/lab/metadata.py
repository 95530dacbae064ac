"""Provenance of a measurement: GPU, clocks, driver, CUDA, NVRTC, CuPy, git commit, date."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from quick_lab.build.device import gpu_slug
from quick_lab.build.paths import CHECKOUT, results_root


def git_commit() -> str:
    """HEAD of the checkout (``-dirty`` with uncommitted changes); QUICK_LAB_GIT_COMMIT overrides it
    for runs on a copy of the tree without its .git (a remote GPU machine)."""
    if os.environ.get("QUICK_LAB_GIT_COMMIT"):
        return os.environ["QUICK_LAB_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=CHECKOUT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def gpu_info() -> dict:
    """Facts about the current GPU and software stack; works (with fewer fields) without a GPU."""
    import cupy

    from quick_lab.build.nvrtc import nvrtc_version

    info = {"cupy": cupy.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        info["nvrtc"] = nvrtc_version()
    except Exception as exc:
        info["nvrtc"] = f"unavailable ({exc.__class__.__name__})"
    try:
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info.update(
            gpu=name,
            compute_capability=f"{props['major']}.{props['minor']}",
            sm_count=props["multiProcessorCount"],
            l2_bytes=props["l2CacheSize"],
            memory_bytes=props["totalGlobalMem"],
            driver=cupy.cuda.runtime.driverGetVersion(),
            runtime=cupy.cuda.runtime.runtimeGetVersion(),
            driver_version=_nvidia_smi("driver_version"),
            clocks_mhz=_nvidia_smi("clocks.sm,clocks.mem,clocks.max.sm"),
        )
    except Exception as exc:
        info["gpu"] = None
        info["gpu_error"] = " ".join(str(exc).split())
    return info


def metadata(**extra) -> dict:
    """Date, commit, :func:`gpu_info` and ``gpu_slug``, the ``results/<gpu_slug>/`` directory of the GPU
    measured on (so a CSV copied into another GPU's directory can be told apart)."""
    info = gpu_info()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), **info, "gpu_slug": gpu_slug(info.get("gpu")), **extra}


def write_metadata(path: Path, **extra) -> dict:
    meta = metadata(**extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def results_dir(out=None) -> Path:
    """``out`` when given, else ``results/<slug of the current GPU>/``."""
    return Path(out) if out else results_root() / gpu_slug(gpu_info().get("gpu"))


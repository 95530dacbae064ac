"""Where quick_lab's files are, in a checkout and in an installed wheel.

A checkout keeps the CUDA sources in the top-level ``kernels/`` and the measurements in ``results/``.
The wheel carries the same sources as ``quick_lab/kernels/`` and each GPU's committed dispatch table
as ``quick_lab/tables/<gpu>/dispatch.json`` (pyproject.toml's ``package-dir`` maps ``kernels/`` and
``results/`` in as those two, shipping only ``*.cu``/``*.cuh`` and ``*/dispatch.json``), so an
installed copy compiles every kernel and dispatches like the checkout it was built from. An editable
install (``pip install -e .``) imports the checkout itself: there is no ``quick_lab/kernels/`` there,
so the top-level ``kernels/`` is used and the tables are read from ``results/``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
_TOP = PACKAGE.parent

# A checkout: the package sits beside kernels/ and pyproject.toml (an editable install points here).
CHECKOUT: Path | None = _TOP if (_TOP / "kernels").is_dir() and (_TOP / "pyproject.toml").is_file() else None

PACKAGED_KERNELS = PACKAGE / "kernels"
KERNEL_DIR = PACKAGED_KERNELS if PACKAGED_KERNELS.is_dir() else _TOP / "kernels"
PACKAGED_TABLES = PACKAGE / "tables"
RESULTS_ROOT_ENV = "QUICK_LAB_RESULTS_ROOT"
CACHE_DIR_ENV = "QUICK_LAB_CACHE_DIR"


def cache_dir() -> Path:
    """Where compiled kernels persist across processes: ``$QUICK_LAB_CACHE_DIR``, else the user cache
    directory (platformdirs: ``~/.cache/quick_lab`` on Linux)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # platformdirs is a dependency; a bare environment still gets the XDG default
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quick_lab"
    return Path(user_cache_dir("quick_lab", appauthor=False))


def results_root() -> Path:
    """Where sweeps write ``<gpu>/<name>.csv``: ``$QUICK_LAB_RESULTS_ROOT``, else the checkout's
    ``results/``, else ``./results`` (an installed copy measures into the working directory)."""
    if os.environ.get(RESULTS_ROOT_ENV):
        return Path(os.environ[RESULTS_ROOT_ENV])
    return CHECKOUT / "results" if CHECKOUT is not None else Path.cwd() / "results"


def dispatch_table_path(gpu_slug: str) -> Path | None:
    """The dispatch table of a GPU: a measured one under :func:`results_root` first, then the one the
    wheel ships; None when neither exists."""
    for path in (results_root() / gpu_slug / "dispatch.json", PACKAGED_TABLES / gpu_slug / "dispatch.json"):
        if path.is_file():
            return path
    return None


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) through a temporary file in the same directory and
    rename it over ``path``: a reader (another process) sees the old file or the whole new one, never
    a partial one."""
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

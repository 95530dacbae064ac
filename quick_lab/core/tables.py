"""Tuned dispatch tables on disk: one file per GPU and build of the kernels, in the user cache directory.

A committed table (``results/<gpu>/dispatch.json``, shipped in the wheel) is found by
:func:`quick_lab.build.paths.dispatch_table_path`; a tuned one lives here, in
``paths.cache_dir()/tables/<key>.json``, in the same row format (a JSON list of ``K, N, M, kernel,
config, split_k, time_us, ratio_to_fp16`` rows) plus each row's ``group_size``; ``M`` is a batch bucket
(:func:`quick_lab.core.dispatch.batch_bucket`). Beside it, ``<key>.key.json`` records what the key
hashes, for a person reading the directory.

The key hashes everything a measured winner depends on: the GPU's name and SM count, the CUDA driver
version, ``quick_lab.__version__`` and a hash of every source file in ``kernels/``. Any kernel edit
gives a new key, so a table tuned against other kernels is never read again.

Writes are read-merge-write under an exclusive lock (``<key>.lock``, ``fcntl`` where the platform has
it) through a temporary file renamed over the old one: two processes tuning at once both keep their
rows, and a reader sees the old table or the new one, never part of a file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import quick_lab
from quick_lab.build import paths, sources

TABLES_DIR = "tables"
KERNEL_SUFFIXES = (".cu", ".cuh")
ROW_FIELDS = ("K", "N", "M", "kernel", "config", "split_k", "time_us", "ratio_to_fp16", "group_size")


def kernel_sources_digest() -> str:
    """sha256 over the name and bytes of every ``*.cu`` / ``*.cuh`` file in the kernel directory
    (``sources.KERNEL_DIR``: the checkout's ``kernels/`` or the wheel's ``quick_lab/kernels/``)."""
    folder = Path(sources.KERNEL_DIR)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in KERNEL_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no kernel sources (*.cu, *.cuh) in {folder}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class TableKey:
    """What a tuned table is valid for."""

    gpu: str
    sm_count: int
    driver: int
    version: str
    kernels: str  # kernel_sources_digest()

    @classmethod
    def current(cls, gpu: str, sm_count: int, driver: int) -> "TableKey":
        """The key for a GPU with this quick_lab and these kernel sources."""
        return cls(gpu, int(sm_count), int(driver), quick_lab.__version__, kernel_sources_digest())

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def table_path(key: TableKey) -> Path:
    return paths.cache_dir() / TABLES_DIR / f"{key.digest}.json"


def _cell(row: dict) -> tuple:
    return row["K"], row["N"], row["group_size"], row["M"]


def check_row(row: dict) -> dict:
    """A tuned row as stored: the dispatch.json fields and its group size, nothing else."""
    if not isinstance(row, dict):
        raise TypeError(f"a table row must be a dict, got {type(row).__name__}")
    missing = [f for f in ROW_FIELDS if f not in row]
    if missing:
        raise ValueError(f"a tuned table row needs {', '.join(ROW_FIELDS)}; missing {', '.join(missing)}: {row}")
    return {f: row[f] for f in ROW_FIELDS}


def read_rows(path: Path) -> tuple[dict, ...]:
    """The rows of a tuned table; () when it does not exist. A file that is not a JSON list of rows
    (edited by hand, another format) is ignored with a warning, and replaced by the next write."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring the tuned table {path}: {exc}", RuntimeWarning, stacklevel=2)
        return ()
    if not isinstance(data, list) or not all(isinstance(r, dict) and all(f in r for f in ROW_FIELDS) for r in data):
        warnings.warn(f"ignoring the tuned table {path}: not a list of rows with {', '.join(ROW_FIELDS)}",
                      RuntimeWarning, stacklevel=2)
        return ()
    return tuple(data)


def merge_rows(path: Path, rows, key: TableKey | None = None) -> tuple[dict, ...]:
    """Add ``rows`` to the tuned table at ``path`` (a row replaces the one of its K, N, group size and
    batch), under the table's lock, written atomically; returns the table as written. ``key`` is
    recorded beside it (``<key>.key.json``) the first time."""
    new = [check_row(r) for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        merged = {_cell(r): r for r in read_rows(path)}
        merged.update((_cell(r), r) for r in new)
        table = tuple(sorted(merged.values(), key=_cell))
        paths.atomic_write(path, json.dumps(list(table), indent=1) + "\n")
        key_file = path.with_suffix(".key.json")
        if key is not None and not key_file.is_file():
            paths.atomic_write(key_file, json.dumps(asdict(key), indent=1, sort_keys=True) + "\n")
    return table


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive lock between processes (POSIX ``flock``); without fcntl (Windows) no lock: writes
    stay atomic, but two processes merging at the same instant may drop one's rows (tuned again)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

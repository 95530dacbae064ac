"""Shared pytest setup: tests marked ``gpu`` are skipped, with the reason, when no CUDA device is usable;
the header names the quick_lab under test (the checkout, or an installed wheel: tests/test_packaging.py).

Tests that need the repository's own files (results/, notebooks/, kernels/) find it from this directory
(``Path(__file__).resolve().parents[1]``), never from the package, which may be an installed copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import quick_lab
from quick_lab.build.device import cuda_device_status

REPO = Path(__file__).resolve().parents[1]

# The suite never tunes behind a test's back (lazy tuning would time kernels on a first call and write the
# user's cache); tests of tuning switch it on themselves. QUICK_LAB_AUTOTUNE set outside wins.
os.environ.setdefault("QUICK_LAB_AUTOTUNE", "0")


def pytest_report_header(config: pytest.Config) -> str:
    pkg = Path(quick_lab.__file__).resolve().parent
    where = "the checkout" if pkg == REPO / "quick_lab" else "an installed copy"
    return f"quick_lab {quick_lab.__version__} from {pkg} ({where})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    ok, reason = cuda_device_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)

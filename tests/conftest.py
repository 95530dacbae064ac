"""Shared pytest setup: tests marked ``gpu`` are skipped, with the reason, when no CUDA device is usable."""

from __future__ import annotations

import pytest

from quick_lab.build.device import cuda_device_status


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

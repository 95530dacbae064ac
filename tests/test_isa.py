"""The paper's structural claim, checked in the PTX NVRTC emits (no GPU needed): the QUICK kernel never
stores weights to shared memory and uses ldmatrix only for activations; the baseline does both."""
from __future__ import annotations

import pytest

from quick_lab.core import configs, variants


@pytest.fixture(scope="module", params=[configs.AWQ_DEFAULT, configs.TileConfig(64, 128, 32, 2, 2, 1)],
                ids=lambda c: c.name)
def awq_counts(request):
    return request.param, variants.ptx_counts("awq", request.param)


@pytest.fixture(scope="module", params=[configs.QUICK_DEFAULT, configs.TileConfig(64, 256, 64, 1, 4, 4, True)],
                ids=lambda c: c.name)
def quick_counts(request):
    return request.param, variants.ptx_counts("quick", request.param)


def test_baseline_writes_weights_back_and_reads_them_with_ldmatrix(awq_counts):
    cfg, counts = awq_counts
    rows_per_pass = cfg.threads // (cfg.tile_n // 8)
    assert counts["st.shared.v4"] == cfg.tile_k // rows_per_pass      # one 16-byte store per pass
    k_steps, mma_m, mma_n = cfg.tile_k // 16, cfg.warp_m // 16, cfg.warp_n // 8
    assert counts["ldmatrix"] == k_steps * (mma_m + mma_n // 2)       # A fragments + B (x4.trans)
    assert counts["mma.sync"] == k_steps * mma_m * mma_n


def test_quick_has_no_weight_write_back_and_no_weight_ldmatrix(quick_counts):
    cfg, counts = quick_counts
    assert counts["st.shared.v4"] == 0
    assert counts["st.shared"] == 1  # the split-K epilogue's "last block" flag, nothing else
    k_steps, mma_m, mma_n = cfg.tile_k // 16, cfg.warp_m // 16, cfg.warp_n // 8
    assert counts["ldmatrix"] == k_steps * mma_m                      # activations only
    assert counts["mma.sync"] == k_steps * mma_m * mma_n

"""CPU tests of the analytic shared-memory bank model (quick_lab.lab.bank_model)."""
from __future__ import annotations

import numpy as np
import pytest

from quick_lab.lab import bank_model as bm
from quick_lab.core import configs
from quick_lab.core.configs import TileConfig

AWQ = TileConfig.parse("16x128x32_w1x2_s1")
QUICK = TileConfig.parse("16x128x32_w1x2_s2")
LANES = np.arange(32)
PAPER_QUICK = [c for c in configs.QUICK_VARIANTS if not c.async_weights]
STAGED_QUICK = [c for c in configs.QUICK_VARIANTS if c.async_weights]


def row(df, op, operand):
    sel = df[(df.op == op) & (df.operand == operand)]
    assert len(sel) == 1
    return sel.iloc[0]


# ---------------------------------------------------------------- the hardware rule


def test_consecutive_words_one_wavefront():
    assert bm.wavefronts(4 * LANES, 4) == (1, 1)


def test_broadcast_is_free():
    assert bm.wavefronts(np.full(32, 260), 4) == (1, 1)
    assert bm.wavefronts(np.full(32, 264), 8) == (1, 1)  # both halves merge
    # 128-bit: each half warp's two quarters merge -> 2 wavefronts; ldmatrix never merges -> 4
    assert bm.wavefronts(np.full(32, 512), 16) == (2, 2)
    assert bm.wavefronts(np.full(32, 512), 16, ldmatrix=True) == (4, 4)
    assert bm.wavefronts(np.full((4, 8), 512), 16) == (4, 4)  # explicit phases are never merged


def test_quick_scale_load_merges_quarters():
    # lanes 4g..4g+3 read 16-byte chunk g (g = 0..7): per half warp 4 chunks = 16 distinct banks ->
    # the quarter pair is served in one wavefront: 2 per warp, as ncu measured on an H100.
    assert bm.wavefronts((LANES >> 2) * 16, 16) == (2, 2)
    assert bm.wavefronts((LANES >> 1) * 16, 16) == (2, 2)  # 2 lanes per chunk: 128 B per half, too
    # ... but a pair whose union needs a bank twice is served quarter by quarter: quarter q reads the
    # 16 bytes at 128 q (banks 0-3 every time) -> 1 wavefront per quarter, 4 in all
    assert bm.wavefronts((LANES >> 3) * 128, 16) == (4, 4)


@pytest.mark.parametrize("stride, expected", [(8, 2), (16, 4), (32, 8), (64, 16), (128, 32), (132, 1), (4, 1)])
def test_strided_32bit_conflicts(stride, expected):
    # 32-bit lanes at byte stride s hit bank (s/4 * lane) % 32: 32 / gcd(32, s/4) distinct banks,
    # each holding gcd(32, s/4) distinct words -> that many wavefronts. stride 132 = 33 words: odd -> free.
    w, ideal = bm.wavefronts(stride * LANES, 4)
    assert (w, ideal) == (expected, 1)
    assert bm.conflicts(stride * LANES, 4) == expected - 1


def test_64bit_and_128bit_consecutive_are_ideal():
    assert bm.wavefronts(8 * LANES, 8) == (2, 2)
    assert bm.wavefronts(16 * LANES, 16) == (4, 4)


def test_128bit_quarter_warp_conflict():
    # 8 lanes of a quarter warp at 128-byte stride: all 16-byte chunks sit on banks 0-3, 8 distinct
    # words per bank -> 8 wavefronts per phase, 32 for the warp (ideal 4).
    assert bm.wavefronts(128 * LANES, 16) == (32, 4)


def test_explicit_phases_and_inactive_lanes():
    addr = 16 * np.arange(8).reshape(1, 8)
    assert bm.wavefronts(addr, 16) == (1, 1)
    half = np.where(LANES < 8, 16 * LANES, -1)  # one active quarter: only its phase costs
    assert bm.wavefronts(half, 16) == (1, 1)
    assert bm.wavefronts(np.full(32, -1), 16) == (0, 0)


def test_rejects_misaligned_and_wrong_lane_count():
    with pytest.raises(ValueError):
        bm.wavefronts(16 * LANES + 4, 16)
    with pytest.raises(ValueError):
        bm.wavefronts(np.arange(16) * 4, 4)
    with pytest.raises(ValueError):
        bm.wavefronts(4 * LANES, 12)


def ldmatrix_rows(stride_bytes):
    """ldmatrix.x4 over a 16 x 16 fp16 block: lanes 0-15 rows 0-15 at col 0, 16-31 at col 8."""
    return (LANES & 15) * stride_bytes + (LANES >> 4) * 16


def test_ldmatrix_padded_rows_conflict_free():
    for tile_k in (32, 64):  # padded rows of 80 and 144 bytes: 16 mod 128 apart -> 8 distinct groups
        assert bm.wavefronts(ldmatrix_rows((tile_k + 8) * 2), 16) == (4, 4)


def test_ldmatrix_unpadded_rows_conflict():
    # 64-byte rows: the 8 rows of a phase start at 64 r mod 128 in {0, 64}; rows 0, 2, 4, 6 all land
    # on banks 0-3 with 4 distinct words each -> 4 wavefronts per phase, 16 per ldmatrix.x4.
    assert bm.wavefronts(ldmatrix_rows(64), 16) == (16, 4)
    # 128-byte rows: all 8 rows on banks 0-3 -> 8-way, 32 wavefronts.
    assert bm.wavefronts(ldmatrix_rows(128), 16) == (32, 4)


def test_bank_map_rows_match_wavefronts():
    addr = ldmatrix_rows(64)
    m = bm.bank_map(addr, 16)
    assert m.shape == (4, 32)
    assert m.max(axis=1).tolist() == [4, 4, 4, 4]
    assert m.max(axis=1).sum() == bm.wavefronts(addr, 16)[0]
    assert m.sum() == 4 * 8 * 4  # distinct words: 8 rows x 4 words per phase
    assert bm.bank_map(np.full(32, 0), 4, distinct=False)[0, 0] == 32
    assert bm.bank_map(np.full(32, 0), 4, distinct=True)[0, 0] == 1


def test_plot_warp_access_draws():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    bm.plot_warp_access(ax, ldmatrix_rows(64), "unpadded")
    assert "16 wavefronts" in ax.get_title()
    assert len(ax.collections) == 1
    plt.close(fig)


# ---------------------------------------------------------------- the kernels' patterns


def test_default_tile_traffic_awq():
    t = bm.tile_traffic("awq", AWQ)
    assert list(zip(t.op, t.operand)) == list(bm.CLASSES)
    # cp.async: 16 rows x 4 chunks = 64 chunks, 1 per thread -> 1 instruction per warp. A quarter warp
    # covers 2 rows (64 B each) 80 B apart: banks 8q..8q+15 and 8q+20..8q+35 overlap on 4 banks with
    # different words -> 2 wavefronts per phase, 8 per instruction (ideal 4).
    cp = row(t, "ldgsts", "A")
    assert (cp.instructions, cp.wavefronts, cp.ideal_wavefronts, cp.conflicts) == (2, 16, 8, 8)
    a = row(t, "ldsm", "A")  # 2 warps x 2 k16 steps x 1 m16 tile
    assert (a.instructions, a.wavefronts, a.conflicts) == (4, 16, 0)
    b = row(t, "ldsm", "B")  # 2 warps x 2 k16 steps x 4 pairs of n8 tiles
    assert (b.instructions, b.wavefronts, b.conflicts) == (16, 64, 0)
    st = row(t, "sts", "B")
    assert (st.instructions, st.wavefronts, st.conflicts, st.bytes) == (16, 64, 0, 32 * 128 * 2)


@pytest.mark.parametrize("cfg", configs.AWQ_VARIANTS, ids=lambda c: c.name)
def test_awq_writeback_instruction_count(cfg):
    t = bm.tile_traffic("awq", cfg)
    st = row(t, "sts", "B")
    # TILE_K x TILE_N fp16 = TILE_K * TILE_N / 8 16-byte stores, 32 per warp instruction
    assert st.instructions == cfg.tile_k * cfg.tile_n // 8 // 32
    assert st.wavefronts == 4 * st.instructions and st.conflicts == 0  # rows of 128 B chunks per quarter
    ldb = row(t, "ldsm", "B")
    assert ldb.instructions == cfg.threads // 32 * (cfg.tile_k // 16) * (cfg.warp_n // 16)
    assert ldb.conflicts == 0


@pytest.mark.parametrize("cfg", PAPER_QUICK, ids=lambda c: c.name)
def test_quick_has_no_weight_traffic(cfg):
    for stage in range(cfg.stages):
        t = bm.tile_traffic("quick", cfg, stage)
        assert t[t.op == "sts"].instructions.sum() == 0
        assert t[t.operand != "A"][["instructions", "wavefronts", "bytes"]].to_numpy().sum() == 0
        assert row(t, "ldsm", "A").conflicts == 0
        assert row(t, "ldsm", "A").instructions == cfg.threads // 32 * (cfg.tile_k // 16) * (cfg.warp_m // 16)


@pytest.mark.parametrize("cfg", STAGED_QUICK, ids=lambda c: c.name)
def test_staged_quick_weight_path(cfg):
    t = bm.tile_traffic("quick", cfg)
    assert t[t.op == "sts"].instructions.sum() == 0
    assert row(t, "ldsm", "B").instructions == 0
    # packed weights: tile_k * tile_n / 2 bytes per k-tile, copied and read back conflict free
    cp, rd = row(t, "ldgsts", "B"), row(t, "lds", "B")
    assert cp.bytes == cfg.tile_k * cfg.tile_n // 2
    assert rd.bytes == cfg.warps_m * cfg.tile_k * cfg.tile_n // 2  # warps stacked along M each read
    assert cp.conflicts == 0 and rd.conflicts == 0
    assert rd.instructions == cfg.threads // 32 * (cfg.tile_k // 16) * (cfg.warp_n // 64)
    sz = row(t, "lds", "SZ")  # per warp and n64 block: LDS.128 scales (2 wf) + LDS.32 zeros (1 wf)
    assert sz.instructions == 2 * cfg.threads // 32 * (cfg.warp_n // 64)
    assert sz.wavefronts == 3 * cfg.threads // 32 * (cfg.warp_n // 64) and sz.conflicts == 0


def test_stage_offsets_do_not_change_costs():
    for cfg in configs.QUICK_VARIANTS:
        base = bm.tile_traffic("quick", cfg, 0)
        for s in range(1, cfg.stages):
            other = bm.tile_traffic("quick", cfg, s)
            assert other[["instructions", "wavefronts", "ideal_wavefronts"]].equals(
                base[["instructions", "wavefronts", "ideal_wavefronts"]])
    acc = bm.tile_accesses("quick", QUICK, 1)
    assert min(min(a for a in x.addresses if a >= 0) for x in acc) == bm.stage_bytes(QUICK) == 16 * 40 * 2


def test_activation_addresses_match_kernel_formula():
    acc = [a for a in bm.tile_accesses("awq", AWQ) if a.op == "ldgsts"]
    tid = np.concatenate([32 * a.warp + LANES for a in acc])
    addr = np.concatenate([a.array for a in acc])
    expected = ((tid // 4) * 40 + (tid % 4) * 8) * 2
    np.testing.assert_array_equal(addr, expected)
    ld = [a for a in bm.tile_accesses("awq", AWQ) if a.op == "ldsm" and a.operand == "B"]
    b_off = 16 * 40 * 2
    first = ld[0]  # warp 0, ks 0, j 0
    np.testing.assert_array_equal(first.array, b_off + ((LANES & 15) * 136 + (LANES >> 4) * 8) * 2)


def test_invalid_config_and_stage_rejected():
    with pytest.raises(ValueError):
        bm.tile_traffic("quick", AWQ)  # stages=1 is not a QUICK config
    with pytest.raises(ValueError):
        bm.tile_traffic("quick", QUICK, stage=2)


# ---------------------------------------------------------------- whole launches


def test_predict_counts_awq_default():
    p = bm.predict_counts("awq", AWQ, 16, 4096, 4096, 1)
    blocks_ktiles = 32 * 128  # N/128 column tiles x 1 row tile, 128 k-tiles each
    assert p["blocks"] == 32 and p["block_k_tiles"] == blocks_ktiles
    assert p[bm.ST_INSTRUCTIONS] == 16 * blocks_ktiles == 65536
    assert p[bm.ST_WAVEFRONTS] == 64 * blocks_ktiles
    assert p[bm.LD_WAVEFRONTS] == 80 * blocks_ktiles == 327680
    assert p[bm.LDSM_INSTRUCTIONS] == 20 * blocks_ktiles
    assert p[bm.ST_CONFLICTS] == p[bm.LD_CONFLICTS] == p[bm.LD_INSTRUCTIONS] == 0
    assert p[bm.LDGSTS_WAVEFRONTS] == 16 * blocks_ktiles and p[bm.LDGSTS_CONFLICTS] == 8 * blocks_ktiles
    assert bm.predict_counts("awq", AWQ, 256, 4096, 4096, 1)[bm.ST_INSTRUCTIONS] == 16 * blocks_ktiles * 16


def test_predict_counts_match_h100_measurement():
    # ld wavefronts and instruction counts measured with ncu 2025.3.1 on an H100, K = N = 4096
    staged16, staged256 = TileConfig.parse("16x128x128_w1x2_s4_cp"), TileConfig.parse("128x128x64_w2x2_s4_cp")
    assert bm.predict_counts("quick", staged16, 16, 4096, 4096)[bm.LD_WAVEFRONTS] == 137216
    assert bm.predict_counts("quick", staged16, 16, 4096, 4096)[bm.LD_INSTRUCTIONS] == 20480
    assert bm.predict_counts("quick", staged256, 256, 4096, 4096)[bm.LD_WAVEFRONTS] == 1359872
    assert bm.predict_counts("quick", staged256, 256, 4096, 4096)[bm.LD_INSTRUCTIONS] == 98304
    assert bm.predict_counts("quick", staged256, 256, 4096, 4096)[bm.LDGSTS_INSTRUCTIONS] == 167936
    assert bm.predict_counts("awq", AWQ, 256, 4096, 4096)[bm.LD_WAVEFRONTS] == 5242880


def test_predict_counts_quick_default():
    p = bm.predict_counts("quick", QUICK, 256, 4096, 4096, 1)
    bk = 32 * 16 * 128
    assert p[bm.ST_WAVEFRONTS] == p[bm.ST_INSTRUCTIONS] == 0
    assert p[bm.LD_WAVEFRONTS] == 16 * bk and p[bm.LDSM_INSTRUCTIONS] == 4 * bk
    assert p[bm.LDGSTS_INSTRUCTIONS] == 2 * bk


def test_predict_counts_m_rounds_up_to_tiles():
    a = bm.predict_counts("quick", QUICK, 17, 4096, 4096)
    b = bm.predict_counts("quick", QUICK, 32, 4096, 4096)
    c = bm.predict_counts("quick", QUICK, 16, 4096, 4096)
    assert a == b and a[bm.LD_WAVEFRONTS] == 2 * c[bm.LD_WAVEFRONTS]


def test_split_k_tiles_matches_split_k_range():
    assert bm.split_k_tiles(128, 3) == [43, 43, 42]
    assert bm.split_k_tiles(10, 4) == [3, 3, 3, 1]
    assert bm.split_k_tiles(10, 8) == [2, 2, 2, 2, 2, 0, 0, 0]  # per = 2: splits 5-7 are empty
    assert bm.split_k_tiles(7, 1) == [7]


def test_predict_counts_split_remainder():
    # K = 320 -> 10 k-tiles of 32; split 8 -> per 2 -> 5 active splits, 3 empty ones that still launch
    p1 = bm.predict_counts("quick", QUICK, 16, 320, 4096, 1)
    p8 = bm.predict_counts("quick", QUICK, 16, 320, 4096, 8)
    assert p8["blocks"] == 32 * 8 and p8["active_blocks"] == 32 * 5
    assert p8["k_tiles_by_split"] == [2, 2, 2, 2, 2, 0, 0, 0]
    # the k-loop work is the same whatever the split ...
    for key in (bm.LDSM_INSTRUCTIONS, bm.LDGSTS_WAVEFRONTS, bm.LDGSTS_INSTRUCTIONS):
        assert p8[key] == p1[key]
    # ... plus the split-K ticket flag of every launched block: 1 STS and one LDS per warp (2 warps)
    assert p8[bm.ST_INSTRUCTIONS] - p1[bm.ST_INSTRUCTIONS] == 32 * 8
    assert p8[bm.LD_INSTRUCTIONS] - p1[bm.LD_INSTRUCTIONS] == 32 * 8 * 2
    assert p8[bm.LD_WAVEFRONTS] - p1[bm.LD_WAVEFRONTS] == 32 * 8 * 2
    # a 3-way split of 10 k-tiles (4, 4, 2): stages cycle per block, so counts follow per-block tiles
    p3 = bm.predict_counts("quick", QUICK, 16, 320, 4096, 3)
    assert p3["k_tiles_by_split"] == [4, 4, 2] and p3[bm.LDSM_INSTRUCTIONS] == p1[bm.LDSM_INSTRUCTIONS]


def test_predict_counts_rejects_bad_problems():
    with pytest.raises(ValueError):
        bm.predict_counts("awq", AWQ, 16, 4096, 4000)
    with pytest.raises(ValueError):
        bm.predict_counts("awq", AWQ, 16, 4096, 4096, split_k=129)
    with pytest.raises(ValueError):
        bm.predict_counts("awq", AWQ, 0, 4096, 4096)


def test_metric_keys():
    p = bm.predict_counts("awq", AWQ, 16, 4096, 4096)
    for key in bm.NCU_METRICS + bm.MODEL_ONLY:
        assert key in p
    assert len(bm.NCU_METRICS) == 7

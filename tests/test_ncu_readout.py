"""The Nsight Compute readout summary (quick_lab.lab.ncu_readout) on synthetic ncu --csv tables and on
the committed H100 readout."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from quick_lab.lab import ncu_readout

RANGE_COL = "thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg"
H100 = Path(__file__).resolve().parents[1] / "results" / "h100-80gb-hbm3" / "ncu" / "decode_dispatched"


def _rows(range_name, kernel, metrics):
    return [{RANGE_COL: f'1  "<default domain>:{range_name}:none:none"', "Kernel Name": kernel,
             "Metric Name": name, "Metric Unit": unit, "Metric Value": value} for name, unit, value in metrics]


def test_summary_reads_each_range_its_metrics_and_ranks_real_stalls():
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    details = pd.DataFrame(
        _rows("readout:K8192:N28672:M1:8x64x256_w1x4_s1_dc:split4", "void quick_decode<8, 256, 4>(int)", [
            ("DRAM Throughput", "%", "61.3"), ("Duration", "ns", "60,384"), ("Achieved Occupancy", "%", "27.9"),
            (stall.format("selected"), "", "1.0"), (stall.format("wait"), "", "1.29"),
            (stall.format("long_scoreboard"), "", "1.57"), (stall.format("barrier"), "", "0.2"),
            (stall.format("math_pipe_throttle"), "", "0.96")])
        + _rows("readout:K4096:N4096:M16:16x256x128_w1x4_s4_wg_fz:split-1", "void quick_wgmma<16>(int)", [
            ("DRAM Throughput", "%", "20.1"), ("Duration", "us", "13.2")])
        + _rows("other", "void elsewhere(int)", [("DRAM Throughput", "%", "99")]))
    out = ncu_readout.summarize(details)
    assert len(out) == 2  # the range outside readout:... is not part of the readout
    first, second = out.iloc[0], out.iloc[1]
    assert (first.K, first.N, first.M, first.config, first.split_k) == (8192, 28672, 1, "8x64x256_w1x4_s1_dc", 4)
    assert first.kernel == "quick_decode<8, 256, 4>" and first.dram_pct_of_peak == 61.3
    assert first.duration_us == pytest.approx(60.384) and second.duration_us == pytest.approx(13.2)
    assert [first.stall_1, first.stall_2, first.stall_3] == ["long_scoreboard", "wait", "math_pipe_throttle"]
    assert second.split_k == -1 and pd.isna(second.achieved_occupancy_pct)


def test_summary_refuses_a_table_without_ranges():
    with pytest.raises(ValueError, match="--nvtx"):
        ncu_readout.summarize(pd.DataFrame({"Metric Name": ["x"], "Metric Value": ["1"]}))
    empty = pd.DataFrame(_rows("other", "k", [("DRAM Throughput", "%", "1")]))
    with pytest.raises(ValueError, match="no readout"):
        ncu_readout.summarize(empty)


def test_committed_h100_summary_is_the_summary_of_its_details():
    details = pd.read_csv(H100 / "details.csv")
    expected = pd.read_csv(H100 / "summary.csv")
    got = ncu_readout.summarize(details)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
    assert set(zip(got.K, got.N, got.M)) == {(8192, 28672, 1), (8192, 28672, 16), (4096, 4096, 1), (4096, 4096, 16)}

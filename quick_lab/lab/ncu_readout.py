"""An Nsight Compute readout of the dispatched decode GEMMs, summarised: one row per profiled NVTX range
(DRAM throughput % of peak, occupancy, issue rate, the top stall reasons).

The device side is a plain ``ncu --nvtx --nvtx-include "regex:readout:.*/" --section SpeedOfLight
--section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats --metrics
"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" --csv --page details`` over a
script that wraps each launch in a range named ``readout:K<K>:N<N>:M<M>:<config>:split<split>``;
``python -m quick_lab.lab.ncu_readout DETAILS.csv`` writes ``summary.csv`` beside it.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

RANGE = re.compile(r"readout:K(\d+):N(\d+):M(\d+):([^:]+):split(-?\d+)")
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
METRICS = {  # ncu's "Metric Name" -> summary column
    "DRAM Throughput": "dram_pct_of_peak",
    "Achieved Occupancy": "achieved_occupancy_pct",
    "Theoretical Occupancy": "theoretical_occupancy_pct",
    "Registers Per Thread": "registers",
    "Warp Cycles Per Issued Instruction": "warp_cycles_per_issue",
    "Eligible Warps Per Scheduler": "eligible_warps_per_scheduler",
    "No Eligible": "no_eligible_pct",
    "Waves Per SM": "waves_per_sm",
}
TIME_UNITS_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}
# Stall counters that are not stalls: the warp issued, or was ready and another was picked.
NOT_STALLS = {"selected", "not_selected"}


def _value(text) -> float:
    return float(str(text).replace(",", ""))


def summarize(details: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """One row per ``readout:...`` range of an ncu ``--csv --page details`` table."""
    range_col = next((c for c in details.columns if "Push/Pop_Range" in c), None)
    if range_col is None:
        raise ValueError("details: no NVTX push/pop range column (run ncu with --nvtx)")
    rows = []
    for name, g in details.groupby(range_col, sort=False):
        m = RANGE.search(str(name))
        if m is None:
            continue
        K, N, M, config, split = m.groups()
        row = dict(K=int(K), N=int(N), M=int(M), config=config, split_k=int(split),
                   kernel=str(g["Kernel Name"].iloc[0]).split("(")[0].replace("void ", ""))
        for metric, column in METRICS.items():
            hit = g[g["Metric Name"] == metric]
            row[column] = _value(hit["Metric Value"].iloc[0]) if len(hit) else float("nan")
        duration = g[g["Metric Name"] == "Duration"]
        if len(duration):
            row["duration_us"] = _value(duration["Metric Value"].iloc[0]) * TIME_UNITS_US[duration["Metric Unit"].iloc[0]]
        stalls = [(s.group(1), _value(v)) for n, v in zip(g["Metric Name"], g["Metric Value"])
                  if (s := STALL.fullmatch(str(n))) and s.group(1) not in NOT_STALLS]
        for i, (reason, value) in enumerate(sorted(stalls, key=lambda s: -s[1])[:top], start=1):
            row[f"stall_{i}"] = reason
            row[f"stall_{i}_warps_per_issue"] = value
        rows.append(row)
    if not rows:
        raise ValueError("details: no readout:K..:N..:M..:<config>:split<s> ranges found")
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m quick_lab.lab.ncu_readout DETAILS.csv", file=sys.stderr)
        return 2
    path = Path(args[0])
    out = path.with_name("summary.csv")
    summarize(pd.read_csv(path)).to_csv(out, index=False)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What every figure and ``REPORT.md`` share: kernel order, labels and colours, the batch ranges the
paper's claims talk about, the paper's claims themselves, and the matplotlib / seaborn setup and axis
helpers of the figures.
"""
from __future__ import annotations

import math
import sys

import numpy as np

# Order, labels and colours shared by every figure.
KERNELS = ("fp16", "awq", "quick-paper", "quick", "fallback")
KERNEL_LABELS = {
    "fp16": "fp16 cuBLAS",
    "awq": "AutoAWQ-style (awq)",
    "quick-paper": "QUICK, paper tile (quick-paper)",
    "quick": "QUICK, dispatched (quick)",
    "fallback": "dequant + cuBLAS (fallback)",
}
# In tiles.csv 'awq' / 'quick' are the two kernels at every registered config (not the dispatcher).
TILE_KERNEL_LABELS = {"awq": "AutoAWQ-style kernel (awq)", "quick": "QUICK kernel (quick)",
                      "fallback": "dequant + cuBLAS (fallback)"}
# e2e.csv backends (each linear layer through quick_lab.core.ops with quick_lab.model.e2e's launch choice).
E2E_LABELS = {"fp16": "fp16 cuBLAS", "awq": "AutoAWQ-style (awq)", "quick": "QUICK (quick)"}
PALETTE = {"fp16": "#4d4d4d", "awq": "#d62728", "quick-paper": "#17becf", "quick": "#1f77b4",
           "fallback": "#9467bd"}
LARGE_BATCH = 128   # "larger batches" of the paper's kernel claim: M >= 128
SMALL_BATCH = 16    # memory-bound decode batches: M <= 16
FIG3_SHAPE = (8192, 8192)
FIG3_MAX_BATCH = 256

# The paper's claims (arXiv 2402.10076, abstract and Sec. 4). These are the paper's words, not our
# measurements: every number of ours in REPORT.md is computed from the CSVs.
PAPER = {
    "fig1": "AutoAWQ dequantizes weights in registers, writes them back to shared memory and re-reads them "
            "with `ldmatrix`; QUICK interleaves the weights offline so the dequantized registers are already "
            "the `mma` B fragments: no weight write-back, no weight `ldmatrix`.",
    "fig2": "The write-back of dequantized weights is full of shared-memory bank conflicts; QUICK removes it.",
    "fig3": "Up to 1.91x kernel speedup over the AutoAWQ kernel at larger batches; the gain grows with batch size.",
    "fig3b": "At very large batches fp16 cuBLAS is faster again.",
    "fig4": "Up to 1.94x end-to-end token throughput over AutoAWQ (7B-70B models, prefill 128, decode 128).",
    "fig5": "The shared memory QUICK frees allows larger tiles, which re-read activations from DRAM less often.",
}


def ordered(kernels) -> list[str]:
    """The distinct ``kernels`` in :data:`KERNELS` order, unknown ones after them in order of appearance."""
    present = list(dict.fromkeys(kernels))
    return [k for k in KERNELS if k in present] + [k for k in present if k not in KERNELS]


# ---------------------------------------------------------------- matplotlib / seaborn


def pyplot():
    """``matplotlib.pyplot``, switched to Agg outside a notebook (files only: CLI, tests); notebooks keep
    their inline backend."""
    import matplotlib

    if "ipykernel" not in sys.modules and matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def theme():
    """Applies the figures' seaborn theme; returns ``seaborn``."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    return sns


def log2_batch_axis(ax, batches):
    """A log2 x axis ticked at exactly the measured ``batches``."""
    batches = sorted({int(b) for b in batches})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()


def log_y_ticks(ax, values):
    """Readable ticks on a log y axis: 1, 2, 5 x powers of ten spanning ``values``."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    v = np.asarray([x for x in values if np.isfinite(x) and x > 0])
    if not v.size:
        return
    lo, hi = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in (1, 2, 5)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_ylim(v.min() / 1.25, v.max() * 1.25)


def count_axis(ax):
    """y tick labels as counts with k / M / G suffixes."""
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: human(y)))


def human(v: float) -> str:
    """3 significant digits with a k / M / G suffix: 1234567 -> '1.23M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


__all__ = ["E2E_LABELS", "FIG3_MAX_BATCH", "FIG3_SHAPE", "KERNELS", "KERNEL_LABELS", "LARGE_BATCH", "PALETTE",
           "PAPER", "SMALL_BATCH", "TILE_KERNEL_LABELS", "count_axis", "human", "log2_batch_axis", "log_y_ticks",
           "ordered", "pyplot", "theme"]

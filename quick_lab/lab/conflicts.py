"""Shared-memory bank conflicts measured with Nsight Compute and compared with the analytic model.

``run_ncu`` profiles one launch per (kernel, config, K, N, M) case with (:func:`ncu_command`)::

    ncu --nvtx --nvtx-include "regex:(awq|quick):.*/" --kernel-name "regex:(awq_gemm|quick_gemm|quick_wgmma)"
        --clock-control none --print-units base --csv --metrics <ALL_METRICS>
        <sys.executable> -m quick_lab.lab.conflicts_target <tmp>/cases.json

The target is a module, :mod:`quick_lab.lab.conflicts_target`, reading the case list :func:`write_cases`
wrote into a fresh temporary directory; ncu runs in that directory (so nothing there shadows the
package) with a PYTHONPATH led by the directory holding this ``quick_lab`` (checkout or wheel alike).

* ``--nvtx-include``: the target wraps exactly one launch per case in an NVTX range named
  ``quick_lab.lab.timing.range_name(kind, config, K, N, M)`` (``':'`` separators: ncu reads ``'/'`` as
  range nesting); the trailing ``'/'`` of the expression is required (``regex:quick:.*`` without it
  matched nothing on an H100 with ncu 2025.3).
  The warm-up launch (which also compiles the kernel) runs outside any range and is not profiled.
* ``--kernel-name``: only the GEMM kernels themselves (every family of :mod:`quick_lab.core.registry`,
  :data:`KERNEL_FILTER`). The weight set-up kernels (dequantize) and
  any split-K reduce kernel (older builds launched ``splitk_reduce`` after the GEMM inside the same
  range; the current kernels reduce in their own epilogue) are excluded.
* Conflict measurements always use ``split_k = 1`` (:data:`SPLIT_K`): the NVTX range name does not
  record the split, and one split keeps the model comparison free of the split-K epilogue.
* ``--print-units base`` keeps every value in its base unit (no "K" / "M" scaling); the parser also
  accepts thousands separators ("1,234,567") and scaled units.

``parse_ncu_csv`` turns ncu's long CSV (one row per launch and metric) into one row per launch;
``compare_with_model`` joins it with :func:`quick_lab.lab.bank_model.predict_counts`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from quick_lab.build.device import cuda_device_status
from quick_lab.core import configs, dispatch, registry
from quick_lab.core.configs import TileConfig
from quick_lab.lab import bank_model, conflicts_target
from quick_lab.lab.timing import range_name

NCU_METRICS = list(bank_model.NCU_METRICS)
# Also collected: ncu's own cp.async (LDGSTS) counters (names as ``ncu --query-metrics --chip gh100``
# lists them), compared with the model-only keys of predict_counts. They are not part of the paper's
# figure: LDGSTS shared writes are not served by the bank rule (see quick_lab.lab.bank_model).
LDGSTS_METRICS = {
    "smsp__sass_inst_executed_op_ldgsts.sum": bank_model.LDGSTS_INSTRUCTIONS,
    "smsp__sass_l1tex_data_pipe_lsu_wavefronts_mem_shared_op_ldgsts.sum": bank_model.LDGSTS_WAVEFRONTS,
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ldgsts.sum": bank_model.LDGSTS_CONFLICTS,
}
ALL_METRICS = NCU_METRICS + list(LDGSTS_METRICS)
NVTX_INCLUDE = "regex:(awq|quick):.*/"
# The GEMM kernels' template names (ncu matches the function's base name): every registry family.
KERNEL_FILTER = "regex:(" + "|".join(f.name for f in registry.families()) + ")"
SPLIT_K = 1
GROUP_SIZE = 128
DEFAULT_SHAPES = ((4096, 4096),)
DEFAULT_BATCHES = (16, 256)
DEFAULT_TIMEOUT_S = 1800
# kernel:config:K..:N..:M.. anywhere in a CSV cell (possibly behind a domain or nesting prefix)
RANGE_RE = re.compile(r"(awq|quick):([^:\s\"/]+):K(\d+):N(\d+):M(\d+)")
_UNIT_SCALE = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BASE_UNITS = ("inst", "byte", "wavefront", "request", "sector", "cycle", "warp", "thread")


class NcuUnavailable(RuntimeError):
    """ncu is not installed or no GPU is usable: nothing can be measured here."""


# ---------------------------------------------------------------- cases and the target's case list


def default_kind_cfgs() -> list:
    """Both kernels' paper-comparison configs plus QUICK's per-M default (``'default'``: resolved by
    :func:`quick_lab.core.dispatch.default_config` for each M and N)."""
    return [("awq", configs.AWQ_DEFAULT), ("quick", configs.QUICK_DEFAULT), ("quick", "default")]


def _resolve(kind: str, cfg, M: int, N: int, group_size: int) -> TileConfig:
    if isinstance(cfg, TileConfig):
        return cfg
    if cfg == "default":
        return dispatch.default_config(kind, M, N, group_size)
    return TileConfig.parse(cfg)


def profile_cases(kind_cfgs, shapes, batches, group_size: int = GROUP_SIZE) -> list[tuple]:
    """``(kind, config name, K, N, M)`` per profiled launch, in launch order, duplicates dropped.

    ``kind_cfgs``: ``(kind, cfg)`` pairs, cfg a TileConfig, a config name or ``'default'``. Configs
    that do not fit a problem (:func:`quick_lab.core.registry.fits`: tile_n divides N, tile_k the
    group size; and tile_k divides K) are skipped.
    """
    cases = []
    for K, N in shapes:
        for M in batches:
            for kind, cfg in kind_cfgs:
                c = _resolve(kind, cfg, M, N, group_size)
                registry.check(kind, c)
                if not registry.fits(c, N, group_size) or K % c.tile_k:
                    continue
                case = (kind, c.name, int(K), int(N), int(M))
                if case not in cases:
                    cases.append(case)
    return cases


def write_cases(cases, path, split_k: int = SPLIT_K, group_size: int = GROUP_SIZE) -> Path:
    """Writes the target's case list (``cases`` from :func:`profile_cases`) to ``path`` as the JSON
    :func:`quick_lab.lab.conflicts_target.read_cases` reads; returns the path. ValueError for a case
    the target would reject (unknown kind, ``'/'`` in a config name, an invalid config)."""
    cases = [list(conflicts_target.check_case(c)) for c in cases]
    path = Path(path)
    path.write_text(json.dumps({"cases": cases, "split_k": int(split_k), "group_size": int(group_size)}))
    return path


def cases_file(kind_cfgs, shapes, batches, path=None, group_size: int = GROUP_SIZE) -> Path:
    """Writes the case list for every case of :func:`profile_cases` (to a temp ``.json`` file unless
    ``path``); returns its path."""
    cases = profile_cases(kind_cfgs, shapes, batches, group_size)
    if path is None:
        fd, name = tempfile.mkstemp(prefix="quick_lab_ncu_", suffix=".json")
        os.close(fd)
        path = name
    return write_cases(cases, path, SPLIT_K, group_size)


# ---------------------------------------------------------------- running ncu


def ncu_command(cases_path, ncu: str = "ncu", python: str | None = None, metrics=None) -> list[str]:
    """The ncu command line: its flags, then ``python -m quick_lab.lab.conflicts_target CASES.json``
    (python: this interpreter unless given; the CLI records it with ``"python3"`` in the metadata)."""
    return [ncu, "--nvtx", "--nvtx-include", NVTX_INCLUDE, "--kernel-name", KERNEL_FILTER,
            "--clock-control", "none", "--print-units", "base", "--csv",
            "--metrics", ",".join(metrics or ALL_METRICS)] + conflicts_target.command(cases_path, python)


def check_environment(ncu: str = "ncu") -> str:
    """Path of the ncu executable; :class:`NcuUnavailable` when ncu or a usable GPU is missing."""
    problems = []
    path = shutil.which(ncu)
    if path is None:
        problems.append(f"Nsight Compute ('{ncu}') is not on PATH; install it (CUDA toolkit / nsight-compute) "
                        "or pass --ncu /path/to/ncu")
    ok, reason = cuda_device_status()
    if not ok:
        problems.append(f"no usable GPU: {reason}")
    if problems:
        raise NcuUnavailable("cannot measure bank conflicts: " + "; ".join(problems))
    return path


def ncu_version(ncu: str = "ncu") -> str:
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60)
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_ncu(kind_cfgs=None, shapes=DEFAULT_SHAPES, batches=DEFAULT_BATCHES, *, ncu: str = "ncu",
            timeout: float = DEFAULT_TIMEOUT_S, python: str | None = None, keep_cases: bool = False) -> str:
    """Profiles every case under Nsight Compute; returns ncu's CSV output (stdout).

    The case list goes to ``cases.json`` in a fresh temporary directory, which is also ncu's working
    directory; it is removed afterwards unless ``keep_cases``.

    Raises :class:`NcuUnavailable` (a RuntimeError) without ncu or a GPU, RuntimeError when ncu
    fails, times out or lacks permission for the performance counters.
    """
    exe = check_environment(ncu)
    kind_cfgs = default_kind_cfgs() if kind_cfgs is None else kind_cfgs
    workdir = Path(tempfile.mkdtemp(prefix="quick_lab_ncu_"))
    try:
        cases_path = cases_file(kind_cfgs, shapes, batches, workdir / "cases.json")
        cmd = ncu_command(cases_path, exe, python)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir,
                              env=conflicts_target.environment())
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"ncu did not finish within {timeout:.0f} s: {' '.join(cmd)}") from exc
    finally:
        if not keep_cases:
            shutil.rmtree(workdir, ignore_errors=True)
    output = proc.stdout + proc.stderr
    if "ERR_NVGPUCTRPERM" in output:
        raise RuntimeError("ncu has no permission to read the GPU performance counters (ERR_NVGPUCTRPERM): "
                           "run as root or allow profiling for all users (NVreg_RestrictProfilingToAdminUsers=0)")
    if proc.returncode != 0 or '"ID"' not in proc.stdout:
        tail = "\n".join(output.strip().splitlines()[-25:])
        raise RuntimeError(f"ncu failed (exit code {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


# ---------------------------------------------------------------- parsing


def _number(text: str, unit: str = "") -> float:
    t = text.strip().replace(",", "")
    if not t or t.lower() in ("n/a", "nan", "-"):
        return math.nan
    try:
        value = float(t)
    except ValueError:
        return math.nan
    unit = (unit or "").strip()
    if len(unit) > 1 and unit[0] in _UNIT_SCALE and unit[1:].rstrip("s") in _BASE_UNITS:
        value *= _UNIT_SCALE[unit[0]]
    return value


def parse_ncu_csv(text: str, expected_ranges=None) -> pd.DataFrame:
    """ncu ``--csv`` output -> one row per profiled kernel launch.

    Skips everything before the header line starting with ``"ID"`` (``==PROF==`` lines, the target's
    own output) and any later line not starting with ``"``. Columns: ``id``, ``range`` (the NVTX
    range found by :data:`RANGE_RE` in any cell of the launch's rows: a dedicated NVTX column, a
    renamed kernel, ...), ``kind``, ``config``, ``K``, ``N``, ``M``, ``kernel`` (ncu's "Kernel Name")
    and one numeric column per metric. When a launch carries no range in the CSV and
    ``expected_ranges`` (the ranges in launch order) has one entry per launch, ranges are assigned
    in order (``range_source`` says which: 'csv' or 'order').
    """
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu CSV header (a line starting with "ID") in the output')
    body = [lines[start].lstrip()] + [ln for ln in lines[start + 1:] if ln.startswith('"')]
    reader = csv.reader(io.StringIO("\n".join(body)))
    header = next(reader)
    for required in ("ID", "Metric Name", "Metric Value"):
        if required not in header:
            raise ValueError(f"ncu CSV lacks the {required!r} column; columns: {header}")
    col = {name: i for i, name in enumerate(header)}
    launches: dict[str, dict] = {}
    metric_order: list[str] = []
    for row in reader:
        if len(row) != len(header) or row == header:  # ragged line or a repeated header
            continue
        launch = launches.setdefault(row[col["ID"]], {"id": row[col["ID"]], "range": None, "kernel": None})
        if launch["range"] is None:
            m = RANGE_RE.search("\x1f".join(row))
            if m:
                launch["range"] = m.group(0)
        if launch["kernel"] is None and "Kernel Name" in col:
            launch["kernel"] = row[col["Kernel Name"]]
        name = row[col["Metric Name"]].strip()
        if name not in metric_order:
            metric_order.append(name)
        unit = row[col["Metric Unit"]] if "Metric Unit" in col else ""
        launch[name] = _number(row[col["Metric Value"]], unit)
    records = list(launches.values())
    for r in records:
        r["range_source"] = "csv" if r["range"] else None
    missing = [r for r in records if r["range"] is None]
    if missing and expected_ranges is not None and len(expected_ranges) == len(records):
        for r, name in zip(records, expected_ranges):
            if r["range"] is None:
                r["range"], r["range_source"] = name, "order"
    for r in records:
        m = RANGE_RE.search(r["range"] or "")
        if m:
            r.update(kind=m.group(1), config=m.group(2), K=int(m.group(3)), N=int(m.group(4)), M=int(m.group(5)))
        else:
            r.update(kind=None, config=None, K=None, N=None, M=None)
    cols = ["id", "range", "range_source", "kind", "config", "K", "N", "M", "kernel"] + metric_order
    df = pd.DataFrame(records, columns=cols)
    df["id"] = pd.to_numeric(df["id"], errors="coerce")
    for c in ("K", "N", "M"):
        df[c] = df[c].astype("Int64")
    for m in metric_order:
        vals = df[m]
        if vals.notna().all() and (vals == vals.round()).all():
            df[m] = vals.astype("int64")
    return df.sort_values("id", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- model comparison


def _ratio(measured, model) -> float:
    if measured is None or pd.isna(measured):
        return math.nan
    if model == 0:
        return 1.0 if measured == 0 else math.inf
    return float(measured) / float(model)


def compare_with_model(df: pd.DataFrame, split_k: int = SPLIT_K) -> pd.DataFrame:
    """Measured launches (:func:`parse_ncu_csv`) joined with :func:`bank_model.predict_counts`.

    Per metric of :data:`NCU_METRICS` and :data:`LDGSTS_METRICS`: the measured column (same name;
    NaN when not collected), ``model:<metric>`` and ``ratio:<metric>`` = measured / model (1.0 when
    both are 0, inf when only the model is 0). The split is ``df['split_k']`` where
    present, else ``split_k`` (the conflicts measurement always profiles split_k = 1). Launches
    without a recognised range are dropped.
    """
    rows = []
    for r in df.to_dict("records"):
        if not r.get("kind"):
            continue
        split = int(r["split_k"]) if "split_k" in r and not pd.isna(r["split_k"]) else split_k
        pred = bank_model.predict_counts(r["kind"], TileConfig.parse(r["config"]), int(r["M"]), int(r["K"]),
                                         int(r["N"]), split)
        out = {k: r.get(k) for k in ("kind", "config", "K", "N", "M")}
        out.update(split_k=split, kernel=r.get("kernel"), blocks=pred["blocks"])
        for m in ALL_METRICS:
            measured = r.get(m, math.nan)
            model = pred[LDGSTS_METRICS.get(m, m)]
            out[m] = measured
            out[f"model:{m}"] = model
            out[f"ratio:{m}"] = _ratio(measured, model)
        rows.append(out)
    return pd.DataFrame(rows)


def measure(kind_cfgs=None, shapes=DEFAULT_SHAPES, batches=DEFAULT_BATCHES, **ncu_kwargs):
    """(comparison DataFrame, raw ncu CSV text) for every case; see :func:`run_ncu`."""
    kind_cfgs = default_kind_cfgs() if kind_cfgs is None else kind_cfgs
    cases = profile_cases(kind_cfgs, shapes, batches)
    text = run_ncu(kind_cfgs, shapes, batches, **ncu_kwargs)
    measured = parse_ncu_csv(text, expected_ranges=[range_name(k, c, K, N, M) for k, c, K, N, M in cases])
    return compare_with_model(measured), text


# ---------------------------------------------------------------- the printed summary


SUMMARY = (("st wf", bank_model.ST_WAVEFRONTS), ("ld wf", bank_model.LD_WAVEFRONTS),
           ("st conf", bank_model.ST_CONFLICTS), ("ld conf", bank_model.LD_CONFLICTS),
           ("st inst", bank_model.ST_INSTRUCTIONS), ("ld inst", bank_model.LD_INSTRUCTIONS),
           ("ldsm inst", bank_model.LDSM_INSTRUCTIONS))


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """"measured / model per launch": ``kind``, ``config``, ``M``, then one ``"<measured> / <model>"``
    string per :data:`SUMMARY` metric (thousands separators; ``n/a`` where not measured), from a
    :func:`compare_with_model` frame."""
    table = df[["kind", "config", "M"]].copy()
    for label, m in SUMMARY:
        table[label] = [f"{_fmt(a)} / {_fmt(b)}" for a, b in zip(df[m], df[f"model:{m}"])]
    return table


def _fmt(v) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{int(v):,}"


__all__ = ["ALL_METRICS", "DEFAULT_BATCHES", "DEFAULT_SHAPES", "DEFAULT_TIMEOUT_S", "GROUP_SIZE", "KERNEL_FILTER",
           "LDGSTS_METRICS", "NCU_METRICS", "NVTX_INCLUDE", "NcuUnavailable", "SPLIT_K", "SUMMARY", "cases_file",
           "check_environment", "compare_with_model", "default_kind_cfgs", "measure", "ncu_command", "ncu_version",
           "parse_ncu_csv", "profile_cases", "run_ncu", "summary_table", "write_cases"]

"""``quick-lab check``: every kernel variant under NVIDIA compute-sanitizer (memcheck, racecheck,
initcheck, synccheck).

A generated Python target program (:func:`target_script`) runs each op once on small, awkward shapes:
every AWQ and QUICK tile variant with split-K 1 and 3, odd M (1, 7, 33: partial row tiles), the
smallest N the variant takes (tile_n or 2 * tile_n), K = 2 * G (more when split-K needs more k-tiles,
so an uneven split with an empty slice occurs too) and every group size whose multiple tile_k is;
plus the default (dispatched) ops, the dequantize + cuBLAS fallback, both standalone dequantizers
and an empty-M call. About 200 launches: compute-sanitizer slows each launch by ~100x, so the case
list is a covering design, not a cross product (each variant sees both splits and all its group
sizes; M and N rotate through their values across cases). The target also checks every result
against a float64 NumPy reference (outputs pre-filled with NaN, so an unwritten element fails) and
exits 3 on a mismatch, so a clean sanitizer run is also a correct one.

Two things keep the findings about *our* kernels and make them sharp:

* The target disables CuPy's memory pool (``cupy.cuda.set_allocator(None)``): every array is its own
  ``cudaMalloc`` of its exact size, and memcheck runs with ``--padding``, so an overrun of even a few
  bytes past an array is an out-of-bounds access instead of a silent write into a neighbouring pool
  block.
* Every kernel the target launches is instrumented: ours (``awq_gemm``, ``quick_gemm``, the two
  ``dequantize`` kernels) and the few others (cuBLAS behind the fallback's ``cupy.matmul``; CuPy
  issues only copies and memsets here). With the pool disabled, initcheck no longer reports CuPy
  pool memory, so no kernel filter is needed, and a filter does harm (seen with compute-sanitizer
  2025.3.1 on an H100): initcheck does not track the writes of a filtered-out kernel, so reading
  cuBLAS's output was reported as ~400 uninitialized accesses, and racecheck died with "Internal
  Sanitizer Error: failed to handle a hardware exception" in the uninstrumented cuBLAS launch.
  ``kernel_names=OUR_KERNELS`` (``--kernel-name kns=<substring of the mangled name>``, additive)
  is still available to scope memcheck / synccheck to our kernels when a foreign kernel is noisy.

Findings are the tool's own totals: the ``ERROR SUMMARY: N errors`` line, and for racecheck the
``RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)`` line, of which errors + warnings
count (a racecheck "warning" is still a shared-memory hazard). Each report block is also attributed to
the kernel variant named in its ``at <kernel>+0x..`` line, for the per-variant table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from quick_lab.core import configs
from quick_lab.lab.metadata import REPO

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
# Substrings of the mangled names of our kernels, for an optional ``--kernel-name kns=...`` scope.
OUR_KERNELS = ("awq_gemm", "quick_gemm", "dequantize")
GROUP_SIZES = (32, 64, 128)
ODD_M = (1, 7, 33)
SPLITS = (1, 3)
MEMCHECK_PADDING = 256  # bytes of guard after every allocation
DEFAULT_TIMEOUT_S = 600
REL_TOL = 2e-3
TARGET_MISMATCH_EXIT = 3


class SanitizerError(RuntimeError):
    """compute-sanitizer could not produce a verdict: it is missing, the target crashed or failed its
    own correctness checks without a sanitizer finding, the run timed out, or no summary was printed."""


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One op call of the target program. ``op``: gemm (explicit config and split-K), default (the
    public op with no config: AutoAWQ default / QUICK dispatcher), fallback (dequantize + cuBLAS),
    dequantize (AutoAWQ format -> W), dequantize_quick_t (QUICK layout -> W^T) or empty (M = 0)."""

    op: str
    kind: str
    M: int
    K: int
    N: int
    G: int
    config: str = ""
    split_k: int = 1

    @property
    def label(self) -> str:
        what = f"{self.kind}:{self.config}:split{self.split_k}" if self.op == "gemm" else f"{self.op}:{self.kind}"
        return f"{what}:M{self.M}:K{self.K}:N{self.N}:G{self.G}"

    @property
    def launches(self) -> int:
        """Kernel launches of this case (upper bound; split-K reduces inside the GEMM launch)."""
        return {"gemm": 1, "default": 1, "fallback": 2, "dequantize": 1, "dequantize_quick_t": 1, "empty": 0}[self.op]


def _k_for(cfg: configs.TileConfig, G: int, split: int) -> int:
    """K = 2G, or the smallest multiple of G giving at least ``split`` k-tiles."""
    need = -(-split * cfg.tile_k // G) * G
    return max(2 * G, need)


def gemm_cases(kind: str, variants=None, splits=SPLITS) -> list[Case]:
    """Every variant x every split x every group size its tile_k divides; M and N rotate."""
    out = []
    for v, cfg in enumerate(configs.variants(kind) if variants is None else variants):
        groups = [G for G in GROUP_SIZES if configs.fits(cfg, cfg.tile_n, G)]
        for s, split in enumerate(splits):
            for g, G in enumerate(groups):
                M = ODD_M[(v + s + g) % len(ODD_M)]
                N = cfg.tile_n * (1 + (v + s + g) % 2)
                out.append(Case("gemm", kind, M, _k_for(cfg, G, split), N, G, cfg.name, split))
    return out


def support_cases() -> list[Case]:
    """Default ops, the fallback, both dequantizers and empty batches."""
    return [
        Case("default", "awq", 7, 256, 256, 128),
        Case("default", "quick", 1, 256, 256, 128),
        Case("default", "quick", 33, 512, 384, 64),
        Case("fallback", "quick", 33, 256, 192, 32),
        Case("dequantize", "awq", 0, 384, 192, 64),
        Case("dequantize_quick_t", "quick", 0, 384, 192, 64),
        Case("empty", "awq", 0, 256, 128, 128),
        Case("empty", "quick", 0, 256, 128, 128),
    ]


def all_cases(awq_variants=None, quick_variants=None, splits=SPLITS, support: bool = True) -> list[Case]:
    cases = gemm_cases("awq", awq_variants, splits) + gemm_cases("quick", quick_variants, splits)
    return cases + (support_cases() if support else [])


def smoke_variants() -> tuple[tuple[configs.TileConfig, ...], tuple[configs.TileConfig, ...]]:
    """A reduced set: the defaults, the smallest and largest tile of each kind, and the first staged
    (``async_weights``) QUICK variant if there is one."""
    awq = (configs.AWQ_DEFAULT, configs.AWQ_VARIANTS[0], configs.AWQ_VARIANTS[-1])
    quick = [configs.QUICK_DEFAULT, configs.QUICK_VARIANTS[0], configs.QUICK_VARIANTS[-1]]
    staged = [c for c in configs.QUICK_VARIANTS if getattr(c, "async_weights", False)]
    quick += staged[:1]
    return tuple(dict.fromkeys(awq)), tuple(dict.fromkeys(quick))


def launch_count(cases) -> int:
    return sum(c.launches for c in cases)


# ---------------------------------------------------------------- the target program

_TARGET = r'''"""Target program for compute-sanitizer, generated by quick_lab.lab.sanitizer (do not edit)."""
import json
import sys

sys.path.insert(0, {repo!r})

import numpy as np
import cupy

# Exact-size cudaMalloc per array (no pool): memcheck then sees each array's true bounds.
cupy.cuda.set_allocator(None)

from quick_lab.core import ops
from quick_lab.core.format import dequantize_fp16, random_awq, reference_gemm
from quick_lab.core.interleave import interleave

CASES = json.loads({cases!r})
REL_TOL = {rel_tol!r}
_weights = {{}}


def weights(K, N, G):
    key = (K, N, G)
    if key not in _weights:
        host = random_awq(K, N, G, seed=K + 3 * N + 7 * G)
        _weights[key] = (host, ops.to_device(host), ops.to_device(interleave(host)))
    return _weights[key]


def poisoned_out(M, N):
    """fp16 output pre-filled with NaN (bytes 0xFF) by cudaMemset: an element the op does not write
    stays NaN and fails the check below. (It also marks the buffer initialized for initcheck, which
    does not track cuBLAS's TMA stores on Hopper and would otherwise flag the fallback's output.)"""
    out = cupy.empty((M, N), dtype=cupy.float16)
    if out.size:
        out.data.memset(0xFF, out.nbytes)
    return out


def check_gemm(y, x_host, host, label):
    y = cupy.asnumpy(y)
    ref = reference_gemm(x_host, host)
    if not np.isfinite(y).all():
        return f"{{label}}: NaN/Inf in the output"
    err = float(np.linalg.norm(y.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
    return None if err < REL_TOL else f"{{label}}: relative error {{err:.2e}}"


def run(case):
    op, kind, M, K, N, G = (case[k] for k in ("op", "kind", "M", "K", "N", "G"))
    host, dev_awq, dev_quick = weights(K, N, G)
    weight = dev_awq if kind == "awq" else dev_quick
    gemm = ops.awq_gemm if kind == "awq" else ops.quick_gemm
    x_host = np.random.default_rng(M * 31 + K).standard_normal((M, K)).astype(np.float16)
    x = cupy.asarray(x_host)
    label = case["label"]
    if op == "gemm":
        y = gemm(x, weight, config=case["config"], split_k=case["split_k"], out=poisoned_out(M, N))
        return check_gemm(y, x_host, host, label)
    if op == "default":
        return check_gemm(gemm(x, weight, out=poisoned_out(M, N)), x_host, host, label)
    if op == "fallback":
        return check_gemm(ops.plan_fallback(x, weight, out=poisoned_out(M, N)).run(), x_host, host, label)
    if op == "dequantize":
        got = cupy.asnumpy(ops.dequantize(dev_awq))
        return None if np.array_equal(got.view(np.uint16), dequantize_fp16(host).view(np.uint16)) else \
            f"{{label}}: not bit-exact"
    if op == "dequantize_quick_t":
        got = cupy.asnumpy(ops.dequantize_quick_t(dev_quick))
        return None if np.array_equal(got.T.view(np.uint16), dequantize_fp16(host).view(np.uint16)) else \
            f"{{label}}: not bit-exact"
    if op == "empty":
        y = gemm(cupy.empty((0, K), dtype=cupy.float16), weight)
        return None if y.shape == (0, N) else f"{{label}}: shape {{y.shape}}"
    raise ValueError(f"unknown op {{op!r}}")


def main():
    bad = []
    for i, case in enumerate(CASES):
        print(f"QL-CASE {{i}} {{case['label']}}", flush=True)
        problem = run(case)
        cupy.cuda.Device().synchronize()  # errors of this case are reported before the next marker
        if problem:
            print(f"QL-MISMATCH {{problem}}", flush=True)
            bad.append(problem)
    print(f"QL-DONE {{len(CASES)}} cases, {{len(bad)}} mismatches", flush=True)
    return {mismatch_exit} if bad else 0


if __name__ == "__main__":
    sys.exit(main())
'''


def target_script(cases=None) -> str:
    """Source of the target program for ``cases`` (default: :func:`all_cases`)."""
    cases = all_cases() if cases is None else list(cases)
    payload = json.dumps([{**asdict(c), "label": c.label} for c in cases])
    return _TARGET.format(repo=str(REPO), cases=payload, rel_tol=REL_TOL, mismatch_exit=TARGET_MISMATCH_EXIT)


# ---------------------------------------------------------------- parsing the sanitizer's output

# "ERROR SUMMARY: 396 errors", not "ERROR SUMMARY: 196 errors were not printed. Use --print-limit ..."
_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*([\d,]+)\s+errors?\s*$", re.MULTILINE)
_RACE_SUMMARY = re.compile(
    r"RACECHECK SUMMARY:\s*([\d,]+)\s+hazards?\s+displayed\s*\(\s*([\d,]+)\s+errors?,\s*([\d,]+)\s+warnings?\s*\)")
_HEADER = re.compile(r"^=+ (\S.*)$")  # "========= Invalid __global__ write ...": a report starts
_NOT_A_REPORT = ("COMPUTE-SANITIZER", "SUMMARY", "Target application", "This tool", "Note:",
                 "didn't terminate", "limit")
_KERNEL_AT = re.compile(r"\bat (?:void )?([A-Za-z_]\w*(?:::\w+)*)(<[^>]*>)?(?:\([^)]*\))?\+0x")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def parse_summary(text: str) -> int | None:
    """Findings in a compute-sanitizer log: the last ``ERROR SUMMARY`` count and, for racecheck,
    errors + warnings of the ``RACECHECK SUMMARY`` (the larger when both appear); None when the log
    has no summary (the tool never got to the end)."""
    counts = []
    errors = _ERROR_SUMMARY.findall(text)
    if errors:
        counts.append(_int(errors[-1]))
    races = _RACE_SUMMARY.findall(text)
    if races:
        _, err, warn = races[-1]
        counts.append(_int(err) + _int(warn))
    return max(counts) if counts else None


def normalize_kernel(name: str, template_args: str | None) -> str:
    """``awq_gemm`` + ``<(int)16, (int)128, ...>`` -> ``awq_gemm<16,128,...>`` (NVRTC name-expression form)."""
    if not template_args:
        return name
    args = re.sub(r"\(\s*\w+(?:\s+\w+)*\s*\)", "", template_args)  # drop "(int)" / "(unsigned int)" casts
    return name + re.sub(r"\s+", "", args)


def variant_labels() -> dict[str, str]:
    """NVRTC name expression of every GEMM variant -> ``kind:config``."""
    out = {}
    for kind in configs.KINDS:
        for cfg in configs.variants(kind, hopper=True):
            out[configs.template_name(kind, cfg).replace(" ", "")] = f"{kind}:{cfg.name}"
    return out


def attribute_reports(text: str, labels: dict[str, str] | None = None) -> Counter:
    """Report blocks per kernel: each block (a non-indented ``=========`` line other than banners and
    summaries) goes to the first kernel named in an ``at <kernel>+0x..`` line inside it, mapped to
    ``kind:config`` for GEMM variants; ``(host)`` when no kernel is named (an API error)."""
    labels = variant_labels() if labels is None else labels
    counts: Counter = Counter()
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            head = header.group(1)
            if any(word in head for word in _NOT_A_REPORT):
                continue
            if current is not None:
                counts[current or "(host)"] += 1
            current = ""
            match = _KERNEL_AT.search(head)  # racecheck analysis: "Race reported between ... at k+0x.."
            if match:
                kernel = normalize_kernel(match.group(1), match.group(2))
                current = labels.get(kernel, kernel)
            continue
        if current == "" and line.startswith("="):
            match = _KERNEL_AT.search(line)
            if match:
                kernel = normalize_kernel(match.group(1), match.group(2))
                current = labels.get(kernel, kernel)
    if current is not None:
        counts[current or "(host)"] += 1
    return counts


# ---------------------------------------------------------------- running it


def sanitizer_path() -> str | None:
    return shutil.which("compute-sanitizer")


def sanitizer_version() -> str:
    exe = sanitizer_path()
    if not exe:
        return "not found"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [line for line in out.splitlines() if "Version" in line]
    return lines[-1].strip() if lines else out.strip().splitlines()[-1] if out.strip() else "unknown"


def sanitizer_command(tool: str, script_path, kernel_names=None, python: str | None = None) -> list[str]:
    if tool not in TOOLS:
        raise ValueError(f"tool must be one of {TOOLS}, got {tool!r}")
    cmd = [sanitizer_path() or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1",
           "--show-backtrace", "device", "--print-limit", "200"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "all"]
    if tool == "memcheck":
        cmd += ["--padding", str(MEMCHECK_PADDING)]
    for name in kernel_names or ():
        cmd += ["--kernel-name", f"kns={name}"]
    return cmd + [python or sys.executable, str(script_path)]


@dataclass
class SanitizerRun:
    tool: str
    findings: int
    returncode: int
    seconds: float
    log: str
    reports: Counter

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


def _script_file(script: str | None, workdir: Path) -> Path:
    path = workdir / "quick_lab_sanitizer_target.py"
    path.write_text(target_script() if script is None else script)
    return path


def run_sanitizer_full(tool: str, script: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                       kernel_names=None, python: str | None = None) -> SanitizerRun:
    """Runs ``compute-sanitizer --tool <tool>`` on ``script`` (Python source; default the full target).

    Raises :class:`SanitizerError` when there is no verdict: compute-sanitizer missing, a timeout, no
    summary line, or a target that failed (crash or exit 3 mismatch) while the tool found nothing.
    """
    if not sanitizer_path():
        raise SanitizerError("compute-sanitizer is not on PATH (it ships with the CUDA toolkit, "
                             "e.g. /usr/local/cuda/bin)")
    with tempfile.TemporaryDirectory(prefix="quick_lab_sanitizer_") as tmp:
        path = _script_file(script, Path(tmp))
        cmd = sanitizer_command(tool, path, kernel_names, python)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            tail = "\n".join(out.splitlines()[-40:])
            raise SanitizerError(f"{tool}: timed out after {timeout:.0f} s\n{tail}") from None
        seconds = time.perf_counter() - start
    log = proc.stdout
    findings = parse_summary(log)
    tail = "\n".join(log.splitlines()[-60:])
    if findings is None:
        raise SanitizerError(f"{tool}: no summary line in the output (exit code {proc.returncode})\n{tail}")
    if findings == 0 and proc.returncode != 0:
        why = "the target's results did not match the reference" if proc.returncode == TARGET_MISMATCH_EXIT \
            else "the target failed"
        raise SanitizerError(f"{tool}: {why} (exit code {proc.returncode}) with no sanitizer finding\n{tail}")
    return SanitizerRun(tool, findings, proc.returncode, seconds, log, attribute_reports(log))


def run_sanitizer(tool: str, script: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
                  kernel_names=None) -> tuple[int, str]:
    """``(findings, log tail)`` of one compute-sanitizer tool on the target (see :func:`run_sanitizer_full`)."""
    run = run_sanitizer_full(tool, script, timeout=timeout, kernel_names=kernel_names)
    return run.findings, run.tail()


def run_target_plain(script: str, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, str]:
    """The target without a sanitizer: compiles every variant (CuPy's disk cache then serves the
    sanitized runs) and checks the numerics. ``(exit code, output)``."""
    with tempfile.TemporaryDirectory(prefix="quick_lab_sanitizer_") as tmp:
        path = _script_file(script, Path(tmp))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([sys.executable, str(path)], cwd=tmp, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout)
    return proc.returncode, proc.stdout


# ---------------------------------------------------------------- the command


def _tool_list(text: str) -> tuple[str, ...]:
    tools = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tools if t not in TOOLS]
    if not tools or bad:
        raise argparse.ArgumentTypeError(f"tools are a comma-separated subset of {','.join(TOOLS)}, got {text!r}")
    return tools


def _rows_of(cases) -> list[str]:
    rows = []
    for c in cases:
        if c.op == "gemm":
            rows.append(f"{c.kind}:{c.config}")
        elif c.op in ("dequantize", "dequantize_quick_t"):
            rows.append("dequantize_awq" if c.op == "dequantize" else "dequantize_quick_t")
    return list(dict.fromkeys(rows))


def format_table(rows: list[str], tools, runs: dict) -> str:
    """Variants x tools: attributed report blocks; a last row with each tool's summary total."""
    extra = sorted({k for r in runs.values() if isinstance(r, SanitizerRun) for k in r.reports} - set(rows))
    width = max([len(r) for r in rows + extra] + [24])
    lines = [f"{'kernel variant':<{width}} " + " ".join(f"{t:>10}" for t in tools)]
    for row in rows + extra:
        cells = []
        for t in tools:
            r = runs[t]
            cells.append(f"{r.reports.get(row, 0):>10}" if isinstance(r, SanitizerRun) else f"{'-':>10}")
        lines.append(f"{row:<{width}} " + " ".join(cells))
    totals = [f"{runs[t].findings:>10}" if isinstance(runs[t], SanitizerRun) else f"{'FAILED':>10}"
              for t in tools]
    lines.append(f"{'TOTAL (tool summary)':<{width}} " + " ".join(totals))
    return "\n".join(lines)


def cmd_check(args) -> int:
    from quick_lab.build.device import cuda_device_status
    from quick_lab.lab.metadata import results_dir, write_metadata

    if not sanitizer_path():
        print("quick-lab: compute-sanitizer is not on PATH; install the CUDA toolkit and add its bin/ "
              "(e.g. export PATH=/usr/local/cuda/bin:$PATH)", file=sys.stderr)
        return 2
    ok, reason = cuda_device_status()
    if not ok:
        print(f"quick-lab: check runs the kernels on a GPU and none is usable: {reason}", file=sys.stderr)
        return 2

    if args.wgmma:  # the Hopper mainloop only: every wgmma variant, stream-K and split-K
        cases, stem = all_cases((), configs.QUICK_WGMMA_VARIANTS, (configs.STREAM_K, 1, 3), support=False), "sanitizer_wgmma"
    else:
        awq, quick = smoke_variants() if args.smoke else (None, None)
        cases, stem = all_cases(awq, quick), "sanitizer"
    script = target_script(cases)
    out_dir = results_dir(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(cases)} cases, ~{launch_count(cases)} launches per tool; tools: {', '.join(args.tools)}",
          file=sys.stderr)

    # Plain run first: compiles every variant into CuPy's cache and checks the numerics.
    start = time.perf_counter()
    code, output = run_target_plain(script, timeout=args.timeout)
    print(f"plain run: exit {code} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if code != 0:
        print("\n".join(output.splitlines()[-40:]), file=sys.stderr)
        print("quick-lab: the target failed without a sanitizer (see above); fix that first", file=sys.stderr)
        return 1

    runs: dict = {}
    for tool in args.tools:
        print(f"{tool} ...", file=sys.stderr, flush=True)
        try:
            run = run_sanitizer_full(tool, script, timeout=args.timeout)
        except SanitizerError as exc:
            runs[tool] = exc
            (out_dir / f"{stem}.{tool}.log").write_text(f"{exc}\n")
            print(f"{tool}: {exc}", file=sys.stderr)
            continue
        runs[tool] = run
        (out_dir / f"{stem}.{tool}.log").write_text(run.log)
        print(f"{tool}: {run.findings} findings in {run.seconds:.1f} s", file=sys.stderr)

    kernels = _rows_of(cases)
    print(format_table(kernels, args.tools, runs))
    extra = sorted({k for r in runs.values() if isinstance(r, SanitizerRun) for k in r.reports} - set(kernels))
    rows = []
    for tool in args.tools:
        run = runs[tool]
        if not isinstance(run, SanitizerRun):
            rows.append(dict(tool=tool, kernel="TOTAL", findings="", status="failed", seconds=""))
            continue
        rows += [dict(tool=tool, kernel=k, findings=run.reports.get(k, 0), status="attributed", seconds="")
                 for k in kernels + extra]
        rows.append(dict(tool=tool, kernel="TOTAL", findings=run.findings, status="summary",
                         seconds=round(run.seconds, 1)))
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["tool", "kernel", "findings", "status", "seconds"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_metadata(out_dir / f"{stem}.meta.json", command=" ".join(sys.argv[1:]) or "check",
                   compute_sanitizer=sanitizer_version(), tools=list(args.tools), cases=len(cases),
                   launches_per_tool=launch_count(cases), kernel_filter="none (every kernel instrumented)",
                   memcheck_padding_bytes=MEMCHECK_PADDING, smoke=bool(args.smoke))
    print(f"wrote {out_dir / (stem + '.csv')}")
    failed = [t for t, r in runs.items() if not isinstance(r, SanitizerRun) or r.findings]
    if failed:
        print(f"quick-lab: findings or failed runs in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``check`` on the CLI's subparsers (``quick_lab.cli.build_parser``)."""
    p = subparsers.add_parser("check", help="every kernel variant under compute-sanitizer "
                                            "(memcheck, racecheck, initcheck, synccheck)")
    p.add_argument("--tools", type=_tool_list, default=TOOLS, help=f"comma-separated, default {','.join(TOOLS)}")
    p.add_argument("--out", help="results directory (default results/<gpu>/)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per tool run")
    p.add_argument("--smoke", action="store_true", help="a reduced variant set (defaults, smallest, largest)")
    p.add_argument("--wgmma", action="store_true",
                   help="only the Hopper wgmma variants (sm_90 GPU), stream-K and split-K; writes sanitizer_wgmma.*")
    p.set_defaults(func=cmd_check)
    return p

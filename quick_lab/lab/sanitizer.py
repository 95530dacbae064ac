"""``quick-lab check``: every kernel variant under NVIDIA compute-sanitizer (memcheck, racecheck,
initcheck, synccheck).

The target program, :mod:`quick_lab.lab.sanitizer_target`, runs as
``python -m quick_lab.lab.sanitizer_target CASES.json`` (same interpreter, a PYTHONPATH that imports this very
``quick_lab``) on the case list :func:`write_cases` writes. It runs each op once on small, awkward
shapes: every AWQ and QUICK tile variant with split-K 1 and 3 (and stream-K where the variant's
family has it; ``check --wgmma`` takes the Hopper-only wgmma variants instead), odd M (1, 7, 33:
partial row tiles), the smallest N the variant takes (tile_n or 2 * tile_n), K = 2 * G (more when
split-K needs more k-tiles, so an uneven split with an empty slice occurs too) and every group size
whose multiple tile_k is; plus the default (dispatched) ops, the dequantize + cuBLAS fallback, both
standalone dequantizers, the GPU interleave and an empty-M call. About 200 launches: compute-sanitizer
slows each launch by ~100x, so the case list is a covering design, not a cross product (each variant
sees both splits and all its group sizes; M and N rotate through their values across cases). The
target also checks every result against a float64 NumPy reference (outputs pre-filled with NaN, so an
unwritten element fails) and exits 3 on a mismatch, so a clean sanitizer run is also a correct one.

Two things keep the findings about *our* kernels and make them sharp:

* The target disables CuPy's memory pool (``cupy.cuda.set_allocator(None)``): every array is its own
  ``cudaMalloc`` of its exact size, and memcheck runs with ``--padding``, so an overrun of even a few
  bytes past an array is an out-of-bounds access instead of a silent write into a neighbouring pool
  block.
* Every kernel the target launches is instrumented: ours (every registry family's template,
  ``awq_gemm``, ``quick_gemm``, ``quick_wgmma``, the two ``dequantize`` kernels and ``interleave_awq``)
  and the few others (cuBLAS behind the fallback's ``cupy.matmul``; CuPy issues only copies and
  memsets here).
  With the pool disabled, initcheck no longer reports CuPy pool memory, so no kernel filter is
  needed, and a filter does harm (seen with compute-sanitizer 2025.3.1 on an H100): initcheck does
  not track the writes of a filtered-out kernel, so reading cuBLAS's output was reported as ~400
  uninitialized accesses, and racecheck died with "Internal Sanitizer Error: failed to handle a
  hardware exception" in the uninstrumented cuBLAS launch. ``kernel_names=OUR_KERNELS``
  (``--kernel-name kns=<substring of the mangled name>``, additive) is still available to scope
  memcheck / synccheck to our kernels when a foreign kernel is noisy.

Findings are the tool's own totals: the ``ERROR SUMMARY: N errors`` line, and for racecheck the
``RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)`` line, of which errors + warnings
count (a racecheck "warning" is still a shared-memory hazard). Each report block is also attributed to
the kernel variant named in its ``at <kernel>+0x..`` line, for the per-variant table (every variant
of every family in :mod:`quick_lab.core.registry`).

The command each tool runs (:func:`sanitizer_command`), memcheck for example::

    compute-sanitizer --tool memcheck --error-exitcode 1 --show-backtrace device --print-limit 200
        --padding 256 <sys.executable> -m quick_lab.lab.sanitizer_target <tmp>/cases.json

with ``<tmp>`` a fresh temporary directory, also the working directory (so nothing there shadows
the package). racecheck adds ``--racecheck-report all`` instead of ``--padding``.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from quick_lab.core import configs, registry
from quick_lab.core.configs import STREAM_K
from quick_lab.lab import sanitizer_target
from quick_lab.lab.sanitizer_target import REL_TOL, TARGET_MISMATCH_EXIT  # noqa: F401 (re-exported)

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
# Substrings of the mangled names of our kernels, for an optional ``--kernel-name kns=...`` scope:
# every family's template name, the dequantize kernels and the GPU interleave.
OUR_KERNELS = tuple(dict.fromkeys(f.name for f in registry.families())) + ("dequantize", "interleave_awq")
GROUP_SIZES = (32, 64, 128)
ODD_M = (1, 7, 33)
SPLITS = (1, 3)
# Case ops that run a GEMM with one of its writer's other epilogues (registry.EPILOGUES) -> that epilogue.
WRITER_OPS = {"gemm_silu_mul": "silu_mul", "gemm_partials": "partials"}
MEMCHECK_PADDING = 256  # bytes of guard after every allocation
DEFAULT_TIMEOUT_S = 600


class SanitizerError(RuntimeError):
    """compute-sanitizer could not produce a verdict: it is missing, the target crashed or failed its
    own correctness checks without a sanitizer finding, the run timed out, or no summary was printed."""


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One op call of the target program. ``op``: gemm (explicit config and split-K), default (the
    public op with no config: AutoAWQ default / QUICK dispatcher), fallback (dequantize + cuBLAS),
    dequantize (AutoAWQ format -> W), dequantize_quick_t (QUICK layout -> W^T), interleave (AutoAWQ format ->
    QUICK layout on the GPU) or empty (M = 0)."""

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
        what = (f"{self.kind}:{self.config}:split{self.split_k}" if self.op == "gemm" else
                f"{self.op}:{self.kind}:{self.config}:split{self.split_k}" if self.op in WRITER_OPS else
                f"{self.op}:{self.kind}")
        return f"{what}:M{self.M}:K{self.K}:N{self.N}:G{self.G}"

    @property
    def launches(self) -> int:
        """Kernel launches of this case (upper bound; split-K reduces inside the GEMM launch)."""
        return {"gemm": 1, "gemm_silu_mul": 1, "gemm_partials": 1, "default": 1, "fallback": 2, "dequantize": 1, "dequantize_quick_t": 1, "interleave": 1,
                "empty": 0}[self.op]


def _k_for(cfg: configs.TileConfig, G: int, split: int) -> int:
    """K = 2G, or the smallest multiple of G giving at least ``split`` k-tiles."""
    need = -(-split * cfg.tile_k // G) * G
    return max(2 * G, need)


def splits_for(fam: registry.KernelFamily, splits=SPLITS) -> tuple[int, ...]:
    """The splits a variant of ``fam`` is checked with: ``splits``, led by stream-K
    (``split_k = STREAM_K``) when the family has a stream-K schedule, never otherwise."""
    plain = tuple(s for s in splits if s != STREAM_K)
    return ((STREAM_K,) + plain) if fam.stream_k else plain


def gemm_cases(kind: str, variants=None, splits=SPLITS) -> list[Case]:
    """Every variant (default: the registry's variants of ``kind`` that run on every GPU) x every
    split (:func:`splits_for` its family) x every group size its tile_k divides; M and N rotate."""
    out = []
    for v, cfg in enumerate(registry.variants(kind) if variants is None else variants):
        groups = [G for G in GROUP_SIZES if registry.fits(cfg, cfg.tile_n, G)]
        for s, split in enumerate(splits_for(registry.family(kind, cfg), splits)):
            for g, G in enumerate(groups):
                batches = [m for m in ODD_M if registry.fits(cfg, cfg.tile_n, G, M=m)]  # decode: M <= tile_m
                M = batches[(v + s + g) % len(batches)]
                N = cfg.tile_n * (1 + (v + s + g) % 2)
                out.append(Case("gemm", kind, M, _k_for(cfg, G, split), N, G, cfg.name, split))
    return out


def support_cases() -> list[Case]:
    """Default ops, the fallback, both dequantizers, the GPU interleave (N/64 not a multiple of its 4-block
    tile, so a narrower last tile) and empty batches."""
    return [
        Case("default", "awq", 7, 256, 256, 128),
        Case("default", "quick", 1, 256, 256, 128),
        Case("default", "quick", 33, 512, 384, 64),
        Case("fallback", "quick", 33, 256, 192, 32),
        Case("dequantize", "awq", 0, 384, 192, 64),
        Case("dequantize_quick_t", "quick", 0, 384, 192, 64),
        Case("interleave", "awq", 0, 384, 320, 64),
        Case("interleave", "awq", 0, 256, 192, 32),
        Case("empty", "awq", 0, 256, 128, 128),
        Case("empty", "quick", 0, 256, 128, 128),
    ]


def all_cases(awq_variants=None, quick_variants=None, splits=SPLITS, support: bool = True) -> list[Case]:
    cases = gemm_cases("awq", awq_variants, splits) + gemm_cases("quick", quick_variants, splits)
    return cases + (support_cases() if support else [])


def hopper_variants(kind: str) -> tuple[configs.TileConfig, ...]:
    """The registry's variants of ``kind`` that run only on Hopper (the sm_90a wgmma family)."""
    portable = set(registry.variants(kind))
    return tuple(c for c in registry.variants(kind, hopper=True) if c not in portable)


def wgmma_cases() -> list[Case]:
    """``check --wgmma``: every Hopper-only variant with stream-K and split-K 1 and 3, no support ops."""
    return all_cases(hopper_variants("awq"), hopper_variants("quick"), support=False)


def decode_cases() -> list[Case]:
    """``check --decode``: every decode-kernel variant (kernels/quick_decode.cu) x split x group size,
    M rotating through odd batches up to its tile_m (one row, a part-filled batch tile, the last row of
    its last batch tile), N one or two strips; then each variant x split once more with its SiLU x up
    writer (``gemm_silu_mul``) and with its writer that leaves the split slices to their reader
    (``gemm_partials``), the group size and batch rotating; no support ops."""
    out = []
    for v, cfg in enumerate(configs.QUICK_DECODE_VARIANTS):
        batches = sorted({1, 7, cfg.tile_m - 3, cfg.tile_m})
        for s, split in enumerate(SPLITS):
            for g, G in enumerate(GROUP_SIZES):
                i = v + s + g
                out.append(Case("gemm", "quick", batches[i % len(batches)], _k_for(cfg, G, split),
                                cfg.tile_n * (1 + i % 2), G, cfg.name, split))
            i, G = v + s, GROUP_SIZES[(v + s) % len(GROUP_SIZES)]
            out.append(Case("gemm_silu_mul", "quick", batches[(i + 1) % len(batches)], _k_for(cfg, G, split),
                            cfg.tile_n * (1 + i % 2), G, cfg.name, split))
            G = GROUP_SIZES[(v + s + 1) % len(GROUP_SIZES)]
            out.append(Case("gemm_partials", "quick", batches[(i + 2) % len(batches)], _k_for(cfg, G, split),
                            cfg.tile_n * (2 - i % 2), G, cfg.name, split))
    return out


def smoke_variants() -> tuple[tuple[configs.TileConfig, ...], tuple[configs.TileConfig, ...]]:
    """A reduced set: the defaults, the smallest and largest tile of each kind, and the first staged
    (``async_weights``) QUICK variant if there is one."""
    awq_all, quick_all = registry.variants("awq"), registry.variants("quick")
    awq = (configs.AWQ_DEFAULT, awq_all[0], awq_all[-1])
    quick = [configs.QUICK_DEFAULT, quick_all[0], quick_all[-1]]
    staged = [c for c in quick_all if getattr(c, "async_weights", False)]
    quick += staged[:1]
    return tuple(dict.fromkeys(awq)), tuple(dict.fromkeys(quick))


def launch_count(cases) -> int:
    return sum(c.launches for c in cases)


# ---------------------------------------------------------------- the target's case list


def case_records(cases) -> list[dict]:
    """The JSON form of ``cases`` that :func:`quick_lab.lab.sanitizer_target.read_cases` reads."""
    return [{**asdict(c), "label": c.label} for c in cases]


def write_cases(cases, path) -> Path:
    """Writes the case list (default: :func:`all_cases`) for the target to ``path``; returns it."""
    path = Path(path)
    path.write_text(json.dumps(case_records(all_cases() if cases is None else cases)))
    return path


def target_command(cases_path, python: str | None = None) -> list[str]:
    """``python -m quick_lab.lab.sanitizer_target CASES.json`` (python: this interpreter)."""
    return sanitizer_target.command(cases_path, python)


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
    """NVRTC name expression of every variant of every registry family -> ``kind:config``."""
    out = {}
    for fam in registry.families():
        for cfg in fam.variants:
            for epilogue in fam.epilogues:
                tag = "" if epilogue == "store" else f":{epilogue}"
                out[fam.template_name(cfg, epilogue).replace(" ", "")] = f"{fam.kind}:{cfg.name}{tag}"
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


def sanitizer_command(tool: str, cases_path=None, kernel_names=None, python: str | None = None, *,
                      target=None) -> list[str]:
    """The compute-sanitizer command line of one tool: its flags, then the program, which is
    ``python -m quick_lab.lab.sanitizer_target CASES.json`` (:func:`target_command`) or, when given,
    ``target`` (an argv, e.g. ``[python, probe.py]``)."""
    if tool not in TOOLS:
        raise ValueError(f"tool must be one of {TOOLS}, got {tool!r}")
    if target is None and cases_path is None:
        raise ValueError("sanitizer_command needs the case list's path or a target argv")
    cmd = [sanitizer_path() or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1",
           "--show-backtrace", "device", "--print-limit", "200"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "all"]
    if tool == "memcheck":
        cmd += ["--padding", str(MEMCHECK_PADDING)]
    for name in kernel_names or ():
        cmd += ["--kernel-name", f"kns={name}"]
    return cmd + (list(map(str, target)) if target is not None else target_command(cases_path, python))


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


def _target(workdir: Path, cases, script: str | None, python: str | None, module: str | None = None) -> list[str]:
    """Writes the program's input into ``workdir``; returns the program's argv. ``module``: a target
    program of its own cases run as ``python -m module`` (a layer above this one, e.g. the decoder's
    fused ops, brings its own); ``script``: Python source run as a file instead of the target module
    (a probe); else the case list ``cases`` (default :func:`all_cases`) for
    :mod:`quick_lab.lab.sanitizer_target`."""
    if isinstance(cases, (str, bytes)):
        raise TypeError("cases is a list of Case; pass Python source as script=...")
    if module is not None:
        return [python or sys.executable, "-m", module]
    if script is not None:
        path = workdir / "quick_lab_sanitizer_probe.py"
        path.write_text(script)
        return [python or sys.executable, str(path)]
    return target_command(write_cases(cases, workdir / "cases.json"), python)


def _run(cmd: list[str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in ``cwd`` (a fresh temp dir: nothing there shadows quick_lab) with the target's
    environment (this quick_lab first on PYTHONPATH, unbuffered), stderr into stdout."""
    return subprocess.run(cmd, cwd=cwd, env=sanitizer_target.environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout)


def run_sanitizer_full(tool: str, cases=None, *, script: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                       kernel_names=None, python: str | None = None, module: str | None = None) -> SanitizerRun:
    """Runs ``compute-sanitizer --tool <tool>`` on the target module over ``cases`` (default
    :func:`all_cases`), or on ``script`` (Python source) when given.

    Raises :class:`SanitizerError` when there is no verdict: compute-sanitizer missing, a timeout, no
    summary line, or a target that failed (crash or exit 3 mismatch) while the tool found nothing.
    """
    if not sanitizer_path():
        raise SanitizerError("compute-sanitizer is not on PATH (it ships with the CUDA toolkit, "
                             "e.g. /usr/local/cuda/bin)")
    with tempfile.TemporaryDirectory(prefix="quick_lab_sanitizer_") as tmp:
        cmd = sanitizer_command(tool, kernel_names=kernel_names,
                                target=_target(Path(tmp), cases, script, python, module))
        start = time.perf_counter()
        try:
            proc = _run(cmd, tmp, timeout)
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


def run_sanitizer(tool: str, cases=None, *, script: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                  kernel_names=None) -> tuple[int, str]:
    """``(findings, log tail)`` of one compute-sanitizer tool on the target (see :func:`run_sanitizer_full`)."""
    run = run_sanitizer_full(tool, cases, script=script, timeout=timeout, kernel_names=kernel_names)
    return run.findings, run.tail()


def run_target_plain(cases=None, timeout: float = DEFAULT_TIMEOUT_S, *, script: str | None = None,
                     python: str | None = None, module: str | None = None) -> tuple[int, str]:
    """The target without a sanitizer: compiles every variant (CuPy's disk cache then serves the
    sanitized runs) and checks the numerics. ``(exit code, output)``."""
    with tempfile.TemporaryDirectory(prefix="quick_lab_sanitizer_") as tmp:
        proc = _run(_target(Path(tmp), cases, script, python, module), tmp, timeout)
    return proc.returncode, proc.stdout


# ---------------------------------------------------------------- the check


def _rows_of(cases) -> list[str]:
    rows = []
    for c in cases:
        if c.op == "gemm":
            rows.append(f"{c.kind}:{c.config}")
        elif c.op in WRITER_OPS:  # the writer's other instantiations (variant_labels' tag)
            rows.append(f"{c.kind}:{c.config}:{WRITER_OPS[c.op]}")
        elif c.op in ("dequantize", "dequantize_quick_t", "interleave"):
            rows.append({"dequantize": "dequantize_awq", "interleave": "interleave_awq"}.get(c.op, c.op))
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


def check(out_dir, tools=TOOLS, timeout: float = DEFAULT_TIMEOUT_S, smoke: bool = False, wgmma: bool = False,
          command: str = "check", module: str | None = None, stem: str | None = None,
          kernels: tuple[str, ...] = (), decode: bool = False) -> int:
    """``quick-lab check`` once the CLI has found compute-sanitizer and a GPU: a plain run of the
    target (compiles, checks the numerics), then each tool; prints the variants x tools table and
    writes ``<stem>.csv``, ``<stem>.<tool>.log`` and ``<stem>.meta.json`` into ``out_dir`` (stem
    ``sanitizer``, or ``sanitizer_wgmma`` with ``wgmma``). Returns the exit code: 0 clean, 1 when the
    plain run failed or a tool found something or gave no verdict.

    ``wgmma``: only the Hopper-only variants (sm_90 GPU), stream-K and split-K (:func:`wgmma_cases`);
    ``decode``: only the decode kernel's variants (:func:`decode_cases`, stem ``sanitizer_decode``);
    ``smoke``: the reduced set of :func:`smoke_variants`. ``module``: instead of the GEMM cases, a
    target program with its own cases (``python -m module``, same protocol: QL-CASE / QL-MISMATCH /
    QL-DONE, exit 3 on a mismatch), reported under ``stem`` with one row per name in ``kernels``.
    """
    from quick_lab.lab.metadata import write_metadata

    tools = tuple(tools)
    if module is not None:
        if not stem or not kernels:
            raise ValueError("check(module=...) needs the report's stem and the kernel names it launches")
        cases = []
    elif wgmma:
        cases, stem = wgmma_cases(), "sanitizer_wgmma"
    elif decode:
        cases, stem = decode_cases(), "sanitizer_decode"
    else:
        awq, quick = smoke_variants() if smoke else (None, None)
        cases, stem = all_cases(awq, quick), "sanitizer"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if module is None:
        print(f"{len(cases)} cases, ~{launch_count(cases)} launches per tool; tools: {', '.join(tools)}",
              file=sys.stderr)
    else:
        print(f"python -m {module}; tools: {', '.join(tools)}", file=sys.stderr)

    # Plain run first: compiles every variant into CuPy's cache and checks the numerics.
    start = time.perf_counter()
    code, output = run_target_plain(cases, timeout=timeout, module=module)
    print(f"plain run: exit {code} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if code != 0:
        print("\n".join(output.splitlines()[-40:]), file=sys.stderr)
        print("quick-lab: the target failed without a sanitizer (see above); fix that first", file=sys.stderr)
        return 1

    runs: dict = {}
    for tool in tools:
        print(f"{tool} ...", file=sys.stderr, flush=True)
        try:
            run = run_sanitizer_full(tool, cases, timeout=timeout, module=module)
        except SanitizerError as exc:
            runs[tool] = exc
            (out_dir / f"{stem}.{tool}.log").write_text(f"{exc}\n")
            print(f"{tool}: {exc}", file=sys.stderr)
            continue
        runs[tool] = run
        (out_dir / f"{stem}.{tool}.log").write_text(run.log)
        print(f"{tool}: {run.findings} findings in {run.seconds:.1f} s", file=sys.stderr)

    kernels = list(kernels) if module is not None else _rows_of(cases)
    print(format_table(kernels, tools, runs))
    extra = sorted({k for r in runs.values() if isinstance(r, SanitizerRun) for k in r.reports} - set(kernels))
    rows = []
    for tool in tools:
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
    write_metadata(out_dir / f"{stem}.meta.json", command=command,
                   compute_sanitizer=sanitizer_version(), tools=list(tools),
                   cases=len(cases) if module is None else f"the cases of python -m {module}",
                   launches_per_tool=launch_count(cases) if module is None else None,
                   kernel_filter="none (every kernel instrumented)",
                   memcheck_padding_bytes=MEMCHECK_PADDING, smoke=bool(smoke))
    print(f"wrote {out_dir / (stem + '.csv')}")
    failed = [t for t, r in runs.items() if not isinstance(r, SanitizerRun) or r.findings]
    if failed:
        print(f"quick-lab: findings or failed runs in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

"""The target program ``quick-lab conflicts`` runs under Nsight Compute (:mod:`quick_lab.lab.conflicts`)::

    ncu ... python3 -m quick_lab.lab.conflicts_target CASES.json

``CASES.json`` is what :func:`quick_lab.lab.conflicts.write_cases` writes: ``{"cases": [[kind, config,
K, N, M], ...], "split_k": 1, "group_size": 128}``. For each case, in order, the target plans the GEMM
of that variant (``split_k`` pinned), runs it once as a warm-up (which also compiles the kernel) outside
any NVTX range, then runs it once inside the NVTX range ``range_name(kind, config, K, N, M)``
(:func:`quick_lab.lab.timing.range_name`: ``':'`` separators, since ncu reads ``'/'`` in
``--nvtx-include`` as range nesting). Only that ranged launch is profiled. One random weight per
(K, N) is reused across the batches M.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import quick_lab
from quick_lab.core import ops, registry
from quick_lab.core.configs import TileConfig
from quick_lab.lab import target_program
from quick_lab.lab.bench import Problem
from quick_lab.lab.timing import nvtx_range, range_name

MODULE = "quick_lab.lab.conflicts_target"
USAGE_EXIT = target_program.USAGE_EXIT


# ---------------------------------------------------------------- how the parent runs it


def command(cases_path, python: str | None = None) -> list[str]:
    """``[python, "-m", "quick_lab.lab.conflicts_target", CASES.json]`` (python: this interpreter)."""
    return [python or sys.executable, "-m", MODULE, str(cases_path)]


def environment(base=None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with a PYTHONPATH that leads with the directory holding *this*
    ``quick_lab`` (a checkout's root or an installation's site-packages), so the target imports the
    same package as the parent."""
    env = dict(os.environ if base is None else base)
    root = str(Path(quick_lab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def check_case(case) -> tuple[str, str, int, int, int]:
    """``(kind, config name, K, N, M)``; ValueError for anything else (an unknown kind, a config name
    with ``'/'``, which would nest the NVTX range, or one the registry rejects)."""
    try:
        kind, name, K, N, M = case
        K, N, M = int(K), int(N), int(M)
    except (TypeError, ValueError):
        raise ValueError(f"a case is (kind, config, K, N, M), got {case!r}") from None
    if kind not in registry.KINDS or not isinstance(name, str) or "/" in name:
        raise ValueError(f"bad case {kind!r} {name!r}")
    registry.check(kind, TileConfig.parse(name))
    return kind, name, K, N, M


def read_cases(path) -> tuple[list[tuple], int, int]:
    """``(cases, split_k, group_size)`` of a CASES.json; ValueError when it is not one."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or set(data) != {"cases", "split_k", "group_size"}:
        raise ValueError(f"{path}: expected an object with cases, split_k and group_size")
    return [check_case(c) for c in data["cases"]], int(data["split_k"]), int(data["group_size"])


# ---------------------------------------------------------------- the launches


def main(argv=None) -> int:
    parsed, failed = target_program.read_case_argument(argv, MODULE, read_cases)
    if failed is not None:
        return failed
    cases, split_k, group_size = parsed

    import cupy

    problem = None
    for kind, name, K, N, M in cases:
        if problem is None or (problem.K, problem.N) != (K, N):
            problem = None
            problem = Problem.random(K, N, group_size)
        x = cupy.asarray(np.random.default_rng(M).standard_normal((M, K)).astype(np.float16))
        make, weight = ((ops.plan_awq_gemm, problem.awq) if kind == "awq"
                        else (ops.plan_quick_gemm, problem.quick))
        plan = make(x, weight, config=TileConfig.parse(name), split_k=split_k)
        plan.run()  # warm-up (the kernel is compiled by now): outside any range, not profiled
        cupy.cuda.Device().synchronize()
        with nvtx_range(range_name(kind, name, K, N, M)):
            plan.run()
            cupy.cuda.Device().synchronize()
    print(f"quick_lab.lab.conflicts target: {len(cases)} ranged launches", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

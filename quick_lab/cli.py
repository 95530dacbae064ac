"""The ``quick-lab`` command line: info, compile, bench, tiles, conflicts, e2e, check, reproduce."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .argtypes import int_list, shape_list
from .device import cuda_device_status

def _fail(message: str, code: int = 2) -> int:
    print(f"quick-lab: {message}", file=sys.stderr)
    return code


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<28}", end=end, file=sys.stderr,
          flush=True)


def cmd_info(args) -> int:
    ok, reason = cuda_device_status()
    from .nvrtc import NvrtcError, nvrtc_version

    try:
        nv = nvrtc_version()
    except NvrtcError as exc:
        nv = f"unavailable ({exc})"
    if not ok:
        import importlib.metadata as md

        try:
            cupy_version = md.version("cupy-cuda13x")
        except md.PackageNotFoundError:
            cupy_version = "not installed"
        print(f"GPU: none ({reason})")
        print(f"NVRTC: {nv}")
        print(f"CuPy: {cupy_version}")
        return 0
    from .metadata import gpu_info

    info = gpu_info()
    for key in ("gpu", "compute_capability", "sm_count", "driver_version", "driver", "runtime", "nvrtc",
                "cupy", "clocks_mhz"):
        print(f"{key}: {info.get(key)}")
    return 0


def cmd_compile(args) -> int:
    from .nvrtc import NvrtcError, compile_all

    try:
        reports = compile_all(tuple(args.arch.split(",")))
    except (NvrtcError, ValueError) as exc:
        return _fail(str(exc), 1)
    print(f"{'kernel':<34} {'arch':<6} {'regs':>5} {'stack':>6} {'spill':>6} {'smem':>7}")
    for r in reports:
        print(f"{r.kernel:<34} {r.arch:<6} {r.registers:>5} {r.stack_bytes:>6} "
              f"{r.spill_store_bytes + r.spill_load_bytes:>6} {r.static_smem_bytes + r.dynamic_smem_bytes:>7}")
    if args.csv:
        import dataclasses

        import pandas as pd

        pd.DataFrame([dataclasses.asdict(r) for r in reports]).to_csv(args.csv, index=False)
    spilled = [r for r in reports if r.spills]
    if spilled:
        return _fail("register spills in: " + ", ".join(f"{r.kernel} ({r.arch})" for r in spilled), 1)
    print(f"{len(reports)} kernels compiled, no spills")
    return 0


def _need_gpu() -> str | None:
    ok, reason = cuda_device_status()
    return None if ok else f"this command measures on a GPU and none is usable: {reason}"


def _results_dir(args) -> Path:
    from .metadata import results_dir

    return results_dir(args.out)


def _sweep_command(args, plan_fn, stem: str) -> int:
    if (msg := _need_gpu()):
        return _fail(msg)
    from . import bench
    from .metadata import write_metadata

    out_dir = _results_dir(args)
    df = bench.sweep(args.shapes, args.batches, plan_fn=plan_fn, reps=args.reps, progress=_progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{stem}.csv", index=False)
    write_metadata(out_dir / f"{stem}.meta.json", command=" ".join(sys.argv[1:]),
                   copy_bandwidth_Bps=df.attrs["copy_bandwidth_Bps"], reps=args.reps,
                   l2_flush="256 MB overwrite before every launch")
    if stem == "tiles" and "quick" in set(df.kernel):
        from . import dispatch

        table = dispatch.write_table(df, out_dir / "dispatch.json")
        print(f"wrote {out_dir / 'dispatch.json'} ({len(table)} problems)")
    summary = df.pivot_table(index=["K", "N", "M"], columns="kernel", values="ratio_to_fp16", aggfunc="min")
    print(summary.round(3).to_string())
    print(f"wrote {out_dir / (stem + '.csv')}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return _sweep_command(args, bench.default_plans, "throughput")


def cmd_tiles(args) -> int:
    from . import bench

    splits, kinds = args.splits, tuple(args.kinds.split(","))
    return _sweep_command(args, lambda p, M: bench.tile_plans(p, M, splits, kinds), "tiles")


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(prog="quick-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="GPU, driver, CUDA, NVRTC and CuPy versions").set_defaults(func=cmd_info)

    p = sub.add_parser("compile", help="compile every kernel variant through NVRTC (no GPU needed)")
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, from sm_80,sm_86,sm_89,sm_90")
    p.add_argument("--csv", help="also write the resource report to this CSV")
    p.set_defaults(func=cmd_compile)

    for name, func, shapes, batches, help_text in (
        ("bench", cmd_bench, bench.SHAPES, bench.BATCHES, "throughput vs batch: baseline, QUICK, cuBLAS fp16"),
        ("tiles", cmd_tiles, ((4096, 4096), (8192, 8192), (8192, 28672)), (1, 16, 64, 256, 1024),
         "tile-size study: every variant and split-K"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--shapes", type=shape_list, default=shapes, help="K x N list, e.g. 8192x8192,4096x4096")
        p.add_argument("--batches", type=int_list, default=batches, help="M list, e.g. 1,16,256")
        p.add_argument("--reps", type=int, default=50, help="timed launches per case (median reported)")
        p.add_argument("--out", help="results directory (default results/<gpu>/)")
        if name == "tiles":
            p.add_argument("--splits", type=int_list, default=(1, 2, 4, 8), help="split-K values")
            p.add_argument("--kinds", default="awq,quick", help="kernels to sweep: awq,quick")
        p.set_defaults(func=func)
    from . import conflicts, e2e, figures, sanitizer

    conflicts.add_parser(sub)
    e2e.add_parser(sub)
    sanitizer.add_parser(sub)
    figures.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

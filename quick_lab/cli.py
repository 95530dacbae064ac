"""The ``quick-lab`` command line: info, compile, bench, tiles, conflicts, e2e, generate, check, reproduce.

The one module that builds argparse parsers. Each command parses its arguments, calls the library
(``quick_lab.lab``, ``quick_lab.model``, ``quick_lab.report``) and prints; nothing below imports it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quick_lab.build.device import cuda_device_status, gpu_slug


# ---------------------------------------------------------------- argument types


def int_list(text: str) -> tuple[int, ...]:
    """``"1,16,256"`` -> (1, 16, 256); positive integers only."""
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """``"64"`` -> 64; positive integers only."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


SHAPES_HELP = "K x N list, e.g. 8192x8192,4096x4096; `models`: the preset models' decode shapes; `bench`: the six"


def group_size_list(text: str) -> tuple[int, ...]:
    """``"128,32"`` -> (128, 32): group sizes for the sweeps, each a positive multiple of 16 (one k16
    step of the QUICK layout)."""
    sizes = int_list(text)
    bad = [g for g in sizes if g <= 0 or g % 16]
    if bad:
        raise argparse.ArgumentTypeError(f"group sizes must be positive multiples of 16, got {bad[0]}")
    return sizes


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """``"8192x8192,4096x4096"`` -> ((8192, 8192), (4096, 4096)), each K x N. The word ``models`` stands
    for the decode shapes of the model presets (fused qkv, o, fused gate_up, down of each; the shapes
    the end-to-end study runs), ``bench`` for the six benchmark shapes; both mix with explicit ones."""
    from quick_lab.lab.bench import SHAPES
    from quick_lab.model.config import model_shapes

    shapes: list[tuple[int, int]] = []
    for item in text.split(","):
        word = item.strip().lower()
        if word in ("models", "bench"):
            shapes += model_shapes() if word == "models" else SHAPES
            continue
        try:
            K, N = (int(v) for v in word.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes look like 8192x28672 (K x N), `models` or `bench`; "
                                             f"got {item!r}") from None
        shapes.append((K, N))
    return tuple(dict.fromkeys(shapes))  # in order, each once


def choice_list(allowed, what: str):
    """An argparse type: a comma-separated list whose items are all in ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s")
        for n in names:
            if n not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {what} {n!r}; have {', '.join(allowed)}")
        return names
    return parse


# ---------------------------------------------------------------- helpers


def _fail(message: str, code: int = 2) -> int:
    print(f"quick-lab: {message}", file=sys.stderr)
    return code


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<28}", end=end, file=sys.stderr,
          flush=True)


def _need_gpu(command: str) -> str | None:
    ok, reason = cuda_device_status()
    return None if ok else f"{command} measures on a GPU and none is usable: {reason}"


def _results_dir(args) -> Path:
    from quick_lab.lab.metadata import results_dir

    return results_dir(args.out)


# ---------------------------------------------------------------- info, compile


def cmd_info(args) -> int:
    ok, reason = cuda_device_status()
    from quick_lab.build.nvrtc import NvrtcError, nvrtc_version

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
        print("dispatch table: none (no GPU to dispatch for)")
        return 0
    from quick_lab.lab.metadata import gpu_info

    info = gpu_info()
    for key in ("gpu", "compute_capability", "sm_count", "driver_version", "driver", "runtime", "nvrtc",
                "cupy", "clocks_mhz"):
        print(f"{key}: {info.get(key)}")
    for line in _table_status_lines():
        print(line)
    return 0


def _table_status_lines() -> list[str]:
    """Which dispatch table the current GPU uses and where it came from, and the lazy-tuning switch."""
    import cupy

    import quick_lab.lab.tune  # noqa: F401  registers the lazy tuner, as in any process that imports it
    from quick_lab.core import dispatch

    s = dispatch.table_status(cupy.cuda.Device().id)
    committed = f"{s['committed']} ({s['committed_origin']})" if s["committed"] else "none for this GPU"
    tuned = f"{s['tuned']} ({s['tuned_rows']} rows)" if s["tuned_rows"] else f"none yet (would be {s['tuned']})"
    in_use = {"committed": "the committed table", "tuned": "the tuned table",
              "heuristic": "the heuristic (no table)"}[s["in_use"]]
    lazy = (f"on: in a process that imports quick_lab.lab.tune, a shape x batch bucket no table covers is "
            f"tuned within {s['budget_s']:g} s on first use (QUICK_LAB_AUTOTUNE=0 turns it off)"
            if s["autotune"] else "off")
    return [f"dispatch table: {in_use}", f"committed table: {committed}", f"tuned table: {tuned}",
            f"lazy tuning: {lazy}"]


def cmd_compile(args) -> int:
    from quick_lab.build.nvrtc import NvrtcError
    from quick_lab.core.variants import compile_all

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


# ---------------------------------------------------------------- tune


def cmd_tune(args) -> int:
    if (msg := _need_gpu("tune")):
        return _fail(msg)
    import json

    import pandas as pd

    from quick_lab.build.device import current_device, gpu_slug
    from quick_lab.build.paths import dispatch_table_path
    from quick_lab.core import dispatch
    from quick_lab.lab import tune

    try:
        result = tune.tune(args.shapes, args.batches, group_size=args.group_size, budget_s=args.budget_s,
                           reps=args.reps, progress=_progress)
    except ValueError as exc:
        return _fail(str(exc))
    rows = result.rows
    if not rows:
        why = "; ".join(f"{cell.label}: {next(iter(cell.failed.values()), 'nothing timed')}" for cell in result.cells)
        return _fail(f"tune: no candidate ran ({why})", 1)
    path = tune.store(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(pd.DataFrame(rows).drop(columns="group_size").to_string(index=False))
    reference = (Path(args.compare) if args.compare
                 else dispatch_table_path(gpu_slug(dispatch.gpu(current_device()).name)))
    if reference is not None and reference.is_file():
        agreement = tune.table_agreement(rows, json.loads(reference.read_text()))
        if not agreement.empty:
            worst = agreement.sort_values("ratio", ascending=False)
            print(f"against {reference} (tuned / reference, ratio to cuBLAS fp16 of each run): median "
                  f"{agreement.ratio.median():.3f}, worst {worst.ratio.iloc[0]:.3f}, "
                  f"{int((agreement.ratio > 1.05).sum())} of {len(agreement)} cells beyond 1.05")
            print(worst.head(5)[["K", "N", "M", "config", "split_k", "reference_config", "reference_split_k",
                                 "ratio"]].round(3).to_string(index=False))
    print(f"{len(rows)} cells, {result.timed} timings ({result.skipped} candidates left out) in "
          f"{result.elapsed_s:.1f} s of a {args.budget_s:g} s budget")
    print(f"wrote {path}" + (f" and {args.out}" if args.out else ""))
    return 0


# ---------------------------------------------------------------- bench, tiles


def _sweep_command(args, plan_fn, stem: str) -> int:
    if (msg := _need_gpu(stem.split("_")[0])):
        return _fail(msg)
    from quick_lab.lab import bench
    from quick_lab.lab.metadata import write_metadata

    out_dir = _results_dir(args)
    df = bench.sweep(args.shapes, args.batches, plan_fn=plan_fn, reps=args.reps, progress=_progress,
                     group_sizes=args.group_sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{stem}.csv", index=False)
    write_metadata(out_dir / f"{stem}.meta.json", command=" ".join(sys.argv[1:]),
                   copy_bandwidth_Bps=df.attrs["copy_bandwidth_Bps"], reps=args.reps,
                   l2_flush="256 MB overwrite before every launch")
    if stem.startswith("tiles") and "quick" in set(df.kernel):
        import pandas as pd

        from quick_lab.core import dispatch

        # every tile sweep in the directory: a partial one (--families) adds its rows to the full one's
        sweeps = sorted(out_dir.glob("tiles*.csv"))
        table = dispatch.write_table(pd.concat([pd.read_csv(p) for p in sweeps]), out_dir / "dispatch.json")
        print(f"wrote {out_dir / 'dispatch.json'} ({len(table)} problems, from {', '.join(p.name for p in sweeps)})")
    summary = df.pivot_table(index=["K", "N", "M"], columns="kernel", values="ratio_to_fp16", aggfunc="min")
    print(summary.round(3).to_string())
    print(f"wrote {out_dir / (stem + '.csv')}")
    return 0


def cmd_bench(args) -> int:
    from quick_lab.lab import bench

    return _sweep_command(args, bench.default_plans, "throughput")


def cmd_tiles(args) -> int:
    from quick_lab.lab import bench

    splits, kinds, families = args.splits, tuple(args.kinds.split(",")), args.families
    stem = "tiles" if families is None else "tiles_" + "_".join(families)
    return _sweep_command(args, lambda p, M: bench.tile_plans(p, M, splits, kinds, families), stem)


# ---------------------------------------------------------------- conflicts


def cmd_conflicts(args) -> int:
    from quick_lab.lab import conflicts
    from quick_lab.lab.metadata import write_metadata

    try:
        conflicts.check_environment(args.ncu)
    except conflicts.NcuUnavailable as exc:
        print(f"quick-lab conflicts: {exc}", file=sys.stderr)
        return 2
    try:
        df, raw = conflicts.measure(None, args.shapes, args.batches, ncu=args.ncu, timeout=args.timeout)
    except RuntimeError as exc:
        print(f"quick-lab conflicts: {exc}", file=sys.stderr)
        return 1
    out_dir = _results_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "conflicts.ncu.csv").write_text(raw)
    df.to_csv(out_dir / "conflicts.csv", index=False)
    write_metadata(out_dir / "conflicts.meta.json", command=" ".join(sys.argv[1:]),
                   ncu_command=" ".join(conflicts.ncu_command("<cases.json>", args.ncu, "python3")),
                   ncu_version=conflicts.ncu_version(args.ncu), split_k=conflicts.SPLIT_K,
                   group_size=conflicts.GROUP_SIZE, metrics=conflicts.ALL_METRICS,
                   model="quick_lab.lab.bank_model.predict_counts (see its docstring for the assumptions)")
    print("measured / model per launch")
    print(conflicts.summary_table(df).to_string(index=False))
    print(f"wrote {out_dir / 'conflicts.csv'}")
    return 0


# ---------------------------------------------------------------- e2e


def cmd_e2e(args) -> int:
    if (msg := _need_gpu("e2e")):
        return _fail(msg)
    from quick_lab.lab.metadata import results_dir, write_metadata
    from quick_lab.model import sweep

    out_dir = results_dir(args.out)

    def progress(done, total, label):
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    if args.breakdown:
        return _e2e_breakdown(args, out_dir, progress)
    df = sweep.e2e_sweep(args.models, args.batches, args.backends, n_layers=args.layers, prefill=args.prefill,
                         decode_steps=args.decode, graph=not args.no_graph, lm_head=not args.no_lm_head,
                         reps=args.reps, long_context=args.long_context, long_batches=args.long_batches,
                         progress=progress, dependent_launch=not args.plain_launches,
                         tune_decode=not args.table_configs)
    df.to_csv(out_dir / "e2e.csv", index=False)
    write_metadata(out_dir / "e2e.meta.json", command=" ".join(sys.argv[1:]), layers=args.layers,
                   prefill=args.prefill, decode=args.decode, cuda_graph=not args.no_graph,
                   lm_head=not args.no_lm_head, reps=args.reps, long_context=args.long_context,
                   dependent_launch=not args.plain_launches,
                   decode_gemm_configs=df.attrs.get("decode_gemm_configs", []),
                   long_batches=list(args.long_batches), weights="random int4, group size 128",
                   note="each row's model was built with `layers` of its `full_layers` layers (full depth wherever "
                        "it fits the GPU); tokens_per_s is measured for the layers built; "
                        "full_depth_tokens_per_s_estimate scales the per-layer time to `full_layers` (equal to "
                        "the measurement at full depth, an estimate otherwise). Long-context rows fill the cache "
                        "with random K/V (prefill_timed false).")
    if "tokens_per_s" in df:
        print(sweep.summary_table(df).round(2).to_string())
    if "error" in df and df["error"].notna().any():
        print(f"{int(df['error'].notna().sum())} case(s) failed (see the error column)", file=sys.stderr)
    print(f"wrote {out_dir / 'e2e.csv'}")
    return 0


def _e2e_breakdown(args, out_dir: Path, progress) -> int:
    """``e2e --breakdown``: µs per op class per layer of one decode step, per model x backend x batch x
    context (the batches of --batches at --prefill, and --long-batches at --long-context)."""
    import dataclasses

    import cupy
    import pandas as pd

    from quick_lab.lab.metadata import write_metadata
    from quick_lab.model import breakdown, decode_tuning, sweep
    from quick_lab.model.config import preset
    from quick_lab.model.decoder import Model
    from quick_lab.model.weights import random_weights

    cases = [(b, args.prefill) for b in args.batches]
    if args.long_context:
        cases += [(b, args.long_context) for b in args.long_batches]
    rows, tuned, total, done = [], [], len(args.models) * len(cases) * len(args.backends), 0
    for name in args.models:
        cfg = preset(name)
        for backend in args.backends:
            cupy.get_default_memory_pool().free_all_blocks()
            free = cupy.cuda.runtime.memGetInfo()[0]
            fit = sweep.layers_that_fit(cfg, (backend,), [(b, c + 1) for b, c in cases], free, lm_head=False)
            layers = min(args.layers or cfg.n_layers, fit)
            model = Model(random_weights(dataclasses.replace(cfg, n_layers=layers), distinct_layers=False),
                          backends=(backend,), lm_head=False, dependent_launch=not args.plain_launches)
            if backend == "quick" and not args.table_configs:
                tuned += decode_tuning.tune_decode_gemms(model, [b for b, _ in cases])
            for batch, context in cases:
                progress(done, total, f"{cfg.name} x{layers} M={batch} ctx={context} {backend}")
                rows += breakdown.breakdown(model, batch, context, backend, reps=max(args.reps, 10))
                done += 1
            del model
    progress(total, total, "done")
    df = pd.DataFrame(rows)
    df.to_csv(out_dir / "e2e_breakdown.csv", index=False)
    write_metadata(out_dir / "e2e_breakdown.meta.json", command=" ".join(sys.argv[1:]), layers=args.layers,
                   reps=max(args.reps, 10), weights="random int4, group size 128",
                   dependent_launch=not args.plain_launches, decode_gemm_configs=tuned,
                   note="us_per_layer: one decode step's ops of one class in every layer, back to back in one CUDA "
                        "graph (median of reps), divided by the layers built; layer = the whole step per layer; "
                        "gemm = qkv + o + gate_up + down; other = layer - gemm")
    wide = df.pivot_table(index=["model", "backend", "batch", "context"], columns="op", values="us_per_layer")
    print(wide[["layer", "gemm", "other", *breakdown.OP_CLASSES]].round(1).to_string())
    print(f"wrote {out_dir / 'e2e_breakdown.csv'}")
    return 0


# ---------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    import time

    from quick_lab.model import generate

    # Everything the host can check comes first, so a bad checkpoint or prompt fails the same with or
    # without a GPU: clear messages, exit code 2.
    start = time.perf_counter()
    try:
        host = generate.read_for_generation(args.checkpoint)
        generate.encode_prompt(host.tokenizer, args.prompt, host.config.model.vocab)
    except ValueError as exc:  # CheckpointError is one
        return _fail(f"generate: {exc}")
    ok, reason = cuda_device_status()
    if not ok:
        return _fail(f"generate runs the model on a GPU and none is usable: {reason}")
    model, host = generate.build_model(host, args.backend)
    cfg = host.config.model
    print(f"loaded {host.path} ({cfg.n_layers} layers, hidden {cfg.hidden}, group size {host.config.group_size}, "
          f"backend {args.backend}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    result = generate.generate_text(model, host.tokenizer, args.prompt, args.max_new_tokens, args.backend,
                                    eos_token_ids=host.eos_token_ids,
                                    on_text=lambda text: print(text, end="", flush=True))
    print(flush=True)
    print(f"prefill: {len(result.prompt_ids)} tokens in {1e3 * result.prefill_s:.1f} ms, "
          f"{result.prefill_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    if result.decode_steps:
        print(f"decode: {result.decode_steps} tokens in {1e3 * result.decode_s:.1f} ms, "
              f"{result.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    else:
        print("decode: no steps after the prefill" + (" (end of sequence)" if result.stopped_at_eos else ""),
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------- check


def cmd_check(args) -> int:
    from quick_lab.lab import sanitizer
    from quick_lab.lab.metadata import results_dir

    if not sanitizer.sanitizer_path():
        return _fail("compute-sanitizer is not on PATH; install the CUDA toolkit and add its bin/ "
                     "(e.g. export PATH=/usr/local/cuda/bin:$PATH)")
    if (msg := _need_gpu("check")):
        return _fail(msg)
    if args.decoder:
        from quick_lab.model import fused_check

        return sanitizer.check(results_dir(args.out), tools=args.tools, timeout=args.timeout,
                               command=" ".join(sys.argv[1:]) or "check --decoder", module=fused_check.MODULE,
                               stem="sanitizer_decoder", kernels=fused_check.KERNELS)
    return sanitizer.check(results_dir(args.out), tools=args.tools, timeout=args.timeout, smoke=args.smoke,
                           wgmma=args.wgmma, decode=args.decode, command=" ".join(sys.argv[1:]) or "check")


# ---------------------------------------------------------------- reproduce


def _measure(results_dir: Path) -> int:
    """Re-runs the sweeps into ``results_dir``; returns the first non-zero exit code."""
    rc = 0
    for command in ("bench", "tiles", "conflicts", "e2e"):
        print(f"quick-lab reproduce: measuring: quick-lab {command} --out {results_dir}", flush=True)
        try:
            code = main([command, "--out", str(results_dir)])
        except SystemExit as exc:  # argparse rejected the command line
            code = exc.code if isinstance(exc.code, int) else 2
        if code:
            print(f"quick-lab reproduce: `{command}` exited with {code}; drawing what exists", file=sys.stderr)
            rc = rc or code
    return rc


def cmd_reproduce(args) -> int:
    import os

    from quick_lab.report import reproduce, results

    rc = 0
    if args.measure:
        if cuda_device_status()[0]:
            target = Path(args.results) if args.results else results.gpu_results_dir()
            if args.gpu and target.name not in (args.gpu.strip(), gpu_slug(args.gpu)):
                return _fail(f"reproduce --measure --gpu {args.gpu}: this machine's GPU writes {target.name}/; "
                             f"measure on that GPU, or draw it without --measure")
            rc = _measure(target)
        else:
            print("no GPU: drawing from the committed data")
    if not args.results and (args.gpu or not os.environ.get(results.RESULTS_ENV)):
        # every GPU directory and COMPARISON.md, or the one --gpu names
        try:
            written = reproduce.reproduce_all(gpu=args.gpu)
        except (FileNotFoundError, ValueError, TypeError) as exc:
            print(f"quick-lab reproduce: {exc}", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}")
        return rc
    results_dir = Path(args.results) if args.results else results.default_results_dir()
    if not results_dir.is_dir():
        print(f"quick-lab reproduce: results directory {results_dir} does not exist "
              f"(measure with --measure on a GPU, or pass --results DIR)", file=sys.stderr)
        return 2
    for path in reproduce.reproduce(results_dir):
        print(f"wrote {path}")
    return rc


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    from quick_lab.core import registry
    from quick_lab.lab import bench, conflicts, sanitizer
    from quick_lab.model.config import PRESETS
    from quick_lab.model.sweep import BACKENDS, E2E_BATCHES

    parser = argparse.ArgumentParser(prog="quick-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="GPU, driver, CUDA, NVRTC and CuPy versions; the dispatch table in use"
                   ).set_defaults(func=cmd_info)

    p = sub.add_parser("tune", help="tune this GPU's dispatch table within a time budget (kept in the user "
                                    "cache directory)")
    p.add_argument("--shapes", type=shape_list, default=bench.SHAPES, help=SHAPES_HELP)
    p.add_argument("--batches", type=int_list, default=tuple(2**i for i in range(13)),
                   help="M list, each rounded up to its power-of-two bucket (default 1,2,4,...,4096)")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="seconds for the whole run (the heuristic's pick of every cell is timed regardless)")
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128), help="quantization group size")
    p.add_argument("--reps", type=int, default=15, help="timed launches per candidate (median kept)")
    p.add_argument("--out", help="also write the tuned rows to this JSON file (dispatch.json format)")
    p.add_argument("--compare", metavar="TABLE",
                   help="a dispatch.json to compare the result with (default: this GPU's committed table)")
    p.set_defaults(func=cmd_tune)

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
        p.add_argument("--shapes", type=shape_list, default=shapes, help=SHAPES_HELP)
        p.add_argument("--batches", type=int_list, default=batches, help="M list, e.g. 1,16,256")
        p.add_argument("--reps", type=int, default=50, help="timed launches per case (median reported)")
        p.add_argument("--out", help="results directory (default results/<gpu>/)")
        p.add_argument("--group-sizes", type=group_size_list, default=(bench.GROUP_SIZE,),
                       help="quantization group sizes, e.g. 128,32 (each a multiple of 16)")
        if name == "tiles":
            p.add_argument("--splits", type=int_list, default=(1, 2, 4, 8), help="split-K values")
            p.add_argument("--kinds", default="awq,quick", help="kernels to sweep: awq,quick")
            p.add_argument("--families", type=choice_list([f.name for f in registry.FAMILIES] + [bench.FALLBACK_FAMILY],
                                                          "family"),
                           help="only these kernel families (e.g. quick_decode; `fallback`: dequantize + cuBLAS); "
                                "writes tiles_<families>.csv, and dispatch.json from every tiles*.csv in the directory")
        p.set_defaults(func=func)

    p = sub.add_parser("conflicts", help="shared-memory bank conflicts under Nsight Compute vs the model")
    p.add_argument("--shapes", type=shape_list, default=conflicts.DEFAULT_SHAPES, help="K x N list, e.g. 4096x4096")
    p.add_argument("--batches", type=int_list, default=conflicts.DEFAULT_BATCHES, help="M list, e.g. 16,256")
    p.add_argument("--out", help="results directory (default results/<gpu>/)")
    p.add_argument("--ncu", default="ncu", help="Nsight Compute CLI executable")
    p.add_argument("--timeout", type=float, default=conflicts.DEFAULT_TIMEOUT_S, help="seconds before ncu is stopped")
    p.set_defaults(func=cmd_conflicts)

    p = sub.add_parser("e2e", help="end-to-end decode throughput vs batch: fp16, AWQ, QUICK")
    p.add_argument("--models", type=choice_list(PRESETS, "model"), default=tuple(PRESETS),
                   help="comma-separated, from " + ",".join(PRESETS))
    p.add_argument("--batches", type=int_list, default=E2E_BATCHES, help="e.g. 1,16,256")
    p.add_argument("--backends", type=choice_list(BACKENDS, "backend"), default=BACKENDS,
                   help="comma-separated, from " + ",".join(BACKENDS))
    p.add_argument("--layers", type=int, default=None,
                   help="cap on decoder layers built per model (default: full depth wherever it fits the GPU; "
                        "with fewer, full-depth tokens/s is estimated)")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--reps", type=int, default=1, help="timed runs per phase after one untimed run (best reported)")
    p.add_argument("--no-graph", action="store_true", help="time the eager loop instead of a CUDA graph replay")
    p.add_argument("--no-lm-head", action="store_true", help="skip the fp16 LM head (tokens fed, not sampled)")
    p.add_argument("--plain-launches", action="store_true",
                   help="launch every decode op after the one before has finished (default: as programmatic "
                        "dependents on compute capability 9.0+, each placed while the op before runs)")
    p.add_argument("--table-configs", action="store_true",
                   help="run the QUICK decode GEMMs with the dispatch table's configs (default: each model picks "
                        "its decode configs timed in a CUDA graph first, quick_lab.model.decode_tuning)")
    p.add_argument("--long-context", type=int, default=4096,
                   help="also decode at this context (cache filled, prefill not timed); 0 turns it off")
    p.add_argument("--long-batches", type=int_list, default=(1, 16), help="batches run at --long-context")
    p.add_argument("--breakdown", action="store_true",
                   help="write e2e_breakdown.csv (µs per op class per layer of one decode step) instead of e2e.csv")
    p.add_argument("--out", help="results directory (default results/<gpu>/)")
    p.set_defaults(func=cmd_e2e)

    p = sub.add_parser("generate", help="greedy text generation from an AutoAWQ checkpoint directory "
                                        "(config.json, *.safetensors, tokenizer.json), streamed, with tokens/s")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="AutoAWQ checkpoint directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--backend", choices=BACKENDS, default="quick",
                   help="linear layers: quick (QUICK kernel), awq (AutoAWQ-style kernel) or fp16 (cuBLAS on "
                        "the dequantized weights); default quick")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="most tokens to generate (fewer at an end-of-sequence token); default 128")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("check", help="every kernel variant under compute-sanitizer "
                                     "(memcheck, racecheck, initcheck, synccheck)")
    p.add_argument("--tools", type=choice_list(sanitizer.TOOLS, "tool"), default=sanitizer.TOOLS,
                   help=f"comma-separated, default {','.join(sanitizer.TOOLS)}")
    p.add_argument("--out", help="results directory (default results/<gpu>/)")
    p.add_argument("--timeout", type=float, default=sanitizer.DEFAULT_TIMEOUT_S, help="seconds per tool run")
    p.add_argument("--smoke", action="store_true", help="a reduced variant set (defaults, smallest, largest)")
    subset = p.add_mutually_exclusive_group()  # one variant set per run: each writes its own files
    subset.add_argument("--wgmma", action="store_true",
                        help="only the Hopper wgmma variants (sm_90 GPU), stream-K and split-K; writes sanitizer_wgmma.*")
    subset.add_argument("--decode", action="store_true",
                        help="only the decode GEMM kernel's variants (M <= 32), every split and group size; "
                             "writes sanitizer_decode.*")
    subset.add_argument("--decoder", action="store_true",
                        help="the decoder's fused kernels (norm, RoPE + KV write, attention, SiLU); "
                             "writes sanitizer_decoder.*")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("reproduce", help="draw the paper's figures and REPORT.md of every results/<gpu>/, "
                                         "and results/COMPARISON.md setting the GPUs side by side")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--gpu", metavar="GPU",
                      help="draw only this GPU's directory (its name under results/, e.g. h100-80gb-hbm3, or "
                           "the GPU's name); no COMPARISON.md")
    pick.add_argument("--results", metavar="DIR",
                      help="draw only this results directory (default: every results/<gpu>/ and "
                           "results/COMPARISON.md; $QUICK_LAB_RESULTS also picks one directory)")
    p.add_argument("--measure", action="store_true",
                   help="on a GPU, first re-run bench, tiles, conflicts and e2e into its results/<gpu>/ "
                        "(or --results DIR)")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

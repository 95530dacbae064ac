"""Public W4A16 GEMM ops on CuPy arrays: ``y[M, N] = x[M, K] @ W[K, N]`` in fp16.

``awq_gemm`` runs the AutoAWQ-style baseline on AutoAWQ-format weights, ``quick_gemm`` QUICK on
interleaved weights (:func:`quick_lab.core.interleave.interleave`, once, offline). Both accept any
M >= 1: rows past M are zero-filled on load and masked on store. ``plan_*`` returns a prepared launch
(validation and argument packing done once) for timing loops; the op is ``plan.run()``.

This module only plans and launches: which kernel runs is :mod:`quick_lab.core.dispatch`'s choice,
what a launch of it needs is its family record in :mod:`quick_lab.core.registry`. Every call is
validated once, before anything is chosen or allocated.

Every op also takes a CUDA torch tensor or any array that speaks DLPack or ``__cuda_array_interface__``
(weight fields included), viewed without a copy; it then launches on the caller's current stream (torch:
``torch.cuda.current_stream()``) and returns the caller's kind (:mod:`quick_lab.core.interop`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np

from quick_lab.build import device, loader
from quick_lab.build.launch import launch
from quick_lab.core import configs, dispatch, interop, registry, validation, variants
from quick_lab.core.format import AWQWeight
from quick_lab.core.interleave import QuickWeight


def to_device(weight):
    """Copy an AWQWeight / QuickWeight of NumPy arrays to the current GPU."""
    import cupy

    return replace(weight, qweight=cupy.asarray(weight.qweight), qzeros=cupy.asarray(weight.qzeros),
                   scales=cupy.asarray(weight.scales))


_tile_counters: dict = {}


def tile_counters(tiles: int):
    """Split-K ticket counters for ``tiles`` output tiles on the current device and stream.

    The kernels leave every counter at zero when they finish (the last block of a tile resets it), so
    one zero-initialized buffer serves every launch on a stream; launches on one stream never overlap.
    """
    import cupy

    key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    buf = _tile_counters.get(key)
    if buf is None or buf.size < tiles:
        buf = cupy.zeros(max(tiles, 4096), dtype=cupy.int32)
        _tile_counters[key] = buf
    return buf


@dataclass
class GemmPlan:
    """A validated, argument-packed launch; ``run()`` does only the kernel launch (one, split-K
    included: the last block of each output tile reduces the partials)."""

    kind: str
    config: configs.TileConfig
    split_k: int
    M: int
    K: int
    N: int
    family: registry.KernelFamily
    _kernel: object
    _grid: tuple
    _args: tuple
    _out: object
    caller: interop.Caller | None = None  # a torch / array-API x: its stream, its kind back (None: CuPy)
    given_out: object = None               # the caller's own ``out``, returned as given
    _shared_bytes: int = 0                 # the dynamic shared memory of each launch, from the family

    def run(self):
        with interop.launch_context(self.caller):
            if self.M > 0:
                launch(self._kernel, self._grid, (self.config.threads,), self._args, self._shared_bytes,
                       waits_on_prior_grid=self.family.waits_on_prior_grid)
            return interop.to_caller(self._out, self.caller, self.given_out)

    @property
    def out(self):
        return self._out

    @property
    def label(self) -> tuple[str, str, int]:
        """(kernel, config name, split-K) as the sweeps record it."""
        return self.kind, self.config.name, self.split_k

    @property
    def resources(self) -> dict:
        """What the compiled variant occupies per thread / block (registers, shared memory)."""
        return {"registers": self._kernel.num_regs,
                "smem_bytes": self._kernel.shared_size_bytes + self.family.shared_bytes(self.config),
                "threads": self.config.threads}


def _kernel_plan(kind: str, cfg, split, x, weight, M: int, K: int, N: int, G: int, out, *,
                 variant_checked: bool = False, epilogue: str = "store") -> GemmPlan:
    """The launch of (kind, config, split) on validated arrays; the problem rules are checked here."""
    import cupy

    validation.check_problem(kind, cfg, max(M, 1), K, N, G, split, variant_checked=variant_checked)
    fam = registry.family(kind, cfg)
    if epilogue not in fam.epilogues:
        raise ValueError(f"epilogue {epilogue!r} needs a kernel whose writer applies it ({_epilogue_families(epilogue)}); "
                         f"config {cfg.name} is {fam.name}, which only stores y")
    if epilogue == "silu_mul":
        out = _output(out, M, N // 2, "[M, N / 2] (epilogue 'silu_mul')")
    elif epilogue == "partials":
        out = _partials_output(out, split, M, N)
    else:
        out = _output(out, M, N)
    kernel = variants.gemm_kernel(kind, cfg, epilogue)
    slots = 0
    if fam.stream_k and split == configs.STREAM_K:
        slots = registry.resident_blocks(fam, cfg, kernel.num_regs, kernel.shared_size_bytes) * _num_sms()
    launch = fam.launch(cfg, M, K, N, split, slots)
    workspace = cupy.empty(launch.workspace, dtype=cupy.float32) if launch.workspace else None
    counters = tile_counters(launch.counters) if launch.counters else None
    if epilogue == "partials":  # the slices are the result: no workspace of their own, no ticket
        workspace, counters = out, None
    args = (x, weight.qweight, weight.qzeros, weight.scales, out, workspace, counters,
            np.int32(M), np.int32(K), np.int32(N), np.int32(G), np.int32(launch.split_arg))
    return GemmPlan(kind, cfg, split, M, K, N, fam, kernel, launch.grid, args, out,
                    _shared_bytes=fam.shared_bytes(cfg))


def _as_cupy_args(x, weight, out):
    """CuPy views (no copy) of an op's arrays, the weight's fields first (validation's order)."""
    weight = interop.weight_as_cupy(weight)
    return interop.as_cupy(x, "x"), weight, None if out is None else interop.as_cupy(out, "out")


def _caller_plan(make, x, weight, out):
    """``make(x, weight, out)`` on CuPy views of the arguments, planned on the caller's device and
    stream; the plan remembers the caller (its ``run`` launches there and returns the caller's kind)."""
    caller = interop.caller_of(x)
    with interop.launch_context(caller):
        plan = make(*_as_cupy_args(x, weight, out))
    plan.caller, plan.given_out = caller, out
    return plan


def _plan(kind: str, x, weight, config, split_k, out, epilogue: str = "store"):
    def make(x, weight, out):
        return _plan_views(kind, x, weight, config, split_k, out, epilogue)

    return _caller_plan(make, x, weight, out)


def _epilogue_families(epilogue: str) -> str:
    return ", ".join(f.name for f in registry.FAMILIES if epilogue in f.epilogues)


def _check_epilogue(epilogue) -> None:
    """A QUICK weight's N is a multiple of 64 (validation), so whole (gate, up) pairs always fit."""
    if not isinstance(epilogue, str):
        raise TypeError(f"epilogue must be a str, got {type(epilogue).__name__}")
    if epilogue not in registry.EPILOGUES:
        raise ValueError(f"epilogue must be one of {registry.EPILOGUES}, got {epilogue!r}")


def _plan_views(kind: str, x, weight, config, split_k, out, epilogue: str = "store"):
    K, N, G = validation.check_weight(weight, kind)
    M = validation.check_activations(x, K)
    _check_epilogue(epilogue)
    if config is None and split_k is None:
        choice = dispatch.choose(kind, M, K, N, G, device.current_device())
        if choice.kernel == dispatch.FALLBACK:
            if epilogue != "store":
                raise ValueError(f"epilogue {epilogue!r} needs a kernel whose writer applies it "
                                 f"({_epilogue_families(epilogue)}); at M = {M} the dispatch chose dequantize + cuBLAS")
            return _fallback_plan(x, weight, M, K, N, out)
        return _kernel_plan(kind, choice.config, choice.split_k, x, weight, M, K, N, G, out, epilogue=epilogue)
    cfg = validation.check_variant(kind, dispatch.pinned_config(kind, config, M, N, G))
    split = dispatch.default_split_k(kind, cfg, max(M, 1), K, N) if split_k is None else split_k
    return _kernel_plan(kind, cfg, split, x, weight, M, K, N, G, out, variant_checked=True, epilogue=epilogue)


def _num_sms() -> int:
    return device.num_sms(device.current_device())


def _output(out, M: int, N: int, what: str = "[M, N]"):
    """The caller's ``out`` once checked (fp16 device array of shape [M, N]), or a new one."""
    import cupy

    if out is None:
        return cupy.empty((M, N), dtype=cupy.float16)
    validation.check_device_array(out, "out", np.float16)
    if out.shape != (M, N):
        raise ValueError(f"out must have shape {what} = {(M, N)}, got {out.shape}")
    return out


def _partials_output(out, split: int, M: int, N: int):
    """The caller's ``out`` for epilogue 'partials' once checked (fp32 [split, M, N]), or a new one."""
    import cupy

    if out is None:
        return cupy.empty((split, M, N), dtype=cupy.float32)
    validation.check_device_array(out, "out", np.float32, ndim=3)
    if out.shape != (split, M, N):
        raise ValueError(f"out must have shape [split_k, M, N] = {(split, M, N)} (epilogue 'partials'), got {out.shape}")
    return out


def sum_partials(partials):
    """fp16 ``y`` from the fp32 slices of epilogue 'partials' [split, M, N], summed in split order from
    0 as the split-K fix-up block does: bit for bit the stored ``y`` of the same launch (a reference for
    tests; the decoder's kernels sum the slices as they read them)."""
    import cupy

    validation.check_device_array(partials, "partials", np.float32, ndim=3)
    total = cupy.zeros(partials.shape[1:], dtype=cupy.float32)
    for s in range(partials.shape[0]):
        total += partials[s]
    return total.astype(cupy.float16)


def plan_awq_gemm(x, weight: AWQWeight, *, config=None, split_k=None, out=None) -> GemmPlan:
    """The baseline's launch: ``config`` (a TileConfig or its name) and ``split_k`` pin a variant;
    unpinned, AutoAWQ's own configuration."""
    if not isinstance(weight, AWQWeight):
        raise TypeError(f"weight must be an AWQWeight (AutoAWQ GEMM format), got {type(weight).__name__}")
    return _plan("awq", x, weight, config, split_k, out)


def plan_quick_gemm(x, weight: QuickWeight, *, config=None, split_k=None, out=None, epilogue: str = "store"):
    """QUICK's launch: ``config`` and/or ``split_k`` pin a variant (the other from the heuristic);
    with neither, the dispatcher's choice (a GemmPlan, or a FallbackPlan at large batch).
    ``epilogue="silu_mul"``: the weight's columns are (gate, up) pairs of 32 and the op returns
    ``silu(gate) * up`` [M, N / 2] from its writer; ``epilogue="partials"``: the op returns the fp32
    split-K slices [split_k, M, N] and leaves their sum to the reader (:func:`sum_partials` is its
    reference; the decoder's norm and attention read them directly), saving the fix-up block. Only the
    decode kernel has either (a ValueError names the kernel chosen otherwise; check
    :func:`applies_epilogue` first)."""
    if not isinstance(weight, QuickWeight):
        raise TypeError(f"weight must be a QuickWeight (interleave an AWQWeight first), got {type(weight).__name__}")
    return _plan("quick", x, weight, config, split_k, out, epilogue)


def applies_epilogue(kind: str, config, epilogue: str) -> bool:
    """Whether the kernel family of ``config`` (a TileConfig or its name) applies ``epilogue`` in its
    writer."""
    cfg = configs.TileConfig.parse(config) if isinstance(config, str) else config
    return epilogue in registry.family(kind, cfg).epilogues


def awq_gemm(x, weight: AWQWeight, *, config=None, split_k=None, out=None):
    """Baseline (AutoAWQ-style) W4A16 GEMM. ``config``: a TileConfig or its name; default AutoAWQ's."""
    return plan_awq_gemm(x, weight, config=config, split_k=split_k, out=out).run()


def quick_gemm(x, weight: QuickWeight, *, config=None, split_k=None, out=None, epilogue: str = "store"):
    """QUICK W4A16 GEMM on interleaved weights. With no ``config`` (a TileConfig or its name) and no
    ``split_k`` the per-GPU dispatch table picks the kernel config and split-K, or dequantize + cuBLAS.
    ``epilogue``: see :func:`plan_quick_gemm`."""
    return plan_quick_gemm(x, weight, config=config, split_k=split_k, out=out, epilogue=epilogue).run()


@dataclass
class FallbackPlan:
    """Dequantize + cuBLAS: the QUICK-layout weight is expanded to fp16 W^T [N, K] every call (the
    model keeps only int4 in memory) and ``cupy.matmul`` runs on it. Wins at large batch, where the
    GEMM is compute-bound and cuBLAS's Hopper kernels outrun mma.sync."""

    kind = "fallback"
    config = "dequant+cublas"
    split_k = 1
    M: int
    K: int
    N: int
    _x: object
    _weight: object
    _w_t: object
    _out: object
    caller: interop.Caller | None = None  # as GemmPlan's
    given_out: object = None

    def run(self):
        import cupy

        with interop.launch_context(self.caller):
            if self.M > 0:
                _launch_dequantize_quick_t(self._weight, self._w_t)
                cupy.matmul(self._x, self._w_t.T, out=self._out)
            return interop.to_caller(self._out, self.caller, self.given_out)

    @property
    def label(self) -> tuple[str, str, int]:
        return self.kind, self.config, self.split_k

    @property
    def out(self):
        return self._out


def plan_fallback(x, weight: QuickWeight, *, out=None) -> FallbackPlan:
    if not isinstance(weight, QuickWeight):
        raise TypeError(f"weight must be a QuickWeight, got {type(weight).__name__}")

    def make(x, weight, out):
        K, N, _ = validation.check_weight(weight, "quick")
        return _fallback_plan(x, weight, validation.check_activations(x, K), K, N, out)

    return _caller_plan(make, x, weight, out)


def _fallback_plan(x, weight: QuickWeight, M: int, K: int, N: int, out) -> FallbackPlan:
    import cupy

    return FallbackPlan(M, K, N, x, weight, cupy.empty((N, K), dtype=cupy.float16), _output(out, M, N))


@contextlib.contextmanager
def _weight_op(weight, cls, kind: str, requirement: str):
    """The prologue of an op on one weight: its type (a TypeError naming ``requirement``), then, on the
    caller's device and stream, the weight's arrays as CuPy views and its shape checked. Yields
    ``(caller, weight, (K, N, G))``; the op returns ``interop.to_caller(result, caller)``."""
    if not isinstance(weight, cls):
        raise TypeError(f"{requirement}, got {type(weight).__name__}")
    caller = interop.caller_of(weight.qweight)
    with interop.launch_context(caller):
        weight = interop.weight_as_cupy(weight)
        yield caller, weight, validation.check_weight(weight, kind)


def _launch_dequantize_quick_t(weight: QuickWeight, out_t) -> None:
    K, N = weight.K, weight.N
    grid = (N // 64, -(-K // 128))  # one block per n64 block x 128 rows of k (kernels/dequant.cu)
    loader.support_kernel("dequantize_quick_t")(grid, (256,),
                                                 (weight.qweight, weight.qzeros, weight.scales, out_t,
                                                  np.int32(K), np.int32(N), np.int32(weight.group_size)))


def dequantize_quick_t(weight: QuickWeight):
    """QUICK-layout weight -> fp16 ``W^T [N, K]`` on the GPU (same arithmetic as the kernels)."""
    import cupy

    with _weight_op(weight, QuickWeight, "quick", "weight must be a QuickWeight") as (caller, weight, (K, N, _)):
        out_t = cupy.empty((N, K), dtype=cupy.float16)
        _launch_dequantize_quick_t(weight, out_t)
        return interop.to_caller(out_t, caller)


def dequantize(weight: AWQWeight):
    """AutoAWQ-format weight -> fp16 ``W[K, N]`` on the GPU (same arithmetic as the GEMM kernels)."""
    import cupy

    with _weight_op(weight, AWQWeight, "awq", "weight must be an AWQWeight") as (caller, weight, (K, N, G)):
        out = cupy.empty((K, N), dtype=cupy.float16)
        words = K * N // 8
        threads = 256
        loader.support_kernel("dequantize_awq")((-(-words // threads),), (threads,),
                                                 (weight.qweight, weight.qzeros, weight.scales, out,
                                                  np.int32(K), np.int32(N), np.int32(G)))
        return interop.to_caller(out, caller)


# ---------------------------------------------------------------- the interleave on the GPU

INTERLEAVE_BLOCKS_PER_TILE = 4  # n64 blocks per thread block of kernels/interleave.cu (kBlocksPerTile)


def interleave_gpu(awq) -> QuickWeight:
    """AutoAWQ-format weight on the GPU -> the QUICK layout on the GPU (kernels/interleave.cu), bit-exact
    with :func:`quick_lab.core.interleave.interleave` (qweight, qzeros and scales equal), in one kernel
    pass over the weight (the NumPy reordering runs at ~35 MB/s). ``awq`` holds CuPy arrays
    (:func:`to_device`) or other CUDA arrays (torch tensors, ...: then the result's arrays are of that
    kind); the result is a new QuickWeight, ``awq`` is left as it is."""
    import cupy

    with _weight_op(awq, AWQWeight, "awq", "awq must be an AWQWeight (AutoAWQ GEMM format, CuPy arrays)") as (
            caller, awq, (K, N, G)):
        tiles = -(-(N // 64) // INTERLEAVE_BLOCKS_PER_TILE)
        if tiles > validation.MAX_GRID_Y:
            raise ValueError(f"N = {N} needs {tiles} tiles of {64 * INTERLEAVE_BLOCKS_PER_TILE} columns; "
                             f"the interleave grid allows at most {validation.MAX_GRID_Y}")
        quick = QuickWeight(cupy.empty((K // 16, 2 * N), dtype=cupy.int32),
                            cupy.empty((K // G, N // 8), dtype=cupy.int32),
                            cupy.empty((K // G, N), dtype=cupy.float16), G)
        if K and N:  # an empty weight launches nothing (a zero grid is a launch error)
            loader.support_kernel("interleave_awq")((K // 16, tiles), (256,),
                                                    (awq.qweight, awq.qzeros, awq.scales, quick.qweight,
                                                     quick.qzeros, quick.scales, np.int32(K), np.int32(N),
                                                     np.int32(G)))
        return interop.weight_to_caller(quick, caller)

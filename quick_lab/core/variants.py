"""Every registered kernel variant, built: loaded at run time for a launch, compiled offline for the
resource report (``quick-lab compile``), and its PTX instruction mix (the ``isa`` evidence).

Maps (kind, TileConfig) to the family record of :mod:`quick_lab.core.registry` and hands file, name
expression and target arch to :mod:`quick_lab.build`.
"""
from __future__ import annotations

import functools

from quick_lab.build import isa, loader, nvrtc
from quick_lab.build.nvrtc import CompileReport, NvrtcError
from quick_lab.core import registry
from quick_lab.core.configs import TileConfig


@functools.lru_cache(maxsize=None)
def gemm_kernel(kind: str, cfg: TileConfig, epilogue: str = "store"):
    """The compiled GEMM variant (with that writer epilogue), its dynamic shared-memory limit raised to
    what the tile needs."""
    registry.check(kind, cfg)
    fam = registry.family(kind, cfg)
    if fam.compute_capability is not None:
        import cupy

        cc = cupy.cuda.Device().compute_capability
        if cc != fam.compute_capability:
            raise ValueError(f"{fam.template_name(cfg)} uses Hopper wgmma: it needs a compute capability "
                             f"{fam.compute_capability[0]}.{fam.compute_capability[1:]} GPU, this one is {cc}")
    return loader.load_function(fam.source, fam.template_name(cfg, epilogue), arch=fam.arch,
                                dynamic_smem=fam.shared_bytes(cfg))


def compile_variants(kind: str, cfgs, arch: str) -> list[CompileReport]:
    """Compile a batch of one kind's variants (each writer epilogue its family has), one NVRTC program
    per family and target arch."""
    batches: dict[tuple, list] = {}
    for cfg in cfgs:
        fam = registry.family(kind, cfg)
        batches.setdefault((fam, fam.target_arch(arch)), []).append(cfg)
    reports = []
    for (fam, target), batch in batches.items():
        instances = [(c, e) for c in batch for e in fam.epilogues]
        names = tuple(fam.template_name(c, e) for c, e in instances)
        lowered, log = nvrtc.compile_source(fam.source, names, target)
        usage = nvrtc.parse_ptxas_log(log)
        for (cfg, _), name in zip(instances, names):
            if lowered[name] not in usage:
                raise NvrtcError(f"ptxas printed no resource report for {name} ({lowered[name]}) on {target}; "
                                 f"log tail:\n{log[-1500:]}")
            u = usage[lowered[name]]
            reports.append(CompileReport(name, kind, cfg.name, target, u["registers"], u["stack"], u["spill_st"],
                                         u["spill_ld"], u["smem"], fam.shared_bytes(cfg)))
    return reports


def compile_all(archs=nvrtc.DEFAULT_ARCHS) -> list[CompileReport]:
    """Every registered variant of every family plus the support kernels, for each arch (the
    sm_90a-only families with sm_90)."""
    reports = []
    for arch in archs:
        if arch not in nvrtc.KNOWN_ARCHS:
            raise ValueError(f"arch must be one of {nvrtc.KNOWN_ARCHS} (mma.sync m16n8k16 and cp.async need "
                             f"sm_80+), got {arch!r}")
        for kind in registry.KINDS:
            reports += compile_variants(kind, registry.variants(kind, hopper=arch == "sm_90"), arch)
        reports += nvrtc.compile_support(arch)
    return reports


def ptx(kind: str, cfg: TileConfig, arch: str = "sm_90") -> str:
    fam = registry.family(kind, cfg)
    return isa.ptx(fam.source, fam.template_name(cfg), fam.target_arch(arch))


def ptx_counts(kind: str, cfg: TileConfig, arch: str = "sm_90") -> dict[str, int]:
    """Static PTX instruction counts of one variant per class of :data:`quick_lab.build.isa.PTX_CLASSES`."""
    return isa.count_classes(ptx(kind, cfg, arch))

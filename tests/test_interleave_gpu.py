"""The AutoAWQ -> QUICK interleave as a GPU kernel (kernels/interleave.cu, ``ops.interleave_gpu``): it
builds through NVRTC on any machine; on a GPU it must equal the NumPy ``interleave()`` bit for bit."""
from __future__ import annotations

import re

import numpy as np
import pytest

from quick_lab.build import nvrtc
from quick_lab.build.paths import KERNEL_DIR
from quick_lab.build.sources import SUPPORT_KERNELS, assemble
from quick_lab.core import ops
from quick_lab.core.format import VALID_GROUP_SIZES, AWQWeight, random_awq
from quick_lab.core.interleave import interleave


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_builds_without_spills(arch):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    _, log = nvrtc.compile_source("interleave.cu", (), arch)
    report = nvrtc.parse_ptxas_log(log)["interleave_awq"]
    assert report["spill_st"] == report["spill_ld"] == report["stack"] == 0, report
    assert report["smem"] == 16 * 36 * 4  # the 16-row tile, 36-word row stride
    assert 16 <= report["registers"] <= 64


def test_is_a_support_kernel_that_quick_lab_compile_builds():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    assert SUPPORT_KERNELS["interleave_awq"] == "interleave.cu"
    assert "interleave_awq" in {r.kernel for r in nvrtc.compile_support("sm_90")}
    assert '#line 1 "quick_layout.cuh"' in assemble("interleave.cu")  # the layout comes from the header


def test_launcher_tile_width_is_the_kernels():
    source = (KERNEL_DIR / "interleave.cu").read_text()
    blocks = int(re.search(r"constexpr int kBlocksPerTile = (\d+);", source).group(1))
    assert ops.INTERLEAVE_BLOCKS_PER_TILE == blocks
    assert re.search(r"__launch_bounds__\(kThreads\)", source) and "constexpr int kThreads = 256;" in source


def test_rejects_what_is_not_a_device_awq_weight():
    pytest.importorskip("cupy")
    awq = random_awq(128, 128, 128, seed=1)
    with pytest.raises(TypeError, match="awq must be an AWQWeight"):
        ops.interleave_gpu(interleave(awq))
    with pytest.raises(TypeError, match="awq must be an AWQWeight"):
        ops.interleave_gpu(np.zeros((128, 16), dtype=np.int32))
    with pytest.raises(TypeError, match="host NumPy array"):
        ops.interleave_gpu(awq)  # NumPy arrays: copy with ops.to_device first


# ---------------------------------------------------------------- GPU

SHAPES = [(128, 64), (256, 192), (384, 320), (512, 512), (1024, 1088), (4096, 4096)]


def _interleave_poisoned(dev_awq, monkeypatch, byte: int):
    """interleave_gpu with every output buffer filled with ``byte`` before the kernel runs."""
    import cupy

    real_empty = cupy.empty

    def poisoned_empty(*args, **kwargs):
        arr = real_empty(*args, **kwargs)
        if arr.nbytes:
            arr.data.memset(byte, arr.nbytes)
        return arr

    with monkeypatch.context() as m:
        m.setattr(cupy, "empty", poisoned_empty)
        return ops.interleave_gpu(dev_awq)


def _as_bytes(arr) -> np.ndarray:
    import cupy

    return np.ascontiguousarray(cupy.asnumpy(arr) if isinstance(arr, cupy.ndarray) else arr).view(np.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("G", VALID_GROUP_SIZES)
@pytest.mark.parametrize("K,N", SHAPES)
def test_bit_exact_with_numpy_interleave(K, N, G, monkeypatch):
    if K % G:
        pytest.skip(f"K = {K} is not a multiple of G = {G}")
    import cupy

    seed = int(np.random.default_rng().integers(1 << 31))  # fresh inputs every run; the seed is reported
    host = random_awq(K, N, G, seed=seed)
    want = interleave(host)
    dev = ops.to_device(host)
    before = {f: _as_bytes(getattr(dev, f)) for f in ("qweight", "qzeros", "scales")}
    # Two poisons: a word the kernel leaves unwritten keeps 0x00.. under one and 0xFF.. under the other,
    # so it fails against one of them whatever value the reference has there.
    for byte in (0xFF, 0x00):
        got = _interleave_poisoned(dev, monkeypatch, byte)
        assert got.group_size == G and (got.K, got.N) == (K, N)
        for field, dtype in (("qweight", np.int32), ("qzeros", np.int32), ("scales", np.float16)):
            arr = getattr(got, field)
            assert isinstance(arr, cupy.ndarray) and arr.dtype == dtype and arr.shape == getattr(want, field).shape
            mismatch = int((_as_bytes(arr) != _as_bytes(getattr(want, field))).sum())
            assert mismatch == 0, \
                f"{field}: {mismatch} bytes differ (K={K}, N={N}, G={G}, seed={seed}, poison={byte:#x})"
    for field, data in before.items():  # the input is left as it was
        np.testing.assert_array_equal(_as_bytes(getattr(dev, field)), data)


@pytest.mark.gpu
def test_result_feeds_the_quick_gemm():
    import cupy

    from gpu_helpers import REL_TOL, relative_error
    from quick_lab.core.format import reference_gemm

    host = random_awq(512, 256, 64, seed=11)
    x_host = np.random.default_rng(3).standard_normal((5, 512)).astype(np.float16)
    y = cupy.asnumpy(ops.quick_gemm(cupy.asarray(x_host), ops.interleave_gpu(ops.to_device(host))))
    assert relative_error(y, reference_gemm(x_host, host)) < REL_TOL


@pytest.mark.gpu
def test_empty_weight_and_device_rules():
    import cupy

    empty = AWQWeight(cupy.empty((0, 8), dtype=cupy.int32), cupy.empty((0, 8), dtype=cupy.int32),
                      cupy.empty((0, 64), dtype=cupy.float16), 128)
    got = ops.interleave_gpu(empty)
    assert got.qweight.shape == (0, 128) and got.scales.shape == (0, 64)
    narrow = ops.to_device(random_awq(128, 72, 128, seed=2))  # valid AutoAWQ, but N is not a multiple of 64
    with pytest.raises(ValueError, match="multiple of 64"):
        ops.interleave_gpu(narrow)
    strided = ops.to_device(random_awq(128, 128, 128, seed=3))
    strided = AWQWeight(cupy.asfortranarray(strided.qweight), strided.qzeros, strided.scales, 128)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.interleave_gpu(strided)

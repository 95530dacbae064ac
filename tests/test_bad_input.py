"""Bad inputs: every one is rejected before a launch with a TypeError / ValueError whose message names
the argument and the rule (a bad launch would crash, hang or silently compute garbage).

Most cases need CuPy arrays, hence a GPU (``gpu`` marker); the format- and config-level rules and the
host-array rejections are checked on the CPU too.

NaN / Inf scales: the ops do **not** scan the scales on every call (a full extra pass over the scales
plus a device-to-host sync per GEMM, more than the kernel's own cost per weight byte at M = 1).
``quick_lab.core.validation.check_scales_finite`` is the opt-in check, to run once when weights are loaded;
it is tested directly here.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from quick_lab.core import configs, ops, validation
from quick_lab.core.format import AWQWeight, random_awq
from quick_lab.core.interleave import QuickWeight, interleave

K, N, G = 256, 128, 64


def _raises(exc, *words):
    """pytest.raises that also checks every word appears in the message."""
    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            message = str(self.info.value)
            for word in words:
                assert word in message, f"{word!r} not in {message!r}"
            return handled

    return _Ctx()


# ---------------------------------------------------------------- CPU: format, config, host arrays


def test_awq_weight_rejects_int64_qweight_on_construction():
    a = random_awq(K, N, G, seed=1)
    with _raises(TypeError, "qweight", "int32", "int64"):
        AWQWeight(a.qweight.astype(np.int64), a.qzeros, a.scales, G)


def test_awq_weight_rejects_k_not_a_multiple_of_g():
    a = random_awq(K, N, G, seed=1)
    with _raises(ValueError, "K = qweight.shape[0] = 224", "group_size = 64"):
        AWQWeight(a.qweight[:224], a.qzeros, a.scales, G)


def test_scales_finite_check_on_host_arrays():
    s = random_awq(K, N, G, seed=1).scales.copy()
    validation.check_scales_finite(s)
    for bad in (np.nan, np.inf, -np.inf):
        t = s.copy()
        t[1, 5] = bad
        with _raises(ValueError, "scales", "NaN or Inf"):
            validation.check_scales_finite(t)


@pytest.mark.parametrize("name, words", [
    ("16x128_w1x2_s1", ["config must look like"]),
    ("16x128x32", ["config must look like"]),
    ("axbxc_w1x2_s1", ["config must look like"]),
])
def test_bad_config_strings(name, words):
    with _raises(ValueError, *words):
        configs.TileConfig.parse(name)


@pytest.mark.parametrize("cfg, exc, words", [
    (configs.TileConfig(16, 128, 0, 1, 2, 1), ValueError, ["tile_k", "positive"]),
    (configs.TileConfig(16, -128, 32, 1, 2, 2), ValueError, ["tile_n", "positive"]),
    (configs.TileConfig(16, 128, 32, 1, 0, 2), ValueError, ["warps_n", "positive"]),
    ((16, 128, 32, 1, 2, 1), TypeError, ["config", "TileConfig"]),
])
def test_check_config(cfg, exc, words):
    with _raises(exc, *words):
        validation.check_config(cfg)


AWQ_CFG = configs.AWQ_DEFAULT            # 16 x 128 x 32
QUICK_CFG64 = configs.TileConfig(16, 128, 64, 1, 2, 3)


@pytest.mark.parametrize("kind, cfg, Mv, Kv, Nv, Gv, split, exc, words", [
    ("awq", AWQ_CFG, 4, 256, 192, 64, 1, ValueError, ["N = 192", "tile_n = 128"]),
    ("quick", QUICK_CFG64, 4, 256, 256, 32, 1, ValueError, ["tile_k = 64", "group_size = 32"]),
    ("awq", configs.QUICK_DEFAULT, 4, 256, 256, 64, 1, ValueError, ["invalid awq config", "stages=1"]),
    ("awq", configs.TileConfig(16, 128, 48, 1, 2, 1), 4, 256, 256, 64, 1, ValueError, ["tile_k", "multiple of 32"]),
    ("awq", AWQ_CFG, 4, 256, 256, 64, 0, ValueError, ["split_k", "between 1 and K / tile_k = 8", "got 0"]),
    ("awq", AWQ_CFG, 4, 256, 256, 64, 9, ValueError, ["split_k", "between 1 and K / tile_k = 8", "got 9"]),
    ("awq", AWQ_CFG, 4, 256, 256, 64, 2.0, TypeError, ["split_k must be an int", "float"]),
    ("awq", AWQ_CFG, 4, 256, 256, 64, True, TypeError, ["split_k must be an int", "bool"]),
    ("awq", AWQ_CFG, 4, 256, 256, 64, "2", TypeError, ["split_k must be an int", "str"]),
    ("awq", configs.TileConfig(16, 128, 0, 1, 2, 1), 4, 256, 256, 64, 1, ValueError, ["tile_k", "positive"]),
])
def test_check_problem_rules(kind, cfg, Mv, Kv, Nv, Gv, split, exc, words):
    with _raises(exc, *words):
        validation.check_problem(kind, cfg, Mv, Kv, Nv, Gv, split)


def test_check_problem_accepts_more_than_2_31_outputs():
    # 64-bit output indexing (kernels/common.cuh store_fragment): M * N > 2^31 is a legal problem
    validation.check_problem("awq", AWQ_CFG, 65600, 128, 32768, 128, 1)


def test_host_numpy_arrays_are_rejected_without_a_gpu():
    pytest.importorskip("cupy")  # the check imports cupy (no GPU needed) to tell the array kinds apart
    host = random_awq(K, N, G, seed=1)
    x = np.zeros((4, K), dtype=np.float16)
    with _raises(TypeError, "x is a host NumPy array", "cupy.asarray(x)"):
        validation.check_device_array(x, "x", np.float16)
    with _raises(TypeError, "scales is a host NumPy array"):
        ops.awq_gemm(x, host)
    with _raises(TypeError, "scales is a host NumPy array"):
        ops.quick_gemm(x, interleave(host), config=configs.QUICK_DEFAULT, split_k=1)


def test_wrong_weight_type_is_a_type_error_without_a_gpu():
    host = random_awq(K, N, G, seed=1)
    x = np.zeros((4, K), dtype=np.float16)
    with _raises(TypeError, "weight must be an AWQWeight", "QuickWeight"):
        ops.awq_gemm(x, interleave(host))
    with _raises(TypeError, "QuickWeight", "AWQWeight"):
        ops.quick_gemm(x, host)  # the dispatched path too
    with _raises(TypeError, "QuickWeight", "AWQWeight"):
        ops.quick_gemm(x, host, config=configs.QUICK_DEFAULT, split_k=1)
    with _raises(TypeError, "AWQWeight"):
        ops.dequantize(interleave(host))
    with _raises(TypeError, "QuickWeight", "AWQWeight"):
        validation.check_weight(host, "quick")


# ---------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def dev():
    """(host AWQWeight, device AWQWeight, device QuickWeight, x [4, K] on the GPU)."""
    import cupy

    host = random_awq(K, N, G, seed=7)
    x = cupy.asarray(np.random.default_rng(7).standard_normal((4, K)).astype(np.float16))
    return host, ops.to_device(host), ops.to_device(interleave(host)), x


def _both(dev_fixture):
    _, awq, quick, _ = dev_fixture
    return ((ops.awq_gemm, awq, configs.AWQ_DEFAULT), (ops.quick_gemm, quick, configs.QUICK_DEFAULT))


@pytest.mark.gpu
class TestActivations:
    @pytest.mark.parametrize("dtype", ["float32", "int16"])  # int16 stands in for bf16 (same size)
    def test_wrong_dtype(self, dev, dtype):
        import cupy

        x = dev[3].astype(dtype)
        for gemm, w, _ in _both(dev):
            with _raises(TypeError, "x must have dtype float16", f"got {dtype}"):
                gemm(x, w)

    def test_k_mismatch(self, dev):
        import cupy

        x = cupy.zeros((4, K // 2), dtype=cupy.float16)
        for gemm, w, _ in _both(dev):
            with _raises(ValueError, "x must have shape [M, K]", f"K = {K}", str((4, K // 2))):
                gemm(x, w)

    def test_one_dimensional(self, dev):
        import cupy

        x = cupy.zeros(K, dtype=cupy.float16)
        for gemm, w, _ in _both(dev):
            with _raises(ValueError, "x must be 2-D"):
                gemm(x, w)

    def test_strided_and_transposed_views(self, dev):
        import cupy

        wide = cupy.zeros((4, 2 * K), dtype=cupy.float16)
        tall = cupy.zeros((K, 4), dtype=cupy.float16)
        for x in (wide[:, ::2], tall.T):
            assert x.shape == (4, K)
            for gemm, w, _ in _both(dev):
                with _raises(ValueError, "x must be C-contiguous", "ascontiguousarray"):
                    gemm(x, w)

    def test_offset_views(self, dev):
        import cupy

        wider = cupy.zeros((4, K + 1), dtype=cupy.float16)
        flat = cupy.zeros(4 * K + 8, dtype=cupy.float16)
        misaligned = flat[1:1 + 4 * K].reshape(4, K)  # contiguous, but 2 bytes past a 16-byte boundary
        assert misaligned.flags.c_contiguous and misaligned.data.ptr % 16 == 2
        for gemm, w, _ in _both(dev):
            with _raises(ValueError, "x must be C-contiguous"):
                gemm(wider[:, 1:], w)
            with _raises(ValueError, "x must be 16-byte aligned"):
                gemm(misaligned, w)

    def test_host_numpy(self, dev):
        import cupy

        for gemm, w, _ in _both(dev):
            with _raises(TypeError, "x is a host NumPy array"):
                gemm(cupy.asnumpy(dev[3]), w)

    def test_out_argument(self, dev):
        import cupy

        for gemm, w, _ in _both(dev):
            with _raises(TypeError, "out is a host NumPy array"):
                gemm(dev[3], w, config=_cfg_of(gemm), split_k=1, out=np.zeros((4, N), np.float16))
            with _raises(ValueError, "out must have shape [M, N]"):
                gemm(dev[3], w, config=_cfg_of(gemm), split_k=1, out=cupy.zeros((4, N + 64), cupy.float16))
            with _raises(TypeError, "out must have dtype float16"):
                gemm(dev[3], w, config=_cfg_of(gemm), split_k=1, out=cupy.zeros((4, N), cupy.float32))

    def test_out_argument_of_the_fallback(self, dev):
        import cupy

        quick = dev[2]
        with _raises(ValueError, "out must have shape [M, N]"):
            ops.plan_fallback(dev[3], quick, out=cupy.zeros((4, N + 64), cupy.float16))
        with _raises(TypeError, "out must have dtype float16"):
            ops.plan_fallback(dev[3], quick, out=cupy.zeros((4, N), cupy.float32))

    def test_other_device(self, dev):
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 2:
            pytest.skip("needs 2 GPUs: only 1 visible")
        with cupy.cuda.Device(1):
            x1 = cupy.zeros((4, K), dtype=cupy.float16)
        for gemm, w, _ in _both(dev):
            with _raises(ValueError, "x lives on GPU 1", "current device is GPU 0"):
                gemm(x1, w)


def _cfg_of(gemm):
    return configs.AWQ_DEFAULT if gemm is ops.awq_gemm else configs.QUICK_DEFAULT


@pytest.mark.gpu
class TestWeights:
    def test_int64_qweight(self, dev):
        _, awq, quick, x = dev
        with _raises(TypeError, "qweight", "int32", "int64"):
            AWQWeight(awq.qweight.astype("int64"), awq.qzeros, awq.scales, G)  # rejected when built
        with _raises(TypeError, "qweight must have dtype int32", "int64"):
            ops.quick_gemm(x, replace(quick, qweight=quick.qweight.astype("int64")))

    def test_wrong_scales_and_zeros_dtype(self, dev):
        _, _, quick, x = dev
        with _raises(TypeError, "scales must have dtype float16", "float32"):
            ops.quick_gemm(x, replace(quick, scales=quick.scales.astype("float32")))
        with _raises(TypeError, "qzeros must have dtype int32", "uint32"):
            ops.quick_gemm(x, replace(quick, qzeros=quick.qzeros.view("uint32")))

    def test_k_not_a_multiple_of_g(self, dev):
        _, _, quick, x = dev
        bad = replace(quick, qweight=quick.qweight[:6])  # 6 k16 blocks = 96 rows, G = 64
        with _raises(ValueError, "K = 16 * qweight.shape[0] = 96", "multiple of group_size = 64"):
            ops.quick_gemm(x[:, :96].copy(), bad)

    def test_n_not_a_multiple_of_64(self):
        import cupy

        host = random_awq(K, 96, G, seed=3)  # a valid AutoAWQ tensor (N % 8 == 0) ...
        x = cupy.zeros((4, K), dtype=cupy.float16)
        with _raises(ValueError, "N must be a multiple of 64", "N = 96"):
            ops.awq_gemm(x, ops.to_device(host))  # ... that the kernels cannot tile
        quick = QuickWeight(cupy.zeros((K // 16, 2 * 96), cupy.int32), cupy.asarray(host.qzeros),
                            cupy.asarray(host.scales), G)
        with _raises(ValueError, "N must be a multiple of 64", "N = 96"):
            ops.quick_gemm(x, quick)

    def test_qweight_shape_mismatch(self, dev):
        _, awq, quick, x = dev
        with _raises(ValueError, "qweight must have shape [K/16, 2N]"):
            ops.quick_gemm(x, replace(quick, qweight=quick.qweight[:, :-64].copy()))

    def test_misaligned_weight_array(self, dev):
        import cupy

        _, _, quick, x = dev
        flat = cupy.zeros(quick.qweight.size + 4, dtype=cupy.int32)
        shifted = flat[1:1 + quick.qweight.size].reshape(quick.qweight.shape)  # 4 bytes off
        shifted[...] = quick.qweight
        with _raises(ValueError, "qweight must be 16-byte aligned"):
            ops.quick_gemm(x, replace(quick, qweight=shifted))

    def test_host_numpy_weights(self, dev):
        host, _, _, x = dev
        with _raises(TypeError, "scales is a host NumPy array"):
            ops.awq_gemm(x, host)
        with _raises(TypeError, "scales is a host NumPy array"):
            ops.quick_gemm(x, interleave(host))
        with _raises(TypeError, "scales is a host NumPy array"):
            ops.dequantize(host)

    def test_wrong_weight_type(self, dev):
        _, awq, quick, x = dev
        with _raises(TypeError, "weight must be an AWQWeight", "QuickWeight"):
            ops.awq_gemm(x, quick)
        with _raises(TypeError, "QuickWeight", "AWQWeight"):
            ops.quick_gemm(x, awq)
        with _raises(TypeError, "QuickWeight", "AWQWeight"):
            ops.quick_gemm(x, awq, config=configs.QUICK_DEFAULT, split_k=1)
        with _raises(TypeError, "AWQWeight"):
            ops.dequantize(quick)

    def test_non_finite_scales_opt_in_check(self, dev):
        """The ops do not scan scales per call (cost); check_scales_finite is the opt-in check."""
        import cupy

        _, awq, _, _ = dev
        validation.check_scales_finite(awq.scales)
        for bad in (np.nan, np.inf):
            scales = awq.scales.copy()
            scales[0, 3] = bad
            with _raises(ValueError, "scales contain NaN or Inf"):
                validation.check_scales_finite(scales)
        assert bool(cupy.isfinite(awq.scales).all())  # the copies did not touch the weight


@pytest.mark.gpu
class TestConfigAndSplit:
    def test_bad_config_string(self, dev):
        for gemm, w, _ in _both(dev):
            with _raises(ValueError, "config must look like"):
                gemm(dev[3], w, config="16x128_w1x2", split_k=1)
            with _raises(TypeError, "config must be a TileConfig"):
                gemm(dev[3], w, config=(16, 128, 32, 1, 2, 1), split_k=1)
            with _raises(ValueError, "tile_k", "positive"):
                gemm(dev[3], w, config="16x128x0_w1x2_s2", split_k=1)

    def test_tile_n_must_divide_n(self):
        import cupy

        host = random_awq(K, 192, G, seed=4)
        x = cupy.zeros((4, K), dtype=cupy.float16)
        with _raises(ValueError, "N = 192 must be a multiple of tile_n = 128"):
            ops.awq_gemm(x, ops.to_device(host), config=configs.AWQ_DEFAULT, split_k=1)
        with _raises(ValueError, "N = 192 must be a multiple of tile_n = 128"):
            ops.quick_gemm(x, ops.to_device(interleave(host)), config=configs.QUICK_DEFAULT, split_k=1)

    def test_tile_k_must_divide_g(self):
        import cupy

        host = random_awq(K, N, 32, seed=5)
        x = cupy.zeros((4, K), dtype=cupy.float16)
        with _raises(ValueError, "tile_k = 64 must divide group_size = 32"):
            ops.quick_gemm(x, ops.to_device(interleave(host)), config=QUICK_CFG64, split_k=1)

    def test_config_of_the_other_kernel(self, dev):
        _, awq, _, x = dev
        with _raises(ValueError, "invalid awq config", "stages=1"):
            ops.awq_gemm(x, awq, config=configs.QUICK_DEFAULT, split_k=1)

    @pytest.mark.parametrize("split, exc, words", [
        (0, ValueError, ["split_k must be between 1 and K / tile_k", "got 0"]),
        (K // 32 + 1, ValueError, ["split_k must be between 1 and K / tile_k", f"= {K // 32}"]),
        (-1, ValueError, ["split_k must be between 1"]),
        (2.0, TypeError, ["split_k must be an int", "float"]),
        (True, TypeError, ["split_k must be an int", "bool"]),
    ])
    def test_split_k(self, dev, split, exc, words):
        for gemm, w, cfg in _both(dev):
            with _raises(exc, *words):
                gemm(dev[3], w, config=cfg, split_k=split)


@pytest.mark.gpu
class TestSizes:
    def test_empty_batch(self, dev):
        import cupy

        x0 = cupy.empty((0, K), dtype=cupy.float16)
        for gemm, w, cfg in _both(dev):
            assert gemm(x0, w).shape == (0, N)
            assert gemm(x0, w, config=cfg, split_k=2).shape == (0, N)

    @pytest.mark.parametrize("kind, split", [("awq", 1), ("quick", 1), ("quick", 2)])
    def test_more_than_2_31_outputs(self, kind, split):
        """M * N = 65600 * 32768 > 2^31 outputs with a small K: correct on sampled rows (the kernels index
        x, out and the split-K workspace in 64 bits), or rejected with a ValueError naming the size."""
        import cupy

        M, Kh, Nh, Gh = 65600, 128, 32768, 128
        need = M * Nh * 2 + (split * M * Nh * 4 if split > 1 else 0) + (1 << 30)
        free, _ = cupy.cuda.runtime.memGetInfo()
        if free < need:
            pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} GiB are")
        try:
            _check_huge(kind, split, M, Kh, Nh, Gh)
        finally:
            cupy.get_default_memory_pool().free_all_blocks()


def _check_huge(kind, split, M, K_, N_, G_):
    import cupy
    from quick_lab.core.format import dequantize_fp16

    host = random_awq(K_, N_, G_, seed=11)
    weight = ops.to_device(host if kind == "awq" else interleave(host))
    gemm = ops.awq_gemm if kind == "awq" else ops.quick_gemm
    cfg = configs.AWQ_DEFAULT if kind == "awq" else configs.QUICK_DEFAULT
    x_host = np.random.default_rng(11).standard_normal((M, K_)).astype(np.float16)
    out = cupy.full((M, N_), np.nan, dtype=cupy.float16)
    try:
        y = gemm(cupy.asarray(x_host), weight, config=cfg, split_k=split, out=out)
    except ValueError as exc:  # an explicit rejection is acceptable, a wrong answer is not
        assert f"M = {M}" in str(exc) or "size" in str(exc), str(exc)
        return
    cupy.cuda.Device().synchronize()
    assert not bool(cupy.isnan(y).any()), "unwritten outputs (NaN poison survived)"
    rows = np.unique(np.r_[0, 1, 65534, 65535, 65536, 65537, M - 2, M - 1,
                           np.random.default_rng(12).integers(0, M, 8)])
    got = cupy.asnumpy(y[cupy.asarray(rows)]).astype(np.float64)
    ref = x_host[rows].astype(np.float64) @ dequantize_fp16(host).astype(np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 2e-3, f"{kind} split {split}: relative error {err:.2e} on rows {rows.tolist()}"

"""Foreign arrays through the public ops (quick_lab.core.interop): PyTorch tensors, DLPack and
``__cuda_array_interface__`` producers in without a copy, the caller's kind and stream out, and the
QuickLinear torch module.

On the CPU: how an argument is classified and converted, with fake producers (objects exposing the
protocols, a fake torch tensor whose type lives in module ``torch``) and CuPy's converters replaced
by recorders; that neither ``quick_lab.model`` nor ``quick_lab.core.ops`` imports torch; and, where
torch is installed, QuickLinear's construction, buffers and state_dict. On a GPU (``gpu`` marker;
torch tests also need a CUDA build of torch): every op on torch tensors against the float64
reference, zero-copy round trips (same data pointer), ``out=`` written in place, launches on a
non-default torch stream, a CAI-only producer, and QuickLinear in a small torch model against an fp16
torch reference.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from quick_lab.core import interop, ops
from quick_lab.core.format import AWQWeight, dequantize_fp16, random_awq, reference_gemm
from quick_lab.core.interleave import QuickWeight, interleave

TORCH_REASON = "torch is an optional extra (pip install quick_lab[torch]); its tests skip without it"


# ---------------------------------------------------------------- fakes (CPU)


class FakeDevice:
    def __init__(self, type_: str, index=None):
        self.type, self.index = type_, index

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"


class Tensor:
    """Looks like a torch.Tensor to a type check (class name Tensor in module torch), and is not one."""

    def __init__(self, data, device: FakeDevice, requires_grad: bool = False, dtype=None):
        self.data, self.device, self.requires_grad = np.asarray(data), device, requires_grad
        self.shape = self.data.shape
        self.dtype = dtype if dtype is not None else FakeDtype(f"torch.{self.data.dtype}")
        self.detached_from = None

    def detach(self):
        twin = Tensor(self.data, self.device, False, self.dtype)
        twin.detached_from = self
        return twin

    def __dlpack__(self, stream=None):
        raise AssertionError("the fake's DLPack export must not be called on the CPU")

    def __dlpack_device__(self):
        return (2 if self.device.type == "cuda" else 1, self.device.index or 0)


Tensor.__module__ = "torch"


class Parameter(Tensor):
    pass


Parameter.__module__ = "torch.nn.parameter"


class FakeDtype:
    def __init__(self, name: str):
        self.name = name

    def __str__(self):
        return self.name


class CudaArrayInterfaceOnly:
    def __init__(self, data):
        self.data = np.asarray(data)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.data.shape, "typestr": self.data.dtype.str, "data": (0x1000, False), "version": 3}


class DLPackOnly:
    def __init__(self, data, device_type: int = 2, device_id: int = 0, namespace=None):
        self.data, self.where, self.namespace = np.asarray(data), (device_type, device_id), namespace
        self.shape, self.dtype = self.data.shape, self.data.dtype

    def __dlpack__(self, stream=None):
        raise AssertionError("the fake's DLPack export must not be called on the CPU")

    def __dlpack_device__(self):
        return self.where


class ArrayApiProducer(DLPackOnly):
    def __array_namespace__(self):
        return self.namespace


class NotTorch:
    """A class named Tensor outside torch, speaking DLPack: not mistaken for torch."""

    def __dlpack__(self, stream=None):
        raise AssertionError

    def __dlpack_device__(self):
        return (2, 0)


NotTorch.__name__ = "Tensor"
NotTorch.__module__ = "mylib"


@pytest.fixture
def converters(monkeypatch):
    """cupy.asarray / cupy.from_dlpack replaced by recorders that return the fake's NumPy data."""
    cupy = pytest.importorskip("cupy")
    calls = []

    def record(name):
        def convert(obj, *args, **kwargs):
            calls.append((name, obj))
            return obj.data
        return convert

    monkeypatch.setattr(cupy, "asarray", record("asarray"))
    monkeypatch.setattr(cupy, "from_dlpack", record("from_dlpack"))
    return calls


@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in ``torch`` module in sys.modules recording what interop asks of it."""
    log = []

    class Stream:
        cuda_stream = 0xBEEF

    @contextlib.contextmanager
    def device(index):
        log.append(("enter torch device", index))
        yield
        log.append(("exit torch device", index))

    cuda = types.SimpleNamespace(current_device=lambda: 3, device=device,
                                 current_stream=lambda index: log.append(("stream of", index)) or Stream())
    module = types.SimpleNamespace(cuda=cuda, from_dlpack=lambda arr: ("torch tensor of", arr))
    monkeypatch.setitem(sys.modules, "torch", module)
    return log


CUDA0 = FakeDevice("cuda", 0)


# ---------------------------------------------------------------- CPU: classification


def test_array_kinds_of_fake_producers():
    pytest.importorskip("cupy")
    assert interop.array_kind(Tensor(np.zeros(2), CUDA0), "x") == "torch"
    assert interop.array_kind(Parameter(np.zeros(2), CUDA0), "x") == "torch"  # a subclass of torch.Tensor
    assert interop.array_kind(CudaArrayInterfaceOnly(np.zeros(2)), "x") == "cuda_array_interface"
    assert interop.array_kind(DLPackOnly(np.zeros(2)), "x") == "dlpack"
    assert interop.array_kind(DLPackOnly(np.zeros(2), device_type=13), "x") == "dlpack"  # CUDA managed
    assert interop.array_kind(NotTorch(), "x") == "dlpack"
    assert interop.is_torch_tensor(Parameter(np.zeros(2), CUDA0))
    assert not interop.is_torch_tensor(NotTorch())
    assert not interop.is_torch_tensor(np.zeros(2))


@pytest.mark.parametrize("obj,words", [
    (np.zeros((2, 8), np.float16), ["activations is a host NumPy array", "CUDA array", "cupy.asarray(activations)"]),
    (Tensor(np.zeros(2), FakeDevice("cpu")), ["activations is a torch tensor on cpu", "CUDA tensor",
                                              "activations.cuda()"]),
    (DLPackOnly(np.zeros(2), device_type=1), ["activations is an array on the CPU", "CUDA array"]),
    (DLPackOnly(np.zeros(2), device_type=3), ["activations is an array on CUDA pinned host memory"]),
    ([1.0, 2.0], ["activations must be a CUDA array", "got list"]),
    (None, ["activations must be a CUDA array", "got NoneType"]),
])
def test_host_and_unknown_arrays_are_type_errors_naming_the_argument(obj, words):
    pytest.importorskip("cupy")
    with pytest.raises(TypeError) as info:
        interop.as_cupy(obj, "activations")
    for word in words:
        assert word in str(info.value), str(info.value)


def test_each_kind_goes_to_its_zero_copy_converter(converters):
    cai, dl, t = CudaArrayInterfaceOnly([1, 2]), DLPackOnly([3, 4]), Tensor([5, 6], CUDA0)
    assert list(interop.as_cupy(cai, "x")) == [1, 2]
    assert list(interop.as_cupy(dl, "x")) == [3, 4]
    assert list(interop.as_cupy(t, "x")) == [5, 6]
    assert converters == [("asarray", cai), ("from_dlpack", dl), ("from_dlpack", t)]


def test_a_torch_tensor_that_requires_grad_is_detached_not_copied(converters):
    t = Tensor([1, 2], CUDA0, requires_grad=True)
    interop.as_cupy(t, "x")
    (name, sent), = converters
    assert name == "from_dlpack" and sent is not t and sent.detached_from is t and sent.data is t.data


def test_a_producer_failure_is_a_type_error_naming_the_argument(monkeypatch):
    cupy = pytest.importorskip("cupy")

    def refuse(obj, *args, **kwargs):
        raise BufferError("unsupported dtype bfloat16")

    monkeypatch.setattr(cupy, "from_dlpack", refuse)
    with pytest.raises(TypeError, match=r"qweight: cannot view this DLPackOnly .* without a copy .*bfloat16"):
        interop.as_cupy(DLPackOnly([1]), "qweight")


def test_weight_fields_are_converted_once_each_in_validation_order(converters):
    host = random_awq(256, 128, 64, seed=2)
    fields = {f: DLPackOnly(getattr(host, f)) for f in ("qweight", "qzeros", "scales")}
    awq = AWQWeight(fields["qweight"], fields["qzeros"], fields["scales"], 64)
    viewed = interop.weight_as_cupy(awq)
    assert isinstance(viewed, AWQWeight) and viewed.group_size == 64
    assert [obj for _, obj in converters] == [fields["scales"], fields["qweight"], fields["qzeros"]]
    for f in fields:
        assert getattr(viewed, f) is fields[f].data  # what the converter returned, no copy in between
    quick = QuickWeight(*(DLPackOnly(getattr(interleave(host), f)) for f in ("qweight", "qzeros", "scales")), 64)
    assert isinstance(interop.weight_as_cupy(quick), QuickWeight)


def test_a_host_weight_field_is_named_first_in_validation_order():
    pytest.importorskip("cupy")
    host = random_awq(256, 128, 64, seed=2)
    weight = AWQWeight(DLPackOnly(host.qweight), DLPackOnly(host.qzeros), host.scales, 64)
    with pytest.raises(TypeError, match="scales is a host NumPy array"):
        interop.weight_as_cupy(weight)
    weight = AWQWeight(Tensor(host.qweight, FakeDevice("cpu")), Tensor(host.qzeros, FakeDevice("cpu")),
                       Tensor(host.scales, FakeDevice("cpu")), 64)
    with pytest.raises(TypeError, match="scales is a torch tensor on cpu"):
        ops.dequantize(weight)  # the public op: caller None, the first field rejected by name


def test_awq_weight_takes_torch_dtypes_by_name():
    host = random_awq(256, 128, 64, seed=2)
    cpu = FakeDevice("cpu")
    AWQWeight(Tensor(host.qweight, cpu), Tensor(host.qzeros, cpu), Tensor(host.scales, cpu), 64)
    # NumPy without a bfloat16 type names the missing equivalent; with one registered (ml_dtypes, as on a
    # machine with torch) the dtype converts and the float16 rule rejects it: both name scales and the rule
    with pytest.raises(TypeError, match=r"scales (has dtype torch\.bfloat16, which has no NumPy equivalent"
                                        r"|must have dtype float16, got bfloat16)"):
        AWQWeight(Tensor(host.qweight, cpu), Tensor(host.qzeros, cpu),
                  Tensor(host.scales, cpu, dtype=FakeDtype("torch.bfloat16")), 64)
    with pytest.raises(TypeError, match="qweight must have dtype int32, got int64"):
        AWQWeight(Tensor(host.qweight.astype(np.int64), cpu), Tensor(host.qzeros, cpu),
                  Tensor(host.scales, cpu), 64)


# ---------------------------------------------------------------- CPU: caller, stream, result kind


def test_the_caller_of_a_cuda_torch_tensor_is_torch_on_its_device(fake_torch):
    pytest.importorskip("cupy")
    assert interop.caller_of(Tensor([1], FakeDevice("cuda", 1))) == interop.Caller(interop.TORCH, 1)
    assert interop.caller_of(Tensor([1], FakeDevice("cuda"))) == interop.Caller(interop.TORCH, 3)  # current
    assert interop.caller_of(Tensor([1], FakeDevice("cpu"))) is None  # as_cupy rejects it by name


def test_the_caller_of_an_array_api_producer_gets_its_namespace():
    pytest.importorskip("cupy")
    ns = types.SimpleNamespace(from_dlpack=lambda arr: ("theirs", arr))
    caller = interop.caller_of(ArrayApiProducer([1], device_id=2, namespace=ns))
    assert caller == interop.Caller(interop.ARRAY_API, 2, ns)
    assert interop.to_caller("result", caller) == ("theirs", "result")
    assert interop.caller_of(ArrayApiProducer([1], device_type=1, namespace=ns)) is None  # host: rejected later
    assert interop.caller_of(np.zeros(2)) is None  # NumPy speaks DLPack and the array API, on the host
    assert interop.caller_of(DLPackOnly([1])) is None  # no namespace: CuPy results
    assert interop.caller_of(CudaArrayInterfaceOnly([1])) is None


def test_results_go_back_as_the_callers_kind_and_a_given_out_as_given(fake_torch):
    torch_caller = interop.Caller(interop.TORCH, 0)
    assert interop.to_caller("cupy result", None) == "cupy result"
    assert interop.to_caller("cupy result", torch_caller) == ("torch tensor of", "cupy result")
    given = object()
    assert interop.to_caller("cupy view", torch_caller, given) is given
    assert interop.to_caller("cupy view", None, given) is given


def test_weights_an_op_made_go_back_field_by_field(fake_torch):
    made = QuickWeight("qweight view", "qzeros view", "scales view", 64)
    assert interop.weight_to_caller(made, None) is made
    back = interop.weight_to_caller(made, interop.Caller(interop.TORCH, 0))
    assert back.group_size == 64
    for f in ("qweight", "qzeros", "scales"):
        assert getattr(back, f) == ("torch tensor of", f"{f} view")


def test_a_torch_caller_launches_on_torchs_current_stream_of_its_device(fake_torch, monkeypatch):
    cupy = pytest.importorskip("cupy")

    @contextlib.contextmanager
    def entered(what):
        fake_torch.append(("enter", what))
        yield
        fake_torch.append(("exit", what))

    monkeypatch.setattr(cupy.cuda, "Device", lambda index: entered(("cupy device", index)))
    monkeypatch.setattr(interop, "cupy_stream", lambda ptr, index: entered(("cupy stream", ptr, index)))
    with interop.launch_context(interop.Caller(interop.TORCH, 1)):
        fake_torch.append("launch")
    assert fake_torch == [("enter torch device", 1), ("enter", ("cupy device", 1)), ("stream of", 1),
                          ("enter", ("cupy stream", 0xBEEF, 1)), "launch", ("exit", ("cupy stream", 0xBEEF, 1)),
                          ("exit", ("cupy device", 1)), ("exit torch device", 1)]
    fake_torch.clear()
    for caller in (None, interop.Caller(interop.ARRAY_API, 0, types.SimpleNamespace())):
        with interop.launch_context(caller):  # CuPy's own stream: torch is not consulted
            pass
    assert fake_torch == []


def test_torch_streams_become_cupy_streams_on_the_same_pointer(monkeypatch):
    cupy = pytest.importorskip("cupy")
    monkeypatch.setattr(interop, "_cupy_streams", {})
    assert interop.cupy_stream(0, 0) is cupy.cuda.Stream.null  # torch's default stream is the legacy one
    side = interop.cupy_stream(0x7F00BEEF, 1)  # wrapping a pointer needs no GPU
    assert side.ptr == 0x7F00BEEF and interop.cupy_stream(0x7F00BEEF, 1) is side  # made once


# ---------------------------------------------------------------- CPU: torch stays optional


def test_quick_lab_imports_no_torch():
    # A finder that refuses torch: any attempt to import it (even one caught by a try) is recorded.
    code = textwrap.dedent("""
        import sys

        attempts = []

        class RefuseTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    attempts.append(name)
                    raise ImportError(f"{name} is refused in this test")
                return None

        sys.meta_path.insert(0, RefuseTorch())
        import quick_lab.cli, quick_lab.model, quick_lab.core.ops, quick_lab.core.interop
        import quick_lab.model.decoder, quick_lab.model.checkpoint
        assert not attempts, attempts
        assert "torch" not in sys.modules
        try:
            import quick_lab.model.torch_linear  # the control: this one needs torch, so the finder works
        except ImportError:
            pass
        assert attempts == ["torch"], attempts
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# ---------------------------------------------------------------- QuickLinear without a GPU (torch on CPU)


def _torch_awq(K: int, N: int, G: int, seed: int, device="cpu"):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    host = random_awq(K, N, G, seed=seed)
    return host, tuple(torch.from_numpy(getattr(host, f)).to(device) for f in ("qweight", "qzeros", "scales"))


def test_quick_linear_interleaves_into_registered_buffers():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from quick_lab.model.torch_linear import QuickLinear

    host, (qweight, qzeros, scales) = _torch_awq(256, 128, 64, seed=4)
    bias = torch.randn(128)
    layer = QuickLinear.from_awq(qweight, qzeros, scales, 64, bias=bias)
    quick = interleave(host)
    assert (layer.in_features, layer.out_features, layer.group_size) == (256, 128, 64)
    state = layer.state_dict()
    assert sorted(state) == ["bias", "qweight", "qzeros", "scales"]
    for f in ("qweight", "qzeros", "scales"):
        assert np.array_equal(state[f].numpy(), getattr(quick, f)), f
    assert torch.equal(state["bias"], bias.half())
    assert torch.equal(qweight, torch.from_numpy(host.qweight))  # the AutoAWQ tensors are left as they are

    empty = QuickLinear(256, 128, 64)
    empty.load_state_dict(state)
    assert all(torch.equal(getattr(empty, f), state[f]) for f in state)
    assert QuickLinear.from_awq(qweight, qzeros, scales, 64).bias is None


def test_quick_linear_from_an_awq_module_and_its_rules():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from quick_lab.model.torch_linear import QuickLinear

    host, (qweight, qzeros, scales) = _torch_awq(256, 128, 64, seed=5)

    class WQLinearGEMM(torch.nn.Module):  # the attributes AutoAWQ's WQLinear_GEMM carries
        def __init__(self, w_bit=4, out_features=128):
            super().__init__()
            self.w_bit, self.group_size, self.in_features, self.out_features = w_bit, 64, 256, out_features
            for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
                self.register_buffer(name, t)
            self.register_buffer("bias", torch.ones(128, dtype=torch.float16))

    layer = QuickLinear.from_awq_module(WQLinearGEMM())
    assert np.array_equal(layer.qweight.numpy(), interleave(host).qweight)
    assert torch.equal(layer.bias, torch.ones(128, dtype=torch.float16))
    with pytest.raises(ValueError, match="w_bit must be 4"):
        QuickLinear.from_awq_module(WQLinearGEMM(w_bit=8))
    with pytest.raises(ValueError, match="module.out_features = 192 disagrees"):
        QuickLinear.from_awq_module(WQLinearGEMM(out_features=192))
    with pytest.raises(TypeError, match="Linear has no qweight, qzeros, scales, group_size"):
        QuickLinear.from_awq_module(torch.nn.Linear(256, 128))
    with pytest.raises(TypeError, match="qweight must have dtype int32, got int64"):
        QuickLinear.from_awq(qweight.long(), qzeros, scales, 64)
    with pytest.raises(ValueError, match=r"bias must have shape \[N\] = \(128,\)"):
        QuickLinear.from_awq(qweight, qzeros, scales, 64, bias=torch.zeros(129))
    with pytest.raises(ValueError, match="out_features = 100 must be a multiple of 64"):
        QuickLinear(256, 100, 64)
    with pytest.raises(ValueError, match="in_features = 200 must be a multiple of group_size = 64"):
        QuickLinear(200, 128, 64)


def test_quick_linear_on_the_cpu_says_to_move_it():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from quick_lab.model.torch_linear import QuickLinear

    layer = QuickLinear(256, 128, 64)
    with pytest.raises(RuntimeError, match="buffers are on cpu; move the layer to a CUDA device"):
        layer(torch.zeros(2, 256, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"x must have shape \[..., in_features\] = \[..., 256\]"):
        layer(torch.zeros(2, 255, dtype=torch.float16))


def test_real_cpu_tensors_are_rejected_by_name():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    pytest.importorskip("cupy")
    assert interop.is_torch_tensor(torch.nn.Parameter(torch.zeros(2)))
    assert interop.caller_of(torch.zeros(2)) is None
    with pytest.raises(TypeError, match="x is a torch tensor on cpu"):
        interop.as_cupy(torch.zeros(2, 8, dtype=torch.float16), "x")


# ---------------------------------------------------------------- GPU


def _cuda_torch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here (a CPU build of torch)")
    return torch


def _rel_err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _torch_weights(K: int, N: int, G: int, seed: int):
    """(host AWQWeight, AWQWeight of CUDA tensors, QuickWeight of CUDA tensors)."""
    torch = _cuda_torch()
    host = random_awq(K, N, G, seed=seed)
    quick = interleave(host)

    def cuda(w):
        return [torch.from_numpy(np.ascontiguousarray(getattr(w, f))).cuda()
                for f in ("qweight", "qzeros", "scales")]

    return host, AWQWeight(*cuda(host), G), QuickWeight(*cuda(quick), G)


def _x(torch, M: int, K: int, seed: int):
    host = np.random.default_rng(seed).standard_normal((M, K)).astype(np.float16)
    return host, torch.from_numpy(host).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 7, 33, 1024))
def test_torch_tensors_through_both_gemms(M):
    torch = _cuda_torch()
    from gpu_helpers import REL_TOL

    host, awq_t, quick_t = _torch_weights(1024, 512, 128, seed=11)
    x_host, x = _x(torch, M, 1024, seed=M)
    ref = reference_gemm(x_host, host)
    for name, y in (("awq", ops.awq_gemm(x, awq_t)), ("quick", ops.quick_gemm(x, quick_t)),
                    ("quick pinned", ops.quick_gemm(x, quick_t, config="16x128x32_w1x2_s2", split_k=3)),
                    ("fallback", ops.plan_fallback(x, quick_t).run())):
        assert isinstance(y, torch.Tensor), name
        assert y.device == x.device and y.dtype == torch.float16 and tuple(y.shape) == (M, 512), name
        y_host = y.cpu().numpy()
        assert np.isfinite(y_host).all(), name
        assert _rel_err(y_host, ref) < REL_TOL, name


@pytest.mark.gpu
def test_torch_dequantize_is_bit_exact_and_a_tensor():
    torch = _cuda_torch()
    host, awq_t, quick_t = _torch_weights(832, 384, 64, seed=12)
    w = ops.dequantize(awq_t)
    w_t = ops.dequantize_quick_t(quick_t)
    assert isinstance(w, torch.Tensor) and isinstance(w_t, torch.Tensor)
    want = dequantize_fp16(host).view(np.uint16)
    assert np.array_equal(w.cpu().numpy().view(np.uint16), want)
    assert np.array_equal(w_t.cpu().numpy().T.view(np.uint16), want)


@pytest.mark.gpu
def test_torch_round_trip_is_zero_copy():
    torch = _cuda_torch()
    import cupy

    x = torch.randn(33, 1024, device="cuda").half()
    view = interop.as_cupy(x, "x")
    assert view.data.ptr == x.data_ptr() and view.shape == (33, 1024) and view.dtype == np.float16
    view[0, 0] = 7  # the same memory: a write through the view shows in the tensor
    assert x[0, 0].item() == 7
    back = interop.to_caller(view, interop.caller_of(x))
    assert isinstance(back, torch.Tensor) and back.data_ptr() == x.data_ptr()
    result = cupy.arange(64, dtype=cupy.float16).reshape(8, 8)
    assert interop.to_caller(result, interop.caller_of(x)).data_ptr() == result.data.ptr


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ("awq", "quick"))
def test_torch_out_is_written_in_place(kind):
    torch = _cuda_torch()
    from gpu_helpers import REL_TOL

    host, awq_t, quick_t = _torch_weights(1024, 512, 128, seed=13)
    x_host, x = _x(torch, 7, 1024, seed=3)
    out = torch.full((7, 512), float("nan"), dtype=torch.float16, device="cuda")
    ptr = out.data_ptr()
    y = ops.awq_gemm(x, awq_t, out=out) if kind == "awq" else ops.quick_gemm(x, quick_t, out=out)
    assert y is out and out.data_ptr() == ptr
    assert _rel_err(out.cpu().numpy(), reference_gemm(x_host, host)) < REL_TOL


@pytest.mark.gpu
def test_torch_rules_keep_their_messages():
    torch = _cuda_torch()
    _, _, quick_t = _torch_weights(1024, 512, 128, seed=14)
    wide = torch.zeros(4, 1032, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        ops.quick_gemm(wide[:, 8:], quick_t)  # a strided view is not copied behind the caller's back
    with pytest.raises(TypeError, match="x is a torch tensor on cpu"):
        ops.quick_gemm(torch.zeros(4, 1024, dtype=torch.float16), quick_t)
    with pytest.raises(TypeError, match="x must have dtype float16"):
        ops.quick_gemm(torch.zeros(4, 1024, device="cuda"), quick_t)
    x = torch.zeros(4, 1024, dtype=torch.float16, device="cuda", requires_grad=True)
    assert isinstance(ops.quick_gemm(x, quick_t), torch.Tensor)  # detached for the kernel, not refused


@pytest.mark.gpu
def test_ops_launch_on_the_callers_torch_stream():
    torch = _cuda_torch()
    import cupy
    from gpu_helpers import REL_TOL

    host, _, quick_t = _torch_weights(1024, 512, 128, seed=15)
    x_host, x_src = _x(torch, 16, 1024, seed=4)
    x = torch.full_like(x_src, float("nan"))
    out = torch.full((16, 512), float("nan"), dtype=torch.float16, device="cuda")
    pin = {"config": "16x128x32_w1x2_s2", "split_k": 1}
    side = torch.cuda.Stream()
    assert side.cuda_stream != torch.cuda.default_stream().cuda_stream
    with torch.cuda.stream(side):
        with interop.launch_context(interop.caller_of(x)):
            assert cupy.cuda.get_current_stream().ptr == side.cuda_stream
        ops.quick_gemm(x_src, quick_t, out=out, **pin)  # warm up: kernel loaded, nothing left to allocate
    torch.cuda.synchronize()
    out.fill_(float("nan"))
    torch.cuda.synchronize()
    cupy_stream_before = cupy.cuda.get_current_stream().ptr
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued on the side stream first
        x.copy_(x_src)                  # x is ready only after the sleep, on the side stream
        y = ops.quick_gemm(x, quick_t, out=out, **pin)
        done = torch.cuda.Event()
        done.record(side)
    assert cupy.cuda.get_current_stream().ptr == cupy_stream_before  # CuPy's stream is restored
    on_default = torch.cuda.Event()
    on_default.record(torch.cuda.default_stream())
    on_default.synchronize()
    # The default stream is idle while the side stream still sleeps: the op went to the side stream
    # (on the default stream it would have read NaN or waited for the sleep).
    assert not done.query()
    side.synchronize()
    assert y is out
    assert _rel_err(out.cpu().numpy(), reference_gemm(x_host, host)) < REL_TOL


@pytest.mark.gpu
def test_a_cuda_array_interface_only_producer():
    import cupy
    from gpu_helpers import REL_TOL, weights

    class CAIOnly:
        def __init__(self, arr):
            self._arr = arr

        @property
        def __cuda_array_interface__(self):
            return self._arr.__cuda_array_interface__

    host, _, quick = weights(1024, 512, 128)
    x_host = np.random.default_rng(5).standard_normal((7, 1024)).astype(np.float16)
    x = cupy.asarray(x_host)
    wrapped = CAIOnly(x)
    assert not hasattr(wrapped, "__dlpack__")
    assert interop.as_cupy(wrapped, "x").data.ptr == x.data.ptr
    out = CAIOnly(cupy.full((7, 512), np.nan, dtype=cupy.float16))
    y = ops.quick_gemm(wrapped, quick, out=out)
    assert y is out
    assert _rel_err(cupy.asnumpy(out._arr), reference_gemm(x_host, host)) < REL_TOL
    y = ops.quick_gemm(wrapped, quick)
    assert isinstance(y, cupy.ndarray)  # no way back to a CAI-only kind: CuPy, which speaks both protocols
    assert _rel_err(cupy.asnumpy(y), reference_gemm(x_host, host)) < REL_TOL


@pytest.mark.gpu
def test_an_array_api_producer_gets_its_own_kind_back():
    import cupy
    from gpu_helpers import REL_TOL, weights

    class Namespace:
        @staticmethod
        def from_dlpack(arr):
            return Producer(cupy.from_dlpack(arr))

    class Producer:
        def __init__(self, arr):
            self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype

        def __dlpack__(self, **kwargs):
            return self.arr.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.arr.__dlpack_device__()

        def __array_namespace__(self, **kwargs):
            return Namespace

    host, dev_awq, _ = weights(1024, 512, 128)
    x_host = np.random.default_rng(6).standard_normal((7, 1024)).astype(np.float16)
    x = cupy.asarray(x_host)
    y = ops.awq_gemm(Producer(x), dev_awq)
    assert isinstance(y, Producer)
    assert _rel_err(cupy.asnumpy(y.arr), reference_gemm(x_host, host)) < REL_TOL
    weight = AWQWeight(*(Producer(getattr(dev_awq, f)) for f in ("qweight", "qzeros", "scales")), 128)
    assert isinstance(ops.dequantize(weight), Producer)


def _two_layer_model(torch, K: int, H: int, N: int, seed: int, device="cuda"):
    """(QuickLinear model, fp16 torch reference) of Linear(K, H) -> SiLU -> Linear(H, N), same weights."""
    from quick_lab.model.torch_linear import QuickLinear

    layers, refs = [], []
    for i, (k, n) in enumerate(((K, H), (H, N))):
        host, tensors = _torch_awq(k, n, 128, seed=seed + i, device=device)
        bias = torch.from_numpy(np.random.default_rng(seed + i).standard_normal(n).astype(np.float16) * 0.1)
        layers.append(QuickLinear.from_awq(*tensors, 128, bias=bias.to(device)))
        ref = torch.nn.Linear(k, n, dtype=torch.float16)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(dequantize_fp16(host).T.copy()))
            ref.bias.copy_(bias)
        refs.append(ref)
    quick = torch.nn.Sequential(layers[0], torch.nn.SiLU(), layers[1])
    reference = torch.nn.Sequential(refs[0], torch.nn.SiLU(), refs[1]).cuda()
    return quick, reference


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 7, 33))
def test_quick_linear_model_matches_its_fp16_reference(M):
    torch = _cuda_torch()
    model, reference = _two_layer_model(torch, 1024, 512, 256, seed=20)
    x = torch.from_numpy(np.random.default_rng(M).standard_normal((M, 1024)).astype(np.float16)).cuda()
    with torch.no_grad():
        y, want = model(x), reference(x)
        y3 = model(x.reshape(1, M, 1024))  # leading dims [..., K] -> [..., N]
    assert y.dtype == torch.float16 and tuple(y.shape) == (M, 256) and tuple(y3.shape) == (1, M, 256)
    assert torch.isfinite(y).all()
    assert _rel_err(y.cpu().numpy(), want.double().cpu().numpy()) < 3e-3
    # the same rows (a stream-K schedule may sum the k-tiles in another order: no bitwise claim)
    assert _rel_err(y3.reshape(M, 256).cpu().numpy(), y.double().cpu().numpy()) < 1e-3


@pytest.mark.gpu
def test_quick_linear_buffers_move_with_to():
    torch = _cuda_torch()
    model, reference = _two_layer_model(torch, 1024, 512, 256, seed=30, device="cpu")
    assert all(b.device.type == "cpu" for b in model.buffers())
    model.cuda()
    assert all(b.device.type == "cuda" for b in model.buffers())
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((7, 1024)).astype(np.float16)).cuda()
    with torch.no_grad():
        y = model(x)
        assert _rel_err(y.cpu().numpy(), reference(x).double().cpu().numpy()) < 3e-3
        model.to("cpu")
        assert all(b.device.type == "cpu" for b in model.buffers())
        with pytest.raises(RuntimeError, match="move the layer to a CUDA device"):
            model(x.cpu())
        model.to("cuda")
        assert _rel_err(model(x).cpu().numpy(), y.double().cpu().numpy()) < 1e-3


@pytest.mark.gpu
def test_quick_linear_interleaves_cuda_tensors_like_numpy():
    torch = _cuda_torch()
    from quick_lab.model.torch_linear import QuickLinear

    host, tensors = _torch_awq(1024, 512, 64, seed=40, device="cuda")
    layer = QuickLinear.from_awq(*tensors, 64)
    assert layer.qweight.device.type == "cuda"
    quick = interleave(host)
    for f in ("qweight", "qzeros", "scales"):
        assert np.array_equal(getattr(layer, f).cpu().numpy(), getattr(quick, f)), f


@pytest.mark.gpu
def test_interleave_gpu_takes_and_returns_torch_tensors():
    torch = _cuda_torch()
    host, awq_t, _ = _torch_weights(512, 192, 64, seed=41)
    quick = ops.interleave_gpu(awq_t)
    assert isinstance(quick, QuickWeight) and quick.group_size == 64
    want = interleave(host)
    for f in ("qweight", "qzeros", "scales"):
        got = getattr(quick, f)
        assert isinstance(got, torch.Tensor) and got.is_cuda, f
        assert np.array_equal(got.cpu().numpy(), getattr(want, f)), f

"""Foreign CUDA arrays in, the caller's kind out: how the public ops (:mod:`quick_lab.core.ops`) take a
PyTorch tensor or any array that speaks DLPack or ``__cuda_array_interface__``, without a copy.

The kernels read CuPy arrays, so every argument becomes a CuPy *view* of the caller's memory
(:func:`as_cupy`), tried in this order:

- a ``cupy.ndarray``: itself;
- a torch tensor (recognised by its type: torch is imported only once a tensor has arrived): on a CUDA
  device, ``cupy.from_dlpack`` of the tensor (detached: the ops have no backward);
- an object with ``__cuda_array_interface__`` (Numba, ...): ``cupy.asarray``;
- an object with ``__dlpack__`` on a CUDA device (JAX, ...): ``cupy.from_dlpack``.

Anything else, a NumPy array or a CPU tensor included, is a TypeError naming the argument: the ops
never move data to the GPU behind the caller's back. A view keeps the caller's strides, so a
non-contiguous input still meets :mod:`quick_lab.core.validation`'s C-contiguity rule (no silent copy).

Which stream and which kind come back is the :class:`Caller` of the op's first array (:func:`caller_of`):
for a CUDA torch tensor the launch goes to ``torch.cuda.current_stream()`` of the tensor's device
(:func:`launch_context`) and the result comes back as a torch tensor (:func:`to_caller`,
``torch.from_dlpack``: no copy); a DLPack producer with an array-API namespace gets its own kind back
through ``namespace.from_dlpack``. Everything else launches on CuPy's current stream (both protocols
order the producer's pending work before that stream) and gets CuPy arrays, which speak both protocols.
An ``out`` the caller passed is written in place and returned as given.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np

TORCH = "torch"
ARRAY_API = "array_api"

# DLPack device types (dlpack.h DLDeviceType) whose memory a kernel may read: kDLCUDA, kDLCUDAManaged.
CUDA_DLPACK_DEVICES = (2, 13)
_DLPACK_DEVICE_NAMES = {1: "the CPU", 3: "CUDA pinned host memory", 4: "an OpenCL device",
                        7: "a Vulkan device", 8: "a Metal device", 10: "a ROCm device"}

# AWQWeight / QuickWeight array fields in the order validation.check_weight reads them, so a bad
# weight's first complaint names the same field either way.
WEIGHT_FIELDS = ("scales", "qweight", "qzeros")

_NO_CONTEXT = contextlib.nullcontext()


@dataclass(frozen=True)
class Caller:
    """Whose array an op was called with, when it is not CuPy's: ``kind`` is :data:`TORCH` (the launch
    joins torch's current stream on CUDA device ``device_id``; results come back as tensors) or
    :data:`ARRAY_API` (``namespace.from_dlpack`` turns results into the caller's arrays)."""

    kind: str
    device_id: int = -1
    namespace: object = None


def is_torch_tensor(obj) -> bool:
    """True for a ``torch.Tensor`` (or a subclass: ``nn.Parameter``, ...), decided from the type alone,
    so a program that never imported torch does not import it here."""
    return any(cls.__name__ == "Tensor" and cls.__module__ == "torch" for cls in type(obj).__mro__)


def _is_cupy(obj) -> bool:
    import cupy

    return isinstance(obj, cupy.ndarray)


def _dlpack_device(obj, name: str):
    """``obj.__dlpack_device__()`` as (device type, device id), or None when it does not say."""
    query = getattr(obj, "__dlpack_device__", None)
    if query is None:
        return None
    try:
        return tuple(int(v) for v in query())
    except Exception as exc:  # a producer's own failure: report it against the argument
        raise TypeError(f"{name}: __dlpack_device__() failed ({exc})") from exc


def array_kind(obj, name: str) -> str:
    """How ``obj`` becomes a CuPy view: 'cupy', 'torch', 'cuda_array_interface' or 'dlpack'. A host
    array (NumPy, a CPU tensor, DLPack on a non-CUDA device) or a non-array is a TypeError naming
    ``name``."""
    if isinstance(obj, np.ndarray):
        raise TypeError(f"{name} is a host NumPy array; the ops need a CUDA array: a CuPy array "
                        f"(cupy.asarray({name})), a CUDA torch tensor or any CUDA array that speaks DLPack")
    if _is_cupy(obj):
        return "cupy"
    if is_torch_tensor(obj):
        device = obj.device
        if device.type != "cuda":
            raise TypeError(f"{name} is a torch tensor on {device}; the ops need a CUDA tensor "
                            f"({name}.cuda())")
        return "torch"
    if hasattr(obj, "__cuda_array_interface__"):
        return "cuda_array_interface"
    if hasattr(obj, "__dlpack__"):
        where = _dlpack_device(obj, name)
        if where is not None and where[0] not in CUDA_DLPACK_DEVICES:
            on = _DLPACK_DEVICE_NAMES.get(where[0], f"DLPack device type {where[0]}")
            raise TypeError(f"{name} is an array on {on}; the ops need a CUDA array (DLPack device type "
                            f"kDLCUDA or kDLCUDAManaged)")
        return "dlpack"
    raise TypeError(f"{name} must be a CUDA array (a cupy.ndarray, a CUDA torch tensor, or an object with "
                    f"__cuda_array_interface__ or __dlpack__), got {type(obj).__name__}")


def as_cupy(obj, name: str):
    """A CuPy view of ``obj``'s memory (no copy), or a TypeError naming ``name`` (:func:`array_kind`)."""
    kind = array_kind(obj, name)
    if kind == "cupy":
        return obj
    import cupy

    try:
        if kind == "torch":
            return cupy.from_dlpack(obj.detach() if obj.requires_grad else obj)
        if kind == "cuda_array_interface":
            return cupy.asarray(obj)
        return cupy.from_dlpack(obj)
    except (TypeError, ValueError, BufferError, RuntimeError, NotImplementedError) as exc:
        raise TypeError(f"{name}: cannot view this {type(obj).__name__} as a CuPy array without a copy "
                        f"({exc})") from exc


def weight_as_cupy(weight):
    """``weight`` (an AWQWeight / QuickWeight) with every array field a CuPy view (no copy); the weight
    itself when they all are CuPy arrays already."""
    fields = {f: getattr(weight, f) for f in WEIGHT_FIELDS}
    if all(_is_cupy(v) for v in fields.values()):
        return weight
    return replace(weight, **{f: as_cupy(v, f) for f, v in fields.items()})


def caller_of(obj) -> Caller | None:
    """The :class:`Caller` behind an op's first array, or None (CuPy in, CuPy out, CuPy's current
    stream): also None for anything :func:`as_cupy` will reject, so the rejection names the argument."""
    if _is_cupy(obj):
        return None
    if is_torch_tensor(obj):
        device = obj.device
        if device.type != "cuda":
            return None
        if device.index is None:
            import torch

            return Caller(TORCH, torch.cuda.current_device())
        return Caller(TORCH, device.index)
    if isinstance(obj, np.ndarray) or not (hasattr(obj, "__dlpack__") and hasattr(obj, "__array_namespace__")):
        return None
    where = _dlpack_device(obj, "the array")
    if where is None or where[0] not in CUDA_DLPACK_DEVICES:
        return None
    return Caller(ARRAY_API, where[1], obj.__array_namespace__())


class _StreamHandle:
    """A raw cudaStream_t behind the CUDA stream protocol (``__cuda_stream__``: (version, pointer)),
    what ``cupy.cuda.Stream.from_external`` wraps."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return 0, self.ptr


_cupy_streams: dict = {}


def cupy_stream(ptr: int, device_id: int):
    """A CuPy stream object on the CUDA stream ``ptr`` of ``device_id`` (made once per pair); 0 is the
    legacy default stream."""
    key = (device_id, ptr)
    stream = _cupy_streams.get(key)
    if stream is None:
        import cupy

        if ptr == 0:
            stream = cupy.cuda.Stream.null
        elif hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14 (ExternalStream is deprecated there)
            stream = cupy.cuda.Stream.from_external(_StreamHandle(ptr))  # used only inside Device(device_id)
        else:
            stream = cupy.cuda.ExternalStream(ptr, device_id)
        _cupy_streams[key] = stream
    return stream


@contextlib.contextmanager
def _torch_launch_context(device_id: int):
    import cupy
    import torch

    # torch's current device too: a tensor exports itself through DLPack only from its own device.
    with torch.cuda.device(device_id), cupy.cuda.Device(device_id):
        with cupy_stream(torch.cuda.current_stream(device_id).cuda_stream, device_id):
            yield


def launch_context(caller: Caller | None):
    """A context in which CuPy's current device and stream are the caller's: for a torch caller the
    tensor's device and ``torch.cuda.current_stream()`` of it, looked up on entry; otherwise CuPy's
    own (nothing changes)."""
    if caller is None or caller.kind != TORCH:
        return _NO_CONTEXT
    return _torch_launch_context(caller.device_id)


def to_caller(result, caller: Caller | None, given=None):
    """An op's CuPy ``result`` as the caller's kind, without a copy: ``given`` (the caller's own
    ``out``, already written) when there is one, a torch tensor for a torch caller, the caller's
    namespace's array for an array-API caller, else the CuPy array itself. Call it inside
    :func:`launch_context`, so the hand-over is ordered on the caller's stream."""
    if given is not None:
        return given
    if caller is None:
        return result
    if caller.kind == TORCH:
        import torch

        return torch.from_dlpack(result)
    return caller.namespace.from_dlpack(result)


def weight_to_caller(weight, caller: Caller | None):
    """A weight an op made (CuPy fields) with every field as the caller's kind (:func:`to_caller`)."""
    if caller is None:
        return weight
    return replace(weight, **{f: to_caller(getattr(weight, f), caller) for f in WEIGHT_FIELDS})

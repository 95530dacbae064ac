"""QuickLinear: the QUICK kernel as a torch ``nn.Module``, which a PyTorch model uses in place of AutoAWQ's
``WQLinear_GEMM`` (same features, same int4 weights, same fp16 result up to accumulation order).

This module imports torch (only its users need it; ``import quick_lab.model`` imports nothing). The
AutoAWQ tensors are interleaved into the QUICK layout once, when the layer is made (on the GPU with
:func:`quick_lab.core.ops.interleave_gpu` for CUDA tensors, in NumPy for CPU ones), and kept as registered
buffers, so ``.to()``, ``.cuda()`` and ``state_dict`` carry them like any layer's. ``forward`` calls
:func:`quick_lab.core.ops.quick_gemm` on zero-copy views, on torch's current stream. Inference only:
no gradient flows through the kernel.
"""
from __future__ import annotations

import torch

from quick_lab.core import interop, ops
from quick_lab.core.format import VALID_GROUP_SIZES, AWQWeight
from quick_lab.core.interleave import K_BLOCK, N_BLOCK, QuickWeight, interleave

__all__ = ["QuickLinear"]

_AWQ_MODULE_FIELDS = ("qweight", "qzeros", "scales", "group_size")


def _check_features(in_features, out_features, group_size) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features),
                        ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TypeError(f"{name} must be a positive int, got {value!r}")
    if group_size not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {VALID_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"in_features = {in_features} must be a multiple of group_size = {group_size}")
    if out_features % N_BLOCK:
        raise ValueError(f"out_features = {out_features} must be a multiple of {N_BLOCK} (the QUICK layout's "
                         f"column block)")


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)  # NumPy (host) or CuPy / any CUDA array interface (device), no copy
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor or an array, got {type(value).__name__}") from exc


def _interleaved(awq: AWQWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, qzeros, scales) in the QUICK layout, on the device of ``awq``'s tensors."""
    device = awq.qweight.device
    if device.type == "cuda":
        quick = ops.interleave_gpu(awq)  # tensors in, tensors out, on torch's current stream
        return quick.qweight, quick.qzeros, quick.scales
    host = AWQWeight(*(t.cpu().numpy() for t in (awq.qweight, awq.qzeros, awq.scales)), awq.group_size)
    quick = interleave(host)
    return tuple(torch.from_numpy(a).to(device) for a in (quick.qweight, quick.qzeros, quick.scales))


class QuickLinear(torch.nn.Module):
    """``y = x @ W + bias`` for ``x [..., in_features]`` -> ``y [..., out_features]`` (fp16), with W the
    int4 weight of an AutoAWQ ``WQLinear_GEMM`` in the QUICK layout.

    Buffers (the QUICK layout, :mod:`quick_lab.core.interleave`): ``qweight`` int32
    ``[in/16, 2 * out]``, ``qzeros`` int32 ``[in/G, out/8]``, ``scales`` fp16 ``[in/G, out]`` and
    ``bias`` fp16 ``[out]`` (or None). Make one with :meth:`from_awq` or :meth:`from_awq_module`; the
    constructor makes an empty layer to ``load_state_dict`` into.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = True,
                 device=None):
        super().__init__()
        _check_features(in_features, out_features, group_size)
        K, N, G = in_features, out_features, group_size
        self.in_features, self.out_features, self.group_size = K, N, G
        self.register_buffer("qweight", torch.zeros((K // K_BLOCK, 2 * N), dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros((K // G, N // 8), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros((K // G, N), dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=torch.float16, device=device) if bias else None)
        self._views = None  # (buffer identities, QuickWeight of CuPy views): see quick_weight()

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, group_size: int, bias=None) -> QuickLinear:
        """A layer from AutoAWQ ``WQLinear_GEMM`` tensors: int32 ``qweight [K, N/8]``, int32
        ``qzeros [K/G, N/8]``, fp16 ``scales [K/G, N]`` and an optional ``bias [N]``, all on one device
        (the layer's). The inputs are left as they are."""
        tensors = [_as_tensor(v, n) for v, n in ((qweight, "qweight"), (qzeros, "qzeros"), (scales, "scales"))]
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"qweight, qzeros and scales must be on one device, got {sorted(map(str, devices))}")
        awq = AWQWeight(*(t.contiguous() for t in tensors), group_size)  # checks group size, dtypes, shapes
        layer = cls(awq.K, awq.N, int(group_size), bias=bias is not None, device=awq.qweight.device)
        if bias is not None:
            bias = _as_tensor(bias, "bias")
            if tuple(bias.shape) != (awq.N,):
                raise ValueError(f"bias must have shape [N] = ({awq.N},), got {tuple(bias.shape)}")
            layer.bias.copy_(bias)
        for buffer, value in zip((layer.qweight, layer.qzeros, layer.scales), _interleaved(awq)):
            buffer.copy_(value)
        return layer

    @classmethod
    def from_awq_module(cls, module) -> QuickLinear:
        """A layer from an AutoAWQ ``WQLinear_GEMM`` (or any module with its ``qweight``, ``qzeros``,
        ``scales``, ``group_size``, ``bias`` and ``w_bit``)."""
        missing = [f for f in _AWQ_MODULE_FIELDS if not hasattr(module, f)]
        if missing:
            raise TypeError(f"module must be an AutoAWQ WQLinear_GEMM-like module (with "
                            f"{', '.join(_AWQ_MODULE_FIELDS)}); {type(module).__name__} has no {', '.join(missing)}")
        w_bit = getattr(module, "w_bit", 4)
        if w_bit != 4:
            raise ValueError(f"module.w_bit must be 4 (QUICK runs int4 weights), got {w_bit}")
        layer = cls.from_awq(module.qweight, module.qzeros, module.scales, module.group_size,
                             bias=getattr(module, "bias", None))
        for name in ("in_features", "out_features"):
            declared = getattr(module, name, None)
            if declared is not None and declared != getattr(layer, name):
                raise ValueError(f"module.{name} = {declared} disagrees with its tensors ({getattr(layer, name)})")
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

    def quick_weight(self) -> QuickWeight:
        """The buffers as a QuickWeight of CuPy views (no copy), made once and again only after a buffer
        is replaced (``.to()``, assignment): a forward pays no DLPack exchange for its weights."""
        buffers = (self.qweight, self.qzeros, self.scales)
        key = tuple((t.data_ptr(), t.device, t.dtype, t.shape) for t in buffers)
        if self._views is None or self._views[0] != key:
            if self.qweight.device.type != "cuda":
                raise RuntimeError(f"QuickLinear's buffers are on {self.qweight.device}; move the layer to a "
                                   f"CUDA device first (.cuda() or .to('cuda'))")
            if self.scales.dtype != torch.float16:
                raise TypeError(f"QuickLinear's scales must stay float16, got {self.scales.dtype} (was the model "
                                f"cast with .to(dtype)? cast it with .half())")
            with interop.launch_context(interop.caller_of(self.qweight)):
                self._views = key, interop.weight_as_cupy(QuickWeight(*buffers, self.group_size))
        return self._views[1]

    def _apply(self, *args, **kwargs):
        self._views = None  # the buffers are about to be replaced: let the old views (and memory) go
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_views"] = None  # CuPy views are not state (pickling one would copy it to the host)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., in_features] = [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        weight = self.quick_weight()
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float16:
            rows = rows.to(torch.float16)  # as WQLinear_GEMM does; the result goes back to x's dtype
        if not rows.is_contiguous() or rows.data_ptr() % 16:
            rows = rows.clone(memory_format=torch.contiguous_format)  # the kernels read rows in 16-byte loads
        out = torch.empty((rows.shape[0], self.out_features), dtype=torch.float16, device=rows.device)
        if rows.shape[0]:
            ops.quick_gemm(rows, weight, out=out)  # written in place, on torch's current stream
        if self.bias is not None:
            out += self.bias
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if x.dtype == torch.float16 else out.to(x.dtype)

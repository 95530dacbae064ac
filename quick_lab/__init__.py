"""quick_lab: a reproduction of QUICK (arXiv 2402.10076) W4A16 GEMM kernels.

Only the NumPy-only format helpers are imported here; GPU modules (``quick_lab.build.loader``,
``quick_lab.core.ops``, ...) import cupy and are loaded on demand.
"""

from quick_lab.core.format import (
    AWQ_ORDER,
    VALID_GROUP_SIZES,
    AWQWeight,
    dequantize,
    dequantize_fp16,
    pack_int4,
    quantize,
    quantize_awq,
    random_awq,
    reference_gemm,
    unpack_int4,
    validate_awq,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AWQ_ORDER",
    "VALID_GROUP_SIZES",
    "AWQWeight",
    "dequantize",
    "dequantize_fp16",
    "pack_int4",
    "quantize",
    "quantize_awq",
    "random_awq",
    "reference_gemm",
    "unpack_int4",
    "validate_awq",
]

"""Native (C) kernels for the one-token decode step: built on first use, torch when unavailable.

decode.c holds the kernels; build.py compiles and loads it; weights.py describes weights in its layouts;
step.py runs a whole decode step of a Transformer in one call.
"""

from .build import NativeBuildError, library
from .step import NativeDecoder
from .weights import (
           F32,
           F32T,
           Q4,
           Q8,
           NativeWeight,
           dequantize,
           enabled,
           fits,
           float_weight,
           matmul,
           q4_codes,
           q4_layout,
)

__all__ = ["F32", "F32T", "Q4", "Q8", "NativeBuildError", "NativeDecoder", "NativeWeight", "dequantize", "enabled",
           "fits", "float_weight", "library", "matmul", "q4_codes", "q4_layout"]

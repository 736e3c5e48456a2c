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
           Q4P,
           Q8,
           Q8P,
           NativeWeight,
           dequantize,
           enabled,
           fits,
           float_weight,
           matmul,
           pack_q4,
           pack_q8,
           packs,
           q4_codes,
           q4_layout,
           quantize_input,
           unpack_codes,
)

__all__ = ["F32", "F32T", "Q4", "Q4P", "Q8", "Q8P", "NativeBuildError", "NativeDecoder", "NativeWeight", "dequantize",
           "enabled", "fits", "float_weight", "library", "matmul", "pack_q4", "pack_q8", "packs", "q4_codes",
           "q4_layout", "quantize_input", "unpack_codes"]

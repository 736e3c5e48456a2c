"""int8 weight-only quantization: symmetric, one scale per output channel (row of a Linear weight).

Offline (the sharder, `edgefed quantize`) calls `quantize_rows`; at run time `Int8Linear` multiplies
activations by the int8 weight without materialising a float copy of it (torch's `_weight_int8pack_mm`
kernel, the one gpt-fast uses, fed bfloat16 activations), so a streamed int8 block costs a quarter of the
float32 bytes both on disk and in RAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_node.model.layout import LinearSpec
from edge_node.model.model import Linear

_QMAX = 127


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 weight (out, in), float32 scale (out,)) with w ~= q * scale[:, None]."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.ones(w.shape[0], dtype=torch.float32)
    if w.shape[1] == 0:  # a rank's empty slice (no attention heads): nothing to scale
        return q, scale
    for r in range(0, w.shape[0], 4096):  # row blocks: float temporaries stay small for big matrices
        x = w[r: r + 4096].float()
        s = x.abs().amax(dim=1).clamp(min=1e-12) / _QMAX  # (rows,)
        q[r: r + 4096] = torch.round(x / s[:, None]).clamp(-_QMAX, _QMAX).to(torch.int8)
        scale[r: r + 4096] = s
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.float()[:, None]).to(dtype)


def _has_int8_kernel() -> bool:
    try:
        x = torch.zeros(1, 8)
        torch._weight_int8pack_mm(x, torch.zeros(8, 8, dtype=torch.int8), torch.ones(8))
        return True
    except (AttributeError, RuntimeError):
        return False


_INT8_KERNEL = _has_int8_kernel()


class Int8Linear(nn.Module):
    """y = x (q * scale)^T + b for an int8 weight q (out, in) and per-row scales (out,)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.shape != (weight.shape[0],):
            raise ValueError(f"Int8Linear needs an int8 (out, in) weight and (out,) scales, got "
                             f"{weight.dtype} {list(weight.shape)} and {list(scale.shape)}")
        self.pad = -weight.shape[1] % 16  # the kernel needs in_features % 16 == 0 (it crashes otherwise)
        if self.pad:
            weight = F.pad(weight, (0, self.pad))  # zero columns: the product is unchanged
        if weight.data_ptr() % 64:  # the kernel reads the weight with aligned vector loads
            weight = weight.clone()
        self.qweight = nn.Parameter(weight, requires_grad=False)  # (out, in + pad)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._bf16: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight, for whoever needs plain values (ONNX export)."""
        return dequantize_rows(self.qweight[:, : self.qweight.shape[1] - self.pad], self.scale)

    def pack(self) -> None:
        """Nothing to reorder: the int8 kernel reads the plain layout (the float Linear's pack() is oneDNN's)."""

    def _scale_bf16(self) -> torch.Tensor:
        if self._bf16 is None:
            self._bf16 = self.scale.to(torch.bfloat16)
        return self._bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (B*S, in): the kernel takes 2-D activations
        if _INT8_KERNEL and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and self.qweight.shape[0]:
            # bfloat16 activations: on CPU this kernel is ~4x faster in bf16 than in float32 or float16,
            # and the rounding it adds (~0.5% relative) is of the order of the int8 weights' own error.
            xb = x2.to(torch.bfloat16)
            xb = (F.pad(xb, (0, self.pad)) if self.pad else xb).contiguous()
            y = torch._weight_int8pack_mm(xb, self.qweight, self._scale_bf16()).to(x.dtype)
        else:
            x2 = F.pad(x2, (0, self.pad)) if self.pad else x2
            y = F.linear(x2, dequantize_rows(self.qweight, self.scale, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, -1)  # (..., out)


def make_linear(weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> nn.Module:
    """Int8Linear for an int8 weight with its scales, else the float Linear."""
    return Linear(weight, bias) if scale is None else Int8Linear(weight, scale, bias)


def linear_factory(spec: LinearSpec, t: dict[str, torch.Tensor | None]) -> nn.Module:
    """A build_block linear factory for shard tensors: int8 where the file holds '<name>.scale'."""
    return make_linear(t[spec.name], t.get(spec.name + ".scale"), t.get(spec.bias))

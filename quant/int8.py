"""int8 weight-only quantization, two layouts.

Per row (shards, and `edgefed quantize --group-size -1`): symmetric, one float32 scale per output channel.
Offline code calls `quantize_rows`; at run time `Int8Linear` multiplies activations by the int8 weight without
materialising a float copy of it (torch's `_weight_int8pack_mm` kernel, the one gpt-fast uses, fed bfloat16
activations), so a streamed int8 block costs a quarter of the float32 bytes both on disk and in RAM.

Group-wise (`quantize_groups8`): asymmetric, a bfloat16 scale s and zero z per group of G input columns,
w ~= q * s + z with q in [-128, 127]. A model whose weights came from a group-wise 4-bit file (a Q4_1 GGUF) has
its weights on a per-group grid that one scale per row cannot follow; a per-group [min, max] range can.
`Int8GroupLinear` runs it on torch's group-wise int4 kernel: with u = q + 128 = 16 hi + lo (two nibbles),
    q * s + z = (hi - 8) * 16s + z  +  (lo - 8) * s + 8s
so the weight is an int4 weight over 2 * in columns (hi nibbles, then lo nibbles) whose groups have
(scale, zero) = (16s, z) and (s, 8s), all exact in bfloat16, and the product is [x, x] times it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_node.model import native
from edge_node.model.layout import LinearSpec
from edge_node.model.model import Linear

from .int4 import Int4Linear, pack_nibbles

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


def quantize_groups8(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 q (out, in), bf16 scales (out, in/G), bf16 zeros (out, in/G)), w ~= q*s + z.

    255 steps from the group's minimum (code -128): a group whose weights lie on a coarser grid from its minimum
    (a Q4_1 group: min + j * d) keeps them near that grid's points, which measured closer to float than steps
    centred on the group (perplexity 12.486 against 12.529, float 12.474, SmolLM2-135M-Instruct). s and z are
    rounded to bfloat16 before the codes are chosen (the kernel multiplies by exactly them); where that rounding
    pushes the group's top past code 127, the code clamps (an error of at most about one step).
    The caller checks that G divides `in`.

    scale_dtype=float32 or float16: each group takes whichever of two grids represents it with the smaller
    largest error: the asymmetric one above, or a symmetric one (s = max|w| / 127, z = 0: Q8_0's grid, which a
    weight imported from a Q8_0 file lies on exactly). float16 (Q8_0's own scale type) rounds s and z first and
    chooses the codes for the rounded values; it halves the bytes a token reads of them.
    """
    if scale_dtype in (torch.float32, torch.float16):
        return _quantize_groups8_best_grid(w, group_size, scale_dtype)
    out, cols = w.shape
    groups = cols // group_size
    q = torch.empty(out, cols, dtype=torch.int8)
    scales = torch.empty(out, groups, dtype=torch.bfloat16)
    zeros = torch.empty(out, groups, dtype=torch.bfloat16)
    for r in range(0, out, 4096):  # row blocks: float temporaries stay small for big matrices
        x = w[r: r + 4096].float().reshape(-1, groups, group_size)  # (rows, groups, G)
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)  # (rows, groups)
        s = ((hi - lo).clamp(min=1e-10) / 255).to(torch.bfloat16)
        z = (lo + 128 * s.float()).to(torch.bfloat16)  # code -128 at the group's minimum
        codes = torch.round((x - z.float()[..., None]) / s.float()[..., None]).clamp(-128, 127)
        q[r: r + 4096] = codes.reshape(x.shape[0], cols).to(torch.int8)
        scales[r: r + 4096], zeros[r: r + 4096] = s, z
    return q, scales, zeros


def _quantize_groups8_best_grid(w: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, cols = w.shape
    groups = cols // group_size
    q = torch.empty(out, cols, dtype=torch.int8)
    scales = torch.empty(out, groups, dtype=dtype)
    zeros = torch.empty(out, groups, dtype=dtype)
    tiny = 2.0 ** -24 if dtype == torch.float16 else 0.0  # float16's least step: no scale rounds to 0

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    for r in range(0, out, 4096):  # row blocks: float temporaries stay small for big matrices
        x = w[r: r + 4096].float().reshape(-1, groups, group_size)  # (rows, groups, G)
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)  # (rows, groups)
        sa = rounded((hi - lo).clamp(min=1e-10) / 255).clamp(min=tiny)
        za = rounded(lo + 128 * sa)  # code -128 at the group's minimum
        qa = torch.round((x - za[..., None]) / sa[..., None]).clamp(-128, 127)
        ss = rounded(x.abs().amax(dim=-1).clamp(min=1e-10) / _QMAX).clamp(min=tiny)
        qs = torch.round(x / ss[..., None]).clamp(-_QMAX, _QMAX)
        err_a = (qa * sa[..., None] + za[..., None] - x).abs().amax(dim=-1)
        err_s = (qs * ss[..., None] - x).abs().amax(dim=-1)
        sym = err_s <= err_a  # (rows, groups)
        q[r: r + 4096] = torch.where(sym[..., None], qs, qa).reshape(x.shape[0], cols).to(torch.int8)
        scales[r: r + 4096] = torch.where(sym, ss, sa)
        zeros[r: r + 4096] = torch.where(sym, torch.zeros_like(za), za)
    return q, scales, zeros


def dequantize_groups8(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) group-wise int8 codes stand for."""
    g = q.shape[1] // scales.shape[1]
    w = q.float() * scales.float().repeat_interleave(g, dim=1) + zeros.float().repeat_interleave(g, dim=1)
    return w.to(dtype)


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
        self.nw: native.NativeWeight | None = None  # the native kernels' view: the same codes, group = a row
        if weight.shape[0] and not self.pad and native.fits(weight.shape[1]) and native.enabled():
            b = None if bias is None else bias.float().contiguous()
            s = self.scale.data.float().reshape(-1, 1)
            if native.packs(*weight.shape, weight.shape[1]):  # regrouped for VNNI: the packed bytes replace q
                self.nw = native.pack_q8(weight, s, None, weight.shape[1], b)
                self.qweight = nn.Parameter(self.nw.data, requires_grad=False)
            else:
                self.nw = native.NativeWeight(native.Q8, weight.shape[0], weight.shape[1], self.qweight.data,
                                              weight.shape[1], s, None, b)

    def native_weight(self) -> native.NativeWeight | None:
        return self.nw

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight, for whoever needs plain values (ONNX export)."""
        if self.nw is not None and self.nw.kind == native.Q8P:
            return native.dequantize(self.nw)
        return dequantize_rows(self.qweight[:, : self.qweight.shape[1] - self.pad], self.scale)

    def pack(self) -> None:
        """Nothing to reorder: the int8 kernel reads the plain layout (the float Linear's pack() is oneDNN's)."""

    def _scale_bf16(self) -> torch.Tensor:
        if self._bf16 is None:
            self._bf16 = self.scale.to(torch.bfloat16)
        return self._bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nw is not None:
            return native.matmul(self.nw, x)  # float32 accumulation, bias included (packed: int8-rounded inputs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (B*S, in): the kernel takes 2-D activations
        if _INT8_KERNEL and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and self.qweight.shape[0]:
            # bfloat16 activations: on CPU this kernel is ~4x faster in bf16 than in float32 or float16,
            # and the rounding it adds (~0.5% relative) is of the order of the int8 weights' own error.
            xb = x2.to(torch.bfloat16)
            if self.pad:
                xb = F.pad(xb, (0, self.pad))
            if not xb.is_contiguous():  # a decode step's activations are: no extra op per linear
                xb = xb.contiguous()
            y = torch._weight_int8pack_mm(xb, self.qweight, self._scale_bf16()).to(x.dtype)
        else:
            x2 = F.pad(x2, (0, self.pad)) if self.pad else x2
            y = F.linear(x2, dequantize_rows(self.qweight, self.scale, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, -1)  # (..., out)


class Int8GroupLinear(nn.Module):
    """y = x W^T + b for a group-wise int8 weight (q, scales, zeros as `quantize_groups8` makes them), run as an
    int4 weight over [x, x] (see the module docstring): the same bytes per weight as int8, group-wise scales."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        out, cols = weight.shape
        if weight.dtype != torch.int8 or scales.shape != zeros.shape or scales.shape[0] != out \
                or scales.shape[1] == 0 or cols % scales.shape[1]:
            raise ValueError(f"Int8GroupLinear needs an int8 (out, in) weight and (out, groups) scales and zeros, "
                             f"got {weight.dtype} {list(weight.shape)}, {list(scales.shape)} and {list(zeros.shape)}")
        self.in_features = cols
        self.nw: native.NativeWeight | None = None
        group = cols // scales.shape[1]
        if out and native.fits(cols, group) and native.enabled():  # the codes as they are, float32 scales
            b = None if bias is None else bias.float().contiguous()
            if native.packs(out, cols, group):  # regrouped for VNNI (symmetric groups: no zeros to add)
                self.nw = native.pack_q8(weight, scales, zeros if zeros.any() else None, group, b)
                self.q = nn.Parameter(self.nw.data, requires_grad=False)
                self.scales = nn.Parameter(self.nw.scales, requires_grad=False)
                self.zeros = None if self.nw.zeros is None else nn.Parameter(self.nw.zeros, requires_grad=False)
                return
            self.q = nn.Parameter(weight, requires_grad=False)
            self.scales = nn.Parameter(scales.float(), requires_grad=False)
            self.zeros = nn.Parameter(zeros.float(), requires_grad=False)
            self.nw = native.NativeWeight(native.Q8, out, cols, self.q.data, group, self.scales.data,
                                          self.zeros.data, b)
            return
        codes = torch.empty(out, cols, dtype=torch.uint8)  # (out, 2 * in) nibbles, two a byte; allocated first,
        for r in range(0, out, 1024):  # below the row chunks' small int32 temporaries (no fragmented heap)
            u = weight[r: r + 1024].to(torch.int32) + 128  # (rows, in) in [0, 255]
            codes[r: r + 1024] = pack_nibbles(torch.cat([u >> 4, u & 15], dim=1))
        s = scales.to(torch.bfloat16)
        self.inner = Int4Linear(codes, torch.cat([s * 16, s], dim=1),  # (out, 2 * groups): hi groups, lo groups
                                torch.cat([zeros.to(torch.bfloat16), s * 8], dim=1), bias)

    def native_weight(self) -> native.NativeWeight | None:
        return self.nw

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight: the hi and lo halves' sum."""
        if self.nw is not None:
            return native.dequantize(self.nw)
        w = self.inner.weight  # (out, 2 * in)
        return w[:, : self.in_features] + w[:, self.in_features:]

    def pack(self) -> None:
        """Already in the kernel's layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nw is not None:
            return native.matmul(self.nw, x)  # the group-wise codes directly, float32 accumulation
        return self.inner(torch.cat([x, x], dim=-1))  # (..., 2 * in) -> (..., out)


def make_linear(weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> nn.Module:
    """Int8Linear for an int8 weight with its scales, else the float Linear."""
    return Linear(weight, bias) if scale is None else Int8Linear(weight, scale, bias)


def linear_factory(spec: LinearSpec, t: dict[str, torch.Tensor | None]) -> nn.Module:
    """A build_block linear factory for shard tensors: int8 where the file holds '<name>.scale'."""
    return make_linear(t[spec.name], t.get(spec.name + ".scale"), t.get(spec.bias))

"""int4 weight-only quantization: asymmetric, group-wise along the input dimension.

Each group of G consecutive input columns of a row has a scale s and offset z, and 4-bit codes q in
[0, 15] with w ~= (q - 8) * s + z (z is the value of the middle code: gpt-fast's convention, the one
torch's int4 kernel computes). s and z are bfloat16, chosen before the codes: the kernel takes them in
its activation dtype, so the weights it multiplies by are exactly the stored ones. On disk the codes are
plain bytes, two per byte along the input dimension (column 2j in the low nibble of byte j, column 2j + 1
in the high one): the kernel's own tile layout depends on the CPU and the torch version, so `Int4Linear`
repacks at load time: to the native kernels' layout where they are built (edge_node.model.native: float32
accumulation; packed for AVX512-VNNI, inputs rounded to two int8 levels), else to torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_node.model import native

GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
_MAX = 15
_MID = 8
_ROWS = 4096  # row chunk of the offline conversion: temporaries stay small
_TILE_ROWS = 1024  # row chunk of the load-time conversion


def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (codes uint8 (out, in/2), scales bf16 (out, in/G), zeros bf16 (out, in/G)).

    Asymmetric: each group's [min, max] spans the 16 codes. The caller checks that G divides `in` (and names
    the tensor when it does not).
    """
    out, cols = w.shape
    groups = cols // group_size
    codes = torch.empty(out, cols // 2, dtype=torch.uint8)
    scales = torch.empty(out, groups, dtype=torch.bfloat16)
    zeros = torch.empty(out, groups, dtype=torch.bfloat16)
    for r in range(0, out, _ROWS):
        x = w[r: r + _ROWS].float().reshape(-1, groups, group_size)  # (rows, groups, G)
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)  # (rows, groups)
        s = ((hi - lo).clamp(min=1e-6) / _MAX).to(torch.bfloat16)
        z = (lo + _MID * s.float()).to(torch.bfloat16)
        q = torch.round((x - z.float()[..., None]) / s.float()[..., None]) + _MID
        codes[r: r + _ROWS] = pack_nibbles(q.clamp(0, _MAX).reshape(x.shape[0], cols))
        scales[r: r + _ROWS], zeros[r: r + _ROWS] = s, z
    return codes, scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15] -> (out, in/2) uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) int32 codes in [0, 15]."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)  # (out, in/2, 2) -> (out, in)


def _unpacked(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) uint8 codes in [0, 15], a row chunk at a time (no int32 copy of it all)."""
    out = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.uint8)
    for r in range(0, packed.shape[0], _TILE_ROWS):
        out[r: r + _TILE_ROWS] = unpack_nibbles(packed[r: r + _TILE_ROWS])
    return out


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) the codes stand for."""
    g = codes.shape[1] * 2 // scales.shape[1]
    q = unpack_nibbles(codes).float()
    w = (q - _MID) * scales.float().repeat_interleave(g, dim=1) + zeros.float().repeat_interleave(g, dim=1)
    return w.to(dtype)


def _kernel_works() -> bool:
    try:
        w = torch._convert_weight_to_int4pack_for_cpu(torch.zeros(16, 64, dtype=torch.int32), 1)
        torch._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), w, 32,
                                          torch.zeros(2, 16, 2, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError):
        return False


_INT4_KERNEL = _kernel_works()


def _kernel_layout(codes: torch.Tensor) -> torch.Tensor:
    """Plain (N, K/2) codes -> the kernel's packed tiles (also (N, K/2) uint8), converted in row chunks: the
    tiles never span more rows than a chunk (1024, a multiple of every tile height), so the result equals one
    whole conversion, and the int32 temporary stays small (the whole (vocab, hidden) head would cost 4 bytes a
    weight). The output is allocated first, below the temporaries, so freeing them fragments no memory."""
    out = torch.empty_like(codes)
    for r in range(0, codes.shape[0], _TILE_ROWS):
        out[r: r + _TILE_ROWS] = torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(codes[r: r + _TILE_ROWS]), 1)
    return out


class Int4Linear(nn.Module):
    """y = x W^T + b for a group-wise int4 weight W (codes, scales, zeros as `quantize_groups` makes them).

    Runs torch's `_weight_int4pack_mm_for_cpu` on bfloat16 activations (in float32 it is ~20x slower on
    CPU); without the kernel, a dequantized float matmul.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        out, half = codes.shape
        if codes.dtype != torch.uint8 or scales.shape != zeros.shape or scales.shape[0] != out \
                or scales.shape[1] == 0 or 2 * half % scales.shape[1]:
            raise ValueError(f"Int4Linear needs uint8 (out, in/2) codes and (out, groups) scales and zeros, got "
                             f"{codes.dtype} {list(codes.shape)}, {list(scales.shape)} and {list(zeros.shape)}")
        self.out_features, self.in_features = out, 2 * half
        self.group_size = self.in_features // scales.shape[1]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.nw: native.NativeWeight | None = None
        if out and native.fits(self.in_features, self.group_size) and native.enabled():
            self._to_native(codes, scales, zeros)
            self.use_kernel = False
            return
        self.use_kernel = _INT4_KERNEL and self.group_size in GROUP_SIZES
        if self.use_kernel:
            pad = -out % 16  # the kernel takes N in multiples of 16: zero rows, cut from the output
            if pad:
                codes, scales, zeros = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scales, zeros))
            sz = torch.empty(scales.shape[1], out + pad, 2, dtype=torch.bfloat16)  # (groups, N, 2): the kernel's
            sz[..., 0], sz[..., 1] = scales.t(), zeros.t()  # scales and zeros, in its activation dtype
            self.scales_and_zeros = nn.Parameter(sz, requires_grad=False)
            self.packed = nn.Parameter(_kernel_layout(codes), requires_grad=False)
        else:
            self.codes = nn.Parameter(codes, requires_grad=False)
            self.scales = nn.Parameter(scales, requires_grad=False)
            self.zeros = nn.Parameter(zeros, requires_grad=False)

    def _to_native(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """The native kernels' layout (edge_node.model.native). Packed (AVX512-VNNI): codes regrouped per 16 rows,
        the stored bfloat16 scales and zeros. Plain: codes regrouped per 32-column block, float32 scales, and
        zeros holding z - 8 s, so that w = q s + zero. The same float weight either way."""
        b = None if self.bias is None else self.bias.data.float().contiguous()
        if native.packs(self.out_features, self.in_features, self.group_size):  # regrouped for VNNI
            self.nw = native.pack_q4(_unpacked(codes), scales, zeros, self.group_size, b)  # w = (q - 8) s + z
            self.packed = nn.Parameter(self.nw.data, requires_grad=False)
            self.scales = nn.Parameter(self.nw.scales, requires_grad=False)
            self.zeros = nn.Parameter(self.nw.zeros, requires_grad=False)
            return
        s = scales.float()
        packed = torch.empty_like(codes)  # (out, in/2), allocated before the row chunks' temporaries
        for r in range(0, codes.shape[0], _TILE_ROWS):
            packed[r: r + _TILE_ROWS] = native.q4_layout(unpack_nibbles(codes[r: r + _TILE_ROWS]))
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales = nn.Parameter(s, requires_grad=False)
        self.zeros = nn.Parameter(zeros.float() - _MID * s, requires_grad=False)
        self.nw = native.NativeWeight(native.Q4, self.out_features, self.in_features, self.packed.data,
                                      self.group_size, self.scales.data, self.zeros.data, b)

    def native_weight(self) -> native.NativeWeight | None:
        """The weight in the native kernels' layout (None where torch's kernel or the dequantized path runs it)."""
        return self.nw

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight, for whoever needs plain values (ONNX export)."""
        if self.nw is not None:
            return native.dequantize(self.nw)
        if not self.use_kernel:
            return dequantize_groups(self.codes, self.scales, self.zeros)
        # The kernel applied to the identity in float32: W^T, exactly (the codes live in its tiles only).
        eye = torch.eye(self.in_features)
        wt = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros.float())
        return wt[:, : self.out_features].t().float().contiguous()

    def pack(self) -> None:
        """Already in the kernel's layout (the float Linear's pack() reorders for oneDNN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nw is not None:
            return native.matmul(self.nw, x)  # float32 accumulation, bias included (packed: int8-rounded inputs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (B*S, in): the kernel takes 2-D activations
        if self.use_kernel:
            xb = x2.to(torch.bfloat16)
            if not xb.is_contiguous():  # a decode step's activations are: no extra op per linear
                xb = xb.contiguous()
            y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.scales_and_zeros)
            if y.shape[1] != self.out_features:  # rows padded to the kernel's multiple of 16
                y = y[:, : self.out_features]
            y = y.to(x.dtype)
        else:
            y = F.linear(x2, dequantize_groups(self.codes, self.scales, self.zeros, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, -1)  # (..., out)

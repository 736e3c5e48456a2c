"""Weights in the layouts decode.c reads, and a matmul over them.

A `NativeWeight` is a view of tensors some module already holds (no copy): float32 row-major or column-major,
or int8 / int4 codes with float32 scales (and zeros) per group of input columns. Modules that can describe
their weight this way expose `native_weight() -> NativeWeight | None`.

Where the CPU has AVX512-VNNI, quantized weights are kept *packed* (`pack_q8`, `pack_q4`): codes regrouped per
16 output rows for vpdpbusd. A one-token product then rounds its input to two levels of int8 per block of 32
(x ~ q d + q2 d2: ~16 bits, where llama.cpp's Q8_0 activations keep one level) and multiplies in int32:
`quantize_input` is that rounding in torch, for references. Prompts round every token the same way and run an
int8 GEMM over the same layout (each weight vector loaded once for 4 tokens), so a prompt and a decode step of a
quantized model compute the same function.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch

from .build import EfLinear, library

F32, Q8, Q4, F32T, Q8P, Q4P = 0, 1, 2, 3, 4, 5
PACK_ROWS = 16  # output rows per packed block
_SDTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # decode.c's EF_S_*: packed scale storage
BLOCK = 32  # columns per SIMD block: every native weight's in_features and group size are multiples of it
_SPIN_US = int(os.environ.get("EDGEFED_NATIVE_SPIN_US", "300"))  # how long idle workers spin before sleeping
_started = (0, 0)  # (pid, threads started): a forked child starts its own


def enabled() -> bool:
    """Native kernels are built and loaded (EDGEFED_NATIVE is not 0, a compiler was found)."""
    return library() is not None


def threads() -> int:
    """Threads a native call uses: torch's setting, so `--threads` governs both."""
    global _started
    n = max(1, torch.get_num_threads())
    pid, started = _started
    if n > started or pid != os.getpid():
        _started = os.getpid(), library().ef_threads_start(n, _SPIN_US)
    return min(n, _started[1])


def packs(rows: int, cols: int, group: int) -> bool:
    """Whether a quantized (rows, cols) weight with `group` columns per scale gets the packed layout here."""
    if os.environ.get("EDGEFED_NATIVE_PACK", "1").strip().lower() in ("0", "off", "false", "no"):
        return False  # the plain layouts: float32 inputs to every product (slower, no input rounding)
    return enabled() and bool(library().ef_has_vnni()) and rows > 0 and rows % PACK_ROWS == 0 and fits(cols, group)


def fits(cols: int, group: int | None = None) -> bool:
    """Whether in_features `cols` (and a group size) suit the kernels' 32-column blocks."""
    return cols > 0 and cols % BLOCK == 0 and (group is None or group % BLOCK == 0 and cols % group == 0)


@dataclass(frozen=True)
class NativeWeight:
    kind: int  # F32 | Q8 | Q4 | F32T | Q8P | Q4P
    rows: int
    cols: int
    data: torch.Tensor  # F32 (rows, stride) | F32T (cols, stride) float32; Q8 (rows, stride) int8; Q4 (rows, cols/2)
    #                     Q8P (rows/16, 16 cols) | Q4P (rows/16, 8 cols) uint8
    group: int = 0  # input columns per scale (Q8, Q4)
    scales: torch.Tensor | None = None  # (rows, cols / group) float32; packed: (rows / 16, cols / group * 16)
    #                                    in float32, bfloat16 or float16 (kept as the checkpoint stores them)
    zeros: torch.Tensor | None = None  # as scales, or None (symmetric)
    bias: torch.Tensor | None = None  # (rows,) float32

    @functools.cached_property
    def _struct(self) -> EfLinear:
        return self.struct()

    def struct(self) -> EfLinear:
        """The C descriptor (pointers into the tensors: keep this object alive while it is used)."""
        for t in (self.data, self.scales, self.zeros, self.bias):
            if t is not None and (t.stride(-1) != 1 or t.dim() == 2 and t.stride(0) < t.shape[1]):
                raise ValueError("native weights must be row-contiguous")

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        sdtype = _SDTYPES[self.scales.dtype] if self.kind in (Q8P, Q4P) else 0
        return EfLinear(self.kind, self.rows, self.cols, self.group, sdtype, 0, self.data.stride(0), ptr(self.data),
                        ptr(self.scales), ptr(self.zeros), ptr(self.bias))


def float_weight(w: torch.Tensor, bias: torch.Tensor | None = None) -> NativeWeight | None:
    """A float32 (out, in) weight, row-major or column-major (a transposed contiguous tensor)."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[0] == 0 or not fits(w.shape[1]):
        return None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    if w.stride(1) == 1 and w.stride(0) >= w.shape[1]:
        return NativeWeight(F32, w.shape[0], w.shape[1], w, bias=bias)
    if w.stride(0) == 1 and w.stride(1) >= w.shape[0]:
        return NativeWeight(F32T, w.shape[0], w.shape[1], w.t(), bias=bias)
    return None


GEMM_TOKENS = 16  # from this many rows on, blocks of plain quantized weight rows are dequantized for torch's GEMM
_BLOCK_FLOATS = 1 << 22  # 16 MB: the dequantized block's bound


def matmul(weight: NativeWeight, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ W^T (+ bias) -> (..., out) in float32 accumulation, returned in x's dtype."""
    x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    t = x2.numel() // weight.cols  # tokens
    if t >= GEMM_TOKENS and weight.kind in (Q8, Q4):
        y = _blocked_gemm(weight, x2.view(t, weight.cols)).view(*x.shape[:-1], weight.rows)
    else:
        y = torch.empty((*x.shape[:-1], weight.rows), dtype=torch.float32)  # the one op of a decode step's linear
        if t and library().ef_matmul(ctypes.byref(weight._struct), x2.data_ptr(), y.data_ptr(), t, threads()):
            raise MemoryError("native matmul: out of memory for its buffers")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _blocked_gemm(weight: NativeWeight, x2: torch.Tensor) -> torch.Tensor:
    """A prompt's (T, in) rows against a quantized weight: float32 blocks of weight rows, dequantized natively,
    through torch's float GEMM (oneDNN's speed; the dequantization is paid once per T tokens)."""
    y = torch.empty(x2.shape[0], weight.rows, dtype=torch.float32)  # (T, out)
    step = max(16, _BLOCK_FLOATS // weight.cols)
    buf = torch.empty(min(step, weight.rows), weight.cols, dtype=torch.float32)
    desc, lib, n = weight.struct(), library(), threads()
    for r0 in range(0, weight.rows, step):
        r1 = min(r0 + step, weight.rows)
        lib.ef_dequant(ctypes.byref(desc), r0, r1, buf.data_ptr(), n)
        y[:, r0:r1] = x2 @ buf[: r1 - r0].t()  # (T, rows of the block)
    return y if weight.bias is None else y.add_(weight.bias)


def dequantize(weight: NativeWeight) -> torch.Tensor:
    """The (out, in) float32 weight a NativeWeight stands for (a plain-torch reference: tests, export)."""
    if weight.kind == F32:
        return weight.data[:, : weight.cols].clone()
    if weight.kind == F32T:
        return weight.data[:, : weight.rows].t().contiguous()
    if weight.kind in (Q8P, Q4P):
        q = unpack_codes(weight).float() - (8 if weight.kind == Q4P else 0)
        scales, zeros = (None if t is None else _unblock(t, weight.rows).float() for t in (weight.scales, weight.zeros))
    else:
        q = weight.data[:, : weight.cols].float() if weight.kind == Q8 else q4_codes(weight.data).float()
        scales, zeros = weight.scales, weight.zeros
    w = q * scales.repeat_interleave(weight.group, dim=1)
    return w if zeros is None else w + zeros.repeat_interleave(weight.group, dim=1)


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """(rows, groups) scales or zeros -> the packed layout (rows / 16, groups * 16): 16 rows' values together,
    in bfloat16 or float16 where they are stored so (half the bytes a token reads of them), else float32."""
    if t.dtype not in _SDTYPES:
        t = t.float()
    rows, groups = t.shape
    return t.reshape(rows // PACK_ROWS, PACK_ROWS, groups).transpose(1, 2).reshape(rows // PACK_ROWS, -1).contiguous()


def _unblock(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.reshape(rows // PACK_ROWS, -1, PACK_ROWS).transpose(1, 2).reshape(rows, -1)


def pack_q8(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
            bias: torch.Tensor | None = None) -> NativeWeight:
    """int8 codes (rows, cols) with float32 (rows, cols / group) scales (and zeros) -> a packed Q8P weight: bytes
    q + 128, for each 16-row block the columns in groups of 4 (one 64-byte vector holds 4 columns of 16 rows)."""
    rows, cols = codes.shape
    data = torch.empty(rows // PACK_ROWS, PACK_ROWS * cols, dtype=torch.uint8)  # before the chunks' temporaries
    for r in range(0, rows, 1024):
        u = (codes[r: r + 1024].to(torch.int16) + 128).to(torch.uint8)  # (n, cols)
        u = u.reshape(-1, PACK_ROWS, cols // 4, 4).transpose(1, 2)  # (blocks, cols / 4, 16, 4)
        data[r // PACK_ROWS: (r + u.shape[0] * PACK_ROWS) // PACK_ROWS] = u.reshape(u.shape[0], -1)
    if zeros is not None and zeros.dtype != scales.dtype:
        scales, zeros = scales.float(), zeros.float()
    return NativeWeight(Q8P, rows, cols, data, group, _blocks(scales), None if zeros is None else _blocks(zeros), bias)


def pack_q4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
            bias: torch.Tensor | None = None) -> NativeWeight:
    """int4 codes (rows, cols) in [0, 15] (w = (q - 8) s + z) -> a packed Q4P weight: for each 16-row block, the
    columns in groups of 8; byte j of a row's 4 holds column j (low nibble) and column j + 4 (high nibble)."""
    rows, cols = codes.shape
    data = torch.empty(rows // PACK_ROWS, PACK_ROWS * cols // 2, dtype=torch.uint8)
    for r in range(0, rows, 1024):
        c = codes[r: r + 1024].to(torch.uint8).reshape(-1, PACK_ROWS, cols // 8, 2, 4)
        u = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).transpose(1, 2)  # (blocks, cols / 8, 16, 4)
        data[r // PACK_ROWS: (r + u.shape[0] * PACK_ROWS) // PACK_ROWS] = u.reshape(u.shape[0], -1)
    if zeros.dtype != scales.dtype:
        scales, zeros = scales.float(), zeros.float()
    return NativeWeight(Q4P, rows, cols, data, group, _blocks(scales), _blocks(zeros), bias)


def unpack_codes(weight: NativeWeight) -> torch.Tensor:
    """A packed weight's codes (rows, cols) as int32: int8 codes (Q8P) or int4 codes in [0, 15] (Q4P)."""
    nb, rows, cols = weight.rows // PACK_ROWS, weight.rows, weight.cols
    if weight.kind == Q8P:
        u = weight.data.reshape(nb, cols // 4, PACK_ROWS, 4).transpose(1, 2).reshape(rows, cols)
        return u.to(torch.int32) - 128
    u = weight.data.reshape(nb, cols // 8, PACK_ROWS, 4).transpose(1, 2)  # (blocks, 16, cols / 8, 4)
    return torch.stack([u & 0x0F, u >> 4], dim=3).reshape(rows, cols).to(torch.int32)


def quantize_input(x: torch.Tensor) -> torch.Tensor:
    """The values a packed one-token product multiplies, in float64: x (..., cols) in two int8 levels per block
    of 32, x ~ q d + q2 d2, as decode.c rounds them (d = max|x| / 127, q = round-half-even(x * (127 / max|x|)),
    and q2, d2 the same for the remainder x - q d)."""

    def level(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # float32 (..., blocks, 32)
        amax = v.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        return (v * inv).round(), amax / 127.0

    b = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    q, d = level(b)
    r = (b.double() - q.double() * d.double()).float()  # exact difference, one rounding (decode.c's fmaf)
    q2, d2 = level(r)
    return (q.double() * d.double() + q2.double() * d2.double()).reshape(x.shape)


def q4_layout(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in [0, 15] -> decode.c's int4 layout (out, in/2) uint8: in each 32-column block, byte j
    holds column j (low nibble) and column j + 16 (high nibble), so one 16-byte load yields two 16-lane halves."""
    out, cols = codes.shape
    blocks = codes.to(torch.uint8).reshape(out, cols // BLOCK, 2, BLOCK // 2)  # (out, blocks, half, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, cols // 2)


def q4_codes(packed: torch.Tensor) -> torch.Tensor:
    """decode.c's int4 layout (out, in/2) -> codes (out, in) int32 in [0, 15]."""
    out, half = packed.shape
    blocks = packed.reshape(out, half // (BLOCK // 2), 1, BLOCK // 2)  # (out, blocks, 1, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(out, 2 * half).to(torch.int32)

"""Rotary position embeddings (rotate-half layout, as HF Llama-family checkpoints store q/k)."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies in float32, with llama3 / linear scaling applied."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind != "llama3":
        return inv
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_ctx = rope.original_max_position_embeddings
    low_wavelen = old_ctx / rope.low_freq_factor
    high_wavelen = old_ctx / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryTable:
    """cos/sin rows per position, grown on demand (float32 math, cast to the compute dtype)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        self.inv = inv_frequencies(config.rope, config.head_dim)
        self.dtype = dtype
        self.limit = config.max_position_embeddings
        self.cos = self.sin = torch.empty(0, config.head_dim, dtype=dtype)

    def _grow(self, n: int) -> None:
        n = min(max(n, 2 * self.cos.shape[0], 256), max(self.limit, n))
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv)  # (n, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def at(self, pos0: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (length, D), for positions [pos0, pos0 + length)."""
        if pos0 + length > self.cos.shape[0]:
            self._grow(pos0 + length)
        return self.cos[pos0 : pos0 + length], self.sin[pos0 : pos0 + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, D); cos/sin: (S, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

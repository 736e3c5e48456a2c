"""KV cache: one preallocated K and V buffer per layer, keyed by absolute layer index.

Keyed by layer index so that an edge part [0, k) and a cloud part [k, L) each keep just
their own layers, and a tensor-parallel rank keeps just its KV-head slice.
"""

from __future__ import annotations

import torch

from .errors import EdgefedError

_STEP = 256  # grow capacity in steps so decode does not reallocate every token


class KVPositionError(EdgefedError):
    """A write into the KV cache at a position other than the layer's current length."""


class LayerKV:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, limit: int, index: int = 0):
        self.index = index
        self.shape = (batch, kv_heads, head_dim)
        self.dtype, self.limit = dtype, limit
        self.k = self.v = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype)
        self.length = 0

    def reserve(self, n: int) -> None:
        """Room for n positions (doubling growth); the held positions are kept."""
        if n <= self.k.shape[2]:
            return
        cap = min(max(n, self.k.shape[2] * 2, _STEP), max(self.limit, n))
        b, h, d = self.shape
        k, v = torch.empty(b, h, cap, d, dtype=self.dtype), torch.empty(b, h, cap, d, dtype=self.dtype)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def update(self, pos0: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, S, D) at [pos0, pos0+S); return all keys/values up to pos0+S.

        pos0 must be the layer's current length: a gap would leave uninitialised slots that later
        queries attend over, an overlap would silently overwrite what earlier queries saw. Layers may
        differ in length (deep layers lag behind an early exit), so each checks its own.
        """
        if pos0 != self.length:
            raise KVPositionError(f"KV cache of layer {self.index}: write at position {pos0}, but the layer "
                                  f"holds {self.length} tokens (writes must append at its length)")
        end = pos0 + k.shape[2]
        self.reserve(end)
        self.k[:, :, pos0:end] = k
        self.v[:, :, pos0:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVCache:
    def __init__(self, batch: int = 1, dtype: torch.dtype = torch.float32, limit: int = 1 << 30):
        self.batch, self.dtype, self.limit = batch, dtype, limit
        self.layers: dict[int, LayerKV] = {}

    def layer(self, index: int, kv_heads: int, head_dim: int) -> LayerKV:
        kv = self.layers.get(index)
        if kv is None:
            kv = self.layers[index] = LayerKV(self.batch, kv_heads, head_dim, self.dtype, self.limit, index)
        return kv

    def length(self, layer: int) -> int:
        """Tokens layer `layer` holds (0 for a layer never written)."""
        kv = self.layers.get(layer)
        return 0 if kv is None else kv.length

    @property
    def lengths(self) -> dict[int, int]:
        """Each layer's own length: with early exit, deep layers lag behind shallow ones."""
        return {i: kv.length for i, kv in sorted(self.layers.items())}

    def truncate(self, length: int) -> None:
        """Forget everything at positions >= length (the buffers are reused)."""
        for kv in self.layers.values():
            kv.length = min(kv.length, length)

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.layers.values())


def kv_bytes_per_token(kv_heads: int, head_dim: int, layers: int, dtype: torch.dtype) -> int:
    """Bytes one token adds to a cache over `layers` layers of `kv_heads` heads."""
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

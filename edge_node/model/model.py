"""Llama-family decoder math over a half-open layer range [start, end).

Pure math: no ranks, sockets or disks. A tensor-parallel rank's blocks are the same
Block with fewer heads and MLP columns; it passes `reduce` (an allreduce) to sum the
partial outputs of o_proj and down_proj. Modules are built around tensors that were
already loaded, so no random weights are ever allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .config import ModelConfig
from .kv_cache import KVCache
from .rope import RotaryTable

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Module):
    """y = x W^T + b around given tensors (no init).

    `pack()` reorders W into oneDNN's blocked layout: on x86 that runs one-token matmuls
    about 1.5x and prompt matmuls about 2x faster than the plain layout (benchmarks/README.md).
    The packed tensor is opaque, so `.weight` unpacks a copy for whoever needs plain values.
    Where the native kernels are built (edge_node.model.native), `pack()` keeps the plain float32 layout
    instead: the native decode step reads it, and one-row inputs run on the native GEMV.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.w = nn.Parameter(weight, requires_grad=False)  # (out, in)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed: torch.Tensor | None = None
        self.native_on = False  # pack() chose the native kernels for this weight
        self._native: native.NativeWeight | None = None

    @property
    def weight(self) -> torch.Tensor:
        """(out, in), as stored in checkpoints."""
        return self.w if self.packed is None else self.packed.to_dense()

    def native_weight(self) -> native.NativeWeight | None:
        """The plain float32 weight as the native kernels read it (None when packed for oneDNN, or another dtype)."""
        if self.packed is not None:
            return None
        nw = self._native  # a view of w: rebuilt when w was replaced (an adapter merged into it)
        if nw is None or nw.data.data_ptr() != self.w.data_ptr():
            nw = self._native = native.float_weight(self.w.data, None if self.bias is None else self.bias.data)
        return nw

    def pack(self) -> None:
        if self.packed is not None or self.native_on:
            return
        if native.enabled() and self.native_weight() is not None:
            self.native_on = True
            return
        if onednn_available() and self.w.dtype in (torch.float32, torch.bfloat16):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w.data, None)
            self.w = None  # the packed copy replaces it: no second copy of the weights stays resident

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_on and x.numel() == x.shape[-1] and x.dtype == torch.float32:
            return native.matmul(self.native_weight(), x)  # one row: the native GEMV (oneDNN's is not used here)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op: the reference's math in float32
        # Normalise in float32 (as the reference does), scale in the compute dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention over `heads` query and `kv_heads` KV heads (all, or a rank's slice)."""

    def __init__(self, wqkv: Linear, wo: Linear, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.wqkv, self.wo = wqkv, wo
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def forward(self, x, cos, sin, kv, pos0: int, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        d, h, hkv = self.head_dim, self.heads, self.kv_heads
        qkv = self.wqkv(x)  # (B, S, (H + 2 Hkv) D)
        # q and k lie side by side in the fused output: one rotation turns both (cos/sin broadcast over heads)
        qk = _rotate(qkv[..., : (h + hkv) * d].view(b, s, h + hkv, d), cos, sin)  # (B, S, H + Hkv, D)
        k = qk[:, :, h:].transpose(1, 2)  # (B, Hkv, S, D)
        v = qkv[..., (h + hkv) * d:].view(b, s, hkv, d).transpose(1, 2)
        k, v = kv.update(pos0, k, v)  # (B, Hkv, T, D), T = pos0 + S
        if s == 1 and mask is None:
            y = _one_query_attention(qk[:, 0, :h], k, v)  # (B, 1, H*D)
        else:
            causal = mask is None and s > 1
            q = qk[:, :, :h].transpose(1, 2)  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            y = y.transpose(1, 2).reshape(b, s, h * d)  # (B, S, H*D)
        return self.wo(y)  # (B, S, hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, S, heads, D) with RotaryTable.signed rows cos, sin (S, 1, D): rotate-half(x) is
    x rolled by D/2 with its first half negated, and that sign is already in `sin`."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), sin)


_NO_INPUT = torch.zeros(())  # baddbmm's ignored input (beta=0)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention for one query (B, H, D) over every cached key (B, Hkv, T, D) -> (B, 1, H*D).

    SDPA's flash kernel costs ~0.13 ms a call for one query; grouping the query heads by their
    KV head (instead of repeating K/V) keeps this a pair of batched GEMVs over the cache.
    """
    b, h, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    qg = q.reshape(b * hkv, h // hkv, d)  # (B*Hkv, g, D): the g query heads sharing a KV head
    kt = k.reshape(b * hkv, t, d).transpose(1, 2)  # (B*Hkv, D, T), a view of the cache
    scores = torch.baddbmm(_NO_INPUT.to(q.dtype), qg, kt, beta=0, alpha=d**-0.5)  # (B*Hkv, g, T)
    if scores.dtype == torch.float32:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.bmm(probs, v.reshape(b * hkv, t, d)).view(b, 1, h * d)  # (B*Hkv, g, D) = (B, 1, H*D)


class NoAttention(nn.Module):
    """The attention of a slice with no heads (more tensor-parallel ranks than KV heads): its partial
    o_proj output is zero (plus o_proj's bias where the slice holds it); it still joins the allreduce."""

    def __init__(self, hidden: int, head_dim: int, bias: torch.Tensor | None):
        super().__init__()
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, 0, 0, head_dim
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, *_) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], self.hidden)  # (B, S, hidden)
        return y if self.bias is None else y + self.bias


class MLP(nn.Module):
    def __init__(self, w13: Linear, w2: Linear):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, index: int, ln1: RMSNorm, attn: Attention, ln2: RMSNorm, mlp: MLP, window: int | None):
        super().__init__()
        self.index, self.window = index, window
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp

    def forward(self, x, cos, sin, cache: KVCache, pos0: int, masks: dict, reduce: Reduce = _identity):
        kv = cache.layer(self.index, self.attn.kv_heads, self.attn.head_dim)
        h = x + reduce(self.attn(self.ln1(x), cos, sin, kv, pos0, masks.get(self.window)))
        return h + reduce(self.mlp(self.ln2(h)))


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """The one causal rule: a query at position q sees a key at position k iff k <= q (and q - k < window).

    Broadcasts: q_pos (S, 1) against k_pos (1, T) gives the (S, T) boolean mask.
    """
    allowed = k_pos <= q_pos
    return allowed if window is None else allowed & (q_pos - k_pos < window)


def attention_masks(pos0: int, s: int, windows: Iterable[int | None]) -> dict[int | None, torch.Tensor | None]:
    """Boolean masks (S, T) by sliding window (None = full causal); None where SDPA's own causal flag fits."""
    t = pos0 + s
    masks: dict[int | None, torch.Tensor | None] = {}
    for w in set(windows):
        if w is None and (s == 1 or pos0 == 0):
            masks[w] = None  # decode sees everything; a fresh prefill is plain causal
            continue
        q_pos = torch.arange(pos0, t).unsqueeze(1)  # (S, 1)
        k_pos = torch.arange(t).unsqueeze(0)  # (1, T)
        masks[w] = visible(q_pos, k_pos, w)
    return masks


class Transformer(nn.Module):
    """Embeddings (optional), blocks for some layers, final norm + head (optional)."""

    def __init__(self, config: ModelConfig, blocks: dict[int, Block], dtype: torch.dtype,
                 embed: torch.Tensor | None = None, norm: RMSNorm | None = None,
                 lm_head: torch.Tensor | nn.Module | None = None):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.blocks = nn.ModuleDict({str(i): b for i, b in sorted(blocks.items())})
        self.embed = None if embed is None else nn.Parameter(embed, requires_grad=False)
        self.norm = norm
        # a module (a packed or quantized head) is used as it is; a tensor becomes a float Linear
        self.head = lm_head if lm_head is None or isinstance(lm_head, nn.Module) else Linear(lm_head)
        # a tied head shares the embedding's storage; packing it would keep a second copy resident
        self.head_tied = (embed is not None and isinstance(lm_head, torch.Tensor)
                          and lm_head.data_ptr() == embed.data_ptr())
        self.rotary = RotaryTable(config, dtype)
        self._cos = self._sin = torch.empty(0, 1, config.head_dim, dtype=dtype)  # see _signed_rotary
        self._windows = frozenset(config.window_for_layer(i) for i in range(config.num_layers))

    def pack(self) -> Transformer:
        """Pack every Linear for oneDNN (see Linear.pack); the model math is unchanged."""
        for module in self.blocks.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.head is not None and not self.head_tied:
            self.head.pack()
        elif self.head_tied and native.enabled() and self.head.native_weight() is not None:
            self.head.pack()  # the native GEMV reads the table row-major (or column-major, as loaded)
        elif self.head_tied and self.embed.is_contiguous():
            # One copy serves both, so it cannot be packed; stored column-major the head's
            # one-token matmul runs ~1.7x faster while lookups just gather columns.
            column_major = self.embed.data.t().contiguous().t()  # (vocab, hidden) view of (hidden, vocab)
            self.embed = nn.Parameter(column_major, requires_grad=False)
            self.head.w = self.embed
        return self

    @property
    def lm_head(self) -> torch.Tensor | None:
        """(vocab, hidden) output projection, or None in a part without the head."""
        return None if self.head is None else self.head.weight

    @property
    def layer_ids(self) -> list[int]:
        return sorted(int(i) for i in self.blocks)

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(batch, self.dtype, self.config.max_position_embeddings)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)  # (B, S) -> (B, S, hidden)

    def run_blocks(self, h: torch.Tensor, blocks: Iterable[Block], cache: KVCache, pos0: int,
                   reduce: Reduce = _identity) -> torch.Tensor:
        """Run `blocks` in order over hidden states h (B, S, hidden) at positions [pos0, pos0+S)."""
        s = h.shape[1]
        cos, sin = self._signed_rotary(pos0, s)
        masks = attention_masks(pos0, s, self._windows)
        for block in blocks:
            h = block(h, cos, sin, cache, pos0, masks, reduce)
        return h

    def _signed_rotary(self, pos0: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows (S, 1, D) for _rotate, sin's first half negated; kept for the table's whole length, so
        a decode step only slices."""
        if pos0 + s > self._cos.shape[0]:
            self.rotary.at(0, pos0 + s)  # grows the table to at least pos0 + s rows
            cos, sin = self.rotary.cos, self.rotary.sin
            half = cos.shape[1] // 2
            self._cos, self._sin = cos.unsqueeze(1), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).unsqueeze(1)
        return self._cos[pos0: pos0 + s], self._sin[pos0: pos0 + s]

    def config_windows(self) -> set[int | None]:
        return set(self._windows)

    def forward_range(self, h: torch.Tensor, cache: KVCache, pos0: int, start: int, end: int,
                      reduce: Reduce = _identity) -> torch.Tensor:
        """Hidden states through resident layers [start, end)."""
        missing = [i for i in range(start, end) if str(i) not in self.blocks]
        if missing:
            raise ValueError(f"layers {missing} are not loaded in this model part (it holds {self.layer_ids})")
        return self.run_blocks(h, (self.blocks[str(i)] for i in range(start, end)), cache, pos0, reduce)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))  # (B, S, vocab)

    def forward(self, ids: torch.Tensor, cache: KVCache, pos0: int = 0, last_only: bool = False) -> torch.Tensor:
        """Token ids (B, S) -> logits (B, S or 1, vocab), through every resident layer."""
        ids_ = self.layer_ids
        h = self.forward_range(self.embed_tokens(ids), cache, pos0, ids_[0], ids_[-1] + 1)
        return self.logits(h[:, -1:] if last_only else h)

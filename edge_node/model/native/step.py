"""The fused single-token decode step: one native call per token runs every layer, the final norm and the head.

`NativeDecoder.of(model)` describes a whole float32 Transformer (embedding, every layer, norm, head) whose
linears expose `native_weight()`; it returns None (with the reason in `why_not`) for anything else, and the
caller keeps torch. The KV cache stays the torch KVCache: the step writes each layer's K/V row into its
buffers and advances the layers' lengths, so a prompt prefilled by torch continues natively and back.
"""

from __future__ import annotations

import ctypes

import torch

from .build import EfLayer, EfModel, library
from .weights import NativeWeight, threads


def _weight(module, what: str) -> NativeWeight:
    get = getattr(module, "native_weight", None)
    w = get() if get is not None else None
    if w is None:
        raise _Unsupported(f"{what} ({type(module).__name__}) has no native layout")
    return w


class _Unsupported(Exception):
    pass


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise _Unsupported(f"{what} is not contiguous float32")
    return t


class NativeDecoder:
    """Runs decode steps of `model` natively; build with `of`."""

    why_not = ""  # the reason of the last `of` that returned None

    def __init__(self, model, keep: list, struct: EfModel, layers):
        self.model, self._keep, self._struct, self._layers = model, keep, struct, layers
        self._cap = -1
        self._kv: list = []

    @classmethod
    def of(cls, model) -> NativeDecoder | None:
        lib = library()
        if lib is None:
            cls.why_not = "native code is off or unavailable"
            return None
        try:
            return cls._build(model, lib)
        except _Unsupported as e:
            cls.why_not = str(e)
            return None

    @classmethod
    def _build(cls, model, lib) -> NativeDecoder:
        cfg = model.config
        if model.dtype != torch.float32:
            raise _Unsupported(f"compute dtype {model.dtype} (native decode computes in float32)")
        if model.layer_ids != list(range(cfg.num_layers)) or model.embed is None or model.head is None:
            raise _Unsupported("the model is a part (layers, embedding or head missing)")
        keep: list = []
        layers = (EfLayer * cfg.num_layers)()
        for i in range(cfg.num_layers):
            b = model.blocks[str(i)]
            if getattr(b.attn, "kv_heads", 0) != cfg.num_key_value_heads or b.attn.heads != cfg.num_attention_heads:
                raise _Unsupported(f"layer {i} holds a slice of the heads")
            ws = [_weight(m, f"layer {i} {n}") for n, m in (("qkv", b.attn.wqkv), ("o", b.attn.wo),
                                                              ("w13", b.mlp.w13), ("w2", b.mlp.w2))]
            norms = [_f32(b.ln1.weight.data, f"layer {i} ln1"), _f32(b.ln2.weight.data, f"layer {i} ln2")]
            keep += ws + norms
            layers[i] = EfLayer(*(w.struct() for w in ws), norms[0].data_ptr(), norms[1].data_ptr(), None, None, 0,
                                cfg.window_for_layer(i) or 0, 0)
        embed = model.embed.data  # row- or column-major (a tied head's layout): the step reads it by strides
        if embed.dtype != torch.float32:
            raise _Unsupported("the embedding is not float32")
        head = _weight(model.head, "the head")
        norm = _f32(model.norm.weight.data, "the final norm")
        keep += [embed, head, norm]
        s = EfModel(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                    cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.rms_norm_eps, 0,
                    layers, embed.data_ptr(), embed.stride(0), embed.stride(1), norm.data_ptr(), head.struct(), None)
        if cfg.head_dim > 512 or lib.ef_model_init(ctypes.byref(s), max(threads(), 1)):
            raise _Unsupported("head_dim over 512 or no memory for the step's buffers")
        return cls(model, keep, s, layers)

    def __del__(self):
        lib = library()
        if lib is not None and getattr(self, "_struct", None) is not None:
            lib.ef_model_free(ctypes.byref(self._struct))

    def _bind_cache(self, cache, pos: int) -> None:
        """Point every layer at its K/V buffers, grown to hold position pos (a torch KVCache)."""
        cfg = self.model.config
        kvs = [cache.layer(i, cfg.num_key_value_heads, cfg.head_dim) for i in range(cfg.num_layers)]
        for kv in kvs:
            kv.reserve(pos + 1)  # the cache's own growth policy (doubling)
            if kv.k.dtype != torch.float32 or not (kv.k.is_contiguous() and kv.v.is_contiguous()) or kv.shape[0] != 1:
                raise ValueError("native decode needs a batch-1 float32 KV cache")
        for i, kv in enumerate(kvs):
            self._layers[i].k, self._layers[i].v, self._layers[i].cap = kv.k.data_ptr(), kv.v.data_ptr(), kv.k.shape[2]
        self._kv, self._cache, self._cap = kvs, cache, min(kv.k.shape[2] for kv in kvs)

    def step(self, token: int, pos: int, cache) -> torch.Tensor:
        """Logits (vocab,) of `token` at position `pos`, its K/V appended to `cache` (every layer holds pos)."""
        if pos >= self._cap or cache is not getattr(self, "_cache", None) or self._kv[0].k.shape[2] != self._cap:
            self._bind_cache(cache, pos)
        from ..kv_cache import KVPositionError

        for i, kv in enumerate(self._kv):
            if kv.length != pos:
                raise KVPositionError(f"KV cache of layer {i}: write at position {pos}, but the layer holds "
                                      f"{kv.length} tokens (writes must append at its length)")
        cos, sin = self.model._signed_rotary(pos, 1)  # (1, 1, D) rows: this position's
        logits = torch.empty(self.model.config.vocab_size, dtype=torch.float32)
        rc = library().ef_step(ctypes.byref(self._struct), token, pos, cos.data_ptr(), sin.data_ptr(),
                               logits.data_ptr(), None, threads())
        if rc:
            raise ValueError(f"native decode step refused token {token} at position {pos} (code {rc})")
        for kv in self._kv:
            kv.length = pos + 1
        return logits

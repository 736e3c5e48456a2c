"""Loading edgefed-quantized checkpoints (quant/format.py): into the same model, with int8 / int4 linears.

`load_any` is what single-node generation calls: a float checkpoint loads with edge_node.model.load_model,
a quantized one with `load_quantized`. Both validate every tensor's name and shape (and, for the quantized
format, dtype) against config.json from the headers before reading a weight. Blocks are built by
load.build_block with the int8 / int4 linear from the start; fused linears (q|k|v, gate|up) concatenate
their parts' per-row scales (and int4's per-row groups) along the rows, exactly as they do the codes.

`FloatSource` reads any checkpoint's tensors back as float32, dequantizing where stored quantized: what the
sharder reads, so a quantized directory shards like its float source.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edge_node.model.checkpoint import Checkpoint
from edge_node.model.config import ModelConfig
from edge_node.model.errors import TensorShapeError
from edge_node.model.layout import LINEARS, LinearSpec, fuse_layer
from edge_node.model.load import build_block, check_names, load_model, validate
from edge_node.model.model import Linear, RMSNorm, Transformer

from .format import QuantConfig, TensorDtypeError, expected_tensors
from .int4 import Int4Linear, dequantize_groups
from .int8 import Int8GroupLinear, dequantize_groups8, dequantize_rows, make_linear

_SUFFIXES = {"weight_scale": "scale", "weight_zero": "zero"}  # on disk (HF form) -> runtime form ("wqkv.scale")


def load_any(model_dir: str | Path, dtype: torch.dtype = torch.float32, pack: bool = False) -> Transformer:
    """The whole model of a float or an edgefed-quantized checkpoint (config.json says which)."""
    if QuantConfig.from_dir(model_dir) is None:
        return load_model(model_dir, dtype, pack=pack)
    return load_quantized(model_dir, dtype, pack)


def validate_quantized(ckpt: Checkpoint, cfg: ModelConfig, q: QuantConfig) -> None:
    """Name every missing, unexpected, misshaped or mistyped tensor (headers only)."""
    want = expected_tensors(cfg, q)
    have = check_names(ckpt, want, missing_what=f" of an {q.weights} checkpoint",
                       extra_what=f" in an {q.weights} checkpoint")
    for name, (shape, dtype) in want.items():
        info = have[name]
        if info.shape != shape:
            raise TensorShapeError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, config.json and its "
                                   f"quantization_config imply {list(shape)}")
        if dtype is not None and info.dtype != dtype:
            raise TensorDtypeError(f"{info.file}: tensor {name!r} is {info.dtype}, an {q.weights} checkpoint "
                                   f"stores it as {dtype}")
        if dtype is None and info.dtype not in ("F32", "BF16", "F16"):
            raise TensorDtypeError(f"{info.file}: tensor {name!r} is {info.dtype}, expected a float dtype")


def make_quantized(weight: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> nn.Module:
    """Int4Linear for codes with scales and zeros, Int8GroupLinear for an int8 weight with group scales and zeros,
    Int8Linear for an int8 weight with row scales, else the float Linear."""
    if zero is None:
        return make_linear(weight, scale, bias)
    return (Int8GroupLinear if weight.dtype == torch.int8 else Int4Linear)(weight, scale, zero, bias)


def quantized_linear(spec: LinearSpec, t: dict[str, torch.Tensor | None]) -> nn.Module:
    """build_block's linear factory for runtime-form tensors with '<name>.scale' (and int4's '<name>.zero')."""
    return make_quantized(t[spec.name], t.get(spec.name + ".scale"), t.get(spec.name + ".zero"), t.get(spec.bias))


def _quantized_params(get, index: int) -> dict[str, torch.Tensor]:
    """A layer's scales (and zeros) in runtime form, fused along the rows in the layout table's order."""
    p = f"model.layers.{index}."
    out = {}
    for spec in (s for s in LINEARS if s.quantize):
        for disk, runtime in _SUFFIXES.items():
            names = [f"{p}{part.module}.{disk}" for part in spec.parts]
            if names[0] in get.names:
                out[f"{spec.name}.{runtime}"] = torch.cat([get(n) for n in names])
    return out


class _Getter:
    """Tensors of a checkpoint: floats in the compute dtype; codes, scales and zeros as stored.

    Always copies: safetensors hands out views of a mapping of the whole file, and one view kept alive
    keeps every page read through that mapping resident (the loader closes the mapping after each layer).
    """

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        self.ckpt, self.dtype, self.names = ckpt, dtype, ckpt.names()

    def __call__(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(name)
        if t.is_floating_point() and not name.endswith(tuple(_SUFFIXES)) and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t.clone()

    def linear(self, base: str) -> nn.Module:
        """The quantized linear stored under `base` ("lm_head")."""
        return make_quantized(*(self(f"{base}.{d}") if f"{base}.{d}" in self.names else None
                                for d in ("weight", *_SUFFIXES)))


def load_quantized(model_dir: str | Path, dtype: torch.dtype = torch.float32, pack: bool = False) -> Transformer:
    """The whole model of an edgefed-quantized checkpoint, its linears int8 or int4 (pack: the float ones, if any,
    for oneDNN)."""
    cfg = ModelConfig.from_dir(model_dir)
    q = QuantConfig.from_dir(model_dir)
    ckpt = Checkpoint(model_dir)
    validate_quantized(ckpt, cfg, q)
    get = _Getter(ckpt, dtype)
    blocks = {}
    for i in range(cfg.num_layers):
        blocks[i] = build_block(cfg, i, fuse_layer(get, cfg, i) | _quantized_params(get, i), linear=quantized_linear)
        if pack:
            blocks[i].apply(lambda m: m.pack() if isinstance(m, Linear) else None)
    norm = RMSNorm(get("model.norm.weight"), cfg.rms_norm_eps)
    quantized_head = get.linear("lm_head") if q.lm_head != "float" else None
    float_head = get("lm_head.weight") if q.lm_head == "float" and not cfg.tie_word_embeddings else None
    ckpt.close()
    embed = ckpt.get("model.embed_tokens.weight", dtype)
    ckpt.close()
    head = quantized_head if quantized_head is not None else (embed if cfg.tie_word_embeddings else float_head)
    # a quantized head leaves the embedding row-major, the layout lookups want (pack() leaves it alone)
    model = Transformer(cfg, blocks, dtype, embed, norm, head)
    return model.pack() if pack else model


class FloatSource:
    """Read a float or edgefed-quantized checkpoint's tensors as float32 (dequantized where stored quantized),
    after validating its headers against config.json."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig):
        self.ckpt, self.q = Checkpoint(model_dir), QuantConfig.from_dir(model_dir)
        if self.q is None:
            validate(self.ckpt, cfg)
        else:
            validate_quantized(self.ckpt, cfg, self.q)
        self.tensors = self.ckpt.tensors
        self.quantized = {n for n, t in self.tensors.items() if self.q is not None and t.dtype in ("I8", "U8")}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.quantized:
            return self.ckpt.get(name, torch.float32)
        base = name.removesuffix(".weight")
        parts = [self.ckpt.get(n) for n in (name, f"{base}.weight_scale", f"{base}.weight_zero") if n in self.tensors]
        return _dequantize(*parts)

    def rows(self, name: str, v0: int, v1: int) -> torch.Tensor:
        """Rows [v0, v1) as float32 (tables bigger than a layer are read in row blocks)."""
        base = name.removesuffix(".weight")
        names = [n for n in (name, f"{base}.weight_scale", f"{base}.weight_zero") if n in self.tensors]
        parts = [self.ckpt.rows(n, v0, v1) for n in (names if name in self.quantized else names[:1])]
        return _dequantize(*parts) if name in self.quantized else parts[0].to(torch.float32).contiguous()

    def close(self) -> None:
        self.ckpt.close()


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    if zero is None:
        return dequantize_rows(codes, scale)
    return (dequantize_groups8 if codes.dtype == torch.int8 else dequantize_groups)(codes, scale, zero)


__all__ = ["FloatSource", "load_any", "load_quantized", "make_quantized", "quantized_linear", "validate_quantized"]

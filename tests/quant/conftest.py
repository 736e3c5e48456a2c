"""Quantized checkpoints for the quant tests, and the float checkpoint holding exactly their weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from edge_node.model.config import ModelConfig
from quant.checkpoint import FloatSource


def dequantized_copy(qdir: Path, out: Path) -> Path:
    """A float32 checkpoint holding the weights a quantized checkpoint stands for (its scales applied): what the
    int8 / int4 kernels must compute, up to their bfloat16 activations."""
    cfg = ModelConfig.from_dir(qdir)
    src = FloatSource(qdir, cfg)
    tensors = {n: src.get(n) for n in src.tensors if not n.endswith(("weight_scale", "weight_zero"))}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # a quantized copy of the embedding: the float model ties them
    src.close()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    raw = json.loads((qdir / "config.json").read_text())
    raw.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(raw))
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits (B, S, vocab) on a fresh cache."""
    with torch.inference_mode():
        return model(ids, model.new_cache(ids.shape[0])).float()


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of the difference as a fraction of the reference's RMS."""
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()

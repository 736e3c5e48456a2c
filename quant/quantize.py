"""Offline weight-only quantization of a float checkpoint into an edgefed-quantized directory (quant/format.py).

A separate step from loading, as in gpt-fast: the source is validated against its config.json, then
model.safetensors is streamed tensor by tensor (one float weight and its quantized form in memory at a
time), config.json gains its quantization_config, and the tokenizer and generation files are copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from edge_node.model.checkpoint import Checkpoint
from edge_node.model.config import ModelConfig, read_json
from edge_node.model.formats import prepare_out_dir, write_streaming
from edge_node.model.load import validate

from .format import HEAD, QuantConfig, QuantizeError, check_group_size, expected_tensors, quantized_weights
from .int4 import quantize_groups
from .int8 import quantize_groups8, quantize_rows

COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
WEIGHTS_FILE = "model.safetensors"


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, weights: str, group_size: int | None = None,
                        force: bool = False, lm_head: str | None = None, scale_dtype: str | None = None) -> dict:
    """Write the quantized copy of `model_dir` to `out_dir`; returns a summary (config, bytes in and out)."""
    q = QuantConfig.make(weights, group_size, lm_head, scale_dtype)
    model_dir, out = Path(model_dir), Path(out_dir)
    raw = read_json(model_dir / "config.json")
    if raw.get("quantization_config") is not None:
        raise QuantizeError(f"{model_dir}: already quantized (config.json has a quantization_config); "
                            f"quantize its float source")
    cfg = ModelConfig.from_dir(model_dir)
    ckpt = Checkpoint(model_dir)
    validate(ckpt, cfg)
    check_group_size(cfg, q)
    prepare_out_dir(out, model_dir, force, _stale_model_file, QuantizeError)
    header = write_streaming(out / WEIGHTS_FILE, _entries(ckpt, cfg, q))
    ckpt.close()
    (out / "config.json").write_text(json.dumps({**raw, "quantization_config": q.to_json()}, indent=2) + "\n")
    for name in COPIED:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return {"out": str(out), "quantization_config": q.to_json(), "tensors": len(header),
            "bytes_in": sum(f.stat().st_size for f in {t.file for t in ckpt.tensors.values()}),
            "bytes_out": (out / WEIGHTS_FILE).stat().st_size}


def _entries(ckpt: Checkpoint, cfg: ModelConfig, q: QuantConfig) -> list:
    """write_streaming entries in expected_tensors' order: floats as stored, each quantized weight computed once
    (its codes, scales and zeros are consecutive entries sharing one result). The embedding comes first, so it
    starts 64-byte aligned: the loader keeps it as a view of the file's pages."""
    sources = {n: n for n in quantized_weights(cfg, q)}
    if cfg.tie_word_embeddings and q.lm_head != "float":
        sources[HEAD] = "model.embed_tokens.weight"  # the head's quantized copy of the (float) embedding
    last: dict[str, tuple[torch.Tensor, ...]] = {}

    def read(name: str) -> torch.Tensor:
        return ckpt.get(name)  # read into memory of its own: nothing of the file stays mapped

    def quantized(name: str) -> tuple[torch.Tensor, ...]:
        if name not in last:
            last.clear()  # one weight's result at a time
            w = read(sources[name])
            if q.mode(name) == "int4":
                last[name] = quantize_groups(w, q.group_size)
            else:
                last[name] = quantize_rows(w) if q.group(name) == -1 else \
                    quantize_groups8(w, q.group(name), getattr(torch, q.scale_dtype))
        return last[name]

    entries = []
    for name, (shape, dtype) in expected_tensors(cfg, q).items():
        if dtype is None:
            entries.append((name, ckpt.tensors[name].dtype, shape, lambda n=name: [read(n)]))
            continue
        weight = name.rsplit(".", 1)[0] + ".weight"
        k = {"weight": 0, "weight_scale": 1, "weight_zero": 2}[name.rsplit(".", 1)[1]]
        entries.append((name, dtype, shape, lambda w=weight, k=k: [quantized(w)[k]]))
    return entries


def _stale_model_file(path: Path) -> bool:
    """What a quantized directory holds (stale *.safetensors would be read as weights)."""
    return path.is_file() and (path.suffix == ".safetensors"
                               or path.name in ("config.json", *COPIED, "model.safetensors.index.json"))

"""PEFT LoRA adapters on the edge runtime: read, check against the model, merge at load.

An adapter directory is what peft's `save_pretrained` writes: adapter_config.json + adapter_model.safetensors
(tensors "base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj|...}.lora_{A|B}.weight"). edgefed's
federated rounds add edgefed_adapter.json with the digest of the base weights they trained on, so an adapter
is refused on another base model even when the shapes agree. Every problem is a named AdapterError: a missing
file, an unknown target module, a wrong rank or shape, NaN/Inf values, or a base model mismatch.

Single node: `load_adapted` merges W + scaling * B @ A into the float weights as they load (no cost per token).
Tensor parallel: `adapt_shards` merges each rank's slice of the delta into its shard files (what merging before
sharding gives, without re-sharding), and writes a manifest for the adapted shards. `merge_checkpoint` writes a
whole merged Hugging Face checkpoint (for any tool, or to shard afresh), one tensor at a time.

Serving: a deployment with an adapter merged is named `BASE+TAG` (`adapted_name`), e.g. `demo+round-0002`, so
the OpenAI API's `model` field chooses the tuned model or the base per request; `split_adapted_name` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import torch

from edge_node.model.checkpoint import check_finite
from edge_node.model.config import ModelConfig
from edge_node.model.errors import CheckpointError
from edge_node.model.formats import (
    prepare_out_dir,
    read_header,
    read_tensor,
    sha256_file,
    weights_digest,
    write_streaming,
    write_tensors,
)
from edge_node.model.layout import BY_NAME, LINEARS, PEFT_TARGETS
from edge_node.model.lora import LoraWeights, merge_layer, part_shape
from edge_node.model.model import Linear, Transformer

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BASE = "edgefed_adapter.json"  # {"base_weights_digest": ...}: the base model the adapter was trained on
_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out", "rank_pattern": "per-module ranks",
                "alpha_pattern": "per-module alphas", "modules_to_save": "modules_to_save"}


class AdapterError(CheckpointError):
    """A LoRA adapter directory cannot be applied to this model."""


ADAPTED_SEP = "+"  # deployment name = base name + ADAPTED_SEP + adapter tag
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def adapter_tag(adapter_dir: str | Path) -> str:
    """The name an adapter goes by in a deployment name: its directory's name (a symlink such as a session's
    OUT/latest is resolved to the round it points at, so the name says which round is served)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"{d}: adapter directory not found")
    tag = d.resolve().name if d.is_symlink() else d.name
    if not _TAG.match(tag):
        raise AdapterError(f"{d}: the directory name {tag!r} cannot tag a deployment (letters, digits, '.', '_' "
                           "and '-', at most 64, starting with a letter or digit)")
    return tag


def adapted_name(base: str, adapter: str | Path) -> str:
    """`base+tag`: the deployment name of `base` with an adapter (a directory, or a tag) merged in."""
    tag = adapter if isinstance(adapter, str) and _TAG.match(adapter) else adapter_tag(adapter)
    if not base or ADAPTED_SEP in base:
        raise AdapterError(f"deployment name {base!r}: a base name must be non-empty and hold no {ADAPTED_SEP!r}")
    return f"{base}{ADAPTED_SEP}{tag}"


def split_adapted_name(name: str) -> tuple[str, str | None]:
    """`demo+round-0002` -> ("demo", "round-0002"); `demo` -> ("demo", None)."""
    base, sep, tag = name.partition(ADAPTED_SEP)
    if not sep:
        return name, None
    if not base or not _TAG.match(tag):
        raise AdapterError(f"deployment name {name!r}: expected BASE{ADAPTED_SEP}TAG with a tag of letters, digits, "
                           "'.', '_' and '-'")
    return base, tag


def read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: not found (an adapter directory holds {CONFIG} and {WEIGHTS})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw.get('peft_type') if isinstance(raw, dict) else raw!r}, "
                           "only LORA adapters are supported")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{path}: field 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: field 'lora_alpha' must be a number, got {alpha!r}")
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise AdapterError(f"{path}: {what} ({key!r}) is not supported by the edge runtime")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: field 'bias' is {raw['bias']!r}; only 'none' is supported")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(PEFT_TARGETS))
        if unknown:
            raise AdapterError(f"{path}: unknown target module(s) {', '.join(unknown)} (the runtime's linears are "
                               f"{', '.join(sorted(PEFT_TARGETS))})")
    return raw


def load_adapter(adapter_dir: str | Path, cfg: ModelConfig, base_dir: str | Path | None = None) -> LoraWeights:
    """Read and check an adapter against the model's config (and, given `base_dir`, its base weights)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"{d}: adapter directory not found")
    raw = read_config(d)
    if base_dir is not None:
        check_base(d, base_dir)
    r = raw["r"]
    scaling = raw["lora_alpha"] / (math.sqrt(r) if raw.get("use_rslora") else r)
    path = d / WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{path}: not found")
    infos = read_header(path)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with open(path, "rb", buffering=0) as f:
        for name, info in infos.items():
            layer, module, ab = _parse_name(name, path, cfg)
            out, inp = part_shape(cfg, module)
            want = (r, inp) if ab == "A" else (out, r)
            if info.shape != want:
                raise AdapterError(f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(want)} for "
                                   f"rank {r} on this model (wrong rank, or an adapter for another base model?)")
            t = read_tensor(info, f.fileno())
            check_finite(t, name, path)
            found.setdefault((layer, module), {})[ab] = t.float()
    pairs = {}
    for key, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {key[0]} {key[1]} has lora_{''.join(ab)} without its pair")
        pairs[key] = (ab["A"], ab["B"])
    if not pairs:
        raise AdapterError(f"{path}: holds no LoRA tensors")
    return LoraWeights(scaling, pairs)


def _parse_name(name: str, path: Path, cfg: ModelConfig) -> tuple[int, str, str]:
    m = _NAME.match(name)
    if m is None:
        raise AdapterError(f"{path}: tensor {name!r} is not a LoRA A/B of a decoder layer linear")
    layer, module, ab = int(m[1]), m[2], m[3]
    if module not in PEFT_TARGETS:
        raise AdapterError(f"{path}: tensor {name!r} targets unknown module {module!r}")
    if layer >= cfg.num_layers:
        raise AdapterError(f"{path}: tensor {name!r} is for layer {layer}, the model has {cfg.num_layers} layers "
                           "(an adapter for another base model?)")
    return layer, module, ab


def check_base(adapter_dir: Path, base_dir: str | Path) -> None:
    """Refuse an adapter whose recorded base weights digest differs from `base_dir`'s."""
    path = adapter_dir / BASE
    if not path.is_file():
        return  # a plain peft adapter records no digest: names and shapes are all that can be checked
    try:
        want = json.loads(path.read_text())["base_weights_digest"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AdapterError(f"{path}: expected a JSON object with 'base_weights_digest'") from None
    got = weights_digest(base_dir)
    if got != want:
        raise AdapterError(f"{adapter_dir}: trained on base weights {want[:16]}..., but {base_dir} holds "
                           f"{got[:16]}... (base model mismatch)")


def merge_into_model(model: Transformer, lora: LoraWeights) -> Transformer:
    """Merge the adapter into a loaded float model's blocks (packed linears are unpacked, merged, re-packed)."""
    cfg = model.config
    for i in lora.layers():
        block = model.blocks[str(i)] if str(i) in model.blocks else None
        if block is None:
            continue  # a layer range without this layer
        mods = {s.name: getattr(block.attn if s.owner == "attn" else block.mlp, s.name, None) for s in LINEARS}
        if any(not isinstance(m, Linear) for m in mods.values()):
            raise AdapterError("adapters merge into float linears only (load the float checkpoint, not a quantized "
                               "one, to apply an adapter)")
        merged = merge_layer(cfg, {n: m.weight for n, m in mods.items()}, lora, i)
        for name, m in mods.items():
            if merged[name] is not m.weight:
                was_packed = m.packed is not None
                m.w, m.packed = torch.nn.Parameter(merged[name].contiguous(), requires_grad=False), None
                if was_packed:
                    m.pack()
    return model


def load_adapted(model_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype = torch.float32,
                 pack: bool = False) -> Transformer:
    """The model of `model_dir` with the adapter merged in (checked against the model first)."""
    from quant.checkpoint import load_any

    lora = load_adapter(adapter_dir, ModelConfig.from_dir(model_dir), model_dir)
    model = load_any(model_dir, dtype, pack=False)
    merge_into_model(model, lora)
    return model.pack() if pack else model


def adapt_shards(shard_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                 base_dir: str | Path | None = None) -> dict:
    """Shards with the adapter merged into every rank's layer files, written to `out_dir` (the embeddings, head
    and model files are copied); returns the new manifest. Float and bfloat16 shards only."""
    from edge_node.shard import MANIFEST, Manifest, ShardError

    src, out = Path(shard_dir), Path(out_dir)
    m = Manifest.load(src)
    if m.weights == "int8":
        raise ShardError(f"{src}: int8 shards cannot take an adapter; merge into float or bfloat16 shards")
    lora = load_adapter(adapter_dir, m.config, base_dir)
    if out.resolve() == src.resolve():
        raise ShardError(f"{out}: write adapted shards to another directory than {src}")
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((src / MANIFEST).read_text())
    for entry in raw["files"]:
        f_src, f_out = src / entry["path"], out / entry["path"]
        f_out.parent.mkdir(parents=True, exist_ok=True)
        layer = entry.get("layers", [None])[0]
        if entry["kind"] != "layer" or layer not in lora.layers():
            shutil.copyfile(f_src, f_out)
            continue
        infos = read_header(f_src)
        with open(f_src, "rb", buffering=0) as f:
            t = {n: read_tensor(info, f.fileno()) for n, info in infos.items()}
        units = m.plan.slices[entry["rank"]].units(m.config)
        write_tensors(f_out, merge_layer(m.config, t, lora, layer, units))
        entry["bytes"], entry["sha256"] = f_out.stat().st_size, sha256_file(f_out)
    for p in src.iterdir():
        if p.is_file() and p.name != MANIFEST:
            shutil.copyfile(p, out / p.name)
    adapter_sha = sha256_file(Path(adapter_dir) / WEIGHTS)
    # ONNX prefill graphs exported from the base shards no longer match these weights
    base = raw.get("weights_digest") or ""
    raw["weights_digest"] = hashlib.sha256(f"{base}\0lora\0{adapter_sha}".encode()).hexdigest()
    raw["adapter"] = {"dir": str(adapter_dir), "sha256": adapter_sha, "base_weights_digest": base or None}
    (out / MANIFEST).write_text(json.dumps(raw, indent=1))
    return raw


MERGED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")


def merge_checkpoint(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, force: bool = False
                     ) -> Path:
    """A float Hugging Face checkpoint with the adapter merged in (W + scaling * B @ A per targeted linear, stored
    float32: a LoRA delta is often below a bfloat16 weight's rounding step), written tensor by tensor to
    out_dir/model.safetensors beside the model's own config and tokenizer files."""
    from quant.checkpoint import FloatSource
    from quant.format import QuantConfig

    src, out = Path(model_dir), Path(out_dir)
    cfg = ModelConfig.from_dir(src)
    if QuantConfig.from_dir(src) is not None:
        raise AdapterError(f"{src}: merge an adapter into the float checkpoint, not a quantized one")
    lora = load_adapter(adapter_dir, cfg, src)
    prepare_out_dir(out, src, force, lambda p: p.name == "model.safetensors" or p.name in MERGED_FILES, AdapterError)
    source = FloatSource(src, cfg)
    deltas = {}  # HF weight name -> (layer, module): merged as they stream
    for (layer, module) in lora.pairs:
        part = BY_NAME[PEFT_TARGETS[module][0]].parts[PEFT_TARGETS[module][1]]
        deltas[f"model.layers.{layer}.{part.module}.weight"] = (layer, module)

    def tensor(name: str):
        def parts():
            t = source.ckpt.get(name)  # as stored
            if name in deltas:
                a, b = lora.pairs[deltas[name]]
                t = t.float() + lora.scaling * (b @ a)  # (out, r) @ (r, in)
            yield t
        return parts

    entries = [(n, "F32" if n in deltas else info.dtype, info.shape, tensor(n))
               for n, info in sorted(source.tensors.items())]
    write_streaming(out / "model.safetensors", entries)
    source.close()
    for name in MERGED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out

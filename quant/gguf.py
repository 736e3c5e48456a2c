"""Import a GGUF file (llama.cpp's format) as a Hugging Face model directory edgefed and transformers both load.

Offline and separate from loading, like every conversion here: `import_gguf` reads the file through ggml's own
reader (`gguf.GGUFReader`, memory-mapped), dequantizes one tensor at a time (`gguf.quants.dequantize`, row
blocks for big tensors) straight into model.safetensors, and writes config.json, generation_config.json and
the tokenizer files (quant.gguf_vocab) from the file's metadata.

llama.cpp's converter permutes the rows of every Llama query and key projection (it pairs rotary dimensions
(i, i + d/2) as adjacent rows, the interleaved layout its rope kernel reads); `unpermute_rows` undoes it, or
the model would rotate the wrong dimension pairs and generate garbage.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_node.model.config import ModelConfig
from edge_node.model.errors import (
    CheckpointError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
    UsageError,
)
from edge_node.model.formats import write_streaming
from edge_node.model.layout import expected_shapes

from .gguf_vocab import known_pre, tokenizer_files

SUPPORTED_ARCHITECTURES = ("llama",)
OUT_DTYPES = {"float32": ("F32", torch.float32), "bfloat16": ("BF16", torch.bfloat16)}
_ROWS_PER_PART = 4096  # rows dequantized at a time: a big tensor (the embedding) never sits in memory as float32
# llama.cpp tensor names -> Hugging Face Llama names
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# files of a Hugging Face model directory that --force replaces (stale shards would mix with the new weights)
_MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")


class GGUFError(CheckpointError):
    """A GGUF file is not one (bad magic), is truncated or corrupt, or lacks metadata the import needs."""


class UnsupportedQuantizationError(GGUFError):
    """A tensor is stored in a ggml type that the gguf package cannot dequantize."""


@dataclass(frozen=True)
class Source:
    """One GGUF tensor on its way to a Hugging Face tensor."""

    gguf_name: str
    tensor: Any  # gguf.ReaderTensor
    shape: tuple[int, ...]  # torch order (rows first)
    heads: int = 0  # > 0: a query/key projection whose rows llama.cpp permuted for this many heads


def read_gguf(path: str | Path):
    """The file opened with `gguf.GGUFReader`; any failure to parse it becomes a GGUFError naming the file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: file not found")
    try:
        return GGUFReader(path)
    except ValueError as e:
        if "magic" in str(e).lower():
            raise GGUFError(f"{path}: not a GGUF file (bad magic number)") from None
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    except Exception as e:  # the reader indexes and reshapes raw bytes: a short file fails anywhere in it
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader, source: str) -> dict[str, Any]:
    """Every key-value field as a Python value (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFError(f"{source}: metadata {key!r} is corrupt ({e})") from None
    return out


def _f32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06), as the Hugging Face
    config it was converted from spelled it."""
    return float(str(np.float32(value)))


class _Meta:
    """Typed access to `{arch}.*` metadata, naming the key that is missing or wrong."""

    def __init__(self, meta: dict[str, Any], arch: str, source: str):
        self.meta, self.arch, self.source = meta, arch, source

    def get(self, key: str, kind: type = int, default: Any = ...) -> Any:
        full = f"{self.arch}.{key}"
        value = self.meta.get(full)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer array with one value for every layer
        if value is None:
            if default is ...:
                raise GGUFError(f"{self.source}: missing metadata {full!r}")
            return default
        if kind is int and (not isinstance(value, int) or value <= 0):
            raise GGUFError(f"{self.source}: metadata {full!r} must be a positive integer, got {value!r}")
        if kind is float and not isinstance(value, int | float):
            raise GGUFError(f"{self.source}: metadata {full!r} must be a number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise GGUFError(f"{self.source}: metadata {full!r} must be a string, got {value!r}")
        return _f32(value) if kind is float else value


def hf_config(meta: dict[str, Any], tensors: dict[str, Any], source: str, dtype: str = "float32") -> dict[str, Any]:
    """config.json for a `llama` GGUF, from its `llama.*` metadata and which tensors it holds."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(f"{source}: GGUF architecture {arch!r} is not supported by import-gguf; "
                                           f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if any("_exps" in name or "ffn_gate_inp" in name for name in tensors):
        raise UnsupportedArchitectureError(f"{source}: a mixture-of-experts Llama (Mixtral-style expert tensors) is "
                                           "not supported by import-gguf; supported: dense llama")
    m = _Meta(meta, arch, source)
    hidden, heads = m.get("embedding_length"), m.get("attention.head_count")
    head_dim = m.get("attention.key_length", int, None) or m.get("rope.dimension_count", int, None) or hidden // heads
    rope_dim = m.get("rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{source}: {arch}.rope.dimension_count = {rope_dim} differs from the head size {head_dim} "
                        "(partial rotary embeddings are not supported)")
    embd = tensors.get("token_embd.weight")
    vocab = m.get("vocab_size", int, None) or len(meta.get("tokenizer.ggml.tokens") or ()) or (
        int(embd.shape[1]) if embd is not None else None)
    if not vocab:
        raise GGUFError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, tokens or token_embd)")
    theta = m.get("rope.freq_base", float, 10000.0)
    rope = {"rope_type": "default", "rope_theta": theta, **_rope_scaling(m, tensors, theta, head_dim, source)}
    # end of text and, where the file names one, end of turn (Llama 3 chat models end turns with <|eot_id|>)
    eos = list(dict.fromkeys(meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                             if k in meta))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": m.get("feed_forward_length"), "num_hidden_layers": m.get("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": m.get("attention.head_count_kv", int, heads),
        "head_dim": head_dim, "max_position_embeddings": m.get("context_length", int, 2048),
        "rms_norm_eps": m.get("attention.layer_norm_rms_epsilon", float, 1e-6), "rope_theta": theta,
        "rope_parameters": rope, "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "dtype": dtype,
        "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
    }
    if rope["rope_type"] != "default":  # transformers 4.x reads the scaling from here
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def _rope_scaling(m: _Meta, tensors: dict[str, Any], theta: float, head_dim: int, source: str) -> dict[str, Any]:
    """Rope scaling from `{arch}.rope.scaling.*` (linear), or llama3's recovered from the rope_freqs tensor that
    llama.cpp writes for it instead of metadata."""
    kind = m.get("rope.scaling.type", str, None)
    factor = m.get("rope.scaling.factor", float, None) or m.get("rope.scale_linear", float, None)
    if "rope_freqs.weight" in tensors:
        return llama3_rope(_dequantize(tensors["rope_freqs.weight"]).reshape(-1), theta, head_dim, source)
    if kind == "none" or kind in (None, "linear") and factor in (None, 1.0):
        return {}
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": factor}
    raise GGUFError(f"{source}: rope scaling {kind!r} is not supported by import-gguf; supported: none, linear, "
                    "llama3 (rope_freqs)")


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int, source: str) -> dict[str, Any]:
    """llama3 rope-scaling parameters reproducing llama.cpp's per-frequency factors (the rope_freqs tensor).

    The factors alone do not pin every parameter down, so the published low/high frequency factors (1 and 4)
    are assumed; the original context length then follows from any factor between 1 and `factor` (else powers
    of two are tried), and the result must reproduce every factor.
    """
    factor = _f32(float(factors.max()))
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factor <= 1.0 or wavelen.shape != factors.shape:
        raise GGUFError(f"{source}: tensor 'rope_freqs.weight' holds {factors.size} factors up to {factor}, not the "
                        f"{wavelen.size} llama3 rope factors (> 1) of a head size {head_dim}")
    mid = (factors > 1.0) & (factors < factor)
    smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)  # llama3's interpolation weight, per frequency
    candidates = [int(round(x)) for x in wavelen[mid] * (3 * smooth + 1)] + [2 ** k for k in range(4, 21)]
    for old in dict.fromkeys(candidates):
        smooth = (old / wavelen - 1.0) / 3.0
        want = np.where(wavelen < old / 4.0, 1.0,
                        np.where(wavelen > old, factor, 1 / ((1 - smooth) / factor + smooth)))
        if np.allclose(want, factors, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": old}
    raise GGUFError(f"{source}: tensor 'rope_freqs.weight' matches no llama3 rope scaling import-gguf knows "
                    "(low/high frequency factors 1 and 4)")


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp's name for a Llama tensor -> the Hugging Face name (None for one with no place in it)."""
    found = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if found:
        layer, part, kind = found.groups()
        return f"model.layers.{layer}.{_BLOCK[part]}.{kind}" if part in _BLOCK else None
    found = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if found and found.group(1) in _GLOBAL:
        return f"{_GLOBAL[found.group(1)]}.{found.group(2)}"
    return None


def plan_tensors(tensors: dict[str, Any], config: dict[str, Any], source: str) -> dict[str, Source]:
    """Hugging Face name -> its GGUF tensor, checked against the shapes config.json implies (names and shapes
    from the GGUF header alone, before any weight is read)."""
    cfg = ModelConfig.from_dict(config, f"{source} (metadata)")
    want = expected_shapes(cfg)
    plan, unknown = {}, []
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue  # read into the config (llama3 rope scaling)
        target = hf_name(name)
        if target is None:
            unknown.append(name)
            continue
        heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
        permuted = next((n for module, n in heads.items() if f".{module}." in target), 0)
        plan[target] = Source(name, t, tuple(int(d) for d in reversed(t.shape)), permuted)
    extra = sorted(unknown + [plan[n].gguf_name for n in plan if n not in want])
    if extra:
        raise UnexpectedTensorError(f"{source}: tensor(s) with no place in a {cfg.architecture}: {', '.join(extra)}")
    missing = sorted(set(want) - set(plan))
    if missing:
        raise MissingTensorError(f"{source}: missing tensor(s) for {', '.join(missing[:8])}"
                                 f"{f' (and {len(missing) - 8} more)' if len(missing) > 8 else ''}")
    for name, src in plan.items():
        if src.shape != want[name]:
            raise TensorShapeError(f"{source}: tensor {src.gguf_name!r} has shape {list(src.shape)}, the metadata "
                                   f"implies {list(want[name])} for {name}")
    return {name: plan[name] for name in want}  # in the runtime's order: embeddings, norm, head, layers


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation. Within each head llama.cpp stores row pairs (i, i + d/2) next to
    each other (rows 0, d/2, 1, d/2+1, ...); Hugging Face's rotate_half wants the two halves apart."""
    rows = w.shape[0]
    half = rows // heads // 2
    # (heads, half, 2, ...) -> (heads, 2, half, ...)
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a GGUF tensor as float32, in torch order."""
    from gguf.quants import dequantize

    data = t.data if start is None else t.data[start:stop]
    return np.array(dequantize(data, t.tensor_type), dtype=np.float32).reshape(-1, *_cols(t))


def _cols(t) -> tuple[int, ...]:
    dims = tuple(int(d) for d in reversed(t.shape))
    return dims[1:] if len(dims) > 1 else ()


def check_quantization(plan: dict[str, Source], source: str) -> None:
    """Dequantize one row of every tensor, so an unsupported ggml type is named before anything is written."""
    for src in plan.values():
        try:
            _dequantize(src.tensor, 0, 1)
        except NotImplementedError:
            raise UnsupportedQuantizationError(
                f"{source}: tensor {src.gguf_name!r} is stored as {src.tensor.tensor_type.name}, which the gguf "
                "package cannot dequantize; re-quantize the model to a supported type (F32, F16, BF16, Q8_0, "
                "Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ types)") from None
        except ValueError as e:
            raise GGUFError(f"{source}: tensor {src.gguf_name!r} is corrupt ({e})") from None


def _parts(src: Source, dtype: torch.dtype):
    """The tensor's row blocks, dequantized and (for Q/K) un-permuted, in the output dtype."""
    rows = src.shape[0]
    if src.heads or len(src.shape) == 1:  # the permutation mixes rows across the whole tensor: one block
        w = torch.from_numpy(_dequantize(src.tensor)).reshape(src.shape)
        yield (unpermute_rows(w, src.heads) if src.heads else w).to(dtype)
        return
    for r in range(0, rows, _ROWS_PER_PART):
        yield torch.from_numpy(_dequantize(src.tensor, r, min(r + _ROWS_PER_PART, rows))).to(dtype)


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse a path that is a file (the GGUF itself, say) and a non-empty directory unless `force`."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory: import into a directory of its own")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out} exists and is not empty: choose a new directory or pass --force")


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"--out {out}: a parent of it is a file") from None


def _commit(out: Path, staged: list[str], force: bool) -> None:
    """Move the staged files into place, first removing (with --force) model files the import does not replace."""
    if force:
        for pattern in _MODEL_FILES:
            for stale in out.glob(pattern):
                if stale.name not in staged and stale.is_file():
                    stale.unlink()
    for name in staged:
        os.replace(out / f"{name}.partial", out / name)


def import_gguf(path: str | Path, out: str | Path, dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """Convert a Llama GGUF into a Hugging Face model directory at `out`; returns a summary."""
    if dtype not in OUT_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not supported; supported: {', '.join(OUT_DTYPES)}")
    t0 = time.perf_counter()
    path, out = Path(path), Path(out)
    source = str(path)
    check_out_dir(out, force)  # before the (slower) reading: a refused --out costs nothing
    reader = read_gguf(path)
    meta = read_metadata(reader, source)
    tensors = {t.name: t for t in reader.tensors}
    config = hf_config(meta, tensors, source, dtype)
    plan = plan_tensors(tensors, config, source)
    check_quantization(plan, source)
    tokenizer = tokenizer_files(meta, source, config["max_position_embeddings"])
    _make_out_dir(out)
    st_dtype, torch_dtype = OUT_DTYPES[dtype]
    texts = {"config.json": config, "generation_config.json": _generation_config(config)}
    staged = [*texts, *tokenizer, "model.safetensors"]
    try:  # every file is written aside first: a failed import never leaves a half-written model in place
        for name, value in {**texts, **tokenizer}.items():
            text = value if isinstance(value, str) else json.dumps(value, indent=2) + "\n"
            (out / f"{name}.partial").write_text(text, encoding="utf-8")
        write_streaming(out / "model.safetensors.partial",
                        [(n, st_dtype, s.shape, lambda s=s: _parts(s, torch_dtype)) for n, s in plan.items()])
        _commit(out, staged, force)
    finally:
        for name in staged:
            (out / f"{name}.partial").unlink(missing_ok=True)
    pre = meta.get("tokenizer.ggml.pre")
    return {"out": str(out), "architecture": config["architectures"][0], "tensors": len(plan),
            "gguf_types": dict(Counter(s.tensor.tensor_type.name for s in plan.values())), "dtype": dtype,
            "bytes": (out / "model.safetensors").stat().st_size, "tie_word_embeddings": config["tie_word_embeddings"],
            "tokenizer": bool(tokenizer), "files": sorted(p.name for p in out.iterdir()),
            "notes": [] if known_pre(pre) or not tokenizer else
            [f"pre-tokenizer {pre!r} is not one import-gguf knows: text is split with GPT-2's regex"],
            "seconds": round(time.perf_counter() - t0, 2)}


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}

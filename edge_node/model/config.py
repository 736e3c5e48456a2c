"""ModelConfig: the frozen description of a Llama-family checkpoint, read from config.json.

Reads both the transformers 4.x spelling (rope_theta, rope_scaling) and the 5.x one
(rope_parameters), so checkpoints from either era load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelConfigError, UnsupportedArchitectureError

# architecture name -> (q/k/v bias by default, model_type)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, str]] = {
    "LlamaForCausalLM": (False, "llama"),
    "MistralForCausalLM": (False, "mistral"),
    "Qwen2ForCausalLM": (True, "qwen2"),
}
_BY_MODEL_TYPE = {mt: arch for arch, (_, mt) in SUPPORTED_ARCHITECTURES.items()}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does the sliding window apply
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_attention_heads // self.num_key_value_heads

    def window_for_layer(self, layer: int) -> int | None:
        if self.sliding_window is None:
            return None
        return self.sliding_window if self.sliding_layers[layer] else None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse(raw, source)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(Path(model_dir) / "config.json"), str(Path(model_dir) / "config.json"))


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(raw: dict[str, Any], key: str, source: str, kind: str, default: Any = _MISSING, positive: bool = True,
         where: str = "field") -> Any:
    """raw[key] checked for JSON type ("int", "float", "bool", "str") and sign, naming the field when wrong.

    None counts as absent (HF configs write null for unset fields).
    """
    value = raw.get(key)
    if value is None:
        if default is _MISSING:
            raise ModelConfigError(f"{source}: missing required {where} {key!r}")
        return default
    ok = {"int": _is_int(value), "float": _is_int(value) or isinstance(value, float),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]
    if kind == "float" and ok and not math.isfinite(value):
        ok = False
    if not ok or (positive and kind in ("int", "float") and value <= 0):
        want = {"int": "integer", "float": "number", "bool": "true or false", "str": "string"}[kind]
        sign = "a positive " if positive and kind in ("int", "float") else "a "
        raise ModelConfigError(f"{source}: {where} {key!r} must be {sign}{want}, got {value!r}")
    return float(value) if kind == "float" else value


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelConfigError(f"{source}: field 'architectures' must be a list of names, got {archs!r}")
    model_type = raw.get("model_type")
    if not archs and isinstance(model_type, str) and model_type in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[model_type]]
    if not archs:
        raise ModelConfigError(f"{source}: missing field 'architectures' (and no known 'model_type')")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    params = raw.get(key) or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{source}: field {key!r} must be a JSON object, got {params!r}")
    where = f"field of {key!r}"
    theta = _get(params, "rope_theta", source, "float", None, where=where)
    theta = theta if theta is not None else _get(raw, "rope_theta", source, "float", 10000.0)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in _ROPE_TYPES:
        raise ModelConfigError(f"{source}: rope type {kind!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    if kind == "default":
        return RopeConfig(theta=theta)
    factor = _get(params, "factor", source, "float", where=f"field of rope scaling {kind!r}:")
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=factor)
    where = "field of rope scaling 'llama3':"
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=factor,
        low_freq_factor=_get(params, "low_freq_factor", source, "float", where=where),
        high_freq_factor=_get(params, "high_freq_factor", source, "float", where=where),
        original_max_position_embeddings=_get(params, "original_max_position_embeddings", source, "int",
                                              where=where),
    )


def _eos_ids(value: Any, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(_is_int(v) and v >= 0 for v in values):
        raise ModelConfigError(f"{source}: field 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return tuple(values)


def _sliding(raw: dict[str, Any], arch: str, layers: int, source: str) -> tuple[int | None, tuple[bool, ...]]:
    window = _get(raw, "sliding_window", source, "int", None)
    if arch == "Qwen2ForCausalLM" and not _get(raw, "use_sliding_window", source, "bool", False):
        window = None
    if window is None:
        return None, (False,) * layers
    types = raw.get("layer_types")
    if types and isinstance(types, list) and len(types) == layers:
        return window, tuple(t == "sliding_attention" for t in types)
    if arch == "Qwen2ForCausalLM":  # older Qwen2 configs: layers from max_window_layers on slide
        first = _get(raw, "max_window_layers", source, "int", layers, positive=False)
        return window, tuple(i >= first for i in range(layers))
    return window, (True,) * layers


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    arch = _architecture(raw, source)
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise ModelConfigError(f"{source}: missing required field(s) {', '.join(map(repr, missing))}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    heads = _get(raw, "num_attention_heads", source, "int")
    kv_heads = _get(raw, "num_key_value_heads", source, "int", heads)
    if heads % kv_heads:
        raise ModelConfigError(
            f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    hidden = _get(raw, "hidden_size", source, "int")
    head_dim = _get(raw, "head_dim", source, "int", hidden // heads)
    if head_dim % 2:
        raise ModelConfigError(f"{source}: head_dim {head_dim} must be even (rotary embeddings pair dimensions)")
    layers = _get(raw, "num_hidden_layers", source, "int")
    window, sliding_layers = _sliding(raw, arch, layers, source)
    qkv_default, _ = SUPPORTED_ARCHITECTURES[arch]
    attention_bias = _get(raw, "attention_bias", source, "bool", False)
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return ModelConfig(
        architecture=arch,
        vocab_size=_get(raw, "vocab_size", source, "int"),
        hidden_size=hidden,
        intermediate_size=_get(raw, "intermediate_size", source, "int"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_get(raw, "max_position_embeddings", source, "int", 2048),
        rms_norm_eps=_get(raw, "rms_norm_eps", source, "float", 1e-6),
        rope=_rope(raw, source),
        tie_word_embeddings=_get(raw, "tie_word_embeddings", source, "bool", False),
        qkv_bias=qkv_default or attention_bias,
        o_bias=attention_bias,
        mlp_bias=_get(raw, "mlp_bias", source, "bool", False),
        sliding_window=window,
        sliding_layers=sliding_layers,
        bos_token_id=_get(raw, "bos_token_id", source, "int", None, positive=False),
        eos_token_ids=_eos_ids(raw.get("eos_token_id"), source),
        torch_dtype=str(dtype),
    )

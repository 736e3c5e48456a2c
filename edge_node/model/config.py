"""ModelConfig: the frozen description of a Llama-family checkpoint, read from config.json.

Reads both the transformers 4.x spelling (rope_theta, rope_scaling) and the 5.x one
(rope_parameters), so checkpoints from either era load.
"""

from __future__ import annotations

import json
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


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in _BY_MODEL_TYPE:
        archs = [_BY_MODEL_TYPE[raw["model_type"]]]
    if not archs:
        raise ModelConfigError(f"{source}: missing field 'architectures' (and no known 'model_type')")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in _ROPE_TYPES:
        raise ModelConfigError(f"{source}: rope type {kind!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    if kind == "default":
        return RopeConfig(theta=theta)
    try:
        factor = float(params["factor"])
    except KeyError:
        raise ModelConfigError(f"{source}: rope scaling {kind!r} needs field 'factor'") from None
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=factor)
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in params:
            raise ModelConfigError(f"{source}: rope scaling 'llama3' needs field {key!r}")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=factor,
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _sliding(raw: dict[str, Any], arch: str, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = raw.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, (False,) * layers
    types = raw.get("layer_types")
    if types and len(types) == layers:
        return int(window), tuple(t == "sliding_attention" for t in types)
    if arch == "Qwen2ForCausalLM":  # older Qwen2 configs: layers from max_window_layers on slide
        first = int(raw.get("max_window_layers", layers))
        return int(window), tuple(i >= first for i in range(layers))
    return int(window), (True,) * layers


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    arch = _architecture(raw, source)
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise ModelConfigError(f"{source}: missing required field(s) {', '.join(map(repr, missing))}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ModelConfigError(
            f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    layers = int(raw["num_hidden_layers"])
    window, sliding_layers = _sliding(raw, arch, layers)
    qkv_default, _ = SUPPORTED_ARCHITECTURES[arch]
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope(raw, source),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_default or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=window,
        sliding_layers=sliding_layers,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )

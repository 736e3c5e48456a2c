"""Generation defaults a model ships in generation_config.json: its EOS ids and repetition penalty.

Every runtime (single node, tensor-parallel ranks, later the coordinator) reads them here, so a flag
the user leaves unset means the same thing everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ModelConfigError


def generation_config(model_dir: str | Path) -> dict[str, Any]:
    """generation_config.json's fields, or {} when the model has none."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def eos_ids(model_dir: str | Path, config: ModelConfig) -> tuple[int, ...]:
    """generation_config.json's eos_token_id wins over config.json's."""
    value = generation_config(model_dir).get("eos_token_id")
    if value is None:
        return config.eos_token_ids
    path = Path(model_dir) / "generation_config.json"
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelConfigError(f"{path}: field 'eos_token_id' must be an integer or a list of integers, got {value!r}")
    return tuple(values)


def repetition_penalty(model_dir: str | Path) -> float:
    """The model's default repetition penalty (1.0 = off)."""
    value = generation_config(model_dir).get("repetition_penalty")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ModelConfigError(f"{Path(model_dir) / 'generation_config.json'}: field 'repetition_penalty' must be "
                               f"a positive number, got {value!r}")
    return float(value)

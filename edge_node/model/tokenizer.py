"""Tokenizer from tokenizer.json (the `tokenizers` library), chat template from tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelConfigError


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as an object
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: Path, config: dict[str, Any]):
        try:
            self.inner = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ModelConfigError(f"{path}: cannot load tokenizer ({e})") from None
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelConfigError(f"{path}: file not found (use --prompt-ids to run without a tokenizer)")
        cfg_path = d / "tokenizer_config.json"
        try:
            config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        return cls(path, config)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.inner.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ModelConfigError("this model's tokenizer_config.json has no chat_template")
        import jinja2  # only chat users pay for it

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )


def _raise(message: str) -> None:
    raise ModelConfigError(f"chat template: {message}")

"""Tokenizer from tokenizer.json (the `tokenizers` library); chat template from chat_template.jinja or
tokenizer_config.json.

A chat template is code from whoever published the model directory, so it runs in Jinja's immutable sandbox
with the helpers transformers gives templates (and nothing more), and whatever goes wrong in it becomes a
ModelConfigError naming the file it came from.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer as _HFTokenizer

from .errors import EdgefedError, ModelConfigError

# The named special tokens transformers hands every template (its special_tokens_map).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes


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
        self.model_dir = Path(path).parent
        self.chat_template, self.template_file = _find_template(self.model_dir, config)
        tokens = {name: _token_text(config.get(name)) for name in _SPECIAL_TOKENS}
        self.bos_token, self.eos_token = tokens["bos_token"], tokens["eos_token"]
        self._template_vars = {k: v for k, v in tokens.items() if v is not None}
        self._template_vars.update(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        self._compiled: jinja2.Template | None = None  # compiled on first use

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelConfigError(f"{path}: file not found (use --prompt-ids to run without a tokenizer)")
        cfg_path = d / "tokenizer_config.json"
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
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
        """The messages rendered by the model's template, with the variables transformers passes, so the text
        (and so the prompt's tokens) is the one the model was tuned on."""
        template = self._template()
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **self._template_vars)
        except ModelConfigError as e:  # the template called raise_exception
            raise ModelConfigError(f"{self.template_file}: {e}") from None
        except Exception as e:  # a stranger's code: any failure is the model directory's fault, never a traceback
            raise ModelConfigError(f"{self.template_file}: chat template {_failure(e)}") from None

    def _template(self) -> jinja2.Template:
        """The compiled template, cached: compiling costs far more than rendering one conversation."""
        if self._compiled is None:
            if not self.chat_template:
                raise ModelConfigError(f"{self.model_dir}: no chat template (neither chat_template.jinja nor a "
                                       "chat_template in tokenizer_config.json)")
            try:
                self._compiled = _environment().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                line = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
                raise ModelConfigError(f"{self.template_file}: chat template is not valid Jinja{line}: "
                                       f"{e.message}") from None
        return self._compiled


def _find_template(model_dir: Path, config: dict[str, Any]) -> tuple[str | None, Path]:
    """The template and the file it came from: chat_template.jinja wins over tokenizer_config.json, as in
    transformers, since it is where save_pretrained writes templates today."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8"), jinja_path
        except (OSError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{jinja_path}: cannot read chat template ({e})") from None
    cfg_path = model_dir / "tokenizer_config.json"
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value, cfg_path
    if not isinstance(value, list):
        raise ModelConfigError(f"{cfg_path}: chat_template must be a string or a list of {{name, template}} "
                               f"objects, not {type(value).__name__}")
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if not isinstance(named.get("default"), str):
        raise ModelConfigError(f"{cfg_path}: chat_template lists templates {sorted(map(str, named))} but none "
                               "named 'default' (edgefed uses the default one)")
    return named["default"], cfg_path


def _failure(e: Exception) -> str:
    if isinstance(e, SecurityError):
        return f"refused: it tried to reach outside the sandbox ({e})"
    return f"failed to render ({type(e).__name__}: {e})"


class _Generation(jinja2.ext.Extension):
    """`{% generation %}` marks the assistant's text for transformers' training masks; here it renders as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot plant or read internals on it."""

    def __init__(*args: Any, **kwargs: Any):  # Jinja's own signature trick: namespace(self=...) still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """Jinja's immutable sandbox (templates can neither reach Python internals nor change the caller's messages)
    set up as transformers sets it up, so that the templates published for it render the same text here."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", jinja2.__version__)
    if found is None or tuple(map(int, found.groups())) < _MIN_JINJA:
        raise EdgefedError(f"chat templates need jinja2>=3.1.6 (older versions have known sandbox escapes); "
                           f"this is jinja2 {jinja2.__version__}: pip install -U jinja2")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env


def _raise_exception(message: str) -> None:
    """Templates call this to refuse a conversation they cannot format (say, roles out of order)."""
    raise ModelConfigError(f"chat template raised an error: {message}")


def _strftime_now(fmt: str) -> str:
    """Templates that print today's date in the system prompt (Llama 3.1 and later) call this."""
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps, not Jinja's HTML-escaping filter, so tool schemas read as written."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """`dict` for templates: builds dicts, but is no class a template could climb through."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)

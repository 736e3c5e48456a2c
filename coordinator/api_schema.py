"""OpenAI request bodies, checked field by field: every refusal is an ApiError naming the field.

Types are strict (no "10" for 10, no true for 1); unknown fields are ignored, as most OpenAI-compatible
servers do; parameters edgefed does not implement are refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
SEED_MAX = 2**63 - 1


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(body: bytes) -> dict:
    """The body as a JSON object (400 naming what is wrong otherwise; NaN and Infinity are not JSON)."""
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(body.decode("utf-8"), parse_constant=refuse_constant)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 (byte {e.start})", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, the constants above
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class EarlyExit(BaseModel):
    """The early_exit extension: where tokens may leave (a deployment with exit heads only)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    mode: Literal["standalone", "collaborative", "off"] = "standalone"
    threshold: float = Field(0.9, ge=0, le=1)
    criterion: Literal["max_prob", "margin"] = "max_prob"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list after validation
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    user: str | None = None
    return_token_ids: bool = False  # an extension (as vLLM's): each choice or chunk also carries its token ids
    early_exit: EarlyExit | None = None  # an extension: early exit and the cloud tier (usage then says where)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")
        return stops

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=1_000_000)  # OpenAI's default for completions
    echo: Literal[False] = False
    logprobs: Literal[0] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError(f"give one prompt (batches are not supported), got {len(v)}")
            v = v[0]
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """{role, content} as chat templates take it (developer is the newer name of system)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)  # the newer name of max_tokens
    logprobs: Literal[False] | None = None
    tools: list[Any] | None = Field(None, max_length=0)
    response_format: dict[str, Literal["text"]] | None = None


def parse_request(kind: type[_Request], data: dict) -> _Request:
    """A validated request, or a 400 naming the first bad field."""
    try:
        req = kind.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        param = field_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"][0] in _UNSUPPORTED:
            msg = f"{_UNSUPPORTED[err['loc'][0]]} ({msg})"
        elif len(errors) > 1 and _is_union(err["loc"]):  # every member of a union refused it
            msg = f"must be {_UNIONS.get(_union_name(err['loc']), 'of another type')}"
        raise ApiError(400, f"{param}: {msg}", param=param, code=_code(err["type"])) from None
    req.check()
    return req


_UNSUPPORTED = {
    "n": "only n=1 is supported", "presence_penalty": "presence_penalty is not supported",
    "frequency_penalty": "frequency_penalty is not supported", "echo": "echo is not supported",
    "best_of": "best_of is not supported", "suffix": "suffix is not supported",
    "logprobs": "logprobs is not supported", "logit_bias": "logit_bias is not supported",
    "tools": "tools are not supported", "response_format": "only the text response format is supported",
}


def field_path(loc: tuple) -> str:
    """('messages', 1, 'role') -> 'messages[1].role'; pydantic's union member tags ('str', 'list[int]') dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_tag(part):
            continue
        else:
            out += f".{part}" if out else part
    return out


_UNIONS = {"prompt": "a string, a list of token ids, or a list of one of those", "stop": "a string or a list of "
           "strings", "content": "a string or a list of {type: text, text} parts"}


def _is_union(loc: tuple) -> bool:
    return any(isinstance(p, str) and _is_tag(p) for p in loc)


def _union_name(loc: tuple) -> str:
    """The field a union belongs to: the last name before the first member tag."""
    names = []
    for part in loc:
        if isinstance(part, str) and _is_tag(part):
            break
        names.append(part)
    return next((p for p in reversed(names) if isinstance(p, str)), "")


def _is_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool")


def _code(pydantic_type: str) -> str:
    if pydantic_type == "missing":
        return "missing_field"
    if pydantic_type.endswith("_type") or pydantic_type in ("literal_error", "model_type", "list_type"):
        return "invalid_type"
    return "invalid_value"

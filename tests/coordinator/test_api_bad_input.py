"""Bad HTTP input gets a 4xx with an OpenAI-style JSON error naming the field, never a 500 or a traceback."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from coordinator.api import ApiConfig, Deployment, create_app
from tests.coordinator.conftest import ADMIN_KEY, USER_KEY, auth, verifier

OK = {"model": "demo", "prompt": "def f(x):", "max_tokens": 2}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}


def body(base: dict, **changes) -> bytes:
    return json.dumps({k: v for k, v in {**base, **changes}.items() if v is not _DROP}).encode()


_DROP = object()
C, H = "/v1/completions", "/v1/chat/completions"

# (path, raw body, extra headers, status, param (None: not checked), code or None)
CASES = {
    "malformed json": (C, b'{"model": "demo", "prompt": ', JSON, 400, None, "invalid_json"),
    "body is a list": (C, b"[1, 2]", JSON, 400, None, "invalid_json"),
    "empty body": (C, b"", JSON, 400, None, "invalid_json"),
    "NaN is not JSON": (C, b'{"model": "demo", "prompt": "x", "temperature": NaN}', JSON, 400, None, "invalid_json"),
    "not utf-8": (C, b'\xff\xfe{"model"', JSON, 400, None, "invalid_json"),
    "nested too deeply": (C, b"[" * 200_000, JSON, 400, None, "invalid_json"),
    "model missing": (C, body(OK, model=_DROP), JSON, 400, "model", "missing_field"),
    "model not a string": (C, body(OK, model=5), JSON, 400, "model", "invalid_type"),
    "model unknown": (C, body(OK, model="gpt-9"), JSON, 404, "model", "model_not_found"),
    "prompt missing": (C, body(OK, prompt=_DROP), JSON, 400, "prompt", "missing_field"),
    "prompt a number": (C, body(OK, prompt=12), JSON, 400, "prompt", "invalid_type"),
    "prompt mixed list": (C, body(OK, prompt=[1, "a"]), JSON, 400, "prompt", "invalid_type"),
    "prompt batch": (C, body(OK, prompt=["a", "b"]), JSON, 400, "prompt", "invalid_value"),
    "prompt empty": (C, body(OK, prompt=""), JSON, 400, "prompt", "invalid_value"),
    "prompt id past vocab": (C, body(OK, prompt=[1, 99_999]), JSON, 400, "prompt", "invalid_value"),
    "prompt id negative": (C, body(OK, prompt=[-1]), JSON, 400, "prompt", "invalid_value"),
    "prompt too long": (C, body(OK, prompt=[5] * 600), JSON, 400, "prompt", "context_length_exceeded"),
    "max_tokens 0": (C, body(OK, max_tokens=0), JSON, 400, "max_tokens", "invalid_value"),
    "max_tokens a string": (C, body(OK, max_tokens="5"), JSON, 400, "max_tokens", "invalid_type"),
    "max_tokens a float": (C, body(OK, max_tokens=1.5), JSON, 400, "max_tokens", "invalid_type"),
    "max_tokens a bool": (C, body(OK, max_tokens=True), JSON, 400, "max_tokens", "invalid_type"),
    "max_tokens past context": (C, body(OK, max_tokens=600), JSON, 400, "max_tokens", "context_length_exceeded"),
    "max_tokens huge": (C, body(OK, max_tokens=10**30), JSON, 400, "max_tokens", None),
    "temperature negative": (C, body(OK, temperature=-0.1), JSON, 400, "temperature", "invalid_value"),
    "temperature above 2": (C, body(OK, temperature=2.5), JSON, 400, "temperature", "invalid_value"),
    "temperature a string": (C, body(OK, temperature="hot"), JSON, 400, "temperature", "invalid_type"),
    "top_p above 1": (C, body(OK, top_p=1.5), JSON, 400, "top_p", "invalid_value"),
    "top_p negative": (C, body(OK, top_p=-1), JSON, 400, "top_p", "invalid_value"),
    "seed negative": (C, body(OK, seed=-1), JSON, 400, "seed", "invalid_value"),
    "seed past 2**63": (C, body(OK, seed=2**64), JSON, 400, "seed", None),
    "seed a float": (C, body(OK, seed=1.5), JSON, 400, "seed", "invalid_type"),
    "stop a number": (C, body(OK, stop=5), JSON, 400, "stop", "invalid_type"),
    "five stops": (C, body(OK, stop=list("abcde")), JSON, 400, "stop", "invalid_value"),
    "empty stop": (C, body(OK, stop=[""]), JSON, 400, "stop", "invalid_value"),
    "stream not a bool": (C, body(OK, stream="yes"), JSON, 400, "stream", "invalid_type"),
    "stream_options without stream": (C, body(OK, stream_options={"include_usage": True}), JSON, 400,
                                      "stream_options", None),
    "n 2": (C, body(OK, n=2), JSON, 400, "n", "invalid_value"),
    "echo": (C, body(OK, echo=True), JSON, 400, "echo", None),
    "logprobs": (C, body(OK, logprobs=5), JSON, 400, "logprobs", None),
    "presence_penalty": (C, body(OK, presence_penalty=0.5), JSON, 400, "presence_penalty", None),
    "logit_bias": (C, body(OK, logit_bias={"1": 5.0}), JSON, 400, "logit_bias", None),
    "text/plain": (C, body(OK), {"content-type": "text/plain"}, 415, None, "unsupported_media_type"),
    "no content type": (C, body(OK), {}, 415, None, "unsupported_media_type"),
    "form body": (C, b"model=demo&prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 415, None,
                  "unsupported_media_type"),
    "oversized body": (C, body(OK, prompt="x" * (1 << 20)), JSON, 413, None, "body_too_large"),
    "chat messages empty": (H, body(CHAT, messages=[]), JSON, 400, "messages", "invalid_value"),
    "chat messages a string": (H, body(CHAT, messages="hi"), JSON, 400, "messages", "invalid_type"),
    "chat messages missing": (H, body(CHAT, messages=_DROP), JSON, 400, "messages", "missing_field"),
    "chat bad role": (H, body(CHAT, messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]),
                      JSON, 400, "messages[1].role", "invalid_type"),
    "chat content missing": (H, body(CHAT, messages=[{"role": "user"}]), JSON, 400, "messages[0].content",
                             "missing_field"),
    "chat content a number": (H, body(CHAT, messages=[{"role": "user", "content": 3}]), JSON, 400,
                              "messages[0].content", "invalid_type"),
    "chat image part": (H, body(CHAT, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), JSON, 400,
                        "messages[0].content", "invalid_type"),
    "chat message not an object": (H, body(CHAT, messages=["hi"]), JSON, 400, "messages[0]", "invalid_type"),
    "chat refused by the template": (H, body(CHAT, messages=[{"role": "assistant", "content": "hi"}]), JSON, 400,
                                     "messages", "invalid_value"),
    "chat too long": (H, body(CHAT, messages=[{"role": "user", "content": "word " * 2000}]), JSON, 400,
                      "messages", "context_length_exceeded"),
    "chat max_completion_tokens 0": (H, body(CHAT, max_completion_tokens=0), JSON, 400, "max_completion_tokens",
                                     "invalid_value"),
    "chat tools": (H, body(CHAT, tools=[{"type": "function"}]), JSON, 400, "tools", None),
    "chat response_format json": (H, body(CHAT, response_format={"type": "json_object"}), JSON, 400,
                                  "response_format.type", None),
    "chat unknown model": (H, body(CHAT, model="nope"), JSON, 404, "model", "model_not_found"),
}


@pytest.fixture(scope="module")
def client(demo_chat_dir, local_backend):
    dep = Deployment.for_model("demo", demo_chat_dir, local_backend)
    app = create_app({"demo": dep}, verifier(USER_KEY), verifier(ADMIN_KEY), ApiConfig())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_named_4xx(client, case):
    path, raw, headers, status, param, code = CASES[case]
    r = client.post(path, content=raw, headers={**auth(), **headers})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param or param is None
    if param is not None:
        assert param.split("[")[0].split(".")[0] in error["message"]
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in r.text


def test_at_least_thirty_bad_inputs():
    assert len(CASES) >= 30


@pytest.mark.parametrize("method, path, status", [("GET", C, 405), ("POST", "/v1/nowhere", 404),
                                                  ("DELETE", "/v1/models", 405)])
def test_unknown_routes_and_methods_get_json_errors(client, method, path, status):
    r = client.request(method, path, headers=auth())
    assert r.status_code == status and r.json()["error"]["message"]


def test_a_body_larger_than_its_content_length_claims_is_still_refused(demo_chat_dir, local_backend, keys):
    app = create_app({"demo": Deployment.for_model("demo", demo_chat_dir, local_backend)}, *keys,
                     ApiConfig(max_body_bytes=1000))

    def chunks():  # sent chunked: no Content-Length to refuse it by
        yield b'{"model": "demo", "prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    with TestClient(app) as c:
        r = c.post(C, content=chunks(), headers={**auth(), **JSON})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

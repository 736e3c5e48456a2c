"""The OpenAI-compatible API in process, on the demo model (LocalBackend): semantics, streaming, auth, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from coordinator.api import ApiConfig, Deployment, create_app
from coordinator.api_schema import ApiError
from coordinator.metrics import NodeSample
from edge_node.model.tokenizer import Tokenizer
from tests.coordinator.conftest import ADMIN_KEY, USER_KEY, auth


@pytest.fixture(scope="module")
def demo(demo_chat_dir, local_backend) -> Deployment:
    return Deployment.for_model("demo", demo_chat_dir, local_backend)


@pytest.fixture
def client(demo, keys):
    nodes = [NodeSample("node-a", "ready", 8 << 30, 5 << 30, 12.5, 1.5)]
    with TestClient(create_app({"demo": demo}, *keys, nodes=lambda: nodes)) as c:
        yield c


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b[6:]) for b in blocks[:-1]]


def test_greedy_completion_is_the_runtimes_greedy_output(client, demo, reference):
    prompt = "def fibonacci(n):"
    r = client.post("/v1/completions", headers=auth(), json={"model": "demo", "prompt": prompt, "max_tokens": 24,
                                                              "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_ids = demo.tokenizer.encode(prompt)
    want = reference(prompt_ids, 24)
    choice = body["choices"][0]
    assert choice["token_ids"] == want
    assert choice["text"] == demo.tokenizer.decode(want)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 24,
                             "total_tokens": len(prompt_ids) + 24}
    assert body["object"] == "text_completion" and body["model"] == "demo"


def test_streamed_chunks_join_to_the_whole_answer(client):
    req = {"model": "demo", "prompt": "import os\n", "max_tokens": 20, "temperature": 0}
    whole = client.post("/v1/completions", headers=auth(), json=req).json()
    r = client.post("/v1/completions", headers=auth(),
                    json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    *chunks, usage = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert len({c["id"] for c in events}) == 1


def test_chat_uses_the_models_template_and_streams_deltas(client, demo, reference):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
    text = demo.tokenizer.apply_chat_template(messages)
    want = reference(demo.tokenizer.encode(text, add_special_tokens=False), 16)
    body = client.post("/v1/chat/completions", headers=auth(),
                       json={"model": "demo", "messages": messages, "max_tokens": 16, "temperature": 0}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": demo.tokenizer.decode(want)}
    r = client.post("/v1/chat/completions", headers=auth(), json={
        "model": "demo", "messages": messages, "max_completion_tokens": 16, "temperature": 0, "stream": True})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == demo.tokenizer.decode(want)
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_a_stop_string_ends_the_answer_before_it(client, demo):
    req = {"model": "demo", "prompt": "class A:\n", "max_tokens": 40, "temperature": 0}
    full = client.post("/v1/completions", headers=auth(), json=req).json()["choices"][0]["text"]
    stop = full[len(full) // 3:len(full) // 3 + 3]
    assert stop.strip(), f"pick a stop from inside {full!r}"
    want = full[:full.index(stop)]
    for stream in (False, True):
        r = client.post("/v1/completions", headers=auth(), json={**req, "stop": [stop, "\x00never"],
                                                                  "stream": stream})
        if stream:
            chunks = sse_events(r.text)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert (text, reason) == (want, "stop")


def test_sampling_follows_the_seed(client):
    req = {"model": "demo", "prompt": "def", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9}
    texts = [client.post("/v1/completions", headers=auth(), json={**req, "seed": s}).json()["choices"][0]["text"]
             for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1, "different seeds should sample different text"


def test_max_tokens_defaults_to_16_for_completions(client, local_backend):
    r = client.post("/v1/completions", headers=auth(), json={"model": "demo", "prompt": "x = ", "temperature": 0,
                                                              "return_token_ids": True})
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == 16 or choice["token_ids"][-1] in local_backend.eos_ids


def test_models_health_and_auth(client, demo):
    models = client.get("/v1/models", headers=auth()).json()
    assert [m["id"] for m in models["data"]] == ["demo"] and models["object"] == "list"
    assert client.get("/v1/models/demo", headers=auth(ADMIN_KEY)).json()["context_length"] == demo.context_length
    assert client.get("/health").json()["status"] == "ok"
    for headers, code in (({}, "missing_api_key"), (auth("efk.0123456789ab.wrong"), "invalid_api_key"),
                          ({"Authorization": f"Basic {USER_KEY}"}, "missing_api_key")):
        r = client.post("/v1/completions", headers=headers, json={"model": "demo", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == code
        assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/admin/deployments", headers=auth(USER_KEY), json={"model": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/admin/deployments", headers=auth(ADMIN_KEY), json={"model": "x"})
    assert r.status_code == 501


def test_admin_deploy_is_the_injected_handler(demo, keys):
    seen = []

    async def deploy(body: dict) -> dict:
        if "model" not in body:
            raise ApiError(400, "model: field required", param="model")
        seen.append(body)
        return {"deployment": body["name"], "nodes": 2}

    with TestClient(create_app({}, *keys, deploy=deploy)) as c:
        r = c.post("/admin/deployments", headers=auth(ADMIN_KEY), json={"model": "m", "name": "d"})
        assert (r.status_code, r.json()) == (200, {"deployment": "d", "nodes": 2}) and seen == [{"model": "m",
                                                                                                  "name": "d"}]
        r = c.post("/admin/deployments", headers=auth(ADMIN_KEY), json={"name": "d"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_health_and_metrics_can_require_a_key(demo, keys):
    with TestClient(create_app({"demo": demo}, *keys, ApiConfig(auth_health=True, auth_metrics=True))) as c:
        assert c.get("/health").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth()).status_code == 200


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


def test_metrics_count_requests_tokens_latency_and_nodes(client):
    client.post("/v1/completions", headers=auth(), json={"model": "demo", "prompt": "a", "max_tokens": 5,
                                                          "temperature": 0, "stop": "\x00"})
    client.post("/v1/completions", headers=auth(), json={"model": "demo", "prompt": "a", "max_tokens": 5000})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = r.text
    assert metric(m, "edgefed_requests_total", deployment="demo", status="200") == 1
    assert metric(m, "edgefed_requests_total", deployment="demo", status="400") == 1
    tokens = metric(m, "edgefed_generated_tokens_total", deployment="demo")
    assert 1 <= tokens <= 5
    assert metric(m, "edgefed_time_to_first_token_seconds_count", deployment="demo") == 1
    assert metric(m, "edgefed_token_latency_seconds_count", deployment="demo") == tokens - 1
    assert metric(m, "edgefed_queue_depth", deployment="demo") == 0
    assert metric(m, "edgefed_node_memory_available_bytes", node="node-a") == 5 << 30
    assert metric(m, "edgefed_node_heartbeat_age_seconds", node="node-a") == 1.5
    assert metric(m, "edgefed_node_state", node="node-a", state="ready") == 1


def test_a_metrics_scrape_survives_a_failing_node_source(demo, keys):
    def broken():
        raise RuntimeError("state store unavailable")

    with TestClient(create_app({"demo": demo}, *keys, nodes=broken)) as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "edgefed_requests" in r.text



def test_two_generations_at_once_on_one_model_equal_their_sequential_runs(demo_chat_dir, local_backend, keys,
                                                                            reference, demo):
    import asyncio

    import httpx

    dep = Deployment.for_model("demo", demo_chat_dir, local_backend, max_concurrency=2)
    app = create_app({"demo": dep}, *keys)
    prompts = ["import sys\n", "class Point:\n"]

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/completions", headers=auth(), json={
                "model": "demo", "prompt": p, "max_tokens": 16, "temperature": 0, "return_token_ids": True})
                for p in prompts))

    answers = asyncio.run(main())
    for p, r in zip(prompts, answers, strict=True):
        assert r.json()["choices"][0]["token_ids"] == reference(demo.tokenizer.encode(p), 16)
    assert app.state.service.gates["demo"].concurrency == 2


def test_streamed_multibyte_text_never_splits_a_character(keys):
    import asyncio

    import httpx

    from tests.coordinator.conftest import DEMO, ScriptedBackend

    tok = Tokenizer.from_dir(DEMO)
    text = "東京 🙂 naïve — ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # byte-level pieces: characters span several tokens
    app = create_app({"s": Deployment("s", ScriptedBackend(ids), tok, 512, 8192)}, *keys)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post("/v1/completions", headers=auth(), json={"model": "s", "prompt": "x",
                                                                         "max_tokens": 100, "stream": True})

    chunks = [c["choices"][0]["text"] for c in sse_events(asyncio.run(main()).text)]
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    assert len([c for c in chunks if c]) > 3


REAL = Path.home() / ".cache" / "edgefed" / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "config.json").is_file(), reason=f"{REAL} absent (make real-model)")
def test_real_chat_model_answers_through_its_template_and_stops_at_its_end_token(keys):
    from coordinator.api import local_deployment

    dep = local_deployment(REAL, "smol")
    try:
        with TestClient(create_app({"smol": dep}, *keys)) as c:
            r = c.post("/v1/chat/completions", headers=auth(), json={
                "model": "smol", "max_tokens": 40, "temperature": 0, "return_token_ids": True,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    finally:
        dep.backend.close()
    choice = r.json()["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop" and choice["token_ids"][-1] in dep.backend.eos_ids
    assert "<|im_end|>" not in choice["message"]["content"]

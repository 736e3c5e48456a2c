"""The API as a real uvicorn process on loopback, driven by the real `openai` client: completions and chat,
streamed and whole, token-identical to edge_node.model.decode.generate's greedy output; a client that drops a
stream cancels its generation on the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.coordinator.conftest import ADMIN_KEY, USER_KEY

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(demo_chat_dir):
    env = {**os.environ, "EDGEFED_TEST_API_KEY": USER_KEY, "EDGEFED_TEST_ADMIN_KEY": ADMIN_KEY,
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.coordinator.serve_api", str(demo_chat_dir), "demo"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not line or not line[0].startswith("PORT "):
            proc.kill()
            pytest.fail(f"the API server did not start: {proc.stderr.read()[-2000:]}")
        yield f"http://127.0.0.1:{int(line[0].split()[1])}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=USER_KEY, timeout=30, max_retries=0)


@pytest.fixture(scope="module")
def tok(demo_chat_dir):
    from edge_node.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(demo_chat_dir)


PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.mark.slow
def test_openai_completions_whole_and_streamed_equal_single_node_greedy(client, tok, reference):
    want = reference(tok.encode(PROMPT), 24)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == want
    assert r.choices[0].text == tok.decode(want) and r.usage.completion_tokens == len(want)
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    assert [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]] == want
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tok.decode(want)
    assert chunks[-1].usage.completion_tokens == len(want) and chunks[-2].choices[0].finish_reason == "length"


@pytest.mark.slow
def test_openai_chat_whole_and_streamed_equal_single_node_greedy(client, tok, reference):
    want = reference(tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False), 20)
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == tok.decode(want) and r.usage.completion_tokens == len(want)
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == tok.decode(want)
    assert [m.id for m in client.models.list()] == ["demo"]


@pytest.mark.slow
def test_a_wrong_key_is_refused(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="efk.0123456789ab.wrong", timeout=10, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="demo", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"


@pytest.mark.slow
def test_a_dropped_stream_cancels_the_generation_on_the_server(client, server):
    stream = client.completions.create(model="demo", prompt="import", max_tokens=480, temperature=1.0, seed=3,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server}/metrics", timeout=5).text
        if 'edgefed_requests_total{deployment="demo",status="499"} 1.0' in metrics:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the server did not record the dropped stream within 5 s")
    assert 'edgefed_running_requests{deployment="demo"} 0.0' in metrics

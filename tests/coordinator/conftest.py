"""Fixtures for the coordinator's user API: the demo model with a chat template, a scripted backend, keys."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from coordinator.backend import BackendError, FinishEvent, GenerationRequest, TokenEvent

DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"
USER_KEY, ADMIN_KEY = "efk.0123456789ab.user-secret", "efa.0123456789ab.admin-secret"

# A small ChatML-like template (the demo model ships none); it refuses a conversation that opens with the assistant.
CHAT_TEMPLATE = """{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the conversation must not open with \
the assistant') }}{% endif %}{% for m in messages %}<|{{ m['role'] }}|>
{{ m['content'] }}
{% endfor %}{% if add_generation_prompt %}<|assistant|>
{% endif %}"""


@pytest.fixture(scope="session")
def demo_chat_dir(tmp_path_factory) -> Path:
    """models/edgefed-demo plus chat_template.jinja (weights linked, not copied)."""
    d = tmp_path_factory.mktemp("demo-chat")
    for f in DEMO.iterdir():
        if f.suffix == ".safetensors":
            (d / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copy(f, d / f.name)
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return d


@pytest.fixture(scope="session")
def local_backend(demo_chat_dir):
    from coordinator.backend import LocalBackend

    backend = LocalBackend(demo_chat_dir)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def reference(demo_chat_dir):
    """edge_node.model.decode.generate's greedy ids for a prompt, with the model's own EOS ids and penalty."""
    import torch

    from edge_node.model import SamplingConfig, generate
    from edge_node.model.generation_config import eos_ids, repetition_penalty
    from edge_node.model.load import load_model

    model = load_model(demo_chat_dir, torch.float32)
    sampling = SamplingConfig(greedy=True, repetition_penalty=repetition_penalty(demo_chat_dir))

    def run(prompt_ids: list[int], n: int) -> list[int]:
        return generate(model, prompt_ids, n, sampling, eos_ids(demo_chat_dir, model.config)).token_ids
    return run


def verifier(*keys: str):
    """A key check as the coordinator builds it from coordinator/security.py: stored hashes, constant-time compare."""
    from coordinator.security import hash_secret, verify_secret

    stored = [hash_secret(k) for k in keys]
    return lambda key: any(verify_secret(key, h) for h in stored)


@pytest.fixture
def keys():
    return verifier(USER_KEY), verifier(ADMIN_KEY)


def auth(key: str = USER_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class ScriptedBackend:
    """A backend that plays a fixed token script at a set pace (or hangs, or fails), and records cancels."""

    def __init__(self, tokens: list[int], delay_s: float = 0.0, first_delay_s: float = 0.0,
                 fail_after: int | None = None, reason: str = "length"):
        self.tokens, self.delay_s, self.first_delay_s = tokens, delay_s, first_delay_s
        self.fail_after, self.reason = fail_after, reason
        self.requests: list[GenerationRequest] = []
        self.cancelled_at: list[float] = []  # time.monotonic() when each early close reached the backend
        self.sent = 0

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        finished = False
        try:
            await asyncio.sleep(self.first_delay_s)
            for i, t in enumerate(self.tokens[:request.max_new_tokens]):
                if self.fail_after is not None and i == self.fail_after:
                    raise BackendError("rank 1 died (exit status -9)")
                if i:
                    await asyncio.sleep(self.delay_s)
                self.sent += 1
                yield TokenEvent(t)
            finished = True
            yield FinishEvent(self.reason if len(self.tokens) <= request.max_new_tokens else "length")
        finally:
            if not finished:
                self.cancelled_at.append(time.monotonic())


async def call_asgi(app, path: str, body: dict, disconnect_when, headers: dict | None = None,
                    timeout_s: float = 10.0) -> tuple[list[dict], float | None]:
    """Drive the ASGI app as a server would, with a client that disconnects once `disconnect_when(sent)` holds
    (sent: the messages the app has sent so far) or after `disconnect_when` seconds. Returns (sent, when the
    disconnect happened as time.monotonic())."""
    data = json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **auth(), **(headers or {})}
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    sent: list[dict] = []
    gone = asyncio.Event()
    state = {"body": False, "at": None}

    def disconnect() -> None:
        if not gone.is_set():
            state["at"] = time.monotonic()
            gone.set()

    async def receive() -> dict:
        if not state["body"]:
            state["body"] = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if callable(disconnect_when) and disconnect_when(sent):
            disconnect()

    timer = None
    if not callable(disconnect_when):
        timer = asyncio.get_running_loop().call_later(disconnect_when, disconnect)
    try:
        await asyncio.wait_for(app(scope, receive, send), timeout_s)
    finally:
        if timer:
            timer.cancel()
    return sent, state["at"]

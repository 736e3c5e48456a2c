"""Queueing, cancellation and timeouts: 429 when a deployment's queue is full, a disconnect cancels the backend's
work within a bound, a stalled backend is a 504, a failing one an error (an SSE error event once streaming)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from coordinator.api import ApiConfig, Deployment, create_app
from coordinator.api_queue import Gate, QueueFull
from edge_node.model.tokenizer import Tokenizer
from tests.coordinator.conftest import DEMO, ScriptedBackend, auth, call_asgi

CANCEL_BOUND_S = 1.0  # disconnect -> the backend has stopped


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEMO)


def deployment(tok, backend, **kw) -> Deployment:
    return Deployment("s", backend, tok, 512, 8192, **kw)


def app_for(dep: Deployment, keys, **config):
    return create_app({dep.name: dep}, *keys, ApiConfig(**config))


def request(stream: bool = False, **kw) -> dict:
    return {"model": "s", "prompt": "x", "max_tokens": 100, "stream": stream, **kw}


def body_text(sent: list[dict]) -> str:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


async def until(predicate, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out waiting for the condition"
        await asyncio.sleep(0.01)


def test_the_gate_admits_in_order_and_refuses_past_its_depth():
    async def main():
        gate = Gate(concurrency=1, depth=2)
        order = []
        await gate.acquire(1)

        async def waiter(name):
            await gate.acquire(5)
            order.append(name)

        tasks = [asyncio.create_task(waiter(n)) for n in "ab"]
        await until(lambda: gate.waiting == 2)
        with pytest.raises(QueueFull) as full:
            await gate.acquire(1)
        assert full.value.retry_after_s >= 1
        gate.release(0.5)
        await until(lambda: order == ["a"])
        gate.release(0.5)
        await asyncio.gather(*tasks)
        assert order == ["a", "b"] and gate.running == 1 and gate.waiting == 0
        with pytest.raises(TimeoutError):
            await gate.acquire(0.05)
        assert gate.waiting == 0  # a waiter that gave up leaves the queue
    asyncio.run(main())


def test_a_full_queue_is_a_429_with_retry_after(tok, keys):
    backend = ScriptedBackend(list(range(10, 40)), delay_s=0.02)
    dep = deployment(tok, backend, max_concurrency=1, max_queue=1)
    app = app_for(dep, keys)
    gates = app.state.service.gates

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=10) as c:
            first = asyncio.create_task(c.post("/v1/completions", json=request(), headers=auth()))
            await until(lambda: "s" in gates and gates["s"].running == 1)
            second = asyncio.create_task(c.post("/v1/completions", json=request(), headers=auth()))
            await until(lambda: gates["s"].waiting == 1)
            third = await c.post("/v1/completions", json=request(), headers=auth())
            assert third.status_code == 429
            assert int(third.headers["retry-after"]) >= 1
            assert third.json()["error"]["code"] == "queue_full"
            done = await asyncio.gather(first, second)
            assert [r.status_code for r in done] == [200, 200]
            assert [r.json()["usage"]["completion_tokens"] for r in done] == [30, 30]
            metrics = (await c.get("/metrics")).text
        assert 'edgefed_requests_total{deployment="s",status="429"} 1.0' in metrics
        assert 'edgefed_requests_total{deployment="s",status="200"} 2.0' in metrics
    asyncio.run(main())


def test_a_disconnect_mid_stream_stops_the_local_generation(demo_chat_dir, local_backend, keys):
    dep = Deployment.for_model("demo", demo_chat_dir, local_backend)
    app = create_app({"demo": dep}, *keys)

    async def main():
        body = {"model": "demo", "prompt": "def f(x):", "max_tokens": 480, "temperature": 1.0, "seed": 0,
                "stream": True}
        sent, at = await call_asgi(app, "/v1/completions", body,
                                   lambda sent: sum(m["type"] == "http.response.body" for m in sent) >= 3)
        assert at is not None and sent[0]["status"] == 200
        await until(lambda: local_backend.active == 0, CANCEL_BOUND_S)
        return time.monotonic() - at

    stopped_after = asyncio.run(main())
    assert stopped_after < CANCEL_BOUND_S
    metrics = app.state.service.metrics.render()[0].decode()
    assert 'edgefed_requests_total{deployment="demo",status="499"} 1.0' in metrics
    generated = next(float(x.split()[-1]) for x in metrics.splitlines()
                     if x.startswith('edgefed_generated_tokens_total{deployment="demo"}'))
    assert generated < 480


@pytest.mark.parametrize("stream", [False, True])
def test_a_disconnect_before_the_answer_cancels_the_backend(tok, keys, stream):
    backend = ScriptedBackend(list(range(10, 110)), delay_s=0.02, first_delay_s=0.1)
    app = app_for(deployment(tok, backend), keys)

    async def main():
        _, at = await call_asgi(app, "/v1/completions", request(stream), 0.3)
        return at

    at = asyncio.run(main())
    assert len(backend.cancelled_at) == 1 and backend.cancelled_at[0] - at < CANCEL_BOUND_S
    assert backend.sent < 100


def test_a_client_that_leaves_the_queue_never_reaches_the_backend(tok, keys):
    backend = ScriptedBackend(list(range(10, 60)), delay_s=0.02)
    app = app_for(deployment(tok, backend, max_concurrency=1, max_queue=4), keys)
    gates = app.state.service.gates

    async def main():
        first = asyncio.create_task(call_asgi(app, "/v1/completions", request(), lambda sent: False))
        await until(lambda: "s" in gates and gates["s"].running == 1)
        await call_asgi(app, "/v1/completions", request(), 0.2)  # waits in the queue, then leaves
        assert gates["s"].waiting == 0
        sent, _ = await first
        return sent

    sent = asyncio.run(main())
    assert json.loads(body_text(sent))["usage"]["completion_tokens"] == 50
    assert len(backend.requests) == 1


def test_a_stalled_backend_is_a_504_and_is_cancelled(tok, keys):
    backend = ScriptedBackend([10, 11], first_delay_s=30)
    with_app = app_for(deployment(tok, backend), keys, event_timeout_s=0.3)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(with_app), base_url="http://t") as c:
            return await c.post("/v1/completions", json=request(stream=True), headers=auth())

    t0 = time.monotonic()
    r = asyncio.run(main())
    assert r.status_code == 504 and r.json()["error"]["code"] == "backend_timeout"
    assert time.monotonic() - t0 < 5 and len(backend.cancelled_at) == 1


def test_waiting_too_long_in_the_queue_is_a_504(tok, keys):
    backend = ScriptedBackend(list(range(10, 40)), delay_s=0.05)
    app = app_for(deployment(tok, backend, max_concurrency=1, max_queue=4), keys, queue_timeout_s=0.2)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=10) as c:
            first = asyncio.create_task(c.post("/v1/completions", json=request(), headers=auth()))
            await until(lambda: "s" in app.state.service.gates)
            second = await c.post("/v1/completions", json=request(), headers=auth())
            return await first, second

    first, second = asyncio.run(main())
    assert first.status_code == 200
    assert second.status_code == 504 and second.json()["error"]["code"] == "queue_timeout"


def test_a_backend_failure_mid_stream_is_an_sse_error_then_done(tok, keys):
    ids = tok.encode("hello there world", add_special_tokens=False)
    backend = ScriptedBackend(ids * 3, fail_after=3)
    app = app_for(deployment(tok, backend), keys)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            streamed = await c.post("/v1/completions", json=request(stream=True), headers=auth())
            whole = await c.post("/v1/completions", json=request(), headers=auth())
            return streamed, whole

    streamed, whole = asyncio.run(main())
    assert streamed.status_code == 200
    blocks = [b[6:] for b in streamed.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    error = json.loads(blocks[-2])["error"]
    assert error["type"] == "backend_error" and "rank 1 died" in error["message"]
    text = "".join(json.loads(b)["choices"][0]["text"] for b in blocks[:-2])
    assert text == tok.decode(ids[:3])  # what came before the failure, nothing after
    assert whole.status_code == 502 and "rank 1 died" in whole.json()["error"]["message"]


def test_a_stop_string_cancels_the_backend_at_once(tok, keys):
    ids = tok.encode("alpha beta STOP gamma delta epsilon zeta eta theta", add_special_tokens=False)
    backend = ScriptedBackend(ids, delay_s=0.05)
    app = app_for(deployment(tok, backend), keys)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post("/v1/completions", json=request(stop=" STOP"), headers=auth())

    r = asyncio.run(main())
    assert r.json()["choices"][0] == {"index": 0, "text": "alpha beta", "logprobs": None, "finish_reason": "stop"}
    assert len(backend.cancelled_at) == 1 and backend.sent < len(ids)


def test_a_finish_the_api_cannot_map_is_a_backend_error(tok, keys):
    backend = ScriptedBackend(tok.encode("a b", add_special_tokens=False), reason="cancelled")
    app = app_for(deployment(tok, backend), keys)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post("/v1/completions", json=request(), headers=auth())

    r = asyncio.run(main())
    assert r.status_code == 502 and "'cancelled'" in r.json()["error"]["message"]

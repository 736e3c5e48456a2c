"""The Backend contract the user API relies on, run against every backend in BACKENDS (LocalBackend here; a
remote backend joins by adding a factory): ids in, TokenEvents then one FinishEvent out, early close cancels."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.backend import FinishEvent, GenerationRequest, TokenEvent
from edge_node.model.errors import PromptError
from edge_node.model.tokenizer import Tokenizer


@pytest.fixture(params=["local"])
def backend(request, local_backend):
    return {"local": local_backend}[request.param]


@pytest.fixture(scope="module")
def prompt(demo_chat_dir) -> tuple[int, ...]:
    return tuple(Tokenizer.from_dir(demo_chat_dir).encode("def add(a, b):"))


async def collect(backend, req: GenerationRequest) -> list:
    return [e async for e in backend.generate(req)]


def test_greedy_tokens_then_one_finish(backend, prompt, reference):
    events = asyncio.run(collect(backend, GenerationRequest(prompt, 12)))
    *tokens, finish = events
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(finish, FinishEvent)
    assert [e.token_id for e in tokens] == reference(list(prompt), 12)
    assert finish.reason == ("length" if len(tokens) == 12 else "eos")


def test_a_stop_id_ends_the_generation_as_eos_does(backend, prompt, reference):
    want = reference(list(prompt), 12)
    stop = want[3]
    events = asyncio.run(collect(backend, GenerationRequest(prompt, 12, stop_ids=(stop,))))
    ids = [e.token_id for e in events[:-1]]
    assert ids == want[:want.index(stop) + 1] and events[-1].reason == "eos"


def test_the_seed_fixes_sampled_tokens(backend, prompt):
    def run(seed):
        req = GenerationRequest(prompt, 16, temperature=1.0, top_p=0.95, seed=seed)
        return [e.token_id for e in asyncio.run(collect(backend, req)) if isinstance(e, TokenEvent)]
    first = run(7)
    assert run(7) == first and run(8) != first


@pytest.mark.parametrize("ids", [(), (5,) * 600, (9_000,)])
def test_a_prompt_the_model_cannot_take_is_a_prompt_error(backend, ids):
    with pytest.raises(PromptError):
        asyncio.run(collect(backend, GenerationRequest(ids, 4)))


def test_closing_early_stops_the_generation(backend, prompt):
    async def main():
        events = backend.generate(GenerationRequest(prompt, 480, temperature=1.0, seed=1))
        first = await anext(events)
        await events.aclose()
        return first, time.monotonic()

    first, closed_at = asyncio.run(main())
    assert isinstance(first, TokenEvent)
    while backend.active and time.monotonic() - closed_at < 1.0:
        time.sleep(0.01)
    assert backend.active == 0

"""The serving group in one process: request checks, serde, the job loop over a scripted backend, and the
gRPC service over a whole model (world size 1) on loopback: greedy equals single-node generation request after
request, seeded sampling repeats, a cancelled call leaves the service correct, bad fields are INVALID_ARGUMENT
naming the field, mutual TLS serves only the coordinator's certificate."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import grpc
import pytest
import torch

from edge_node.collectives import CommError
from edge_node.inference_client import (
    FinalEvent,
    GenerateParams,
    Health,
    InferenceClient,
    InferenceError,
    TokenEvent,
    event_from_pb,
    event_to_pb,
    health_from_pb,
    health_to_pb,
    params_from_pb,
    params_to_pb,
)
from edge_node.model import SamplingConfig, generate, load_model
from edge_node.run_config import RunConfig
from edge_node.serving import (
    Failure,
    GroupUnavailable,
    Job,
    Limits,
    LocalBackend,
    RequestError,
    ServingGroup,
    check_request,
    start_server,
)

LIMITS = Limits(vocab_size=256, max_positions=64, default_penalty=1.3)
OK = GenerateParams((5, 6, 7), 4)


# ---------------------------------------------------------------- request checks and serde

@pytest.mark.parametrize("changes, field", [
    (dict(prompt_ids=()), "prompt_ids"),
    (dict(prompt_ids=(1,) * 65), "prompt_ids"),
    (dict(prompt_ids=(5, 256)), "prompt_ids"),
    (dict(prompt_ids=(-1,)), "prompt_ids"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=65), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=-7), "seed"),
    (dict(stop_token_ids=(300,)), "stop_token_ids"),
    (dict(stop_token_ids=tuple(range(65))), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(request_id="x" * 129), "request_id"),
])
def test_a_field_out_of_range_is_named(changes, field):
    with pytest.raises(RequestError, match=f"^{field}: ") as e:
        check_request(replace(OK, **changes), LIMITS)
    assert e.value.field == field


def test_sampling_comes_from_the_request_with_the_models_penalty_as_default():
    assert check_request(OK, LIMITS) == SamplingConfig(greedy=True, repetition_penalty=1.3)
    assert check_request(replace(OK, temperature=0.0, top_k=5), LIMITS).greedy  # temperature 0 is greedy
    s = check_request(replace(OK, temperature=0.7, top_p=0.9, top_k=5, seed=11, repetition_penalty=1.0), LIMITS)
    assert s == SamplingConfig(greedy=False, temperature=0.7, top_p=0.9, top_k=5, seed=11, repetition_penalty=1.0)


def test_records_survive_the_protobuf_round_trip():
    full = GenerateParams((1, 2, 3), 9, temperature=0.5, top_p=0.8, top_k=3, seed=2**40, stop_token_ids=(4, 5),
                          logprobs=2, repetition_penalty=1.1, request_id="req-1")
    for p in (full, OK, replace(OK, temperature=0.0, seed=0)):  # unset stays unset, 0 stays 0
        assert params_from_pb(params_to_pb(p)) == p
    for e in (TokenEvent(7, 0, 1.5), TokenEvent(8, 1, 2.0, -0.25, ((8, -0.25), (3, -2.0))),
              FinalEvent("r", "stop", 3, 2, 0.1, 4.0, 2.5, 9.0)):
        assert event_from_pb(event_to_pb(e)) == e
    h = Health(True, 2, 256, 2048, (2,), "ab" * 32, 1, True, 5)
    assert health_from_pb(health_to_pb(h)) == h


# ---------------------------------------------------------------- the job loop over a scripted backend

class Scripted:
    """A backend whose logits put the next token at script[position - prompt length]."""

    world = 1

    def __init__(self, script: list[int], vocab: int = 16, max_positions: int = 12, eos=(2,), fail_at=None):
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=max_positions)
        self.script, self.eos, self.fail_at = script, eos, fail_at
        self.resets, self.steps, self.pings, self.stopped, self.n = 0, [], 0, False, 0

    def reset(self, request_id: str) -> None:
        self.resets += 1
        self.steps.append("reset")
        self.n = 0

    def step(self, ids: list[int], pos0: int) -> torch.Tensor:
        self.steps.append((len(ids), pos0))
        if self.fail_at is not None and len(self.steps) >= self.fail_at:
            raise CommError("rank 0: star allreduce: partial from rank 1 did not finish within 5 s")
        logits = torch.zeros(self.config.vocab_size)
        logits[self.script[min(self.n, len(self.script) - 1)]] = 10.0
        self.n += 1
        return logits

    def ping(self) -> None:
        self.pings += 1

    def stop(self) -> None:
        self.stopped = True


def run_jobs(backend, *params: GenerateParams) -> list[list]:
    """Queue the requests, run the group until they are answered, return each one's events."""
    group = ServingGroup(backend, ping_s=0.05, config_sha256="x")
    jobs = [Job(p, check_request(p, group.limits)) for p in params]
    for j in jobs:
        group.submit(j)
    worker = threading.Thread(target=group.run, daemon=True)
    worker.start()
    out = []
    for j in jobs:
        events = [j.events.get(timeout=10)]
        while not isinstance(events[-1], FinalEvent | Failure):
            events.append(j.events.get(timeout=10))
        out.append(events)
    group.shutdown()
    worker.join(5)
    assert not worker.is_alive() and backend.stopped
    return out


def test_each_request_resets_the_cache_and_ends_with_its_own_reason():
    b = Scripted([7, 9, 2, 4])
    eos, stop, length, context = run_jobs(b, GenerateParams((1, 1), 8), GenerateParams((1, 1), 8, stop_token_ids=(9,)),
                                          GenerateParams((1, 1), 2), GenerateParams((1,) * 11, 8))
    assert [e.id for e in eos[:-1]] == [7, 9, 2] and eos[-1].stop_reason == "eos"  # the EOS id is sent too
    assert [e.id for e in stop[:-1]] == [7, 9] and stop[-1].stop_reason == "stop"
    assert [e.id for e in length[:-1]] == [7, 9] and length[-1].stop_reason == "length"
    assert len(context) == 3 and context[-1].stop_reason == "context"  # 11 + 1 fill the 12 positions
    assert b.resets == 4 and b.steps[:3] == ["reset", (2, 0), (1, 2)]  # a reset before every request's prefill
    f = eos[-1]
    assert (f.prompt_tokens, f.completion_tokens) == (2, 3) and f.ttft_ms > 0 and f.total_ms >= f.ttft_ms
    assert [e.index for e in eos[:-1]] == [0, 1, 2]


def test_a_dead_peer_fails_the_request_with_unavailable_and_ends_the_group():
    b = Scripted([7, 9, 4], fail_at=4)  # reset, prefill, one decode step, then the collective fails
    group = ServingGroup(b, ping_s=1, config_sha256="x")
    first, queued = Job(GenerateParams((1,), 8), SamplingConfig()), Job(GenerateParams((1,), 8), SamplingConfig())
    group.submit(first)
    group.submit(queued)
    with pytest.raises(CommError):
        group.run()
    events = [first.events.get_nowait() for _ in range(first.events.qsize())]
    assert [e.id for e in events[:-1]] == [7, 9]
    assert isinstance(events[-1], Failure) and events[-1].code == grpc.StatusCode.UNAVAILABLE
    assert "peer rank is gone" in events[-1].message and "rank 1" in events[-1].message
    assert queued.events.get_nowait().code == grpc.StatusCode.UNAVAILABLE  # nobody is left waiting
    with pytest.raises(GroupUnavailable, match="failed"):
        group.submit(Job(OK, SamplingConfig()))


def test_a_full_queue_is_resource_exhausted_and_idle_groups_ping():
    b = Scripted([7])
    group = ServingGroup(b, ping_s=0.05, config_sha256="x", max_queue=1)
    group.submit(Job(OK, SamplingConfig()))
    with pytest.raises(GroupUnavailable) as e:
        group.submit(Job(OK, SamplingConfig()))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    worker = threading.Thread(target=group.run, daemon=True)
    worker.start()
    time.sleep(1.0)  # idle: a ping at every poll past ping_s
    group.shutdown()
    worker.join(5)
    assert b.pings >= 2 and group.served == 1


# ---------------------------------------------------------------- the gRPC service over a whole model

class Slowed:
    """A backend wrapper that counts steps and takes at least `delay_s` per step."""

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner, self.delay_s, self.steps = inner, delay_s, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, ids, pos0):
        self.steps += 1
        time.sleep(self.delay_s)
        return self.inner.step(ids, pos0)


@pytest.fixture(scope="module")
def service(llama_dir):
    """A whole tiny model served in this process on a loopback port (plain text)."""
    backend = Slowed(LocalBackend(RunConfig(model=str(llama_dir))))
    group = ServingGroup(backend, ping_s=1.0, config_sha256="x")
    server, address = start_server(group, "127.0.0.1:0", None, None)
    worker = threading.Thread(target=group.run, daemon=True)
    worker.start()
    client = InferenceClient(address, insecure=True)
    yield SimpleNamespace(client=client, backend=backend, group=group, model=load_model(llama_dir))
    client.close()
    group.shutdown()
    worker.join(10)
    server.stop(0)


def reference(model, prompt, n, sampling=SamplingConfig(), **kw) -> list[int]:
    """Single-node generation, stopping at the model's EOS id (2) as the service does."""
    return generate(model, prompt, n, sampling, eos_ids=(2,), **kw).token_ids


def test_consecutive_greedy_requests_equal_single_node_generation(service):
    for prompt, n in (([5, 17, 42, 7, 99], 12), ([1, 2, 3], 9), ([200, 9, 8, 7, 6, 5, 4, 3], 15)):
        tokens, final = service.client.generate_all(GenerateParams(prompt, n, request_id=f"r{n}"), timeout_s=60)
        assert [t.id for t in tokens] == reference(service.model, prompt, n)
        assert final.request_id == f"r{n}" and final.completion_tokens == len(tokens)


def test_seeded_sampling_repeats_and_equals_single_node_sampling(service):
    p = GenerateParams([5, 6, 7], 16, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    runs = [[t.id for t in service.client.generate_all(p, timeout_s=60)[0]] for _ in range(2)]
    ref = reference(service.model, [5, 6, 7], 16, SamplingConfig(greedy=False, temperature=0.9, top_p=0.95, top_k=40,
                                                                  seed=1234))
    assert runs[0] == runs[1] == ref
    other = [t.id for t in service.client.generate_all(replace(p, seed=99), timeout_s=60)[0]]
    assert other != ref


def test_logprobs_are_the_models_own(service):
    tokens, _ = service.client.generate_all(GenerateParams([5, 6, 7, 8], 3, logprobs=4), timeout_s=60)
    ref = generate(service.model, [5, 6, 7, 8], 3, logprobs=4).logprobs
    for t, r in zip(tokens, ref, strict=True):
        assert t.id == r["token_id"] and abs(t.logprob - r["logprob"]) < 1e-4
        assert [i for i, _ in t.top_logprobs] == [x["token_id"] for x in r["top_logprobs"]]


def test_a_cancelled_call_stops_generation_and_the_next_request_is_correct(service):
    b = service.backend
    b.delay_s = 0.02  # 240 tokens would take over 5 s
    try:
        before = b.steps
        stream = service.client.generate(GenerateParams([3, 4, 5], 240), timeout_s=60)
        for i, _ in enumerate(stream):
            if i == 1:
                stream.cancel()
                break
        deadline = time.monotonic() + 5
        while service.group.health().busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not service.group.health().busy
        assert b.steps - before < 40  # stopped within a few steps of the cancel, not after 240
    finally:
        b.delay_s = 0.0
    tokens, final = service.client.generate_all(GenerateParams([9, 8, 7], 10), timeout_s=60)
    assert [t.id for t in tokens] == reference(service.model, [9, 8, 7], 10)


def test_a_deadline_ends_the_call_and_the_generation(service):
    b = service.backend
    b.delay_s = 0.05
    try:
        with pytest.raises(InferenceError) as e:
            service.client.generate_all(GenerateParams([3, 4, 5], 200), timeout_s=0.5)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5
        while service.group.health().busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not service.group.health().busy
    finally:
        b.delay_s = 0.0


@pytest.mark.parametrize("changes, field", [
    (dict(prompt_ids=()), "prompt_ids"),
    (dict(prompt_ids=(1,) * 257), "prompt_ids"),
    (dict(prompt_ids=(5, 999)), "prompt_ids"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=2.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=(256,)), "stop_token_ids"),
    (dict(logprobs=50), "logprobs"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(service, changes, field):
    with pytest.raises(InferenceError) as e:
        service.client.generate_all(replace(GenerateParams([5, 6], 3), **changes), timeout_s=30)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == field
    assert e.value.details.startswith(f"{field}: ")


def test_health_describes_the_model(service):
    h = service.client.health()
    assert h.ready and h.world_size == 1 and h.vocab_size == 256 and h.max_positions == 256
    assert h.eos_token_ids == (2,) and h.served >= 0


def test_mutual_tls_serves_the_coordinators_certificate_only(llama_dir, tmp_path):
    from coordinator.security import init_ca, issue_node_cert, node_channel_credentials
    from edge_node.tls import COORDINATOR_NAME, channel_credentials, server_credentials

    init_ca(tmp_path / "tls")
    issue_node_cert(tmp_path / "tls", "node-a")
    issue_node_cert(tmp_path / "tls", "node-b")
    group = ServingGroup(LocalBackend(RunConfig(model=str(llama_dir))), ping_s=1.0, config_sha256="x")
    server, address = start_server(group, "127.0.0.1:0", server_credentials(tmp_path / "tls/nodes/node-a"),
                                   (COORDINATOR_NAME,))
    worker = threading.Thread(target=group.run, daemon=True)
    worker.start()
    try:
        with InferenceClient(address, node_channel_credentials(tmp_path / "tls"), server_name="node-a") as c:
            tokens, _ = c.generate_all(GenerateParams([5, 6, 7], 4), timeout_s=30)
            assert [t.id for t in tokens] == reference(load_model(llama_dir), [5, 6, 7], 4)
        with InferenceClient(address, channel_credentials(tmp_path / "tls/nodes/node-b"), server_name="node-a") as c:
            with pytest.raises(InferenceError) as e:
                c.health()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED  # another node's certificate
        with InferenceClient(address, insecure=True) as c:
            with pytest.raises(InferenceError) as e:
                c.health(timeout_s=3)
            assert e.value.code == grpc.StatusCode.UNAVAILABLE  # plain text gets no handshake
    finally:
        group.shutdown()
        worker.join(10)
        server.stop(0)


def test_a_client_needs_credentials_or_insecure():
    with pytest.raises(ValueError, match="TLS credentials, or insecure=True"):
        InferenceClient("127.0.0.1:1")


# ---------------------------------------------------------------- a rank > 0 between requests

class ScriptedComm:
    """Rank 1 of 2 with rank 0 played by a script: its messages, random hidden states, sums of one."""

    world, rank, comm_s, mode = 2, 1, 0.0, "star"

    def __init__(self, messages, hidden: int):
        self.messages, self.hidden = iter(messages), hidden

    def broadcast_message(self, msg, what):
        return next(self.messages)

    def broadcast(self, x, what="broadcast"):
        return x.copy_(torch.randn(x.shape))

    def allreduce(self, x):
        return x


@pytest.mark.parametrize("with_reset", [True, False])
def test_a_serving_rank_empties_its_cache_on_reset_only(llama_dir, tmp_path, with_reset):
    from edge_node.engine import RankEngine
    from edge_node.model.kv_cache import KVPositionError
    from edge_node.protocol import Ping, Reset, Step, Stop
    from edge_node.shard import write_shards

    write_shards(llama_dir, tmp_path / "s", 2)
    run = RunConfig(shards=str(tmp_path / "s"))
    script = [Step(tokens=5, pos0=0, layers=(0, 4)), Step(tokens=1, pos0=5, layers=(0, 4)), Ping(),
              *([Reset(request="next")] if with_reset else []), Step(tokens=3, pos0=0, layers=(0, 4)), Ping(), Stop()]
    engine = RankEngine(run, ScriptedComm(script, 64), 256)
    try:
        if with_reset:
            engine.serve()
            assert engine.cache.lengths == {i: 3 for i in range(4)}  # the second sequence only
        else:  # a new sequence without Reset would attend over the last one's keys: refused, loudly
            with pytest.raises(KVPositionError, match="write at position 0, but the layer holds 6 tokens"):
                engine.serve()
    finally:
        engine.close()

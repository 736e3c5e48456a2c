"""Collaborative edge-cloud generation over the cloud context manager (in-process): exactness, catch-up,
expiry, the memory bound, and falling back to the edge when the cloud goes away."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.cloud import CloudContextManager, CloudError, CloudLimits, InProcessTransport
from edge_node.cloud_link import CloudRefused, SessionSpec, Upload, generate_collaborative
from edge_node.early_exit import OFF, ExitPolicy
from edge_node.model import load_model
from edge_node.model.decode import generate
from quant.codec import encode
from tests.checkpoints import make_checkpoint
from tests.exits import expected_token, hidden_by_layer, median_threshold, noisy_heads

PROMPT = [5, 9, 33, 2, 100, 7, 64, 12]
K, EXITS = 3, (1, 3)  # the edge runs [0, 3) of 6 layers, with exits at 1 and at the split


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    path = tmp_path_factory.mktemp("six")
    make_checkpoint(path, num_hidden_layers=6, seed=3)
    return load_model(path), load_model(path, end=K, head=True), load_model(path, start=K)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class KeepOpen(InProcessTransport):
    """Leaves sessions open at the end so a test can look at the cloud's KV."""

    def close(self, session: str) -> None:
        pass


def spec(name: str, codec: str = "float32", digest: str = "d") -> SessionSpec:
    return SessionSpec(name, digest, K, codec)


@pytest.mark.parametrize("codec", ["float32", "float16"])
def test_exits_off_split_is_the_full_model_token_for_token(parts, codec):
    full, edge, cloud = parts
    manager = CloudContextManager(cloud, "d")
    expected = generate(full, PROMPT, 24).token_ids
    result = generate_collaborative(edge, None, OFF, K, InProcessTransport(manager), spec("s", codec), PROMPT, 24)
    assert result.token_ids == expected and result.usage() == {"cloud": 24} and result.cloud == "used"
    hidden = full.config.hidden_size
    assert result.extras["uplink_bytes"] == (len(PROMPT) + 23) * (hidden * (4 if codec == "float32" else 2) + 4)
    assert manager.metrics()["sessions"] == 0  # closed at the end


def test_cloud_answers_are_the_full_models_and_its_kv_after_catch_up_is_exact(parts):
    full, edge, cloud = parts
    heads = noisy_heads(full, EXITS)
    ref = PROMPT + generate(full, PROMPT, 40).token_ids
    policy = ExitPolicy(True, EXITS, tuple(median_threshold(full, heads, ref, e) for e in EXITS))
    manager = CloudContextManager(cloud, "d")
    result = generate_collaborative(edge, heads, policy, K, KeepOpen(manager), spec("kv"), PROMPT, 40,
                                    keep_session=True)
    usage = result.usage()
    assert {"edge@1", "edge@3", "cloud"} <= set(usage), usage  # a real mix of edge exits and cloud answers
    seq = PROMPT + result.token_ids[:-1]
    hs, full_cache = hidden_by_layer(full, seq, EXITS)
    for i, rec in enumerate(result.records):
        assert expected_token(full, heads, hs, rec.exit_layer, len(PROMPT) - 1 + i) == rec.token, (i, rec)
    session = manager.sessions["kv"]
    assert session.received == len(seq)  # every position went up exactly once
    assert manager.catch_up("kv") > 0 or session.cache.length(K) == len(seq)
    for layer in range(6):
        ours = (result.extras["stepper"].stack.cache if layer < K else session.cache).layers[layer]
        theirs = full_cache.layers[layer]
        assert ours.length == len(seq), layer
        assert (ours.k[:, :, :len(seq)] - theirs.k[:, :, :len(seq)]).abs().max() < 1e-4, layer
        assert (ours.v[:, :, :len(seq)] - theirs.v[:, :, :len(seq)]).abs().max() < 1e-4, layer
    # layer evaluations: the cloud ran [k, L) once per position, catch-up included, never more
    assert manager.counters["layer_evals"] == len(seq) * (6 - K)


def test_cloud_loss_falls_back_to_the_edge_and_says_so(parts):
    full, edge, cloud = parts
    heads = noisy_heads(full, EXITS)
    transport = InProcessTransport(CloudContextManager(cloud, "d"), fail_after=4)  # open + 3 answers, then down
    result = generate_collaborative(edge, heads, ExitPolicy.uniform(EXITS, 1.0), K, transport, spec("f"), PROMPT, 12)
    assert result.cloud == "lost" and "down" in result.cloud_error
    assert [r.where for r in result.records] == ["cloud"] * 3 + ["edge-fallback"] * 9
    seq = PROMPT + result.token_ids[:-1]
    hs, _ = hidden_by_layer(full, seq, EXITS)
    for i, rec in enumerate(result.records[3:], start=3):  # the edge's own head at k, on exact hidden states
        assert rec.exit_layer == K and expected_token(full, heads, hs, K, len(PROMPT) - 1 + i) == rec.token


def test_a_cloud_that_refuses_the_session_leaves_the_edge_standalone(parts):
    full, edge, cloud = parts
    heads = noisy_heads(full, EXITS)
    transport = InProcessTransport(CloudContextManager(cloud, "other-model"))
    result = generate_collaborative(edge, heads, ExitPolicy.uniform(EXITS, 0.5), K, transport, spec("m"), PROMPT, 4)
    assert result.cloud == "unreachable" and "mismatch" in result.cloud_error
    assert all(r.where != "cloud" for r in result.records)
    with pytest.raises(Exception, match="no exit head at layer 3"):  # exits off has nothing to fall back on
        generate_collaborative(edge, None, OFF, K, transport, spec("m2"), PROMPT, 4)


def rows(n: int, hidden: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def upload(session: str, pos0: int, n: int, hidden: int) -> Upload:
    return Upload(session, pos0, encode(rows(n, hidden, pos0), "float32"), tuple(range(3, 3 + n)))


def test_sessions_expire_after_their_idle_time(parts):
    _, _, cloud = parts
    clock, hidden = Clock(), cloud.config.hidden_size
    manager = CloudContextManager(cloud, "d", CloudLimits(session_ttl_s=10.0), clock=clock)
    manager.open(spec("a"))
    manager.open(spec("b"))
    manager.infer(upload("a", 0, 4, hidden))
    clock.t = 8.0
    manager.infer(upload("a", 4, 1, hidden))  # a stays alive, b idles
    clock.t = 15.0
    assert manager.expire() == 1 and set(manager.sessions) == {"a"}
    clock.t = 30.0
    with pytest.raises(CloudError, match="unknown") as e:
        manager.infer(upload("a", 5, 1, hidden))
    assert e.value.code == "unknown_session" and manager.metrics()["sessions_expired"] == 2
    with pytest.raises(CloudRefused, match="unknown_session"):  # as the edge sees it
        InProcessTransport(manager).infer(upload("a", 5, 1, hidden))


def test_memory_bound_evicts_the_least_recently_used_then_refuses(parts):
    _, _, cloud = parts
    clock, hidden = Clock(), cloud.config.hidden_size
    kv = CloudContextManager(cloud, "d").token_kv_bytes  # a new position may take this + its queued row
    manager = CloudContextManager(cloud, "d", CloudLimits(max_bytes=30 * kv), clock=clock)
    for name in "ab":
        clock.t += 1
        manager.open(spec(name))
        manager.infer(upload(name, 0, 12, hidden))
    assert manager.used_bytes <= manager.limits.max_bytes
    clock.t += 1
    manager.infer(upload("b", 12, 10, hidden))  # needs room: a (least recently used) goes
    assert set(manager.sessions) == {"b"} and manager.metrics()["sessions_evicted"] == 1
    assert manager.metrics()["memory_used_bytes"] <= manager.limits.max_bytes
    with pytest.raises(CloudError, match="over the cloud's bound") as e:
        manager.infer(upload("b", 22, 20, hidden))  # b alone would cross the bound
    assert e.value.code == "memory" and "b" not in manager.sessions


def test_positions_must_arrive_in_order_and_payloads_must_fit(parts):
    _, _, cloud = parts
    hidden = cloud.config.hidden_size
    manager = CloudContextManager(cloud, "d")
    manager.open(spec("p"))
    manager.append(upload("p", 0, 3, hidden))
    with pytest.raises(CloudError, match="start at position 5, the cloud holds 3"):
        manager.infer(upload("p", 5, 1, hidden))
    with pytest.raises(CloudError, match="expected float32 rows of"):
        manager.infer(Upload("p", 3, encode(rows(1, hidden + 1), "float32"), (4,)))
    with pytest.raises(CloudError, match="split"):
        manager.open(SessionSpec("q", "d", K + 1))


DEMO = Path(__file__).resolve().parents[2] / "models" / "edgefed-demo"


def test_demo_model_off_is_exact_in_both_modes_and_trained_exits_keep_cloud_answers_exact():
    from edge_node.early_exit import generate_standalone
    from edge_node.exit_train import ExitTrainConfig, collect_hidden, token_chunks, train_exit_heads
    from edge_node.model import Tokenizer
    from emulation.corpus import corpus_files

    k, exits = 3, (2, 3)
    full, edge, cloud = load_model(DEMO), load_model(DEMO, end=k, head=True), load_model(DEMO, start=k)
    tok = Tokenizer.from_dir(DEMO)
    prompt = tok.encode("import os\n\n\ndef read_config(path):\n")
    expected = generate(full, prompt, 32).token_ids
    assert generate_standalone(full, None, OFF, prompt, 32).token_ids == expected
    manager = CloudContextManager(cloud, "d")
    off = generate_collaborative(edge, None, OFF, k, InProcessTransport(manager), SessionSpec("o", "d", k), prompt, 32)
    assert off.token_ids == expected  # the default float16 link, on the demo model
    texts = (p.read_text() for p in corpus_files("train")[::400])
    chunks = token_chunks(texts, lambda t: tok.encode(t, add_special_tokens=False), 128, 512)
    heads = train_exit_heads(full, collect_hidden(full, chunks, exits), ExitTrainConfig(exits, steps=0))
    result = generate_collaborative(edge, heads, ExitPolicy.uniform(exits, 0.3), k, InProcessTransport(manager),
                                    SessionSpec("t", "d", k, "float32"), prompt, 32)
    assert "cloud" in result.usage() and len(result.usage()) > 1, result.usage()
    seq = prompt + result.token_ids[:-1]
    hs, _ = hidden_by_layer(full, seq, exits)
    for i, rec in enumerate(result.records):
        assert expected_token(full, heads, hs, rec.exit_layer, len(prompt) - 1 + i) == rec.token, (i, rec)


def test_metrics_endpoint_reports_sessions_memory_against_its_bound_and_counters(parts):
    import urllib.request

    from edgefed.commands.cloud_serve import serve_metrics

    _, _, cloud = parts
    kv = CloudContextManager(cloud, "d").token_kv_bytes
    manager = CloudContextManager(cloud, "d", CloudLimits(max_bytes=40 * kv), clock=Clock())
    http = serve_metrics("127.0.0.1:0", manager.metrics)
    where = f"127.0.0.1:{http.server_port}"

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {k: float(v) for k, v in (ln.split(" ") for ln in lines if ln.startswith("edgefed_cloud_"))}

    before = scrape()
    assert before["edgefed_cloud_sessions"] == 0 and before["edgefed_cloud_memory_bound_bytes"] == 40 * kv
    manager.open(spec("a"))
    manager.infer(upload("a", 0, 12, cloud.config.hidden_size))
    after = scrape()
    assert after["edgefed_cloud_sessions"] == 1 and after["edgefed_cloud_sessions_opened_total"] == 1
    assert 0 < after["edgefed_cloud_memory_used_bytes"] <= after["edgefed_cloud_memory_bound_bytes"]
    assert after["edgefed_cloud_tokens_answered_total"] == 1 and after["edgefed_cloud_requests_total"] == 1
    http.shutdown()
    http.server_close()

"""The OpenAI API's early_exit extension on a LocalBackend deployment with exit heads (the demo model, 6 layers)."""

from __future__ import annotations

import json
import socket

import pytest
from fastapi.testclient import TestClient

from coordinator.api import Deployment, create_app, local_deployment
from coordinator.cloud_server import CloudServer, cloud_manager
from edge_node.cloud_link import EarlyExitOptions, run_early_exit
from edge_node.early_exit import save_exit_heads
from edge_node.model import SamplingConfig, generate, load_model
from edge_node.model.generation_config import eos_ids, repetition_penalty
from tests.coordinator.conftest import auth
from tests.exits import median_threshold, noisy_heads

EXITS, K = (2, 4), 4
PROMPT = "def fibonacci(n):"
N = 24


@pytest.fixture(scope="module")
def setup(demo_chat_dir, tmp_path_factory):
    """(model dir, exits.json, a threshold about half the tokens cross at the first exit, the full model)."""
    model = load_model(demo_chat_dir)
    heads = noisy_heads(model, EXITS)
    path = save_exit_heads(heads, tmp_path_factory.mktemp("exits") / "exits.json")
    return demo_chat_dir, path, model, heads


@pytest.fixture(scope="module")
def deployments(setup, local_backend, demo_chat_dir):
    model_dir, path, _, _ = setup
    closed = socket.socket()  # a port nobody listens on: the cloud tier is unreachable
    closed.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    deps = {"ee": local_deployment(model_dir, "ee", exits=path),
            "ee-lost": local_deployment(model_dir, "ee-lost", exits=path, cloud=dead, split=K),
            "plain": Deployment.for_model("plain", demo_chat_dir, local_backend)}
    yield deps
    for name in ("ee", "ee-lost"):
        deps[name].backend.close()


@pytest.fixture
def client(deployments, keys):
    with TestClient(create_app(deployments, *keys)) as c:
        yield c


def post(client, model: str, **extra):
    body = {"model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "return_token_ids": True, **extra}
    return client.post("/v1/completions", headers=auth(), json=body)


def greedy(model_dir, model, ids, n):
    sampling = SamplingConfig(greedy=True, repetition_penalty=repetition_penalty(model_dir))
    return sampling, eos_ids(model_dir, model.config), generate(model, ids, n, sampling,
                                                                   eos_ids(model_dir, model.config)).token_ids


def test_mode_off_is_the_plain_greedy_output(client, deployments, setup):
    model_dir, _, model, _ = setup
    ids = deployments["ee"].tokenizer.encode(PROMPT)
    *_, want = greedy(model_dir, model, ids, N)
    r = post(client, "ee", early_exit={"mode": "off"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["token_ids"] == want
    assert body["usage"]["exits"] == {"mode": "off", "per_exit": {"edge@6": len(want)}, "cloud": 0,
                                      "edge": len(want)}
    assert body["usage"]["cloud"] == "none"
    plain = post(client, "ee").json()  # no early_exit field: the plain model, no exit usage
    assert plain["choices"][0]["token_ids"] == want and "exits" not in plain["usage"]


def test_standalone_is_run_early_exit_token_for_token(client, deployments, setup):
    model_dir, path, model, heads = setup
    ids = deployments["ee"].tokenizer.encode(PROMPT)
    sampling, eos, ref = greedy(model_dir, model, ids, N)
    threshold = median_threshold(model, heads, ids + ref, EXITS[0])
    direct = run_early_exit(str(model_dir), ids, N, sampling, eos, EarlyExitOptions(str(path), threshold))
    assert len(direct["usage"]) >= 2, direct["usage"]  # tokens leave at more than one place: a real mix
    for stream in (False, True):
        r = post(client, "ee", early_exit={"mode": "standalone", "threshold": threshold}, stream=stream,
                 **({"stream_options": {"include_usage": True}} if stream else {}))
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(b[6:]) for b in r.text.split("\n\n") if b and b != "data: [DONE]"]
            got = [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])]
            usage = chunks[-1]["usage"]
        else:
            got, usage = r.json()["choices"][0]["token_ids"], r.json()["usage"]
        assert got == direct["token_ids"]
        assert usage["exits"]["per_exit"] == direct["usage"]
        assert usage["exits"]["edge"] == len(got) and usage["exits"]["cloud"] == 0


def test_collaborative_with_the_cloud_unreachable_continues_on_the_edge(client, deployments, setup):
    model_dir, path, model, heads = setup
    ids = deployments["ee"].tokenizer.encode(PROMPT)
    sampling, eos, _ = greedy(model_dir, model, ids, N)
    r = post(client, "ee-lost", early_exit={"mode": "collaborative", "threshold": 0.5, "criterion": "margin"})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["cloud"] == "unreachable" and "127.0.0.1" in usage["cloud_error"]
    assert usage["exits"]["cloud"] == 0 and any(k.startswith("edge-fallback@4") for k in usage["exits"]["per_exit"])
    alone = run_early_exit(str(model_dir), ids, N, sampling, eos,
                           EarlyExitOptions(str(path), 0.5, "margin", split=K))  # the edge alone on [0, k)
    assert r.json()["choices"][0]["token_ids"] == alone["token_ids"]


def test_collaborative_with_a_cloud_tier_answers_unconfident_tokens_there(setup, keys):
    model_dir, path, model, _ = setup
    server = CloudServer(cloud_manager(model_dir, K)).start()
    dep = local_deployment(model_dir, "ee-cloud", exits=path, cloud=f"127.0.0.1:{server.port}", split=K)
    try:
        with TestClient(create_app({"ee-cloud": dep}, *keys)) as c:
            ids = dep.tokenizer.encode(PROMPT)
            *_, want = greedy(model_dir, model, ids, N)
            # no token is confident (threshold 1.0, strict): every token is the cloud's, the full model's greedy
            r = post(c, "ee-cloud", early_exit={"mode": "collaborative", "threshold": 1.0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["token_ids"] == want
            assert body["usage"]["cloud"] == "used"
            assert body["usage"]["exits"]["per_exit"] == {"cloud": len(want)}
            assert post(c, "ee-cloud", early_exit={"mode": "collaborative"},
                        temperature=1.0).json()["error"]["param"] == "early_exit.mode"
    finally:
        dep.backend.close()
        server.stop()


@pytest.mark.parametrize(("early_exit", "param"), [
    ({"threshold": 1.5}, "early_exit.threshold"),
    ({"threshold": -0.1}, "early_exit.threshold"),
    ({"threshold": "0.5"}, "early_exit.threshold"),
    ({"mode": "sometimes"}, "early_exit.mode"),
    ({"criterion": "entropy"}, "early_exit.criterion"),
    ({"treshold": 0.5}, "early_exit.treshold"),
    ("standalone", "early_exit"),
    ({"mode": "collaborative", "threshold": 0.5}, "early_exit.mode"),  # "ee" has no cloud tier
])
def test_a_bad_early_exit_field_is_a_400_naming_it(client, early_exit, param):
    r = post(client, "ee", early_exit=early_exit)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param)


def test_a_deployment_without_exit_heads_refuses_the_field(client):
    for early_exit in ({"mode": "standalone", "threshold": 0.5}, {"mode": "off"}):
        r = post(client, "plain", early_exit=early_exit)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "early_exit" and "no exit heads" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", headers=auth(), json={
        "model": "plain", "messages": [{"role": "user", "content": "hi"}], "early_exit": {"mode": "off"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "early_exit"


def test_a_deployment_says_which_exits_it_has(deployments):
    assert deployments["ee"].exit_layers == EXITS and not deployments["ee"].exit_cloud
    assert deployments["ee-lost"].exit_cloud and deployments["plain"].exit_layers == ()

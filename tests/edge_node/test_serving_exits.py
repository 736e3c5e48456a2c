"""Early exit in a serving group (`edgefed serve`, 2 ranks as real processes on loopback, started with exit heads
and a cloud tier): each request picks its mode and threshold, tokens say where they were answered, the final
event counts them; standalone equals single-node early exit, collaborative's cloud tokens are the full model's,
plain and "off" requests stay the full model's on the same group; bad early-exit fields are named."""

from __future__ import annotations

import signal
from dataclasses import replace

import grpc
import pytest
import torch

from coordinator.cloud_server import CloudServer, cloud_manager
from edge_node.cloud_link import generate_early_exit
from edge_node.early_exit import save_exit_heads
from edge_node.inference_client import ExitParams, ExitUsage, GenerateParams, InferenceError
from edge_node.model import load_model
from edge_node.model.decode import generate
from edge_node.model.sampling import SamplingConfig
from edge_node.run_config import EarlyExitOptions, RunConfig
from edge_node.shard import write_shards
from tests.checkpoints import make_checkpoint
from tests.edge_node.test_serving_group import STOP_S, Group
from tests.exits import median_threshold, noisy_heads

PROMPT = (5, 9, 33, 2, 100, 7, 64, 12)
EXITS, K, NEW = (2, 4), 4, 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-exits")
    make_checkpoint(path / "m", num_hidden_layers=6, seed=3, eos_token_id=None)
    write_shards(path / "m", path / "s", 2, [2, 1])
    model = load_model(path / "m")
    heads = noisy_heads(model, EXITS)
    save_exit_heads(heads, path / "s" / "exits.json")  # "auto": beside the shards
    threshold = round(median_threshold(model, heads, list(PROMPT) + generate(model, PROMPT, 24).token_ids, 2), 6)
    cloud = CloudServer(cloud_manager(path / "m", K)).start()
    opts = EarlyExitOptions("auto", cloud=f"127.0.0.1:{cloud.port}", split=K)
    g = None
    try:
        g = Group(RunConfig(shards=str(path / "s"), timeout_s=30, threads=1, exits=opts), 2, path / "group")
        yield g, model, heads, opts, threshold
        g.client.close()
        g.procs[0].send_signal(signal.SIGTERM)
        assert g.wait_exit(0, STOP_S) == 0, g.stderr(0)
        assert g.wait_exit(1, STOP_S) == 0, g.stderr(1)
    finally:
        if g is not None:
            g.kill()
        cloud.stop()


@pytest.mark.slow
def test_a_group_with_exit_heads_serves_each_requests_mode(served):
    g, model, heads, opts, threshold = served
    health = g.client.health()
    assert health.exit_layers == EXITS and health.exit_cloud
    ee = ExitParams("standalone", threshold)
    tokens, final = g.client.generate_all(GenerateParams(PROMPT, NEW, early_exit=ee), timeout_s=120)
    local = generate_early_exit(model, heads, replace(opts, threshold=threshold), PROMPT, NEW, SamplingConfig(), ())
    assert [t.id for t in tokens] == local.token_ids and [t.exit for t in tokens] == [r.key for r in local.records]
    assert len(local.usage()) >= 2, local.usage()  # a mix of exits was served
    assert final.exits == ExitUsage(tuple(sorted(local.usage().items())), "none")

    full = generate(model, PROMPT, NEW).token_ids  # after an exit sequence the group is the full model again
    tokens, final = g.client.generate_all(GenerateParams(PROMPT, NEW), timeout_s=120)
    assert [t.id for t in tokens] == full and final.exits is None and tokens[0].exit == ""
    tokens, final = g.client.generate_all(GenerateParams(PROMPT, NEW, early_exit=ExitParams("off")), timeout_s=120)
    assert [t.id for t in tokens] == full and final.exits.answered == (("edge@6", NEW),)

    collab = ExitParams("collaborative", threshold)
    tokens, final = g.client.generate_all(GenerateParams(PROMPT, NEW, early_exit=collab), timeout_s=120)
    ids = [t.id for t in tokens]
    assert final.exits.cloud == "used" and 0 < final.exits.cloud_tokens < NEW, final.exits
    assert final.exits.edge_tokens + final.exits.cloud_tokens == NEW == final.completion_tokens
    with torch.no_grad():
        logits = model(torch.tensor([list(PROMPT) + ids]), model.new_cache())[0]  # (S, vocab)
    for i, t in enumerate(tokens):
        if t.exit == "cloud":  # the full model's greedy token after the same prefix
            assert t.id == int(torch.argmax(logits[len(PROMPT) - 1 + i])), i


@pytest.mark.slow
@pytest.mark.parametrize("params, field", [
    (dict(early_exit=ExitParams("sideways", 0.5)), "early_exit.mode"),
    (dict(early_exit=ExitParams("standalone", 1.5)), "early_exit.threshold"),
    (dict(early_exit=ExitParams("standalone", 0.5, "entropy")), "early_exit.criterion"),
    (dict(early_exit=ExitParams("collaborative", 0.5), temperature=0.8), "early_exit.mode"),
    (dict(early_exit=ExitParams("standalone", 0.5), logprobs=2), "logprobs"),
])
def test_bad_early_exit_fields_are_invalid_argument_naming_the_field(served, params, field):
    g = served[0]
    with pytest.raises(InferenceError) as e:
        g.client.generate_all(GenerateParams(PROMPT, 2, **params), timeout_s=30)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == field


def test_early_exit_fields_survive_the_protobuf_round_trip_and_need_exit_heads():
    from edge_node.inference_client import (
        FinalEvent,
        Health,
        TokenEvent,
        event_from_pb,
        event_to_pb,
        health_from_pb,
        health_to_pb,
        params_from_pb,
        params_to_pb,
    )
    from edge_node.serving_requests import Limits, RequestError, check_request

    p = GenerateParams(PROMPT, 3, early_exit=ExitParams("collaborative", 0.25, "margin"))
    assert params_from_pb(params_to_pb(p)) == p
    usage = ExitUsage((("cloud", 2), ("edge-fallback@4", 1)), "lost", "cloud tier gone")
    for e in (TokenEvent(7, 0, 1.5, exit="edge@2", cloud="used"), FinalEvent("r", "length", 3, 3, exits=usage)):
        assert event_from_pb(event_to_pb(e)) == e
    assert usage.edge_tokens == 1 and usage.cloud_tokens == 2
    h = Health(True, 2, 256, 2048, (2,), "ab" * 32, 0, False, 1, (2, 4), True)
    assert health_from_pb(health_to_pb(h)) == h
    with pytest.raises(RequestError) as e:
        check_request(p, Limits(256, 64))
    assert e.value.field == "early_exit" and "without exit heads" in str(e.value)
    with pytest.raises(RequestError) as e:
        check_request(p, Limits(256, 64, exit_layers=(2, 4)))
    assert e.value.field == "early_exit.mode" and "no" in str(e.value)
    check_request(replace(p, early_exit=ExitParams("off")), Limits(256, 64))  # off: the plain model, always

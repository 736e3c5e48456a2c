"""Admin HTTP routes (coordinator.admin): key required, node listing without secrets, deploy bodies checked by field."""

import asyncio
import time

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coordinator.admin import DeployBodyError, admin_router, deploy_handler
from coordinator.server import Changes
from coordinator.state import DeploymentRecord, MemoryState
from edge_node.control import DeviceFacts
from edge_node.model.errors import UsageError

FACTS = DeviceFacts(2, 8 << 30, 6 << 30, 50 << 30, ("CPUExecutionProvider",), 10.0)


@pytest.fixture
def admin(tmp_path):
    state = MemoryState()
    state.register_node("a", FACTS, "127.0.0.1", time.time(), secret_digest="sha256:secret")
    changes = Changes()
    app = FastAPI()
    app.include_router(admin_router(state, tmp_path, changes, lambda key: key == "admin-key"))
    return state, changes, TestClient(app)


def test_admin_routes_need_the_admin_key_and_never_show_node_secrets(admin):
    state, _, client = admin
    for headers in ({}, {"Authorization": "Bearer user-key"}, {"Authorization": "admin-key"}):
        assert client.get("/admin/nodes", headers=headers).status_code == 401
    nodes = client.get("/admin/nodes", headers={"Authorization": "Bearer admin-key"}).json()["data"]
    assert [n["node_id"] for n in nodes] == ["a"] and "secret_digest" not in nodes[0]
    assert nodes[0]["facts"]["cores"] == 2


def test_stopping_a_deployment_bumps_the_feed_and_removes_its_files(admin, tmp_path):
    state, changes, client = admin
    state.add_deployment(DeploymentRecord("d-1", "m", "float32", 1, "h:1"), [])
    (tmp_path / "deployments" / "d-1").mkdir(parents=True)
    version = changes.version
    auth = {"Authorization": "Bearer admin-key"}
    assert client.delete("/admin/deployments/d-9", headers=auth).status_code == 404
    r = client.delete("/admin/deployments/d-1", headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "stopped" and changes.version != version
    assert not (tmp_path / "deployments" / "d-1").exists()
    assert [d["deployment_id"] for d in client.get("/admin/deployments", headers=auth).json()["data"]] == ["d-1"]


@pytest.mark.parametrize("body, field", [
    ([], "body"), ({"model": ""}, "model"), ({"model": "/nonexistent"}, "model"), ({"modle": "x"}, "modle"),
    ({"model": "MODEL", "nodes": 0}, "nodes"), ({"model": "MODEL", "nodes": True}, "nodes"),
    ({"model": "MODEL", "nodes": ["a", ""]}, "nodes"), ({"model": "MODEL", "weights": 8}, "weights"),
    ({"model": "MODEL", "weights": "int3"}, "weights"), ({"model": "MODEL", "dtype": 1}, "dtype"),
    ({"model": "MODEL", "threads": -1}, "threads"),
    ({"model": "MODEL", "exit_threshold": 0.5}, "exit_threshold"),  # early exit needs exit_heads
    ({"model": "MODEL", "exit_heads": "auto", "exit_threshold": 2}, "exit_threshold"),
    ({"model": "MODEL", "exit_heads": "auto", "exit_mode": "sometimes"}, "exit_mode"),
    ({"model": "MODEL", "exit_heads": "auto", "exit_mode": "collaborative"}, "exit_mode"),
    ({"model": "MODEL", "exit_heads": "auto", "exit_split": 0}, "exit_split"),
    ({"model": "MODEL", "exit_heads": "auto", "cloud": "nocolon"}, "cloud"),
    ({"model": "MODEL", "exit_heads": "/nonexistent/exits.json"}, "exit_heads"),
])
def test_a_bad_deploy_body_is_refused_naming_the_field(tmp_path, llama_dir, body, field):
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body = {**body, "model": str(llama_dir)}
    handle = deploy_handler(MemoryState(), tmp_path, Changes())
    with pytest.raises((DeployBodyError, ValueError)) as e:
        asyncio.run(handle(body))
    assert str(e.value).startswith(field) or f"{field} must" in str(e.value)


def test_a_deployment_with_exit_heads_ships_them_beside_the_shards(admin, tmp_path, llama_dir):
    from coordinator.deploy import DeployRequest, deploy
    from edge_node.early_exit import ExitHeadError, ExitHeads, save_exit_heads
    from edge_node.model.config import ModelConfig
    from edge_node.run_config import EarlyExitOptions, RunConfig

    state = admin[0]
    cfg = ModelConfig.from_dir(llama_dir)
    (tmp_path / "h").mkdir()
    heads = save_exit_heads(ExitHeads.untrained(cfg, [1, 3], torch.ones(cfg.hidden_size)), tmp_path / "h" / "e.json")
    opts = EarlyExitOptions(str(heads), 0.6, cloud="cloud:7070")
    dep = deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 1, exits=opts))
    (a,) = state.assignments(dep.deployment_id)
    run = RunConfig.from_json(a.run_config_json)
    assert run.exits == EarlyExitOptions("auto", 0.6, cloud="cloud:7070", layers=(1, 3))  # beside the shards
    shard_dir = tmp_path / "state" / "deployments" / dep.deployment_id
    assert (shard_dir / "exits.json").is_file() and (shard_dir / "e.safetensors").is_file()
    assert {"exits.json", "e.safetensors"} <= {f.path for f in a.files}  # fetched and checked like the shards
    with pytest.raises(UsageError, match="exit heads at layers"):
        run.exits.check_layers((1, 2), "rank 0")
    with pytest.raises(ExitHeadError, match="no exit heads here"):  # checked before anything is sharded
        deploy(state, tmp_path / "state", DeployRequest(str(llama_dir), 1, exits=EarlyExitOptions("auto")))

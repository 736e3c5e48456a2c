"""Admin HTTP routes (coordinator.admin): key required, node listing without secrets, deploy bodies checked by field."""

import asyncio
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coordinator.admin import DeployBodyError, admin_router, deploy_handler
from coordinator.server import Changes
from coordinator.state import DeploymentRecord, MemoryState
from edge_node.control import DeviceFacts

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
])
def test_a_bad_deploy_body_is_refused_naming_the_field(tmp_path, llama_dir, body, field):
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body = {**body, "model": str(llama_dir)}
    handle = deploy_handler(MemoryState(), tmp_path, Changes())
    with pytest.raises((DeployBodyError, ValueError)) as e:
        asyncio.run(handle(body))
    assert str(e.value).startswith(field) or f"{field} must" in str(e.value)

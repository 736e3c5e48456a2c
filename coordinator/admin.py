"""Admin HTTP calls on the coordinator's HTTP app (coordinator.api): deploy a model, list nodes and
deployments, stop a deployment. Every call needs an admin key (Bearer), whatever the transport.

    POST   /admin/deployments        {"model": DIR, "nodes": 2 | ["a", "b"] | null, "weights": "float32"}
                                     (coordinator.api's route, handled by deploy_handler here)
    GET    /admin/deployments        deployments with their assignments
    DELETE /admin/deployments/{id}   stop it (the nodes stop its ranks)
    GET    /admin/nodes              enrolled nodes, their facts, liveness and last heartbeat
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Depends, Header, HTTPException

from coordinator.deploy import DeployRequest, deploy, remove_files
from coordinator.server import Changes
from coordinator.state import State
from edge_node.model.errors import EdgefedError


def _error(status: int, message: str, field: str | None = None) -> HTTPException:
    return HTTPException(status, {"message": message, "type": "invalid_request_error", "param": field})


class DeployBodyError(EdgefedError, ValueError):
    """POST /admin/deployments' body is malformed (coordinator.api answers 400 with the message)."""


def _deploy_request(body: object) -> DeployRequest:
    if not isinstance(body, dict):
        raise DeployBodyError("body: expected a JSON object")
    unknown = sorted(set(body) - {"model", "nodes", "weights", "dtype", "threads"})
    if unknown:
        raise DeployBodyError(f"{unknown[0]}: unknown field (known: model, nodes, weights, dtype, threads)")
    model, nodes = body.get("model"), body.get("nodes")
    if not isinstance(model, str) or not model:
        raise DeployBodyError("model: expected the model directory (a path on the coordinator's machine)")
    if not Path(model, "config.json").is_file():
        raise DeployBodyError(f"model: {model} has no config.json")
    if isinstance(nodes, list) and nodes and all(isinstance(n, str) and n for n in nodes):
        nodes = tuple(nodes)
    elif not (nodes is None or (isinstance(nodes, int) and not isinstance(nodes, bool) and nodes >= 1)):
        raise DeployBodyError("nodes: expected a positive count, a list of node names, or null")
    weights, dtype, threads = body.get("weights", "float32"), body.get("dtype"), body.get("threads")
    if not isinstance(weights, str):
        raise DeployBodyError(f"weights: expected a string, got {weights!r}")
    if dtype is not None and not isinstance(dtype, str):
        raise DeployBodyError(f"dtype: expected a string, got {dtype!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise DeployBodyError(f"threads: expected a positive integer, got {threads!r}")
    return DeployRequest(model, nodes, weights, dtype, threads)


def deploy_handler(state: State, state_dir: str | Path, changes: Changes) -> Callable[[dict], Awaitable[dict]]:
    """POST /admin/deployments' handler for coordinator.api.create_app: body -> the new deployment."""
    async def handle(body: dict) -> dict:
        req = _deploy_request(body)
        dep = await asyncio.to_thread(deploy, state, state_dir, req, changes)
        return _deployment(state, dep.deployment_id)

    return handle


def admin_router(state: State, state_dir: str | Path, changes: Changes, check_admin: Callable[[str], bool]
                 ) -> APIRouter:
    """The admin routes over `state`; `check_admin(key)` says whether a Bearer key is an admin key."""
    def admin(authorization: str = Header(default="")) -> None:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key or not check_admin(key.strip()):
            raise HTTPException(401, {"message": "an admin key is required (Authorization: Bearer KEY)",
                                      "type": "authentication_error", "param": None})

    r = APIRouter(prefix="/admin", dependencies=[Depends(admin)])

    @r.get("/deployments")
    def deployments():
        return {"data": [_deployment(state, d.deployment_id) for d in state.list_deployments()]}

    @r.delete("/deployments/{deployment_id}")
    def stop(deployment_id: str):
        if state.get_deployment(deployment_id) is None:
            raise _error(404, f"no deployment {deployment_id!r}", "deployment_id")
        state.set_deployment_state(deployment_id, "stopped", "stopped by an admin")
        changes.bump()
        remove_files(state_dir, deployment_id)
        return _deployment(state, deployment_id)

    @r.get("/nodes")
    def nodes():
        return {"data": [{k: v for k, v in asdict(n).items() if k != "secret_digest"} for n in state.list_nodes()]}

    return r


def _deployment(state: State, deployment_id: str) -> dict:
    d = asdict(state.get_deployment(deployment_id))
    d["assignments"] = [{k: v for k, v in asdict(a).items() if k not in ("files", "run_config_json")} |
                        {"files": len(a.files)} for a in state.assignments(deployment_id)]
    return d

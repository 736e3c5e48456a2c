"""Admin HTTP calls on the coordinator's HTTP app (coordinator.api): deploy a model, list nodes and
deployments, stop a deployment. Every call needs an admin key (Bearer), whatever the transport.

    POST   /admin/deployments        {"model": DIR, "nodes": 2 | ["a", "b"] | null, "weights": "float32"}
                                     (coordinator.api's route, handled by deploy_handler here); early exit:
                                     "exit_heads": exits.json | "auto", "exit_threshold", "exit_mode",
                                     "exit_split", "cloud": HOST:PORT (what requests leave out, and the tier)
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
from edge_node.run_config import EXIT_MODES, EarlyExitOptions


def _error(status: int, message: str, field: str | None = None) -> HTTPException:
    return HTTPException(status, {"message": message, "type": "invalid_request_error", "param": field})


class DeployBodyError(EdgefedError, ValueError):
    """POST /admin/deployments' body is malformed (coordinator.api answers 400 with the message)."""


def _deploy_request(body: object) -> DeployRequest:
    if not isinstance(body, dict):
        raise DeployBodyError("body: expected a JSON object")
    unknown = sorted(set(body) - {"model", "nodes", "weights", "dtype", "threads", *_EXIT_FIELDS})
    if unknown:
        raise DeployBodyError(f"{unknown[0]}: unknown field (known: model, nodes, weights, dtype, threads, "
                              f"{', '.join(_EXIT_FIELDS)})")
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
    return DeployRequest(model, nodes, weights, dtype, threads, exits=_exit_options(body))


_EXIT_FIELDS = ("exit_heads", "exit_threshold", "exit_mode", "exit_split", "cloud")


def _exit_options(body: dict) -> EarlyExitOptions | None:
    """The early-exit fields of a deploy body (None without exit_heads; the others need it)."""
    given = [f for f in _EXIT_FIELDS if body.get(f) is not None]
    heads = body.get("exit_heads")
    if heads is None:
        if given:
            raise DeployBodyError(f"{given[0]}: needs exit_heads (an exits.json on the coordinator's machine, or auto)")
        return None
    if not isinstance(heads, str) or not heads:
        raise DeployBodyError("exit_heads: expected the path of an exits.json (or auto: the one beside the model)")
    threshold, mode = body.get("exit_threshold", 0.9), body.get("exit_mode", "standalone")
    split, cloud = body.get("exit_split"), body.get("cloud")
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise DeployBodyError(f"exit_threshold: expected a number in [0, 1], got {threshold!r}")
    if mode not in EXIT_MODES:
        raise DeployBodyError(f"exit_mode: expected one of {', '.join(EXIT_MODES)}, got {mode!r}")
    if split is not None and (not isinstance(split, int) or isinstance(split, bool) or split < 1):
        raise DeployBodyError(f"exit_split: expected a layer index >= 1, got {split!r}")
    if cloud is not None and (not isinstance(cloud, str) or ":" not in cloud):
        raise DeployBodyError(f"cloud: expected HOST:PORT of the cloud tier, got {cloud!r}")
    if mode == "collaborative" and cloud is None:
        raise DeployBodyError("exit_mode: collaborative needs the cloud tier (cloud: HOST:PORT)")
    if heads != "auto" and not Path(heads).exists():
        raise DeployBodyError(f"exit_heads: {heads} does not exist on the coordinator's machine")
    return EarlyExitOptions(heads, float(threshold), mode=mode, cloud=cloud, split=split)


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

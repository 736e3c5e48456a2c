"""The deploy flow: placement's plan -> shards written into the state directory -> a deployment with one
assignment per rank, which the node service hands to the chosen nodes (they fetch, verify and start).

The shards are written by edge_node.shard's streaming sharder with placement's ratios; each assignment
carries the frozen run configuration as JSON (the node fills in its local shard path) and the files to
fetch with their sizes and sha256: only its own rank's shard files (rank 0 also the embeddings and head),
plus the manifest and the model's small files; the rank loads with Manifest.load(dir, rank=R).

No address is chosen here: the coordinator's machine cannot know which ports are free on a node. Rank 0's
node picks its rendezvous and serving ports on its own host and reports them (coordinator.server); the
other ranks wait for the master to appear in their assignment.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from coordinator.placement import ModelFacts, NodeFacts, Placement, place
from coordinator.server import DEPLOYMENTS_DIR, Changes
from coordinator.state import AssignmentRecord, DeploymentRecord, NodeRecord, State
from edge_node.control import DeploymentId, FileRef
from edge_node.early_exit import EXITS_JSON, load_exit_heads
from edge_node.model.config import ModelConfig
from edge_node.model.errors import UsageError
from edge_node.model.formats import sha256_file
from edge_node.run_config import EarlyExitOptions, RunConfig
from edge_node.shard import WEIGHTS, rank_paths, write_shards

SHARDS_PLACEHOLDER = "<node-local shard directory>"
_LOCK = threading.Lock()


@dataclass(frozen=True)
class DeployRequest:
    model: str  # a Hugging Face model directory on the coordinator's machine
    nodes: int | tuple[str, ...] | None = None  # a count, node names, or None (placement decides)
    weights: str = "float32"
    dtype: str | None = None  # compute dtype (None: the shards')
    threads: int | None = None
    exclude: tuple[str, ...] = ()  # nodes placement must not use (re-planning: alive by state, silent of late)
    # early exit: `exits.exits` is the heads' exits.json on the coordinator's machine ("auto": beside the model);
    # they are copied beside the shards and every rank runs with them (its run configuration's exits)
    exits: EarlyExitOptions | None = None

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise UsageError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if isinstance(self.nodes, int) and self.nodes < 1:
            raise UsageError(f"nodes must be >= 1, got {self.nodes}")


def remove_files(state_dir: str | Path, deployment_id: str) -> None:
    """Delete a stopped deployment's shard files (its records stay in the state)."""
    shutil.rmtree(Path(state_dir) / DEPLOYMENTS_DIR / deployment_id, ignore_errors=True)


def node_facts(n: NodeRecord) -> NodeFacts:
    """What placement sees of a node: its latest free memory and disk (heartbeat, else registration)."""
    hb = n.heartbeat
    return NodeFacts(n.node_id, n.facts.cores, hb.memory_available if hb else n.facts.memory_available,
                     hb.disk_free if hb else n.facts.disk_free, n.facts.speed_gflops,
                     "ready" if n.state == "alive" else n.state)


def rank_run_config(req: DeployRequest, plan: Placement, rank: int, exit_layers: tuple[int, ...] = ()) -> RunConfig:
    """The frozen run configuration of one rank (its memory budget when it streams its blocks; with early
    exit, the heads copied beside the shards, whose layers are `exit_layers`)."""
    budget = None if plan.resident else round(plan.ranks[rank].memory_mb, 1)
    exits = None if req.exits is None else replace(req.exits, exits=EXIT_HEADS, layers=exit_layers)
    return RunConfig(shards=SHARDS_PLACEHOLDER, dtype=req.dtype, threads=req.threads, memory_mb=budget, exits=exits)


EXIT_HEADS = "auto"  # a rank's heads: the exits.json in its shard directory


def exit_heads_source(req: DeployRequest) -> Path:
    """The heads' JSON a deploy request names, on the coordinator's machine ("auto": beside the model)."""
    path = Path(req.model) if req.exits.exits in (None, "auto") else Path(req.exits.exits)
    return path / EXITS_JSON if path.is_dir() else path


def copy_exit_heads(src: Path, shard_dir: Path) -> None:
    """The heads' JSON (as exits.json) and the weights it names, beside the shards, so every node fetches them
    (sha256-checked like the shards) and loads them from there."""
    doc = json.loads(src.read_text())
    shutil.copyfile(src.parent / doc["weights"], shard_dir / doc["weights"])
    shutil.copyfile(src, shard_dir / EXITS_JSON)


def rank_files(files: tuple[FileRef, ...], manifest: dict, rank: int) -> tuple[FileRef, ...]:
    """What rank `rank`'s node fetches: its own shard files and every file the manifest does not list
    (manifest.json, config.json, tokenizer files ...), never another rank's shards (pure)."""
    shards = {f["path"] for f in manifest["files"]}
    mine = rank_paths(manifest, rank)
    return tuple(f for f in files if f.path not in shards or f.path in mine)


def _files(shard_dir: Path, manifest: dict) -> tuple[FileRef, ...]:
    """Every file of the shard directory (the manifest's with their recorded digests, the rest hashed now)."""
    listed = {f["path"]: FileRef(f["path"], f["bytes"], f["sha256"]) for f in manifest["files"]}
    out = []
    for p in sorted(shard_dir.rglob("*")):
        rel = p.relative_to(shard_dir).as_posix()
        if p.is_file():
            out.append(listed.get(rel) or FileRef(rel, p.stat().st_size, sha256_file(p)))
    return tuple(out)


def deploy(state: State, state_dir: str | Path, req: DeployRequest, changes: Changes | None = None,
           clock: Callable[[], float] = time.time) -> DeploymentRecord:
    """Place, shard and record a deployment; the nodes pick up their assignments from the feed. One at a
    time: sharding is heavy, and placement reads free memory that a deployment being made will take."""
    with _LOCK:
        return _deploy(state, state_dir, req, changes, clock)


def _deploy(state: State, state_dir: str | Path, req: DeployRequest, changes: Changes | None,
            clock: Callable[[], float]) -> DeploymentRecord:
    cfg = ModelConfig.from_dir(req.model)
    exit_layers: tuple[int, ...] = ()
    if req.exits is not None:  # checked against the model before anything is sharded
        exit_layers = load_exit_heads(exit_heads_source(req), cfg).layers
    nodes = [n for n in state.list_nodes() if n.node_id not in req.exclude]
    want: int | Sequence[str] | None = req.nodes
    plan = place([node_facts(n) for n in nodes], ModelFacts(cfg, req.weights), want)
    if req.exits is not None and not plan.resident:
        raise UsageError("early exit needs every layer resident on its rank, and the chosen nodes' memory only "
                         "allows streaming layer blocks: deploy on more nodes or without exit heads")
    dep_id = DeploymentId(f"d-{secrets.token_hex(4)}")
    shard_dir = Path(state_dir) / DEPLOYMENTS_DIR / dep_id
    try:
        manifest = write_shards(req.model, shard_dir, len(plan.ranks), list(plan.ratios), req.weights)
        if req.exits is not None:
            copy_exit_heads(exit_heads_source(req), shard_dir)
    except BaseException:
        shutil.rmtree(shard_dir, ignore_errors=True)
        raise
    files = _files(shard_dir, manifest)
    world = len(plan.ranks)
    # master and listen stay empty: rank 0's node picks them on its own host and reports them
    assignments = [AssignmentRecord(dep_id, r.rank, r.node, world,
                                    rank_run_config(req, plan, r.rank, exit_layers).to_json(),
                                    "", "", rank_files(files, manifest, r.rank), updated=clock())
                   for r in plan.ranks]
    dep = DeploymentRecord(dep_id, str(req.model), req.weights, world, "", "pending", clock(),
                           f"ranks on {', '.join(plan.nodes)}; ratios {list(plan.ratios)}")
    state.add_deployment(dep, assignments)
    if changes is not None:
        changes.bump()
    return dep

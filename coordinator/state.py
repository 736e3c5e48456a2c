"""The coordinator's state behind one small interface: enrolled nodes, deployments with their per-rank
assignments, and request records (enrollment tokens and API keys live in coordinator.security's store).

SqliteState (a file in the --state directory) is the embedded default, so a coordinator restart loses no
node, deployment or request; MemoryState holds the same in dicts (tests, throwaway runs). Both pass one
contract suite (tests/coordinator/test_state.py). Records are frozen dataclasses; every method is atomic
and thread-safe (the gRPC servicer, the liveness loop and the HTTP API call them from their own threads).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edge_node.control import Assignment, DeploymentId, DeviceFacts, FileRef, HeartbeatFigures, NodeId

NODE_STATES = ("alive", "lost")
DEPLOYMENT_STATES = ("pending", "running", "degraded", "failed", "stopped")
REQUEST_STATES = ("queued", "running", "done", "failed", "cancelled")
DB_NAME = "coordinator.sqlite3"


@dataclass(frozen=True)
class NodeRecord:
    node_id: NodeId
    facts: DeviceFacts
    advertise_host: str
    state: str  # NODE_STATES
    registered_at: float
    last_heartbeat: float
    heartbeat: HeartbeatFigures | None = None
    secret_digest: str = ""  # sha256 of the --insecure node secret ("" with TLS identities only)


@dataclass(frozen=True)
class DeploymentRecord:
    deployment_id: DeploymentId
    model: str  # the model directory it was sharded from
    weights: str  # float32 | bfloat16 | int8
    world: int
    endpoint: str  # HOST:PORT of rank 0's Inference service
    state: str = "pending"  # DEPLOYMENT_STATES
    created: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class AssignmentRecord:
    deployment_id: DeploymentId
    rank: int
    node_id: NodeId
    world: int
    run_config_json: str
    master: str
    listen: str = ""
    files: tuple[FileRef, ...] = ()
    status: str = "assigned"  # assigned, or the last edge_node.control.STATUSES report
    exit_code: int = 0
    stderr_tail: str = ""
    detail: str = ""
    updated: float = 0.0

    def to_assignment(self) -> Assignment:
        return Assignment(self.deployment_id, self.rank, self.world, self.run_config_json, self.master, self.listen,
                          self.files)


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    deployment_id: DeploymentId
    created: float
    status: str = "queued"  # REQUEST_STATES
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: float | None = None
    error: str = ""
    model: str = ""  # the model name the request asked for ("" when its body named none)
    http_status: int = 0  # the HTTP status it was answered with (0: not answered yet; 499: the client left)


class StateError(ValueError):
    """An operation names a record that does not exist or breaks a state rule."""


class State(ABC):
    """What the coordinator remembers. Implementations: MemoryState, SqliteState."""

    @abstractmethod
    def register_node(self, node_id: NodeId, facts: DeviceFacts, advertise_host: str, now: float,
                      secret_digest: str | None = None) -> NodeRecord:
        """Enroll a node or refresh an enrolled one (facts, host, alive, heartbeat time; secret when given)."""

    @abstractmethod
    def get_node(self, node_id: NodeId) -> NodeRecord | None: ...
    @abstractmethod
    def list_nodes(self) -> list[NodeRecord]: ...

    @abstractmethod
    def heartbeat(self, node_id: NodeId, figures: HeartbeatFigures, now: float) -> NodeRecord:
        """Record a heartbeat: the node is alive again. StateError for an unknown node."""

    @abstractmethod
    def mark_lost(self, silent_since: float) -> list[NodeId]:
        """Mark lost every alive node whose last heartbeat is older than `silent_since`; return them."""

    @abstractmethod
    def add_deployment(self, dep: DeploymentRecord, assignments: list[AssignmentRecord]) -> None: ...
    @abstractmethod
    def get_deployment(self, deployment_id: DeploymentId) -> DeploymentRecord | None: ...
    @abstractmethod
    def list_deployments(self) -> list[DeploymentRecord]: ...
    @abstractmethod
    def set_deployment_state(self, deployment_id: DeploymentId, state: str, detail: str = "") -> DeploymentRecord: ...

    @abstractmethod
    def assignments(self, deployment_id: DeploymentId | None = None,
                    node_id: NodeId | None = None) -> list[AssignmentRecord]:
        """Assignments filtered by deployment and/or node, ordered by (deployment, rank)."""

    @abstractmethod
    def update_assignment(self, deployment_id: DeploymentId, rank: int, status: str, now: float, exit_code: int = 0,
                          stderr_tail: str = "", detail: str = "") -> AssignmentRecord: ...

    @abstractmethod
    def set_rendezvous(self, deployment_id: DeploymentId, master: str | None = None,
                       listen: str | None = None) -> DeploymentRecord:
        """What rank 0's node chose on its host: `master` goes to every rank's assignment, `listen` to rank 0's
        and to the deployment's endpoint (None: unchanged). StateError for an unknown deployment."""

    @abstractmethod
    def add_request(self, rec: RequestRecord) -> None: ...
    @abstractmethod
    def finish_request(self, request_id: str, status: str, now: float, prompt_tokens: int = 0,
                       completion_tokens: int = 0, error: str = "", deployment_id: DeploymentId | None = None,
                       http_status: int | None = None, model: str | None = None) -> RequestRecord:
        """End a request's record (deployment_id, http_status and model are kept as they were when None)."""
    @abstractmethod
    def get_request(self, request_id: str) -> RequestRecord | None: ...
    @abstractmethod
    def list_requests(self, deployment_id: DeploymentId | None = None) -> list[RequestRecord]: ...

    def close(self) -> None:  # noqa: B027 (optional)
        pass


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise StateError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


class MemoryState(State):
    def __init__(self):
        self._lock = threading.Lock()
        self._nodes: dict[NodeId, NodeRecord] = {}
        self._deps: dict[DeploymentId, DeploymentRecord] = {}
        self._asg: dict[tuple[DeploymentId, int], AssignmentRecord] = {}
        self._reqs: dict[str, RequestRecord] = {}

    def register_node(self, node_id, facts, advertise_host, now, secret_digest=None):
        with self._lock:
            old = self._nodes.get(node_id)
            rec = NodeRecord(node_id, facts, advertise_host, "alive", old.registered_at if old else now, now,
                             old.heartbeat if old else None,
                             secret_digest if secret_digest is not None else (old.secret_digest if old else ""))
            self._nodes[node_id] = rec
            return rec

    def get_node(self, node_id):
        with self._lock:
            return self._nodes.get(node_id)

    def list_nodes(self):
        with self._lock:
            return sorted(self._nodes.values(), key=lambda n: n.node_id)

    def heartbeat(self, node_id, figures, now):
        with self._lock:
            if node_id not in self._nodes:
                raise StateError(f"unknown node {node_id!r}")
            rec = self._nodes[node_id] = replace(self._nodes[node_id], state="alive", last_heartbeat=now,
                                                 heartbeat=figures)
            return rec

    def mark_lost(self, silent_since):
        with self._lock:
            lost = [n.node_id for n in self._nodes.values() if n.state == "alive" and n.last_heartbeat < silent_since]
            for node_id in lost:
                self._nodes[node_id] = replace(self._nodes[node_id], state="lost")
            return sorted(lost)

    def add_deployment(self, dep, assignments):
        _check(dep.state, DEPLOYMENT_STATES, "deployment state")
        with self._lock:
            if dep.deployment_id in self._deps:
                raise StateError(f"deployment {dep.deployment_id!r} exists")
            self._deps[dep.deployment_id] = dep
            for a in assignments:
                self._asg[(a.deployment_id, a.rank)] = a

    def get_deployment(self, deployment_id):
        with self._lock:
            return self._deps.get(deployment_id)

    def list_deployments(self):
        with self._lock:
            return sorted(self._deps.values(), key=lambda d: (d.created, d.deployment_id))

    def set_deployment_state(self, deployment_id, state, detail=""):
        _check(state, DEPLOYMENT_STATES, "deployment state")
        with self._lock:
            if deployment_id not in self._deps:
                raise StateError(f"unknown deployment {deployment_id!r}")
            rec = self._deps[deployment_id] = replace(self._deps[deployment_id], state=state, detail=detail)
            return rec

    def assignments(self, deployment_id=None, node_id=None):
        with self._lock:
            return [a for _, a in sorted(self._asg.items()) if (deployment_id is None or a.deployment_id ==
                    deployment_id) and (node_id is None or a.node_id == node_id)]

    def update_assignment(self, deployment_id, rank, status, now, exit_code=0, stderr_tail="", detail=""):
        with self._lock:
            key = (deployment_id, rank)
            if key not in self._asg:
                raise StateError(f"deployment {deployment_id!r} has no rank {rank}")
            rec = self._asg[key] = replace(self._asg[key], status=status, exit_code=exit_code,
                                           stderr_tail=stderr_tail, detail=detail, updated=now)
            return rec

    def set_rendezvous(self, deployment_id, master=None, listen=None):
        with self._lock:
            if deployment_id not in self._deps:
                raise StateError(f"unknown deployment {deployment_id!r}")
            for key, a in list(self._asg.items()):
                if a.deployment_id == deployment_id:
                    self._asg[key] = replace(a, master=a.master if master is None else master,
                                             listen=listen if listen is not None and a.rank == 0 else a.listen)
            if listen is not None:
                self._deps[deployment_id] = replace(self._deps[deployment_id], endpoint=listen)
            return self._deps[deployment_id]

    def add_request(self, rec):
        _check(rec.status, REQUEST_STATES, "request status")
        with self._lock:
            if rec.request_id in self._reqs:
                raise StateError(f"request {rec.request_id!r} exists")
            self._reqs[rec.request_id] = rec

    def finish_request(self, request_id, status, now, prompt_tokens=0, completion_tokens=0, error="",
                       deployment_id=None, http_status=None, model=None):
        _check(status, REQUEST_STATES, "request status")
        with self._lock:
            if request_id not in self._reqs:
                raise StateError(f"unknown request {request_id!r}")
            old = self._reqs[request_id]
            rec = self._reqs[request_id] = replace(
                old, status=status, finished=now, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                error=error, deployment_id=old.deployment_id if deployment_id is None else deployment_id,
                http_status=old.http_status if http_status is None else http_status,
                model=old.model if model is None else model)
            return rec

    def get_request(self, request_id):
        with self._lock:
            return self._reqs.get(request_id)

    def list_requests(self, deployment_id=None):
        with self._lock:
            return sorted((r for r in self._reqs.values() if deployment_id is None or r.deployment_id == deployment_id),
                          key=lambda r: (r.created, r.request_id))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, facts TEXT NOT NULL, advertise_host TEXT NOT NULL,
  state TEXT NOT NULL, registered_at REAL NOT NULL, last_heartbeat REAL NOT NULL, heartbeat TEXT,
  secret_digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (deployment_id TEXT PRIMARY KEY, model TEXT NOT NULL, weights TEXT NOT NULL,
  world INTEGER NOT NULL, endpoint TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (deployment_id TEXT NOT NULL REFERENCES deployments(deployment_id),
  rank INTEGER NOT NULL, node_id TEXT NOT NULL, world INTEGER NOT NULL, run_config_json TEXT NOT NULL,
  master TEXT NOT NULL, listen TEXT NOT NULL, files TEXT NOT NULL, status TEXT NOT NULL, exit_code INTEGER NOT NULL,
  stderr_tail TEXT NOT NULL, detail TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (deployment_id, rank));
CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, deployment_id TEXT NOT NULL, created REAL NOT NULL,
  status TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, finished REAL,
  error TEXT NOT NULL, model TEXT NOT NULL DEFAULT '', http_status INTEGER NOT NULL DEFAULT 0);
"""
# columns added since the first schema: (table, column, definition), added to an older file when it opens
_ADDED = (("requests", "model", "TEXT NOT NULL DEFAULT ''"), ("requests", "http_status", "INTEGER NOT NULL DEFAULT 0"))


def _node(row: sqlite3.Row) -> NodeRecord:
    facts = json.loads(row["facts"])
    facts["providers"] = tuple(facts["providers"])
    hb = json.loads(row["heartbeat"]) if row["heartbeat"] else None
    return NodeRecord(NodeId(row["node_id"]), DeviceFacts(**facts), row["advertise_host"], row["state"],
                      row["registered_at"], row["last_heartbeat"], HeartbeatFigures(**hb) if hb else None,
                      row["secret_digest"])


def _assignment(row: sqlite3.Row) -> AssignmentRecord:
    files = tuple(FileRef(**f) for f in json.loads(row["files"]))
    return AssignmentRecord(DeploymentId(row["deployment_id"]), row["rank"], NodeId(row["node_id"]), row["world"],
                            row["run_config_json"], row["master"], row["listen"], files, row["status"],
                            row["exit_code"], row["stderr_tail"], row["detail"], row["updated"])


class SqliteState(State):
    """State in one SQLite file (WAL journal: a crash mid-write loses at most that write)."""

    def __init__(self, state_dir: str | Path):
        d = Path(state_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED:
            if column not in {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def close(self):
        with self._lock:
            self._db.close()

    def register_node(self, node_id, facts, advertise_host, now, secret_digest=None):
        f = json.dumps(asdict(facts))
        with self._lock:
            self._db.execute(
                "INSERT INTO nodes VALUES (?, ?, ?, 'alive', ?, ?, NULL, ?) ON CONFLICT(node_id) DO UPDATE SET "
                "facts = excluded.facts, advertise_host = excluded.advertise_host, state = 'alive', "
                "last_heartbeat = excluded.last_heartbeat, secret_digest = COALESCE(?, nodes.secret_digest)",
                (node_id, f, advertise_host, now, now, secret_digest or "", secret_digest))
        return self.get_node(node_id)

    def get_node(self, node_id):
        row = self._one("SELECT * FROM nodes WHERE node_id = ?", (node_id,))
        return _node(row) if row else None

    def list_nodes(self):
        return [_node(r) for r in self._all("SELECT * FROM nodes ORDER BY node_id")]

    def heartbeat(self, node_id, figures, now):
        n = self._write("UPDATE nodes SET state = 'alive', last_heartbeat = ?, heartbeat = ? WHERE node_id = ?",
                        (now, json.dumps(asdict(figures)), node_id))
        if not n:
            raise StateError(f"unknown node {node_id!r}")
        return self.get_node(node_id)

    def mark_lost(self, silent_since):
        with self._lock:
            rows = self._db.execute("UPDATE nodes SET state = 'lost' WHERE state = 'alive' AND last_heartbeat < ? "
                                    "RETURNING node_id", (silent_since,)).fetchall()
        return sorted(NodeId(r["node_id"]) for r in rows)

    def add_deployment(self, dep, assignments):
        _check(dep.state, DEPLOYMENT_STATES, "deployment state")
        with self._lock:
            try:
                self._db.execute("BEGIN")
                self._db.execute("INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (dep.deployment_id, dep.model, dep.weights, dep.world, dep.endpoint, dep.state,
                                  dep.created, dep.detail))
                self._db.executemany("INSERT INTO assignments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                    (a.deployment_id, a.rank, a.node_id, a.world, a.run_config_json, a.master, a.listen,
                     json.dumps([asdict(f) for f in a.files]), a.status, a.exit_code, a.stderr_tail, a.detail,
                     a.updated) for a in assignments])
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise StateError(f"deployment {dep.deployment_id!r} exists") from None

    def get_deployment(self, deployment_id):
        row = self._one("SELECT * FROM deployments WHERE deployment_id = ?", (deployment_id,))
        return DeploymentRecord(**dict(row)) if row else None

    def list_deployments(self):
        return [DeploymentRecord(**dict(r)) for r in self._all("SELECT * FROM deployments ORDER BY created, "
                                                               "deployment_id")]

    def set_deployment_state(self, deployment_id, state, detail=""):
        _check(state, DEPLOYMENT_STATES, "deployment state")
        if not self._write("UPDATE deployments SET state = ?, detail = ? WHERE deployment_id = ?",
                           (state, detail, deployment_id)):
            raise StateError(f"unknown deployment {deployment_id!r}")
        return self.get_deployment(deployment_id)

    def assignments(self, deployment_id=None, node_id=None):
        rows = self._all("SELECT * FROM assignments WHERE (?1 IS NULL OR deployment_id = ?1) AND "
                         "(?2 IS NULL OR node_id = ?2) ORDER BY deployment_id, rank", (deployment_id, node_id))
        return [_assignment(r) for r in rows]

    def update_assignment(self, deployment_id, rank, status, now, exit_code=0, stderr_tail="", detail=""):
        with self._lock:
            row = self._db.execute("UPDATE assignments SET status = ?, exit_code = ?, stderr_tail = ?, detail = ?, "
                                   "updated = ? WHERE deployment_id = ? AND rank = ? RETURNING *",
                                   (status, exit_code, stderr_tail, detail, now, deployment_id, rank)).fetchone()
        if row is None:
            raise StateError(f"deployment {deployment_id!r} has no rank {rank}")
        return _assignment(row)

    def set_rendezvous(self, deployment_id, master=None, listen=None):
        with self._lock:
            self._db.execute("BEGIN")
            try:
                found = self._db.execute("SELECT 1 FROM deployments WHERE deployment_id = ?",
                                         (deployment_id,)).fetchone()
                if found and master is not None:
                    self._db.execute("UPDATE assignments SET master = ? WHERE deployment_id = ?",
                                     (master, deployment_id))
                if found and listen is not None:
                    self._db.execute("UPDATE assignments SET listen = ? WHERE deployment_id = ? AND rank = 0",
                                     (listen, deployment_id))
                    self._db.execute("UPDATE deployments SET endpoint = ? WHERE deployment_id = ?",
                                     (listen, deployment_id))
            finally:
                self._db.execute("COMMIT")
        if not found:
            raise StateError(f"unknown deployment {deployment_id!r}")
        return self.get_deployment(deployment_id)

    def add_request(self, rec):
        _check(rec.status, REQUEST_STATES, "request status")
        fields = asdict(rec)
        try:
            self._write(f"INSERT INTO requests ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                        tuple(fields.values()))
        except sqlite3.IntegrityError:
            raise StateError(f"request {rec.request_id!r} exists") from None

    def finish_request(self, request_id, status, now, prompt_tokens=0, completion_tokens=0, error="",
                       deployment_id=None, http_status=None, model=None):
        _check(status, REQUEST_STATES, "request status")
        with self._lock:
            row = self._db.execute("UPDATE requests SET status = ?, finished = ?, prompt_tokens = ?, "
                                   "completion_tokens = ?, error = ?, deployment_id = COALESCE(?, deployment_id), "
                                   "http_status = COALESCE(?, http_status), model = COALESCE(?, model) "
                                   "WHERE request_id = ? RETURNING *",
                                   (status, now, prompt_tokens, completion_tokens, error, deployment_id, http_status,
                                    model, request_id)).fetchone()
        if row is None:
            raise StateError(f"unknown request {request_id!r}")
        return RequestRecord(**dict(row))

    def get_request(self, request_id):
        row = self._one("SELECT * FROM requests WHERE request_id = ?", (request_id,))
        return RequestRecord(**dict(row)) if row else None

    def list_requests(self, deployment_id=None):
        rows = self._all("SELECT * FROM requests WHERE (?1 IS NULL OR deployment_id = ?1) ORDER BY created, request_id",
                         (deployment_id,))
        return [RequestRecord(**dict(r)) for r in rows]

"""The coordinator's Node service (proto/node.proto): a thin servicer over coordinator.state.

Each handler parses its message through edge_node.control (a malformed one is INVALID_ARGUMENT naming the
field), finds who is calling, calls the state, and answers. Who is calling: with mutual TLS, the common
name of the peer's certificate (edge_node.tls.peer_name); only behind --insecure, the node id and secret
that Register handed out, sent as metadata. An unknown node must present a valid enrollment token once.

Rendezvous: rank 0's node picks a free port on its own host for the group's master (and its Inference
service's), and reports them (ReportRequest.master/listen); the servicer records them and bumps the
assignment feed, so the other ranks, waiting with their files fetched, start with that master.

Liveness runs beside it: a node whose heartbeats stop for `lost_after_s` is marked lost and every
deployment with a rank on it degraded, with the cause in its detail.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.security import hash_secret, verify_secret
from coordinator.state import AssignmentRecord, State
from edge_node import control
from edge_node.control import NODE_ID_KEY, NODE_SECRET_KEY, AssignmentSet, DeploymentId, NodeId, WireError
from edge_node.rpc import node_pb2 as pb
from edge_node.rpc import node_pb2_grpc
from edge_node.tls import COORDINATOR_NAME, peer_certificate, peer_name

log = logging.getLogger("edgefed.coordinator")

DEPLOYMENTS_DIR = "deployments"
CRASHED = ("crashed", "failed", "exited")


@dataclass(frozen=True)
class ServerConfig:
    heartbeat_interval_s: float = 3.0  # told to nodes at registration
    lost_after_s: float = 10.0  # no heartbeat for this long: the node is lost
    chunk_bytes: int = 256 * 1024  # FetchFile chunk (under gRPC's 4 MiB message limit)
    stream_poll_s: float = 0.5  # how often a waiting assignment stream checks its client is still there
    max_workers: int = 128  # each node holds one (its assignment feed) plus its fetches


class Changes:
    """A version number bumped on every change of what nodes should run; assignment streams wait on it."""

    def __init__(self):
        self._cond = threading.Condition()
        self.version = time.time_ns() // 1000  # never repeats across coordinator restarts

    def bump(self) -> None:
        with self._cond:
            self.version += 1
            self._cond.notify_all()

    def wait_past(self, version: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.version != version, timeout=timeout)
            return self.version


def deployment_state(assignments: list[AssignmentRecord], lost: set[str]) -> tuple[str, str]:
    """A deployment's state and its cause, from its ranks' last reports and the lost nodes (pure)."""
    crashed = sorted((a for a in assignments if a.status in CRASHED), key=lambda a: (a.updated, a.rank))
    if crashed:  # the first to end is the cause; the others usually followed because it was gone
        a = crashed[0]
        why = f"exit status {a.exit_code}" if a.exit_code >= 0 else f"killed by signal {-a.exit_code}"
        return "failed", f"rank {a.rank} on node {a.node_id} {a.status} ({a.detail or why})"
    gone = sorted({a.node_id for a in assignments} & lost)
    if gone:
        return "degraded", f"node(s) {', '.join(gone)} lost (no heartbeat)"
    if assignments and all(a.status == "running" for a in assignments):
        return "running", ""
    return "pending", ""


class NodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, state: State, state_dir: str | Path, config: ServerConfig, tls: bool,
                 enroll: Callable[[str], bool], changes: Changes | None = None, clock: Callable[[], float] = time.time,
                 revoked: Callable[[object], bool] = lambda cert: False):
        self.state, self.dir, self.config, self.tls, self.enroll = state, Path(state_dir), config, tls, enroll
        self.revoked = revoked  # a peer certificate -> refused (coordinator.security.SecretStore.certificate_revoked)
        self.changes = changes or Changes()
        self.clock = clock
        self.started = clock()  # a node's silence counts from here too: a restart is not the nodes' fault

    # --- who is calling ------------------------------------------------------------------------------------

    def _peer(self, context: grpc.ServicerContext) -> str:
        """The name on the caller's certificate (mutual TLS), or the call is aborted."""
        name = peer_name(context)
        if name is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        if self.revoked(peer_certificate(context)):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the certificate of {name!r} was revoked")
        return name

    def _caller(self, context: grpc.ServicerContext) -> NodeId:
        """The enrolled node behind this call, or the call is aborted."""
        if self.tls:
            node = self.state.get_node(NodeId(self._peer(context)))
        else:
            meta = dict(context.invocation_metadata())
            node = self.state.get_node(NodeId(meta.get(NODE_ID_KEY, "")))
            if node is not None and not (node.secret_digest and verify_secret(meta.get(NODE_SECRET_KEY, ""),
                                                                                node.secret_digest)):
                node = None
        if node is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown node: register with an enrollment token first")
        return node.node_id

    @staticmethod
    def _parse(context: grpc.ServicerContext, parse, message):
        try:
            return parse(message)
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    # --- handlers ------------------------------------------------------------------------------------------

    def Register(self, request, context):
        reg = self._parse(context, control.registration_from_pb, request)
        if self.tls:
            name = self._peer(context)
            if name != reg.name or name == COORDINATOR_NAME:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"name: {reg.name!r} differs from the certificate's name {name!r}")
        known = self.state.get_node(reg.name)
        if known is not None and (self.tls or self._secret_ok(context, known.secret_digest)):
            rec = self.state.register_node(reg.name, reg.facts, reg.advertise_host, self.clock())
            log.info("node %s re-registered", rec.node_id)
            if known.state == "lost":
                self._refresh_deployments(rec.node_id)
            return pb.RegisterReply(node_id=rec.node_id, heartbeat_interval_s=self.config.heartbeat_interval_s)
        if not reg.token or not self.enroll(reg.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token: not a valid enrollment token")
        secret = secrets.token_urlsafe(32)
        rec = self.state.register_node(reg.name, reg.facts, reg.advertise_host, self.clock(), hash_secret(secret))
        log.info("node %s enrolled (%d cores, %.1f GiB, %.1f GFLOP/s)", rec.node_id, reg.facts.cores,
                 reg.facts.memory_total / 2**30, reg.facts.speed_gflops)
        self.changes.bump()
        return pb.RegisterReply(node_id=rec.node_id, node_secret=secret,
                                heartbeat_interval_s=self.config.heartbeat_interval_s)

    @staticmethod
    def _secret_ok(context, digest: str) -> bool:
        secret = dict(context.invocation_metadata()).get(NODE_SECRET_KEY, "")
        return bool(digest and secret and verify_secret(secret, digest))

    def Heartbeat(self, request, context):
        node_id = self._caller(context)
        figures = self._parse(context, control.heartbeat_from_pb, request)
        was = self.state.get_node(node_id).state
        rec = self.state.heartbeat(node_id, figures, self.clock())
        if was == "lost":
            log.info("node %s is back", node_id)
            self._refresh_deployments(node_id)
        return pb.HeartbeatReply(state=rec.state)

    def Assignments(self, request, context) -> Iterator[pb.AssignmentSet]:
        node_id = self._caller(context)
        known = request.known_version
        while context.is_active():
            version = self.changes.version
            if version != known:
                known = version
                yield control.assignment_set_to_pb(self.assignment_set(node_id, version))
            self.changes.wait_past(known, self.config.stream_poll_s)

    def assignment_set(self, node_id: NodeId, version: int) -> AssignmentSet:
        live = {d.deployment_id for d in self.state.list_deployments() if d.state != "stopped"}
        return AssignmentSet(version, tuple(a.to_assignment() for a in self.state.assignments(node_id=node_id)
                                            if a.deployment_id in live))

    def Report(self, request, context):
        node_id = self._caller(context)
        rep = self._parse(context, control.report_from_pb, request)
        mine = [a for a in self.state.assignments(rep.deployment_id) if a.rank == rep.rank]
        if not mine or mine[0].node_id != node_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"deployment_id/rank: {rep.deployment_id!r} rank {rep.rank} is not assigned to {node_id}")
        if rep.master or rep.listen:  # rank 0's node chose them on its host (control checked it is rank 0)
            self.state.set_rendezvous(rep.deployment_id, rep.master or None, rep.listen or None)
            log.info("deployment %s: rank 0 on %s reported%s%s", rep.deployment_id, node_id,
                     f" rendezvous {rep.master}" if rep.master else "", f" endpoint {rep.listen}" if rep.listen else "")
        self.state.update_assignment(rep.deployment_id, rep.rank, rep.status, self.clock(), rep.exit_code,
                                     rep.stderr_tail, rep.detail)
        if rep.master:
            self.changes.bump()  # the other ranks' assignments now carry the master: they start
        if rep.status in CRASHED:
            log.warning("deployment %s rank %d on %s %s (exit %d): %s", rep.deployment_id, rep.rank, node_id,
                        rep.status, rep.exit_code, rep.detail or rep.stderr_tail[-300:])
        self._update_deployment(rep.deployment_id)
        return pb.ReportReply()

    def FetchFile(self, request, context) -> Iterator[pb.FileChunk]:
        node_id = self._caller(context)
        try:
            dep_id = control.check_name(request.deployment_id, "deployment_id")
            rel = control.check_relative_path(request.path, "path")
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        listed = {f.path: f for a in self.state.assignments(DeploymentId(dep_id), node_id) for f in a.files}
        if rel not in listed:
            context.abort(grpc.StatusCode.NOT_FOUND, f"path: {rel!r} is not a file of deployment {dep_id!r} "
                          f"assigned to {node_id}")
        size = listed[rel].size
        if request.offset > size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset: {request.offset} is past the file's end ({size})")
        path = self.dir / DEPLOYMENTS_DIR / dep_id / rel
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while context.is_active() and (data := f.read(self.config.chunk_bytes)):
                yield pb.FileChunk(offset=offset, data=data)
                offset += len(data)

    # --- deployment state ----------------------------------------------------------------------------------

    def _lost(self) -> set[str]:
        return {n.node_id for n in self.state.list_nodes() if n.state == "lost"}

    def _update_deployment(self, dep_id: DeploymentId) -> None:
        dep = self.state.get_deployment(dep_id)
        if dep is None or dep.state == "stopped":
            return
        state, detail = deployment_state(self.state.assignments(dep_id), self._lost())
        if (state, detail) != (dep.state, dep.detail):
            self.state.set_deployment_state(dep_id, state, detail)

    def _refresh_deployments(self, node_id: NodeId) -> None:
        for dep_id in sorted({a.deployment_id for a in self.state.assignments(node_id=node_id)}):
            self._update_deployment(dep_id)

    def check_liveness(self) -> list[NodeId]:
        """Mark silent nodes lost and degrade their deployments; returns the nodes lost now."""
        now = self.clock()
        if now - self.started < self.config.lost_after_s:
            return []
        lost = self.state.mark_lost(now - self.config.lost_after_s)
        for node_id in lost:
            log.warning("node %s lost: no heartbeat for %.1f s", node_id, self.config.lost_after_s)
            self._refresh_deployments(node_id)
        return lost


class Periodic:
    """A thread calling `fn` every `period_s` until stopped (the liveness check, re-planning)."""

    def __init__(self, fn: Callable[[], object], period_s: float, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, period_s), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object], period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                fn()
            except Exception as e:  # keep going: one failed pass must not end liveness or recovery for good
                log.exception("%s failed: %s", self._thread.name, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)


def start_server(servicer: NodeServicer, listen: str, server_credentials=None) -> tuple[grpc.Server, int]:
    """Serve the Node service on `listen` (HOST:PORT; port 0 picks one); returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=servicer.config.max_workers,
                                                    thread_name_prefix="node-rpc"))
    node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    try:
        port = (server.add_secure_port(listen, server_credentials) if server_credentials is not None
                else server.add_insecure_port(listen))
    except RuntimeError:  # grpc raises where older versions returned 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen} (address in use or not local?)")
    server.start()
    return server, port

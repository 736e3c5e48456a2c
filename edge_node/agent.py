"""The device agent daemon (`edgefed node`): the one process a device operator runs.

It registers with the coordinator (an enrollment token the first time; afterwards its certificate, or
behind --insecure the node secret it was handed, kept in the data directory), heartbeats, and follows the
coordinator's assignment feed. For each assignment it fetches the deployment's files (resumable, sha256
checked before use), writes the frozen run configuration with its local shard path, and starts the rank as
a supervised child. Rank 0's agent picks the group's rendezvous port free on this host, has the rank bind a
free serving port (--listen HOST:0, read back from its ready file) and reports both; another rank whose
assignment has no master yet fetches its files and waits for the coordinator to pass rank 0's on. A child's
ending comes back to the coordinator as a report with its exit status and stderr tail; the agent itself
stays up. When the coordinator goes away, the agent reconnects with capped exponential backoff; its reports
wait in a queue meanwhile. SIGTERM stops the children, then the agent.

The agent stays light: it never imports torch (the speed probe, measured once per device, aside); the ranks
it supervises own the model runtime.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from edge_node import control
from edge_node.control import NODE_ID_KEY, NODE_SECRET_KEY, Assignment, AssignmentSet, FileRef, Registration, Report
from edge_node.model.checksum import sha256_file  # torch-free, as the agent must be
from edge_node.model.errors import EdgefedError
from edge_node.ports import free_port
from edge_node.rpc import node_pb2 as pb
from edge_node.rpc import node_pb2_grpc
from edge_node.supervisor import ChildExit, ChildSpec, Supervisor

log = logging.getLogger("edgefed.node")

IDENTITY_FILE = "node.json"
FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


class AgentError(EdgefedError):
    """The agent cannot go on (refused by the coordinator, unusable data directory)."""


class FetchError(AgentError):
    """A fetched file is not the one the assignment names (size or sha256 differ); it is not kept."""


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str  # HOST:PORT of the coordinator's Node service
    data_dir: Path
    name: str
    advertise_host: str
    token: str = ""
    tls_dir: str | None = None  # None: plain text (--insecure)
    rpc_timeout_s: float = 10.0  # every unary call
    stream_timeout_s: float = 30.0  # the assignment feed is re-opened after this long
    fetch_timeout_s: float = 300.0  # one FetchFile stream
    fetch_attempts: int = 5  # a broken fetch resumes from its offset this many times
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    heartbeat_interval_s: float | None = None  # None: what the coordinator says
    stop_timeout_s: float = 5.0  # a child gets this long after SIGTERM
    rank_command: tuple[str, ...] = (sys.executable, "-m", "edgefed", "serve")
    # Long-running children of the device beside its ranks (a Flower SuperNode, ...): started when the agent
    # starts, restarted with capped backoff when they end on their own, stopped with the agent. Their names must
    # not look like a rank's ("<deployment>/rank<N>").
    services: tuple[ChildSpec, ...] = ()


class Backoff:
    """Capped exponential backoff with jitter: initial, 2x, 4x ... up to `cap` seconds."""

    def __init__(self, initial: float, cap: float):
        self.initial, self.cap, self.n = initial, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.initial * 2**self.n)
        self.n += 1
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.n = 0


def route_ip(coordinator: str) -> str:
    """This machine's address on the interface that routes to the coordinator (no packet is sent)."""
    host = coordinator.rpartition(":")[0].strip("[]")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Agent:
    def __init__(self, config: AgentConfig, facts: Callable[[], control.DeviceFacts],
                 figures: Callable[[], control.HeartbeatFigures]):
        self.config, self.facts, self.figures = config, facts, figures
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stop_event = threading.Event()
        self.identity = self._load_identity()
        self.supervisor = Supervisor(self.data_dir / "logs", on_exit=self._child_exited,
                                     stop_timeout_s=config.stop_timeout_s)
        self.reports: queue.Queue[Report] = queue.Queue()
        self.sets: queue.Queue[AssignmentSet] = queue.Queue()
        self.handled: dict[tuple[str, int], str] = {}  # (deployment, rank) -> last status, never redone
        self.services = {spec.name: spec for spec in config.services}
        self._service_backoff = {name: Backoff(1.0, config.backoff_max_s * 3) for name in self.services}
        self._restarts: queue.Queue[tuple[float, str]] = queue.Queue()
        if any(_is_rank(name) for name in self.services):
            raise AgentError(f"a service may not be named like a rank: {sorted(self.services)}")
        self.heartbeat_interval_s = config.heartbeat_interval_s or 3.0
        self._stub: node_pb2_grpc.NodeStub | None = None
        self._reporter: threading.Thread | None = None
        self._call = None
        if config.tls_dir is None:
            log.warning("--insecure: the link to the coordinator is plain text; anyone on the network can read "
                        "and forge it. Use --tls-dir outside a trusted test network.")

    # --- identity -------------------------------------------------------------------------------------------

    def _load_identity(self) -> dict:
        path = self.data_dir / IDENTITY_FILE
        try:
            ident = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise AgentError(f"{path}: unreadable node identity ({e}); remove it to enroll again") from None
        return ident if ident.get("name") == self.config.name else {}

    def _save_identity(self, node_id: str, secret: str) -> None:
        self.identity = {"name": self.config.name, "node_id": node_id, "secret": secret}
        path = self.data_dir / IDENTITY_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.identity, f)
        tmp.replace(path)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.config.tls_dir is not None or not self.identity:
            return ()
        return ((NODE_ID_KEY, self.identity["node_id"]), (NODE_SECRET_KEY, self.identity["secret"]))

    # --- connection -----------------------------------------------------------------------------------------

    def _channel(self) -> grpc.Channel:
        if self.config.tls_dir is None:
            return grpc.insecure_channel(self.config.coordinator)
        from edge_node.tls import channel_credentials, coordinator_channel_options

        return grpc.secure_channel(self.config.coordinator, channel_credentials(self.config.tls_dir),
                                   options=coordinator_channel_options())

    def _register(self, stub: node_pb2_grpc.NodeStub) -> None:
        # the token is only spent when the coordinator does not know this node (first enrollment)
        reg = Registration(control.NodeId(self.config.name), self.config.token, self.facts(),
                           self.config.advertise_host)
        reply = stub.Register(control.registration_to_pb(reg), timeout=self.config.rpc_timeout_s,
                              metadata=self._metadata())
        if reply.node_secret or not self.identity:
            self._save_identity(reply.node_id, reply.node_secret or self.identity.get("secret", ""))
        if self.config.heartbeat_interval_s is None and reply.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = reply.heartbeat_interval_s
        log.info("registered with %s as %s", self.config.coordinator, reply.node_id)

    def run(self) -> int:
        """Serve until stop_event is set (SIGTERM); returns 0, or raises AgentError when refused."""
        threading.Thread(target=self._apply_loop, name="apply", daemon=True).start()
        if self.services:
            threading.Thread(target=self._services_loop, name="services", daemon=True).start()
        self._reporter = threading.Thread(target=self._report_loop, name="report", daemon=True)
        self._reporter.start()
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        try:
            while not self.stop_event.is_set():
                channel = self._channel()
                try:
                    self._stub = stub = node_pb2_grpc.NodeStub(channel)
                    self._register(stub)
                    backoff.reset()
                    session = threading.Event()
                    threading.Thread(target=self._heartbeat_loop, args=(stub, session), name="heartbeat",
                                     daemon=True).start()
                    try:
                        self._follow(stub)
                    finally:
                        session.set()
                except grpc.RpcError as e:
                    if e.code() in FATAL:
                        raise AgentError(f"the coordinator at {self.config.coordinator} refused this node: "
                                         f"{e.details()}") from None
                    delay = backoff.next()
                    log.warning("coordinator %s unreachable (%s: %s); retrying in %.1f s", self.config.coordinator,
                                e.code().name, e.details(), delay)
                    self.stop_event.wait(delay)
                finally:
                    self._stub = None
                    channel.close()
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self.stop_event.set()
        call = self._call
        if call is not None:
            call.cancel()

    def shutdown(self) -> None:
        """Stop the children, then tell the coordinator how they ended (best effort, 2 s)."""
        self.stop_event.set()
        exits = self.supervisor.stop_all()
        for e in exits:
            log.info("stopped %s (%s)", e.name, e.how)
        if self._reporter is not None:
            self._reporter.join(timeout=self.config.rpc_timeout_s)
        if self.reports.empty():
            return
        channel = self._channel()
        try:
            self._stub = node_pb2_grpc.NodeStub(channel)
            self._flush_reports(timeout_s=2.0)
        finally:
            self._stub = None
            channel.close()

    def _heartbeat_loop(self, stub: node_pb2_grpc.NodeStub, session: threading.Event) -> None:
        while not session.wait(self.heartbeat_interval_s) and not self.stop_event.is_set():
            try:
                stub.Heartbeat(control.heartbeat_to_pb(self.figures()), timeout=self.config.rpc_timeout_s,
                               metadata=self._metadata())
            except grpc.RpcError as e:  # the assignment feed notices a lost coordinator and reconnects
                log.debug("heartbeat failed: %s", e.code().name)

    def _follow(self, stub: node_pb2_grpc.NodeStub) -> None:
        """Read the assignment feed until an error other than its own deadline (which re-opens it)."""
        known = 0
        while not self.stop_event.is_set():
            self._call = call = stub.Assignments(pb.AssignmentsRequest(known_version=known),
                                                 timeout=self.config.stream_timeout_s, metadata=self._metadata())
            try:
                for msg in call:
                    try:
                        s = control.assignment_set_from_pb(msg)
                    except control.WireError as e:
                        log.error("ignoring a malformed assignment set: %s", e)
                        continue
                    known = s.version
                    self.sets.put(s)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                if e.code() == grpc.StatusCode.CANCELLED and self.stop_event.is_set():
                    return
                raise
            finally:
                self._call = None

    # --- reports --------------------------------------------------------------------------------------------

    def report(self, r: Report) -> None:
        log.info("%s rank %d: %s%s", r.deployment_id, r.rank, r.status, f" ({r.detail})" if r.detail else "")
        self.reports.put(r)

    def _report_loop(self) -> None:
        """Send reports in order, retrying while the coordinator is away; at shutdown, leave the rest queued
        for shutdown() to flush."""
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while not self.stop_event.is_set():
            try:
                r = self.reports.get(timeout=0.2)
            except queue.Empty:
                continue
            while not self._send(r):
                if self.stop_event.wait(backoff.next()):
                    self.reports.put(r)
                    return
            backoff.reset()

    def _send(self, r: Report, timeout_s: float | None = None) -> bool:
        stub = self._stub
        if stub is None:
            return False
        try:
            stub.Report(control.report_to_pb(r), timeout=timeout_s or self.config.rpc_timeout_s,
                        metadata=self._metadata())
            return True
        except grpc.RpcError as e:
            if e.code() in FATAL:
                log.error("report refused: %s", e.details())
                return True  # a refused report would be refused again
            return False

    def _flush_reports(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.reports.empty() and time.monotonic() < deadline:
            try:
                r = self.reports.get_nowait()
            except queue.Empty:
                return
            self._send(r, timeout_s=max(0.1, deadline - time.monotonic()))

    # --- assignments ----------------------------------------------------------------------------------------

    def _apply_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                s = self.sets.get(timeout=0.5)
            except queue.Empty:
                continue
            while not self.sets.empty():  # only the newest set matters
                s = self.sets.get_nowait()
            self.apply(s)

    def apply(self, s: AssignmentSet) -> None:
        """Start what is newly assigned; stop what is no longer assigned."""
        wanted = {_child_name(a): a for a in s.assignments}
        for name in self.supervisor.running():
            if name not in wanted and name not in self.services:
                log.info("%s is no longer assigned: stopping it", name)
                self.supervisor.stop(name)
        self._remove_unassigned({a.deployment_id for a in s.assignments})
        for name, a in wanted.items():
            key = (a.deployment_id, a.rank)
            if self.stop_event.is_set():
                continue
            if self.handled.get(key) == "waiting" and a.master:  # rank 0 reported its rendezvous: go
                self.handled[key] = "starting"
            elif key in self.handled:
                continue
            else:
                self.handled[key] = "fetching"
            try:
                self._start(a)
            except (EdgefedError, OSError, grpc.RpcError) as e:
                detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
                self.handled[(a.deployment_id, a.rank)] = "failed"
                self.report(Report(a.deployment_id, a.rank, "failed", detail=detail[:2000]))
                log.error("%s: %s", name, detail)

    def _remove_unassigned(self, keep: set[str]) -> None:
        """Delete the files of deployments this node no longer runs (replaced or stopped ones)."""
        root = self.data_dir / "deployments"
        for d in root.iterdir() if root.is_dir() else ():
            if d.name not in keep and d.is_dir():
                log.info("removing %s (no longer assigned)", d)
                shutil.rmtree(d, ignore_errors=True)

    def deployment_dir(self, deployment_id: str) -> Path:
        return self.data_dir / "deployments" / deployment_id

    def _start(self, a: Assignment) -> None:
        """Fetch the assignment's files (once), then start its rank; a rank other than 0 whose master is not
        known yet waits (handled "waiting") until an assignment set carries the one rank 0's node reported."""
        d = self.deployment_dir(a.deployment_id)
        shards = d / "shards"
        key = (a.deployment_id, a.rank)
        if self.handled.get(key) == "fetching":
            self.report(Report(a.deployment_id, a.rank, "fetching"))
            for f in a.files:
                self.fetch(a.deployment_id, f, shards / f.path)
            if a.rank != 0 and not a.master:
                self.handled[key] = "waiting"
                log.info("%s: files fetched; waiting for rank 0's rendezvous address", _child_name(a))
                return
            self.handled[key] = "starting"
        cfg_path = d / f"run_config.rank{a.rank}.json"
        cfg_path.write_text(local_run_config(a.run_config_json, shards.name))
        ready = d / f"ready.rank{a.rank}.json"
        ready.unlink(missing_ok=True)
        master, chosen = a.master, ""
        if not master:  # rank 0: the rendezvous is on this host, on a port free here
            master = chosen = f"{self.config.advertise_host}:{free_port('')}"
        argv = [*self.config.rank_command, "--run-config", str(cfg_path), "--rank", str(a.rank),
                "--master", master, "--ready-file", str(ready)]
        if a.rank == 0:  # port 0: the rank binds a free one and writes it to its ready file
            argv += ["--listen", a.listen or f"{self.config.advertise_host}:0"]
        argv += ["--tls-dir", self.config.tls_dir] if self.config.tls_dir else ["--insecure"]
        name = _child_name(a)
        pid = self.supervisor.start(ChildSpec(name, tuple(argv), cwd=str(d), log_dir=str(d)))
        self.report(Report(a.deployment_id, a.rank, "starting", detail=f"pid {pid}", master=chosen))
        threading.Thread(target=self._await_ready, args=(a, name, pid, ready), name=f"ready-{name}",
                         daemon=True).start()

    def _await_ready(self, a: Assignment, name: str, pid: int, ready: Path) -> None:
        """Report "running" once the child wrote its ready file (model loaded, group joined); rank 0's report
        carries the address its Inference service listens on, as the ready file says."""
        while self.supervisor.pid(name) == pid and not self.stop_event.is_set():
            if ready.is_file():
                listen = ""
                if a.rank == 0:
                    try:
                        listen = str(json.loads(ready.read_text()).get("address") or "")
                    except (OSError, ValueError, AttributeError) as e:
                        log.error("%s: unreadable ready file %s (%s)", name, ready, e)
                self.handled[(a.deployment_id, a.rank)] = "running"
                self.report(Report(a.deployment_id, a.rank, "running", detail=f"pid {pid}", listen=listen))
                return
            self.stop_event.wait(0.1)

    def _start_service(self, name: str) -> None:
        if self.stop_event.is_set():
            return
        try:
            pid = self.supervisor.start(self.services[name])
            log.info("started %s (pid %d)", name, pid)
        except (OSError, ValueError) as e:
            log.error("cannot start %s: %s", name, e)
            self._restart_later(name)

    def _restart_later(self, name: str) -> None:
        delay = self._service_backoff[name].next()
        log.warning("restarting %s in %.1f s", name, delay)
        self._restarts.put((time.monotonic() + delay, name))

    def _services_loop(self) -> None:
        """Starts and restarts the services. One long-lived thread does it: a child's parent-death signal
        (edge_node.supervisor) fires when the thread that started it ends, so never from a short-lived one."""
        for name in self.services:
            self._start_service(name)
        while not self.stop_event.is_set():
            try:
                due, name = self._restarts.get(timeout=0.5)
            except queue.Empty:
                continue
            if not self.stop_event.wait(max(0.0, due - time.monotonic())):
                self._start_service(name)

    def _child_exited(self, e: ChildExit) -> None:
        if e.name in self.services:
            if not e.stopped and not self.stop_event.is_set():
                log.error("%s ended (%s) after %.1f s; stderr tail:\n%s", e.name, e.how, e.runtime_s,
                          e.stderr_tail[-1000:])
                if e.runtime_s > 60:  # it ran a good while: the next failure starts the backoff afresh
                    self._service_backoff[e.name].reset()
                self._restart_later(e.name)
            return
        dep, _, rank = e.name.rpartition("/rank")
        status = "stopped" if e.stopped else "exited" if e.exit_code == 0 else "crashed"
        self.handled[(dep, int(rank))] = status
        if status == "crashed":
            log.error("%s crashed (%s); stderr tail:\n%s", e.name, e.how, e.stderr_tail[-1000:])
        self.report(Report(control.DeploymentId(dep), int(rank), status, e.exit_code, e.stderr_tail, e.how))

    # --- files ----------------------------------------------------------------------------------------------

    def fetch(self, deployment_id: str, f: FileRef, dest: Path) -> None:
        """Fetch one file to `dest`, resuming a partial download; checked against size and sha256."""
        if dest.is_file() and dest.stat().st_size == f.size and sha256_file(dest) == f.sha256:
            return  # fetched before (and verified again now)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        for attempt in range(self.config.fetch_attempts):
            offset = part.stat().st_size if part.exists() else 0
            if offset > f.size:
                part.unlink()
                offset = 0
            if offset == f.size:
                break
            try:
                self._fetch_from(deployment_id, f, part, offset)
                break
            except grpc.RpcError as e:
                if e.code() in FATAL or e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE) or \
                        attempt == self.config.fetch_attempts - 1:
                    raise
                log.warning("fetch of %s broke at %d bytes (%s); resuming", f.path, part.stat().st_size,
                            e.code().name)
                self.stop_event.wait(backoff.next())
        size = part.stat().st_size
        if size != f.size:
            raise FetchError(f"{dest}: fetched {size} bytes, the assignment says {f.size}")
        got = sha256_file(part)
        if got != f.sha256:
            part.unlink()  # never resume from bytes that hash wrong
            raise FetchError(f"{dest}: sha256 {got[:16]}... does not match the assignment's {f.sha256[:16]}...")
        part.replace(dest)

    def _fetch_from(self, deployment_id: str, f: FileRef, part: Path, offset: int) -> None:
        stub = self._stub
        if stub is None:
            raise AgentError("no connection to the coordinator")
        call = stub.FetchFile(pb.FetchFileRequest(deployment_id=deployment_id, path=f.path, offset=offset),
                              timeout=self.config.fetch_timeout_s, metadata=self._metadata())
        with open(part, "ab") as out:
            for chunk in call:
                if chunk.offset != offset or offset + len(chunk.data) > f.size:
                    call.cancel()
                    raise FetchError(f"{f.path}: chunk at offset {chunk.offset} does not continue at {offset}")
                out.write(chunk.data)
                offset += len(chunk.data)


def local_run_config(run_config_json: str, shards: str) -> str:
    """The assignment's run configuration with this node's shard directory, as RunConfig.to_json writes it.

    The path is relative to the rank's working directory (its deployment's), so every rank runs a
    byte-identical configuration whatever each node's data directory (ranks compare configuration digests).
    Edited as JSON, not through RunConfig, so that the agent never imports torch; the rank checks it whole.
    """
    try:
        raw = json.loads(run_config_json)
    except ValueError as e:
        raise AgentError(f"run_config_json: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "shards" not in raw:
        raise AgentError("run_config_json: expected a run configuration object with a 'shards' field")
    return json.dumps({**raw, "shards": shards}, sort_keys=True)


def _is_rank(name: str) -> bool:
    dep, sep, rank = name.rpartition("/rank")
    return bool(sep and dep and rank.isdigit())


def _child_name(a: Assignment) -> str:
    return f"{a.deployment_id}/rank{a.rank}"

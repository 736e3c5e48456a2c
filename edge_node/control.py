"""Typed records of the node <-> coordinator link (proto/node.proto) and their protobuf serde.

Protobuf types stop here: the agent, the servicer and the state see only these frozen dataclasses. Every
`*_from_pb` checks what protobuf cannot (empty names, out-of-range numbers, paths leaving their directory)
and raises WireError naming the field, which the servicer turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import NewType

from edge_node.model.errors import EdgefedError
from edge_node.rpc import node_pb2 as pb

NodeId = NewType("NodeId", str)
DeploymentId = NewType("DeploymentId", str)

STATUSES = ("fetching", "starting", "running", "exited", "crashed", "stopped", "failed")
# a DNS-style name, as coordinator.security.check_node_name wants for a certificate's common name
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
STDERR_TAIL_BYTES = 4096
# the --insecure identity: metadata on every call after Register (with mutual TLS the certificate says who)
NODE_ID_KEY = "x-edgefed-node-id"
NODE_SECRET_KEY = "x-edgefed-node-secret"
MAX_RUN_CONFIG_BYTES = 64 * 1024


class WireError(EdgefedError, ValueError):
    """A message breaks the link's contract; `field` names the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def check_name(value: str, where: str) -> str:
    if not _NAME.match(value or ""):
        raise WireError(where, f"expected a lowercase DNS-style name (a-z, 0-9, '-', dots between labels), "
                               f"got {value!r}")
    return value


def _check_host_port(value: str, where: str) -> str:
    host, sep, port = (value or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WireError(where, f"expected HOST:PORT, got {value!r}")
    return value


def check_relative_path(value: str, where: str) -> str:
    """A file path inside a deployment directory: relative, no '..', no backslashes."""
    p = PurePosixPath(value or "")
    if not value or p.is_absolute() or ".." in p.parts or "\\" in value or value != str(p):
        raise WireError(where, f"expected a relative path inside the deployment, got {value!r}")
    return value


@dataclass(frozen=True)
class DeviceFacts:
    cores: int
    memory_total: int  # bytes
    memory_available: int  # bytes
    disk_free: int  # bytes
    providers: tuple[str, ...] = ()
    speed_gflops: float = 0.0


@dataclass(frozen=True)
class HeartbeatFigures:
    cpu_percent: float
    memory_available: int
    disk_free: int
    agent_rss: int = 0


@dataclass(frozen=True)
class Registration:
    name: NodeId
    token: str
    facts: DeviceFacts
    advertise_host: str


@dataclass(frozen=True)
class FileRef:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Assignment:
    deployment_id: DeploymentId
    rank: int
    world: int
    run_config_json: str
    master: str
    listen: str = ""  # rank 0 only
    files: tuple[FileRef, ...] = ()


@dataclass(frozen=True)
class AssignmentSet:
    version: int
    assignments: tuple[Assignment, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Report:
    deployment_id: DeploymentId
    rank: int
    status: str
    exit_code: int = 0
    stderr_tail: str = ""
    detail: str = ""
    master: str = ""  # rank 0 only: HOST:PORT of its rendezvous, on its own host
    listen: str = ""  # rank 0 only: HOST:PORT its Inference service listens on


# --- to protobuf -------------------------------------------------------------------------------------------

def facts_to_pb(f: DeviceFacts) -> pb.DeviceFacts:
    return pb.DeviceFacts(cores=f.cores, memory_total=f.memory_total, memory_available=f.memory_available,
                          disk_free=f.disk_free, providers=list(f.providers), speed_gflops=f.speed_gflops)


def registration_to_pb(r: Registration) -> pb.RegisterRequest:
    return pb.RegisterRequest(name=r.name, token=r.token, facts=facts_to_pb(r.facts), advertise_host=r.advertise_host)


def heartbeat_to_pb(h: HeartbeatFigures) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(cpu_percent=h.cpu_percent, memory_available=h.memory_available,
                               disk_free=h.disk_free, agent_rss=h.agent_rss)


def assignment_set_to_pb(s: AssignmentSet) -> pb.AssignmentSet:
    return pb.AssignmentSet(version=s.version, assignments=[
        pb.Assignment(deployment_id=a.deployment_id, rank=a.rank, world=a.world, run_config_json=a.run_config_json,
                      master=a.master, listen=a.listen,
                      files=[pb.FileRef(path=f.path, size=f.size, sha256=f.sha256) for f in a.files])
        for a in s.assignments])


def report_to_pb(r: Report) -> pb.ReportRequest:
    return pb.ReportRequest(deployment_id=r.deployment_id, rank=r.rank, status=r.status, exit_code=r.exit_code,
                            stderr_tail=r.stderr_tail[-STDERR_TAIL_BYTES:], detail=r.detail, master=r.master,
                            listen=r.listen)


# --- from protobuf (checked) -------------------------------------------------------------------------------

def _finite(value: float, where: str, low: float = 0.0, high: float = float("inf")) -> float:
    if not (low <= value <= high):  # also false for NaN
        raise WireError(where, f"expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def facts_from_pb(m: pb.DeviceFacts, where: str = "facts") -> DeviceFacts:
    if m.cores < 1:
        raise WireError(f"{where}.cores", f"expected at least 1, got {m.cores}")
    if m.memory_total == 0:
        raise WireError(f"{where}.memory_total", "expected a positive byte count, got 0")
    if m.memory_available > m.memory_total:
        raise WireError(f"{where}.memory_available", f"{m.memory_available} exceeds memory_total {m.memory_total}")
    for i, p in enumerate(m.providers):
        if not p or len(p) > 64:
            raise WireError(f"{where}.providers[{i}]", f"expected a provider name, got {p!r}")
    return DeviceFacts(m.cores, m.memory_total, m.memory_available, m.disk_free, tuple(m.providers),
                       _finite(m.speed_gflops, f"{where}.speed_gflops", 0.0, 1e9))


def registration_from_pb(m: pb.RegisterRequest) -> Registration:
    if not m.HasField("facts"):
        raise WireError("facts", "missing")
    if not m.advertise_host or len(m.advertise_host) > 255 or any(c in m.advertise_host for c in " /:"):
        raise WireError("advertise_host", f"expected a host name or IPv4 address, got {m.advertise_host!r}")
    if len(m.token) > 512:
        raise WireError("token", "longer than 512 characters")
    return Registration(NodeId(check_name(m.name, "name")), m.token, facts_from_pb(m.facts), m.advertise_host)


def heartbeat_from_pb(m: pb.HeartbeatRequest) -> HeartbeatFigures:
    return HeartbeatFigures(_finite(m.cpu_percent, "cpu_percent", 0.0, 100.0 * 4096), m.memory_available,
                            m.disk_free, m.agent_rss)


def assignment_set_from_pb(m: pb.AssignmentSet) -> AssignmentSet:
    out = []
    for i, a in enumerate(m.assignments):
        w = f"assignments[{i}]"
        if not 0 <= a.rank < a.world:
            raise WireError(f"{w}.rank", f"expected 0 <= rank < world ({a.world}), got {a.rank}")
        files = []
        for j, f in enumerate(a.files):
            if not _SHA256.match(f.sha256):
                raise WireError(f"{w}.files[{j}].sha256", f"expected 64 lowercase hex digits, got {f.sha256!r}")
            files.append(FileRef(check_relative_path(f.path, f"{w}.files[{j}].path"), f.size, f.sha256))
        out.append(Assignment(DeploymentId(check_name(a.deployment_id, f"{w}.deployment_id")), a.rank, a.world,
                              a.run_config_json, _check_host_port(a.master, f"{w}.master") if a.master else "",
                              _check_host_port(a.listen, f"{w}.listen") if a.listen else "", tuple(files)))
    return AssignmentSet(m.version, tuple(out))


def report_from_pb(m: pb.ReportRequest) -> Report:
    if m.status not in STATUSES:
        raise WireError("status", f"expected one of {', '.join(STATUSES)}, got {m.status!r}")
    if m.rank < 0:
        raise WireError("rank", f"expected >= 0, got {m.rank}")
    if len(m.stderr_tail) > STDERR_TAIL_BYTES * 2 or len(m.detail) > STDERR_TAIL_BYTES:
        raise WireError("stderr_tail" if len(m.stderr_tail) > STDERR_TAIL_BYTES * 2 else "detail", "too long")
    for name in ("master", "listen"):
        value = getattr(m, name)
        if value and m.rank != 0:
            raise WireError(name, f"only rank 0 reports its {name} address, not rank {m.rank}")
        if value:
            _check_host_port(value, name)  # a bound port: 1..65535
    return Report(DeploymentId(check_name(m.deployment_id, "deployment_id")), m.rank, m.status, m.exit_code,
                  m.stderr_tail, m.detail, m.master, m.listen)

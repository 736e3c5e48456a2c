"""The Node service in-process on loopback: identity, malformed messages, resumable sha256-checked fetches."""

import hashlib
import os
import threading
from pathlib import Path

import grpc
import pytest

from coordinator.server import DEPLOYMENTS_DIR, NodeServicer, ServerConfig, start_server
from coordinator.state import AssignmentRecord, DeploymentRecord, MemoryState
from edge_node import control
from edge_node.control import NODE_ID_KEY, NODE_SECRET_KEY, DeviceFacts, FileRef, HeartbeatFigures
from edge_node.rpc import node_pb2 as pb
from edge_node.rpc import node_pb2_grpc

FACTS = DeviceFacts(2, 4 << 30, 3 << 30, 10 << 30, ("CPUExecutionProvider",), 10.0)
TOKEN = "good-token"


class Counting(NodeServicer):
    """Records the offsets FetchFile was asked for."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.offsets = []

    def FetchFile(self, request, context):
        self.offsets.append(request.offset)
        yield from super().FetchFile(request, context)


@pytest.fixture
def service(tmp_path):
    state = MemoryState()
    servicer = Counting(state, tmp_path / "state", ServerConfig(chunk_bytes=1000), tls=False,
                        enroll=lambda t: t == TOKEN)
    server, port = start_server(servicer, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, node_pb2_grpc.NodeStub(channel), port
    channel.close()
    server.stop(0).wait(5)


def _register(stub, name="n1", token=TOKEN, facts=FACTS):
    reply = stub.Register(control.registration_to_pb(control.Registration(name, token, facts, "127.0.0.1")),
                          timeout=5)
    return ((NODE_ID_KEY, reply.node_id), (NODE_SECRET_KEY, reply.node_secret))


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_enrollment_needs_a_token_once_then_the_node_secret(service):
    servicer, stub, _ = service
    assert _code(lambda: _register(stub, token="wrong")) == (grpc.StatusCode.UNAUTHENTICATED,
                                                            "token: not a valid enrollment token")
    md = _register(stub)
    again = stub.Register(control.registration_to_pb(control.Registration("n1", "", FACTS, "127.0.0.2")),
                          timeout=5, metadata=md)  # known by its secret: no token
    assert again.node_secret == "" and servicer.state.get_node("n1").advertise_host == "127.0.0.2"
    stub.Heartbeat(control.heartbeat_to_pb(HeartbeatFigures(5.0, 1 << 30, 1 << 30)), timeout=5, metadata=md)
    assert servicer.state.get_node("n1").heartbeat.cpu_percent == 5.0
    forged = ((NODE_ID_KEY, "n1"), (NODE_SECRET_KEY, "guess"))
    code, _ = _code(lambda: stub.Heartbeat(pb.HeartbeatRequest(), timeout=5, metadata=forged))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _code(lambda: stub.Heartbeat(pb.HeartbeatRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("mutate, field", [
    (lambda m: setattr(m, "name", "Bad Name"), "name"),
    (lambda m: m.ClearField("facts"), "facts"),
    (lambda m: setattr(m.facts, "cores", 0), "facts.cores"),
    (lambda m: setattr(m.facts, "memory_total", 0), "facts.memory_total"),
    (lambda m: setattr(m.facts, "memory_available", 5 << 30), "facts.memory_available"),
    (lambda m: setattr(m.facts, "speed_gflops", float("nan")), "facts.speed_gflops"),
    (lambda m: m.facts.providers.append(""), "facts.providers[1]"),
    (lambda m: setattr(m, "advertise_host", "a b"), "advertise_host"),
    (lambda m: setattr(m, "token", "x" * 600), "token"),
])
def test_malformed_register_is_invalid_argument_naming_the_field(service, mutate, field):
    _, stub, _ = service
    m = control.registration_to_pb(control.Registration("n1", TOKEN, FACTS, "127.0.0.1"))
    mutate(m)
    code, details = _code(lambda: stub.Register(m, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field + ":")


@pytest.mark.parametrize("request_, field", [
    (pb.ReportRequest(deployment_id="d-1", rank=0, status="sideways"), "status"),
    (pb.ReportRequest(deployment_id="D 1", rank=0, status="running"), "deployment_id"),
    (pb.ReportRequest(deployment_id="d-1", rank=-1, status="running"), "rank"),
    (pb.ReportRequest(deployment_id="d-1", rank=0, status="running", detail="x" * 5000), "detail"),
    (pb.ReportRequest(deployment_id="d-1", rank=1, status="starting", master="10.0.0.2:4000"), "master"),
    (pb.ReportRequest(deployment_id="d-1", rank=1, status="running", listen="10.0.0.2:4001"), "listen"),
    (pb.ReportRequest(deployment_id="d-1", rank=0, status="starting", master="10.0.0.2"), "master"),
    (pb.ReportRequest(deployment_id="d-1", rank=0, status="running", listen="10.0.0.2:0"), "listen"),
])
def test_malformed_report_is_invalid_argument_naming_the_field(service, request_, field):
    _, stub, _ = service
    md = _register(stub)
    code, details = _code(lambda: stub.Report(request_, timeout=5, metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field + ":")


def _deployment(servicer, tmp_path, node="n1", data=None, sha=None):
    data = data if data is not None else os.urandom(5500)
    d = Path(servicer.dir) / DEPLOYMENTS_DIR / "d-1" / "rank0"
    d.mkdir(parents=True)
    (d / "w.bin").write_bytes(data)
    ref = FileRef("rank0/w.bin", len(data), sha or hashlib.sha256(data).hexdigest())
    servicer.state.add_deployment(DeploymentRecord("d-1", "m", "float32", 1, "127.0.0.1:1"),
                                  [AssignmentRecord("d-1", 0, node, 1, "{}", "127.0.0.1:2", files=(ref,))])
    return data, ref


def test_fetch_serves_only_listed_files_of_the_nodes_own_deployments(service, tmp_path):
    servicer, stub, _ = service
    md = _register(stub)
    _register(stub, "n2")
    _deployment(servicer, tmp_path, node="n2")
    for path, want in (("rank0/w.bin", grpc.StatusCode.NOT_FOUND), ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
                       ("../secrets.json", grpc.StatusCode.INVALID_ARGUMENT)):
        code, details = _code(lambda p=path: list(stub.FetchFile(pb.FetchFileRequest(deployment_id="d-1", path=p),
                                                                 timeout=5, metadata=md)))
        assert code == want, (path, details)


def test_the_assignment_feed_sends_the_set_then_each_change(service, tmp_path):
    servicer, stub, _ = service
    md = _register(stub)
    call = stub.Assignments(pb.AssignmentsRequest(known_version=0), timeout=10, metadata=md)
    first = control.assignment_set_from_pb(next(call))
    assert first.assignments == ()
    _deployment(servicer, tmp_path)
    threading.Timer(0.2, servicer.changes.bump).start()
    second = control.assignment_set_from_pb(next(call))
    call.cancel()
    assert second.version != first.version and [a.deployment_id for a in second.assignments] == ["d-1"]
    assert second.assignments[0].files[0].path == "rank0/w.bin"


def test_rank_zeros_reported_rendezvous_goes_to_the_other_ranks_and_the_endpoint(service):
    servicer, stub, _ = service
    md0, md1 = _register(stub), _register(stub, "n2")
    run = "{}"
    servicer.state.add_deployment(DeploymentRecord("d-2", "m", "float32", 2, ""),
                                  [AssignmentRecord("d-2", 0, "n1", 2, run, ""),
                                   AssignmentRecord("d-2", 1, "n2", 2, run, "")])
    code, _ = _code(lambda: stub.Report(pb.ReportRequest(deployment_id="d-2", rank=0, status="starting",
                                                         master="10.9.9.9:4000"), timeout=5, metadata=md1))
    assert code == grpc.StatusCode.PERMISSION_DENIED  # only the node holding rank 0 reports it
    call = stub.Assignments(pb.AssignmentsRequest(known_version=0), timeout=10, metadata=md1)
    waiting = control.assignment_set_from_pb(next(call))
    assert [(a.rank, a.master) for a in waiting.assignments] == [(1, "")]  # nothing to start with yet
    stub.Report(pb.ReportRequest(deployment_id="d-2", rank=0, status="starting", master="10.0.0.1:4000"),
                timeout=5, metadata=md0)
    ready = control.assignment_set_from_pb(next(call))  # the report bumped the feed
    call.cancel()
    assert [(a.rank, a.master) for a in ready.assignments] == [(1, "10.0.0.1:4000")]
    assert servicer.state.get_deployment("d-2").endpoint == ""
    stub.Report(pb.ReportRequest(deployment_id="d-2", rank=0, status="running", listen="10.0.0.1:4001"),
                timeout=5, metadata=md0)
    assert servicer.state.get_deployment("d-2").endpoint == "10.0.0.1:4001"
    assert [(a.master, a.listen) for a in servicer.state.assignments("d-2")] == [("10.0.0.1:4000", "10.0.0.1:4001"),
                                                                                 ("10.0.0.1:4000", "")]

"""Mutual TLS on the Node service: a node is known by its certificate; other certificates are refused."""

import grpc
import pytest

from coordinator import security
from coordinator.server import NodeServicer, ServerConfig, start_server
from coordinator.state import MemoryState
from edge_node import control, tls
from edge_node.control import DeviceFacts, HeartbeatFigures
from edge_node.rpc import node_pb2_grpc

FACTS = DeviceFacts(2, 4 << 30, 3 << 30, 10 << 30, ("CPUExecutionProvider",), 10.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    security.init_ca(root / "ca")
    security.init_ca(root / "other-ca")
    for name in ("n1", "n2"):
        security.issue_node_cert(root / "ca", name, root / name)
    security.issue_node_cert(root / "other-ca", "n1", root / "n1-other")
    return root


@pytest.fixture
def service(pki):
    state = MemoryState()
    servicer = NodeServicer(state, pki / "state", ServerConfig(), tls=True, enroll=lambda t: t == "tok")
    server, port = start_server(servicer, "127.0.0.1:0", security.server_credentials(pki / "ca"))
    yield state, port
    server.stop(0).wait(5)


def _stub(port, creds):
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=tls.coordinator_channel_options())
    return node_pb2_grpc.NodeStub(channel), channel


def _register(stub, name, token):
    return stub.Register(control.registration_to_pb(control.Registration(name, token, FACTS, "127.0.0.1")),
                         timeout=5)


def test_a_node_is_known_by_its_certificate_after_enrolling_once(service, pki):
    state, port = service
    stub, ch = _stub(port, tls.channel_credentials(pki / "n1"))
    with pytest.raises(grpc.RpcError) as e:
        _register(stub, "n1", "")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # a valid certificate alone does not enroll
    _register(stub, "n1", "tok")
    _register(stub, "n1", "")  # enrolled: the certificate is enough now
    stub.Heartbeat(control.heartbeat_to_pb(HeartbeatFigures(1.0, 1, 1)), timeout=5)  # no metadata needed
    assert state.get_node("n1").heartbeat.cpu_percent == 1.0
    ch.close()


def test_a_node_cannot_register_under_another_name_than_its_certificates(service, pki):
    state, port = service
    stub, ch = _stub(port, tls.channel_credentials(pki / "n2"))
    with pytest.raises(grpc.RpcError) as e:
        _register(stub, "n1", "tok")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "certificate" in e.value.details()
    assert state.get_node("n1") is None
    ch.close()


@pytest.mark.parametrize("which", ["other CA", "no client certificate"])
def test_a_node_without_a_valid_certificate_is_refused(service, pki, which):
    state, port = service
    if which == "other CA":
        creds = tls.channel_credentials_for(tls.TLSBundle(
            (pki / "ca" / "ca.pem").read_bytes(), (pki / "n1-other" / "node.pem").read_bytes(),
            (pki / "n1-other" / "node.key").read_bytes(), "n1", None, pki))
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca" / "ca.pem").read_bytes())
    stub, ch = _stub(port, creds)
    with pytest.raises(grpc.RpcError) as e:
        _register(stub, "n1", "tok")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no call reaches the servicer
    assert state.list_nodes() == []
    ch.close()


def test_a_revoked_certificate_is_refused(pki):
    state = MemoryState()
    servicer = NodeServicer(state, pki / "state", ServerConfig(), tls=True, enroll=lambda t: t == "tok",
                            revoked=lambda cert: tls.common_name(cert) == "n2")
    server, port = start_server(servicer, "127.0.0.1:0", security.server_credentials(pki / "ca"))
    try:
        stub, ch = _stub(port, tls.channel_credentials(pki / "n2"))
        with pytest.raises(grpc.RpcError) as e:
            _register(stub, "n2", "tok")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in e.value.details()
        assert state.list_nodes() == []
        ch.close()
    finally:
        server.stop(0).wait(5)

"""The fleet's CA, certificates, mutual TLS on loopback, enrollment tokens and API keys."""

from __future__ import annotations

import datetime as dt
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from coordinator import security
from coordinator.security import SecretStore, SecurityError
from edge_node import tls
from edge_node.tls import TLSError

METHOD = "/edgefed.test.Echo/Who"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    """A coordinator TLS dir with a CA and certificates for two nodes."""
    d = tmp_path_factory.mktemp("fleet") / "tls"
    security.init_ca(d, ["127.0.0.1", "localhost"])
    security.issue_node_cert(d, "node-a")
    security.issue_node_cert(d, "node-b")
    return d


@pytest.fixture(scope="module")
def other_fleet(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("other") / "tls"
    security.init_ca(d)
    security.issue_node_cert(d, "node-a")
    return d


def _who(request: bytes, context) -> bytes:
    return (tls.peer_name(context) or "<none>").encode()


def _serve(server_creds, fn=_who):
    """A tiny gRPC service (generic handler, no .proto) answering the caller's verified certificate name."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    methods = {"Who": grpc.unary_unary_rpc_method_handler(fn)}
    handler = grpc.method_handlers_generic_handler("edgefed.test.Echo", methods)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_creds)
    server.start()
    return server, port


def _call(port: int, creds, options=None, host: str = "127.0.0.1") -> str:
    with grpc.secure_channel(f"{host}:{port}", creds, options=options) as ch:
        return ch.unary_unary(METHOD)(b"", timeout=5).decode()


@pytest.fixture(scope="module")
def coordinator_server(fleet):
    server, port = _serve(security.server_credentials(fleet))
    yield port
    server.stop(None)


def test_node_certificate_connects_and_is_known_by_its_name(fleet, coordinator_server):
    assert _call(coordinator_server, tls.channel_credentials(fleet / "nodes" / "node-a")) == "node-a"
    assert _call(coordinator_server, tls.channel_credentials(fleet / "nodes" / "node-b")) == "node-b"


def test_coordinator_name_verifies_whatever_address_is_dialled(fleet, coordinator_server):
    creds = tls.channel_credentials(fleet / "nodes" / "node-a")
    assert _call(coordinator_server, creds, host="localhost") == "node-a"  # a SAN given to init_ca
    assert _call(coordinator_server, creds, tls.coordinator_channel_options()) == "node-a"


def test_certificate_from_another_ca_is_refused(other_fleet, coordinator_server):
    with pytest.raises(grpc.RpcError) as e:
        _call(coordinator_server, tls.channel_credentials(other_fleet / "nodes" / "node-a"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(fleet, coordinator_server):
    creds = grpc.ssl_channel_credentials(root_certificates=(fleet / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as e:
        _call(coordinator_server, creds)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "refused this certificate" in tls.handshake_problem(e.value)


def test_handshake_failures_are_explained(fleet, other_fleet, coordinator_server):
    node = tls.channel_credentials(fleet / "nodes" / "node-a")

    def problem(port: int, creds, host: str = "127.0.0.1") -> str | None:
        with pytest.raises(grpc.RpcError) as e:
            _call(port, creds, host=host)
        return tls.handshake_problem(e.value)

    assert "not signed by the CA" in problem(coordinator_server, tls.channel_credentials(other_fleet / "nodes" /
                                                                                         "node-a"))
    plain = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = plain.add_insecure_port("127.0.0.1:0")
    plain.start()
    try:
        assert "does not speak TLS" in problem(port, node)
    finally:
        plain.stop(None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_secure_port("0.0.0.0:0", security.server_credentials(fleet))
    server.start()
    try:  # 127.0.0.2 is not among the coordinator certificate's SubjectAltNames
        assert "does not name the address dialled" in problem(port, node, host="127.0.0.2")
    finally:
        server.stop(None)
    closed = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    gone = closed.add_insecure_port("127.0.0.1:0")  # nothing listens after stop: a server that is down
    closed.start()
    closed.stop(None)
    assert problem(gone, node) is None


def test_client_refuses_a_server_of_another_ca(fleet, other_fleet):
    server, port = _serve(security.server_credentials(other_fleet))
    try:
        with pytest.raises(grpc.RpcError) as e:
            _call(port, tls.channel_credentials(fleet / "nodes" / "node-a"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_coordinator_dials_a_node_rank0_by_node_name(fleet):
    """The node serves with node.pem; the coordinator presents coordinator.pem and checks the node's name."""
    server, port = _serve(tls.server_credentials(fleet / "nodes" / "node-a"))
    try:
        creds = security.node_channel_credentials(fleet)
        assert _call(port, creds, security.node_channel_options("node-a")) == tls.COORDINATOR_NAME
        with pytest.raises(grpc.RpcError):  # node-a's certificate does not pass for node-b
            _call(port, creds, security.node_channel_options("node-b"))
    finally:
        server.stop(None)


def test_require_peer_lets_only_the_named_party_call(fleet):
    def who(request: bytes, context) -> bytes:
        return tls.require_peer(context, tls.COORDINATOR_NAME).encode()

    server, port = _serve(tls.server_credentials(fleet / "nodes" / "node-a"), who)
    try:
        opts = security.node_channel_options("node-a")
        assert _call(port, security.node_channel_credentials(fleet), opts) == tls.COORDINATOR_NAME
        with pytest.raises(grpc.RpcError) as e:  # another node's valid certificate
            _call(port, tls.channel_credentials(fleet / "nodes" / "node-b"), opts)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(None)


def test_expired_certificate_is_named_at_load_and_refused_in_the_handshake(fleet, coordinator_server, tmp_path):
    files = security.issue_node_cert(fleet, "short-lived", tmp_path / "n", days=1,
                                     now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    with pytest.raises(TLSError, match="expired"):
        tls.load_bundle(files.dir)
    creds = grpc.ssl_channel_credentials(files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes())
    with pytest.raises(grpc.RpcError):
        _call(coordinator_server, creds)


def test_default_lifetime_is_a_year_and_configurable(fleet, tmp_path):
    a = security.issue_node_cert(fleet, "yearly", tmp_path / "a")
    b = security.issue_node_cert(fleet, "monthly", tmp_path / "b", days=30)
    now = dt.datetime.now(dt.UTC)
    assert abs((a.not_after - now) - dt.timedelta(days=365)) < dt.timedelta(minutes=1)
    assert abs((b.not_after - now) - dt.timedelta(days=30)) < dt.timedelta(minutes=1)
    assert tls.load_bundle(b.dir).not_after == b.not_after
    assert tls.load_bundle(b.dir).days_left() == pytest.approx(30, abs=0.01)


def test_keys_are_private_and_node_dir_is_complete(fleet):
    for key in (fleet / "ca.key", fleet / "coordinator.key", fleet / "nodes" / "node-a" / "node.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert sorted(p.name for p in (fleet / "nodes" / "node-a").iterdir()) == ["ca.pem", "node.key", "node.pem"]
    assert (fleet / "nodes" / "node-a" / "ca.pem").read_bytes() == (fleet / "ca.pem").read_bytes()


def test_existing_ca_is_not_overwritten_without_force(tmp_path):
    security.init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(SecurityError, match="already exists"):
        security.init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    security.init_ca(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before


def test_node_certificate_errors(tmp_path, fleet):
    with pytest.raises(SecurityError, match="no CA here"):
        security.issue_node_cert(tmp_path / "empty", "node-a")
    for bad in ("", "Node-A", "node_a", "-a", "a" * 65, "a b", "../x", tls.COORDINATOR_NAME):
        with pytest.raises(SecurityError, match="node name"):
            security.issue_node_cert(fleet, bad, tmp_path / "x")
    with pytest.raises(SecurityError, match="already holds"):
        security.issue_node_cert(fleet, "node-a")
    with pytest.raises(SecurityError, match="--host"):
        security.init_ca(tmp_path / "h", ["not a host!"])


def test_load_errors_name_the_file(fleet, other_fleet, tmp_path):
    node = fleet / "nodes" / "node-a"
    with pytest.raises(TLSError, match="TLS directory not found"):
        tls.load_bundle(tmp_path / "nowhere")
    mixed = tmp_path / "mixed"  # node-a of the other CA beside this fleet's ca.pem
    mixed.mkdir()
    for name in ("node.pem", "node.key"):
        (mixed / name).write_bytes((other_fleet / "nodes" / "node-a" / name).read_bytes())
    (mixed / "ca.pem").write_bytes((fleet / "ca.pem").read_bytes())
    with pytest.raises(TLSError, match=r"node\.pem: not signed by the CA"):
        tls.load_bundle(mixed)
    (mixed / "node.pem").write_bytes((fleet / "ca.pem").read_bytes())  # the CA's own certificate
    with pytest.raises(TLSError, match=r"node\.pem: is a CA certificate"):
        tls.load_bundle(mixed)
    (mixed / "node.pem").write_bytes((node / "node.pem").read_bytes())  # right cert, wrong key
    with pytest.raises(TLSError, match=r"node\.key: this private key does not belong"):
        tls.load_bundle(mixed)
    (mixed / "node.key").write_text("garbage")
    with pytest.raises(TLSError, match=r"node\.key: not an unencrypted PEM private key"):
        tls.load_bundle(mixed)
    (mixed / "node.pem").write_text("garbage")
    with pytest.raises(TLSError, match=r"node\.pem: not a PEM certificate"):
        tls.load_bundle(mixed)
    (mixed / "ca.pem").unlink()
    with pytest.raises(TLSError, match=r"ca\.pem: not found"):
        tls.load_bundle(mixed)
    (mixed / "ca.pem").mkdir()
    with pytest.raises(TLSError, match=r"ca\.pem: cannot be read"):
        tls.load_bundle(mixed)


def test_peer_name_without_tls_is_none():
    class Plain:
        def auth_context(self):
            return {}

    assert tls.peer_name(Plain()) is None
    assert tls.peer_name(object()) is None


# ---------------------------------------------------------------- tokens and keys


def test_secrets_are_stored_hashed_and_verified(tmp_path):
    store = SecretStore(tmp_path)
    rec, token = store.create("enroll", "rack 1")
    text = (tmp_path / "secrets.json").read_text()
    assert token not in text and token.split(".")[2] not in text and rec.hash in text
    assert stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode) == 0o600
    assert store.check(token, ("enroll",)) == rec
    assert store.check(token, ("api", "admin")) is None  # right secret, wrong kind
    assert store.check(token[:-1] + ("A" if token[-1] != "A" else "B"), ("enroll",)) is None
    assert store.check("garbage", ("enroll",)) is None
    assert store.check("", ("enroll",)) is None
    assert SecretStore(tmp_path).check(token, ("enroll",)) == rec  # survives a restart (another instance)


def test_api_and_admin_keys_are_separate(tmp_path):
    store = SecretStore(tmp_path)
    _, user = store.create("api")
    _, admin = store.create("admin")
    assert store.check(user, ("api", "admin")) is not None
    assert store.check(user, ("admin",)) is None
    assert store.check(admin, ("admin",)).kind == "admin"


def test_revoked_expired_and_used_up_secrets_are_refused(tmp_path):
    store = SecretStore(tmp_path)
    rec, key = store.create("api")
    store.revoke(rec.id)
    assert store.check(key, ("api",)) is None
    _, short = store.create("api", ttl_s=10, now=1000.0)
    assert store.check(short, ("api",), now=1005.0) is not None
    assert store.check(short, ("api",), now=1011.0) is None
    rec, once = store.create("enroll", uses=1)
    assert store.consume(once).uses_left == 0
    assert store.consume(once) is None and store.check(once, ("enroll",)) is None
    _, many = store.create("enroll")
    assert [store.consume(many).used for _ in range(3)] == [1, 2, 3]
    with pytest.raises(SecurityError, match="no token or key"):
        store.revoke("000000000000")


def test_corrupt_secrets_file_is_named(tmp_path):
    (tmp_path / "secrets.json").write_text("{nope")
    with pytest.raises(SecurityError, match=r"secrets\.json: not a valid secrets file"):
        SecretStore(tmp_path).list()


def test_hash_and_verify_are_pure():
    sid, secret = security.new_secret("admin")
    assert secret.startswith("efa.") and security.secret_id(secret) == sid
    stored = security.hash_secret(secret)
    assert security.verify_secret(secret, stored) and not security.verify_secret(secret + "x", stored)
    with pytest.raises(SecurityError, match="kind"):
        security.new_secret("root")


def test_a_key_minted_by_another_process_is_seen_at_once(tmp_path):
    coordinator = SecretStore(tmp_path)
    _, first = coordinator.create("api")
    assert coordinator.check(first, ("api",)) is not None  # parsed and cached
    _, second = SecretStore(tmp_path).create("api")  # `edgefed certs api-key` meanwhile
    assert coordinator.check(second, ("api",)) is not None
    rec, token = coordinator.create("enroll", uses=2)
    for left in (1, 0):  # consecutive writes within one clock tick are not hidden by the cache
        assert coordinator.consume(token).uses_left == left
    assert coordinator.check(token, ("enroll",)) is None


def test_revoked_node_certificates_are_refused_and_a_reissued_one_accepted(fleet, tmp_path):
    """The coordinator checks each caller's certificate against the store's revocations."""
    store = SecretStore(tmp_path / "state")

    def who(request: bytes, context) -> bytes:
        cert = tls.peer_certificate(context)
        if store.certificate_revoked(cert):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
        return f"{tls.peer_name(context)} {cert.serial_number}".encode()

    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    old = security.issue_node_cert(fleet, "lost-pi", tmp_path / "old", now=t0)
    server, port = _serve(security.server_credentials(fleet), who)
    try:
        from cryptography import x509

        want = x509.load_pem_x509_certificate(old.cert.read_bytes()).serial_number
        assert _call(port, tls.channel_credentials(old.dir)) == f"lost-pi {want}"  # peer_certificate is the caller's
        store.revoke_node("lost-pi", now=(t0 + dt.timedelta(minutes=30)).timestamp())
        with pytest.raises(grpc.RpcError) as e:
            _call(port, tls.channel_credentials(old.dir))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        new = security.issue_node_cert(fleet, "lost-pi", tmp_path / "new")  # issued after the revocation
        assert _call(port, tls.channel_credentials(new.dir)).startswith("lost-pi ")
        assert _call(port, tls.channel_credentials(fleet / "nodes" / "node-a")).startswith("node-a ")
    finally:
        server.stop(None)
    assert store.revoked_nodes() == {"lost-pi": pytest.approx((t0 + dt.timedelta(minutes=30)).timestamp())}
    with pytest.raises(SecurityError, match="node name"):
        store.revoke_node("Bad Name")


@pytest.mark.slow
def test_fleet_over_mtls_admits_only_enrolled_nodes_with_the_fleets_certificates(tmp_path):
    """Real `edgefed coordinator --tls-dir` and `edgefed node --tls-dir` processes on loopback: a node with a
    certificate of the fleet and a valid token enrolls; one with another CA's certificate (and a valid token)
    never gets past the handshake. (A wrong token: test_fleet_processes, the same code path over TLS.)"""
    from coordinator.state import SqliteState
    from edge_node.ports import free_port
    from edge_node.probe import SPEED_CACHE, speed_gflops
    from tests.coordinator.fleet import Procs, wait_until

    d, other, state = tmp_path / "tls", tmp_path / "other", tmp_path / "state"
    security.init_ca(d)
    security.init_ca(other)
    security.issue_node_cert(d, "n-ok")
    security.issue_node_cert(other, "n-otherca")
    _, token = SecretStore(state).create("enroll")
    speed_gflops(tmp_path / "probe")  # measured once here: the daemons find it cached and never import torch
    for name in ("n-ok", "n-otherca"):
        (tmp_path / f"data-{name}").mkdir()
        (tmp_path / f"data-{name}" / SPEED_CACHE).write_bytes((tmp_path / "probe" / SPEED_CACHE).read_bytes())
    address = f"127.0.0.1:{free_port()}"
    procs = Procs(tmp_path)
    view = None
    try:
        coordinator = procs.start("coordinator", ["coordinator", "--listen", address, "--state", str(state),
                                                  "--tls-dir", str(d), "--heartbeat", "0.5", "--lost-after", "5"])
        wait_until(lambda: "listening" in procs.out("coordinator") or coordinator.poll() is not None, 60,
                   "the coordinator to listen")
        assert coordinator.poll() is None, procs.err("coordinator")

        for name, tls_dir in (("n-ok", d / "nodes" / "n-ok"), ("n-otherca", other / "nodes" / "n-otherca")):
            procs.start(name, ["node", "--coordinator", address, "--data-dir", str(tmp_path / f"data-{name}"),
                               "--tls-dir", str(tls_dir), "--token", token, "--advertise", "127.0.0.1",
                               "--backoff-max", "0.5", "--rpc-timeout", "3"])
        view = SqliteState(state)
        wait_until(lambda: view.get_node("n-ok") is not None, 60, "n-ok to enroll")
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in procs.err("n-otherca"), 30, "n-otherca's handshake failure")
        assert view.get_node("n-otherca") is None
        assert [n.node_id for n in view.list_nodes()] == ["n-ok"]
    finally:
        procs.stop_all()
        if view is not None:
            view.close()

"""Mutual TLS for a node: its --tls-dir (ca.pem, node.pem, node.key, as `edgefed certs node` writes them)
loaded into gRPC credentials, and the verified name of the peer on the other end of a call.

A node dials the coordinator with its certificate as the client certificate, and its rank 0 serves the
coordinator with the same certificate, requiring the coordinator's client certificate. Both sides are
signed by the fleet's one CA; a peer is known by its certificate's common name (a node's name, or
COORDINATOR_NAME). Everything that can be checked when the files are loaded is checked then (present,
readable, PEM, key matches certificate, signed by ca.pem, not expired), so a bad --tls-dir is one clear
error at start-up, not a failed handshake later.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from edge_node.model.errors import EdgefedError

CA_CERT = "ca.pem"
NODE_CERT = "node.pem"
NODE_KEY = "node.key"
COORDINATOR_NAME = "edgefed-coordinator"  # the coordinator certificate's CN (and a SAN); no node may take it
TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


class TLSError(EdgefedError):
    """A TLS file is missing, unreadable or invalid, or a peer's certificate is not acceptable."""


@dataclass(frozen=True)
class TLSBundle:
    """One party's PEM material: the CA it trusts, its certificate and private key."""

    ca: bytes
    cert: bytes
    key: bytes
    name: str  # the certificate's common name
    not_after: dt.datetime  # UTC
    dir: Path

    def days_left(self, now: dt.datetime | None = None) -> float:
        """Days until the certificate expires (for a warning ahead of time)."""
        return (self.not_after - (now or dt.datetime.now(dt.UTC))).total_seconds() / 86400


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSError(f"{path}: not found (a --tls-dir holds {CA_CERT}, a certificate and its key; "
                       f"see `edgefed certs`)") from None
    except OSError as e:
        raise TLSError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not data.strip():
        raise TLSError(f"{path}: is empty")
    return data


def _cert(path: Path, data: bytes):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TLSError(f"{path}: not a PEM certificate ({e})") from None


def common_name(cert) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def check_certificate(cert, ca, path: Path, ca_path: Path, now: dt.datetime | None = None) -> None:
    """`cert` (a cryptography certificate) is within its validity period and directly signed by `ca`."""
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise TLSError(f"{path}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                       f"(issue a new one with `edgefed certs`)")
    if cert.not_valid_before_utc > now:
        raise TLSError(f"{path}: certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                       f"(is this machine's clock right?)")
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:  # issuer name differs, bad signature, odd key type
        why = str(e) or "the signature does not verify"
        raise TLSError(f"{path}: not signed by the CA in {ca_path} ({why}); was it issued by another fleet's CA?"
                       ) from None


def _is_ca(cert) -> bool:
    from cryptography import x509

    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def load_bundle(tls_dir: str | Path, cert_file: str = NODE_CERT, key_file: str = NODE_KEY,
                ca_file: str = CA_CERT) -> TLSBundle:
    """Read and check `tls_dir`'s CA, certificate and key (a node's files by default)."""
    from cryptography.hazmat.primitives import serialization

    d = Path(tls_dir)
    if not d.is_dir():
        raise TLSError(f"{d}: TLS directory not found (create one with `edgefed certs node NAME --out {d}`)")
    ca_path, cert_path, key_path = d / ca_file, d / cert_file, d / key_file
    ca_pem, cert_pem, key_pem = _read(ca_path), _read(cert_path), _read(key_path)
    ca, cert = _cert(ca_path, ca_pem), _cert(cert_path, cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSError(f"{key_path}: not an unencrypted PEM private key ({e})") from None
    check_certificate(ca, ca, ca_path, ca_path)
    if cert_file != ca_file and _is_ca(cert):
        raise TLSError(f"{cert_path}: is a CA certificate, not a node's or the coordinator's")
    check_certificate(cert, ca, cert_path, ca_path)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise TLSError(f"{key_path}: this private key does not belong to the certificate {cert_path}")
    return TLSBundle(ca_pem, cert_pem, key_pem, common_name(cert), cert.not_valid_after_utc, d)


def channel_credentials_for(bundle: TLSBundle):
    """Credentials to dial a server signed by the bundle's CA, presenting the bundle's certificate."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=bundle.ca, private_key=bundle.key,
                                        certificate_chain=bundle.cert)


def server_credentials_for(bundle: TLSBundle):
    """Credentials to serve with the bundle's certificate, requiring a client certificate from its CA."""
    import grpc

    return grpc.ssl_server_credentials([(bundle.key, bundle.cert)], root_certificates=bundle.ca,
                                       require_client_auth=True)


def channel_credentials(tls_dir: str | Path):
    """A node's credentials to dial the coordinator (its node.pem as the client certificate)."""
    return channel_credentials_for(load_bundle(tls_dir))


def server_credentials(tls_dir: str | Path):
    """A node's rank-0 server credentials: node.pem, and a client certificate from the fleet's CA required.
    Any certificate of the CA passes the handshake; check `peer_name(context) == COORDINATOR_NAME` (or use
    require_peer) in the servicer so that only the coordinator is served."""
    return server_credentials_for(load_bundle(tls_dir))


def coordinator_channel_options(server_name: str = COORDINATOR_NAME) -> list[tuple[str, str]]:
    """gRPC channel options that verify the coordinator by its certificate name instead of the address
    dialled (useful where the address is not among the hosts given to `edgefed certs init`)."""
    return [(TARGET_NAME_OPTION, server_name)]


_HANDSHAKE_HINTS = (  # (text in gRPC's error details, what it means), first match wins
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by the CA in ca.pem (another fleet's CA?)"),
    ("Hostname Verification", "the server's certificate does not name the address dialled (add it with "
                              "`edgefed certs init|coordinator --host`, or verify by certificate name)"),
    ("CERTIFICATE_EXPIRED", "a certificate has expired"),
    ("WRONG_VERSION_NUMBER", "the server does not speak TLS (is it running with --insecure?)"),
    ("Socket closed", "the server closed the connection during the handshake: it refused this certificate (another "
                      "CA's, expired) or expects plain text"),
)


def handshake_problem(error) -> str | None:
    """What a failed TLS connection means, from a grpc.RpcError's details (gRPC reports every handshake
    failure as UNAVAILABLE, like a server that is down); None when nothing points at TLS."""
    details = ""
    try:
        details = f"{error.details() or ''} {error.debug_error_string() or ''}"
    except Exception:  # not an RpcError from a call
        details = str(error)
    if "Connection refused" in details:
        return None
    return next((hint for key, hint in _HANDSHAKE_HINTS if key in details), None)


def peer_name(context) -> str | None:
    """The verified common name of the peer's certificate in a gRPC ServicerContext (sync or aio), or None
    on a plain-text channel or without a client certificate."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # a context without TLS (or a test double without auth_context)
        return None
    names = auth.get("x509_common_name") or []
    if not names:
        return None
    name = names[0]
    return name.decode() if isinstance(name, bytes) else str(name)


def peer_certificate(context):
    """The peer's verified certificate (a cryptography x509.Certificate) in a gRPC ServicerContext, or None."""
    from cryptography import x509

    try:
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    except Exception:
        return None
    return x509.load_pem_x509_certificate(pems[0]) if pems else None


def require_peer(context, *allowed: str) -> str:
    """The peer's name when it is one of `allowed`; otherwise the call is aborted (sync servicers) with
    UNAUTHENTICATED (no certificate) or PERMISSION_DENIED (another party's certificate)."""
    import grpc

    name = peer_name(context)
    if name is None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
    if name not in allowed:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate {name!r} may not call this service")
    return name
